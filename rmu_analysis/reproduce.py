"""``rmu-analysis reproduce``: the paper's checks on the shipped organism, end to end, in one command.

In order: the theory checks (noise sensitivity, Fig. 1, and any further checks ``rmu_analysis.theory`` offers),
the coefficient sweep (Fig. 2 / Fig. 3 and the c / ‖h_l‖ collapse), the layer sweep (Fig. 5, × 3 seeds) and
Table 1 (× 3 seeds). Every run is one JSON file in ``<out>/results/`` (resumable: an interrupted reproduce
continues where it stopped; ``fresh=True`` recomputes). Writes the figures (PNG), ``table1.md``,
``summary.md`` (which claims held, with the numbers) and ``summary.json`` to ``<out>`` (default ``figures/``,
``figures/quick/`` for the reduced ``--quick`` plan).
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch

from ._io import atomic_write_json, atomic_write_text
from .experiments import (
    EvalSettings, ExperimentPlan, Workbench, _LazyBench, collapse_points, collapse_summary, early_late, layer_table,
    layer_targets, load_results, organism_plan, plan_grids, plan_norms, run_sweep, spearman, table1_frame, token_norms,
    training_texts,
    frame_markdown, table1_markdown, table1_select,
)

__all__ = ["reproduce", "theory_checks", "add_reproduce_parser", "EXPLANATIONS"]

#: Why a target can fail on the organism, written after measuring it; summary.md shows an entry only when the
#: target it names did not hold (the assertion itself is never loosened).
EXPLANATIONS: dict[str, str] = {
    "min_general_over_base": (
        "on the organism the failing runs are Adaptive RMU at the deepest blocks (10, 11), where c = 5·‖h_l‖ is "
        "above 100 and the trained down-projections sit close to the output; α = 100 does not hold general "
        "knowledge fully there (notebook 06 lists the runs)."),
    "noise_sensitivity": (
        "the organism's base-model Φ curve is U-shaped (falls for a few blocks, then climbs back), not falling "
        "with depth; an RMU model with noise at its unlearn layer does show the paper's minimum right after it "
        "(notebook 03)."),
    "input_gradients": (
        "trained unlearned models have larger, not near-zero, input gradients; only the idealised model (block "
        "output replaced by c·u at every token) has zero gradient, as Eq. 20–22 assume (notebook 08)."),
}


def _save(fig, path: Path) -> str:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path.name


# ------------------------------------------------------------------------------------------ theory
def theory_layer(bench: Workbench, plan: ExperimentPlan) -> int:
    """The block the theory checks perturb: the plan's Table 1 layer, moved up to the second-to-last block when
    it is the model's last (Φ, Eq. 19 and Proposition 1's Jacobian need at least one block after it)."""
    n = bench.model.config.num_hidden_layers
    if n < 2:
        raise ValueError(f"the theory checks need a model with at least 2 blocks, got {n}")
    return min(plan.table_layer, n - 2)


def theory_checks(bench: Workbench, out_dir: Path, plan: ExperimentPlan, *, layer: int | None = None,
                  samples: int = 8, quick: bool = False, extra: bool = True) -> dict[str, Any]:
    """C4 (Fig. 1): Φ(g^(l:k)) of the base model for noise at block ``layer`` (default: the plan's Table 1
    layer) should fall as k grows (Spearman ρ(k, Φ) ≤ −0.5: a clear fall, not a tilt). Noise η = 1e-2 · ‖ĥ‖² / d. Then Proposition 1,
    Eq. 19 and the input-gradient argument (``_extra_theory``) unless ``extra`` is False."""
    from . import plots, theory
    from ._batching import hidden_size

    out: dict[str, Any] = {}
    layer = theory_layer(bench, plan) if layer is None else layer
    texts = list(bench.split(plan.eval, 0)[2][bench.data.topics[0]])
    h_hat, _ = theory.mean_representation(bench.model, texts, layer, tokenizer=bench.tokenizer)
    eta = 1e-2 * float(h_hat.norm()) ** 2 / hidden_size(bench.model)
    ns = theory.noise_sensitivity(bench.model, texts, layer, eta, samples=samples, seed=0, tokenizer=bench.tokenizer)
    rho = spearman(ns.ks, ns.phi_mean)
    out["noise_sensitivity"] = {"layer": layer, "eta": eta, "ks": list(ns.ks), "phi_mean": ns.phi_mean.tolist(),
                                "spearman_rho_k_phi": rho, "held": bool(rho <= -0.5),
                                "figure": _save(plots.plot_noise_sensitivity({f"organism, noise at block {layer}": ns}),
                                                out_dir / "fig1_noise_sensitivity.png")}
    if extra:
        out.update(_extra_theory(bench, out_dir, plan, quick))
    return out


def _extra_theory(bench: Workbench, out_dir: Path, plan: ExperimentPlan, quick: bool) -> dict[str, Any]:
    """Proposition 1, Eq. 19 and the GCG gradient argument on the organism, through ``rmu_analysis.theory``
    at ``theory_layer(bench, plan)``.

    - ``proposition1``: block ``table_layer`` set to c·u + ε (c = β·‖h_l‖, β = 5) on one forget question; the
      Taylor error of the predicted logit mean and covariance should shrink linearly in η (log-log slope ≈ 1).
    - ``optimal_coefficient``: Eq. 19's c* beside the exact minimiser of Eq. 10 for a few k > l.
    - ``input_gradient_norms``: the gradient of log p(answer) w.r.t. the one-hot input, base model vs Adaptive
      RMU at ``table_layer`` (seed 0, the plan's settings): the paper predicts it shrinks (ratio < 1).
    """
    from . import theory
    from ._batching import hidden_size
    from .evaluation import mcq_prompt
    from .steering import random_direction

    settings = plan.eval
    layer = theory_layer(bench, plan)
    d = hidden_size(bench.model)
    u = random_direction(d, "uniform", seed=0)
    topic = bench.data.topics[0]
    texts = list(bench.split(settings, 0)[2][topic])
    norm = float(np.mean(token_norms(bench, texts, [layer])[layer].tolist()))
    coeff = plan.beta * norm
    records = list(bench.data.mcq[topic][: 8 if quick else 24])
    out: dict[str, Any] = {}

    def prop1() -> dict[str, Any]:
        prompt = mcq_prompt(records[0], None if settings.scoring == "cloze" else bench.data.subjects.get(topic),
                            scoring=settings.scoring)
        etas = [f * coeff ** 2 / d for f in (1e-4, 1e-3, 1e-2)]
        res = theory.proposition1(bench.model, prompt, layer, coeff, u, etas, samples=128 if quick else 256,
                                  positions="all", tokenizer=bench.tokenizer)
        frame = res.to_frame()
        return {"layer": layer, "coeff": coeff, "etas": etas, "slope_mean_error": res.slope_mean,
                "slope_cov_error": res.slope_cov, "mean_rel_error": frame["mean_rel_error"].tolist(),
                "cov_rel_error_paired": frame["cov_rel_error_paired"].tolist(),
                "normality_reject_05": frame["normality_reject_05"].tolist(),
                "held": bool(0.5 <= res.slope_cov <= 1.5 and frame["cov_rel_error_paired"].iloc[0] < 0.1)}

    def optc() -> dict[str, Any]:
        n = bench.model.config.num_hidden_layers
        ks = sorted({min(layer + 1, n - 1), min(layer + 3, n - 1), n - 1})
        res = theory.optimal_coefficient(bench.model, texts[:16], layer, u, ks, tokenizer=bench.tokenizer)
        frame = res.to_frame()
        return {"layer": layer, "ks": list(res.ks), "c_star": res.c_star.tolist(), "c_grid": res.c_grid.tolist(),
                "h_norm": res.h_norm, "cos_u_h": res.cos_u_h, "table": frame.round(4).to_dict(orient="records")}

    def grads() -> dict[str, Any]:
        from .unlearning import unlearn

        specs = [s for s in plan_grids(dataclasses.replace(plan, coeff_layers=()))["layer"]
                 if s.method == "adaptive-rmu" and s.layer == plan.table_layer and s.seed == plan.seeds[0]]
        if not specs:
            raise ValueError(f"the plan's layer sweep has no Adaptive RMU run at its Table 1 layer {plan.table_layer}")
        spec = specs[0]
        forget, retain = training_texts(bench, spec)  # the layer sweep's run at this layer, trained again
        result = unlearn(bench.model, bench.tokenizer, forget, retain, spec.config(), progress=False)
        model = bench.evaluation_model(result.trained)
        subject = None if settings.scoring == "cloze" else bench.data.subjects.get(topic)
        base = theory.input_gradient_norms(bench.model, bench.tokenizer, records, subject, scoring=settings.scoring)
        after = theory.input_gradient_norms(model, bench.tokenizer, records, subject, scoring=settings.scoring)
        ratio = float(np.median(after.grad_norm_centered) / np.median(base.grad_norm_centered))
        return {"layer": plan.table_layer, "questions": len(records), "median_grad_norm_base": float(np.median(base.grad_norm)),
                "median_grad_norm_unlearned": float(np.median(after.grad_norm)),
                "median_centered_ratio_unlearned_over_base": ratio, "held": bool(ratio < 1.0)}

    out["proposition1"] = prop1()
    out["optimal_coefficient"] = optc()
    if not quick:  # it trains one more model
        out["input_gradients"] = grads()
    return out


def convergence_check(frame: pd.DataFrame) -> dict[str, Any]:
    """Fig. 4 over the coefficient sweep's fixed-c RMU runs (``theory.forget_convergence`` on each run's log):
    the paper expects the forget loss to converge exactly when the forget norm starts below c."""
    from . import theory

    rows = []
    for _, run in frame[frame["method"] == "rmu"].iterrows():
        if not run.get("log"):
            continue
        conv = theory.forget_convergence(run["log"], tail=3, hidden_size=int(run["hidden_size"]))
        for _, r in conv.to_frame().iterrows():
            rows.append({"layer": int(run["layer"]), "coeff": float(run["coeff"]), "topic": r["topic"],
                         "starts_below": bool(r["starts_below"]), "converged": bool(r["converged"]),
                         "loss_ratio": float(r["loss_ratio"]),
                         "moved_toward_c": bool(np.sign(r["final_norm"] - r["initial_norm"])
                                                == np.sign(r["coefficient"] - r["initial_norm"]))})
    if not rows:
        return {"skipped": "no fixed-c RMU run with a training log"}
    table = pd.DataFrame(rows)
    agree = float((table["starts_below"] == table["converged"]).mean())
    return {"n": len(table), "agreement": agree,
            "converged_when_below": float(table.loc[table["starts_below"], "converged"].mean())
            if table["starts_below"].any() else None,
            "converged_when_above": float(table.loc[~table["starts_below"], "converged"].mean())
            if (~table["starts_below"]).any() else None,
            "median_loss_ratio_below": float(table.loc[table["starts_below"], "loss_ratio"].median())
            if table["starts_below"].any() else None,
            "median_loss_ratio_above": float(table.loc[~table["starts_below"], "loss_ratio"].median())
            if (~table["starts_below"]).any() else None,
            "moved_toward_c": float(table["moved_toward_c"].mean()),
            "table": table.round(4).to_dict(orient="records")}


# ------------------------------------------------------------------------------------------ summary
def _fmt(x: Any, pct: bool = False) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{100 * x:.1f}%" if pct else f"{x:.3g}"


def _held(ok: bool) -> str:
    return "**held**" if ok else "**not held**"


def summarize(frames: dict[str, pd.DataFrame], plan: ExperimentPlan, theory: dict[str, Any]) -> dict[str, Any]:
    """Every number the summary reports, from the result frames (JSON-ready)."""
    out: dict[str, Any] = {"theory": theory}
    layer = frames["layer"]
    if len(layer):
        out["layer_sweep"] = layer_targets(layer)
        # the paper's split of Zephyr's 32 blocks, 3–10 vs 11–31: the first layer at or past a third of the depth
        split = next(l for l in sorted(plan.layers) if l >= (max(plan.layers) + 1) / 3)
        out["early_late_split"] = split
        out["early_late"] = early_late(layer, split).round(4).to_dict(orient="records")
        out["layer_table"] = layer_table(layer).round(4).to_dict(orient="records")
    parts = [f for f in (frames["coefficient"], layer, frames["table1"]) if len(f)]
    steering = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    if len(steering):
        points = collapse_points(steering.drop_duplicates("key"))
        if len(points):
            out["collapse"] = collapse_summary(points)
    coeff = frames["coefficient"]
    if len(coeff) and "log" in coeff:
        out["convergence"] = convergence_check(coeff)
    if len(coeff):
        rows = []
        for l, sub in coeff[coeff["method"] == "rmu"].groupby("layer"):
            topics = [c[len("cos_u_"):] for c in sub.columns if c.startswith("cos_u_")]
            cos = sub[[f"cos_u_{t}" for t in topics]].mean(axis=1)
            ml = sub[[f"maxlogit_{t}" for t in topics]].mean(axis=1)
            base_ml = sub[[f"base_maxlogit_{t}" for t in topics]].mean(axis=1)
            rows.append({"layer": int(l), "n": len(sub),
                         "rho_c_cos": spearman(sub["coeff"], cos), "rho_c_forget": spearman(sub["coeff"], sub["forget_acc"]),
                         "rho_c_general": spearman(sub["coeff"], sub["general_acc"]),
                         "maxlogit_below_base_when_forgotten": bool((ml[sub["forget_acc"] <= 0.35] <
                                                                     base_ml[sub["forget_acc"] <= 0.35]).all())
                         if (sub["forget_acc"] <= 0.35).any() else None})
        out["coefficient_sweep"] = rows
    table = frames["table1"]
    if len(table):
        out["table1"] = table1_frame(table).round(4).to_dict(orient="records")
        out["table1_grid"] = table1_select(table).round(4).to_dict(orient="records")
    return out


def summary_markdown(s: dict[str, Any], plan: ExperimentPlan, seconds: dict[str, float], quick: bool) -> str:
    lines = [f"# Reproduction on the organism{' (quick plan)' if quick else ''}", "",
             f"Generated by `rmu-analysis reproduce{' --quick' if quick else ''}`; wall time "
             f"{seconds.get('total', float('nan')) / 60:.1f} min ({', '.join(f'{k} {v:.0f} s' for k, v in seconds.items() if k != 'total')}), "
             f"CPU time {s.get('cpu_seconds', float('nan')) / 60:.1f} min; runs trained now: "
             f"{sum(s.get('runs_trained', {}).values())}, reused from the results directory: "
             f"{sum(s.get('runs_reused', {}).values())} (a run shared by two experiments is trained once and then counted as reused).",
             f"Plan: layers {list(plan.layers)}, seeds {list(plan.seeds)}, {plan.steps} steps, fixed c = {plan.c:g}, "
             f"β = {plan.beta:g}, α = {plan.alpha:g}, lr = {plan.lr:g}.", "", "## Claims", ""]
    ns = s["theory"].get("noise_sensitivity")
    if ns:
        lines.append(f"- C4, noise sensitivity falls with depth (Fig. 1): Spearman ρ(k, Φ) = {_fmt(ns['spearman_rho_k_phi'])} "
                     f"for noise at block {ns['layer']} — {_held(ns['held'])} (target ρ ≤ −0.5).")
        if not ns["held"]:
            lines.append(f"  - Why: {EXPLANATIONS['noise_sensitivity']}")
    p1 = s["theory"].get("proposition1", {})
    if "slope_cov_error" in p1:
        lines.append(f"- Proposition 1 (block {p1['layer']}, c = {p1['coeff']:.3g}): the logits' covariance matches "
                     f"η·WJJᵀWᵀ up to a Taylor error of {_fmt(p1['cov_rel_error_paired'][0])} at the smallest η, "
                     f"growing with log-log slope {_fmt(p1['slope_cov_error'])} in η (first order: 1); mean error "
                     f"slope {_fmt(p1['slope_mean_error'])} — {_held(p1['held'])}.")
    elif p1:
        lines.append(f"- Proposition 1: {p1.get('skipped') or p1.get('error')}")
    oc = s["theory"].get("optimal_coefficient", {})
    if "c_star" in oc:
        pairs = ", ".join(f"k={k}: c* = {a:.3g} vs exact {b:.3g}" for k, a, b in zip(oc["ks"], oc["c_star"], oc["c_grid"]))
        lines.append(f"- Eq. 19 at block {oc['layer']} (‖ĥ‖ = {oc['h_norm']:.3g}, cos(u, ĥ) = {oc['cos_u_h']:.2f}): "
                     f"{pairs} (reported, no target).")
    elif oc:
        lines.append(f"- Eq. 19: {oc.get('skipped') or oc.get('error')}")
    ig = s["theory"].get("input_gradients", {})
    if "held" in ig:
        lines.append(f"- C5 / Eq. 20–22: after Adaptive RMU at block {ig['layer']}, the median centred input gradient "
                     f"of log p(answer) is {_fmt(ig['median_centered_ratio_unlearned_over_base'])}× the base model's "
                     f"({ig['questions']} forget questions) — {_held(ig['held'])} (target < 1).")
        if not ig["held"]:
            lines.append(f"  - Why: {EXPLANATIONS['input_gradients']}")
    elif ig:
        lines.append(f"- C5 input gradients: {ig.get('skipped') or ig.get('error')}")
    cv = s.get("convergence", {})
    if "agreement" in cv:
        lines.append(f"- Fig. 4 (coefficient sweep, fixed-c RMU): the forget loss converged (forget representations "
                     f"end within half of ‖c·u‖ of c·u) in "
                     f"{_fmt(cv['converged_when_below'], True)} of runs whose forget norm started below c and in "
                     f"{_fmt(cv['converged_when_above'], True)} of those that started above; converged == starts "
                     f"below in {_fmt(cv['agreement'], True)} of {cv['n']} (run, topic) pairs. Median final/initial "
                     f"forget loss: {_fmt(cv['median_loss_ratio_below'])} when starting below c, "
                     f"{_fmt(cv['median_loss_ratio_above'])} when above; the forget norm moved toward c in "
                     f"{_fmt(cv['moved_toward_c'], True)} of pairs (reported, no target).")
    for row in s.get("coefficient_sweep", []):
        lines.append(f"- C2 at block {row['layer']}: larger c ⇒ higher cos(u, h): ρ(c, cos) = {_fmt(row['rho_c_cos'])}; "
                     f"forgets more: ρ(c, forget acc) = {_fmt(row['rho_c_forget'])}; costs general accuracy: "
                     f"ρ(c, general) = {_fmt(row['rho_c_general'])} ({row['n']} runs).")
        if row["maxlogit_below_base_when_forgotten"] is not None:
            lines.append(f"- C1 at block {row['layer']}: every run that forgot (≤ 35%) has a lower mean MaxLogit than "
                         f"the base model — {_held(row['maxlogit_below_base_when_forgotten'])}.")
    ls = s.get("layer_sweep")
    if ls:
        t = ls["targets"]
        lines += [
            f"- Adaptive RMU at most 35% forget accuracy at ≥ 80% of layers: "
            f"{_fmt(t['adaptive_fraction_of_layers_at_most_35pct']['value'], True)} of layers — "
            f"{_held(t['adaptive_fraction_of_layers_at_most_35pct']['held'])}.",
            f"- Fixed-c RMU's forget accuracy rises with depth: Spearman ρ = "
            f"{_fmt(t['rmu_spearman_rho_forget_vs_layer']['value'])} — {_held(t['rmu_spearman_rho_forget_vs_layer']['held'])} "
            "(target ρ > 0.5).",
            f"- Fixed-c RMU ≥ 20 points above Adaptive RMU over the deepest third (layers {ls['deepest_third']}): "
            f"{100 * t['deepest_third_gap_rmu_minus_adaptive']['value']:.1f} points — "
            f"{_held(t['deepest_third_gap_rmu_minus_adaptive']['held'])}.",
            f"- General accuracy ≥ 85% of base in every run: worst {_fmt(t['min_general_over_base']['value'], True)} "
            f"of base ({t['min_general_over_base']['worst_run']}) — {_held(t['min_general_over_base']['held'])}.",
        ]
        for name, target in t.items():
            if not target["held"] and name in EXPLANATIONS:
                lines.append(f"  - Why: {EXPLANATIONS[name]}")
    c = s.get("collapse")
    if c:
        within = ", ".join(f"l={k}: {_fmt(v)}" for k, v in c["within_layer_rho"].items())
        lines += ["", "## Forget accuracy against c / ‖h_l‖ (the principle behind Adaptive RMU)", "",
                  f"{c['n_points']} points (runs × topics) over {c['n_layers']} layers. Within a layer, ρ(c/‖h_l‖, "
                  f"accuracy): {within or 'n/a'} (mean {_fmt(c['within_layer_rho_mean'])}). Pooled over layers: "
                  f"ρ = {_fmt(c['pooled_rho_ratio'])} against c/‖h_l‖ vs {_fmt(c['pooled_rho_coefficient'])} against raw "
                  f"c; one non-increasing curve explains R² = {_fmt(c['r2_ratio'])} of the variance on c/‖h_l‖ vs "
                  f"{_fmt(c['r2_coefficient'])} on raw c; the residual from that curve correlates with the layer at "
                  f"ρ = {_fmt(c['residual_layer_rho'])} (raw c: {_fmt(c['residual_layer_rho_coefficient'])}).",
                  "The points " + ("fall close to one curve" if c["r2_ratio"] >= 0.7 and
                                   c["r2_ratio"] > c["r2_coefficient"] else "do not fall on one curve")
                  + " (read: R² ≥ 0.7 on c/‖h_l‖ and above raw c)."]
    if s.get("early_late"):
        lines += ["", "## Early vs late layers (as the paper reports Fig. 5)", "",
                  f"Early = layers < {s['early_late_split']}, late = the rest; forget accuracy averaged over layers and seeds.",
                  "", "| topic | layers | RMU | Adaptive RMU | Adaptive lowers by |", "|---|---|---|---|---|"]
        for r in s["early_late"]:
            lines.append(f"| {r['topic']} | {r['layers']} ({r['first']}–{r['last']}) | {100 * r['rmu']:.1f} | "
                         f"{100 * r['adaptive_rmu']:.1f} | {100 * r['lowered_by']:.1f} points |")
    lines += ["", "Paper (Zephyr-7B): Adaptive RMU lowers average accuracy by 13.1 (Bio) / 3.6 (Cyber) points at layers "
              "3–10 and 15.6 / 9.6 at layers 11–31.", ""]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ the job
def reproduce(out_dir: str | Path | None = None, *, quick: bool = False, plan: ExperimentPlan | None = None,
              bench: Workbench | Callable[[], Workbench] | None = None, results_dir: str | Path | None = None,
              fresh: bool = False, progress: bool = True, threads: int | None = None, workers: int = 1,
              experiments: tuple[str, ...] = ("theory", "coefficient", "layer", "table1")) -> dict[str, Any]:
    """Run the theory checks and the three sweeps on the organism (or ``bench``'s model with ``plan``), write
    figures, ``table1.md``, ``summary.md`` and ``summary.json`` to ``out_dir``; return the summary dict.

    ``out_dir`` default: ``figures`` (``figures/quick`` with ``quick``). ``results_dir`` default:
    ``<out_dir>/results``. Finished runs found there are reused unless ``fresh``. ``threads``: torch CPU threads
    per process (None: leave as set); ``workers``: processes for the sweeps (``bench`` must then be a picklable
    factory; the CLI runs the organism as two one-thread workers on 2 cores).
    """
    from . import plots_experiments as P

    t_start, cpu_start = time.perf_counter(), _cpu_seconds()
    out = Path(out_dir) if out_dir is not None else Path("figures") / ("quick" if quick else "")
    results = Path(results_dir) if results_dir is not None else out / "results"
    plan = plan or organism_plan(quick=quick)
    if bench is None:
        import functools

        bench = functools.partial(Workbench.load, "organism")
    lazy = _LazyBench(bench if callable(bench) and not isinstance(bench, Workbench) else (lambda: bench))
    if threads is not None:
        torch.set_num_threads(threads)
    seconds: dict[str, float] = {}
    trained: dict[str, int] = {}  # runs trained by this call, per experiment
    reused: dict[str, int] = {}  # runs whose result file was already there
    done_now: set[str] = set()  # keys trained or found finished by this call

    theory: dict[str, Any] = {}
    if "theory" in experiments:
        t = time.perf_counter()
        theory = theory_checks(lazy(), out, plan, quick=quick)
        seconds["theory"] = time.perf_counter() - t
    norms = plan_norms(plan, lazy, results) if plan.coeff_layers and "coefficient" in experiments else None
    grids = plan_grids(plan if norms is not None else dataclasses.replace(plan, coeff_layers=()), norms)
    frames: dict[str, pd.DataFrame] = {}
    for name, desc in (("coefficient", "coefficient sweep"), ("layer", "layer sweep"), ("table1", "Table 1")):
        if name not in experiments or not grids[name]:
            frames[name] = pd.DataFrame()
            continue
        t = time.perf_counter()
        # a run shared with an earlier experiment of this call (e.g. RMU at the Table 1 layer) is trained once
        todo = [s for s in grids[name] if s.key() not in done_now]
        outcome = run_sweep(todo, results, lazy if workers == 1 else bench, resume=not fresh,
                            progress=progress, desc=desc, workers=workers, threads=threads or 1)
        done_now.update(s.key() for s in todo)
        trained[name], reused[name] = outcome.ran, outcome.skipped + len(grids[name]) - len(todo)
        seconds[name] = time.perf_counter() - t
        frames[name] = load_results(results, grids[name], logs=(name == "coefficient"))

    summary = summarize(frames, plan, theory)
    figures = []
    if len(frames["coefficient"]):
        for layer in sorted(frames["coefficient"]["layer"].unique()):
            if plan.table_layer in frames["coefficient"]["layer"].values and layer != plan.table_layer:
                continue
            figures.append(_save(P.plot_coefficient_sweep(frames["coefficient"], int(layer)),
                                 out / f"fig3_coefficient_sweep_l{int(layer)}.png"))
        rmu_layers = sorted(frames["coefficient"].query("method == 'rmu'")["layer"].unique())
        if len(rmu_layers) >= 2:
            coeff = frames["coefficient"]
            # Fig. 4: the run whose c is nearest the layer sweep's fixed c, at the shallowest and deepest layer
            picks = []
            for l in (rmu_layers[0], rmu_layers[-1]):
                sub = coeff[(coeff["method"] == "rmu") & (coeff["layer"] == l)]
                picks.append(sub.loc[(np.log(sub["coeff"]) - np.log(plan.c)).abs().idxmin()])
            figures.append(_save(P.plot_norm_trajectories(pd.DataFrame(picks), [int(rmu_layers[0]), int(rmu_layers[-1])]),
                                 out / "fig4_norm_trajectories.png"))
    if len(frames["layer"]):
        figures.append(_save(P.plot_layer_sweep(frames["layer"]), out / "fig5_layer_sweep.png"))
    if "collapse" in summary:
        steering = pd.concat([f for f in frames.values() if len(f)], ignore_index=True).drop_duplicates("key")
        figures.append(_save(P.plot_collapse(collapse_points(steering), summary["collapse"]),
                             out / "collapse_ratio.png"))
    if len(frames["table1"]):
        caption = (f"Table 1 analogue on the organism: accuracy (%) at block {plan.table_layer}, mean ± std over "
                   f"seeds {list(plan.seeds)}; per method the grid point with the lowest mean forget accuracy whose "
                   "mean general accuracy is ≥ 85% of base (selected on the same seeds). Chance = 25%.")
        grid = table1_select(frames["table1"])
        full = grid.assign(**{c: (100 * grid[c]).round(1) for c in grid.columns if c.startswith("acc_") or c in
                              ("forget_acc", "general_acc")})
        text = table1_markdown(table1_frame(frames["table1"]), caption=caption)
        text += "\nEvery grid point (mean over seeds, accuracy in %):\n\n" + frame_markdown(
            full.drop(columns=["base_general_acc"]))
        atomic_write_text(out / "table1.md", text)
        figures.append("table1.md")
    seconds["total"] = time.perf_counter() - t_start
    summary["seconds"] = seconds
    summary["runs_trained"], summary["runs_reused"] = trained, reused
    summary["cpu_seconds"] = _cpu_seconds() - cpu_start  # this process and its finished worker processes
    summary["figures"] = figures
    summary["plan"] = json.loads(json.dumps(dataclasses.asdict(plan), default=str))
    md = summary_markdown(summary, plan, seconds, quick)
    if len(frames["table1"]):
        md += "\n## Table 1\n\n" + table1_markdown(table1_frame(frames["table1"]))
    atomic_write_text(out / "summary.md", md)
    atomic_write_json(out / "summary.json", _jsonable(summary))
    return summary


def _cpu_seconds() -> float:
    import resource

    return sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
               for f in ("ru_utime", "ru_stime"))


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return None if not math.isfinite(float(obj)) else round(float(obj), 6)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


# ------------------------------------------------------------------------------------------------- CLI
def add_reproduce_parser(subparsers):
    """``rmu-analysis reproduce [--quick] [--out DIR] [--fresh]`` (and ``--model PATH`` with data files, GPU)."""
    from .experiments import _add_model_arguments

    p = subparsers.add_parser(
        "reproduce", help="run the theory checks, coefficient sweep, layer sweep and Table 1; write figures/",
        description="Reproduce the paper's claims on the shipped organism (≤ 20 min on 2 CPU cores; --quick ≈ 2 "
                    "min): figures (PNG), table1.md, summary.md (which claims held) and one JSON per run.",
    )
    p.add_argument("--quick", action="store_true", help="the reduced plan (≈ 2 minutes), written to figures/quick")
    p.add_argument("--out", type=Path, default=None, help="output directory (default figures/, or figures/quick)")
    p.add_argument("--results", type=Path, default=None, help="results directory (default <out>/results)")
    p.add_argument("--fresh", action="store_true", help="recompute runs whose results already exist")
    p.add_argument("--only", nargs="+", choices=("theory", "coefficient", "layer", "table1"), default=None)
    _add_model_arguments(p)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_reproduce_command)
    return p


def _reproduce_command(args) -> int:
    from .experiments import plan_from_args

    from .experiments import resources

    plan, factory = plan_from_args(args)
    workers, threads = resources(args)
    summary = reproduce(args.out, quick=args.quick, plan=plan, bench=factory, results_dir=args.results,
                        fresh=args.fresh, progress=not args.no_progress, threads=threads, workers=workers,
                        experiments=tuple(args.only) if args.only else ("theory", "coefficient", "layer", "table1"))
    out = Path(args.out) if args.out is not None else Path("figures") / ("quick" if args.quick else "")
    print((out / "summary.md").read_text())
    print(f"figures and tables in {out}/ ({summary['seconds']['total'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":  # pragma: no cover
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m rmu_analysis.reproduce")
    sub = parser.add_subparsers(dest="command", required=True)
    add_reproduce_parser(sub)
    args = parser.parse_args(["reproduce", *sys.argv[1:]])
    sys.exit(args.func(args))
