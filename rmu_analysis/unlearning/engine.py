"""The efficient RMU / Adaptive RMU engine (Eq. 1, Eq. 24). One training step reads top to bottom in
``unlearn_rmu``; the machinery it needs (the frozen prefix, its cache, the trained blocks) is above it.

How it differs from ``reference.py`` (same trained tensors, see tests/test_unlearning.py):
- One model. The trained tensors live *outside* it as separate leaf tensors (fp32 master copies when the
  model is bf16/fp16), swapped into blocks first..l with ``torch.func.functional_call`` for the updated
  pass. The model itself is never written during training, so its own tensors *are* the frozen ones.
- The frozen prefix (embedding + blocks below the first trained block) runs once per batch under no_grad,
  stopped by a hook; its output and the keyword arguments the model passes to each block (position
  embeddings, causal mask ...) are captured and shared by the updated and frozen passes. The frozen pass
  continues the same no_grad forward up to block l (stopped there too): no lm_head, no blocks after l.
- Gradients only for the trained tensors: every model parameter has ``requires_grad`` off during the run
  (restored afterwards), and backward stops at the first trained block. The run is in eval mode (dropout
  off; Llama / Mistral / Zephyr have none), the model's mode is restored afterwards.
- Retain noise (``retain_noise`` > 0, arXiv 2501.19202) is added to the cached prefix's output, out of place, just
  before the trained blocks run on it; the reference adds the same draws with a hook on the first trained block.
- Prefix activations (and the frozen block-l output) are cached by token content: within a run the retain
  batch that every topic shares is computed once, and a ``PrefixCache`` passed to successive runs (or
  ``unlearn_sweep``) serves a whole coefficient sweep at one layer.

Model state: by default (``inplace=False``) the model is unchanged and the result holds the trained
tensors (``result.apply_to(model)`` installs them); ``inplace=True`` leaves them installed. On an error the
model is left as it was in both modes.
"""
from __future__ import annotations

import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn
from tqdm import tqdm  # text bars: tqdm.auto warns in notebooks without ipywidgets

from .. import hooks
from ..activations import mean_token_norm
from ..models import frozen_parameters, hidden_size, model_device
from .common import (
    TrainedTensor, add_retain_noise, batch_texts, check_finite, log_row, loss_masks, mse, noise_generator,
    prepare_control_vectors, prepare_corpora, reference_padding, resolve_layers, runnable_steps, select_trained,
    sequence_lengths, step_batch, tokenize,
)
from .config import AdaptiveRMUConfig, RMUConfig
from .result import UnlearnResult


# ------------------------------------------------------------------------------------ frozen prefix
@dataclass
class Prefix:
    """A batch's frozen prefix: each block first..last's call (the input of block ``first`` is
    ``calls[first].hidden``; the other arguments are those the model passes: position embeddings, causal mask
    ...), and (optionally) the frozen output of block ``last``."""

    calls: dict[int, hooks.BlockCall]  # one per block first..last (one object shared by all when they agree)
    frozen: torch.Tensor | None

    def to(self, device: torch.device | str | None) -> "Prefix":
        if device is None:
            return self
        moved = {id(c): c.to(device) for c in self.calls.values()}
        return Prefix(calls={i: moved[id(c)] for i, c in self.calls.items()},
                      frozen=None if self.frozen is None else self.frozen.to(device))


def _per_block_calls(model: nn.Module, first: int, last: int) -> bool:
    """Whether blocks first..last get different keyword arguments (e.g. sliding-window / full-attention
    masks of Gemma-style ``layer_types``); then each block's call is captured, not the first one's."""
    cfg = getattr(model, "config", None)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    types = getattr(cfg, "layer_types", None)
    return bool(types) and len(set(types[first : last + 1])) > 1


@torch.no_grad()
def run_prefix(model: nn.Module, inputs: dict, first: int, last: int, *, frozen: bool) -> Prefix:
    """Frozen forward up to block ``first`` (stopped before it runs), or, when ``frozen``, on to the output of
    block ``last`` (stopped after it)."""
    per_block = _per_block_calls(model, first, last)
    run_to_last = frozen or per_block
    rec = hooks.forward(model, inputs, [last] if run_to_last else (),
                        calls=list(range(first, last + 1)) if per_block else [first],
                        stop_after=last if run_to_last else None, stop_before=None if run_to_last else first)
    calls = rec.calls if per_block else {i: rec.calls[first] for i in range(first, last + 1)}
    return Prefix(calls=calls, frozen=rec.outputs.get(last))


class PrefixCache:
    """Frozen prefixes (and frozen block-l outputs) by batch token content, for reuse across steps and runs.

    Valid for one model in one state: it is keyed on the model's identity and the version counters of its
    parameters, and empties itself when either changes (e.g. after ``result.apply_to``).
    ``max_entries`` bounds it (least recently used first out); ``device="cpu"`` keeps entries off the GPU.
    A whole Zephyr-7B run (500 steps at 512–768 tokens) is ~16 GB in bf16: bound it or offload it.
    """

    def __init__(self, max_entries: int | None = None, device: str | torch.device | None = None):
        self.max_entries = max_entries
        self.device = device
        self._entries: OrderedDict[Any, Prefix] = OrderedDict()
        self._model_ref = None
        self._params: list[nn.Parameter] = []
        self._fingerprint = None
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    def get(self, model: nn.Module, inputs: dict, first: int, last: int, *, frozen: bool) -> Prefix:
        """The batch's prefix from the cache, or computed (``run_prefix``) and stored."""
        self._check_model(model)
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        key = (first, last, tuple(ids.shape), ids.cpu().numpy().tobytes(), mask.cpu().numpy().tobytes())
        entry = self._entries.get(key)
        if entry is not None and (entry.frozen is not None or not frozen):
            self._entries.move_to_end(key)
            self.hits += 1
            return entry.to(ids.device) if self.device is not None else entry
        self.misses += 1
        prefix = run_prefix(model, inputs, first, last, frozen=frozen)
        self._entries[key] = prefix.to(self.device)
        if self.max_entries is not None:
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return prefix

    def _check_model(self, model: nn.Module) -> None:
        if self._model_ref is None or self._model_ref() is not model:
            self._entries.clear()
            self._model_ref = weakref.ref(model)
            self._params = list(model.parameters())
            self._fingerprint = None
        fingerprint = tuple(p._version for p in self._params)  # bumped by every in-place write
        if fingerprint != self._fingerprint:
            self._entries.clear()
            self._fingerprint = fingerprint


# --------------------------------------------------------------------------------- trained blocks
def run_trained(model: nn.Module, prefix: Prefix, first: int, last: int,
                overrides: dict[int, dict[str, torch.Tensor]], hidden: torch.Tensor | None = None) -> torch.Tensor:
    """Blocks first..last from the prefix (or from ``hidden`` in its place, e.g. the prefix with retain noise),
    with ``overrides`` (block -> {name: tensor}) swapped in: block ``last``'s output."""
    start = prefix.calls[first].hidden if hidden is None else hidden
    outs = hooks.run_blocks(model, start, prefix.calls, range(first, last + 1), overrides=overrides)
    return outs[last]


def master_copies(model: nn.Module, trained: Sequence[TrainedTensor]) -> list[torch.Tensor]:
    """Trainable copies of the trained tensors: fp32 (a master copy) whatever the model's dtype."""
    named = dict(model.named_parameters())
    return [named[t.full_name].detach().to(torch.float32, copy=True).requires_grad_(True) for t in trained]


def _overrides(model_params: list[nn.Parameter], masters: list[torch.Tensor], trained: Sequence[TrainedTensor]):
    """{block: {name: tensor in the model's dtype}}, differentiable w.r.t. the masters."""
    out: dict[int, dict[str, torch.Tensor]] = {}
    for p, m, t in zip(model_params, masters, trained):
        out.setdefault(t.block, {})[t.name] = m if m.dtype == p.dtype else m.to(p.dtype)
    return out


# ------------------------------------------------------------------------------------ the training
def unlearn_rmu(
    model: nn.Module, tokenizer, forget, retain, config: RMUConfig | AdaptiveRMUConfig, *,
    control_vectors=None, inplace: bool = False, prefix_cache: PrefixCache | None = None, progress: bool = True,
) -> UnlearnResult:
    """RMU (Eq. 1) or Adaptive RMU (Eq. 24, Algorithm 1) with the efficient engine."""
    if not isinstance(config, (RMUConfig, AdaptiveRMUConfig)):
        raise TypeError(f"unlearn_rmu runs RMUConfig or AdaptiveRMUConfig, got {type(config).__name__}")
    # everything that can be wrong is checked before the first step
    data = prepare_corpora(forget, retain)
    n_topics = len(data.topics)
    layer, trained_layers = resolve_layers(model, config)
    first = min(trained_layers)
    trained = select_trained(model, trained_layers, config.param_pattern)
    alphas = config.per_topic("alpha", n_topics, data.topics)
    max_lengths, retain_length = sequence_lengths(model, config, data.topics)  # cut to the positions
    adaptive = isinstance(config, AdaptiveRMUConfig)
    coeffs = config.per_topic("beta" if adaptive else "steering_coeff", n_topics, data.topics)
    per_sample = adaptive and config.coefficient == "per-sample"
    steps = runnable_steps(data, config.steps, config.batch_size)
    device = model_device(model)
    dtype = model.get_input_embeddings().weight.dtype
    vectors = prepare_control_vectors(control_vectors, data.topics, hidden_size(model), config.seed, dtype, device)
    cache = prefix_cache if prefix_cache is not None else PrefixCache(max_entries=2 * n_topics)
    bos = getattr(tokenizer, "bos_token_id", None)
    noise = noise_generator(config.seed) if config.retain_noise > 0 else None

    named = dict(model.named_parameters())
    model_params = [named[t.full_name] for t in trained]
    masters = master_copies(model, trained)
    optimizer = torch.optim.AdamW(
        masters, lr=config.lr, betas=config.betas, eps=config.adam_eps, weight_decay=config.weight_decay
    )
    fixed_coeff: dict[int, float] = {}
    seen_coeffs: list[list[float]] = [[] for _ in range(n_topics)]
    log: list[dict[str, Any]] = []

    with reference_padding(tokenizer), frozen_parameters(model):
        bar = tqdm(range(steps), disable=not progress, desc=f"{config.method} l={layer}")
        for step in bar:
            topic, batch = step_batch(step, n_topics)
            u = vectors[topic]
            forget_inputs = tokenize(tokenizer, batch_texts(data.forget[topic], batch, config.batch_size), max_lengths[topic], device)
            retain_inputs = tokenize(tokenizer, batch_texts(data.retain[topic], batch, config.batch_size), retain_length, device)
            forget_mask, _ = loss_masks(forget_inputs, config.loss, bos)
            _, retain_mask = loss_masks(retain_inputs, config.loss, bos)

            # forget term: frozen prefix (cached), then blocks first..l with the trained tensors swapped in
            forget_prefix = cache.get(model, forget_inputs, first, layer, frozen=per_sample)
            h_forget = run_trained(model, forget_prefix, first, layer, _overrides(model_params, masters, trained))
            if not adaptive:
                coefficient = torch.tensor(coeffs[topic], dtype=dtype)
            elif per_sample:  # Eq. 24 literally: beta * ||h_frozen(x_F)|| per sequence
                coefficient = (mean_token_norm(forget_prefix.frozen, forget_mask, per_sample=True) * coeffs[topic]).to(dtype)
            else:  # the official code: beta * mean norm of the updated model on the topic's first batch, then fixed
                if batch == 0:
                    fixed_coeff[topic] = float(mean_token_norm(h_forget, forget_mask)) * coeffs[topic]
                coefficient = torch.tensor(fixed_coeff[topic], dtype=dtype)
            coefficient = coefficient.to(h_forget.device)
            seen_coeffs[topic].extend(coefficient.reshape(-1).tolist())
            target = coefficient.reshape(-1, 1, 1) * u.to(h_forget.device).reshape(1, 1, -1)
            forget_loss = mse(h_forget, target, forget_mask)
            forget_loss.backward()

            # retain term: the frozen block-l output comes from the same (cached) no_grad pass as the prefix;
            # with retain noise, the trained blocks start from the noisy prefix and still aim at the clean output
            retain_prefix = cache.get(model, retain_inputs, first, layer, frozen=True)
            h_in = retain_prefix.calls[first].hidden
            if noise is not None:
                h_in = add_retain_noise(h_in, config.retain_noise, noise)
            h_retain = run_trained(model, retain_prefix, first, layer, _overrides(model_params, masters, trained), h_in)
            retain_loss = mse(h_retain, retain_prefix.frozen.to(h_retain.device), retain_mask)
            (alphas[topic] * retain_loss).backward()

            f, r = float(forget_loss.detach()), float(retain_loss.detach())
            check_finite(f + alphas[topic] * r, step, data.topics[topic], {"forget loss": f, "retain loss": r})
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

            if step % config.log_every == 0 or step == steps - 1:
                bar.set_postfix(forget=f"{f:.4g}", retain=f"{r:.4g}")
                log.append(log_row(step, data.topics[topic], f, r, alphas[topic], float(coefficient.float().mean()),
                                   h_forget, h_retain, u, forget_mask, retain_mask))

    return finish_result(config, data.topics, trained, masters, model_params, log, steps, inplace, model, tokenizer,
                         coefficients={t: sum(c) / len(c) for t, c in zip(data.topics, seen_coeffs) if c},
                         control_vectors={t: v.detach().clone() for t, v in zip(data.topics, vectors)})


def finish_result(config, topics, trained, masters, model_params, log, steps, inplace, model, tokenizer, *,
                  coefficients=None, control_vectors=None) -> UnlearnResult:
    """The run's ``UnlearnResult``: the fp32 master copies cast back to each parameter's dtype, installed in
    ``model`` when ``inplace`` (shared by the steering engine and the output-space baselines)."""
    result = UnlearnResult(
        config=config, topics=topics,
        trained={t.full_name: m.detach().to(p.dtype, copy=True) for t, m, p in zip(trained, masters, model_params)},
        log=log, coefficients=coefficients or {}, control_vectors=control_vectors or {}, steps=steps,
        applied=inplace, model=model, tokenizer=tokenizer,
    )
    if inplace:
        result.apply_to(model)
    return result


def unlearn_sweep(
    model: nn.Module, tokenizer, forget, retain, configs: Sequence[RMUConfig | AdaptiveRMUConfig], *,
    prefix_cache: PrefixCache | None = None, control_vectors=None, progress: bool = True,
) -> list[UnlearnResult]:
    """One run per config (e.g. a coefficient sweep at one layer) sharing one prefix cache; the model is
    left unchanged (each result holds its own trained tensors)."""
    cache = prefix_cache if prefix_cache is not None else PrefixCache()
    return [
        unlearn_rmu(model, tokenizer, forget, retain, cfg, control_vectors=control_vectors, inplace=False,
                    prefix_cache=cache, progress=progress)
        for cfg in configs
    ]
