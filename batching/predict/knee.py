"""The three-limit model fitted to a run's measured latencies, and its knee.

The same form as the roofline, t(B) = max(overhead, bytes(B)/BW, flops(B)/F), with free
overhead, effective bandwidth and effective FLOP/s, fitted in log space. Its knee is the
batch size where the compute term overtakes the others; its interval comes from a bootstrap
over the timing samples (each point's sweep pass drawn at random).
"""

import dataclasses
import math
from typing import Any

import numpy as np
from scipy import optimize

from batching.measure import stats
from batching.predict.roofline import work

MIN_POINTS_TO_FIT = 4


# ---------------------------------------------------------------- the fit


@dataclasses.dataclass(frozen=True)
class LinearCost:
    """flops(B) = f0 + f1·B and bytes(B) = w + a·B, from a run's analytic rows."""

    f0: float
    f1: float
    w: float
    a: float

    @classmethod
    def from_rows(cls, rows: list[dict[str, Any]]) -> "LinearCost":
        """Lines fitted to the rows' FLOPs and bytes (roofline.work) against batch size, intercepts
        and byte slope at least 0; one row gives FLOPs proportional to the batch, bytes fixed."""
        batch = np.array([r["batch_size"] for r in rows], dtype=float)
        flops, bytes_ = np.array([work(r) for r in rows], dtype=float).T
        if batch.size == 1:
            return cls(0.0, float(flops[0] / batch[0]), float(bytes_[0]), 0.0)
        f1, f0 = np.polyfit(batch, flops, 1)
        a, w = np.polyfit(batch, bytes_, 1)
        return cls(max(float(f0), 0.0), float(f1), max(float(w), 0.0), max(float(a), 0.0))

    def flops(self, b):
        """FLOPs of a call at batch `b`."""
        return self.f0 + self.f1 * b

    def bytes(self, b):
        """Bytes a call moves at batch `b`."""
        return self.w + self.a * b


def three_limits(params: np.ndarray, cost: LinearCost, b: np.ndarray) -> np.ndarray:
    """max(overhead, bytes/BW, flops/F) with params = log(overhead, BW, F)."""
    o, bw, f = np.exp(params)
    return np.maximum(np.maximum(o, cost.bytes(b) / bw), cost.flops(b) / f)


def knee_of(params: np.ndarray, cost: LinearCost) -> float:
    """Smallest batch size where the compute term is at least the overhead and memory terms."""
    o, bw, f = np.exp(params)
    over_overhead = (o - cost.f0 / f) / (cost.f1 / f)
    slope = cost.f1 / f - cost.a / bw  # compute grows faster than memory by this much per example
    if slope <= 0:
        return math.inf
    over_memory = (cost.w / bw - cost.f0 / f) / slope
    return float(max(over_overhead, over_memory, 0.0))


def fit_three_limits(
    b: np.ndarray, t: np.ndarray, cost: LinearCost, start: np.ndarray | None = None
) -> np.ndarray:
    """Least squares on log latency. Without `start`, several starts, because max() has
    flat directions; a bootstrap refit starts from the full fit instead."""
    log_t = np.log(t)
    # log max(o, bytes/BW, flops/F) = max(log o, log bytes − log BW, log flops − log F): the
    # same loss as log(three_limits(p, cost, b)), without exp and log per evaluation (a
    # bootstrap runs hundreds of fits; this is most of a cold start's analysis time).
    with np.errstate(divide="ignore"):
        log_bytes, log_flops = np.log(cost.bytes(b)), np.log(cost.flops(b))

    def loss(p):
        residual = np.maximum(np.maximum(p[0], log_bytes - p[1]), log_flops - p[2]) - log_t
        return float(residual @ residual)

    if start is not None:
        starts = [start]
    else:
        f_guess = cost.flops(b[-1]) / t[-1]
        bw_guess = cost.bytes(b[0]) / t[0]
        starts = [
            np.log([o0, bw_guess * scale, f_guess])
            for o0 in (t.min() * 0.5, t.min())
            for scale in (0.3, 1.0, 3.0)
        ]
    best = None
    for p0 in starts:
        r = optimize.minimize(loss, p0, method="Nelder-Mead", options={"xatol": 1e-3})
        if best is None or r.fun < best.fun:
            best = r
    return best.x


@dataclasses.dataclass(frozen=True)
class KneeFit:
    """A run's three-limit fit: the knee and its bootstrap interval (batch sizes), the fitted
    overhead (seconds), bandwidth (bytes/s) and FLOP/s, and the fitted latency per batch size (nan
    without a fit)."""

    knee_batch_size: float
    knee_low: float
    knee_high: float
    overhead_s: float
    effective_bytes_per_s: float
    effective_flops_per_s: float
    fitted_latency_s: dict[int, float]
    # The interval says little: (nearly) zero width, or the knee at one of its ends (most
    # replicates fitted the same boundary value).
    interval_degenerate: bool = False
    # "passes": replicates drew each point's pass at random; "samples": one pass only.
    interval_from: str | None = None
    params: tuple[float, ...] | None = None  # log(overhead, BW, F) of the fit
    cost: LinearCost | None = None

    def fitted(self, batch_size: float) -> float:
        """The fitted latency at any batch size (nan without a fit)."""
        if self.params is None:
            return math.nan
        return float(three_limits(np.asarray(self.params), self.cost, np.array([batch_size]))[0])


def pass_lists(samples: dict[int, Any]) -> dict[int, list[np.ndarray]]:
    """{batch: [samples of pass 0, of pass 1, ...]} from either that or {batch: samples}."""
    out = {}
    for b, s in samples.items():
        if isinstance(s, np.ndarray) or (len(s) and not hasattr(s[0], "__len__")):
            s = [s]
        out[int(b)] = [np.asarray(p, np.float64) for p in s if len(p)]
    return out


def fit_knee(
    rows: list[dict[str, Any]],
    samples: dict[int, Any],
    n_bootstrap: int = 200,
    seed: int = 0,
) -> KneeFit:
    """Fits the three-limit model to a run's medians and bootstraps the knee's interval.

    `samples` are each point's timing samples, per sweep pass ({batch: [pass 0, pass 1, ...]})
    or pooled ({batch: samples}). A bootstrap replicate takes, for every point, one of its
    passes at random and the median of a resample of that pass's samples, so the interval
    holds what moves between passes (what moves between reruns), not only the spread within
    one; with one pass it is the within-pass bootstrap."""
    rows = sorted(rows, key=lambda r: r["batch_size"])
    b = np.array([r["batch_size"] for r in rows], dtype=float)
    t = np.array([r["latency_s"] for r in rows])
    if b.size < MIN_POINTS_TO_FIT:
        # Three free parameters from fewer points would fit anything: report no knee.
        nan = math.nan
        return KneeFit(nan, nan, nan, nan, nan, nan, {int(bi): nan for bi in b})
    cost = LinearCost.from_rows(rows)
    params = fit_three_limits(b, t, cost)
    knee = knee_of(params, cost)
    passes = pass_lists(samples)
    rng = np.random.default_rng(seed)
    boot_t = np.tile(t, (n_bootstrap, 1))
    for j, bj in enumerate(b):
        runs = passes.get(int(bj)) or []
        if not runs:
            continue
        chosen = rng.integers(0, len(runs), n_bootstrap)
        for k, s in enumerate(runs):
            idx = np.flatnonzero(chosen == k)
            if idx.size:
                draws = s[rng.integers(0, s.size, (idx.size, s.size))]
                boot_t[idx, j] = np.median(draws, axis=1)
    if any(passes.values()):
        knees = [knee_of(fit_three_limits(b, tb, cost, start=params), cost) for tb in boot_t]
        lo, hi = np.percentile(knees, [2.5, 97.5])
    else:
        lo = hi = math.nan  # no timing samples kept (rows alone): no interval
    o, bw, f = np.exp(params)
    fitted = three_limits(params, cost, b)
    several = any(len(p) > 1 for p in passes.values())
    return KneeFit(
        knee_batch_size=knee,
        knee_low=float(lo),
        knee_high=float(hi),
        overhead_s=float(o),
        effective_bytes_per_s=float(bw),
        effective_flops_per_s=float(f),
        fitted_latency_s={int(bi): float(ti) for bi, ti in zip(b, fitted, strict=True)},
        interval_degenerate=_degenerate(knee, float(lo), float(hi)),
        interval_from="passes" if several else "samples",
        params=tuple(float(x) for x in params),
        cost=cost,
    )


def _degenerate(knee: float, lo: float, hi: float) -> bool:
    """An interval that says little: zero width, the estimate at one of its ends (the
    replicates piled onto one boundary value of the fit), or the estimate outside it (the
    fits to single passes put the knee elsewhere than the fit to their pooled medians)."""
    if not all(math.isfinite(x) for x in (knee, lo, hi)):
        return False
    tol = 1e-3 * max(abs(knee), 1e-12)
    at_an_end = abs(knee - lo) <= tol or abs(knee - hi) <= tol
    return hi - lo <= tol or at_an_end or not lo <= knee <= hi


def free_batching_limit(samples: dict[int, Any], alpha: float = 0.01) -> int:
    """Largest batch size such that it and every smaller one are not significantly slower
    than the smallest batch (one-sided Mann-Whitney U on the timing samples, pooled over
    passes)."""
    samples = {b: np.concatenate(p) for b, p in pass_lists(samples).items() if p}
    sizes = sorted(samples)
    base = samples[sizes[0]]
    limit = sizes[0]
    for size in sizes[1:]:
        if stats.slower_than(base, samples[size], alpha)[0]:
            break
        limit = size
    return limit
