"""The numbers the paper's claims are checked on, computed from results frames (:func:`~.results.load_results`):
the layer sweep's targets and its early-vs-late summary (Fig. 5), the c / ‖h_l‖ collapse (the principle behind
Adaptive RMU, Eq. 24), the coefficient sweep (Fig. 2, Fig. 3), Fig. 4's convergence check, and Table 1 (every
method's grid point selected at the utility bar, mean ± std over seeds). :func:`summarize` gathers them all."""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from ..claims import loss_summary
from ..stats import Interval, PairedDifference, accuracy_interval, paired_difference
from ..theory import forget_convergence
from .measure import bits_array
from .plans import ExperimentPlan
from .results import finished_runs, result_topics
from .specs import COEFF_FIELDS, STEERING, RunSpec
from .targets import TARGETS, WMDP_TARGETS, Targets

__all__ = [
    "spearman", "isotonic_decreasing", "layer_table", "layer_targets", "early_late", "early_late_split",
    "collapse_points", "collapse_summary", "coefficient_sweep", "convergence_check", "fixed_c_convergence",
    "point_label", "METHOD_NAMES",
    "table1_select", "table1_choice", "table1_frame", "summarize", "question_clusters", "pooled_interval",
    "paired_runs", "table1_intervals", "method_comparison", "deep_layer", "interval_claims",
]

#: Display names of the methods, in Table 1's order.
METHOD_NAMES = {"base": "base", "ga": "Gradient ascent", "graddiff": "Gradient difference", "npo": "NPO",
                "rmu": "RMU", "adaptive-rmu": "Adaptive RMU"}


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN when either side is constant."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 2 or np.all(x == x[0]) or np.all(y == y[0]):
        return float("nan")
    return float(spearmanr(x, y).statistic)


def isotonic_decreasing(x: Sequence[float], y: Sequence[float]) -> np.ndarray:
    """Least-squares non-increasing fit of y on x (pool-adjacent-violators; equal x share one value)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    order = np.argsort(x, kind="stable")
    xs, ys = x[order], y[order]
    ux, inverse = np.unique(xs, return_inverse=True)
    means = np.bincount(inverse, weights=ys) / np.bincount(inverse)
    weights = np.bincount(inverse).astype(float)
    blocks: list[list[float]] = []  # [value, weight, count of unique x]
    for m, w in zip(means, weights):
        blocks.append([m, w, 1])
        while len(blocks) > 1 and blocks[-2][0] < blocks[-1][0]:
            v2, w2, n2 = blocks.pop()
            v1, w1, n1 = blocks.pop()
            blocks.append([(v1 * w1 + v2 * w2) / (w1 + w2), w1 + w2, n1 + n2])
    fitted_unique = np.concatenate([[v] * n for v, _, n in blocks])
    fitted = np.empty_like(y)
    fitted[order] = fitted_unique[inverse]
    return fitted


def _r2(y: np.ndarray, fitted: np.ndarray) -> float:
    total = float(((y - y.mean()) ** 2).sum())
    return float("nan") if total == 0 else 1.0 - float(((y - fitted) ** 2).sum()) / total


# ------------------------------------------------------------------------------------------- layer sweep
def layer_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Per (method, layer): mean and std over seeds of the forget accuracy (mean of topics and per topic) and
    the general accuracy, and the number of seeds."""
    frame = finished_runs(frame)
    cols = ["forget_acc"] + [f"acc_{t}" for t in result_topics(frame)] + ["general_acc"]
    g = frame.groupby(["method", "layer"])[cols]
    out = g.mean().add_suffix("_mean").join(g.std(ddof=1).add_suffix("_std")).join(g.size().rename("n_seeds"))
    return out.reset_index()


def layer_targets(frame: pd.DataFrame, targets: Targets = TARGETS) -> dict[str, Any]:
    """The layer sweep's targets (Fig. 5; forget accuracy = mean over topics, averaged over seeds per layer):
    Adaptive RMU forgets (≤ ``targets.max_forget``) at ≥ ``min_layer_fraction`` of the layers; fixed-c RMU's
    forget accuracy rises with depth (Spearman ρ > ``min_rho``) and is ≥ ``min_gap`` above Adaptive RMU over the
    deepest third of the layers; general accuracy ≥ ``min_general_ratio`` × base in every run."""
    frame = finished_runs(frame)
    per_layer = frame.groupby(["method", "layer"])["forget_acc"].mean().unstack("method").sort_index()
    layers = list(per_layer.index)
    rmu, ada = per_layer["rmu"], per_layer["adaptive-rmu"]
    deep = layers[len(layers) - math.ceil(len(layers) / 3):]
    ratio = frame["general_acc"] / frame["base_general_acc"]
    fraction = float(targets.forgot(ada).mean())
    rho = spearman(layers, rmu.values)
    gap = float(rmu[deep].mean() - ada[deep].mean())
    worst = float(ratio.min())
    worst_run = frame.loc[ratio.idxmin()]
    t = targets
    return {
        "layers": layers, "deepest_third": deep,
        "adaptive_forget_by_layer": ada.round(4).to_dict(), "rmu_forget_by_layer": rmu.round(4).to_dict(),
        "targets": {
            t.adaptive_fraction_key: {"value": fraction, "threshold": t.min_layer_fraction,
                                      "held": fraction >= t.min_layer_fraction},
            t.rmu_rho_key: {"value": rho, "threshold": t.min_rho, "held": rho > t.min_rho},
            t.gap_key: {"value": gap, "threshold": t.min_gap, "held": gap >= t.min_gap},
            t.general_key: {"value": worst, "threshold": t.min_general_ratio, "held": worst >= t.min_general_ratio,
                            "worst_run": f"{worst_run['method']} l={worst_run['layer']} seed={worst_run['seed']}"},
        },
    }


def early_late_split(layers: Sequence[int]) -> int:
    """The paper's split of Zephyr's 32 blocks, 3–10 vs 11–31: the first layer at or past a third of the depth."""
    return next(l for l in sorted(layers) if l >= (max(layers) + 1) / 3)


def early_late(frame: pd.DataFrame, split: int) -> pd.DataFrame:
    """The paper's summary of Fig. 5: per topic, the average forget accuracy of RMU and Adaptive RMU over the
    early layers (l < ``split``) and the late ones (l ≥ ``split``), and how much Adaptive RMU lowers it."""
    frame = finished_runs(frame)
    rows = []
    for topic in result_topics(frame) + ["mean"]:
        col = "forget_acc" if topic == "mean" else f"acc_{topic}"
        for part, mask in (("early", frame["layer"] < split), ("late", frame["layer"] >= split)):
            sub = frame[mask]
            if sub.empty:
                continue
            by = sub.groupby("method")[col].mean()
            rows.append({"topic": topic, "layers": part, "first": int(sub["layer"].min()),
                         "last": int(sub["layer"].max()), "rmu": by.get("rmu", np.nan),
                         "adaptive_rmu": by.get("adaptive-rmu", np.nan),
                         "lowered_by": by.get("rmu", np.nan) - by.get("adaptive-rmu", np.nan)})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------- c / ‖h_l‖ collapse
def collapse_points(frame: pd.DataFrame) -> pd.DataFrame:
    """One point per (steering run, topic): layer, method, coefficient c, frozen norm ‖h_l‖, ratio c / ‖h_l‖,
    and that topic's forget accuracy."""
    frame = finished_runs(frame)
    frame = frame[frame["method"].isin(STEERING)]
    parts = []
    for t in result_topics(frame):
        parts.append(pd.DataFrame({
            "key": frame["key"], "method": frame["method"], "layer": frame["layer"], "seed": frame["seed"],
            "topic": t, "coefficient": frame[f"coef_{t}"], "frozen_norm": frame[f"norm_frozen_{t}"],
            "ratio": frame[f"ratio_{t}"], "forget_acc": frame[f"acc_{t}"],
        }))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def collapse_summary(points: pd.DataFrame, *, min_points: int = 3) -> dict[str, Any]:
    """How well forget accuracy is one function of c / ‖h_l‖ across layers (the principle behind Adaptive RMU).

    - ``within_layer_rho``: Spearman ρ(ratio, accuracy) inside each layer with ≥ ``min_points`` distinct ratios;
    - ``pooled_rho_ratio`` / ``pooled_rho_coefficient``: the same over every point, against c/‖h_l‖ and raw c;
    - ``r2_ratio`` / ``r2_coefficient``: R² of the best non-increasing curve of accuracy on c/‖h_l‖ (on raw c);
      one curve explains the points when ``r2_ratio`` is high and well above ``r2_coefficient``;
    - ``residual_layer_rho``: Spearman ρ between layer and the residual from that curve (≈ 0 when the layer
      carries nothing beyond the ratio).
    """
    pts = points.dropna(subset=["ratio", "forget_acc"])
    within = {}
    for layer, sub in pts.groupby("layer"):
        if sub["ratio"].nunique() >= min_points:
            within[int(layer)] = spearman(sub["ratio"], sub["forget_acc"])
    y = pts["forget_acc"].to_numpy(float)
    fit_ratio = isotonic_decreasing(np.log(pts["ratio"]), y)
    fit_coeff = isotonic_decreasing(np.log(pts["coefficient"]), y)
    vals = [v for v in within.values() if np.isfinite(v)]
    return {
        "n_points": int(len(pts)), "n_layers": int(pts["layer"].nunique()),
        "within_layer_rho": within,
        "within_layer_rho_mean": float(np.mean(vals)) if vals else float("nan"),
        "pooled_rho_ratio": spearman(pts["ratio"], y),
        "pooled_rho_coefficient": spearman(pts["coefficient"], y),
        "r2_ratio": _r2(y, fit_ratio),
        "r2_coefficient": _r2(y, fit_coeff),
        "residual_layer_rho": spearman(pts["layer"], np.round(y - fit_ratio, 9)),  # rounding: no float noise
        "residual_layer_rho_coefficient": spearman(pts["layer"], np.round(y - fit_coeff, 9)),
    }


# ----------------------------------------------------------------------------- coefficient sweep, Fig. 4
def coefficient_sweep(frame: pd.DataFrame, targets: Targets = TARGETS) -> list[dict[str, Any]]:
    """Per layer of the fixed-c RMU runs: ρ(c, cos(u, h)) (C2), ρ(c, forget accuracy), ρ(c, general accuracy)
    (Fig. 3), and whether every run that forgot has a lower mean MaxLogit than the base model (C1; None when no
    run forgot)."""
    rows = []
    for l, sub in frame[frame["method"] == "rmu"].groupby("layer"):
        topics = [c[len("cos_u_"):] for c in sub.columns if c.startswith("cos_u_")]
        cos = sub[[f"cos_u_{t}" for t in topics]].mean(axis=1)
        ml = sub[[f"maxlogit_{t}" for t in topics]].mean(axis=1)
        base_ml = sub[[f"base_maxlogit_{t}" for t in topics]].mean(axis=1)
        forgot = targets.forgot(sub["forget_acc"])
        rows.append({"layer": int(l), "n": len(sub),
                     "rho_c_cos": spearman(sub["coeff"], cos), "rho_c_forget": spearman(sub["coeff"], sub["forget_acc"]),
                     "rho_c_general": spearman(sub["coeff"], sub["general_acc"]),
                     "maxlogit_below_base_when_forgotten": bool((ml[forgot] < base_ml[forgot]).all())
                     if forgot.any() else None})
    return rows


def convergence_check(frame: pd.DataFrame) -> dict[str, Any]:
    """Fig. 4 over the coefficient sweep's fixed-c RMU runs (``theory.forget_convergence`` on each run's log):
    the paper expects the forget loss to converge exactly when the forget norm starts below c."""
    rows = []
    for _, run in frame[frame["method"] == "rmu"].iterrows():
        if not run.get("log"):
            continue
        conv = forget_convergence(run["log"], tail=3, hidden_size=int(run["hidden_size"]))
        for _, r in conv.to_frame().iterrows():
            rows.append({"layer": int(run["layer"]), "coeff": float(run["coeff"]), "topic": r["topic"],
                         "starts_below": bool(r["starts_below"]), "converged": bool(r["converged"]),
                         "loss_ratio": float(r["loss_ratio"]),
                         "moved_toward_c": bool(np.sign(r["final_norm"] - r["initial_norm"])
                                                == np.sign(r["coefficient"] - r["initial_norm"]))})
    if not rows:
        return {"skipped": "no fixed-c RMU run with a training log"}
    table = pd.DataFrame(rows)
    below, above = table["starts_below"], ~table["starts_below"]

    def share(mask: pd.Series, col: str, how: str) -> float | None:
        return float(getattr(table.loc[mask, col], how)()) if mask.any() else None

    return {"n": len(table), "agreement": float((table["starts_below"] == table["converged"]).mean()),
            "converged_when_below": share(below, "converged", "mean"),
            "converged_when_above": share(above, "converged", "mean"),
            "median_loss_ratio_below": share(below, "loss_ratio", "median"),
            "median_loss_ratio_above": share(above, "loss_ratio", "median"),
            "moved_toward_c": float(table["moved_toward_c"].mean()),
            "table": table.round(4).to_dict(orient="records")}


def fixed_c_convergence(frame: pd.DataFrame, layers: Sequence[int], targets: Targets = TARGETS,
                        level: float = 0.95) -> dict[str, Any]:
    """Fig. 4 (C3) with one fixed c at several layers (e.g. an early, a middle and a late one) × seeds, from the
    layer sweep's RMU runs (``load_results(..., logs=True)``). Per (layer, topic), over seeds with t intervals
    (:func:`~rmu_analysis.claims.loss_summary`): the final ‖h − c·u‖² / ‖c·u‖² (the engine's BOS- and
    padding-free forget states) and whether the frozen forget norm starts below c.

    The claim's prediction, per (layer, topic): starts below c ⇒ converges (the interval's upper end ≤
    ``targets.max_converged_loss``); starts above ⇒ does not (its lower end above it). ``held``: the prediction
    is met at every (layer, topic); an interval across the threshold counts as not met."""
    rmu = finished_runs(frame)
    rmu = rmu[(rmu["method"] == "rmu") & rmu["layer"].isin(list(layers))]
    if rmu.empty or "log" not in rmu or rmu["log"].isna().any():
        return {"skipped": "no fixed-c RMU runs with training logs at these layers (load_results(..., logs=True))"}
    coeffs = sorted(rmu["coeff"].unique())
    if len(coeffs) != 1:
        raise ValueError(f"Fig. 4 needs one fixed c across layers; the runs have c = {coeffs}")
    missing = [l for l in layers if l not in set(rmu["layer"])]
    if missing:
        return {"skipped": f"no fixed-c RMU run at layer(s) {missing}"}
    logs = {int(l): [r["log"] for _, r in part.sort_values("seed").iterrows()] for l, part in rmu.groupby("layer")}
    table = loss_summary(logs, int(rmu["hidden_size"].iloc[0]), level=level)
    thr, c = float(targets.max_converged_loss), float(coeffs[0])
    frozen = [float(rmu[(rmu["layer"] == r["layer"])][f"norm_frozen_{r['topic']}"].mean())
              for _, r in table.iterrows()]
    table["frozen_norm"] = frozen
    table["starts_below"] = table["frozen_norm"] < c
    table["converged"] = table["final_over_target_high"] <= thr
    table["not_converged"] = table["final_over_target_low"] > thr
    table["as_predicted"] = np.where(table["starts_below"], table["converged"], table["not_converged"])
    return {"c": c, "layers": [int(l) for l in layers], "threshold": thr, "n_seeds": int(table["n_seeds"].min()),
            "held": bool(table["as_predicted"].all()), "table": table.round(4).to_dict(orient="records")}


# ------------------------------------------------------------------------------------------------ Table 1
def point_label(row: Mapping[str, Any]) -> str:
    """A grid point's hyperparameters as Table 1 shows them, e.g. ``"c=40, lr=0.01, α=100"``."""
    parts = []
    if row["method"] in COEFF_FIELDS and pd.notna(row.get("coeff")):
        parts.append(f"{'c' if row['method'] == 'rmu' else 'β'}={row['coeff']:g}")
    if pd.notna(row.get("lr")):
        parts.append(f"lr={row['lr']:g}")
    if row["method"] != "ga" and pd.notna(row.get("alpha")):
        parts.append(f"α={row['alpha']:g}")
    return ", ".join(parts) or "defaults"


def _with_points(frame: pd.DataFrame) -> pd.DataFrame:
    frame = finished_runs(frame).copy()
    frame["point"] = [point_label(r) for _, r in frame.iterrows()]
    return frame


def table1_select(frame: pd.DataFrame, targets: Targets = TARGETS) -> pd.DataFrame:
    """Every grid point of every method with its mean over seeds, and which one is selected: the lowest mean
    forget accuracy among the points whose mean general accuracy is ≥ ``targets.min_general_ratio`` × base (if none
    is, the one with the highest general accuracy). Selection uses the reported seeds (stated beside the table)."""
    frame = _with_points(frame)
    topics = result_topics(frame)
    cols = [f"acc_{t}" for t in topics] + ["forget_acc", "general_acc", "base_general_acc", "retain_loss"]
    means = frame.groupby(["method", "point"])[cols].mean().reset_index()
    means["n_seeds"] = frame.groupby(["method", "point"]).size().values
    means["utility_ok"] = targets.utility_kept(means["general_acc"], means["base_general_acc"])
    means["selected"] = False
    for method, sub in means.groupby("method"):
        ok = sub[sub["utility_ok"]]
        pick = ok["forget_acc"].idxmin() if len(ok) else sub["general_acc"].idxmax()
        means.loc[pick, "selected"] = True
    return means


def table1_frame(frame: pd.DataFrame, targets: Targets = TARGETS) -> pd.DataFrame:
    """Table 1: base and, per method, its selected grid point: mean and std over seeds of each forget topic's
    accuracy and the general accuracy."""
    frame = _with_points(frame)
    selection = table1_select(frame, targets)
    sets = [t for t in result_topics(frame)] + ["general"]
    first = frame.iloc[0]
    rows = [{"method": "base", "setting": "", "n_seeds": 1,
             **{f"{s}_mean": first[f"base_acc_{s}"] for s in sets}, **{f"{s}_std": 0.0 for s in sets}}]
    order = [m for m in METHOD_NAMES if m in set(selection["method"])]
    for method in order:
        point = selection[(selection["method"] == method) & selection["selected"]].iloc[0]["point"]
        runs = frame[(frame["method"] == method) & (frame["point"] == point)]
        rows.append({"method": method, "setting": point, "n_seeds": len(runs),
                     **{f"{s}_mean": runs[f"acc_{s}"].mean() for s in sets},
                     **{f"{s}_std": runs[f"acc_{s}"].std(ddof=1) if len(runs) > 1 else 0.0 for s in sets}})
    return pd.DataFrame(rows)


def table1_choice(plan: ExperimentPlan, frame: pd.DataFrame, targets: Targets = TARGETS) -> dict[str, dict[str, Any]]:
    """Each method's selected grid point (:func:`table1_select` on ``frame``, the selection runs: dev questions,
    selection seeds) as the grid entry of ``plan`` it came from (method -> field overrides, for
    :func:`~.plans.plan_grids`'s ``selected``). Methods without finished runs in ``frame`` are left out."""
    if not len(finished_runs(frame)):
        return {}
    sel = table1_select(frame, targets)
    out: dict[str, dict[str, Any]] = {}
    for method, points in plan.grid().items():
        chosen = sel[(sel["method"] == method) & sel["selected"]]
        if not len(chosen):
            continue
        label = chosen.iloc[0]["point"]
        for point in points:
            spec = RunSpec(method=method, layer=plan.table_layer, seed=0, **{**plan.common(), **point})
            if point_label({"method": method, "coeff": spec.coeff, "lr": spec.lr, "alpha": spec.alpha}) == label:
                out[method] = point
                break
        else:
            raise ValueError(f"the selected {method} point {label!r} is not in the plan's grid")
    return out


# ----------------------------------------------------------------------------- intervals and paired tests
def question_clusters(data: Any, settings: Any) -> dict[str, tuple | None]:
    """Set name -> the fact id of each question a run with ``settings`` scores (``ExperimentData.questions``), or
    None for a set whose records carry no ``fact_id`` (its questions are then resampled one by one)."""
    out: dict[str, tuple | None] = {}
    for name, records in data.questions(settings).items():
        out[name] = tuple(r["fact_id"] for r in records) if all("fact_id" in r for r in records) else None
    return out


def _pooled(bits: Sequence[str], clusters: tuple | None) -> tuple[np.ndarray, tuple | None]:
    """The per-question outcomes of several seeds' runs side by side, each question keeping its fact's cluster (the
    same fact in every seed is one cluster: resampling facts resamples it in all seeds at once)."""
    arrays = [bits_array(b) for b in bits]
    if len({len(a) for a in arrays}) != 1 or (clusters is not None and len(arrays[0]) != len(clusters)):
        raise ValueError("the runs scored different numbers of questions: they cannot be pooled")
    return np.concatenate(arrays), (None if clusters is None else tuple(clusters) * len(arrays))


def pooled_interval(runs: pd.DataFrame, name: str, clusters: tuple | None, *, base: bool = False,
                    seed: int = 0) -> Interval:
    """Accuracy on set ``name`` over ``runs`` (the seeds of one setting) with a 95% interval that resamples facts
    (cluster bootstrap over all seeds' outcomes, :func:`~rmu_analysis.stats.accuracy_interval`)."""
    col = f"{'base_' if base else ''}correct_{name}"
    bits = list(runs[col].iloc[:1] if base else runs[col])
    correct, cl = _pooled(bits, clusters)
    return accuracy_interval(correct, cl, seed=seed)


def paired_runs(a: pd.DataFrame, b: pd.DataFrame, name: str, clusters: tuple | None, *, seed: int = 0
                ) -> PairedDifference:
    """Paired difference accuracy(a) − accuracy(b) on set ``name``: the runs of two settings matched by seed (the
    same questions), facts resampled for the interval; McNemar's exact test beside it."""
    a, b = a.sort_values("seed"), b.sort_values("seed")
    if list(a["seed"]) != list(b["seed"]):
        raise ValueError(f"paired runs need the same seeds: {list(a['seed'])} vs {list(b['seed'])}")
    xa, cl = _pooled(list(a[f"correct_{name}"]), clusters)
    xb, _ = _pooled(list(b[f"correct_{name}"]), clusters)
    return paired_difference(xa, xb, cl, seed=seed)


def table1_intervals(frame: pd.DataFrame, clusters: Mapping[str, tuple | None], targets: Targets = TARGETS
                     ) -> pd.DataFrame:
    """Table 1 with 95% intervals: base and each method's selected point, per set the accuracy pooled over seeds
    (``<set>``, ``<set>_low``, ``<set>_high``; facts resampled). Needs runs that stored per-question outcomes."""
    frame = _with_points(frame)
    selection = table1_select(frame, targets)
    sets = list(clusters)
    first = frame.iloc[:1]
    rows = [{"method": "base", "setting": "", "n_seeds": 1}]
    for s in sets:
        ci = pooled_interval(first, s, clusters[s], base=True)
        rows[0].update({s: ci.estimate, f"{s}_low": ci.low, f"{s}_high": ci.high})
    for method in [m for m in METHOD_NAMES if m in set(selection["method"])]:
        point = selection[(selection["method"] == method) & selection["selected"]].iloc[0]["point"]
        runs = frame[(frame["method"] == method) & (frame["point"] == point)]
        row = {"method": method, "setting": point, "n_seeds": len(runs)}
        for s in sets:
            ci = pooled_interval(runs, s, clusters[s])
            row.update({s: ci.estimate, f"{s}_low": ci.low, f"{s}_high": ci.high})
        rows.append(row)
    return pd.DataFrame(rows)


def method_comparison(frame: pd.DataFrame, clusters: Mapping[str, tuple | None], a: str = "adaptive-rmu",
                      b: str = "rmu", *, layer: int | None = None, selected: bool = True,
                      targets: Targets = TARGETS) -> dict[str, Any]:
    """``a`` − ``b`` per question set, paired by seed and question (a negative forget difference: ``a`` forgets
    more). ``frame``: Table 1 runs (each method's selected point) or a layer sweep (one setting per method and
    layer, ``layer`` given). Returns set -> {diff, low, high, p_value, mcnemar_p, n_seeds}."""
    frame = _with_points(frame)
    if layer is not None:
        frame = frame[frame["layer"] == layer]
    if selected and layer is None:
        sel = table1_select(frame, targets)
        keep = set(zip(sel.loc[sel["selected"], "method"], sel.loc[sel["selected"], "point"]))
        frame = frame[[(m, p) in keep for m, p in zip(frame["method"], frame["point"])]]
    ra, rb = frame[frame["method"] == a], frame[frame["method"] == b]
    if not len(ra) or not len(rb):
        raise ValueError(f"no finished runs of {a!r} and {b!r} to compare" + (f" at block {layer}" if layer else ""))
    out = {}
    for s, cl in clusters.items():
        d = paired_runs(ra, rb, s, cl)
        out[s] = {"diff": d.diff, "low": d.low, "high": d.high, "p_value": d.p_value, "mcnemar_p": d.mcnemar_p,
                  "accuracy_a": d.accuracy_a, "accuracy_b": d.accuracy_b, "n_seeds": int(len(ra))}
    return out


# ---------------------------------------------------------------------------------------------- all of it
def deep_layer(plan: ExperimentPlan) -> int:
    """The deep block Table 1's comparison is repeated at: about three quarters of the depth (9 of 12 blocks),
    the nearest block of the layer sweep."""
    n_blocks = max(plan.layers) + 1
    return min(plan.layers, key=lambda l: abs(l - round(0.75 * n_blocks)))


def _has_outcomes(frame: pd.DataFrame) -> bool:
    return len(frame) > 0 and any(c.startswith("correct_") for c in frame.columns) and \
        finished_runs(frame).filter(like="correct_").notna().all().all()


def interval_claims(frames: Mapping[str, pd.DataFrame], plan: ExperimentPlan,
                    clusters: Mapping[str, Mapping[str, tuple | None]], targets: Targets = TARGETS) -> dict[str, Any]:
    """The numbers with intervals (runs that stored per-question outcomes): Table 1 pooled over seeds, Adaptive
    RMU − RMU paired at the Table 1 block and at :func:`deep_layer`, and the full-unlearning target (each forget
    topic ≤ ``WMDP_TARGETS.max_forget`` with general ≥ ``WMDP_TARGETS.min_general_ratio`` × base)."""
    out: dict[str, Any] = {}
    table = frames.get("table1", pd.DataFrame())
    if _has_outcomes(table) and "table1" in clusters:
        ti = table1_intervals(table, clusters["table1"], targets)
        out["table1_intervals"] = ti.round(4).to_dict(orient="records")
        methods = set(ti["method"])
        if {"rmu", "adaptive-rmu"} <= methods:
            out["table1_adaptive_vs_rmu"] = {"layer": plan.table_layer,
                                             **method_comparison(table, clusters["table1"], targets=targets)}
        if "adaptive-rmu" in methods:
            base, ad = ti.iloc[0], ti[ti["method"] == "adaptive-rmu"].iloc[0]
            topics = [t for t in clusters["table1"] if t != "general"]
            out["adaptive_target"] = {
                "forget": {t: ad[t] for t in topics}, "general": ad["general"], "base_general": base["general"],
                "max_forget": WMDP_TARGETS.max_forget, "min_general_ratio": WMDP_TARGETS.min_general_ratio,
                "held": bool(all(ad[t] <= WMDP_TARGETS.max_forget for t in topics)
                             and WMDP_TARGETS.utility_kept(ad["general"], base["general"]))}
    layer = frames.get("layer", pd.DataFrame())
    if _has_outcomes(layer) and "layer" in clusters:
        deep = deep_layer(plan)
        try:
            out["deep_adaptive_vs_rmu"] = {"layer": deep, **method_comparison(layer, clusters["layer"], layer=deep,
                                                                              targets=targets)}
        except ValueError as exc:
            out["deep_adaptive_vs_rmu"] = {"layer": deep, "skipped": str(exc)}
    return out


def summarize(frames: Mapping[str, pd.DataFrame], plan: ExperimentPlan, theory: dict[str, Any],
              targets: Targets = TARGETS, clusters: Mapping[str, Mapping[str, tuple | None]] | None = None
              ) -> dict[str, Any]:
    """Every number the summary reports, from the result frames ``{"coefficient", "layer", "table1"}`` and the
    theory checks (JSON-ready). ``clusters``: experiment -> :func:`question_clusters` of its runs' questions
    (the intervals and paired tests of :func:`interval_claims`; without it, none)."""
    out: dict[str, Any] = {"theory": theory}
    if clusters:
        out.update(interval_claims(frames, plan, clusters, targets))
    layer = frames["layer"]
    if len(layer):
        out["layer_sweep"] = layer_targets(layer, targets)
        split = early_late_split(plan.layers)
        out["early_late_split"] = split
        out["early_late"] = early_late(layer, split).round(4).to_dict(orient="records")
        out["layer_table"] = layer_table(layer).round(4).to_dict(orient="records")
    parts = [f for f in (frames["coefficient"], layer, frames["table1"]) if len(f)]
    steering = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    if len(steering):
        points = collapse_points(steering.drop_duplicates("key"))
        if len(points):
            out["collapse"] = collapse_summary(points)
    if len(layer) and "log" in layer and plan.coeff_layers:
        out["fixed_c_convergence"] = fixed_c_convergence(layer, plan.coeff_layers, targets)
    coeff = frames["coefficient"]
    if len(coeff) and "log" in coeff:
        out["convergence"] = convergence_check(coeff)
    if len(coeff):
        out["coefficient_sweep"] = coefficient_sweep(coeff, targets)
    table = frames["table1"]
    if len(table):
        out["table1"] = table1_frame(table, targets).round(4).to_dict(orient="records")
        select = frames.get("table1_select")
        grid = select if select is not None and len(select) else table
        out["table1_grid"] = table1_select(grid, targets).round(4).to_dict(orient="records")
        out["table1_grid_split"] = "dev" if grid is not table else "test"
    return out
