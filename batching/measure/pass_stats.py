"""A point's latency from its passes: the estimate, its interval, and resampling over passes.

A pass is one visit of a point, at another time than its other visits. Samples inside a
pass are correlated (a slow spell lasts) and only estimate that pass's value, its median;
what moves between passes (a busy neighbour, clocks, the host) is what moves between reruns.
So the pass is the unit: every estimator here weighs each pass's median equally, and every
interval comes from the spread between passes.

Estimators of a point's latency from its pass medians (`timing.estimator`):

- `median`: the median of the pass medians; interval from order statistics (distribution
  free; below six passes [min, max], which covers less than 95%).
- `geomean`: the geometric mean; interval mean ± t·s/√n on log pass medians.
- `trimmed`: the 20% trimmed mean of log pass medians; Tukey-McLaughlin interval (Wilcox,
  "Introduction to Robust Estimation and Hypothesis Testing", §4.4: winsorized standard
  deviation, t with n − 2g − 1 degrees of freedom).

Resampling (the knee, a slope, any statistic of several points) draws whole passes by pass
index, the same draw for every point, so a slow spell that moved every point timed in it
moves them together in the replicates too: a Poisson bootstrap (each pass index weighted by
a Poisson(1) count; Hanley & MacGibbon 2006; Chamandy et al. 2012, "Estimating uncertainty
for massive data streams"), which handles points with different numbers of passes.
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
    """The estimate of pass medians `values` (n,), seconds; with integer `weights` (R, n) one
    estimate per row of weights (R,), each pass counted as often as its weight."""
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
    """The median of each row's weighted values: the mean of the lower and upper weighted
    medians (np.median for unit weights)."""
    order = np.argsort(v)
    v, c = v[order], np.cumsum(w[:, order], axis=1)
    half = c[:, -1:] / 2
    lo = np.argmax(c >= half, axis=1)
    hi = np.argmax(c > half, axis=1)
    return (v[lo] + v[hi]) / 2


def _weighted_trimmed_mean(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Each row's TRIM-trimmed mean, the values repeated by their integer weights: of the W
    repeated values sorted, floor(TRIM·W) are dropped at each end."""
    order = np.argsort(x)
    x, w = x[order], w[:, order]
    total = w.sum(axis=1, keepdims=True)
    g = np.floor(TRIM * total)
    upto = np.cumsum(w, axis=1)
    kept = np.clip(np.minimum(upto, total - g) - np.maximum(upto - w, g), 0, None)
    return (kept @ x) / (total[:, 0] - 2 * g[:, 0])


def interval(values: np.ndarray, method: str, confidence: float) -> tuple[float, float]:
    """The `confidence` interval of the estimate of pass medians `values`, seconds: the
    spread between passes; (nan, nan) with fewer than two passes."""
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
    """A point's latency from its passes: the estimate and its interval (seconds), how the
    interval was made, its half width over the estimate, and the passes' coefficient of
    variation (sample std / mean of the pass medians; nan below two passes)."""

    latency_s: float
    low_s: float
    high_s: float
    method: str
    rel_halfwidth: float
    pass_cv: float


def from_passes(
    pass_samples: list[np.ndarray], method: str, confidence: float = 0.95
) -> PassEstimate:
    """The point's estimate from each pass's samples (seconds). One pass: its median and the
    distribution-free interval of its samples, named as such."""
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


def passes_needed(pass_cv: float, target_rel_ci: float, confidence: float = 0.95) -> float:
    """About how many passes an interval of ±`target_rel_ci` needs at this spread between
    passes: (z·cv / target)², z the normal quantile (the t interval needs a few more)."""
    from statistics import NormalDist

    if not math.isfinite(pass_cv):
        return math.nan
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    return (z * pass_cv / target_rel_ci) ** 2


def with_drift(
    latency_s: float, low_s: float, high_s: float, drift_sd: float, confidence: float = 0.95
) -> tuple[float, float]:
    """The interval [low_s, high_s] around `latency_s` widened by the machine's drift between
    runs (the log standard deviation `drift_sd`, drift.Drift): each side's log half width
    and z·drift_sd added in quadrature, z the normal quantile. A side without an interval
    gets the drift alone."""
    from statistics import NormalDist

    d = NormalDist().inv_cdf(0.5 + confidence / 2) * drift_sd
    below = math.log(latency_s / low_s) if math.isfinite(low_s) and low_s > 0 else 0.0
    above = math.log(high_s / latency_s) if math.isfinite(high_s) and high_s > 0 else 0.0
    return latency_s * math.exp(-math.hypot(below, d)), latency_s * math.exp(math.hypot(above, d))


# ---------------------------------------------------------------- resampling whole passes


def poisson_weights(n_indices: int, replicates: int, seed: int = 0) -> np.ndarray:
    """(replicates, n_indices) Poisson(1) counts: how often each pass index counts in each
    replicate (the same row for every point)."""
    return np.random.default_rng(seed).poisson(1.0, (replicates, n_indices)).astype(np.float64)


def replicate_estimates(
    pass_values: list[np.ndarray], method: str, weights: np.ndarray, seed: int = 0
) -> np.ndarray:
    """(R, points) estimates of each point in each replicate: point j's pass medians
    `pass_values[j]` (pass i at index i) weighted by the replicate's counts for indices
    0..len-1. A replicate that leaves a point none of its passes (all its counts 0, rare
    from a few passes on) draws that point's counts again, from its own passes."""
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
    Pass i of one point is paired with pass i of the other (the same round of the sweep, so
    a slow spell that lasted through it slowed both); points with more passes than the other
    keep the common ones. Returns (significant, p value); not significant below two pairs."""
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
    """Two programs inside passes (stats.modes on each pass's own samples): reported when at
    least half of the passes with enough samples to tell show them, as each mode's median
    over those passes and its mean share. A shift between passes (a pass slower as a whole)
    is no mode: it is the machine, in the row's `pass_cv`."""
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
