"""The three-limit model fitted to a run's measured latencies, and its knee.

The model has the roofline's form, t(B) = max(overhead, bytes(B)/BW, flops(B)/F). Its
overhead, effective bandwidth and effective FLOP/s are free. They are fitted in log space.
Its knee is the batch size where the compute term overtakes the others. The knee's interval
comes from replicates that draw whole passes (batching.predict.replicates). All replicates
are fitted at once.
"""

import dataclasses
import math
from typing import Any

import numpy as np
from scipy import optimize

from batching.measure import pass_stats, stats
from batching.predict import replicates
from batching.predict.roofline import work

MIN_POINTS_TO_FIT = 4
# A regime the fit assigns points to holds at least this many. One point alone would be
# matched exactly by its own parameter, with no residual. Any last point that rose a little
# would then read as compute-bound.
MIN_REGIME_POINTS = 2


# ---------------------------------------------------------------- the fit


@dataclasses.dataclass(frozen=True)
class LinearCost:
    """flops(B) = f0 + f1·B and bytes(B) = w + a·B, fitted to a run's rows."""

    f0: float
    f1: float
    w: float
    a: float

    @classmethod
    def from_rows(cls, rows: list[dict[str, Any]]) -> "LinearCost":
        """Lines fitted to the rows' FLOPs and bytes (roofline.work) against batch size.

        The intercepts and the byte slope are at least 0. From one row, FLOPs are taken as
        proportional to the batch. The bytes are then fixed.
        """
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
    """Smallest batch size where the compute term reaches the other two terms."""
    return float(knees_of(np.asarray(params, dtype=float)[None, :], cost)[0])


def knees_of(params: np.ndarray, cost: LinearCost) -> np.ndarray:
    """knee_of for each row of `params` (R, 3).

    The knee is inf where compute never overtakes. F may be inf, as no point was
    compute-bound. Or compute may grow no faster than memory.
    """
    o, bw, f = np.exp(params).T
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        over_overhead = (o - cost.f0 / f) / (cost.f1 / f)
        slope = cost.f1 / f - cost.a / bw  # compute outgrows memory by this much per example
        over_memory = (cost.w / bw - cost.f0 / f) / slope
    over_overhead = np.nan_to_num(over_overhead, nan=0.0, posinf=np.inf, neginf=0.0)
    over_memory = np.nan_to_num(over_memory, nan=0.0, posinf=np.inf, neginf=0.0)
    knee = np.maximum(np.maximum(over_overhead, over_memory), 0.0)
    return np.where((slope > 0) & np.isfinite(f), knee, np.inf)


def fit_three_limits(b: np.ndarray, t: np.ndarray, cost: LinearCost) -> np.ndarray:
    """Least squares on log latency: log(overhead, BW, F) for one set of points (fit_many)."""
    params = fit_many(b, t[None, :], cost)[0]
    if _monotone(cost):
        return params
    # The regimes need not follow overhead, memory, compute along the batch. So polish the
    # best ordered split with a local search. max() has flat directions, so it needs a start.
    log_t = np.log(t)
    with np.errstate(divide="ignore"):
        lb, lf = np.log(cost.bytes(b)), np.log(cost.flops(b))

    def loss(p):
        r = np.maximum(np.maximum(p[0], lb - p[1]), lf - p[2]) - log_t
        return float(r @ r)

    start = np.clip(params, -50.0, 50.0)
    polished = optimize.minimize(loss, start, method="Nelder-Mead", options={"xatol": 1e-3})
    return polished.x if polished.fun < loss(params) else params


def _monotone(cost: LinearCost) -> bool:
    """Whether log flops − log bytes never falls with the batch (f1·w >= a·f0).

    The fitted regimes then go overhead, memory, compute in batch order. So fit_many is
    exact.
    """
    return cost.f1 * cost.w >= cost.a * cost.f0


def fit_many(b: np.ndarray, t: np.ndarray, cost: LinearCost) -> np.ndarray:
    """The least-squares fit of log max(o, bytes/BW, flops/F) to each row of log `t`.

    `t` is (R, n) over batch sizes `b` in increasing order. The result is log(o, BW, F) per
    row, (R, 3).

    The fit is exact, with no search. At the optimum every point sits in the regime whose
    term is the max. Each parameter is then the mean over its own points. There its squared
    residuals' gradient vanishes. When the regimes follow batch order (_monotone), the
    groups are contiguous.

    - Overhead holds the points below i.
    - Memory holds the points from i up to j.
    - Compute holds the points from j on.

    Every split (i, j) is tried with its closed-form parameters. The lowest true loss wins.
    A regime with no point keeps its term out of the max. Its o is 0, or its BW or F is inf.
    A regime with points has at least MIN_REGIME_POINTS.
    """
    y = np.log(t)
    with np.errstate(divide="ignore"):
        lb, lf = np.log(cost.bytes(b)), np.log(cost.flops(b))
    n = b.size
    i_, j_ = np.array(
        [(i, j) for i in range(n + 1) for j in range(i, n + 1)
         if all(size == 0 or size >= MIN_REGIME_POINTS for size in (i, j - i, n - j))]
    ).T  # fmt: skip
    # Prefix sums along the points: the mean of any contiguous group at once.
    zero = np.zeros((y.shape[0], 1))
    cy = np.hstack([zero, np.cumsum(y, axis=1)])
    cm = np.hstack([zero, np.cumsum(lb - y, axis=1)])
    cc = np.hstack([zero, np.cumsum(lf - y, axis=1)])
    with np.errstate(divide="ignore", invalid="ignore"):
        p0 = np.where(i_ > 0, cy[:, i_] / np.maximum(i_, 1), -np.inf)
        p1 = np.where(j_ > i_, (cm[:, j_] - cm[:, i_]) / np.maximum(j_ - i_, 1), np.inf)
        p2 = np.where(j_ < n, (cc[:, -1:] - cc[:, j_]) / np.maximum(n - j_, 1), np.inf)
    model = np.maximum(np.maximum(p0[..., None], lb - p1[..., None]), lf - p2[..., None])
    loss = np.sum((model - y[:, None, :]) ** 2, axis=2)  # (R, splits)
    best = np.argmin(loss, axis=1)
    rows = np.arange(y.shape[0])
    return np.stack([p0[rows, best], p1[rows, best], p2[rows, best]], axis=1)


@dataclasses.dataclass(frozen=True)
class KneeFit:
    """A run's three-limit fit.

    - The knee and its bootstrap interval, in batch sizes.
    - The fitted overhead (seconds), bandwidth (bytes/s) and FLOP/s.
    - The fitted latency per batch size (nan without a fit).
    """

    knee_batch_size: float
    knee_low: float
    knee_high: float
    overhead_s: float
    effective_bytes_per_s: float
    effective_flops_per_s: float
    fitted_latency_s: dict[int, float]
    # The interval says little: (nearly) zero width, or the knee at one of its ends. Most
    # replicates then fitted the same boundary value.
    interval_degenerate: bool = False
    # "passes": replicates drew whole passes; "samples": samples within each point's one pass.
    interval_from: str | None = None
    params: tuple[float, ...] | None = None  # log(overhead, BW, F) of the fit
    cost: LinearCost | None = None

    def fitted(self, batch_size: float) -> float:
        """The fitted latency at any batch size (nan without a fit)."""
        if self.params is None:
            return math.nan
        return float(three_limits(np.asarray(self.params), self.cost, np.array([batch_size]))[0])


def fit_knee(
    rows: list[dict[str, Any]],
    samples: dict[int, Any],
    n_bootstrap: int = 2000,
    seed: int = 0,
    draws: replicates.Replicates | None = None,
    scale: dict[int, float] | None = None,
) -> KneeFit:
    """Fits the three-limit model to a run's point latencies and bootstraps the knee's interval.

    `samples` are each point's timing samples, per sweep pass or as one pass. The forms are
    {batch: [pass 0, pass 1, ...]} and {batch: samples}.

    A replicate draws whole passes by pass index (batching.predict.replicates). Every point
    gets the same draw. Each point's latency comes from its drawn passes. It uses the
    estimator that its row's latency came from. The replicate is then fitted like the rows.
    So the estimate and its interval are the same statistic of the same unit. With one pass
    per point, replicates resample the samples within it.

    `draws`, made once for a run's points, are used instead of drawing anew. Each point's
    column is multiplied by `scale[b]`.
    """
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
    sizes = [int(x) for x in b]
    if draws is None:
        draws = replicates.draw(sizes, samples, replicates.estimator_of(rows), n_bootstrap, seed)
    drawn = draws.at(sizes, scale)
    lo = hi = math.nan  # no timing samples kept (rows alone): no interval
    if drawn is not None:
        boot = np.where(np.isnan(drawn), t, drawn)
        lo, hi = percentiles(knees_of(fit_many(b, boot, cost), cost))
    o, bw, f = np.exp(params)
    fitted = three_limits(params, cost, b)
    return KneeFit(
        knee_batch_size=knee,
        knee_low=lo,
        knee_high=hi,
        overhead_s=float(o),
        effective_bytes_per_s=float(bw),
        effective_flops_per_s=float(f),
        fitted_latency_s={int(bi): float(ti) for bi, ti in zip(b, fitted, strict=True)},
        interval_degenerate=_degenerate(knee, lo, hi),
        interval_from=draws.kind,
        params=tuple(float(x) for x in params),
        cost=cost,
    )


def percentiles(values: np.ndarray, confidence: float = stats.CONFIDENCE) -> tuple[float, float]:
    """The (1 − confidence)/2 and (1 + confidence)/2 order statistics of replicate values.

    A value may be inf: a replicate that never turns compute-bound.
    """
    v = np.sort(np.asarray(values, dtype=float))
    tail = (1 - confidence) / 2
    lo = v[int(math.floor(tail * (v.size - 1)))]
    hi = v[int(math.ceil((1 - tail) * (v.size - 1)))]
    return float(lo), float(hi)


def _degenerate(knee: float, lo: float, hi: float) -> bool:
    """Whether an interval says little. That holds in three cases.

    - It has zero width.
    - The estimate is at one of its ends. The replicates piled onto one boundary value.
    - The estimate lies outside it. The fits to single passes then put the knee elsewhere
      than the fit to their pooled medians.
    """
    if not all(math.isfinite(x) for x in (knee, lo, hi)):
        return False
    tol = 1e-3 * max(abs(knee), 1e-12)
    at_an_end = abs(knee - lo) <= tol or abs(knee - hi) <= tol
    return hi - lo <= tol or at_an_end or not lo <= knee <= hi


def free_batching_limit(samples: dict[int, Any], alpha: float = 0.01) -> tuple[int, str]:
    """The free-batching limit, and the test that decided it.

    The limit is the largest batch size not significantly slower than the smallest one.
    Neither is any batch size below it. The test is one of two.

    - "passes" when every point has two passes or more. This is a one-sided paired t on log
      pass medians (pass_stats.slower_between_passes).
    - "samples" otherwise. This is a one-sided Mann-Whitney U on the samples of one pass. It
      holds only what moves between calls.
    """
    passes = {b: p for b, p in replicates.pass_lists(samples).items() if p}
    sizes = sorted(passes)
    by_pass = all(len(p) >= 2 for p in passes.values())
    if by_pass:
        values = {b: np.array([np.median(s) for s in p]) for b, p in passes.items()}
        slower = pass_stats.slower_between_passes
    else:
        values = {b: np.concatenate(p) for b, p in passes.items()}
        slower = stats.slower_than
    limit = sizes[0]
    for size in sizes[1:]:
        if slower(values[sizes[0]], values[size], alpha)[0]:
            break
        limit = size
    return limit, "passes" if by_pass else "samples"
