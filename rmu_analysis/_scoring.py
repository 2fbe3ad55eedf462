"""Batched log-likelihoods of continuations after contexts (:func:`rmu_analysis.evaluation.score_continuations`'s
engine): plain padded passes, and the shared-context path that runs each context once and scores its
continuations from the cached keys and values, in chunks sized by the model's cost per pass."""
from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm  # text bars: tqdm.auto warns in notebooks without ipywidgets

from ._batching import cache_kwarg, output_cache
from .models import hidden_size


# ----------------------------------------------------------------------------------------------------------
# batched log-likelihoods
# ----------------------------------------------------------------------------------------------------------


def _model_max_length(model: nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _score_batch(
    model: nn.Module,
    seqs: list[list[int]],
    targets: list[list[list[int]]],
    *,
    pad_id: int,
    left: bool,
    device: torch.device,
    params: set[str],
) -> list[list[float]]:
    """Sum of log p(target tokens) for each target of each sequence.

    Each sequence is ``context + target[:-1]``; a target of k tokens is read from the logits at the sequence's
    last k positions (several single-token targets can share one sequence: the one-pass letter case).
    """
    lengths = [len(s) for s in seqs]
    width = max(lengths)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    offsets = []
    for b, s in enumerate(seqs):
        off = width - len(s) if left else 0
        ids[b, off: off + len(s)] = torch.tensor(s, dtype=torch.long)
        mask[b, off: off + len(s)] = 1
        offsets.append(off)
    kwargs: dict[str, Any] = {}
    if "attention_mask" in params:
        kwargs["attention_mask"] = mask.to(device)
    if "position_ids" in params:
        kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0).to(device)
    keep = max(len(t) for ts in targets for t in ts)
    first = 0  # index (in padded coordinates) of the first logit the model returns
    if left and "logits_to_keep" in params:
        kwargs["logits_to_keep"] = keep
        first = width - keep
    out = model(ids.to(device), **kwargs)
    logits = out.logits if hasattr(out, "logits") else (out[0] if isinstance(out, (tuple, list)) else out)
    if logits.shape[1] != width - first:  # the model ignored logits_to_keep
        first = width - logits.shape[1]

    rows, cols, toks, owner = [], [], [], []
    for b, ts in enumerate(targets):
        end = offsets[b] + lengths[b]  # one past the last real token
        for j, t in enumerate(ts):
            k = len(t)
            for m, tok in enumerate(t):
                rows.append(b)
                cols.append(end - k + m - first)
                toks.append(tok)
                owner.append((b, j))
    sel = logits[torch.tensor(rows, device=logits.device), torch.tensor(cols, device=logits.device)]
    logp = torch.log_softmax(sel.float(), dim=-1)
    picked = logp.gather(-1, torch.tensor(toks, device=logp.device)[:, None])[:, 0].double().cpu().numpy()
    result = [[0.0] * len(ts) for ts in targets]
    for (b, j), v in zip(owner, picked):
        result[b][j] += float(v)
    return result


class _CannotShare(Exception):
    """The model's forward gave no KV cache the shared-context scorer can extend (it then scores in full)."""


def _can_share_context(params: set[str]) -> bool:
    """Whether ``model.forward`` takes what the shared-context scorer passes: a mask, position ids and a KV cache."""
    return {"attention_mask", "position_ids", "use_cache"} <= params and bool({"cache", "past_key_values"} & params)


def _run_full(model, requests, logliks, n_tokens, *, batch_size, pad_id, left, device, params, progress, desc):
    """The reference scorer: every request's sequence (context + continuation[:-1]) in full, ``batch_size``
    sequences per forward pass, longest first."""
    order = sorted(range(len(requests)), key=lambda r: -len(requests[r][1]))  # less padding per batch
    batches = [order[s: s + batch_size] for s in range(0, len(order), batch_size)]
    if progress:
        batches = tqdm(batches, desc=desc, unit="batch")
    for batch in batches:
        reqs = [requests[r] for r in batch]
        scores = _score_batch(
            model, [q[1] for q in reqs], [q[2] for q in reqs],
            pad_id=pad_id, left=left, device=device, params=params,
        )
        for (i, _, targets, choice_idx), s in zip(reqs, scores):
            for j, t, v in zip(choice_idx, targets, s):
                logliks[i, j] = v
                n_tokens[i, j] = len(t)


def _context_groups(requests) -> list[tuple[int, list[int], list[tuple[int, list[int]]]]]:
    """``(question, context ids, [(choice, continuation ids), ...])``: the requests regrouped by the exact context
    they see. A request's sequence is ``context + target[:-1]``, so its context is the sequence without its last
    ``len(target) - 1`` tokens; a question's continuations share one context unless a left truncation cut it by a
    different amount for continuations of different lengths (then each length has its own)."""
    groups: dict[tuple[int, tuple[int, ...]], list[tuple[int, list[int]]]] = {}
    for i, seq, targets, choice_idx in requests:
        for j, t in zip(choice_idx, targets):
            ctx = seq[: len(seq) - (len(t) - 1)]  # several targets share a sequence only when all are one token
            groups.setdefault((i, tuple(ctx)), []).append((j, t))
    return [(i, list(ctx), conts) for (i, ctx), conts in groups.items()]


def _cache_layers(cache: Any, width: int, total: int) -> list:
    """The cache's per-layer K/V stores when all are plain dynamic ones holding the ``width`` context tokens in
    full (no sliding window that would drop some of the ``total`` tokens, no recurrent state, no legacy tuples),
    else ``_CannotShare``."""
    layers = getattr(cache, "layers", None)
    if not layers or not hasattr(cache, "get_seq_length"):
        raise _CannotShare("no cache object with layers")
    try:
        from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer
    except ImportError as err:  # pragma: no cover - transformers without per-layer caches
        raise _CannotShare("transformers has no DynamicLayer") from err
    for layer in layers:
        if type(layer) is DynamicSlidingWindowLayer:
            window = getattr(layer, "sliding_window", None)
            if not isinstance(window, int) or total >= window:  # the window would drop some context tokens
                raise _CannotShare("sliding-window cache shorter than the inputs")
        elif type(layer) is not DynamicLayer:
            raise _CannotShare(f"cache layer {type(layer).__name__}")
        keys = getattr(layer, "keys", None)
        if not isinstance(keys, torch.Tensor) or keys.dim() != 4 or keys.shape[-2] != width:
            raise _CannotShare("cache does not hold the context")
    return list(layers)


def _score_shared_batch(
    model: nn.Module,
    groups: list[tuple[int, list[int], list[tuple[int, list[int]]]]],
    *,
    pad_id: int,
    device: torch.device,
    params: set[str],
    cache_name: str,
    pass_cost: float = float("inf"),
) -> list[list[float]]:
    """Summed log p(continuation) of each continuation of each context group, running every context once.

    Pass 1: the contexts, left-padded (so each ends in the last column), with ``use_cache=True``; the log-prob of
    every continuation's first token is read from the context's last logits. Pass 2 (only when some continuation
    has more than one token): the KV cache is expanded to one row per such continuation (rows of the cache
    selected, repeated), and ``continuation[:-1]`` (right-padded) runs on it, with the context's mask followed by
    the continuation's and position ids continuing from the context's length, so each token sees exactly what it
    sees in the full sequence; ``continuation[m + 1]`` is read at the pass's column ``m``. Forward hooks run in
    both passes, on every token.
    """
    ctxs = [g[1] for g in groups]
    width = max(len(c) for c in ctxs)
    ids = torch.full((len(ctxs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ctxs), width), dtype=torch.long)
    for b, c in enumerate(ctxs):
        ids[b, width - len(c):] = torch.tensor(c, dtype=torch.long)
        mask[b, width - len(c):] = 1
    rest = [(b, n, t) for b, g in enumerate(groups) for n, (_, t) in enumerate(g[2]) if len(t) > 1]
    kwargs: dict[str, Any] = {"attention_mask": mask.to(device),
                              "position_ids": (mask.cumsum(-1) - 1).clamp(min=0).to(device), "use_cache": bool(rest)}
    if "logits_to_keep" in params:
        kwargs["logits_to_keep"] = 1
    out = model(ids.to(device), **kwargs)
    logits = out.logits if hasattr(out, "logits") else (out[0] if isinstance(out, (tuple, list)) else out)
    first = torch.log_softmax(logits[:, -1].float(), dim=-1)
    b_idx = [b for b, g in enumerate(groups) for _ in g[2]]
    t_idx = [t[0] for g in groups for _, t in g[2]]
    picked = first[torch.tensor(b_idx, device=first.device), torch.tensor(t_idx, device=first.device)]
    result: list[list[float]] = [[] for _ in groups]
    for b, v in zip(b_idx, picked.double().cpu().tolist()):
        result[b].append(v)
    if not rest:
        return result

    cache = output_cache(out)
    k_all = max(len(t) for _, _, t in rest) - 1
    layers = _cache_layers(cache, width, width + k_all)
    rest.sort(key=lambda x: -len(x[2]))
    chunks = _length_chunks([len(t) - 1 for _, _, t in rest], pass_cost)
    for c, (lo, hi) in enumerate(chunks):
        part = rest[lo:hi]
        rows = torch.tensor([b for b, _, _ in part], dtype=torch.long)
        last = c == len(chunks) - 1
        run_cache = cache if last else _copy_cache(cache, layers)  # the last chunk may consume the original
        for layer in (layers if last else run_cache.layers):  # one row per continuation (rows repeat)
            _select_rows(layer, rows)
        k = len(part[0][2]) - 1
        c_ids = torch.full((len(part), k), pad_id, dtype=torch.long)
        c_mask = torch.zeros((len(part), k), dtype=torch.long)
        for r, (_, _, t) in enumerate(part):
            c_ids[r, : len(t) - 1] = torch.tensor(t[:-1], dtype=torch.long)
            c_mask[r, : len(t) - 1] = 1
        ctx_len = mask.sum(-1)[rows]
        pos = torch.where(c_mask.bool(), ctx_len[:, None] + torch.arange(k)[None, :], 0)  # pads: any valid position
        out2 = model(c_ids.to(device), attention_mask=torch.cat([mask[rows], c_mask], dim=1).to(device),
                     position_ids=pos.to(device), use_cache=True, **{cache_name: run_cache})
        logits2 = out2.logits if hasattr(out2, "logits") else (out2[0] if isinstance(out2, (tuple, list)) else out2)
        if logits2.shape[:2] != (len(part), k):
            raise _CannotShare("the continuation pass returned other positions")
        rr = [r for r, (_, _, t) in enumerate(part) for _ in range(len(t) - 1)]
        cc = [m for _, _, t in part for m in range(len(t) - 1)]
        toks = [tok for _, _, t in part for tok in t[1:]]
        sel = logits2[torch.tensor(rr, device=logits2.device), torch.tensor(cc, device=logits2.device)]
        logp = torch.log_softmax(sel.float(), dim=-1)
        vals = logp.gather(-1, torch.tensor(toks, device=logp.device)[:, None])[:, 0].double().cpu().tolist()
        q = 0
        for b, n, t in part:
            result[b][n] += float(sum(vals[q: q + len(t) - 1]))
            q += len(t) - 1
    return result


def _pass_cost(model: nn.Module, device: torch.device) -> float:
    """What one more continuation pass costs, in padding tokens (for :func:`_length_chunks`). On a CPU a pass's
    fixed cost (Python and kernel calls, per block) is worth about 70 tokens of a width-128 model (the organism,
    measured) and the work per token grows with width²; on an accelerator the launch overhead of a pass is worth
    more than the padding of a whole batch: one pass."""
    if device.type != "cpu":
        return float("inf")
    try:
        width = hidden_size(model)
    except Exception:  # pragma: no cover - exotic models: a guess that splits little
        width = 128
    return 1.2e6 / float(width) ** 2


def _length_chunks(lengths: list[int], pass_cost: float) -> list[tuple[int, int]]:
    """Split ``lengths`` (sorted longest first) into runs ``[lo, hi)``, each padded to its first length, minimising
    padded tokens + ``pass_cost`` per run (dynamic programme over the boundaries between different lengths)."""
    n = len(lengths)
    if not np.isfinite(pass_cost):
        return [(0, n)]
    starts = [i for i in range(n) if i == 0 or lengths[i] != lengths[i - 1]] + [n]
    g = len(starts) - 1
    best = [0.0] + [float("inf")] * g  # best[e]: cost of the rows before starts[e]
    cut = [0] * (g + 1)
    for e in range(1, g + 1):
        for b in range(e):
            cost = best[b] + pass_cost + (starts[e] - starts[b]) * lengths[starts[b]]
            if cost < best[e]:
                best[e], cut[e] = cost, b
    chunks, e = [], g
    while e > 0:
        chunks.append((starts[cut[e]], starts[e]))
        e = cut[e]
    return chunks[::-1]


def _select_rows(layer: Any, rows: torch.Tensor) -> None:
    """``layer.batch_select_indices(rows)`` (rows may repeat) with ``index_select``, several times faster on a CPU
    than the advanced indexing transformers uses; each layer's K/V stay on their own device (``device_map``)."""
    idx = rows.to(layer.keys.device)
    layer.keys = layer.keys.index_select(0, idx)
    layer.values = layer.values.index_select(0, idx)


def _copy_cache(cache: Any, layers: list) -> Any:
    """A copy of ``cache`` whose layers can be re-selected and extended without touching the original's tensors
    (shallow: the layers' tensors are shared until ``batch_select_indices`` replaces them)."""
    new = copy.copy(cache)
    new.layers = [copy.copy(layer) for layer in layers]
    return new


def _run_shared(model, requests, logliks, n_tokens, *, batch_size, pad_id, device, params, progress, desc):
    """Shared-context scorer: ``batch_size`` contexts per forward pass (longest first), each run once, then one
    pass over the continuations of the batch on the contexts' KV cache (:func:`_score_shared_batch`)."""
    cache_name = cache_kwarg(model)
    pass_cost = _pass_cost(model, device)
    groups = _context_groups(requests)
    order = sorted(range(len(groups)), key=lambda g: -len(groups[g][1]))
    batches = [order[s: s + batch_size] for s in range(0, len(order), batch_size)]
    if progress:
        batches = tqdm(batches, desc=desc, unit="batch")
    for batch in batches:
        gs = [groups[g] for g in batch]
        scores = _score_shared_batch(model, gs, pad_id=pad_id, device=device, params=params, cache_name=cache_name,
                                     pass_cost=pass_cost)
        for (i, _, conts), s in zip(gs, scores):
            for (j, t), v in zip(conts, s):
                logliks[i, j] = v
                n_tokens[i, j] = len(t)
