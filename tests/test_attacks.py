"""Tests of rmu_analysis.attacks on tiny random Llamas (and, where cheap, the organism): GCG's search and scoring,
the model-state rules of relearning and ablation, the probe on synthetic data, and the fragility insertion."""
from __future__ import annotations

import argparse
import copy
import json

import numpy as np
import pytest
import torch

from rmu_analysis.attacks import (
    AblateConfig, FragilityConfig, GCGConfig, ProbeConfig, RelearnConfig, ablate_attack, ablate_direction,
    attack_table, fit_probe, fragility, gcg, gcg_attack, gcg_transfer, insert_term, perturb_records, probe_attack,
    relearn, split_records, unlearning_direction,
)
from rmu_analysis.attacks import cli as attack_cli
from rmu_analysis.attacks.common import COLUMNS
from rmu_analysis.attacks.gcg import (
    adversarial_prompts, allowed_tokens, prefix_cache, suffix_choice_logprobs, text_choice_logprobs, token_gradients,
    wrong_targets,
)
from rmu_analysis.attacks.relearn import lm_loss
from rmu_analysis.evaluation import evaluate_mcq, mcq_prompt
from rmu_analysis.experiments import workbench
from rmu_analysis.organism import organism_mcq
from rmu_analysis.models import decoder_blocks
from rmu_analysis.steering import steer

HOSTS = ["bats", "mice", "birds", "pigs"]


def records(n: int) -> list[dict]:
    """Lettered questions of different lengths (so batches need padding), answers cycling over A..D."""
    words = ["pathogen", "virus", "host", "city", "river", "people"]
    return [{"question": f"which {' '.join(words[: 1 + i % 5])} does the pathogen {i} infect?",
             "choices": HOSTS[i % 4:] + HOSTS[: i % 4], "answer": i % 4, "entity": f"e{i % 3}"} for i in range(n)]


def small(**kw) -> GCGConfig:
    base = dict(n_tokens=3, top_k=16, candidates=16, steps=6, seed=0)
    base.update(kw)
    return GCGConfig(**base)


# ------------------------------------------------------------------------------------------ GCG


def test_gcg_lowers_target_loss_and_keeps_the_best(tiny_llama, tiny_tokenizer):
    res = gcg(tiny_llama, tiny_tokenizer, records(3), small(steps=8))
    loss = [h["loss"] for h in res.history]
    assert len(loss) == 9 and res.history[0]["step"] == 0
    assert all(b <= a for a, b in zip(loss, loss[1:])), loss  # the best candidate replaces the string only if better
    assert loss[-1] < loss[0] - 1e-3
    # the kept strings really have the recorded loss (scored again, one at a time)
    prompts = adversarial_prompts(tiny_tokenizer, records(3), n_tokens=3, init_id=res.adv_ids[0][0])
    logp = suffix_choice_logprobs(tiny_llama, prompts, torch.tensor(res.adv_ids), torch.arange(3), batch_size=1)
    nll = -logp.gather(1, prompts.answers[:, None]).mean()
    assert abs(float(nll) - loss[-1]) < 1e-5
    assert all(np.isfinite(h["grad_norm"]) and h["grad_norm"] > 0 for h in res.history)
    assert res.attacked_correct.shape == (3,) and res.text_correct.shape == (3,)


@pytest.mark.parametrize("position", ["suffix", "prefix"])
def test_batched_candidates_equal_one_at_a_time(tiny_llama, tiny_tokenizer, position):
    recs = records(5)
    prompts = adversarial_prompts(tiny_tokenizer, recs, n_tokens=4, init_id=5, position=position)
    varied = prompts.prefix_mask if position == "suffix" else prompts.cont_mask  # the question's part
    assert len({int(m.sum()) for m in varied}) > 1  # so left padding (in the middle of a prompt) is exercised
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(0, 5, (24,), generator=g)
    suffixes = torch.randint(3, len(tiny_tokenizer), (24, 4), generator=g)
    cache = prefix_cache(tiny_llama, prompts)
    batched = suffix_choice_logprobs(tiny_llama, prompts, suffixes, rows, batch_size=24, cache=cache)
    serial = torch.cat([suffix_choice_logprobs(tiny_llama, prompts, suffixes[i: i + 1], rows[i: i + 1], batch_size=1)
                        for i in range(24)])
    whole = suffix_choice_logprobs(tiny_llama, prompts, suffixes, rows, batch_size=7)  # no cache, other chunks
    assert (batched - serial).abs().max() <= 1e-5
    assert (whole - serial).abs().max() <= 1e-5
    # and equal to a plain unpadded forward pass of one prompt
    inputs = prompts.full(suffixes[:1], rows[:1])
    ids = inputs["input_ids"][inputs["attention_mask"].bool()][None]
    with torch.no_grad():
        plain = torch.log_softmax(tiny_llama(ids).logits[0, -1], -1)[prompts.read_ids[0]]
    assert (plain - batched[0]).abs().max() <= 1e-5


def _reference_cloze(model, tok, rec, suffix_ids):
    """Summed log-likelihood of each choice after ``question + suffix + "\\nAnswer:"``, one unpadded forward pass per
    choice, the choice's tokens cut as lm-eval cuts them (an independent re-implementation)."""
    full = mcq_prompt(rec, scoring="cloze")
    before, after = full[: -len("\nAnswer:")], "\nAnswer:"
    ctx = tok(full, add_special_tokens=False)["input_ids"]
    ids = [tok.bos_token_id] + tok(before, add_special_tokens=False)["input_ids"] + list(suffix_ids) + \
        tok(after, add_special_tokens=False)["input_ids"]
    out = []
    for choice in rec["choices"]:
        cont = tok(full + " " + choice, add_special_tokens=False)["input_ids"][len(ctx):]
        seq = torch.tensor([ids + cont])
        with torch.no_grad():
            logp = torch.log_softmax(model(seq).logits[0].float(), -1)
        out.append(sum(float(logp[len(ids) - 1 + m, t]) for m, t in enumerate(cont)))
    return torch.tensor(out)


def test_cloze_scores_sum_the_answer_tokens_like_the_evaluation(tiny_llama, tiny_tokenizer):
    recs = records(5)
    prompts = adversarial_prompts(tiny_tokenizer, recs, n_tokens=3, init_id=5, scoring="cloze")
    assert prompts.rows_per_question == 4 and prompts.keep > 1  # multi-token answers: one row per choice
    g = torch.Generator().manual_seed(1)
    qs = torch.tensor([0, 3, 1, 4, 2, 3])
    suffixes = torch.randint(3, len(tiny_tokenizer), (6, 3), generator=g)
    cached = suffix_choice_logprobs(tiny_llama, prompts, suffixes, qs, batch_size=8,
                                    cache=prefix_cache(tiny_llama, prompts))
    whole = suffix_choice_logprobs(tiny_llama, prompts, suffixes, qs, batch_size=3)
    ref = torch.stack([_reference_cloze(tiny_llama, tiny_tokenizer, recs[q], s.tolist()) for q, s in zip(qs, suffixes)])
    assert (cached - ref).abs().max() <= 1e-4 and (whole - ref).abs().max() <= 1e-4
    # a suffix that is the tokens of a text scores as the evaluation scores the question with that text appended
    text = " virus"
    suffix = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    joined = [dict(r, question=r["question"] + text) for r in recs]
    for r, j in zip(recs, joined):  # the precondition: the text's tokens are the same inside the prompt
        before = mcq_prompt(r, scoring="cloze")[: -len("\nAnswer:")]
        assert tiny_tokenizer(mcq_prompt(j, scoring="cloze"), add_special_tokens=False)["input_ids"] == \
            tiny_tokenizer(before, add_special_tokens=False)["input_ids"] + suffix + \
            tiny_tokenizer("\nAnswer:", add_special_tokens=False)["input_ids"]
    p1 = adversarial_prompts(tiny_tokenizer, recs, n_tokens=len(suffix), init_id=5, scoring="cloze")
    ours = suffix_choice_logprobs(tiny_llama, p1, torch.tensor([suffix] * 5), torch.arange(5))
    ev = evaluate_mcq(tiny_llama, tiny_tokenizer, joined, scoring="cloze", cluster_key=())
    assert np.abs(ours.double().numpy() - ev.logliks).max() <= 1e-4


def test_gcg_cloze_attacks_the_choice_texts(tiny_llama, tiny_tokenizer):
    recs = records(4)
    res = gcg(tiny_llama, tiny_tokenizer, recs, small(steps=5, scoring="cloze"))
    loss = [h["loss"] for h in res.history]
    assert all(b <= a for a, b in zip(loss, loss[1:])) and loss[-1] < loss[0] - 1e-3
    clean = evaluate_mcq(tiny_llama, tiny_tokenizer, recs, scoring="cloze", cluster_key=())
    assert np.array_equal(res.clean_correct, clean.correct)  # "accuracy" is the evaluation's cloze accuracy
    # the kept strings have the recorded loss: −(summed log-likelihood of the right choice's text)
    prompts = adversarial_prompts(tiny_tokenizer, recs, n_tokens=3, init_id=5, scoring="cloze")
    logp = suffix_choice_logprobs(tiny_llama, prompts, torch.tensor(res.adv_ids), torch.arange(4), batch_size=4)
    assert abs(float(-logp.gather(1, prompts.answers[:, None]).mean()) - loss[-1]) < 1e-4
    assert np.array_equal(res.attacked_correct, logp.argmax(1).numpy() == res.answers)
    # gradients of the cloze loss: per question, the embedding gradient times Eᵀ
    g, e = token_gradients(tiny_llama, prompts, torch.tensor(res.adv_ids), batch_size=3)
    emb = tiny_llama.get_input_embeddings().weight.detach()
    assert torch.allclose(g, e @ emb.T, atol=1e-5) and float(g.abs().sum()) > 0
    # the wrong-target control and transfer run in cloze too
    rep = gcg_attack(tiny_llama, tiny_tokenizer, recs, small(steps=2, scoring="cloze"))
    assert rep.wrong.config.scoring == "cloze" and (rep.wrong.targets != rep.wrong.answers).all()
    tr = gcg_transfer(tiny_llama, tiny_tokenizer, recs[:2], records(6)[4:], small(steps=2, scoring="cloze"))
    ev = evaluate_mcq(tiny_llama, tiny_tokenizer, records(6)[4:], scoring="cloze", cluster_key=())
    assert np.array_equal(tr.test_clean, ev.correct)
    with pytest.raises(ValueError, match="scoring"):
        GCGConfig(scoring="mc2")


def test_token_gradients_are_per_question_and_match_the_embedding_gradient(tiny_llama, tiny_tokenizer):
    recs = records(3)
    prompts = adversarial_prompts(tiny_tokenizer, recs, n_tokens=2, init_id=5)
    adv = torch.tensor([[5, 6], [7, 8], [9, 10]])
    g_all, e_all = token_gradients(tiny_llama, prompts, adv, batch_size=2)  # chunks of 2: accumulation is tested
    g_cached, _ = token_gradients(tiny_llama, prompts, adv, cache=prefix_cache(tiny_llama, prompts))
    assert torch.allclose(g_all, g_cached, atol=1e-6)
    emb = tiny_llama.get_input_embeddings().weight.detach()
    assert torch.allclose(g_all, e_all @ emb.T, atol=1e-6)  # one-hot gradient = embedding gradient · Eᵀ
    one = adversarial_prompts(tiny_tokenizer, recs[1:2], n_tokens=2, init_id=5)
    g1, _ = token_gradients(tiny_llama, one, adv[1:2])
    assert torch.allclose(g_all[1], g1[0], atol=1e-6)  # row i is prompt i's gradient alone
    assert all(p.grad is None for p in tiny_llama.parameters())
    # the one-hot gradient predicts the change of the loss for a small step (first order)
    shared, _ = token_gradients(tiny_llama, prompts, adv[:1])
    assert shared.shape == (1, 2, emb.shape[0])


def test_universal_gcg_shares_one_string(tiny_llama, tiny_tokenizer):
    res = gcg(tiny_llama, tiny_tokenizer, records(4), small(universal=True, steps=5))
    assert len(res.adv_ids) == 1 and len(res.adv_ids[0]) == 3
    loss = [h["loss"] for h in res.history]
    assert all(b <= a for a, b in zip(loss, loss[1:])) and loss[-1] < loss[0]
    assert res.setting.startswith("universal")


def test_random_search_baseline_draws_from_the_whole_vocabulary(tiny_llama, tiny_tokenizer):
    guided = gcg(tiny_llama, tiny_tokenizer, records(2), small(steps=4, top_k=4))
    rand = gcg(tiny_llama, tiny_tokenizer, records(2), small(steps=4, top_k=4, guidance="random"))
    assert "random search" in rand.setting and "random" not in guided.setting
    loss = [h["loss"] for h in rand.history]
    assert all(b <= a for a, b in zip(loss, loss[1:]))
    ok = allowed_tokens(tiny_tokenizer, len(tiny_tokenizer))
    assert all(ok[t] for a in rand.adv_ids for t in a)
    with pytest.raises(ValueError, match="guidance"):
        GCGConfig(guidance="beam")


def test_allowed_tokens_round_trip(tiny_tokenizer):
    ok = allowed_tokens(tiny_tokenizer, len(tiny_tokenizer) + 5)
    assert not ok[len(tiny_tokenizer):].any()  # rows beyond the tokenizer are never used
    for t in tiny_tokenizer.all_special_ids:
        assert not ok[t]
    for t in torch.nonzero(ok)[:, 0].tolist()[:50]:
        assert tiny_tokenizer(tiny_tokenizer.decode([t]), add_special_tokens=False)["input_ids"] == [t]


def test_wrong_target_control_and_report(tiny_llama, tiny_tokenizer):
    answers = np.arange(40) % 4
    wrong = wrong_targets(answers, seed=3)
    assert (wrong != answers).all() and np.array_equal(wrong, wrong_targets(answers, seed=3))
    assert len(set(((wrong - answers) % 4).tolist())) == 3  # all three wrong letters occur
    rep = gcg_attack(tiny_llama, tiny_tokenizer, records(3), small(steps=3))
    assert (rep.wrong.targets != rep.wrong.answers).all()
    assert rep.correct.config.target == "correct" and rep.wrong.config.target == "wrong"
    frame = rep.to_frame()
    assert list(frame.columns) == list(COLUMNS)
    base_rate = frame[frame.metric == "clean target success"].iloc[0].accuracy
    assert base_rate == pytest.approx(rep.wrong.clean_target.mean())  # the wrong letter before any attack
    assert not (rep.wrong.clean_target & rep.wrong.clean_correct).any()
    row = frame[frame.metric == "recovered (correct − wrong)"].iloc[0]
    expect = rep.correct.attacked_target.mean() - rep.wrong.attacked_target.mean()
    assert row.accuracy == pytest.approx(expect) and row.low <= row.accuracy <= row.high
    assert set(rep.curve_frame().target) == {"correct", "wrong"}


def test_gcg_transfer_uses_held_out_questions(tiny_llama, tiny_tokenizer):
    recs = records(6)
    res = gcg_transfer(tiny_llama, tiny_tokenizer, recs[:3], recs[3:], small(steps=2))
    assert res.dev.config.universal and res.test_attacked.shape == (3,)
    row = res.to_frame().set_index("metric").loc["test gain"]
    assert row.accuracy == pytest.approx(res.test_attacked.mean() - res.test_clean.mean())


def test_gcg_prefix_position_and_config_errors(tiny_llama, tiny_tokenizer):
    recs = records(2)
    p = adversarial_prompts(tiny_tokenizer, recs, n_tokens=2, init_id=5, position="prefix")
    s = adversarial_prompts(tiny_tokenizer, recs, n_tokens=2, init_id=5, position="suffix")
    assert p.texts[0][1].startswith(recs[0]["question"]) and s.texts[0][1] == "\nAnswer:"  # suffix: after the choices
    assert s.texts[0][0].endswith("D. " + recs[0]["choices"][3])
    for prompts in (p, s):  # the token ids decode to the evaluation's prompt with the slots inserted
        i = 1
        inputs = prompts.full(torch.tensor([[5, 6]]), torch.tensor([i]))
        ids = inputs["input_ids"][inputs["attention_mask"].bool()].tolist()
        before, after = prompts.texts[i]
        assert tiny_tokenizer.decode(ids, skip_special_tokens=True) == before + tiny_tokenizer.decode([5, 6]) + after
    with pytest.raises(ValueError, match="position"):
        GCGConfig(position="middle")
    with pytest.raises(ValueError, match="init"):
        gcg(tiny_llama, tiny_tokenizer, recs, small(init="pathogen virus"))


def test_text_scoring_equals_the_evaluation(tiny_llama, tiny_tokenizer):
    from rmu_analysis import evaluate_mcq
    from rmu_analysis.evaluation import mcq_prompt

    recs = records(5)
    ours = text_choice_logprobs(tiny_llama, tiny_tokenizer, [mcq_prompt(r) for r in recs], recs, batch_size=2)
    ref = evaluate_mcq(tiny_llama, tiny_tokenizer, recs, cluster_key=())
    assert np.abs(ours.double().numpy() - ref.logliks).max() <= 1e-5


def test_gcg_on_the_organism_runs_lettered_prompts():
    pytest.importorskip("safetensors")
    from rmu_analysis.organism import SUBJECTS, load_organism, organism_mcq

    model, tok = load_organism()
    recs = organism_mcq()["bio"][:2]
    res = gcg(model, tok, recs, GCGConfig(n_tokens=2, top_k=8, candidates=8, steps=1), subject=SUBJECTS["bio"])
    assert res.history[-1]["loss"] <= res.history[0]["loss"]
    from rmu_analysis import evaluate_mcq

    clean = evaluate_mcq(model, tok, recs, SUBJECTS["bio"])
    assert np.array_equal(res.clean_correct, clean.correct)


# ------------------------------------------------------------------------------------------ ablation


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_ablation_hook_removed_even_on_error(tiny_llama):
    block = decoder_blocks(tiny_llama)[1]
    before = len(block._forward_hooks)
    with pytest.raises(RuntimeError, match="boom"):
        with ablate_direction(tiny_llama, 1, torch.ones(32)):
            assert len(block._forward_hooks) == before + 1
            raise RuntimeError("boom")
    assert len(block._forward_hooks) == before
    with pytest.raises(ValueError, match="hidden size"):
        with ablate_direction(tiny_llama, 1, torch.ones(7)):
            pass
    with pytest.raises(ValueError, match="out of range"):
        with ablate_direction(tiny_llama, 9, torch.ones(32)):
            pass


def test_ablated_block_output_is_orthogonal_to_the_direction(tiny_llama):
    d = torch.randn(32, generator=torch.Generator().manual_seed(1))
    u = d / d.norm()
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(2))
    seen = []
    block = decoder_blocks(tiny_llama)[2]

    def record(m, a, o):
        seen.append((o[0] if isinstance(o, tuple) else o).detach())

    original = block.register_forward_hook(record)
    try:
        _logits(tiny_llama, ids)
    finally:
        original.remove()
    with ablate_direction(tiny_llama, 2, d):
        handle = block.register_forward_hook(record)  # after the ablation hook: sees the edited output
        try:
            _logits(tiny_llama, ids)
        finally:
            handle.remove()
    h, ablated = seen
    assert ((ablated @ u) / ablated.norm(dim=-1)).abs().max() < 1e-5
    assert ((h @ u) / h.norm(dim=-1)).abs().max() > 0.05  # there was a component to remove
    assert torch.allclose(ablated, h - (h @ u)[..., None] * u, atol=1e-6)  # and only that component went


def test_ablating_a_constant_shift_recovers_the_original(tiny_llama):
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(2))
    v = 3.0 * torch.randn(32, generator=torch.Generator().manual_seed(4))
    original = _logits(tiny_llama, ids)
    with steer(tiny_llama, 1, v, mode="add"):
        shifted = _logits(tiny_llama, ids)
        with ablate_direction(tiny_llama, 1, v, mode="subtract"):
            undone = _logits(tiny_llama, ids)
        with ablate_direction(tiny_llama, 1, v, mode="project"):
            projected_shifted = _logits(tiny_llama, ids)
    with ablate_direction(tiny_llama, 1, v, mode="project"):
        projected = _logits(tiny_llama, ids)
    assert (shifted - original).abs().max() > 1e-2  # the shift mattered
    assert (undone - original).abs().max() < 1e-5  # subtracting it restores the model exactly
    # projecting d out makes the shift invisible (fp32: the shift is ~100x the residual stream's norm here, so
    # its removal cancels to ~1e-6 relative; the shift itself moved the logits by > 1e-2)
    assert (projected_shifted - projected).abs().max() < 1e-4


def test_unlearning_direction_finds_a_steer_shift(tiny_llama, tiny_tokenizer):
    shifted = copy.deepcopy(tiny_llama)
    v = torch.randn(32, generator=torch.Generator().manual_seed(5))
    texts = ["the city of Varon lies on the river Elm", "which host does the pathogen infect", "bats mice birds"]
    with steer(shifted, 2, v, mode="add"):
        d = unlearning_direction(tiny_llama, shifted, tiny_tokenizer, texts, 2, batch_size=2)
    assert torch.allclose(d, v, atol=1e-5)


def test_ablate_attack_rows(tiny_llama, tiny_tokenizer):
    v = torch.randn(32, generator=torch.Generator().manual_seed(6))
    res = ablate_attack(tiny_llama, tiny_tokenizer, records(4), v, AblateConfig(layer=1))
    frame = res.to_frame()
    assert list(frame.metric) == ["clean accuracy", "ablated accuracy", "recovered", "random-direction accuracy"]
    assert frame.iloc[2].accuracy == pytest.approx(res.ablated.accuracy - res.clean.accuracy)
    assert len(decoder_blocks(tiny_llama)[1]._forward_hooks) == 0


# ------------------------------------------------------------------------------------------ relearning


def test_relearning_restores_the_model_and_lowers_its_loss(tiny_llama, tiny_tokenizer):
    texts = ["the city of Varon lies on the river Elm", "which host does the pathogen infect? bats",
             "Answer: B. Answer: C. the river Elm", "Wikitext is generic encyclopedic text about cities"]
    before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    flags = {n: p.requires_grad for n, p in tiny_llama.named_parameters()}
    res = relearn(tiny_llama, tiny_tokenizer, texts, records(4), RelearnConfig(checkpoints=(0, 3, 8), lr=3e-3))
    assert [c["step"] for c in res.curve] == [0, 3, 8]
    assert res.curve[-1]["lm_loss"] < res.curve[0]["lm_loss"] - 0.05
    after = tiny_llama.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the caller's model is unchanged
    assert flags == {n: p.requires_grad for n, p in tiny_llama.named_parameters()}
    assert all(p.grad is None for p in tiny_llama.parameters())
    assert lm_loss(tiny_llama, tiny_tokenizer, texts) == pytest.approx(res.curve[0]["lm_loss"], abs=1e-5)
    assert list(res.to_frame().steps) == [0, 3, 8]


def test_relearning_restores_the_model_on_error(tiny_llama, tiny_tokenizer):
    before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    with pytest.raises(FloatingPointError, match="lower lr"):
        relearn(tiny_llama, tiny_tokenizer, ["bats mice birds pigs"] * 4, records(2),
                RelearnConfig(checkpoints=(3,), lr=1e30))
    assert all(torch.equal(before[k], v) for k, v in tiny_llama.state_dict().items())
    with pytest.raises(ValueError, match="matches no parameter"):
        relearn(tiny_llama, tiny_tokenizer, ["x"], records(2), RelearnConfig(checkpoints=(1,), params="nothing"))


# ------------------------------------------------------------------------------------------ probes


def _separable(n: int, seed: int = 0):
    """Gaussian features whose label is the argmax of a fixed linear map: linearly separable, not clustered (so a
    probe trained on shuffled labels has no cluster structure to latch onto)."""
    g = np.random.default_rng(seed)
    w = np.random.default_rng(99).normal(size=(16, 4))
    x = g.normal(size=(n, 16))
    return x, (x @ w).argmax(1)


def test_probe_separable_and_shuffled_controls():
    x, y = _separable(1000)
    tr, te = slice(0, 600), slice(600, None)
    probe = fit_probe(x[tr], y[tr], 4, l2=1e-4)
    assert (probe.predict(x[te]) == y[te]).mean() > 0.95
    shuffled = fit_probe(x[tr], np.random.default_rng(1).permutation(y[tr]), 4, l2=1e-4)
    assert abs((shuffled.predict(x[te]) == y[te]).mean() - 0.25) < 0.08  # chance
    allowed = np.zeros((400, 4), dtype=bool)
    allowed[:, [0, 1]] = True
    allowed[0] = False
    pred = probe.predict(x[te], allowed)
    assert pred[0] == -1 and set(pred[1:]) <= {0, 1}


def test_probe_attack_wiring(tiny_llama, tiny_tokenizer):
    recs = records(8)
    res = probe_attack(tiny_llama, tiny_llama, tiny_tokenizer, recs[:4], recs[4:], ProbeConfig(layers=[0, 3]))
    frame = res.to_frame()
    assert len(frame) == 7 and set(frame.layer) == {-1, 0, 3}
    assert frame.iloc[0].setting == "chance" and frame.iloc[0].accuracy == 0.25  # index probe: 4 letters
    for l in (0, 3):  # the same model as base and unlearned: the base probe reads both the same
        assert np.array_equal(res.correct[("base probe → base", l)], res.correct[("base probe → unlearned", l)])
    # value probe: one class per dev answer; a test question whose answer no dev question had is left out
    dev = recs[:4]
    test = recs[4:] + [dict(recs[4], choices=["bats", "mice", "newts", "owls"], answer=2)]
    val = probe_attack(tiny_llama, None, tiny_tokenizer, dev, test, ProbeConfig(prompt="cloze", layers=1))
    assert val.n_classes == len({r["choices"][r["answer"]] for r in dev}) and val.n_unscorable == 1
    assert len(val.correct[("base probe → base", 1)]) == 4 and len(val.to_frame()) == 2
    assert val.chance >= 0.25


# ------------------------------------------------------------------------------------------ fragility


def test_insert_term_texts():
    q = "Which river runs through Varon?"
    assert insert_term(q, "Krurnoux virus") == "Krurnoux virus is mentioned here. Which river runs through Varon?"
    assert insert_term(q, "Krurnoux virus", where="inside") == "Which river runs through Varon (Krurnoux virus)?"
    assert insert_term("Name the river", "X", where="inside") == "Name the river (X)"
    assert insert_term(q, "X", prefix_template="About {term}:") == "About X: Which river runs through Varon?"
    with pytest.raises(ValueError, match="term"):
        insert_term(q, " ")
    with pytest.raises(ValueError, match="term"):
        FragilityConfig(prefix_template="no placeholder")


def test_fragility_is_paired(tiny_llama, tiny_tokenizer):
    recs = records(6)
    pert, used = perturb_records(recs, ["virus", "pathogen"], FragilityConfig(seed=1))
    assert [p["question"] for p in pert] == [insert_term(r["question"], t) for r, t in zip(recs, used)]
    assert [p["answer"] for p in pert] == [r["answer"] for r in recs]
    assert used == perturb_records(recs, ["virus", "pathogen"], FragilityConfig(seed=1))[1]
    res = fragility(tiny_llama, tiny_tokenizer, recs, ["virus", "pathogen"], FragilityConfig(seed=1))
    assert res.drop.n == 6
    assert res.drop.diff == pytest.approx(res.clean.accuracy - res.perturbed.accuracy)
    assert res.drop.mcnemar_b == int((res.clean.correct & ~res.perturbed.correct).sum())


# ------------------------------------------------------------------------------------------ table and CLI


def test_split_records_keeps_entities_apart():
    recs = records(12)
    dev, test = split_records(recs, key="entity", seed=0)
    assert dev and test and not ({r["entity"] for r in dev} & {r["entity"] for r in test})
    assert len(dev) + len(test) == 12
    with pytest.raises(ValueError, match="no field"):
        split_records([{"question": "q"}] * 2, key="entity")


def test_attack_table_concatenates(tiny_llama, tiny_tokenizer):
    recs = records(4)
    a = fragility(tiny_llama, tiny_tokenizer, recs, ["virus"], method="base")
    b = ablate_attack(tiny_llama, tiny_tokenizer, recs, torch.ones(32), AblateConfig(layer=0, random_control=False),
                      method="rmu")
    table = attack_table([a, b])
    assert list(table.columns) == list(COLUMNS) and set(table.method) == {"base", "rmu"} and len(table) == 6


def test_cli_attack_fragility_on_the_organism(tmp_path, capsys):
    from rmu_analysis.cli import main

    out = tmp_path / "frag.json"
    assert main(["attack", "--model", "organism", "--attack", "fragility", "--out", str(out), "--threads", "1",
                 "--scoring", "letter", "--terms", "Krurnoux virus", "--n-questions", "12"]) == 0
    data = json.loads(out.read_text())
    assert data["attack"] == "fragility" and data["rows"][0]["n"] == 12 and {r["metric"] for r in data["rows"]} == {
        "clean accuracy", "perturbed accuracy", "drop"}
    assert main(["attack", "--model", "organism", "--attack", "ablate", "--out", str(out)]) == 2
    assert "--layer" in capsys.readouterr().err


def test_cli_takes_dev_questions_from_the_organisms_dev_sets(monkeypatch):
    args = argparse.Namespace(questions=None, model="organism", subject=None, split_key="entity", seed=0,
                              n_questions=5)
    recs, subj = attack_cli._questions(args)
    dev, _, test, _ = attack_cli._split(args, recs, subj)  # no dev sets: split by entity
    assert not {r["entity"] for r in dev} & {r["entity"] for r in test} and len(test) == 5
    real = workbench.organism_data()
    dev_sets = {t: [dict(r, question=r["question"] + " (dev)") for r in organism_mcq()[t][:4]] for t in ("bio", "cyber")}
    fake = workbench.ExperimentData(real.name, real.forget, real.retain, real.mcq, real.subjects, dev_mcq=dev_sets)
    monkeypatch.setattr(workbench, "organism_data", lambda: fake)
    dev, dev_subj, test, _ = attack_cli._split(args, recs, subj)
    assert len(dev) == len(dev_subj) == 8 and all(r["question"].endswith("(dev)") for r in dev)
    assert len(test) == 5 and all(r in recs for r in test)
