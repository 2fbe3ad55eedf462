"""Benchmark: GCG steps per second on the organism, and batched candidate scoring vs one candidate at a time.

Measured in this one process, on the organism's bio questions (lettered prompts):
  steps/s        gcg() with the CPU budget (5 tokens, top-k 64, 64 candidates per step) on --questions questions,
                 per-question strings and one universal string, for lettered prompts and for the organism's own
                 scoring (cloze: answers of several tokens cost one row per choice); the time per step covers the
                 gradient pass and scoring every candidate on every question
  batched/serial the same candidates (--questions × 64) scored by suffix_choice_logprobs one sequence per forward
                 pass (whole prompts) vs in chunks of 128 (whole prompts, then with the prefix's keys and values
                 cached, as gcg() runs); ratios are serial time / batched time, and the largest difference of the
                 log-probabilities is printed beside them

    python benchmarks/gcg_speed.py [--questions 8] [--steps 5] [--repeats 3] [--threads 1]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from rmu_analysis.attacks.gcg import GCGConfig, adversarial_prompts, gcg, prefix_cache, suffix_choice_logprobs
from rmu_analysis.organism import SCORING, SUBJECTS, load_organism, organism_mcq


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--questions", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_organism()
    recs = organism_mcq()["bio"][: args.questions]
    subject = SUBJECTS["bio"]
    print(f"organism, {len(recs)} bio questions, {args.threads} thread(s), torch {torch.__version__}")

    for scoring in dict.fromkeys(("letter", SCORING)):
        for universal in (False, True):
            cfg = GCGConfig(steps=args.steps, universal=universal, scoring=scoring)
            gcg(model, tok, recs[:1], GCGConfig(steps=1, scoring=scoring), subject=subject)  # warm-up
            t0 = time.perf_counter()
            res = gcg(model, tok, recs, cfg, subject=subject)
            loop = res.history[-1]["seconds"] - res.history[0]["seconds"]
            print(f"gcg {scoring:6s} {'universal   ' if universal else 'per-question'}: {args.steps / loop:6.2f} "
                  f"steps/s ({loop / args.steps:.3f} s/step, {len(recs) * cfg.candidates} candidates per step; "
                  f"whole call incl. clean/text evaluation {time.perf_counter() - t0:.1f} s)")

    init = tok("!", add_special_tokens=False)["input_ids"][0]
    prompts = adversarial_prompts(tok, recs, subject, n_tokens=5, init_id=init)
    cache = prefix_cache(model, prompts)
    g = torch.Generator().manual_seed(0)
    rows = torch.arange(len(recs)).repeat_interleave(64)
    suffixes = torch.randint(3, len(tok), (rows.shape[0], 5), generator=g)

    def timed(batch_size: int, use_cache: bool) -> tuple[float, torch.Tensor]:
        times, out = [], None
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out = suffix_choice_logprobs(model, prompts, suffixes, rows, batch_size=batch_size,
                                         cache=cache if use_cache else None)
            times.append(time.perf_counter() - t0)
        return statistics.median(times), out

    timed(128, True)  # warm-up
    t_cached, a = timed(128, True)
    t_batched, b = timed(128, False)
    t_serial, c = timed(1, False)
    n = rows.shape[0]
    print(f"candidate scoring, {n} sequences (median of {args.repeats}):")
    print(f"  one at a time, whole prompt  {t_serial:7.3f} s  ({n / t_serial:6.0f} seq/s)")
    print(f"  batched 128, whole prompt    {t_batched:7.3f} s  ({n / t_batched:6.0f} seq/s)  "
          f"batched/serial speed-up {t_serial / t_batched:.1f}x")
    print(f"  batched 128, prefix cached   {t_cached:7.3f} s  ({n / t_cached:6.0f} seq/s)  "
          f"speed-up vs serial {t_serial / t_cached:.1f}x")
    print(f"  max |Δ log p| batched vs serial {(b - c).abs().max():.1e}, cached vs serial {(a - c).abs().max():.1e}")


if __name__ == "__main__":
    main()
