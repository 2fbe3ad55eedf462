"""Tests of rmu_analysis.experiments.robustness: the attack runs of the sweep runner (one JSON per run, resumable,
one training per method and seed), the questions they attack, and the table's pooled, fact-resampled numbers."""
from __future__ import annotations

import dataclasses
import json
import warnings

import numpy as np
import pytest

from rmu_analysis import evaluate_mcq
from rmu_analysis.cli import main
from rmu_analysis.data import write_mcq
from rmu_analysis.experiments import robustness as R
from rmu_analysis.experiments.robustness import run as run_module
from rmu_analysis.experiments.robustness.run import _texts_without
from rmu_analysis.experiments.robustness_report import ROBUSTNESS_FIGURES, robustness_report
from rmu_analysis.experiments import EvalSettings, ExperimentData, RunSpec, Workbench, is_finished, load_results, run_sweep
from rmu_analysis.organism.tokenizer import train_tokenizer
from rmu_analysis.organism.world import SUBJECTS, generate_world
from rmu_analysis.recipes import ORGANISM_ATTACK_BUDGET, PRESETS, organism_robustness_plan
from rmu_analysis.stats import paired_difference, score_interval
from rmu_analysis.testing import save_tiny_model_and_corpora, tiny_llama
from rmu_analysis.unlearning.config import RMUConfig

EVAL = EvalSettings(scoring="cloze", confidence_prompts=3, confidence_tokens=2, eval_texts=4, batch_size=8)
BUDGET = R.AttackBudget(questions=6, gcg_questions=4, general=6, gcg_tokens=2, gcg_top_k=8, gcg_candidates=4,
                        gcg_steps=2, relearn_steps=2, relearn_lr=1e-3, texts=4, batch_size=32)


@pytest.fixture(scope="module")
def tiny_world():
    world = generate_world(0, {k: 4 for k in ("pathogen", "exploit", "city", "person", "element")},
                           forget_docs=24, retain_docs=24)
    tok = train_tokenizer(world.forget_corpus["bio"] + world.forget_corpus["cyber"] + world.retain_corpus,
                          vocab_size=300, min_frequency=1)
    return ExperimentData("tiny", world.forget_corpus, world.retain_corpus, world.mcq, SUBJECTS), tok


@pytest.fixture()
def bench(tiny_world):
    data, tok = tiny_world
    return Workbench(tiny_llama(len(tok), n_layers=4, hidden=32, tokenizer=tok), tok, data, model_id="tiny")


def tiny_plan(**kw) -> R.RobustnessPlan:
    rmu = RMUConfig(layer=2, steering_coeff=5.0, steps=3, lr=1e-3, alpha=10.0, batch_size=4)
    return R.RobustnessPlan(methods=(("base", None), ("RMU", rmu)), layer=2, budget=BUDGET, seeds=(0,),
                            model="tiny", data="tiny", eval=EVAL, **kw)


def test_organism_plan_trains_each_method_and_seed_once():
    plan = organism_robustness_plan()
    specs = R.robustness_grid(plan)
    methods = {s.method for s in specs}
    assert methods == {"base", "ga", "graddiff", "npo", "rmu", "adaptive-rmu"} and plan.seeds == (0, 1, 2)
    assert len(specs) == 6 * 3 * len(R.ATTACKS) - 3  # no direction to ablate on the base model
    assert len({s.key() for s in specs}) == len(specs)
    assert len({s.share_key() for s in specs}) == 6 * 3  # one training per (method, seed)
    rmu = next(s for s in specs if s.method == "rmu")
    assert rmu.unlearn.config() == dataclasses.replace(PRESETS["organism-rmu"], seed=rmu.seed)  # the preset, as is
    assert rmu.scoring == plan.eval.scoring and rmu.budget == ORGANISM_ATTACK_BUDGET
    again = R.AttackSpec.from_dict(json.loads(json.dumps(rmu.to_dict())))
    assert again == rmu and again.key() == rmu.key()
    assert dataclasses.replace(rmu, budget=dataclasses.replace(rmu.budget, gcg_steps=11)).key() != rmu.key()


def test_attack_spec_errors():
    u = RunSpec(method="rmu", layer=2, steps=3, coeff=5.0, seed=1, model="tiny", data="tiny")
    with pytest.raises(ValueError, match="attack must be one of"):
        R.AttackSpec(attack="jailbreak", unlearn=u, seed=1, layer=2, model="tiny", data="tiny")
    with pytest.raises(ValueError, match="seed 0"):
        R.AttackSpec(attack="gcg", unlearn=u, seed=0, layer=2, model="tiny", data="tiny")
    with pytest.raises(ValueError, match="ablate needs an unlearned model"):
        R.AttackSpec(attack="ablate", unlearn=None, seed=0, layer=2)
    with pytest.raises(ValueError, match="gcg_steps"):
        R.AttackBudget(gcg_steps=0)


def test_attack_questions_split_by_entity_or_use_dev_sets(bench):
    dev, dev_subj, test, test_subj = R.attack_questions(bench, seed=0, n=10)
    assert len(dev) == len(test) == 10 and len(dev_subj) == len(test_subj) == 10
    assert not {r["entity"] for r in dev} & {r["entity"] for r in test}  # no tested fact tunes the attack
    assert R.attack_questions(bench, seed=1, n=10)[2] != test  # each seed attacks its own sample
    # data with dev sets: dev questions come from them, test questions from the reported sets
    data = bench.data
    dev_sets = {t: [dict(r, question=r["question"] + " (dev)") for r in data.mcq[t]] for t in data.topics}
    with_dev = ExperimentData("tiny", data.forget, data.retain, data.mcq, data.subjects)
    object.__setattr__(with_dev, "dev_mcq", dev_sets)
    other = Workbench(bench.model, bench.tokenizer, with_dev, model_id="tiny")
    dev2, _, test2, _ = R.attack_questions(other, seed=0, n=10)
    assert all(r["question"].endswith("(dev)") for r in dev2)
    assert not any(r["question"].endswith("(dev)") for r in test2)
    texts = ["Kraekmum virus lives in bats.", "A city by the sea."]
    assert _texts_without(texts, [{"entity": "Kraekmum virus"}]) == ["A city by the sea."]


def test_attack_runs_through_the_sweep_runner(bench, tmp_path, monkeypatch):
    plan = tiny_plan()
    specs = R.robustness_grid(plan)
    assert {s.attack for s in specs if s.method == "rmu"} == set(R.ATTACKS)
    trainings = []
    real = run_module.unlearn  # the training the attack runs call (robustness.run)
    monkeypatch.setattr(run_module, "unlearn", lambda *a, **k: trainings.append(1) or real(*a, **k))
    outcome = run_sweep(specs, tmp_path, bench, progress=False)
    assert outcome.ran == len(specs) and len(trainings) == 1  # RMU trained once for its six attacks
    for s in specs:
        assert is_finished(tmp_path / f"{s.key()}.json", s.key())
    again = run_sweep(specs, tmp_path, bench, progress=False)
    assert again.ran == 0 and again.skipped == len(specs)  # resumable
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # attack files are not unlearning results, and not reported as broken
        assert len(load_results(tmp_path)) == 0
    rows = R.load_attack_results(tmp_path, specs)
    assert len(rows) == len(specs) and all(r["status"] == "ok" for r in rows)

    # "accuracy" is the evaluation's: GCG's clean answers are evaluate_mcq's on the attacked questions
    gcg_row = next(r for r in rows if r["method"] == "rmu" and r["attack"] == "gcg")
    rmu_spec = next(s for s in specs if s.method == "rmu")
    result, _ = R.trained(bench, rmu_spec.unlearn)
    _, _, test, subj = R.attack_questions(bench, 0, BUDGET.questions)
    with bench.installed(result) as model:
        ev = evaluate_mcq(model, bench.tokenizer, test[: BUDGET.gcg_questions], subj[: BUDGET.gcg_questions],
                          scoring="cloze", cluster_key=())
    assert gcg_row["clean"] == [int(c) for c in ev.correct] and gcg_row["n"] == BUDGET.gcg_questions
    assert len(trainings) == 1  # the workbench still held it
    assert gcg_row["steps"] == BUDGET.gcg_steps and gcg_row["attack_seconds"] > 0
    assert {c["target"] for c in gcg_row["curve"]} == {"correct", "wrong"}

    table = R.robustness_table(rows)
    assert set(zip(table.method, table.attack)) == {(s.method, s.attack) for s in specs}
    line = table[(table.method == "rmu") & (table.attack == "relearn")].iloc[0]
    rel = next(r for r in rows if r["method"] == "rmu" and r["attack"] == "relearn")
    a, c = np.array(rel["attacked"]), np.array(rel["clean"])
    ca, cc = np.array(rel["control_attacked"]), np.array(rel["control_clean"])
    assert line.recovered == pytest.approx((a - c).mean())
    assert line.beyond_control == pytest.approx(((a - c) - (ca - cc)).mean())
    assert line.recovered_low <= line.recovered <= line.recovered_high
    probe = table[(table.method == "rmu") & (table.attack == "probe")].iloc[0]
    assert np.isnan(probe.recovered) and 0 < probe.chance <= 1
    claim = R.gcg_claim(table)
    assert claim["held"] == (claim["high"] <= claim["threshold"])
    text = R.robustness_markdown(table, claim, plan)
    assert "| RMU | GCG (correct vs wrong target) |" in text and ("**held**" in text or "**not held**" in text)
    curves = R.curve_frame(rows, "gcg")
    assert {"step", "accuracy", "grad_norm", "method", "seed"} <= set(curves.columns)


def test_incomplete_attack_file_is_recomputed(bench, tmp_path):
    spec = next(s for s in R.robustness_grid(tiny_plan(attacks=("fragility",))) if s.method == "base")
    path = tmp_path / f"{spec.key()}.json"
    run_sweep([spec], tmp_path, bench, progress=False)
    row = json.loads(path.read_text())
    row["attacked"] = row["attacked"][:-1]
    path.write_text(json.dumps(row))
    with pytest.warns(UserWarning, match="attacked"):
        assert not is_finished(path, spec.key())


def test_score_interval_matches_the_paired_difference():
    rng = np.random.default_rng(0)
    a, b = rng.random(60) < 0.6, rng.random(60) < 0.4
    clusters = np.arange(60) // 3
    d = paired_difference(a, b, clusters, seed=4)
    s = score_interval(a.astype(float) - b, clusters, seed=4)
    assert (s.estimate, s.low, s.high) == pytest.approx((d.diff, d.low, d.high))
    with pytest.raises(ValueError, match="NaN"):
        score_interval([0.0, np.nan])


def test_report_writes_the_table_the_verdict_and_the_curves(bench, tmp_path):
    plan = tiny_plan(attacks=("gcg", "relearn", "fragility"))
    summary = robustness_report(tmp_path / "out", tmp_path / "results", plan, bench, progress=False)
    for name in ROBUSTNESS_FIGURES:
        assert (tmp_path / "out" / name).stat().st_size > 0
    saved = json.loads((tmp_path / "out" / "robustness.json").read_text())
    assert saved["claim"]["held"] == summary["claim"]["held"] and saved["ran"] == len(R.robustness_grid(plan))
    again = robustness_report(tmp_path / "out", tmp_path / "results", plan, bench, progress=False)
    assert again["ran"] == 0 and again["claim"] == summary["claim"]  # everything reused, the same numbers
    assert "beyond control" in (tmp_path / "out" / "robustness.md").read_text()


def test_sweep_cli_lists_the_robustness_runs_of_a_real_model(tmp_path, tiny_tokenizer, capsys):
    model, bio, cyber, retain = save_tiny_model_and_corpora(tmp_path, tiny_tokenizer, 140)
    questions = [{"question": f"Which host does pathogen {i} infect?", "choices": ["bats", "mice", "birds", "pigs"],
                  "answer": i % 4} for i in range(6)]
    mcq = [f"{s}={write_mcq(questions, tmp_path / f'{s}.jsonl')}" for s in ("bio", "cyber", "general")]
    args = ["sweep", "--experiment", "robustness", "--results", str(tmp_path / "runs"), "--model", str(model),
            "--forget-files", f"bio={bio}", f"cyber={cyber}", "--retain-file", str(retain), "--mcq", *mcq,
            "--layer", "2", "--seeds", "0", "--list"]
    assert main(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 6 * len(R.ATTACKS) - 1 and all(line.split()[1] == "todo" for line in lines)
    assert {line.split("  ", 2)[2].split(" on ")[1] for line in lines} == {
        "base seed=0", "GA seed=0", "GradDiff seed=0", "NPO seed=0", "RMU seed=0", "Adaptive RMU seed=0"}
