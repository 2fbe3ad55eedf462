"""``rmu-analysis demo`` and ``rmu-analysis organism {build,info}``: the built-in organism from the command line."""
from __future__ import annotations

import argparse
import json
import time

import torch

from ..evaluation import evaluate_mcq
from ..stats import format_interval
from . import SUBJECTS, build_report, load_organism, organism_corpora, organism_mcq
from .build import BuildConfig, block_norms, build_organism, main_summary
from .build_v2 import BuildConfigV2, build_organism_v2, summary_v2

__all__ = ["add_demo_parser", "add_organism_parser"]


def add_demo_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("demo", help="load the built-in organism, evaluate it, print accuracies and block norms")
    p.add_argument("--threads", type=int, default=2)
    p.set_defaults(func=demo)
    return p


def add_organism_parser(subparsers) -> argparse.ArgumentParser:
    org = subparsers.add_parser("organism", help="build or inspect the built-in model organism")
    org_sub = org.add_subparsers(dest="organism_command", required=True)
    b = org_sub.add_parser("build", help="train the organism from scratch (testbed 2: about 35 minutes on 2 CPU cores)")
    b.add_argument("--out", default=None, help="output directory (default: the package's shipped assets)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--steps", type=int, default=None, help="training steps (default: the shipped model's)")
    b.add_argument("--layers", type=int, default=None, help="decoder blocks (default: the shipped model's)")
    b.add_argument("--threads", type=int, default=2)
    b.add_argument("--balanced-values", action="store_true",
                   help="testbed 1: every attribute value answers equally many questions (testbed 2 always is)")
    b.add_argument("--overwrite", action="store_true",
                   help="replace an existing output directory that rmu-analysis wrote (any other is refused)")
    b.add_argument("--testbed", type=int, choices=(1, 2), default=2,
                   help="2 (the shipped organism): balanced answers, dev/test split, WMDP-shaped corpora, three "
                        "held-out wordings per fact; 1: the first organism's world, for comparison (needs --out)")
    b.add_argument("--eval-every", type=int, default=0,
                   help="testbed 2: evaluate the dev questions every N steps and print the learning curve")
    b.add_argument("--tie-embeddings", action="store_true", help="testbed 2: one matrix for embedding and unembedding")
    b.set_defaults(func=build)
    i = org_sub.add_parser("info", help="print the organism's build report")
    i.add_argument("--path", default=None)
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=info)
    return org


def demo(args: argparse.Namespace) -> int:
    """Load the organism, evaluate it on its held-out questions and print accuracies and per-block norms."""
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, tok = load_organism()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"organism: LlamaForCausalLM, {model.config.num_hidden_layers} blocks, width {model.config.hidden_size}, "
          f"{n_params:,} parameters")
    print("held-out multiple-choice accuracy on the test questions, 95% interval (facts resampled; chance 25%):")
    mcq = organism_mcq()
    for domain, records in mcq.items():
        row = []
        for scoring in ("cloze", "letter"):
            res = evaluate_mcq(model, tok, records, subject=SUBJECTS[domain], scoring=scoring, batch_size=32)
            row.append(f"{scoring} {format_interval(res.interval())}")
        print(f"  {domain:8s} ({len(records):3d} questions)  " + "  ".join(row))
    corpora = organism_corpora()
    print("mean token norm of each block's output (BOS excluded):")
    for name, texts in (("bio", corpora["forget"]["bio"]), ("cyber", corpora["forget"]["cyber"]),
                        ("retain", corpora["retain"])):
        norms = block_norms(model, tok, texts[:64])
        print(f"  {name:7s} " + " ".join(f"{x:5.1f}" for x in norms) + f"   last/first {norms[-1] / norms[0]:.2f}x")
    report = build_report()
    print(f"(build report: trained in {report['train_seconds']:.0f} s; demo took {time.perf_counter() - t0:.1f} s)")
    return 0


def build(args: argparse.Namespace) -> int:
    overrides = {"steps": args.steps, "n_layers": args.layers}
    if args.testbed == 2:
        if args.balanced_values:
            raise ValueError("--balanced-values is a testbed-1 option (testbed 2 is always balanced)")
        if args.eval_every < 0:
            raise ValueError(f"--eval-every must be >= 0, got {args.eval_every}")
        cfg = BuildConfigV2(seed=args.seed, threads=args.threads, tie_embeddings=args.tie_embeddings,
                            **{k: v for k, v in overrides.items() if v is not None})
        report = build_organism_v2(args.out, cfg, overwrite=args.overwrite, progress=True,
                                   eval_every=args.eval_every, log=lambda rec: print(json.dumps(rec), flush=True))
        print(summary_v2(report))
        return 0
    if args.out is None:
        raise ValueError("--testbed 1 needs --out DIR: the shipped organism is testbed 2")
    if args.eval_every or args.tie_embeddings:
        raise ValueError("--eval-every and --tie-embeddings are testbed-2 options")
    cfg = BuildConfig(seed=args.seed, threads=args.threads, balanced_values=args.balanced_values,
                      **{k: v for k, v in overrides.items() if v is not None})
    report = build_organism(args.out, cfg, overwrite=args.overwrite, progress=True)
    print(main_summary(report))
    return 0


def info(args: argparse.Namespace) -> int:
    report = build_report(args.path)
    summary = summary_v2 if "version" in report else main_summary
    print(json.dumps(report, indent=2) if args.json else summary(report))
    return 0
