"""Noise sensitivity with noise at every token (Eq. 8–9, C4) and the optimal coefficient on real prompts (Eq. 10–19)
(:mod:`rmu_analysis.mechanism`)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy import stats as sps
from torch import nn

from .. import hooks
from .._batching import iter_batches
from ..activations import bos_token_id, token_mask
from ..models import check_layer, hidden_size, num_blocks, resolve_tokenizer
from ..stats import Interval, finite_mean_interval
from ..steering import make_generator
from ._common import _boot_counts, _rowwise_corr, _texts, _unit, bootstrap_interval


# ------------------------------------------------------------------------- Φ at every token position (C4)
def _check_ks(model: nn.Module, idx: int, upto: int | None) -> list[int]:
    n = num_blocks(model)
    if idx >= n - 1:
        raise ValueError(f"layer {idx} is the last of the model's {n} blocks (0–{n - 1}): Φ needs a block after it")
    hi = n - 1 if upto is None else check_layer(model, upto, what="upto")
    if hi <= idx:
        raise ValueError(f"upto ({upto}) must be a block after layer {idx}: valid values are {idx + 1}–{n - 1}")
    return list(range(idx + 1, hi + 1))


def _batches_with_calls(model: nn.Module, texts: list[str], idx: int, ks: list[int], tok: Any, exclude_bos: bool,
                        batch_size: int, max_length: int | None):
    """Per batch: (rows, counted-token mask [B, T], block-``idx`` output, clean outputs {k}, recorded calls {k})."""
    bos = bos_token_id(model, tok) if exclude_bos else None
    for rows, batch in iter_batches(model, texts, tok, batch_size=batch_size, max_length=max_length):
        with torch.no_grad():
            rec = hooks.forward(model, batch.model_inputs(), [idx] + ks, calls=ks, stop_after=max(ks))
        mask = token_mask(batch, exclude_bos=exclude_bos, bos_token_id=bos)
        yield rows, mask, rec.outputs[idx], {k: rec.outputs[k] for k in ks}, rec.calls


def _check_scale(scale: str) -> None:
    if scale not in ("relative", "absolute"):
        raise ValueError(f'scale must be "relative" (noise std ∝ each token\'s norm) or "absolute" (variance η), '
                         f"got {scale!r}")


def _noise(h: torch.Tensor, mask: torch.Tensor, level: float, scale: str, gen: torch.Generator) -> torch.Tensor:
    """ξ at the counted tokens: ‖ξ_t‖ ≈ level·‖h_t‖ (``relative``) or ξ_t ~ N(0, level·I) (``absolute``)."""
    B, T, d = h.shape
    z = torch.randn(B, T, d, generator=gen, dtype=torch.float32).to(h.device)
    if scale == "relative":
        std = level * h.float().norm(dim=-1, keepdim=True) / math.sqrt(d)
    else:
        std = torch.full((B, T, 1), math.sqrt(level), device=h.device)
    return z * std * mask.to(h.device).unsqueeze(-1).float()


def _phi_tokens(out: torch.Tensor, clean: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per prompt: mean over counted tokens of ‖out − clean‖² / ‖clean‖²  ``[B]``."""
    num = ((out.float() - clean.float()) ** 2).sum(-1)
    den = (clean.float() ** 2).sum(-1).clamp_min(1e-30)
    m = mask.to(out.device).float()
    return ((num / den) * m).sum(-1) / m.sum(-1).clamp_min(1)


@dataclass(frozen=True, eq=False)
class DepthTrend:
    """Does Φ(g^(l:k)) fall with depth k (C4, Fig. 1)? ``rho``: Spearman ρ(k, mean Φ_k) with a bootstrap interval
    over prompts; ``first_minus_last``: the paired per-prompt difference Φ_first − Φ_last (t interval) and its
    two-sided ``wilcoxon_p`` (signed-rank) and ``t_p`` (paired t). ``decreases``: ρ's interval is below 0 AND
    first − last's interval is above 0."""

    rho: Interval
    first_minus_last: Interval
    wilcoxon_p: float
    t_p: float
    first_k: int
    last_k: int

    @property
    def decreases(self) -> bool:
        return bool(self.rho.high < 0 and self.first_minus_last.low > 0)

    def to_dict(self) -> dict[str, Any]:
        return {"rho": self.rho.estimate, "rho_low": self.rho.low, "rho_high": self.rho.high,
                "first_minus_last": self.first_minus_last.estimate, "fml_low": self.first_minus_last.low,
                "fml_high": self.first_minus_last.high, "wilcoxon_p": self.wilcoxon_p, "t_p": self.t_p,
                "first_k": self.first_k, "last_k": self.last_k, "decreases": self.decreases}


def _spearman_rows(ks: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """Spearman ρ between ``ks`` and each row of ``Y`` ``[B, n_k]`` (NaN for a constant row)."""
    rk = sps.rankdata(ks)
    ry = sps.rankdata(Y, axis=1)
    return _rowwise_corr(ry, np.broadcast_to(rk, ry.shape).copy())


def depth_trend(ks: Any, per_prompt: Any, *, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> DepthTrend:
    """:class:`DepthTrend` from per-prompt Φ values ``per_prompt`` ``[n_prompts, n_k]`` at blocks ``ks`` (≥ 2 blocks,
    ≥ 2 prompts): bootstrap over prompts for ρ, paired tests for the first vs the last block."""
    ks = np.asarray(ks, float)
    P = np.asarray(per_prompt, float)
    if P.ndim != 2 or P.shape[1] != ks.size:
        raise ValueError(f"per_prompt must be [n_prompts, len(ks)] = [n, {ks.size}], got shape {P.shape}")
    if ks.size < 2 or P.shape[0] < 2:
        raise ValueError("a depth trend needs at least 2 blocks and 2 prompts")
    n = P.shape[0]
    W = _boot_counts(n, n_boot, seed)
    rho = bootstrap_interval(float(_spearman_rows(ks, P.mean(0)[None])[0]), _spearman_rows(ks, W @ P / n), n, level)
    diff = P[:, 0] - P[:, -1]
    fml = finite_mean_interval(diff, level)
    w_p = float(sps.wilcoxon(diff).pvalue) if np.any(diff != 0) else 1.0
    t_p = float(sps.ttest_1samp(diff, 0.0).pvalue) if np.std(diff) > 0 else float("nan")
    return DepthTrend(rho=rho, first_minus_last=fml, wilcoxon_p=w_p, t_p=t_p, first_k=int(ks[0]), last_k=int(ks[-1]))


@dataclass(frozen=True, eq=False)
class TokenNoiseSensitivity:
    """Φ(g^(l:k)) (Eq. 8) of real prompts with noise at every counted token: ``phi`` ``[samples, n_prompts, n_k]``
    (per draw, per prompt: mean over its counted tokens of ‖g(h + ξ) − g(h)‖² / ‖g(h)‖²). ``noise``: the level
    (relative: ‖ξ_t‖ ≈ noise·‖h_t‖; absolute: ξ_t ~ N(0, noise·I)); ``scale``: which."""

    layer: int
    ks: tuple[int, ...]
    phi: np.ndarray
    noise: float
    scale: str

    @property
    def per_prompt(self) -> np.ndarray:
        """``[n_prompts, n_k]``: each prompt's Φ averaged over the draws (prompts are the units of the intervals)."""
        return self.phi.mean(0)

    def to_frame(self, level: float = 0.95) -> pd.DataFrame:
        """One row per k: ``layer``, ``k``, ``depth``, Φ's mean over prompts with a t interval, ``n_prompts``."""
        rows = []
        for j, k in enumerate(self.ks):
            ci = finite_mean_interval(self.per_prompt[:, j], level)
            rows.append({"layer": self.layer, "k": k, "depth": k - self.layer, "phi": ci.estimate, "low": ci.low,
                         "high": ci.high, "n_prompts": self.phi.shape[1], "samples": self.phi.shape[0]})
        return pd.DataFrame(rows)

    def trend(self, *, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> DepthTrend:
        """C4's verdict: :func:`depth_trend` on :attr:`per_prompt`."""
        return depth_trend(self.ks, self.per_prompt, n_boot=n_boot, seed=seed, level=level)


def token_noise_sensitivity(
    model: nn.Module,
    tokenizer: Any,
    prompts: Any,
    layer: int,
    noise: float = 0.1,
    *,
    scale: str = "relative",
    upto: int | None = None,
    samples: int = 8,
    seed: int = 0,
    exclude_bos: bool = True,
    batch_size: int = 16,
    max_length: int | None = None,
) -> TokenNoiseSensitivity:
    """Noise sensitivity Φ(g^(l:k), x) (Eq. 8, C4, Fig. 1) of each prompt, for every block k in (``layer``,
    ``upto``], with independent noise ξ at EVERY counted token of the real prompt (not one mean vector pushed as a
    one-token sequence, as :func:`~rmu_analysis.theory.noise_sensitivity` does). The blocks after ``layer`` run on
    h + ξ with the calls recorded from the clean pass (positions, masks), so attention mixes the noise of all
    tokens as it does in the model.

    ``scale="relative"`` (default): ‖ξ_t‖ ≈ ``noise``·‖h_t‖ — RMSNorm makes each block's update depend on its
    input's direction only, so an absolute η means different things at different depths and tokens;
    ``"absolute"``: ξ_t ~ N(0, ``noise``·I) (the paper's η). ``samples`` draws from ``seed``."""
    idx = check_layer(model, layer)
    ks = _check_ks(model, idx, upto)
    _check_scale(scale)
    if not math.isfinite(float(noise)) or float(noise) <= 0:
        raise ValueError(f"noise must be a positive finite level, got {noise!r}")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be a positive int, got {samples!r}")
    texts = _texts(prompts)
    tok = resolve_tokenizer(model, tokenizer)
    gen = make_generator(seed, what="noise")
    phi = np.empty((samples, len(texts), len(ks)))
    for rows, mask, h, clean, calls in _batches_with_calls(model, texts, idx, ks, tok, exclude_bos, batch_size,
                                                           max_length):
        for s in range(samples):
            xi = _noise(h, mask, float(noise), scale, gen)
            with torch.no_grad():
                outs = hooks.run_blocks(model, h + xi.to(h.dtype), calls, ks)
            for j, k in enumerate(ks):
                phi[s, rows.start:rows.stop, j] = _phi_tokens(outs[k], clean[k], mask).cpu().double().numpy()
    return TokenNoiseSensitivity(layer=idx, ks=tuple(ks), phi=phi, noise=float(noise), scale=scale)


# --------------------------------------------------------------------------- Eq. 10–19 on real prompts
@dataclass(frozen=True, eq=False)
class TokenOptimalCoefficient:
    """Eq. 10 on real prompts: Φ_k(c) with every counted token's block-l state replaced by c·u + ε_t.

    ``phi`` ``[n_prompts, n_k, n_grid]``: per prompt (mean over draws and counted tokens) ‖g_k(c·u + ε) − g_k(h)‖²
    / ‖g_k(h)‖²; ``phi_direction``: the same on unit vectors, ‖ĝ_k(c·u + ε) − ĝ_k(h)‖² with ĝ = g / ‖g‖ per token
    (blind to scale, as the final RMSNorm and W are). ``num`` / ``den`` ``[n_prompts, n_k]``: Eq. 19's
    (Ju)ᵀ J(h − ε) and ‖Ju‖² per prompt (token-weighted by 1 / ‖g_k(h)‖², J by central differences), so
    c* = Σ num / Σ den. ``coeffs``: the grid."""

    layer: int
    ks: tuple[int, ...]
    coeffs: np.ndarray
    phi: np.ndarray
    phi_direction: np.ndarray
    num: np.ndarray
    den: np.ndarray
    noise: float

    @property
    def c_star(self) -> np.ndarray:
        """Eq. 19's linearised c* per k (pooled over prompts)."""
        return self.num.sum(0) / self.den.sum(0)

    @property
    def c_grid(self) -> np.ndarray:
        """The grid argmin of the mean Φ_k(c) per k."""
        return self.coeffs[self.phi.mean(0).argmin(-1)]

    @property
    def c_grid_direction(self) -> np.ndarray:
        """The grid argmin of the mean scale-free Φ_k(c) per k."""
        return self.coeffs[self.phi_direction.mean(0).argmin(-1)]

    @property
    def at_smallest(self) -> np.ndarray:
        """Per k: the raw minimiser is the grid's smallest |c| (c → 0)."""
        return self.c_grid == self.coeffs[np.abs(self.coeffs).argmin()]

    @property
    def zero_only_by_scale(self) -> np.ndarray:
        """Per k: the raw minimiser sits at c → 0 but the scale-free one does not — the c → 0 minimum comes from
        RMSNorm's scale invariance (a tiny c·u + ε still drives full-size block updates), not from the direction."""
        smallest = self.coeffs[np.abs(self.coeffs).argmin()]
        return self.at_smallest & (self.c_grid_direction != smallest)

    def to_frame(self, *, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> pd.DataFrame:
        """One row per k: c* (Eq. 19), the raw and scale-free grid argmins, each with a bootstrap interval over
        prompts, and the c → 0 flags."""
        n = self.phi.shape[0]
        W = _boot_counts(n, n_boot, seed)
        c_star_b = (W @ self.num) / (W @ self.den)  # [n_boot, n_k]
        mean_b = np.einsum("bn,nkg->bkg", W, self.phi) / n
        dir_b = np.einsum("bn,nkg->bkg", W, self.phi_direction) / n
        grid_b, gdir_b = self.coeffs[mean_b.argmin(-1)], self.coeffs[dir_b.argmin(-1)]
        rows = []
        for j, k in enumerate(self.ks):
            cs = bootstrap_interval(self.c_star[j], c_star_b[:, j], n, level)
            cg = bootstrap_interval(self.c_grid[j], grid_b[:, j], n, level)
            cd = bootstrap_interval(self.c_grid_direction[j], gdir_b[:, j], n, level)
            rows.append({"layer": self.layer, "k": k, "c_star": cs.estimate, "c_star_low": cs.low,
                         "c_star_high": cs.high, "c_grid": cg.estimate, "c_grid_low": cg.low, "c_grid_high": cg.high,
                         "c_grid_direction": cd.estimate, "c_dir_low": cd.low, "c_dir_high": cd.high,
                         "phi_min": float(self.phi.mean(0)[j].min()), "at_smallest": bool(self.at_smallest[j]),
                         "zero_only_by_scale": bool(self.zero_only_by_scale[j]), "n_prompts": n})
        return pd.DataFrame(rows)


def token_optimal_coefficient(
    model: nn.Module,
    tokenizer: Any,
    prompts: Any,
    layer: int,
    u: Any,
    *,
    upto: int | None = None,
    coeffs: Any = None,
    noise: float = 0.0,
    samples: int = 1,
    seed: int = 0,
    fd_step: float = 1e-2,
    exclude_bos: bool = True,
    batch_size: int = 16,
    max_length: int | None = None,
) -> TokenOptimalCoefficient:
    """Eq. 10–19 on real forget ``prompts`` with noise at every counted token: Φ_k(c) for ξ_t = c·u + ε_t − h_t
    on the grid ``coeffs`` (default: 31 points from 1/20 to 3 × the mean counted-token norm at block ``layer``),
    its scale-free version, and Eq. 19's c* = (Ju)ᵀ J(h − ε) / ‖Ju‖² with J the Jacobian of the whole sequence
    (central differences with relative step ``fd_step``). ε_t: relative noise, ‖ε_t‖ ≈ ``noise``·‖h_t‖ (0: none),
    ``samples`` draws from ``seed``. Report with :meth:`TokenOptimalCoefficient.to_frame`."""
    idx = check_layer(model, layer)
    ks = _check_ks(model, idx, upto)
    d = hidden_size(model)
    uu = _unit(u, d)
    if not math.isfinite(float(noise)) or float(noise) < 0:
        raise ValueError(f"noise must be a finite level ≥ 0, got {noise!r}")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be a positive int, got {samples!r}")
    if not 0 < fd_step < 1:
        raise ValueError(f"fd_step must be in (0, 1), got {fd_step!r}")
    texts = _texts(prompts)
    tok = resolve_tokenizer(model, tokenizer)
    batches = list(_batches_with_calls(model, texts, idx, ks, tok, exclude_bos, batch_size, max_length))
    if coeffs is None:
        norms = torch.cat([h[m.to(h.device)].float().norm(dim=-1).cpu() for _, m, h, _, _ in batches])
        top = float(norms.mean())
        grid = np.linspace(top / 20, 3 * top, 31)
    else:
        grid = np.asarray(coeffs, float).ravel()
        if grid.size < 2 or not np.all(np.isfinite(grid)):
            raise ValueError("coeffs must be a grid of at least 2 finite coefficients")
    gen = make_generator(seed, what="noise")
    nk, ng = len(ks), grid.size
    phi = np.zeros((len(texts), nk, ng))
    phid = np.zeros_like(phi)
    num = np.zeros((len(texts), nk))
    den = np.zeros_like(num)
    for rows, mask, h, clean, calls in batches:
        sl = slice(rows.start, rows.stop)
        m3 = mask.to(h.device).unsqueeze(-1)
        cm = mask.to(h.device).float()
        n_tok = cm.sum(-1).clamp_min(1)
        U = (uu.to(h.device, torch.float32) * m3).to(h.dtype)
        w = {k: 1.0 / (clean[k].float() ** 2).sum(-1).clamp_min(1e-30) for k in ks}
        unit_clean = {k: clean[k].float() / clean[k].float().norm(dim=-1, keepdim=True).clamp_min(1e-30) for k in ks}
        step_u = fd_step * float(h.float().norm(dim=-1)[mask.to(h.device)].mean())
        for _ in range(samples):
            eps = _noise(h, mask, float(noise), "relative", gen) if noise > 0 else torch.zeros_like(h, dtype=torch.float32)
            with torch.no_grad():
                for gi, c in enumerate(grid):
                    x = torch.where(m3, c * U.float() + eps, h.float()).to(h.dtype)
                    outs = hooks.run_blocks(model, x, calls, ks)
                    for j, k in enumerate(ks):
                        phi[sl, j, gi] += _phi_tokens(outs[k], clean[k], mask).cpu().double().numpy() / samples
                        o = outs[k].float()
                        od = o / o.norm(dim=-1, keepdim=True).clamp_min(1e-30)
                        dd = ((od - unit_clean[k]) ** 2).sum(-1)
                        phid[sl, j, gi] += ((dd * cm).sum(-1) / n_tok).cpu().double().numpy() / samples
                V = ((h.float() - eps) * m3).to(h.dtype)
                jv = {}
                for name, vec, step in (("u", U, step_u), ("v", V, fd_step)):
                    plus = hooks.run_blocks(model, h + step * vec, calls, ks)
                    minus = hooks.run_blocks(model, h - step * vec, calls, ks)
                    jv[name] = {k: (plus[k].float() - minus[k].float()) / (2 * step) for k in ks}
                for j, k in enumerate(ks):
                    a = (jv["u"][k] * jv["v"][k]).sum(-1) * w[k]
                    b = (jv["u"][k] ** 2).sum(-1) * w[k]
                    num[sl, j] += ((a * cm).sum(-1) / n_tok).cpu().double().numpy() / samples
                    den[sl, j] += ((b * cm).sum(-1) / n_tok).cpu().double().numpy() / samples
    return TokenOptimalCoefficient(layer=idx, ks=tuple(ks), coeffs=grid, phi=phi, phi_direction=phid, num=num,
                                   den=den, noise=float(noise))
