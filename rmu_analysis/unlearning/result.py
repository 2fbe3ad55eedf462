"""What an unlearning run returns, and how it is written to disk."""
from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pandas as pd
import torch
from safetensors.torch import save_file
from torch import nn

from .._io import atomic_directory, atomic_write_json


@dataclass(frozen=True)
class UnlearnResult:
    """The outcome of ``unlearn``: the trained tensors, the log and what the run used.

    - ``trained``: full parameter name -> trained tensor (the model's dtype), the only tensors the run changed.
    - ``log``: one dict per logged step (``to_frame()`` for a table).
    - ``coefficients``: topic -> coefficient used (c; β·norm for Adaptive RMU "first-batch"; for "per-sample"
      the mean over every forget sequence seen). Empty for the baselines.
    - ``control_vectors``: topic -> unit vector u (pass them back to ``unlearn`` to repeat the run exactly).
    - ``applied``: whether ``model`` holds the trained tensors (``inplace=True``) or its original ones.
    """

    config: Any
    topics: tuple[str, ...]
    trained: dict[str, torch.Tensor]
    log: list[dict[str, Any]]
    coefficients: dict[str, float]
    control_vectors: dict[str, torch.Tensor]
    steps: int
    applied: bool
    model: nn.Module | None = field(default=None, repr=False, compare=False)
    tokenizer: Any = field(default=None, repr=False, compare=False)

    def apply_to(self, model: nn.Module | None = None) -> nn.Module:
        """Copy the trained tensors into ``model`` (default: the run's model), in place; returns the model."""
        model = model if model is not None else self.model
        if model is None:
            raise ValueError("no model to apply the trained tensors to: pass one")
        params = dict(model.named_parameters())
        missing = [n for n in self.trained if n not in params]
        if missing:
            raise ValueError(f"the model has no parameters named {missing[:3]}: is it the architecture that was trained?")
        for name, tensor in self.trained.items():
            if params[name].shape != tensor.shape:
                raise ValueError(f"{name}: the model's tensor has shape {tuple(params[name].shape)}, the trained one {tuple(tensor.shape)}")
        with torch.no_grad():
            for name, tensor in self.trained.items():
                params[name].copy_(tensor.to(device=params[name].device, dtype=params[name].dtype))
        return model

    @contextlib.contextmanager
    def installed(self, model: nn.Module | None = None) -> Iterator[nn.Module]:
        """Context manager: ``model`` (default: the run's) holds the trained tensors inside the block and its own
        tensors again on exit, also on an error. One model serves base and unlearned evaluations, no copy."""
        model = model if model is not None else self.model
        if model is None:
            raise ValueError("no model to install the trained tensors in: pass one")
        params = dict(model.named_parameters())
        saved = {name: params[name].detach().clone() for name in self.trained if name in params}
        self.apply_to(model)  # checks names and shapes before writing anything
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, tensor in saved.items():
                    params[name].copy_(tensor)

    def state_dict(self, model: nn.Module | None = None) -> dict[str, torch.Tensor]:
        """The model's state dict with the trained tensors substituted (the model itself is not changed)."""
        model = model if model is not None else self.model
        if model is None:
            raise ValueError("no model: pass the model the run trained")
        state = dict(model.state_dict())
        for name, tensor in self.trained.items():
            state[name] = tensor.to(device=state[name].device, dtype=state[name].dtype)
        return state

    def to_frame(self):
        """The log as a pandas DataFrame (one row per logged step)."""
        return pd.DataFrame(self.log)

    def summary(self) -> dict[str, Any]:
        """JSON-ready description of the run (written as ``rmu_config.json``)."""
        return {
            **self.config.to_dict(),
            "topics": list(self.topics),
            "coefficients": self.coefficients,
            "steps_run": self.steps,
            "trained_tensors": sorted(self.trained),
        }


def save_unlearned(
    result: UnlearnResult,
    path: str | os.PathLike,
    model: nn.Module | None = None,
    tokenizer: Any = None,
    *,
    overwrite: bool = False,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write an HF-format directory: safetensors weights (the trained tensors substituted), the tokenizer,
    ``rmu_config.json`` (config, topics, coefficients), ``unlearn_log.json`` and ``control_vectors.safetensors``.

    The directory is built beside ``path`` and renamed into place in one step: a crash never leaves a
    half-written checkpoint at ``path``. ``model`` / ``tokenizer`` default to the run's. The model is not changed.
    ``extra``: more JSON-ready fields for ``rmu_config.json`` (e.g. ``{"base_model": "organism"}``).
    """
    model = model if model is not None else result.model
    tokenizer = tokenizer if tokenizer is not None else result.tokenizer
    if model is None:
        raise ValueError("save_unlearned needs the model the run trained: pass model=...")
    state = result.state_dict(model)
    with atomic_directory(path, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / "rmu_config.json", {**result.summary(), **(extra or {})})
        atomic_write_json(tmp / "unlearn_log.json", result.log)
        if result.control_vectors:
            save_file(
                {t: v.detach().cpu().contiguous() for t, v in result.control_vectors.items()},
                str(tmp / "control_vectors.safetensors"),
            )
    return Path(path)


def load_log(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The log saved by ``save_unlearned``."""
    return json.loads((Path(path) / "unlearn_log.json").read_text())
