"""Quantities from the paper's theory (arXiv 2408.06223: Proposition 1, Eq. 8–22), and numerical checks of its first-order arguments.

- :func:`noise_sensitivity` — Φ(g^(l:k)) of Eq. 8–9 (Fig. 1), dataset version: how much a perturbation ξ of the
  block-l representation is amplified (Φ > 1) or damped (Φ < 1) by the sub-network g^(l:k) = blocks l+1 … k.
- :func:`logit_jacobian` — J of W ∘ g^(l:L) with respect to the block-l output (Proposition 1), via torch.func.
- :func:`proposition1` — Proposition 1 checked by sampling: logits of a prompt whose block-l output is c·u + ε
  against the predicted N(W g(c·u), η W J Jᵀ Wᵀ); Taylor error against η (log-log slope) and normality tests.
- :func:`optimal_coefficient` — Eq. 19's c* from the Jacobian next to the argmin of the exact Eq. 10 objective.
- :func:`confidence_vs_coeff` — MaxLogit, max probability and entropy of steered prompts against c (C1).
- :func:`input_gradient_norms` — the GCG argument (Eq. 20–22): gradient of log p(correct letter) with respect to
  the one-hot input tokens.
- :func:`forget_convergence` — Fig. 4: does the forget loss converge, and did the norm start below or above c?

Cost: Jacobians are computed in reverse mode (``torch.func.jacrev``: one vector-Jacobian product per output
row; CPU ``scaled_dot_product_attention`` has no forward-mode derivative, so ``jvp`` / ``jacfwd`` cannot be
used). The organism (width 128, vocabulary ~1k) gets full Jacobians in seconds. For a 7B model pass
``projection=`` (k directions in logit space) to :func:`logit_jacobian` / :func:`proposition1`, keep prompts
short, and give :func:`optimal_coefficient` only the ``ks`` you need (each costs d backward passes of a
one-token sequence; ``chunk_size=`` bounds the memory).
"""
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

from . import hooks
from ._batching import Batch, encode, position_ids_from_mask, vocab_size
from .activations import bos_token_id, capture_batches, masked_mean
from .confidence import METRICS, measure_confidence
from .evaluation import (
    encode_choices, mcq_continuations, mcq_prompt, question_records, subject_list, tokenizer_adds_bos,
)
from .models import (
    check_layer, decoder_blocks, forward_params, frozen_parameters, hidden_size, model_device, num_blocks,
    resolve_tokenizer,
)
from .steering import check_noise, check_vector, make_generator, steer

__all__ = [
    "NoiseSensitivity", "noise_sensitivity", "mean_representation", "block_calls", "push_blocks",
    "LogitJacobian", "logit_jacobian", "Proposition1", "proposition1", "loglog_slope",
    "OptimalCoefficient", "optimal_coefficient", "ConfidenceSweep", "confidence_vs_coeff",
    "InputGradients", "input_gradient_norms", "Convergence", "forget_convergence",
]


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


# ------------------------------------------------------------------------------------------------------------
# Eq. 20–22: gradients a GCG attacker sees
# ------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class InputGradients:
    """Per question: the attacker's objective log p(correct letter | prompt) (``logprob``), and the norm of its
    gradient with respect to the one-hot input tokens ``[T, vocab]`` (``grad_norm``, Frobenius) and of that
    gradient with each position's mean over the vocabulary removed (``grad_norm_centered``: the part that
    changes GCG's ranking of token swaps). ``n_tokens``: prompt length."""

    logprob: np.ndarray
    grad_norm: np.ndarray
    grad_norm_centered: np.ndarray
    n_tokens: np.ndarray

    def __len__(self) -> int:
        return len(self.logprob)

    def summary(self) -> dict[str, float]:
        return {"n": len(self), "grad_norm_median": float(np.median(self.grad_norm)),
                "grad_norm_mean": float(self.grad_norm.mean()),
                "grad_norm_centered_median": float(np.median(self.grad_norm_centered)),
                "logprob_mean": float(self.logprob.mean()), "prob_mean": float(np.exp(self.logprob).mean())}

    def ratio(self, other: "InputGradients", *, centered: bool = False) -> float:
        """Median gradient norm of this model divided by that of ``other`` (e.g. unlearned / base)."""
        a = self.grad_norm_centered if centered else self.grad_norm
        b = other.grad_norm_centered if centered else other.grad_norm
        return float(np.median(a) / np.median(b))

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame({"question": np.arange(len(self)), "logprob": self.logprob, "grad_norm": self.grad_norm,
                             "grad_norm_centered": self.grad_norm_centered, "n_tokens": self.n_tokens})


def input_gradient_norms(
    model: nn.Module,
    tokenizer: Any,
    records: Any,
    subject: Any = None,
    *,
    scoring: str = "letter",
    add_bos: bool | None = None,
) -> InputGradients:
    """The GCG argument (Eq. 20–22): for each multiple-choice question (the zero-shot prompt of
    :func:`~rmu_analysis.evaluation.evaluate_mcq`, same tokenisation), the gradient of log p(correct answer)
    — the letter (``scoring="letter"``) or the choice's text (``"cloze"``, summed over its tokens) — with
    respect to the one-hot input tokens, = ∂/∂(input embeddings) @ W_Eᵀ. The paper predicts ≈ 0 for an
    unlearned model (its layer-l state no longer depends on the input). One question at a time, in eval mode;
    the model's parameters get no gradients (both restored afterwards)."""
    recs = question_records(records)
    subjects = subject_list(subject, len(recs))
    tok = resolve_tokenizer(model, tokenizer)
    if add_bos is None:
        add_bos = tokenizer_adds_bos(tok)
    prefix = [tok.bos_token_id] if add_bos else []
    contexts = [mcq_prompt(r, s, scoring=scoring) for r, s in zip(recs, subjects)]
    pairs = encode_choices(tok, contexts, [mcq_continuations(r, scoring=scoring) for r in recs], prefix)
    emb = model.get_input_embeddings().weight
    device = emb.device
    out = {k: [] for k in ("logprob", "norm", "centered", "n")}
    with frozen_parameters(model):  # gradients flow to the input embeddings only
        for rec, (ctx, conts) in zip(recs, pairs):
            target = conts[rec["answer"]]
            seq = torch.tensor(ctx + target[:-1], device=device)
            x = emb[seq].detach().clone().requires_grad_(True)
            mask = torch.ones(1, len(seq), dtype=torch.long, device=device)
            logits = model(inputs_embeds=x.unsqueeze(0), attention_mask=mask,
                           position_ids=position_ids_from_mask(mask), use_cache=False).logits[0].float()
            k = len(target)
            logp = torch.log_softmax(logits[-k:], -1).gather(-1, torch.tensor(target, device=device)[:, None]).sum()
            (grad,) = torch.autograd.grad(logp, x)
            onehot = grad.float() @ emb.detach().float().T  # [T, vocab]
            out["logprob"].append(float(logp.detach()))
            out["norm"].append(float(onehot.norm()))
            out["centered"].append(float((onehot - onehot.mean(-1, keepdim=True)).norm()))
            out["n"].append(len(ctx))
    return InputGradients(logprob=np.array(out["logprob"]), grad_norm=np.array(out["norm"]),
                          grad_norm_centered=np.array(out["centered"]), n_tokens=np.array(out["n"]))


# ------------------------------------------------------------------------------------------------------------
# Fig. 4: convergence of the forget loss
# ------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Convergence:
    """Fig. 4 per topic, from an unlearning log: the block-l forget norm at the first logged step
    (``initial_norm``) and at the end (``final_norm``, mean of the last ``tail`` logged steps), the coefficient
    c, and the forget loss at the start and at the end.

    Two readings of "the forget loss converges": ``rel_distance`` = sqrt(final loss · d) / c, the RMS distance
    of the forget representations from their target c·u relative to its size (the forget loss is a mean over
    the d hidden dimensions), and ``loss_ratio`` = final / initial loss. ``converged`` applies ``criterion``
    (``"distance"`` or ``"loss_ratio"``) against ``threshold``. ``starts_below`` = initial norm < c (Fig. 4:
    the paper expects converged == starts_below).
    """

    topics: tuple[str, ...]
    initial_norm: np.ndarray
    final_norm: np.ndarray
    coefficient: np.ndarray
    initial_loss: np.ndarray
    final_loss: np.ndarray
    hidden_size: int | None
    criterion: str
    threshold: float

    @property
    def loss_ratio(self) -> np.ndarray:
        return self.final_loss / self.initial_loss

    @property
    def rel_distance(self) -> np.ndarray:
        if self.hidden_size is None:
            return np.full(len(self.topics), np.nan)
        return np.sqrt(self.final_loss * self.hidden_size) / self.coefficient

    @property
    def converged(self) -> np.ndarray:
        value = self.rel_distance if self.criterion == "distance" else self.loss_ratio
        return value < self.threshold

    @property
    def starts_below(self) -> np.ndarray:
        return self.initial_norm < self.coefficient

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame({"topic": list(self.topics), "coefficient": self.coefficient,
                             "initial_norm": self.initial_norm, "final_norm": self.final_norm,
                             "starts_below": self.starts_below, "initial_loss": self.initial_loss,
                             "final_loss": self.final_loss, "loss_ratio": self.loss_ratio,
                             "rel_distance": self.rel_distance, "converged": self.converged})


_THRESHOLDS = {"distance": 0.5, "loss_ratio": 0.1}


def log_hidden_size(log: Any, hidden_size: int | None = None) -> int | None:
    """``hidden_size``, else the size of an ``UnlearnResult``'s control vectors (None when neither is there)."""
    if hidden_size is None and getattr(log, "control_vectors", None):
        hidden_size = int(next(iter(log.control_vectors.values())).numel())
    return hidden_size


def log_frame(log: Any, need: set[str], tail: int) -> pd.DataFrame:
    """An RMU / Adaptive RMU training log (an ``UnlearnResult``, its ``.log`` or ``to_frame()``) as a frame,
    checked to have the columns ``need``; ``tail`` (steps averaged at the end) checked ≥ 1."""
    frame = log.to_frame() if hasattr(log, "to_frame") else pd.DataFrame(log)
    if frame.empty or not need <= set(frame.columns):
        raise ValueError(f"the log must have rows with columns {sorted(need)} (an RMU / Adaptive RMU log)")
    if tail < 1:
        raise ValueError(f"tail must be ≥ 1, got {tail}")
    return frame


def forget_convergence(log: Any, *, hidden_size: int | None = None, tail: int = 5, criterion: str = "distance",
                       threshold: float | None = None) -> Convergence:
    """Fig. 4 from an unlearning run (an ``UnlearnResult``, its ``.log`` or ``to_frame()``; ``log_every=1``
    gives every step): did the forget loss converge, and did the forget norm start below the coefficient?

    ``criterion="distance"`` (default threshold 0.5): the forget representations end within half of ‖c·u‖ of
    c·u (RMS); needs the hidden size d, read from an ``UnlearnResult``'s control vectors or given as
    ``hidden_size``. ``criterion="loss_ratio"`` (default threshold 0.1): the loss fell below a tenth of its
    initial value. Both numbers are always in ``to_frame()``.
    """
    if criterion not in _THRESHOLDS:
        raise ValueError(f'criterion must be "distance" or "loss_ratio", got {criterion!r}')
    hidden_size = log_hidden_size(log, hidden_size)
    if criterion == "distance" and hidden_size is None:
        raise ValueError('criterion="distance" needs the hidden size: pass hidden_size=d or an UnlearnResult')
    frame = log_frame(log, {"step", "topic", "forget_loss", "forget_norm", "coefficient"}, tail)
    rows = []
    for topic, part in frame.sort_values("step").groupby("topic", sort=False):
        rows.append((str(topic), part["forget_norm"].iloc[0], part["forget_norm"].iloc[-tail:].mean(),
                     part["coefficient"].iloc[0], part["forget_loss"].iloc[0], part["forget_loss"].iloc[-tail:].mean()))
    cols = list(zip(*rows))
    return Convergence(topics=tuple(cols[0]), initial_norm=np.array(cols[1], float),
                       final_norm=np.array(cols[2], float), coefficient=np.array(cols[3], float),
                       initial_loss=np.array(cols[4], float), final_loss=np.array(cols[5], float),
                       hidden_size=hidden_size, criterion=criterion,
                       threshold=_THRESHOLDS[criterion] if threshold is None else float(threshold))
