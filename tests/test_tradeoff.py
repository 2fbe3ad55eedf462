"""Tests of the layer-wise claims at matched utility (rmu_analysis.experiments.tradeoff) and of Fig. 4 with one
fixed c over layers and seeds (experiments.fixed_c_convergence): synthetic results frames where the answer is
known, the organism plan's keys, and an end-to-end report on a tiny model."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rmu_analysis import claims as C
from rmu_analysis.cli import main
from rmu_analysis.experiments import EvalSettings, ExperimentData, Workbench, fixed_c_convergence, plan_grids
from rmu_analysis.experiments import tradeoff as T
from rmu_analysis.organism.tokenizer import train_tokenizer
from rmu_analysis.organism.world import SUBJECTS, generate_world
from rmu_analysis.plots_experiments import plot_norm_trajectories, plot_tradeoff
from rmu_analysis.recipes import organism_plan
from rmu_analysis.testing import tiny_llama

NQ = 400  # questions per set in the synthetic frames


def _bits(acc: float, rng: np.random.Generator) -> str:
    v = np.zeros(NQ, bool)
    v[rng.permutation(NQ)[: int(round(acc * NQ))]] = True
    return "".join("1" if b else "0" for b in v)


def _frame(shift: dict[tuple[str, int], float], seeds=(0, 1, 2), layers=(3, 11)) -> pd.DataFrame:
    """Runs on straight trade-off lines: forget = 0.2 + shift + 0.6 · (general − 0.70) / 0.20, general from 0.70
    to 0.90 over the settings; per-question bits whose means are the accuracies."""
    rng = np.random.default_rng(0)
    rows = []
    for layer in layers:
        for method, settings in (("rmu", (5.0, 10.0, 20.0, 40.0, 80.0)), ("adaptive-rmu", (2.0, 3.0, 5.0, 10.0))):
            for s in seeds:
                for i, setting in enumerate(settings):
                    g = 0.90 - 0.20 * i / (len(settings) - 1) + 0.003 * s
                    f = 0.2 + shift.get((method, layer), 0.0) + 0.6 * (g - 0.70) / 0.20
                    bits = {k: _bits(v, rng) for k, v in (("bio", f), ("cyber", f), ("general", g))}
                    acc = {k: sum(c == "1" for c in b) / NQ for k, b in bits.items()}
                    rows.append({"status": "ok", "method": method, "layer": layer, "seed": s, "coeff": setting,
                                 "general_acc": acc["general"], "base_general_acc": 0.92,
                                 "acc_bio": acc["bio"], "acc_cyber": acc["cyber"],
                                 "forget_acc": (acc["bio"] + acc["cyber"]) / 2, "norm_frozen_bio": 10.0,
                                 "norm_frozen_cyber": 10.0, "correct_bio": bits["bio"],
                                 "correct_cyber": bits["cyber"], "correct_general": bits["general"]})
    return pd.DataFrame(rows)


def test_tradeoff_analysis_finds_a_real_shift_and_no_shift_where_there_is_none():
    shifted = T.tradeoff_analysis(_frame({("adaptive-rmu", 3): -0.15, ("adaptive-rmu", 11): -0.15}), n_boot=300)
    assert shifted["target"] == pytest.approx(0.95 * 0.92)
    assert shifted["adaptive_beats_rmu"] == {3: True, 11: True}
    main_rows = [r for r in shifted["adaptive_vs_rmu"] if r["forget"] == "forget_acc"]
    assert all(r["diff"] == pytest.approx(-0.15, abs=0.02) for r in main_rows)
    same = T.tradeoff_analysis(_frame({}), n_boot=300)
    assert same["adaptive_beats_rmu"] == {3: False, 11: False}
    assert all(abs(r["diff"]) < 0.03 for r in same["adaptive_vs_rmu"])
    assert same["depth_costs"] == {"rmu": False, "adaptive-rmu": False}
    deeper = T.tradeoff_analysis(_frame({("rmu", 11): 0.2}), n_boot=300)
    assert deeper["depth_costs"]["rmu"] and not deeper["depth_costs"]["adaptive-rmu"]
    text = T.tradeoff_markdown(shifted, T.TradeoffPlan(layers=(3, 11), steps=1, lr=1.0, alpha=1.0))
    assert text.count("**held**") == 2 and "Adaptive − RMU" in text
    points, forget, general = T.tradeoff_points(_frame({}))
    assert set(forget) == {"forget_acc", "acc_bio", "acc_cyber"} and len(general) == len(points)
    assert forget["forget_acc"][0].mean() == pytest.approx(points.loc[0, "forget_acc"])
    fig = plot_tradeoff(points, pd.DataFrame(same["matched"]).query("forget == 'forget_acc'"), target=same["target"])
    assert len(fig.axes) == 2


def test_tradeoff_analysis_refuses_runs_without_outcomes():
    with pytest.raises(ValueError, match="per-question outcomes"):
        T.tradeoff_analysis(_frame({}).drop(columns="correct_bio"))
    with pytest.raises(ValueError, match="no finished"):
        T.tradeoff_points(_frame({}).assign(method="ga"))


def test_compare_matched_across_layers():
    frame = _frame({("rmu", 11): 0.1})
    points, _, _ = T.tradeoff_points(frame)
    m = C.matched_forget(points, 0.8, n_boot=200)
    cmp = C.compare_matched(m, "rmu", "rmu", 11, layer_b=3)
    assert cmp.diff == pytest.approx(0.1, abs=0.02) and cmp.layer_b == 3 and cmp.significant()
    assert C.compare_matched(m, "adaptive-rmu", "rmu", 3).layer_b is None


def test_organism_tradeoff_plan_reuses_the_sweeps_runs():
    plan = organism_plan()
    norms = {3: 17.23, 7: 40.02, 11: 81.9}
    tplan = T.tradeoff_plan(plan)
    assert tplan.layers == plan.coeff_layers and set(tplan.betas) >= {2.0, 3.0, 5.0, 10.0}  # the paper's β among them
    assert set(tplan.coeff_ratios) >= set(plan.coeff_ratios) and tplan.seeds == (0, 1, 2, 3, 4)
    keys = {s.key() for s in T.tradeoff_grid(tplan, norms)}
    grids = plan_grids(plan, norms)
    coeff = {s.key() for s in grids["coefficient"]}
    beta = {s.key() for s in grids["layer"] if s.method == "adaptive-rmu" and s.layer in plan.coeff_layers}
    assert coeff <= keys and beta <= keys and len(keys) == tplan.n_runs == 3 * (7 + 6) * 5
    assert len(keys - coeff - beta) == tplan.n_runs - 21 - 9  # what the trade-off curves add
    assert T.tradeoff_plan(plan, seeds=None).seeds == plan.seeds
    with pytest.raises(ValueError, match="no coefficient-sweep layers"):
        T.tradeoff_plan(organism_plan(quick=True).__class__(**{**organism_plan().__dict__, "coeff_layers": ()}))


def _log(c: float, d: int, start: float, end: float, norm: float, steps: int = 100) -> list[dict]:
    """A training log whose ‖h − c·u‖² / ‖c·u‖² decays from ``start`` to ``end`` (both topics alternating)."""
    rows = []
    for i, step in enumerate(range(0, steps, 5)):
        over = end + (start - end) * np.exp(-i / 2)
        rows.append({"step": step, "topic": ("bio", "cyber")[i % 2], "forget_loss": over * c * c / d,
                     "retain_loss": 1.0, "loss": 1.0, "coefficient": c, "forget_norm": norm, "cos_forget_u": 0.0})
    return rows


def _fig4_frame(early_end: float, c: float = 30.0, d: int = 16) -> pd.DataFrame:
    rows = []
    for layer, norm, end in ((3, 10.0, early_end), (7, 20.0, early_end), (11, 60.0, 3.0)):
        for s in (0, 1, 2):
            rows.append({"status": "ok", "method": "rmu", "layer": layer, "seed": s, "coeff": c, "hidden_size": d,
                         "norm_frozen_bio": norm, "norm_frozen_cyber": norm,
                         "log": _log(c, d, 1.2, end * (1 + 0.01 * s), norm)})
    return pd.DataFrame(rows)


def test_fixed_c_convergence_judges_each_layer_by_its_side_of_c():
    held = fixed_c_convergence(_fig4_frame(early_end=0.02), (3, 7, 11))
    assert held["held"] and held["c"] == 30.0 and held["n_seeds"] == 3
    table = pd.DataFrame(held["table"])
    assert list(table["starts_below"]) == [True, True, True, True, False, False]
    assert table.loc[table["layer"] == 3, "final_over_target"].iloc[0] < 0.1
    failed = fixed_c_convergence(_fig4_frame(early_end=0.5), (3, 7, 11))
    assert not failed["held"]
    assert [r["as_predicted"] for r in failed["table"]] == [False, False, False, False, True, True]
    mixed = _fig4_frame(0.02)
    mixed.loc[0, "coeff"] = 31.0
    with pytest.raises(ValueError, match="one fixed c"):
        fixed_c_convergence(mixed, (3, 7, 11))
    assert "skipped" in fixed_c_convergence(_fig4_frame(0.02), (3, 5))
    fig = plot_norm_trajectories(_fig4_frame(0.02), [3, 11])
    assert len(fig.axes) == 4


def test_sweep_cli_lists_the_organism_tradeoff_runs(tmp_path, capsys):
    shutil.copy(Path(__file__).parents[1] / "figures" / "results" / "norms.json", tmp_path / "norms.json")
    assert main(["sweep", "--experiment", "tradeoff", "--results", str(tmp_path), "--list"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 * (7 + 6) * 5 and all(line.split()[1] == "todo" for line in lines)
    assert sum("adaptive-rmu" in line for line in lines) == 3 * 6 * 5


def test_report_runs_writes_and_reuses(tmp_path):
    world = generate_world(0, {k: 4 for k in ("pathogen", "exploit", "city", "person", "element")},
                           forget_docs=24, retain_docs=24)
    tok = train_tokenizer(world.forget_corpus["bio"] + world.forget_corpus["cyber"] + world.retain_corpus,
                          vocab_size=300, min_frequency=1)
    data = ExperimentData("tiny", world.forget_corpus, world.retain_corpus, world.mcq, SUBJECTS)
    bench = Workbench(tiny_llama(len(tok), n_layers=4, hidden=32, tokenizer=tok), tok, data, model_id="tiny")
    ev = EvalSettings(scoring="cloze", confidence_prompts=3, confidence_tokens=2, eval_texts=4, batch_size=8)
    plan = T.TradeoffPlan(layers=(2, 3), steps=2, lr=1e-3, alpha=10.0, coeff_ratios=(1.0, 8.0), betas=(2.0, 10.0),
                          seeds=(0, 1), model="tiny", data="tiny", eval=ev)
    summary = T.tradeoff_report(tmp_path / "out", tmp_path / "runs", plan, {2: 1.0, 3: 1.5}, bench, progress=False)
    assert summary["ran"] == plan.n_runs == 16 and summary["layers"] == [2, 3]
    for name in T.TRADEOFF_FILES:
        assert (tmp_path / "out" / name).stat().st_size > 0
    saved = json.loads((tmp_path / "out" / "tradeoff.json").read_text())
    assert saved["adaptive_beats_rmu"] == {str(k): v for k, v in summary["adaptive_beats_rmu"].items()}
    again = T.tradeoff_report(tmp_path / "out", tmp_path / "runs", plan, {2: 1.0, 3: 1.5}, bench, progress=False)
    assert again["ran"] == 0 and again["matched"] == summary["matched"]


def _confidence_frame(gap: float) -> pd.DataFrame:
    """Curves of MaxLogit against forget accuracy: every method on the same straight line, the RMU-type ones
    ``gap`` lower; forget accuracy from 0.5 to 0.9 over the knob."""
    rows = []
    for method, knobs in (("rmu", (10.0, 20.0, 40.0)), ("adaptive-rmu", (2.0, 5.0, 10.0)),
                          ("ga", (1e-3, 4e-3, 8e-3)), ("npo", (3e-3, 1e-2, 2e-2))):
        for s in (0, 1, 2):
            for i, k in enumerate(knobs):
                f = 0.9 - 0.2 * i + 0.01 * s
                ml = 10.0 + 5.0 * f - (gap if method in ("rmu", "adaptive-rmu") else 0.0) + 0.02 * s
                steer = method in ("rmu", "adaptive-rmu")
                rows.append({"status": "ok", "method": method, "layer": 3, "seed": s, "coeff": k if steer else None,
                             "lr": 1e-2 if steer else k, "forget_acc": f, "general_acc": 0.8, "maxlogit_bio": ml, "maxlogit_cyber": ml,
                             "norm_frozen_bio": 1.0, "norm_frozen_cyber": 1.0})
    return pd.DataFrame(rows)


def test_matched_confidence_compares_at_equal_forget_accuracy():
    lower = T.matched_confidence(_confidence_frame(gap=0.5), 3, n_boot=300)
    assert lower["held"] and lower["n_pairs"] == 3 * 4
    assert all(p["diff"] == pytest.approx(-0.5, abs=1e-9) for p in lower["pairs"])
    assert all(r["general_acc"] == pytest.approx(0.8) for r in lower["table"])
    same = T.matched_confidence(_confidence_frame(gap=0.0), 3, n_boot=300)
    assert not same["held"] and all(abs(p["diff"]) < 1e-9 for p in same["pairs"])
    out_of_range = T.matched_confidence(_confidence_frame(gap=0.5), 3, levels=(0.3,), n_boot=50)
    assert out_of_range["n_pairs"] == 0 and not out_of_range["held"]  # no extrapolation, so nothing to compare
    assert "held" in T.confidence_markdown(lower) and "rmu − ga" in T.confidence_markdown(lower)
    with pytest.raises(ValueError, match="no runs of"):
        T.matched_confidence(_confidence_frame(0.5).query("method != 'npo'"), 3)


def test_confidence_control_grid_sits_at_the_table_layer():
    plan = organism_plan()
    tplan = T.tradeoff_plan(plan)
    specs = T.confidence_control_grid(plan, tplan)
    assert {s.layer for s in specs} == {plan.table_layer} and {s.eval for s in specs} == {tplan.eval}
    assert sorted({(s.method, s.lr) for s in specs}) == sorted(
        (m, lr) for m, lrs in T.CONTROL_LRS.items() for lr in lrs)
    assert len(specs) == 7 * 5 and len({s.key() for s in specs}) == 35
    with pytest.raises(ValueError, match="no curve at Table 1's layer"):
        T.confidence_control_grid(plan, T.tradeoff_plan(plan, layers=(7, 11)))
    from rmu_analysis.recipes import model_plan

    real = model_plan(32, model="zephyr", data="wmdp")  # a 7B model: the Table 1 grid's learning rates, its steps
    specs = T.confidence_control_grid(real, T.tradeoff_plan(real))
    assert sorted({(s.method, s.lr, s.steps) for s in specs}) == [
        ("ga", 1e-5, 500), ("ga", 5e-5, 500), ("npo", 1e-5, 500), ("npo", 5e-5, 500)]


def test_one_layer_has_no_depth_claim():
    one = T.tradeoff_analysis(_frame({}, layers=(3,)), n_boot=100)
    assert one["depth"] == [] and one["depth_costs"] == {} and one["layers"] == [3]
    text = T.tradeoff_markdown(one, T.TradeoffPlan(layers=(3,), steps=1, lr=1.0, alpha=1.0))
    assert "Depth itself" not in text and "one layer only" in text
