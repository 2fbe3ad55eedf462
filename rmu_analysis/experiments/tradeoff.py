"""The runs that the matched-utility comparison needs (:func:`rmu_analysis.claims.matched_forget`): at each layer, a
trade-off curve per method — RMU over several c (c = ratio × the frozen forget norm ‖h_l‖, so one ratio grid
serves every layer and model), Adaptive RMU over several β (the paper's {2, 3, 5, 10}, Section 5, and 4, 7) — × seeds. The
grid is a list of :class:`~.specs.RunSpec` for :func:`~.runner.run_sweep`. :func:`tradeoff_analysis` judges the
layer-wise claims at matched general accuracy from the finished runs; :func:`tradeoff_report` runs and writes it."""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

from .._io import atomic_write_json, atomic_write_text
from ..claims import compare_matched, matched_forget
from ..plots_experiments import plot_tradeoff
from ..stats import N_BOOT
from .measure import bits_array
from .plans import ExperimentPlan, coefficient_grid, table1_grid
from .figures import save_png
from .results import finished_runs, json_records, load_results, result_topics
from .runner import run_sweep
from .specs import EvalSettings, RunSpec
from .targets import TARGETS, Targets

__all__ = ["TradeoffPlan", "tradeoff_grid", "tradeoff_plan", "tradeoff_points", "tradeoff_analysis", "confidence_control_grid",
           "matched_confidence", "confidence_markdown", "CONTROL_LRS",
           "TRADEOFF_RATIOS", "TRADEOFF_BETAS", "TRADEOFF_SEEDS",
           "tradeoff_markdown", "tradeoff_report", "TRADEOFF_FILES"]


#: The curves' grid: c / ‖h_l‖ ratios for RMU (the coefficient sweep's ½ … 8 plus 3 and 6) and β for Adaptive RMU
#: (the paper's 2, 3, 5, 10 plus 4 and 7), × 5 seeds. The first run (the coefficient sweep's 5 ratios, the paper's 4
#: β, seeds 0–2) gave matched-utility intervals 18–33 points wide; the grid and the seeds were then made denser
#: (docs/claims.md), the same for every layer and method (18–28 points: the curves are steep at 95% of base
#: general accuracy, where a 2-point move in general accuracy is a 20-point move in forget accuracy).
TRADEOFF_RATIOS: tuple[float, ...] = (0.5, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0)
TRADEOFF_BETAS: tuple[float, ...] = (2.0, 3.0, 4.0, 5.0, 7.0, 10.0)
TRADEOFF_SEEDS: tuple[int, ...] = (0, 1, 2, 3, 4)


@dataclass(frozen=True)
class TradeoffPlan:
    """Every knob of the trade-off sweep. ``layers`` × (RMU: ``coeff_ratios`` × ‖h_l‖; Adaptive RMU: ``betas``) ×
    ``seeds``; ``steps`` / ``lr`` / ``alpha`` / ``batch_size`` as in :class:`~.plans.ExperimentPlan` (pass the
    same values as the plan whose Table 1 the curves extend). Ratios span "nothing forgotten" to "utility gone"
    so that every curve crosses the matched general accuracy."""

    layers: tuple[int, ...]
    steps: int
    lr: float
    alpha: float
    coeff_ratios: tuple[float, ...] = TRADEOFF_RATIOS
    betas: tuple[float, ...] = TRADEOFF_BETAS
    seeds: tuple[int, ...] = TRADEOFF_SEEDS
    batch_size: int = 4
    log_every: int = 5
    model: str = "organism"
    data: str = "organism"
    eval: EvalSettings = field(default_factory=EvalSettings)
    dtype: str | None = None  # the model's parameter dtype (None: float32), as ExperimentPlan.dtype

    def __post_init__(self) -> None:
        if not self.layers or not self.seeds:
            raise ValueError("a trade-off plan needs at least one layer and one seed")
        if len(self.coeff_ratios) < 2 or len(self.betas) < 2:
            raise ValueError("a trade-off curve needs at least 2 settings per method (coeff_ratios, betas)")
        if any(r <= 0 for r in self.coeff_ratios) or any(b <= 0 for b in self.betas):
            raise ValueError("coeff_ratios and betas must be positive")

    @property
    def n_runs(self) -> int:
        return len(self.layers) * (len(self.coeff_ratios) + len(self.betas)) * len(self.seeds)


def tradeoff_plan(plan: ExperimentPlan, *, layers: tuple[int, ...] | None = None,
                  ratios: tuple[float, ...] = TRADEOFF_RATIOS, betas: tuple[float, ...] = TRADEOFF_BETAS,
                  seeds: tuple[int, ...] | None = TRADEOFF_SEEDS) -> TradeoffPlan:
    """The trade-off sweep that extends ``plan``'s coefficient sweep: its layers (``coeff_layers`` unless
    ``layers``), RMU over c = ``ratios`` × ‖h_l‖, Adaptive RMU over ``betas``, ``seeds`` (None: ``plan.seeds``),
    and the same steps, lr, α and evaluation as its sweeps, so every run the coefficient sweep (seed 0) and the
    layer sweep (β = ``plan.beta``) already made has the same key and is reused."""
    layers = tuple(layers or plan.coeff_layers)
    if not layers:
        raise ValueError("the plan has no coefficient-sweep layers: pass layers=(...)")
    return TradeoffPlan(layers=layers, steps=plan.steps, lr=plan.lr, alpha=plan.alpha,
                        coeff_ratios=tuple(ratios), betas=tuple(betas), seeds=tuple(seeds or plan.seeds),
                        batch_size=plan.batch_size, log_every=plan.log_every, model=plan.model, data=plan.data,
                        eval=dataclasses.replace(plan.eval, per_fact=plan.sweep_per_fact), dtype=plan.dtype)


def tradeoff_grid(plan: TradeoffPlan, norms: Mapping[int, float]) -> list[RunSpec]:
    """The runs of ``plan``: RMU with c = ratio × ``norms[l]`` (the frozen forget norms, e.g.
    :func:`~.plans.plan_norms` / :func:`~.measure.forget_norms`; rounded to 4 significant digits so keys are
    stable) and Adaptive RMU with each β, at every layer and seed. Run them with ``run_sweep(specs, out, bench)``."""
    missing = [l for l in plan.layers if l not in norms]
    if missing:
        raise ValueError(f"norms has no frozen forget norm for layer(s) {missing}: measure them with forget_norms")
    common: dict[str, Any] = {"steps": plan.steps, "batch_size": plan.batch_size, "model": plan.model,
                              "data": plan.data, "eval": plan.eval, "options": (("log_every", plan.log_every),),
                              "lr": plan.lr, "alpha": plan.alpha, "dtype": plan.dtype}
    cs = {l: [float(f"{r * norms[l]:.4g}") for r in plan.coeff_ratios] for l in plan.layers}
    return (coefficient_grid(cs, method="rmu", seeds=plan.seeds, **common)
            + coefficient_grid({l: plan.betas for l in plan.layers}, method="adaptive-rmu", seeds=plan.seeds,
                               **common))


#: Output-space unlearning over its learning rate for C1's control (:func:`confidence_control_grid`): from "barely
#: forgets" to "forgets about as much as RMU", 100 steps as in Table 1's grid.
CONTROL_LRS: dict[str, tuple[float, ...]] = {"ga": (1e-3, 2e-3, 4e-3, 8e-3), "npo": (3e-3, 1e-2, 2e-2)}


def confidence_control_grid(plan: ExperimentPlan, tplan: TradeoffPlan, *,
                            lrs: Mapping[str, tuple[float, ...]] | None = None) -> list[RunSpec]:
    """C1's control at matched forget accuracy: GA and NPO over learning rates at Table 1's layer, × the trade-off
    seeds, scored as the trade-off runs (so each run's MaxLogit on the same forget prompts lies on a curve over
    forget accuracy beside RMU's over c and Adaptive RMU's over β at that layer). Every other field is that of the
    method's first point in Table 1's grid (the organism: 100 steps; NPO β = 0.1, α = 1). ``lrs`` (method ->
    learning rates): default :data:`CONTROL_LRS` on the organism, the Table 1 grid's own learning rates on any
    other model (the organism's would be far too large for a 7B model)."""
    if plan.table_layer not in tplan.layers:
        raise ValueError(f"the trade-off plan has no curve at Table 1's layer {plan.table_layer}: {tplan.layers}")
    table = plan.grid()
    missing = [m for m in ("ga", "npo") if m not in table]
    if missing:
        raise ValueError(f"Table 1's grid has no {missing}: the control needs GA and NPO")
    grid = {}
    for m in ("ga", "npo"):
        fields = {k: v for k, v in table[m][0].items() if k != "lr"}
        values = (lrs or {}).get(m) or (CONTROL_LRS[m] if plan.model == "organism"
                                        else tuple(sorted({p["lr"] for p in table[m]})))
        grid[m] = [{"lr": lr, **fields} for lr in values]
    common = {"steps": plan.steps, "batch_size": tplan.batch_size, "model": tplan.model, "data": tplan.data,
              "eval": tplan.eval, "options": (("log_every", tplan.log_every),), "dtype": tplan.dtype}
    return table1_grid(plan.table_layer, grid, seeds=tplan.seeds, **common)


# ------------------------------------------------------------------------------------------------ analysis
def tradeoff_points(frame: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, dict[int, np.ndarray]], dict[int, np.ndarray]]:
    """The trade-off sweep's finished RMU / Adaptive RMU runs as :func:`~rmu_analysis.claims.matched_forget`
    points: ``(points, forget_correct, general_correct)``. ``points``: one row per run with ``method, layer, seed,
    setting`` (c or β), ``general_acc`` and one forget column per target: ``forget_acc`` (every forget question)
    and ``acc_<topic>``. ``forget_correct[name]``: row index -> per-question booleans of that forget target (the
    topics' questions concatenated for ``forget_acc``); ``general_correct``: row index -> general booleans."""
    runs = finished_runs(frame)
    runs = runs[runs["method"].isin(["rmu", "adaptive-rmu"])].reset_index(drop=True)
    if runs.empty:
        raise ValueError("no finished RMU / Adaptive RMU runs in the frame")
    topics = result_topics(runs)
    need = [f"correct_{t}" for t in topics] + ["correct_general"]
    missing = [c for c in need if c not in runs]
    if missing:
        raise ValueError(f"the runs store no per-question outcomes ({missing}): re-run them with this version")
    bits = {c: {i: bits_array(b) for i, b in runs[c].items()} for c in need}
    forget = {f"acc_{t}": bits[f"correct_{t}"] for t in topics}
    forget["forget_acc"] = {i: np.concatenate([bits[f"correct_{t}"][i] for t in topics]) for i in runs.index}
    points = runs[["method", "layer", "seed", "coeff", "general_acc", "base_general_acc", "forget_acc"]
                  + [f"acc_{t}" for t in topics]].rename(columns={"coeff": "setting"})
    return points, forget, bits["correct_general"]


def tradeoff_analysis(frame: pd.DataFrame, *, fraction: float | None = None, targets: Targets = TARGETS,
                      n_boot: int = N_BOOT, seed: int = 0) -> dict[str, Any]:
    """The layer-wise claims at matched utility, from the trade-off sweep's results (``load_results``).

    Forget accuracy of each (method, layer) curve at general accuracy = ``fraction`` (default
    ``targets.matched_general_ratio``, 0.95) × the base model's, per forget target (every forget question, and each
    topic), with bootstrap intervals over seeds and questions (:func:`~rmu_analysis.claims.matched_forget`).

    - ``adaptive_vs_rmu``: per layer, Adaptive RMU − RMU at the matched general accuracy (paired draws). The
      layer-wise claim "Adaptive RMU forgets more than fixed-c RMU" holds at a layer if the 95% interval on every
      forget question lies entirely below 0.
    - ``depth``: per method, the deepest − the shallowest layer at the matched general accuracy: "depth itself
      costs forgetting" (Fig. 5's fixed-c failure not only a too-small c / ‖h_l‖) holds if the interval lies above 0.
    """
    fraction = float(targets.matched_general_ratio if fraction is None else fraction)
    points, forget, general = tradeoff_points(frame)
    base = float(points["base_general_acc"].iloc[0])
    layers = sorted(int(l) for l in points["layer"].unique())
    names = ["forget_acc"] + [c for c in forget if c != "forget_acc"]
    matched, rows, versus, depth = {}, [], [], []
    for name in names:
        m = matched_forget(points.assign(forget_acc=points[name]), base_general=base, fraction=fraction,
                           general_correct=general, forget_correct=forget[name], n_boot=n_boot, seed=seed)
        matched[name] = m
        rows += [{**r, "forget": name} for r in m.table.to_dict(orient="records")]
        for l in layers:
            try:
                cmp = compare_matched(m, "adaptive-rmu", "rmu", l)
            except KeyError:
                continue
            versus.append({"forget": name, "layer": l, **_cmp(cmp)})
        for method in ("rmu", "adaptive-rmu") if len(layers) > 1 else ():  # depth needs two layers
            try:
                cmp = compare_matched(m, method, method, layers[-1], layer_b=layers[0])
            except KeyError:
                continue
            depth.append({"forget": name, "method": method, "deep": layers[-1], "shallow": layers[0], **_cmp(cmp)})
    versus_f = pd.DataFrame(versus)
    main = versus_f[versus_f["forget"] == "forget_acc"] if len(versus_f) else versus_f
    adaptive_held = {int(r["layer"]): bool(np.isfinite(r["high"]) and r["high"] < 0) for _, r in main.iterrows()}
    depth_f = pd.DataFrame(depth)
    dmain = depth_f[depth_f["forget"] == "forget_acc"] if len(depth_f) else depth_f
    depth_held = {r["method"]: bool(np.isfinite(r["low"]) and r["low"] > 0) for _, r in dmain.iterrows()}
    return {"fraction": fraction, "base_general": base, "target": fraction * base, "layers": layers,
            "seeds": sorted(int(s) for s in points["seed"].unique()), "n_runs": len(points),
            "matched": json_records(pd.DataFrame(rows)), "adaptive_vs_rmu": json_records(versus_f), "depth": json_records(depth_f),
            "adaptive_beats_rmu": adaptive_held, "depth_costs": depth_held}


def matched_confidence(frame: pd.DataFrame, layer: int, *, levels: tuple[float, ...] = (0.6, 0.7, 0.8),
                       misdirection: tuple[str, ...] = ("rmu", "adaptive-rmu"), output: tuple[str, ...] = ("ga", "npo"),
                       n_boot: int = N_BOOT, seed: int = 0) -> dict[str, Any]:
    """C1's control at matched forget accuracy (Fig. 2a–d): does misdirection lower token confidence more than
    output-space unlearning that forgets as much? Each method's runs at ``layer`` form one curve per seed of mean
    MaxLogit (the runs' forget prompts, mean over topics) against forget accuracy (RMU over c, Adaptive RMU over β,
    GA / NPO over the learning rate: :func:`confidence_control_grid`); each is interpolated at forget accuracy
    ``levels`` (no extrapolation), averaged over seeds, with a bootstrap over seeds (the same draws for every
    curve; the runs keep no per-prompt MaxLogit, so prompts are not resampled).

    ``pairs``: misdirection − output MaxLogit at each level where both curves reach it. ``held``: at least one such
    pair, and in every one the 95% interval lies entirely below 0."""
    runs = finished_runs(frame)
    runs = runs[(runs["layer"] == layer) & runs["method"].isin(misdirection + output)]
    topics = result_topics(runs)
    if runs.empty or not topics:
        raise ValueError(f"no RMU-type or GA / NPO runs at layer {layer} in the frame")
    missing = sorted(set(misdirection + output) - set(runs["method"]))
    if missing:
        raise ValueError(f"no runs of {missing} at layer {layer}: run confidence_control_grid and the trade-off grid")
    steering = runs["method"].isin(["rmu", "adaptive-rmu"])
    points = pd.DataFrame({"method": runs["method"], "layer": runs["layer"], "seed": runs["seed"],
                           "setting": np.where(steering, runs["coeff"], runs["lr"]),
                           "general_acc": runs["forget_acc"],  # the x axis of the curves: forget accuracy
                           "forget_acc": runs[[f"maxlogit_{t}" for t in topics]].mean(axis=1)})  # y: MaxLogit
    utility = points.assign(forget_acc=runs["general_acc"].to_numpy())  # general accuracy along the same curves
    rows, pairs = [], []
    for level in levels:
        m = matched_forget(points, target=float(level), n_boot=n_boot, seed=seed)
        g = matched_forget(utility, target=float(level), n_boot=1, seed=seed).table.set_index("method")
        for r in m.table.to_dict(orient="records"):
            rows.append({"level": float(level), "method": r["method"], "max_logit": r["forget_at_target"],
                         "low": r["low"], "high": r["high"], "n_seeds": r["n_seeds"],
                         "general_acc": float(g.loc[r["method"], "forget_at_target"])})
        for a in misdirection:
            for b in output:
                c = compare_matched(m, a, b, layer)
                if np.isfinite(c.diff) and c.n_boot:
                    pairs.append({"level": float(level), "misdirection": a, "output": b, **_cmp(c),
                                  "lower": bool(np.isfinite(c.high) and c.high < 0)})
    return {"layer": int(layer), "levels": [float(x) for x in levels], "table": json_records(pd.DataFrame(rows)),
            "pairs": json_records(pd.DataFrame(pairs)) if pairs else [], "n_pairs": len(pairs),
            "held": bool(pairs) and all(p["lower"] for p in pairs),
            "range": {m: [float(g["general_acc"].min()), float(g["general_acc"].max())]
                      for m, g in points.groupby("method")}}


def _cmp(c: Any) -> dict[str, Any]:
    return {"diff": c.diff, "low": c.low, "high": c.high, "p_value": c.p_value, "n_boot": c.n_boot}



# ------------------------------------------------------------------------------------------------ report
#: What :func:`tradeoff_report` writes into the output directory.
TRADEOFF_FILES = ("tradeoff.md", "tradeoff.json", "tradeoff.png")


def _pct(x: Any) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{100 * x:.1f}"


def _signed_pts(x: Any) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{100 * x:+.1f}".replace("-", "−")


def confidence_markdown(control: Mapping[str, Any]) -> str:
    """The C1-control section of ``tradeoff.md`` (:func:`matched_confidence`)."""
    c = control
    ranges = ", ".join(f"{m} {_pct(lo)}–{_pct(hi)}%" for m, (lo, hi) in c["range"].items())
    lines = [f"## C1's control at matched forget accuracy (block {c['layer']})", "",
             "Mean MaxLogit on the runs' forget prompts (the same prompts for every run), each method's per-seed curve "
             "over its knob (RMU c, Adaptive RMU β, GA / NPO learning rate) interpolated at forget accuracy "
             f"{', '.join(f'{100 * x:g}%' for x in c['levels'])} (levels fixed before measuring; no extrapolation), "
             "mean over seeds, bootstrap over seeds. Forget accuracy each method's runs span: " + ranges + ".", "",
             "**Claim and threshold.** Misdirection lowers token confidence more than output-space unlearning at "
             "matched forget accuracy: at least one (RMU-type, GA/NPO) pair reaches a level together, and for every "
             "such pair the 95% interval of their MaxLogit difference lies entirely below 0.", "",
             "| forget acc | method | MaxLogit | seeds reaching it | general accuracy (%) |", "|---|---|---|---|---|"]
    for r in c["table"]:
        if r["max_logit"] is not None:
            lines.append(f"| {100 * r['level']:g}% | {r['method']} | {r['max_logit']:.2f} [{r['low']:.2f}, "
                         f"{r['high']:.2f}] | {r['n_seeds']} | {_pct(r['general_acc'])} |")
    lines += ["", "Matched forget accuracy is not matched utility: the general-accuracy column says what each method "
              "kept at that forget accuracy.", "",
              "| forget acc | RMU-type − output | MaxLogit difference | p | lower |", "|---|---|---|---|---|"]
    for p in c["pairs"]:
        num = [f"{p[k]:+.2f}".replace("-", "−") for k in ("diff", "low", "high")]
        lines.append(f"| {100 * p['level']:g}% | {p['misdirection']} − {p['output']} | {num[0]} [{num[1]}, {num[2]}] "
                     f"| {p['p_value']:.2g} | {'yes' if p['lower'] else 'no'} |")
    if not c["pairs"]:
        lines.append("| — | no pair reaches a common forget accuracy | | | |")
    lines += ["", f"Verdict: **{'held' if c['held'] else 'not held'}** ({c['n_pairs']} pair(s) at a common level)."]
    return "\n".join(lines) + "\n"


def tradeoff_markdown(analysis: Mapping[str, Any], plan: TradeoffPlan, sensitivity: Mapping[str, Any] | None = None
                      ) -> str:
    """``tradeoff.md``: the matched-utility table and the two layer-wise verdicts (thresholds first)."""
    a = analysis
    lines = ["# Layer-wise claims at matched utility (trade-off curves)", "",
             f"RMU with c = ratio × ‖h_l‖ for ratios {list(plan.coeff_ratios)} and Adaptive RMU with β ∈ "
             f"{list(plan.betas)}, at blocks {a['layers']}, seeds {a['seeds']} ({a['n_runs']} runs; {plan.steps} steps, "
             f"lr {plan.lr:g}, α {plan.alpha:g}); scored on the test questions "
             f"({'every wording' if plan.eval.per_fact is None else f'{plan.eval.per_fact} wording(s)'} per fact). "
             f"Each seed's curve is interpolated linearly at general accuracy = {a['fraction']:.0%} × base "
             f"({_pct(a['base_general'])}% → {_pct(a['target'])}%), then averaged over seeds; 95% intervals resample "
             "seeds and questions (the same draws for every curve, so differences are paired). No extrapolation.", "",
             "**Claims and thresholds, fixed before measuring.**",
             "- *Adaptive RMU forgets more than fixed-c RMU* (Fig. 5, Section 5) at a layer: the 95% interval of "
             "Adaptive − RMU forget accuracy (every forget question) at the matched general accuracy lies entirely "
             "below 0.",
             *([f"- *Depth itself costs forgetting* (Fig. 5's fixed-c failure is more than a too-small c / ‖h_l‖): "
                f"for a method, block {a['layers'][-1]} − block {a['layers'][0]} at the matched general accuracy lies "
                "entirely above 0."] if len(a["layers"]) > 1 else []), "",
             f"## Forget accuracy (%) at general accuracy {_pct(a['target'])}%", "",
             "| block | forget set | RMU | Adaptive RMU | Adaptive − RMU (points) | p | verdict |", "|---|---|---|---|---|---|---|"]
    matched = pd.DataFrame(a["matched"])
    versus = pd.DataFrame(a["adaptive_vs_rmu"])
    for l in a["layers"]:
        for name in matched["forget"].unique():
            def cell(method: str) -> str:
                r = matched[(matched["method"] == method) & (matched["layer"] == l) & (matched["forget"] == name)]
                if r.empty:
                    return "n/a"
                r = r.iloc[0]
                return f"{_pct(r['forget_at_target'])} [{_pct(r['low'])}, {_pct(r['high'])}]"
            v = versus[(versus["layer"] == l) & (versus["forget"] == name)] if len(versus) else versus
            diff = (f"{_signed_pts(v.iloc[0]['diff'])} [{_signed_pts(v.iloc[0]['low'])}, {_signed_pts(v.iloc[0]['high'])}]"
                    if len(v) else "n/a")
            p = f"{v.iloc[0]['p_value']:.2g}" if len(v) and v.iloc[0]["p_value"] is not None else "n/a"
            verdict = ("**held**" if a["adaptive_beats_rmu"].get(l) else "**not held**") if name == "forget_acc" else ""
            label = "all forget" if name == "forget_acc" else name.replace("acc_", "")
            lines.append(f"| {l} | {label} | {cell('rmu')} | {cell('adaptive-rmu')} | {diff} | {p} | {verdict} |")
    if a["depth"]:
        lines += ["", f"## Block {a['layers'][-1]} − block {a['layers'][0]} at the matched general accuracy (points)",
                  "", "| method | forget set | difference | p | verdict |", "|---|---|---|---|---|"]
    else:
        lines += ["", "Depth: one layer only, nothing to compare."]
    for r in a["depth"]:
        verdict = ("**held**" if a["depth_costs"].get(r["method"]) else "**not held**") if r["forget"] == "forget_acc" else ""
        label = "all forget" if r["forget"] == "forget_acc" else r["forget"].replace("acc_", "")
        p = "n/a" if r["p_value"] is None else f"{r['p_value']:.2g}"
        lines.append(f"| {r['method']} | {label} | {_signed_pts(r['diff'])} [{_signed_pts(r['low'])}, "
                     f"{_signed_pts(r['high'])}] | {p} | {verdict} |")
    if sensitivity:
        s = sensitivity
        parts = [f"block {r['layer']}: {_signed_pts(r['diff'])} [{_signed_pts(r['low'])}, {_signed_pts(r['high'])}]"
                 for r in s["adaptive_vs_rmu"] if r["forget"] == "forget_acc"]
        lines += ["", f"Sensitivity (no verdict): at {s['fraction']:.0%} of base general ({_pct(s['target'])}%), "
                  f"Adaptive − RMU on every forget question: {'; '.join(parts)}."]
    return "\n".join(lines) + "\n"


def tradeoff_report(out: str | Path, results: str | Path, plan: TradeoffPlan, norms: Mapping[int, float],
                    bench: Any, *, control: list[RunSpec] | None = None, control_layer: int | None = None,
                    workers: int = 1, threads: int = 1, fresh: bool = False, progress: bool = True,
                    targets: Targets = TARGETS) -> dict[str, Any]:
    """Run (or reuse) every run of ``plan`` into ``results`` (``norms``: the frozen forget norms of its layers) and
    write :data:`TRADEOFF_FILES` to ``out``; return the analysis with the runs trained and reused and the seconds.
    ``control`` (:func:`confidence_control_grid`) adds C1's control at matched forget accuracy at ``control_layer``
    (:func:`matched_confidence`)."""
    t0 = time.perf_counter()
    out, results = Path(out), Path(results)
    specs = tradeoff_grid(plan, norms)
    outcome = run_sweep(specs + list(control or []), results, bench, resume=not fresh, progress=progress,
                        desc="trade-off", workers=workers, threads=threads)
    frame = load_results(results, specs)
    analysis = tradeoff_analysis(frame, targets=targets)
    sensitivity = tradeoff_analysis(frame, fraction=0.90, targets=targets) if targets.matched_general_ratio != 0.90 else None
    points, _, _ = tradeoff_points(frame)
    out.mkdir(parents=True, exist_ok=True)
    save_png(plot_tradeoff(points, pd.DataFrame(analysis["matched"]).query("forget == 'forget_acc'"),
                           target=analysis["target"]), out / "tradeoff.png")
    text = tradeoff_markdown(analysis, plan, sensitivity)
    confidence = None
    if control:
        layer = control_layer if control_layer is not None else control[0].layer
        confidence = matched_confidence(pd.concat([frame, load_results(results, control)], ignore_index=True), layer)
        text += "\n" + confidence_markdown(confidence)
    text += (f"\nThis call: {outcome.ran} run(s) trained, {outcome.skipped} reused from {results}, "
             f"{(time.perf_counter() - t0) / 60:.1f} min.\n")
    atomic_write_text(out / "tradeoff.md", text)
    summary = {**analysis, "sensitivity": sensitivity, "confidence_control": confidence, "ran": outcome.ran, "reused": outcome.skipped,
               "seconds": time.perf_counter() - t0, "figures": list(TRADEOFF_FILES)}
    atomic_write_json(out / "tradeoff.json", summary)
    return summary
