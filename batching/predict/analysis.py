"""Roofline analysis of a finished sweep: per-row predictions and fits, per-run summaries.

It reads rows and samples. A rate source (batching.measure.rates.RateSource) is handed in.
It gives the device's peaks and per-shape rates. It measures every shape the predictions
need, once and up front. It may also read them from a cache or a file.

Each row gains these fields.

- `predicted_latency_s`: the a-priori prediction.
- `regime`: the limit the point is at.
- `fitted_latency_s`: the three-limit fit at the point.
- The cost check: XLA's counts against the analytic ones.

Each run's summary gains the roofline fields of batching.predict.run_fields.

On a mesh the prediction has two summands. The first is the single-device prediction. It
prices one device's share of the work (roofline.per_device_work). The second is the call's
collectives at the mesh's measured bus bandwidth. roofline.comm_time prices them, using
batching.workloads.collectives. The row keeps that term as `predicted_comm_s`.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from batching import rows as rows_lib
from batching.measure import pass_stats, stats
from batching.predict import knee, mesh, pricing, replicates, roofline, run_fields
from batching.predict.device import DeviceModel
from batching.workloads import ops as ops_lib


def _ratio(xla: float | None, analytic: float | None) -> float | None:
    if xla is None or not analytic:
        return None
    return xla / analytic


def analyze_run(
    rows: list[dict[str, Any]],
    samples: dict[int, Any],
    device: jax.Device,
    roofline_cfg: Any,
    peak_source: Any,
    attend: Callable[..., Any] | None = None,
    confidence: float = stats.CONFIDENCE,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Returns (rows with roofline fields, the run's roofline summary fields).

    - `samples`: each point's timing samples per pass, {batch: [pass 0, pass 1, ...]}.
    - `peak_source`: a batching.measure.rates.RateSource.
    - `attend`: the workload's attention over its KV cache (its module's ATTEND). Rows that
      carry attention shapes need it.

    The rate source may know the machine's drift between runs. Each row's interval is then
    widened by it (drift_fields).
    """
    rows = sorted(rows, key=lambda r: r["batch_size"])
    # One device's share of each call (the rows themselves on a single device).
    device_rows = [roofline.per_device_work(r) for r in rows]
    model = device_model(rows, device_rows, device, roofline_cfg, peak_source, attend)
    peak_source.freeze()  # everything this run measures, it measured for its device model
    drift = peak_source.machine_drift(device, model.dtype, model.precision)
    rows = [rows_lib.extend(r, **drift_fields(r, drift, confidence)) for r in rows]
    # The knee is fitted on the converged points; the others are drawn and predicted. If too
    # few converged, it is fitted on every point, and the knee says so. Its interval, drawn
    # from whole passes, carries the noise.
    converged = [r for r in rows if r.get("converged", True)]
    fitted = converged if len(converged) >= knee.MIN_POINTS_TO_FIT else rows
    # One set of replicates (whole passes drawn) for every statistic of several points.
    draws = replicates.draw(
        [r["batch_size"] for r in rows], samples, replicates.estimator_of(rows),
        roofline_cfg.bootstrap,
    )  # fmt: skip
    fit = knee.fit_knee(fitted, samples, draws=draws)
    out, not_measured = predicted_rows(rows, device_rows, model, fit, peak_source, roofline_cfg)
    summary = {
        **run_fields.roof_fields(out, model, peak_source, not_measured),
        **run_fields.knee_fields(out, samples, fit, fitted, model, roofline_cfg, draws),
        "points_converged": len(converged),
        **run_fields.error_fields(out),
        "shape_aware": bool(roofline_cfg.shape_aware),
        # How the calls were timed (timing.cache; warm if the row lacks it), so how priced.
        "cache_state": rows[0].get("cache_state") or "warm",
        "cold_weights": bool(model.cold),
        "machine_drift_sd": drift.sd if drift else rows[0].get("machine_drift_sd"),
        "machine_drift_readings": drift.readings if drift else None,
        "machine_drift_span_s": drift.span_s if drift else None,
        **run_fields.spec_fields(out, model, roofline_cfg),
        "breakdown": run_fields.breakdown(out),
        "traced_breakdown": run_fields.traced_breakdown(out),
        **mesh.mesh_summary(
            out, roofline.mesh_shape_of(rows[0]), device, model.comm_source, peak_source
        ),
    }
    # Each data replica batches on its own. A device turns compute-bound at B* of its own
    # share, so the global batch does at B* x data. The model and expert axes share one
    # replica's batch, so they do not multiply it.
    split = roofline.mesh_shape_of(rows[0], "parallel_shape")
    for key in ("predicted_critical_batch", "spec_critical_batch"):
        per_device = summary[key]
        summary[f"{key}_global"] = per_device * split["data"] if per_device else None
    summary["num_devices"] = int(np.prod(list(roofline.mesh_shape_of(rows[0]).values())))
    summary["parallel_shape"] = split
    return out, summary


def drift_fields(r: dict[str, Any], drift: Any, confidence: float) -> dict[str, Any]:
    """A row's interval as a rerun would see it.

    The passes' interval (`pass_ci_*`) is widened by the machine's drift between runs.
    pass_stats.with_drift does the widening. The drift is this analysis's, else the one
    stored on the row. So rows measured elsewhere keep their own machine's drift. A row
    without a passes' interval keeps its interval.
    """
    if r.get("pass_ci_low_s") is None:
        return {}
    sd = drift.sd if drift is not None else r.get("machine_drift_sd")
    low, high = r["pass_ci_low_s"], r["pass_ci_high_s"]
    if sd:
        low, high = pass_stats.with_drift(r["latency_s"], low, high, sd, confidence)
    return {"latency_ci_low_s": low, "latency_ci_high_s": high, "machine_drift_sd": sd}


# Weights stay warm between calls only while they fill at most this share of the last-level
# cache. The activations get the same share (pricing). The share is measured, not derived:
# - the activations and other ops' data share the cache;
# - a library GEMM kernel may work on a packed copy of its weights (XLA:CPU's YNNPACK fusion
#   from 2 rows up);
# - an AMD L3 holds what the cores' L2s evict.
# The sweeps behind it are in experiments/results/cpu-2core-epyc/README.md (Warm and cold
# weights).
WARM_WEIGHTS_SHARE = 0.5


def weights_cold(weight_bytes: float | None, llc_bytes: float, cache_state: str = "warm") -> bool:
    """Whether a call's weights come from DRAM on every call.

    They do when the cache was evicted before each call (timing.cache = "cold"). Else they
    do when they fill over WARM_WEIGHTS_SHARE of the last-level cache.
    """
    return cache_state == "cold" or (weight_bytes or 0) > WARM_WEIGHTS_SHARE * llc_bytes


def device_model(
    rows: list[dict[str, Any]],
    device_rows: list[dict[str, Any]],
    device: Any,
    roofline_cfg: Any,
    peak_source: Any,
    attend: Callable[..., Any] | None,
) -> DeviceModel:
    """The run's peaks and per-op rates.

    First every shape the run needs is measured, within the budget. The sweep's ends come
    first. Then the compute roof is set to the dtype's best measured rate (compute_ceiling).
    The rates get that roof as their peak.
    """
    dtype = rows[0]["dtype"] or "float32"
    precision = rows[0].get("matmul_precision", "default")
    measured = peak_source.peaks(device, dtype, precision)
    square_f = measured.matmul(dtype, precision)
    bw = measured.bandwidth_bytes_per_s
    llc = measured.details.get("last_level_cache_bytes") or peak_source.last_level_cache(device)
    # Weights that do not stay in the last-level cache stream from DRAM on every call: time
    # the GEMMs the same way, or small batches look faster than they can be.
    cold = weights_cold(
        device_rows[0].get("weight_bytes"), llc, rows[0].get("cache_state") or "warm"
    )
    shape_aware = roofline_cfg.shape_aware
    attention = peak_source.attention(device, attend, precision) if shape_aware and attend else None
    rates = pricing.Rates(
        dram_bytes_per_s=bw,
        cache_bytes_per_s=measured.cache_bandwidth_bytes_per_s or bw,
        cache_bytes=float(llc),
        peak_flops_per_s=square_f,
        dispatch_floor_s=measured.dispatch_floor_s,
        kernel_overhead_s=measured.kernel_overhead_s,
        # Weights that fit the last-level cache stay there between timed calls.
        weights_warm=not cold,
        gemm=peak_source.gemm(device, dtype, cold, precision) if shape_aware else None,
        conv=peak_source.conv(device, dtype, precision) if shape_aware else None,
        ragged=peak_source.ragged(device, dtype, cold, precision) if shape_aware else None,
        # What a call pays once for handing a small op to XLA:CPU's worker threads. A GPU or
        # TPU has no such hand-off, so the lone calls are not measured there.
        lone=(
            peak_source.lone(device, dtype, precision)
            if shape_aware and device.platform == "cpu"
            else None
        ),
        attention=(lambda op: attention(ops_lib.attention_shapes([op])[0])) if attention else None,
    )
    # Measure every shape the predictions ask for: the sweep's ends, then the middles. What a
    # bounded budget cannot measure then lies between measured shapes. With expert
    # parallelism, also each point at the mean load (predicted_balanced_latency_s).
    expert_parallel = roofline.mesh_shape_of(rows[0], "parallel_shape")["expert"] > 1
    for i in spread_order(len(device_rows)):
        for listed in (roofline.row_ops(device_rows[i]), roofline.program_ops(device_rows[i])):
            pricing.predict_call(listed, rates)
        if expert_parallel and rows[i].get("device_max_mean_load"):
            balanced = roofline.per_device_work({**rows[i], "device_max_mean_load": 1.0})
            pricing.predict_call(roofline.row_ops(balanced), rates)
    peak_f, source = compute_ceiling(
        square_f, peak_source.best_rate(device, dtype, precision, CEILING_MIN_FLOPS), device_rows
    )
    comm_bw, comm_source = mesh.comm_bandwidth(rows, device, peak_source)
    return DeviceModel(
        device, dtype, precision, measured, dataclasses.replace(rates, peak_flops_per_s=peak_f),
        peak_f, source, square_f, bw, llc, cold, comm_bw, comm_source,
    )  # fmt: skip


# Measurements of less work than this (FLOPs per kernel) do not set the compute roof. Their
# rate rests on subtracting a call's fixed costs, which a small kernel does not dwarf.
CEILING_MIN_FLOPS = 1e8


def compute_ceiling(
    square_f: float, best_measured: tuple[float, str] | None, device_rows: list[dict[str, Any]]
) -> tuple[float, str]:
    """The compute roof: the best FLOP rate measured on this device in the dtype.

    So no row or op sits above the roof. The candidates are these.

    - The square-matmul microbenchmark.
    - The best per-shape GEMM or conv rate with at least CEILING_MIN_FLOPS per kernel. The
      rate source gives it as `best_measured`.
    - The run's own points with at least that much work per call (one device's share).

    Returns (FLOP/s, what set it).
    """
    best, source = square_f, "square-matmul microbenchmark"
    if best_measured is not None and best_measured[0] > best:
        best, source = best_measured
    for r in device_rows:
        flops = r.get("analytic_flops") or 0.0
        # predict_model's points are not timed: they set no ceiling
        if flops >= CEILING_MIN_FLOPS and r.get("latency_s") and flops / r["latency_s"] > best:
            best, source = flops / r["latency_s"], f"measured point batch {r['batch_size']}"
    return best, source


def predicted_rows(
    rows: list[dict[str, Any]],
    device_rows: list[dict[str, Any]],
    model: DeviceModel,
    fit: knee.KneeFit,
    peak_source: Any,
    roofline_cfg: Any,
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Each row with its prediction, regime, roof fractions, fit and cost check.

    Also returns every per-shape rate the run could not measure.
    """
    split = roofline.mesh_shape_of(rows[0], "parallel_shape")
    out, not_measured = [], {}
    for r, rd in zip(rows, device_rows, strict=True):
        peak_source.unmeasured = {}
        call = predict_device(rd, model)
        not_measured.update(peak_source.unmeasured)
        # The interconnect: the call's collectives, after (not overlapping) its compute.
        comm_s = roofline.comm_time(r.get("collectives"), model.comm_bw) if model.comm_bw else 0.0
        extra = {}
        if split["expert"] > 1 and r.get("device_max_mean_load"):
            # What the slowest device costs: the same call with every device at the mean load.
            mean_load = roofline.per_device_work({**r, "device_max_mean_load": 1.0})
            extra["predicted_balanced_latency_s"] = (
                predict_device(mean_load, model).seconds + comm_s
            )
        if rd.get("program_ops"):
            # The same call priced from its compiled program's ops, beside the hand list.
            program = predict_device(rd, model, roofline.program_ops(rd))
            extra["program_predicted_latency_s"] = program.seconds + comm_s
            extra["program_predicted_by_kind"] = program.by_kind()
        fields = {
            "predicted_latency_s": call.seconds + comm_s,
            "predicted_overhead_s": call.overhead_s,
            # Of which paid once per call by its small ops' lone calls (pricing.call_extra).
            "predicted_call_extra_s": call.call_extra_s,
            # Predicted seconds per op kind and limit: where the time goes.
            "predicted_by_kind": call.by_kind(),
            "predicted_kinds": call.kind_detail(),
            "predicted_peak_latency_s": naive_prediction(rd, model),
            "predicted_comm_s": comm_s,
            **regime_fields(r, rd, call, model),
            "fitted_latency_s": fit.fitted(r["batch_size"]),
            # Per-shape rates this prediction could not measure: interpolated or peak.
            "rates_not_measured": dict(peak_source.unmeasured) or None,
            **cost_check(r, roofline_cfg.cost_tolerance),
            **extra,
        }
        out.append(rows_lib.extend(r, **fields))
    return out, not_measured


def predict_device(
    rd: dict[str, Any], model: DeviceModel, ops: list[ops_lib.Op] | None = None
) -> pricing.CallTime:
    """The per-op prediction of one device's share of a call, without communication.

    The ops are the row's own (roofline.row_ops) unless given. Where the sweep measured the
    call's own floor (its arguments), that floor is used.
    """
    floor_s = rd.get("call_floor_s") or model.peaks.dispatch_floor_s
    rates = dataclasses.replace(model.rates, dispatch_floor_s=floor_s)
    return pricing.predict_call(roofline.row_ops(rd) if ops is None else ops, rates)


def naive_prediction(rd: dict[str, Any], model: DeviceModel) -> float:
    """The whole-program max(overhead, bytes / BW, FLOPs / square-matmul peak) baseline."""
    flops, bytes_moved = roofline.work(rd)
    overhead_s = roofline.overhead_time(
        rd.get("gemm_shapes"), model.peaks.dispatch_floor_s, model.peaks.kernel_overhead_s
    )
    return roofline.predict(flops, bytes_moved, overhead_s, model.bw, flops / model.square_f)[0]


def regime_fields(
    r: dict[str, Any], rd: dict[str, Any], call: pricing.CallTime, model: DeviceModel
) -> dict[str, Any]:
    """Which limit a point is at, by the roofline, and its fraction of each roof.

    The limit is the largest of three terms for one device's share of the call.

    - overhead: the predicted fixed cost per call.
    - memory: the bytes over the memory roof.
    - compute: the FLOPs over the compute roof.

    Between memory and compute, this compares intensity with the measured roofs' ridge.
    """
    flops, bytes_moved = roofline.work(rd)
    terms = {
        "overhead": call.overhead_s,
        "memory": (bytes_moved or 0.0) / model.roof_bytes_per_s,
        "compute": (flops or 0.0) / model.peak_f,
    }
    latency = r["latency_s"]
    return {
        "regime": max(terms, key=terms.get),
        "regime_terms_s": terms,
        "intensity_flops_per_byte": flops / bytes_moved if flops and bytes_moved else None,
        "compute_roof_fraction": flops / latency / model.peak_f if flops else None,
        "memory_roof_fraction": (
            bytes_moved / latency / model.roof_bytes_per_s if bytes_moved else None
        ),
    }


def cost_check(r: dict[str, Any], tolerance: float) -> dict[str, Any]:
    """XLA's counted FLOPs and bytes against the analytic count, flagged beyond `tolerance`."""
    flops_ratio = _ratio(r["flops"], r["analytic_flops"])
    bytes_ratio = _ratio(r["bytes_accessed"], r["analytic_bytes"])
    mismatch = any(x is not None and abs(x - 1) > tolerance for x in (flops_ratio, bytes_ratio))
    return {
        "xla_flops_ratio": flops_ratio,
        "xla_bytes_ratio": bytes_ratio,
        "cost_mismatch": mismatch,
    }


def spread_order(n: int) -> list[int]:
    """0..n-1, the ends first, then each gap's middle, breadth first: 0, n-1, n/2, ..."""
    if n <= 2:
        return list(range(n))
    order, gaps = [0, n - 1], [(0, n - 1)]
    while gaps:
        lo, hi = gaps.pop(0)
        if hi - lo > 1:
            mid = (lo + hi) // 2
            order.append(mid)
            gaps += [(lo, mid), (mid, hi)]
    return order
