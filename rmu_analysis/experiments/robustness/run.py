"""One attack run: the questions it attacks, the (cached) training of the unlearned model, each attack, and the
result row (:mod:`..robustness`)."""
from __future__ import annotations

import contextlib
import json
import time
import warnings
import weakref
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
import transformers

from ...attacks import (
    AblateConfig, FragilityConfig, ProbeConfig, ablate_attack, fragility, gcg_attack, gcg_transfer, probe_attack,
    relearn_attack, split_records, unlearning_direction,
)
from ...evaluation import record_clusters
from ...unlearning import NonFiniteLossError, UnlearnResult, unlearn
from ..specs import STEERING, RunSpec
from ..workbench import Workbench, training_texts
from .spec import ATTACK_VERSION, RESULT_KIND, AttackSpec

# --------------------------------------------------------------------------------------------- data
def _sample(items: Sequence, n: int, seed: int) -> list:
    keep = np.random.default_rng(seed).permutation(len(items))[:n]
    return [items[i] for i in sorted(keep)]


def attack_questions(bench: Workbench, seed: int, n: int) -> tuple[list[dict], list, list[dict], list]:
    """``(dev, dev_subjects, test, test_subjects)``: ``n`` forget questions of each part (all topics pooled),
    sampled with ``seed``. Dev: the data's dev sets (``ExperimentData.dev_mcq``) when it has them, else each forget
    set is split by ``entity`` (seed 0: the same split for every seed) and its dev part is used."""
    data = bench.data
    dev_sets = getattr(data, "dev_mcq", None) or {}  # the testbed-2 organism and --mcq SET-dev=FILE data have them
    dev, test = [], []
    for topic in data.topics:
        recs = list(data.mcq[topic])
        tagged = [(r, s) for r, s in zip(recs, data.record_subjects(topic, recs))]
        if topic in dev_sets:
            d = list(dev_sets[topic])
            dev += list(zip(d, data.record_subjects(topic, d)))
            test += tagged
        else:
            key = "entity" if all("entity" in r for r in recs) else None
            d, t = split_records([dict(r, _i=i) for i, r in enumerate(recs)], key=key, seed=0)
            dev += [tagged[r["_i"]] for r in d]
            test += [tagged[r["_i"]] for r in t]
    dev, test = _sample(dev, n, seed), _sample(test, n, seed)
    return [r for r, _ in dev], [s for _, s in dev], [r for r, _ in test], [s for _, s in test]


def _texts_without(texts: Sequence[str], records: Sequence[dict]) -> list[str]:
    """Texts that name none of the ``entity`` values of ``records`` (texts stating no tested fact)."""
    names = {str(r["entity"]) for r in records if "entity" in r}
    return [t for t in texts if not any(name in t for name in names)]


# --------------------------------------------------------------------------------------------- training
_TRAINED: "weakref.WeakKeyDictionary[Workbench, tuple[str, UnlearnResult, float]]" = weakref.WeakKeyDictionary()


def trained(bench: Workbench, spec: RunSpec) -> tuple[UnlearnResult, float]:
    """``spec`` trained on ``bench``'s model (unchanged) as the sweep runner trains it, and the training seconds;
    the last one is kept per workbench, so the attacks of one (method, seed), run one after the other, share it."""
    if spec.model != bench.model_id or spec.data != bench.data.name:
        raise ValueError(f"the run needs model {spec.model!r} with data {spec.data!r}, but the workbench holds "
                         f"{bench.model_id!r} with {bench.data.name!r}")
    key = spec.key()
    held = _TRAINED.get(bench)
    if held is None or held[0] != key:
        _TRAINED.pop(bench, None)  # free the previous model's tensors first
        t0 = time.perf_counter()
        forget, retain = training_texts(bench, spec)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "the data run out": as in runner.run_one
            result = unlearn(bench.model, bench.tokenizer, forget, retain, spec.config(), inplace=False,
                             prefix_cache=bench.cache if spec.method in STEERING else None, progress=False)
        held = (key, result, time.perf_counter() - t0)
        _TRAINED[bench] = held
    return held[1], held[2]


# --------------------------------------------------------------------------------------------- attacks
def _records(frame: pd.DataFrame) -> list[dict]:
    return json.loads(frame.to_json(orient="records"))


def _gcg(spec, bench, model, q) -> dict:
    cfg = spec.budget.gcg_config(spec.scoring, spec.seed)
    k = spec.budget.gcg_questions
    rep = gcg_attack(model, bench.tokenizer, q["test"][:k], cfg, subject=q["test_subjects"][:k],
                     method=spec.method_label)
    c, w = rep.correct, rep.wrong
    return {"clean": c.clean_correct, "attacked": c.attacked_target, "control_clean": w.clean_target,
            "control_attacked": w.attacked_target, "steps": cfg.steps, "attack_seconds": c.seconds + w.seconds,
            "rows": _records(rep.to_frame()), "curve": _records(rep.curve_frame()),
            "extra": {"suffixes": list(c.adv_text), "text_accuracy": float(c.text_correct.mean())}}


def _gcg_transfer(spec, bench, model, q) -> dict:
    cfg = spec.budget.gcg_config(spec.scoring, spec.seed)
    k = spec.budget.gcg_questions
    tr = gcg_transfer(model, bench.tokenizer, q["dev"][:k], q["test"], cfg, subject=q["dev_subjects"][:k],
                      test_subject=q["test_subjects"], method=spec.method_label)
    return {"clean": tr.test_clean, "attacked": tr.test_attacked, "steps": cfg.steps, "attack_seconds": tr.seconds,
            "rows": _records(tr.to_frame()), "curve": _records(tr.curve_frame()),
            "extra": {"suffix": tr.dev.adv_text[0], "dev_accuracy": float(tr.dev.attacked_correct.mean())}}


def _relearn(spec, bench, model, q) -> dict:
    forget_train, retain_train, _, _ = bench.split(spec.eval, spec.seed)
    pool = _texts_without([t for texts in forget_train.values() for t in texts], q["test"])
    if not pool:
        raise ValueError("no forget text is left once texts naming the attacked questions' entities are removed")
    rng = np.random.default_rng(spec.seed)
    forget = [pool[i] for i in rng.permutation(len(pool))[: spec.budget.texts]]
    retain = [retain_train[i] for i in rng.permutation(len(retain_train))[: spec.budget.texts]]
    cfg = spec.budget.relearn_config(spec.scoring, spec.seed)
    rep = relearn_attack(model, bench.tokenizer, forget, q["test"], cfg, control_texts=retain,
                         subject=q["test_subjects"], method=spec.method_label)
    last = max(cfg.checkpoints)
    curve = pd.concat([rep.forget.curve_frame(), rep.control.curve_frame()], ignore_index=True)
    return {"clean": rep.forget.correct[0], "attacked": rep.forget.correct[last],
            "control_clean": rep.control.correct[0], "control_attacked": rep.control.correct[last], "steps": last,
            "attack_seconds": rep.forget.seconds + rep.control.seconds, "rows": _records(rep.to_frame()),
            "curve": _records(curve), "extra": {"forget_texts": len(forget), "texts_without_tested_facts": len(pool)}}


def _probe(spec, bench, model, q) -> dict:
    cfg = ProbeConfig(layers=[spec.layer], prompt=spec.scoring, seed=spec.seed, batch_size=min(spec.budget.batch_size, 64))
    res = probe_attack(bench.model, model, bench.tokenizer, q["dev"], q["test"], cfg, subject=q["dev_subjects"],
                       test_subject=q["test_subjects"], method=spec.method_label)
    refit = res.correct[("refit → unlearned", spec.layer)]
    return {"attacked": refit, "clusters": res.clusters, "steps": 0, "attack_seconds": res.seconds,
            "rows": _records(res.to_frame()), "curve": [],
            "extra": {"chance": res.chance, "n_unscorable": res.n_unscorable,
                      "base_probe_on_model": float(res.correct[("base probe → unlearned", spec.layer)].mean()),
                      "base_probe_on_base": float(res.correct[("base probe → base", spec.layer)].mean())}}


def _ablate(spec, bench, model, q) -> dict:
    _, _, forget_eval, _ = bench.split(spec.eval, spec.seed)
    texts = _sample([t for texts in forget_eval.values() for t in texts], spec.budget.texts, spec.seed)
    t0 = time.perf_counter()
    direction = unlearning_direction(bench.model, model, bench.tokenizer, texts, spec.layer)
    cfg = AblateConfig(layer=spec.layer, scoring=spec.scoring, seed=spec.seed, batch_size=min(spec.budget.batch_size, 64))
    res = ablate_attack(model, bench.tokenizer, q["test"], direction, cfg, subject=q["test_subjects"],
                        method=spec.method_label)
    return {"clean": res.clean.correct, "attacked": res.ablated.correct, "control_clean": res.clean.correct,
            "control_attacked": res.random.correct, "steps": 0, "attack_seconds": time.perf_counter() - t0,
            "rows": _records(res.to_frame()), "curve": [], "extra": {"direction_norm": res.direction_norm}}


def _fragility(spec, bench, model, q) -> dict:
    general = list(bench.data.mcq["general"])
    keep = _sample(list(range(len(general))), spec.budget.general, spec.seed)
    records = [general[i] for i in keep]
    subjects = bench.data.record_subjects("general", records)
    terms = sorted({str(r["entity"]) for t in bench.data.topics for r in bench.data.mcq[t] if "entity" in r})
    if not terms:
        raise ValueError("the forget questions have no 'entity' field to take forget-topic terms from")
    cfg = FragilityConfig(scoring=spec.scoring, seed=spec.seed, batch_size=min(spec.budget.batch_size, 64))
    res = fragility(model, bench.tokenizer, records, terms, cfg, subject=subjects, method=spec.method_label)
    return {"clean": res.clean.correct, "attacked": res.perturbed.correct, "clusters": record_clusters(records),
            "steps": 0, "attack_seconds": res.seconds, "rows": _records(res.to_frame()), "curve": [],
            "extra": {"questions": "general"}}


_RUN = {"gcg": _gcg, "gcg-transfer": _gcg_transfer, "relearn": _relearn, "probe": _probe, "ablate": _ablate,
        "fragility": _fragility}


def _bools(x: Any) -> list[int] | None:
    return None if x is None else [int(v) for v in np.asarray(x, dtype=bool)]


def run_attack(spec: AttackSpec, bench: Workbench) -> dict[str, Any]:
    """Train ``spec.unlearn`` (or reuse the workbench's last training of it), attack the model, return the result
    dict (per-question correctness before and after the attack and of its control, the attack's table rows and
    curve, its cost)."""
    bench.check_run(spec.model, spec.data, spec.dtype)
    t0 = time.perf_counter()
    row: dict[str, Any] = {"kind": RESULT_KIND, "key": spec.key(), "spec": spec.to_dict(), "version": ATTACK_VERSION,
                           "inputs": spec.inputs(), "label": spec.label(), "method": spec.method,
                           "attack": spec.attack, "seed": spec.seed}
    train_seconds = 0.0
    context: Any = contextlib.nullcontext(bench.model)
    if spec.unlearn is not None:
        try:
            result, train_seconds = trained(bench, spec.unlearn)
        except NonFiniteLossError as exc:
            return {**row, "status": "nonfinite", "error": str(exc), "wall_seconds": time.perf_counter() - t0}
        context = bench.installed(result)
    dev, dev_subjects, test, test_subjects = attack_questions(bench, spec.seed, spec.budget.questions)
    questions = {"dev": dev, "dev_subjects": dev_subjects, "test": test, "test_subjects": test_subjects}
    with context as model:
        out = _RUN[spec.attack](spec, bench, model, questions)
    clusters = out.get("clusters", record_clusters(test[: len(out["attacked"])]))
    row.update({
        "status": "ok",
        "questions": "general" if spec.attack == "fragility" else "forget test",
        "n": len(out["attacked"]),
        "clean": _bools(out.get("clean")),
        "attacked": _bools(out["attacked"]),
        "control_clean": _bools(out.get("control_clean")),
        "control_attacked": _bools(out.get("control_attacked")),
        "clusters": None if clusters is None else [str(c) for c in clusters],
        "steps": int(out["steps"]),
        "attack_seconds": float(out["attack_seconds"]),
        "train_seconds": float(train_seconds),
        "rows": out["rows"],
        "curve": out["curve"],
        "extra": out["extra"],
        "wall_seconds": time.perf_counter() - t0,
        "environment": {"torch": torch.__version__, "transformers": transformers.__version__,
                        "threads": torch.get_num_threads(), "device": str(next(bench.model.parameters()).device)},
    })
    return row
