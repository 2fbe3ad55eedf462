"""noise_sensitivity(): Φ(g^(l:k)) of Eq. 8–9, checked against steering + capture on a one-token input."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from rmu_analysis import capture, noise_sensitivity, steer
from rmu_analysis.models import attach_tokenizer, decoder_blocks
from rmu_analysis.theory import NoiseSensitivity, mean_representation


PROMPTS = ["The city of Varon lies on the river Elm.", "Answer: B", "Question: which host does the pathogen infect?"]
D = 32


def test_phi_is_zero_without_noise(tiny_llama):
    res = noise_sensitivity(tiny_llama, PROMPTS, 0, 0.0, samples=3)
    assert res.ks == (1, 2, 3)
    assert np.array_equal(res.phi, np.zeros((3, 3)))


def test_phi_equals_definition_via_steer_and_capture(tiny_llama):
    """g^(l:k)(x) = output of block k when block l outputs x; push ĥ and ĥ + ξ as one-token inputs."""
    layer = 1
    h_hat, count = mean_representation(tiny_llama, PROMPTS, layer)
    cap = capture(tiny_llama, PROMPTS, layers=[layer])
    torch.testing.assert_close(h_hat, cap.mean(layer).mean(0))
    assert count == 3
    xi = 0.05 * torch.randn(2, D, generator=torch.Generator().manual_seed(0))
    res = noise_sensitivity(tiny_llama, PROMPTS, layer, xi)
    one_token = torch.tensor([[0]])
    with steer(tiny_llama, layer, h_hat):
        clean = capture(tiny_llama, one_token, layers=[2, 3])
    for s in range(2):
        with steer(tiny_llama, layer, h_hat + xi[s]):
            noisy = capture(tiny_llama, one_token, layers=[2, 3])
        for j, k in enumerate(res.ks):
            g0, g1 = clean.hidden[k][0, 0], noisy.hidden[k][0, 0]
            expect = float((g1 - g0).pow(2).sum() / g0.pow(2).sum())
            assert res.phi[s, j] == pytest.approx(expect, rel=1e-4)
    assert res.noise is None and res.phi.shape == (2, 2)


def test_seeded_samples_upto_and_frame(tiny_llama):
    a = noise_sensitivity(tiny_llama, PROMPTS, 0, 0.01, upto=2, samples=4, seed=3)
    b = noise_sensitivity(tiny_llama, PROMPTS, 0, 0.01, upto=2, samples=4, seed=3)
    c = noise_sensitivity(tiny_llama, PROMPTS, 0, 0.01, upto=2, samples=4, seed=4)
    assert isinstance(a, NoiseSensitivity) and a.ks == (1, 2)
    assert np.array_equal(a.phi, b.phi) and not np.array_equal(a.phi, c.phi)
    assert (a.phi > 0).all() and a.noise == 0.01
    frame = a.to_frame()
    assert frame["k"].tolist() == [1, 2] and frame["depth"].tolist() == [1, 2]
    np.testing.assert_allclose(frame["phi_mean"], a.phi.mean(0))
    np.testing.assert_allclose(frame["phi_std"], a.phi.std(0, ddof=1))
    # more noise, more sensitivity (Φ scales with η to first order)
    big = noise_sensitivity(tiny_llama, PROMPTS, 0, 0.04, upto=2, samples=4, seed=3)
    assert (big.phi_mean > a.phi_mean).all()


def test_hooks_removed(tiny_llama):
    noise_sensitivity(tiny_llama, PROMPTS, 1, 0.01)
    assert sum(len(b._forward_hooks) + len(b._forward_pre_hooks) for b in decoder_blocks(tiny_llama)) == 0


def test_bad_inputs(tiny_llama):
    with pytest.raises(ValueError, match="empty"):
        noise_sensitivity(tiny_llama, [], 0, 0.1)
    with pytest.raises(ValueError, match="last of the model's 4 blocks"):
        noise_sensitivity(tiny_llama, PROMPTS, 3, 0.1)
    with pytest.raises(ValueError, match=r"out of range: this model has 4 decoder blocks \(0–3\)"):
        noise_sensitivity(tiny_llama, PROMPTS, 9, 0.1)
    with pytest.raises(ValueError, match="upto"):
        noise_sensitivity(tiny_llama, PROMPTS, 2, 0.1, upto=1)
    with pytest.raises(ValueError, match="variance"):
        noise_sensitivity(tiny_llama, PROMPTS, 0, float("nan"))
    with pytest.raises(ValueError, match="hidden size is 32"):
        noise_sensitivity(tiny_llama, PROMPTS, 0, torch.ones(8))
    with pytest.raises(ValueError, match="samples"):
        noise_sensitivity(tiny_llama, PROMPTS, 0, 0.1, samples=0)


def test_works_on_gpt2(tiny_tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tiny_tokenizer), n_positions=64, n_embd=32, n_layer=3,
                                       n_head=4, bos_token_id=0)).eval()
    attach_tokenizer(model, tiny_tokenizer)
    xi = 0.1 * torch.randn(1, 32, generator=torch.Generator().manual_seed(0))
    res = noise_sensitivity(model, PROMPTS, 0, xi)
    h_hat, _ = mean_representation(model, PROMPTS, 0)
    with steer(model, 0, h_hat):
        clean = capture(model, torch.tensor([[0]]), layers=[2])
    with steer(model, 0, h_hat + xi[0]):
        noisy = capture(model, torch.tensor([[0]]), layers=[2])
    g0, g1 = clean.hidden[2][0, 0], noisy.hidden[2][0, 0]
    assert res.phi[0, -1] == pytest.approx(float((g1 - g0).pow(2).sum() / g0.pow(2).sum()), rel=1e-4)
