"""Command-line interface: ``rmu-analysis {demo,organism,unlearn,evaluate,attack,reproduce,sweep} ...``; each
subcommand lives beside what it runs (``organism.cli``, ``unlearning.cli``, ``attacks.cli``, ``experiments.cli``,
``reproduce``)."""
from __future__ import annotations

import argparse
import sys

from .attacks.cli import add_attack_parser
from .experiments.cli import add_sweep_parser
from .organism.cli import add_demo_parser, add_organism_parser
from .reproduce import add_reproduce_parser
from .unlearning.cli import add_evaluate_parser, add_unlearn_parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rmu-analysis",
        description="Representation-steering unlearning (RMU, Adaptive RMU): measure, apply, reproduce.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    add_demo_parser(sub)
    add_organism_parser(sub)
    add_unlearn_parser(sub)
    add_evaluate_parser(sub)
    add_attack_parser(sub)
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
