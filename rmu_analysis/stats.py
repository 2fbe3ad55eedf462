"""Confidence intervals for multiple-choice accuracy and paired tests between two models on the same questions.

* :func:`accuracy_interval` — accuracy with a seeded percentile-bootstrap interval. When several questions share a
  fact (``clusters``: one fact id per question), whole facts are resampled (cluster bootstrap), since questions
  about one fact are not independent evidence. ``method="wilson"`` gives the Wilson score interval for
  independent questions.
* :func:`paired_difference` — ``accuracy_a - accuracy_b`` on the same questions: paired (cluster) bootstrap
  interval and two-sided bootstrap p-value, beside McNemar's exact and mid-p tests on the discordant counts.
* :func:`score_interval` — the mean of a per-question score (e.g. a difference of two gains, −2 … 2) with the same
  (cluster) bootstrap interval.
* :func:`mean_interval` — mean over seeds with a Student-t interval (seed-level accuracies as the data).
* :func:`format_interval` — ``"31.2% [27.0, 35.5]"``.

Pure numpy/scipy. Bootstrap resamples are drawn as one matrix (no Python loop over resamples); without clusters
the resampled number of correct answers is drawn directly (Binomial / Multinomial), which has exactly the
distribution of resampling the questions. Every draw comes from ``numpy.random.default_rng(seed)``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np
from scipy import stats as _sps

__all__ = [
    "Interval", "PairedDifference", "accuracy_interval", "paired_difference", "score_interval", "mean_interval",
    "finite_mean_interval",
    "format_interval",
    "N_BOOT",
]

N_BOOT = 2000  # default bootstrap resamples
_CHUNK = 4_000_000  # at most this many resampled indices in memory at once (cluster bootstrap)


@dataclass(frozen=True)
class Interval:
    """An estimate with a two-sided interval at ``level``.

    ``n``: questions (or seeds for ``method="t"``); ``n_clusters``: independent units that were resampled (facts
    for a cluster bootstrap, else ``n``). ``method``: ``"bootstrap"``, ``"cluster-bootstrap"``, ``"wilson"`` or
    ``"t"``.
    """

    estimate: float
    low: float
    high: float
    n: int
    n_clusters: int
    method: str
    level: float = 0.95

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high

    def to_dict(self) -> dict:
        return asdict(self)

    def to_frame(self):
        """One row: estimate, low, high, n, n_clusters, method, level."""
        import pandas as pd

        return pd.DataFrame([self.to_dict()])

    def __str__(self) -> str:
        return format_interval(self)


@dataclass(frozen=True)
class PairedDifference:
    """``diff = accuracy_a - accuracy_b`` on the same questions, with a paired bootstrap interval and p-value.

    ``mcnemar_b``: questions a answers right and b wrong; ``mcnemar_c``: a wrong and b right. ``mcnemar_p`` is
    McNemar's exact (binomial) two-sided p-value on them, ``mcnemar_midp`` its mid-p version; both treat questions
    as independent, so with clusters prefer ``p_value`` (cluster bootstrap).
    """

    diff: float
    low: float
    high: float
    p_value: float
    n: int
    n_clusters: int
    method: str
    accuracy_a: float
    accuracy_b: float
    mcnemar_b: int
    mcnemar_c: int
    mcnemar_p: float
    mcnemar_midp: float
    level: float = 0.95

    @property
    def estimate(self) -> float:
        return self.diff

    def significant(self, alpha: float | None = None) -> bool:
        """Whether the interval excludes 0 (``alpha=None``), or ``p_value < alpha``."""
        if alpha is None:
            return not (self.low <= 0.0 <= self.high)
        return self.p_value < alpha

    def to_dict(self) -> dict:
        return asdict(self)

    def to_frame(self):
        """One row with every field."""
        import pandas as pd

        return pd.DataFrame([self.to_dict()])

    def __str__(self) -> str:
        return f"{format_interval(self)}, p = {self.p_value:.3g}"


# ------------------------------------------------------------------------------------------------ validation


def _as_correct(values: Any, name: str) -> np.ndarray:
    """A 1-D boolean array from bools or 0/1 numbers; clear errors otherwise."""
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of per-question booleans, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty: pass one boolean per question (e.g. MCQResult.correct)")
    if arr.dtype == bool:
        return arr
    if arr.dtype.kind in "iuf":
        ok = (arr == 0) | (arr == 1)
        if ok.all():
            return arr.astype(bool)
        bad = arr[~ok][0].item()
        raise ValueError(
            f"{name} must hold booleans (or 0/1), found {bad!r}: pass prediction == answer per question, "
            "not scores or accuracies"
        )
    raise ValueError(f"{name} must hold booleans (or 0/1), got dtype {arr.dtype}: pass prediction == answer per question")


def _check_level(level: float) -> float:
    if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0.0 < float(level) < 1.0:
        raise ValueError(f"level must be a number strictly between 0 and 1 (e.g. 0.95), got {level!r}")
    return float(level)


def _check_n_boot(n_boot: int) -> int:
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise ValueError(f"n_boot must be a positive int (e.g. {N_BOOT}), got {n_boot!r}")
    return int(n_boot)


def _rng(seed: int | np.random.Generator) -> np.random.Generator:
    if isinstance(seed, np.random.Generator):
        return seed
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an int or a numpy Generator, got {seed!r}")
    return np.random.default_rng(int(seed))


def _cluster_index(clusters: Any, n: int) -> tuple[np.ndarray, int]:
    """Cluster ids (any hashables: str, int, tuple) -> integer codes 0..K-1 in order of first appearance."""
    if isinstance(clusters, np.ndarray):
        if clusters.ndim != 1:
            raise ValueError(f"clusters must be 1-D (one id per question), got shape {clusters.shape}")
        clusters = clusters.tolist()
    clusters = list(clusters)
    if len(clusters) != n:
        raise ValueError(f"clusters has {len(clusters)} entries but there are {n} questions: pass one id per question")
    codes: dict[Any, int] = {}
    try:
        index = np.fromiter((codes.setdefault(c, len(codes)) for c in clusters), dtype=np.int64, count=n)
    except TypeError as exc:
        raise ValueError(f"cluster ids must be hashable (str, int or tuple), got {exc}") from exc
    return index, len(codes)


def _percentiles(boot: np.ndarray, level: float) -> tuple[float, float]:
    alpha = 1.0 - level
    low, high = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def _cluster_means(values: np.ndarray, index: np.ndarray, k: int, n_boot: int, rng) -> np.ndarray:
    """Bootstrap means of ``values`` resampling whole clusters: sum over drawn clusters / questions drawn."""
    sums = np.bincount(index, weights=values.astype(np.float64), minlength=k)
    sizes = np.bincount(index, minlength=k).astype(np.float64)
    equal = bool((sizes == sizes[0]).all())  # then every resample has k * size questions
    rows = max(1, _CHUNK // k)
    out = np.empty(n_boot)
    for start in range(0, n_boot, rows):  # blocks of resamples, to bound memory; each block is one matrix
        m = min(rows, n_boot - start)
        draw = rng.integers(0, k, size=(m, k), dtype=np.int32)
        total = sums[draw].sum(axis=1)
        out[start: start + m] = total / (k * sizes[0]) if equal else total / sizes[draw].sum(axis=1)
    return out


# ------------------------------------------------------------------------------------------------ intervals


def accuracy_interval(
    correct: Any,
    clusters: Sequence[Any] | None = None,
    *,
    level: float = 0.95,
    n_boot: int = N_BOOT,
    seed: int | np.random.Generator = 0,
    method: str = "bootstrap",
) -> Interval:
    """Accuracy (mean of ``correct``) with a ``level`` interval.

    ``correct``: one boolean per question. ``clusters``: optional id per question (e.g. the fact it asks about);
    then facts are resampled with replacement and the accuracy of each resample is its correct answers / its
    questions (cluster bootstrap). ``method="bootstrap"``: seeded percentile bootstrap with ``n_boot``
    resamples; ``method="wilson"``: Wilson score interval (independent questions only, no clusters).
    """
    correct = _as_correct(correct, "correct")
    level = _check_level(level)
    n = int(correct.size)
    estimate = float(correct.mean())
    if method == "wilson":
        if clusters is not None:
            raise ValueError("method='wilson' assumes independent questions: use method='bootstrap' with clusters")
        z = float(_sps.norm.ppf(0.5 + level / 2))
        denom = 1 + z * z / n
        centre = (estimate + z * z / (2 * n)) / denom
        half = z * np.sqrt(estimate * (1 - estimate) / n + z * z / (4 * n * n)) / denom
        return Interval(estimate, float(max(0.0, centre - half)), float(min(1.0, centre + half)), n, n, "wilson", level)
    if method != "bootstrap":
        raise ValueError(f"method must be 'bootstrap' or 'wilson', got {method!r}")
    n_boot = _check_n_boot(n_boot)
    rng = _rng(seed)
    if clusters is None:
        boot = rng.binomial(n, estimate, size=n_boot) / n  # = resampling n questions with replacement
        low, high = _percentiles(boot, level)
        return Interval(estimate, low, high, n, n, "bootstrap", level)
    index, k = _cluster_index(clusters, n)
    boot = _cluster_means(correct, index, k, n_boot, rng)
    low, high = _percentiles(boot, level)
    return Interval(estimate, low, high, n, k, "cluster-bootstrap", level)


def _mcnemar(b: int, c: int) -> tuple[float, float]:
    """Exact two-sided McNemar p-value (binomial test of b vs c at 1/2) and its mid-p version."""
    m = b + c
    if m == 0:
        return 1.0, 1.0
    k = min(b, c)
    cdf = float(_sps.binom.cdf(k, m, 0.5))
    pmf = float(_sps.binom.pmf(k, m, 0.5))
    return min(1.0, 2 * cdf), min(1.0, 2 * cdf - pmf)


def paired_difference(
    correct_a: Any,
    correct_b: Any,
    clusters: Sequence[Any] | None = None,
    *,
    ids_a: Sequence[Any] | None = None,
    ids_b: Sequence[Any] | None = None,
    level: float = 0.95,
    n_boot: int = N_BOOT,
    seed: int | np.random.Generator = 0,
) -> PairedDifference:
    """``accuracy_a - accuracy_b`` of two models scored on the same questions, paired.

    Each bootstrap resample draws questions (or, with ``clusters``, whole facts) once and scores both models on
    them, so question difficulty cancels. Interval: percentiles of the resampled differences. ``p_value``:
    two-sided bootstrap p-value, ``min(1, 2·min(P*(d ≤ 0), P*(d ≥ 0)))`` with the +1 correction, so it is never 0
    and is 1 when the two are identical; it is below ``1 - level`` about when the interval excludes 0.
    ``ids_a`` / ``ids_b``: optional question ids, checked to be equal position by position.
    """
    a = _as_correct(correct_a, "correct_a")
    b = _as_correct(correct_b, "correct_b")
    if a.size != b.size:
        raise ValueError(
            f"correct_a has {a.size} questions and correct_b {b.size}: a paired test needs both models scored on "
            "the same questions, in the same order"
        )
    if (ids_a is None) != (ids_b is None):
        raise ValueError("pass both ids_a and ids_b (question ids of each result) or neither")
    if ids_a is not None:
        ids_a, ids_b = list(ids_a), list(ids_b)
        if len(ids_a) != a.size or len(ids_b) != b.size:
            raise ValueError(f"ids_a / ids_b have {len(ids_a)} / {len(ids_b)} entries, expected {a.size} (one per question)")
        bad = next((i for i, (x, y) in enumerate(zip(ids_a, ids_b)) if x != y), None)
        if bad is not None:
            raise ValueError(
                f"question {bad} differs: {ids_a[bad]!r} vs {ids_b[bad]!r}; align both results on the same questions "
                "in the same order"
            )
    level = _check_level(level)
    n_boot = _check_n_boot(n_boot)
    rng = _rng(seed)
    n = int(a.size)
    d = a.astype(np.int8) - b.astype(np.int8)  # +1: only a right, -1: only b right
    only_a, only_b = int((d == 1).sum()), int((d == -1).sum())
    diff = (only_a - only_b) / n
    if clusters is None:
        counts = rng.multinomial(n, [only_a / n, only_b / n, 1 - (only_a + only_b) / n], size=n_boot)
        boot = (counts[:, 0] - counts[:, 1]) / n  # = resampling n question pairs with replacement
        k, method = n, "paired-bootstrap"
    else:
        index, k = _cluster_index(clusters, n)
        boot = _cluster_means(d, index, k, n_boot, rng)
        method = "paired-cluster-bootstrap"
    low, high = _percentiles(boot, level)
    p_le = (np.count_nonzero(boot <= 0) + 1) / (n_boot + 1)
    p_ge = (np.count_nonzero(boot >= 0) + 1) / (n_boot + 1)
    p_value = float(min(1.0, 2 * min(p_le, p_ge)))
    mc_p, mc_midp = _mcnemar(only_a, only_b)
    return PairedDifference(
        diff=float(diff), low=low, high=high, p_value=p_value, n=n, n_clusters=int(k), method=method,
        accuracy_a=float(a.mean()), accuracy_b=float(b.mean()), mcnemar_b=only_a, mcnemar_c=only_b,
        mcnemar_p=mc_p, mcnemar_midp=mc_midp, level=level,
    )


def score_interval(values: Any, clusters: Sequence[Any] | None = None, *, level: float = 0.95, n_boot: int = N_BOOT,
                   seed: int | np.random.Generator = 0) -> Interval:
    """Mean of one real score per question (e.g. ``(attacked − clean) − (control attacked − control clean)``) with a
    seeded percentile-bootstrap interval; with ``clusters`` whole facts are resampled, as in
    :func:`accuracy_interval`."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"values must be a non-empty 1-D array (one score per question), got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError("values contain NaN or inf")
    level = _check_level(level)
    n_boot = _check_n_boot(n_boot)
    rng = _rng(seed)
    n = int(arr.size)
    index, k = _cluster_index(range(n) if clusters is None else clusters, n)
    boot = _cluster_means(arr, index, k, n_boot, rng)
    low, high = _percentiles(boot, level)
    return Interval(float(arr.mean()), low, high, n, k, "bootstrap" if clusters is None else "cluster-bootstrap", level)


def mean_interval(values: Any, *, level: float = 0.95) -> Interval:
    """Mean of per-seed values (e.g. accuracies of 3 seeds) with a Student-t interval on ``len(values) - 1`` dof."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"values must be 1-D (one number per seed), got shape {arr.shape}")
    if arr.size < 2:
        raise ValueError(f"a t interval needs at least 2 values (seeds), got {arr.size}")
    if not np.isfinite(arr).all():
        raise ValueError("values contain NaN or inf")
    level = _check_level(level)
    n = int(arr.size)
    mean = float(arr.mean())
    half = float(_sps.t.ppf(0.5 + level / 2, n - 1) * arr.std(ddof=1) / np.sqrt(n))
    return Interval(mean, mean - half, mean + half, n, n, "t", level)


def finite_mean_interval(values: Any, level: float = 0.95) -> Interval:
    """:func:`mean_interval` of the finite entries of ``values``; with fewer than two, the mean (nan when none)
    and a nan interval instead of an error (a measure over texts or seeds where some are undefined)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size < 2:
        m = float(v.mean()) if v.size else float("nan")
        return Interval(m, float("nan"), float("nan"), int(v.size), int(v.size), "t", level)
    return mean_interval(v, level=level)


def format_interval(x: Interval | PairedDifference, *, digits: int = 1) -> str:
    """``"31.2% [27.0, 35.5]"`` for an accuracy; ``"+4.0 pp [1.2, 6.9]"`` (percentage points) for a difference."""
    if isinstance(x, PairedDifference):
        return f"{100 * x.diff:+.{digits}f} pp [{100 * x.low:.{digits}f}, {100 * x.high:.{digits}f}]"
    if isinstance(x, Interval):
        return f"{100 * x.estimate:.{digits}f}% [{100 * x.low:.{digits}f}, {100 * x.high:.{digits}f}]"
    raise TypeError(f"format_interval takes an Interval or a PairedDifference, got {type(x).__name__}")
