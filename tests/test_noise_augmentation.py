"""Random noise augmentation of the retain term (``retain_noise``, arXiv 2501.19202) in the unlearning engine and
the reference: off at 0 (not one draw), seeded, relative to each token's norm, validated, saved with the config.
That the engine equals the reference with noise is in tests/test_unlearning.py (engine == reference)."""
from __future__ import annotations

import argparse
import dataclasses
import json

import pytest
import torch

from rmu_analysis.experiments.specs import RunSpec
from rmu_analysis.recipes import PRESETS, preset
from rmu_analysis.testing import max_diff, snapshot, tiny_case
from rmu_analysis.unlearning import (
    AdaptiveRMUConfig, GAConfig, RMUConfig, config_from_dict, unlearn, unlearn_reference,
)
from rmu_analysis.unlearning import engine, reference
from rmu_analysis.unlearning.cli import add_unlearn_parser, build_config
from rmu_analysis.unlearning.common import add_retain_noise, noise_generator

RUNS = [unlearn, unlearn_reference]


@pytest.fixture()
def tiny(tiny_tokenizer):
    return tiny_case(tiny_tokenizer)


def run(fn, case, cfg, **kw):
    return fn(case.model, case.tokenizer, case.forget, case.retain, cfg, progress=False, **kw)


# ------------------------------------------------------------------------------------- the noise
def test_noise_is_relative_to_each_token_norm_and_leaves_the_input_alone():
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(4, 50, 256, generator=gen) * torch.linspace(0.5, 20.0, 50).reshape(1, 50, 1)
    h[:, 0] *= 30.0  # an attention-sink-like first position
    kept = h.clone()
    noisy = add_retain_noise(h, 0.1, noise_generator(0))
    assert torch.equal(h, kept), "the prefix (cached) is not written"
    ratio = (noisy - h).norm(dim=-1) / h.norm(dim=-1)  # per token ≈ 0.1: chi with 256 dof, relative sd ≈ 4%
    assert float(ratio.mean()) == pytest.approx(0.1, rel=0.02)
    assert float(ratio.min()) > 0.07 and float(ratio.max()) < 0.13
    assert abs(float((noisy - h).mean())) < 0.01 * float(h.abs().mean())


def test_noise_is_drawn_on_the_cpu_in_fp32_whatever_the_dtype():
    h = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(1))
    fp32 = add_retain_noise(h, 0.2, noise_generator(3))
    bf16 = add_retain_noise(h.to(torch.bfloat16), 0.2, noise_generator(3))
    assert bf16.dtype == torch.bfloat16
    torch.testing.assert_close(bf16.float(), fp32, rtol=0.02, atol=0.02)


def test_noise_stream_is_seeded_and_apart_from_the_control_vectors():
    a = torch.randn(1000, generator=noise_generator(7))
    assert torch.equal(a, torch.randn(1000, generator=noise_generator(7)))
    assert not torch.equal(a, torch.randn(1000, generator=noise_generator(8)))
    plain = torch.Generator().manual_seed(7)  # the control vectors' generator for seed 7
    assert not torch.equal(a, torch.randn(1000, generator=plain))


# ------------------------------------------------------------------------------------- the runs
@pytest.mark.parametrize("fn", RUNS)
def test_zero_noise_is_no_noise(tiny, fn, monkeypatch):
    """retain_noise = 0 draws nothing and trains the very tensors of a config without the option."""
    plain = run(fn, tiny, tiny.config(steps=6))

    def no_draw(*args, **kwargs):
        raise AssertionError("retain_noise = 0 must not draw noise")

    monkeypatch.setattr(engine, "add_retain_noise", no_draw)
    monkeypatch.setattr(reference, "add_retain_noise", no_draw)
    for zero in (0.0, 0):
        again = run(fn, tiny, tiny.config(steps=6, retain_noise=zero))
        assert max_diff(again.trained, plain.trained) == 0.0


@pytest.mark.parametrize("method", ["rmu", "adaptive-rmu"])
def test_noise_perturbs_the_retain_input_not_the_target(tiny, method):
    """Step 0 runs the model as given: the clean retain loss is 0 in the reference convention; the noisy one is not,
    and it is the MSE between the blocks run on a noisy input and the frozen output."""
    clean = run(unlearn, tiny, tiny.config(method, steps=2, log_every=1))
    noisy = run(unlearn, tiny, tiny.config(method, steps=2, log_every=1, retain_noise=0.1))
    assert clean.log[0]["retain_loss"] == 0.0
    assert noisy.log[0]["retain_loss"] > 0.0
    assert noisy.log[0]["forget_loss"] == clean.log[0]["forget_loss"], "the forget term has no noise"
    assert max_diff(noisy.trained, clean.trained) > 0.0


@pytest.mark.parametrize("fn", RUNS)
def test_the_seed_sets_the_noise(tiny, fn):
    """With the control vectors held fixed, only the noise depends on the seed: same seed, same tensors; another
    seed, other noise and other tensors; without noise the seed then changes nothing."""
    before = snapshot(tiny.model)
    u = run(fn, tiny, tiny.config(steps=6)).control_vectors
    cfg = tiny.config(steps=6, retain_noise=0.1, seed=1)
    a = run(fn, tiny, cfg, control_vectors=u)
    b = run(fn, tiny, cfg, control_vectors=u)
    c = run(fn, tiny, dataclasses.replace(cfg, seed=2), control_vectors=u)
    assert max_diff(a.trained, b.trained) == 0.0
    assert max_diff(a.trained, c.trained) > 1e-4
    quiet = [run(fn, tiny, dataclasses.replace(cfg, retain_noise=0.0, seed=s), control_vectors=u) for s in (1, 2)]
    assert max_diff(quiet[0].trained, quiet[1].trained) == 0.0
    assert all(torch.equal(v, before[k]) for k, v in tiny.model.state_dict().items()), "the model is not changed"


# ----------------------------------------------------------------------------------- the config
@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), -float("inf"), True, "0.1", (0.1, 0.2), None])
@pytest.mark.parametrize("cls", [RMUConfig, AdaptiveRMUConfig])
def test_invalid_retain_noise_is_refused_when_the_config_is_built(cls, bad):
    with pytest.raises(ValueError, match="retain_noise"):
        cls(retain_noise=bad)


def test_config_roundtrip_and_keys_of_earlier_runs():
    for cfg in (RMUConfig(retain_noise=0.05), AdaptiveRMUConfig(retain_noise=1.0, beta=3.0), AdaptiveRMUConfig()):
        data = json.loads(json.dumps(cfg.to_dict()))
        assert config_from_dict(data) == cfg
    assert RMUConfig(retain_noise=0.05).to_dict()["retain_noise"] == 0.05
    # at 0 the option is not written: configs saved and sweep keys hashed before it existed stay the same
    assert "retain_noise" not in RMUConfig().to_dict() and "retain_noise" not in AdaptiveRMUConfig().to_dict()
    assert config_from_dict({k: v for k, v in RMUConfig().to_dict().items()}).retain_noise == 0.0
    spec = RunSpec(method="adaptive-rmu", layer=3, steps=200, coeff=5.0)
    noisy = RunSpec(method="adaptive-rmu", layer=3, steps=200, coeff=5.0, options=(("retain_noise", 0.1),))
    assert noisy.config().retain_noise == 0.1 and noisy.key() != spec.key()
    assert not hasattr(GAConfig(), "retain_noise")


def test_cli_flag_and_presets():
    parser = argparse.ArgumentParser()
    add_unlearn_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["unlearn", "--preset", "organism-adaptive-rmu", "--retain-noise", "0.1", "--out", "x"])
    assert build_config(args) == dataclasses.replace(PRESETS["organism-adaptive-rmu"], retain_noise=0.1)
    assert build_config(args) == preset("organism-adaptive-rmu", retain_noise=0.1)
    args = parser.parse_args(["unlearn", "--method", "rmu", "--out", "x"])
    assert build_config(args).retain_noise == 0.0
    with pytest.raises(ValueError, match="--retain-noise does not apply to ga"):
        build_config(parser.parse_args(["unlearn", "--method", "ga", "--retain-noise", "0.1", "--out", "x"]))
    with pytest.raises(ValueError, match="retain_noise must be a finite number >= 0"):
        build_config(parser.parse_args(["unlearn", "--method", "rmu", "--retain-noise", "-1", "--out", "x"]))
    steering = [p for p in PRESETS.values() if hasattr(p, "retain_noise")]  # the baselines' configs have no such field
    assert len(steering) >= 4 and all(p.retain_noise == 0.0 for p in steering), "the recipes run without noise unless asked"
