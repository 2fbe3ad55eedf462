"""Figures of the sweeps (``rmu_analysis.experiments``). Each function takes the frames that
``experiments.load_results`` / ``collapse_points`` return, returns the matplotlib ``Figure`` and never shows it;
which of them a reproduction draws is ``experiments.figures``.

- :func:`plot_layer_sweep` — forget and general accuracy per unlearn layer, RMU (fixed c) vs Adaptive RMU (Fig. 5)
- :func:`plot_collapse` — forget accuracy against c / ‖h_l‖ and against raw c, every run, coloured by layer
- :func:`plot_coefficient_sweep` — accuracy, cos(u, h) and MaxLogit against c at one layer (Fig. 2, Fig. 3)
- :func:`plot_norm_trajectories` — the forget norm and ‖h − c·u‖² / ‖c·u‖² during training, one fixed c, per layer (Fig. 4)
- :func:`plot_tradeoff` — forget vs general accuracy per layer, RMU over c and Adaptive RMU over β (matched utility)
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import matplotlib as mpl
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.ticker import MaxNLocator, NullFormatter, ScalarFormatter

from .claims import forget_loss_measures
from .experiments.results import finished_runs, result_topics
from .experiments.targets import TARGETS, Targets

__all__ = ["plot_layer_sweep", "plot_collapse", "plot_coefficient_sweep", "plot_norm_trajectories", "plot_tradeoff"]

_LABELS = {"rmu": "RMU (fixed c)", "adaptive-rmu": "Adaptive RMU"}
_COLORS = {"rmu": "tab:red", "adaptive-rmu": "tab:blue"}


def _runs(frame: pd.DataFrame) -> pd.DataFrame:
    if frame is None or len(frame) == 0:
        raise ValueError("nothing to plot: the results frame is empty")
    return finished_runs(frame)


def _subplots(n: int, width: float = 3.6, height: float = 3.2):
    fig, axes = plt.subplots(1, n, figsize=(width * n, height), layout="constrained", squeeze=False)
    return fig, list(axes[0])


def _plain_log_x(ax) -> None:
    """Log x axis labelled with plain numbers (no overlapping minor-tick labels)."""
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())


def plot_layer_sweep(frame: pd.DataFrame, *, targets: Targets = TARGETS, title: str | None = None):
    """Mean ± std over seeds of each forget topic's accuracy and the general accuracy against the unlearn
    layer, one line per method, with the base accuracy, chance (25%), the forget target (``targets.max_forget``)
    and the utility bar (``targets.min_general_ratio`` × base)."""
    frame = _runs(frame)
    sets = result_topics(frame) + ["general"]
    fig, axes = _subplots(len(sets))
    for ax, s in zip(axes, sets):
        col = f"acc_{s}"
        for method, sub in frame.groupby("method"):
            g = sub.groupby("layer")[col]
            mean, std = g.mean(), g.std(ddof=1).fillna(0.0)
            ax.errorbar(mean.index, mean.values, yerr=std.values, marker="o", capsize=3,
                        color=_COLORS.get(method), label=_LABELS.get(method, method))
        base = float(frame[f"base_acc_{s}"].iloc[0])
        ax.axhline(base, color="black", linewidth=1, label=f"base ({base:.0%})")
        ax.axhline(0.25, color="gray", linestyle=":", linewidth=1, label="chance")
        if s == "general":
            ax.axhline(targets.min_general_ratio * base, color="gray", linestyle="--", linewidth=1,
                       label=f"{targets.min_general_ratio:.0%} of base")
        else:
            ax.axhline(targets.max_forget, color="tab:blue", linestyle="--", linewidth=1, alpha=0.6,
                       label=f"{targets.max_forget:.0%} target")
        ax.set_ylim(0, 1)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("unlearn layer l")
        ax.set_ylabel(f"{s} accuracy")
        ax.set_title(s)
    axes[0].legend(fontsize=7)
    axes[-1].legend(fontsize=7)
    fig.suptitle(title or "layer-wise effectiveness: fixed-c RMU vs Adaptive RMU (Fig. 5 analogue)")
    return fig


def plot_collapse(points: pd.DataFrame, summary: Mapping[str, Any] | None = None, *, title: str | None = None):
    """Forget accuracy of every (steering run, topic) against c / ‖h_l‖ (left) and raw c (right), coloured by
    layer, circles for RMU and squares for Adaptive RMU. One curve on the left and spread by layer on the right
    is what the Adaptive RMU principle predicts."""
    if points is None or len(points) == 0:
        raise ValueError("nothing to plot: no steering runs in the points")
    fig, axes = _subplots(2, width=4.4, height=3.6)
    layers = sorted(points["layer"].unique())
    norm = mpl.colors.Normalize(vmin=min(layers), vmax=max(layers))
    cmap = mpl.colormaps["viridis"]
    markers = {"rmu": "o", "adaptive-rmu": "s"}
    for ax, x, label in ((axes[0], "ratio", "c / ‖h_l‖ (coefficient over frozen forget norm)"),
                         (axes[1], "coefficient", "coefficient c")):
        for method, sub in points.groupby("method"):
            ax.scatter(sub[x], sub["forget_acc"], c=cmap(norm(sub["layer"].to_numpy())), marker=markers.get(method, "o"),
                       s=22, alpha=0.8, edgecolors="none", label=_LABELS.get(method, method).replace(" (fixed c)", ""))
        _plain_log_x(ax)
        ax.axhline(0.25, color="gray", linestyle=":", linewidth=1)
        ax.set_xlabel(label)
        ax.set_ylabel("forget accuracy (per topic)")
        ax.set_ylim(0, 1)
    if summary:
        axes[0].set_title(f"one curve: R² = {summary['r2_ratio']:.2f}, ρ = {summary['pooled_rho_ratio']:.2f}")
        axes[1].set_title(f"raw c: R² = {summary['r2_coefficient']:.2f}, ρ = {summary['pooled_rho_coefficient']:.2f}")
    axes[0].legend(fontsize=7)
    fig.colorbar(mpl.cm.ScalarMappable(norm=norm, cmap=cmap), ax=axes[1], label="unlearn layer l")
    fig.suptitle(title or "does forget accuracy depend on c / ‖h_l‖ alone?")
    return fig


def plot_coefficient_sweep(frame: pd.DataFrame, layer: int, *, title: str | None = None):
    """At block ``layer``, against c (fixed-c RMU runs): forget and general accuracy (Fig. 3), mean cos(u, h)
    on forget texts beside the null directions (Fig. 2e–h), and mean MaxLogit on forget questions (Fig. 2a–d)."""
    frame = _runs(frame)
    sub = frame[(frame["method"] == "rmu") & (frame["layer"] == layer)].sort_values("coeff")
    if sub.empty:
        raise ValueError(f"no fixed-c RMU runs at layer {layer} in the frame")
    topics = result_topics(frame)
    g = sub.groupby("coeff")
    fig, axes = _subplots(3, width=3.8)
    for t in topics:
        axes[0].plot(g[f"acc_{t}"].mean(), marker="o", label=f"{t} (forget)")
    axes[0].plot(g["general_acc"].mean(), marker="o", color="black", label="general")
    axes[0].axhline(0.25, color="gray", linestyle=":", linewidth=1)
    axes[0].set_ylim(0, 1)
    axes[0].set_ylabel("accuracy")
    for t in topics:
        line, = axes[1].plot(g[f"cos_u_{t}"].mean(), marker="o", label=f"{t}: cos(u, h)")
        axes[1].plot(g[f"cos_uniform_null_{t}"].mean(), linestyle="--", color=line.get_color(), alpha=0.6,
                     label=f"{t}: uniform null u′")
    axes[1].plot(g[f"cos_gaussian_null_{topics[0]}"].mean(), linestyle=":", color="gray", label="Gaussian null")
    axes[1].set_ylabel("mean token cos at block l")
    for t in topics:
        line, = axes[2].plot(g[f"maxlogit_{t}"].mean(), marker="o", label=t)
        axes[2].axhline(float(sub[f"base_maxlogit_{t}"].iloc[0]), color=line.get_color(), linestyle="--",
                        linewidth=1, label=f"{t} base")
    axes[2].set_ylabel("mean MaxLogit (forget questions)")
    for ax in axes:
        _plain_log_x(ax)
        ax.set_xlabel("steering coefficient c")
        ax.legend(fontsize=7)
    fig.suptitle(title or f"coefficient sweep at block {layer} (Fig. 2 / Fig. 3 analogue)")
    return fig


def plot_norm_trajectories(frame: pd.DataFrame, layers: Sequence[int], *, method: str = "rmu", seed: int | None = None,
                           title: str | None = None, targets: Targets = TARGETS):
    """Fig. 4 from the engine's logs (BOS and padding left out) of the runs at ``layers``: top, the forget norm
    ‖h^(l)(x_F)‖ of the updated model per logged step with c dashed; bottom, ‖h − c·u‖² / ‖c·u‖² (forget loss · d /
    c²: 1 = as far from c·u as the origin, 0 = at c·u) with the convergence bar ``targets.max_converged_loss``.
    Lines are the mean over seeds, bands their range (``seed``: that seed only). ``frame`` needs
    ``load_results(..., logs=True)``."""
    frame = _runs(frame)
    if "log" not in frame:
        raise ValueError("the frame has no training logs: load it with load_results(..., logs=True)")
    fig, grid = plt.subplots(2, len(layers), figsize=(3.8 * len(layers), 5.6), layout="constrained", squeeze=False,
                             sharex=True)
    for j, layer in enumerate(layers):
        sub = frame[(frame["method"] == method) & (frame["layer"] == layer)]
        if seed is not None:
            sub = sub[sub["seed"] == seed]
        if sub.empty:
            raise ValueError(f"no {method} runs at layer {layer} in the frame")
        logs = []
        for _, run in sub.iterrows():  # ‖h − c·u‖² / ‖c·u‖² as claims.forget_loss_measures defines it
            log = pd.DataFrame(run["log"])
            measures = forget_loss_measures(log, int(run["hidden_size"]))[["step", "topic", "loss_over_target"]]
            log = log.merge(measures.rename(columns={"loss_over_target": "over_target"}), on=["step", "topic"])
            logs.append(log.assign(seed=run["seed"]))
        logs = pd.concat(logs, ignore_index=True)
        top, bottom = grid[0][j], grid[1][j]
        for topic, part in logs.groupby("topic"):
            for ax, col in ((top, "forget_norm"), (bottom, "over_target")):
                g = part.groupby("step")[col]
                line, = ax.plot(g.mean().index, g.mean(), marker=".", label=topic)
                ax.fill_between(g.mean().index, g.min(), g.max(), color=line.get_color(), alpha=0.2, linewidth=0)
        top.axhline(float(logs["coefficient"].iloc[0]), color="black", linestyle="--", linewidth=1, label="c")
        bottom.axhline(targets.max_converged_loss, color="gray", linestyle=":", linewidth=1, label="converged below")
        bottom.set_yscale("log")
        top.set_title(f"{_LABELS.get(method, method)}, l = {layer} ({sub['seed'].nunique()} seed(s))")
        top.set_ylabel("forget norm ‖h^(l)‖")
        bottom.set_ylabel("‖h − c·u‖² / ‖c·u‖²")
        bottom.set_xlabel("step")
        top.legend(fontsize=7)
        bottom.legend(fontsize=7)
    fig.suptitle(title or "forget representations during unlearning with one fixed c (Fig. 4 analogue)")
    return fig


def plot_tradeoff(points: pd.DataFrame, matched: pd.DataFrame | None = None, *, target: float | None = None,
                  forget: str = "forget_acc", title: str | None = None):
    """Trade-off curves per unlearn layer: forget accuracy (``forget`` column) against general accuracy, RMU over c
    and Adaptive RMU over β; faint points are single runs, lines join each setting's mean over seeds. ``target``:
    the matched general accuracy (dotted line); ``matched``: :func:`~rmu_analysis.claims.matched_forget`'s table
    (``method, layer, forget_at_target, low, high``), drawn as each method's interpolated value with its 95%
    interval. ``points``: :func:`~rmu_analysis.experiments.tradeoff.tradeoff_points`."""
    if points is None or len(points) == 0:
        raise ValueError("nothing to plot: no trade-off points")
    layers = sorted(points["layer"].unique())
    if matched is not None:  # None (JSON's NaN) -> NaN
        matched = matched.assign(**{c: pd.to_numeric(matched[c], errors="coerce") for c in ("forget_at_target", "low", "high")})
    fig, axes = _subplots(len(layers), width=3.8, height=3.6)
    for ax, layer in zip(axes, layers):
        for k, (method, sub) in enumerate(points[points["layer"] == layer].groupby("method")):
            color = _COLORS.get(method)
            ax.scatter(sub["general_acc"], sub[forget], s=10, alpha=0.35, color=color)
            mean = sub.groupby("setting")[["general_acc", forget]].mean().sort_values("general_acc")
            ax.plot(mean["general_acc"], mean[forget], marker="o", color=color, label=_LABELS.get(method, method))
            if matched is not None and target is not None:
                row = matched[(matched["method"] == method) & (matched["layer"] == layer)]
                if len(row) and np.isfinite(row[["forget_at_target", "low", "high"]].iloc[0].to_numpy(float)).all():
                    r, dx = row.iloc[0], (k - 0.5) * 0.004  # side by side, not on top of each other
                    ax.errorbar([target + dx], [r["forget_at_target"]], yerr=[[r["forget_at_target"] - r["low"]],
                                [r["high"] - r["forget_at_target"]]], fmt="D", color=color, capsize=4, markersize=6,
                                markeredgecolor="black")
        if target is not None:
            ax.axvline(target, color="gray", linestyle=":", linewidth=1, label="matched general accuracy")
        base = float(points["base_general_acc"].iloc[0]) if "base_general_acc" in points else None
        if base is not None:
            ax.axvline(base, color="black", linewidth=1, label="base general")
        ax.axhline(0.25, color="gray", linestyle="--", linewidth=1, alpha=0.6, label="chance")
        ax.set_xlabel("general accuracy")
        ax.set_ylabel("forget accuracy" if forget == "forget_acc" else forget.replace("acc_", "") + " accuracy")
        ax.set_title(f"unlearn layer l = {int(layer)}")
        ax.legend(fontsize=7)
    fig.suptitle(title or "forget vs general accuracy: RMU over c, Adaptive RMU over β (diamonds: matched utility)")
    return fig
