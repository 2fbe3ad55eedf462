"""``rmu-analysis reproduce``: the paper's checks on the shipped organism, end to end, in one command.

In order: the theory checks (noise sensitivity, Fig. 1; Proposition 1; Eq. 19; the input-gradient argument),
the coefficient sweep (Fig. 2 / Fig. 3 and the c / ‖h_l‖ collapse), the layer sweep (Fig. 5, × 3 seeds) and
Table 1 (× 3 seeds); when asked for (:data:`OPTIONAL`), before them the robustness lab (knowledge-recovery attacks
on every method × 3 seeds, ``experiments.robustness``) and the trade-off curves (the layer-wise claims at matched
utility, ``experiments.tradeoff``); ``--only robustness`` / ``--only tradeoff`` runs one alone and writes only its
files. Every run is one JSON file in ``<out>/results/`` (resumable: an interrupted reproduce
continues where it stopped; ``fresh=True`` recomputes). Writes the figures (PNG), ``table1.md``,
``summary.md`` (which claims held, with the numbers) and ``summary.json`` to ``<out>`` (default ``figures/``,
``figures/quick/`` for the reduced ``--quick`` plan). :func:`reproduce` only orchestrates: the numbers come from
``experiments.analysis``, the figures from ``experiments.figures``, the text from ``experiments.report``.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import resource
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch

from ._io import atomic_write_json, atomic_write_text
from .experiments.analysis import question_clusters, summarize, table1_choice, table1_frame
from .experiments.cli import add_model_arguments, plan_from_args, resources, robustness_plan
from .experiments.figures import sweep_figures
from .experiments.plans import ExperimentPlan, plan_grids, plan_norms
from .experiments.report import summary_markdown, table1_interval_markdown, table1_markdown, table1_text
from .experiments.results import load_results
from .experiments.robustness_report import robustness_report
from .experiments.runner import run_sweep
from .experiments.targets import TARGETS, Targets
from .experiments.theory_checks import theory_checks
from .experiments.tradeoff import confidence_control_grid, tradeoff_plan, tradeoff_report
from .experiments.workbench import LazyWorkbench, Workbench
from .recipes import organism_plan

__all__ = ["reproduce", "add_reproduce_parser", "EXPERIMENTS", "OPTIONAL"]

#: The parts of a reproduction, in the order they run.
EXPERIMENTS = ("theory", "coefficient", "layer", "table1")
#: Parts run only when named (``--only robustness``, or with the others: ``--only theory coefficient layer table1
#: robustness tradeoff``): the robustness lab adds about 10 minutes on 2 cores, the trade-off curves about 5 (51
#: runs beyond the coefficient and layer sweeps'), so a plain reproduce leaves them out.
OPTIONAL = ("robustness", "tradeoff")
_SWEEPS = (("coefficient", "coefficient sweep"), ("layer", "layer sweep"),
           ("table1_select", "Table 1, selection on dev"), ("table1", "Table 1"))


def reproduce(out_dir: str | Path | None = None, *, quick: bool = False, plan: ExperimentPlan | None = None,
              bench: Workbench | Callable[[], Workbench] | None = None, results_dir: str | Path | None = None,
              fresh: bool = False, progress: bool = True, threads: int | None = None, workers: int = 1,
              experiments: tuple[str, ...] = EXPERIMENTS, targets: Targets = TARGETS) -> dict[str, Any]:
    """Run the theory checks and the three sweeps on the organism (or ``bench``'s model with ``plan``), write
    figures, ``table1.md``, ``summary.md`` and ``summary.json`` to ``out_dir``; return the summary dict.

    ``out_dir`` default: ``figures`` (``figures/quick`` with ``quick``). ``results_dir`` default:
    ``<out_dir>/results``. Finished runs found there are reused unless ``fresh``. ``threads``: torch CPU threads
    per process (None: leave as set); ``workers``: processes for the sweeps (``bench`` must then be a picklable
    factory; the CLI runs the organism as two one-thread workers on 2 cores).
    """
    t_start, cpu_start = time.perf_counter(), _cpu_seconds()
    out = Path(out_dir) if out_dir is not None else default_out(quick)
    results = Path(results_dir) if results_dir is not None else out / "results"
    plan = plan or organism_plan(quick=quick)
    if bench is None:
        bench = functools.partial(Workbench.load, "organism")
    lazy = LazyWorkbench(bench if callable(bench) and not isinstance(bench, Workbench) else (lambda: bench))
    if threads is not None:
        torch.set_num_threads(threads)
    seconds: dict[str, float] = {}
    trained: dict[str, int] = {}  # runs trained by this call, per experiment
    reused: dict[str, int] = {}  # runs whose result file was already there
    done_now: set[str] = set()  # keys trained or found finished by this call

    robust: dict[str, Any] = {}
    if "robustness" in experiments:  # the attack runs (robustness.md, robustness_*.png); alone: nothing else written
        t = time.perf_counter()
        robust = robustness_report(out, results, robustness_plan(plan), lazy if workers == 1 else bench,
                                   workers=workers, threads=threads or 1, fresh=fresh, progress=progress,
                                   targets=targets)
        seconds["robustness"] = time.perf_counter() - t
    tradeoff: dict[str, Any] = {}
    if "tradeoff" in experiments:  # the matched-utility curves (tradeoff.md / .json / .png)
        t = time.perf_counter()
        tplan = tradeoff_plan(plan)
        tnorms = plan_norms(dataclasses.replace(plan, coeff_layers=tplan.layers), lazy, results)
        tradeoff = tradeoff_report(out, results, tplan, tnorms, lazy if workers == 1 else bench,
                                   control=confidence_control_grid(plan, tplan) if plan.table_layer in tplan.layers
                                   else None, control_layer=plan.table_layer, workers=workers,
                                   threads=threads or 1, fresh=fresh, progress=progress, targets=targets)
        seconds["tradeoff"] = time.perf_counter() - t
    if set(experiments) <= set(OPTIONAL):  # only optional parts: nothing else is written
        return {"robustness": robust, "tradeoff": tradeoff, "seconds": seconds}

    theory: dict[str, Any] = {}
    if "theory" in experiments:
        t = time.perf_counter()
        theory = theory_checks(lazy(), out, plan, quick=quick, targets=targets)
        seconds["theory"] = time.perf_counter() - t
    norms = plan_norms(plan, lazy, results) if plan.coeff_layers and "coefficient" in experiments else None
    grids = plan_grids(plan if norms is not None else dataclasses.replace(plan, coeff_layers=()), norms)
    frames: dict[str, pd.DataFrame] = {}
    for name, desc in _SWEEPS:
        if name == "table1" and plan.selection_seeds and len(frames["table1_select"]):
            # the reported runs: each method's point chosen on the dev questions and selection seeds
            grids["table1"] = plan_grids(dataclasses.replace(plan, coeff_layers=()),
                                         selected=table1_choice(plan, frames["table1_select"], targets))["table1"]
        part = "table1" if name == "table1_select" else name
        if part not in experiments or not grids[name]:
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
        frames[name] = load_results(results, grids[name], logs=name in ("coefficient", "layer"))

    clusters = {}
    if any(any(c.startswith("correct_") for c in f.columns) for f in frames.values() if len(f)):
        data = lazy().data  # the fact of every question: intervals resample facts
        clusters = {"table1": question_clusters(data, plan.eval),
                    "layer": question_clusters(data, dataclasses.replace(plan.eval, per_fact=plan.sweep_per_fact))}
    summary = summarize(frames, plan, theory, targets, clusters)
    figures = sweep_figures(frames, plan, summary, out, targets)
    if len(frames["table1"]):
        atomic_write_text(out / "table1.md", table1_text(
            frames["table1"], plan, targets, frames.get("table1_select"),
            pd.DataFrame(summary["table1_intervals"]) if "table1_intervals" in summary else None))
        figures.append("table1.md")
    seconds["total"] = time.perf_counter() - t_start
    summary["seconds"] = seconds
    summary["runs_trained"], summary["runs_reused"] = trained, reused
    summary["cpu_seconds"] = _cpu_seconds() - cpu_start  # this process and its finished worker processes
    summary["figures"] = figures + (robust.get("figures") or []) + (tradeoff.get("figures") or [])
    if robust:
        summary["robustness"] = robust["claim"]  # the §3.3 verdict; the table is in robustness.md / .json
    if tradeoff:
        summary["tradeoff"] = {k: tradeoff[k] for k in ("fraction", "target", "adaptive_beats_rmu", "depth_costs")}
        if tradeoff.get("confidence_control"):
            summary["tradeoff"]["confidence_control_held"] = tradeoff["confidence_control"]["held"]
    summary["plan"] = json.loads(json.dumps(dataclasses.asdict(plan), default=str))
    md = summary_markdown(summary, plan, seconds, quick, targets=targets)
    if len(frames["table1"]):
        md += "\n## Table 1\n\n" + (table1_interval_markdown(pd.DataFrame(summary["table1_intervals"]))
                                      if "table1_intervals" in summary
                                      else table1_markdown(table1_frame(frames["table1"], targets)))
    atomic_write_text(out / "summary.md", md)
    atomic_write_json(out / "summary.json", _jsonable(summary))
    return summary


def default_out(quick: bool) -> Path:
    """``figures/`` (``figures/quick/`` for the quick plan)."""
    return Path("figures") / ("quick" if quick else "")


def _cpu_seconds() -> float:
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
    p = subparsers.add_parser(
        "reproduce", help="run the theory checks, coefficient sweep, layer sweep and Table 1; write figures/",
        description="Reproduce the paper's claims on the shipped organism (≤ 20 min on 2 CPU cores; --quick ≈ 2 "
                    "min): figures (PNG), table1.md, summary.md (which claims held) and one JSON per run.",
    )
    p.add_argument("--quick", action="store_true", help="the reduced plan (≈ 2 minutes), written to figures/quick")
    p.add_argument("--out", type=Path, default=None, help="output directory (default figures/, or figures/quick)")
    p.add_argument("--results", type=Path, default=None, help="results directory (default <out>/results)")
    p.add_argument("--fresh", action="store_true", help="recompute runs whose results already exist")
    p.add_argument("--only", nargs="+", choices=EXPERIMENTS + OPTIONAL, default=None,
                   help="run only these parts (default: all but the optional robustness lab and trade-off curves)")
    add_model_arguments(p)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=reproduce_command)
    return p


def reproduce_command(args) -> int:
    plan, factory = plan_from_args(args)
    workers, threads = resources(args)
    summary = reproduce(args.out, quick=args.quick, plan=plan, bench=factory, results_dir=args.results,
                        fresh=args.fresh, progress=not args.no_progress, threads=threads, workers=workers,
                        experiments=tuple(args.only) if args.only else EXPERIMENTS)
    out = Path(args.out) if args.out is not None else default_out(args.quick)
    alone = args.only is not None and set(args.only) <= set(OPTIONAL)  # then only their files were written
    for name in (sorted(args.only) if alone else ["summary"]):
        print((out / f"{name}.md").read_text())
    total = sum(summary["seconds"].values()) if alone else summary["seconds"]["total"]
    print(f"figures and tables in {out}/ ({total / 60:.1f} min)")
    return 0


if __name__ == "__main__":  # pragma: no cover
    parser = argparse.ArgumentParser(prog="python -m rmu_analysis.reproduce")
    sub = parser.add_subparsers(dest="command", required=True)
    add_reproduce_parser(sub)
    sys.exit(reproduce_command(parser.parse_args(["reproduce", *sys.argv[1:]])))
