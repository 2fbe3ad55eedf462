"""random_direction() and steer(): the steered block output equals the requested vector; hooks never leak."""
from __future__ import annotations

import math

import pytest
import torch

from rmu_analysis import capture, random_direction, steer
from rmu_analysis.models import decoder_blocks


PROMPTS = ["The city of Varon lies on the river Elm.", "Answer: B"]
D = 32  # hidden size of the tiny Llama


def hooks_left(model):
    return sum(len(b._forward_hooks) for b in decoder_blocks(model))


# --- random_direction -------------------------------------------------------------------------------------------

def test_uniform_direction_is_the_reference_construction():
    u = random_direction(D, "uniform", seed=3)
    ref = torch.rand(D, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(u, ref / ref.norm(), rtol=0, atol=0)
    assert u.dtype == torch.float32 and (u > 0).all()
    assert math.isclose(float(u.norm()), 1.0, rel_tol=1e-6)
    assert torch.equal(u, random_direction(D, seed=3))
    assert not torch.equal(u, random_direction(D, seed=4))
    gen = torch.Generator().manual_seed(3)
    assert torch.equal(random_direction(D, generator=gen), u)
    assert random_direction(D, seed=3, dtype=torch.float64).dtype == torch.float64


def test_gaussian_direction_is_unit_and_signed():
    g = random_direction(4096, "gaussian", seed=0)
    assert math.isclose(float(g.norm()), 1.0, rel_tol=1e-6)
    assert 0.4 < float((g > 0).float().mean()) < 0.6


def test_uniform_directions_are_far_from_orthogonal():
    # E[x·y] / E|x|² = (1/4) / (1/3) = 0.75 (docs/paper.md: ≈ 0.75); with all-ones: (1/2)/sqrt(1/3) ≈ 0.866
    d = 4096
    u1, u2 = random_direction(d, seed=1), random_direction(d, seed=2)
    assert abs(float(u1 @ u2) - 0.75) < 0.02
    assert abs(float(u1.sum() / math.sqrt(d)) - math.sqrt(3) / 2) < 0.02
    g = random_direction(d, "gaussian", seed=3)
    assert abs(float(u1 @ g)) < 4 / math.sqrt(d)


def test_random_direction_errors():
    with pytest.raises(ValueError, match="seed"):
        random_direction(D)
    with pytest.raises(ValueError, match="uniform"):
        random_direction(D, "normal", seed=0)
    with pytest.raises(ValueError, match="positive"):
        random_direction(0, seed=0)


# --- steer ------------------------------------------------------------------------------------------------------

def test_replace_sets_block_output_to_vector_and_is_removed(tiny_llama):
    v = 6.5 * random_direction(D, seed=0)
    before = capture(tiny_llama, PROMPTS, layers=[1, 3])
    with steer(tiny_llama, 1, v):
        inside = capture(tiny_llama, PROMPTS, layers=[1, 3])
    after = capture(tiny_llama, PROMPTS, layers=[1, 3])
    assert torch.equal(inside.hidden[1], v.expand_as(inside.hidden[1]))
    assert not torch.allclose(inside.hidden[3], before.hidden[3])
    assert torch.equal(after.hidden[3], before.hidden[3])
    assert hooks_left(tiny_llama) == 0


def test_coeff_scales_the_vector(tiny_llama):
    u = random_direction(D, seed=0)
    with steer(tiny_llama, 0, u, coeff=4.0):
        cap = capture(tiny_llama, PROMPTS, layers=[0])
    torch.testing.assert_close(cap.hidden[0][0, 0], 4.0 * u)


def test_add_mode_and_positions(tiny_llama):
    v = random_direction(D, "gaussian", seed=1)
    base = capture(tiny_llama, PROMPTS, layers=[2]).hidden[2]
    with steer(tiny_llama, 2, v, mode="add", positions=slice(0, 2)):
        added = capture(tiny_llama, PROMPTS, layers=[2]).hidden[2]
    torch.testing.assert_close(added[:, :2], base[:, :2] + v, rtol=0, atol=1e-6)
    assert torch.equal(added[:, 2:], base[:, 2:])
    with steer(tiny_llama, 2, v, positions=[-1]):
        last = capture(tiny_llama, PROMPTS, layers=[2]).hidden[2]
    assert torch.equal(last[:, -1], v.expand(2, D)) and torch.equal(last[:, :-1], base[:, :-1])
    mask = torch.zeros(base.shape[:2], dtype=torch.bool)
    mask[0, 3] = mask[1, 1] = True
    with steer(tiny_llama, 2, v, positions=mask):
        masked = capture(tiny_llama, PROMPTS, layers=[2]).hidden[2]
    assert torch.equal(masked[mask], v.expand(2, D)) and torch.equal(masked[~mask], base[~mask])


def test_noise_has_variance_eta_and_is_seeded(tiny_llama):
    v = 2.0 * random_direction(D, seed=0)
    eta = 0.04
    with steer(tiny_llama, 1, v, noise=eta, seed=7):
        a = capture(tiny_llama, PROMPTS, layers=[1]).hidden[1]
    with steer(tiny_llama, 1, v, noise=eta, seed=7):
        b = capture(tiny_llama, PROMPTS, layers=[1]).hidden[1]
    assert torch.equal(a, b)
    eps = (a - v).flatten()  # 2 × 10 × 32 draws
    assert abs(float(eps.mean())) < 0.03
    assert abs(float(eps.var()) / eta - 1) < 0.2


def test_steering_changes_generation_and_works_with_kv_cache(tiny_llama):
    ids = torch.tensor([[0, 5, 9, 12]])
    v = 30.0 * random_direction(D, "gaussian", seed=2)
    with steer(tiny_llama, 0, v):
        out = tiny_llama.generate(ids, max_new_tokens=3, do_sample=False, output_logits=True,
                                  return_dict_in_generate=True, eos_token_id=None, pad_token_id=2)
    # with every block-0 output replaced by v, the logits no longer depend on the input: all steps agree
    first = out.logits[0]
    for step in out.logits[1:]:
        torch.testing.assert_close(step, first, rtol=0, atol=1e-4)
    assert hooks_left(tiny_llama) == 0


def test_hook_removed_on_exception(tiny_llama):
    with pytest.raises(RuntimeError, match="boom"):
        with steer(tiny_llama, 0, random_direction(D, seed=0)):
            raise RuntimeError("boom")
    assert hooks_left(tiny_llama) == 0
    mask = torch.ones(1, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="must match"):
        with steer(tiny_llama, 0, random_direction(D, seed=0), positions=mask):
            capture(tiny_llama, PROMPTS, layers=[0])
    assert hooks_left(tiny_llama) == 0


def test_bad_arguments(tiny_llama):
    u = random_direction(D, seed=0)
    with pytest.raises(ValueError, match=r"hidden size is 32"):
        with steer(tiny_llama, 0, torch.ones(16)):
            pass
    with pytest.raises(ValueError, match="non-finite"):
        with steer(tiny_llama, 0, torch.full((D,), float("nan"))):
            pass
    with pytest.raises(ValueError, match=r"out of range: this model has 4 decoder blocks \(0–3\)"):
        with steer(tiny_llama, 7, u):
            pass
    with pytest.raises(ValueError, match="variance"):
        with steer(tiny_llama, 0, u, noise=-1.0, seed=0):
            pass
    with pytest.raises(ValueError, match="seed"):
        with steer(tiny_llama, 0, u, noise=0.1):
            pass
    with pytest.raises(ValueError, match="replace"):
        with steer(tiny_llama, 0, u, mode="swap"):
            pass
    with pytest.raises(ValueError, match="out of range for a sequence"):
        with steer(tiny_llama, 0, u, positions=[40]):
            capture(tiny_llama, PROMPTS, layers=[0])
    assert hooks_left(tiny_llama) == 0


def test_output_hidden_states_sees_the_steered_output(tiny_llama, tiny_tokenizer):
    enc = tiny_tokenizer(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        tiny_llama(**enc, output_hidden_states=True)  # transformers 5 installs its capturing hooks now
        v = 3.0 * random_direction(D, seed=0)
        with steer(tiny_llama, 1, v):
            hs = tiny_llama(**enc, output_hidden_states=True).hidden_states
    assert torch.equal(hs[2], v.expand_as(hs[2]))
