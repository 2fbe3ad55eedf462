"""models.py on six architectures: save a tiny random model + local tokenizer, reload, find blocks, evaluate."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers as T
from torch import nn

from rmu_analysis.evaluation import evaluate_mcq
from rmu_analysis.models import (
    UnsupportedModelError,
    block_path,
    check_layer,
    check_layers,
    decoder_blocks,
    down_proj_pattern,
    load_model,
    num_blocks,
)

N_LAYERS = 2
SPECIAL = dict(bos_token_id=0, eos_token_id=1, pad_token_id=2)


def _config(arch: str, vocab: int):
    common = dict(vocab_size=vocab, **SPECIAL)
    decoder = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=N_LAYERS, num_attention_heads=4,
                   max_position_embeddings=256)
    if arch == "llama":
        return T.LlamaConfig(num_key_value_heads=2, **decoder, **common)
    if arch == "mistral":
        return T.MistralConfig(num_key_value_heads=2, sliding_window=None, **decoder, **common)
    if arch == "qwen2":
        return T.Qwen2Config(num_key_value_heads=2, **decoder, **common)
    if arch == "gpt2":
        return T.GPT2Config(n_embd=32, n_layer=N_LAYERS, n_head=4, n_positions=256, **common)
    if arch == "gpt_neox":
        return T.GPTNeoXConfig(**decoder, **common)
    if arch == "opt":
        return T.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=N_LAYERS, num_attention_heads=4,
                           max_position_embeddings=256, word_embed_proj_dim=32, **common)
    raise KeyError(arch)


ARCHS = {
    # arch: (class name, block path)
    "llama": ("LlamaForCausalLM", "model.layers"),
    "mistral": ("MistralForCausalLM", "model.layers"),
    "qwen2": ("Qwen2ForCausalLM", "model.layers"),
    "gpt2": ("GPT2LMHeadModel", "transformer.h"),
    "gpt_neox": ("GPTNeoXForCausalLM", "gpt_neox.layers"),
    "opt": ("OPTForCausalLM", "model.decoder.layers"),
}

RECORDS = [
    {"question": "Which host does the pathogen infect" + " first" * i + "?",
     "choices": ["bats", "mice", "birds of the city", "pigs"], "answer": i % 4}
    for i in range(5)
]


@pytest.fixture(scope="module")
def saved_dirs(tmp_path_factory, tiny_tokenizer):
    dirs = {}
    for arch in ARCHS:
        torch.manual_seed(0)
        model = T.AutoModelForCausalLM.from_config(_config(arch, len(tiny_tokenizer)))
        path = tmp_path_factory.mktemp(arch)
        model.save_pretrained(path)
        tiny_tokenizer.save_pretrained(path)
        dirs[arch] = path
    return dirs


@pytest.fixture(scope="module", params=list(ARCHS))
def loaded(request, saved_dirs):
    model, tok = load_model(saved_dirs[request.param])
    return request.param, model, tok


def test_load_model_finds_blocks(loaded):
    arch, model, tok = loaded
    cls, path = ARCHS[arch]
    assert type(model).__name__ == cls
    assert not model.training
    assert tok is not None and tok.pad_token is not None
    blocks = decoder_blocks(model)
    assert isinstance(blocks, nn.ModuleList) and len(blocks) == N_LAYERS == num_blocks(model)
    assert block_path(model) == path
    assert blocks is model.get_submodule(path)
    # the RMU-trained tensor exists in every block (Eq. 1)
    import re

    pat = re.compile(down_proj_pattern(model))
    for block in blocks:
        assert sum(bool(pat.search(name)) for name, _ in block.named_parameters()) == 1


def test_check_layer_errors(loaded):
    _, model, _ = loaded
    assert check_layer(model, 1) == 1
    assert check_layer(model, -1) == N_LAYERS - 1
    with pytest.raises(ValueError, match=r"layer 40 is out of range: this model has 2 decoder blocks \(0–1\)"):
        check_layer(model, 40)
    with pytest.raises(ValueError, match="out of range"):
        check_layer(model, -3)
    with pytest.raises(TypeError, match="must be an int"):
        check_layer(model, 1.0)
    assert check_layers(model, "all") == [0, 1]


@pytest.mark.parametrize("scoring", ["letter", "cloze"])
def test_evaluate_mcq_each_architecture(loaded, scoring):
    _, model, tok = loaded
    res = evaluate_mcq(model, tok, RECORDS, "biology", scoring=scoring, batch_size=3)
    n = len(RECORDS)
    assert res.n == n
    assert res.probs.shape == res.logliks.shape == res.logliks_norm.shape == (n, 4)
    assert res.predictions.shape == res.answers.shape == (n,)
    np.testing.assert_allclose(res.probs.sum(axis=1), 1.0, atol=1e-9)
    assert np.all(np.isfinite(res.logliks)) and np.all(res.logliks < 0)
    assert 0.0 <= res.accuracy <= 1.0
    assert res.accuracy == pytest.approx(float(np.mean(res.predictions == res.answers)))
    assert list(res.answers) == [r["answer"] for r in RECORDS]
    if scoring == "letter":
        assert (res.n_tokens == 1).all()  # " A".." D" are single tokens: one pass per question
    else:
        assert (res.n_tokens[:, 2] > 1).all()


def test_left_padding_matches_one_by_one(loaded):
    """position_ids from the mask: GPT-2's absolute positions would otherwise shift under left padding."""
    import copy

    _, model, tok = loaded
    tok = copy.deepcopy(tok)
    tok.padding_side = "left"
    batched = evaluate_mcq(model, tok, RECORDS, scoring="letter", batch_size=8)
    single = evaluate_mcq(model, tok, RECORDS, scoring="letter", batch_size=1)
    np.testing.assert_allclose(batched.logliks, single.logliks, atol=1e-4)


class _Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.stack = nn.ModuleList([nn.Linear(4, 4)])


@pytest.mark.parametrize("module", [nn.Linear(3, 3), _Custom()])
def test_unsupported_model_names_class(module):
    with pytest.raises(UnsupportedModelError, match=type(module).__name__):
        decoder_blocks(module)
    with pytest.raises(TypeError, match="cannot find the decoder blocks"):
        check_layer(module, 0)


def test_load_model_missing_dir(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(FileNotFoundError, match="no_such_model"):
        load_model(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(empty)


def test_load_model_dtype(saved_dirs):
    model, tok = load_model(saved_dirs["llama"], dtype="bf16", tokenizer=False)
    assert tok is None
    assert next(model.parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        load_model(saved_dirs["llama"], dtype="float8")
