"""Reading result files: :func:`load_results` merges a directory (all shards) into one row per run
(:func:`flatten_result`), the frame every summary and figure reads."""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import pandas as pd

from .specs import RunSpec

__all__ = ["flatten_result", "load_results", "result_topics", "finished_runs"]


def flatten_result(row: Mapping[str, Any]) -> dict[str, Any]:
    """One run's result dict (as :func:`~.runner.run_one` returns it) as a flat row: spec fields, accuracy per set
    (``acc_<set>``, ``base_acc_<set>``), ``forget_acc`` (mean over topics), and per topic the coefficient, frozen
    and final norm, c / ‖h_l‖, cosines and MaxLogit."""
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


def finished_runs(frame: pd.DataFrame) -> pd.DataFrame:
    """The runs that finished training (``status == "ok"``)."""
    return frame[frame["status"] == "ok"] if "status" in frame else frame
