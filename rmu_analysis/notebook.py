"""What the notebooks share, so that each of their cells calls one function and shows its result.

:func:`setup` loads a model (the organism by default) with its corpora and questions, picks an early unlearn
layer (l = 7 of 32 in the paper: a sixth of the depth), measures the per-block forget-token norms ‖h^(l)‖ that the
notebooks scale c with, and carries the notebooks' unlearning recipe (``recipes.PRESETS["organism-notebook-*"]``).
:func:`full_unlearning` is notebook 05's setting: the organism with its presets, or Zephyr-7B with WMDP files
named by environment variables. :func:`results_dir` and :func:`figures_dir` find the committed results and figures.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import pandas as pd
import torch
from torch import nn

from .activations import capture
from .experiments.workbench import ExperimentData, data_from_files, organism_data
from .models import hidden_size, load_model, num_blocks
from .organism import SCORING, organism_corpora, organism_mcq
from .recipes import PRESETS, preset
from .unlearning.config import AdaptiveRMUConfig, RMUConfig

__all__ = ["Setup", "setup", "FullUnlearning", "full_unlearning", "repository_root", "figures_dir", "results_dir"]


def repository_root(start: Path | None = None) -> Path:
    """The nearest folder at or above ``start`` (default: the working directory) holding ``pyproject.toml``."""
    here = Path.cwd() if start is None else Path(start)
    for folder in (here, *here.parents):
        if (folder / "pyproject.toml").exists():
            return folder
    raise FileNotFoundError(f"no pyproject.toml at or above {here}: run the notebook inside the repository")


def figures_dir() -> Path:
    """``<repository>/figures``, where the notebooks write their figures."""
    return repository_root() / "figures"


def results_dir() -> Path:
    """``<repository>/figures/results``: the committed result files of ``rmu-analysis reproduce``."""
    return figures_dir() / "results"


@dataclass(frozen=True, eq=False)
class Setup:
    """A notebook's model and data, its unlearn layer ``layer`` with the forget-token norm there (``norm_l``; every
    block's in ``norms``), the first 120 texts of each forget topic and of the retain corpus (``forget``,
    ``retain``: what the notebooks unlearn on) and its recipe (:meth:`rmu`, :meth:`adaptive`)."""

    model: nn.Module
    tokenizer: Any
    corpora: dict
    questions: dict
    n_blocks: int
    width: int
    layer: int
    norms: pd.Series
    forget: dict[str, list[str]]
    retain: list[str]
    figures: Path
    started: float

    @property
    def norm_l(self) -> float:
        return float(self.norms[self.layer])

    def rmu(self, c: float, **changes: Any) -> RMUConfig:
        """The notebooks' RMU recipe (``organism-notebook-rmu``) at this layer with c = ``c`` (and ``changes``)."""
        return preset("organism-notebook-rmu", **{"layer": self.layer, "steering_coeff": c, **changes})

    def adaptive(self, beta: float = 5.0, **changes: Any) -> AdaptiveRMUConfig:
        """The notebooks' Adaptive RMU recipe (``organism-notebook-adaptive-rmu``) at this layer with β = ``beta``."""
        return preset("organism-notebook-adaptive-rmu", **{"layer": self.layer, "beta": beta, **changes})

    def runtime(self) -> str:
        return f"runtime {time.perf_counter() - self.started:.0f} s"

    def __str__(self) -> str:
        return (f"{self.n_blocks} blocks, width {self.width}, unlearn layer l = {self.layer}, forget-token norm at l: "
                f"{self.norm_l:.1f}\nper-block forget-token norms: " + " ".join(f"{x:.1f}" for x in self.norms))


def setup(model: str = "organism", *, threads: int = 2) -> Setup:
    """Load ``model`` (``"organism"``; another model needs its own corpora and questions, which only the organism
    ships) on ``threads`` CPU threads and measure the mean per-token norm ‖h^(l)‖ of 32 bio forget texts (BOS
    excluded) at every block. The unlearn layer is max(1, L // 6)."""
    started = time.perf_counter()
    torch.set_num_threads(threads)
    m, tok = load_model(model)
    corpora, questions = organism_corpora(), organism_mcq()
    n = num_blocks(m)
    norms = capture(m, corpora["forget"]["bio"][:32], layers="all", exclude_bos=True).to_frame()
    norms = norms.groupby("layer")["token_norm"].mean()  # mean per-token ‖h^(l)‖ of forget text, BOS excluded
    return Setup(model=m, tokenizer=tok, corpora=corpora, questions=questions, n_blocks=n, width=hidden_size(m),
                 layer=max(1, n // 6), norms=norms, forget={t: corpora["forget"][t][:120] for t in ("bio", "cyber")},
                 retain=corpora["retain"][:120], figures=figures_dir(), started=started)


@dataclass(frozen=True, eq=False)
class FullUnlearning:
    """Notebook 05's setting: a model, its data (forget topics, retain texts, question sets), the scoring of its
    questions and the two recipes it unlearns with (``configs``: ``"RMU"`` and ``"Adaptive RMU"``)."""

    model: nn.Module
    tokenizer: Any
    data: ExperimentData
    scoring: str
    configs: dict[str, Any]
    zephyr: bool

    @property
    def layer(self) -> int:
        return self.configs["Adaptive RMU"].layer

    def __str__(self) -> str:
        adaptive = self.configs["Adaptive RMU"]
        return (f"unlearn layer {self.layer}, trained blocks {adaptive.resolved_trained_layers()}, scoring "
                f"{self.scoring!r}\n{ {t: len(v) for t, v in self.data.forget.items()} } forget texts; "
                f"{len(self.data.retain)} retain texts; { {d: len(q) for d, q in self.data.mcq.items()} } questions")


def full_unlearning(environ: Mapping[str, str] = os.environ) -> FullUnlearning:
    """The organism with the presets ``organism-rmu`` / ``organism-adaptive-rmu`` and cloze scoring; or, when
    ``RMU_MODEL`` is set, that model in bf16 with the WMDP / MMLU files named by ``RMU_BIO_FORGET``,
    ``RMU_CYBER_FORGET``, ``RMU_RETAIN`` (texts of ≤ 50 characters dropped, as the reference), ``RMU_WMDP_BIO``,
    ``RMU_WMDP_CYBER``, ``RMU_MMLU`` (``RMU_LIMIT``: questions per set), the ``zephyr-7b-*`` presets and lettered
    scoring."""
    if not environ.get("RMU_MODEL"):
        model, tok = load_model("organism")
        return FullUnlearning(model, tok, organism_data(), SCORING,
                              {"RMU": PRESETS["organism-rmu"], "Adaptive RMU": PRESETS["organism-adaptive-rmu"]}, False)
    model, tok = load_model(environ["RMU_MODEL"], dtype="bfloat16",
                            device_map="auto" if torch.cuda.is_available() else None)
    limit = int(environ["RMU_LIMIT"]) if environ.get("RMU_LIMIT") else None
    data = data_from_files({"bio": environ["RMU_BIO_FORGET"], "cyber": environ["RMU_CYBER_FORGET"]},
                           environ["RMU_RETAIN"], {"bio": environ["RMU_WMDP_BIO"], "cyber": environ["RMU_WMDP_CYBER"],
                                                   "general": environ["RMU_MMLU"]}, min_chars=51, limit=limit)
    return FullUnlearning(model, tok, data, "letter", {"RMU": PRESETS["zephyr-7b-rmu"],
                                                       "Adaptive RMU": PRESETS["zephyr-7b-adaptive-rmu"]}, True)
