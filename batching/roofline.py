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
from collections.abc import Callable
from typing import Any

import numpy as np
from scipy import optimize

from batching import collectives as collectives_lib
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


def comm_time(
    collectives: list[dict[str, Any]] | None,
    bandwidth: float | Callable[[dict[str, Any]], float],
) -> float:
    """Seconds a call spends in its collectives, one after another (none overlap compute).

    Each collective sends bytes·count·factor per device (batching.collectives.bus_factor:
    2(n−1)/n for an all-reduce, (n−1)/n for an all-to-all or all-gather) at `bandwidth`
    bytes/s per device and direction: a spec's interconnect_bytes_per_s, or, called with the
    collective's dict, a bus bandwidth measured on this mesh (batching.collectives).
    """
    if not collectives:
        return 0.0
    bw_of = bandwidth if callable(bandwidth) else (lambda c: bandwidth)
    return float(sum(collectives_lib.wire_bytes(c) / bw_of(c) for c in collectives))


def per_device_work(row: dict[str, Any]) -> dict[str, Any]:
    """The row with its analytic work as one device of its mesh does it; the row itself on
    one device. The split is the row's `parallel_shape` (axes holding only replicas count 1;
    `mesh_shape` for rows written without it). How the global call's work is split (rows
    carry the global call's cost):

    - data (DP): every device holds all the weights and 1/data of the batch: weight bytes
      whole, the rest (activations, KV cache) and the FLOPs over data; the same as the cost
      at per_device_batch_size, since the cost is linear in the batch.
    - model (TP): heads, kv heads and the MLP hidden dim split over model: weights, FLOPs,
      KV cache all over model (embedding and unembedding, replicated, are taken as split too:
      an approximation that errs towards a faster device).
    - expert (EP): experts split over expert, tokens over data·expert (GShard); the step
      waits for the most-loaded device, so the FLOPs are the mean device's times
      device_max_mean_load (ANCHORS §5; 1 when the row has no loads).

    Ops (batching.ops, as dicts) are split the same way one by one (per_device_op). GEMM
    shapes lose the split of their token dim (m over data·expert) and of their output
    dim (n over model, the same FLOPs whichever dim Megatron splits); attention shapes their
    batch over data·expert and kv heads over model. XLA's flops and bytes_accessed of an SPMD
    program are per device already and are left as they are.
    """
    mesh = row.get("parallel_shape") or row.get("mesh_shape") or {}
    d, e, m = (int(mesh.get(a) or 1) for a in ("data", "expert", "model"))
    if d * e * m == 1:
        return row
    load = float(row.get("device_max_mean_load") or 1.0) if e > 1 else 1.0
    out = dict(row)
    if row.get("analytic_flops") is not None:
        out["analytic_flops"] = row["analytic_flops"] / (d * e * m) * load
    if row.get("analytic_bytes") is not None:
        weights = row.get("weight_bytes") or 0.0
        rest = max(row["analytic_bytes"] - weights, 0.0)
        out["weight_bytes"] = weights / (e * m)
        out["analytic_bytes"] = weights / (e * m) + rest / (d * e * m)
    if row.get("gemm_shapes"):
        out["gemm_shapes"] = [
            [max(1, -(-mm // (d * e))), k, max(1, -(-n // m)), count]
            for mm, k, n, count in row["gemm_shapes"]
        ]
    if row.get("ops"):
        out["ops"] = [per_device_op(o, d * e, m, e * m, load) for o in row["ops"]]
    if row.get("attention_shapes"):
        out["attention_shapes"] = [
            {
                **s,
                "batch": max(1, -(-s["batch"] // (d * e))),
                "kv_heads": max(1, -(-s["kv_heads"] // m)),
            }
            for s in row["attention_shapes"]
        ]
    return out


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
    """An interval that says little: zero width, or the estimate at one of its ends (the
    replicates piled onto one boundary value of the fit)."""
    if not all(math.isfinite(x) for x in (knee, lo, hi)):
        return False
    tol = 1e-3 * max(abs(knee), 1e-12)
    return hi - lo <= tol or abs(knee - lo) <= tol or abs(knee - hi) <= tol


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


def per_device_op(
    op: dict[str, Any], tokens: int, model: int, weight_split: int, load: float
) -> dict[str, Any]:
    """One op (batching.ops.Op as a dict) as one device of the mesh runs it, split as
    per_device_work splits the whole call: its token or batch dim over `tokens` (data·expert),
    its output features or kv heads over `model`, FLOPs over both (times the slowest expert
    device's `load`), weight bytes over `weight_split` (expert·model) and the rest of its bytes
    over tokens·model. The shape only picks the microbenchmark the op is priced at.
    """
    if tokens * model * weight_split == 1:
        return op
    shape = list(op["shape"])

    def split(i: int, n: int) -> None:
        if -len(shape) <= i < len(shape) and n > 1:
            shape[i] = max(1, -(-shape[i] // n))

    kind = op["kind"]
    if kind in ("gemm", "moe_dispatch_combine") and len(shape) in (3, 4):
        split(-3, tokens)  # m: the tokens
        split(-1, model)  # n: output features (Megatron splits one of k, n; the FLOPs agree)
    elif kind == "attention" and len(shape) == 5:
        split(0, tokens)
        split(1, model)
    elif shape:
        split(0, tokens)
    weights = op.get("weight_bytes") or 0.0
    rest = max(op["bytes"] - weights, 0.0)
    return {
        **op,
        "shape": shape,
        "flops": op["flops"] / (tokens * model) * load,
        "bytes": weights / weight_split + rest / (tokens * model),
        "weight_bytes": weights / weight_split,
    }
