"""Configurations of the unlearning methods, with the paper's defaults (arXiv 2408.06223: Eq. 1, Eq. 24 and
Zephyr-7B's Table 1 recipe; docs/paper.md): they are the one place the Zephyr-7B settings are written.

Every config is a frozen dataclass: the CLI, the notebooks and the tests build the same objects, and a saved
run records the exact object it used (``rmu_config.json``). Per-topic settings (c, β, α, forget max length)
are a scalar applying to every topic or a tuple with one value per forget topic, in the order of the
``forget`` mapping; a tuple whose length differs from the topic count is an error before training.

Every number is checked when the config is built, before any model is loaded: c and β must be finite and
positive; α finite and ≥ 0 (α = 0 is allowed: the run has no retain term, only the forget term); the retain
noise finite and ≥ 0; learning rate, Adam ε finite and positive; steps, batch size and lengths positive ints.
A length longer than the model's positions is cut to the positions when the run starts
(``common.sequence_lengths``).
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import re
from dataclasses import dataclass
from typing import Any, Literal, Union

PerTopic = Union[float, tuple[float, ...]]
PerTopicInt = Union[int, tuple[int, ...]]

LOSS_CONVENTIONS = ("reference", "masked")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))


def _check_int(name: str, value: Any, minimum: int = 1) -> None:
    _check(_is_int(value) and value >= minimum, f"{name} must be an int >= {minimum}, got {value!r}")


def _check_number(name: str, value: Any, *, zero_ok: bool = False, what: str = "", per_topic: bool = False) -> None:
    """A finite real number, > 0 (or >= 0 with ``zero_ok``); a ``per_topic`` tuple is checked element by element."""
    _check(per_topic or not isinstance(value, tuple), f"{name} is one number, got {value!r}")
    values = value if isinstance(value, tuple) else (value,)
    _check(len(values) > 0, f"{name} is an empty tuple: give one value, or one per topic")
    bound = ">= 0" if zero_ok else "> 0"
    for v in values:
        _check(
            _is_real(v) and (v >= 0 if zero_ok else v > 0),
            f"{name} must be a finite number {bound}{what}, got {v!r}" + (f" in {value!r}" if len(values) > 1 else ""),
        )


@dataclass(frozen=True)
class _UnlearnConfig:
    """Settings shared by every method: where to train, what to train, how to batch, how to optimise.

    - ``layer``: block l (0-indexed; its output is ``hidden_states[l + 1]``).
    - ``trained_layers``: blocks whose tensors are trained; None = (l-2, l-1, l) clipped at 0.
    - ``param_pattern``: regex on block-relative parameter names; None = the MLP down-projection of the
      architecture (``models.down_proj_pattern``), e.g. ``mlp\\.down_proj\\.weight$`` for Llama.
    - ``forget_max_length``: per-topic right-truncation length of forget texts; None = the reference rule
      (512 for the first topic, 768 for the others: bio 512, cyber 768).
    - ``steps``: optimiser steps; topics alternate (topic = step % n_topics, batch = step // n_topics).
      A corpus that runs out of batches ends the run early, with a warning (the reference stops too).
    - ``adam_eps`` / ``weight_decay``: the old ``transformers.AdamW`` defaults the reference used (1e-6, 0).
    """

    layer: int = 7
    trained_layers: tuple[int, ...] | None = None
    param_pattern: str | None = None
    lr: float = 5e-5
    steps: int = 500
    batch_size: int = 4
    forget_max_length: PerTopicInt | None = None
    retain_max_length: int = 512
    seed: int = 42
    adam_eps: float = 1e-6
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    log_every: int = 10

    def __post_init__(self) -> None:
        if isinstance(self.trained_layers, list):
            object.__setattr__(self, "trained_layers", tuple(self.trained_layers))
        for name in ("alpha", "steering_coeff", "beta", "forget_max_length"):
            value = getattr(self, name, None)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        if isinstance(self.betas, list):
            object.__setattr__(self, "betas", tuple(self.betas))
        _check(isinstance(self.layer, int) and not isinstance(self.layer, bool), f"layer must be an int, got {self.layer!r}")
        _check_int("steps", self.steps)
        _check_int("batch_size", self.batch_size)
        _check_number("lr", self.lr)
        _check_int("log_every", self.log_every)
        _check_int("retain_max_length", self.retain_max_length)
        if self.forget_max_length is not None:
            lengths = self.forget_max_length if isinstance(self.forget_max_length, tuple) else (self.forget_max_length,)
            _check(len(lengths) > 0, "forget_max_length is an empty tuple: give one length, or one per topic")
            for n in lengths:
                _check_int("forget_max_length", n)
        _check(_is_int(self.seed), f"seed must be an int, got {self.seed!r}")
        _check_number("adam_eps", self.adam_eps)
        _check_number("weight_decay", self.weight_decay, zero_ok=True)
        _check(
            isinstance(self.betas, tuple) and len(self.betas) == 2 and all(_is_real(b) and 0 <= b < 1 for b in self.betas),
            f"betas must be two numbers in [0, 1), got {self.betas!r}",
        )
        if self.param_pattern is not None:
            try:
                re.compile(self.param_pattern)
            except (re.error, TypeError) as exc:
                raise ValueError(f"param_pattern {self.param_pattern!r} is not a regular expression: {exc}") from exc
        if self.trained_layers is not None:
            _check(all(_is_int(t) for t in self.trained_layers), f"trained_layers must be ints, got {self.trained_layers!r}")
            _check(len(self.trained_layers) > 0, "trained_layers is empty: pass None for (l-2, l-1, l)")
            _check(
                all(t <= self.layer for t in self.trained_layers),
                f"trained_layers {self.trained_layers} include a block after layer {self.layer}: "
                "blocks after l do not influence the loss at block l",
            )

    @property
    def method(self) -> str:
        return METHOD_NAMES[type(self)]

    def resolved_trained_layers(self) -> tuple[int, ...]:
        """``trained_layers`` or the default (l-2, l-1, l) clipped at 0 (as in RMU, Eq. 1)."""
        if self.trained_layers is not None:
            return tuple(sorted(set(self.trained_layers)))
        return tuple(range(max(0, self.layer - 2), self.layer + 1))

    def per_topic(self, name: str, n_topics: int, topics: tuple[str, ...] | None = None) -> tuple:
        """The value of per-topic setting ``name`` for each of ``n_topics`` topics (a clear error on mismatch)."""
        value = getattr(self, name)
        if name == "forget_max_length" and value is None:
            return tuple(512 if i == 0 else 768 for i in range(n_topics))
        if isinstance(value, tuple):
            if len(value) != n_topics:
                shown = f" ({', '.join(topics)})" if topics else ""
                raise ValueError(
                    f"{name} has {len(value)} values {value} but there are {n_topics} forget topics{shown}: "
                    "give one value per topic or a single scalar for all"
                )
            return value
        return (value,) * n_topics

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict, with the method name. Options added after runs were saved (``ADDED_OPTIONS``) are
        left out while they hold their default, which changes nothing: a saved config and a sweep run's key
        (a hash of this dict) stay what they were before the option existed."""
        data = dataclasses.asdict(self)
        for name, default in ADDED_OPTIONS.items():
            if name in data and data[name] == default:
                del data[name]
        return {"method": self.method, **data}


@dataclass(frozen=True)
class _SteeringConfig(_UnlearnConfig):
    """Shared by RMU and Adaptive RMU: retain weight α and the loss convention.

    ``loss="reference"``: mean over every position, padding and BOS included (as the reference code:
    ``mse_loss(acts, target)``). ``loss="masked"``: padding excluded from both terms, BOS excluded from the
    forget term but kept in the retain term (dropping BOS from the retain term lets the attention-sink state
    drift and doubles the LM loss on generic text).

    ``retain_noise`` σ: random noise augmentation of the retain term (arXiv 2501.19202), 0 = off. Each step, the
    retain batch's representation entering the first trained block (the frozen prefix's output) gets Gaussian
    noise before the trained blocks run, and their block-l output is still pulled to the frozen model's output on
    the *clean* input: α ||h_upd(h_in(x_R) + ε) − h_frozen(x_R)||². The trained blocks learn to absorb a
    perturbation of retain representations, as a forget token inside a retain query causes one. (Noise added to
    h_upd itself before the MSE would change no expected gradient, only add zero-mean noise to it.) σ is
    relative: token t's noise is N(0, (σ ||h_t|| / √d)² I), an expected norm ≈ σ ||h_t||, so one σ means the same
    at every layer and in every model (residual norms grow with depth, the reason Adaptive RMU scales c, Eq. 24);
    every position gets noise. Drawn from a CPU generator seeded by ``seed`` (apart from the control vectors'
    stream), in float32, then moved: CPU and GPU runs see the same noise.
    """

    alpha: PerTopic = 1200.0
    loss: Literal["reference", "masked"] = "reference"
    retain_noise: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.loss in LOSS_CONVENTIONS, f"loss must be one of {LOSS_CONVENTIONS}, got {self.loss!r}")
        _check_number("alpha", self.alpha, zero_ok=True, what=" (0 = no retain term)", per_topic=True)
        _check_number("retain_noise", self.retain_noise, zero_ok=True, what=" (0 = no noise)")


@dataclass(frozen=True)
class RMUConfig(_SteeringConfig):
    """RMU (Eq. 1): ||h_upd(x_F) − c·u||² + α ||h_upd(x_R) − h_frozen(x_R)||², c = ``steering_coeff``."""

    steering_coeff: PerTopic = 6.5

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_number("steering_coeff (c)", self.steering_coeff, per_topic=True)


@dataclass(frozen=True)
class AdaptiveRMUConfig(_SteeringConfig):
    """Adaptive RMU (Eq. 24): the coefficient is β × a forget-representation norm.

    ``coefficient="first-batch"`` (the official code): β × the mean per-token norm of the *updated* model's
    block-l activations on the topic's first forget batch (step t for topic t), then fixed.
    ``coefficient="per-sample"`` (Eq. 24 read literally): β × the mean per-token norm of the *frozen*
    model's activations, per forget sequence, at every step. Norms are averaged over the positions the
    forget loss covers (every position in the reference convention; real non-BOS tokens when masked).
    """

    beta: PerTopic = 5.0
    coefficient: Literal["first-batch", "per-sample"] = "first-batch"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_number("beta", self.beta, per_topic=True)
        _check(
            self.coefficient in ("first-batch", "per-sample"),
            f'coefficient must be "first-batch" or "per-sample", got {self.coefficient!r}',
        )


@dataclass(frozen=True)
class _BaselineConfig(_UnlearnConfig):
    """Shared by the output-space baselines. ``params="selected"`` trains the same tensors as RMU
    (``trained_layers`` × ``param_pattern``); ``params="mlp"`` trains every MLP parameter of every block."""

    lr: float = 1e-5
    steps: int = 100
    params: Literal["selected", "mlp"] = "selected"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.params in ("selected", "mlp"), f'params must be "selected" or "mlp", got {self.params!r}')


@dataclass(frozen=True)
class GAConfig(_BaselineConfig):
    """Gradient ascent: maximise the forget NLL (minimise −NLL)."""


@dataclass(frozen=True)
class GradDiffConfig(_BaselineConfig):
    """Gradient difference: −NLL(forget) + α · NLL(retain)."""

    alpha: PerTopic = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_number("alpha", self.alpha, zero_ok=True, what=" (0 = no retain term)", per_topic=True)


@dataclass(frozen=True)
class NPOConfig(_BaselineConfig):
    """NPO with a retain term: −(2/β) E log σ(−β log(π_θ(y|x)/π_ref(y|x))) + α · NLL(retain)."""

    beta: float = 0.1
    alpha: PerTopic = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_number("beta", self.beta)
        _check_number("alpha", self.alpha, zero_ok=True, what=" (0 = no retain term)", per_topic=True)


METHOD_NAMES: dict[type, str] = {
    RMUConfig: "rmu",
    AdaptiveRMUConfig: "adaptive-rmu",
    GAConfig: "ga",
    GradDiffConfig: "graddiff",
    NPOConfig: "npo",
}
CONFIG_CLASSES: dict[str, type] = {name: cls for cls, name in METHOD_NAMES.items()}
#: Options added after runs were saved, with the default that leaves a run as it was (see ``to_dict``).
ADDED_OPTIONS: dict[str, Any] = {"retain_noise": 0.0}


def config_from_dict(data: dict[str, Any]) -> _UnlearnConfig:
    """Rebuild a config from ``to_dict()`` output (e.g. a saved ``rmu_config.json``)."""
    data = dict(data)
    method = data.pop("method")
    cls = CONFIG_CLASSES[method]
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in names}
    return cls(**kwargs)
