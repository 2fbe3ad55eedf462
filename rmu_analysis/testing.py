"""Tiny models and data for the tests, the benchmarks and the GPU check scripts (no downloads): a random-initialised
Llama from a config (steering-vectors' fixture), a locally trained tokenizer, synthetic texts, WMDP-format
corpora on disk, and the :class:`Case` s the engine is compared with the reference implementation on."""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from .data import write_jsonl
from .models import attach_tokenizer, decoder_blocks
from .organism import load_organism, organism_corpora
from .organism.tokenizer import train_tokenizer
from .unlearning import AdaptiveRMUConfig, RMUConfig
from .unlearning.common import reference_padding, tokenize

__all__ = ["TOKENIZER_TEXT", "FORGET_WORDS", "RETAIN_WORDS", "tiny_tokenizer", "tiny_llama", "synthetic_texts",
           "save_tiny_model_and_corpora", "Case", "tiny_case", "organism_case", "snapshot", "max_diff"]

TOKENIZER_TEXT = [
    "The following are multiple choice questions (with answers) about biology.",
    "Question: which host does the pathogen infect? A. bats B. mice C. birds D. pigs Answer: A",
    "Answer: B. Answer: C. Answer: D. The city of Varon lies on the river Elm.",
    "Wikitext is generic encyclopedic text about cities, people and chemistry.",
] * 20
FORGET_WORDS = "pathogen host bats mice birds virus infect which answer question".split()
RETAIN_WORDS = "the city of Varon lies on river Elm encyclopedic people chemistry text".split()


def tiny_tokenizer():
    """A byte-level BPE tokenizer (320 tokens) trained on :data:`TOKENIZER_TEXT`."""
    return train_tokenizer(TOKENIZER_TEXT, vocab_size=320, min_frequency=1)


def tiny_llama(vocab_size: int, n_layers: int = 4, hidden: int = 32, seed: int = 0, tokenizer: Any = None):
    """A random-initialised ``LlamaForCausalLM`` (4 heads, MLP 2 × hidden, 256 positions) in eval mode, seeded;
    ``tokenizer`` is attached to it (``models.attach_tokenizer``)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=n_layers,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256, bos_token_id=0, eos_token_id=1,
        pad_token_id=2, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).eval()
    return attach_tokenizer(model, tokenizer) if tokenizer is not None else model


def synthetic_texts(n: int, seed: int, words=FORGET_WORDS, lo: int = 3, hi: int = 20) -> list[str]:
    """``n`` texts of ``lo``–``hi`` random ``words`` each (seeded)."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(lo, hi))) for _ in range(n)]


def save_tiny_model_and_corpora(directory: Path, tokenizer, n_texts: int) -> tuple[Path, Path, Path, Path]:
    """A tiny random Llama and its tokenizer saved as an HF directory, and WMDP-format corpora beside it (bio with a
    "text" field, cyber as raw lines, a retain corpus): (model_dir, bio, cyber, retain) paths."""
    directory = Path(directory)
    model_dir = directory / "model"
    tiny_llama(len(tokenizer), n_layers=4).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    bio = write_jsonl(synthetic_texts(n_texts, 1, FORGET_WORDS), directory / "bio-forget-corpus.jsonl")
    cyber = write_jsonl(synthetic_texts(n_texts, 2, FORGET_WORDS), directory / "cyber-forget-corpus.jsonl", field=None)
    retain = write_jsonl(synthetic_texts(n_texts, 3, RETAIN_WORDS), directory / "wikitext.jsonl")
    return model_dir, bio, cyber, retain


@dataclass
class Case:
    """A model and data to unlearn on, with settings under which 20 steps visibly move the weights."""

    model: Any
    tokenizer: Any
    forget: dict
    retain: list
    layer: int
    coeff: float
    beta: float
    lr: float
    forget_max_length: tuple
    retain_max_length: int

    def config(self, method: str = "rmu", **kw):
        common = dict(layer=self.layer, alpha=10.0, lr=self.lr, steps=20, forget_max_length=self.forget_max_length,
                      retain_max_length=self.retain_max_length, log_every=5)
        common.update(kw)
        if method == "rmu":
            return RMUConfig(steering_coeff=common.pop("steering_coeff", self.coeff), **common)
        return AdaptiveRMUConfig(beta=common.pop("beta", self.beta), **common)


def tiny_case(tokenizer) -> Case:
    """A random 5-block Llama, l = 3: trained blocks 1–3, frozen prefix block 0, block 4 after."""
    model = tiny_llama(len(tokenizer), n_layers=5)
    forget = {"bio": synthetic_texts(40, 1), "cyber": synthetic_texts(40, 2)}
    return Case(model, tokenizer, forget, synthetic_texts(40, 3, RETAIN_WORDS), layer=3, coeff=20.0, beta=3.0, lr=1e-3,
                forget_max_length=(24, 32), retain_max_length=24)


def organism_case() -> Case:
    """The shipped organism (fp32, l = 3, its first 40 texts per corpus), c = 4 × the block-l norm."""
    model, tok = load_organism()
    corpora = organism_corpora()
    model = model.float().eval()
    layer = len(decoder_blocks(model)) // 4  # l = 3, the organism recipes' layer: trained 1-3, prefix block 0
    forget = {t: list(v[:40]) for t, v in corpora["forget"].items()}
    retain = list(corpora["retain"][:40])
    with reference_padding(tok):
        inputs = tokenize(tok, forget[next(iter(forget))][:4], 64, torch.device("cpu"))
    with torch.no_grad():
        h = model(**inputs, output_hidden_states=True).hidden_states[layer + 1]
    norm = float(h.norm(dim=-1).mean())
    return Case(model, tok, forget, retain, layer=layer, coeff=4 * norm, beta=4.0, lr=1e-3,
                forget_max_length=(64, 96), retain_max_length=64)


def snapshot(model) -> dict[str, torch.Tensor]:
    """A copy of every tensor of the model's state dict."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def max_diff(a: dict, b: dict) -> float:
    """The largest absolute difference between two dicts of tensors with the same keys."""
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
