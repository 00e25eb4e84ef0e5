"""Statistics of timing samples: robust summaries and a distribution-free median interval.

Timings on shared machines are skewed and have outliers. So the summaries here rest on order
statistics, not on a mean and a standard deviation.
"""

import functools
import math

import numpy as np

# The confidence of every interval the lab reports, unless timing.confidence says otherwise.
CONFIDENCE = 0.95


def median_interval(samples: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Distribution-free confidence interval for the median, in seconds.

    The number of samples below the true median is Binomial(n, 1/2). Order statistics x_(j) and
    x_(k) are picked with j and k from that distribution. They bracket the median with at least
    `confidence` probability. That holds whatever the shape of the timing distribution.
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
    """The q-quantile of Binomial(n, 1/2): the smallest k with P(X <= k) >= q.

    It equals scipy's binom.ppf for q in (0, 0.5) and n <= 5000 (tests/test_stats.py). The timer
    asks after every call. So the result is cached per (q, n). A run's start does not import
    scipy.stats, which is slow to import. The CDF sums the pmf from 12 standard deviations below
    the mean. The mass left out there is below 1e-30.
    """
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


def summarize(samples: np.ndarray, confidence: float = CONFIDENCE) -> dict[str, float]:
    """Median, spread and the median's interval for a set of latencies in seconds.

    It also reports two modes where the samples show them (modes()).
    """
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
        # Two clearly separated groups of samples, or None (modes()).
        "modes": modes(x),
    }


def relative_halfwidth(samples: np.ndarray, confidence: float = CONFIDENCE) -> float:
    """Half the width of the median's interval, divided by the median.

    It is inf where the median is not positive or not finite.
    """
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

    Returns (significant, p_value). The free-batching boundary uses it. A batch size is free
    while its latencies are not significantly slower than batch 1's.
    """
    from scipy import stats as scipy_stats  # only the analysis asks; slow to import

    result = scipy_stats.mannwhitneyu(candidate, baseline, alternative="greater")
    return bool(result.pvalue < alpha), float(result.pvalue)


# Two modes are reported only when each holds at least this share of the samples (and
# MIN_MODE_SAMPLES of them), their medians differ by at least MIN_MODE_RATIO, and they are
# separated by at least MIN_SEPARATION robust standard deviations (Ashman's D).
MIN_MODE_SHARE = 0.05
MIN_MODE_SAMPLES = 5
MIN_MODE_RATIO = 1.1
MIN_SEPARATION = 3.0


def modes(samples: np.ndarray) -> list[dict[str, float]] | None:
    """The two modes of a point's latencies, when they fall into two clearly separated groups.

    A program may alternate between two paths. A worker thread may be awake or asleep. Each mode
    is {"median_s", "share"}, in increasing latency. The result is None when the samples are one
    group.

    The split is Otsu's threshold on log latency. That is the cut that maximises the
    between-group variance. The groups count as separate when all of these hold:

    - Ashman's D is at least MIN_SEPARATION. D is |m1 − m2| / sqrt((s1² + s2²) / 2). The m are
      the groups' medians. The s are robust standard deviations, 1.4826 · MAD. Each s is floored
      at 0.5% of the latency. D > 2 is the usual bound for a clean separation of two normal
      components.
    - Both groups pass the share, count and ratio floors above.
    - The samples thin out between the two medians (_has_valley). A long tail is not a mode.

    The median of such a point describes neither group well. So its row shows both.
    """
    x = np.sort(np.log(np.asarray(samples, dtype=np.float64)))
    n = x.size
    lo = max(MIN_MODE_SAMPLES, math.ceil(MIN_MODE_SHARE * n))
    if n < 2 * lo or not np.isfinite(x).all():
        return None
    # Between-group variance for every cut k (group one: x[:k]), from prefix sums.
    k = np.arange(lo, n - lo + 1)
    csum = np.cumsum(x)
    mean1 = csum[k - 1] / k
    mean2 = (csum[-1] - csum[k - 1]) / (n - k)
    between = k * (n - k) * (mean1 - mean2) ** 2
    cut = int(k[np.argmax(between)])
    low, high = x[:cut], x[cut:]
    m1, m2 = float(np.median(low)), float(np.median(high))
    floor = math.log1p(0.005)
    s1 = max(1.4826 * float(np.median(np.abs(low - m1))), floor)
    s2 = max(1.4826 * float(np.median(np.abs(high - m2))), floor)
    separation = (m2 - m1) / math.sqrt((s1**2 + s2**2) / 2)
    if separation < MIN_SEPARATION or m2 - m1 < math.log(MIN_MODE_RATIO):
        return None
    if not _has_valley(x, m1, m2):
        return None
    return [
        {"median_s": math.exp(m1), "share": cut / n},
        {"median_s": math.exp(m2), "share": (n - cut) / n},
    ]


def _has_valley(x_sorted: np.ndarray, m1: float, m2: float) -> bool:
    """Whether the samples thin out between two medians m1 and m2 (log latencies).

    Windows of width w = (m2 − m1) / 8 are counted. Five of them lie between the medians. They
    are centred at m1 + j·w, for j = 2..6. The emptiest of them must hold less than half of a
    window on m1 or on m2, whichever holds less. A single mode with a long tail has no such
    valley. Its spread decays away from it.
    """
    w = (m2 - m1) / 8

    def count(c: float) -> int:
        return int(np.searchsorted(x_sorted, c + w / 2) - np.searchsorted(x_sorted, c - w / 2))

    valley = min(count(m1 + j * (m2 - m1) / 8) for j in range(2, 7))
    return valley < 0.5 * min(count(m1), count(m2))


def mean_interval(
    values: list[float], confidence: float = CONFIDENCE
) -> tuple[float, float, float]:
    """(mean, low, high): the mean of per-seed results and its Student-t interval.

    The interval is mean ± t(confidence, n - 1)·s/√n. s is the sample standard deviation. None
    values are left out. With one value the interval is that value: there is no spread to
    estimate. All three are NaN where there is no value.
    """
    x = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if x.size == 0:
        return float("nan"), float("nan"), float("nan")
    mean = float(np.mean(x))
    if x.size == 1:
        return mean, mean, mean
    from scipy import stats as scipy_stats  # only reports over seeds pay its import

    half = float(scipy_stats.t.ppf(0.5 + confidence / 2, x.size - 1) * np.std(x, ddof=1))
    half /= math.sqrt(x.size)
    return mean, mean - half, mean + half
