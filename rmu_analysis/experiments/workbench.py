"""What the runs of a sweep share: the data (:class:`ExperimentData`, with its held-out split) and one loaded model
with its tokenizer, prefix cache and base-model numbers (:class:`Workbench`)."""
from __future__ import annotations

import contextlib
import copy
import random
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from torch import nn

from ..data import load_forget_corpus, load_mcq, load_text_corpus, per_fact
from ..evaluation import WMDP_SUBJECTS
from ..models import load_model
from ..organism import SUBJECTS, has_dev_split, organism_corpora, organism_mcq
from ..unlearning import PrefixCache, UnlearnResult
from .inputs import ORGANISM, content_digest
from .measure import measure_outputs
from .specs import EvalSettings, RunSpec

__all__ = ["ExperimentData", "data_digest", "organism_data", "data_from_files", "cycle_texts", "Workbench",
           "LazyWorkbench", "training_texts"]


@dataclass(frozen=True, eq=False)
class ExperimentData:
    """Corpora and question sets of one experiment: ``forget`` topic -> texts, ``retain`` texts, ``mcq`` set ->
    records (one set per forget topic plus ``"general"``), ``subjects`` set -> the prompt's subject. ``name`` is
    what run specs refer to and what their keys hash (:func:`data_from_files` puts :attr:`digest` in it).
    ``dev_mcq``: the same sets on disjoint facts for choosing hyperparameters (empty when the data has none)."""

    name: str
    forget: Mapping[str, Sequence[str]]
    retain: Sequence[str]
    mcq: Mapping[str, Sequence[dict]]
    subjects: Mapping[str, str]
    dev_mcq: Mapping[str, Sequence[dict]] = field(default_factory=dict)

    @property
    def topics(self) -> tuple[str, ...]:
        return tuple(self.forget)

    @cached_property
    def digest(self) -> str:
        """A hash of the content (topics and texts, retain texts, question records, subjects), not of file names."""
        return data_digest(self.forget, self.retain, self.mcq, self.subjects, self.dev_mcq)

    def questions(self, settings: EvalSettings) -> dict[str, list[dict]]:
        """The question sets a run with ``settings`` is scored on: the test or dev sets, the first
        ``settings.per_fact`` questions of each fact, then the first ``settings.questions`` of each set."""
        if settings.split == "dev" and not self.dev_mcq:
            raise ValueError(f"the data {self.name!r} has no dev question sets: evaluate with split='test', or give "
                             "dev sets (the testbed-2 organism has them)")
        sets = self.mcq if settings.split == "test" else self.dev_mcq
        out = {}
        for name, records in sets.items():
            records = list(records)
            if settings.per_fact is not None:
                records = per_fact(records, settings.per_fact, name=f"set {name!r} (per_fact={settings.per_fact})")
            out[name] = records if settings.questions is None else records[: settings.questions]
        return out

    def record_subjects(self, name: str, records: Sequence[dict]) -> list[str | None]:
        """The prompt subject of each record of set ``name``: its own ``"subject"``, else the set's (None if empty)."""
        default = self.subjects.get(name) or None
        return [r.get("subject") or default for r in records]

    def split(self, n_eval: int, seed: int) -> tuple[dict[str, list[str]], list[str], dict[str, list[str]], list[str]]:
        """``(forget_train, retain_train, forget_eval, retain_eval)``: the last ``n_eval`` texts of each corpus are
        held out; the rest is shuffled with ``seed`` (per corpus)."""
        def cut(texts: Sequence[str], what: str) -> tuple[list[str], list[str]]:
            if len(texts) < 2 * n_eval:
                raise ValueError(f"the {what} corpus has {len(texts)} texts, fewer than 2 × eval_texts = {2 * n_eval}: "
                                 "lower EvalSettings.eval_texts or give more text")
            train = list(texts[:-n_eval])
            random.Random(f"{seed}/{what}").shuffle(train)
            return train, list(texts[-n_eval:])

        forget_train, forget_eval = {}, {}
        for topic, texts in self.forget.items():
            forget_train[topic], forget_eval[topic] = cut(texts, f"{topic} forget")
        retain_train, retain_eval = cut(self.retain, "retain")
        return forget_train, retain_train, forget_eval, retain_eval


def cycle_texts(texts: Sequence[str], n: int, seed: str) -> list[str]:
    """``texts`` repeated to at least ``n`` (each further pass reshuffled with ``seed``): more steps than one
    epoch of the training texts, as the reference's repeated corpora."""
    out, epoch = list(texts), 0
    while len(out) < n:
        epoch += 1
        again = list(texts)
        random.Random(f"{seed}/epoch{epoch}").shuffle(again)
        out += again
    return out


def data_digest(forget: Mapping[str, Sequence[str]], retain: Sequence[str], mcq: Mapping[str, Sequence[dict]],
                subjects: Mapping[str, str], dev_mcq: Mapping[str, Sequence[dict]] | None = None) -> str:
    """:attr:`ExperimentData.digest` of these corpora and question sets."""
    def parts():
        for topic, texts in forget.items():
            yield ["forget", topic, len(texts)]
            yield from texts
        yield ["retain", len(retain)]
        yield from retain
        for name, records in mcq.items():
            yield ["mcq", name, len(records)]
            yield from records
        yield ["subjects", dict(subjects)]
        for name, records in (dev_mcq or {}).items():  # data without dev sets keeps its digest
            yield ["dev_mcq", name, len(records)]
            yield from records
    return content_digest(parts())


def organism_data(path: str | Path | None = None) -> ExperimentData:
    """The built-in organism's corpora and held-out question sets (``rmu_analysis.organism``). Named
    ``"organism"`` (run keys hash the shipped files); an organism built to ``path`` is named by its content."""
    corpora, mcq = organism_corpora(path), organism_mcq(path)
    dev = organism_mcq(path, split="dev") if has_dev_split(path) else {}
    name = ORGANISM if path is None else "organism:" + data_digest(corpora["forget"], corpora["retain"], mcq, SUBJECTS,
                                                                   dev)
    return ExperimentData(name=name, forget=corpora["forget"], retain=corpora["retain"], mcq=mcq,
                          subjects=dict(SUBJECTS), dev_mcq=dev)


def data_from_files(forget: Mapping[str, str | Path], retain: str | Path, mcq: Mapping[str, str | Path], *,
                    name: str | None = None, min_chars: int = 0, subjects: Mapping[str, str] | None = None,
                    limit: int | None = None, forget_format: str = "auto",
                    dev_mcq: Mapping[str, str | Path] | None = None) -> ExperimentData:
    """Data from files (a real model): ``forget`` topic -> corpus file, one ``retain`` corpus, ``mcq`` set ->
    question file (the forget topics and ``"general"``, e.g. WMDP-Bio, WMDP-Cyber and MMLU). ``forget_format``:
    ``load_forget_corpus``'s ``format`` for every forget file. ``dev_mcq``: set -> question file on other facts,
    for choosing hyperparameters (``EvalSettings(split="dev")``), the same set names as ``mcq``.

    The data is named ``"files:<digest>"`` (``"<name>:<digest>"`` with ``name``), a hash of what was loaded (texts,
    records, subjects): run keys change when any file's content does, and identical copies under other file names
    are the same data (their results are shared)."""
    missing = [t for t in forget if t not in mcq] + ([] if "general" in mcq else ["general"])
    if missing:
        raise ValueError(f"question files are missing for {missing}: give one per forget topic and one 'general'")
    subj = {**WMDP_SUBJECTS, "general": "", **(subjects or {})}
    texts = {t: load_forget_corpus(p, min_chars=min_chars, format=forget_format) for t, p in forget.items()}
    retain_texts = load_text_corpus(retain, min_chars=min_chars)
    records = {s: load_mcq(p, limit=limit) for s, p in mcq.items()}
    set_subjects = {s: subj.get(s, s) for s in mcq}
    dev = {}
    if dev_mcq:
        if set(dev_mcq) != set(mcq):
            raise ValueError(f"dev question files must name the same sets as the test files: {sorted(dev_mcq)} vs "
                             f"{sorted(mcq)}")
        dev = {s: load_mcq(p, limit=limit) for s, p in dev_mcq.items()}
    digest = data_digest(texts, retain_texts, records, set_subjects, dev)
    return ExperimentData(name=f"{name or 'files'}:{digest}", forget=texts, retain=retain_texts, mcq=records,
                          subjects=set_subjects, dev_mcq=dev)


class Workbench:
    """What the runs of a sweep share: one loaded model (never changed), its tokenizer and data, one
    ``PrefixCache`` (a coefficient sweep at one layer reuses the frozen prefixes), an evaluation copy of the
    model that receives each run's trained tensors (:meth:`installed`), and the base model's numbers.

    ``eval_copy=False`` (a model too large to hold twice): the trained tensors are installed in the model for the
    evaluation and the original ones restored afterwards (the prefix cache then empties itself every run).
    """

    def __init__(self, model: nn.Module, tokenizer: Any, data: ExperimentData, *, model_id: str = "organism",
                 eval_copy: bool = True, cache_entries: int | None = 4096):
        self.model, self.tokenizer, self.data, self.model_id = model, tokenizer, data, model_id
        self.eval_copy = eval_copy
        self.cache = PrefixCache(max_entries=cache_entries)
        self._copy: nn.Module | None = None
        self._base: dict[EvalSettings, dict] = {}
        self._splits: dict[tuple[int, int], tuple] = {}

    @classmethod
    def load(cls, model: str = "organism", data: ExperimentData | None = None, *, dtype: Any = None,
             device: str | None = None, **kwargs: Any) -> "Workbench":
        """Load ``model`` ("organism" or a local HF directory); ``data`` None = the organism's."""
        if data is None:
            if model != "organism":
                raise ValueError("a model other than the organism needs its data: pass data=data_from_files(...)")
            data = organism_data()
        m, tok = load_model(model, dtype=dtype)
        if device is not None:
            m = m.to(device)
        return cls(m, tok, data, model_id=model, **kwargs)

    @property
    def dtype(self) -> str:
        """The model's parameter dtype as a name (``"float32"``, ``"bfloat16"`` ...)."""
        return str(next(self.model.parameters()).dtype).removeprefix("torch.")

    def check_run(self, model: str, data: str, dtype: str | None) -> None:
        """Refuse a run (a :class:`RunSpec` or an attack) made for another model, data or dtype (None = float32):
        its result would be filed under a key that says otherwise."""
        if model != self.model_id or data != self.data.name:
            raise ValueError(f"the run needs model {model!r} with data {data!r}, but the workbench holds "
                             f"{self.model_id!r} with {self.data.name!r}")
        if (dtype or "float32") != self.dtype:
            raise ValueError(f"the run needs the model in {dtype or 'float32'}, but the workbench holds it in "
                             f"{self.dtype}: load it with dtype={dtype or 'float32'!r}, or make the runs with "
                             f"dtype={self.dtype!r} (the plan's dtype, --dtype on the command line)")

    def split(self, settings: EvalSettings, seed: int) -> tuple:
        key = (settings.eval_texts, seed)
        if key not in self._splits:
            self._splits[key] = self.data.split(settings.eval_texts, seed)
        return self._splits[key]

    def base(self, settings: EvalSettings) -> dict[str, Any]:
        """The base model's output-side numbers (computed once per evaluation setting)."""
        if settings not in self._base:
            retain_eval = self.split(settings, 0)[3]
            self._base[settings] = measure_outputs(self.model, self.tokenizer, self.data, settings, retain_eval)
        return self._base[settings]

    @contextlib.contextmanager
    def installed(self, result: UnlearnResult) -> Iterator[nn.Module]:
        """A model holding ``result``'s trained tensors inside the block (``UnlearnResult.installed``): the
        evaluation copy, or the model itself when ``eval_copy`` is False; its own tensors are back on exit."""
        if self.eval_copy and self._copy is None:
            self._copy = copy.deepcopy(self.model).eval()
        with result.installed(self._copy if self.eval_copy else self.model) as model:
            yield model


class LazyWorkbench:
    """Builds the workbench on first use and keeps it (grids that need norms and the runs share one model)."""

    def __init__(self, factory: Callable[[], Workbench]):
        self.factory, self.bench = factory, None

    def __call__(self) -> Workbench:
        if self.bench is None:
            self.bench = self.factory()
        return self.bench


def training_texts(bench: Workbench, spec: RunSpec) -> tuple[dict[str, list[str]], list[str]]:
    """The run's training corpora: the held-out split's training part in the seed's order, repeated (reshuffled)
    to cover every step."""
    forget_train, retain_train, _, _ = bench.split(spec.eval, spec.seed)
    need = -(-spec.steps // len(bench.data.topics)) * spec.batch_size  # texts per corpus for every step
    forget = {t: cycle_texts(v, need, f"{spec.seed}/{t}") for t, v in forget_train.items()}
    return forget, cycle_texts(retain_train, need, f"{spec.seed}/retain")
