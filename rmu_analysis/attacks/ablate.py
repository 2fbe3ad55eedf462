"""Direction ablation: remove the direction unlearning adds to forget representations (Łucki et al. 2024,
arXiv 2409.18025, §5; the "junk direction" reading of RMU).

RMU pushes block l's forget representations toward c·u (arXiv 2408.06223, Eq. 1). If that push is mostly one
direction d, removing d at inference should give the knowledge back. d is the mean difference of block l's
outputs, unlearned − base, over forget texts (:func:`unlearning_direction`), or a given vector such as c·u.

:func:`ablate_direction` is a context manager that edits block l's output during forward passes and always removes
its hook: ``mode="project"`` removes the component along d (h − (h·d̂)d̂, directional ablation);
``mode="subtract"`` subtracts d itself (h − d, the exact inverse of a constant shift by d).
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from .. import hooks
from ..activations import capture
from ..evaluation import evaluate_mcq
from ..models import check_layer, hidden_size, resolve_tokenizer
from ..stats import paired_difference
from .common import (
    AttackRow, check_choice, check_positive_int, check_records, difference_row, interval_row, rows_frame,
)

__all__ = ["AblateConfig", "AblateResult", "ablate_direction", "unlearning_direction", "ablate_attack"]

MODES = ("project", "subtract")


@contextlib.contextmanager
def ablate_direction(model: nn.Module, layer: int, direction: Any, *, mode: str = "project") -> Iterator[None]:
    """Context manager: block ``layer``'s output h becomes ``h − (h·d̂)d̂`` (``mode="project"``) or ``h − d``
    (``"subtract"``) at every token, in every forward pass inside the block (:func:`rmu_analysis.hooks.edit`: every
    recorder of the block sees the ablated output; inside a :func:`~rmu_analysis.steer` it applies after the
    steering). Removed on exit and on exceptions."""
    check_choice(mode, "mode", MODES)
    idx = check_layer(model, layer)
    d = torch.as_tensor(direction).detach().float().reshape(-1)
    width = hidden_size(model)
    if d.numel() != width:
        raise ValueError(f"direction has {d.numel()} entries but the model's hidden size is {width}")
    if not torch.isfinite(d).all():
        raise ValueError("direction contains non-finite values (nan or inf)")
    norm = float(d.norm())
    if mode == "project" and norm == 0:
        raise ValueError("direction is the zero vector: there is nothing to project out")
    unit = d / norm if norm > 0 else d

    def ablated(h: torch.Tensor) -> torch.Tensor:
        hf = h.float()
        if mode == "project":
            u = unit.to(h.device)
            new = hf - (hf @ u)[..., None] * u
        else:
            new = hf - d.to(h.device)
        return new.to(h.dtype)

    with hooks.edit(model, idx, ablated):
        yield None


def unlearning_direction(base: nn.Module, unlearned: nn.Module, tokenizer: Any, texts: Sequence[str], layer: int, *,
                         batch_size: int = 16, max_length: int = 256, exclude_bos: bool = True) -> torch.Tensor:
    """Mean over forget tokens of block ``layer``'s output, unlearned − base (fp32, ``[d]``). Both models read the
    same tokens; padding (and BOS with ``exclude_bos``) is excluded."""
    texts = [t for t in (texts or []) if isinstance(t, str) and t.strip()]
    if not texts:
        raise ValueError("texts is empty: pass forget-topic texts to estimate the direction on")
    check_positive_int(batch_size, "batch_size")
    idx = check_layer(unlearned, layer)
    if check_layer(base, layer) != idx:  # pragma: no cover - same depth guarded below
        raise ValueError("base and unlearned models resolve the layer differently")
    tok = resolve_tokenizer(unlearned, tokenizer)
    total, count = None, 0
    for s in range(0, len(texts), batch_size):
        chunk = texts[s: s + batch_size]
        cu = capture(unlearned, chunk, idx, tokenizer=tok, exclude_bos=exclude_bos, max_length=max_length)
        cb = capture(base, chunk, idx, tokenizer=tok, exclude_bos=exclude_bos, max_length=max_length)
        mask = cu.token_mask.to(cu[idx].device)
        diff = (cu[idx].float() - cb[idx].float().to(cu[idx].device))[mask]
        total = diff.sum(0) if total is None else total + diff.sum(0)
        count += int(mask.sum())
    if count == 0:
        raise ValueError("no tokens counted (all texts are only BOS/padding?)")
    return (total / count).cpu()


@dataclass(frozen=True)
class AblateConfig:
    """Where and how to ablate. ``random_control``: also ablate a random Gaussian direction (seeded), the null
    baseline for recovery by merely damaging the block."""

    layer: int
    mode: str = "project"
    scoring: str = "letter"
    batch_size: int = 32
    random_control: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.layer, bool) or not isinstance(self.layer, int):
            raise ValueError(f"layer must be an int block index, got {self.layer!r}")
        check_choice(self.mode, "mode", MODES)
        check_choice(self.scoring, "scoring", ("letter", "cloze"))
        check_positive_int(self.batch_size, "batch_size")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class AblateResult:
    """Accuracy without and with the direction ablated (and with a random direction ablated, the control)."""

    config: AblateConfig
    method: str
    direction_norm: float
    clean: Any  # MCQResult
    ablated: Any  # MCQResult
    random: Any | None  # MCQResult
    recovered: Any  # PairedDifference: ablated - clean
    seconds: float

    def rows(self) -> tuple[AttackRow, ...]:
        s = f"block {self.config.layer}, {self.config.mode}"
        out = [interval_row(self.method, "ablate", s, "clean accuracy", self.clean.interval()),
               interval_row(self.method, "ablate", s, "ablated accuracy", self.ablated.interval(),
                            seconds=self.seconds),
               difference_row(self.method, "ablate", s, "recovered", self.recovered, seconds=self.seconds)]
        if self.random is not None:
            out.append(interval_row(self.method, "ablate", s, "random-direction accuracy", self.random.interval()))
        return tuple(out)

    def to_frame(self):
        return rows_frame(self.rows())


def ablate_attack(model: nn.Module, tokenizer: Any, records: Sequence[dict], direction: Any,
                  config: AblateConfig, *, subject: Any = None, method: str = "model", cluster_key: Any = None
                  ) -> AblateResult:
    """Evaluate ``records`` on ``model`` as is and with ``direction`` ablated at ``config.layer``; ``recovered``
    is the paired accuracy difference (ablated − clean)."""
    if not isinstance(config, AblateConfig):
        raise TypeError(f"config must be an AblateConfig, got {type(config).__name__}")
    recs = check_records(records)
    t0 = time.perf_counter()
    kw = dict(scoring=config.scoring, batch_size=config.batch_size, cluster_key=cluster_key)
    clean = evaluate_mcq(model, tokenizer, recs, subject, **kw)
    with ablate_direction(model, config.layer, direction, mode=config.mode):
        ablated = evaluate_mcq(model, tokenizer, recs, subject, **kw)
    seconds = time.perf_counter() - t0
    d = torch.as_tensor(direction).float().reshape(-1)
    random = None
    if config.random_control:
        g = torch.Generator().manual_seed(config.seed)
        r = torch.randn(d.numel(), generator=g)
        r = r / r.norm() * d.norm()
        with ablate_direction(model, config.layer, r, mode=config.mode):
            random = evaluate_mcq(model, tokenizer, recs, subject, **kw)
    recovered = paired_difference(ablated.correct, clean.correct, clean.clusters)
    return AblateResult(config=config, method=method, direction_norm=float(d.norm()), clean=clean, ablated=ablated,
                        random=random, recovered=recovered, seconds=seconds)
