"""Capturing the residual stream after decoder blocks, h^(l)(x) (PAPER.md §1), in one truncated forward pass.

Block ``l`` is 0-indexed; its output is ``hidden_states[l + 1]`` of an HF forward pass, except that HF Llama
applies the final norm to the last entry of ``hidden_states`` — :func:`capture` always returns the raw block
output. The forward pass stops right after the deepest requested block (like TransformerLens'
``stop_at_layer``): the blocks after it and the LM head never run.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import pandas as pd
import torch
from torch import nn

from ._batching import Batch, encode
from .models import check_layers, decoder_blocks, resolve_tokenizer

__all__ = ["Capture", "capture", "record_blocks", "block_hidden", "token_mask", "masked_mean"]


class _StopForward(Exception):
    """Raised by a hook on the deepest requested block to end the forward pass early."""


def block_hidden(output: Any) -> torch.Tensor:
    """The hidden states in a block's output (a tensor in transformers ≥ 5, the first item of a tuple before)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def replace_block_hidden(output: Any, hidden: torch.Tensor) -> Any:
    """``output`` with its hidden states replaced by ``hidden`` (same container type)."""
    if isinstance(output, tuple):
        return (hidden,) + tuple(output[1:])
    if isinstance(output, list):
        return [hidden] + list(output[1:])
    return hidden


@contextlib.contextmanager
def record_blocks(model: nn.Module, layers: Any = "all", *, stop: bool = False
                  ) -> Iterator[dict[int, torch.Tensor]]:
    """Context manager (steering-vectors style): record the outputs of blocks ``layers`` into the yielded dict
    ``{layer: [B, T, d]}`` during the forward passes run inside it (the last pass wins).

    ``stop=True`` aborts each forward pass right after the deepest of ``layers`` with a private exception;
    :func:`run_to_blocks` uses it and swallows that exception. Hooks are removed on exit and on errors.
    """
    layers = check_layers(model, layers)
    blocks = decoder_blocks(model)
    deepest = max(layers)
    store: dict[int, torch.Tensor] = {}
    handles = []

    def make_hook(idx: int):
        def hook(module, args, output):
            store[idx] = block_hidden(output).detach()
            if stop and idx == deepest:
                raise _StopForward

        return hook

    try:
        for idx in layers:
            handles.append(blocks[idx].register_forward_hook(make_hook(idx)))
        yield store
    finally:
        for h in handles:
            h.remove()


def run_to_blocks(model: nn.Module, batch: Batch, layers: list[int]) -> dict[int, torch.Tensor]:
    """One forward pass of ``batch`` that stops after the deepest of ``layers``; returns ``{layer: [B, T, d]}``."""
    with record_blocks(model, layers, stop=True) as store, torch.no_grad():
        try:
            model(**batch.model_inputs(), use_cache=False)
        except _StopForward:
            pass
    missing = [l for l in layers if l not in store]
    if missing:  # pragma: no cover - a model whose forward skips blocks
        raise RuntimeError(f"blocks {missing} did not run during the forward pass of {type(model).__name__}")
    return {l: store[l] for l in layers}


def _bos_id(model: nn.Module, tokenizer: Any = None) -> int | None:
    bos = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None
    if bos is None:
        bos = getattr(getattr(model, "_rmu_tokenizer", None), "bos_token_id", None)
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


@dataclass(frozen=True, eq=False)
class Capture:
    """Block outputs h^(l)(x) per token (``hidden[l]``: ``[B, T, d]``, model dtype) and their token means.

    ``token_mask`` marks the tokens that count in the means (attended, and not BOS when ``exclude_bos``).
    """

    hidden: dict[int, torch.Tensor]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
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
            tok_norm = masked_mean(self.hidden[l].float().norm(dim=-1, keepdim=True), self.token_mask)[:, 0]
            tok_norm = tok_norm.cpu().numpy()
            for i in range(len(n_tok)):
                rows.append({"layer": l, "prompt": i, "n_tokens": int(n_tok[i]),
                             "mean_norm": float(mean_norm[i]), "token_norm": float(tok_norm[i])})
        return pd.DataFrame(rows)

    def numpy(self, layer: int) -> np.ndarray:
        """Block ``layer``'s outputs at the counted tokens as an ``[n_tokens, d]`` fp32 array."""
        return self._get(layer)[self.token_mask.to(self.hidden[layer].device)].float().cpu().numpy()


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
    """Outputs of the requested decoder blocks (residual stream after each block, PAPER.md §1) in ONE forward
    pass that stops after the deepest requested block.

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
    hidden = run_to_blocks(model, batch, idx)
    mask = token_mask(batch, exclude_bos=exclude_bos, bos_token_id=_bos_id(model, tok) if exclude_bos else None)
    return Capture(hidden=hidden, input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                   token_mask=mask, exclude_bos=exclude_bos)
