"""The robustness lab end to end (``rmu-analysis reproduce --only robustness``): run the plan's attack runs with the
sweep runner (:func:`~.runner.run_sweep`: resumable, one JSON per run in the results directory), then write
``robustness.md`` (the method × attack table and the §3.3 verdict), ``robustness.json`` (the same numbers) and
the recovery curves ``robustness_gcg.png`` / ``robustness_relearn.png``."""
from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any, Callable

from .._io import atomic_write_json, atomic_write_text
from ..plots_robustness import plot_gcg_curves, plot_relearn_curves
from .figures import save_png
from .robustness import (
    RobustnessPlan, curve_frame, gcg_claim, load_attack_results, robustness_grid, robustness_markdown,
    robustness_table,
)
from .results import json_records
from .runner import run_sweep
from .targets import TARGETS, Targets
from .workbench import Workbench

__all__ = ["robustness_report", "ROBUSTNESS_FIGURES"]

#: The files :func:`robustness_report` writes into the output directory.
ROBUSTNESS_FIGURES = ("robustness.md", "robustness.json", "robustness_gcg.png", "robustness_relearn.png")


def robustness_report(out: str | Path, results: str | Path, plan: RobustnessPlan,
                      bench: Workbench | Callable[[], Workbench], *, workers: int = 1, threads: int = 1,
                      fresh: bool = False, progress: bool = True, targets: Targets = TARGETS) -> dict[str, Any]:
    """Run (or reuse) every attack run of ``plan`` into ``results`` and write :data:`ROBUSTNESS_FIGURES` to
    ``out``; return the summary (the §3.3 verdict, the table as records, runs trained and reused, seconds)."""
    t0 = time.perf_counter()
    out, results = Path(out), Path(results)
    specs = robustness_grid(plan)
    outcome = run_sweep(specs, results, bench, resume=not fresh, progress=progress, desc="robustness",
                        workers=workers, threads=threads)
    rows = load_attack_results(results, specs)
    if len(rows) < len(specs):
        warnings.warn(f"{len(specs) - len(rows)} of {len(specs)} attack runs have no usable result in {results} "
                      "(a run that did not finish training is left out of the table)", stacklevel=2)
    table = robustness_table(rows)
    claim = gcg_claim(table, targets)
    trainings = {(r["method"], r["seed"]): r["train_seconds"] for r in rows if r["spec"]["unlearn"] is not None}
    compute = float(sum(r["attack_seconds"] for r in rows) + sum(trainings.values()))
    text = robustness_markdown(table, claim, plan)
    text += (f"\nCost: {compute / 60:.1f} min of run time summed over the runs ({len(trainings)} trainings, each "
             "model trained once, and every attack; each run's wall clock in its worker process, on the machine and "
             f"under the load it ran with). This call: {outcome.ran} run(s) computed, {outcome.skipped} reused, "
             f"{(time.perf_counter() - t0) / 60:.1f} min.\n")
    out.mkdir(parents=True, exist_ok=True)
    save_png(plot_gcg_curves(curve_frame(rows, "gcg"), title="GCG on the forget questions"), out / "robustness_gcg.png",
             dpi=90)
    save_png(plot_relearn_curves(curve_frame(rows, "relearn")), out / "robustness_relearn.png", dpi=90)
    atomic_write_text(out / "robustness.md", text)
    summary = {"claim": claim, "table": json_records(table), "runs": len(specs), "runs_with_results": len(rows),
               "ran": outcome.ran, "reused": outcome.skipped, "compute_seconds": compute,
               "seconds": time.perf_counter() - t0, "figures": list(ROBUSTNESS_FIGURES)}
    atomic_write_json(out / "robustness.json", summary)
    return summary

