"""Hooks on decoder blocks: the one mechanism behind capture, steering, the theory checks and the unlearning engine.

Block ``l`` is 0-indexed and found by name template (:func:`~rmu_analysis.models.decoder_blocks`); its output is
the residual stream h^(l) after the block, ``hidden_states[l + 1]`` of an HF forward pass (docs/paper.md).
Four operations, in the spirit of TransformerLens' hook points and steering-vectors' context managers; every hook
is removed on exit and on exceptions:

- :func:`record` / :func:`forward`: record block outputs and what blocks are called with (input hidden states,
  position embeddings, masks ...) during a forward pass, optionally stopping it right after block ``l``
  (``stop_after``, TransformerLens' ``stop_at_layer``) or right before it (``stop_before``);
- :func:`edit`: replace a block's output (or add to it) during the forward passes inside the context;
  :func:`edit_input` does the same to the hidden states a block is called with;
- :func:`run_blocks`: run a range of blocks on given hidden states with recorded call arguments, optionally with
  some of their tensors swapped in (``torch.func.functional_call``), differentiably.
"""
from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import nn
from torch.func import functional_call

from .models import check_layer, check_layers, decoder_blocks

__all__ = ["BlockCall", "Recording", "block_output", "with_block_output", "record", "forward", "edit", "edit_input",
           "run_blocks"]


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the blocks it needs have run."""


def block_output(output: Any) -> torch.Tensor:
    """The hidden states in a block's output (a tensor in transformers ≥ 5, the first item of a tuple before)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def with_block_output(output: Any, hidden: torch.Tensor) -> Any:
    """``output`` with its hidden states replaced by ``hidden`` (same container type)."""
    if isinstance(output, tuple):
        return (hidden,) + tuple(output[1:])
    if isinstance(output, list):
        return [hidden] + list(output[1:])
    return hidden


@dataclass(frozen=True, eq=False)
class BlockCall:
    """What a decoder block was called with: its input ``hidden`` states and the other positional ``args`` and
    keyword ``kwargs`` (position embeddings, attention mask ...), whether the model passed the hidden states by
    position or as ``hidden_states=``."""

    hidden: torch.Tensor
    args: tuple
    kwargs: dict

    def to(self, device: torch.device | str) -> "BlockCall":
        return BlockCall(self.hidden.to(device), _tree_map(_move(device), self.args),
                         _tree_map(_move(device), self.kwargs))


def _move(device):
    return lambda x: x.to(device) if isinstance(x, torch.Tensor) else x


def _tree_map(fn, obj):
    if isinstance(obj, tuple):
        return tuple(_tree_map(fn, o) for o in obj)
    if isinstance(obj, list):
        return [_tree_map(fn, o) for o in obj]
    if isinstance(obj, dict):
        return {k: _tree_map(fn, v) for k, v in obj.items()}
    return fn(obj)


def _block_call(args: tuple, kwargs: dict) -> BlockCall:
    if args:
        return BlockCall(args[0], tuple(args[1:]), dict(kwargs))
    kwargs = dict(kwargs)
    return BlockCall(kwargs.pop("hidden_states"), (), kwargs)


@dataclass(frozen=True, eq=False)
class Recording:
    """Filled during the forward passes inside :func:`record` (the last pass wins): ``outputs`` block -> output
    ``[B, T, d]``, ``calls`` block -> :class:`BlockCall`."""

    outputs: dict[int, torch.Tensor]
    calls: dict[int, BlockCall]


def _layer_list(model: nn.Module, layers: Any) -> list[int]:
    if layers is None or (not isinstance(layers, (str, int)) and len(layers) == 0):
        return []
    return check_layers(model, layers)


@contextlib.contextmanager
def record(model: nn.Module, outputs: Any = (), *, calls: Any = (), stop_after: int | None = None,
           stop_before: int | None = None, detach: bool = True) -> Iterator[Recording]:
    """Context manager: record the outputs of blocks ``outputs`` and the calls of blocks ``calls`` (``"all"``, an
    int or a list; negative counts from the end) during the forward passes run inside it.

    ``stop_after=l`` ends each pass right after block ``l`` has run, ``stop_before=l`` right before it (after its
    call is recorded), with a private exception that :func:`forward` swallows. ``detach=False`` keeps the
    recorded outputs in the autograd graph.
    """
    blocks = decoder_blocks(model)
    out_layers, call_layers = set(_layer_list(model, outputs)), set(_layer_list(model, calls))
    after = None if stop_after is None else check_layer(model, stop_after, what="stop_after")
    before = None if stop_before is None else check_layer(model, stop_before, what="stop_before")
    rec = Recording(outputs={}, calls={})

    def pre_hook(i: int):
        def hook(module, args, kwargs):
            if i in call_layers:
                rec.calls[i] = _block_call(args, kwargs)
            if i == before:
                raise _Stop
        return hook

    def post_hook(i: int):
        def hook(module, args, output):
            if i in out_layers:
                hidden = block_output(output)
                rec.outputs[i] = hidden.detach() if detach else hidden
            if i == after:
                raise _Stop
        return hook

    handles = []
    try:
        for i in sorted(call_layers | ({before} if before is not None else set())):
            handles.append(blocks[i].register_forward_pre_hook(pre_hook(i), with_kwargs=True))
        for i in sorted(out_layers | ({after} if after is not None else set())):
            handles.append(blocks[i].register_forward_hook(post_hook(i)))
        yield rec
    finally:
        for h in handles:
            h.remove()


def forward(model: nn.Module, inputs: Mapping[str, Any], outputs: Any = (), *, calls: Any = (),
            stop_after: int | None = None, stop_before: int | None = None, detach: bool = True) -> Recording:
    """One forward pass ``model(**inputs, use_cache=False)`` under :func:`record` (a stop ends it quietly); the
    caller chooses the grad mode. Returns the :class:`Recording`."""
    with record(model, outputs, calls=calls, stop_after=stop_after, stop_before=stop_before, detach=detach) as rec:
        try:
            model(**inputs, use_cache=False)
        except _Stop:
            pass
    return rec


# Edits of one block run in one hook, registered before every other hook of the block (recorders, transformers'
# own output capturing), in the order the contexts were entered: the innermost context applies last, so in a
# replace it wins.
_EDITS: "weakref.WeakKeyDictionary[nn.Module, tuple[Any, list]]" = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def edit(model: nn.Module, layer: int, fn: Callable[[torch.Tensor], torch.Tensor | None]) -> Iterator[None]:
    """Context manager: block ``layer``'s output becomes ``fn(output)`` (None: left as it is) in every forward pass
    inside it. Every recorder of the block sees the edited output; nested edits of one block apply outermost
    first, so the innermost has the last word."""
    block = decoder_blocks(model)[check_layer(model, layer)]
    if block not in _EDITS:
        chain: list = []

        def hook(module, args, output):
            hidden, changed = block_output(output), False
            for f in list(chain):
                new = f(hidden)
                if new is not None:
                    hidden, changed = new, True
            return with_block_output(output, hidden) if changed else None

        _EDITS[block] = (block.register_forward_hook(hook, prepend=True), chain)
    handle, chain = _EDITS[block]
    chain.append(fn)
    try:
        yield None
    finally:
        chain.remove(fn)
        if not chain:
            handle.remove()
            del _EDITS[block]


@contextlib.contextmanager
def edit_input(model: nn.Module, layer: int, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Context manager: the hidden states block ``layer`` is called with become ``fn(hidden)`` in every forward
    pass inside it (its other arguments are passed as they are). Pre-hooks run in the order they were registered:
    a recorder of the block's call entered inside this context sees the edited input, one entered before it not."""
    block = decoder_blocks(model)[check_layer(model, layer)]

    def hook(module, args, kwargs):
        if args:
            return (fn(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield None
    finally:
        handle.remove()


def run_blocks(model: nn.Module, hidden: torch.Tensor, calls: Mapping[int, BlockCall], layers: Sequence[int], *,
               overrides: Mapping[int, Mapping[str, torch.Tensor]] | None = None) -> dict[int, torch.Tensor]:
    """Run the consecutive blocks ``layers`` on ``hidden`` with each block's recorded call (its other arguments),
    returning every block's output ``{l: [B, T, d]}``. ``overrides`` (block -> {parameter name: tensor}) swaps
    tensors into a block for this call (``functional_call``): the model is not written. Differentiable; the
    caller chooses the grad mode. ``hidden`` is moved to each block's device (multi-device models)."""
    blocks = decoder_blocks(model)
    overrides = overrides or {}
    out: dict[int, torch.Tensor] = {}
    for i in layers:
        call, block = calls[i], blocks[i]
        device = _device(block)
        if device is not None and hidden.device != device:
            hidden = hidden.to(device)
        if i in overrides:
            res = functional_call(block, dict(overrides[i]), (hidden, *call.args), call.kwargs, tie_weights=False)
        else:
            res = block(hidden, *call.args, **call.kwargs)
        hidden = out[i] = block_output(res)
    return out


def _device(block: nn.Module) -> torch.device | None:
    """The device of a block's first parameter; None when it has none or they are offloaded ("meta")."""
    p = next(block.parameters(), None)
    return None if p is None or p.device.type == "meta" else p.device
