"""Proposition 1: the logit Jacobian J of W ∘ g^(l:L) and the sampling check of N(W g(c·u), η W J Jᵀ Wᵀ). (:mod:`rmu_analysis.theory`)"""
from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import pandas as pd
import torch
from scipy import stats
from torch import nn

from .. import hooks
from .._batching import encode, position_ids_from_mask, vocab_size
from ..models import check_layer, decoder_blocks, forward_params, hidden_size, model_device, resolve_tokenizer
from ..steering import check_vector, make_generator


# ------------------------------------------------------------------------------------------------------------
# Proposition 1: logits of a steered prompt are ≈ N(W g(c·u), η W J Jᵀ Wᵀ)
# ------------------------------------------------------------------------------------------------------------
def _prompt_ids(model: nn.Module, prompt: Any, tokenizer: Any) -> torch.Tensor:
    """One prompt (a string, or token ids ``[T]`` / ``[1, T]``) as ids ``[1, T]`` on the model's device."""
    if isinstance(prompt, str):
        return encode(model, [prompt], resolve_tokenizer(model, tokenizer)).input_ids
    if isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], str):
        raise TypeError("pass ONE prompt (a string or a tensor of token ids), not a list of prompts")
    ids = torch.as_tensor(prompt)
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1 or ids.numel() == 0 or ids.is_floating_point():
        raise ValueError(f"prompt must be a string or non-empty integer token ids [T] / [1, T], got shape "
                         f"{tuple(ids.shape)}")
    return encode(model, ids.long().unsqueeze(0)).input_ids


def _columns(positions: Any, T: int) -> list[int]:
    if isinstance(positions, str):
        if positions == "all":
            return list(range(T))
        if positions == "last":
            return [T - 1]
        raise ValueError(f'positions must be "all", "last" or a list of token positions, got {positions!r}')
    cols = sorted({int(p) + T if int(p) < 0 else int(p) for p in np.atleast_1d(np.asarray(positions))})
    bad = [c for c in cols if not 0 <= c < T]
    if not cols or bad:
        raise ValueError(f"positions {list(np.atleast_1d(positions))} are out of range for a prompt of {T} tokens "
                         f"(valid: {-T}–{T - 1})")
    return cols


def _check_projection(projection: Any, n_vocab: int) -> torch.Tensor | None:
    if projection is None:
        return None
    P = torch.as_tensor(projection, dtype=torch.float32)
    if P.dim() != 2 or P.shape[1] != n_vocab:
        raise ValueError(f"projection must have shape [k, vocab] = [k, {n_vocab}], got {tuple(P.shape)}")
    return P


def _logits_with_block(model: nn.Module, ids: torch.Tensor, layer: int, cols: list[int], values: torch.Tensor,
                       projection: torch.Tensor | None) -> torch.Tensor:
    """Last-position logits ``[B, V]`` (fp32; ``projection @ logits``: ``[B, k]``) of prompt ``ids`` ``[1, T]``
    when block ``layer``'s output at token columns ``cols`` is replaced by ``values`` ``[B, len(cols), d]``.
    Differentiable in ``values`` (the hook substitutes out of place), so it runs inside ``torch.func``."""
    B, T = values.shape[0], ids.shape[1]
    col_idx = torch.tensor(cols, device=ids.device)

    def replace(h: torch.Tensor) -> torch.Tensor:
        return h.index_copy(1, col_idx.to(h.device), values.to(h.device, h.dtype))

    kwargs: dict[str, Any] = {"use_cache": False}
    if "logits_to_keep" in forward_params(model):
        kwargs["logits_to_keep"] = 1
    mask = torch.ones(B, T, dtype=torch.long, device=ids.device)
    with hooks.edit(model, layer, replace):
        out = model(input_ids=ids.expand(B, T), attention_mask=mask, position_ids=position_ids_from_mask(mask),
                    **kwargs)
    logits = out.logits[:, -1].float()
    return logits if projection is None else logits @ projection.to(logits.device).T


@contextlib.contextmanager
def _quiet_vmap_fallback() -> Iterator[None]:
    # CPU SDPA's backward has no vmap batching rule; torch falls back to a loop and warns on every call
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not yet implemented the batching rule.*")
        yield


@contextlib.contextmanager
def _eager_attention(model: nn.Module) -> Iterator[None]:
    """Switch a CPU model from SDPA to eager attention for a ``jacrev`` (SDPA's CPU backward has no vmap rule, so
    torch loops over the batch: eager is ~2x faster); restored on exit and on errors. Other models: unchanged."""
    cfg = getattr(model, "config", None)
    switch = (getattr(cfg, "_attn_implementation", None) == "sdpa" and hasattr(model, "set_attn_implementation")
              and model_device(model).type == "cpu")
    if switch:
        try:
            model.set_attn_implementation("eager")
        except Exception:  # pragma: no cover - a model that cannot switch keeps SDPA (slower, same numbers)
            switch = False
    try:
        yield
    finally:
        if switch:
            model.set_attn_implementation("sdpa")


@dataclass(frozen=True, eq=False)
class LogitJacobian:
    """J of the last-position logits W ∘ g^(l:L) with respect to block ``layer``'s output at token ``positions``,
    evaluated at ``z`` (Proposition 1). ``jacobian``: ``[V, P, d]`` (V = k with a ``projection``);
    ``logits``: W g(z) ``[V]``; ``projection``: the ``[k, vocab]`` matrix applied to the logits, or None."""

    layer: int
    positions: tuple[int, ...]
    z: torch.Tensor
    logits: torch.Tensor
    jacobian: torch.Tensor
    projection: torch.Tensor | None

    @property
    def matrix(self) -> torch.Tensor:
        """J as a ``[V, P·d]`` matrix (all steered positions side by side)."""
        return self.jacobian.reshape(self.jacobian.shape[0], -1)

    def covariance(self, eta: float) -> torch.Tensor:
        """Predicted logit covariance η J Jᵀ ``[V, V]`` for independent ε ~ N(0, ηI) at every steered position."""
        J = self.matrix.double()
        return float(eta) * (J @ J.T)


def logit_jacobian(
    model: nn.Module,
    prompt: Any,
    layer: int,
    z: Any,
    *,
    positions: Any = "all",
    projection: Any = None,
    tokenizer: Any = None,
    chunk_size: int | None = None,
) -> LogitJacobian:
    """Jacobian J of the next-token logits (last position) of ``prompt`` with respect to block ``layer``'s output
    at ``positions`` (``"all"``: Assumption 1, every token; ``"last"``; or a list), at the point where those
    outputs equal ``z`` (``[d]``, e.g. c·u, used at every position, or ``[P, d]``) — Proposition 1's J (with W).

    Reverse mode (``torch.func.jacrev``): one vector-Jacobian product per logit. ``projection`` (``[k, vocab]``)
    differentiates ``projection @ logits`` instead: k products, the way to use this on a 7B model.
    """
    idx = check_layer(model, layer)
    ids = _prompt_ids(model, prompt, tokenizer)
    cols = _columns(positions, ids.shape[1])
    d = hidden_size(model)
    zt = torch.as_tensor(z, dtype=torch.float32).detach().cpu()
    if zt.dim() == 1:
        zt = check_vector(zt, d, name="z").float().expand(len(cols), d).clone()
    if tuple(zt.shape) != (len(cols), d):
        raise ValueError(f"z must have shape [d] = [{d}] or [positions, d] = [{len(cols)}, {d}], got "
                         f"{tuple(zt.shape)}")
    if not torch.isfinite(zt).all():
        raise ValueError("z contains non-finite values (nan or inf)")
    P = _check_projection(projection, vocab_size(model))

    def f(values: torch.Tensor):
        out = _logits_with_block(model, ids, idx, cols, values.unsqueeze(0), P)[0]
        return out, out.detach()

    p = next(decoder_blocks(model)[idx].parameters())
    with _quiet_vmap_fallback(), _eager_attention(model):
        J, value = torch.func.jacrev(f, has_aux=True, chunk_size=chunk_size)(zt.to(p.device, torch.float32))
    return LogitJacobian(layer=idx, positions=tuple(cols), z=zt, logits=value.detach().cpu(),
                         jacobian=J.detach().float().cpu(), projection=P)


def loglog_slope(x: Any, y: Any) -> float:
    """Least-squares slope of log y against log x (points with y ≤ 0 are left out; nan with fewer than 2)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = (x > 0) & (y > 0) & np.isfinite(y)
    if keep.sum() < 2:
        return float("nan")
    return float(np.polyfit(np.log(x[keep]), np.log(y[keep]), 1)[0])


def _cov(y: np.ndarray) -> np.ndarray:
    c = y - y.mean(0, keepdims=True)
    return c.T @ c / (y.shape[0] - 1)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    den = float(np.linalg.norm(b))
    return float(np.linalg.norm(a - b)) / den if den > 0 else float("nan")


@dataclass(frozen=True, eq=False)
class Proposition1:
    """Proposition 1 checked by sampling, one entry per noise variance η in ``etas``.

    Draws are antithetic pairs (ε, −ε) from the same standard-normal draws for every η, so odd Taylor terms
    cancel exactly and the remaining differences are the second-order effects the theory neglects.

    - ``mean_rel_error``: ‖mean logits − W g(z)‖ / ‖W g(z)‖ — a second-order bias: slope 1 in η.
    - ``cov_rel_error``: ‖Ĉ − η J Jᵀ‖_F / ‖η J Jᵀ‖_F (sampling error included; it levels off at
      ``cov_sampling_floor``, the error of exactly Gaussian draws y_lin = W g(z) + J ε with the same ε).
    - ``cov_rel_error_paired``: ‖Ĉ(y) − Ĉ(y_lin)‖_F / ‖Ĉ(y_lin)‖_F on the same draws — the Taylor error
      alone: slope 1 in η.
    - ``normality_p``: ``[n_etas, n_directions]`` D'Agostino–Pearson p-values (``scipy.stats.normaltest``) of
      the logits projected on random unit directions (the ε half of the draws, which are independent).
    - ``standardized``: ``[n_etas, samples / 2]`` the first projection, centred and scaled by its predicted
      mean and standard deviation (≈ N(0, 1) where the proposition holds).
    """

    layer: int
    coeff: float
    etas: np.ndarray
    samples: int
    mean_rel_error: np.ndarray
    cov_rel_error: np.ndarray
    cov_rel_error_paired: np.ndarray
    cov_sampling_floor: np.ndarray
    normality_p: np.ndarray
    standardized: np.ndarray
    jacobian: LogitJacobian

    @property
    def slope_mean(self) -> float:
        """Fitted log-log slope of ``mean_rel_error`` against η (first-order theory: 1)."""
        return loglog_slope(self.etas, self.mean_rel_error)

    @property
    def slope_cov(self) -> float:
        """Fitted log-log slope of ``cov_rel_error_paired`` against η (first-order theory: 1)."""
        return loglog_slope(self.etas, self.cov_rel_error_paired)

    def to_frame(self) -> pd.DataFrame:
        """One row per η: the four errors, the median normality p-value and the share of p < 0.05."""
        return pd.DataFrame({
            "eta": self.etas,
            "mean_rel_error": self.mean_rel_error,
            "cov_rel_error": self.cov_rel_error,
            "cov_rel_error_paired": self.cov_rel_error_paired,
            "cov_sampling_floor": self.cov_sampling_floor,
            "normality_p_median": np.median(self.normality_p, axis=1),
            "normality_reject_05": (self.normality_p < 0.05).mean(axis=1),
        })


def proposition1(
    model: nn.Module,
    prompt: Any,
    layer: int,
    coeff: float,
    u: Any,
    etas: Any,
    *,
    samples: int = 512,
    seed: int = 0,
    positions: Any = "all",
    projection: Any = None,
    directions: int = 16,
    batch_size: int = 256,
    tokenizer: Any = None,
    jacobian: LogitJacobian | None = None,
) -> Proposition1:
    """Proposition 1 (arXiv 2408.06223): with block ``layer``'s output at ``positions`` set to z + ε, z = ``coeff``·u,
    ε ~ N(0, ηI) independent per token, are the next-token logits ≈ N(W g(z), η W J Jᵀ Wᵀ)?

    For each η in ``etas``: ``samples`` draws (antithetic pairs, standard normals from ``seed`` shared by every η)
    run through the model in batches; compare their mean and covariance with the prediction (J from
    :func:`logit_jacobian`, or pass ``jacobian=`` to reuse one) and test the normality of ``directions``
    random projections. ``projection`` (``[k, vocab]``) works on ``projection @ logits`` (large vocabularies).
    """
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 4 or samples % 2:
        raise ValueError(f"samples must be an even int ≥ 4 (antithetic pairs), got {samples!r}")
    eta_arr = np.asarray(etas, dtype=float).ravel()
    if eta_arr.size == 0 or not np.all(np.isfinite(eta_arr)) or np.any(eta_arr <= 0):
        raise ValueError(f"etas must be positive finite noise variances, got {etas!r}")
    d = hidden_size(model)
    u_vec = check_vector(u, d, name="u").float().cpu()
    z = float(coeff) * u_vec
    if jacobian is None:
        jacobian = logit_jacobian(model, prompt, layer, z, positions=positions, projection=projection,
                                  tokenizer=tokenizer)
    elif not torch.allclose(jacobian.z, z.expand_as(jacobian.z), atol=1e-5 * (1 + float(z.abs().max()))):
        raise ValueError("the jacobian= given was computed at another point z: pass coeff and u that match it")
    idx, cols, P = jacobian.layer, list(jacobian.positions), jacobian.projection
    ids = _prompt_ids(model, prompt, tokenizer)
    if ids.shape[1] <= max(cols):
        raise ValueError("the jacobian= given was computed for a longer prompt")
    half = samples // 2
    gen = make_generator(seed, what="Proposition 1 noise")
    base = torch.randn(half, len(cols), d, generator=gen, dtype=torch.float32)
    signs = torch.cat([base, -base])  # antithetic pairs
    J = jacobian.matrix.double().numpy()  # [V, P·d]
    mean_pred = jacobian.logits.double().numpy()
    lin_unit = signs.reshape(samples, -1).double().numpy() @ J.T  # J ε / sqrt(η), [S, V]
    dir_gen = make_generator(seed + 1, what="projection directions")
    dirs = torch.randn(directions, J.shape[0], generator=dir_gen, dtype=torch.float64).numpy()
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    p = next(decoder_blocks(model)[idx].parameters())
    JJt = J @ J.T

    rows = {k: [] for k in ("mean", "cov", "paired", "floor")}
    pvals, std_first = [], []
    with torch.no_grad():
        for eta in eta_arr:
            values = z.expand(len(cols), d) + math.sqrt(eta) * signs
            y = torch.cat([
                _logits_with_block(model, ids, idx, cols, values[s:s + batch_size].to(p.device, p.dtype), P).cpu()
                for s in range(0, samples, batch_size)
            ]).double().numpy()
            y_lin = mean_pred + math.sqrt(eta) * lin_unit
            cov_pred = eta * JJt
            c_emp, c_lin = _cov(y), _cov(y_lin)
            rows["mean"].append(_rel(y.mean(0), mean_pred))
            rows["cov"].append(_rel(c_emp, cov_pred))
            rows["paired"].append(_rel(c_emp, c_lin))
            rows["floor"].append(_rel(c_lin, cov_pred))
            proj = y[:half] @ dirs.T
            pvals.append(stats.normaltest(proj, axis=0).pvalue)
            sd = math.sqrt(max(float(dirs[0] @ cov_pred @ dirs[0]), 1e-300))
            std_first.append((proj[:, 0] - dirs[0] @ mean_pred) / sd)
    return Proposition1(
        layer=idx, coeff=float(coeff), etas=eta_arr, samples=samples,
        mean_rel_error=np.array(rows["mean"]), cov_rel_error=np.array(rows["cov"]),
        cov_rel_error_paired=np.array(rows["paired"]), cov_sampling_floor=np.array(rows["floor"]),
        normality_p=np.array(pvals), standardized=np.array(std_first), jacobian=jacobian,
    )
