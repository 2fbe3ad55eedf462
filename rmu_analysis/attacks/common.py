"""What every attack returns, and the small helpers the attacks share.

Every attack result has ``rows()`` (a tuple of :class:`AttackRow`) and ``to_frame()`` (those rows as a table with
the columns ``method, attack, setting, metric, accuracy, low, high, n, steps, seconds``), so a method × attack
table is ``pd.concat([r.to_frame() for r in results])`` (:func:`attack_table`). ``accuracy`` holds an accuracy, or a
difference of accuracies for the metrics named ``... gain`` / ``recovered`` / ``drop``; ``low``/``high`` are its
interval (:mod:`rmu_analysis.stats`); ``steps`` and ``seconds`` are what the attack cost.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Iterable, Sequence

import numpy as np

from ..data import normalize_mcq_record
from ..evaluation import record_clusters
from ..stats import Interval, PairedDifference, accuracy_interval, paired_difference

__all__ = ["AttackRow", "attack_table", "rows_frame", "split_records", "check_records", "record_clusters",
           "interval_row", "difference_row", "check_positive_int", "check_choice"]

COLUMNS = ("method", "attack", "setting", "metric", "accuracy", "low", "high", "n", "steps", "seconds")


@dataclass(frozen=True)
class AttackRow:
    """One line of a method × attack table: what ``attack`` (in ``setting``) achieved on ``method``'s model."""

    method: str
    attack: str
    setting: str
    metric: str
    accuracy: float
    low: float
    high: float
    n: int
    steps: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def rows_frame(rows: Iterable[AttackRow]):
    """A DataFrame with one row per :class:`AttackRow` (columns in :data:`COLUMNS` order)."""
    import pandas as pd

    return pd.DataFrame([r.to_dict() for r in rows], columns=list(COLUMNS))


def attack_table(results: Iterable[Any]):
    """Concatenate the ``to_frame()`` of several attack results into one method × attack table."""
    import pandas as pd

    frames = [r.to_frame() for r in results]
    if not frames:
        raise ValueError("no results: pass at least one attack result")
    return pd.concat(frames, ignore_index=True)


def interval_row(method: str, attack: str, setting: str, metric: str, ci: Interval, *, steps: int = 0,
                 seconds: float = 0.0) -> AttackRow:
    return AttackRow(method, attack, setting, metric, float(ci.estimate), float(ci.low), float(ci.high), int(ci.n),
                     int(steps), float(seconds))


def difference_row(method: str, attack: str, setting: str, metric: str, d: PairedDifference, *, steps: int = 0,
                   seconds: float = 0.0) -> AttackRow:
    return AttackRow(method, attack, setting, metric, float(d.diff), float(d.low), float(d.high), int(d.n),
                     int(steps), float(seconds))


def accuracy_ci(correct: Any, clusters: Sequence | None, seed: int = 0) -> Interval:
    """Accuracy of per-question booleans with its interval (cluster bootstrap over facts when ``clusters``)."""
    return accuracy_interval(np.asarray(correct, dtype=bool), clusters, seed=seed)


def paired_ci(a: Any, b: Any, clusters: Sequence | None, seed: int = 0) -> PairedDifference:
    """``mean(a) - mean(b)`` for two boolean arrays over the same questions, paired (:func:`paired_difference`)."""
    return paired_difference(np.asarray(a, dtype=bool), np.asarray(b, dtype=bool), clusters, seed=seed)


def check_records(records: Any, what: str = "records") -> list[dict]:
    """Normalised question records (``{"question", "choices", "answer", ...}``); a clear error when empty."""
    recs = [] if records is None else list(records)
    if not recs:
        raise ValueError(f"{what} is empty: pass at least one question record (e.g. load_mcq(path))")
    return [normalize_mcq_record(r, source=what, index=i) for i, r in enumerate(recs)]


def split_records(records: Sequence[dict], *, key: str | None = "entity", dev_fraction: float = 0.5, seed: int = 0
                  ) -> tuple[list[dict], list[dict]]:
    """Split questions into (dev, test) so that no value of ``key`` (e.g. the entity a question asks about) is in
    both; ``key=None`` splits single questions. Seeded; the order inside each part follows ``records``."""
    recs = list(records)
    if len(recs) < 2:
        raise ValueError(f"need at least 2 records to split into dev and test, got {len(recs)}")
    if not 0.0 < dev_fraction < 1.0:
        raise ValueError(f"dev_fraction must be strictly between 0 and 1, got {dev_fraction!r}")
    if key is not None:
        missing = [i for i, r in enumerate(recs) if key not in r]
        if missing:
            raise ValueError(f"record {missing[0]} has no field {key!r}: pass key=None to split single questions, or "
                             "another field that names what a question is about")
        groups = list(dict.fromkeys(r[key] for r in recs))
    else:
        groups = list(range(len(recs)))
    if len(groups) < 2:
        raise ValueError(f"all records share one {key!r}: cannot split them into dev and test by it")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(groups))
    n_dev = min(len(groups) - 1, max(1, int(round(dev_fraction * len(groups)))))
    dev_groups = {groups[i] for i in order[:n_dev]}
    label = (lambda i, r: r[key]) if key is not None else (lambda i, r: i)
    dev = [r for i, r in enumerate(recs) if label(i, r) in dev_groups]
    test = [r for i, r in enumerate(recs) if label(i, r) not in dev_groups]
    return dev, test


def check_positive_int(value: Any, name: str, *, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int ≥ {minimum}, got {value!r}")


def check_choice(value: Any, name: str, options: Sequence[str]) -> None:
    if value not in options:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, options))}, got {value!r}")
