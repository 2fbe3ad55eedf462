"""rmu_analysis.mechanism on tiny random Llamas: Assumption 1, Proposition 1 against a model, the normalised
alignment, Φ with noise at every token, Eq. 19 on real prompts. Expected values are computed from the model's own
states (or from the definition of the quantity), never pinned."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from rmu_analysis import mechanism as M
from rmu_analysis import testing, theory
from rmu_analysis.activations import capture
from rmu_analysis.models import decoder_blocks
from rmu_analysis.steering import random_direction, steer

D = 32


@pytest.fixture(scope="module")
def tok():
    return testing.tiny_tokenizer()


@pytest.fixture()
def model(tok):
    return testing.tiny_llama(len(tok), n_layers=4, tokenizer=tok)


@pytest.fixture(scope="module")
def texts():
    return testing.synthetic_texts(24, 1)


@pytest.fixture(scope="module")
def u():
    return random_direction(D, seed=0)


# ------------------------------------------------------------------------------------------- Assumption 1
def test_assumption1_steered_model_is_c_u(model, tok, texts, u):
    c = 8.0
    retain = testing.synthetic_texts(12, 3, testing.RETAIN_WORDS)
    with steer(model, 1, u, coeff=c):
        res = M.assumption1(model, tok, texts, 1, u, c, retain=retain)
    forget = res.sets["forget"]
    assert forget.share.min() > 1 - 1e-5 and np.abs(forget.scale - 1).max() < 1e-5
    assert forget.residual.max() < 1e-8 and forget.spread.max() < 1e-8
    assert res.holds()["held"]
    table = res.summary()
    assert set(table["set"]) == {"forget", "retain"} and len(table) == 8


def test_assumption1_unsteered_model_fails(model, tok, texts, u):
    res = M.assumption1(model, tok, texts, 1, u, 8.0)
    check = res.holds()
    assert not check["held"]
    assert check["share"].high < 0.5 and check["residual"].low > 0.5


def test_assumption1_noise_matches_eta(model, tok, texts, u):
    """Steered to c·u + ε, ε ~ N(0, ηI): residual and spread ≈ d·η / c² (the definition, within the interval)."""
    c, eta = 8.0, 0.01
    with steer(model, 1, u, coeff=c, noise=eta, seed=0):
        res = M.assumption1(model, tok, texts, 1, u, c)
    expected = D * eta / c ** 2
    for m in ("residual", "spread"):
        ci = res.sets["forget"].interval(m)
        assert abs(ci.estimate - expected) < 0.1 * expected, (m, ci)
    assert res.sets["forget"].interval("scale").contains(1.0)


def test_assumption1_excludes_bos_and_padding(model, tok, texts, u):
    res = M.assumption1(model, tok, texts, 1, u, 8.0)
    n_tokens = sum(len(tok(t)["input_ids"]) - 1 for t in texts)  # BOS left out, no padding
    assert res.sets["forget"].share.size == n_tokens


def test_assumption1_bad_input(model, tok, texts, u):
    with pytest.raises(ValueError, match="non-zero"):
        M.assumption1(model, tok, texts, 1, u, 0.0)
    with pytest.raises(ValueError, match="hidden size"):
        M.assumption1(model, tok, texts, 1, torch.ones(5), 1.0)
    with pytest.raises(ValueError, match="at least 2"):
        M.assumption1(model, tok, texts[:1], 1, u, 1.0)


# ----------------------------------------------------------------------------------------- Proposition 1
def test_proposition1_trained_predicts_a_steered_model(model, tok, texts, u):
    c, eta = 8.0, 0.01
    with steer(model, 1, u, coeff=c, noise=eta, seed=1):
        res = M.proposition1_trained(model, tok, texts, 1, u, c, exclude_bos=False, n_boot=300, draws=500)
    ci = res.intervals
    assert abs(res.noise_trace - D * eta) < 0.1 * D * eta  # the measured noise is the injected one
    assert ci["mean_corr"].low > 0.99
    assert ci["var_ratio"].contains(1.0), ci["var_ratio"]
    assert ci["max_logit_mean"].contains(float(np.mean(res.predicted_max_logit)))


def test_proposition1_trained_fails_on_an_unsteered_model(model, tok, texts, u):
    res = M.proposition1_trained(model, tok, texts, 1, u, 8.0, n_boot=300, draws=200)
    assert not res.intervals["var_ratio"].contains(1.0)
    assert res.intervals["mean_corr"].high < 0.9
    assert set(res.summary()["quantity"]) >= {"mean_corr", "var_ratio", "max_logit_mean"}


# -------------------------------------------------------------------------------------------- alignment
def test_normalized_alignment_scores_c_u_one_and_unrelated_zero(u):
    u_null = random_direction(D, "uniform", seed=99)
    assert torch.allclose(M.normalized_alignment(5.0 * u, u, u_null), torch.tensor(1.0), atol=1e-5)
    assert torch.allclose(M.centered_cosine(5.0 * u, u), torch.tensor(1.0), atol=1e-5)
    g = torch.randn(4000, D, generator=torch.Generator().manual_seed(0))
    for score in (M.normalized_alignment(g, u, u_null), M.centered_cosine(g, u)):
        assert abs(float(score.mean())) < 0.02
    others = torch.stack([random_direction(D, "uniform", seed=1000 + i) for i in range(2000)])
    raw = float((others @ u).mean())
    assert raw > 0.6  # the problem: unrelated uniform states have a large raw cosine
    assert abs(float(M.normalized_alignment(others, u, u_null).mean())) < 0.1
    assert abs(float(M.centered_cosine(others, u).mean())) < 0.05
    with pytest.raises(ValueError, match="same direction"):
        M.normalized_alignment(g, u, u)


def test_u_alignment_on_a_steered_model(model, tok, texts, u):
    with steer(model, 1, u, coeff=6.0):
        res = M.u_alignment(model, tok, texts, u, [1, 2])
    s = res.summary().set_index(["layer", "measure"])
    assert s.loc[(1, "normalized"), "estimate"] == pytest.approx(1.0, abs=1e-4)
    assert s.loc[(1, "centered"), "estimate"] == pytest.approx(1.0, abs=1e-4)
    plain = M.u_alignment(model, tok, texts, u, [1]).summary().set_index("measure")
    assert plain.loc["normalized", "high"] < 0.5


# ------------------------------------------------------------------------------------------------- Φ, C4
def _uniform_attention_block(model, k: int) -> None:
    """Block k: no MLP, uniform causal attention (q = 0) with a large output projection: its update is the average
    of the value vectors of all earlier tokens."""
    block = decoder_blocks(model)[k]
    with torch.no_grad():
        block.mlp.down_proj.weight.zero_()
        block.self_attn.q_proj.weight.zero_()
        block.self_attn.o_proj.weight.mul_(100)


def test_all_position_noise_differs_from_one_token_noise(tok):
    """With independent noise at every token, uniform attention averages the noise of ~t tokens, so Φ must be well
    below the one-token measurement (where the single token's noise passes the attention undamped)."""
    model = testing.tiny_llama(len(tok), n_layers=3, tokenizer=tok)
    _uniform_attention_block(model, 1)
    texts = testing.synthetic_texts(16, 1, lo=10, hi=20)
    rho = 0.1
    h_hat, _ = theory.mean_representation(model, texts, 0, tokenizer=tok, exclude_bos=True)
    eta = (rho * float(h_hat.norm())) ** 2 / D  # the same relative size of ξ for the one token
    one = theory.noise_sensitivity(model, texts, 0, eta, upto=1, samples=200, seed=0, tokenizer=tok, exclude_bos=True)
    every = M.token_noise_sensitivity(model, tok, texts, 0, rho, upto=1, samples=4).to_frame()
    assert every["high"].iloc[0] < 0.8 * one.phi_mean[0]


def test_token_noise_sensitivity_shapes_and_trend(model, tok, texts):
    res = M.token_noise_sensitivity(model, tok, texts, 0, 0.1, samples=3)
    assert res.phi.shape == (3, len(texts), 3) and res.ks == (1, 2, 3)
    frame = res.to_frame()
    assert (frame["low"] <= frame["phi"]).all() and (frame["phi"] <= frame["high"]).all()
    trend = res.trend(n_boot=200)
    assert trend.first_k == 1 and trend.last_k == 3
    with pytest.raises(ValueError, match="last"):
        M.token_noise_sensitivity(model, tok, texts, 3, 0.1)
    with pytest.raises(ValueError, match="scale"):
        M.token_noise_sensitivity(model, tok, texts, 0, 0.1, scale="weird")


def test_depth_trend_verdict():
    rng = np.random.default_rng(0)
    ks = [1, 2, 3, 4]
    falling = np.array([4.0, 3.0, 2.0, 1.0]) + rng.normal(0, 0.1, (20, 4))
    assert M.depth_trend(ks, falling, n_boot=300).decreases
    rising = falling[:, ::-1]
    t = M.depth_trend(ks, rising, n_boot=300)
    assert not t.decreases and t.rho.estimate > 0
    flat = rng.normal(1.0, 0.1, (20, 4))
    assert not M.depth_trend(ks, flat, n_boot=300).decreases
    with pytest.raises(ValueError, match="n_prompts"):
        M.depth_trend(ks, falling[:, :3])


# ------------------------------------------------------------------------------------------------ Eq. 19
def test_eq19_on_identity_blocks_is_the_weighted_projection(tok, u):
    """Blocks after l that do nothing (no MLP, no attention output): g = identity, so Φ_k(c) = mean_t
    ‖c·u − h_t‖² / ‖h_t‖² and Eq. 19's c* is its exact minimiser, Σ_t w_t ⟨u, h_t⟩ / Σ_t w_t (w_t = 1/‖h_t‖²,
    token means per prompt), computed here from the captured states."""
    model = testing.tiny_llama(len(tok), n_layers=3, tokenizer=tok)
    for k in (1, 2):
        with torch.no_grad():
            decoder_blocks(model)[k].mlp.down_proj.weight.zero_()
            decoder_blocks(model)[k].self_attn.o_proj.weight.zero_()
    texts = testing.synthetic_texts(12, 1)
    cap = capture(model, texts, [0], exclude_bos=True)
    h, mask = cap.hidden[0].float(), cap.token_mask.float()
    h_bar = cap.tokens(0).mean(0)
    u = h_bar / h_bar.norm() + 0.5 * u  # a u with a sizeable projection: c* of the order of ‖h‖ (well conditioned)
    u = u / u.norm()
    w = 1.0 / (h ** 2).sum(-1)
    n = mask.sum(-1)
    num = ((w * (h @ u)) * mask).sum(-1) / n
    den = (w * mask).sum(-1) / n
    expected = float(num.sum() / den.sum())
    res = M.token_optimal_coefficient(model, tok, texts, 0, u, upto=1)
    assert res.c_star[0] == pytest.approx(expected, rel=1e-3)
    spacing = float(np.diff(res.coeffs).max())
    if res.coeffs.min() <= expected <= res.coeffs.max():
        assert abs(res.c_grid[0] - expected) <= spacing
    frame = res.to_frame(n_boot=200)
    assert frame.loc[0, "c_star_low"] <= frame.loc[0, "c_star"] <= frame.loc[0, "c_star_high"]


def test_eq19_flags_and_noise(model, tok, texts, u):
    res = M.token_optimal_coefficient(model, tok, texts[:8], 0, u, upto=2, noise=0.1, samples=2,
                                      coeffs=np.linspace(0.05, 2.0, 9))
    assert res.phi.shape == (8, 2, 9) and res.phi_direction.shape == (8, 2, 9)
    assert (res.phi_direction >= 0).all() and (res.phi_direction <= 4 + 1e-6).all()
    frame = res.to_frame(n_boot=100)
    assert set(frame["zero_only_by_scale"]) <= {True, False}
    assert (frame["zero_only_by_scale"] <= frame["at_smallest"]).all()
    with pytest.raises(ValueError, match="at least 2"):
        M.token_optimal_coefficient(model, tok, texts, 0, u, coeffs=[1.0])
