"""Token confidence (C1 in docs/paper.md; arXiv 2408.06223, Fig. 2a–d): MaxLogit — the largest logit of each
next/generated token — with the max softmax probability and the entropy (nats) of the same distribution.

Prompts are raw strings (no chat template). Batches are padded (left by default), position ids come from the
attention mask and greedy decoding uses a KV cache, so every number equals a one-prompt-at-a-time run (up to
float rounding, ~1e-6). With ``generate=k`` exactly k tokens are decoded for every prompt: decoding does not
stop at EOS; tokens after the first generated EOS are marked in ``after_eos`` (the paper reports 30 tokens).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm import tqdm  # text bars: tqdm.auto warns in notebooks without ipywidgets

from ._batching import cache_kwarg, encode, output_cache, pad_sequences
from .models import forward_params, model_device, resolve_tokenizer

__all__ = ["Confidence", "measure_confidence", "confidence_from_logits", "METRICS"]

METRICS: tuple[str, ...] = ("max_logit", "max_prob", "entropy")


def confidence_from_logits(logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """MaxLogit, max softmax probability and entropy (nats) over the last axis of ``logits`` (computed in fp32).

    Returns ``{"max_logit", "max_prob", "entropy", "token"}``, each with the leading shape of ``logits``.
    """
    x = logits.float()
    max_logit, token = x.max(-1)
    logp = torch.log_softmax(x, -1)
    p = logp.exp()
    entropy = -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1)
    return {"max_logit": max_logit, "max_prob": p.amax(-1), "entropy": entropy, "token": token}


def after_eos_mask(tokens: np.ndarray, eos_token_id: int | Sequence[int] | None) -> np.ndarray:
    """Boolean mask ``[N, k]``: True for generated tokens that come after the first generated EOS."""
    tokens = np.asarray(tokens)
    if eos_token_id is None:
        return np.zeros(tokens.shape, dtype=bool)
    eos = np.isin(tokens, np.atleast_1d(np.asarray(eos_token_id)))
    seen_before = np.cumsum(eos, axis=-1) - eos  # EOS count strictly before each position
    return seen_before > 0


@dataclass(frozen=True, eq=False)
class Confidence:
    """Per-token confidence of each prompt's next token (``generate=0``) or k greedily generated tokens.

    Arrays are ``[n_prompts, n_tokens]`` (``n_tokens`` = 1 for ``generate=0``, else k): ``max_logit`` (the
    paper's token confidence), ``max_prob``, ``entropy`` (nats), ``tokens`` (greedy token ids) and
    ``after_eos`` (True after the first generated EOS).
    """

    prompts: tuple[str, ...]
    max_logit: np.ndarray
    max_prob: np.ndarray
    entropy: np.ndarray
    tokens: np.ndarray
    after_eos: np.ndarray
    generate: int
    completions: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return len(self.prompts)

    def values(self, metric: str = "max_logit", *, include_after_eos: bool = True) -> np.ndarray:
        """All per-token values of ``metric`` as a flat array (optionally without tokens after EOS)."""
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        arr = getattr(self, metric)
        return arr.ravel() if include_after_eos else arr[~self.after_eos]

    def per_prompt(self, *, include_after_eos: bool = True) -> pd.DataFrame:
        """Mean of each metric over each prompt's tokens (one row per prompt)."""
        keep = np.ones_like(self.after_eos) if include_after_eos else ~self.after_eos
        n = keep.sum(-1)
        data: dict[str, Any] = {"prompt": np.arange(len(self)), "n_tokens": n}
        for m in METRICS:
            arr = getattr(self, m)
            with np.errstate(invalid="ignore", divide="ignore"):
                data[m] = np.where(n > 0, (arr * keep).sum(-1) / np.maximum(n, 1), np.nan)
        return pd.DataFrame(data)

    def summary(self, *, include_after_eos: bool = True) -> pd.DataFrame:
        """Mean, std, median, min and max of each metric over all tokens (rows: metrics)."""
        rows = {}
        for m in METRICS:
            v = self.values(m, include_after_eos=include_after_eos)
            rows[m] = {"mean": v.mean(), "std": v.std(), "median": np.median(v), "min": v.min(), "max": v.max(),
                       "n": v.size}
        return pd.DataFrame(rows).T

    def to_frame(self) -> pd.DataFrame:
        """One row per (prompt, token): ``prompt``, ``step``, ``token``, the three metrics and ``after_eos``."""
        n, k = self.max_logit.shape
        return pd.DataFrame({
            "prompt": np.repeat(np.arange(n), k),
            "step": np.tile(np.arange(k), n),
            "token": self.tokens.ravel(),
            **{m: getattr(self, m).ravel() for m in METRICS},
            "after_eos": self.after_eos.ravel(),
        })


def _decode_batch(model: nn.Module, seqs: list[list[int]], pad_id: int, padding_side: str, steps: int,
                  params: set[str]) -> dict[str, torch.Tensor]:
    """Greedy-decode ``steps`` tokens (≥ 1) for one padded batch; return per-step metrics ``[B, steps]``."""
    batch = pad_sequences(seqs, pad_id, padding_side).to(model_device(model))
    mask, pos = batch.attention_mask, batch.position_ids
    rows = torch.arange(len(batch), device=mask.device)
    kwargs: dict[str, Any] = {"use_cache": steps > 1}
    if padding_side == "left" and "logits_to_keep" in params:
        kwargs["logits_to_keep"] = 1
    out = model(input_ids=batch.input_ids, attention_mask=mask, position_ids=pos, **kwargs)
    logits = out.logits[:, -1] if padding_side == "left" else out.logits[rows, batch.last_index]
    per_step = [confidence_from_logits(logits)]
    next_pos = pos[rows, batch.last_index] + 1
    cache_name = cache_kwarg(model)
    for _ in range(steps - 1):
        token = per_step[-1]["token"].unsqueeze(-1)
        mask = torch.cat([mask, torch.ones_like(token)], dim=-1)
        out = model(input_ids=token, attention_mask=mask, position_ids=next_pos.unsqueeze(-1), use_cache=True,
                    **{cache_name: output_cache(out)})
        per_step.append(confidence_from_logits(out.logits[:, -1]))
        next_pos = next_pos + 1
    return {key: torch.stack([s[key] for s in per_step], dim=1).cpu() for key in per_step[0]}


def measure_confidence(
    model: nn.Module,
    prompts: Sequence[str],
    tokenizer: Any = None,
    *,
    generate: int = 0,
    batch_size: int = 32,
    padding_side: str = "left",
    max_length: int | None = None,
    progress: bool = False,
) -> Confidence:
    """Token confidence (C1, Fig. 2a–d) of each prompt's next token, or, with ``generate=k``, of each
    of k greedily decoded tokens (the paper uses k = 30): MaxLogit, max softmax probability, entropy (nats).

    Prompts are sorted by length and decoded ``batch_size`` at a time with ``padding_side`` padding and a KV
    cache; results come back in input order and equal a one-prompt-at-a-time loop. Prompts longer than the
    model's context minus k are truncated on the left (the end of the prompt is kept), with a warning. An empty
    or whitespace-only prompt is a ``ValueError``.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("the prompt list is empty: pass at least one prompt")
    blank = [i for i, p in enumerate(prompts) if isinstance(p, str) and not p.strip()]
    if blank:  # it would score the token after BOS alone, the same for every such prompt
        raise ValueError(f"prompt(s) {blank[:10]} are empty or whitespace only: pass prompts with text")
    if isinstance(generate, bool) or not isinstance(generate, int) or generate < 0:
        raise ValueError(f"generate must be an int ≥ 0 (number of tokens to decode), got {generate!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    tok = resolve_tokenizer(model, tokenizer)
    steps = max(generate, 1)
    encoded = encode(model, prompts, tok, padding_side=padding_side, truncation_side="left",
                     max_length=max_length, reserve=steps - 1, device="cpu")
    seqs = encoded.rows()
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    params = forward_params(model)
    chunks = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    if progress:
        chunks = tqdm(chunks, desc="confidence", unit="batch")
    results: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for chunk in chunks:
            got = _decode_batch(model, [seqs[i] for i in chunk], tok.pad_token_id, padding_side, steps, params)
            for key, val in got.items():
                if key not in results:
                    results[key] = torch.empty((len(seqs), steps), dtype=val.dtype)
                results[key][torch.as_tensor(chunk)] = val
    tokens = results["token"].numpy()
    if generate > 0:
        after = after_eos_mask(tokens, tok.eos_token_id)
        completions = tuple(tok.batch_decode(tokens.tolist(), skip_special_tokens=False))
    else:
        after = np.zeros(tokens.shape, dtype=bool)
        completions = None
    return Confidence(
        prompts=tuple(prompts),
        max_logit=results["max_logit"].numpy().astype(np.float64),
        max_prob=results["max_prob"].numpy().astype(np.float64),
        entropy=results["entropy"].numpy().astype(np.float64),
        tokens=tokens,
        after_eos=after,
        generate=generate,
        completions=completions,
    )
