"""Unlearning: RMU (Eq. 1), Adaptive RMU (Eq. 24) and output-space baselines (GA, GradDiff, NPO).

``unlearn(model, tokenizer, forget, retain, config)`` dispatches on the config type and returns an
``UnlearnResult``; the model is unchanged unless ``inplace=True`` (``result.apply_to(model)`` installs the
trained tensors; ``with result.installed(model):`` installs them for a block and puts the originals back).
``unlearn_reference`` is the deliberately plain implementation the engine is tested against.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from ..models import resolve_tokenizer
from .baselines import unlearn_baseline
from .common import NonFiniteLossError, prepare_corpora
from .config import (
    CONFIG_CLASSES, AdaptiveRMUConfig, GAConfig, GradDiffConfig, NPOConfig, RMUConfig, config_from_dict,
)
from .engine import PrefixCache, unlearn_rmu, unlearn_sweep
from .reference import unlearn_reference
from .result import UnlearnResult, load_log, save_unlearned


def unlearn(
    model: nn.Module, tokenizer: Any, forget: Any, retain: Any, config=None, *, control_vectors: Any = None,
    inplace: bool = False, prefix_cache: PrefixCache | None = None, progress: bool = True,
) -> UnlearnResult:
    """Unlearn ``forget`` while keeping ``retain`` (RMU, Adaptive RMU, GA, GradDiff or NPO by config type).

    ``forget``: dict topic -> texts (or a list of lists, or one list); ``retain``: one list of texts or one
    per topic. ``tokenizer`` None uses the one saved beside the model. ``control_vectors`` (RMU only): one unit
    vector per topic, used as given (default: drawn from ``config.seed`` as the reference does).
    ``prefix_cache``: share frozen-prefix activations across runs (RMU only). ``config`` None = ``RMUConfig()``.
    """
    config = RMUConfig() if config is None else config
    if tokenizer is None:
        tokenizer = resolve_tokenizer(model)
    if isinstance(config, (RMUConfig, AdaptiveRMUConfig)):
        return unlearn_rmu(model, tokenizer, forget, retain, config, control_vectors=control_vectors,
                           inplace=inplace, prefix_cache=prefix_cache, progress=progress)
    if isinstance(config, (GAConfig, GradDiffConfig, NPOConfig)):
        if control_vectors is not None or prefix_cache is not None:
            raise ValueError(f"control_vectors and prefix_cache apply to RMU only, not {config.method}")
        return unlearn_baseline(model, tokenizer, forget, retain, config, inplace=inplace, progress=progress)
    raise TypeError(
        f"config must be one of {', '.join(c.__name__ for c in CONFIG_CLASSES.values())}, got {type(config).__name__}"
    )


__all__ = [
    "unlearn", "unlearn_reference", "unlearn_sweep", "unlearn_rmu", "unlearn_baseline", "save_unlearned",
    "load_log", "UnlearnResult", "PrefixCache", "RMUConfig", "AdaptiveRMUConfig", "GAConfig", "GradDiffConfig",
    "NPOConfig", "config_from_dict", "NonFiniteLossError", "prepare_corpora",
]
