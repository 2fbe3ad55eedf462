"""Random steering directions u and steering a block's output to c·u + ε (arXiv 2408.06223, Eq. 1 and
Assumption 1).

``random_direction(d, "uniform")`` is RMU's reference construction: entries U(0, 1), then normalised — every entry
is positive, so two independent draws have cosine ≈ 0.75 and each has cosine ≈ 0.87 with the all-ones direction.
A ``"gaussian"`` direction (entries N(0, 1), normalised) is isotropic: its cosine with any fixed vector is
≈ 0 ± 1/sqrt(d). Cosine probes against u therefore need both as null baselines (see :mod:`rmu_analysis.cosines`).
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from . import hooks
from .models import check_layer, hidden_size

__all__ = ["random_direction", "steer", "make_generator", "check_vector", "check_noise"]

_KINDS = ("uniform", "gaussian")


def make_generator(seed: int | None = None, generator: torch.Generator | None = None, *, what: str = "draw"
                   ) -> torch.Generator:
    """A CPU ``torch.Generator`` from an explicit ``seed`` or ``generator`` (one of them is required)."""
    if generator is not None:
        if seed is not None:
            raise ValueError("pass either seed=... or generator=..., not both")
        return generator
    if seed is None:
        raise ValueError(f"this {what} is random: pass seed=<int> or generator=<torch.Generator> explicitly")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    return torch.Generator(device="cpu").manual_seed(seed)


def random_direction(
    dim: int,
    kind: str = "uniform",
    *,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """A random unit vector of size ``dim`` (RMU's u, Eq. 1).

    ``kind="uniform"``: entries U(0, 1) normalised (the reference construction; all entries positive).
    ``kind="gaussian"``: entries N(0, 1) normalised (an isotropic null direction).
    Drawn in fp32 on the CPU from ``seed`` (or a CPU ``generator``), then moved to ``device``/``dtype``, so the
    values do not depend on the device.
    """
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be a positive int, got {dim!r}")
    if kind not in _KINDS:
        raise ValueError(f'kind must be "uniform" or "gaussian", got {kind!r}')
    gen = make_generator(seed, generator, what="direction")
    draw = torch.rand if kind == "uniform" else torch.randn
    v = draw(dim, generator=gen, dtype=torch.float32, device="cpu")
    v = v / v.norm()
    return v.to(device=device or "cpu", dtype=dtype)


def check_vector(vector: Any, d: int, *, name: str = "vector") -> torch.Tensor:
    """``vector`` as a finite floating tensor of shape ``[d]`` (clear errors for the wrong size or nan/inf)."""
    v = torch.as_tensor(vector)
    if not (v.is_floating_point()):
        v = v.float()
    if v.numel() != d or (v.dim() > 1 and v.shape[-1] != d):
        raise ValueError(f"{name} has shape {tuple(v.shape)} but the model's hidden size is {d}: pass a vector of "
                         f"size {d}")
    v = v.reshape(d)
    if not torch.isfinite(v).all():
        raise ValueError(f"{name} contains non-finite values (nan or inf)")
    return v


def check_noise(noise: Any) -> float:
    """The noise variance η of ε ~ N(0, ηI) as a finite float ≥ 0."""
    try:
        eta = float(noise)
    except (TypeError, ValueError):
        raise TypeError(f"noise must be a number (the variance η of ε ~ N(0, ηI)), got {type(noise).__name__}")
    if not math.isfinite(eta) or eta < 0:
        raise ValueError(f"noise is the variance η of ε ~ N(0, ηI) and must be finite and ≥ 0, got {noise!r}")
    return eta


def _position_mask(positions: Any, shape: tuple[int, int], device: torch.device) -> torch.Tensor:
    """Boolean ``[B, T]`` mask of the positions to steer in a forward call with hidden states of ``shape``."""
    B, T = shape
    if positions is None:
        return torch.ones(B, T, dtype=torch.bool, device=device)
    if isinstance(positions, slice):
        cols = torch.zeros(T, dtype=torch.bool)
        cols[positions] = True
        return cols.to(device).expand(B, T)
    if isinstance(positions, torch.Tensor) and positions.dtype == torch.bool:
        if tuple(positions.shape) != (B, T):
            raise ValueError(
                f"positions mask has shape {tuple(positions.shape)} but this forward pass has [batch, tokens] = "
                f"{[B, T]}: a boolean mask must match the input exactly"
            )
        return positions.to(device)
    idx = [int(p) for p in positions]
    bad = [p for p in idx if not -T <= p < T]
    if bad:
        raise ValueError(f"positions {bad} are out of range for a sequence of {T} tokens (valid: {-T}–{T - 1})")
    cols = torch.zeros(T, dtype=torch.bool)
    cols[idx] = True
    return cols.to(device).expand(B, T)


def _check_positions(positions: Any) -> Any:
    if positions is None or isinstance(positions, slice):
        return positions
    if isinstance(positions, torch.Tensor) and positions.dtype == torch.bool:
        if positions.dim() != 2:
            raise ValueError(f"a boolean positions mask must have shape [batch, tokens], got {tuple(positions.shape)}")
        return positions
    if isinstance(positions, int) and not isinstance(positions, bool):
        return [positions]
    if isinstance(positions, (Sequence, torch.Tensor)):
        out = [int(p) for p in positions]
        return out
    raise TypeError("positions must be None (all), a slice, a list of ints or a boolean [batch, tokens] tensor, "
                    f"got {type(positions).__name__}")


@contextlib.contextmanager
def steer(
    model: nn.Module,
    layer: int,
    vector: Any,
    *,
    mode: str = "replace",
    coeff: float = 1.0,
    noise: float = 0.0,
    positions: Any = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[None]:
    """Context manager: block ``layer``'s output becomes ``coeff·vector + ε`` (``mode="replace"``) or gets it
    added (``mode="add"``) at the chosen token positions — Assumption 1 (arXiv 2408.06223) made true.

    ``vector`` is the full steering vector (pass ``c·u``, or ``u`` with ``coeff=c``). ``noise`` is the variance
    η of ε ~ N(0, ηI), drawn fresh for every steered token in every forward call from ``seed``/``generator``
    (CPU, fp32: device-independent). ``positions`` indexes the token axis of each forward call: None (all,
    including tokens generated with a KV cache), a slice, a list of ints, or a boolean ``[B, T]`` mask that must
    match the call's shape. The edit (:func:`rmu_analysis.hooks.edit`) runs before any other hook on the block,
    so recorders (``capture``, ``output_hidden_states``) see the steered output. Nested ``steer`` on one block
    apply outermost first, so in replace mode the innermost context wins. Removed on exit and on exceptions.
    """
    if mode not in ("replace", "add"):
        raise ValueError(f'mode must be "replace" or "add", got {mode!r}')
    idx = check_layer(model, layer)
    d = hidden_size(model)
    vec = check_vector(vector, d).float() * float(coeff)
    if not torch.isfinite(vec).all():
        raise ValueError(f"coeff·vector is not finite (coeff={coeff!r})")
    eta = check_noise(noise)
    gen = make_generator(seed, generator, what="steering noise") if eta > 0 else None
    std = math.sqrt(eta)
    positions = _check_positions(positions)

    def steered(h: torch.Tensor) -> torch.Tensor | None:
        sel = _position_mask(positions, (h.shape[0], h.shape[1]), h.device)
        n_sel = int(sel.sum())
        if n_sel == 0:
            return None
        value = vec.to(h.device).expand(n_sel, d)
        if gen is not None:
            value = value + std * torch.randn(n_sel, d, generator=gen, dtype=torch.float32).to(h.device)
        if mode == "add":
            value = h[sel].float() + value
        new = h.clone()
        new[sel] = value.to(h.dtype)
        return new

    with hooks.edit(model, idx, steered):
        yield None
