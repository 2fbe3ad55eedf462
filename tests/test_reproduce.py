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
