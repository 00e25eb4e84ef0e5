"""Statistics of timing samples: robust summaries and a distribution-free interval for the median.

Timings on shared machines are skewed and have outliers, so everything here is
based on order statistics rather than on a mean and a standard deviation.
"""

import math

import numpy as np
from scipy import stats as scipy_stats


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
    lo_rank = int(scipy_stats.binom.ppf(alpha / 2, n, 0.5))
    hi_rank = n - lo_rank + 1
    lo_rank = max(lo_rank, 1)
    hi_rank = min(hi_rank, n)
    return float(x[lo_rank - 1]), float(x[hi_rank - 1])


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
    result = scipy_stats.mannwhitneyu(candidate, baseline, alternative="greater")
    return bool(result.pvalue < alpha), float(result.pvalue)
