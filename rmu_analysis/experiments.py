"""Sweeps of unlearning runs and the paper's experiments built from them (Fig. 5, Fig. 3, Table 1 analogues).

One run = one :class:`RunSpec` (method, block l, coefficient, steps, seed, model, data, evaluation settings).
:func:`run_one` trains it with the engine (``rmu_analysis.unlearning``), evaluates it and returns one JSON-ready
dict; :func:`run_sweep` runs a grid, writes each finished run atomically to ``<out>/<spec.key()>.json`` and skips
runs whose file exists, so an interrupted sweep resumes and ``--shard i/n`` jobs can share one directory.
:func:`load_results` merges a directory into a DataFrame; the summary functions below it turn that frame into the
numbers the issue asks for (Spearman ρ over layers, early-vs-late averages, the deepest-third gap, the
c / ‖h_l‖ collapse, Table 1 with mean ± std over seeds).

What a run measures (all on held-out data: the last ``EvalSettings.eval_texts`` texts of every corpus never train):
per-set multiple-choice accuracy (forget topics and ``general``), retain LM loss, MaxLogit token confidence on
the forget questions (Fig. 2a–d), cos(u, h^(l)) on forget texts beside a uniform and a Gaussian null direction
(Fig. 2e–h), the forget norm ‖h^(l)‖ at block l before and after unlearning (Fig. 4), the coefficient used,
the training log and the wall time.

Seeds: ``seed`` draws u (as the reference does) *and* shuffles the order of the training texts, so the
output-space baselines (which draw nothing) also vary with it.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from ._io import atomic_write_json, atomic_write_text

__all__ = [
    "RESULT_VERSION", "EvalSettings", "RunSpec", "ExperimentData", "organism_data", "data_from_files", "Workbench",
    "run_one", "run_sweep", "SweepOutcome", "parse_shard", "shard_specs", "load_results", "valid_layers",
    "layer_sweep_grid", "coefficient_grid", "table1_grid", "ExperimentPlan", "organism_plan", "model_plan",
    "plan_grids", "forget_norms", "layer_table", "layer_targets", "early_late", "collapse_points",
    "collapse_summary", "table1_select", "table1_frame", "table1_markdown", "frame_markdown", "spearman", "isotonic_decreasing", "token_norms",
    "add_sweep_parser",
]

#: Bumped when what a run measures changes: part of every run's key, so old result files are not reused.
RESULT_VERSION = 1
STEERING = ("rmu", "adaptive-rmu")
#: The config field a spec's ``coeff`` sets, per method (GA and GradDiff have none).
COEFF_FIELDS = {"rmu": "steering_coeff", "adaptive-rmu": "beta", "npo": "beta"}


# ---------------------------------------------------------------------------------------------- specs
@dataclass(frozen=True)
class EvalSettings:
    """How a run is evaluated. ``questions``: questions per set (None = all); ``confidence_prompts`` forget
    questions per topic decoded for ``confidence_tokens`` greedy tokens (the paper: 3,260 and 30);
    ``eval_texts``: held-out texts per corpus (alignment, norms, retain loss); ``null_seed``: the null directions."""

    questions: int | None = None
    scoring: str = "letter"
    confidence_prompts: int = 32
    confidence_tokens: int = 8
    eval_texts: int = 64
    batch_size: int = 32
    null_seed: int = 12345

    def __post_init__(self) -> None:
        if self.scoring not in ("letter", "cloze"):
            raise ValueError(f"scoring must be 'letter' or 'cloze', got {self.scoring!r}")
        for name in ("confidence_prompts", "eval_texts", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.confidence_tokens < 0:
            raise ValueError(f"confidence_tokens must be >= 0, got {self.confidence_tokens}")


def _plain(value: Any) -> Any:
    """Lists to tuples (hashable, canonical), ints stay ints."""
    if isinstance(value, list):
        return tuple(_plain(v) for v in value)
    return value


@dataclass(frozen=True)
class RunSpec:
    """One unlearning run of a sweep.

    ``coeff``: c for ``rmu``, β for ``adaptive-rmu`` and ``npo`` (None: the config default; GA and GradDiff take
    none). ``lr`` / ``alpha`` None: the method's default. ``options``: any other config field, as
    ``(("loss", "masked"), ...)``. ``model`` / ``data``: names of the model and data the run needs (checked
    against the :class:`Workbench`). The key (:meth:`key`) hashes all of it plus the resolved engine config.
    """

    method: str
    layer: int
    steps: int
    seed: int = 0
    coeff: float | None = None
    alpha: float | None = None
    lr: float | None = None
    batch_size: int = 4
    options: tuple[tuple[str, Any], ...] = ()
    model: str = "organism"
    data: str = "organism"
    eval: EvalSettings = field(default_factory=EvalSettings)

    def __post_init__(self) -> None:
        from .unlearning import CONFIG_CLASSES

        if self.method not in CONFIG_CLASSES:
            raise ValueError(f"method must be one of {sorted(CONFIG_CLASSES)}, got {self.method!r}")
        for name in ("coeff", "alpha", "lr"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, float(value))
        opts = dict(self.options.items() if isinstance(self.options, Mapping) else self.options)
        object.__setattr__(self, "options", tuple(sorted((str(k), _plain(v)) for k, v in opts.items())))
        if isinstance(self.eval, Mapping):
            object.__setattr__(self, "eval", EvalSettings(**self.eval))
        self.config()  # every invalid combination fails here, before any run starts

    def config(self):
        """The engine config this run trains with (``RMUConfig``, ``AdaptiveRMUConfig``, ``GAConfig`` ...)."""
        from .unlearning import CONFIG_CLASSES

        cls = CONFIG_CLASSES[self.method]
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {"layer": self.layer, "steps": self.steps, "seed": self.seed,
                                  "batch_size": self.batch_size}
        if self.lr is not None:
            kwargs["lr"] = self.lr
        if self.coeff is not None:
            if self.method not in COEFF_FIELDS:
                raise ValueError(f"{self.method} takes no coefficient (coeff={self.coeff}): leave it None")
            kwargs[COEFF_FIELDS[self.method]] = self.coeff
        if self.alpha is not None:
            if "alpha" not in names:
                raise ValueError(f"{self.method} has no retain weight alpha: leave it None")
            kwargs["alpha"] = self.alpha
        for name, value in self.options:
            if name not in names:
                raise ValueError(f"option {name!r} is not a field of {cls.__name__}: fields are {sorted(names)}")
            if name in kwargs:
                raise ValueError(f"option {name!r} duplicates a RunSpec field: set it there")
            kwargs[name] = value
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["options"] = [[k, v] for k, v in self.options]
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "RunSpec":
        data = dict(data)
        data["options"] = tuple((k, _plain(v)) for k, v in data.get("options", ()))
        data["eval"] = EvalSettings(**data.get("eval", {}))
        return cls(**data)

    def key(self) -> str:
        """A short stable hash of the spec, the resolved config and :data:`RESULT_VERSION` (the file name)."""
        payload = {"spec": self.to_dict(), "config": self.config().to_dict(), "version": RESULT_VERSION}
        text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def label(self) -> str:
        coeff = "" if self.coeff is None else f" {'c' if self.method == 'rmu' else 'β'}={self.coeff:g}"
        lr = "" if self.lr is None else f" lr={self.lr:g}"
        return f"{self.method} l={self.layer}{coeff}{lr} seed={self.seed}"


# ----------------------------------------------------------------------------------------------- data
@dataclass(frozen=True, eq=False)
class ExperimentData:
    """Corpora and question sets of one experiment: ``forget`` topic -> texts, ``retain`` texts, ``mcq`` set ->
    records (one set per forget topic plus ``"general"``), ``subjects`` set -> the prompt's subject."""

    name: str
    forget: Mapping[str, Sequence[str]]
    retain: Sequence[str]
    mcq: Mapping[str, Sequence[dict]]
    subjects: Mapping[str, str]

    @property
    def topics(self) -> tuple[str, ...]:
        return tuple(self.forget)

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


def organism_data(path: str | Path | None = None) -> ExperimentData:
    """The built-in organism's corpora and held-out question sets (``rmu_analysis.organism``)."""
    from .organism import SUBJECTS, organism_corpora, organism_mcq

    corpora = organism_corpora(path)
    return ExperimentData(name="organism", forget=corpora["forget"], retain=corpora["retain"],
                          mcq=organism_mcq(path), subjects=dict(SUBJECTS))


def data_from_files(forget: Mapping[str, str | Path], retain: str | Path, mcq: Mapping[str, str | Path], *,
                    name: str | None = None, min_chars: int = 0, subjects: Mapping[str, str] | None = None,
                    limit: int | None = None) -> ExperimentData:
    """Data from files (a real model): ``forget`` topic -> corpus file, one ``retain`` corpus, ``mcq`` set ->
    question file (the forget topics and ``"general"``, e.g. WMDP-Bio, WMDP-Cyber and MMLU)."""
    from .data import load_forget_corpus, load_mcq, load_text_corpus
    from .unlearning.cli import SUBJECTS as WMDP_SUBJECTS

    missing = [t for t in forget if t not in mcq] + ([] if "general" in mcq else ["general"])
    if missing:
        raise ValueError(f"question files are missing for {missing}: give one per forget topic and one 'general'")
    subj = {**WMDP_SUBJECTS, "general": "", **(subjects or {})}
    return ExperimentData(
        name=name or "files:" + ",".join(f"{t}={Path(p).name}" for t, p in sorted({**forget, **mcq}.items())),
        forget={t: load_forget_corpus(p, min_chars=min_chars) for t, p in forget.items()},
        retain=load_text_corpus(retain, min_chars=min_chars),
        mcq={s: load_mcq(p, limit=limit) for s, p in mcq.items()},
        subjects={s: subj.get(s, s) for s in mcq},
    )


# ----------------------------------------------------------------------------------------- measuring
def lm_loss(model: nn.Module, tokenizer: Any, texts: Sequence[str], *, batch_size: int = 32,
            max_length: int = 512) -> float:
    """Mean next-token NLL (nats per token) over the real tokens of ``texts`` (right padding)."""
    from ._batching import iter_batches

    total, count = 0.0, 0
    with torch.no_grad():
        for _, batch in iter_batches(model, list(texts), tokenizer, batch_size=batch_size, padding_side="right",
                                     max_length=max_length):
            logits = model(**batch.model_inputs(), use_cache=False).logits[:, :-1].float()
            target = batch.input_ids[:, 1:]
            mask = batch.attention_mask[:, 1:].bool()
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")
            total += float(nll[mask].sum())
            count += int(mask.sum())
    return total / max(count, 1)


def _subjects(data: ExperimentData, name: str, records: Sequence[dict]) -> list[str | None]:
    default = data.subjects.get(name) or None
    return [r.get("subject") or default for r in records]


def measure_outputs(model: nn.Module, tokenizer: Any, data: ExperimentData, settings: EvalSettings,
                    retain_eval: Sequence[str]) -> dict[str, Any]:
    """Output-side numbers of a model: accuracy per question set, retain LM loss, MaxLogit on forget questions."""
    from .confidence import measure_confidence
    from .evaluation import evaluate_mcq, mcq_prompt

    accuracy = {}
    for name, records in data.mcq.items():
        records = list(records if settings.questions is None else records[: settings.questions])
        res = evaluate_mcq(model, tokenizer, records, _subjects(data, name, records), scoring=settings.scoring,
                           batch_size=settings.batch_size)
        accuracy[name] = float(res.accuracy)
    confidence = {}
    for topic in data.topics:
        records = list(data.mcq[topic][: settings.confidence_prompts])
        prompts = [mcq_prompt(r, s, scoring=settings.scoring) for r, s in zip(records, _subjects(data, topic, records))]
        conf = measure_confidence(model, prompts, tokenizer, generate=settings.confidence_tokens,
                                  batch_size=settings.batch_size)
        v = conf.values("max_logit")
        confidence[topic] = {"max_logit_mean": float(v.mean()), "max_logit_std": float(v.std()),
                             "max_logit_median": float(np.median(v)),
                             "max_prob_mean": float(conf.values("max_prob").mean()),
                             "entropy_mean": float(conf.values("entropy").mean())}
    return {"accuracy": accuracy,
            "retain_loss": lm_loss(model, tokenizer, retain_eval, batch_size=settings.batch_size),
            "confidence": confidence}


def measure_representations(model: nn.Module, tokenizer: Any, layer: int, forget_eval: Mapping[str, Sequence[str]],
                            vectors: Mapping[str, torch.Tensor], settings: EvalSettings) -> dict[str, Any]:
    """Per topic at block ``layer``: cos(u, h) (token and prompt level) beside the uniform and Gaussian null
    directions, and the mean token norm ‖h^(l)‖ (real tokens, BOS excluded)."""
    from .alignment import alignment

    out = {}
    for topic, texts in forget_eval.items():
        a = alignment(model, list(texts), vectors[topic], [layer], tokenizer=tokenizer, exclude_bos=True,
                      null_seed=settings.null_seed, batch_size=settings.batch_size)
        out[topic] = {
            "cos_u_mean": float(a.cos(layer, "u", "token").mean()),
            "cos_u_std": float(a.cos(layer, "u", "token").std()),
            "cos_uniform_null_mean": float(a.cos(layer, "uniform_null", "token").mean()),
            "cos_gaussian_null_mean": float(a.cos(layer, "gaussian_null", "token").mean()),
            "prompt_cos_u_mean": float(a.cos(layer, "u", "prompt").mean()),
            "prompt_cos_uniform_null_mean": float(a.cos(layer, "uniform_null", "prompt").mean()),
            "norm_mean": float(a.norm(layer, "token").mean()),
            "norm_std": float(a.norm(layer, "token").std()),
        }
    return out


# -------------------------------------------------------------------------------------------- workbench
class Workbench:
    """What the runs of a sweep share: one loaded model (never changed), its tokenizer and data, one
    ``PrefixCache`` (a coefficient sweep at one layer reuses the frozen prefixes), an evaluation copy of the
    model that receives each run's trained tensors, and the base model's numbers.

    ``eval_copy=False`` (a model too large to hold twice): the trained tensors are installed in the model for the
    evaluation and the original ones restored afterwards (the prefix cache then empties itself every run).
    """

    def __init__(self, model: nn.Module, tokenizer: Any, data: ExperimentData, *, model_id: str = "organism",
                 eval_copy: bool = True, cache_entries: int | None = 4096):
        from .unlearning import PrefixCache

        self.model, self.tokenizer, self.data, self.model_id = model, tokenizer, data, model_id
        self.eval_copy = eval_copy
        self.cache = PrefixCache(max_entries=cache_entries)
        self._twin: nn.Module | None = None
        self._installed: set[str] = set()
        self._base: dict[EvalSettings, dict] = {}
        self._splits: dict[tuple[int, int], tuple] = {}

    @classmethod
    def load(cls, model: str = "organism", data: ExperimentData | None = None, *, dtype: Any = None,
             device: str | None = None, **kwargs: Any) -> "Workbench":
        """Load ``model`` ("organism" or a local HF directory); ``data`` None = the organism's."""
        from .models import load_model

        if data is None:
            if model != "organism":
                raise ValueError("a model other than the organism needs its data: pass data=data_from_files(...)")
            data = organism_data()
        m, tok = load_model(model, dtype=dtype)
        if device is not None:
            m = m.to(device)
        return cls(m, tok, data, model_id=model, **kwargs)

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

    def evaluation_model(self, trained: Mapping[str, torch.Tensor]) -> nn.Module:
        """The copy of the model with ``trained`` installed (tensors of the previous run put back first)."""
        if self._twin is None:
            self._twin = copy.deepcopy(self.model).eval()
        params = dict(self._twin.named_parameters())
        source = dict(self.model.named_parameters())
        with torch.no_grad():
            for name in self._installed - set(trained):
                params[name].copy_(source[name])
            for name, tensor in trained.items():
                params[name].copy_(tensor.to(device=params[name].device, dtype=params[name].dtype))
        self._installed = set(trained)
        return self._twin


def _vectors(bench: Workbench, result: Any, spec: RunSpec) -> dict[str, torch.Tensor]:
    """The run's control vectors u; for the baselines the u that RMU with the same seed would draw (a probe)."""
    if result.control_vectors:
        return dict(result.control_vectors)
    from .unlearning.common import draw_control_vectors, hidden_size

    dtype = bench.model.get_input_embeddings().weight.dtype
    from .models import model_device

    drawn = draw_control_vectors(len(bench.data.topics), hidden_size(bench.model), spec.seed, dtype,
                                 model_device(bench.model))
    return dict(zip(bench.data.topics, drawn))


def _round(obj: Any, digits: int = 6) -> Any:
    if isinstance(obj, float):
        return obj if not math.isfinite(obj) else round(obj, digits)
    if isinstance(obj, dict):
        return {k: _round(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_round(v, digits) for v in obj]
    return obj


def training_texts(bench: Workbench, spec: RunSpec) -> tuple[dict[str, list[str]], list[str]]:
    """The run's training corpora: the held-out split's training part in the seed's order, repeated (reshuffled)
    to cover every step."""
    forget_train, retain_train, _, _ = bench.split(spec.eval, spec.seed)
    need = -(-spec.steps // len(bench.data.topics)) * spec.batch_size  # texts per corpus for every step
    forget = {t: cycle_texts(v, need, f"{spec.seed}/{t}") for t, v in forget_train.items()}
    return forget, cycle_texts(retain_train, need, f"{spec.seed}/retain")


def run_one(spec: RunSpec, bench: Workbench) -> dict[str, Any]:
    """Train ``spec`` with the engine on ``bench``'s model (unchanged), evaluate it, return the result dict."""
    import transformers

    from .unlearning import NonFiniteLossError, unlearn

    if spec.model != bench.model_id or spec.data != bench.data.name:
        raise ValueError(f"the run needs model {spec.model!r} with data {spec.data!r}, but the workbench holds "
                         f"{bench.model_id!r} with {bench.data.name!r}")
    t0 = time.perf_counter()
    config = spec.config()
    forget_train, retain_train = training_texts(bench, spec)
    _, _, forget_eval, retain_eval = bench.split(spec.eval, spec.seed)
    row: dict[str, Any] = {"key": spec.key(), "spec": spec.to_dict(), "config": config.to_dict(),
                           "topics": list(bench.data.topics), "version": RESULT_VERSION}
    steering = spec.method in STEERING
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "the data run out" is recorded as steps_run
            result = unlearn(bench.model, bench.tokenizer, forget_train, retain_train, config, inplace=False,
                             prefix_cache=bench.cache if steering else None, progress=False)
    except NonFiniteLossError as exc:
        return {**row, "status": "nonfinite", "error": str(exc), "wall_seconds": time.perf_counter() - t0}
    train_seconds = time.perf_counter() - t0
    vectors = _vectors(bench, result, spec)

    base = bench.base(spec.eval)
    base_rep = measure_representations(bench.model, bench.tokenizer, spec.layer, forget_eval, vectors, spec.eval)
    if bench.eval_copy:
        model = bench.evaluation_model(result.trained)
        after = measure_outputs(model, bench.tokenizer, bench.data, spec.eval, retain_eval)
        rep = measure_representations(model, bench.tokenizer, spec.layer, forget_eval, vectors, spec.eval)
    else:
        params = dict(bench.model.named_parameters())
        saved = {n: params[n].detach().clone() for n in result.trained}
        try:
            result.apply_to(bench.model)
            after = measure_outputs(bench.model, bench.tokenizer, bench.data, spec.eval, retain_eval)
            rep = measure_representations(bench.model, bench.tokenizer, spec.layer, forget_eval, vectors, spec.eval)
        finally:
            with torch.no_grad():
                for n, t in saved.items():
                    params[n].copy_(t)

    topics = bench.data.topics
    coefficients = {t: float(result.coefficients[t]) for t in topics if t in result.coefficients}
    keep = ("step", "topic", "forget_loss", "retain_loss", "coefficient", "forget_norm", "cos_forget_u")
    row.update({
        "status": "ok",
        "label": spec.label(),
        "forget_accuracy": {t: after["accuracy"][t] for t in topics},
        "general_accuracy": after["accuracy"].get("general"),
        "accuracy": after["accuracy"],
        "retain_loss": after["retain_loss"],
        "confidence": after["confidence"],
        "alignment": rep,
        "forget_norm": {t: {"frozen": base_rep[t]["norm_mean"], "final": rep[t]["norm_mean"]} for t in topics},
        "coefficient": coefficients,
        "coefficient_over_norm": {t: coefficients[t] / base_rep[t]["norm_mean"] for t in coefficients},
        "u": "trained" if steering else "drawn with the run's seed as RMU would (not trained toward)",
        "base": {"accuracy": base["accuracy"], "retain_loss": base["retain_loss"],
                 "confidence": base["confidence"], "alignment": base_rep},
        "log": [{k: r[k] for k in keep if k in r} for r in result.log],
        "steps_run": result.steps,
        "hidden_size": int(bench.model.get_input_embeddings().weight.shape[1]),
        "train_seconds": train_seconds,
        "wall_seconds": time.perf_counter() - t0,
        "environment": {"torch": torch.__version__, "transformers": transformers.__version__,
                        "threads": torch.get_num_threads(), "device": str(next(bench.model.parameters()).device)},
    })
    return _round(row)


# ------------------------------------------------------------------------------------------- the sweep
@dataclass(frozen=True)
class SweepOutcome:
    """What :func:`run_sweep` did: the shard's result files, how many runs it ran and how many it skipped."""

    paths: tuple[Path, ...]
    ran: int
    skipped: int


def parse_shard(text: str | tuple[int, int] | None) -> tuple[int, int]:
    """``"i/n"`` (0-based: shards 0/4 … 3/4) -> ``(i, n)``; None -> ``(0, 1)``."""
    if text is None:
        return 0, 1
    if isinstance(text, tuple):
        i, n = text
    else:
        try:
            i, n = (int(x) for x in str(text).split("/"))
        except ValueError:
            raise ValueError(f"--shard takes i/n with integers, 0 <= i < n (e.g. 0/4), got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"shard {i}/{n} is out of range: shards of n = {n} are 0/{n} … {n - 1}/{n}")
    return i, n


def shard_specs(specs: Iterable[RunSpec], shard: tuple[int, int] | str | None = None) -> list[RunSpec]:
    """Shard i of n: the grid (duplicates removed, order kept) cut into n contiguous, nearly equal parts, so that
    the runs at one layer stay together (they share the prefix cache). The n shards partition the grid."""
    i, n = parse_shard(shard)
    unique = list({s.key(): s for s in specs}.values())
    bounds = [round(k * len(unique) / n) for k in range(n + 1)]
    return unique[bounds[i]: bounds[i + 1]]


def _finished(path: Path, key: str) -> bool:
    try:
        return json.loads(path.read_text()).get("key") == key
    except (OSError, ValueError):
        return False


def run_sweep(specs: Iterable[RunSpec], out_dir: str | Path, bench: Workbench | Callable[[], Workbench] | None, *,
              shard: tuple[int, int] | str | None = None, resume: bool = True, progress: bool = True,
              desc: str = "runs", workers: int = 1, threads: int = 1) -> SweepOutcome:
    """Run shard ``shard`` of the grid ``specs``, one JSON file per finished run (``<out_dir>/<key>.json``,
    written atomically). With ``resume`` runs whose file is there are skipped; nothing finished is lost when
    the sweep is interrupted. ``bench`` may be a callable that builds the workbench: it is called only when a
    run is left to do (a finished sweep loads no model).

    ``workers > 1``: that many processes (``spawn``), each building its own workbench with ``bench`` (then a
    picklable callable, e.g. ``functools.partial(Workbench.load, "organism")``) and using ``threads`` torch
    threads; runs that share a seed and a layer go to the same process (they share its prefix cache). On 2 CPU
    cores two one-thread processes beat one two-thread process on the organism's small matrices.
    """
    from tqdm import tqdm

    out = Path(out_dir)
    mine = shard_specs(specs, shard)
    paths = tuple(out / f"{s.key()}.json" for s in mine)
    todo = [(s, p) for s, p in zip(mine, paths) if not (resume and _finished(p, s.key()))]
    skipped = len(mine) - len(todo)
    # runs sharing a model state, seed and layer run back to back: the prefix cache serves them
    todo.sort(key=lambda sp: (sp[0].model, sp[0].data, sp[0].seed, sp[0].layer, sp[0].method))
    bar = tqdm(total=len(mine), initial=skipped, desc=desc, unit="run", disable=not progress)
    try:
        if workers > 1 and len(todo) > 1:
            _run_parallel(todo, bench, workers, threads, bar)
        else:
            workbench = None
            for spec, path in todo:
                if workbench is None:
                    workbench = bench() if callable(bench) and not isinstance(bench, Workbench) else bench
                bar.set_postfix_str(spec.label())
                row = run_one(spec, workbench)
                atomic_write_json(path, row)
                bar.update(1)
    finally:
        bar.close()
    return SweepOutcome(paths=paths, ran=len(todo), skipped=skipped)


_WORKER: dict[str, Any] = {}


def _worker_init(factory: Callable[[], Workbench], threads: int) -> None:
    torch.set_num_threads(threads)
    _WORKER["factory"] = factory


def _worker_run(group: list[tuple[RunSpec, Path]]) -> int:
    if "bench" not in _WORKER:
        _WORKER["bench"] = _WORKER["factory"]()
    for spec, path in group:
        atomic_write_json(path, run_one(spec, _WORKER["bench"]))
    return len(group)


def _run_parallel(todo: list[tuple[RunSpec, Path]], bench: Any, workers: int, threads: int, bar) -> None:
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from itertools import groupby

    if isinstance(bench, Workbench) or not callable(bench):
        raise ValueError("workers > 1 needs a picklable workbench factory (e.g. functools.partial(Workbench.load, "
                         "'organism')), not a loaded Workbench")
    size = max(1, -(-len(todo) // (4 * workers)))  # about 4 tasks per process, so that they finish together
    groups = []
    for _, g in groupby(todo, key=lambda sp: (sp[0].model, sp[0].data, sp[0].seed, sp[0].layer)):
        g = list(g)
        groups += [g[i: i + size] for i in range(0, len(g), size)]
    groups.sort(key=len, reverse=True)  # longest first
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                             initargs=(bench, threads)) as pool:
        futures = [pool.submit(_worker_run, g) for g in groups]
        for f in as_completed(futures):
            bar.update(f.result())


# ------------------------------------------------------------------------------------------ results
def _flatten(row: Mapping[str, Any]) -> dict[str, Any]:
    spec = row["spec"]
    flat: dict[str, Any] = {"key": row["key"], "status": row.get("status", "ok")}
    for name in ("method", "layer", "coeff", "alpha", "lr", "steps", "seed", "batch_size", "model", "data"):
        flat[name] = spec.get(name)
    if flat["status"] != "ok":
        return flat
    topics = row["topics"]
    for name, acc in row["accuracy"].items():
        flat[f"acc_{name}"] = acc
        flat[f"base_acc_{name}"] = row["base"]["accuracy"][name]
    flat["forget_acc"] = float(np.mean([row["forget_accuracy"][t] for t in topics]))
    flat["base_forget_acc"] = float(np.mean([row["base"]["accuracy"][t] for t in topics]))
    flat["general_acc"] = row.get("general_accuracy")
    flat["base_general_acc"] = row["base"]["accuracy"].get("general")
    flat["retain_loss"] = row["retain_loss"]
    flat["base_retain_loss"] = row["base"]["retain_loss"]
    for t in topics:
        flat[f"coef_{t}"] = row["coefficient"].get(t, np.nan)
        flat[f"norm_frozen_{t}"] = row["forget_norm"][t]["frozen"]
        flat[f"norm_final_{t}"] = row["forget_norm"][t]["final"]
        flat[f"ratio_{t}"] = row["coefficient_over_norm"].get(t, np.nan)
        flat[f"cos_u_{t}"] = row["alignment"][t]["cos_u_mean"]
        flat[f"cos_uniform_null_{t}"] = row["alignment"][t]["cos_uniform_null_mean"]
        flat[f"cos_gaussian_null_{t}"] = row["alignment"][t]["cos_gaussian_null_mean"]
        flat[f"base_cos_u_{t}"] = row["base"]["alignment"][t]["cos_u_mean"]
        flat[f"maxlogit_{t}"] = row["confidence"][t]["max_logit_mean"]
        flat[f"base_maxlogit_{t}"] = row["base"]["confidence"][t]["max_logit_mean"]
    for name in ("steps_run", "hidden_size", "train_seconds", "wall_seconds"):
        flat[name] = row.get(name)
    return flat


def load_results(out_dir: str | Path, specs: Iterable[RunSpec] | None = None, *, logs: bool = False) -> pd.DataFrame:
    """Every result file in ``out_dir`` (all shards) as one row per run; with ``specs`` only those runs, with a
    warning naming how many are missing. ``logs=True`` adds the training log (a list of dicts) as ``log``."""
    out = Path(out_dir)
    rows = {}
    for path in sorted(out.glob("*.json")) if out.is_dir() else []:
        if path.name.startswith("."):
            continue
        try:
            row = json.loads(path.read_text())
        except ValueError:
            warnings.warn(f"{path} is not valid JSON: skipped", stacklevel=2)
            continue
        if not isinstance(row, dict) or "spec" not in row or "key" not in row:
            continue
        flat = _flatten(row)
        if logs:
            flat["log"] = row.get("log", [])
        rows[row["key"]] = flat
    if specs is not None:
        keys = list(dict.fromkeys(s.key() for s in specs))
        missing = [k for k in keys if k not in rows]
        if missing:
            warnings.warn(f"{len(missing)} of {len(keys)} runs have no result in {out} yet", stacklevel=2)
        rows = {k: rows[k] for k in keys if k in rows}
    frame = pd.DataFrame(list(rows.values()))
    if len(frame) and (frame["status"] != "ok").any():
        bad = frame[frame["status"] != "ok"]
        warnings.warn(f"{len(bad)} run(s) did not finish training (status {sorted(set(bad['status']))})", stacklevel=2)
    return frame


# ---------------------------------------------------------------------------------------------- grids
def valid_layers(n_blocks: int) -> list[int]:
    """Blocks l whose three trained blocks l−2, l−1, l all exist (the paper's recipe): 2 … n_blocks−1."""
    return list(range(2, n_blocks))


def _specs(method: str, layers: Iterable[int], coeffs: Iterable[float | None], seeds: Iterable[int], **common: Any
           ) -> list[RunSpec]:
    return [RunSpec(method=method, layer=l, coeff=c, seed=s, **common) for s in seeds for l in layers for c in coeffs]


def layer_sweep_grid(layers: Iterable[int], *, c: float, beta: float = 5.0, seeds: Iterable[int] = (0, 1, 2),
                     **common: Any) -> list[RunSpec]:
    """Fig. 5: every layer × {RMU with one fixed c, Adaptive RMU with β}. ``common``: steps, lr, alpha, eval ..."""
    layers, seeds = list(layers), list(seeds)
    return _specs("rmu", layers, [c], seeds, **common) + _specs("adaptive-rmu", layers, [beta], seeds, **common)


def coefficient_grid(coeffs: Mapping[int, Iterable[float]], *, method: str = "rmu", seeds: Iterable[int] = (0,),
                     **common: Any) -> list[RunSpec]:
    """Fig. 3 and the c / ‖h_l‖ collapse: ``coeffs`` layer -> coefficients (c for RMU, β for Adaptive RMU)."""
    return [spec for layer, cs in coeffs.items() for spec in _specs(method, [layer], list(cs), list(seeds), **common)]


def table1_grid(layer: int, grid: Mapping[str, Iterable[Mapping[str, Any]]], *, seeds: Iterable[int] = (0, 1, 2),
                **common: Any) -> list[RunSpec]:
    """Table 1: every method at one layer, each over its hyperparameter grid (method -> list of RunSpec field
    overrides such as ``{"lr": 1e-4}`` or ``{"coeff": 5.0}``), every point × every seed."""
    out = []
    for method, points in grid.items():
        for point in points:
            for s in seeds:
                out.append(RunSpec(method=method, layer=layer, seed=s, **{**common, **dict(point)}))
    return out


@dataclass(frozen=True)
class ExperimentPlan:
    """Every knob of the experiments (one object per model; the CLI and notebooks build the same one).

    - layer sweep: ``layers`` × {RMU with ``c``, Adaptive RMU with ``beta``} × ``seeds``.
    - coefficient sweep: at each of ``coeff_layers``, RMU with c = ratio × ‖h_l‖ (the frozen forget norm) for
      each ``coeff_ratios``, and Adaptive RMU with each ``adaptive_betas``, × ``coeff_seeds``.
    - Table 1: every method of ``table_grid`` at ``table_layer`` × ``seeds``.
    ``lr`` / ``alpha`` apply to the steering methods; the baselines' come from ``table_grid``.
    """

    layers: tuple[int, ...]
    c: float
    steps: int
    lr: float
    alpha: float
    table_layer: int
    table_grid: tuple[tuple[str, tuple[tuple[tuple[str, Any], ...], ...]], ...]
    beta: float = 5.0
    seeds: tuple[int, ...] = (0, 1, 2)
    coeff_layers: tuple[int, ...] = ()
    coeff_ratios: tuple[float, ...] = ()
    adaptive_betas: tuple[float, ...] = ()
    coeff_seeds: tuple[int, ...] = (0,)
    batch_size: int = 4
    log_every: int = 5  # odd, so that the log alternates topics (steps 0, 5, 10 ...: bio, cyber, bio ...)
    model: str = "organism"
    data: str = "organism"
    eval: EvalSettings = field(default_factory=EvalSettings)

    def grid(self) -> dict[str, list[dict[str, Any]]]:
        """``table_grid`` as method -> list of field overrides."""
        return {m: [dict(p) for p in points] for m, points in self.table_grid}

    def common(self) -> dict[str, Any]:
        return {"steps": self.steps, "batch_size": self.batch_size, "model": self.model, "data": self.data,
                "eval": self.eval, "options": (("log_every", self.log_every),)}


def _grid(**methods: Sequence[Mapping[str, Any]]) -> tuple:
    return tuple((m.replace("_", "-"), tuple(tuple(sorted(p.items())) for p in points)) for m, points in methods.items())


def organism_plan(quick: bool = False) -> ExperimentPlan:
    """The experiments on the built-in organism (12 blocks, cloze scoring), sized for 2 CPU cores (two one-thread
    worker processes): the full plan ≈ 20 minutes, ``quick`` ≈ 2 minutes (one seed, blocks 3, 7, 11, the first
    48 questions of each set and 32 held-out texts per corpus: its accuracies are on that subset).

    Steering runs: 200 steps, lr 1e-2, α = 100 (the organism is tiny and trains fast; 100 steps do not converge).
    Fixed c = 30 ≈ 3.4 × the frozen forget norm at block 3 (8.8, ``build_report.json``): it forgets at block 3
    and, the norm growing 2.7× over depth, c / ‖h_l‖ falls to 1.2 at block 11. Adaptive RMU: β = 5 (the paper's).
    Table 1 at block 3 (l = 7 of 32 in the paper, about the same relative depth). The baselines train the same
    tensors as RMU (the MLP down-projections of blocks l−2..l), 100 steps, each over two learning rates that
    bracket the step from "nothing forgotten" to "general accuracy collapses" (measured at block 3, seed 0: GA
    3e-4 forgets nothing, 1e-3 collapses general to 39%, so GA also gets 5e-4 and 7e-4 between them; GradDiff 1e-3 → 74/56% forget, 3e-3 → collapse;
    NPO 1e-3 forgets nothing, 3e-3 → 66/53%).
    """
    from .organism import SCORING

    steps, lr, alpha, c = 200, 1e-2, 100.0, 30.0
    steering = {"lr": lr, "alpha": alpha}
    grid = _grid(
        ga=[{"lr": 3e-4, "steps": 100}, {"lr": 5e-4, "steps": 100}, {"lr": 7e-4, "steps": 100}, {"lr": 1e-3, "steps": 100}],
        graddiff=[{"lr": 1e-3, "alpha": 1.0, "steps": 100}, {"lr": 3e-3, "alpha": 1.0, "steps": 100}],
        npo=[{"lr": 3e-3, "coeff": 0.1, "alpha": 1.0, "steps": 100}, {"lr": 1e-2, "coeff": 0.1, "alpha": 1.0, "steps": 100}],
        rmu=[{**steering, "coeff": c}, {**steering, "coeff": 40.0}],
        adaptive_rmu=[{**steering, "coeff": 3.0}, {**steering, "coeff": 5.0}],
    )
    evaluation = EvalSettings(scoring=SCORING)
    if quick:
        small = _grid(ga=[{"lr": 1e-3, "steps": 100}], graddiff=[{"lr": 1e-3, "alpha": 1.0, "steps": 100}],
                      npo=[{"lr": 3e-3, "coeff": 0.1, "alpha": 1.0, "steps": 100}], rmu=[{**steering, "coeff": c}],
                      adaptive_rmu=[{**steering, "coeff": 5.0}])
        return ExperimentPlan(layers=(3, 7, 11), c=c, steps=steps, lr=lr, alpha=alpha, table_layer=3,
                              table_grid=small, seeds=(0,), coeff_layers=(3, 11), coeff_ratios=(1.0, 4.0),
                              eval=dataclasses.replace(evaluation, questions=48, eval_texts=32, confidence_prompts=16))
    return ExperimentPlan(layers=tuple(valid_layers(12)), c=c, steps=steps, lr=lr, alpha=alpha, table_layer=3,
                          table_grid=grid, seeds=(0, 1, 2), coeff_layers=(3, 7, 11),
                          coeff_ratios=(0.5, 1.0, 2.0, 4.0, 8.0), adaptive_betas=(2.0, 10.0), eval=evaluation)


def model_plan(n_blocks: int, *, model: str, data: str, c: float = 6.5, layer: int = 7, steps: int = 500,
               seeds: tuple[int, ...] = (0, 1, 2), eval: EvalSettings | None = None) -> ExperimentPlan:
    """The paper's recipe on a real model (Zephyr-7B defaults: l = 7, c = 6.5, β = 5, α = 1200, lr 5e-5, 500
    steps); baselines at the WMDP paper's scale of learning rates."""
    steering = {"lr": 5e-5, "alpha": 1200.0}
    grid = _grid(
        ga=[{"lr": 1e-5}, {"lr": 5e-5}],
        graddiff=[{"lr": 1e-5, "alpha": 1.0}, {"lr": 5e-5, "alpha": 1.0}],
        npo=[{"lr": 1e-5, "coeff": 0.1, "alpha": 1.0}, {"lr": 5e-5, "coeff": 0.1, "alpha": 1.0}],
        rmu=[{**steering, "coeff": c}],
        adaptive_rmu=[{**steering, "coeff": 5.0}],
    )
    return ExperimentPlan(layers=tuple(valid_layers(n_blocks)), c=c, steps=steps, lr=5e-5, alpha=1200.0,
                          table_layer=layer, table_grid=grid, seeds=seeds, coeff_layers=(layer,),
                          coeff_ratios=(0.5, 1.0, 2.0, 4.0), model=model, data=data,
                          eval=eval or EvalSettings(confidence_prompts=64, confidence_tokens=30))


def forget_norms(bench: Workbench, layers: Iterable[int], settings: EvalSettings | None = None) -> dict[int, float]:
    """‖h_l‖ of the frozen model at each block: mean token norm on the held-out forget texts (BOS excluded),
    averaged over topics — the scale c is compared with."""
    settings = settings or EvalSettings()
    forget_eval = bench.split(settings, 0)[2]
    layers = sorted(set(layers))
    per_topic = []
    for texts in forget_eval.values():
        norms = token_norms(bench, list(texts), layers, batch_size=settings.batch_size)
        per_topic.append([float(norms[l].mean()) for l in layers])
    return {l: float(np.mean([p[i] for p in per_topic])) for i, l in enumerate(layers)}


def token_norms(bench: Workbench, texts: Sequence[str], layers: Iterable[int], *, batch_size: int = 32
                ) -> dict[int, torch.Tensor]:
    """Per-token ‖h^(l)‖ of ``texts`` (real tokens, BOS excluded) at each of ``layers``, from one pass of the
    frozen model."""
    from .alignment import alignment

    layers = list(layers)
    u = torch.ones(int(bench.model.get_input_embeddings().weight.shape[1]))  # any u: only the norms are read
    a = alignment(bench.model, list(texts), u, layers, tokenizer=bench.tokenizer, exclude_bos=True,
                  batch_size=batch_size)
    return {l: a.norm(l, "token") for l in layers}


def plan_grids(plan: ExperimentPlan, norms: Mapping[int, float] | None = None) -> dict[str, list[RunSpec]]:
    """The grids of a plan: ``{"coefficient": [...], "layer": [...], "table1": [...]}``. The coefficient sweep's
    c values are ratio × ``norms[l]`` (rounded to 4 significant digits, so the grid is stable)."""
    common = plan.common()
    steer = {"lr": plan.lr, "alpha": plan.alpha}
    coeff: list[RunSpec] = []
    if plan.coeff_layers:
        if norms is None:
            raise ValueError("the coefficient sweep needs the frozen forget norms: pass norms=forget_norms(bench, ...)")
        cs = {l: [float(f"{r * norms[l]:.4g}") for r in plan.coeff_ratios] for l in plan.coeff_layers}
        coeff = coefficient_grid(cs, method="rmu", seeds=plan.coeff_seeds, **steer, **common)
        if plan.adaptive_betas:
            coeff += coefficient_grid({l: plan.adaptive_betas for l in plan.coeff_layers}, method="adaptive-rmu",
                                      seeds=plan.coeff_seeds, **steer, **common)
    return {
        "coefficient": coeff,
        "layer": layer_sweep_grid(plan.layers, c=plan.c, beta=plan.beta, seeds=plan.seeds, **steer, **common),
        "table1": table1_grid(plan.table_layer, plan.grid(), seeds=plan.seeds, **common),
    }


# -------------------------------------------------------------------------------------------- summaries
def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN when either side is constant."""
    from scipy.stats import spearmanr

    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 2 or np.all(x == x[0]) or np.all(y == y[0]):
        return float("nan")
    return float(spearmanr(x, y).statistic)


def isotonic_decreasing(x: Sequence[float], y: Sequence[float]) -> np.ndarray:
    """Least-squares non-increasing fit of y on x (pool-adjacent-violators; equal x share one value)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    order = np.argsort(x, kind="stable")
    xs, ys = x[order], y[order]
    ux, inverse = np.unique(xs, return_inverse=True)
    means = np.bincount(inverse, weights=ys) / np.bincount(inverse)
    weights = np.bincount(inverse).astype(float)
    blocks: list[list[float]] = []  # [value, weight, count of unique x]
    for m, w in zip(means, weights):
        blocks.append([m, w, 1])
        while len(blocks) > 1 and blocks[-2][0] < blocks[-1][0]:
            v2, w2, n2 = blocks.pop()
            v1, w1, n1 = blocks.pop()
            blocks.append([(v1 * w1 + v2 * w2) / (w1 + w2), w1 + w2, n1 + n2])
    fitted_unique = np.concatenate([[v] * n for v, _, n in blocks])
    fitted = np.empty_like(y)
    fitted[order] = fitted_unique[inverse]
    return fitted


def _r2(y: np.ndarray, fitted: np.ndarray) -> float:
    total = float(((y - y.mean()) ** 2).sum())
    return float("nan") if total == 0 else 1.0 - float(((y - fitted) ** 2).sum()) / total


def _topics(frame: pd.DataFrame) -> list[str]:
    return [c[len("norm_frozen_"):] for c in frame.columns if c.startswith("norm_frozen_")]


def _ok(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[frame["status"] == "ok"] if "status" in frame else frame


def layer_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Per (method, layer): mean and std over seeds of the forget accuracy (mean of topics and per topic) and
    the general accuracy, and the number of seeds."""
    frame = _ok(frame)
    cols = ["forget_acc"] + [f"acc_{t}" for t in _topics(frame)] + ["general_acc"]
    g = frame.groupby(["method", "layer"])[cols]
    out = g.mean().add_suffix("_mean").join(g.std(ddof=1).add_suffix("_std")).join(g.size().rename("n_seeds"))
    return out.reset_index()


def layer_targets(frame: pd.DataFrame, *, max_forget: float = 0.35, min_layer_fraction: float = 0.8,
                  min_rho: float = 0.5, min_gap: float = 0.20, min_general_ratio: float = 0.85) -> dict[str, Any]:
    """The layer sweep's targets (the issue; forget accuracy = mean over topics, averaged over seeds per layer):
    Adaptive RMU ≤ ``max_forget`` at ≥ ``min_layer_fraction`` of the layers; fixed-c RMU's forget accuracy rises
    with depth (Spearman ρ > ``min_rho``) and is ≥ ``min_gap`` above Adaptive RMU over the deepest third of the
    layers; general accuracy ≥ ``min_general_ratio`` × base in every run."""
    frame = _ok(frame)
    per_layer = frame.groupby(["method", "layer"])["forget_acc"].mean().unstack("method").sort_index()
    layers = list(per_layer.index)
    rmu, ada = per_layer["rmu"], per_layer["adaptive-rmu"]
    deep = layers[len(layers) - math.ceil(len(layers) / 3):]
    ratio = frame["general_acc"] / frame["base_general_acc"]
    fraction = float((ada <= max_forget).mean())
    rho = spearman(layers, rmu.values)
    gap = float(rmu[deep].mean() - ada[deep].mean())
    worst = float(ratio.min())
    worst_run = frame.loc[ratio.idxmin()]
    return {
        "layers": layers, "deepest_third": deep,
        "adaptive_forget_by_layer": ada.round(4).to_dict(), "rmu_forget_by_layer": rmu.round(4).to_dict(),
        "targets": {
            "adaptive_fraction_of_layers_at_most_35pct": {"value": fraction, "threshold": min_layer_fraction,
                                                          "held": fraction >= min_layer_fraction},
            "rmu_spearman_rho_forget_vs_layer": {"value": rho, "threshold": min_rho, "held": rho > min_rho},
            "deepest_third_gap_rmu_minus_adaptive": {"value": gap, "threshold": min_gap, "held": gap >= min_gap},
            "min_general_over_base": {"value": worst, "threshold": min_general_ratio,
                                      "held": worst >= min_general_ratio,
                                      "worst_run": f"{worst_run['method']} l={worst_run['layer']} "
                                                   f"seed={worst_run['seed']}"},
        },
    }


def early_late(frame: pd.DataFrame, split: int) -> pd.DataFrame:
    """The paper's summary of Fig. 5: per topic, the average forget accuracy of RMU and Adaptive RMU over the
    early layers (l < ``split``) and the late ones (l ≥ ``split``), and how much Adaptive RMU lowers it."""
    frame = _ok(frame)
    rows = []
    for topic in _topics(frame) + ["mean"]:
        col = "forget_acc" if topic == "mean" else f"acc_{topic}"
        for part, mask in (("early", frame["layer"] < split), ("late", frame["layer"] >= split)):
            sub = frame[mask]
            if sub.empty:
                continue
            by = sub.groupby("method")[col].mean()
            rows.append({"topic": topic, "layers": part, "first": int(sub["layer"].min()),
                         "last": int(sub["layer"].max()), "rmu": by.get("rmu", np.nan),
                         "adaptive_rmu": by.get("adaptive-rmu", np.nan),
                         "lowered_by": by.get("rmu", np.nan) - by.get("adaptive-rmu", np.nan)})
    return pd.DataFrame(rows)


def collapse_points(frame: pd.DataFrame) -> pd.DataFrame:
    """One point per (steering run, topic): layer, method, coefficient c, frozen norm ‖h_l‖, ratio c / ‖h_l‖,
    and that topic's forget accuracy."""
    frame = _ok(frame)
    frame = frame[frame["method"].isin(STEERING)]
    parts = []
    for t in _topics(frame):
        parts.append(pd.DataFrame({
            "key": frame["key"], "method": frame["method"], "layer": frame["layer"], "seed": frame["seed"],
            "topic": t, "coefficient": frame[f"coef_{t}"], "frozen_norm": frame[f"norm_frozen_{t}"],
            "ratio": frame[f"ratio_{t}"], "forget_acc": frame[f"acc_{t}"],
        }))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def collapse_summary(points: pd.DataFrame, *, min_points: int = 3) -> dict[str, Any]:
    """How well forget accuracy is one function of c / ‖h_l‖ across layers (the principle behind Adaptive RMU).

    - ``within_layer_rho``: Spearman ρ(ratio, accuracy) inside each layer with ≥ ``min_points`` distinct ratios;
    - ``pooled_rho_ratio`` / ``pooled_rho_coefficient``: the same over every point, against c/‖h_l‖ and raw c;
    - ``r2_ratio`` / ``r2_coefficient``: R² of the best non-increasing curve of accuracy on c/‖h_l‖ (on raw c);
      one curve explains the points when ``r2_ratio`` is high and well above ``r2_coefficient``;
    - ``residual_layer_rho``: Spearman ρ between layer and the residual from that curve (≈ 0 when the layer
      carries nothing beyond the ratio).
    """
    pts = points.dropna(subset=["ratio", "forget_acc"])
    within = {}
    for layer, sub in pts.groupby("layer"):
        if sub["ratio"].nunique() >= min_points:
            within[int(layer)] = spearman(sub["ratio"], sub["forget_acc"])
    y = pts["forget_acc"].to_numpy(float)
    fit_ratio = isotonic_decreasing(np.log(pts["ratio"]), y)
    fit_coeff = isotonic_decreasing(np.log(pts["coefficient"]), y)
    vals = [v for v in within.values() if np.isfinite(v)]
    return {
        "n_points": int(len(pts)), "n_layers": int(pts["layer"].nunique()),
        "within_layer_rho": within,
        "within_layer_rho_mean": float(np.mean(vals)) if vals else float("nan"),
        "pooled_rho_ratio": spearman(pts["ratio"], y),
        "pooled_rho_coefficient": spearman(pts["coefficient"], y),
        "r2_ratio": _r2(y, fit_ratio),
        "r2_coefficient": _r2(y, fit_coeff),
        "residual_layer_rho": spearman(pts["layer"], np.round(y - fit_ratio, 9)),  # rounding: no float noise
        "residual_layer_rho_coefficient": spearman(pts["layer"], np.round(y - fit_coeff, 9)),
    }


def _point_label(row: Mapping[str, Any]) -> str:
    parts = []
    if row["method"] in COEFF_FIELDS and pd.notna(row.get("coeff")):
        parts.append(f"{'c' if row['method'] == 'rmu' else 'β'}={row['coeff']:g}")
    if pd.notna(row.get("lr")):
        parts.append(f"lr={row['lr']:g}")
    if row["method"] != "ga" and pd.notna(row.get("alpha")):
        parts.append(f"α={row['alpha']:g}")
    return ", ".join(parts) or "defaults"


def table1_select(frame: pd.DataFrame, *, min_general_ratio: float = 0.85) -> pd.DataFrame:
    """Every grid point of every method with its mean over seeds, and which one is selected: the lowest mean
    forget accuracy among the points whose mean general accuracy is ≥ ``min_general_ratio`` × base (if none is,
    the one with the highest general accuracy). Selection uses the reported seeds (stated beside the table)."""
    frame = _ok(frame).copy()
    frame["point"] = [_point_label(r) for _, r in frame.iterrows()]
    topics = _topics(frame)
    cols = [f"acc_{t}" for t in topics] + ["forget_acc", "general_acc", "base_general_acc", "retain_loss"]
    means = frame.groupby(["method", "point"])[cols].mean().reset_index()
    means["n_seeds"] = frame.groupby(["method", "point"]).size().values
    means["utility_ok"] = means["general_acc"] >= min_general_ratio * means["base_general_acc"]
    means["selected"] = False
    for method, sub in means.groupby("method"):
        ok = sub[sub["utility_ok"]]
        pick = ok["forget_acc"].idxmin() if len(ok) else sub["general_acc"].idxmax()
        means.loc[pick, "selected"] = True
    return means


METHOD_NAMES = {"base": "base", "ga": "Gradient ascent", "graddiff": "Gradient difference", "npo": "NPO",
                "rmu": "RMU", "adaptive-rmu": "Adaptive RMU"}


def table1_frame(frame: pd.DataFrame, *, min_general_ratio: float = 0.85) -> pd.DataFrame:
    """Table 1: base and, per method, its selected grid point: mean and std over seeds of each forget topic's
    accuracy and the general accuracy."""
    frame = _ok(frame).copy()
    frame["point"] = [_point_label(r) for _, r in frame.iterrows()]
    selection = table1_select(frame, min_general_ratio=min_general_ratio)
    sets = [t for t in _topics(frame)] + ["general"]
    first = frame.iloc[0]
    rows = [{"method": "base", "setting": "", "n_seeds": 1,
             **{f"{s}_mean": first[f"base_acc_{s}"] for s in sets}, **{f"{s}_std": 0.0 for s in sets}}]
    order = [m for m in METHOD_NAMES if m in set(selection["method"])]
    for method in order:
        point = selection[(selection["method"] == method) & selection["selected"]].iloc[0]["point"]
        runs = frame[(frame["method"] == method) & (frame["point"] == point)]
        rows.append({"method": method, "setting": point, "n_seeds": len(runs),
                     **{f"{s}_mean": runs[f"acc_{s}"].mean() for s in sets},
                     **{f"{s}_std": runs[f"acc_{s}"].std(ddof=1) if len(runs) > 1 else 0.0 for s in sets}})
    return pd.DataFrame(rows)


def table1_markdown(table: pd.DataFrame, *, names: Mapping[str, str] | None = None, caption: str = "") -> str:
    """Table 1 as Markdown: accuracy in % as mean ± std over seeds (lower is better on the forget topics)."""
    names = {**METHOD_NAMES, **(names or {})}
    sets = [c[: -len("_mean")] for c in table.columns if c.endswith("_mean")]
    header = "| method | setting | " + " | ".join(sets) + " | seeds |"
    lines = [header, "|" + "---|" * (len(sets) + 3)]
    for _, r in table.iterrows():
        cells = [f"{100 * r[f'{s}_mean']:.1f} ± {100 * r[f'{s}_std']:.1f}" if r["n_seeds"] > 1
                 else f"{100 * r[f'{s}_mean']:.1f}" for s in sets]
        lines.append(f"| {names.get(r['method'], r['method'])} | {r['setting']} | " + " | ".join(cells)
                     + f" | {r['n_seeds']} |")
    return (caption + "\n\n" if caption else "") + "\n".join(lines) + "\n"


def frame_markdown(frame: pd.DataFrame, digits: int = 4) -> str:
    """A DataFrame as a Markdown table (no extra dependency)."""
    def cell(v: Any) -> str:
        if isinstance(v, (float, np.floating)):
            return "" if not np.isfinite(v) else f"{v:.{digits}g}"
        return str(v)

    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def write_markdown(path: str | Path, text: str) -> Path:
    """Write a Markdown file atomically."""
    return atomic_write_text(path, text)


# ------------------------------------------------------------------------------------------------- CLI
def add_sweep_parser(subparsers) -> Any:
    """``rmu-analysis sweep``: run (a shard of) one experiment's grid into a results directory, or merge one."""
    p = subparsers.add_parser(
        "sweep", help="run a grid of unlearning runs (layer sweep, coefficient sweep, Table 1), resumable, shardable",
        description="Run (a shard of) an experiment's grid; one JSON file per finished run in --results. Runs "
                    "already there are skipped, so an interrupted sweep resumes; shards i/n (0-based) of the same "
                    "grid can run as separate jobs into one directory, e.g. a SLURM array: "
                    "#SBATCH --array=0-7  then  rmu-analysis sweep --experiment layer --shard "
                    "$SLURM_ARRAY_TASK_ID/8 --results runs/ ...; afterwards `rmu-analysis sweep --merge --results "
                    "runs/` prints the merged summary.",
    )
    p.add_argument("--experiment", choices=("layer", "coefficient", "table1", "all"), default="all")
    p.add_argument("--results", type=Path, required=True, help="results directory (one <key>.json per run)")
    p.add_argument("--shard", default=None, help="i/n: run only shard i of n (0-based), e.g. 3/8")
    p.add_argument("--quick", action="store_true", help="the reduced organism plan (as `reproduce --quick`)")
    p.add_argument("--merge", action="store_true", help="run nothing: read --results and print the summary")
    p.add_argument("--list", action="store_true", help="run nothing: print this shard's runs and whether done")
    _add_model_arguments(p)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_sweep_command)
    return p


def _add_model_arguments(p) -> None:
    p.add_argument("--model", default="organism", help='"organism" or a local HF model directory (GPU)')
    p.add_argument("--forget-files", nargs="+", metavar="TOPIC=FILE", help="forget corpora (real model)")
    p.add_argument("--retain-file", type=Path, help="retain corpus (real model)")
    p.add_argument("--mcq", nargs="+", metavar="SET=FILE",
                   help="question files: one per forget topic and general=FILE (e.g. MMLU)")
    p.add_argument("--coeff", type=float, default=None, help="fixed c of the layer sweep (real model; default 6.5)")
    p.add_argument("--layer", type=int, default=None, help="Table 1 / coefficient-sweep layer (real model; default 7)")
    p.add_argument("--steps", type=int, default=None, help="steps per run (real model; default 500)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default 0 1 2)")
    p.add_argument("--dtype", default="auto", help="float32 | bfloat16 | auto (bf16 on CUDA)")
    p.add_argument("--workers", type=int, default=None,
                   help="processes running runs in parallel (default: 2 for the organism on CPU, 1 for --model)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads per process (default: 1 with several workers, else 2)")


def _pairs(items: Sequence[str] | None, flag: str) -> dict[str, str]:
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"{flag} takes NAME=FILE, got {item!r}")
        k, v = item.split("=", 1)
        out[k] = v
    return out


def plan_from_args(args) -> tuple[ExperimentPlan, Callable[[], Workbench]]:
    """The plan and a workbench factory that the flags describe (shared by ``sweep`` and ``reproduce``)."""
    if args.model == "organism":
        import functools

        given = [flag for flag, value in (("--forget-files", args.forget_files), ("--retain-file", args.retain_file),
                                          ("--mcq", args.mcq), ("--coeff", args.coeff), ("--layer", args.layer),
                                          ("--steps", args.steps)) if value is not None]
        if given:
            raise ValueError(f"{', '.join(given)}: only for --model PATH; the organism runs its own data and the "
                             "fixed plan of rmu_analysis.experiments.organism_plan()")
        plan = organism_plan(quick=getattr(args, "quick", False))
        if args.seeds:
            plan = dataclasses.replace(plan, seeds=tuple(args.seeds))
        return plan, functools.partial(Workbench.load, "organism")  # picklable: --workers processes build their own
    if getattr(args, "quick", False):
        raise ValueError("--quick is the organism's reduced plan; for --model PATH reduce the work with --seeds, "
                         "--steps and smaller --mcq files")
    forget, mcq = _pairs(args.forget_files, "--forget-files"), _pairs(args.mcq, "--mcq")
    if not forget or args.retain_file is None or not mcq:
        raise ValueError("--model PATH needs --forget-files TOPIC=FILE ..., --retain-file FILE and --mcq SET=FILE ...")
    data = data_from_files(forget, args.retain_file, mcq)
    from .models import load_model

    model_cfg = Path(args.model) / "config.json"
    if not model_cfg.is_file():
        raise FileNotFoundError(f"{args.model} is not a Hugging Face model directory: {model_cfg} does not exist")
    n_blocks = int(json.loads(model_cfg.read_text()).get("num_hidden_layers"))
    plan = model_plan(n_blocks, model=str(args.model), data=data.name,
                      c=6.5 if args.coeff is None else args.coeff, layer=7 if args.layer is None else args.layer,
                      steps=args.steps or 500, seeds=tuple(args.seeds or (0, 1, 2)))

    def factory() -> Workbench:
        cuda = torch.cuda.is_available()
        dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if cuda else "float32")
        m, tok = load_model(args.model, dtype=dtype)
        if cuda:
            m = m.to("cuda")
        return Workbench(m, tok, data, model_id=str(args.model))
    return plan, factory


def resources(args) -> tuple[int, int]:
    """(worker processes, torch threads per process) from the flags: the organism on CPU defaults to two
    one-thread workers (2 cores), a real model to one process."""
    workers = args.workers if args.workers is not None else (2 if args.model == "organism" and not
                                                              torch.cuda.is_available() else 1)
    threads = args.threads if args.threads is not None else (1 if workers > 1 else 2)
    return workers, threads


class _LazyBench:
    """Builds the workbench on first use and keeps it (grids that need norms and the runs share one model)."""

    def __init__(self, factory: Callable[[], Workbench]):
        self.factory, self.bench = factory, None

    def __call__(self) -> Workbench:
        if self.bench is None:
            self.bench = self.factory()
        return self.bench


def plan_norms(plan: ExperimentPlan, bench: Callable[[], Workbench], results: Path) -> dict[int, float]:
    """The frozen forget norms the coefficient grid needs, cached in ``results/norms.json`` (shards agree)."""
    path = results / "norms.json"
    want = {str(l) for l in plan.coeff_layers}
    if path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("model") == plan.model and cached.get("data") == plan.data and want <= set(cached["norms"]):
            return {int(k): float(v) for k, v in cached["norms"].items()}
    norms = forget_norms(bench(), plan.coeff_layers, plan.eval)
    atomic_write_json(path, {"model": plan.model, "data": plan.data, "norms": {str(k): v for k, v in norms.items()}})
    return norms


def _sweep_command(args) -> int:
    plan, factory = plan_from_args(args)
    bench = _LazyBench(factory)
    norms = plan_norms(plan, bench, args.results) if plan.coeff_layers and args.experiment in ("coefficient", "all") \
        else None
    grids = plan_grids(dataclasses.replace(plan, coeff_layers=()) if norms is None else plan, norms)
    names = list(grids) if args.experiment == "all" else [args.experiment]
    specs = [s for n in names for s in grids[n]]
    if args.list:
        for s in shard_specs(specs, args.shard):
            done = _finished(args.results / f"{s.key()}.json", s.key())
            print(f"{s.key()}  {'done' if done else 'todo'}  {s.label()}")
        return 0
    if not args.merge:
        workers, threads = resources(args)
        torch.set_num_threads(threads)
        outcome = run_sweep(specs, args.results, bench if workers == 1 else factory, shard=args.shard,
                            progress=not args.no_progress, workers=workers, threads=threads)
        print(f"shard {args.shard or '0/1'}: ran {outcome.ran}, skipped {outcome.skipped} finished run(s); "
              f"results in {args.results}")
    frame = load_results(args.results, specs)
    done = len(frame)
    print(f"{done} of {len(set(s.key() for s in specs))} runs of {', '.join(names)} have results in {args.results}")
    if done:
        cols = ["method", "layer", "coeff", "lr", "seed", "forget_acc", "general_acc", "retain_loss"]
        print(_ok(frame)[[c for c in cols if c in frame]].sort_values(["method", "layer", "seed"]).to_string(index=False))
    return 0
