"""Which figures a reproduction draws from its results, and writing them (``rmu_analysis.plots_experiments`` draws
them): the coefficient sweep at the Table 1 layer (Fig. 2 / Fig. 3), the forget norm during training with the
layer sweep's fixed c at the coefficient-sweep layers, every seed (Fig. 4), the layer sweep (Fig. 5) and the c / ‖h_l‖ collapse."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import matplotlib.pyplot as plt
import pandas as pd

from .. import plots_experiments as P
from .analysis import collapse_points
from .plans import ExperimentPlan
from .targets import TARGETS, Targets

__all__ = ["save_png", "sweep_figures"]


def save_png(fig, path: Path, dpi: int = 110) -> str:
    """Write ``fig`` as a PNG atomically (a temporary file renamed into place: a reader never sees half a PNG),
    close it; return the file name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    tmp.replace(path)
    return path.name


def sweep_figures(frames: Mapping[str, pd.DataFrame], plan: ExperimentPlan, summary: Mapping[str, Any],
                  out: Path, targets: Targets = TARGETS) -> list[str]:
    """Draw and write the figures the results in ``frames`` support; return their file names."""
    names = []
    coeff = frames["coefficient"]
    if len(coeff):
        for layer in sorted(coeff["layer"].unique()):
            if plan.table_layer in coeff["layer"].values and layer != plan.table_layer:
                continue
            names.append(save_png(P.plot_coefficient_sweep(coeff, int(layer)),
                                  out / f"fig3_coefficient_sweep_l{int(layer)}.png"))
    layer = frames["layer"]
    if len(layer):
        names.append(save_png(P.plot_layer_sweep(layer), out / "fig5_layer_sweep.png"))
        fig4 = [l for l in plan.coeff_layers if l in set(layer["layer"])]
        if "log" in layer and len(fig4) >= 2:  # one fixed c at an early ... late layer, every seed
            names.append(save_png(P.plot_norm_trajectories(layer, fig4, targets=targets), out / "fig4_norm_trajectories.png"))
    if "collapse" in summary:
        steering = pd.concat([f for f in frames.values() if len(f)], ignore_index=True).drop_duplicates("key")
        names.append(save_png(P.plot_collapse(collapse_points(steering), summary["collapse"]),
                              out / "collapse_ratio.png"))
    return names
