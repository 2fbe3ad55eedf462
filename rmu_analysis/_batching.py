"""Turning prompts into padded model inputs: tokenise, truncate, pad (left or right), derive position ids.

Shared by every measurement that runs prompts through a model. The rules, in one place:

- ``inputs`` is a list of strings (tokenised with the resolved tokenizer, special tokens added), a dict or
  ``BatchEncoding`` with ``input_ids`` (and optionally ``attention_mask``), or a LongTensor of ids ``[B, T]``.
- position ids are always derived from the attention mask, ``(mask.cumsum(-1) - 1).clamp(min=0)``: a plain
  ``model(input_ids, attention_mask)`` does not do it, and left padding would otherwise shift every position.
- prompts longer than the model's context are truncated, with a warning (never a crash inside torch).
- token ids outside the vocabulary, empty prompts and empty prompt lists are clear ``ValueError`` s.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from .models import forward_params, model_device, resolve_tokenizer

__all__ = [
    "Batch",
    "position_ids_from_mask",
    "context_length",
    "vocab_size",
    "pad_sequences",
    "encode",
    "iter_batches",
    "cache_kwarg",
    "output_cache",
]

_CONTEXT_ATTRS = ("max_position_embeddings", "n_positions", "max_seq_len", "max_sequence_length", "seq_length")


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids ``[B, T]`` that count only attended tokens (0 for leading pads), for left or right padding."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def context_length(model: nn.Module) -> int | None:
    """The model's maximum number of positions (``max_position_embeddings`` or an alias), or None if unknown."""
    cfg = getattr(model, "config", None)
    for attr in _CONTEXT_ATTRS:
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def vocab_size(model: nn.Module) -> int:
    """Number of rows of the input embedding (valid token ids are ``0 .. vocab_size - 1``)."""
    return int(model.get_input_embeddings().weight.shape[0])


@dataclass(frozen=True, eq=False)
class Batch:
    """A padded batch: ``input_ids``, ``attention_mask`` and ``position_ids`` (all ``[B, T]``, long)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    padding_side: str = "right"

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def lengths(self) -> torch.Tensor:
        """Number of attended tokens per row ``[B]``."""
        return self.attention_mask.sum(-1)

    @property
    def last_index(self) -> torch.Tensor:
        """Column of each row's last attended token ``[B]`` (works for left and right padding)."""
        cols = torch.arange(self.attention_mask.shape[1], device=self.attention_mask.device)
        return torch.where(self.attention_mask.bool(), cols, -1).amax(-1)

    @property
    def first_index(self) -> torch.Tensor:
        """Column of each row's first attended token ``[B]``."""
        return self.attention_mask.long().argmax(-1)

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.position_ids.to(device),
                     self.padding_side)

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments for ``model(**batch.model_inputs())``."""
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "position_ids": self.position_ids}

    def rows(self) -> list[list[int]]:
        """The unpadded token ids of each row."""
        mask = self.attention_mask.bool().cpu()
        ids = self.input_ids.cpu()
        return [ids[i][mask[i]].tolist() for i in range(len(self))]


def pad_sequences(seqs: Sequence[Sequence[int]], pad_id: int, padding_side: str = "right") -> Batch:
    """Pad lists of token ids into a :class:`Batch` (on the CPU)."""
    if padding_side not in ("left", "right"):
        raise ValueError(f'padding_side must be "left" or "right", got {padding_side!r}')
    if len(seqs) == 0:
        raise ValueError("no prompts: pass at least one")
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s) == 0:
            raise ValueError(f"prompt {i} has no tokens: pass non-empty prompts")
        row = torch.as_tensor(list(s), dtype=torch.long)
        sl = slice(width - len(s), width) if padding_side == "left" else slice(0, len(s))
        ids[i, sl] = row
        mask[i, sl] = 1
    return Batch(ids, mask, position_ids_from_mask(mask), padding_side)


def _truncate(seqs: list[list[int]], limit: int, side: str, what: str) -> list[list[int]]:
    long = [i for i, s in enumerate(seqs) if len(s) > limit]
    if not long:
        return seqs
    longest = max(len(seqs[i]) for i in long)
    warnings.warn(
        f"{len(long)} {what} longer than {limit} tokens (the longest has {longest}): truncated on the {side} "
        f"to {limit} tokens",
        stacklevel=4,
    )
    keep = (lambda s: s[-limit:]) if side == "left" else (lambda s: s[:limit])
    return [keep(s) if len(s) > limit else s for s in seqs]


def _check_ids(ids: torch.Tensor, model: nn.Module) -> None:
    if ids.numel() == 0:
        return
    n_vocab = vocab_size(model)
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= n_vocab:
        raise ValueError(
            f"token ids must lie in 0–{n_vocab - 1} (the model's vocabulary), got values in {lo}–{hi}: "
            "was the input tokenised with this model's tokenizer?"
        )


def _as_prompt_list(inputs: Any) -> list[str] | None:
    if isinstance(inputs, str):
        return [inputs]
    if isinstance(inputs, (list, tuple)):
        if len(inputs) == 0:
            raise ValueError("the prompt list is empty: pass at least one prompt")
        if all(isinstance(p, str) for p in inputs):
            return list(inputs)
        bad = next(p for p in inputs if not isinstance(p, str))
        raise TypeError(f"prompts must be strings, got an element of type {type(bad).__name__}")
    return None


def encode(
    model: nn.Module,
    inputs: Any,
    tokenizer: Any = None,
    *,
    padding_side: str | None = None,
    truncation_side: str | None = None,
    max_length: int | None = None,
    reserve: int = 0,
    device: torch.device | str | None = None,
) -> Batch:
    """Turn ``inputs`` (strings, a dict/``BatchEncoding`` or a LongTensor of ids) into a padded :class:`Batch`.

    Strings are tokenised without padding, truncated to ``max_length`` (default: the model's context minus
    ``reserve`` tokens kept free for generation) on ``truncation_side`` (default: the tokenizer's), then padded
    on ``padding_side`` (default: the tokenizer's, else right). Pre-tokenised inputs keep their layout; they are
    only truncated (with a warning) when longer than the limit. The batch is moved to ``device`` (default: the
    model's input device).
    """
    device = model_device(model) if device is None else device
    limit = _limit(model, max_length, reserve)
    prompts = _as_prompt_list(inputs)
    if prompts is not None:
        tok = resolve_tokenizer(model, tokenizer)
        padding_side = padding_side or getattr(tok, "padding_side", None) or "right"
        truncation_side = truncation_side or getattr(tok, "truncation_side", None) or "right"
        seqs = [list(s) for s in tok(prompts, add_special_tokens=True, padding=False, truncation=False)["input_ids"]]
        if limit is not None:
            seqs = _truncate(seqs, limit, truncation_side, "prompt(s) are")
        batch = pad_sequences(seqs, tok.pad_token_id, padding_side)
        _check_ids(batch.input_ids, model)
        return batch.to(device)
    return _encode_tensors(model, inputs, limit, padding_side).to(device)


def _limit(model: nn.Module, max_length: int | None, reserve: int) -> int | None:
    ctx = context_length(model)
    if max_length is not None:
        if max_length < 1:
            raise ValueError(f"max_length must be at least 1, got {max_length}")
        limit = max_length if ctx is None else min(max_length, ctx - reserve)
    else:
        limit = None if ctx is None else ctx - reserve
    if limit is not None and limit < 1:
        raise ValueError(
            f"no room for a prompt: the model's context is {ctx} tokens and {reserve} are reserved for generation"
        )
    return limit


def _encode_tensors(model: nn.Module, inputs: Any, limit: int | None, padding_side: str | None) -> Batch:
    if isinstance(inputs, torch.Tensor):
        ids, mask = inputs, None
    elif hasattr(inputs, "keys") and "input_ids" in inputs.keys():
        ids, mask = inputs["input_ids"], inputs.get("attention_mask") if hasattr(inputs, "get") else None
    else:
        raise TypeError(
            "inputs must be a list of strings, a dict/BatchEncoding with input_ids (and attention_mask) or a "
            f"LongTensor of token ids, got {type(inputs).__name__}"
        )
    ids = torch.as_tensor(ids)
    if ids.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64) or ids.dtype == torch.bool:
        raise TypeError(f"input_ids must be integer token ids, got dtype {ids.dtype}")
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2:
        raise ValueError(f"input_ids must have shape [batch, tokens], got {tuple(ids.shape)}")
    if ids.shape[0] == 0:
        raise ValueError("the batch is empty: pass at least one prompt")
    if ids.shape[1] == 0:
        raise ValueError("the prompts have no tokens: pass non-empty input_ids")
    ids = ids.long()
    if mask is None:
        mask = torch.ones_like(ids)
    else:
        mask = torch.as_tensor(mask).long().to(ids.device)
        if mask.dim() == 1:
            mask = mask.unsqueeze(0)
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask has shape {tuple(mask.shape)} but input_ids has {tuple(ids.shape)}")
    empty = (mask.sum(-1) == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"prompt(s) {empty} have no attended tokens (attention_mask is all zeros)")
    left = bool((mask[:, 0] == 0).any())  # a leading pad anywhere means left padding
    side = "left" if left else (padding_side or "right")
    if limit is not None and ids.shape[1] > limit:
        n_long = int((mask.sum(-1) > limit).sum())
        warnings.warn(
            f"input_ids have {ids.shape[1]} columns, more than the limit of {limit} tokens ({n_long} prompt(s) "
            f"longer): truncated on the {'left' if left else 'right'} to {limit} columns",
            stacklevel=4,
        )
        ids, mask = (ids[:, -limit:], mask[:, -limit:]) if left else (ids[:, :limit], mask[:, :limit])
    _check_ids(ids[mask.bool()], model)
    return Batch(ids, mask, position_ids_from_mask(mask), side)


def iter_batches(
    model: nn.Module,
    inputs: Any,
    tokenizer: Any = None,
    *,
    batch_size: int = 32,
    **encode_kwargs: Any,
) -> Iterator[tuple[range, Batch]]:
    """Yield ``(row_range, Batch)`` chunks of at most ``batch_size`` prompts, in input order.

    Strings are tokenised per chunk; pre-tokenised inputs are encoded once and split by rows.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    prompts = _as_prompt_list(inputs)
    if prompts is not None:
        for start in range(0, len(prompts), batch_size):
            stop = min(start + batch_size, len(prompts))
            yield range(start, stop), encode(model, prompts[start:stop], tokenizer, **encode_kwargs)
        return
    full = encode(model, inputs, tokenizer, **encode_kwargs)
    for start in range(0, len(full), batch_size):
        stop = min(start + batch_size, len(full))
        sl = slice(start, stop)
        yield range(start, stop), Batch(full.input_ids[sl], full.attention_mask[sl], full.position_ids[sl],
                                        full.padding_side)


def cache_kwarg(model: nn.Module) -> str:
    """Name of the forward argument that takes the KV cache (``cache`` in transformers ≥ 5, else
    ``past_key_values``)."""
    return "cache" if "cache" in forward_params(model) else "past_key_values"


def output_cache(output: Any) -> Any:
    """The KV cache of a model output, under either of its names."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)
