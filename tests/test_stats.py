import numpy as np
import pytest
from scipy import stats as scipy_stats

from batching.measure import stats


def test_summarize_on_known_samples():
    x = np.arange(1, 101, dtype=float)  # 1..100
    s = stats.summarize(x)
    assert s["latency_s"] == pytest.approx(50.5)
    assert s["latency_min_s"] == 1.0
    assert s["latency_p10_s"] == pytest.approx(np.percentile(x, 10))
    assert s["latency_p90_s"] == pytest.approx(np.percentile(x, 90))
    assert s["latency_iqr_s"] == pytest.approx(np.percentile(x, 75) - np.percentile(x, 25))
    assert s["n_runs"] == 100
    assert s["latency_ci_low_s"] < 50.5 < s["latency_ci_high_s"]


def test_median_interval_has_binomial_coverage():
    # The interval's exact coverage from the binomial must be at least the confidence.
    for n in (10, 31, 200):
        x = np.arange(n, dtype=float)
        lo, hi = stats.median_interval(x, 0.95)
        j, k = int(lo) + 1, int(hi) + 1  # 1-based ranks
        coverage = scipy_stats.binom.cdf(k - 1, n, 0.5) - scipy_stats.binom.cdf(j - 1, n, 0.5)
        assert coverage >= 0.95
        # and it is not the trivial interval
        assert j > 1 and k < n


def test_median_interval_covers_true_median_empirically():
    rng = np.random.default_rng(0)
    true_median = np.exp(0.0)  # lognormal(0, s) has median 1
    hits = 0
    trials = 400
    for _ in range(trials):
        lo, hi = stats.median_interval(rng.lognormal(0.0, 0.5, size=40), 0.95)
        hits += lo <= true_median <= hi
    assert hits / trials >= 0.93


def test_relative_halfwidth_shrinks_with_more_samples():
    rng = np.random.default_rng(1)
    small = stats.relative_halfwidth(rng.lognormal(0, 0.2, 20))
    large = stats.relative_halfwidth(rng.lognormal(0, 0.2, 2000))
    assert large < small / 4


def test_slower_than_detects_a_shift_and_not_noise():
    rng = np.random.default_rng(2)
    base = rng.normal(1.0, 0.05, 200)
    same = rng.normal(1.0, 0.05, 200)
    slower = rng.normal(1.05, 0.05, 200)
    assert stats.slower_than(base, slower)[0]
    assert not stats.slower_than(base, same)[0]
    assert not stats.slower_than(slower, base)[0]


def test_binomial_quantile_equals_scipys_without_importing_it_at_run_time():
    from scipy import stats as scipy_stats

    from batching.measure.stats import binom_half_ppf

    for q in (0.005, 0.025, 0.05):
        for n in (*range(1, 400), 999, 1000, 2501, 5000):
            assert binom_half_ppf(q, n) == int(scipy_stats.binom.ppf(q, n, 0.5)), (q, n)


def test_two_separated_groups_of_samples_are_reported_as_modes():
    rng = np.random.default_rng(0)
    fast = 20e-6 * np.exp(rng.normal(0, 0.03, 300))
    slow = 60e-6 * np.exp(rng.normal(0, 0.03, 100))
    m = stats.modes(rng.permutation(np.concatenate([fast, slow])))
    assert m is not None and len(m) == 2
    assert m[0]["median_s"] == pytest.approx(20e-6, rel=0.03)
    assert m[1]["median_s"] == pytest.approx(60e-6, rel=0.03)
    assert m[0]["share"] == pytest.approx(0.75) and m[1]["share"] == pytest.approx(0.25)
    assert stats.summarize(np.concatenate([fast, slow]))["modes"] == m


def test_one_group_with_a_long_tail_has_no_modes():
    rng = np.random.default_rng(1)
    for _ in range(20):
        tail = 20e-6 * (1 + rng.lognormal(-3, 1, 1000))  # skewed, no second group
        assert stats.modes(tail) is None
    assert stats.modes(20e-6 * np.exp(rng.normal(0, 0.05, 1000))) is None
    assert stats.modes(np.full(3, 1e-3)) is None  # too few samples to tell
