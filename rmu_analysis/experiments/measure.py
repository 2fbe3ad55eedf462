"""What a run measures, on held-out data: accuracy per question set, retain LM loss and MaxLogit on the forget
questions (the outputs: Fig. 2a–d, Fig. 3, Table 1), and at block l cos(u, h) beside null directions and the
forget norm ‖h^(l)‖ (the representations: Fig. 2e–h, Fig. 4)."""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from .._batching import iter_batches
from ..activations import token_norms
from ..confidence import Confidence, measure_confidence
from ..cosines import alignment
from ..evaluation import MCQResult, evaluate_mcq, mcq_prompt
from ..unlearning import UnlearnResult
from .specs import EvalSettings

if TYPE_CHECKING:  # annotations only: the workbench module imports this one
    from .workbench import ExperimentData, Workbench

__all__ = ["lm_loss", "question_prompts", "accuracies", "measure_outputs", "measure_representations",
           "forget_norms", "each_installed", "accuracy_table", "confidence_table", "alignment_table"]


def lm_loss(model: nn.Module, tokenizer: Any, texts: Sequence[str], *, batch_size: int = 32,
            max_length: int = 512) -> float:
    """Mean next-token NLL (nats per token) over the real tokens of ``texts`` (right padding)."""
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


def question_prompts(data: "ExperimentData", name: str, *, scoring: str, limit: int | None = None) -> list[str]:
    """The zero-shot prompts of question set ``name`` (its first ``limit`` questions), as they are scored."""
    records = list(data.mcq[name] if limit is None else data.mcq[name][:limit])
    return [mcq_prompt(r, s, scoring=scoring) for r, s in zip(records, data.record_subjects(name, records))]


def evaluate_sets(model: nn.Module, tokenizer: Any, data: "ExperimentData", settings: EvalSettings,
                  sets: Mapping[str, Sequence[dict]] | None = None) -> dict[str, MCQResult]:
    """Score every question set of ``data`` that ``settings`` selects (test or dev split, ``per_fact``,
    ``questions``; ``sets``: that selection when the caller already made it): set name ->
    :class:`~rmu_analysis.evaluation.MCQResult` (intervals, paired comparisons)."""
    sets = data.questions(settings) if sets is None else sets
    return {name: evaluate_mcq(model, tokenizer, records, data.record_subjects(name, records),
                               scoring=settings.scoring, batch_size=settings.batch_size)
            for name, records in sets.items()}


def accuracies(model: nn.Module, tokenizer: Any, data: "ExperimentData", *, scoring: str, batch_size: int,
               questions: int | None = None, split: str = "test", per_fact: int | None = None) -> dict[str, float]:
    """Zero-shot multiple-choice accuracy on every question set of ``data`` (``split`` "test" or "dev"; the first
    ``per_fact`` questions of each fact; the first ``questions`` of each set)."""
    settings = EvalSettings(questions=questions, scoring=scoring, batch_size=batch_size, split=split,
                            per_fact=per_fact)
    return {name: float(res.accuracy) for name, res in evaluate_sets(model, tokenizer, data, settings).items()}


def correct_bits(result: MCQResult) -> str:
    """The per-question outcome as a string of 0/1 (question order of the set): what paired tests and
    fact-resampled intervals over stored runs need (:func:`bits_array`)."""
    return "".join("1" if c else "0" for c in result.correct)


def bits_array(bits: str) -> np.ndarray:
    """:func:`correct_bits` back to a boolean array."""
    return np.frombuffer(bits.encode(), dtype=np.uint8) == ord("1")


def in_corpus_accuracy(records: Sequence[dict], result: MCQResult) -> dict[str, float] | None:
    """Accuracy on the questions whose fact the forget corpus states (``in_corpus``) and on the others; None
    when the records carry no ``in_corpus`` tag (or one half is empty)."""
    if not records or not all("in_corpus" in r for r in records):
        return None
    tag = np.array([bool(r["in_corpus"]) for r in records])
    if tag.all() or not tag.any():
        return None
    correct = result.correct
    return {"in": float(correct[tag].mean()), "out": float(correct[~tag].mean())}


def measure_outputs(model: nn.Module, tokenizer: Any, data: "ExperimentData", settings: EvalSettings,
                    retain_eval: Sequence[str]) -> dict[str, Any]:
    """Output-side numbers of a model: accuracy per question set, retain LM loss, MaxLogit on forget questions."""
    sets = data.questions(settings)
    results = evaluate_sets(model, tokenizer, data, settings, sets)
    accuracy = {name: float(res.accuracy) for name, res in results.items()}
    in_corpus = {name: split for name, res in results.items()
                 if (split := in_corpus_accuracy(sets[name], res)) is not None}
    confidence = {}
    for topic in data.topics:
        prompts = question_prompts(data, topic, scoring=settings.scoring, limit=settings.confidence_prompts)
        conf = measure_confidence(model, prompts, tokenizer, generate=settings.confidence_tokens,
                                  batch_size=settings.batch_size)
        v = conf.values("max_logit")
        confidence[topic] = {"max_logit_mean": float(v.mean()), "max_logit_std": float(v.std()),
                             "max_logit_median": float(np.median(v)),
                             "max_prob_mean": float(conf.values("max_prob").mean()),
                             "entropy_mean": float(conf.values("entropy").mean())}
    return {"accuracy": accuracy,
            "accuracy_in_corpus": in_corpus,
            "correct": {name: correct_bits(res) for name, res in results.items()},
            "retain_loss": lm_loss(model, tokenizer, retain_eval, batch_size=settings.batch_size),
            "confidence": confidence}


def measure_representations(model: nn.Module, tokenizer: Any, layer: int, forget_eval: Mapping[str, Sequence[str]],
                            vectors: Mapping[str, torch.Tensor], settings: EvalSettings) -> dict[str, Any]:
    """Per topic at block ``layer``: cos(u, h) (token and prompt level) beside the uniform and Gaussian null
    directions, and the mean token norm ‖h^(l)‖ (real tokens, BOS excluded)."""
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


def forget_norms(bench: "Workbench", layers: Iterable[int], settings: EvalSettings | None = None) -> dict[int, float]:
    """‖h_l‖ of the frozen model at each block: mean token norm on the held-out forget texts (BOS excluded),
    averaged over topics — the scale c is compared with."""
    settings = settings or EvalSettings()
    forget_eval = bench.split(settings, 0)[2]
    layers = sorted(set(layers))
    per_topic = []
    for texts in forget_eval.values():
        norms = token_norms(bench.model, list(texts), layers, tokenizer=bench.tokenizer, exclude_bos=True,
                            batch_size=settings.batch_size)
        per_topic.append([float(norms[l].mean()) for l in layers])
    return {l: float(np.mean([p[i] for p in per_topic])) for i, l in enumerate(layers)}


# ------------------------------------------------------------------------ base model vs unlearned models
def each_installed(model: nn.Module, results: Mapping[str, UnlearnResult], measure: Callable[[nn.Module], Any]
                   ) -> dict[str, Any]:
    """``measure(model)`` for the base model (key ``"base"``) and for it with each result's trained tensors
    installed in turn (``UnlearnResult.installed``: one model in memory serves them all, restored after each)."""
    out = {"base": measure(model)}
    for name, result in results.items():
        with result.installed(model):
            out[name] = measure(model)
    return out


def accuracy_table(model: nn.Module, tokenizer: Any, data: "ExperimentData", results: Mapping[str, UnlearnResult],
                   *, scoring: str, batch_size: int = 64) -> pd.DataFrame:
    """Accuracy on every question set (columns) of the base model and of each unlearned model (rows), and the
    general accuracy relative to the base model's (``"general / base"``)."""
    acc = each_installed(model, results, lambda m: accuracies(m, tokenizer, data, scoring=scoring,
                                                              batch_size=batch_size))
    table = pd.DataFrame(acc).T
    table["general / base"] = table["general"] / table.loc["base", "general"]
    return table


def confidence_table(model: nn.Module, tokenizer: Any, prompts: Sequence[str], results: Mapping[str, UnlearnResult],
                     *, generate: int = 30) -> tuple[pd.DataFrame, dict[str, Confidence]]:
    """MaxLogit of ``generate`` greedy tokens on ``prompts`` (C1, Fig. 2a–d), base and each unlearned model: mean
    and std per model (the table), and each model's :class:`~rmu_analysis.confidence.Confidence`."""
    conf = each_installed(model, results, lambda m: measure_confidence(m, prompts, tokenizer, generate=generate))
    table = pd.DataFrame({name: c.summary().loc["max_logit", ["mean", "std"]] for name, c in conf.items()}).T
    return table.astype(float), conf


def alignment_table(model: nn.Module, tokenizer: Any, data: "ExperimentData", results: Mapping[str, UnlearnResult],
                    layer: int, *, scoring: str, base_u: str) -> tuple[pd.DataFrame, dict[tuple[str, str], Any]]:
    """cos(h^(l), u) of the token-mean representation of each question set's prompts (Fig. 2e–h; BOS excluded)
    beside the uniform and Gaussian null directions, and ‖h^(l)‖, for the base model (probed with the u of result
    ``base_u``) and each unlearned model (its own u; sets that are not forget topics use the first topic's u).
    Returns the table (one row per model and set) and each :class:`~rmu_analysis.cosines.Alignment`."""
    rows, found = [], {}
    for name, result in [("base", results[base_u]), *results.items()]:
        with result.installed(model) if name != "base" else contextlib.nullcontext(model):
            for domain in data.mcq:
                u = result.control_vectors[domain if domain in data.topics else data.topics[0]]
                a = alignment(model, question_prompts(data, domain, scoring=scoring), u, layers=[layer],
                              tokenizer=tokenizer, exclude_bos=True)
                found[name, domain] = a
                s = a.summary("prompt").iloc[0]
                rows.append({"model": name, "prompts": domain, "cos u": s["cos_u_mean"],
                             "cos u′ (uniform null)": s["cos_uniform_null_mean"],
                             "cos g (Gaussian null)": s["cos_gaussian_null_mean"], "norm": s["norm_mean"]})
    return pd.DataFrame(rows), found
