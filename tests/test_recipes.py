"""recipes: the registry of named settings (presets, sweep plans, the notebooks' recipe) and the Zephyr defaults."""
from __future__ import annotations

import dataclasses

import pytest

from rmu_analysis import PRESETS as exported
from rmu_analysis.experiments.specs import RunSpec
from rmu_analysis.recipes import PLANS, PRESETS, ZEPHYR, model_plan, organism_plan, preset
from rmu_analysis.unlearning import AdaptiveRMUConfig, RMUConfig


def test_zephyr_presets_are_the_papers_recipe():
    """Table 1's Zephyr-7B recipe: l = 7 (blocks 5-7 trained), c = 6.5, β = 5, α = 1200, lr 5e-5, batch 4, 500 steps."""
    paper = dict(layer=7, trained_layers=(5, 6, 7), alpha=1200.0, lr=5e-5, batch_size=4, steps=500,
                 forget_max_length=(512, 768), retain_max_length=512)
    assert PRESETS["zephyr-7b-rmu"] == RMUConfig(steering_coeff=6.5, **paper) == ZEPHYR
    assert PRESETS["zephyr-7b-adaptive-rmu"] == AdaptiveRMUConfig(beta=5.0, coefficient="first-batch", **paper)
    plan = model_plan(32, model="m", data="d")
    assert (plan.c, plan.table_layer, plan.steps, plan.lr, plan.alpha, plan.beta) == (6.5, 7, 500, 5e-5, 1200.0, 5.0)
    assert exported is PRESETS


def test_organism_recipes():
    assert PRESETS["organism-rmu"] == RMUConfig(layer=3, steering_coeff=85.0, alpha=100.0, lr=1e-2, batch_size=4,
                                                steps=200)
    # every organism preset is a point of organism_plan()'s Table 1 grid (the one selected on the dev questions)
    plan = organism_plan()
    names = {"rmu": "organism-rmu", "adaptive-rmu": "organism-adaptive-rmu", "ga": "organism-ga",
             "graddiff": "organism-graddiff", "npo": "organism-npo"}
    for method, points in plan.grid().items():
        configs = [RunSpec(method=method, layer=plan.table_layer, seed=0, **{**plan.common(), **p}).config()
                   for p in points]
        want = dataclasses.replace(PRESETS[names[method]], seed=0)
        assert any(dataclasses.replace(c, log_every=want.log_every) == want for c in configs), method
    notebook = PRESETS["organism-notebook-rmu"]
    assert (notebook.layer, notebook.lr, notebook.alpha, notebook.steps, notebook.loss) == (2, 1e-2, 10.0, 60, "masked")
    adaptive = preset("organism-notebook-adaptive-rmu", layer=4)
    assert adaptive.layer == 4 and adaptive.resolved_trained_layers() == (2, 3, 4) and adaptive.beta == 5.0
    assert PLANS["organism"]() == organism_plan() and PLANS["organism-quick"]() == organism_plan(quick=True)
    with pytest.raises(ValueError, match="no preset"):
        preset("zephyr-8b")
    with pytest.raises(ValueError, match="steps"):
        preset("organism-rmu", steps=0)
    assert dataclasses.replace(PRESETS["organism-rmu"], steering_coeff=30.0).steering_coeff == 30.0
