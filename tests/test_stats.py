"""stats.py: bootstrap / Wilson intervals, the cluster bootstrap, paired differences and McNemar, on simulated data
with known answers."""
from __future__ import annotations

import time

import numpy as np
import pytest
from scipy import stats as sps

from rmu_analysis.stats import (
    Interval, PairedDifference, accuracy_interval, format_interval, mean_interval, paired_difference,
)


def _bernoulli(n: int, p: float, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random(n) < p


def _clustered(n_facts: int, per_fact: int, p: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Every question about a fact is answered alike (perfect within-fact correlation)."""
    facts = np.random.default_rng(seed).random(n_facts) < p
    return np.repeat(facts, per_fact), np.repeat(np.arange(n_facts), per_fact)


# ------------------------------------------------------------------------------------------------ coverage


def test_interval_covers_the_true_accuracy_95_percent_of_the_time():
    p = 0.3
    data = np.random.default_rng(0).random((200, 300)) < p  # 200 datasets of 300 questions; own stream
    hits = sum(accuracy_interval(correct, seed=k).contains(p) for k, correct in enumerate(data))
    assert 0.92 <= hits / 200 <= 0.98


@pytest.mark.parametrize("method", ["bootstrap", "wilson"])
def test_exact_coverage_over_the_binomial_distribution(method):
    """Coverage without simulation noise: the interval of every possible count, weighted by its probability."""
    n, p = 300, 0.3
    coverage = 0.0
    for k in range(40, 141):  # P(k outside) < 1e-9
        correct = np.arange(n) < k
        coverage += sps.binom.pmf(k, n, p) * accuracy_interval(correct, method=method, seed=k).contains(p)
    assert 0.93 <= coverage <= 0.97


def test_cluster_bootstrap_keeps_coverage_where_the_naive_interval_loses_it():
    p, naive, cluster = 0.3, 0, 0
    facts_right = np.random.default_rng(0).random((200, 100)) < p  # 200 datasets of 100 facts x 3 questions
    facts = np.repeat(np.arange(100), 3)
    for k, right in enumerate(facts_right):
        correct = np.repeat(right, 3)
        naive += accuracy_interval(correct, seed=k).contains(p)
        cluster += accuracy_interval(correct, facts, seed=k).contains(p)
    assert 0.92 <= cluster / 200 <= 0.98
    assert naive / 200 < 0.85  # three copies of each fact counted as independent evidence: about 74%


# ------------------------------------------------------------------------------------------------ intervals


def test_cluster_interval_wider_when_questions_of_a_fact_agree():
    correct, facts = _clustered(100, 4, 0.4, seed=1)
    naive = accuracy_interval(correct)
    cluster = accuracy_interval(correct, facts)
    assert cluster.estimate == naive.estimate == correct.mean()
    assert (cluster.method, cluster.n, cluster.n_clusters) == ("cluster-bootstrap", 400, 100)
    assert (naive.method, naive.n_clusters) == ("bootstrap", 400)
    # 100 independent facts, not 400 questions: about twice as wide (sqrt of 4)
    assert 1.6 < (cluster.high - cluster.low) / (naive.high - naive.low) < 2.5


def test_singleton_clusters_give_the_naive_interval():
    correct = _bernoulli(300, 0.3, seed=3)
    naive = accuracy_interval(correct, n_boot=20_000, seed=0)
    ids = [f"fact-{i}" for i in np.random.default_rng(0).permutation(300)]  # any hashable ids, any order
    single = accuracy_interval(correct, ids, n_boot=20_000, seed=1)
    assert single.method == "cluster-bootstrap" and single.n_clusters == 300
    assert abs(single.low - naive.low) <= 0.01 and abs(single.high - naive.high) <= 0.01


def test_bootstrap_agrees_with_wilson_on_independent_questions():
    for n, p, seed in [(300, 0.3, 0), (1000, 0.55, 1), (600, 0.85, 2)]:
        correct = _bernoulli(n, p, seed)
        boot = accuracy_interval(correct, seed=seed)
        wilson = accuracy_interval(correct, method="wilson")
        assert wilson.method == "wilson" and wilson.estimate == boot.estimate
        assert abs(boot.low - wilson.low) < 0.01 and abs(boot.high - wilson.high) < 0.01


def test_wilson_matches_the_formula():
    ci = accuracy_interval([True] * 30 + [False] * 70, method="wilson")
    z, n, ph = sps.norm.ppf(0.975), 100, 0.3
    centre = (ph + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(ph * (1 - ph) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert ci.low == pytest.approx(centre - half) and ci.high == pytest.approx(centre + half)
    assert accuracy_interval([1] * 20, method="wilson").low < 1.0 == accuracy_interval([1] * 20, method="wilson").high


def test_interval_is_deterministic_for_a_seed_and_narrower_at_lower_level():
    correct, facts = _clustered(50, 3, 0.5, seed=4)
    a = accuracy_interval(correct, facts, seed=7)
    assert a == accuracy_interval(correct, facts, seed=7)
    # another seed, other resamples (few of them, so the percentiles fall between the grid of 1/50 steps)
    assert accuracy_interval(correct, facts, seed=8, n_boot=99) != accuracy_interval(correct, facts, seed=7, n_boot=99)
    narrow = accuracy_interval(correct, facts, seed=7, level=0.5)
    assert a.low < narrow.low <= narrow.estimate <= narrow.high < a.high
    assert accuracy_interval(correct, facts, seed=np.random.default_rng(7)) == a


def test_unequal_cluster_sizes_weight_questions_not_facts():
    correct = np.array([True] * 9 + [False])  # fact 0: 9 right; fact 1: one wrong
    ci = accuracy_interval(correct, [0] * 9 + [1], n_boot=4000)
    assert ci.estimate == 0.9 and ci.n_clusters == 2
    # resamples are {0,0} -> 1.0, {0,1} -> 0.9, {1,1} -> 0.0
    assert ci.low == 0.0 and ci.high == 1.0


# ------------------------------------------------------------------------------------------------ paired


def test_identical_results_differ_by_zero_with_p_one():
    a = _bernoulli(200, 0.4, seed=0)
    for clusters in (None, np.arange(200) // 2):
        d = paired_difference(a, a.copy(), clusters)
        assert (d.diff, d.low, d.high, d.p_value) == (0.0, 0.0, 0.0, 1.0)
        assert (d.mcnemar_b, d.mcnemar_c, d.mcnemar_p, d.mcnemar_midp) == (0, 0, 1.0, 1.0)
        assert not d.significant() and not d.significant(0.05)


def test_large_difference_is_significant():
    rng = np.random.default_rng(0)
    truth = rng.random(300)
    a, b = truth < 0.7, truth < 0.4  # a right on every question b gets right, and 30% more
    for clusters in (None, np.arange(300) // 3):
        d = paired_difference(a, b, clusters)
        assert d.diff == pytest.approx(a.mean() - b.mean())
        assert d.p_value < 0.01 and d.low > 0 and d.significant()
        assert d.mcnemar_p < 0.01 and d.mcnemar_c == 0
    flipped = paired_difference(b, a)
    assert flipped.diff == -paired_difference(a, b).diff and flipped.high < 0 and flipped.p_value < 0.01


def test_mcnemar_counts_and_p_values_by_hand():
    a = np.array([1, 1, 0, 0, 1, 0, 1, 1], dtype=bool)
    b = np.array([1, 0, 1, 0, 0, 0, 0, 1], dtype=bool)
    d = paired_difference(a, b)
    assert (d.mcnemar_b, d.mcnemar_c) == (3, 1)  # questions 1, 4, 6 only a; question 2 only b
    assert d.diff == pytest.approx(0.25) and (d.accuracy_a, d.accuracy_b) == (5 / 8, 3 / 8)
    assert d.mcnemar_p == pytest.approx(2 * (1 + 4) / 16) == pytest.approx(sps.binomtest(1, 4).pvalue)
    assert d.mcnemar_midp == pytest.approx(0.625 - 4 / 16)


def test_pairing_is_narrower_than_two_independent_intervals():
    rng = np.random.default_rng(5)
    truth = rng.random(500)
    a, b = truth < 0.5, truth < 0.45  # strongly correlated: they disagree on 5% of the questions
    d = paired_difference(a, b)
    half_a, half_b = accuracy_interval(a).half_width, accuracy_interval(b).half_width
    assert (d.high - d.low) / 2 < 0.5 * np.hypot(half_a, half_b)


def test_paired_false_positive_rate_is_near_the_level():
    rejections = 0
    for k in range(200):
        rng = np.random.default_rng(k)
        a, b = rng.random(300) < 0.5, rng.random(300) < 0.5  # same accuracy, independent errors
        rejections += paired_difference(a, b, seed=k).p_value < 0.05
    assert 0.02 <= rejections / 200 <= 0.09


def test_p_value_is_two_sided_and_agrees_with_the_interval():
    borderline = 0
    for k in range(100):
        rng = np.random.default_rng(1000 + k)
        a = rng.random(300) < 0.5
        b = a ^ (rng.random(300) < 0.15)  # b flips 15% of a's answers: small differences either way
        d = paired_difference(a, b, seed=k)
        assert (d.p_value < 0.05) == d.significant()  # p < 1 - level exactly when the 95% interval excludes 0
        borderline += 0.05 <= d.p_value < 0.1
    assert borderline >= 3  # a one-sided p-value would call these significant


def test_question_ids_must_align():
    a, b = _bernoulli(4, 0.5, 0), _bernoulli(4, 0.5, 1)
    assert paired_difference(a, b, ids_a=["q1", "q2", "q3", "q4"], ids_b=["q1", "q2", "q3", "q4"]).n == 4
    with pytest.raises(ValueError, match=r"question 2 differs: 'q3' vs 'q4'"):
        paired_difference(a, b, ids_a=["q1", "q2", "q3", "q4"], ids_b=["q1", "q2", "q4", "q3"])
    with pytest.raises(ValueError, match="pass both ids_a and ids_b"):
        paired_difference(a, b, ids_a=["q1", "q2", "q3", "q4"])


# ------------------------------------------------------------------------------------------------ seeds, format


def test_mean_interval_is_the_t_interval():
    ci = mean_interval([0.30, 0.32, 0.34])
    low, high = sps.t.interval(0.95, 2, loc=0.32, scale=0.02 / np.sqrt(3))
    assert ci.estimate == pytest.approx(0.32) and ci.low == pytest.approx(low) and ci.high == pytest.approx(high)
    assert (ci.method, ci.n) == ("t", 3)
    with pytest.raises(ValueError, match="at least 2 values"):
        mean_interval([0.3])


def test_format_and_frames():
    ci = Interval(0.312, 0.270, 0.355, 300, 300, "bootstrap")
    assert format_interval(ci) == "31.2% [27.0, 35.5]" == str(ci)
    d = paired_difference([1, 1, 0, 1], [0, 1, 0, 0])
    assert isinstance(d, PairedDifference)
    assert format_interval(d).startswith("+50.0 pp [")
    assert list(ci.to_frame().columns) == ["estimate", "low", "high", "n", "n_clusters", "method", "level"]
    assert d.to_frame().loc[0, "mcnemar_b"] == 2
    with pytest.raises(TypeError, match="Interval or a PairedDifference"):
        format_interval(0.3)


# ------------------------------------------------------------------------------------------------ errors, speed


def test_errors_say_what_was_wrong():
    with pytest.raises(ValueError, match="correct is empty"):
        accuracy_interval([])
    with pytest.raises(ValueError, match=r"booleans \(or 0/1\), found 0.5"):
        accuracy_interval([1, 0.5, 0])
    with pytest.raises(ValueError, match="dtype <U"):
        accuracy_interval(["yes", "no"])
    with pytest.raises(ValueError, match="1-D"):
        accuracy_interval(np.ones((2, 3), dtype=bool))
    with pytest.raises(ValueError, match="clusters has 2 entries but there are 3 questions"):
        accuracy_interval([1, 0, 1], [0, 1])
    with pytest.raises(ValueError, match="wilson' assumes independent"):
        accuracy_interval([1, 0, 1], [0, 0, 1], method="wilson")
    with pytest.raises(ValueError, match="method must be"):
        accuracy_interval([1, 0, 1], method="jackknife")
    with pytest.raises(ValueError, match="level must be"):
        accuracy_interval([1, 0, 1], level=95)
    with pytest.raises(ValueError, match="n_boot must be"):
        accuracy_interval([1, 0, 1], n_boot=0)
    with pytest.raises(ValueError, match="seed must be"):
        accuracy_interval([1, 0, 1], seed=None)
    with pytest.raises(ValueError, match="correct_a has 3 questions and correct_b 2"):
        paired_difference([1, 0, 1], [1, 0])
    with pytest.raises(ValueError, match="correct_b is empty"):
        paired_difference([1], [])
    with pytest.raises(ValueError, match="correct_b must hold booleans"):
        paired_difference([1, 0], [2, 0])


def test_fast_for_a_thousand_questions():
    correct = _bernoulli(1000, 0.3, seed=0)
    worst = np.arange(1000)  # 1,000 singleton facts: the largest resampling matrix (2000 x 1000)
    accuracy_interval(correct, worst)
    timings = []
    for _ in range(5):
        start = time.perf_counter()
        accuracy_interval(correct, worst)
        paired_difference(correct, ~correct, worst)
        timings.append((time.perf_counter() - start) / 2)
    assert np.median(timings) < 0.1  # about 15 ms each on one CPU core
