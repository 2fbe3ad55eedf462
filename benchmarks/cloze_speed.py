"""Benchmark: cloze scoring with each question's context run once (KV cache shared by its four choices) vs the
reference path that runs ``context + choice[:-1]`` in full for every choice (lm-eval style).

Both paths are ``evaluate_mcq(..., scoring="cloze")`` on the shipped organism (``load_organism()``) and all of
its held-out questions (``organism_mcq()``: bio, cyber, general), in this one process, on one torch thread; the
reference is reached with the private ``_share_context=False``. The script first checks that the two give the
same log-likelihoods (max |Δ| printed) and predictions, then runs each ``--repeats`` times (interleaved) and
prints the wall and process CPU times (median and best) and the ratios reference / shared. On a shared machine
the CPU time and the best-of wall time are the steadier numbers.

    python benchmarks/cloze_speed.py [--repeats 3] [--batch-sizes 16,64] [--threads 1]

``batch_size`` is evaluate_mcq's argument: 16 its default, 64 what the organism's own evaluations pass. The
reference path runs that many sequences per pass, the shared path that many contexts (then their choices).
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from rmu_analysis.evaluation import evaluate_mcq
from rmu_analysis.organism import load_organism, organism_mcq


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-sizes", default="16,64", help="comma-separated evaluate_mcq batch sizes")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_organism()
    records = [r for recs in organism_mcq().values() for r in recs]

    for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
        measure(model, tok, records, batch_size, args.repeats)


def measure(model, tok, records, batch_size: int, repeats: int) -> None:
    def run(share: bool):
        return evaluate_mcq(model, tok, records, scoring="cloze", batch_size=batch_size, _share_context=share)

    new, old = run(True), run(False)  # also the warm-up
    diff = float(np.abs(new.logliks - old.logliks).max())
    same = bool(np.array_equal(new.predictions, old.predictions))
    assert diff < 1e-4 and same, f"the paths differ: max |Δloglik| {diff:.2e}, same predictions: {same}"

    wall: dict[bool, list[float]] = {True: [], False: []}
    cpu: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(repeats):
        for share in (False, True):  # interleaved: background load hits both alike
            w0, c0 = time.perf_counter(), time.process_time()
            run(share)
            wall[share].append(time.perf_counter() - w0)
            cpu[share].append(time.process_time() - c0)
    n_tok = int(new.n_tokens.sum())
    print(f"organism, {len(records)} cloze questions ({n_tok} choice tokens, "
          f"{(new.n_tokens > 1).any(axis=1).mean():.0%} of questions with a multi-token choice), "
          f"batch size {batch_size}, torch threads {torch.get_num_threads()}")
    for name, share in (("reference (context + choice[:-1], per choice)", False), ("shared context (KV cache)", True)):
        print(f"  {name:46s} wall {statistics.median(wall[share]):6.2f} s (min {min(wall[share]):5.2f}), "
              f"CPU {statistics.median(cpu[share]):6.2f} s (min {min(cpu[share]):5.2f})")
    print(f"  max |Δ loglik| {diff:.1e}; predictions identical: {same}; accuracy {new.accuracy:.3f}")
    for what, t in (("wall", wall), ("CPU", cpu)):
        ratio = statistics.median(t[False]) / statistics.median(t[True])
        print(f"  speed-up old/new, {what:4s} time: median {ratio:.2f}x, best-of-{repeats} {min(t[False]) / min(t[True]):.2f}x")


if __name__ == "__main__":
    main()
