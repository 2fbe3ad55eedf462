"""What one unlearning run of a sweep is: a :class:`RunSpec` (method, block l, coefficient, steps, seed, model,
data) with its :class:`EvalSettings`, and its key, a hash of all of it and of the content of the model and data it
reads (:mod:`.inputs`), which names the run's result file."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..unlearning.config import CONFIG_CLASSES
from .inputs import run_inputs

__all__ = ["DTYPES", "check_dtype_name", "RESULT_VERSION", "STEERING", "COEFF_FIELDS", "EvalSettings", "RunSpec"]

#: Bumped when what a run measures changes: part of every run's key, so old result files are not reused.
RESULT_VERSION = 1
STEERING = ("rmu", "adaptive-rmu")
#: The config field a spec's ``coeff`` sets, per method (GA and GradDiff have none).
COEFF_FIELDS = {"rmu": "steering_coeff", "adaptive-rmu": "beta", "npo": "beta"}


@dataclass(frozen=True)
class EvalSettings:
    """How a run is evaluated. ``questions``: questions per set (None = all); ``confidence_prompts`` forget
    questions per topic decoded for ``confidence_tokens`` greedy tokens (the paper: 3,260 and 30);
    ``eval_texts``: held-out texts per corpus (alignment, norms, retain loss); ``null_seed``: the null directions.
    ``split``: the question sets scored, ``"test"`` (reported) or ``"dev"`` (hyperparameter selection; the data
    must have dev sets, as the testbed-2 organism does). ``per_fact``: score only the first ``per_fact`` questions
    (wordings) of each fact (records need ``fact_id``; None = all): a cheaper evaluation that keeps every fact."""

    questions: int | None = None
    split: str = "test"
    per_fact: int | None = None
    scoring: str = "letter"
    confidence_prompts: int = 32
    confidence_tokens: int = 8
    eval_texts: int = 64
    batch_size: int = 32
    null_seed: int = 12345

    def __post_init__(self) -> None:
        if self.scoring not in ("letter", "cloze"):
            raise ValueError(f"scoring must be 'letter' or 'cloze', got {self.scoring!r}")
        if self.split not in ("test", "dev"):
            raise ValueError(f"split must be 'test' or 'dev', got {self.split!r}")
        if self.per_fact is not None and (isinstance(self.per_fact, bool) or not isinstance(self.per_fact, int)
                                          or self.per_fact < 1):
            raise ValueError(f"per_fact must be None or a positive int, got {self.per_fact!r}")
        for name in ("confidence_prompts", "eval_texts", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.confidence_tokens < 0:
            raise ValueError(f"confidence_tokens must be >= 0, got {self.confidence_tokens}")


def _plain(value: Any) -> Any:
    """Lists to tuples (hashable, canonical), ints stay ints."""
    if isinstance(value, list):
        return tuple(_plain(v) for v in value)
    return value


#: The parameter dtypes a run may name (None: float32).
DTYPES = ("float32", "bfloat16", "float16")


def check_dtype_name(dtype: Any) -> str | None:
    """``dtype`` as a spec stores it: None for float32 (the default, so a float32 run has one key whichever way it
    was named), else one of :data:`DTYPES`; anything else is a ``ValueError``."""
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be None (float32) or one of {DTYPES}, got {dtype!r}")
    return None if dtype == "float32" else dtype


@dataclass(frozen=True)
class RunSpec:
    """One unlearning run of a sweep.

    ``coeff``: c for ``rmu``, β for ``adaptive-rmu`` and ``npo`` (None: the config default; GA and GradDiff take
    none). ``lr`` / ``alpha`` None: the method's default. ``options``: any other config field, as
    ``(("loss", "masked"), ...)``. ``model`` / ``data``: names of the model and data the run needs (checked
    against the workbench). The key (:meth:`key`) hashes all of it, the resolved engine config and the identity of
    the model's files and of the data (:meth:`inputs`). ``dtype``: the model's parameter dtype the run needs
    (``"bfloat16"`` ...; None = float32), part of the key: a bf16 run and a float32 run of the same spec never share
    a result file, and a workbench holding the model in another dtype refuses the run.
    """

    method: str
    layer: int
    steps: int
    seed: int = 0
    coeff: float | None = None
    alpha: float | None = None
    lr: float | None = None
    batch_size: int = 4
    options: tuple[tuple[str, Any], ...] = ()
    model: str = "organism"
    data: str = "organism"
    eval: EvalSettings = field(default_factory=EvalSettings)
    dtype: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", check_dtype_name(self.dtype))
        if self.method not in CONFIG_CLASSES:
            raise ValueError(f"method must be one of {sorted(CONFIG_CLASSES)}, got {self.method!r}")
        for name in ("coeff", "alpha", "lr"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, float(value))
        opts = dict(self.options.items() if isinstance(self.options, Mapping) else self.options)
        object.__setattr__(self, "options", tuple(sorted((str(k), _plain(v)) for k, v in opts.items())))
        if isinstance(self.eval, Mapping):
            object.__setattr__(self, "eval", EvalSettings(**self.eval))
        self.config()  # every invalid combination fails here, before any run starts

    def config(self):
        """The engine config this run trains with (``RMUConfig``, ``AdaptiveRMUConfig``, ``GAConfig`` ...)."""
        cls = CONFIG_CLASSES[self.method]
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {"layer": self.layer, "steps": self.steps, "seed": self.seed,
                                  "batch_size": self.batch_size}
        if self.lr is not None:
            kwargs["lr"] = self.lr
        if self.coeff is not None:
            if self.method not in COEFF_FIELDS:
                raise ValueError(f"{self.method} takes no coefficient (coeff={self.coeff}): leave it None")
            kwargs[COEFF_FIELDS[self.method]] = self.coeff
        if self.alpha is not None:
            if "alpha" not in names:
                raise ValueError(f"{self.method} has no retain weight alpha: leave it None")
            kwargs["alpha"] = self.alpha
        for name, value in self.options:
            if name not in names:
                raise ValueError(f"option {name!r} is not a field of {cls.__name__}: fields are {sorted(names)}")
            if name in kwargs:
                raise ValueError(f"option {name!r} duplicates a RunSpec field: set it there")
            kwargs[name] = value
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["options"] = [[k, v] for k, v in self.options]
        if d["dtype"] is None:  # float32, the default: left out, so the keys of runs made before the field stay
            del d["dtype"]
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "RunSpec":
        data = dict(data)
        data["options"] = tuple((k, _plain(v)) for k, v in data.get("options", ()))
        data["eval"] = EvalSettings(**data.get("eval", {}))
        return cls(**data)

    def inputs(self) -> dict[str, str]:
        """What the run reads, by content: ``{"model": ..., "data": ...}`` (:func:`~.inputs.model_identity`,
        :func:`~.inputs.data_identity`). Changed weights or data give other identities, hence another key."""
        return run_inputs(self.model, self.data)

    def key(self) -> str:
        """A short stable hash of the spec, the resolved config, :data:`RESULT_VERSION` and :meth:`inputs` (the
        result file's name)."""
        payload = {"spec": self.to_dict(), "config": self.config().to_dict(), "version": RESULT_VERSION,
                   "inputs": self.inputs()}
        text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def label(self) -> str:
        coeff = "" if self.coeff is None else f" {'c' if self.method == 'rmu' else 'β'}={self.coeff:g}"
        lr = "" if self.lr is None else f" lr={self.lr:g}"
        return f"{self.method} l={self.layer}{coeff}{lr} seed={self.seed}"
