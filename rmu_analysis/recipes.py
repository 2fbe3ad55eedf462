"""Named recipes: every unlearning setting the project runs, in one registry that the CLI (``--preset``,
``reproduce``, ``sweep``), the notebooks and the benchmarks read.

- The paper's recipe on Zephyr-7B (arXiv 2408.06223, Table 1: l = 7, trained blocks 5–7, c = 6.5, β = 5,
  α = 1200, lr 5e-5, batch 4, 500 steps) is the defaults of the config dataclasses
  (:mod:`rmu_analysis.unlearning.config`); the ``zephyr-7b-*`` presets and :func:`model_plan` take it from there.
- The organism is 12 blocks of width 128, so its recipes differ (lr 1e-2 and α = 100 instead of 5e-5 and 1200: at
  the paper's values nothing moves in a 384-wide MLP, benchmarks/organism_methods.py) and differ from each other
  on purpose: ``organism-*`` (l = 3: the Table 1 points :func:`organism_plan` selected on the dev questions;
  200 steps for the steering methods, one pass over the corpora), :func:`organism_plan` (the sweeps, see its
  docstring) and ``organism-notebook-*``
  (the notebooks' small, fast runs: l = 2, α = 10, 60 steps on 64-token texts, masked loss, every step logged;
  c is chosen per notebook relative to the block-l norm).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from .experiments.plans import ExperimentPlan, grid_points, valid_layers
from .experiments.robustness import AttackBudget, RobustnessPlan
from .experiments.specs import EvalSettings
from .organism import SCORING
from .unlearning.config import AdaptiveRMUConfig, GAConfig, GradDiffConfig, NPOConfig, RMUConfig

__all__ = ["PRESETS", "PLANS", "ZEPHYR", "organism_plan", "model_plan", "preset", "organism_robustness_plan",
           "model_robustness_plan", "ORGANISM_ATTACK_BUDGET"]

#: The paper's Zephyr-7B recipe: the config defaults (one place), trained blocks l−2..l, forget lengths 512 / 768
#: (500 steps as in the paper; WMDP's released model used 150).
ZEPHYR = RMUConfig(trained_layers=(5, 6, 7), forget_max_length=(512, 768))
_ZEPHYR_BETA = AdaptiveRMUConfig().beta
_ORGANISM = {"layer": 3, "alpha": 100.0, "lr": 1e-2, "batch_size": 4, "steps": 200}
_NOTEBOOK = {"layer": 2, "lr": 1e-2, "alpha": 10.0, "steps": 60, "batch_size": 4, "forget_max_length": 64,
             "retain_max_length": 64, "loss": "masked", "log_every": 1}

#: Named configs for ``unlearn`` (``rmu-analysis unlearn --preset NAME``).
PRESETS: dict[str, RMUConfig | AdaptiveRMUConfig] = {
    "zephyr-7b-rmu": ZEPHYR,
    "zephyr-7b-adaptive-rmu": AdaptiveRMUConfig(trained_layers=(5, 6, 7), forget_max_length=(512, 768),
                                                coefficient="first-batch"),
    # The organism's presets are the Table 1 grid points organism_plan() selected on the *dev* questions with
    # selection seed 100 (figures/table1.md, summary.json "table1_grid"; experiments.table1_choice: per method the
    # lowest dev forget accuracy with dev general accuracy >= 85% of base), all at block 3 on the same trained
    # tensors (MLP down-projections of blocks 1-3): RMU c = 85 (of 35 / 60 / 85), Adaptive RMU beta = 5 with
    # alpha = 100 (of 30 / 100 / 300), GA lr 1e-3 (of 3e-4 / 5e-4 / 1e-3), GradDiff lr 1e-3 (of 1e-3 / 2e-3 / 3e-3),
    # NPO lr 1e-2 (of 3e-3 / 1e-2 / 2e-2); steering 200 steps, baselines 100.
    "organism-rmu": RMUConfig(steering_coeff=85.0, **_ORGANISM),
    "organism-adaptive-rmu": AdaptiveRMUConfig(beta=5.0, coefficient="first-batch", **_ORGANISM),
    "organism-ga": GAConfig(layer=3, lr=1e-3, steps=100, batch_size=4),
    "organism-graddiff": GradDiffConfig(layer=3, lr=1e-3, alpha=1.0, steps=100, batch_size=4),
    "organism-npo": NPOConfig(layer=3, lr=1e-2, beta=0.1, alpha=1.0, steps=100, batch_size=4),
    "organism-notebook-rmu": RMUConfig(**_NOTEBOOK),
    "organism-notebook-adaptive-rmu": AdaptiveRMUConfig(beta=5.0, **_NOTEBOOK),
}


def preset(name: str, **changes) -> RMUConfig | AdaptiveRMUConfig:
    """``PRESETS[name]`` with ``changes`` (``dataclasses.replace``, validated), e.g.
    ``preset("organism-notebook-rmu", steering_coeff=16.0)``."""
    if name not in PRESETS:
        raise ValueError(f"no preset {name!r}: presets are {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **changes)


def organism_plan(quick: bool = False) -> ExperimentPlan:
    """The experiments on the built-in organism (testbed 2: 12 blocks, cloze scoring), sized for 2 CPU cores (two
    one-thread worker processes); ``quick`` ≈ 2 minutes (one seed, blocks 3, 7, 11, the first 48 questions of each
    set and 32 held-out texts per corpus: its accuracies are on that subset).

    Nothing here is chosen on the reported (test) questions:

    - Table 1 at block 3 (l = 7 of 32 in the paper, about the same relative depth): every method gets a 3-point
      grid, run with selection seed 100 and scored on the *dev* questions (entities disjoint from test); each
      method's point with the lowest dev forget accuracy whose dev general accuracy is ≥ 85% of base is then run
      with seeds 0, 1, 2 and scored on every test question (:func:`~.experiments.analysis.table1_choice`).
      Grids: RMU c ∈ {35, 60, 85} (2, 3.5, 5 × the frozen forget norm at block 3, 17.1); Adaptive RMU β = 5 (the
      paper's) with α ∈ {30, 100, 300}; GA lr ∈ {3e-4, 5e-4, 1e-3}, GradDiff lr ∈ {1e-3, 2e-3, 3e-3}, NPO lr ∈
      {3e-3, 1e-2, 2e-2} (100 steps, the same trained tensors as RMU: MLP down-projections of blocks l−2..l).
    - Steering runs: 200 steps, lr 1e-2, α = 100 — carried over from testbed 1 (where they were chosen), not
      re-tuned. The layer sweep's fixed c = 60 follows testbed 1's rule, fixed before measuring: 3.4 × the
      frozen forget norm at block 3 (17.1 here, 8.8 there); the norm growing 4.9× over depth, c / ‖h_l‖ falls to
      0.7 at block 11.
    - The layer and coefficient sweeps score one held-out wording per test fact (672 questions in all) to stay
      within the time budget; Table 1 scores all three (2,016).
    """
    steps, lr, alpha, c = 200, 1e-2, 100.0, 60.0
    steering = {"lr": lr, "alpha": alpha}
    grid = grid_points(
        ga=[{"lr": 3e-4, "steps": 100}, {"lr": 5e-4, "steps": 100}, {"lr": 1e-3, "steps": 100}],
        graddiff=[{"lr": 1e-3, "alpha": 1.0, "steps": 100}, {"lr": 2e-3, "alpha": 1.0, "steps": 100},
                  {"lr": 3e-3, "alpha": 1.0, "steps": 100}],
        npo=[{"lr": 3e-3, "coeff": 0.1, "alpha": 1.0, "steps": 100}, {"lr": 1e-2, "coeff": 0.1, "alpha": 1.0, "steps": 100},
             {"lr": 2e-2, "coeff": 0.1, "alpha": 1.0, "steps": 100}],
        rmu=[{**steering, "coeff": 35.0}, {**steering, "coeff": c}, {**steering, "coeff": 85.0}],
        adaptive_rmu=[{"lr": lr, "alpha": a, "coeff": 5.0} for a in (30.0, 100.0, 300.0)],
    )
    evaluation = EvalSettings(scoring=SCORING)
    if quick:
        small = grid_points(ga=[{"lr": 5e-4, "steps": 100}], graddiff=[{"lr": 2e-3, "alpha": 1.0, "steps": 100}],
                            npo=[{"lr": 1e-2, "coeff": 0.1, "alpha": 1.0, "steps": 100}], rmu=[{**steering, "coeff": c}],
                            adaptive_rmu=[{**steering, "coeff": 5.0}])
        return ExperimentPlan(layers=(3, 7, 11), c=c, steps=steps, lr=lr, alpha=alpha, table_layer=3,
                              table_grid=small, seeds=(0,), selection_seeds=(100,), coeff_layers=(3, 11),
                              coeff_ratios=(1.0, 4.0),
                              eval=dataclasses.replace(evaluation, questions=48, eval_texts=32, confidence_prompts=16))
    return ExperimentPlan(layers=tuple(valid_layers(12)), c=c, steps=steps, lr=lr, alpha=alpha, table_layer=3,
                          table_grid=grid, seeds=(0, 1, 2), selection_seeds=(100,), sweep_per_fact=1,
                          coeff_layers=(3, 7, 11), coeff_ratios=(0.5, 1.0, 2.0, 4.0, 8.0), adaptive_betas=(2.0, 10.0),
                          eval=evaluation)


def model_plan(n_blocks: int, *, model: str, data: str, c: float | None = None, layer: int | None = None,
               steps: int | None = None, seeds: tuple[int, ...] = (0, 1, 2), eval: EvalSettings | None = None,
               dtype: str | None = None) -> ExperimentPlan:
    """The paper's recipe on a real model (``ZEPHYR``: l = 7, c = 6.5, β = 5, α = 1200, lr 5e-5, 500 steps unless
    given); baselines at the WMDP paper's scale of learning rates. ``dtype``: the parameter dtype the model is
    loaded in (None: float32), part of every run's key."""
    c = ZEPHYR.steering_coeff if c is None else c
    layer = ZEPHYR.layer if layer is None else layer
    steps = ZEPHYR.steps if steps is None else steps
    steering = {"lr": ZEPHYR.lr, "alpha": ZEPHYR.alpha}
    grid = grid_points(
        ga=[{"lr": 1e-5}, {"lr": 5e-5}],
        graddiff=[{"lr": 1e-5, "alpha": 1.0}, {"lr": 5e-5, "alpha": 1.0}],
        npo=[{"lr": 1e-5, "coeff": 0.1, "alpha": 1.0}, {"lr": 5e-5, "coeff": 0.1, "alpha": 1.0}],
        rmu=[{**steering, "coeff": c}],
        adaptive_rmu=[{**steering, "coeff": _ZEPHYR_BETA}],
    )
    return ExperimentPlan(layers=tuple(valid_layers(n_blocks)), c=c, steps=steps, lr=ZEPHYR.lr, alpha=ZEPHYR.alpha,
                          table_layer=layer, table_grid=grid, seeds=seeds, coeff_layers=(layer,),
                          coeff_ratios=(0.5, 1.0, 2.0, 4.0), beta=_ZEPHYR_BETA, model=model, data=data,
                          eval=eval or EvalSettings(confidence_prompts=64, confidence_tokens=30), dtype=dtype)


#: The attacks' budget on the organism, sized so that the whole robustness plan (6 models × 3 seeds × 6 attacks)
#: stays within about 8 minutes on 2 CPU cores. GCG is the expensive part (a step scores candidates × questions
#: prompts, four rows each in cloze when answers have several tokens; about 3 s per 2,000 prompts on one core):
#: 16 questions × 8 candidates × 10 steps instead of the 32 × 64 × 100 that :class:`AttackBudget` defaults to on a
#: GPU (``model_robustness_plan``). Measured: benchmarks/gcg_speed.py.
ORGANISM_ATTACK_BUDGET = AttackBudget(questions=32, gcg_questions=16, general=32, gcg_tokens=5, gcg_top_k=64,
                                      gcg_candidates=8, gcg_steps=10, relearn_steps=10, relearn_lr=1e-3, texts=32)


def organism_robustness_plan() -> RobustnessPlan:
    """The robustness lab on the organism: base, GA, GradDiff, NPO, RMU and Adaptive RMU (the ``organism-*``
    presets) × seeds 0, 1, 2 × every attack (:data:`~rmu_analysis.experiments.robustness.ATTACKS`), at block 3,
    with :data:`ORGANISM_ATTACK_BUDGET`, scored as the organism is evaluated (``organism.SCORING``)."""
    methods = (("base", None), ("GA", PRESETS["organism-ga"]), ("GradDiff", PRESETS["organism-graddiff"]),
               ("NPO", PRESETS["organism-npo"]), ("RMU", PRESETS["organism-rmu"]),
               ("Adaptive RMU", PRESETS["organism-adaptive-rmu"]))
    return RobustnessPlan(methods=methods, layer=PRESETS["organism-rmu"].layer, budget=ORGANISM_ATTACK_BUDGET,
                          eval=EvalSettings(scoring=SCORING))


def model_robustness_plan(plan: ExperimentPlan, *, seeds: tuple[int, ...] | None = None,
                          budget: AttackBudget | None = None) -> RobustnessPlan:
    """The robustness lab on a real model (``--model PATH``, a GPU): the methods of ``plan``'s Table 1 (the first
    point of each method's grid), at its Table 1 layer, with the full :class:`AttackBudget` (GCG: 5 tokens,
    top-k 64, 64 candidates, 100 steps, 32 questions)."""
    classes = {"ga": GAConfig, "graddiff": GradDiffConfig, "npo": NPOConfig, "rmu": RMUConfig,
               "adaptive-rmu": AdaptiveRMUConfig}
    labels = {"ga": "GA", "graddiff": "GradDiff", "npo": "NPO", "rmu": "RMU", "adaptive-rmu": "Adaptive RMU"}
    methods: list[tuple[str, object]] = [("base", None)]
    for method, points in plan.grid().items():
        point = dict(points[0])
        fields = {"layer": plan.table_layer, "steps": point.pop("steps", plan.steps), "batch_size": plan.batch_size}
        if "coeff" in point:
            fields["steering_coeff" if method == "rmu" else "beta"] = point.pop("coeff")
        methods.append((labels[method], classes[method](**fields, **point)))
    return RobustnessPlan(methods=tuple(methods), layer=plan.table_layer, budget=budget or AttackBudget(),
                          seeds=seeds or plan.seeds, model=plan.model, data=plan.data, eval=plan.eval,
                          dtype=plan.dtype)


#: Named sweep plans: ``PLANS[name](...)`` builds the :class:`~rmu_analysis.experiments.plans.ExperimentPlan`.
PLANS: dict[str, Callable[..., ExperimentPlan]] = {
    "organism": organism_plan,
    "organism-quick": lambda: organism_plan(quick=True),
    "model": model_plan,
}
