"""Figures of the robustness lab (``rmu_analysis.experiments.robustness``): recovery curves, accuracy against the
attacker's steps, per method. Each function takes :func:`~rmu_analysis.experiments.robustness.curve_frame`'s frame,
returns the matplotlib ``Figure`` and never shows it.

- :func:`plot_gcg_curves` — GCG's success toward the correct and the wrong answer per step, beside the gradient the
  attacker sees (its norm and how well it predicts the candidates' loss changes; arXiv 2408.06223 §3.3, Eq. 20–22)
- :func:`plot_relearn_curves` — forget accuracy per relearning step, on forget-topic text and on retain text
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd

__all__ = ["plot_gcg_curves", "plot_relearn_curves", "METHOD_COLORS"]

#: One colour per method label of the robustness table.
METHOD_COLORS = {"base": "black", "GA": "tab:green", "GradDiff": "tab:olive", "NPO": "tab:purple", "RMU": "tab:red",
                 "Adaptive RMU": "tab:blue"}


def _check(frame: pd.DataFrame, columns: set[str]) -> None:
    if frame is None or not len(frame):
        raise ValueError("nothing to plot: the curve frame is empty")
    missing = columns - set(frame.columns)
    if missing:
        raise ValueError(f"the curve frame lacks {sorted(missing)}: pass robustness.curve_frame(rows, attack)")


def _methods(frame: pd.DataFrame) -> list[str]:
    seen = list(dict.fromkeys(frame["method"]))
    return [m for m in METHOD_COLORS if m in seen] + [m for m in seen if m not in METHOD_COLORS]


def plot_gcg_curves(frame: pd.DataFrame, *, title: str | None = None):
    """Three panels against GCG step, mean over seeds (and questions): target success toward the correct answer
    (solid) and toward the wrong-answer control (dashed); the mean norm of the loss gradient w.r.t. the one-hot
    adversarial tokens (log scale); the Spearman correlation of the gradient's predicted loss change with the
    candidates' actual change."""
    _check(frame, {"method", "target", "step", "target_success", "grad_norm", "grad_corr"})
    fig, axes = plt.subplots(1, 3, figsize=(10.5, 3.1), layout="constrained")
    mean = frame.groupby(["method", "target", "step"], sort=False)[["target_success", "grad_norm", "grad_corr"]].mean()
    for m in _methods(frame):
        color = METHOD_COLORS.get(m)
        for target, style in (("correct", "-"), ("wrong", "--")):
            if (m, target) not in mean.index.droplevel("step"):
                continue
            part = mean.loc[(m, target)]
            axes[0].plot(part.index, 100 * part["target_success"], style, color=color,
                         label=m if target == "correct" else None)
            if target == "correct":
                axes[1].plot(part.index, part["grad_norm"], color=color)
                axes[2].plot(part.index, part["grad_corr"], color=color)
    axes[0].set(xlabel="GCG step", ylabel="target answer wins (%)", title="success (— correct, -- wrong target)")
    axes[1].set(xlabel="GCG step", ylabel="‖∂loss/∂one-hot‖", yscale="log", title="gradient the attacker sees")
    axes[2].set(xlabel="GCG step", ylabel="Spearman ρ", title="gradient predicts loss change")
    axes[2].axhline(0, color="grey", lw=0.5)
    axes[0].legend(fontsize=7, frameon=False)
    if title:
        fig.suptitle(title)
    return fig


def plot_relearn_curves(frame: pd.DataFrame, *, title: str | None = None):
    """Forget accuracy against relearning step, mean over seeds: on forget-topic text that states no tested fact
    (solid) and on retain text (dashed, the control)."""
    _check(frame, {"method", "setting", "step", "accuracy"})
    fig, ax = plt.subplots(figsize=(4.2, 3.1), layout="constrained")
    mean = frame.groupby(["method", "setting", "step"], sort=False)["accuracy"].mean()
    for m in _methods(frame):
        for setting, style in (("forget text", "-"), ("retain text", "--")):
            if (m, setting) not in mean.index.droplevel("step"):
                continue
            part = mean.loc[(m, setting)]
            ax.plot(part.index, 100 * part.values, style, marker="o", ms=3, color=METHOD_COLORS.get(m),
                    label=m if setting == "forget text" else None)
    ax.set(xlabel="relearning step", ylabel="forget accuracy (%)", title=title or "relearning (— forget, -- retain text)")
    ax.legend(fontsize=7, frameon=False)
    return fig
