"""Benchmark: measure_confidence batched (padded, KV cache) vs a one-prompt-at-a-time loop.

Both runs use the same code path (``measure_confidence``; the loop passes one prompt per call) and must give the
same numbers; the script checks that, then prints the speed-up measured in this one run, for the next-token
confidence (``generate=0``) and, unless ``--generate 0``, for greedy decoding of k tokens.

    python benchmarks/confidence_speed.py [--prompts 256] [--batch-size 64] [--generate 30]
                                          [--generate-prompts 256] [--threads N]
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from capture_speed import load, make_prompts  # noqa: E402

from rmu_analysis.confidence import measure_confidence  # noqa: E402


def compare(model, prompts: list[str], generate: int, batch_size: int) -> tuple[float, float, float]:
    t0 = time.perf_counter()
    batched = measure_confidence(model, prompts, generate=generate, batch_size=batch_size)
    t_batched = time.perf_counter() - t0
    t0 = time.perf_counter()
    single = [measure_confidence(model, [p], generate=generate) for p in prompts]
    t_loop = time.perf_counter() - t0
    loop_logit = np.concatenate([s.max_logit for s in single])
    assert np.array_equal(np.concatenate([s.tokens for s in single]), batched.tokens), "greedy tokens differ"
    return t_batched, t_loop, float(np.abs(loop_logit - batched.max_logit).max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--generate", type=int, default=30, help="k for the decoding comparison (0 to skip it)")
    ap.add_argument("--generate-prompts", type=int, default=256, help="prompts for the decoding comparison")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    model, tok, which = load()
    prompts, source = make_prompts(max(args.prompts, args.generate_prompts))
    measure_confidence(model, prompts[:2])  # warm-up
    print(f"model: {which}; prompts: {source}; torch threads: {torch.get_num_threads()}; batch size {args.batch_size}")
    runs = [(0, prompts[: args.prompts])]
    if args.generate > 0:
        runs.append((args.generate, prompts[: args.generate_prompts]))
    for k, ps in runs:
        tb, tl, diff = compare(model, ps, k, args.batch_size)
        print(f"  generate={k:<3d} {len(ps):4d} prompts: batched {tb:7.2f} s, per-prompt loop {tl:7.2f} s, "
              f"max |ΔMaxLogit| {diff:.1e}")
        print(f"ratio loop/batched (generate={k}, {len(ps)} prompts): {tl / tb:.2f}x")


if __name__ == "__main__":
    main()
