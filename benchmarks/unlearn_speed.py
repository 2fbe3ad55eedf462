"""Engine vs plain reference implementation of RMU: step time, peak memory, and a cached coefficient sweep.

Run: ``python benchmarks/unlearn_speed.py`` (a few minutes on 2 CPU cores; not a timed test).

Setup: a random 32-block Llama (width 64, MLP 128, 4 heads), RMU at l = 8 (trained blocks 6–8, MLP
down-projections), two forget topics sharing one retain corpus (as the reference), batch 4, 64 tokens,
fp32, one CPU thread (steadier numbers on a shared machine), both implementations in the same process.

- Step time: the time of an S-step run divided by S, after a warm-up run, the best of ``--repeats``
  (implementations interleaved), measured both as wall time (``time.perf_counter``) and as this process's CPU
  time (``time.process_time``, which other jobs on a shared machine disturb much less). Each run's set-up
  (the plain implementation's model copy) is included, so the plain side carries it over S steps.
- Peak memory: the largest resident-set size seen by a thread sampling /proc/self/statm every 0.2 ms during
  one run, minus the RSS just before it (after ``gc.collect()`` and glibc ``malloc_trim(0)``, so memory freed
  by the previous run does not hide new allocations). It counts everything the run allocates: the plain
  implementation's model copy and gradients, the engine's master copies, optimiser state and activations.
- Sweep: 8 coefficients at l = 8 through ``unlearn_sweep`` (one shared ``PrefixCache``) vs one plain run of
  the same number of steps, both timed end to end.

Targets: step time ratio plain/engine >= 4, peak memory engine/plain <= 0.6, sweep/plain <= 3.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import os
import random
import threading
import time
import warnings

import torch

from rmu_analysis.organism.tokenizer import train_tokenizer
from rmu_analysis.unlearning import PrefixCache, RMUConfig, unlearn, unlearn_reference, unlearn_sweep

WORDS = ("pathogen host bats mice birds virus infect which answer question the city of Varon lies on river Elm "
         "encyclopedic people chemistry text protocol exploit kernel buffer overflow packet").split()


def texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(60, 90))) for _ in range(n)]


def build(n_layers: int, width: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = train_tokenizer(texts(200, 0), vocab_size=400, min_frequency=1)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=n_layers,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256, bos_token_id=0,
                      eos_token_id=1, pad_token_id=2, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval(), tok


# ------------------------------------------------------------------------------------------ memory
def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass


def peak_rss_delta(fn) -> int:
    """Peak RSS during ``fn()`` minus RSS before it, in bytes (see the module docstring)."""
    _trim()
    base = _rss()
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.0002)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        fn()
    finally:
        done.set()
        t.join()
    peak[0] = max(peak[0], _rss())
    return peak[0] - base


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of ``fn()``."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--layer", type=int, default=8)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--sweep-steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")

    model, tok = build(args.layers, args.width)
    n_texts = 4 * max(args.steps, args.sweep_steps)
    forget = {"bio": texts(n_texts, 1), "cyber": texts(n_texts, 2)}
    retain = texts(n_texts, 3)
    base = RMUConfig(layer=args.layer, steering_coeff=20.0, alpha=100.0, lr=1e-3, forget_max_length=64,
                     retain_max_length=64, log_every=10**6)
    impls = {"engine": unlearn, "plain": unlearn_reference}

    def run(name, steps, **kw):
        return impls[name](model, tok, forget, retain, RMUConfig(**{**base.__dict__, "steps": steps}), progress=False, **kw)

    print(f"model: {args.layers} blocks, width {args.width}; RMU at l = {args.layer} (trained blocks "
          f"{base.resolved_trained_layers()}), batch 4, 64 tokens, fp32, {args.threads} thread(s)")
    for name in impls:
        run(name, 2)  # warm-up
    best = {name: [float("inf"), float("inf")] for name in impls}
    for _ in range(args.repeats):
        for name in impls:
            t = timed(lambda: run(name, args.steps))
            best[name] = [min(b, x / args.steps) for b, x in zip(best[name], t)]
    for name, (wall, cpu) in best.items():
        print(f"{name:>6}: {wall * 1e3:8.1f} ms/step wall, {cpu * 1e3:8.1f} ms/step CPU")
    mem = {name: peak_rss_delta(lambda: run(name, args.steps)) for name in ("engine", "plain")}
    for name, m in mem.items():
        print(f"{name:>6}: peak memory +{m / 2**20:7.2f} MiB")

    coeffs = [2.0, 4.0, 6.5, 10.0, 15.0, 20.0, 30.0, 40.0]
    configs = [RMUConfig(**{**base.__dict__, "steps": args.sweep_steps, "steering_coeff": c}) for c in coeffs]
    sweep = lambda: unlearn_sweep(model, tok, forget, retain, configs, prefix_cache=PrefixCache(), progress=False)  # noqa: E731
    t_sweep = [min(x) for x in zip(*(timed(sweep) for _ in range(max(1, args.repeats - 1))))]
    t_plain = [min(x) for x in zip(*(timed(lambda: run("plain", args.sweep_steps)) for _ in range(args.repeats)))]
    print(f"sweep of {len(coeffs)} coefficients x {args.sweep_steps} steps (shared prefix cache): {t_sweep[0]:.2f} s "
          f"wall, {t_sweep[1]:.2f} s CPU; one plain run: {t_plain[0]:.2f} s wall, {t_plain[1]:.2f} s CPU")

    ratio = lambda a, b: f"{a[0] / b[0]:6.2f}x wall, {a[1] / b[1]:6.2f}x CPU"  # noqa: E731
    print("\nratios (targets in brackets)")
    print(f"  step time    plain / engine        : {ratio(best['plain'], best['engine'])}   [>= 4x]")
    print(f"  peak memory  engine / plain        : {mem['engine'] / mem['plain']:6.2f}x   [<= 0.6x]")
    print(f"  8-coefficient sweep / one plain run: {ratio(t_sweep, t_plain)}   [<= 3x]")


if __name__ == "__main__":
    main()
