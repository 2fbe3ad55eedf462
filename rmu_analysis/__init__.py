"""rmu_analysis: representation-steering unlearning (RMU, Adaptive RMU) — measure, apply, and stress-test it.

The public API is imported lazily: ``from rmu_analysis import capture`` loads ``rmu_analysis.activations`` only.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    # models
    "load_model": "models",
    "decoder_blocks": "models",
    "num_blocks": "models",
    "check_layer": "models",
    # organism
    "load_organism": "organism",
    "build_organism": "organism",
    "generate_world": "organism",
    # data and evaluation
    "load_mcq": "data",
    "load_forget_corpus": "data",
    "load_text_corpus": "data",
    "evaluate_mcq": "evaluation",
    # measurement API
    "capture": "activations",
    "random_direction": "steering",
    "steer": "steering",
    "measure_confidence": "confidence",
    "alignment": "cosines",
    "noise_sensitivity": "theory",
    # unlearning
    "unlearn": "unlearning",
    "unlearn_reference": "unlearning",
    "unlearn_sweep": "unlearning",
    "save_unlearned": "unlearning",
    "RMUConfig": "unlearning",
    "AdaptiveRMUConfig": "unlearning",
    "GAConfig": "unlearning",
    "GradDiffConfig": "unlearning",
    "NPOConfig": "unlearning",
    "PRESETS": "recipes",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module 'rmu_analysis' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
