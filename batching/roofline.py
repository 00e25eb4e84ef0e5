"""The roofline argument made properly: predict, fit, and name the limit of every point.

Three limits (shared/ANCHORS.md §1): t(B) ≈ max(overhead, bytes(B)/BW, flops(B)/F).

- The a-priori prediction is per op (batching/ops.py): a call is a list of
  kernels, each at its own limit, priced with microbenchmarks of the device.
  This module keeps the whole-program form, max(overhead, bytes/BW, flops/F)
  with the square-matmul peak, as the naive baseline it is compared against.
- The fit uses the measured latencies: the same three-limit form with free
  overhead, effective bandwidth and effective FLOP/s, fitted in log space.
  Its knee is the batch size where the compute term overtakes the others; its
  interval comes from a bootstrap over the timing samples.
"""

import dataclasses
import math
from typing import Any

import numpy as np
from scipy import optimize

from batching import stats

REGIMES = ("overhead", "memory", "compute")
MIN_POINTS_TO_FIT = 4


def work(row: dict[str, Any]) -> tuple[float, float]:
    """A row's FLOPs and bytes: the analytic count, or XLA's where the workload has none."""
    return row["analytic_flops"] or row["flops"], row["analytic_bytes"] or row["bytes_accessed"]


def predict(
    flops: float,
    bytes_moved: float,
    overhead_s: float,
    bandwidth: float,
    compute_s: float,
) -> tuple[float, str]:
    """Predicted latency (s) and which of the three limits sets it."""
    terms = (overhead_s, bytes_moved / bandwidth, compute_s)
    i = int(np.argmax(terms))
    return float(terms[i]), REGIMES[i]


def overhead_time(
    gemm_shapes: list[list[int]] | None, dispatch_floor_s: float, kernel_overhead_s: float
) -> float:
    """Seconds a call costs even with no work: one dispatch plus a launch per kernel.

    The kernels are counted as the call's matrix products (XLA fuses the elementwise
    work around them); a call without known GEMMs counts as one kernel.
    """
    kernels = sum(count for *_, count in gemm_shapes) if gemm_shapes else 1
    return dispatch_floor_s + kernels * kernel_overhead_s


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
        batch = np.array([r["batch_size"] for r in rows], dtype=float)
        flops, bytes_ = np.array([work(r) for r in rows], dtype=float).T
        if batch.size == 1:
            return cls(0.0, float(flops[0] / batch[0]), float(bytes_[0]), 0.0)
        f1, f0 = np.polyfit(batch, flops, 1)
        a, w = np.polyfit(batch, bytes_, 1)
        return cls(max(float(f0), 0.0), float(f1), max(float(w), 0.0), max(float(a), 0.0))

    def flops(self, b):
        return self.f0 + self.f1 * b

    def bytes(self, b):
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

    def loss(p):
        return float(np.sum((np.log(three_limits(p, cost, b)) - log_t) ** 2))

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
    knee_batch_size: float
    knee_low: float
    knee_high: float
    overhead_s: float
    effective_bytes_per_s: float
    effective_flops_per_s: float
    fitted_latency_s: dict[int, float]


def fit_knee(
    rows: list[dict[str, Any]],
    samples: dict[int, np.ndarray],
    n_bootstrap: int = 200,
    seed: int = 0,
) -> KneeFit:
    """Fits the three-limit model to a run's medians and bootstraps the knee over the samples."""
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
    rng = np.random.default_rng(seed)
    # Bootstrap medians: resample each point's timing samples with replacement.
    boot_t = np.tile(t, (n_bootstrap, 1))
    for j, bj in enumerate(b):
        s = samples.get(int(bj))
        if s is not None and len(s):
            s = np.asarray(s)
            boot_t[:, j] = np.median(s[rng.integers(0, s.size, (n_bootstrap, s.size))], axis=1)
    knees = [knee_of(fit_three_limits(b, tb, cost, start=params), cost) for tb in boot_t]
    lo, hi = np.percentile(knees, [2.5, 97.5]) if knees else (knee, knee)
    o, bw, f = np.exp(params)
    fitted = three_limits(params, cost, b)
    return KneeFit(
        knee_batch_size=knee,
        knee_low=float(lo),
        knee_high=float(hi),
        overhead_s=float(o),
        effective_bytes_per_s=float(bw),
        effective_flops_per_s=float(f),
        fitted_latency_s={int(bi): float(ti) for bi, ti in zip(b, fitted, strict=True)},
    )


def free_batching_limit(samples: dict[int, np.ndarray], alpha: float = 0.01) -> int:
    """Largest batch size such that it and every smaller one are not significantly slower
    than the smallest batch (one-sided Mann-Whitney U on the timing samples)."""
    sizes = sorted(samples)
    base = samples[sizes[0]]
    limit = sizes[0]
    for size in sizes[1:]:
        if stats.slower_than(base, samples[size], alpha)[0]:
            break
        limit = size
    return limit
