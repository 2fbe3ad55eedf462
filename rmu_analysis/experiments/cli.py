"""``rmu-analysis sweep`` and the flags ``sweep`` and ``reproduce`` share: which model and data, and which plan
(:mod:`rmu_analysis.recipes`) they describe."""
from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..models import load_model
from ..recipes import ZEPHYR, model_plan, model_robustness_plan, organism_plan, organism_robustness_plan
from .analysis import table1_choice
from .plans import ExperimentPlan, plan_grids, plan_norms
from .results import finished_runs, load_results
from .robustness import (
    RobustnessPlan, format_claim, gcg_claim, load_attack_results, robustness_grid, robustness_table,
)
from .runner import is_finished, run_sweep, shard_specs
from .specs import check_dtype_name
from .tradeoff import tradeoff_analysis, tradeoff_grid, tradeoff_markdown, tradeoff_plan
from .workbench import ExperimentData, LazyWorkbench, Workbench, data_from_files

__all__ = ["add_sweep_parser", "add_model_arguments", "plan_from_args", "resources", "model_workbench"]


def add_sweep_parser(subparsers) -> Any:
    """``rmu-analysis sweep``: run (a shard of) one experiment's grid into a results directory, or merge one."""
    p = subparsers.add_parser(
        "sweep", help="run a grid of unlearning runs (layer sweep, coefficient sweep, Table 1), resumable, shardable",
        description="Run (a shard of) an experiment's grid; one JSON file per finished run in --results. Runs "
                    "already there are skipped, so an interrupted sweep resumes; shards i/n (0-based) of the same "
                    "grid can run as separate jobs into one directory, e.g. a SLURM array: "
                    "#SBATCH --array=0-7  then  rmu-analysis sweep --experiment layer --shard "
                    "$SLURM_ARRAY_TASK_ID/8 --results runs/ ...; afterwards `rmu-analysis sweep --merge --results "
                    "runs/` prints the merged summary.",
    )
    p.add_argument("--experiment", choices=("layer", "coefficient", "table1", "all", "robustness", "tradeoff"),
                   default="all",
                   help="robustness: every method × seed × knowledge-recovery attack (rmu_analysis.experiments."
                        "robustness); tradeoff: RMU over c and Adaptive RMU over β per layer × seeds, the layer-wise "
                        "claims at matched general accuracy (rmu_analysis.experiments.tradeoff); neither is part of "
                        "'all'")
    p.add_argument("--results", type=Path, required=True, help="results directory (one <key>.json per run)")
    p.add_argument("--shard", default=None, help="i/n: run only shard i of n (0-based), e.g. 3/8")
    p.add_argument("--quick", action="store_true", help="the reduced organism plan (as `reproduce --quick`)")
    p.add_argument("--merge", action="store_true", help="run nothing: read --results and print the summary")
    p.add_argument("--list", action="store_true", help="run nothing: print this shard's runs and whether done")
    add_model_arguments(p)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=sweep_command)
    return p


def add_model_arguments(p) -> None:
    """The flags that choose the model, its data and the plan's knobs (shared by ``sweep`` and ``reproduce``)."""
    p.add_argument("--model", default="organism", help='"organism" or a local HF model directory (GPU)')
    p.add_argument("--forget-files", nargs="+", metavar="TOPIC=FILE", help="forget corpora (real model)")
    p.add_argument("--retain-file", type=Path, help="retain corpus (real model)")
    p.add_argument("--mcq", nargs="+", metavar="SET=FILE",
                   help="question files: one per forget topic and general=FILE (e.g. MMLU)")
    p.add_argument("--forget-format", choices=("auto", "jsonl", "lines"), default=None,
                   help='forget files (real model): "jsonl" ("text" field), "lines" (one raw text per line) or '
                        '"auto" (from the file; the default)')
    p.add_argument("--coeff", type=float, default=None,
                   help=f"fixed c of the layer sweep (real model; default {ZEPHYR.steering_coeff:g})")
    p.add_argument("--layer", type=int, default=None,
                   help=f"Table 1 / coefficient-sweep layer (real model; default {ZEPHYR.layer})")
    p.add_argument("--steps", type=int, default=None, help=f"steps per run (real model; default {ZEPHYR.steps})")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default 0 1 2)")
    p.add_argument("--dtype", default="auto", help="float32 | bfloat16 | float16 | auto (bf16 on CUDA, else float32); "
                   "part of every run's key: runs in another dtype are not reused")
    p.add_argument("--workers", type=int, default=None,
                   help="processes running runs in parallel (default: 2 for the organism on CPU, 1 for --model)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads per process (default: 1 with several workers, else 2)")


def _pairs(items: Sequence[str] | None, flag: str) -> dict[str, str]:
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"{flag} takes NAME=FILE, got {item!r}")
        k, v = item.split("=", 1)
        out[k] = v
    return out


def plan_from_args(args) -> tuple[ExperimentPlan, Callable[[], Workbench]]:
    """The plan and a workbench factory that the flags describe (shared by ``sweep`` and ``reproduce``)."""
    if args.model == "organism":
        given = [flag for flag, value in (("--forget-files", args.forget_files), ("--retain-file", args.retain_file),
                                          ("--mcq", args.mcq), ("--forget-format", args.forget_format),
                                          ("--coeff", args.coeff), ("--layer", args.layer),
                                          ("--steps", args.steps),
                                          ("--dtype", None if args.dtype in ("auto", "float32") else args.dtype))
                 if value is not None]
        if given:
            raise ValueError(f"{', '.join(given)}: only for --model PATH; the organism runs its own data and the "
                             "fixed plan of rmu_analysis.recipes.organism_plan()")
        plan = organism_plan(quick=getattr(args, "quick", False))
        if args.seeds:
            plan = dataclasses.replace(plan, seeds=tuple(args.seeds))
        return plan, functools.partial(Workbench.load, "organism")  # picklable: --workers processes build their own
    if getattr(args, "quick", False):
        raise ValueError("--quick is the organism's reduced plan; for --model PATH reduce the work with --seeds, "
                         "--steps and smaller --mcq files")
    forget, mcq = _pairs(args.forget_files, "--forget-files"), _pairs(args.mcq, "--mcq")
    if not forget or args.retain_file is None or not mcq:
        raise ValueError("--model PATH needs --forget-files TOPIC=FILE ..., --retain-file FILE and --mcq SET=FILE ...")
    data = data_from_files(forget, args.retain_file, mcq, forget_format=args.forget_format or "auto")
    model_cfg = Path(args.model) / "config.json"
    if not model_cfg.is_file():
        raise FileNotFoundError(f"{args.model} is not a Hugging Face model directory: {model_cfg} does not exist")
    n_blocks = int(json.loads(model_cfg.read_text()).get("num_hidden_layers"))
    dtype = resolve_dtype(args.dtype)
    plan = model_plan(n_blocks, model=str(args.model), data=data.name, c=args.coeff, layer=args.layer,
                      steps=args.steps, seeds=tuple(args.seeds or (0, 1, 2)), dtype=dtype)
    # picklable (a module-level function and plain values): --workers processes each build their own
    return plan, functools.partial(model_workbench, str(args.model), data, dtype)


def resolve_dtype(dtype: str) -> str:
    """``--dtype`` as the runs name it: "auto" is bfloat16 on CUDA, float32 on the CPU; others as given."""
    resolved = dtype if dtype != "auto" else ("bfloat16" if torch.cuda.is_available() else "float32")
    check_dtype_name(resolved)
    return resolved


def model_workbench(model: str, data: ExperimentData, dtype: str = "auto") -> Workbench:
    """The workbench of a local model directory with ``data``: on CUDA when there is one (``dtype`` "auto": bf16
    there, fp32 on the CPU)."""
    cuda = torch.cuda.is_available()
    m, tok = load_model(model, dtype=resolve_dtype(dtype))
    if cuda:
        m = m.to("cuda")
    return Workbench(m, tok, data, model_id=model)


def resources(args) -> tuple[int, int]:
    """(worker processes, torch threads per process) from the flags: the organism on CPU defaults to two
    one-thread workers (2 cores), a real model to one process."""
    workers = args.workers if args.workers is not None else (2 if args.model == "organism" and not
                                                              torch.cuda.is_available() else 1)
    threads = args.threads if args.threads is not None else (1 if workers > 1 else 2)
    return workers, threads


def _stage_specs(plan: ExperimentPlan, grids: dict, names: list[str], results: Path) -> tuple[list, str | None]:
    """The runs of ``names``; Table 1's reported runs only once its dev selection runs all have results (else a
    note saying why they are not listed yet)."""
    specs, note = [], None
    for name in names:
        if name == "table1" and plan.selection_seeds:
            select = grids["table1_select"]
            specs += select
            frame = load_results(results, select)
            if len(finished_runs(frame)) < len({s.key() for s in select}):
                note = (f"Table 1's reported runs wait for its {len(select)} selection runs on the dev questions "
                        f"({len(finished_runs(frame))} finished): run again once they are done")
                continue
            specs += plan_grids(dataclasses.replace(plan, coeff_layers=()),
                                selected=table1_choice(plan, frame))["table1"]
        else:
            specs += grids[name]
    return specs, note


def robustness_plan(plan: ExperimentPlan, seeds: Sequence[int] | None = None) -> RobustnessPlan:
    """The robustness lab for the model the flags describe: the organism's plan, or a real model's from ``plan``."""
    if plan.model == "organism":
        rplan = organism_robustness_plan()
        return dataclasses.replace(rplan, seeds=tuple(seeds)) if seeds else rplan
    return model_robustness_plan(plan, seeds=tuple(seeds) if seeds else None)


def _list_or_run(args, specs: list, bench: LazyWorkbench, factory: Callable[[], Workbench], desc: str) -> bool:
    """``--list``: print this shard's runs and whether each is done, and return True (nothing else to do); else
    run the shard's unfinished runs unless ``--merge`` (one process: ``bench``; ``--workers N``: ``factory`` in
    each) and return False."""
    if args.list:
        for s in shard_specs(specs, args.shard):
            done = is_finished(args.results / f"{s.key()}.json", s.key())
            print(f"{s.key()}  {'done' if done else 'todo'}  {s.label()}")
        return True
    if not args.merge:
        workers, threads = resources(args)
        torch.set_num_threads(threads)
        outcome = run_sweep(specs, args.results, bench if workers == 1 else factory, shard=args.shard,
                            progress=not args.no_progress, workers=workers, threads=threads, desc=desc)
        print(f"shard {args.shard or '0/1'}: ran {outcome.ran}, skipped {outcome.skipped} finished run(s); "
              f"results in {args.results}")
    return False


def tradeoff_command(args, plan: ExperimentPlan, factory: Callable[[], Workbench]) -> int:
    """``sweep --experiment tradeoff``: (a shard of) the trade-off runs, one JSON per run; then, over what is in
    ``--results``, the matched-utility verdicts (tradeoff.md beside the results directory is written by
    ``reproduce --only tradeoff``)."""
    tplan = tradeoff_plan(plan, **({"seeds": tuple(args.seeds)} if args.seeds else {}))  # default: 5 seeds
    bench = LazyWorkbench(factory)
    norms = plan_norms(dataclasses.replace(plan, coeff_layers=tplan.layers), bench, args.results)
    specs = tradeoff_grid(tplan, norms)
    if _list_or_run(args, specs, bench, factory, "trade-off"):
        return 0
    frame = load_results(args.results, specs)
    print(f"{len(frame)} of {len(specs)} trade-off runs have results in {args.results}")
    if len(frame) == len(specs):
        print(tradeoff_markdown(tradeoff_analysis(frame), tplan))
    return 0


def robustness_command(args, plan: ExperimentPlan, factory: Callable[[], Workbench]) -> int:
    """``sweep --experiment robustness``: (a shard of) the attack runs, one JSON per run, then the table."""
    rplan = robustness_plan(plan, args.seeds)
    specs = robustness_grid(rplan)
    if _list_or_run(args, specs, LazyWorkbench(factory), factory, "robustness"):
        return 0
    rows = load_attack_results(args.results, specs)
    print(f"{len(rows)} of {len(specs)} attack runs have results in {args.results}")
    if rows:
        table = robustness_table(rows)
        cols = ["label", "attack", "clean", "attacked", "recovered", "beyond_control", "n", "steps", "seconds"]
        print(table[cols].to_string(index=False, float_format=lambda x: f"{x:.3f}"))
        if ((table["method"] == "rmu") & (table["attack"] == "gcg")).any():
            print(format_claim(gcg_claim(table)))
    return 0


def sweep_command(args) -> int:
    plan, factory = plan_from_args(args)
    if args.experiment == "robustness":
        return robustness_command(args, plan, factory)
    if args.experiment == "tradeoff":
        return tradeoff_command(args, plan, factory)
    bench = LazyWorkbench(factory)
    norms = plan_norms(plan, bench, args.results) if plan.coeff_layers and args.experiment in ("coefficient", "all") \
        else None
    grids = plan_grids(dataclasses.replace(plan, coeff_layers=()) if norms is None else plan, norms)
    names = ["coefficient", "layer", "table1"] if args.experiment == "all" else [args.experiment]
    specs, note = _stage_specs(plan, grids, names, args.results)
    if args.list:
        for s in shard_specs(specs, args.shard):
            done = is_finished(args.results / f"{s.key()}.json", s.key())
            print(f"{s.key()}  {'done' if done else 'todo'}  {s.label()}")
        if note:
            print(note)
        return 0
    if not args.merge:
        workers, threads = resources(args)
        torch.set_num_threads(threads)
        outcome = run_sweep(specs, args.results, bench if workers == 1 else factory, shard=args.shard,
                            progress=not args.no_progress, workers=workers, threads=threads)
        ran, skipped = outcome.ran, outcome.skipped
        if note and args.shard is None:  # one process ran every selection run: the reported runs can follow
            specs, note = _stage_specs(plan, grids, names, args.results)
            outcome = run_sweep(specs, args.results, bench if workers == 1 else factory,
                                progress=not args.no_progress, workers=workers, threads=threads)
            ran, skipped = ran + outcome.ran, outcome.skipped
        print(f"shard {args.shard or '0/1'}: ran {ran}, skipped {skipped} finished run(s); "
              f"results in {args.results}")
        if note:
            print(note)
    frame = load_results(args.results, specs)
    done = len(frame)
    print(f"{done} of {len(set(s.key() for s in specs))} runs of {', '.join(names)} have results in {args.results}")
    if done:
        cols = ["method", "layer", "coeff", "lr", "seed", "forget_acc", "general_acc", "retain_loss"]
        print(finished_runs(frame)[[c for c in cols if c in frame]].sort_values(["method", "layer", "seed"])
              .to_string(index=False))
    return 0
