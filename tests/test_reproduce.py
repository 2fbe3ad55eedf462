"""reproduce: the whole job end to end on a tiny model and a tiny plan (files, summary, resume), and the CLI."""
from __future__ import annotations

import argparse
import json

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402

from rmu_analysis import experiments as E  # noqa: E402
from rmu_analysis import reproduce as R  # noqa: E402
from rmu_analysis.experiments import cli as sweep_cli  # noqa: E402
from rmu_analysis.experiments import runner  # noqa: E402
from rmu_analysis.experiments.theory_checks import theory_layer  # noqa: E402
from rmu_analysis.organism.tokenizer import train_tokenizer  # noqa: E402
from rmu_analysis.organism.world import SUBJECTS, generate_world  # noqa: E402
from rmu_analysis.recipes import model_plan, organism_plan  # noqa: E402
from rmu_analysis.testing import save_tiny_model_and_corpora, tiny_llama  # noqa: E402

EVAL = E.EvalSettings(scoring="cloze", confidence_prompts=3, confidence_tokens=2, eval_texts=4, batch_size=16)


@pytest.fixture(scope="module")
def tiny():
    world = generate_world(1, {k: 4 for k in ("pathogen", "exploit", "city", "person", "element")},
                           forget_docs=20, retain_docs=20)
    tok = train_tokenizer(world.forget_corpus["bio"] + world.forget_corpus["cyber"] + world.retain_corpus,
                          vocab_size=300, min_frequency=1)
    data = E.ExperimentData("tiny", world.forget_corpus, world.retain_corpus, world.mcq, SUBJECTS)
    return data, tok


def tiny_plan(**kw):
    grid = E.grid_points(ga=[{"lr": 1e-3}], graddiff=[{"lr": 1e-3}], npo=[{"lr": 1e-3}],
                   rmu=[{"coeff": 1.0, "lr": 1e-2, "alpha": 10.0}], adaptive_rmu=[{"coeff": 5.0, "lr": 1e-2, "alpha": 10.0}])
    base = dict(layers=(2, 3), c=1.0, steps=2, lr=1e-2, alpha=10.0, table_layer=3, table_grid=grid, seeds=(0,),
                coeff_layers=(2, 3), coeff_ratios=(0.5, 4.0), model="tiny", data="tiny", eval=EVAL)
    return E.ExperimentPlan(**{**base, **kw})


def test_reproduce_end_to_end_and_resume(tiny, tmp_path, monkeypatch):
    data, tok = tiny
    model = tiny_llama(len(tok), n_layers=4, hidden=32, tokenizer=tok)
    bench = E.Workbench(model, tok, data, model_id="tiny")
    plan = tiny_plan()
    calls = []
    real = runner.run_one

    def counting(spec, b):
        calls.append(spec.key())
        return real(spec, b)

    monkeypatch.setattr(runner, "run_one", counting)
    summary = R.reproduce(tmp_path, plan=plan, bench=bench, progress=False, quick=True)
    norms = json.loads((tmp_path / "results" / "norms.json").read_text())["norms"]
    grids = E.plan_grids(plan, {int(k): v for k, v in norms.items()})
    unique = {s.key() for g in grids.values() for s in g}
    assert sorted(calls) == sorted(unique)  # every run once, runs shared by two experiments too
    for name in ("fig1_noise_sensitivity.png", "fig3_coefficient_sweep_l3.png", "fig4_norm_trajectories.png",
                 "fig5_layer_sweep.png", "collapse_ratio.png", "table1.md", "summary.md", "summary.json"):
        assert (tmp_path / name).is_file(), name
    assert len(list((tmp_path / "results").glob("*.json"))) == len(unique) + 1  # + norms.json
    saved = json.loads((tmp_path / "summary.json").read_text())
    targets = saved["layer_sweep"]["targets"]
    assert set(targets) == {"adaptive_fraction_of_layers_at_most_35pct", "rmu_spearman_rho_forget_vs_layer",
                            "deepest_third_gap_rmu_minus_adaptive", "min_general_over_base"}
    assert all(isinstance(t["held"], bool) for t in targets.values())
    assert saved["collapse"]["n_points"] > 0 and "proposition1" in saved["theory"]
    table = (tmp_path / "table1.md").read_text()
    for name in ("base", "Gradient ascent", "Gradient difference", "NPO", "RMU", "Adaptive RMU"):
        assert f"| {name} |" in table
    md = (tmp_path / "summary.md").read_text()
    assert "Adaptive RMU at most 35%" in md and "Spearman" in md and "c / ‖h_l‖" in md
    assert summary["seconds"]["total"] > 0

    # fresh=True retrains every run exactly once, also those shared by two experiments
    calls.clear()
    fresh = R.reproduce(tmp_path, plan=plan, bench=bench, progress=False, fresh=True,
                        experiments=("coefficient", "layer", "table1"))
    assert sorted(calls) == sorted(unique) and sum(fresh["runs_trained"].values()) == len(unique)

    # a second call finds every run finished and trains nothing
    calls.clear()
    R.reproduce(tmp_path, plan=plan, bench=bench, progress=False, experiments=("coefficient", "layer", "table1"))
    assert calls == []


def test_quick_and_full_plans_fit_the_organism():
    from rmu_analysis.organism import SCORING

    quick, full = organism_plan(quick=True), organism_plan()
    norms = {l: 10.0 for l in range(12)}
    n_quick = len({s.key() for g in E.plan_grids(quick, norms).values() for s in g})
    n_full = len({s.key() for g in E.plan_grids(full, norms).values() for s in g})
    assert n_quick < n_full / 4
    assert full.eval.scoring == SCORING and len(full.seeds) >= 3 and full.layers == tuple(range(2, 12))
    assert full.beta == 5.0


def test_cli_parsers():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    R.add_reproduce_parser(sub)
    sweep_cli.add_sweep_parser(sub)
    args = parser.parse_args(["reproduce", "--quick", "--out", "x"])
    assert args.quick and str(args.out) == "x" and args.func is R.reproduce_command
    args = parser.parse_args(["sweep", "--experiment", "layer", "--shard", "2/8", "--results", "r"])
    assert args.shard == "2/8" and args.func is sweep_cli.sweep_command
    args = parser.parse_args(["sweep", "--results", "r", "--model", "/m"])
    with pytest.raises(ValueError, match="--forget-files"):
        sweep_cli.plan_from_args(args)
    args = parser.parse_args(["sweep", "--results", "r", "--forget-files", "bio=x.jsonl", "--layer", "3"])
    with pytest.raises(ValueError, match="--forget-files, --layer: only for --model PATH"):
        sweep_cli.plan_from_args(args)  # never silently ignored: the organism would run instead of the user's data
    args = parser.parse_args(["reproduce", "--quick", "--model", "/m"])
    with pytest.raises(ValueError, match="--quick is the organism's reduced plan"):
        sweep_cli.plan_from_args(args)


def test_console_script_has_reproduce_and_sweep():
    from rmu_analysis.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["reproduce", "--quick"])
    assert args.func is R.reproduce_command and args.quick
    args = parser.parse_args(["sweep", "--results", "r", "--shard", "1/4", "--experiment", "table1"])
    assert args.func is sweep_cli.sweep_command and args.shard == "1/4"


def test_theory_layer_moves_off_the_last_block(tiny):
    data, tok = tiny
    model = tiny_llama(len(tok), n_layers=4, hidden=32)
    bench = E.Workbench(model, tok, data, model_id="tiny")
    assert theory_layer(bench, tiny_plan(table_layer=3)) == 2
    assert theory_layer(bench, tiny_plan(table_layer=1)) == 1


def test_sweep_on_a_saved_model_from_files_resumes_and_shards(tiny_tokenizer, tmp_path, capsys):
    """The real-model path: a tiny random HF model saved to disk, WMDP-format corpora and question files."""
    from rmu_analysis.cli import main
    from rmu_analysis.data import write_mcq

    model_dir, bio, cyber, retain = save_tiny_model_and_corpora(tmp_path, tiny_tokenizer, 140)
    q = [{"question": f"Which host does pathogen {i} infect?", "choices": ["bats", "mice", "birds", "pigs"],
          "answer": i % 4} for i in range(6)]
    mcq = {s: write_mcq(q, tmp_path / f"{s}.jsonl") for s in ("bio", "cyber", "general")}
    results = tmp_path / "runs"
    argv = ["sweep", "--model", str(model_dir), "--forget-files", f"bio={bio}", f"cyber={cyber}",
            "--retain-file", str(retain), "--mcq", *(f"{s}={p}" for s, p in mcq.items()), "--experiment", "table1",
            "--layer", "2", "--steps", "2", "--seeds", "0", "--results", str(results), "--no-progress"]
    with pytest.warns(UserWarning, match="4 of 8 runs have no result"):
        assert main([*argv, "--shard", "0/2"]) == 0
    first = {p.name for p in results.glob("*.json")}
    assert main([*argv, "--shard", "1/2"]) == 0
    both = {p.name for p in results.glob("*.json")}
    grid = model_plan(4, model=str(model_dir), data="x", layer=2).grid()
    n_runs = sum(len(points) for points in grid.values())
    assert 0 < len(first) < len(both) == n_runs  # the shards partition the grid; together they cover it
    capsys.readouterr()
    assert main(argv) == 0  # everything finished: nothing runs again
    out = capsys.readouterr().out
    assert f"ran 0, skipped {n_runs}" in out and f"{n_runs} of {n_runs} runs of table1" in out
    frame = E.load_results(results)
    assert set(frame["method"]) == {"ga", "graddiff", "npo", "rmu", "adaptive-rmu"} and (frame["layer"] == 2).all()
    assert frame["general_acc"].between(0, 1).all() and (frame["steps"] == 2).all()


def test_reproduce_theory_only(tiny, tmp_path):
    data, tok = tiny
    model = tiny_llama(len(tok), n_layers=4, hidden=32)
    bench = E.Workbench(model, tok, data, model_id="tiny")
    summary = R.reproduce(tmp_path, plan=tiny_plan(), bench=bench, progress=False, quick=True, experiments=("theory",))
    assert "proposition1" in summary["theory"] and "layer_sweep" not in summary  # no sweep ran, nothing to concat
    assert (tmp_path / "summary.md").is_file() and not (tmp_path / "results").exists()


# ------------------------------------------------------------------ dev/test split: selection never sees test
@pytest.fixture(scope="module")
def tiny_v2():
    from rmu_analysis.organism import world_v2 as V

    sizes = {k: {"dev": 4, "test": 4, **({"retain": 4} if k in ("city", "person", "element") else {})}
             for k in V.KINDS}
    world = V.generate_world(0, split_sizes=sizes, docs_per_entity=2)
    tok = train_tokenizer(world.forget_corpus["bio"] + world.forget_corpus["cyber"] + world.retain_corpus
                          + [r["question"] + " " + " ".join(r["choices"]) for d in V.DOMAINS
                             for s in ("dev", "test") for r in world.mcq[s][d]], vocab_size=400, min_frequency=1)
    data = E.ExperimentData("tiny2", world.forget_corpus, world.retain_corpus, world.mcq["test"], V.SUBJECTS,
                            dev_mcq=world.mcq["dev"])
    return data, tok


def test_questions_by_split_and_per_fact(tiny, tiny_v2):
    data, _ = tiny_v2
    test, dev = data.questions(E.EvalSettings()), data.questions(E.EvalSettings(split="dev"))
    assert test["bio"] == list(data.mcq["bio"]) and dev["bio"] == list(data.dev_mcq["bio"])
    assert not {r["entity"] for r in test["bio"]} & {r["entity"] for r in dev["bio"]}
    one = data.questions(E.EvalSettings(per_fact=1))["bio"]
    facts = {r["fact_id"] for r in test["bio"]}
    assert len(one) == len(facts) < len(test["bio"]) and {r["fact_id"] for r in one} == facts
    assert len(data.questions(E.EvalSettings(per_fact=1, questions=3))["bio"]) == 3
    with pytest.raises(ValueError, match="no dev question sets"):
        tiny[0].questions(E.EvalSettings(split="dev"))
    with pytest.raises(ValueError, match="fact_id"):
        tiny[0].questions(E.EvalSettings(per_fact=1))
    with pytest.raises(ValueError, match="split"):
        E.EvalSettings(split="train")
    with pytest.raises(ValueError, match="per_fact"):
        E.EvalSettings(per_fact=0)
    with pytest.raises(ValueError, match="selection seeds must differ"):
        tiny_plan(selection_seeds=(0,))


def test_table1_is_selected_on_dev_and_reported_on_test_with_intervals(tiny_v2, tmp_path):
    data, tok = tiny_v2
    model = tiny_llama(len(tok), n_layers=4, hidden=32, tokenizer=tok)
    bench = E.Workbench(model, tok, data, model_id="tiny", )
    grid = E.grid_points(ga=[{"lr": 1e-3}, {"lr": 3e-2}], rmu=[{"coeff": 1.0, "lr": 1e-2, "alpha": 10.0}],
                         adaptive_rmu=[{"coeff": 5.0, "lr": 1e-2, "alpha": 10.0}])
    ev = E.EvalSettings(scoring="cloze", confidence_prompts=2, confidence_tokens=1, eval_texts=4, batch_size=16)
    plan = tiny_plan(table_grid=grid, seeds=(0, 1), selection_seeds=(7,), sweep_per_fact=1, coeff_layers=(),
                     data="tiny2", eval=ev)
    assert E.plan_grids(plan)["table1"] == []  # nothing to report before the selection runs
    summary = R.reproduce(tmp_path, plan=plan, bench=bench, progress=False, experiments=("layer", "table1"))
    rows = [json.loads(p.read_text()) for p in (tmp_path / "results").glob("*.json")]
    select = [r for r in rows if r["spec"]["eval"]["split"] == "dev"]
    report = [r for r in rows if r["spec"]["eval"]["split"] == "test" and r["spec"]["layer"] == 3
              and r["spec"]["eval"]["per_fact"] is None]
    assert len(select) == 4 and {r["spec"]["seed"] for r in select} == {7}  # every grid point, selection seed
    for r in select:  # scored on the dev questions
        assert len(r["correct"]["bio"]) == len(data.dev_mcq["bio"])
    frame = E.load_results(tmp_path / "results", E.plan_grids(plan)["table1_select"])
    chosen = E.table1_choice(plan, frame)
    assert set(chosen) == {"ga", "rmu", "adaptive-rmu"}
    assert sorted((r["spec"]["method"], r["spec"]["seed"]) for r in report) == sorted(
        (m, s) for m in chosen for s in (0, 1))  # only the chosen point, only the reporting seeds
    ga = [r for r in report if r["spec"]["method"] == "ga"][0]
    assert ga["spec"]["lr"] == chosen["ga"]["lr"]
    for r in report:  # reported on every test question
        assert len(r["correct"]["bio"]) == len(data.mcq["bio"]) and set(r["accuracy_in_corpus"]["bio"]) == {"in", "out"}
    layer_runs = [r for r in rows if r["spec"]["eval"]["per_fact"] == 1]
    assert layer_runs and all(len(r["correct"]["bio"]) == len({q["fact_id"] for q in data.mcq["bio"]})
                              for r in layer_runs)
    ti = summary["table1_intervals"]
    assert [r["method"] for r in ti] == ["base", "ga", "rmu", "adaptive-rmu"]
    for r in ti:
        for s in ("bio", "cyber", "general"):
            assert r[f"{s}_low"] <= r[s] <= r[f"{s}_high"]
    cmp = summary["table1_adaptive_vs_rmu"]
    assert cmp["layer"] == 3 and cmp["bio"]["low"] <= cmp["bio"]["diff"] <= cmp["bio"]["high"]
    assert summary["deep_adaptive_vs_rmu"]["layer"] in plan.layers
    assert "[" in (tmp_path / "table1.md").read_text() and "dev questions" in (tmp_path / "table1.md").read_text()
    assert "Adaptive RMU − RMU" in (tmp_path / "summary.md").read_text()
