"""measure_confidence(): MaxLogit / max prob / entropy, batched == one prompt at a time, greedy == no-cache greedy."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from rmu_analysis import measure_confidence
from rmu_analysis.confidence import METRICS, Confidence, after_eos_mask, confidence_from_logits


PROMPTS = [
    "The following are multiple choice questions (with answers) about biology.",
    "Answer:",
    "Question: which host does the pathogen infect? A. bats B. mice",
    "The city of Varon",
    "Wikitext is generic",
]


def test_metrics_equal_hand_computation():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [-1.0, 5.0, float("-inf")]])
    got = confidence_from_logits(logits)
    z = math.e + math.e ** 2 + math.e ** 3
    p = [math.e / z, math.e ** 2 / z, math.e ** 3 / z]
    assert got["max_logit"].tolist() == [3.0, 0.0, 5.0]
    assert got["token"].tolist() == [2, 0, 1]
    np.testing.assert_allclose(got["max_prob"], [p[2], 1 / 3, 1 / (1 + math.e ** -6)], rtol=1e-6)
    q = 1 / (1 + math.e ** -6)
    np.testing.assert_allclose(
        got["entropy"], [-sum(x * math.log(x) for x in p), math.log(3), -(q * math.log(q) + (1 - q) * math.log(1 - q))],
        rtol=1e-5)
    half = confidence_from_logits(logits[:2].half())
    assert half["max_logit"].dtype == torch.float32


def loop(model, prompts, **kw):
    return [measure_confidence(model, [p], **kw) for p in prompts]


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("generate", [0, 4])
def test_batched_equals_one_prompt_at_a_time(tiny_llama, side, generate):
    batched = measure_confidence(tiny_llama, PROMPTS, generate=generate, batch_size=3, padding_side=side)
    single = loop(tiny_llama, PROMPTS, generate=generate)
    steps = max(generate, 1)
    assert batched.max_logit.shape == (len(PROMPTS), steps)
    for i, one in enumerate(single):
        assert np.array_equal(batched.tokens[i], one.tokens[0])
        for m in METRICS:
            np.testing.assert_allclose(getattr(batched, m)[i], getattr(one, m)[0], rtol=0, atol=1e-5)


def test_greedy_matches_full_recompute_without_cache(tiny_llama, tiny_tokenizer):
    res = measure_confidence(tiny_llama, PROMPTS[:2], generate=5)
    for i, prompt in enumerate(PROMPTS[:2]):
        ids = tiny_tokenizer(prompt, return_tensors="pt")["input_ids"]
        for step in range(5):
            with torch.no_grad():
                logits = tiny_llama(ids).logits[0, -1]
            assert math.isclose(res.max_logit[i, step], float(logits.max()), abs_tol=1e-5)
            assert res.tokens[i, step] == int(logits.argmax())
            ids = torch.cat([ids, logits.argmax().view(1, 1)], dim=1)
    assert res.completions is not None and len(res.completions) == 2


def test_after_eos_marks_tokens_following_the_first_eos():
    tokens = np.array([[5, 1, 7, 1], [1, 3, 3, 3], [4, 4, 4, 4]])
    expect = [[False, False, True, True], [False, True, True, True], [False, False, False, False]]
    assert after_eos_mask(tokens, 1).tolist() == expect
    assert not after_eos_mask(tokens, None).any()


def test_result_tables(tiny_llama):
    res = measure_confidence(tiny_llama, PROMPTS[:3], generate=2)
    assert isinstance(res, Confidence) and len(res) == 3
    frame = res.to_frame()
    assert len(frame) == 6 and {"prompt", "step", "token", *METRICS, "after_eos"} <= set(frame.columns)
    np.testing.assert_allclose(frame["max_logit"], res.max_logit.ravel())
    summary = res.summary()
    assert list(summary.index) == list(METRICS)
    assert math.isclose(summary.loc["max_logit", "mean"], res.max_logit.mean())
    per_prompt = res.per_prompt()
    np.testing.assert_allclose(per_prompt["entropy"], res.entropy.mean(1))
    assert res.values("max_prob").shape == (6,)


def test_bad_inputs(tiny_llama, tiny_tokenizer):
    with pytest.raises(ValueError, match="empty"):
        measure_confidence(tiny_llama, [])
    with pytest.raises(ValueError, match="generate"):
        measure_confidence(tiny_llama, PROMPTS, generate=-1)
    with pytest.raises(TypeError, match="strings"):
        measure_confidence(tiny_llama, ["fine", None])
    long = " ".join(["Varon"] * 400)
    with pytest.warns(UserWarning, match="truncated on the left"):
        res = measure_confidence(tiny_llama, [long, "Answer:"], generate=3)
    assert res.max_logit.shape == (2, 3) and np.isfinite(res.max_logit).all()
    tok = copy.deepcopy(tiny_tokenizer)
    tok.pad_token = None
    with pytest.warns(UserWarning, match="no pad token"):
        res = measure_confidence(tiny_llama, PROMPTS[:2], tokenizer=tok)
    assert np.isfinite(res.entropy).all()


def test_gpt2_batched_equals_loop(tiny_tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tiny_tokenizer), n_positions=64, n_embd=32, n_layer=2,
                                       n_head=4)).eval()
    for side in ("left", "right"):
        batched = measure_confidence(model, PROMPTS, tiny_tokenizer, generate=3, padding_side=side)
        for i, p in enumerate(PROMPTS):
            one = measure_confidence(model, [p], tiny_tokenizer, generate=3)
            assert np.array_equal(batched.tokens[i], one.tokens[0])
            np.testing.assert_allclose(batched.max_logit[i], one.max_logit[0], rtol=0, atol=1e-5)
