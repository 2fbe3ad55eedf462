"""``rmu-analysis unlearn`` and ``rmu-analysis evaluate``: argparse subcommands (wired into ``rmu_analysis.cli``)
that build the same config dataclasses as the Python API. Bad flags raise ``ValueError`` with the reason."""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from .._io import atomic_write_json, check_output_dir, check_output_file
from ..confidence import measure_confidence
from ..data import load_forget_corpus, load_mcq, load_text_corpus
from ..evaluation import WMDP_SUBJECTS
from ..experiments.measure import accuracies, question_prompts
from ..experiments.workbench import ExperimentData
from ..models import load_model
from ..organism import SCORING, organism_corpora, organism_mcq
from ..organism import SUBJECTS as ORGANISM_SUBJECTS
from ..recipes import PRESETS
from . import save_unlearned, unlearn
from .config import CONFIG_CLASSES

METHODS = tuple(CONFIG_CLASSES)


def add_unlearn_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "unlearn", help="unlearn forget topics with RMU, Adaptive RMU or a baseline and save an HF directory",
        description="Unlearn forget topics (RMU Eq. 1, Adaptive RMU Eq. 24, GA, GradDiff, NPO) and save the model.",
    )
    p.add_argument("--model", default="organism", help='"organism" or a local HF model directory')
    p.add_argument("--method", choices=METHODS, default=None, help="default: the preset's, else rmu")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="start from a named recipe")
    p.add_argument("--layer", type=int, help="block l (0-indexed)")
    p.add_argument("--trained-layers", type=int, nargs="+", help="default: l-2 l-1 l")
    p.add_argument("--param-pattern", help="regex on block-relative parameter names (default: MLP down-projection)")
    p.add_argument("--steps", type=int)
    p.add_argument("--coeff", type=float, nargs="+", help="RMU steering coefficient c (one, or one per topic)")
    p.add_argument("--beta", type=float, nargs="+", help="Adaptive RMU β (one or per topic); NPO β (one)")
    p.add_argument("--alpha", type=float, nargs="+", help="retain weight α (one or per topic)")
    p.add_argument("--lr", type=float)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--forget-max-length", type=int, nargs="+", help="per-topic forget truncation length")
    p.add_argument("--retain-max-length", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--loss", choices=("reference", "masked"), help="loss convention (RMU)")
    p.add_argument("--coefficient", choices=("first-batch", "per-sample"), help="Adaptive RMU coefficient mode")
    p.add_argument("--retain-noise", type=float,
                   help="RMU / Adaptive RMU: random noise augmentation σ (arXiv 2501.19202), Gaussian noise on the "
                        "retain representations entering the trained blocks, relative to each token's norm (0: off)")
    p.add_argument("--params", choices=("selected", "mlp"), help="baselines: tensors to train")
    p.add_argument("--log-every", type=int)
    p.add_argument("--forget-topics", nargs="+", help="topic names (default: from the files, or the organism's)")
    p.add_argument("--forget-files", nargs="+", type=Path, help="one forget corpus per topic (.jsonl 'text' or lines)")
    p.add_argument("--retain-file", nargs="+", type=Path, help="one retain corpus for all topics, or one per topic")
    p.add_argument("--forget-format", choices=("auto", "jsonl", "lines"), default="auto",
                   help='forget files: "jsonl" ("text" field), "lines" (one raw text per line) or "auto" (from the file)')
    p.add_argument("--min-chars", type=int, default=0, help="drop shorter texts (the reference keeps len > 50)")
    p.add_argument("--out", type=Path, required=True, help="output directory (written atomically; checked before training)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out that rmu-analysis wrote (any other directory is refused)")
    p.add_argument("--dtype", default="auto", help="float32 | bfloat16 | auto (bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--device-map", default=None, help='"auto" to spread a large model over GPUs (accelerate)')
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_unlearn)
    return p


def add_evaluate_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "evaluate", help="forget-topic and general multiple-choice accuracy and token confidence (MaxLogit)",
        description="Zero-shot MCQ accuracy per topic (as lm-evaluation-harness) and MaxLogit token confidence (C1, Fig. 2a–d).",
    )
    p.add_argument("--model", default="organism", help='"organism" or a local HF model directory')
    p.add_argument("--data", nargs="+", metavar="TOPIC=FILE", help="question files (default: the organism's sets)")
    p.add_argument("--scoring", choices=("letter", "cloze"), default=None,
                   help="default: letter for question files, the organism's scoring (cloze) for organism models")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--limit", type=int, default=None, help="questions per topic")
    p.add_argument("--generate", type=int, default=30, help="greedy tokens for MaxLogit (the paper: 30; 0: next token)")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--device-map", default=None)
    p.set_defaults(func=run_evaluate)
    return p


# ------------------------------------------------------------------------------------------ helpers
def load_from_args(args) -> tuple[Any, Any]:
    """The model and tokenizer that ``--model``, ``--dtype``, ``--device`` and ``--device-map`` describe."""
    cuda = torch.cuda.is_available() and args.device in ("auto", "cuda")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but no CUDA device is available")
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if cuda else "float32")
    if args.model == "organism":
        model, tok = load_model("organism", dtype=dtype)
    else:
        model, tok = load_model(args.model, dtype=dtype, device_map=args.device_map if cuda else None)
    if cuda and args.device_map is None:
        model = model.to("cuda")
    return model, tok


def _one_or_tuple(values):
    if values is None:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def build_config(args):
    """The config the flags describe: a preset or the method's defaults, with every given flag applied."""
    if args.preset is not None:
        base = PRESETS[args.preset]
        if args.method is not None and args.method != base.method:
            raise ValueError(f"--preset {args.preset} is a {base.method} recipe but --method is {args.method}")
    else:
        base = CONFIG_CLASSES[args.method or "rmu"]()
    cls = type(base)
    names = {f.name for f in dataclasses.fields(cls)}
    given = {
        "layer": args.layer, "trained_layers": tuple(args.trained_layers) if args.trained_layers else None,
        "param_pattern": args.param_pattern, "steps": args.steps, "alpha": _one_or_tuple(args.alpha), "lr": args.lr,
        "batch_size": args.batch_size, "forget_max_length": _one_or_tuple(args.forget_max_length),
        "retain_max_length": args.retain_max_length, "seed": args.seed, "loss": args.loss,
        "coefficient": args.coefficient, "params": args.params, "log_every": args.log_every,
        "steering_coeff": _one_or_tuple(args.coeff), "beta": _one_or_tuple(args.beta),
        "retain_noise": args.retain_noise,
    }
    flags = {"steering_coeff": "--coeff", "beta": "--beta", "loss": "--loss", "coefficient": "--coefficient",
             "params": "--params", "alpha": "--alpha"}
    changes = {}
    for key, value in given.items():
        if value is None:
            continue
        if key not in names:
            raise ValueError(f"{flags.get(key, '--' + key.replace('_', '-'))} does not apply to {base.method}")
        changes[key] = value
    if args.layer is not None and args.trained_layers is None and base.trained_layers is not None:
        changes["trained_layers"] = None  # a preset's blocks follow its layer; a new layer gets l-2..l
    try:
        return dataclasses.replace(base, **changes)
    except TypeError as exc:
        raise ValueError(str(exc)) from exc


def _read_data(args):
    if args.forget_files:
        topics = args.forget_topics or [f.stem.replace("-forget-corpus", "") for f in args.forget_files]
        if len(topics) != len(args.forget_files):
            raise ValueError(f"{len(topics)} --forget-topics for {len(args.forget_files)} --forget-files")
        forget = {t: load_forget_corpus(f, min_chars=args.min_chars, format=args.forget_format)
                  for t, f in zip(topics, args.forget_files)}
        if not args.retain_file:
            raise ValueError("--forget-files needs --retain-file")
    elif args.model == "organism":
        corpora = organism_corpora()
        forget = corpora["forget"]
        if args.forget_topics:
            unknown = [t for t in args.forget_topics if t not in forget]
            if unknown:
                raise ValueError(f"the organism has no forget topic {unknown}; it has {list(forget)}")
            forget = {t: forget[t] for t in args.forget_topics}
        if not args.retain_file:
            return forget, corpora["retain"]
    else:
        raise ValueError("give --forget-files and --retain-file (only --model organism has default data)")
    retains = [load_text_corpus(f, min_chars=args.min_chars) for f in args.retain_file]
    if len(retains) == 1:
        return forget, retains[0]
    if len(retains) != len(forget):
        raise ValueError(f"{len(retains)} --retain-file for {len(forget)} topics: give one, or one per topic")
    return forget, dict(zip(forget, retains))


def run_unlearn(args) -> int:
    config = build_config(args)  # every number checked here, before data, model or training
    check_output_dir(args.out, overwrite=args.overwrite)  # and the output: not after 500 steps
    forget, retain = _read_data(args)
    model, tok = load_from_args(args)
    result = unlearn(model, tok, forget, retain, config, inplace=False, progress=not args.no_progress)
    path = save_unlearned(result, args.out, model, tok, overwrite=args.overwrite, extra={"base_model": args.model})
    print(f"{config.method}: {result.steps} steps on topics {', '.join(result.topics)}")
    if result.coefficients:
        print("coefficients: " + ", ".join(f"{t}={c:.4g}" for t, c in result.coefficients.items()))
    if result.log:
        last = result.log[-1]
        print("last log: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in last.items()))
    print(f"saved to {path}")
    return 0


def run_evaluate(args) -> int:
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be at least 1 (questions per topic), got {args.limit}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.generate < 0:
        raise ValueError(f"--generate must be at least 0, got {args.generate}")
    if args.json is not None:
        check_output_file(args.json)
    subjects = dict(WMDP_SUBJECTS)  # records with a "subject" field use their own
    if args.data:
        sets = {}
        for item in args.data:
            if "=" not in item:
                raise ValueError(f"--data takes TOPIC=FILE, got {item!r}")
            topic, file = item.split("=", 1)
            sets[topic] = load_mcq(file, limit=args.limit)
    elif args.model == "organism" or is_organism_derived(args.model):
        sets = {t: (r if args.limit is None else r[: args.limit]) for t, r in organism_mcq().items()}
        subjects.update(ORGANISM_SUBJECTS)
        if args.scoring is None:
            args.scoring = SCORING
    else:
        raise ValueError("give --data TOPIC=FILE ... (only organism models have default question sets)")
    if args.scoring is None:
        args.scoring = "letter"
    model, tok = load_from_args(args)
    data = ExperimentData(name="evaluate", forget={}, retain=[], mcq=sets,
                          subjects={t: subjects.get(t, t) for t in sets})
    accuracy = accuracies(model, tok, data, scoring=args.scoring, batch_size=args.batch_size)
    rows = {}
    for topic, records in sets.items():
        prompts = question_prompts(data, topic, scoring=args.scoring)
        conf = measure_confidence(model, prompts, tok, generate=args.generate, batch_size=args.batch_size)
        v = conf.values("max_logit")
        rows[topic] = {"n": len(records), "accuracy": accuracy[topic], "max_logit_mean": float(v.mean()),
                       "max_logit_median": float(sorted(v)[len(v) // 2]), "max_logit_std": float(v.std())}
    print(f"{'topic':<12} {'n':>5} {'accuracy':>9} {'MaxLogit mean':>14} {'median':>8} {'std':>7}")
    for topic, r in rows.items():
        print(f"{topic:<12} {r['n']:>5} {r['accuracy']:>9.3f} {r['max_logit_mean']:>14.3f} "
              f"{r['max_logit_median']:>8.3f} {r['max_logit_std']:>7.3f}")
    if args.json is not None:
        atomic_write_json(args.json, {"model": args.model, "scoring": args.scoring, "topics": rows})
    return 0


def is_organism_derived(path: str) -> bool:
    """A directory saved by ``save_unlearned`` from the organism (its rmu_config.json says so)."""
    cfg = Path(path) / "rmu_config.json"
    try:
        return json.loads(cfg.read_text()).get("base_model") == "organism"
    except (OSError, ValueError):
        return False
