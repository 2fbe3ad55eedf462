"""rmu_analysis.claims and experiments.tradeoff: Fig. 4 norms over seeds, the forget loss relative to ‖c·u‖²,
matched-utility interpolation and its paired comparison, C1 with a control. Expected values come from the
definitions (a known linear curve, norms measured directly), never pinned."""
from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch

from rmu_analysis import claims as C
from rmu_analysis import testing
from rmu_analysis.activations import token_norms
from rmu_analysis.experiments.tradeoff import TradeoffPlan, tradeoff_grid
from rmu_analysis.models import decoder_blocks
from rmu_analysis.unlearning import unlearn


@pytest.fixture(scope="module")
def tok():
    return testing.tiny_tokenizer()


@pytest.fixture()
def model(tok):
    return testing.tiny_llama(len(tok), n_layers=4, tokenizer=tok)


@pytest.fixture(scope="module")
def texts():
    return testing.synthetic_texts(12, 1)


# -------------------------------------------------------------------------------------------- Fig. 4
def _scaled(model, layer: int, factor: float):
    m = copy.deepcopy(model)
    with torch.no_grad():
        decoder_blocks(m)[layer].mlp.down_proj.weight.mul_(factor)
    return m


def test_norm_trajectories_over_seeds(model, tok, texts):
    runs = {1: [_scaled(model, 1, f) for f in (2.0, 3.0, 4.0)], 2: [_scaled(model, 2, f) for f in (0.5, 0.6)]}
    res = C.norm_trajectories(model, tok, texts, runs, coeff=1.0)
    summary = res.summary().set_index(["layer", "step"])
    direct = [float(token_norms(m, texts, [1], exclude_bos=True)[1].mean()) for m in runs[1]]
    row = summary.loc[(1, 0)]
    assert row["norm"] == pytest.approx(np.mean(direct), rel=1e-6) and row["n_seeds"] == 3
    assert row["low"] < row["norm"] < row["high"]
    frozen = float(token_norms(model, texts, [2], exclude_bos=True)[2].mean())
    assert summary.loc[(2, -1), "norm"] == pytest.approx(frozen, rel=1e-6)
    assert summary.loc[(2, -1), "starts_below"] == (frozen < 1.0)
    with pytest.raises(ValueError, match="positive"):
        C.norm_trajectories(model, tok, texts, runs, coeff=0.0)


def test_unlearn_result_runs_and_loss_measures(tok):
    case = testing.tiny_case(tok)
    cfg = case.config("rmu", steps=6, log_every=1)
    results = [unlearn(case.model, tok, case.forget, case.retain, cfg, progress=False) for _ in range(2)]
    traj = C.norm_trajectories(case.model, tok, case.forget["bio"][:8], {case.layer: results}, coeff=case.coeff)
    s = traj.summary()
    assert set(s["step"]) == {-1, 6} and int(s.loc[s["step"] == 6, "n_seeds"].iloc[0]) == 2
    loss = C.forget_loss_measures(results[0])
    d = int(next(iter(results[0].control_vectors.values())).numel())
    first = loss.iloc[0]
    assert first["loss_over_target"] == pytest.approx(first["forget_loss"] * d / first["coefficient"] ** 2)
    assert (loss.groupby("topic")["loss_over_start"].first() == 1.0).all()
    table = C.loss_summary({case.layer: [r for r in results]})
    assert set(table["topic"]) == set(case.forget) and (table["n_seeds"] == 2).all()


def test_loss_over_target_is_not_fooled_by_a_large_start():
    """A run whose norm starts far above c and only shrinks (never reaching c·u): the loss over its start looks
    converged, the loss over ‖c·u‖² does not."""
    d, c = 100, 2.0
    start, end = 20.0 ** 2 + c ** 2, 0.0 + c ** 2  # ‖h − c·u‖² with h ⟂ u, from ‖h‖ = 20 down to 0
    log = [{"step": s, "topic": "bio", "forget_loss": (start + (end - start) * s / 9) / d, "coefficient": c}
           for s in range(10)]
    frame = C.forget_loss_measures(log, hidden_size=d, tail=1)
    final = frame[frame["final"]]
    assert len(final) == 1 and final["loss_over_start"].iloc[0] < 0.1
    assert final["loss_over_target"].iloc[0] > 0.999
    with pytest.raises(ValueError, match="hidden size"):
        C.forget_loss_measures(log)


# --------------------------------------------------------------------------------------- matched utility
def _linear_points(offsets: dict[str, float], slope: float = 0.5, seeds=(0, 1, 2)) -> pd.DataFrame:
    rows = []
    for method, off in offsets.items():
        for s in seeds:
            for i, setting in enumerate((1.0, 2.0, 4.0, 8.0)):
                g = 0.9 - 0.06 * i + 0.004 * s
                rows.append({"method": method, "layer": 3, "seed": s, "setting": setting, "general_acc": g,
                             "forget_acc": off + slope * g + 0.01 * s})
    return pd.DataFrame(rows)


def test_matched_forget_recovers_a_linear_curve():
    pts = _linear_points({"rmu": 0.1})
    target = 0.8
    res = C.matched_forget(pts, target, n_boot=500)
    iv = res.get("rmu", 3)
    truth = 0.1 + 0.5 * target + 0.01 * np.mean([0, 1, 2])
    assert iv.estimate == pytest.approx(truth, abs=1e-12)
    assert iv.low <= truth <= iv.high and iv.high > iv.low
    default = C.matched_forget(pts, base_general=target / 0.95, n_boot=50)
    assert default.target == pytest.approx(target)
    outside = C.matched_forget(pts, 0.5, n_boot=50).get("rmu", 3)
    assert np.isnan(outside.estimate)
    with pytest.raises(ValueError, match="columns"):
        C.matched_forget(pts.drop(columns="general_acc"), 0.8)


def test_matched_forget_with_question_bootstrap():
    pts = _linear_points({"rmu": 0.1}, seeds=(0, 1))
    rng = np.random.default_rng(0)
    gen, fgt = {}, {}
    for i, r in pts.iterrows():  # per-question booleans whose mean is exactly the point's accuracy
        for store, acc in ((gen, r["general_acc"]), (fgt, r["forget_acc"])):
            k = int(round(acc * 1000))
            v = np.zeros(1000, bool)
            v[rng.permutation(1000)[:k]] = True
            store[i] = v
    pts["general_acc"] = [gen[i].mean() for i in pts.index]
    pts["forget_acc"] = [fgt[i].mean() for i in pts.index]
    seeds_only = C.matched_forget(pts, 0.8, n_boot=300).get("rmu", 3)
    both = C.matched_forget(pts, 0.8, general_correct=gen, forget_correct=fgt, n_boot=300).get("rmu", 3)
    assert both.estimate == pytest.approx(seeds_only.estimate)
    assert (both.high - both.low) > (seeds_only.high - seeds_only.low)


def test_compare_matched_detects_a_shift_and_not_its_absence():
    pts = _linear_points({"rmu": 0.3, "adaptive-rmu": 0.2})
    res = C.matched_forget(pts, 0.8, n_boot=500)
    cmp = C.compare_matched(res, "adaptive-rmu", "rmu", 3)
    assert cmp.diff == pytest.approx(-0.1, abs=1e-9) and cmp.significant() and cmp.high < 0
    same = C.matched_forget(_linear_points({"rmu": 0.3, "adaptive-rmu": 0.3}), 0.8, n_boot=500)
    assert not C.compare_matched(same, "adaptive-rmu", "rmu", 3).significant()


def test_tradeoff_grid():
    plan = TradeoffPlan(layers=(2, 3), steps=10, lr=1e-2, alpha=10.0, coeff_ratios=(1.0, 4.0), betas=(2.0, 5.0),
                        seeds=(0, 1))
    specs = tradeoff_grid(plan, {2: 5.0, 3: 7.5})
    assert len(specs) == plan.n_runs == 2 * 4 * 2
    rmu = sorted({(s.layer, s.coeff) for s in specs if s.method == "rmu"})
    assert rmu == [(2, 5.0), (2, 20.0), (3, 7.5), (3, 30.0)]
    assert {s.coeff for s in specs if s.method == "adaptive-rmu"} == {2.0, 5.0}
    assert len({s.key() for s in specs}) == len(specs)
    with pytest.raises(ValueError, match="frozen forget norm"):
        tradeoff_grid(plan, {2: 5.0})
    with pytest.raises(ValueError, match="at least 2"):
        TradeoffPlan(layers=(2,), steps=1, lr=1.0, alpha=1.0, betas=(5.0,))


# ------------------------------------------------------------------------------------------------ C1
def _records(n: int) -> list[dict]:
    words = testing.FORGET_WORDS
    return [{"question": f"which {words[i % len(words)]} host does the pathogen infect?",
             "choices": ["bats", "mice", "birds", "pigs"], "answer": i % 4} for i in range(n)]


def test_paired_mean_difference():
    rng = np.random.default_rng(0)
    a = rng.normal(0, 1, 50)
    shifted = C.paired_mean_difference(a - 0.5, a + rng.normal(0, 0.1, 50))
    assert shifted.significant() and shifted.high < 0 and shifted.wilcoxon_p < 0.05
    assert not C.paired_mean_difference(a, a + rng.normal(0, 0.1, 50)).significant()
    with pytest.raises(ValueError, match="same length"):
        C.paired_mean_difference(a, a[:10])


def test_confidence_control_and_verdict(model, tok):
    """A model whose logits are those of the base scaled by 0.1 (same argmax, so the same accuracy) has lower
    MaxLogit: the verdict holds for it against the base and fails the other way round."""
    flat = copy.deepcopy(model)
    with torch.no_grad():
        flat.lm_head.weight.mul_(0.1)
    records = _records(24)
    control = C.confidence_control({"base": model, "flat": flat}, tok, records, "biology")
    frame = control.to_frame().set_index("model")
    assert frame.loc["flat", "forget_acc"] == frame.loc["base", "forget_acc"]
    assert frame.loc["flat", "max_logit"] < frame.loc["base", "max_logit"]
    yes = C.misdirection_verdict(control, misdirection=("flat",), output=("base",))
    assert yes["held"] and yes["n_matched"] == 1
    no = C.misdirection_verdict(control, misdirection=("base",), output=("flat",))
    assert not no["held"]
    ent = C.misdirection_verdict(control, misdirection=("flat",), output=("base",), metric="entropy")
    assert ent["held"]
    with pytest.raises(ValueError, match="no \\(misdirection"):
        C.misdirection_verdict(control, misdirection=("rmu",), output=("ga",))
    cloze = C.confidence_control({"base": model, "flat": flat}, tok, records, scoring="cloze")
    assert cloze.accuracy["base"].scoring == "cloze" and cloze.accuracy["base"].prompts[0].endswith("\nAnswer:")
    assert np.array_equal(cloze.accuracy["flat"].correct, cloze.accuracy["base"].correct)
    assert C.misdirection_verdict(cloze, misdirection=("flat",), output=("base",))["held"]
    with pytest.raises(ValueError, match="scoring"):
        C.confidence_control({"base": model}, tok, records, scoring="lettered")
