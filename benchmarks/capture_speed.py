"""Benchmark: capture every block in ONE early-stopped pass vs one pass per block.

Compares, on the same prompts (all measured in this one run):
  one_pass       capture(model, prompts, layers="all")                       L block evaluations
  per_block      capture(model, prompts, layers=[l]) for each l (stops early)  L(L+1)/2
  full_per_block a full forward with output_hidden_states per block (what the reference code does
                 whenever it reads one layer)                                   L², plus L LM heads
Block evaluations are counted with forward hooks; wall times are the median of ``--repeats`` runs.

    python benchmarks/capture_speed.py [--prompts 64] [--repeats 3] [--threads N]
"""
from __future__ import annotations

import argparse
import random
import statistics
import time
import warnings

import torch

from rmu_analysis.activations import capture
from rmu_analysis.models import attach_tokenizer, decoder_blocks

WORDS = ("pathogen host bats ferrets aerosol droplet exploit server port buffer overflow city river Varon Elm "
         "chemistry element person born treaty gateway incubation symptom fever culture passage").split()


def load(seed: int = 0):
    """The organism if it loads, else a random tiny Llama with 12 blocks of width 128 (and a local tokenizer)."""
    try:
        from rmu_analysis.organism import load_organism

        model, tok = load_organism()  # its tokenizer is attached to it
        return model, tok, "organism (load_organism())"
    except Exception as exc:  # the organism is optional here
        reason = f"{type(exc).__name__}: {exc}"
    from transformers import LlamaConfig, LlamaForCausalLM

    from rmu_analysis.organism.tokenizer import train_tokenizer

    rng = random.Random(seed)
    tok = train_tokenizer([" ".join(rng.choices(WORDS, k=30)) for _ in range(200)], vocab_size=512)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=12,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = attach_tokenizer(LlamaForCausalLM(cfg).eval(), tok)
    return model, tok, f"random tiny Llama, 12 blocks, width 128 (organism unavailable: {reason.split(':')[0]})"


def make_prompts(n: int, seed: int = 0) -> tuple[list[str], str]:
    """The organism's held-out WMDP-style questions in lm-evaluation-harness's zero-shot template when the organism
    is available, else synthetic prompts in the same template. Returns ``(prompts, source)``."""
    try:
        from rmu_analysis.evaluation import mcq_prompt
        from rmu_analysis.organism import organism_mcq

        records = [(r, "biology") for r in organism_mcq()["bio"]] + [(r, "computer security")
                                                                     for r in organism_mcq()["cyber"]]
        if len(records) >= n:
            return [mcq_prompt(r, subject) for r, subject in records[:n]], "organism WMDP-style questions"
    except Exception:
        pass
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        q = " ".join(rng.choices(WORDS, k=rng.randint(6, 30)))
        choices = "\n".join(f"{l}. {' '.join(rng.choices(WORDS, k=rng.randint(1, 4)))}" for l in "ABCD")
        out.append(f"The following are multiple choice questions (with answers) about biology.\n\n{q}?\n"
                   f"{choices}\nAnswer:")
    return out, "synthetic questions in the WMDP template"


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    model, tok, which = load()
    blocks = decoder_blocks(model)
    L = len(blocks)
    prompts, source = make_prompts(args.prompts)
    enc = tok(prompts, padding=True, return_tensors="pt")
    enc["position_ids"] = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)

    counter = [0]
    handles = [b.register_forward_hook(lambda *a: counter.__setitem__(0, counter[0] + 1)) for b in blocks]

    def one_pass():
        capture(model, enc, layers="all")

    def per_block():
        for l in range(L):
            capture(model, enc, layers=[l])

    def full_per_block():
        with torch.no_grad():
            for l in range(L):
                model(**enc, output_hidden_states=True, use_cache=False).hidden_states[l + 1]

    # correctness: the one-pass capture equals the per-block captures
    ref = capture(model, enc, layers="all")
    for l in (0, L // 2, L - 1):
        assert torch.equal(capture(model, enc, layers=[l]).hidden[l], ref.hidden[l])

    results = {}
    for name, fn in [("one_pass", one_pass), ("per_block", per_block), ("full_per_block", full_per_block)]:
        counter[0] = 0
        fn()
        evals = counter[0]
        results[name] = (evals, timed(fn, args.repeats))
    for h in handles:
        h.remove()

    print(f"model: {which}; {L} blocks; {args.prompts} {source}, padded length {enc['input_ids'].shape[1]}; "
          f"torch threads: {torch.get_num_threads()}")
    for name, (evals, secs) in results.items():
        print(f"  {name:15s} block evaluations {evals:4d}   wall {secs * 1e3:8.1f} ms")
    e1, t1 = results["one_pass"]
    for name in ("per_block", "full_per_block"):
        e, t = results[name]
        print(f"ratio {name}/one_pass: block evaluations {e / e1:.2f}x, wall time {t / t1:.2f}x")


if __name__ == "__main__":
    main()
