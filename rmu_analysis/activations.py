"""The residual stream after decoder blocks, h^(l)(x) (arXiv 2408.06223; docs/paper.md), from forward passes that
stop after the deepest block needed, and the per-token statistics every other module reads from it.

Block ``l`` is 0-indexed; its output is ``hidden_states[l + 1]`` of an HF forward pass, except that HF Llama
applies the final norm to the last entry of ``hidden_states`` — :func:`capture` always returns the raw block
output (:mod:`rmu_analysis.hooks`). The forward pass stops right after the deepest requested block (like
TransformerLens' ``stop_at_layer``): the blocks after it and the LM head never run.

- :func:`capture` — one pass over a batch, a :class:`Capture`; :func:`capture_batches` — the same in chunks.
- :func:`mean_token_norm` — the mean per-token norm ‖h^(l)‖ over a token mask (the scale c is compared with,
  Fig. 4, and Adaptive RMU's coefficient, Eq. 24); :func:`token_norms` — every counted token's norm per block.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import pandas as pd
import torch
from torch import nn

from . import hooks
from ._batching import Batch, encode, iter_batches
from .models import attached_tokenizer, check_layers, resolve_tokenizer

__all__ = ["Capture", "capture", "capture_batches", "token_mask", "masked_mean", "mean_token_norm", "token_norms",
           "bos_token_id"]


def capture_batches(model: nn.Module, prompts: Any, layers: Any = "all", *, tokenizer: Any = None,
                    exclude_bos: bool = False, batch_size: int = 32, max_length: int | None = None
                    ) -> Iterator[tuple[range, "Capture"]]:
    """:func:`capture` in chunks of ``batch_size`` prompts: yields ``(row_range, Capture)`` in input order (one
    forward pass per chunk, stopped after the deepest requested block)."""
    idx = check_layers(model, layers)
    tok = resolve_tokenizer(model, tokenizer) if isinstance(prompts, (str, list, tuple)) else tokenizer
    bos = bos_token_id(model, tok) if exclude_bos else None
    for rows, batch in iter_batches(model, prompts, tok, batch_size=batch_size, max_length=max_length):
        yield rows, _capture_batch(model, batch, idx, exclude_bos, bos)


def _capture_batch(model: nn.Module, batch: Batch, layers: list[int], exclude_bos: bool, bos: int | None
                   ) -> "Capture":
    with torch.no_grad():
        rec = hooks.forward(model, batch.model_inputs(), layers, stop_after=max(layers))
    missing = [l for l in layers if l not in rec.outputs]
    if missing:  # pragma: no cover - a model whose forward skips blocks
        raise RuntimeError(f"blocks {missing} did not run during the forward pass of {type(model).__name__}")
    mask = token_mask(batch, exclude_bos=exclude_bos, bos_token_id=bos)
    return Capture(hidden={l: rec.outputs[l] for l in layers}, input_ids=batch.input_ids,
                   attention_mask=batch.attention_mask, position_ids=batch.position_ids, token_mask=mask,
                   exclude_bos=exclude_bos)


def bos_token_id(model: nn.Module, tokenizer: Any = None) -> int | None:
    """The BOS token id: the tokenizer's, else that of the tokenizer attached to the model, else the config's."""
    bos = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None
    if bos is None:
        bos = getattr(attached_tokenizer(model), "bos_token_id", None)
    if bos is None:
        bos = getattr(getattr(model, "config", None), "bos_token_id", None)
    return bos


def token_mask(batch: Batch, *, exclude_bos: bool = False, bos_token_id: int | None = None) -> torch.Tensor:
    """Boolean ``[B, T]`` mask of the tokens that count in a token mean.

    ``exclude_bos=True`` drops each row's first attended token when it is ``bos_token_id``.
    """
    mask = batch.attention_mask.bool().clone()
    if exclude_bos:
        if bos_token_id is None:
            raise ValueError("exclude_bos=True but the BOS token id is unknown: pass a tokenizer with a bos_token")
        rows = torch.arange(len(batch), device=mask.device)
        first = batch.first_index
        is_bos = batch.input_ids[rows, first] == bos_token_id
        mask[rows[is_bos], first[is_bos]] = False
        empty = (mask.sum(-1) == 0).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"prompt(s) {empty} have no tokens left after excluding BOS")
    return mask


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden [B, T, d]`` over the tokens where ``mask [B, T]`` is True, in fp32: ``[B, d]``."""
    m = mask.to(hidden.device, torch.float32).unsqueeze(-1)
    return (hidden.float() * m).sum(1) / m.sum(1).clamp(min=1.0)


def mean_token_norm(hidden: torch.Tensor, mask: torch.Tensor | None = None, *, per_sample: bool = False
                    ) -> torch.Tensor:
    """Mean per-token L2 norm of ``hidden [B, T, d]`` (fp32, no gradient) over the tokens where ``mask [B, T]`` is
    True (every token when None): a scalar, or one value per sequence ``[B]`` with ``per_sample``."""
    norms = hidden.detach().float().norm(dim=-1)  # [B, T]
    if mask is None:
        return norms.mean(dim=1) if per_sample else norms.mean(dim=1).mean(dim=0)
    m = mask.to(norms.device).float()
    per_seq = (norms * m).sum(dim=1) / m.sum(dim=1).clamp_min(1)
    return per_seq if per_sample else (norms * m).sum() / m.sum().clamp_min(1)


@dataclass(frozen=True, eq=False)
class Capture:
    """Block outputs h^(l)(x) per token (``hidden[l]``: ``[B, T, d]``, model dtype) and their token means.

    ``token_mask`` marks the tokens that count in the means (attended, and not BOS when ``exclude_bos``).
    """

    hidden: dict[int, torch.Tensor]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    token_mask: torch.Tensor
    exclude_bos: bool

    @property
    def layers(self) -> list[int]:
        return sorted(self.hidden)

    def __getitem__(self, layer: int) -> torch.Tensor:
        return self._get(layer)

    def _get(self, layer: int) -> torch.Tensor:
        if layer not in self.hidden:
            raise KeyError(f"block {layer} was not captured: captured blocks are {self.layers}")
        return self.hidden[layer]

    def mean(self, layer: int) -> torch.Tensor:
        """Token mean of block ``layer``'s output per prompt, ``[B, d]`` fp32 (the paper's h^(l)(x))."""
        return masked_mean(self._get(layer), self.token_mask)

    @property
    def means(self) -> dict[int, torch.Tensor]:
        """``{layer: mean(layer)}`` for every captured block."""
        return {l: self.mean(l) for l in self.layers}

    def to_frame(self) -> pd.DataFrame:
        """One row per (layer, prompt): token count, norm of the token mean, mean per-token norm."""
        rows = []
        n_tok = self.token_mask.sum(-1).cpu().numpy()
        for l in self.layers:
            mean_norm = self.mean(l).norm(dim=-1).cpu().numpy()
            tok_norm = mean_token_norm(self.hidden[l], self.token_mask, per_sample=True).cpu().numpy()
            for i in range(len(n_tok)):
                rows.append({"layer": l, "prompt": i, "n_tokens": int(n_tok[i]),
                             "mean_norm": float(mean_norm[i]), "token_norm": float(tok_norm[i])})
        return pd.DataFrame(rows)

    def tokens(self, layer: int) -> torch.Tensor:
        """Block ``layer``'s outputs at the counted tokens, ``[n_tokens, d]`` fp32 (prompts one after another)."""
        h = self._get(layer)
        return h[self.token_mask.to(h.device)].float()

    def numpy(self, layer: int) -> np.ndarray:
        """:meth:`tokens` as a numpy array."""
        return self.tokens(layer).cpu().numpy()


def capture(
    model: nn.Module,
    inputs: Any,
    layers: Any = "all",
    *,
    tokenizer: Any = None,
    exclude_bos: bool = False,
    padding_side: str | None = None,
    max_length: int | None = None,
) -> Capture:
    """Outputs of the requested decoder blocks (residual stream after each block, docs/paper.md) in ONE
    forward pass that stops after the deepest requested block.

    ``inputs``: a list of strings (tokenised with ``tokenizer`` or the one saved beside the model), a
    dict/``BatchEncoding`` with ``input_ids``/``attention_mask``, or a LongTensor of ids. ``layers``: ``"all"``,
    an int or a list of ints (negative counts from the end). Token means (``.mean(l)``) ignore padding and,
    with ``exclude_bos=True``, the BOS token.
    """
    idx = check_layers(model, layers)
    tok = None
    if isinstance(inputs, (str, list, tuple)):
        tok = resolve_tokenizer(model, tokenizer)
    batch = encode(model, inputs, tok, padding_side=padding_side, max_length=max_length)
    return _capture_batch(model, batch, idx, exclude_bos, bos_token_id(model, tok) if exclude_bos else None)


def token_norms(model: nn.Module, prompts: Any, layers: Any = "all", *, tokenizer: Any = None,
                exclude_bos: bool = False, batch_size: int = 32, max_length: int | None = None
                ) -> dict[int, np.ndarray]:
    """‖h^(l)‖ of every counted token of ``prompts`` (padding and, with ``exclude_bos``, BOS left out) at each
    requested block: ``{l: [n_tokens]}`` float64, prompts one after another (:func:`capture_batches`)."""
    parts: dict[int, list[np.ndarray]] = {}
    for _, cap in capture_batches(model, prompts, layers, tokenizer=tokenizer, exclude_bos=exclude_bos,
                                  batch_size=batch_size, max_length=max_length):
        for l in cap.layers:
            parts.setdefault(l, []).append(cap.tokens(l).norm(dim=-1).cpu().numpy())
    return {l: np.concatenate(p).astype(np.float64) for l, p in parts.items()}
