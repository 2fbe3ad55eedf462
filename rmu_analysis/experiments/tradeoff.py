"""The runs that the matched-utility comparison needs (:func:`rmu_analysis.claims.matched_forget`): at each layer, a
trade-off curve per method — RMU over several c (c = ratio × the frozen forget norm ‖h_l‖, so one ratio grid
serves every layer and model), Adaptive RMU over several β (the paper's {2, 3, 5, 10}, Section 5) — × seeds. The
grid is a list of :class:`~.specs.RunSpec` for :func:`~.runner.run_sweep`; nothing is run here."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from .plans import coefficient_grid
from .specs import EvalSettings, RunSpec

__all__ = ["TradeoffPlan", "tradeoff_grid"]


@dataclass(frozen=True)
class TradeoffPlan:
    """Every knob of the trade-off sweep. ``layers`` × (RMU: ``coeff_ratios`` × ‖h_l‖; Adaptive RMU: ``betas``) ×
    ``seeds``; ``steps`` / ``lr`` / ``alpha`` / ``batch_size`` as in :class:`~.plans.ExperimentPlan` (pass the
    same values as the plan whose Table 1 the curves extend). Ratios span "nothing forgotten" to "utility gone"
    so that every curve crosses the matched general accuracy."""

    layers: tuple[int, ...]
    steps: int
    lr: float
    alpha: float
    coeff_ratios: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0)
    betas: tuple[float, ...] = (2.0, 3.0, 5.0, 10.0)
    seeds: tuple[int, ...] = (0, 1, 2)
    batch_size: int = 4
    log_every: int = 5
    model: str = "organism"
    data: str = "organism"
    eval: EvalSettings = field(default_factory=EvalSettings)

    def __post_init__(self) -> None:
        if not self.layers or not self.seeds:
            raise ValueError("a trade-off plan needs at least one layer and one seed")
        if len(self.coeff_ratios) < 2 or len(self.betas) < 2:
            raise ValueError("a trade-off curve needs at least 2 settings per method (coeff_ratios, betas)")
        if any(r <= 0 for r in self.coeff_ratios) or any(b <= 0 for b in self.betas):
            raise ValueError("coeff_ratios and betas must be positive")

    @property
    def n_runs(self) -> int:
        return len(self.layers) * (len(self.coeff_ratios) + len(self.betas)) * len(self.seeds)


def tradeoff_grid(plan: TradeoffPlan, norms: Mapping[int, float]) -> list[RunSpec]:
    """The runs of ``plan``: RMU with c = ratio × ``norms[l]`` (the frozen forget norms, e.g.
    :func:`~.plans.plan_norms` / :func:`~.measure.forget_norms`; rounded to 4 significant digits so keys are
    stable) and Adaptive RMU with each β, at every layer and seed. Run them with ``run_sweep(specs, out, bench)``."""
    missing = [l for l in plan.layers if l not in norms]
    if missing:
        raise ValueError(f"norms has no frozen forget norm for layer(s) {missing}: measure them with forget_norms")
    common: dict[str, Any] = {"steps": plan.steps, "batch_size": plan.batch_size, "model": plan.model,
                              "data": plan.data, "eval": plan.eval, "options": (("log_every", plan.log_every),),
                              "lr": plan.lr, "alpha": plan.alpha}
    cs = {l: [float(f"{r * norms[l]:.4g}") for r in plan.coeff_ratios] for l in plan.layers}
    return (coefficient_grid(cs, method="rmu", seeds=plan.seeds, **common)
            + coefficient_grid({l: plan.betas for l in plan.layers}, method="adaptive-rmu", seeds=plan.seeds,
                               **common))
