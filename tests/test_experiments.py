"""experiments: run specs and their keys (which follow the content of every input), the resumable / shardable
sweep runner (incomplete files recomputed, workers that end with the sweep), run_one on a tiny model, the
summaries checked against hand-computed numbers, and the migration of a results directory to new keys."""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import pickle
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from rmu_analysis import experiments as E
from rmu_analysis.cli import main
from rmu_analysis.data import write_jsonl, write_mcq
from rmu_analysis.experiments import inputs, runner
from rmu_analysis.experiments.cli import model_workbench
from rmu_analysis.organism.tokenizer import train_tokenizer
from rmu_analysis.organism.world import SUBJECTS, generate_world
from rmu_analysis.recipes import organism_plan
from rmu_analysis.testing import save_tiny_model_and_corpora, synthetic_texts, tiny_llama
from rmu_analysis.unlearning import UnlearnResult

EVAL = E.EvalSettings(confidence_prompts=3, confidence_tokens=2, eval_texts=4, batch_size=8)


@pytest.fixture(scope="module")
def tiny_world():
    world = generate_world(0, {"pathogen": 4, "exploit": 4, "city": 4, "person": 4, "element": 4},
                           forget_docs=24, retain_docs=24)
    tok = train_tokenizer(world.forget_corpus["bio"] + world.forget_corpus["cyber"] + world.retain_corpus,
                          vocab_size=300, min_frequency=1)
    data = E.ExperimentData("tiny", world.forget_corpus, world.retain_corpus, world.mcq, SUBJECTS)
    return data, tok


@pytest.fixture()
def bench(tiny_world):
    data, tok = tiny_world
    model = tiny_llama(len(tok), n_layers=4, hidden=32, tokenizer=tok)
    return E.Workbench(model, tok, data, model_id="tiny")


def spec(method="rmu", layer=2, coeff=None, seed=0, **kw):
    if coeff is None and method in ("rmu", "adaptive-rmu"):
        coeff = 5.0
    return E.RunSpec(method=method, layer=layer, coeff=coeff, seed=seed, steps=kw.pop("steps", 4),
                     model="tiny", data="tiny", eval=EVAL, **kw)


# ---------------------------------------------------------------------------------------------- specs
def test_key_is_stable_and_canonical():
    a = E.RunSpec("rmu", layer=3, steps=10, coeff=6, lr=1e-3, options={"loss": "masked", "log_every": 5})
    b = E.RunSpec("rmu", layer=3, steps=10, coeff=6.0, lr=0.001, options=(("log_every", 5), ("loss", "masked")))
    assert a == b and a.key() == b.key()
    assert len(a.key()) == 16 and int(a.key(), 16) >= 0
    assert E.RunSpec.from_dict(json.loads(json.dumps(a.to_dict()))).key() == a.key()
    # the key is a hash of canonical JSON (not Python's per-process hash): recompute it from its definition
    import hashlib

    payload = {"spec": a.to_dict(), "config": a.config().to_dict(), "version": E.RESULT_VERSION,
               "inputs": E.run_inputs("organism", "organism")}
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    assert a.key() == hashlib.sha256(text.encode()).hexdigest()[:16]
    assert a.inputs()["model"].startswith("organism:") and a.inputs()["data"].startswith("organism:")


def test_keys_differ_for_every_field():
    base = E.RunSpec("rmu", layer=3, steps=10, coeff=6.0)
    variants = [
        E.RunSpec("adaptive-rmu", layer=3, steps=10, coeff=6.0), E.RunSpec("rmu", layer=4, steps=10, coeff=6.0),
        E.RunSpec("rmu", layer=3, steps=11, coeff=6.0), E.RunSpec("rmu", layer=3, steps=10, coeff=6.5),
        E.RunSpec("rmu", layer=3, steps=10, coeff=6.0, seed=1), E.RunSpec("rmu", layer=3, steps=10, coeff=6.0, lr=1e-4),
        E.RunSpec("rmu", layer=3, steps=10, coeff=6.0, alpha=10), E.RunSpec("rmu", layer=3, steps=10, coeff=6.0, model="m"),
        E.RunSpec("rmu", layer=3, steps=10, coeff=6.0, options={"loss": "masked"}),
        E.RunSpec("rmu", layer=3, steps=10, coeff=6.0, eval=E.EvalSettings(eval_texts=8)),
    ]
    keys = {base.key()} | {v.key() for v in variants}
    assert len(keys) == len(variants) + 1


def test_spec_builds_the_engine_config():
    from rmu_analysis.unlearning import AdaptiveRMUConfig, NPOConfig, RMUConfig

    cfg = E.RunSpec("rmu", layer=5, steps=20, coeff=7.0, alpha=100, lr=1e-3, seed=3).config()
    assert isinstance(cfg, RMUConfig) and (cfg.layer, cfg.steps, cfg.steering_coeff, cfg.alpha, cfg.lr, cfg.seed) == \
        (5, 20, 7.0, 100.0, 1e-3, 3)
    assert isinstance(E.RunSpec("adaptive-rmu", layer=5, steps=2, coeff=3).config(), AdaptiveRMUConfig)
    assert E.RunSpec("adaptive-rmu", layer=5, steps=2, coeff=3).config().beta == 3.0
    assert E.RunSpec("npo", layer=5, steps=2, coeff=0.2).config() == NPOConfig(layer=5, steps=2, beta=0.2, seed=0)


@pytest.mark.parametrize("kwargs, message", [
    ({"method": "ga", "coeff": 1.0}, "takes no coefficient"),
    ({"method": "ga", "alpha": 1.0}, "no retain weight"),
    ({"method": "rmu", "options": {"nope": 1}}, "not a field"),
    ({"method": "rmu", "options": {"layer": 1}}, "duplicates"),
    ({"method": "sgd"}, "method must be one of"),
])
def test_invalid_specs_fail_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        E.RunSpec(layer=3, steps=10, **kwargs)


# ------------------------------------------------------------------------------------------ the sweep
def fake_row(s: E.RunSpec, forget: float = 0.3, general: float = 0.5) -> dict:
    """A complete result row without training (for the sweep-runner tests)."""
    topics = ["bio", "cyber"]
    rep = {t: {"cos_u_mean": 0.9, "cos_uniform_null_mean": 0.7, "cos_gaussian_null_mean": 0.0, "norm_mean": 2.0}
           for t in topics}
    conf = {t: {"max_logit_mean": 5.0} for t in topics}
    coef = {t: 4.0 for t in topics} if s.method in E.STEERING else {}
    return {"key": s.key(), "spec": s.to_dict(), "status": "ok", "topics": topics,
            "forget_accuracy": {t: forget for t in topics}, "general_accuracy": general,
            "accuracy": {"bio": forget, "cyber": forget, "general": general}, "retain_loss": 1.0,
            "confidence": conf, "alignment": rep, "coefficient": coef,
            "forget_norm": {t: {"frozen": 2.0, "final": 3.0} for t in topics},
            "coefficient_over_norm": {t: c / 2.0 for t, c in coef.items()},
            "base": {"accuracy": {"bio": 0.8, "cyber": 0.8, "general": 0.6}, "retain_loss": 1.0, "confidence": conf,
                     "alignment": rep},
            "log": [], "steps_run": s.steps, "train_seconds": 0.0, "wall_seconds": 0.0}


def grid(n=7):
    return [spec(layer=2, coeff=float(c), steps=3) for c in range(1, n + 1)]


@pytest.fixture()
def counting(monkeypatch):
    calls = []

    def fake(s, bench):
        calls.append(s.key())
        return fake_row(s)

    monkeypatch.setattr(runner, "run_one", fake)
    return calls


def test_resume_skips_finished_runs(tmp_path, counting):
    specs = grid()
    first = E.run_sweep(specs[:4], tmp_path, bench=None, progress=False)
    assert (first.ran, first.skipped) == (4, 0) and len(counting) == 4
    second = E.run_sweep(specs, tmp_path, bench=None, progress=False)
    assert (second.ran, second.skipped) == (3, 4)
    assert counting[4:] == [s.key() for s in specs[4:]]
    third = E.run_sweep(specs, tmp_path, bench=None, progress=False)
    assert (third.ran, third.skipped) == (0, 7) and len(counting) == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{s.key()}.json" for s in specs)
    assert E.run_sweep(specs, tmp_path, bench=None, progress=False, resume=False).ran == 7


def test_finished_sweep_builds_no_workbench(tmp_path, counting):
    E.run_sweep(grid(3), tmp_path, bench=None, progress=False)
    built = []
    E.run_sweep(grid(3), tmp_path, bench=lambda: built.append(1), progress=False)
    assert built == []


def test_crash_mid_sweep_leaves_only_complete_files(tmp_path, monkeypatch):
    specs = grid(5)
    calls = []

    def crashing(s, bench):
        calls.append(s)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return fake_row(s)

    monkeypatch.setattr(runner, "run_one", crashing)
    with pytest.raises(KeyboardInterrupt):
        E.run_sweep(specs, tmp_path, bench=None, progress=False)
    files = sorted(tmp_path.iterdir())
    assert len(files) == 2 and all(json.loads(f.read_text())["status"] == "ok" for f in files)

    # a crash while the file is being written leaves no file at the final name and no temporary file
    def bad_replace(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "run_one", lambda s, b: fake_row(s))
    monkeypatch.setattr("rmu_analysis._io.os.replace", bad_replace)
    with pytest.raises(KeyboardInterrupt):
        E.run_sweep(specs, tmp_path, bench=None, progress=False)
    assert sorted(tmp_path.iterdir()) == files
    monkeypatch.undo()
    monkeypatch.setattr(runner, "run_one", lambda s, b: fake_row(s))
    assert E.run_sweep(specs, tmp_path, bench=None, progress=False).ran == 3


@pytest.mark.parametrize("n", [1, 2, 3, 5, 9])
def test_shards_partition_the_grid(n):
    specs = grid(7) + grid(7)[:2]  # duplicates are run once
    keys = [s.key() for s in grid(7)]
    parts = [[s.key() for s in E.shard_specs(specs, f"{i}/{n}")] for i in range(n)]
    assert sorted(k for p in parts for k in p) == sorted(keys)  # union = grid, and no key twice
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


@pytest.mark.parametrize("text", ["3/3", "-1/2", "1/0", "a/b", "2"])
def test_bad_shard_is_a_clear_error(text):
    with pytest.raises(ValueError, match="shard"):
        E.parse_shard(text)


def test_shards_merge_by_reading_the_directory(tmp_path, counting):
    specs = grid(7)
    for i in range(3):
        E.run_sweep(specs, tmp_path, bench=None, shard=(i, 3), progress=False)
    assert len(counting) == 7
    frame = E.load_results(tmp_path)
    assert sorted(frame["key"]) == sorted(s.key() for s in specs)
    assert set(frame["coeff"]) == set(range(1, 8))
    (tmp_path / ".partial.json").write_text("{")  # hidden temporaries are ignored
    with pytest.warns(UserWarning, match="1 of 8 runs"):
        sub = E.load_results(tmp_path, specs + [spec(coeff=99.0)])
    assert len(sub) == 7


# -------------------------------------------------------------------------------------------- run_one
def test_run_one_measures_and_leaves_the_model_unchanged(bench):
    before = {n: p.detach().clone() for n, p in bench.model.named_parameters()}
    s = spec("adaptive-rmu", layer=2, steps=4, lr=1e-2, alpha=10.0)
    row = E.run_one(s, bench)
    for n, p in bench.model.named_parameters():
        assert torch.equal(p, before[n]), n
    assert row["key"] == s.key() and row["status"] == "ok" and row["steps_run"] == 4
    assert set(row["forget_accuracy"]) == {"bio", "cyber"} and 0 <= row["general_accuracy"] <= 1
    n_bio = len(bench.data.mcq["bio"])
    assert row["forget_accuracy"]["bio"] * n_bio == pytest.approx(round(row["forget_accuracy"]["bio"] * n_bio), abs=1e-3)
    for t in ("bio", "cyber"):
        x = row["coefficient"][t] / row["forget_norm"][t]["frozen"]
        assert row["coefficient_over_norm"][t] == pytest.approx(x, rel=1e-4)
        assert row["alignment"][t]["norm_mean"] == row["forget_norm"][t]["final"]
        assert set(row["alignment"][t]) >= {"cos_u_mean", "cos_uniform_null_mean", "cos_gaussian_null_mean"}
    # the base numbers are the untouched model's
    from rmu_analysis.evaluation import evaluate_mcq

    base_bio = evaluate_mcq(bench.model, bench.tokenizer, bench.data.mcq["bio"], "biology").accuracy
    assert row["base"]["accuracy"]["bio"] == pytest.approx(base_bio, abs=1e-6)
    json.dumps(row)  # JSON-ready


def test_evaluation_copy_equals_applying_in_place(tiny_world, bench):
    s = spec("rmu", layer=1, coeff=3.0, steps=3, lr=1e-2, alpha=10.0)
    a = E.run_one(s, bench)
    data, tok = tiny_world
    model = tiny_llama(len(tok), n_layers=4, hidden=32, tokenizer=tok)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    b = E.run_one(s, E.Workbench(model, tok, data, model_id="tiny", eval_copy=False))
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])
    for field in ("accuracy", "retain_loss", "confidence", "alignment", "coefficient"):
        assert a[field] == b[field], field


def test_installed_puts_each_runs_tensors_into_the_evaluation_copy_and_back(bench):
    names = [n for n, _ in bench.model.named_parameters() if "down_proj" in n]
    orig = {n: p.detach().clone() for n, p in bench.model.named_parameters()}
    first = UnlearnResult(config=None, topics=(), trained={names[0]: torch.ones_like(orig[names[0]])}, log=[],
                          coefficients={}, control_vectors={}, steps=0, applied=False)
    with bench.installed(first) as model:
        assert model is not bench.model
        assert torch.equal(dict(model.named_parameters())[names[0]], first.trained[names[0]])
    second = dataclasses.replace(first, trained={names[2]: torch.zeros_like(orig[names[2]])})
    with bench.installed(second) as model:
        params = dict(model.named_parameters())
        assert torch.equal(params[names[0]], orig[names[0]])  # the previous run's tensor is back
        assert torch.equal(params[names[2]], second.trained[names[2]])
    assert all(torch.equal(p, orig[n]) for n, p in bench.model.named_parameters())


def test_baseline_run_and_wrong_workbench(bench):
    row = E.run_one(spec("ga", steps=2, lr=1e-4), bench)
    assert row["coefficient"] == {} and row["coefficient_over_norm"] == {}
    assert "not trained toward" in row["u"]
    with pytest.raises(ValueError, match="workbench holds"):
        E.run_one(E.RunSpec("ga", layer=2, steps=2, model="other", data="tiny", eval=EVAL), bench)


def test_held_out_split_is_fixed_and_training_order_follows_the_seed(tiny_world):
    data, _ = tiny_world
    f0, r0, fe0, re0 = data.split(4, seed=0)
    f1, r1, fe1, re1 = data.split(4, seed=1)
    assert fe0 == fe1 and re0 == re1 and fe0["bio"] == list(data.forget["bio"][-4:])
    assert sorted(f0["bio"]) == sorted(f1["bio"]) and f0["bio"] != f1["bio"]
    assert not set(fe0["bio"]) & set(f0["bio"][:0] + list(data.forget["bio"][:-4])) - set(data.forget["bio"][:-4])
    with pytest.raises(ValueError, match="eval_texts"):
        data.split(20, seed=0)


# ------------------------------------------------------------------------------------------ summaries
def layer_frame() -> pd.DataFrame:
    """Six layers, two seeds; per-layer means are the numbers in the comments."""
    rmu = [0.20, 0.30, 0.40, 0.50, 0.60, 0.70]
    ada = [0.30, 0.30, 0.30, 0.30, 0.40, 0.30]
    rows = []
    for method, accs in (("rmu", rmu), ("adaptive-rmu", ada)):
        for layer, acc in zip(range(2, 8), accs):
            for seed, d in ((0, -0.02), (1, 0.02)):
                rows.append({"key": f"{method}{layer}{seed}", "status": "ok", "method": method, "layer": layer,
                             "seed": seed, "coeff": 1.0, "lr": 1e-3, "alpha": 1.0, "acc_bio": acc + d,
                             "acc_cyber": acc - d, "forget_acc": acc, "general_acc": 0.54 if layer == 7 else 0.6,
                             "base_general_acc": 0.6, "norm_frozen_bio": 1.0, "norm_frozen_cyber": 1.0})
    return pd.DataFrame(rows)


def test_layer_targets_on_a_hand_made_frame():
    res = E.layer_targets(layer_frame())
    t = res["targets"]
    assert res["deepest_third"] == [6, 7]
    assert t["adaptive_fraction_of_layers_at_most_35pct"]["value"] == pytest.approx(5 / 6)
    assert t["adaptive_fraction_of_layers_at_most_35pct"]["held"]
    assert t["rmu_spearman_rho_forget_vs_layer"]["value"] == pytest.approx(1.0)
    assert t["deepest_third_gap_rmu_minus_adaptive"]["value"] == pytest.approx(0.65 - 0.35)
    assert t["min_general_over_base"]["value"] == pytest.approx(0.9) and t["min_general_over_base"]["held"]
    table = E.layer_table(layer_frame())
    row = table[(table["method"] == "rmu") & (table["layer"] == 2)].iloc[0]
    assert row["acc_bio_mean"] == pytest.approx(0.2) and row["acc_bio_std"] == pytest.approx(0.04 / math.sqrt(2))
    assert row["n_seeds"] == 2


def test_targets_drive_the_checks_keys_and_text():
    strict = E.Targets(max_forget=0.25, min_general_ratio=0.95)
    t = E.layer_targets(layer_frame(), strict)["targets"]
    assert set(t) == {"adaptive_fraction_of_layers_at_most_25pct", "rmu_spearman_rho_forget_vs_layer",
                      "deepest_third_gap_rmu_minus_adaptive", "min_general_over_base"}
    assert t[strict.adaptive_fraction_key]["value"] == 0 and not t[strict.adaptive_fraction_key]["held"]
    assert not t[strict.general_key]["held"] and t[strict.general_key]["threshold"] == 0.95
    assert E.TARGETS.adaptive_fraction_key == "adaptive_fraction_of_layers_at_most_35pct"
    assert [E.TARGETS.text(n) for n in ("max_forget", "min_general_ratio", "min_gap", "max_noise_rho", "min_rho")] \
        == ["35%", "85%", "20", "−0.5", "0.5"]


def test_summary_claims_render_their_verdict_and_explain_only_on_the_organism():
    from rmu_analysis.experiments.report import Claim, render

    assert render(Claim("x = 1", True, "target x > 0")) == ["- x = 1 — **held** (target x > 0)."]
    assert render(Claim("y", target="reported, no target")) == ["- y (reported, no target)."]
    failed = render(Claim("z", False, explain="noise_sensitivity"))
    assert failed[0] == "- z — **not held**." and failed[1].startswith("  - Why: this check pushes the mean state")
    assert render(Claim("z", False, explain="noise_sensitivity"), explain=False) == ["- z — **not held**."]
    summary = {"theory": {"noise_sensitivity": {"spearman_rho_k_phi": 0.1, "layer": 3, "held": False}},
               "layer_sweep": E.layer_targets(layer_frame(), E.Targets(min_general_ratio=0.95))}
    plan = organism_plan(quick=True)
    md = E.summary_markdown(summary, plan, {"total": 60.0}, quick=True)
    assert "(target ρ ≤ −0.5)" in md and "Why: this check pushes the mean state" in md
    assert "Adaptive RMU at most 35% forget accuracy at ≥ 80% of layers: 83.3% of layers — **held**." in md
    assert "- General accuracy ≥ 85% of base in every run: worst 90.0% of base" in md
    other = E.summary_markdown(summary, dataclasses.replace(plan, model="/models/x"), {"total": 60.0}, quick=False)
    assert "Why:" not in other and other.startswith("# Reproduction on the /models/x")


def test_early_late_on_a_hand_made_frame():
    el = E.early_late(layer_frame(), split=4).set_index(["topic", "layers"])
    assert el.loc[("mean", "early"), "rmu"] == pytest.approx(0.25)
    assert el.loc[("mean", "early"), "adaptive_rmu"] == pytest.approx(0.30)
    assert el.loc[("mean", "late"), "lowered_by"] == pytest.approx(0.55 - 0.325)
    assert el.loc[("bio", "late"), "rmu"] == pytest.approx(0.55)  # seed offsets cancel
    assert (el.loc[("mean", "late"), "first"], el.loc[("mean", "late"), "last"]) == (4, 7)


def test_isotonic_and_spearman():
    np.testing.assert_allclose(E.isotonic_decreasing([1, 2, 3, 4], [4, 3, 2, 1]), [4, 3, 2, 1])
    np.testing.assert_allclose(E.isotonic_decreasing([1, 2, 3], [1, 3, 2]), [2, 2, 2])
    np.testing.assert_allclose(E.isotonic_decreasing([3, 1, 2], [1, 5, 3]), [1, 5, 3])  # unsorted input
    np.testing.assert_allclose(E.isotonic_decreasing([1, 1, 2], [2, 4, 1]), [3, 3, 1])  # ties share a value
    assert E.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(E.spearman([1, 1, 1], [1, 2, 3]))


def test_collapse_summary_separates_ratio_from_raw_coefficient():
    # accuracy = f(c / norm) exactly, norms differ by layer: one curve on the ratio, not on raw c
    rows = []
    for layer, norm in ((2, 1.0), (5, 4.0), (8, 16.0)):
        for ratio in (0.5, 1, 2, 4, 8):
            rows.append({"layer": layer, "method": "rmu", "ratio": ratio, "coefficient": ratio * norm,
                         "forget_acc": 0.9 - 0.15 * math.log2(ratio * 2)})
    res = E.collapse_summary(pd.DataFrame(rows))
    assert res["n_points"] == 15 and res["n_layers"] == 3
    assert all(v == pytest.approx(-1.0) for v in res["within_layer_rho"].values())
    assert res["pooled_rho_ratio"] == pytest.approx(-1.0)
    assert res["r2_ratio"] == pytest.approx(1.0)
    assert res["r2_coefficient"] < 0.8 and res["pooled_rho_coefficient"] > -0.9
    assert math.isnan(res["residual_layer_rho"])  # no residual at all
    assert res["residual_layer_rho_coefficient"] > 0.5  # on raw c, deeper layers sit above the curve


def test_table1_selection_and_markdown():
    rows = []
    for method, points in {"ga": [(1e-4, 0.5, 0.58), (1e-3, 0.2, 0.30)], "rmu": [(1e-3, 0.3, 0.57), (2e-3, 0.26, 0.55)]}.items():
        for lr, forget, general in points:
            for seed, d in ((0, -0.01), (1, 0.01)):
                rows.append({"key": f"{method}{lr}{seed}", "status": "ok", "method": method, "seed": seed,
                             "coeff": 5.0 if method == "rmu" else np.nan, "lr": lr, "alpha": np.nan,
                             "acc_bio": forget + d, "acc_cyber": forget - d, "acc_general": general,
                             "forget_acc": forget, "general_acc": general, "base_general_acc": 0.6,
                             "base_acc_bio": 0.8, "base_acc_cyber": 0.7, "base_acc_general": 0.6,
                             "retain_loss": 1.0, "norm_frozen_bio": 1.0, "norm_frozen_cyber": 1.0})
    frame = pd.DataFrame(rows)
    sel = E.table1_select(frame)
    chosen = sel[sel["selected"]].set_index("method")
    assert chosen.loc["ga", "point"] == "lr=0.0001"  # lr 1e-3 forgets more but general 0.30 < 0.85 × 0.6
    assert chosen.loc["rmu", "point"] == "c=5, lr=0.002"
    table = E.table1_frame(frame)
    assert list(table["method"]) == ["base", "ga", "rmu"]
    assert table.set_index("method").loc["rmu", "bio_mean"] == pytest.approx(0.26)
    assert table.set_index("method").loc["rmu", "bio_std"] == pytest.approx(0.02 / math.sqrt(2))
    md = E.table1_markdown(table)
    assert "| RMU | c=5, lr=0.002 | 26.0 ± 1.4 | 26.0 ± 1.4 | 55.0 ± 0.0 | 2 |" in md
    assert "| base |  | 80.0 | 70.0 | 60.0 | 1 |" in md


# ---------------------------------------------------------------------------------------------- plans
def test_plan_grids_sizes_and_coefficients():
    plan = organism_plan()
    grids = E.plan_grids(plan, {l: 10.0 + l for l in plan.coeff_layers})
    assert len(grids["layer"]) == len(plan.layers) * 2 * len(plan.seeds) and len(plan.seeds) >= 3
    assert list(plan.layers) == E.valid_layers(12)
    # Table 1: every grid point on dev with the selection seeds, then one chosen point per method on test
    n_points = [len(p) for _, p in plan.table_grid]
    assert len(set(n_points)) == 1  # the baselines get a grid as large as the steering methods'
    assert len(grids["table1_select"]) == sum(n_points) * len(plan.selection_seeds) and grids["table1"] == []
    assert {s.eval.split for s in grids["table1_select"]} == {"dev"}
    assert not set(plan.selection_seeds) & set(plan.seeds)
    chosen = {m: points[-1] for m, points in plan.grid().items()}
    reported = E.plan_grids(plan, {l: 10.0 + l for l in plan.coeff_layers}, selected=chosen)["table1"]
    assert len(reported) == len(chosen) * len(plan.seeds) and {s.eval.split for s in reported} == {"test"}
    assert {s.method for s in reported} == {"ga", "graddiff", "npo", "rmu", "adaptive-rmu"}
    assert {s.eval.per_fact for s in grids["layer"]} == {plan.sweep_per_fact} and reported[0].eval.per_fact is None
    rmu = [s for s in grids["coefficient"] if s.method == "rmu" and s.layer == plan.coeff_layers[0]]
    assert [s.coeff for s in rmu] == [float(f"{r * (10.0 + plan.coeff_layers[0]):.4g}") for r in plan.coeff_ratios]
    for g in grids.values():
        assert len({s.key() for s in g}) == len(g)
    with pytest.raises(ValueError, match="norms"):
        E.plan_grids(plan)


def tiny_bench_factory() -> E.Workbench:
    """A picklable factory (module-level) for the worker processes of the parallel test."""
    world = generate_world(0, {k: 4 for k in ("pathogen", "exploit", "city", "person", "element")},
                           forget_docs=24, retain_docs=24)
    tok = train_tokenizer(world.forget_corpus["bio"] + world.forget_corpus["cyber"] + world.retain_corpus,
                          vocab_size=300, min_frequency=1)
    model = tiny_llama(len(tok), n_layers=4, hidden=32, tokenizer=tok)
    return E.Workbench(model, tok, E.ExperimentData("tiny", world.forget_corpus, world.retain_corpus, world.mcq,
                                                    SUBJECTS), model_id="tiny")


def test_parallel_workers_write_every_run_once(tmp_path):
    specs = [spec("rmu", layer=l, coeff=c, steps=2) for l in (2, 3) for c in (1.0, 2.0)]
    outcome = E.run_sweep(specs, tmp_path, tiny_bench_factory, workers=2, progress=False)
    assert outcome.ran == len(specs)
    frame = E.load_results(tmp_path)
    assert sorted(frame["key"]) == sorted(s.key() for s in specs) and (frame["status"] == "ok").all()
    # the same runs in one process give the same numbers (runs are independent of where they run)
    one = E.run_one(specs[0], tiny_bench_factory())
    saved = json.loads((tmp_path / f"{specs[0].key()}.json").read_text())
    assert saved["accuracy"] == one["accuracy"] and saved["coefficient"] == one["coefficient"]
    with pytest.raises(ValueError, match="picklable"):
        E.run_sweep([spec(coeff=9.0), spec(coeff=8.0)], tmp_path / "x", tiny_bench_factory(), workers=2,
                    progress=False)


# ------------------------------------------------------------------- keys follow the content of every input
QUESTIONS = [{"question": f"Which host does pathogen {i} infect?", "choices": ["bats", "mice", "birds", "pigs"],
              "answer": i % 4} for i in range(6)]


@pytest.fixture()
def saved(tmp_path, tiny_tokenizer):
    """A tiny model saved as an HF directory, WMDP-format corpora and question files: a dict of paths."""
    model, bio, cyber, retain = save_tiny_model_and_corpora(tmp_path, tiny_tokenizer, 140)
    mcq = {s: write_mcq(QUESTIONS, tmp_path / f"{s}.jsonl") for s in ("bio", "cyber", "general")}
    return {"model": model, "bio": bio, "cyber": cyber, "retain": retain, **{f"{s}_mcq": p for s, p in mcq.items()}}


def files_key(paths: dict, **load) -> str:
    data = E.data_from_files({"bio": paths["bio"], "cyber": paths["cyber"]}, paths["retain"],
                             {s: paths[f"{s}_mcq"] for s in ("bio", "cyber", "general")}, **load)
    return E.RunSpec("rmu", layer=2, steps=4, coeff=5.0, model=str(paths["model"]), data=data.name).key()


def edit_text(path: Path) -> None:
    """One word added to the fourth text of a corpus file (a JSON line's "text" or a raw line), in place."""
    lines = path.read_text().splitlines()
    try:
        record = json.loads(lines[3])
    except ValueError:
        record = None
    changed = lines[3] + " virus" if not isinstance(record, dict) else json.dumps({**record,
                                                                                    "text": record["text"] + " virus"})
    path.write_text("\n".join(lines[:3] + [changed] + lines[4:]) + "\n")


@pytest.mark.parametrize("changed", ["bio", "cyber", "retain", "bio_mcq", "general_mcq", "weights", "config"])
def test_a_changed_input_gives_a_new_key(saved, tiny_tokenizer, changed):
    before = files_key(saved)
    assert files_key(saved) == before  # stable while nothing changes
    if changed == "weights":  # same architecture and file size, other values
        tiny_llama(len(tiny_tokenizer), n_layers=4, seed=1).save_pretrained(saved["model"])
    elif changed == "config":
        cfg = json.loads((saved["model"] / "config.json").read_text())
        (saved["model"] / "config.json").write_text(json.dumps({**cfg, "rms_norm_eps": 1e-5}))
    elif changed.endswith("_mcq"):
        records = [dict(q) for q in QUESTIONS]
        records[0]["answer"] = 3
        write_mcq(records, saved[changed])
    else:
        edit_text(saved[changed])
    assert files_key(saved) != before


def test_identical_copies_under_other_names_share_keys_and_the_format_counts(saved, tmp_path):
    """Keys hash what was loaded, not file names: a copy of the same data is the same data (its results are
    shared); reading a file in another format is other data."""
    before = files_key(saved)
    copies = dict(saved)
    for name in ("bio", "cyber", "retain", "general_mcq"):
        copies[name] = tmp_path / f"copy-of-{saved[name].name}"
        shutil.copy(saved[name], copies[name])
    assert files_key(copies) == before
    assert files_key(saved, forget_format="lines") != before  # bio's JSON lines taken as raw texts
    assert files_key(saved, min_chars=40) != before


def test_the_organisms_files_are_part_of_its_keys(tmp_path, monkeypatch):
    assets = tmp_path / "assets"
    shutil.copytree(inputs.ASSETS, assets)
    s = E.RunSpec("rmu", layer=3, steps=10, coeff=6.0)
    monkeypatch.setattr(inputs, "ASSETS", assets)
    before = s.inputs()
    assert before == E.run_inputs("organism", "organism") and s.key() == E.RunSpec("rmu", layer=3, steps=10,
                                                                                    coeff=6.0).key()
    report = json.loads((assets / "build_report.json").read_text())
    (assets / "build_report.json").write_text(json.dumps({**report, "seed": 1}))  # a rebuilt organism
    assert s.inputs()["model"] != before["model"] and s.inputs()["data"] == before["data"]
    key = s.key()
    edit_text(assets / "data" / "retain-corpus.jsonl")
    assert s.inputs()["data"] != before["data"] and s.key() != key
    (assets / "README.md").write_text("notes")  # documentation and hidden files are no input
    (assets / ".cache").write_text("x")
    assert s.key() == E.RunSpec("rmu", layer=3, steps=10, coeff=6.0).key()


def test_file_digests_are_cached_by_size_mtime_and_inode(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    f = tmp_path / "w.bin"
    f.write_bytes(b"a" * 100)
    old = time.time() - 60
    os.utime(f, (old, old))  # settled: cached from now on
    first = inputs.file_digest(f)
    reads = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda *a, **k: reads.append(a[0]) or real_open(*a, **k))
    assert inputs.file_digest(f) == first and reads == []
    monkeypatch.undo()
    f.write_bytes(b"b" * 100)  # same size, new mtime (a file changed in the last 2 s is always read)
    assert inputs.file_digest(f) != first


def sweep_argv(paths: dict, results: Path, *extra: str) -> list[str]:
    return ["sweep", "--model", str(paths["model"]), "--forget-files", f"bio={paths['bio']}",
            f"cyber={paths['cyber']}", "--retain-file", str(paths["retain"]), "--mcq",
            *(f"{s}={paths[f'{s}_mcq']}" for s in ("bio", "cyber", "general")), "--experiment", "table1",
            "--layer", "2", "--steps", "2", "--seeds", "0", "--results", str(results), "--no-progress", *extra]


def test_a_sweep_rerun_after_the_data_changed_recomputes(saved, tmp_path, counting, capsys):
    results = tmp_path / "runs"
    assert main(sweep_argv(saved, results)) == 0
    n = len(counting)
    assert n > 0 and main(sweep_argv(saved, results)) == 0 and len(counting) == n  # unchanged: all reused
    edit_text(saved["bio"])
    edit_text(saved["retain"])
    capsys.readouterr()
    assert main(sweep_argv(saved, results)) == 0
    assert len(counting) == 2 * n and f"ran {n}, skipped 0" in capsys.readouterr().out
    assert len(list(results.glob("*.json"))) == 2 * n  # the old results stay, under the old data's keys


def test_sweep_forget_format_flag(saved, tmp_path, counting, capsys):
    assert main(sweep_argv(saved, tmp_path / "a", "--forget-format", "lines")) == 0
    rows = [json.loads(p.read_text()) for p in (tmp_path / "a").glob("*.json")]
    auto = E.data_from_files({"bio": saved["bio"], "cyber": saved["cyber"]}, saved["retain"],
                             {s: saved[f"{s}_mcq"] for s in ("bio", "cyber", "general")})
    lines = E.data_from_files({"bio": saved["bio"], "cyber": saved["cyber"]}, saved["retain"],
                              {s: saved[f"{s}_mcq"] for s in ("bio", "cyber", "general")}, forget_format="lines")
    assert {r["spec"]["data"] for r in rows} == {lines.name} != {auto.name}
    assert lines.forget["bio"][0].startswith('{"text"')
    with pytest.raises(SystemExit):
        main(["sweep", "--results", str(tmp_path), "--forget-format", "csv"])
    assert main(["sweep", "--results", str(tmp_path), "--forget-format", "lines", "--list"]) == 2
    assert "--forget-format: only for --model PATH" in capsys.readouterr().err


# --------------------------------------------------------------------------- incomplete result files
@pytest.mark.parametrize("field", [("retain_loss",), ("base", "accuracy", "general"), ("alignment", "bio", "cos_u_mean"),
                                   ("topics",), ("forget_norm", "cyber", "final")])
def test_an_incomplete_result_file_is_reported_and_recomputed(tmp_path, counting, field):
    specs = grid(3)
    E.run_sweep(specs, tmp_path, bench=None, progress=False)
    path = tmp_path / f"{specs[1].key()}.json"
    row = json.loads(path.read_text())
    node = row
    for part in field[:-1]:
        node = node[part]
    del node[field[-1]]
    path.write_text(json.dumps(row))
    name = ".".join(field)
    with pytest.warns(UserWarning) as caught:
        frame = E.load_results(tmp_path, specs)  # the merge goes on without it
    assert sorted(frame["key"]) == sorted(s.key() for s in specs if s is not specs[1])
    messages = [str(w.message) for w in caught]
    assert sum(path.name in m for m in messages) == 1 and f"{path} lacks the field '{name}': skipped" in messages[0]
    assert "1 of 3 runs have no result" in messages[1]
    with pytest.warns(UserWarning, match=f"{path.name} lacks the field '{name}': the run is recomputed"):
        outcome = E.run_sweep(specs, tmp_path, bench=None, progress=False)
    assert (outcome.ran, outcome.skipped) == (1, 2) and counting[-1] == specs[1].key()
    assert E.result_problem(json.loads(path.read_text())) is None
    assert len(E.load_results(tmp_path, specs)) == 3


def test_unreadable_and_foreign_result_files_are_recomputed(tmp_path, counting):
    specs = grid(2)
    E.run_sweep(specs, tmp_path, bench=None, progress=False)
    (tmp_path / f"{specs[0].key()}.json").write_text("[1, 2]")
    (tmp_path / f"{specs[1].key()}.json").write_text(json.dumps(fake_row(grid(3)[2])))
    with pytest.warns(UserWarning) as caught:
        assert E.run_sweep(specs, tmp_path, bench=None, progress=False).ran == 2
    text = " ".join(str(w.message) for w in caught)
    assert "holds a JSON list" in text and f"holds the result of run {grid(3)[2].key()!r}" in text
    assert E.result_problem(None) and E.result_problem({"key": "k", "spec": {}, "status": "nonfinite"}) is None


# --------------------------------------------------------------------- parallel sweeps on a model path
def test_workers_with_a_model_path(saved, tmp_path, capsys):
    """``--workers 2 --model PATH``: the workbench factory pickles (a module-level function and plain values)."""
    results = tmp_path / "runs"
    assert main(sweep_argv(saved, results, "--workers", "2", "--threads", "1")) == 0
    out = capsys.readouterr().out
    frame = E.load_results(results)
    assert "ran 8, skipped 0" in out and len(frame) == 8 and (frame["status"] == "ok").all()
    data = E.data_from_files({"bio": saved["bio"], "cyber": saved["cyber"]}, saved["retain"],
                             {s: saved[f"{s}_mcq"] for s in ("bio", "cyber", "general")})
    factory = pickle.loads(pickle.dumps(functools.partial(model_workbench, str(saved["model"]), data, "auto")))
    assert factory().data.name == data.name == frame["data"].iloc[0]


SLOW_SWEEP = textwrap.dedent("""
    import functools, os, sys
    from pathlib import Path
    from rmu_analysis import experiments as E

    def bench(marks):
        built = E.Workbench.load("organism")
        Path(marks, str(os.getpid())).touch()  # this worker is about to train
        return built

    if __name__ == "__main__":
        results, marks = sys.argv[1:3]
        ev = E.EvalSettings(questions=4, confidence_prompts=2, confidence_tokens=1, eval_texts=8, scoring="cloze")
        specs = [E.RunSpec("rmu", layer=l, coeff=c, steps=4000, eval=ev) for l in (3, 5) for c in (5.0, 10.0)]
        E.run_sweep(specs, results, functools.partial(bench, marks), workers=2, threads=1, progress=False)
""")


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, ended but not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL, signal.SIGINT], ids=lambda s: s.name)
def test_workers_end_when_the_sweep_process_ends(tmp_path, sig):
    script, results, marks = tmp_path / "slow_sweep.py", tmp_path / "runs", tmp_path / "marks"
    script.write_text(SLOW_SWEEP)
    marks.mkdir()
    # a process started in the background (nohup, `cmd &` in a script, some CI runners) inherits SIGINT as
    # ignored, and Python then never raises KeyboardInterrupt: give the sweep the default disposition, as a terminal
    # would
    parent = subprocess.Popen([sys.executable, str(script), str(results), str(marks)], stderr=subprocess.PIPE,
                              env={**os.environ, "OMP_NUM_THREADS": "1"},
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while len(list(marks.iterdir())) < 2 and parent.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        workers = [int(p.name) for p in marks.iterdir()]
        assert len(workers) == 2 and parent.poll() is None, parent.stderr.read().decode()[-2000:]
        time.sleep(1.0)  # both are training (4000 steps: minutes)
        parent.send_signal(sig)
        parent.wait(30)
        deadline = time.monotonic() + 10
        while any(alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(alive(w) for w in workers), f"workers still alive 10 s after {sig.name} of the sweep"
    finally:
        if parent.poll() is None:
            parent.kill()
        for w in [int(p.name) for p in marks.iterdir()]:
            if alive(w):
                os.kill(w, signal.SIGKILL)
    left = list(results.iterdir()) if results.exists() else []
    assert all(p.suffix == ".json" and not p.name.startswith(".") for p in left), left  # no temporary files
    assert all(E.result_problem(json.loads(p.read_text())) is None for p in left)


# ---------------------------------------------------------------------------- migration to new keys
def test_rekey_renames_result_files_to_the_current_keys(tmp_path):
    rows = [fake_row(s) for s in grid(3)]
    for i, row in enumerate(rows):  # files under keys of an older formula, without "inputs"
        old = f"{i:016x}"
        (tmp_path / f"{old}.json").write_text(json.dumps({**row, "key": old}, indent=2))
    (tmp_path / "norms.json").write_text(json.dumps({"model": "organism", "data": "organism", "norms": {"3": 8.8}}))
    (tmp_path / "broken.json").write_text(json.dumps({"key": "x", "spec": rows[0]["spec"]}))
    done = E.rekey(tmp_path)
    assert sorted(new for _, new in done.renamed) == sorted(f"{s.key()}.json" for s in grid(3))
    assert done.unchanged == 0 and [name for name, _ in done.skipped] == ["broken.json"]
    for s, row in zip(grid(3), rows):
        migrated = json.loads((tmp_path / f"{s.key()}.json").read_text())
        assert migrated["key"] == s.key() and migrated["inputs"] == s.inputs()
        assert {k: v for k, v in migrated.items() if k not in ("key", "inputs")} == \
            {k: v for k, v in row.items() if k != "key"}  # nothing else changed: no run was trained
    assert not any((tmp_path / f"{i:016x}.json").exists() for i in range(3))
    assert json.loads((tmp_path / "norms.json").read_text())["inputs"] == E.run_inputs("organism", "organism")
    with pytest.warns(UserWarning, match="broken.json lacks the field 'topics'"):
        assert len(E.load_results(tmp_path, grid(3))) == 3
    assert E.run_sweep(grid(3), tmp_path, None, progress=False).ran == 0
    assert E.rekey(tmp_path) == E.Rekeyed(renamed=(), unchanged=3, skipped=(("broken.json", done.skipped[0][1]),))
    # interrupted after writing the new file: running again removes the old one
    shutil.copy(tmp_path / f"{grid(3)[0].key()}.json", tmp_path / "0000000000000009.json")
    again = E.rekey(tmp_path)
    assert again.renamed == (("0000000000000009.json", f"{grid(3)[0].key()}.json"),)
    assert not (tmp_path / "0000000000000009.json").exists()
    # a different result already under the new key is left alone
    (tmp_path / "000000000000000a.json").write_text(json.dumps({**rows[1], "key": "000000000000000a",
                                                               "retain_loss": 9.0}))
    assert "already holds another result" in dict(E.rekey(tmp_path).skipped)["000000000000000a.json"]
    assert (tmp_path / "000000000000000a.json").exists()


def test_plan_norms_are_measured_again_when_the_inputs_changed(tmp_path, monkeypatch):
    plan = organism_plan(quick=True)
    stamp = E.run_inputs(plan.model, plan.data)
    norms = {"model": "organism", "data": "organism", "norms": {"3": 8.8, "11": 24.7}}

    def measured(*args):
        raise RuntimeError("measured")

    monkeypatch.setattr("rmu_analysis.experiments.plans.forget_norms", measured)
    (tmp_path / "norms.json").write_text(json.dumps({**norms, "inputs": stamp}))
    assert E.plan_norms(plan, lambda: None, tmp_path) == {3: 8.8, 11: 24.7}
    for cached in (norms, {**norms, "inputs": {**stamp, "model": "organism:0000"}}):
        (tmp_path / "norms.json").write_text(json.dumps(cached))
        with pytest.raises(RuntimeError, match="measured"):
            E.plan_norms(plan, lambda: None, tmp_path)


# ------------------------------------------------------------------------------------------- dtype in the key
def test_dtype_is_part_of_the_key_and_float32_keeps_the_old_one():
    plain = spec()
    assert "dtype" not in plain.to_dict()  # runs made before the field keep their key
    assert spec(dtype="float32").key() == plain.key() and spec(dtype="float32").dtype is None
    bf16 = spec(dtype="bfloat16")
    assert bf16.key() != plain.key() and bf16.to_dict()["dtype"] == "bfloat16"
    assert E.RunSpec.from_dict(bf16.to_dict()) == bf16 and E.RunSpec.from_dict(plain.to_dict()) == plain
    with pytest.raises(ValueError, match="dtype must be"):
        spec(dtype="bf16")


def test_a_workbench_in_another_dtype_refuses_the_run(bench):
    assert bench.dtype == "float32"
    with pytest.raises(ValueError, match="needs the model in bfloat16, but the workbench holds it in float32"):
        E.run_one(spec("ga", steps=1, lr=1e-4, dtype="bfloat16"), bench)
    from rmu_analysis.experiments.robustness import AttackBudget, AttackSpec, run_attack

    attack = AttackSpec("probe", None, seed=0, layer=2, budget=AttackBudget(questions=4), eval=EVAL, model="tiny",
                        data="tiny", dtype="bfloat16")
    assert attack.key() != AttackSpec("probe", None, seed=0, layer=2, budget=AttackBudget(questions=4), eval=EVAL,
                                      model="tiny", data="tiny").key()
    with pytest.raises(ValueError, match="needs the model in bfloat16"):
        run_attack(attack, bench)
    with pytest.raises(ValueError, match="dtype"):  # the unlearning run and its attack agree on the dtype
        AttackSpec("probe", spec(dtype="bfloat16"), seed=0, layer=2, eval=EVAL, model="tiny", data="tiny")


def test_dtype_flag_names_the_runs_of_a_real_model(saved, tmp_path, capsys):
    from rmu_analysis.experiments.cli import add_sweep_parser, plan_from_args, robustness_plan
    from rmu_analysis.experiments.robustness import robustness_grid
    from rmu_analysis.experiments.tradeoff import tradeoff_grid, tradeoff_plan

    parser = argparse.ArgumentParser()
    add_sweep_parser(parser.add_subparsers())
    argv = sweep_argv(saved, tmp_path)
    bf16, _ = plan_from_args(parser.parse_args(argv + ["--dtype", "bfloat16"]))
    fp32, _ = plan_from_args(parser.parse_args(argv + ["--dtype", "float32"]))
    auto, _ = plan_from_args(parser.parse_args(argv))  # no CUDA here: float32
    assert (bf16.dtype, fp32.dtype, auto.dtype) == ("bfloat16", None, None)
    grids = E.plan_grids(bf16, {2: 1.0})
    assert {s.dtype for g in grids.values() for s in g} == {"bfloat16"}
    assert {s.dtype for s in tradeoff_grid(tradeoff_plan(bf16), {2: 1.0})} == {"bfloat16"}
    assert {s.dtype for s in robustness_grid(robustness_plan(bf16))} == {"bfloat16"}
    assert E.plan_grids(fp32, {2: 1.0})["layer"][0].key() == E.plan_grids(auto, {2: 1.0})["layer"][0].key()
    assert main(["sweep", "--results", str(tmp_path), "--dtype", "bfloat16", "--list"]) == 2
    assert "--dtype: only for --model PATH" in capsys.readouterr().err
