"""Φ(g^(l:k)) of Eq. 8–9 (Fig. 1) on the mean forget representation, and the block calls it pushes through. (:mod:`rmu_analysis.theory`)"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from .. import hooks
from .._batching import Batch, position_ids_from_mask
from ..activations import bos_token_id, capture_batches, masked_mean
from ..models import check_layer, decoder_blocks, hidden_size, model_device, num_blocks
from ..steering import check_noise, check_vector, make_generator


@dataclass(frozen=True, eq=False)
class NoiseSensitivity:
    """Φ(g^(l:k)) of Eq. 9 for k = ``ks`` (all blocks after ``layer``, up to ``upto``), per noise draw.

    ``phi``: ``[samples, len(ks)]``; ``noise``: η of ξ ~ N(0, ηI) (None when explicit perturbations were given);
    ``h_norm``: ‖ĥ‖, the norm of the mean forget representation at block ``layer``.
    """

    layer: int
    ks: tuple[int, ...]
    phi: np.ndarray
    noise: float | None
    h_norm: float
    n_prompts: int

    @property
    def phi_mean(self) -> np.ndarray:
        return self.phi.mean(0)

    @property
    def phi_std(self) -> np.ndarray:
        return self.phi.std(0, ddof=1) if self.phi.shape[0] > 1 else np.zeros(len(self.ks))

    def to_frame(self) -> pd.DataFrame:
        """One row per k: ``layer``, ``k``, ``depth`` (k − layer), ``phi_mean``, ``phi_std``, ``samples``."""
        return pd.DataFrame({
            "layer": self.layer, "k": list(self.ks), "depth": [k - self.layer for k in self.ks],
            "phi_mean": self.phi_mean, "phi_std": self.phi_std, "samples": self.phi.shape[0],
        })


def mean_representation(
    model: nn.Module, prompts: Any, layer: int, *, tokenizer: Any = None, exclude_bos: bool = False,
    batch_size: int = 32, max_length: int | None = None,
) -> tuple[torch.Tensor, int]:
    """ĥ = mean over prompts of the token-mean block-``layer`` output (Eq. 9's dataset version), fp32 ``[d]``, and
    the number of prompts."""
    idx = check_layer(model, layer)
    total, count = None, 0
    for rows, cap in capture_batches(model, prompts, [idx], tokenizer=tokenizer, exclude_bos=exclude_bos,
                                     batch_size=batch_size, max_length=max_length):
        means = masked_mean(cap.hidden[idx], cap.token_mask).sum(0)
        total = means if total is None else total + means.to(total.device)
        count += len(rows)
    return total / count, count


def block_calls(model: nn.Module, ks: list[int]) -> dict[int, hooks.BlockCall]:
    """What blocks ``ks`` are called with (position embeddings, masks, ...) for a one-token sequence, recorded
    during a forward pass that stops after ``max(ks)``."""
    bos = bos_token_id(model)
    ids = torch.tensor([[0 if bos is None else int(bos)]], device=model_device(model))
    mask = torch.ones_like(ids)
    batch = Batch(ids, mask, position_ids_from_mask(mask))
    with torch.no_grad():
        return hooks.forward(model, batch.model_inputs(), calls=ks, stop_after=max(ks)).calls


def push_blocks(model: nn.Module, x: torch.Tensor, ks: list[int], calls: dict[int, hooks.BlockCall]
                ) -> dict[int, torch.Tensor]:
    """Push one-token states ``x`` ``[n, 1, d]`` through the consecutive blocks ``ks`` with the recorded calls;
    return each block's output ``{k: [n, d]}``. Rows are independent (batch = noise draws). Differentiable (the
    caller chooses the grad mode), so it runs inside ``torch.func`` transforms."""
    return {k: h[:, 0] for k, h in hooks.run_blocks(model, x, calls, ks).items()}


def noise_sensitivity(
    model: nn.Module,
    prompts: Any,
    layer: int,
    noise: Any,
    *,
    upto: int | None = None,
    samples: int = 1,
    seed: int | None = 0,
    generator: torch.Generator | None = None,
    tokenizer: Any = None,
    exclude_bos: bool = False,
    batch_size: int = 32,
    max_length: int | None = None,
) -> NoiseSensitivity:
    """Noise sensitivity Φ(g^(l:k)) = ‖g(ĥ + ξ) − g(ĥ)‖² / ‖g(ĥ)‖² (Eq. 8–9, Fig. 1) for every block k in
    (``layer``, ``upto``] (default: the last block), from one pass.

    ĥ is the mean over ``prompts`` (the forget set) of the token-mean output of block ``layer``. It is pushed,
    as a one-token sequence (the dataset version uses the single vector ĥ), through blocks layer+1 … upto,
    clean and perturbed together. ``noise``: η of ξ ~ N(0, ηI) (``samples`` draws from ``seed``/``generator``,
    CPU fp32), or explicit perturbations, a tensor ``[d]`` or ``[n, d]``.
    """
    idx = check_layer(model, layer)
    n = num_blocks(model)
    if idx == n - 1:
        raise ValueError(
            f"layer {layer} is the last of the model's {n} blocks (0–{n - 1}): Φ needs a block after it"
        )
    hi = n - 1 if upto is None else check_layer(model, upto, what="upto")
    if hi <= idx:
        raise ValueError(f"upto ({upto}) must be a block after layer {idx}: valid values are {idx + 1}–{n - 1}")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be a positive int, got {samples!r}")
    d = hidden_size(model)
    if isinstance(noise, (torch.Tensor, np.ndarray)) and np.ndim(noise) >= 1:
        xi = torch.as_tensor(noise)
        xi = xi.reshape(1, -1) if xi.dim() == 1 else xi
        if xi.dim() != 2:
            raise ValueError(f"explicit noise must have shape [d] or [n, d], got {tuple(xi.shape)}")
        xi = torch.stack([check_vector(row, d, name="noise") for row in xi])
        eta = None
    else:
        eta = check_noise(noise)
        gen = make_generator(None if generator is not None else seed, generator, what="noise")
        xi = (eta ** 0.5) * torch.randn(samples, d, generator=gen, dtype=torch.float32)

    h_hat, count = mean_representation(model, prompts, idx, tokenizer=tokenizer, exclude_bos=exclude_bos,
                                       batch_size=batch_size, max_length=max_length)
    ks = list(range(idx + 1, hi + 1))
    calls = block_calls(model, ks)
    p = next(decoder_blocks(model)[ks[0]].parameters())
    x = torch.cat([h_hat.cpu().unsqueeze(0), h_hat.cpu().unsqueeze(0) + xi.float()], dim=0)
    with torch.no_grad():
        outs = push_blocks(model, x.to(p.device, p.dtype).unsqueeze(1), ks, calls)
    phi = np.empty((xi.shape[0], len(ks)))
    for j, k in enumerate(ks):
        g = outs[k].float()
        clean, noisy = g[:1], g[1:]
        phi[:, j] = (((noisy - clean) ** 2).sum(-1) / (clean ** 2).sum(-1)).cpu().double().numpy()
    return NoiseSensitivity(layer=idx, ks=tuple(ks), phi=phi, noise=eta, h_norm=float(h_hat.norm()),
                            n_prompts=count)
