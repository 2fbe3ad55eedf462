"""Command-line interface: ``rmu-analysis {reproduce,sweep,demo,organism,unlearn,evaluate} ...``."""
from __future__ import annotations

import argparse
import json
import sys
import time


def _demo(args: argparse.Namespace) -> int:
    """Load the organism, evaluate it on its held-out questions and print accuracies and per-block norms."""
    import torch

    from .evaluation import evaluate_mcq
    from .organism import SUBJECTS, build_report, load_organism, organism_corpora, organism_mcq
    from .organism.build import block_norms

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, tok = load_organism()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"organism: LlamaForCausalLM, {model.config.num_hidden_layers} blocks, width {model.config.hidden_size}, "
          f"{n_params:,} parameters")
    print("held-out multiple-choice accuracy (chance 25%):")
    mcq = organism_mcq()
    for domain, records in mcq.items():
        row = []
        for scoring in ("letter", "cloze"):
            res = evaluate_mcq(model, tok, records, subject=SUBJECTS[domain], scoring=scoring, batch_size=32)
            row.append(f"{scoring} {res.accuracy:6.1%}")
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


def _organism_build(args: argparse.Namespace) -> int:
    from .organism.build import BuildConfig, build_organism, main_summary

    overrides = {"steps": args.steps, "n_layers": args.layers}
    cfg = BuildConfig(seed=args.seed, threads=args.threads, balanced_values=args.balanced_values,
                      **{k: v for k, v in overrides.items() if v is not None})
    report = build_organism(args.out, cfg, overwrite=args.overwrite, progress=True)
    print(main_summary(report))
    return 0


def _organism_info(args: argparse.Namespace) -> int:
    from .organism import build_report

    report = build_report(args.path)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        from .organism.build import main_summary

        print(main_summary(report))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rmu-analysis",
        description="Representation-steering unlearning (RMU, Adaptive RMU): measure, apply, reproduce.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="load the built-in organism, evaluate it, print accuracies and block norms")
    p.add_argument("--threads", type=int, default=2)
    p.set_defaults(func=_demo)

    org = sub.add_parser("organism", help="build or inspect the built-in model organism")
    org_sub = org.add_subparsers(dest="organism_command", required=True)
    b = org_sub.add_parser("build", help="train the organism from scratch (about 15 minutes on 2 CPU cores)")
    b.add_argument("--out", default=None, help="output directory (default: the package's shipped assets)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--steps", type=int, default=None, help="training steps (default: the shipped model's)")
    b.add_argument("--layers", type=int, default=None, help="decoder blocks (default: the shipped model's)")
    b.add_argument("--threads", type=int, default=2)
    b.add_argument("--balanced-values", action="store_true",
                   help="every attribute value answers equally many questions (the shipped organism: off)")
    b.add_argument("--overwrite", action="store_true",
                   help="replace an existing output directory that rmu-analysis wrote (any other is refused)")
    b.set_defaults(func=_organism_build)
    i = org_sub.add_parser("info", help="print the organism's build report")
    i.add_argument("--path", default=None)
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=_organism_info)

    from .unlearning.cli import add_evaluate_parser, add_unlearn_parser

    add_unlearn_parser(sub)
    add_evaluate_parser(sub)

    from .attacks.cli import add_attack_parser

    add_attack_parser(sub)

    from .experiments.cli import add_sweep_parser
    from .reproduce import add_reproduce_parser

    add_reproduce_parser(sub)
    add_sweep_parser(sub)
    return parser


#: Errors reported as one line and exit status 2 (like argparse's usage errors); anything else is a bug and
#: keeps its traceback. OSError covers FileExistsError, PermissionError, IsADirectoryError, a full disk, ...
REPORTED_ERRORS = (ValueError, TypeError, OSError, FloatingPointError, ImportError)


def error_line(exc: BaseException) -> str:
    """One line for the terminal; an ``OSError`` from the system names its path(s)."""
    if isinstance(exc, OSError) and exc.strerror and exc.filename is not None:
        paths = " -> ".join(str(f) for f in (exc.filename, exc.filename2) if f is not None)
        text = f"{paths}: {exc.strerror}"
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except REPORTED_ERRORS as exc:
        print(f"rmu-analysis: error: {error_line(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
