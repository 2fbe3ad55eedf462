"""The lab's specs: the attacks, their budget, one attack run (:class:`AttackSpec`, its key) and the plan's grid
(:mod:`..robustness`)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Mapping


from ...attacks import GCGConfig, RelearnConfig
from ...unlearning.config import METHOD_NAMES as CONFIG_METHODS
from ..inputs import run_inputs
from ..specs import COEFF_FIELDS, EvalSettings, RunSpec, check_dtype_name

#: The attacks of the lab, in the table's order.
ATTACKS = ("gcg", "gcg-transfer", "relearn", "probe", "ablate", "fragility")
ATTACK_NAMES = {"gcg": "GCG (correct vs wrong target)", "gcg-transfer": "GCG transfer dev → test",
                "relearn": "relearn (forget vs retain text)", "probe": "linear probe", "ablate": "direction ablation",
                "fragility": "forget term in general questions"}
#: ``"kind"`` of an attack result file (unlearning results have none).
RESULT_KIND = "attack"
#: Bumped when what an attack run measures changes: part of every attack run's key.
ATTACK_VERSION = 1
_METHOD_LABELS = {"base": "base", "ga": "GA", "graddiff": "GradDiff", "npo": "NPO", "rmu": "RMU",
                  "adaptive-rmu": "Adaptive RMU"}


@dataclass(frozen=True)
class AttackBudget:
    """What each attack may spend. The defaults are a GPU-sized budget (GCG as sized in the issue: 5 tokens, top-k
    64, 64 candidates, 100 steps, on 32 test questions); :func:`rmu_analysis.recipes.organism_robustness_plan`
    shrinks it to fit 2 CPU cores. ``questions``: forget test questions attacked per run (a seeded sample, so the
    seeds see different questions) and dev questions for the transfer string and the probes; GCG attacks the first
    ``gcg_questions`` of them (None: all) and tunes the transfer string on as many dev questions; ``general``: general
    questions of the fragility check; relearning: ``relearn_steps`` steps (checkpoints at 0, ¼, ½, 1 of them) at
    ``relearn_lr`` on ``texts`` texts; the ablated direction is estimated on ``texts`` forget texts."""

    questions: int = 32
    gcg_questions: int | None = None
    general: int = 32
    gcg_tokens: int = 5
    gcg_top_k: int = 64
    gcg_candidates: int = 64
    gcg_steps: int = 100
    relearn_steps: int = 20
    relearn_lr: float = 1e-4
    texts: int = 64
    batch_size: int = 128

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "gcg_questions" and value is None:
                continue
            if f.name == "relearn_lr":
                if not (isinstance(value, (int, float)) and value > 0):
                    raise ValueError(f"relearn_lr must be a positive number, got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{f.name} must be a positive int, got {value!r}")

    def gcg_config(self, scoring: str, seed: int) -> GCGConfig:
        return GCGConfig(n_tokens=self.gcg_tokens, top_k=self.gcg_top_k, candidates=self.gcg_candidates,
                         steps=self.gcg_steps, batch_size=self.batch_size, scoring=scoring, seed=seed)

    def relearn_config(self, scoring: str, seed: int) -> RelearnConfig:
        s = self.relearn_steps
        return RelearnConfig(checkpoints=(0, max(1, s // 4), max(1, s // 2), s), lr=self.relearn_lr, scoring=scoring,
                             eval_batch_size=min(self.batch_size, 64), seed=seed)


@dataclass(frozen=True)
class AttackSpec:
    """One attack run: ``attack`` on the model that ``unlearn`` trains (None: the base model) with ``seed`` (the
    unlearning run's seed, the attack's draws and the sample of questions). ``layer``: the block probed and
    ablated (the unlearning layer). ``eval``: the evaluation settings (its ``scoring`` is how every attack scores
    answers; its held-out split decides which texts relearning and the ablated direction may use)."""

    attack: str
    unlearn: RunSpec | None
    seed: int
    layer: int
    budget: AttackBudget = field(default_factory=AttackBudget)
    eval: EvalSettings = field(default_factory=EvalSettings)
    model: str = "organism"
    data: str = "organism"
    dtype: str | None = None  # the model's parameter dtype (None: float32), as RunSpec.dtype

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", check_dtype_name(self.dtype))
        if self.attack not in ATTACKS:
            raise ValueError(f"attack must be one of {', '.join(ATTACKS)}, got {self.attack!r}")
        if isinstance(self.unlearn, Mapping):
            object.__setattr__(self, "unlearn", RunSpec.from_dict(self.unlearn))
        if isinstance(self.budget, Mapping):
            object.__setattr__(self, "budget", AttackBudget(**self.budget))
        if isinstance(self.eval, Mapping):
            object.__setattr__(self, "eval", EvalSettings(**self.eval))
        u = self.unlearn
        if u is not None and (u.seed, u.model, u.data, u.dtype) != (self.seed, self.model, self.data, self.dtype):
            raise ValueError(f"the unlearning run ({u.label()}, model {u.model!r}, data {u.data!r}, dtype "
                             f"{u.dtype!r}) must have the attack's seed {self.seed}, model {self.model!r}, data "
                             f"{self.data!r} and dtype {self.dtype!r}")
        if u is None and self.attack == "ablate":
            raise ValueError("ablate needs an unlearned model (the direction is unlearned − base): the base model "
                             "has none")

    @property
    def scoring(self) -> str:
        return self.eval.scoring

    @property
    def method(self) -> str:
        """``"base"`` or the unlearning method (``"rmu"``, ``"adaptive-rmu"``, ``"ga"`` ...)."""
        return "base" if self.unlearn is None else self.unlearn.method

    @property
    def method_label(self) -> str:
        return _METHOD_LABELS.get(self.method, self.method)

    def to_dict(self) -> dict[str, Any]:
        d = {"attack": self.attack, "unlearn": None if self.unlearn is None else self.unlearn.to_dict(),
             "seed": self.seed, "layer": self.layer, "budget": dataclasses.asdict(self.budget),
             "eval": dataclasses.asdict(self.eval), "model": self.model, "data": self.data}
        if self.dtype is not None:  # float32 left out: the keys of attacks made before the field stay
            d["dtype"] = self.dtype
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "AttackSpec":
        return cls(**dict(data))

    def inputs(self) -> dict[str, str]:
        return run_inputs(self.model, self.data)

    def key(self) -> str:
        """A short stable hash of the spec, the unlearning run's resolved config, :data:`ATTACK_VERSION` and the
        identity of the model and data (the result file's name)."""
        payload = {"kind": RESULT_KIND, "spec": self.to_dict(), "version": ATTACK_VERSION, "inputs": self.inputs(),
                   "config": None if self.unlearn is None else self.unlearn.config().to_dict()}
        text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def label(self) -> str:
        return f"{self.attack} on {self.method_label} seed={self.seed}"

    def share_key(self) -> tuple:
        """Runs with the same share key use one trained model (the runner keeps them in one process)."""
        return (self.model, self.data, self.seed, "attack", None if self.unlearn is None else self.unlearn.key())


@dataclass(frozen=True)
class RobustnessPlan:
    """Every knob of the robustness lab: ``methods`` (label, engine config or None for the base model) × ``seeds``
    × ``attacks``, with ``budget``, on ``model`` / ``data`` evaluated with ``eval`` (its scoring)."""

    methods: tuple[tuple[str, Any], ...]
    layer: int
    budget: AttackBudget = field(default_factory=AttackBudget)
    seeds: tuple[int, ...] = (0, 1, 2)
    attacks: tuple[str, ...] = ATTACKS
    model: str = "organism"
    data: str = "organism"
    eval: EvalSettings = field(default_factory=EvalSettings)
    dtype: str | None = None  # the model's parameter dtype (None: float32)


def run_spec_from_config(config: Any, *, seed: int, model: str, data: str, eval: EvalSettings,
                         dtype: str | None = None) -> RunSpec:
    """The :class:`RunSpec` that trains ``config`` (an engine config, e.g. a preset of :mod:`rmu_analysis.recipes`)
    with ``seed``: its layer, steps, lr, α and coefficient as spec fields, every other non-default field as an
    option."""
    method = CONFIG_METHODS[type(config)]
    defaults = type(config)()
    names = {f.name for f in dataclasses.fields(config)}
    fields = {"layer": config.layer, "steps": config.steps, "batch_size": config.batch_size, "lr": config.lr}
    if "alpha" in names:
        fields["alpha"] = config.alpha
    if method in COEFF_FIELDS:
        fields["coeff"] = getattr(config, COEFF_FIELDS[method])
    direct = {"layer", "steps", "batch_size", "lr", "alpha", "seed", COEFF_FIELDS.get(method)}
    options = tuple((n, getattr(config, n)) for n in sorted(names - direct)
                    if getattr(config, n) != getattr(defaults, n))
    return RunSpec(method=method, seed=seed, options=options, model=model, data=data, eval=eval, dtype=dtype,
                   **fields)


def robustness_grid(plan: RobustnessPlan) -> list[AttackSpec]:
    """Every (method, seed, attack) of ``plan``, grouped by (seed, method) so that a model trains once."""
    out = []
    for seed in plan.seeds:
        for _, config in plan.methods:
            unlearn = None if config is None else run_spec_from_config(config, seed=seed, model=plan.model,
                                                                       data=plan.data, eval=plan.eval, dtype=plan.dtype)
            for attack in plan.attacks:
                if unlearn is None and attack == "ablate":
                    continue  # no direction to ablate on the base model
                out.append(AttackSpec(attack=attack, unlearn=unlearn, seed=seed, layer=plan.layer, budget=plan.budget,
                                      eval=plan.eval, model=plan.model, data=plan.data, dtype=plan.dtype))
    return out
