"""alignment(): cos(h, u) and ‖h‖ per block beside uniform and Gaussian null baselines, in one pass."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rmu_analysis import alignment, capture, random_direction, steer
from rmu_analysis.cosines import DIRECTIONS, Alignment, cosine
from rmu_analysis.models import decoder_blocks
from rmu_analysis import testing


PROMPTS = ["The city of Varon lies on the river Elm.", "Answer: B", "Question: which host does the pathogen infect?"]
D = 32


def test_cosine_of_vector_with_itself_is_one():
    v = torch.randn(5, 64)
    np.testing.assert_allclose(cosine(v, v[2])[2], 1.0, rtol=1e-6)
    np.testing.assert_allclose(cosine(v, -v[2])[2], -1.0, rtol=1e-6)


def test_steered_states_are_perfectly_aligned_with_u(tiny_llama):
    u = random_direction(D, seed=0)
    with steer(tiny_llama, 1, 6.5 * u):
        res = alignment(tiny_llama, PROMPTS, u, layers=[1, 2])
    np.testing.assert_allclose(res.cos(1, "u", "token"), 1.0, atol=1e-6)
    np.testing.assert_allclose(res.cos(1, "u", "prompt"), 1.0, atol=1e-6)
    np.testing.assert_allclose(res.norm(1, "token"), 6.5, rtol=1e-5)
    # the nulls see the same (constant) state: cos with u′ is cos(u, u′), not 1
    np.testing.assert_allclose(res.cos(1, "uniform_null", "prompt"), float(cosine(u, res.directions["uniform_null"])),
                               rtol=1e-5)
    assert res.cos(2, "u", "token").max() < 1.0


def test_matches_capture_and_counts(tiny_llama):
    u = random_direction(D, seed=0)
    res = alignment(tiny_llama, PROMPTS, u, layers="all", batch_size=2)
    cap = capture(tiny_llama, PROMPTS, layers="all")
    n_tok = int(cap.token_mask.sum())
    assert res.token_cos["u"].shape == (4, n_tok) and res.prompt_norm.shape == (4, 3)
    for l in range(4):
        np.testing.assert_allclose(res.cos(l, "u", "prompt"), cosine(cap.mean(l), u).numpy(), atol=1e-5)
        np.testing.assert_allclose(res.norm(l, "prompt"), cap.mean(l).norm(dim=-1).numpy(), rtol=1e-5)
        np.testing.assert_allclose(np.sort(res.norm(l, "token")),
                                   np.sort(cap.hidden[l][cap.token_mask].norm(dim=-1).numpy()), rtol=1e-5)
    assert res.token_position[res.token_prompt == 1].tolist() == list(range(int(cap.token_mask[1].sum())))
    assert isinstance(res, Alignment)
    tok_frame = res.to_frame("token")
    assert len(tok_frame) == 4 * len(DIRECTIONS) * n_tok
    assert set(res.summary().columns) >= {"layer", "cos_u_mean", "cos_gaussian_null_mean", "norm_mean"}


def test_one_forward_pass_for_all_blocks(tiny_llama):
    counts = [0] * 4
    handles = [b.register_forward_hook(lambda m, a, o, i=i: counts.__setitem__(i, counts[i] + 1))
               for i, b in enumerate(decoder_blocks(tiny_llama))]
    try:
        alignment(tiny_llama, PROMPTS, random_direction(D, seed=0), layers=[0, 2])
    finally:
        for h in handles:
            h.remove()
    assert counts == [1, 1, 1, 0]


@pytest.fixture()
def wide_llama(tiny_tokenizer):
    return testing.tiny_llama(len(tiny_tokenizer), n_layers=2, hidden=256, seed=1, tokenizer=tiny_tokenizer)


def test_gaussian_null_is_near_zero_and_uniform_null_is_not(wide_llama, tiny_tokenizer):
    model = wide_llama
    d = 256
    u = random_direction(d, seed=0)
    res = alignment(model, PROMPTS * 3, u, layers="all", tokenizer=tiny_tokenizer)
    for l in res.layers:
        g = res.cos(l, "gaussian_null", "token")
        assert abs(g.mean()) < 3 / math.sqrt(d)  # isotropic direction: cos ≈ 0 ± 1/sqrt(d)
        assert g.std() < 3 / math.sqrt(d)
    # two independent uniform directions are far from orthogonal (≈ 0.75, docs/paper.md)
    assert abs(float(cosine(u, res.directions["uniform_null"])) - 0.75) < 0.06


def test_bad_inputs(tiny_llama):
    u = random_direction(D, seed=0)
    with pytest.raises(ValueError, match="empty"):
        alignment(tiny_llama, [], u)
    with pytest.raises(ValueError, match="hidden size is 32"):
        alignment(tiny_llama, PROMPTS, torch.ones(31))
    with pytest.raises(ValueError, match="non-finite"):
        alignment(tiny_llama, PROMPTS, torch.full((D,), float("inf")))
    with pytest.raises(ValueError, match="zero vector"):
        alignment(tiny_llama, PROMPTS, torch.zeros(D))
    with pytest.raises(ValueError, match=r"\(0–3\)"):
        alignment(tiny_llama, PROMPTS, u, layers=[5])
    with pytest.raises(ValueError, match="null_seed"):
        alignment(tiny_llama, PROMPTS, random_direction(D, seed=7), null_seed=7)
