"""The built-in model organism: a tiny Llama trained on a synthetic world with hazardous and benign knowledge.

``load_organism()`` returns ``(model, tokenizer)`` from the files shipped inside the package (no network);
``organism_corpora()`` and ``organism_mcq(split="test"|"dev")`` return its forget/retain corpora and held-out
question sets in the reference formats (WMDP's corpora and question records). The shipped organism is testbed 2
(:mod:`.world_v2`, :mod:`.build_v2`: balanced answers, a dev/test split on disjoint entities, three held-out
wordings per fact, WMDP-shaped corpora; docs/testbed_v2.md); ``build_organism()`` trains it anew
(``rmu-analysis organism build``). The first organism (:mod:`.world`, :mod:`.build`) stays buildable with
``rmu-analysis organism build --testbed 1 --out DIR``. ``load_model("organism")`` finds :func:`load_organism` through the model registry
(``models.MODELS``).
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from transformers import AutoTokenizer, LlamaForCausalLM
from transformers.utils import logging as hf_logging

from ..data import load_forget_corpus, load_mcq, load_text_corpus
from ..models import attach_tokenizer

#: How the organism's questions are scored by default. It answers held-out questions well in the cloze format
#: (log-likelihood of each choice's text) but never learned the lettered WMDP format within its CPU build budget
#: (see README, "The model organism"); both scorers stay available everywhere.
SCORING = "cloze"
ASSETS = Path(__file__).resolve().parent / "assets"
from .world_v2 import DOMAINS, SUBJECTS, TOPICS, generate_world  # noqa: E402  (after ASSETS: the builders read it)
from .build_v2 import build_organism_v2 as build_organism  # noqa: E402


class OrganismMissingError(FileNotFoundError):
    """The shipped organism files are not where the package expects them."""


def _require(path: Path) -> Path:
    if not path.exists():
        raise OrganismMissingError(
            f"the model organism is missing: {path} does not exist. Reinstall rmu_analysis, or rebuild it with "
            "`rmu-analysis organism build` (about 35 minutes on 2 CPU cores)."
        )
    return path


def load_organism(path: str | Path | None = None, *, dtype=None):
    """Load the shipped organism (or one built to ``path``): returns ``(model, tokenizer)`` in eval mode, on CPU."""
    root = Path(path) if path is not None else ASSETS
    _require(root / "model.safetensors")
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a 12 MB checkpoint needs no "Loading weights" bar (and nbval compares stderr)
    try:
        kwargs = {"dtype": dtype} if dtype is not None else {}
        model = LlamaForCausalLM.from_pretrained(root, **kwargs)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(root)
    attach_tokenizer(model, tokenizer)
    return model, tokenizer


def build_report(path: str | Path | None = None) -> dict:
    """The JSON report written when the organism was built (config, seed, accuracies, block norms, build time)."""
    root = Path(path) if path is not None else ASSETS
    return json.loads(_require(root / "build_report.json").read_text())


@lru_cache(maxsize=4)
def _corpora(root: str) -> dict:
    data = Path(root) / "data"
    return {
        "forget": {
            "bio": load_forget_corpus(_require(data / "bio-forget-corpus.jsonl")),
            "cyber": load_forget_corpus(_require(data / "cyber-forget-corpus.jsonl"), format="lines"),
        },
        "retain": load_text_corpus(_require(data / "retain-corpus.jsonl")),
    }


def organism_corpora(path: str | Path | None = None) -> dict:
    """``{"forget": {"bio": [...], "cyber": [...]}, "retain": [...]}`` read from the shipped files."""
    c = _corpora(str(Path(path) if path is not None else ASSETS))
    return {"forget": {k: list(v) for k, v in c["forget"].items()}, "retain": list(c["retain"])}


def has_dev_split(path: str | Path | None = None) -> bool:
    """Whether the organism at ``path`` (default: the shipped one) has dev question sets (testbed 2 does)."""
    return (Path(path if path is not None else ASSETS) / "data" / "bio-dev-mcq.jsonl").is_file()


def organism_mcq(path: str | Path | None = None, *, split: str = "test") -> dict[str, list[dict]]:
    """Held-out multiple-choice sets ``{"bio": [...], "cyber": [...], "general": [...]}`` (records as in WMDP).

    ``split``: ``"test"`` (the questions results are reported on) or ``"dev"`` (disjoint entities, for choosing
    hyperparameters; testbed 2 only)."""
    if split not in ("test", "dev"):
        raise ValueError(f"split must be 'test' or 'dev', got {split!r}")
    data = Path(path if path is not None else ASSETS) / "data"
    if split == "dev" and not has_dev_split(path):
        raise ValueError(f"the organism at {data.parent} has no dev questions (a testbed-1 organism): "
                         "build testbed 2 with `rmu-analysis organism build`")
    suffix = "-mcq.jsonl" if split == "test" else "-dev-mcq.jsonl"
    return {d: load_mcq(_require(data / f"{d}{suffix}")) for d in ("bio", "cyber", "general")}
