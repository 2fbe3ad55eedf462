"""``rmu-analysis attack``: run one knowledge-recovery attack on a model and write its table as JSON.

Data default to the organism's (its bio and cyber questions, forget corpora, retain corpus and general questions)
for the organism and for models unlearned from it; other models need ``--questions`` (and the files each attack
reads). The probe's training questions and GCG's transfer string come from the organism's dev sets when it has them
(testbed 2); otherwise forget questions are split into dev and test by the entity they ask about (``--split-key``),
so they never see a test fact; the relearning texts name no test question's entity.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

ATTACKS = ("gcg", "relearn", "probe", "ablate", "fragility")


def add_attack_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "attack", help="run a knowledge-recovery attack (GCG, relearning, probes, direction ablation, fragility)",
        description="Attack an (unlearned) model and write method/attack/metric/accuracy/interval rows as JSON.",
    )
    p.add_argument("--model", default="organism", help='"organism" or a local HF model directory')
    p.add_argument("--attack", choices=ATTACKS, required=True)
    p.add_argument("--base", default=None,
                   help='the model before unlearning ("organism" or a directory): needed by probe and by ablate '
                        "without --direction")
    p.add_argument("--out", type=Path, required=True, help="JSON file to write (atomically)")
    p.add_argument("--method", default=None, help="label of the model in the table (default: the --model name)")
    # data
    p.add_argument("--questions", type=Path, nargs="+",
                   help="forget-topic question files (default: the organism's bio and cyber sets)")
    p.add_argument("--subject", default=None, help='the "about {subject}" of lettered prompts (default: per topic)')
    p.add_argument("--general-questions", type=Path, help="fragility: general questions (default: organism general)")
    p.add_argument("--forget-texts", type=Path, nargs="+",
                   help="relearn/ablate: forget-topic texts (default: the organism's forget corpora)")
    p.add_argument("--retain-texts", type=Path, help="relearn control: unrelated texts (default: organism retain)")
    p.add_argument("--terms", nargs="+", help="fragility: forget-topic terms (default: the forget questions' entities)")
    p.add_argument("--split-key", default="entity", help='record field to split dev/test by ("none": by question)')
    p.add_argument("--n-questions", type=int, default=32,
                   help="questions attacked: forget test questions, or general ones for fragility (default 32)")
    p.add_argument("--n-texts", type=int, default=64, help="relearn/ablate: texts used (default 64)")
    p.add_argument("--scoring", choices=("letter", "cloze"), default=None,
                   help="how answers are scored, by every attack (default: cloze for organism data, else letter)")
    p.add_argument("--seed", type=int, default=0)
    # GCG
    p.add_argument("--mode", choices=("per-question", "universal", "transfer"), default="per-question",
                   help="gcg: one string per question, one for all, or one optimised on dev and tested on test")
    p.add_argument("--steps", type=int, default=None, help="gcg steps (default 100)")
    p.add_argument("--suffix-tokens", type=int, default=None, help="gcg adversarial tokens (default 5)")
    p.add_argument("--top-k", type=int, default=None, help="gcg top-k tokens per position (default 64)")
    p.add_argument("--candidates", type=int, default=None, help="gcg candidates per step (default 64)")
    p.add_argument("--position", choices=("suffix", "prefix"), default=None,
                   help="gcg: after the choices (before 'Answer:') or before the question")
    p.add_argument("--guidance", choices=("gradient", "random"), default=None,
                   help="gcg: top-k gradient tokens (GCG) or uniformly random tokens (the random-search baseline)")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per forward pass")
    # relearn
    p.add_argument("--checkpoints", type=int, nargs="+", default=None, help="relearn: evaluate after these steps")
    p.add_argument("--lr", type=float, default=None, help="relearn learning rate (default 1e-4)")
    p.add_argument("--params", default=None, help="relearn: regex of the parameters trained (default: all)")
    # probe / ablate / fragility
    p.add_argument("--layers", type=int, nargs="+", default=None, help="probe: blocks (default: all)")
    p.add_argument("--layer", type=int, default=None, help="ablate: block l")
    p.add_argument("--direction", type=Path, default=None,
                   help="ablate: a .pt/.npy vector to ablate (e.g. c·u) instead of the mean difference from --base")
    p.add_argument("--ablate-mode", choices=("project", "subtract"), default="project")
    p.add_argument("--where", choices=("prefix", "inside"), default="prefix", help="fragility: where the term goes")
    # runtime
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--dtype", default="auto", help="float32 | bfloat16 | auto (bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--device-map", default=None)
    p.add_argument("--progress", action="store_true")
    p.set_defaults(func=run_attack)
    return p


# ------------------------------------------------------------------------------------------ data
def _is_organism(name: str | None) -> bool:
    from ..unlearning.cli import is_organism_derived

    return name == "organism" or (name is not None and is_organism_derived(name))


def _questions(args) -> tuple[list[dict], list[str | None]]:
    """Forget questions and one subject per question."""
    from ..data import load_mcq
    from ..evaluation import WMDP_SUBJECTS as SUBJECTS

    if args.questions:
        recs, subj = [], []
        for f in args.questions:
            rs = load_mcq(f)
            topic = Path(f).stem.split("-")[0]
            recs += rs
            subj += [args.subject or r.get("subject") or SUBJECTS.get(topic) for r in rs]
        return recs, subj
    if not _is_organism(args.model):
        raise ValueError("give --questions FILE ... (only organism models have default question sets)")
    from ..organism import SUBJECTS as ORG, organism_mcq

    sets = organism_mcq()
    recs = sets["bio"] + sets["cyber"]
    return recs, [args.subject or ORG[r.get("domain", "bio")] for r in recs]


def _texts(paths, default_key: str, args) -> list[str]:
    from ..data import load_forget_corpus, load_text_corpus

    if paths:
        out: list[str] = []
        for f in paths:
            out += load_forget_corpus(f) if default_key == "forget" else load_text_corpus(f)
        return out
    if not _is_organism(args.model):
        flag = "--forget-texts" if default_key == "forget" else "--retain-texts"
        raise ValueError(f"give {flag} FILE (only organism models have default corpora)")
    from ..organism import organism_corpora

    c = organism_corpora()
    if default_key == "forget":
        return [t for topic in c["forget"].values() for t in topic]
    return c["retain"]


def _organism_dev(args) -> tuple[list[dict], list] | None:
    """The organism's dev questions (bio, cyber) and subjects when it has dev sets (testbed 2) and no --questions."""
    if args.questions or not _is_organism(args.model):
        return None
    from ..experiments.workbench import organism_data
    from ..organism import SUBJECTS as ORG

    dev = organism_data().dev_mcq
    if not dev:
        return None
    recs = [r for topic in ("bio", "cyber") for r in dev.get(topic, [])]
    return recs, [args.subject or ORG[r.get("domain", "bio")] for r in recs]


def _split(args, recs: list[dict], subj: list) -> tuple[list[dict], list, list[dict], list]:
    """(dev, dev subjects, test, test subjects): the organism's dev sets when it has them (every forget question is
    then a test question), else the questions split by ``--split-key``; ``--n-questions`` test questions, seeded."""
    from .common import split_records

    given = _organism_dev(args)
    if given is not None:
        keep = np.random.default_rng(args.seed).permutation(len(recs))[: args.n_questions]
        return given[0], given[1], [recs[i] for i in sorted(keep)], [subj[i] for i in sorted(keep)]
    key = None if args.split_key == "none" else args.split_key
    if key is not None and not all(key in r for r in recs):
        key = None
    tagged = [dict(r, _subject=s, _i=i) for i, (r, s) in enumerate(zip(recs, subj))]
    dev, test = split_records(tagged, key=key, seed=args.seed)
    keep = np.random.default_rng(args.seed).permutation(len(test))[: args.n_questions]
    test = [test[i] for i in sorted(keep)]
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("_subject", "_i")} for r in rs]  # noqa: E731
    return strip(dev), [r["_subject"] for r in dev], strip(test), [r["_subject"] for r in test]


def _without_facts(texts: list[str], records: list[dict], key: str) -> list[str]:
    """Texts that name none of the test questions' ``key`` values (e.g. their entities)."""
    names = {str(r[key]) for r in records if key in r}
    return [t for t in texts if not any(n in t for n in names)]


def _load(args, name: str):
    from ..unlearning.cli import load_from_args as load

    return load(argparse.Namespace(model=name, dtype=args.dtype, device=args.device, device_map=args.device_map))


def _check(args) -> None:
    for flag in ("n_questions", "n_texts", "steps", "suffix_tokens", "top_k", "candidates", "batch_size", "threads"):
        v = getattr(args, flag)
        if v is not None and v < (0 if flag == "steps" else 1):
            raise ValueError(f"--{flag.replace('_', '-')} must be at least {0 if flag == 'steps' else 1}, got {v}")
    if args.attack == "probe" and args.base is None:
        raise ValueError("--attack probe needs --base (the model before unlearning, whose states train the probe)")
    if args.attack == "ablate":
        if args.layer is None:
            raise ValueError("--attack ablate needs --layer (the block whose output is edited)")
        if args.direction is None and args.base is None:
            raise ValueError("--attack ablate needs --base (to estimate the mean difference) or --direction FILE")


def _gcg_config(args, scoring: str):
    from .gcg import GCGConfig

    given = {"steps": args.steps, "n_tokens": args.suffix_tokens, "top_k": args.top_k, "candidates": args.candidates,
             "position": args.position, "batch_size": args.batch_size, "guidance": args.guidance}
    return GCGConfig(universal=args.mode == "universal", seed=args.seed, scoring=scoring,
                     **{k: v for k, v in given.items() if v is not None})


def _read_vector(path: Path):
    import torch

    if path.suffix == ".npy":
        return torch.from_numpy(np.load(path))
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict):
        if len(obj) != 1:
            raise ValueError(f"{path} holds {len(obj)} tensors ({list(obj)[:3]}): save exactly one vector")
        obj = next(iter(obj.values()))
    return obj


def run_attack(args) -> int:
    import torch

    from .._io import atomic_write_json, check_output_file

    _check(args)
    check_output_file(args.out)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    organism_data = _is_organism(args.model) and not args.questions
    scoring = args.scoring or ("cloze" if organism_data else "letter")
    recs, subj = _questions(args)
    dev, dev_subj, test, test_subj = _split(args, recs, subj)
    model, tok = _load(args, args.model)
    method = args.method or Path(args.model).name
    t0 = time.perf_counter()
    config: Any
    if args.attack == "gcg":
        from .gcg import gcg_attack, gcg_transfer

        config = _gcg_config(args, scoring)
        if args.mode == "transfer":
            result = gcg_transfer(model, tok, dev, test, config, subject=dev_subj, test_subject=test_subj,
                                  method=method, progress=args.progress)
        else:
            result = gcg_attack(model, tok, test, config, subject=test_subj, method=method, progress=args.progress)
    elif args.attack == "relearn":
        from .relearn import RelearnConfig, relearn_attack

        given = {"checkpoints": tuple(args.checkpoints) if args.checkpoints else None, "lr": args.lr,
                 "params": args.params, "eval_batch_size": args.batch_size}
        config = RelearnConfig(scoring=scoring, seed=args.seed, **{k: v for k, v in given.items() if v is not None})
        forget = _texts(args.forget_texts, "forget", args)
        key = args.split_key if args.split_key != "none" else None
        if key is not None:
            forget = _without_facts(forget, test, key)  # no text states a tested fact's entity
        if not forget:
            raise ValueError("no forget text is left once texts naming the test questions' entities are removed")
        rng = np.random.default_rng(args.seed)
        forget = [forget[i] for i in rng.permutation(len(forget))[: args.n_texts]]
        retain = _texts([args.retain_texts] if args.retain_texts else None, "retain", args)
        retain = [retain[i] for i in rng.permutation(len(retain))[: args.n_texts]]
        result = relearn_attack(model, tok, forget, test, config, control_texts=retain, subject=test_subj,
                                method=method)
    elif args.attack == "probe":
        from .probe import ProbeConfig, probe_attack

        base, _ = _load(args, args.base)
        config = ProbeConfig(layers=args.layers or "all", prompt=scoring, seed=args.seed,
                             **({"batch_size": args.batch_size} if args.batch_size else {}))
        result = probe_attack(base, model, tok, dev, test, config, subject=dev_subj, test_subject=test_subj,
                              method=method)
    elif args.attack == "ablate":
        from .ablate import AblateConfig, ablate_attack, unlearning_direction

        config = AblateConfig(layer=args.layer, mode=args.ablate_mode, scoring=scoring, seed=args.seed,
                              **({"batch_size": args.batch_size} if args.batch_size else {}))
        if args.direction is not None:
            direction = _read_vector(args.direction)
        else:
            base, _ = _load(args, args.base)
            texts = _texts(args.forget_texts, "forget", args)
            texts = [texts[i] for i in np.random.default_rng(args.seed).permutation(len(texts))[: args.n_texts]]
            direction = unlearning_direction(base, model, tok, texts, args.layer)
        result = ablate_attack(model, tok, test, direction, config, subject=test_subj, method=method)
    else:
        from .fragility import FragilityConfig, fragility

        config = FragilityConfig(where=args.where, scoring=scoring, seed=args.seed,
                                 **({"batch_size": args.batch_size} if args.batch_size else {}))
        if args.general_questions:
            from ..data import load_mcq

            general = load_mcq(args.general_questions)
            gsubj = args.subject or [r.get("subject") for r in general]
        elif organism_data or _is_organism(args.model):
            from ..organism import SUBJECTS as ORG, organism_mcq

            general, gsubj = organism_mcq()["general"], ORG["general"]
        else:
            raise ValueError("give --general-questions FILE (only organism models have default question sets)")
        keep = np.random.default_rng(args.seed).permutation(len(general))[: args.n_questions]
        general = [general[i] for i in sorted(keep)]
        if not isinstance(gsubj, (str, type(None))):
            gsubj = [gsubj[i] for i in sorted(keep)]
        terms = args.terms or sorted({str(r["entity"]) for r in recs if "entity" in r})
        if not terms:
            raise ValueError("give --terms (the forget questions have no 'entity' field to take them from)")
        result = fragility(model, tok, general, terms, config, subject=gsubj, method=method)
    frame = result.to_frame()
    payload = {
        "attack": args.attack, "model": args.model, "base": args.base, "method": method,
        "config": dataclasses.asdict(config), "scoring": scoring, "seed": args.seed,
        "n_dev": len(dev), "n_test": len(test), "seconds": time.perf_counter() - t0,
        "rows": json.loads(frame.to_json(orient="records")),
    }
    if hasattr(result, "curve_frame"):
        payload["curve"] = json.loads(result.curve_frame().to_json(orient="records"))
    atomic_write_json(args.out, payload)
    print(frame.drop(columns=["method"]).to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    print(f"wrote {args.out}")
    return 0
