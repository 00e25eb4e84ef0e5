"""Statistics of timing samples: robust summaries and a distribution-free interval for the median.

Timings on shared machines are skewed and have outliers, so everything here is
based on order statistics rather than on a mean and a standard deviation.
"""

import functools
import math

import numpy as np


def median_interval(samples: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """Distribution-free confidence interval for the median (seconds in, seconds out).

    The number of samples below the true median is Binomial(n, 1/2), so the
    order statistics x_(j) and x_(k) with j, k taken from that distribution
    bracket the median with at least `confidence` probability, whatever the
    shape of the timing distribution.
    """
    x = np.sort(np.asarray(samples, dtype=np.float64))
    n = x.size
    if n == 0:
        raise ValueError("median_interval needs at least one sample")
    alpha = 1.0 - confidence
    # Largest j with P(Bin(n, 1/2) < j) <= alpha/2 gives the 1-based lower rank.
    lo_rank = binom_half_ppf(alpha / 2, n)
    hi_rank = n - lo_rank + 1
    lo_rank = max(lo_rank, 1)
    hi_rank = min(hi_rank, n)
    return float(x[lo_rank - 1]), float(x[hi_rank - 1])


@functools.lru_cache(maxsize=8192)
def binom_half_ppf(q: float, n: int) -> int:
    """The q-quantile of Binomial(n, 1/2): the smallest k with P(X <= k) >= q (scipy's
    binom.ppf, equal to it for q in (0, 0.5) and n <= 5000: tests/test_stats.py). The timer
    asks after every call, so it is cached per n and leaves scipy.stats (0.8 s to import)
    out of a run's start. The CDF sums the pmf from 12 standard deviations below the mean,
    where the mass left out is below 1e-30."""
    first = max(0, math.floor(n / 2 - 6 * math.sqrt(n)))
    pmf = math.exp(
        math.lgamma(n + 1) - math.lgamma(first + 1) - math.lgamma(n - first + 1) - n * math.log(2)
    )
    cumulative = 0.0
    for k in range(first, n + 1):
        cumulative += pmf
        if cumulative >= q * (1 - 1e-12):
            return k
        pmf *= (n - k) / (k + 1)
    return n


def summarize(samples: np.ndarray, confidence: float = 0.95) -> dict[str, float]:
    """Median, spread and the median's interval for a set of latencies in seconds."""
    x = np.asarray(samples, dtype=np.float64)
    p10, p25, p50, p75, p90 = np.percentile(x, [10, 25, 50, 75, 90])
    lo, hi = median_interval(x, confidence)
    return {
        "latency_s": float(p50),
        "latency_p10_s": float(p10),
        "latency_p90_s": float(p90),
        "latency_min_s": float(x.min()),
        "latency_iqr_s": float(p75 - p25),
        "latency_ci_low_s": lo,
        "latency_ci_high_s": hi,
        "n_runs": int(x.size),
    }


def relative_halfwidth(samples: np.ndarray, confidence: float = 0.95) -> float:
    """Half the width of the median's interval divided by the median (inf if undefined)."""
    x = np.asarray(samples, dtype=np.float64)
    lo, hi = median_interval(x, confidence)
    med = float(np.median(x))
    if med <= 0 or not math.isfinite(med):
        return math.inf
    return (hi - lo) / (2.0 * med)


def slower_than(
    baseline: np.ndarray, candidate: np.ndarray, alpha: float = 0.01
) -> tuple[bool, float]:
    """One-sided Mann-Whitney U test: is `candidate` stochastically slower than `baseline`?

    Returns (significant, p_value). Used for the free-batching boundary: a batch
    size is free while its latencies are not significantly slower than batch 1's.
    """
    from scipy import stats as scipy_stats  # only the analysis asks; slow to import

    result = scipy_stats.mannwhitneyu(candidate, baseline, alternative="greater")
    return bool(result.pvalue < alpha), float(result.pvalue)
