"""Helpers shared by the mechanism measures: unit vectors, text lists, block-l token states, bootstrap intervals."""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from ..activations import capture_batches
from ..stats import Interval
from ..steering import check_vector


# ------------------------------------------------------------------------------------------------ helpers
def _unit(u: Any, d: int, name: str = "u") -> torch.Tensor:
    v = check_vector(u, d, name=name).float().cpu()
    n = float(v.norm())
    if n == 0.0:
        raise ValueError(f"{name} is the zero vector: a direction needs a non-zero norm")
    return v / n


def _check_coeff(coeff: Any) -> float:
    try:
        c = float(coeff)
    except (TypeError, ValueError):
        raise TypeError(f"coeff must be a number (the steering coefficient c), got {type(coeff).__name__}")
    if not math.isfinite(c) or c == 0.0:
        raise ValueError(f"coeff must be a finite non-zero number (the steering coefficient c), got {coeff!r}")
    return c


def _texts(prompts: Any, name: str = "prompts") -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    out = list(prompts)
    if len(out) < 2:
        raise ValueError(f"{name} needs at least 2 texts (intervals are over texts), got {len(out)}")
    if not all(isinstance(p, str) for p in out):
        raise TypeError(f"{name} must be a list of strings")
    return out


def _token_states(model: nn.Module, texts: list[str], layer: int, tokenizer: Any, exclude_bos: bool,
                  batch_size: int, max_length: int | None) -> tuple[torch.Tensor, np.ndarray]:
    """Block-``layer`` outputs at the counted tokens ``[N, d]`` (fp32, CPU) and each token's text index."""
    parts, owner = [], []
    for rows, cap in capture_batches(model, texts, [layer], tokenizer=tokenizer, exclude_bos=exclude_bos,
                                     batch_size=batch_size, max_length=max_length):
        parts.append(cap.tokens(layer).cpu())
        owner.append(cap.token_mask.nonzero().cpu()[:, 0].numpy() + rows.start)
    return torch.cat(parts), np.concatenate(owner)


def _per_text_mean(values: np.ndarray, owner: np.ndarray, n: int) -> np.ndarray:
    return np.bincount(owner, weights=values, minlength=n) / np.maximum(np.bincount(owner, minlength=n), 1)


def bootstrap_interval(estimate: float, boot: np.ndarray, n: int, level: float = 0.95, *, basic: bool = False
                       ) -> Interval:
    """An :class:`~rmu_analysis.stats.Interval` from bootstrap replicates (NaN replicates dropped): percentiles, or
    with ``basic`` the basic (reverse-percentile) interval [2θ̂ − q_hi, 2θ̂ − q_lo], which corrects the first-order
    bias of statistics such as a norm of a noisy mean (its replicates sit above the estimate)."""
    boot = np.asarray(boot, float)
    boot = boot[np.isfinite(boot)]
    method = "basic-bootstrap" if basic else "bootstrap"
    if boot.size == 0:
        return Interval(float(estimate), float("nan"), float("nan"), n, n, method, level)
    lo, hi = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])
    if basic:
        lo, hi = 2 * estimate - hi, 2 * estimate - lo
    return Interval(float(estimate), float(lo), float(hi), n, n, method, level)


def _boot_counts(n: int, n_boot: int, seed: int) -> np.ndarray:
    """``[n_boot, n]`` resampling counts (each row: n draws with replacement)."""
    if n_boot < 1:
        raise ValueError(f"n_boot must be a positive int, got {n_boot!r}")
    return np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(float)

def _rowwise_corr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(-1, keepdims=True)
    b = b - b.mean(-1, keepdims=True)
    return (a * b).sum(-1) / np.sqrt((a * a).sum(-1) * (b * b).sum(-1))
