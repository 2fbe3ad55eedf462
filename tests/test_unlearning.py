"""Tests of rmu_analysis.unlearning: the engine against the plain reference implementation, the model-state
rules, errors before training, saving, and the baselines. Tiny random models on the CPU.

The ``case`` fixture holds the model and data; add a variant to ``CASES``. "tiny" is a random 5-block Llama;
"organism" is the shipped 12-block model organism (fp32, l = 3, its first 40 texts per corpus; skipped only
when its files are missing). Engine and reference agree bit for bit on one or two CPU threads (max |Δw| = 0
for RMU and Adaptive RMU in both loss conventions, with and without retain noise, weights moved by ~2e-2); the
tolerance 1e-5 leaves room for other thread counts and BLAS builds.
"""
from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch

from rmu_analysis.models import decoder_blocks, load_model
from rmu_analysis.recipes import PRESETS
from rmu_analysis.testing import (
    Case, max_diff, organism_case, snapshot, tiny_case,
)
from rmu_analysis.unlearning import (
    AdaptiveRMUConfig, GAConfig, GradDiffConfig, NonFiniteLossError, NPOConfig, PrefixCache, RMUConfig,
    config_from_dict, load_log, save_unlearned, unlearn, unlearn_reference, unlearn_sweep,
)
from rmu_analysis.unlearning.baselines import mean_nll
from rmu_analysis.unlearning.common import loss_masks, mse, reference_padding, select_trained, tokenize
from rmu_analysis.unlearning.engine import master_copies

CASES = ["tiny", "organism"]


@pytest.fixture(scope="module", params=CASES)
def case(request, tiny_tokenizer) -> Case:
    return tiny_case(tiny_tokenizer) if request.param == "tiny" else organism_case()


@pytest.fixture()
def tiny(tiny_tokenizer) -> Case:
    """A fresh tiny case for tests that change the model."""
    return tiny_case(tiny_tokenizer)


def same_state(model, snap) -> bool:
    return all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())


# ------------------------------------------------------------------------ engine == reference
@pytest.mark.parametrize("retain_noise", [0.0, 0.1])
@pytest.mark.parametrize("loss", ["reference", "masked"])
@pytest.mark.parametrize("method", ["rmu", "adaptive-rmu"])
def test_engine_matches_reference_after_20_steps(case, method, loss, retain_noise):
    cfg = case.config(method, loss=loss, retain_noise=retain_noise)
    before = snapshot(case.model)
    fast = unlearn(case.model, case.tokenizer, case.forget, case.retain, cfg, progress=False)
    plain = unlearn_reference(case.model, case.tokenizer, case.forget, case.retain, cfg, progress=False)
    assert same_state(case.model, before), "neither implementation may change the model by default"
    assert fast.steps == plain.steps == 20
    assert max_diff(fast.trained, plain.trained) <= 1e-5
    moved = max_diff(fast.trained, {k: before[k] for k in fast.trained})
    assert moved > 1e-3, "the weights must move well beyond the tolerance for the comparison to mean anything"
    assert fast.coefficients == pytest.approx(plain.coefficients, rel=1e-5)
    assert [r["step"] for r in fast.log] == [0, 5, 10, 15, 19]
    for a, b in zip(fast.log, plain.log):
        assert a["forget_loss"] == pytest.approx(b["forget_loss"], rel=1e-4)
        assert a["cos_forget_u"] == pytest.approx(b["cos_forget_u"], abs=1e-5)


def test_per_sample_adaptive_matches_reference(tiny):
    cfg = tiny.config("adaptive-rmu", coefficient="per-sample", loss="masked", steps=8)
    fast = unlearn(tiny.model, tiny.tokenizer, tiny.forget, tiny.retain, cfg, progress=False)
    plain = unlearn_reference(tiny.model, tiny.tokenizer, tiny.forget, tiny.retain, cfg, progress=False)
    assert max_diff(fast.trained, plain.trained) <= 1e-5
    assert fast.coefficients == pytest.approx(plain.coefficients, rel=1e-5)


def test_adaptive_first_batch_coefficient_is_beta_times_initial_norm(tiny):
    """Step 0 uses the model as given: β × mean per-token norm of hidden_states[l + 1] on topic 0's first batch."""
    cfg = tiny.config("adaptive-rmu", steps=2)
    result = unlearn(tiny.model, tiny.tokenizer, tiny.forget, tiny.retain, cfg, progress=False)
    with reference_padding(tiny.tokenizer):
        inputs = tokenize(tiny.tokenizer, tiny.forget["bio"][:4], cfg.forget_max_length[0], torch.device("cpu"))
    with torch.no_grad():
        h = tiny.model(**inputs, output_hidden_states=True).hidden_states[cfg.layer + 1]
    expected = cfg.beta * float(h.norm(dim=-1).mean())  # reference convention: every position, padding included
    assert result.coefficients["bio"] == pytest.approx(expected, rel=1e-5)


# ----------------------------------------------------------------------------- model state
def test_default_leaves_model_unchanged_and_apply_to_installs(tiny):
    cfg = tiny.config(steps=4)
    before = snapshot(tiny.model)
    result = unlearn(tiny.model, tiny.tokenizer, tiny.forget, tiny.retain, cfg, progress=False)
    assert same_state(tiny.model, before) and not result.applied
    assert all(p.requires_grad for p in tiny.model.parameters()), "requires_grad flags are restored"
    assert sorted(result.trained) == [f"model.layers.{i}.mlp.down_proj.weight" for i in (1, 2, 3)]

    other = copy.deepcopy(tiny.model)
    inplace = unlearn(other, tiny.tokenizer, tiny.forget, tiny.retain, cfg, inplace=True, progress=False)
    assert inplace.applied
    result.apply_to(tiny.model)
    after = tiny.model.state_dict()
    for name in before:
        changed = not torch.equal(after[name], before[name])
        assert changed == (name in result.trained), name
        assert torch.equal(after[name], other.state_dict()[name])


def test_installed_swaps_the_trained_tensors_in_and_back_out(tiny):
    result = unlearn(tiny.model, tiny.tokenizer, tiny.forget, tiny.retain, tiny.config(steps=4), progress=False)
    before = snapshot(tiny.model)
    expected = result.apply_to(copy.deepcopy(tiny.model)).state_dict()
    with result.installed() as model:
        assert model is tiny.model
        assert all(torch.equal(v, expected[k]) for k, v in tiny.model.state_dict().items())
    assert same_state(tiny.model, before)
    with pytest.raises(RuntimeError, match="inside"):
        with result.installed(tiny.model):
            raise RuntimeError("an error inside the block")
    assert same_state(tiny.model, before), "the model's own tensors come back on an error too"


# --------------------------------------------------------------------------- control vectors
def test_control_vectors_follow_the_reference_construction_and_repeat_a_run(tiny):
    cfg = tiny.config(steps=4, seed=7)
    result = unlearn(tiny.model, tiny.tokenizer, tiny.forget, tiny.retain, cfg, progress=False)
    torch.manual_seed(7)  # the reference: torch.rand(1, 1, d) per topic, normalised
    for topic in ("bio", "cyber"):
        v = torch.rand(1, 1, 32)
        assert torch.equal(result.control_vectors[topic], (v / torch.norm(v)).reshape(32))
        assert (result.control_vectors[topic] > 0).all()
    again = unlearn(tiny.model, tiny.tokenizer, tiny.forget, tiny.retain, dataclasses.replace(cfg, seed=8),
                    control_vectors=result.control_vectors, progress=False)
    assert max_diff(again.trained, result.trained) == 0.0
    other = unlearn(tiny.model, tiny.tokenizer, tiny.forget, tiny.retain, dataclasses.replace(cfg, seed=8), progress=False)
    assert max_diff(other.trained, result.trained) > 0.0


# ------------------------------------------------------------------------------ loss conventions
def test_loss_masks_drop_padding_and_forget_bos(tiny_tokenizer):
    bos, pad = tiny_tokenizer.bos_token_id, tiny_tokenizer.pad_token_id
    inputs = {"input_ids": torch.tensor([[pad, pad, bos, 9, 10], [bos, 11, 12, 13, 14]]),
              "attention_mask": torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])}
    assert loss_masks(inputs, "reference", bos) == (None, None)
    forget_mask, retain_mask = loss_masks(inputs, "masked", bos)
    assert forget_mask.tolist() == [[False, False, False, True, True], [False, True, True, True, True]]
    assert retain_mask.tolist() == [[False, False, True, True, True], [True] * 5]
    acts, target = torch.randn(2, 5, 3), torch.randn(1, 1, 3)
    manual = ((acts - target) ** 2)[forget_mask].mean()
    assert float(mse(acts, target, forget_mask)) == pytest.approx(float(manual), rel=1e-6)
    assert float(mse(acts, target, None)) == pytest.approx(float(((acts - target) ** 2).mean()), rel=1e-6)


def test_masked_convention_ignores_the_padding_token(tiny):
    """Which token pads the batch changes the reference-convention result but not the masked one."""
    other_tok = copy.deepcopy(tiny.tokenizer)
    other_tok.pad_token = "<unk>"
    results = {}
    for loss in ("reference", "masked"):
        cfg = tiny.config(steps=6, loss=loss)
        a = unlearn(tiny.model, tiny.tokenizer, tiny.forget, tiny.retain, cfg, progress=False)
        b = unlearn(tiny.model, other_tok, tiny.forget, tiny.retain, cfg, progress=False)
        results[loss] = max_diff(a.trained, b.trained)
    assert results["masked"] <= 1e-6
    assert results["reference"] > 1e-4


# ---------------------------------------------------------------------------------- prefix cache
def test_prefix_cache_shares_the_retain_batch_within_a_run(tiny):
    cache = PrefixCache()
    unlearn(tiny.model, tiny.tokenizer, tiny.forget, tiny.retain, tiny.config(steps=4), prefix_cache=cache, progress=False)
    # 4 forget batches + retain batches 0 and 1, each used by both topics
    assert (cache.misses, cache.hits) == (6, 2)


def test_sweep_with_cache_equals_separate_runs_and_cache_invalidates(tiny):
    configs = [tiny.config(steps=6, steering_coeff=c) for c in (5.0, 20.0)]
    cache = PrefixCache()
    swept = unlearn_sweep(tiny.model, tiny.tokenizer, tiny.forget, tiny.retain, configs, prefix_cache=cache, progress=False)
    assert cache.hits >= 6 + 2  # the whole second run (and the shared retain batches) come from the cache
    for cfg, res in zip(configs, swept):
        alone = unlearn(tiny.model, tiny.tokenizer, tiny.forget, tiny.retain, cfg, progress=False)
        assert max_diff(alone.trained, res.trained) == 0.0
    swept[1].apply_to(tiny.model)  # the model changes: cached frozen activations are stale
    stale = unlearn(tiny.model, tiny.tokenizer, tiny.forget, tiny.retain, configs[0], prefix_cache=cache, progress=False)
    fresh = unlearn(tiny.model, tiny.tokenizer, tiny.forget, tiny.retain, configs[0], progress=False)
    assert max_diff(stale.trained, fresh.trained) == 0.0


# ------------------------------------------------------------------------ errors before training
@pytest.fixture()
def forward_counter(tiny):
    calls = []
    handle = tiny.model.register_forward_pre_hook(lambda *a: calls.append(1))
    yield calls
    handle.remove()


@pytest.mark.parametrize("run", [unlearn, unlearn_reference])
@pytest.mark.parametrize(
    "change, match",
    [
        (dict(config=dict(layer=9)), "layer 9 is out of range: this model has 5 decoder blocks"),
        (dict(config=dict(param_pattern=r"no_such\.weight$")), "matches no parameter"),
        (dict(forget={"bio": [], "cyber": ["x"]}), "forget corpus of topic 'bio' is empty"),
        (dict(retain=[]), "retain corpus .* is empty"),
        (dict(config=dict(alpha=(1.0, 2.0, 3.0))), "alpha has 3 values .* 2 forget topics"),
        (dict(config=dict(steering_coeff=(1.0,))), "steering_coeff has 1 values"),
        (dict(retain={"bio": ["x"], "chem": ["y"]}), "do not match the forget topics"),
        (dict(control_vectors=[torch.ones(32)]), "1 control vectors for 2 topics"),
    ],
)
def test_errors_before_any_training(tiny, forward_counter, run, change, match):
    cfg = dataclasses.replace(tiny.config(steps=2), **change.get("config", {}))
    with pytest.raises(ValueError, match=match):
        run(tiny.model, tiny.tokenizer, change.get("forget", tiny.forget), change.get("retain", tiny.retain), cfg,
            control_vectors=change.get("control_vectors"), progress=False)
    assert forward_counter == []


def test_config_errors():
    with pytest.raises(ValueError, match="after layer 3"):
        RMUConfig(layer=3, trained_layers=(2, 4))
    with pytest.raises(ValueError, match="loss must be one of"):
        RMUConfig(loss="sum")
    with pytest.raises(ValueError, match="coefficient must be"):
        AdaptiveRMUConfig(coefficient="every-step")
    with pytest.raises(dataclasses.FrozenInstanceError):
        RMUConfig().layer = 3


@pytest.mark.parametrize("run", [unlearn, unlearn_reference])
def test_non_finite_loss_names_the_step_and_keeps_the_model(tiny, run):
    before = snapshot(tiny.model)
    with pytest.raises(NonFiniteLossError, match="step 0 .*topic 'bio'"):
        run(tiny.model, tiny.tokenizer, tiny.forget, tiny.retain, tiny.config(steering_coeff=1e39),  # finite, inf in fp32
            inplace=True, progress=False)
    with pytest.raises(NonFiniteLossError, match=r"at step [1-9]"):
        run(tiny.model, tiny.tokenizer, tiny.forget, tiny.retain, tiny.config(lr=1e30), inplace=True, progress=False)
    assert same_state(tiny.model, before)


def test_short_data_ends_the_run_with_a_warning(tiny):
    forget = {"bio": tiny.forget["bio"][:6], "cyber": tiny.forget["cyber"][:6]}  # 2 batches per topic
    with pytest.warns(UserWarning, match="run out at step 4"):
        result = unlearn(tiny.model, tiny.tokenizer, forget, tiny.retain, tiny.config(steps=10), progress=False)
    assert result.steps == 4


# ------------------------------------------------------------------------------- logs and saving
def test_log_every_and_frame(tiny):
    result = unlearn(tiny.model, tiny.tokenizer, tiny.forget, tiny.retain, tiny.config(steps=7, log_every=3), progress=False)
    frame = result.to_frame()
    assert frame["step"].tolist() == [0, 3, 6]
    assert {"step", "topic", "forget_loss", "retain_loss", "loss", "coefficient", "forget_norm", "retain_norm",
            "cos_forget_u"} <= set(frame.columns)
    assert frame["topic"].tolist() == ["bio", "cyber", "bio"]
    assert frame["forget_loss"].iloc[2] < frame["forget_loss"].iloc[0]  # steps 0 and 6 are both topic 0
    assert frame["coefficient"].tolist() == [20.0, 20.0, 20.0]


def test_save_unlearned_roundtrip(tiny, tmp_path):
    result = unlearn(tiny.model, tiny.tokenizer, tiny.forget, tiny.retain, tiny.config(steps=4), progress=False)
    path = save_unlearned(result, tmp_path / "out", extra={"base_model": "tiny"})
    for name in ("config.json", "model.safetensors", "rmu_config.json", "unlearn_log.json", "control_vectors.safetensors"):
        assert (path / name).is_file(), name
    loaded, tok = load_model(path)
    expected = result.apply_to(copy.deepcopy(tiny.model))
    inputs = tok(["the pathogen host infects bats"], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, expected(**inputs).logits)
    saved = json.loads((path / "rmu_config.json").read_text())
    assert config_from_dict(saved) == result.config and saved["base_model"] == "tiny"
    assert load_log(path) == result.log
    with pytest.raises(FileExistsError):
        save_unlearned(result, path)


def test_save_unlearned_is_atomic(tiny, tmp_path, monkeypatch):
    import rmu_analysis.unlearning.result as result_module

    result = unlearn(tiny.model, tiny.tokenizer, tiny.forget, tiny.retain, tiny.config(steps=2), progress=False)
    real = result_module.atomic_write_json

    def crash(path, obj, **kw):
        if str(path).endswith("unlearn_log.json"):  # the weights are already written by now
            raise RuntimeError("simulated crash")
        return real(path, obj, **kw)

    monkeypatch.setattr(result_module, "atomic_write_json", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        save_unlearned(result, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------ precision
def test_bf16_model_trains_through_fp32_master_copies(tiny):
    model = copy.deepcopy(tiny.model).to(torch.bfloat16)
    trained = select_trained(model, (1, 2, 3), None)
    assert all(m.dtype == torch.float32 and m.requires_grad for m in master_copies(model, trained))
    cfg = tiny.config(steps=20, lr=2e-5)  # per-step updates mostly below bf16 resolution
    fast = unlearn(model, tiny.tokenizer, tiny.forget, tiny.retain, cfg, progress=False)
    plain = unlearn_reference(model, tiny.tokenizer, tiny.forget, tiny.retain, cfg, progress=False)
    params = dict(model.named_parameters())
    for name, tensor in fast.trained.items():
        assert tensor.dtype == torch.bfloat16 and torch.isfinite(tensor).all()
        changed_fast = (tensor != params[name]).float().mean()
        changed_plain = (plain.trained[name] != params[name]).float().mean()
        assert changed_fast > 0.8 and changed_fast > 2 * changed_plain  # bf16 weights alone lose the small updates


@pytest.mark.parametrize("run", [unlearn, unlearn_reference])
def test_cudnn_attention_is_off_while_training_and_restored(tiny, run):
    """cuDNN's attention backward gives NaN on left-padded bf16 batches (models.no_cudnn_attention)."""
    seen = []
    handle = decoder_blocks(tiny.model)[2].register_forward_pre_hook(
        lambda *_: seen.append(torch.backends.cuda.cudnn_sdp_enabled()))
    try:
        run(tiny.model, tiny.tokenizer, tiny.forget, tiny.retain, tiny.config(steps=2), progress=False)
    finally:
        handle.remove()
    assert seen and not any(seen)
    assert torch.backends.cuda.cudnn_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()


# ---------------------------------------------------------------------------- accelerate placement
def _dispatch_with_disk_blocks(model, disk_blocks, offload_dir):
    """The tiny model under an accelerate device_map with ``disk_blocks`` offloaded (weights on "meta", reloaded
    at every forward): what device_map="auto" does to blocks that fit on no device."""
    from accelerate import dispatch_model

    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    device_map.update({f"model.layers.{i}": "disk" if i in disk_blocks else "cpu" for i in range(len(decoder_blocks(model)))})
    return dispatch_model(model, device_map=device_map, main_device="cpu", offload_dir=str(offload_dir))


def test_offloaded_blocks_outside_the_trained_range_give_the_same_run(tiny, tmp_path):
    cfg = tiny.config()  # l = 3, trained blocks 1-3: block 0 is the frozen prefix, block 4 is never run
    plain = unlearn(tiny.model, tiny.tokenizer, tiny.forget, tiny.retain, cfg, progress=False)
    model = _dispatch_with_disk_blocks(copy.deepcopy(tiny.model), (0, 4), tmp_path)
    assert decoder_blocks(model)[0].mlp.down_proj.weight.device.type == "meta"
    placed = unlearn(model, tiny.tokenizer, tiny.forget, tiny.retain, cfg, progress=False)
    assert max_diff(placed.trained, plain.trained) <= 1e-6


@pytest.mark.parametrize("run", [unlearn, unlearn_reference])
def test_offloaded_trained_block_is_a_clear_error(tiny, tmp_path, run):
    model = _dispatch_with_disk_blocks(copy.deepcopy(tiny.model), (2,), tmp_path)
    with pytest.raises(ValueError, match=r"layers\.2\.mlp\.down_proj\.weight.*offloaded"):
        run(model, tiny.tokenizer, tiny.forget, tiny.retain, tiny.config(), progress=False)


# ------------------------------------------------------------------------------------ baselines
def _nll(model, tok, texts) -> float:
    with reference_padding(tok):
        inputs = tokenize(tok, texts, 32, torch.device("cpu"))
    with torch.no_grad():
        return float(mean_nll(model(**inputs).logits, inputs))


@pytest.mark.parametrize("config", [
    GAConfig(layer=3, lr=1e-2, steps=8, forget_max_length=32),
    GradDiffConfig(layer=3, lr=1e-2, steps=8, forget_max_length=32, alpha=1.0),
    NPOConfig(layer=3, lr=1e-2, steps=8, forget_max_length=32, beta=0.1, alpha=1.0),
])
def test_baselines_raise_the_forget_nll(tiny, config):
    before = snapshot(tiny.model)
    forget_before = _nll(tiny.model, tiny.tokenizer, tiny.forget["bio"][:8])
    retain_before = _nll(tiny.model, tiny.tokenizer, tiny.retain[:8])
    result = unlearn(tiny.model, tiny.tokenizer, tiny.forget, tiny.retain, config, progress=False)
    assert same_state(tiny.model, before)
    assert result.log[0]["forget_nll"] == pytest.approx(_nll(tiny.model, tiny.tokenizer, tiny.forget["bio"][:4]), rel=1e-4)
    result.apply_to(tiny.model)
    forget_rise = _nll(tiny.model, tiny.tokenizer, tiny.forget["bio"][:8]) - forget_before
    retain_rise = _nll(tiny.model, tiny.tokenizer, tiny.retain[:8]) - retain_before
    assert forget_rise > 0.1
    if not isinstance(config, GAConfig):  # the retain term keeps generic text where it was
        assert retain_rise < forget_rise / 2


def test_baseline_mlp_scope_trains_every_mlp_tensor(tiny):
    result = unlearn(tiny.model, tiny.tokenizer, tiny.forget, tiny.retain,
                     GAConfig(layer=3, steps=1, params="mlp", forget_max_length=16), progress=False)
    assert len(result.trained) == 5 * 3  # gate, up and down projections of 5 blocks


def test_presets_and_dispatch(tiny):
    rmu, adaptive = PRESETS["zephyr-7b-rmu"], PRESETS["zephyr-7b-adaptive-rmu"]
    assert (rmu.layer, rmu.resolved_trained_layers(), rmu.steering_coeff, rmu.alpha, rmu.lr, rmu.batch_size,
            rmu.steps) == (7, (5, 6, 7), 6.5, 1200.0, 5e-5, 4, 500)
    assert (adaptive.beta, adaptive.coefficient, adaptive.alpha) == (5.0, "first-batch", 1200.0)
    assert rmu.per_topic("forget_max_length", 2) == (512, 768)
    organism = PRESETS["organism-adaptive-rmu"]  # the organism's recipe: a quarter of its 12 blocks
    assert (organism.layer, organism.resolved_trained_layers(), organism.beta) == (3, (1, 2, 3), 5.0)
    assert RMUConfig(layer=1).resolved_trained_layers() == (0, 1)
    assert config_from_dict(json.loads(json.dumps(adaptive.to_dict()))) == adaptive
    with pytest.raises(TypeError, match="config must be one of"):
        unlearn(tiny.model, tiny.tokenizer, tiny.forget, tiny.retain, {"layer": 3})


def test_tokenizer_and_training_mode_are_restored(tiny):
    """EOS pads when the tokenizer has no pad token (as the reference); the caller's settings come back."""
    tok = copy.deepcopy(tiny.tokenizer)
    tok.pad_token = None
    eval_run = unlearn(tiny.model, tiny.tokenizer, tiny.forget, tiny.retain, tiny.config(steps=2), progress=False)
    tiny.model.train()
    result = unlearn(tiny.model, tok, tiny.forget, tiny.retain, tiny.config(steps=2), progress=False)
    assert tiny.model.training and tok.pad_token is None and tok.padding_side == "right"
    assert result.steps == 2 and max_diff(result.trained, eval_run.trained) > 0  # EOS vs <pad> padding differ
