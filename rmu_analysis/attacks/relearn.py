"""Relearning: a few fine-tuning steps on a small slice of forget-topic text (Łucki et al. 2024, arXiv 2409.18025).

Łucki et al. find that a few steps on forget-domain text whose facts are *not* the evaluated ones — or even on
unrelated text — restore much of an RMU model's hazardous accuracy. :func:`relearn` fine-tunes the model with
next-token loss on ``texts`` and evaluates the questions at given step checkpoints; :func:`relearn_attack` does it
on forget-topic text and, as the control, on retain/unrelated text.

The caller's model is never left changed: the tensors being trained are saved (on the CPU) before the first step
and put back afterwards, also on an error (:func:`trained_copy_restored`); the result holds the curve, not a model.
Dropout stays off (the model runs in eval mode), so runs are deterministic for a given seed.
"""
from __future__ import annotations

import contextlib
import re
import time
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from ..evaluation import evaluate_mcq
from ..models import ensure_pad_token, model_device, resolve_tokenizer
from .common import AttackRow, check_choice, check_positive_int, check_records, rows_frame

__all__ = ["RelearnConfig", "RelearnResult", "relearn", "relearn_attack", "trained_copy_restored", "lm_loss"]


@dataclass(frozen=True)
class RelearnConfig:
    """Fine-tuning budget. Defaults are sized for the CPU organism (for a 7B model use ``lr`` ≈ 1e-5).
    ``checkpoints``: steps after which the questions are evaluated (0 = before any step); the run lasts
    ``max(checkpoints)`` steps. ``params``: regex on parameter names selecting what is trained (None: all).
    ``scoring``: how the questions are scored (``"letter"`` or ``"cloze"``, as in ``evaluate_mcq``)."""

    checkpoints: tuple[int, ...] = (0, 1, 2, 5, 10, 20)
    lr: float = 1e-4
    batch_size: int = 4
    max_length: int = 128
    params: str | None = None
    weight_decay: float = 0.0
    scoring: str = "letter"
    eval_batch_size: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        cps = tuple(self.checkpoints)
        if not cps or any(isinstance(c, bool) or not isinstance(c, (int, np.integer)) or c < 0 for c in cps):
            raise ValueError(f"checkpoints must be non-negative step counts, e.g. (0, 5, 10), got {self.checkpoints!r}")
        object.__setattr__(self, "checkpoints", tuple(sorted({int(c) for c in cps})))
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        check_positive_int(self.batch_size, "batch_size")
        check_positive_int(self.max_length, "max_length", minimum=2)
        check_positive_int(self.eval_batch_size, "eval_batch_size")
        check_choice(self.scoring, "scoring", ("letter", "cloze"))
        if self.params is not None:
            re.compile(self.params)

    @property
    def steps(self) -> int:
        return max(self.checkpoints)

    def to_dict(self) -> dict:
        return asdict(self)


@contextlib.contextmanager
def trained_copy_restored(model: nn.Module, params: str | None = None) -> Iterator[list[nn.Parameter]]:
    """Yield the parameters selected by ``params`` (regex on names; None: all) with ``requires_grad=True``; on
    exit — also on an error — put back their values (saved on the CPU), ``requires_grad`` flags, ``.grad`` and the
    training flag, so the caller's model is what it was."""
    named = list(model.named_parameters())
    chosen = [(n, p) for n, p in named if params is None or re.search(params, n)]
    if not chosen:
        raise ValueError(f"params={params!r} matches no parameter name (e.g. {named[0][0] if named else '-'}): "
                         "pass a regex such as r'mlp\\.down_proj'")
    saved = {n: p.detach().to("cpu", copy=True) for n, p in chosen}
    flags = {n: p.requires_grad for n, p in named}
    grads = {n: p.grad for n, p in named}
    was_training = model.training
    try:
        for n, p in named:
            p.requires_grad_(any(n == c for c, _ in chosen))
        yield [p for _, p in chosen]
    finally:
        with torch.no_grad():
            for n, p in chosen:
                p.copy_(saved[n].to(p.device))
        for n, p in named:
            p.requires_grad_(flags[n])
            p.grad = grads[n]
        model.train(was_training)


def _batches(tokenizer, texts: Sequence[str], max_length: int, device) -> dict[str, torch.Tensor]:
    enc = tokenizer(list(texts), return_tensors="pt", padding=True, truncation=True, max_length=max_length)
    ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0),
            "labels": labels}


def lm_loss(model: nn.Module, tokenizer, texts: Sequence[str], *, max_length: int = 128, batch_size: int = 16
            ) -> float:
    """Mean next-token loss (nats per predicted token, padding excluded) of ``model`` on ``texts``."""
    device = model_device(model)
    total, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(texts), batch_size):
            b = _batches(tokenizer, texts[s: s + batch_size], max_length, device)
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                           position_ids=b["position_ids"]).logits[:, :-1].float()
            labels = b["labels"][:, 1:]
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="sum")
            total += float(nll)
            count += int((labels != -100).sum())
    return total / max(count, 1)


@dataclass(frozen=True)
class RelearnResult:
    """Accuracy (and LM loss on the training texts) after each checkpoint step of one relearning run.

    ``curve``: one dict per checkpoint — ``step``, ``accuracy``, ``low``, ``high`` (interval), ``lm_loss``,
    ``seconds`` (training time so far). ``correct``: step -> per-question booleans. ``setting``: what the texts
    were (``"forget text"``, ``"retain text"`` ...)."""

    config: RelearnConfig
    method: str
    setting: str
    curve: tuple[dict, ...]
    correct: dict[int, np.ndarray]
    n_texts: int
    seconds: float

    def curve_frame(self):
        import pandas as pd

        frame = pd.DataFrame(list(self.curve))
        frame.insert(0, "setting", self.setting)
        frame.insert(0, "method", self.method)
        return frame

    def rows(self) -> tuple[AttackRow, ...]:
        return tuple(AttackRow(self.method, "relearn", self.setting, "accuracy", c["accuracy"], c["low"], c["high"],
                               c["n"], c["step"], c["seconds"]) for c in self.curve)

    def to_frame(self):
        return rows_frame(self.rows())


def relearn(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    records: Sequence[dict],
    config: RelearnConfig | None = None,
    *,
    subject: Any = None,
    method: str = "model",
    setting: str = "forget text",
    cluster_key: Any = None,
) -> RelearnResult:
    """Fine-tune ``model`` on ``texts`` (AdamW, next-token loss, batches of ``config.batch_size`` drawn in a seeded
    order and cycled) and evaluate ``records`` at ``config.checkpoints``. ``texts`` should not state the facts the
    questions ask about. The model is restored afterwards (:func:`trained_copy_restored`)."""
    config = RelearnConfig() if config is None else config
    if not isinstance(config, RelearnConfig):
        raise TypeError(f"config must be a RelearnConfig, got {type(config).__name__}")
    texts = [t for t in (texts or []) if isinstance(t, str) and t.strip()]
    if not texts:
        raise ValueError("texts is empty: pass at least one non-empty training text")
    recs = check_records(records)
    tokenizer = resolve_tokenizer(model, tokenizer)
    ensure_pad_token(tokenizer)
    device = model_device(model)
    rng = np.random.default_rng(config.seed)
    order = np.concatenate([rng.permutation(len(texts)) for _ in range(
        -(-config.steps * config.batch_size // len(texts)) + 1)])
    curve: list[dict] = []
    correct: dict[int, np.ndarray] = {}
    train_seconds = 0.0
    t_start = time.perf_counter()

    def checkpoint(step: int) -> None:
        model.eval()
        res = evaluate_mcq(model, tokenizer, recs, subject, scoring=config.scoring,
                           batch_size=config.eval_batch_size, cluster_key=cluster_key)
        ci = res.interval()
        correct[step] = res.correct.copy()
        curve.append({"step": step, "accuracy": ci.estimate, "low": ci.low, "high": ci.high, "n": res.n,
                      "lm_loss": lm_loss(model, tokenizer, texts, max_length=config.max_length),
                      "seconds": train_seconds})

    with trained_copy_restored(model, config.params) as params:
        model.eval()  # dropout off: deterministic
        opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        if 0 in config.checkpoints:
            checkpoint(0)
        for step in range(1, config.steps + 1):
            t0 = time.perf_counter()
            idx = order[(step - 1) * config.batch_size: step * config.batch_size]
            b = _batches(tokenizer, [texts[i] for i in idx], config.max_length, device)
            with torch.enable_grad():
                out = model(**b)
                loss = out.loss
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"relearning loss is {float(loss.detach())} at step {step}: lower lr "
                                             f"(now {config.lr})")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            train_seconds += time.perf_counter() - t0
            if step in config.checkpoints:
                checkpoint(step)
        opt.zero_grad(set_to_none=True)
    return RelearnResult(config=config, method=method, setting=setting, curve=tuple(curve), correct=correct,
                         n_texts=len(texts), seconds=time.perf_counter() - t_start)


@dataclass(frozen=True)
class RelearnReport:
    """Relearning on forget-topic text and, as the control, on retain/unrelated text (:func:`relearn_attack`)."""

    forget: RelearnResult
    control: RelearnResult | None

    def rows(self) -> tuple[AttackRow, ...]:
        return self.forget.rows() + (self.control.rows() if self.control is not None else ())

    def to_frame(self):
        return rows_frame(self.rows())

    def curve_frame(self):
        import pandas as pd

        parts = [self.forget.curve_frame()] + ([self.control.curve_frame()] if self.control is not None else [])
        return pd.concat(parts, ignore_index=True)


def relearn_attack(model: nn.Module, tokenizer: Any, forget_texts: Sequence[str], records: Sequence[dict],
                   config: RelearnConfig | None = None, *, control_texts: Sequence[str] | None = None,
                   **kwargs) -> RelearnReport:
    """:func:`relearn` on ``forget_texts`` and (when given) on ``control_texts`` with the same budget and seed."""
    f = relearn(model, tokenizer, forget_texts, records, config, setting="forget text", **kwargs)
    c = None
    if control_texts is not None:
        c = relearn(model, tokenizer, control_texts, records, config, setting="retain text", **kwargs)
    return RelearnReport(forget=f, control=c)
