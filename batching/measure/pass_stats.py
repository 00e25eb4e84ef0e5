"""A point's latency from its passes: the estimate, its interval, and resampling over passes.

A pass is one visit of a point, at another time than its other visits. Samples inside a pass are
correlated, because a slow spell lasts. They only estimate that pass's value, its median. What
moves between passes also moves between reruns: a busy neighbour, clocks, the host. So the pass
is the unit. Every estimator here weighs each pass's median equally. Every interval comes from
the spread between passes.

Estimators of a point's latency from its pass medians (`timing.estimator`):

- `median`: the median of the pass medians. Its interval comes from order statistics. That is
  distribution free. Below six passes it is [min, max], which covers less than 95%.
- `geomean`: the geometric mean. Its interval is mean ± t·s/√n on log pass medians.
- `trimmed`: the 20% trimmed mean of log pass medians. Its interval is Tukey-McLaughlin's
  (Wilcox, "Introduction to Robust Estimation and Hypothesis Testing", §4.4). It uses the
  winsorized standard deviation. Its t has n − 2g − 1 degrees of freedom.

Resampling draws whole passes by pass index. It serves the knee, a slope, or any statistic of
several points. Every point gets the same draw. A slow spell moved every point timed in it.
Those points then move together in the replicates too. The scheme is a Poisson bootstrap. Each
pass index is weighted by a Poisson(1) count (Hanley & MacGibbon 2006; Chamandy et al. 2012,
"Estimating uncertainty for massive data streams"). It handles points with different numbers of
passes.
"""

import dataclasses
import math

import numpy as np

from batching.measure import stats

ESTIMATORS = ("median", "geomean", "trimmed")
TRIM = 0.2  # the trimmed mean drops this share of pass medians at each end
# Below this many passes the median's order-statistic interval cannot reach 95%.
MIN_PASSES_FOR_ORDER_INTERVAL = 6


def _t_quantile(q: float, df: float) -> float:
    from scipy import special  # imported on first use: a run's start does not pay for it

    return float(special.stdtrit(df, q))


def estimate(values: np.ndarray, method: str, weights: np.ndarray | None = None):
    """The estimate of pass medians `values` (n,), in seconds.

    With integer `weights` (R, n) it returns one estimate per row (R,). Each pass then counts as
    often as its weight.
    """
    v = np.asarray(values, dtype=np.float64)
    w = np.ones((1, v.size)) if weights is None else np.asarray(weights, dtype=np.float64)
    if method == "geomean":
        out = np.exp(w @ np.log(v) / w.sum(axis=1))
    elif method == "median":
        out = _weighted_median(v, w)
    elif method == "trimmed":
        out = np.exp(_weighted_trimmed_mean(np.log(v), w))
    else:
        raise ValueError(f"timing.estimator must be one of {ESTIMATORS}, got {method!r}")
    return float(out[0]) if weights is None else out


def _weighted_median(v: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Each row's weighted median of `v`.

    It is the mean of the lower and upper weighted medians. With unit weights it is np.median.
    """
    order = np.argsort(v)
    v, c = v[order], np.cumsum(w[:, order], axis=1)
    half = c[:, -1:] / 2
    lo = np.argmax(c >= half, axis=1)
    hi = np.argmax(c > half, axis=1)
    return (v[lo] + v[hi]) / 2


def _weighted_trimmed_mean(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Each row's TRIM-trimmed mean, each value repeated by its integer weight.

    The W repeated values are sorted. floor(TRIM·W) of them are dropped at each end.
    """
    order = np.argsort(x)
    x, w = x[order], w[:, order]
    total = w.sum(axis=1, keepdims=True)
    g = np.floor(TRIM * total)
    upto = np.cumsum(w, axis=1)
    kept = np.clip(np.minimum(upto, total - g) - np.maximum(upto - w, g), 0, None)
    return (kept @ x) / (total[:, 0] - 2 * g[:, 0])


def interval(values: np.ndarray, method: str, confidence: float) -> tuple[float, float]:
    """The `confidence` interval of the estimate of pass medians `values`, in seconds.

    It comes from the spread between passes. It is (nan, nan) with fewer than two passes.
    """
    v = np.asarray(values, dtype=np.float64)
    n = v.size
    if n < 2:
        return math.nan, math.nan
    if method == "median":
        return stats.median_interval(v, confidence)
    x = np.log(v)
    q = 0.5 + confidence / 2
    if method == "geomean":
        half = _t_quantile(q, n - 1) * float(np.std(x, ddof=1)) / math.sqrt(n)
        centre = float(np.mean(x))
    elif method == "trimmed":
        g = int(math.floor(TRIM * n))
        xs = np.sort(x)
        winsorized = np.clip(xs, xs[g], xs[n - 1 - g])
        se = float(np.std(winsorized, ddof=1)) / ((1 - 2 * g / n) * math.sqrt(n))
        half = _t_quantile(q, n - 2 * g - 1) * se
        centre = float(np.log(estimate(v, "trimmed")))
    else:
        raise ValueError(f"timing.estimator must be one of {ESTIMATORS}, got {method!r}")
    return math.exp(centre - half), math.exp(centre + half)


def interval_name(method: str, n_passes: int) -> str:
    """How a row's interval was made, in words (the row's `interval_method`)."""
    if n_passes < 2:
        return "within one pass: order statistics of its samples (no spread between passes)"
    return {
        "median": "order statistics of the pass medians",
        "geomean": "t on log pass medians",
        "trimmed": "Tukey-McLaughlin on log pass medians (20% trimmed)",
    }[method] + f" ({n_passes} passes)"


@dataclasses.dataclass(frozen=True)
class PassEstimate:
    """A point's latency from its passes.

    - `latency_s`: the estimate, in seconds.
    - `low_s`, `high_s`: its interval, in seconds.
    - `method`: how the interval was made, in words.
    - `rel_halfwidth`: the interval's half width over the estimate.
    - `pass_cv`: the pass medians' coefficient of variation (sample std / mean). It is nan below
      two passes.
    """

    latency_s: float
    low_s: float
    high_s: float
    method: str
    rel_halfwidth: float
    pass_cv: float


def from_passes(
    pass_samples: list[np.ndarray], method: str, confidence: float = stats.CONFIDENCE
) -> PassEstimate:
    """The point's estimate from each pass's samples, in seconds.

    With one pass it is that pass's median. Its interval is then the distribution-free interval
    of that pass's samples. `method` says so.
    """
    medians = np.array([np.median(s) for s in pass_samples])
    n = medians.size
    if n == 1:
        latency = float(medians[0])
        lo, hi = stats.median_interval(pass_samples[0], confidence)
        cv = math.nan
    else:
        latency = estimate(medians, method)
        lo, hi = interval(medians, method, confidence)
        cv = float(np.std(medians, ddof=1) / np.mean(medians))
    half = (hi - lo) / (2 * latency) if latency > 0 else math.inf
    return PassEstimate(latency, lo, hi, interval_name(method, n), half, cv)


def passes_needed(
    pass_cv: float, target_rel_ci: float, confidence: float = stats.CONFIDENCE
) -> float:
    """About how many passes an interval of ±`target_rel_ci` needs at this spread.

    It is (z·cv / target)², z the normal quantile. The t interval needs a few more. It is nan
    when `pass_cv` is not finite.
    """
    from statistics import NormalDist

    if not math.isfinite(pass_cv):
        return math.nan
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    return (z * pass_cv / target_rel_ci) ** 2


def with_drift(
    latency_s: float,
    low_s: float,
    high_s: float,
    drift_sd: float,
    confidence: float = stats.CONFIDENCE,
) -> tuple[float, float]:
    """Widens the interval [low_s, high_s] around `latency_s` by the machine's drift.

    `drift_sd` is the drift's log standard deviation (drift.Drift). z is the normal quantile. On
    each side, the log half width and z·drift_sd add in quadrature. A side without an interval
    gets the drift alone. Returns the new (low, high), in seconds.
    """
    from statistics import NormalDist

    d = NormalDist().inv_cdf(0.5 + confidence / 2) * drift_sd
    below = math.log(latency_s / low_s) if math.isfinite(low_s) and low_s > 0 else 0.0
    above = math.log(high_s / latency_s) if math.isfinite(high_s) and high_s > 0 else 0.0
    return latency_s * math.exp(-math.hypot(below, d)), latency_s * math.exp(math.hypot(above, d))


# ---------------------------------------------------------------- resampling whole passes


def poisson_weights(n_indices: int, replicates: int, seed: int = 0) -> np.ndarray:
    """Poisson(1) counts, (replicates, n_indices).

    Each says how often a pass index counts in a replicate. The same row serves every point.
    """
    return np.random.default_rng(seed).poisson(1.0, (replicates, n_indices)).astype(np.float64)


def replicate_estimates(
    pass_values: list[np.ndarray], method: str, weights: np.ndarray, seed: int = 0
) -> np.ndarray:
    """Estimates of each point in each replicate, (R, points).

    Point j's pass medians are `pass_values[j]`, with pass i at index i. The replicate's counts
    for indices 0..len-1 weigh them. A replicate may leave a point none of its passes: all its
    counts are 0. That is rare from a few passes on. The point's counts are then drawn again,
    from its own passes.
    """
    rng = np.random.default_rng(seed + 1)
    out = np.empty((weights.shape[0], len(pass_values)))
    for j, v in enumerate(pass_values):
        w = weights[:, : v.size].copy()
        empty = w.sum(axis=1) == 0
        while empty.any():
            w[empty] = rng.poisson(1.0, (int(empty.sum()), v.size))
            empty = w.sum(axis=1) == 0
        out[:, j] = estimate(v, method, w)
    return out


# ---------------------------------------------------------------- tests over passes


def slower_between_passes(
    baseline: np.ndarray, candidate: np.ndarray, alpha: float = 0.01
) -> tuple[bool, float]:
    """One-sided paired t test on log pass medians: is `candidate` slower than `baseline`?

    Pass i of one point pairs with pass i of the other. Both ran in the same round of the sweep.
    So a slow spell that lasted through the round slowed both. If one point has more passes,
    only the common ones count. Returns (significant, p value). Below two pairs it is not
    significant.
    """
    n = min(len(baseline), len(candidate))
    if n < 2:
        return False, math.nan
    d = np.log(np.asarray(candidate[:n], float)) - np.log(np.asarray(baseline[:n], float))
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    if sd == 0:
        return mean > 0, 0.0 if mean > 0 else 1.0
    from scipy import special

    p = float(special.stdtr(n - 1, -mean / (sd / math.sqrt(n))))
    return p < alpha, p


def modes_within_passes(pass_samples: list[np.ndarray]) -> list[dict[str, float]] | None:
    """Two programs inside passes, from stats.modes on each pass's own samples.

    Only passes with enough samples to tell take part. The modes are reported when at least half
    of those passes show them. Each mode is its median over those passes and its mean share.
    Otherwise the result is None. A shift between passes is no mode. A pass slower as a whole is
    the machine: the row's `pass_cv` shows it.
    """
    enough = [s for s in pass_samples if len(s) >= 2 * stats.MIN_MODE_SAMPLES]
    found = [m for m in (stats.modes(s) for s in enough) if m is not None]
    if not found or 2 * len(found) < len(enough):
        return None
    return [
        {
            "median_s": float(np.median([m[i]["median_s"] for m in found])),
            "share": float(np.mean([m[i]["share"] for m in found])),
        }
        for i in (0, 1)
    ]
