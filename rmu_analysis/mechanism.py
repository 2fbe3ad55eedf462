"""The paper's mechanism measured on a trained (unlearned) model, token by token (arXiv 2408.06223, Section 3;
docs/claims.md): does Assumption 1 hold, does Proposition 1 predict the logits the model actually produces, how
u-specific is the alignment with u (C2), and noise sensitivity (Eq. 8–9, C4) and the optimal coefficient
(Eq. 10–19) on real prompts with noise at every token position.

- :func:`assumption1` — forget (and retain) block-l states against c·u: cos²(h, u), ⟨h, u⟩ / c, ‖h − c·u‖² / ‖c·u‖²
  and the input-dependent spread E‖h − E h‖² / ‖c·u‖², per token, with 95% intervals over texts.
- :func:`proposition1_trained` — Proposition 1's N(W g(c·u) + J m, J Σ Jᵀ) from the measured noise (mean m,
  covariance Σ of h − c·u) beside the last-position logits the model produces on the forget prompts.
- :func:`normalized_alignment`, :func:`centered_cosine`, :func:`u_alignment` — C2 with a null that scores c·u 1
  and an unrelated state ≈ 0.
- :func:`token_noise_sensitivity` — Φ(g^(l:k)) (Eq. 8) per prompt, noise ξ at every token of real prompts
  (relative to each token's norm by default: RMSNorm makes a block's update blind to its input's scale);
  :class:`DepthTrend` — does Φ fall with depth (C4, Fig. 1)?
- :func:`token_optimal_coefficient` — Eq. 10's Φ_k(c) with ξ = c·u + ε − h at every token, its grid minimiser,
  the scale-free (direction-only) version, and Eq. 19's linearised c*, with bootstrap intervals over prompts.

Every function takes ``(model, prompts, layer, ...)`` with a tokenizer (or the one attached to the model), works on
any decoder-only HF model the package supports, leaves out padding and (``exclude_bos=True``) BOS, and uses the
one hooks core (:mod:`rmu_analysis.hooks`). Intervals: Student-t over texts/prompts
(:func:`~rmu_analysis.stats.mean_interval`) or a seeded percentile bootstrap over prompts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy import stats as sps
from torch import nn

from . import hooks
from ._batching import iter_batches
from .activations import bos_token_id, capture_batches, token_mask
from .cosines import cosine
from .models import check_layer, check_layers, hidden_size, num_blocks, resolve_tokenizer
from .stats import Interval, finite_mean_interval
from .steering import check_vector, make_generator, random_direction
from .theory import logit_jacobian

__all__ = [
    "Assumption1Set", "Assumption1", "assumption1", "Proposition1Trained", "proposition1_trained",
    "normalized_alignment", "centered_cosine", "UAlignment", "u_alignment", "TokenNoiseSensitivity",
    "token_noise_sensitivity", "DepthTrend", "depth_trend", "TokenOptimalCoefficient", "token_optimal_coefficient",
    "bootstrap_interval",
]

_MEASURES = ("share", "scale", "residual", "spread")


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


# ------------------------------------------------------------------------------------------- Assumption 1
@dataclass(frozen=True, eq=False)
class Assumption1Set:
    """Per counted token of one text set (``name``: ``"forget"`` or ``"retain"``), against the target c·u:

    - ``share``: cos²(h, u), the share of ‖h‖² along u (1 when h ∥ u);
    - ``scale``: ⟨h, u⟩ / c (1 when h's component along u is c·u);
    - ``residual``: ‖h − c·u‖² / ‖c·u‖² (0 when h = c·u);
    - ``spread``: ‖h − h̄‖² / ‖c·u‖², h̄ the mean over all counted tokens of the set: its mean is the
      input-dependent variance E‖h − E h‖² relative to ‖c·u‖² (Assumption 1's d·η / c²).
    ``text``: each token's text index.
    """

    name: str
    share: np.ndarray
    scale: np.ndarray
    residual: np.ndarray
    spread: np.ndarray
    text: np.ndarray
    n_texts: int

    def per_text(self) -> pd.DataFrame:
        """One row per text: its token count and the mean of each measure over its tokens."""
        out = {"text": np.arange(self.n_texts), "n_tokens": np.bincount(self.text, minlength=self.n_texts)}
        for m in _MEASURES:
            out[m] = _per_text_mean(getattr(self, m), self.text, self.n_texts)
        return pd.DataFrame(out)

    def interval(self, measure: str, level: float = 0.95) -> Interval:
        """Mean over texts of the per-text mean of ``measure`` with a Student-t interval (texts are the units)."""
        if measure not in _MEASURES:
            raise ValueError(f"measure must be one of {_MEASURES}, got {measure!r}")
        return finite_mean_interval(self.per_text()[measure].to_numpy(), level)


@dataclass(frozen=True, eq=False)
class Assumption1:
    """Assumption 1 measured at block ``layer`` for target ``coeff``·``u`` (``sets``: ``"forget"`` and, when
    retain texts were given, ``"retain"``, the control). See :func:`assumption1`."""

    layer: int
    coeff: float
    u: torch.Tensor
    sets: dict[str, Assumption1Set]

    def summary(self, level: float = 0.95) -> pd.DataFrame:
        """One row per (set, measure): estimate (mean over texts), low, high, n_texts, n_tokens."""
        rows = []
        for name, s in self.sets.items():
            for m in _MEASURES:
                ci = s.interval(m, level)
                rows.append({"set": name, "measure": m, "estimate": ci.estimate, "low": ci.low, "high": ci.high,
                             "n_texts": s.n_texts, "n_tokens": int(s.share.size)})
        return pd.DataFrame(rows)

    def holds(self, *, min_share: float = 0.9, max_residual: float = 0.1, max_spread: float = 0.1,
              level: float = 0.95) -> dict[str, Any]:
        """Whether the forget states are c·u + small input-dependent noise, judged on the interval bounds:
        share's low end ≥ ``min_share``, residual's and spread's high ends ≤ ``max_residual`` / ``max_spread``
        (defaults decided before measuring: 90% of ‖h‖² along u, ‖h − c·u‖ and the spread within ~30% of ‖c·u‖)."""
        s = self.sets["forget"]
        share, res, spread = s.interval("share", level), s.interval("residual", level), s.interval("spread", level)
        checks = {"share": share.low >= min_share, "residual": res.high <= max_residual,
                  "spread": spread.high <= max_spread}
        return {"held": bool(all(checks.values())), "checks": checks, "share": share, "residual": res,
                "spread": spread}


def assumption1(
    model: nn.Module,
    tokenizer: Any,
    texts: Any,
    layer: int,
    u: Any,
    coeff: float,
    *,
    retain: Any = None,
    exclude_bos: bool = True,
    batch_size: int = 32,
    max_length: int | None = None,
) -> Assumption1:
    """Assumption 1 (Section 3) on a trained model: are the block-``layer`` states of the forget ``texts`` c·u + ε
    with small input-dependent ε? Per counted token (padding and, with ``exclude_bos``, BOS left out):
    cos²(h, u), ⟨h, u⟩ / c, ‖h − c·u‖² / ‖c·u‖², ‖h − h̄‖² / ‖c·u‖² (:class:`Assumption1Set`); ``retain`` texts
    get the same numbers (the control: they should NOT look like c·u). ``u``: the run's control vector
    (``result.control_vectors[topic]``, normalised here); ``coeff``: its c (``result.coefficients[topic]``)."""
    idx = check_layer(model, layer)
    d = hidden_size(model)
    uu = _unit(u, d)
    c = _check_coeff(coeff)
    tok = resolve_tokenizer(model, tokenizer)
    sets = {}
    for name, group in (("forget", texts), ("retain", retain)):
        if group is None:
            continue
        group = _texts(group, name)
        H, owner = _token_states(model, group, idx, tok, exclude_bos, batch_size, max_length)
        proj = H @ uu
        sq = (H ** 2).sum(-1)
        target = c * uu
        sets[name] = Assumption1Set(
            name=name,
            share=(proj ** 2 / sq.clamp_min(1e-30)).double().numpy(),
            scale=(proj / c).double().numpy(),
            residual=(((H - target) ** 2).sum(-1) / c ** 2).double().numpy(),
            spread=(((H - H.mean(0)) ** 2).sum(-1) / c ** 2).double().numpy(),
            text=owner, n_texts=len(group),
        )
    return Assumption1(layer=idx, coeff=c, u=uu, sets=sets)


# ----------------------------------------------------------------------------------------- Proposition 1
def _last_logits(model: nn.Module, tokenizer: Any, texts: list[str], batch_size: int, max_length: int | None
                 ) -> torch.Tensor:
    """Next-token logits ``[n, V]`` (fp32, CPU) of each prompt (left padding: the last column is every prompt's last
    token)."""
    out = []
    with torch.no_grad():
        for _, batch in iter_batches(model, texts, tokenizer, batch_size=batch_size, padding_side="left",
                                     truncation_side="left", max_length=max_length):
            out.append(model(**batch.model_inputs(), use_cache=False).logits[:, -1].float().cpu())
    return torch.cat(out)


def _rowwise_corr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(-1, keepdims=True)
    b = b - b.mean(-1, keepdims=True)
    return (a * b).sum(-1) / np.sqrt((a * a).sum(-1) * (b * b).sum(-1))


@dataclass(frozen=True, eq=False)
class Proposition1Trained:
    """Proposition 1's prediction from the measured block-l noise beside the model's actual logits.

    Prediction (first order around z = c·u at every counted position of a reference prompt of median length):
    mean ``predicted_mean`` = W g(z) + Σ_p J_p m, covariance Σ_p J_p Σ J_pᵀ (per-logit ``predicted_std``), m and Σ
    the mean and covariance of the measured noise h − c·u; ``predicted_max_logit`` = Monte-Carlo draws of the
    max logit under that Gaussian (NaN with a ``projection``). Actual: ``actual_logits`` ``[n, V]`` (last position of
    each forget prompt). Intervals (``intervals``) are basic bootstraps over prompts (:func:`bootstrap_interval`): correlation and
    relative error of the mean logit vector and of the per-logit std, total-variance ratio tr(Σ̂_actual) /
    tr(Σ_pred), and the actual max logit's mean and std beside the predicted ones.
    """

    layer: int
    coeff: float
    positions: tuple[int, ...]
    noise_mean_norm: float
    noise_trace: float
    predicted_mean: np.ndarray
    predicted_std: np.ndarray
    predicted_max_logit: np.ndarray
    actual_logits: np.ndarray
    intervals: dict[str, Interval]

    @property
    def actual_max_logit(self) -> np.ndarray:
        return self.actual_logits.max(-1)

    def summary(self) -> pd.DataFrame:
        """One row per comparison: estimate, low, high (and the predicted value where it is a single number)."""
        pred = {"max_logit_mean": float(np.mean(self.predicted_max_logit)),
                "max_logit_std": float(np.std(self.predicted_max_logit, ddof=1))
                if self.predicted_max_logit.size > 1 else float("nan")}
        return pd.DataFrame([{"quantity": k, "estimate": v.estimate, "low": v.low, "high": v.high,
                              "predicted": pred.get(k, float("nan")), "n": v.n} for k, v in self.intervals.items()])


def proposition1_trained(
    model: nn.Module,
    tokenizer: Any,
    prompts: Any,
    layer: int,
    u: Any,
    coeff: float,
    *,
    exclude_bos: bool = True,
    projection: Any = None,
    draws: int = 2000,
    n_boot: int = 1000,
    seed: int = 0,
    batch_size: int = 16,
    max_length: int | None = None,
) -> Proposition1Trained:
    """Proposition 1 against a trained model: from the noise measured at block ``layer`` on the forget ``prompts``
    (ε = h − c·u per counted token; its mean and covariance), predict the logits' mean W g(c·u) + J m and
    covariance J Σ Jᵀ (J from :func:`~rmu_analysis.theory.logit_jacobian` at c·u on the counted positions of the
    median-length prompt; BOS, with ``exclude_bos``, keeps the model's own state), and compare them with the
    next-token logits the model produces on the same prompts. ``projection`` (``[k, vocab]``): compare
    ``projection @ logits`` (large vocabularies; no max-logit then). ``draws``: Monte-Carlo draws of the predicted
    max logit; ``n_boot``: bootstrap resamples of the prompts (seeded by ``seed``).

    Cost: one reverse-mode Jacobian (one backward pass per logit, or per row of ``projection``) of the reference
    prompt; on the organism (vocabulary ~1k, 12 blocks, ~50-token prompts) about a minute of one CPU thread;
    ``max_length`` shortens the prompts, ``projection`` the number of rows."""
    idx = check_layer(model, layer)
    d = hidden_size(model)
    uu = _unit(u, d)
    c = _check_coeff(coeff)
    texts = _texts(prompts)
    tok = resolve_tokenizer(model, tokenizer)
    H, _ = _token_states(model, texts, idx, tok, exclude_bos, batch_size, max_length)
    eps = (H - c * uu).double()
    m = eps.mean(0)
    cov = torch.cov(eps.T) if eps.shape[0] > 1 else torch.zeros(d, d, dtype=torch.float64)
    evals, evecs = torch.linalg.eigh(cov)
    root = evecs * evals.clamp_min(0).sqrt()  # Σ = root rootᵀ

    lengths = [len(ids) for ids in tok(texts, add_special_tokens=True)["input_ids"]]
    ref = texts[int(np.argsort(lengths)[len(lengths) // 2])]
    ref_ids = torch.tensor(tok(ref, add_special_tokens=True)["input_ids"])
    if max_length is not None:
        ref_ids = ref_ids[-max_length:]
    bos = bos_token_id(model, tok)
    start = 1 if exclude_bos and bos is not None and int(ref_ids[0]) == int(bos) and len(ref_ids) > 1 else 0
    cols = list(range(start, len(ref_ids)))
    jac = logit_jacobian(model, ref_ids, idx, c * uu, positions=cols, projection=projection)
    Jp = jac.jacobian.double()  # [V, P, d]
    mean_pred = jac.logits.double() + torch.einsum("vpd,d->v", Jp, m)
    M = torch.einsum("vpd,de->vpe", Jp, root).reshape(Jp.shape[0], -1)  # [V, P·d]: Σ_y = M Mᵀ
    std_pred = (M ** 2).sum(-1).sqrt()

    gen = make_generator(seed, what="Proposition 1 draws")
    if projection is None:
        maxes = []
        for s in range(0, draws, 256):
            z = torch.randn(min(256, draws - s), M.shape[1], generator=gen, dtype=torch.float64)
            maxes.append((mean_pred + z @ M.T).max(-1).values)
        pred_max = torch.cat(maxes).numpy()
    else:
        pred_max = np.full(1, np.nan)

    Y = _last_logits(model, tok, texts, batch_size, max_length).double()
    if projection is not None:
        Y = Y @ torch.as_tensor(projection, dtype=torch.float64).T
    Y = Y.numpy()
    n = Y.shape[0]
    mu, sd = mean_pred.numpy(), std_pred.numpy()
    W = _boot_counts(n, n_boot, seed)
    bm = W @ Y / n
    bs = np.sqrt(np.clip(W @ (Y ** 2) / n - bm ** 2, 0, None) * n / (n - 1))
    am, asd = Y.mean(0), Y.std(0, ddof=1)

    def rel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.linalg.norm(a - b, axis=-1) / np.linalg.norm(b)

    ci = {
        "mean_corr": bootstrap_interval(_rowwise_corr(am, mu), _rowwise_corr(bm, mu[None]), n, basic=True),
        "mean_rel_error": bootstrap_interval(rel(am, mu), rel(bm, mu[None]), n, basic=True),
        "std_corr": bootstrap_interval(_rowwise_corr(asd, sd), _rowwise_corr(bs, sd[None]), n, basic=True),
        "std_rel_error": bootstrap_interval(rel(asd, sd), rel(bs, sd[None]), n, basic=True),
        "var_ratio": bootstrap_interval((asd ** 2).sum() / (sd ** 2).sum(), (bs ** 2).sum(-1) / (sd ** 2).sum(), n,
                                        basic=True),
    }
    for key in ("mean_corr", "std_corr"):  # the basic interval can leave [−1, 1]: a correlation cannot
        iv = ci[key]
        ci[key] = Interval(iv.estimate, max(iv.low, -1.0), min(iv.high, 1.0), iv.n, iv.n_clusters, iv.method, iv.level)
    if projection is None:
        mx = Y.max(-1)
        bmx = W @ mx / n
        bmx_sd = np.sqrt(np.clip(W @ mx ** 2 / n - bmx ** 2, 0, None) * n / (n - 1))
        ci["max_logit_mean"] = bootstrap_interval(mx.mean(), bmx, n, basic=True)
        ci["max_logit_std"] = bootstrap_interval(mx.std(ddof=1), bmx_sd, n, basic=True)
    return Proposition1Trained(
        layer=idx, coeff=c, positions=tuple(cols), noise_mean_norm=float(m.norm()),
        noise_trace=float(torch.trace(cov)), predicted_mean=mu, predicted_std=sd, predicted_max_logit=pred_max,
        actual_logits=Y, intervals=ci,
    )


# --------------------------------------------------------------------------------------- C2: alignment
def normalized_alignment(h: Any, u: Any, u_null: Any) -> torch.Tensor:
    """u-specific alignment (cos(h, u) − cos(h, u′)) / (1 − cos(u, u′)) along the last axis: 1 for h = c·u
    (c > 0), ≈ 0 for a state unrelated to u (a Gaussian one, or another all-positive uniform draw). The raw
    difference cos(h, u) − cos(h, u′) tops out at 1 − cos(u, u′) ≈ 0.25 for uniform u, u′ (C2, Fig. 2e–h)."""
    h, u, u_null = torch.as_tensor(h).float(), torch.as_tensor(u).float(), torch.as_tensor(u_null).float()
    gap = 1.0 - float(cosine(u_null, u))
    if gap < 1e-6:
        raise ValueError("u and the null direction u′ are (nearly) the same direction: draw u′ from another seed")
    return (cosine(h, u) - cosine(h, u_null)) / gap


def centered_cosine(h: Any, u: Any) -> torch.Tensor:
    """cos(P h, P u) with P = I − 11ᵀ/d: the cosine after removing the all-ones direction that every uniform u
    shares (≈ 0.87 of each uniform u). 1 for h = c·u, ≈ 0 for unrelated states."""
    h, u = torch.as_tensor(h).float(), torch.as_tensor(u).float()
    hc = h - h.mean(-1, keepdim=True)
    uc = u - u.mean()
    if float(uc.norm()) == 0.0:
        raise ValueError("u is parallel to the all-ones direction: its centred cosine is undefined")
    return cosine(hc, uc)


@dataclass(frozen=True, eq=False)
class UAlignment:
    """Per block, per counted token and per prompt (token mean): the raw cos(h, u), the :func:`normalized_alignment`
    against an independent uniform u′ and the :func:`centered_cosine` (``token[measure]``: ``[n_layers, n_tokens]``;
    ``prompt[measure]``: ``[n_layers, n_prompts]``)."""

    layers: tuple[int, ...]
    token: dict[str, np.ndarray]
    prompt: dict[str, np.ndarray]
    cos_u_null: float

    def summary(self, level: float = 0.95) -> pd.DataFrame:
        """One row per (block, measure): mean over prompts of the prompt-level value with a t interval."""
        rows = []
        for i, l in enumerate(self.layers):
            for k, v in self.prompt.items():
                ci = finite_mean_interval(v[i], level)
                rows.append({"layer": l, "measure": k, "estimate": ci.estimate, "low": ci.low, "high": ci.high,
                             "n_prompts": v.shape[1]})
        return pd.DataFrame(rows)


def u_alignment(
    model: nn.Module, tokenizer: Any, prompts: Any, u: Any, layers: Any = "all", *, null_seed: int = 12345,
    exclude_bos: bool = True, batch_size: int = 32, max_length: int | None = None,
) -> UAlignment:
    """C2's alignment with u (Fig. 2e–h) in three forms beside each other: raw cos(h, u), the normalised
    u-specific alignment (1 for c·u, ≈ 0 unrelated) and the centred cosine; u′ is a uniform draw from
    ``null_seed`` (as :func:`~rmu_analysis.cosines.alignment`)."""
    idx = check_layers(model, layers)
    d = hidden_size(model)
    uu = _unit(u, d)
    u_null = random_direction(d, "uniform", seed=null_seed)
    cos_null = float(cosine(u_null, uu))
    if cos_null > 1 - 1e-6:
        raise ValueError(f"the null direction from null_seed={null_seed} equals u: pass another null_seed")
    names = ("cos", "normalized", "centered")
    tok_parts: dict[str, list[list[np.ndarray]]] = {k: [[] for _ in idx] for k in names}
    pr_parts: dict[str, list[list[np.ndarray]]] = {k: [[] for _ in idx] for k in names}
    texts = _texts(prompts)
    for _, cap in capture_batches(model, texts, idx, tokenizer=resolve_tokenizer(model, tokenizer),
                                  exclude_bos=exclude_bos, batch_size=batch_size, max_length=max_length):
        for i, l in enumerate(idx):
            for level, h, parts in (("token", cap.tokens(l).cpu(), tok_parts), ("prompt", cap.mean(l).cpu(), pr_parts)):
                parts["cos"][i].append(cosine(h, uu).double().numpy())
                parts["normalized"][i].append(normalized_alignment(h, uu, u_null).double().numpy())
                parts["centered"][i].append(centered_cosine(h, uu).double().numpy())

    def stack(parts: list[list[np.ndarray]]) -> np.ndarray:
        return np.stack([np.concatenate(p) for p in parts])

    return UAlignment(layers=tuple(idx), token={k: stack(v) for k, v in tok_parts.items()},
                      prompt={k: stack(v) for k, v in pr_parts.items()}, cos_u_null=cos_null)


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
