"""Assumption 1 and Proposition 1 on a trained model, and C2's alignment with a null that scores c·u 1
(:mod:`rmu_analysis.mechanism`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from .._batching import iter_batches
from ..activations import bos_token_id, capture_batches
from ..cosines import cosine
from ..models import check_layer, check_layers, hidden_size, resolve_tokenizer
from ..stats import Interval, finite_mean_interval
from ..steering import make_generator, random_direction
from ..theory import logit_jacobian
from ._common import (
    _boot_counts, _check_coeff, _per_text_mean, _rowwise_corr, _texts, _token_states, _unit, bootstrap_interval,
)

_MEASURES = ("share", "scale", "residual", "spread")

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
