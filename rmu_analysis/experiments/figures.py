"""Which figures a reproduction draws from its results, and writing them (``rmu_analysis.plots_experiments`` draws
them): the coefficient sweep at the Table 1 layer (Fig. 2 / Fig. 3), the forget norm during training at the
shallowest and deepest swept layer (Fig. 4), the layer sweep (Fig. 5) and the c / ‖h_l‖ collapse."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from .. import plots_experiments as P
from .analysis import collapse_points
from .plans import ExperimentPlan

__all__ = ["save_png", "sweep_figures"]


def save_png(fig, path: Path) -> str:
    """Write ``fig`` as a PNG atomically (a temporary file renamed into place), close it; return the file name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path.name


def _norm_trajectory_runs(coeff: pd.DataFrame, plan: ExperimentPlan) -> tuple[pd.DataFrame, list[int]] | None:
    """Fig. 4's runs: at the shallowest and the deepest layer of the fixed-c RMU runs, the one whose c is nearest
    the layer sweep's fixed c (None with fewer than two layers)."""
    rmu = coeff[coeff["method"] == "rmu"]
    layers = sorted(rmu["layer"].unique())
    if len(layers) < 2:
        return None
    picks = []
    for l in (layers[0], layers[-1]):
        sub = rmu[rmu["layer"] == l]
        picks.append(sub.loc[(np.log(sub["coeff"]) - np.log(plan.c)).abs().idxmin()])
    return pd.DataFrame(picks), [int(layers[0]), int(layers[-1])]


def sweep_figures(frames: Mapping[str, pd.DataFrame], plan: ExperimentPlan, summary: Mapping[str, Any],
                  out: Path) -> list[str]:
    """Draw and write the figures the results in ``frames`` support; return their file names."""
    names = []
    coeff = frames["coefficient"]
    if len(coeff):
        for layer in sorted(coeff["layer"].unique()):
            if plan.table_layer in coeff["layer"].values and layer != plan.table_layer:
                continue
            names.append(save_png(P.plot_coefficient_sweep(coeff, int(layer)),
                                  out / f"fig3_coefficient_sweep_l{int(layer)}.png"))
        picked = _norm_trajectory_runs(coeff, plan)
        if picked is not None:
            names.append(save_png(P.plot_norm_trajectories(*picked), out / "fig4_norm_trajectories.png"))
    if len(frames["layer"]):
        names.append(save_png(P.plot_layer_sweep(frames["layer"]), out / "fig5_layer_sweep.png"))
    if "collapse" in summary:
        steering = pd.concat([f for f in frames.values() if len(f)], ignore_index=True).drop_duplicates("key")
        names.append(save_png(P.plot_collapse(collapse_points(steering), summary["collapse"]),
                              out / "collapse_ratio.png"))
    return names
