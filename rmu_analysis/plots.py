"""Figures of the paper's measurements (seaborn). Every function returns the matplotlib ``Figure`` and never
calls ``plt.show()``; pass ``ax=`` to draw into an existing axes.

- :func:`plot_confidence` — MaxLogit histograms, base vs unlearned (Fig. 2a–d)
- :func:`plot_cosines` — cos(h, u) beside the uniform and Gaussian null baselines (Fig. 2e–h)
- :func:`plot_norms` — ‖h^(l)‖ per block, with the steering coefficient c (Fig. 4)
- :func:`plot_noise_sensitivity` — Φ(g^(l:k)) against k (Fig. 1)

Numerical checks of the theory (:mod:`rmu_analysis.theory`):

- :func:`plot_proposition1` — Proposition 1: error of the Gaussian prediction against η, standardised logits
- :func:`plot_confidence_vs_coeff` — MaxLogit, max probability and entropy against c (C1)
- :func:`plot_optimal_coefficient` — exact and linearised Eq. 10 objective against c, with Eq. 19's c*
- :func:`plot_accuracy_vs_coeff` — forget and general accuracy against c (Fig. 3)
- :func:`plot_cosine_panels` — cos(h, u) with null baselines, one panel per model (Fig. 2e–h)
- :func:`plot_norm_trajectories` — forget norm and forget loss during unlearning (Fig. 4)
- :func:`plot_input_gradients` — one-hot input-gradient norms per model (the GCG argument, Eq. 20–22)
- :func:`plot_intervals` — accuracies (or paired differences) with their 95% intervals as error bars
- :func:`save_figure` — write a figure as a small PNG and close it (what the notebooks show)
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.ticker import MaxNLocator

from .cosines import DIRECTIONS

__all__ = [
    "plot_confidence", "plot_cosines", "plot_norms", "plot_noise_sensitivity", "plot_proposition1",
    "plot_confidence_vs_coeff", "plot_optimal_coefficient", "plot_accuracy_vs_coeff", "plot_cosine_panels",
    "plot_norm_trajectories", "plot_input_gradients", "plot_intervals", "save_figure",
]

_METRIC_LABELS = {"max_logit": "MaxLogit (token confidence)", "max_prob": "max softmax probability",
                  "entropy": "entropy (nats)"}
_DIRECTION_LABELS = {"u": "u", "uniform_null": "uniform null u′", "gaussian_null": "Gaussian null g"}


def _axes(ax: Any, figsize: tuple[float, float]):
    if ax is None:
        fig, ax = plt.subplots(figsize=figsize, layout="constrained")
    else:
        fig = ax.figure
    return fig, ax


def _as_mapping(obj: Any, default_label: str) -> dict[str, Any]:
    if isinstance(obj, Mapping):
        if not obj:
            raise ValueError("nothing to plot: the mapping of results is empty")
        return dict(obj)
    return {default_label: obj}


def _metric_values(result: Any, metric: str, include_after_eos: bool) -> np.ndarray:
    if hasattr(result, "values") and hasattr(result, "max_logit"):
        return result.values(metric, include_after_eos=include_after_eos)
    values = np.asarray(result, dtype=float).ravel()
    if values.size == 0:
        raise ValueError("nothing to plot: an array of confidence values is empty")
    return values


def plot_confidence(
    base: Any,
    other: Any,
    *,
    labels: tuple[str, str] = ("base", "unlearned"),
    metric: str = "max_logit",
    include_after_eos: bool = True,
    bins: int = 40,
    ax: Any = None,
):
    """Histograms of per-token confidence (default MaxLogit) of a base model and another model (Fig. 2a–d).

    ``base``/``other``: :class:`~rmu_analysis.confidence.Confidence` results or arrays of values; ``other`` may
    be a dict ``{label: result}`` to overlay several models (e.g. several c).
    """
    if metric not in _METRIC_LABELS:
        raise ValueError(f"metric must be one of {tuple(_METRIC_LABELS)}, got {metric!r}")
    series = {labels[0]: base, **_as_mapping(other, labels[1])}
    frame = pd.concat([pd.DataFrame({"value": _metric_values(r, metric, include_after_eos), "model": name})
                       for name, r in series.items()], ignore_index=True)
    fig, ax = _axes(ax, (6, 3.5))
    edges = np.histogram_bin_edges(frame["value"], bins=bins)
    sns.histplot(frame, x="value", hue="model", bins=edges, stat="density", common_norm=False, element="step",
                 ax=ax)
    ax.set_xlabel(_METRIC_LABELS[metric])
    ax.set_title(f"{_METRIC_LABELS[metric]}: {' vs '.join(series)}")
    return fig


def plot_cosines(result: Any, layer: int, *, level: str = "prompt", bins: int = 40, ax: Any = None):
    """Distribution of cos(h^(l), u) beside the null baselines u′ (uniform) and g (Gaussian) (Fig. 2e–h)."""
    frame = pd.concat([pd.DataFrame({"cos": result.cos(layer, d, level), "direction": _DIRECTION_LABELS[d]})
                       for d in DIRECTIONS], ignore_index=True)
    fig, ax = _axes(ax, (6, 3.5))
    sns.histplot(frame, x="cos", hue="direction", bins=np.linspace(-1, 1, bins + 1), stat="density",
                 common_norm=False, element="step", ax=ax)
    ax.set_xlim(-1.05, 1.05)
    ax.set_xlabel(f"cos(h, ·) at block {layer} ({level} level)")
    ax.set_title(f"alignment with u vs null baselines, block {layer}")
    return fig


def plot_norms(results: Any, *, level: str = "prompt", coeff: float | None = None, ax: Any = None):
    """Mean ‖h^(l)‖ per block (± one std) of one or several :class:`~rmu_analysis.alignment.Alignment` results,
    with a horizontal line at the steering coefficient ``coeff`` (Fig. 4: RMU converges where the norm starts
    below c)."""
    series = _as_mapping(results, "model")
    frame = pd.concat([r.summary(level).assign(model=name) for name, r in series.items()], ignore_index=True)
    fig, ax = _axes(ax, (6, 3.5))
    palette = dict(zip(series, sns.color_palette(n_colors=len(series))))
    sns.lineplot(frame, x="layer", y="norm_mean", hue="model", palette=palette, marker="o", ax=ax)
    for name, part in frame.groupby("model", sort=False):
        ax.fill_between(part["layer"], part["norm_mean"] - part["norm_std"], part["norm_mean"] + part["norm_std"],
                        color=palette[name], alpha=0.2)
    if coeff is not None:
        ax.axhline(coeff, color="black", linestyle="--", linewidth=1, label=f"c = {coeff:g}")
        ax.legend()
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("block l")
    ax.set_ylabel(f"‖h^(l)‖ ({level} level)")
    ax.set_title("representation norm per block")
    return fig


def plot_noise_sensitivity(results: Any, *, logy: bool = True, ax: Any = None):
    """Φ(g^(l:k)) against k (Eq. 9, Fig. 1) for one or several
    :class:`~rmu_analysis.theory.NoiseSensitivity` results (mean ± std over noise draws)."""
    series = _as_mapping(results, "model")
    frame = pd.concat([r.to_frame().assign(model=name) for name, r in series.items()], ignore_index=True)
    fig, ax = _axes(ax, (6, 3.5))
    palette = dict(zip(series, sns.color_palette(n_colors=len(series))))
    sns.lineplot(frame, x="k", y="phi_mean", hue="model", palette=palette, marker="o", ax=ax)
    for name, part in frame.groupby("model", sort=False):
        lo = np.maximum(part["phi_mean"] - part["phi_std"], part["phi_mean"] * 1e-3 if logy else -np.inf)
        ax.fill_between(part["k"], lo, part["phi_mean"] + part["phi_std"], color=palette[name], alpha=0.2)
    if logy:
        ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("block k")
    ax.set_ylabel("Φ(g^(l:k))")
    layers = sorted({r.layer for r in series.values()})
    ax.set_title(f"noise sensitivity, noise at block {', '.join(map(str, layers))}")
    return fig


# ------------------------------------------------------------------------------------------------------------
# numerical checks of the theory
# ------------------------------------------------------------------------------------------------------------
def _row_axes(axes: Any, n: int, figsize: tuple[float, float]):
    if axes is None:
        fig, axes = plt.subplots(1, n, figsize=figsize, layout="constrained", squeeze=False)
        axes = list(axes[0])
    else:
        axes = list(np.atleast_1d(axes))
        if len(axes) != n:
            raise ValueError(f"this figure needs {n} axes, got {len(axes)}")
        fig = axes[0].figure
    return fig, axes


def plot_proposition1(result: Any, *, axes: Any = None):
    """Proposition 1 (:func:`~rmu_analysis.theory.proposition1`): left, the relative errors of the predicted mean
    and covariance against η on log-log axes with the fitted slopes; right, the first random projection of the
    logits standardised by its predicted mean and std, at the smallest and largest η, against N(0, 1)."""
    fig, (ax, ax2) = _row_axes(axes, 2, (10, 3.8))
    eta = result.etas
    ax.loglog(eta, result.mean_rel_error, "o-", label=f"mean (slope {result.slope_mean:.2f})")
    ax.loglog(eta, result.cov_rel_error_paired, "s-", label=f"covariance, Taylor error (slope {result.slope_cov:.2f})")
    ax.loglog(eta, result.cov_rel_error, "^--", alpha=0.7, label="covariance vs η·JJᵀ (with sampling error)")
    ax.loglog(eta, result.cov_sampling_floor, ":", color="grey", label=f"sampling floor ({result.samples} draws)")
    ax.set_xlabel("noise variance η")
    ax.set_ylabel("relative error")
    ax.set_title(f"Proposition 1 at block {result.layer}, c = {result.coeff:.3g}")
    ax.legend(fontsize=7)
    grid = np.linspace(-4, 4, 200)
    bins = np.linspace(-4, 4, 33)
    for i, lab in ((0, "smallest"), (len(eta) - 1, "largest")):
        ax2.hist(result.standardized[i], bins=bins, density=True, histtype="step",
                 label=f"{lab} η = {eta[i]:.2g}")
    ax2.plot(grid, np.exp(-grid ** 2 / 2) / np.sqrt(2 * np.pi), color="black", linewidth=1, label="N(0, 1)")
    ax2.set_xlabel("projected logit, standardised by the prediction")
    ax2.set_ylabel("density")
    ax2.set_title("normality of a random logit projection")
    ax2.legend(fontsize=7)
    return fig


def plot_confidence_vs_coeff(sweep: Any, *, axes: Any = None):
    """MaxLogit, max probability and entropy (mean ± std over tokens) against c for a
    :class:`~rmu_analysis.theory.ConfidenceSweep`, with the unsteered model as a dashed line (C1)."""
    fig, axes = _row_axes(axes, 3, (12, 3.4))
    frame = sweep.to_frame()
    base, steered = frame.iloc[0], frame.iloc[1:]
    for ax, m in zip(axes, ("max_logit", "max_prob", "entropy")):
        ax.errorbar(steered["coeff"], steered[f"{m}_mean"], yerr=steered[f"{m}_std"], marker="o", capsize=3,
                    label=f"steered at block {sweep.layer}")
        ax.axhline(base[f"{m}_mean"], color="black", linestyle="--", linewidth=1, label="base")
        ax.set_xlabel("steering coefficient c")
        ax.set_ylabel(_METRIC_LABELS[m])
    axes[0].legend(fontsize=8)
    axes[1].set_title("token confidence against c")
    return fig


def plot_optimal_coefficient(results: Any, *, k: int | None = None, ax: Any = None):
    """Exact (solid) and linearised (dashed) Eq. 10 objective Φ_k(c) of one or several
    :class:`~rmu_analysis.theory.OptimalCoefficient` results, with Eq. 19's c* (dotted line) and the grid argmin
    of the exact objective (dot). ``k``: the block k to show (default: each result's last)."""
    series = _as_mapping(results, "model")
    fig, ax = _axes(ax, (6.5, 3.8))
    for color, (name, r) in zip(sns.color_palette(n_colors=len(series)), series.items()):
        kk = r.ks[-1] if k is None else k
        if kk not in r.ks:
            raise ValueError(f"k = {kk} was not computed for {name!r}: its ks are {list(r.ks)}")
        j = r.ks.index(kk)
        ax.plot(r.coeffs, r.phi[j], color=color, label=f"{name}: exact (k={kk})")
        ax.plot(r.coeffs, np.maximum(r.phi_linear[j], 1e-12), color=color, linestyle="--", linewidth=1)
        ax.axvline(r.c_star[j], color=color, linestyle=":", linewidth=1.2)
        ax.plot([r.c_grid[j]], [r.phi[j].min()], "o", color=color)
    ax.set_yscale("log")
    ax.set_xlabel("steering coefficient c")
    ax.set_ylabel("Φ(g^(l:k)) with ξ = c·u + ε − ĥ")
    ax.set_title("Eq. 10 (solid exact, dashed linearised); dotted: Eq. 19 c*")
    ax.legend(fontsize=7)
    return fig


def plot_accuracy_vs_coeff(frame: Any, *, x: str = "coeff", ys: Any = None, chance: float | None = 0.25,
                           ax: Any = None):
    """Accuracy columns ``ys`` (default: every column but ``x``) of ``frame`` against ``x`` (Fig. 3: forget
    and general accuracy against c), with a dashed chance line."""
    frame = pd.DataFrame(frame)
    if x not in frame.columns:
        raise ValueError(f"frame has no column {x!r}: its columns are {list(frame.columns)}")
    ys = [c for c in frame.columns if c != x] if ys is None else list(ys)
    fig, ax = _axes(ax, (6, 3.5))
    for col in ys:
        ax.plot(frame[x], frame[col], marker="o", label=col)
    if chance is not None:
        ax.axhline(chance, color="grey", linestyle="--", linewidth=1, label="chance")
    ax.set_xlabel("steering coefficient c" if x == "coeff" else x)
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8)
    ax.set_title("accuracy against c")
    return fig


def plot_cosine_panels(results: Any, layer: int, *, level: str = "prompt", bins: int = 40, axes: Any = None):
    """One :func:`plot_cosines` panel per :class:`~rmu_analysis.alignment.Alignment` result (Fig. 2e–h: models
    unlearned with several c), titled with the result's label."""
    series = _as_mapping(results, "model")
    fig, axes = _row_axes(axes, len(series), (3.6 * len(series), 3.2))
    for ax, (name, r) in zip(axes, series.items()):
        plot_cosines(r, layer, level=level, bins=bins, ax=ax)
        ax.set_title(name)
        if ax is not axes[-1] and ax.get_legend() is not None:
            ax.get_legend().remove()
    return fig


def _log_frame(run: Any) -> pd.DataFrame:
    return run.to_frame() if hasattr(run, "to_frame") else pd.DataFrame(run)


def plot_norm_trajectories(runs: Any, *, topic: str | None = None, axes: Any = None):
    """Fig. 4: the forget-representation norm at block l during unlearning (left, with each run's coefficient
    as a dashed line of its colour) and the forget loss (right, log scale), for one or several runs
    (``UnlearnResult`` s or their logs; ``topic``: only that topic's steps)."""
    series = _as_mapping(runs, "run")
    fig, (ax, ax2) = _row_axes(axes, 2, (11, 3.6))
    for color, (name, run) in zip(sns.color_palette(n_colors=len(series)), series.items()):
        frame = _log_frame(run)
        if topic is not None:
            frame = frame[frame["topic"] == topic]
        ax.plot(frame["step"], frame["forget_norm"], color=color, label=name)
        ax.axhline(float(frame["coefficient"].iloc[0]), color=color, linestyle="--", linewidth=1)
        ax2.plot(frame["step"], frame["forget_loss"], color=color, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("forget norm ‖h^(l)(x_F)‖ (dashed: c)")
    ax.set_title("forget-representation norm during unlearning")
    ax.legend(fontsize=7)
    ax2.set_yscale("log")
    ax2.set_xlabel("step")
    ax2.set_ylabel("forget loss")
    ax2.set_title("forget loss")
    return fig


def plot_input_gradients(results: Any, *, centered: bool = False, ax: Any = None):
    """Per-question norms of the gradient of log p(correct letter) with respect to the one-hot input tokens
    (:class:`~rmu_analysis.theory.InputGradients`), one box per model, log scale (the GCG argument)."""
    series = _as_mapping(results, "model")
    col = "grad_norm_centered" if centered else "grad_norm"
    frame = pd.concat([pd.DataFrame({"norm": getattr(r, col), "model": name}) for name, r in series.items()],
                      ignore_index=True)
    fig, ax = _axes(ax, (1.6 + 1.3 * len(series), 3.6))
    sns.boxplot(frame, x="model", y="norm", hue="model", log_scale=True, showfliers=False, ax=ax)
    sns.stripplot(frame, x="model", y="norm", color="black", size=2, alpha=0.5, ax=ax)
    ax.set_xlabel("")
    ax.set_ylabel("‖∂ log p(answer) / ∂ one-hot‖" + (" (centred)" if centered else ""))
    ax.set_title("input-gradient norm on forget questions")
    return fig


def plot_intervals(intervals: Any, *, reference: float | None = None, ax: Any = None):
    """One row per label: the estimate with its interval as an error bar (:mod:`rmu_analysis.stats` results, e.g.
    ``{"base": res.interval(), "RMU": rmu.interval()}`` or ``rmu.compare(base)``). ``reference``: a dashed line
    (default: chance, 0.25, for accuracies; 0 for paired differences)."""
    series = _as_mapping(intervals, "accuracy")
    labels = list(series)
    est = np.array([float(series[k].estimate) for k in labels])
    low = np.array([float(series[k].low) for k in labels])
    high = np.array([float(series[k].high) for k in labels])
    diffs = all(hasattr(series[k], "diff") for k in labels)
    if reference is None:
        reference = 0.0 if diffs else 0.25
    fig, ax = _axes(ax, (5, 0.5 + 0.45 * len(labels)))
    y = np.arange(len(labels))[::-1]
    ax.errorbar(est, y, xerr=[est - low, high - est], fmt="o", capsize=3)
    ax.axvline(reference, color="grey", linestyle="--", linewidth=1)
    ax.set_yticks(y, labels)
    ax.set_ylim(-0.6, len(labels) - 0.4)
    level = getattr(series[labels[0]], "level", 0.95)
    ax.set_xlabel(f"{'difference in accuracy' if diffs else 'accuracy'} ({100 * level:g}% interval)")
    return fig


def save_figure(fig: Any, path: Any, *, dpi: int = 72):
    """Write ``fig`` to ``path`` as a PNG (parent folders created), close it, and return the path
    (``IPython.display.Image(save_figure(fig, "figures/x.png"))`` shows it, whatever the matplotlib backend)."""

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png")
    plt.close(fig)
    return path
