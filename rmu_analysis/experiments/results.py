"""Reading result files: :func:`load_results` merges a directory (all shards) into one row per run
(:func:`flatten_result`), the frame every summary and figure reads; :func:`result_problem` says what makes a file
unusable (a sweep recomputes such a run); :func:`rekey` renames a directory's files to the current key formula."""
from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
import pandas as pd

from .._io import atomic_write_json
from .inputs import run_inputs
from .robustness import attack_result_problem, is_attack_result
from .specs import RunSpec

__all__ = ["flatten_result", "load_results", "result_topics", "finished_runs", "result_problem", "rekey", "Rekeyed",
           "json_records"]

_SPEC_FIELDS = ("method", "layer", "coeff", "alpha", "lr", "steps", "seed", "batch_size", "model", "data")


def flatten_result(row: Mapping[str, Any]) -> dict[str, Any]:
    """One run's result dict (as :func:`~.runner.run_one` returns it) as a flat row: spec fields, accuracy per set
    (``acc_<set>``, ``base_acc_<set>``), ``forget_acc`` (mean over topics), and per topic the coefficient, frozen
    and final norm, c / ‖h_l‖, cosines and MaxLogit."""
    spec = row["spec"]
    flat: dict[str, Any] = {"key": row["key"], "status": row.get("status", "ok")}
    for name in _SPEC_FIELDS:
        flat[name] = spec.get(name)
    if flat["status"] != "ok":
        return flat
    topics = row["topics"]
    for name, acc in row["accuracy"].items():
        flat[f"acc_{name}"] = acc
        flat[f"base_acc_{name}"] = row["base"]["accuracy"][name]
    for name, bits in row.get("correct", {}).items():  # per-question outcomes: intervals and paired tests
        flat[f"correct_{name}"] = bits
        flat[f"base_correct_{name}"] = row["base"].get("correct", {}).get(name)
    for name, halves in row.get("accuracy_in_corpus", {}).items():
        flat[f"acc_{name}_in_corpus"], flat[f"acc_{name}_out_corpus"] = halves["in"], halves["out"]
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


def _needed(row: Mapping[str, Any]) -> Iterator[tuple[str, ...]]:
    """The fields :func:`flatten_result` reads from ``row``, as paths (``("base", "accuracy", "general")``)."""
    yield from (("key",), ("spec",))
    if row.get("status", "ok") != "ok":
        return
    yield from ((f,) for f in ("topics", "accuracy", "forget_accuracy", "retain_loss", "confidence", "alignment",
                               "forget_norm", "coefficient", "coefficient_over_norm", "base"))
    yield from (("base", f) for f in ("accuracy", "retain_loss", "confidence", "alignment"))
    accuracy = row.get("accuracy")
    yield from (("base", "accuracy", name) for name in (accuracy if isinstance(accuracy, dict) else ()))
    topics = row.get("topics")
    for t in topics if isinstance(topics, list) else ():
        yield from (("forget_accuracy", t), ("forget_norm", t, "frozen"), ("forget_norm", t, "final"),
                    ("confidence", t, "max_logit_mean"), ("base", "confidence", t, "max_logit_mean"),
                    ("base", "alignment", t, "cos_u_mean"))
        yield from (("alignment", t, f"cos_{n}_mean") for n in ("u", "uniform_null", "gaussian_null"))


def result_problem(row: Any) -> str | None:
    """Why ``row`` (a parsed result file) cannot be used, in words (``"lacks the field 'base.accuracy.general'"``),
    or None when it is a complete result."""
    if not isinstance(row, dict):
        return f"holds a JSON {type(row).__name__}, not a result object"
    if is_attack_result(row):
        return attack_result_problem(row)
    for path in _needed(row):
        node: Any = row
        for part in path:
            if not isinstance(node, dict) or part not in node:
                return f"lacks the field {'.'.join(map(str, path))!r}"
            node = node[part]
    if not isinstance(row["spec"], dict):
        return "has a 'spec' that is not an object"
    try:
        flatten_result(row)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        return f"cannot be read ({type(exc).__name__}: {exc})"
    return None


def load_results(out_dir: str | Path, specs: Iterable[RunSpec] | None = None, *, logs: bool = False) -> pd.DataFrame:
    """Every result file in ``out_dir`` (all shards) as one row per run; with ``specs`` only those runs, with a
    warning naming how many are missing. ``logs=True`` adds the training log (a list of dicts) as ``log``. A file
    that is not a complete result is skipped with a warning naming it and what it lacks (a sweep recomputes it);
    JSON files that are no results (``norms.json``) are ignored."""
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
        if not isinstance(row, dict) or ("spec" not in row and "key" not in row) or is_attack_result(row):
            continue  # attack runs are read by robustness.load_attack_results
        problem = result_problem(row)
        if problem is not None:
            warnings.warn(f"{path} {problem}: skipped (a sweep into {out} recomputes it)", stacklevel=2)
            continue
        flat = flatten_result(row)
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


def result_topics(frame: pd.DataFrame) -> list[str]:
    """The forget topics of a results frame (from its ``norm_frozen_<topic>`` columns)."""
    return [c[len("norm_frozen_"):] for c in frame.columns if c.startswith("norm_frozen_")]


def json_records(frame: pd.DataFrame, digits: int = 6) -> list[dict[str, Any]]:
    """A table as JSON-ready records (summary files): floats rounded to ``digits`` decimals, NaN and infinities as
    None."""
    return [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()}
            for r in frame.round(digits).to_dict(orient="records")]


def finished_runs(frame: pd.DataFrame) -> pd.DataFrame:
    """The runs that finished training (``status == "ok"``)."""
    return frame[frame["status"] == "ok"] if "status" in frame else frame


@dataclass(frozen=True)
class Rekeyed:
    """What :func:`rekey` did: ``renamed`` (old file name, new file name) pairs, how many files already had the
    current key, and ``skipped`` files with the reason."""

    renamed: tuple[tuple[str, str], ...]
    unchanged: int
    skipped: tuple[tuple[str, str], ...]


def rekey(results: str | Path) -> Rekeyed:
    """Rename every result file in ``results`` to its run's key under the current formula (:meth:`RunSpec.key`)
    and set its ``"key"`` and ``"inputs"`` fields, without training anything; ``norms.json`` gets the
    ``"inputs"`` stamp :func:`~.plans.plan_norms` checks.

    Only for results computed with the model and data that are here now: the new keys hash the current files
    (that is the point of the migration, e.g. after the key formula started hashing the inputs). A file that is
    not a complete result, or whose new name holds a different result, is left as it is (``skipped``).
    Interrupted, it can be run again: the new file is written before the old one is removed."""
    root = Path(results)
    renamed, skipped, unchanged = [], [], 0
    for path in sorted(root.glob("*.json")):
        if path.name.startswith(".") or path.name == "norms.json":
            continue
        try:
            row = json.loads(path.read_text())
        except ValueError:
            skipped.append((path.name, "not valid JSON"))
            continue
        if not isinstance(row, dict) or ("spec" not in row and "key" not in row) or is_attack_result(row):
            continue  # attack runs are keyed by AttackSpec: a rerun recomputes them
        problem, spec = result_problem(row), None
        try:
            spec = None if problem else RunSpec.from_dict(row["spec"])
        except (TypeError, ValueError) as exc:
            problem = f"has a spec that is no longer valid ({exc})"
        if spec is None:
            skipped.append((path.name, problem))
            continue
        key = spec.key()
        target = root / f"{key}.json"
        new = {}
        for name, value in row.items():  # the fields in run_one's order, "inputs" after "version"
            if name != "inputs":
                new[name] = key if name == "key" else value
            if name == "version":
                new["inputs"] = spec.inputs()
        new.setdefault("inputs", spec.inputs())
        if target == path and new == row:
            unchanged += 1
            continue
        if target != path and target.exists():
            try:
                same = json.loads(target.read_text()) == new
            except ValueError:
                same = False
            if not same:
                skipped.append((path.name, f"{target.name} already holds another result of run {key}"))
                continue
        else:
            atomic_write_json(target, new)
        if target != path:
            path.unlink()
        renamed.append((path.name, target.name))
    norms = root / "norms.json"
    cached = json.loads(norms.read_text()) if norms.is_file() else {}
    if "model" in cached and "data" in cached:
        stamp = run_inputs(cached["model"], cached["data"])
        if cached.get("inputs") != stamp:
            atomic_write_json(norms, {**cached, "inputs": stamp})
    return Rekeyed(renamed=tuple(renamed), unchanged=unchanged, skipped=tuple(skipped))
