"""Zephyr-7B-shaped unlearning on one GPU: engine vs plain reference step time and peak memory, and the
multiple-choice evaluation's throughput. Random weights (no download): only the shapes and the work count.

Run on a CUDA machine: ``python benchmarks/gpu_zephyr_shape.py`` (about 2 minutes on an H200, most of it
building two 7B models); ``--small`` runs the same code on a few-block model (a CPU dry run).

Setup: Mistral-7B / Zephyr-7B-beta's configuration (32 blocks, width 4096, MLP 14336, 32 heads / 8 KV
heads, vocabulary 32000), bf16 weights, the ``zephyr-7b-adaptive-rmu`` preset (l = 7, trained MLP
down-projections of blocks 5-7, batch 4, forget texts cut at 512 / 768 tokens, retain at 512 tokens, every
text long enough to fill them), the reference's two topics alternating and sharing one retain corpus.

- Step time: (time of an S-step run - time of a W-step run) / (S - W), after a warm-up run, with
  ``torch.cuda.synchronize()`` around each run, so set-up (the reference's model copy) cancels out.
- Peak memory: ``torch.cuda.max_memory_allocated()`` during a run minus the memory allocated before it (the
  base model's weights): what the run adds on top of the loaded model.
- Evaluation: ``evaluate_mcq`` with letter scoring on synthetic WMDP-length questions (~250-token prompts, the
  answer letters single tokens as in Zephyr's tokenizer, so one forward pass per question), questions per
  second, and from it the time for WMDP bio + cyber + MMLU (1273 + 1987 + 14042 questions). The one H200 run so
  far (18 questions/s) predates this: its tokenizer split " A" into two tokens, so it timed four passes per
  question over ~340-token prompts.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import time
import warnings

import torch

from rmu_analysis.evaluation import evaluate_mcq, mcq_prompt
from rmu_analysis.organism.tokenizer import train_tokenizer
from rmu_analysis.recipes import PRESETS
from rmu_analysis.unlearning import unlearn, unlearn_reference

SYLLABLES = "ka lo mi nu pe ra si to vu xe za bo ci du fa gi ho ju ke le ma ne pi qu re sa ti ul ve wo".split()
N_QUESTIONS = {"wmdp-bio": 1273, "wmdp-cyber": 1987, "mmlu": 14042}


def words(rng: random.Random, n: int) -> str:
    return " ".join("".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(n))


def _record(rng: random.Random) -> dict:
    """A synthetic WMDP-length question: ~110 words, four 8-word choices."""
    return {"question": words(rng, 110), "choices": [words(rng, 8) for _ in range(4)], "answer": rng.randrange(4)}


def corpus(n: int, seed: int, n_words: int) -> list[str]:
    rng = random.Random(seed)
    return [words(rng, n_words) for _ in range(n)]


def build_model(small: bool, device: str):
    from transformers import MistralConfig, MistralForCausalLM

    if small:
        cfg = MistralConfig(vocab_size=32000, hidden_size=256, intermediate_size=896, num_hidden_layers=10,
                            num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096)
    else:  # HuggingFaceH4/zephyr-7b-beta's config.json
        cfg = MistralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                            num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
                            rms_norm_eps=1e-5, rope_theta=10000.0, sliding_window=4096, tie_word_embeddings=False,
                            bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = MistralForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed_run(fn, model, tok, forget, retain, cfg) -> tuple[float, float]:
    """(seconds, peak bytes added) of one run."""
    sync()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fn(model, tok, forget, retain, cfg, progress=False)
    sync()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() - base if torch.cuda.is_available() else float("nan")
    return seconds, peak


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true", help="a 10-block width-256 model (dry run, e.g. on a CPU)")
    p.add_argument("--steps", type=int, default=16, help="S: steps of the timed run (W = 4)")
    p.add_argument("--questions", type=int, default=256, help="synthetic questions for the evaluation timing")
    p.add_argument("--json", default=None, help="write the numbers here")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = True
    out: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                 "torch": torch.__version__, "small": args.small}

    t0 = time.perf_counter()
    model = build_model(args.small, device)
    out["n_params"] = sum(p.numel() for p in model.parameters())
    out["build_seconds"] = time.perf_counter() - t0
    print(f"model: {out['n_params'] / 1e9:.2f} B parameters, bf16, built in {out['build_seconds']:.0f} s on {out['device']}")
    # the tokenizer also sees lettered MCQ prompts, so " A".." D" are single tokens as in Zephyr's tokenizer and
    # evaluate_mcq takes its one-pass-per-question path (with two-token letters it needs four passes)
    rng = random.Random(5)
    mcq_texts = [mcq_prompt(_record(rng), "biology") + " " + "ABCD"[i % 4] for i in range(64)] * 20
    tok = train_tokenizer(corpus(300, 0, 200) + mcq_texts, vocab_size=800, min_frequency=1)
    letters = [tok(" " + x, add_special_tokens=False)["input_ids"] for x in "ABCD"]
    if any(len(ids) != 1 for ids in letters):
        raise RuntimeError(f"the benchmark tokenizer splits the answer letters: {letters}")

    n_texts = 4 * (args.steps + 1)  # per topic
    forget = {"bio": corpus(n_texts, 1, 800), "cyber": corpus(n_texts, 2, 800)}
    retain = corpus(n_texts, 3, 700)
    lengths = [len(tok(t)["input_ids"]) for t in forget["bio"][:8] + retain[:8]]
    print(f"texts: {min(lengths)}-{max(lengths)} tokens before truncation (forget cut at 512/768, retain at 512)")
    preset = PRESETS["zephyr-7b-adaptive-rmu"]
    if args.small:
        preset = dataclasses.replace(preset, layer=5, trained_layers=(3, 4, 5))
    warm, steps = 4, args.steps

    rows = {}
    for name, fn in (("engine", unlearn), ("reference", unlearn_reference)):
        timed_run(fn, model, tok, forget, retain, dataclasses.replace(preset, steps=2))  # warm-up
        t_w, _ = timed_run(fn, model, tok, forget, retain, dataclasses.replace(preset, steps=warm))
        t_s, peak = timed_run(fn, model, tok, forget, retain, dataclasses.replace(preset, steps=steps))
        rows[name] = {"step_seconds": (t_s - t_w) / (steps - warm), "peak_added_bytes": peak,
                      "run_seconds": t_s, "steps": steps}
        print(f"{name:9s}: {rows[name]['step_seconds'] * 1e3:7.1f} ms/step, peak +{peak / 2**30:6.2f} GiB over the "
              f"loaded model, {steps}-step run {t_s:.1f} s")
    out["unlearn"] = rows
    e, r = rows["engine"], rows["reference"]
    out["step_ratio_reference_over_engine"] = r["step_seconds"] / e["step_seconds"]
    out["peak_ratio_engine_over_reference"] = e["peak_added_bytes"] / r["peak_added_bytes"]
    out["full_run_minutes_engine"] = 500 * e["step_seconds"] / 60
    out["full_run_minutes_reference"] = 500 * r["step_seconds"] / 60
    print(f"step time reference/engine {out['step_ratio_reference_over_engine']:.2f}x; peak added "
          f"engine/reference {out['peak_ratio_engine_over_reference']:.2f}x; a 500-step preset run: "
          f"{out['full_run_minutes_engine']:.1f} min (engine) vs {out['full_run_minutes_reference']:.1f} min (reference)")

    rng = random.Random(4)
    records = [_record(rng) for _ in range(args.questions)]
    evaluate_mcq(model, tok, records[:32], "biology", scoring="letter", batch_size=32)  # warm-up
    sync()
    t0 = time.perf_counter()
    evaluate_mcq(model, tok, records, "biology", scoring="letter", batch_size=32)
    sync()
    qps = args.questions / (time.perf_counter() - t0)
    n_tokens = sum(len(tok(mcq_prompt(r, "biology"))["input_ids"]) for r in records[:16]) / 16
    out["eval_questions_per_second"] = qps
    out["eval_minutes_wmdp_mmlu"] = sum(N_QUESTIONS.values()) / qps / 60
    print(f"evaluation: {qps:.0f} questions/s (~{n_tokens:.0f}-token prompts, letter scoring, one pass each, batch 32): "
          f"WMDP bio+cyber+MMLU ({sum(N_QUESTIONS.values())} questions) in {out['eval_minutes_wmdp_mmlu']:.1f} min")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
