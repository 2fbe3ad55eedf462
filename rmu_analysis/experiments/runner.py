"""Running sweeps: :func:`run_one` trains one :class:`~.specs.RunSpec` with the engine, evaluates it and returns one
JSON-ready dict; :func:`run_sweep` runs (a shard of) a grid, writes each finished run atomically to
``<out>/<spec.key()>.json`` and skips runs whose file holds a complete result, so an interrupted sweep resumes and
``--shard i/n`` jobs can share one directory; with ``workers > 1`` in several processes, which end when the sweep's
process ends, however it ends.

Seeds: ``seed`` draws u (as the reference does) *and* shuffles the order of the training texts, so the
output-space baselines (which draw nothing) also vary with it.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import math
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import pandas as pd
import torch
import transformers
from tqdm import tqdm  # text bars: tqdm.auto warns in notebooks without ipywidgets

from .._io import atomic_write_json
from ..models import hidden_size, model_device
from ..unlearning import NonFiniteLossError, UnlearnResult, unlearn
from ..unlearning.common import draw_control_vectors
from .measure import measure_outputs, measure_representations
from .results import flatten_result, result_problem
from .robustness import AttackSpec, run_attack
from .specs import RESULT_VERSION, STEERING, RunSpec
from .workbench import Workbench, training_texts

__all__ = ["run_one", "run_sweep", "SweepOutcome", "parse_shard", "shard_specs", "is_finished", "rerun_check"]


def probe_vectors(bench: Workbench, result: UnlearnResult, spec: RunSpec) -> dict[str, torch.Tensor]:
    """The run's control vectors u; for the baselines the u that RMU with the same seed would draw (a probe)."""
    if result.control_vectors:
        return dict(result.control_vectors)
    dtype = bench.model.get_input_embeddings().weight.dtype
    drawn = draw_control_vectors(len(bench.data.topics), hidden_size(bench.model), spec.seed, dtype,
                                 model_device(bench.model))
    return dict(zip(bench.data.topics, drawn))


def round_floats(obj: Any, digits: int = 6) -> Any:
    """Every finite float in a nested dict / list rounded to ``digits`` decimals (stable result files)."""
    if isinstance(obj, float):
        return obj if not math.isfinite(obj) else round(obj, digits)
    if isinstance(obj, dict):
        return {k: round_floats(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [round_floats(v, digits) for v in obj]
    return obj


def run_one(spec: RunSpec | AttackSpec, bench: Workbench) -> dict[str, Any]:
    """Train ``spec`` with the engine on ``bench``'s model (unchanged), evaluate it, return the result dict; an
    :class:`~.robustness.AttackSpec` is an attack on a trained model (:func:`~.robustness.run_attack`)."""
    if isinstance(spec, AttackSpec):
        return round_floats(run_attack(spec, bench))
    bench.check_run(spec.model, spec.data, spec.dtype)
    t0 = time.perf_counter()
    config = spec.config()
    forget_train, retain_train = training_texts(bench, spec)
    _, _, forget_eval, retain_eval = bench.split(spec.eval, spec.seed)
    row: dict[str, Any] = {"key": spec.key(), "spec": spec.to_dict(), "config": config.to_dict(),
                           "topics": list(bench.data.topics), "version": RESULT_VERSION, "inputs": spec.inputs()}
    steering = spec.method in STEERING
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "the data run out" is recorded as steps_run
            result = unlearn(bench.model, bench.tokenizer, forget_train, retain_train, config, inplace=False,
                             prefix_cache=bench.cache if steering else None, progress=False)
    except NonFiniteLossError as exc:
        return {**row, "status": "nonfinite", "error": str(exc), "wall_seconds": time.perf_counter() - t0}
    train_seconds = time.perf_counter() - t0
    vectors = probe_vectors(bench, result, spec)

    base = bench.base(spec.eval)
    base_rep = measure_representations(bench.model, bench.tokenizer, spec.layer, forget_eval, vectors, spec.eval)
    with bench.installed(result) as model:
        after = measure_outputs(model, bench.tokenizer, bench.data, spec.eval, retain_eval)
        rep = measure_representations(model, bench.tokenizer, spec.layer, forget_eval, vectors, spec.eval)

    topics = bench.data.topics
    coefficients = {t: float(result.coefficients[t]) for t in topics if t in result.coefficients}
    keep = ("step", "topic", "forget_loss", "retain_loss", "coefficient", "forget_norm", "cos_forget_u")
    row.update({
        "status": "ok",
        "label": spec.label(),
        "forget_accuracy": {t: after["accuracy"][t] for t in topics},
        "general_accuracy": after["accuracy"].get("general"),
        "accuracy": after["accuracy"],
        "accuracy_in_corpus": after["accuracy_in_corpus"],
        "correct": after["correct"],
        "retain_loss": after["retain_loss"],
        "confidence": after["confidence"],
        "alignment": rep,
        "forget_norm": {t: {"frozen": base_rep[t]["norm_mean"], "final": rep[t]["norm_mean"]} for t in topics},
        "coefficient": coefficients,
        "coefficient_over_norm": {t: coefficients[t] / base_rep[t]["norm_mean"] for t in coefficients},
        "u": "trained" if steering else "drawn with the run's seed as RMU would (not trained toward)",
        "base": {"accuracy": base["accuracy"], "accuracy_in_corpus": base["accuracy_in_corpus"],
                 "correct": base["correct"], "retain_loss": base["retain_loss"],
                 "confidence": base["confidence"], "alignment": base_rep},
        "log": [{k: r[k] for k in keep if k in r} for r in result.log],
        "steps_run": result.steps,
        "hidden_size": hidden_size(bench.model),
        "train_seconds": train_seconds,
        "wall_seconds": time.perf_counter() - t0,
        "environment": {"torch": torch.__version__, "transformers": transformers.__version__,
                        "threads": torch.get_num_threads(), "device": str(next(bench.model.parameters()).device)},
    })
    return round_floats(row)


@dataclass(frozen=True)
class SweepOutcome:
    """What :func:`run_sweep` did: the shard's result files, how many runs it ran and how many it skipped."""

    paths: tuple[Path, ...]
    ran: int
    skipped: int


def parse_shard(text: str | tuple[int, int] | None) -> tuple[int, int]:
    """``"i/n"`` (0-based: shards 0/4 … 3/4) -> ``(i, n)``; None -> ``(0, 1)``."""
    if text is None:
        return 0, 1
    if isinstance(text, tuple):
        i, n = text
    else:
        try:
            i, n = (int(x) for x in str(text).split("/"))
        except ValueError:
            raise ValueError(f"--shard takes i/n with integers, 0 <= i < n (e.g. 0/4), got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"shard {i}/{n} is out of range: shards of n = {n} are 0/{n} … {n - 1}/{n}")
    return i, n


def shard_specs(specs: Iterable[RunSpec], shard: tuple[int, int] | str | None = None) -> list[RunSpec]:
    """Shard i of n: the grid (duplicates removed, order kept) cut into n contiguous, nearly equal parts, so that
    the runs at one layer stay together (they share the prefix cache). The n shards partition the grid."""
    i, n = parse_shard(shard)
    unique = list({s.key(): s for s in specs}.values())
    bounds = [round(k * len(unique) / n) for k in range(n + 1)]
    return unique[bounds[i]: bounds[i + 1]]


def is_finished(path: Path, key: str) -> bool:
    """Whether ``path`` holds the complete result of run ``key``. A file that is there but unreadable, incomplete
    (``results.result_problem``) or another run's is reported in a warning naming it: the run is recomputed."""
    try:
        row = json.loads(path.read_text())
    except FileNotFoundError:
        return False
    except (OSError, ValueError) as exc:
        warnings.warn(f"{path} cannot be read ({exc}): the run is recomputed", stacklevel=2)
        return False
    problem = result_problem(row)
    if problem is None and row.get("key") != key:
        problem = f"holds the result of run {row.get('key')!r}, not {key!r}"
    if problem is not None:
        warnings.warn(f"{path} {problem}: the run is recomputed", stacklevel=2)
        return False
    return True


def run_sweep(specs: Iterable[RunSpec], out_dir: str | Path, bench: Workbench | Callable[[], Workbench] | None, *,
              shard: tuple[int, int] | str | None = None, resume: bool = True, progress: bool = True,
              desc: str = "runs", workers: int = 1, threads: int = 1) -> SweepOutcome:
    """Run shard ``shard`` of the grid ``specs``, one JSON file per finished run (``<out_dir>/<key>.json``,
    written atomically). With ``resume`` runs whose file is there are skipped; nothing finished is lost when
    the sweep is interrupted. ``bench`` may be a callable that builds the workbench: it is called only when a
    run is left to do (a finished sweep loads no model).

    ``workers > 1``: that many processes (``spawn``), each building its own workbench with ``bench`` (then a
    picklable callable, e.g. ``functools.partial(Workbench.load, "organism")``) and using ``threads`` torch
    threads; runs that share a seed and a layer go to the same process (they share its prefix cache). On 2 CPU
    cores two one-thread processes beat one two-thread process on the organism's small matrices.
    """
    out = Path(out_dir)
    mine = shard_specs(specs, shard)
    paths = tuple(out / f"{s.key()}.json" for s in mine)
    todo = [(s, p) for s, p in zip(mine, paths) if not (resume and is_finished(p, s.key()))]
    skipped = len(mine) - len(todo)
    # runs sharing a model state, seed and layer run back to back: the prefix cache serves them
    todo.sort(key=lambda sp: (sp[0].model, sp[0].data, sp[0].seed, sp[0].layer, sp[0].method))
    bar = tqdm(total=len(mine), initial=skipped, desc=desc, unit="run", disable=not progress)
    try:
        if workers > 1 and len(todo) > 1:
            _run_parallel(todo, bench, workers, threads, bar)
        else:
            workbench = None
            for spec, path in todo:
                if workbench is None:
                    workbench = bench() if callable(bench) and not isinstance(bench, Workbench) else bench
                bar.set_postfix_str(spec.label())
                row = run_one(spec, workbench)
                atomic_write_json(path, row)
                bar.update(1)
    finally:
        bar.close()
    return SweepOutcome(paths=paths, ran=len(todo), skipped=skipped)


_WORKER: dict[str, Any] = {}
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class _SweepEnded(BaseException):
    """Raised in a worker when the sweep's process ended: unwinds the run in progress (its temporary file is
    removed, no partial result is left), then the worker exits."""


def _on_sigterm(signum: int, frame: Any) -> None:
    if _WORKER.get("ending"):  # a second SIGTERM (the kernel's and the watchdog's) must not cut the unwinding short
        return
    _WORKER["ending"] = True
    if _WORKER.get("running"):
        raise _SweepEnded(signum)
    os._exit(128 + signum)


def _watch_parent(parent: int, interval: float = 0.5, grace: float = 10.0) -> None:
    """Poll whether ``parent`` is still this process's parent; when it is not (it ended: the process was
    re-parented), send SIGTERM to this process, and after ``grace`` seconds end it outright."""
    while os.getppid() == parent:
        time.sleep(interval)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(grace)
    os._exit(1)


def _end_with_parent(parent: int) -> None:
    """Make this worker end when process ``parent`` (the sweep) ends, by SIGTERM, SIGINT or SIGKILL: on Linux the
    kernel sends SIGTERM at once (``prctl(PR_SET_PDEATHSIG)``); everywhere a watchdog thread notices within half a
    second. SIGTERM unwinds the run in progress and exits. SIGINT (Ctrl-C reaches the whole process group) is
    left to the parent, which stops the workers itself."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _on_sigterm)
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    threading.Thread(target=_watch_parent, args=(parent,), name="watch-parent", daemon=True).start()
    if os.getppid() != parent:  # the parent ended before the signal was asked for
        os._exit(128 + signal.SIGTERM)


def _worker_init(factory: Callable[[], Workbench], threads: int, parent: int) -> None:
    _end_with_parent(parent)
    torch.set_num_threads(threads)
    _WORKER["factory"] = factory


def _worker_run(group: list[tuple[RunSpec, Path]]) -> int:
    try:
        _WORKER["running"] = True
        if "bench" not in _WORKER:
            _WORKER["bench"] = _WORKER["factory"]()
        for spec, path in group:
            atomic_write_json(path, run_one(spec, _WORKER["bench"]))
    except _SweepEnded as ended:
        os._exit(128 + ended.args[0])
    finally:
        _WORKER["running"] = False
    return len(group)


def _stop(pool: ProcessPoolExecutor, timeout: float = 10.0) -> None:
    """End the pool's workers now (SIGTERM: each unwinds its run, leaving no partial file), not after their runs."""
    processes = list((getattr(pool, "_processes", None) or {}).values())  # the executor keeps no public list
    pool.shutdown(wait=False, cancel_futures=True)
    for p in processes:
        with contextlib.suppress(Exception):
            p.terminate()
    deadline = time.monotonic() + timeout
    for p in processes:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()


def _share_key(spec: RunSpec | AttackSpec) -> tuple:
    """Runs with one share key go to one process: unlearning runs of one seed and layer (the prefix cache), the
    attacks on one trained model (it is trained once)."""
    if isinstance(spec, AttackSpec):
        return spec.share_key()
    return (spec.model, spec.data, spec.seed, spec.layer)


def _run_parallel(todo: list[tuple[RunSpec, Path]], bench: Any, workers: int, threads: int, bar) -> None:
    if isinstance(bench, Workbench) or not callable(bench):
        raise ValueError("workers > 1 needs a picklable workbench factory (e.g. functools.partial(Workbench.load, "
                         "'organism')), not a loaded Workbench")
    size = max(1, -(-len(todo) // (4 * workers)))  # about 4 tasks per process, so that they finish together
    groups = []
    for _, g in groupby(todo, key=lambda sp: _share_key(sp[0])):
        g = list(g)
        step = len(g) if isinstance(g[0][0], AttackSpec) else size  # the attacks on one model: one process
        groups += [g[i: i + step] for i in range(0, len(g), step)]
    groups.sort(key=len, reverse=True)  # longest first
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                               initargs=(bench, threads, os.getpid()))
    try:
        futures = [pool.submit(_worker_run, g) for g in groups]
        for f in as_completed(futures):
            bar.update(f.result())
    except BaseException:  # Ctrl-C, a failed run, SIGTERM turned into an exception: stop, do not wait
        _stop(pool)
        raise
    pool.shutdown(wait=True)


def rerun_check(specs: Iterable[RunSpec], committed: pd.DataFrame, bench: Workbench,
                columns: Sequence[str] = ("acc_bio", "acc_cyber", "general_acc", "retain_loss")) -> pd.DataFrame:
    """Train and evaluate ``specs`` again and set each fresh number beside the committed one (``committed``: the
    :func:`~.results.load_results` frame holding them): one row per (run, column) with ``committed``, ``fresh``
    and ``diff``. A code change that silently moves results shows here."""
    saved = committed.set_index("key")
    rows = []
    for spec in specs:
        fresh = flatten_result(run_one(spec, bench))
        old = saved.loc[spec.key()]
        for col in columns:
            rows.append({"run": spec.label(), "measure": col, "committed": old[col], "fresh": fresh[col],
                         "diff": fresh[col] - old[col]})
    return pd.DataFrame(rows)
