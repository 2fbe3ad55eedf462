"""Eq. 10–19's optimal coefficient, and C1's token confidence against c. (:mod:`rmu_analysis.theory`)"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..confidence import METRICS, measure_confidence
from ..models import check_layer, decoder_blocks, hidden_size, num_blocks
from ..steering import check_vector, steer
from .jacobian import _quiet_vmap_fallback
from .noise import block_calls, mean_representation, push_blocks


# ------------------------------------------------------------------------------------------------------------
# Eq. 10–19: the optimal coefficient
# ------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class OptimalCoefficient:
    """Eq. 19's c* beside the exact minimiser of Eq. 10, for noise at block ``layer`` and each k in ``ks``.

    Eq. 10: Φ_k(c) = ‖g^(l:k)(c·u + ε) − g^(l:k)(ĥ)‖² / ‖g^(l:k)(ĥ)‖² (ξ = c·u + ε − ĥ), evaluated exactly on
    ``coeffs`` (``phi``: ``[n_k, n_grid]``) and linearised at ĥ (``phi_linear``: ‖J ξ‖² / ‖g(ĥ)‖²).
    ``c_star``: (Ju)ᵀ J(ĥ − ε) / ‖Ju‖² per k (Eq. 19); ``c_grid``: the grid argmin of the exact Φ_k;
    ``phi_at_c_star``: the exact Φ_k at c*; ``cos_jac``: cos(Ju, J(ĥ − ε)); ``norm_ratio``: ‖J(ĥ − ε)‖ / ‖Ju‖
    (so c* = norm_ratio · cos_jac); ``cos_u_h``: cos(u, ĥ); ``h_norm``: ‖ĥ‖.
    """

    layer: int
    ks: tuple[int, ...]
    coeffs: np.ndarray
    phi: np.ndarray
    phi_linear: np.ndarray
    c_star: np.ndarray
    c_grid: np.ndarray
    phi_at_c_star: np.ndarray
    cos_jac: np.ndarray
    norm_ratio: np.ndarray
    cos_u_h: float
    h_norm: float
    n_prompts: int

    @property
    def phi_min(self) -> np.ndarray:
        """The grid minimum of the exact Φ_k."""
        return self.phi.min(axis=1)

    @property
    def rel_diff(self) -> np.ndarray:
        """|c* − c_grid| / |c_grid|: agreement of Eq. 19 with the exact minimiser (nan where c_grid = 0)."""
        den = np.where(self.c_grid == 0, np.nan, np.abs(self.c_grid))
        return np.abs(self.c_star - self.c_grid) / den

    @property
    def diff_over_norm(self) -> np.ndarray:
        """|c* − c_grid| / ‖ĥ‖: the disagreement in units of the representation's size (defined at c_grid = 0)."""
        return np.abs(self.c_star - self.c_grid) / self.h_norm

    @property
    def excess(self) -> np.ndarray:
        """Φ_k(c*) − min over the grid of Φ_k (≥ 0 up to the grid's resolution): what using Eq. 19 costs."""
        return self.phi_at_c_star - self.phi_min

    def to_frame(self) -> pd.DataFrame:
        """One row per k: c* (Eq. 19), the grid argmin, their disagreement, Φ at both, cosines."""
        return pd.DataFrame({
            "layer": self.layer, "k": list(self.ks), "c_star": self.c_star, "c_grid": self.c_grid,
            "rel_diff": self.rel_diff, "diff_over_norm": self.diff_over_norm, "phi_at_c_star": self.phi_at_c_star,
            "phi_min": self.phi_min, "excess": self.excess,
            "cos_jac": self.cos_jac, "norm_ratio": self.norm_ratio, "cos_u_h": self.cos_u_h,
            "h_norm": self.h_norm,
        })


def _check_ks(model: nn.Module, idx: int, ks: Any) -> list[int]:
    n = num_blocks(model)
    if idx == n - 1:
        raise ValueError(
            f"layer {idx} is the last of the model's {n} blocks (0–{n - 1}): g^(l:k) needs a block after it"
        )
    if ks is None:
        return list(range(idx + 1, n))
    out = sorted({check_layer(model, k, what="k") for k in np.atleast_1d(np.asarray(ks)).tolist()})
    bad = [k for k in out if k <= idx]
    if not out or bad:
        raise ValueError(f"ks {bad or list(ks)} must be blocks after layer {idx}: valid values are {idx + 1}–{n - 1}")
    return out


def optimal_coefficient(
    model: nn.Module,
    prompts: Any,
    layer: int,
    u: Any,
    ks: Any = None,
    *,
    eps: Any = None,
    coeffs: Any = None,
    tokenizer: Any = None,
    exclude_bos: bool = False,
    batch_size: int = 32,
    max_length: int | None = None,
    chunk_size: int | None = None,
) -> OptimalCoefficient:
    """Eq. 19 c* = (Ju)ᵀ J(ĥ − ε) / ‖Ju‖², J the Jacobian of g^(l:k) at ĥ, next to the argmin over ``coeffs`` of
    the exact Eq. 10 objective Φ_k(c) with ξ = c·u + ε − ĥ, for every k in ``ks`` (default: all later blocks).

    ĥ is the mean forget representation at block ``layer`` (as in :func:`noise_sensitivity`: the dataset
    version, pushed as a one-token sequence). ``eps``: the noise ε (``[d]``; None = 0). ``coeffs``: the grid
    (default 241 points on [−m, m], m = 2.5·max(‖ĥ‖, |c*|): c* may be negative).
    """
    idx = check_layer(model, layer)
    ks = _check_ks(model, idx, ks)
    d = hidden_size(model)
    u_vec = check_vector(u, d, name="u").float().cpu()
    eps_vec = torch.zeros(d) if eps is None else check_vector(eps, d, name="eps").float().cpu()
    h_hat, count = mean_representation(model, prompts, idx, tokenizer=tokenizer, exclude_bos=exclude_bos,
                                       batch_size=batch_size, max_length=max_length)
    h_hat = h_hat.float().cpu()
    chain = list(range(idx + 1, max(ks) + 1))
    calls = block_calls(model, chain)
    p = next(decoder_blocks(model)[chain[0]].parameters())

    def g(x: torch.Tensor) -> torch.Tensor:
        outs = push_blocks(model, x.to(p.dtype).reshape(1, 1, d), chain, calls)
        return torch.stack([outs[k][0].float() for k in ks])

    with _quiet_vmap_fallback():
        J = torch.func.jacrev(g, chunk_size=chunk_size)(h_hat.to(p.device)).detach().double().cpu()  # [n_k, d, d]
    Ju = J @ u_vec.double()
    Jv = J @ (h_hat - eps_vec).double()
    c_star = ((Ju * Jv).sum(-1) / (Ju * Ju).sum(-1)).numpy()
    cos_jac = ((Ju * Jv).sum(-1) / (Ju.norm(dim=-1) * Jv.norm(dim=-1))).numpy()
    norm_ratio = (Jv.norm(dim=-1) / Ju.norm(dim=-1)).numpy()

    if coeffs is None:
        top = 2.5 * max(float(h_hat.norm()), float(np.abs(c_star).max()))
        grid = np.linspace(-top, top, 241)
    else:
        grid = np.asarray(coeffs, dtype=float).ravel()
        if grid.size == 0 or not np.all(np.isfinite(grid)):
            raise ValueError("coeffs must be a non-empty grid of finite coefficients")
    every = np.concatenate([grid, c_star])
    x = torch.as_tensor(every, dtype=torch.float32)[:, None] * u_vec + eps_vec
    x = torch.cat([h_hat[None], x])
    with torch.no_grad():
        outs = push_blocks(model, x.to(p.device, p.dtype).unsqueeze(1), chain, calls)
    phi = np.empty((len(ks), len(every)))
    for j, k in enumerate(ks):
        out = outs[k].double().cpu()
        clean, moved = out[:1], out[1:]
        phi[j] = (((moved - clean) ** 2).sum(-1) / (clean ** 2).sum(-1)).numpy()
    g_clean = torch.stack([outs[k][0].double().cpu() for k in ks])
    xi_lin = torch.as_tensor(grid)[None, :, None] * Ju[:, None, :] - Jv[:, None, :]  # J(c·u + ε − ĥ)
    phi_linear = ((xi_lin ** 2).sum(-1) / (g_clean ** 2).sum(-1)[:, None]).numpy()
    n_grid = len(grid)
    phi_grid = phi[:, :n_grid]
    return OptimalCoefficient(
        layer=idx, ks=tuple(ks), coeffs=grid, phi=phi_grid, phi_linear=phi_linear, c_star=c_star,
        c_grid=grid[phi_grid.argmin(axis=1)], phi_at_c_star=phi[np.arange(len(ks)), n_grid + np.arange(len(ks))],
        cos_jac=cos_jac, norm_ratio=norm_ratio, cos_u_h=float(h_hat @ u_vec / (h_hat.norm() * u_vec.norm())),
        h_norm=float(h_hat.norm()), n_prompts=count,
    )


# ------------------------------------------------------------------------------------------------------------
# C1: token confidence against c
# ------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class ConfidenceSweep:
    """Token confidence of prompts whose block ``layer`` output is c·u + ε, for each c in ``coeffs``
    (``results[i]``: a :class:`~rmu_analysis.confidence.Confidence`), and of the unsteered model (``base``)."""

    layer: int
    coeffs: tuple[float, ...]
    noise: float
    results: tuple[Any, ...]
    base: Any

    def to_frame(self) -> pd.DataFrame:
        """One row per c (and a first row ``coeff=NaN, model="base"``): mean and std of each metric."""
        rows = []
        for name, c, res in [("base", float("nan"), self.base)] + [("steered", c, r) for c, r in
                                                                   zip(self.coeffs, self.results)]:
            row: dict[str, Any] = {"model": name, "coeff": c}
            for m in METRICS:
                v = res.values(m)
                row[f"{m}_mean"], row[f"{m}_std"] = float(v.mean()), float(v.std())
            rows.append(row)
        return pd.DataFrame(rows)


def confidence_vs_coeff(
    model: nn.Module,
    prompts: Any,
    layer: int,
    u: Any,
    coeffs: Any,
    *,
    noise: float = 0.0,
    seed: int = 0,
    positions: Any = None,
    generate: int = 0,
    tokenizer: Any = None,
    batch_size: int = 32,
) -> ConfidenceSweep:
    """MaxLogit, max probability and entropy (C1) of ``prompts`` when block ``layer``'s output is set to
    c·u + ε (ε ~ N(0, ``noise``·I), :func:`~rmu_analysis.steering.steer`) for each c in ``coeffs``, beside the
    unsteered model. ``generate=k`` measures k greedy tokens (steered throughout), else the next token."""
    values = [float(c) for c in np.atleast_1d(np.asarray(coeffs, dtype=float))]
    if not values or not all(math.isfinite(c) for c in values):
        raise ValueError(f"coeffs must be a non-empty list of finite coefficients, got {coeffs!r}")
    idx = check_layer(model, layer)
    kw = dict(tokenizer=tokenizer, generate=generate, batch_size=batch_size)
    base = measure_confidence(model, prompts, **kw)
    results = []
    for c in values:
        with steer(model, idx, u, coeff=c, noise=noise, seed=seed if noise > 0 else None, positions=positions):
            results.append(measure_confidence(model, prompts, **kw))
    return ConfidenceSweep(layer=idx, coeffs=tuple(values), noise=float(noise), results=tuple(results), base=base)
