"""Grids of runs: the layer sweep (Fig. 5), the coefficient sweep (Fig. 3 and the c / ‖h_l‖ collapse) and
Table 1, from one :class:`ExperimentPlan` per model. The named plans (the organism's, a real model's) are in
:mod:`rmu_analysis.recipes`."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from .._io import atomic_write_json
from .inputs import run_inputs
from .measure import forget_norms
from .specs import EvalSettings, RunSpec, check_dtype_name
from .workbench import Workbench

__all__ = ["valid_layers", "layer_sweep_grid", "coefficient_grid", "table1_grid", "grid_points", "ExperimentPlan",
           "plan_grids", "plan_norms", "saved_norms"]


def valid_layers(n_blocks: int) -> list[int]:
    """Blocks l whose three trained blocks l−2, l−1, l all exist (the paper's recipe): 2 … n_blocks−1."""
    return list(range(2, n_blocks))


def _specs(method: str, layers: Iterable[int], coeffs: Iterable[float | None], seeds: Iterable[int], **common: Any
           ) -> list[RunSpec]:
    return [RunSpec(method=method, layer=l, coeff=c, seed=s, **common) for s in seeds for l in layers for c in coeffs]


def layer_sweep_grid(layers: Iterable[int], *, c: float, beta: float = 5.0, seeds: Iterable[int] = (0, 1, 2),
                     **common: Any) -> list[RunSpec]:
    """Fig. 5: every layer × {RMU with one fixed c, Adaptive RMU with β}. ``common``: steps, lr, alpha, eval ..."""
    layers, seeds = list(layers), list(seeds)
    return _specs("rmu", layers, [c], seeds, **common) + _specs("adaptive-rmu", layers, [beta], seeds, **common)


def coefficient_grid(coeffs: Mapping[int, Iterable[float]], *, method: str = "rmu", seeds: Iterable[int] = (0,),
                     **common: Any) -> list[RunSpec]:
    """Fig. 3 and the c / ‖h_l‖ collapse: ``coeffs`` layer -> coefficients (c for RMU, β for Adaptive RMU)."""
    return [spec for layer, cs in coeffs.items() for spec in _specs(method, [layer], list(cs), list(seeds), **common)]


def table1_grid(layer: int, grid: Mapping[str, Iterable[Mapping[str, Any]]], *, seeds: Iterable[int] = (0, 1, 2),
                **common: Any) -> list[RunSpec]:
    """Table 1: every method at one layer, each over its hyperparameter grid (method -> list of RunSpec field
    overrides such as ``{"lr": 1e-4}`` or ``{"coeff": 5.0}``), every point × every seed."""
    out = []
    for method, points in grid.items():
        for point in points:
            for s in seeds:
                out.append(RunSpec(method=method, layer=layer, seed=s, **{**common, **dict(point)}))
    return out


def grid_points(**methods: Sequence[Mapping[str, Any]]) -> tuple:
    """Table 1's grid as :class:`ExperimentPlan` stores it (hashable): ``grid_points(adaptive_rmu=[{"coeff": 5.0}])``
    (keyword ``adaptive_rmu`` for the method ``adaptive-rmu``)."""
    return tuple((m.replace("_", "-"), tuple(tuple(sorted(p.items())) for p in points)) for m, points in methods.items())


@dataclass(frozen=True)
class ExperimentPlan:
    """Every knob of the experiments (one object per model; the CLI and notebooks build the same one).

    - layer sweep: ``layers`` × {RMU with ``c``, Adaptive RMU with ``beta``} × ``seeds``.
    - coefficient sweep: at each of ``coeff_layers``, RMU with c = ratio × ‖h_l‖ (the frozen forget norm) for
      each ``coeff_ratios``, and Adaptive RMU with each ``adaptive_betas``, × ``coeff_seeds``.
    - Table 1: every method of ``table_grid`` at ``table_layer`` × ``seeds``. With ``selection_seeds`` (data with
      dev question sets) it has two stages: every grid point × ``selection_seeds`` scored on the *dev* questions
      (``"table1_select"``), then each method's selected point (:func:`~.analysis.table1_choice`) × ``seeds``
      scored on the *test* questions (``"table1"``): hyperparameters are never chosen on what is reported.
    ``lr`` / ``alpha`` apply to the steering methods; the baselines' come from ``table_grid``.
    ``sweep_per_fact``: the layer and coefficient sweeps score the first ``sweep_per_fact`` wordings of each test
    fact (None: all; Table 1 always scores all).
    """

    layers: tuple[int, ...]
    c: float
    steps: int
    lr: float
    alpha: float
    table_layer: int
    table_grid: tuple[tuple[str, tuple[tuple[tuple[str, Any], ...], ...]], ...]
    beta: float = 5.0
    seeds: tuple[int, ...] = (0, 1, 2)
    coeff_layers: tuple[int, ...] = ()
    coeff_ratios: tuple[float, ...] = ()
    adaptive_betas: tuple[float, ...] = ()
    coeff_seeds: tuple[int, ...] = (0,)
    batch_size: int = 4
    log_every: int = 5  # odd, so that the log alternates topics (steps 0, 5, 10 ...: bio, cyber, bio ...)
    model: str = "organism"
    data: str = "organism"
    eval: EvalSettings = field(default_factory=EvalSettings)
    selection_seeds: tuple[int, ...] = ()
    sweep_per_fact: int | None = None
    dtype: str | None = None  # the model's parameter dtype every run names (None: float32; part of the run keys)

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", check_dtype_name(self.dtype))
        overlap = set(self.selection_seeds) & set(self.seeds)
        if overlap:
            raise ValueError(f"selection seeds must differ from the reporting seeds: {sorted(overlap)} are both")

    def grid(self) -> dict[str, list[dict[str, Any]]]:
        """``table_grid`` as method -> list of field overrides."""
        return {m: [dict(p) for p in points] for m, points in self.table_grid}

    def common(self) -> dict[str, Any]:
        return {"steps": self.steps, "batch_size": self.batch_size, "model": self.model, "data": self.data,
                "eval": self.eval, "options": (("log_every", self.log_every),), "dtype": self.dtype}


def plan_grids(plan: ExperimentPlan, norms: Mapping[int, float] | None = None,
               selected: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, list[RunSpec]]:
    """The grids of a plan: ``{"coefficient": [...], "layer": [...], "table1_select": [...], "table1": [...]}``.
    The coefficient sweep's c values are ratio × ``norms[l]`` (rounded to 4 significant digits, so the grid is
    stable). With ``plan.selection_seeds``, ``"table1_select"`` is the grid on the dev questions and ``"table1"``
    holds each method's point of ``selected`` (method -> grid point, :func:`~.analysis.table1_choice`) × the
    reporting seeds on the test questions (empty until ``selected`` is given)."""
    common = plan.common()
    sweep_eval = dataclasses.replace(plan.eval, per_fact=plan.sweep_per_fact)
    sweep_common = {**common, "eval": sweep_eval}
    steer = {"lr": plan.lr, "alpha": plan.alpha}
    coeff: list[RunSpec] = []
    if plan.coeff_layers:
        if norms is None:
            raise ValueError("the coefficient sweep needs the frozen forget norms: pass norms=forget_norms(bench, ...)")
        cs = {l: [float(f"{r * norms[l]:.4g}") for r in plan.coeff_ratios] for l in plan.coeff_layers}
        coeff = coefficient_grid(cs, method="rmu", seeds=plan.coeff_seeds, **steer, **sweep_common)
        if plan.adaptive_betas:
            coeff += coefficient_grid({l: plan.adaptive_betas for l in plan.coeff_layers}, method="adaptive-rmu",
                                      seeds=plan.coeff_seeds, **steer, **sweep_common)
    if plan.selection_seeds:
        dev = {**common, "eval": dataclasses.replace(plan.eval, split="dev")}
        select = table1_grid(plan.table_layer, plan.grid(), seeds=plan.selection_seeds, **dev)
        if selected is not None:
            unknown = [m for m in selected if m not in plan.grid()]
            if unknown:
                raise ValueError(f"selected methods {unknown} are not in the plan's Table 1 grid {sorted(plan.grid())}")
        chosen = {m: [dict(p)] for m, p in (selected or {}).items()}
        table1 = table1_grid(plan.table_layer, chosen, seeds=plan.seeds, **common) if chosen else []
    else:
        select, table1 = [], table1_grid(plan.table_layer, plan.grid(), seeds=plan.seeds, **common)
    return {
        "coefficient": coeff,
        "layer": layer_sweep_grid(plan.layers, c=plan.c, beta=plan.beta, seeds=plan.seeds, **steer, **sweep_common),
        "table1_select": select,
        "table1": table1,
    }


def saved_norms(results: str | Path) -> dict[int, float]:
    """The frozen forget norms stored in ``results/norms.json`` by :func:`plan_norms` (a reproduction's results)."""
    return {int(k): float(v) for k, v in json.loads((Path(results) / "norms.json").read_text())["norms"].items()}


def plan_norms(plan: ExperimentPlan, bench: Callable[[], Workbench], results: Path) -> dict[int, float]:
    """The frozen forget norms the coefficient grid needs, cached in ``results/norms.json`` (shards agree) with
    the identity of the model and data they were measured on (:func:`~.inputs.run_inputs`): after a change of
    either they are measured again."""
    path = Path(results) / "norms.json"
    want = {str(l) for l in plan.coeff_layers}
    inputs = run_inputs(plan.model, plan.data)
    if path.is_file():
        cached = json.loads(path.read_text())
        if (cached.get("model"), cached.get("data"), cached.get("inputs")) == (plan.model, plan.data, inputs) \
                and want <= set(cached["norms"]):
            return saved_norms(results)
    norms = forget_norms(bench(), plan.coeff_layers, plan.eval)
    atomic_write_json(path, {"model": plan.model, "data": plan.data, "norms": {str(k): v for k, v in norms.items()},
                             "inputs": inputs})
    return norms
