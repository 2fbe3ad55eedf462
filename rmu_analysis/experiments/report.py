"""The reproduction's text: Table 1 and its full grid (``table1.md``) and ``summary.md``, which states each of the
paper's claims with the measured numbers and whether its target (:class:`~.targets.Targets`) held.

``summary.md`` is built from :class:`Claim` s, one small function per group of claims; each function reads the
summary dict (:func:`~.analysis.summarize`) and says what it measured, and :func:`render` writes the verdict and
the target the same way for all of them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Union

import numpy as np
import pandas as pd

from .analysis import METHOD_NAMES, table1_frame, table1_select
from .plans import ExperimentPlan
from .targets import TARGETS, Targets, percent

__all__ = ["EXPLANATIONS", "Claim", "render", "summary_markdown", "table1_markdown", "table1_interval_markdown", "table1_text", "frame_markdown"]

#: Why a target can fail on the organism, written after measuring it; ``summary.md`` shows an entry only when the
#: target it names did not hold and the model is the organism (the assertion itself is never loosened).
EXPLANATIONS: dict[str, str] = {
    "min_general_over_base": (
        "steering hard enough to forget costs general knowledge in some runs: α = 100 does not hold it fully, most "
        "of all where c / ‖h_l‖ is large (notebook 06 lists every run below the bar)."),
    "noise_sensitivity": (
        "this check pushes the mean state through the blocks as a one-token sequence at position 0 (the BOS "
        "regime); with noise at every token of real forget prompts, Φ does fall with depth on the organism "
        "(notebook 03, `mechanism.token_noise_sensitivity`)."),
    "input_gradients": (
        "trained unlearned models have larger, not near-zero, input gradients; only the idealised model (block "
        "output replaced by c·u at every token) has zero gradient, as Eq. 20–22 assume (notebook 08)."),
    "fixed_c_convergence": (
        "in 200 steps (lr 1e-2, α = 100) the forget states move only part of the way to c·u even at the blocks "
        "where their norm starts below c, yet the same runs lower forget accuracy by about 30 points at blocks 2–3 "
        "(notebook 06): on the organism forgetting does not need the forget loss to converge, and the starting side "
        "of c does not decide convergence (notebook 04)."),
}


# ----------------------------------------------------------------------------------------------- tables
def table1_markdown(table: pd.DataFrame, *, names: Mapping[str, str] | None = None, caption: str = "") -> str:
    """Table 1 as Markdown: accuracy in % as mean ± std over seeds (lower is better on the forget topics)."""
    names = {**METHOD_NAMES, **(names or {})}
    sets = [c[: -len("_mean")] for c in table.columns if c.endswith("_mean")]
    header = "| method | setting | " + " | ".join(sets) + " | seeds |"
    lines = [header, "|" + "---|" * (len(sets) + 3)]
    for _, r in table.iterrows():
        cells = [f"{100 * r[f'{s}_mean']:.1f} ± {100 * r[f'{s}_std']:.1f}" if r["n_seeds"] > 1
                 else f"{100 * r[f'{s}_mean']:.1f}" for s in sets]
        lines.append(f"| {names.get(r['method'], r['method'])} | {r['setting']} | " + " | ".join(cells)
                     + f" | {r['n_seeds']} |")
    return (caption + "\n\n" if caption else "") + "\n".join(lines) + "\n"


def table1_interval_markdown(table: pd.DataFrame, *, names: Mapping[str, str] | None = None, caption: str = "") -> str:
    """Table 1 with 95% intervals (:func:`~.analysis.table1_intervals`): accuracy in %, pooled over seeds, [low,
    high] from resampling facts."""
    names = {**METHOD_NAMES, **(names or {})}
    sets = [c[: -len("_low")] for c in table.columns if c.endswith("_low")]
    lines = ["| method | setting | " + " | ".join(sets) + " | seeds |", "|" + "---|" * (len(sets) + 3)]
    for _, r in table.iterrows():
        cells = [f"{100 * r[s]:.1f} [{100 * r[f'{s}_low']:.1f}, {100 * r[f'{s}_high']:.1f}]" for s in sets]
        lines.append(f"| {names.get(r['method'], r['method'])} | {r['setting']} | " + " | ".join(cells)
                     + f" | {r['n_seeds']} |")
    return (caption + "\n\n" if caption else "") + "\n".join(lines) + "\n"


def frame_markdown(frame: pd.DataFrame, digits: int = 4) -> str:
    """A DataFrame as a Markdown table (no extra dependency)."""
    def cell(v: Any) -> str:
        if isinstance(v, (float, np.floating)):
            return "" if not np.isfinite(v) else f"{v:.{digits}g}"
        return str(v)

    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def table1_text(frame: pd.DataFrame, plan: ExperimentPlan, targets: Targets = TARGETS,
                select: pd.DataFrame | None = None, intervals: pd.DataFrame | None = None) -> str:
    """``table1.md``: Table 1 with its caption, then every grid point (mean over seeds, accuracy in %). ``select``:
    the selection runs (dev questions, selection seeds) when the plan has them; the grid shown is theirs."""
    two_stage = select is not None and len(select)
    how = (f"selected on the dev questions with seeds {list(plan.selection_seeds)}, reported on the test questions"
           if two_stage else "selected on the same seeds")
    caption = (f"Table 1 analogue on the {_model_name(plan)}: accuracy (%) at block {plan.table_layer}, mean ± std "
               f"over seeds {list(plan.seeds)}; per method the grid point with the lowest mean forget accuracy whose "
               f"mean general accuracy is ≥ {percent(targets.min_general_ratio)} of base ({how}). Chance = 25%.")
    grid = table1_select(select if two_stage else frame, targets)
    full = grid.assign(**{c: (100 * grid[c]).round(1) for c in grid.columns if c.startswith("acc_") or c in
                          ("forget_acc", "general_acc")})
    title = ("Every grid point on the dev questions (mean over the selection seeds, accuracy in %):" if two_stage
             else "Every grid point (mean over seeds, accuracy in %):")
    head = table1_markdown(table1_frame(frame, targets), caption=caption)
    if intervals is not None and len(intervals):
        head = table1_interval_markdown(intervals, caption=caption.replace(
            "mean ± std over seeds", "pooled over seeds with a 95% interval (facts resampled), seeds")) + \
            "\nMean ± std over seeds:\n\n" + table1_markdown(table1_frame(frame, targets))
    return (head + f"\n{title}\n\n" + frame_markdown(full.drop(columns=["base_general_acc"])))


def _model_name(plan: ExperimentPlan) -> str:
    return "organism" if plan.model == "organism" else plan.model


# ------------------------------------------------------------------------------------------------ claims
def fmt(x: Any, pct: bool = False) -> str:
    """A number as the summary writes it: 3 significant digits, or a percentage; ``n/a`` for None and nan."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{100 * x:.1f}%" if pct else f"{x:.3g}"


@dataclass(frozen=True)
class Claim:
    """One line of ``summary.md``: what was measured (``text``), whether its target held (None: no verdict), the
    ``target`` in words (``"target ρ > 0.5"``, ``"reported, no target"``), and the key of its explanation in
    :data:`EXPLANATIONS`, shown under the line when the target failed."""

    text: str
    held: bool | None = None
    target: str = ""
    explain: str | None = None


Line = Union[Claim, str]  # a str is written as it is (a heading, a table row, a skipped check)


def render(claim: Line, explain: bool = True) -> list[str]:
    """``claim`` as Markdown lines: ``"- text — **held** (target …)."`` and, when the target failed and ``explain``,
    ``"  - Why: …"``."""
    if isinstance(claim, str):
        return [claim]
    line = "- " + claim.text
    if claim.held is not None:
        line += " — " + ("**held**" if claim.held else "**not held**")
    if claim.target:
        line += f" ({claim.target})"
    lines = [line + "."]
    if explain and claim.held is False and claim.explain in EXPLANATIONS:
        lines.append(f"  - Why: {EXPLANATIONS[claim.explain]}")
    return lines


def _theory(s: Mapping[str, Any], t: Targets) -> Iterator[Line]:
    th = s["theory"]
    ns = th.get("noise_sensitivity")
    if ns:
        yield Claim(f"C4, noise sensitivity falls with depth (Fig. 1): Spearman ρ(k, Φ) = {fmt(ns['spearman_rho_k_phi'])} "
                    f"for noise at block {ns['layer']}", ns["held"], f"target ρ ≤ {t.text('max_noise_rho')}",
                    "noise_sensitivity")
    p1 = th.get("proposition1", {})
    if "slope_cov_error" in p1:
        yield Claim(f"Proposition 1 (block {p1['layer']}, c = {p1['coeff']:.3g}): the logits' covariance matches "
                    f"η·WJJᵀWᵀ up to a Taylor error of {fmt(p1['cov_rel_error_paired'][0])} at the smallest η, growing "
                    f"with log-log slope {fmt(p1['slope_cov_error'])} in η (first order: 1); mean error slope "
                    f"{fmt(p1['slope_mean_error'])}", p1["held"])
    elif p1:
        yield f"- Proposition 1: {p1.get('skipped') or p1.get('error')}"
    oc = th.get("optimal_coefficient", {})
    if "c_star" in oc:
        pairs = ", ".join(f"k={k}: c* = {a:.3g} vs exact {b:.3g}" for k, a, b in zip(oc["ks"], oc["c_star"], oc["c_grid"]))
        yield Claim(f"Eq. 19 at block {oc['layer']} (‖ĥ‖ = {oc['h_norm']:.3g}, cos(u, ĥ) = {oc['cos_u_h']:.2f}): {pairs}",
                    target="reported, no target")
    elif oc:
        yield f"- Eq. 19: {oc.get('skipped') or oc.get('error')}"
    ig = th.get("input_gradients", {})
    if "held" in ig:
        yield Claim(f"C5 / Eq. 20–22: after Adaptive RMU at block {ig['layer']}, the median centred input gradient of "
                    f"log p(answer) is {fmt(ig['median_centered_ratio_unlearned_over_base'])}× the base model's "
                    f"({ig['questions']} forget questions)", ig["held"], f"target < {t.max_gradient_ratio:g}",
                    "input_gradients")
    elif ig:
        yield f"- C5 input gradients: {ig.get('skipped') or ig.get('error')}"


def _convergence(s: Mapping[str, Any], t: Targets) -> Iterator[Line]:
    cv = s.get("convergence", {})
    if "agreement" in cv:
        yield Claim(f"Fig. 4 (coefficient sweep, fixed-c RMU): the forget loss converged (forget representations end "
                    f"within half of ‖c·u‖ of c·u) in {fmt(cv['converged_when_below'], True)} of runs whose forget norm "
                    f"started below c and in {fmt(cv['converged_when_above'], True)} of those that started above; "
                    f"converged == starts below in {fmt(cv['agreement'], True)} of {cv['n']} (run, topic) pairs. Median "
                    f"final/initial forget loss: {fmt(cv['median_loss_ratio_below'])} when starting below c, "
                    f"{fmt(cv['median_loss_ratio_above'])} when above; the forget norm moved toward c in "
                    f"{fmt(cv['moved_toward_c'], True)} of pairs", target="reported, no target")


def _fixed_c(s: Mapping[str, Any], t: Targets) -> Iterator[Line]:
    fc = s.get("fixed_c_convergence", {})
    if "held" not in fc:
        if fc:
            yield f"- C3 / Fig. 4 with one fixed c: {fc.get('skipped')}"
        return
    parts = []
    for r in fc["table"]:
        side = "below" if r["starts_below"] else "above"
        parts.append(f"block {r['layer']} {r['topic']}: norm {r['frozen_norm']:.1f} ({side} c), final "
                     f"{r['final_over_target']:.2f} [{r['final_over_target_low']:.2f}, {r['final_over_target_high']:.2f}]"
                     f"{'' if r['as_predicted'] else ' ✗'}")
    yield Claim(f"C3 / Fig. 4 with one fixed c = {fc['c']:g} at blocks {', '.join(map(str, fc['layers']))} "
                f"({fc['n_seeds']} seeds, the layer sweep's runs; ‖h − c·u‖² / ‖c·u‖² over the last 3 logged steps, "
                f"BOS and padding left out): {'; '.join(parts)}", fc["held"],
                f"target: starts below c ⇒ converged (interval ≤ {fc['threshold']:g}), starts above ⇒ not "
                f"(interval > {fc['threshold']:g}), at every block and topic", "fixed_c_convergence")


def _coefficient_sweep(s: Mapping[str, Any], t: Targets) -> Iterator[Line]:
    for row in s.get("coefficient_sweep", []):
        yield Claim(f"C2 at block {row['layer']}: larger c ⇒ higher cos(u, h): ρ(c, cos) = {fmt(row['rho_c_cos'])}; "
                    f"forgets more: ρ(c, forget acc) = {fmt(row['rho_c_forget'])}; costs general accuracy: "
                    f"ρ(c, general) = {fmt(row['rho_c_general'])} ({row['n']} runs)")
        if row["maxlogit_below_base_when_forgotten"] is not None:
            yield Claim(f"C1 at block {row['layer']}: every run that forgot (≤ {t.text('max_forget')}) has a lower mean "
                        "MaxLogit than the base model", row["maxlogit_below_base_when_forgotten"])


def _layer_sweep(s: Mapping[str, Any], t: Targets) -> Iterator[Line]:
    ls = s.get("layer_sweep")
    if not ls:
        return
    tg = ls["targets"]
    fraction, rho, gap, general = (tg[k] for k in (t.adaptive_fraction_key, t.rmu_rho_key, t.gap_key, t.general_key))
    yield Claim(f"Adaptive RMU at most {t.text('max_forget')} forget accuracy at ≥ {t.text('min_layer_fraction')} of "
                f"layers: {fmt(fraction['value'], True)} of layers", fraction["held"], explain=t.adaptive_fraction_key)
    yield Claim(f"Fixed-c RMU's forget accuracy rises with depth: Spearman ρ = {fmt(rho['value'])}", rho["held"],
                f"target ρ > {t.text('min_rho')}", t.rmu_rho_key)
    yield Claim(f"Fixed-c RMU ≥ {t.text('min_gap')} points above Adaptive RMU over the deepest third (layers "
                f"{ls['deepest_third']}): {100 * gap['value']:.1f} points", gap["held"], explain=t.gap_key)
    yield Claim(f"General accuracy ≥ {t.text('min_general_ratio')} of base in every run: worst "
                f"{fmt(general['value'], True)} of base ({general['worst_run']})", general["held"], explain=t.general_key)


def _collapse(s: Mapping[str, Any], t: Targets) -> Iterator[Line]:
    c = s.get("collapse")
    if not c:
        return
    within = ", ".join(f"l={k}: {fmt(v)}" for k, v in c["within_layer_rho"].items())
    one_curve = c["r2_ratio"] >= t.min_collapse_r2 and c["r2_ratio"] > c["r2_coefficient"]
    yield from ["", "## Forget accuracy against c / ‖h_l‖ (the principle behind Adaptive RMU)", "",
                f"{c['n_points']} points (runs × topics) over {c['n_layers']} layers. Within a layer, ρ(c/‖h_l‖, "
                f"accuracy): {within or 'n/a'} (mean {fmt(c['within_layer_rho_mean'])}). Pooled over layers: "
                f"ρ = {fmt(c['pooled_rho_ratio'])} against c/‖h_l‖ vs {fmt(c['pooled_rho_coefficient'])} against raw "
                f"c; one non-increasing curve explains R² = {fmt(c['r2_ratio'])} of the variance on c/‖h_l‖ vs "
                f"{fmt(c['r2_coefficient'])} on raw c; the residual from that curve correlates with the layer at "
                f"ρ = {fmt(c['residual_layer_rho'])} (raw c: {fmt(c['residual_layer_rho_coefficient'])}).",
                "The points " + ("fall close to one curve" if one_curve else "do not fall on one curve")
                + f" (read: R² ≥ {t.min_collapse_r2:g} on c/‖h_l‖ and above raw c)."]


def _early_late(s: Mapping[str, Any], t: Targets) -> Iterator[Line]:
    if s.get("early_late"):
        yield from ["", "## Early vs late layers (as the paper reports Fig. 5)", "",
                    f"Early = layers < {s['early_late_split']}, late = the rest; forget accuracy averaged over layers "
                    "and seeds.", "", "| topic | layers | RMU | Adaptive RMU | Adaptive lowers by |", "|---|---|---|---|---|"]
        for r in s["early_late"]:
            yield (f"| {r['topic']} | {r['layers']} ({r['first']}–{r['last']}) | {100 * r['rmu']:.1f} | "
                   f"{100 * r['adaptive_rmu']:.1f} | {100 * r['lowered_by']:.1f} points |")
    yield from ["", "Paper (Zephyr-7B): Adaptive RMU lowers average accuracy by 13.1 (Bio) / 3.6 (Cyber) points at layers "
                "3–10 and 15.6 / 9.6 at layers 11–31.", ""]


def _interval_row(name: str, d: Mapping[str, Any]) -> str:
    return (f"{name} {100 * d['diff']:+.1f} points [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}] "
            f"(McNemar p = {d['mcnemar_p']:.2g})")


def _comparisons(s: Mapping[str, Any], t: Targets) -> Iterator[Line]:
    """Adaptive RMU against RMU, paired, with intervals (test questions, facts resampled)."""
    for key, where in (("table1_adaptive_vs_rmu", "Table 1's block"), ("deep_adaptive_vs_rmu", "a deep block")):
        c = s.get(key)
        if not c:
            continue
        if "skipped" in c:
            yield f"- Adaptive RMU vs RMU at block {c['layer']}: {c['skipped']}"
            continue
        topics = [k for k in c if k not in ("layer", "general")]
        beats = [k for k in topics if c[k]["high"] < 0]
        rows = "; ".join(_interval_row(k, c[k]) for k in topics + ["general"] if k in c)
        yield Claim(f"Adaptive RMU − RMU forget accuracy at {where} (block {c['layer']}, {c[topics[0]]['n_seeds']} "
                    f"seeds paired): {rows}; Adaptive RMU forgets more beyond the interval on "
                    f"{', '.join(beats) if beats else 'no topic'}", bool(beats) and len(beats) == len(topics),
                    "target: the whole 95% interval below 0 on every forget topic")
    at = s.get("adaptive_target")
    if at:
        forget = ", ".join(f"{k} {fmt(v, True)}" for k, v in at["forget"].items())
        yield Claim(f"Adaptive RMU (Table 1's selected point) forgets to {forget} with general accuracy "
                    f"{fmt(at['general'], True)} ({fmt(at['general'] / at['base_general'], True)} of base)", at["held"],
                    f"target each forget topic ≤ {percent(at['max_forget'])} and general ≥ "
                    f"{percent(at['min_general_ratio'])} of base")


#: The sections of the claims, in order; each yields the lines of its claims.
SECTIONS: tuple[Callable[[Mapping[str, Any], Targets], Iterator[Line]], ...] = (
    _theory, _fixed_c, _convergence, _coefficient_sweep, _layer_sweep, _comparisons, _collapse, _early_late)


def _header(s: Mapping[str, Any], plan: ExperimentPlan, seconds: Mapping[str, float], quick: bool) -> list[str]:
    parts = ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items() if k != "total")
    return [f"# Reproduction on the {_model_name(plan)}{' (quick plan)' if quick else ''}", "",
            f"Generated by `rmu-analysis reproduce{' --quick' if quick else ''}`; wall time "
            f"{seconds.get('total', float('nan')) / 60:.1f} min ({parts}), CPU time "
            f"{s.get('cpu_seconds', float('nan')) / 60:.1f} min; runs trained now: {sum(s.get('runs_trained', {}).values())}, "
            f"reused from the results directory: {sum(s.get('runs_reused', {}).values())} (a run shared by two "
            "experiments is trained once and then counted as reused).",
            f"Plan: layers {list(plan.layers)}, seeds {list(plan.seeds)}, {plan.steps} steps, fixed c = {plan.c:g}, "
            f"β = {plan.beta:g}, α = {plan.alpha:g}, lr = {plan.lr:g}.", "", "## Claims", ""]


def summary_markdown(s: Mapping[str, Any], plan: ExperimentPlan, seconds: Mapping[str, float], quick: bool, *,
                     targets: Targets = TARGETS) -> str:
    """``summary.md``: the header (time, runs, plan), then every claim of :data:`SECTIONS` with its verdict. The
    organism's :data:`EXPLANATIONS` appear under failed targets only when the plan's model is the organism."""
    lines = _header(s, plan, seconds, quick)
    explain = plan.model == "organism"
    for section in SECTIONS:
        for claim in section(s, targets):
            lines += render(claim, explain)
    return "\n".join(lines) + "\n"
