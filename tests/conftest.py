"""Shared fixtures: tiny random-initialised models and a locally trained tokenizer (no downloads)."""
from __future__ import annotations

import pytest
import torch

from rmu_analysis.organism.tokenizer import train_tokenizer



@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run several times faster on one thread (CI has 2 cores); tests that want more set it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

TOKENIZER_TEXT = [
    "The following are multiple choice questions (with answers) about biology.",
    "Question: which host does the pathogen infect? A. bats B. mice C. birds D. pigs Answer: A",
    "Answer: B. Answer: C. Answer: D. The city of Varon lies on the river Elm.",
    "Wikitext is generic encyclopedic text about cities, people and chemistry.",
] * 20


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return train_tokenizer(TOKENIZER_TEXT, vocab_size=320, min_frequency=1)


def make_tiny_llama(vocab_size: int, n_layers: int = 4, hidden: int = 32, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=n_layers,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256, bos_token_id=0, eos_token_id=1,
        pad_token_id=2, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture()
def tiny_llama(tiny_tokenizer):
    model = make_tiny_llama(len(tiny_tokenizer))
    model._rmu_tokenizer = tiny_tokenizer
    return model


def save_tiny_model_and_corpora(tmp_path, tokenizer, n_texts: int):
    """A tiny random Llama and its tokenizer saved as an HF directory, and WMDP-format corpora beside it (bio with a
    "text" field, cyber as raw lines, a retain corpus): (model_dir, bio, cyber, retain) paths."""
    from rmu_analysis.data import write_jsonl

    from test_unlearning import FORGET_WORDS, RETAIN_WORDS, synthetic_texts

    model_dir = tmp_path / "model"
    make_tiny_llama(len(tokenizer), n_layers=4).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    bio = write_jsonl(synthetic_texts(n_texts, 1, FORGET_WORDS), tmp_path / "bio-forget-corpus.jsonl")
    cyber = write_jsonl(synthetic_texts(n_texts, 2, FORGET_WORDS), tmp_path / "cyber-forget-corpus.jsonl", field=None)
    retain = write_jsonl(synthetic_texts(n_texts, 3, RETAIN_WORDS), tmp_path / "wikitext.jsonl")
    return model_dir, bio, cyber, retain
