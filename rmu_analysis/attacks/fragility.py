"""Forget-token fragility (arXiv 2501.19202): a forget-topic term inside a general question can derail an
RMU-unlearned model, as if unlearning had planted a backdoor keyed on forget-domain tokens.

:func:`insert_term` puts a term into a question — ``where="prefix"``: a sentence before the question
(``prefix_template``, default ``"{term} is mentioned here."``); ``where="inside"``: a parenthesis before the
question's final punctuation (``inside_template``, default ``" ({term})"``: ``"Which river runs through Varon
(Krurnoux virus)?"``). :func:`fragility` evaluates the general questions clean and with one term each (drawn with
a seed from ``terms``) and reports the paired accuracy drop (clean − perturbed) on the same questions.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np
from torch import nn

from ..evaluation import evaluate_mcq
from ..stats import paired_difference
from .common import AttackRow, check_choice, check_positive_int, check_records, difference_row, interval_row, rows_frame

__all__ = ["FragilityConfig", "FragilityResult", "insert_term", "perturb_records", "fragility"]

_END = "?.!:;"


@dataclass(frozen=True)
class FragilityConfig:
    """Where and how a term is inserted, and how questions are scored (``"letter"`` or ``"cloze"``)."""

    where: str = "prefix"
    prefix_template: str = "{term} is mentioned here."
    inside_template: str = " ({term})"
    scoring: str = "letter"
    batch_size: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        check_choice(self.where, "where", ("prefix", "inside"))
        check_choice(self.scoring, "scoring", ("letter", "cloze"))
        check_positive_int(self.batch_size, "batch_size")
        for name in ("prefix_template", "inside_template"):
            if "{term}" not in getattr(self, name):
                raise ValueError(f"{name} must contain '{{term}}', got {getattr(self, name)!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def insert_term(question: str, term: str, *, where: str = "prefix", prefix_template: str = "{term} is mentioned here.",
                inside_template: str = " ({term})") -> str:
    """``question`` with ``term`` inserted (see the module docstring)."""
    check_choice(where, "where", ("prefix", "inside"))
    q = str(question).strip()
    if not str(term).strip():
        raise ValueError("term is empty: pass a forget-topic entity or keyword")
    if where == "prefix":
        return f"{prefix_template.format(term=term)} {q}"
    cut = len(q.rstrip(_END))
    return f"{q[:cut]}{inside_template.format(term=term)}{q[cut:]}"


def perturb_records(records: Sequence[dict], terms: Sequence[str], config: FragilityConfig | None = None
                    ) -> tuple[list[dict], list[str]]:
    """Copies of ``records`` with one term each inserted into the question (terms drawn uniformly with
    ``config.seed``); returns ``(records, terms used)``. Choices and answers are unchanged."""
    config = FragilityConfig() if config is None else config
    terms = [str(t) for t in (terms or []) if str(t).strip()]
    if not terms:
        raise ValueError("terms is empty: pass forget-topic entities or keywords to insert")
    recs = check_records(records)
    rng = np.random.default_rng(config.seed)
    used = [terms[i] for i in rng.integers(0, len(terms), size=len(recs))]
    out = [dict(r, question=insert_term(r["question"], t, where=config.where, prefix_template=config.prefix_template,
                                        inside_template=config.inside_template)) for r, t in zip(recs, used)]
    return out, used


@dataclass(frozen=True)
class FragilityResult:
    """Clean and perturbed accuracy on the same general questions; ``drop`` = clean − perturbed, paired."""

    config: FragilityConfig
    method: str
    clean: Any  # MCQResult
    perturbed: Any  # MCQResult
    drop: Any  # PairedDifference
    terms: tuple[str, ...]
    seconds: float

    def rows(self) -> tuple[AttackRow, ...]:
        s = f"term {self.config.where}"
        return (interval_row(self.method, "fragility", s, "clean accuracy", self.clean.interval()),
                interval_row(self.method, "fragility", s, "perturbed accuracy", self.perturbed.interval(),
                             seconds=self.seconds),
                difference_row(self.method, "fragility", s, "drop", self.drop, seconds=self.seconds))

    def to_frame(self):
        return rows_frame(self.rows())


def fragility(model: nn.Module, tokenizer: Any, records: Sequence[dict], terms: Sequence[str],
              config: FragilityConfig | None = None, *, subject: Any = None, method: str = "model",
              cluster_key: Any = None) -> FragilityResult:
    """Accuracy on general ``records`` without and with a forget-topic term from ``terms`` inserted; the paired
    drop (clean − perturbed) with its interval (arXiv 2501.19202)."""
    config = FragilityConfig() if config is None else config
    if not isinstance(config, FragilityConfig):
        raise TypeError(f"config must be a FragilityConfig, got {type(config).__name__}")
    t0 = time.perf_counter()
    recs = check_records(records)
    perturbed_recs, used = perturb_records(recs, terms, config)
    kw = dict(scoring=config.scoring, batch_size=config.batch_size, cluster_key=cluster_key)
    clean = evaluate_mcq(model, tokenizer, recs, subject, **kw)
    perturbed = evaluate_mcq(model, tokenizer, perturbed_recs, subject, **kw)
    # prompts differ by construction, so pair the per-question results directly (same questions, same order)
    drop = paired_difference(clean.correct, perturbed.correct, clean.clusters)
    return FragilityResult(config=config, method=method, clean=clean, perturbed=perturbed, drop=drop,
                           terms=tuple(used), seconds=time.perf_counter() - t0)
