"""A run's summary fields from its predicted rows.

- Its roofs, and where they came from.
- The fitted and predicted knees.
- The prediction's errors.
- B* from the roofs and from the datasheet, with the what-ifs.
- Where the predicted time goes at the sweep's ends and at profiled points.
"""

from typing import Any

import numpy as np

from batching.predict import knee, replicates, whatif
from batching.predict.device import DeviceModel
from batching.setup import specs
from models.dtypes import resolve_dtype


def roof_fields(
    out: list[dict[str, Any]],
    model: DeviceModel,
    peak_source: Any,
    not_measured: dict[str, str],
) -> dict[str, Any]:
    """The device's roofs as this run used them, where they came from, and the check."""
    first_bytes = out[0]["achieved_bytes_per_s"]
    key = f"{model.device.platform}:{model.device.device_kind}"
    return {
        "peak_flops_per_s": model.peak_f,
        "peak_flops_source": model.peak_source,
        "square_matmul_flops_per_s": model.square_f,
        "peak_bytes_per_s": model.bw,
        "memory_roof_bytes_per_s": model.roof_bytes_per_s,
        "memory_roof": "DRAM" if model.cold else "last-level cache",
        "ridge_flops_per_byte": model.ridge,
        "dispatch_floor_s": model.peaks.dispatch_floor_s,
        "kernel_overhead_s": model.peaks.kernel_overhead_s,
        "cache_bytes_per_s": model.rates.cache_bytes_per_s,
        # Achieved bytes/s at the smallest batch as a fraction of the measured bandwidth.
        "bandwidth_fraction_first": first_bytes / model.bw if first_bytes else None,
        "regimes": {r["batch_size"]: r["regime"] for r in out},
        "microbenchmark_budget_s": peak_source.budget.seconds,
        "microbenchmark_s": peak_source.budget.spent_s,
        "rates_interpolated": sum(v == "interpolated" for v in not_measured.values()),
        "rates_at_peak": sum(v == "peak" for v in not_measured.values()),
        "peaks_file": peak_source.peaks_file,
        "peaks_check": peak_source.checks.get(key),
        "last_level_cache_bytes": model.llc,
        "last_level_cache_source": model.peaks.details.get("last_level_cache_source"),
        "peaks_measured_at": model.peaks.details.get("measured_at"),
    }


def knee_fields(
    out: list[dict[str, Any]],
    samples: dict[int, Any],
    fit: knee.KneeFit,
    fitted: list[dict[str, Any]],
    model: DeviceModel,
    roofline_cfg: Any,
    draws: replicates.Replicates,
) -> dict[str, Any]:
    """The run's knees, its free-batching limit, and the intervals of slope and slowdown.

    - The fitted knee, on the converged points, with its interval across passes.
    - The predicted curve's knee, read the same way.
    - The a-priori crossing of the three limits.

    `draws` are the run's replicates, the ones the knee uses.
    """
    predicted_fit = predicted_knee(out, draws)
    return {
        # Where the a-priori three limits cross, with this workload's own bytes per example
        # (activations, a KV cache) rather than the weights-only formula of B*.
        "predicted_knee_batch_size": knee.knee_of(
            np.log([model.peaks.dispatch_floor_s, model.bw, model.peak_f]),
            knee.LinearCost.from_rows(out),
        ),
        # The knee of the per-op predicted curve, read with the fitted knee's definition
        # (knee.fit_knee on the predicted latencies), so the two compare like with like.
        "predicted_curve_knee_batch_size": predicted_fit.knee_batch_size,
        "predicted_curve_knee_low": predicted_fit.knee_low,
        "predicted_curve_knee_high": predicted_fit.knee_high,
        "knee_batch_size": fit.knee_batch_size,
        "knee_low": fit.knee_low,
        "knee_high": fit.knee_high,
        "knee_interval_degenerate": fit.interval_degenerate,
        # "passes": the interval spans what moved between the sweep's passes.
        "knee_interval_from": fit.interval_from,
        "knee_fit_points": len(fitted),
        **free_batching(out, samples, roofline_cfg.free_batching_alpha),
        **spread_fields(out, draws),
        # The fitted three-limit model's own parameters (not measurements).
        "overhead_s": fit.overhead_s,
        "effective_flops_per_s": fit.effective_flops_per_s,
        "effective_bytes_per_s": fit.effective_bytes_per_s,
    }


def free_batching(
    out: list[dict[str, Any]], samples: dict[int, Any], alpha: float
) -> dict[str, Any]:
    """The free-batching limit (knee.free_batching_limit) and the test behind it.

    Both are None when a point has no samples. They are None too when the run has fewer
    than three points. A limit read off fewer is the sweep's grid, not a finding.
    """
    if not (len(samples) == len(out) and len(out) >= 3):
        return {"free_batching_limit": None, "free_batching_test": None}
    limit, test = knee.free_batching_limit(samples, alpha)
    return {"free_batching_limit": limit, "free_batching_test": test}


def spread_fields(out: list[dict[str, Any]], draws: replicates.Replicates) -> dict[str, Any]:
    """95% intervals of the comparisons the verdicts make between points.

    - The log-log slope of latency against batch size.
    - The slowdown of the largest batch over the smallest.

    They use the knee's replicates, with whole passes drawn. They are nan without samples.
    """
    rows = sorted(out, key=lambda r: r["batch_size"])
    sizes = [r["batch_size"] for r in rows]
    t = np.array([r["latency_s"] for r in rows])
    x = np.log(np.array(sizes, dtype=float))
    fields = {"loglog_slope": _slopes(x, t[None, :])[0] if len(rows) > 1 else np.nan}
    fields.update(loglog_slope_low=np.nan, loglog_slope_high=np.nan)
    fields.update(slowdown_low=np.nan, slowdown_high=np.nan)
    drawn = draws.at(sizes)
    if drawn is None or len(rows) < 2:
        return fields
    boot = np.where(np.isnan(drawn), t, drawn)
    fields["loglog_slope_low"], fields["loglog_slope_high"] = knee.percentiles(_slopes(x, boot))
    fields["slowdown_low"], fields["slowdown_high"] = knee.percentiles(boot[:, -1] / boot[:, 0])
    return fields


def _slopes(x: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Least-squares slopes of log t (R, n) against x (n,)."""
    xc = x - x.mean()
    y = np.log(t)
    return (y - y.mean(axis=1, keepdims=True)) @ xc / (xc @ xc)


def error_fields(out: list[dict[str, Any]]) -> dict[str, Any]:
    """Median |predicted / measured − 1| of the per-op prediction, the naive one and the fit."""
    measured = np.array([r["latency_s"] for r in out])

    def median_error(field: str) -> float:
        return float(np.median(np.abs(np.array([r[field] for r in out]) / measured - 1)))

    program = all(r.get("program_predicted_latency_s") for r in out)
    return {
        "prediction_error_median": median_error("predicted_latency_s"),
        # The same prediction priced from the compiled program's ops (hand-listed families).
        "program_prediction_error_median": (
            median_error("program_predicted_latency_s") if program else None
        ),
        "ops_source": out[0].get("ops_source") or "hand",
        "peak_prediction_error_median": median_error("predicted_peak_latency_s"),
        "fit_error_median": median_error("fitted_latency_s"),
        "cost_mismatches": sum(r["cost_mismatch"] for r in out),
    }


def spec_fields(out: list[dict[str, Any]], model: DeviceModel, roofline_cfg: Any) -> dict[str, Any]:
    """B* from the measured roofs and from the datasheet, and the what-if curves."""
    param_dtype = out[0].get("param_dtype") or model.dtype
    bytes_per_param = resolve_dtype(param_dtype).itemsize
    uses = out[0].get("weight_uses_per_example") or 1.0
    spec = specs.detect(model.device.device_kind)
    spec_f, spec_note = (
        specs.matmul_peak(spec, model.dtype, model.precision)
        if spec
        else (None, f"no spec table entry for device kind {model.device.device_kind!r}")
    )
    return {
        # A weight serving only a fraction of the batch (an expert: k/E) needs that much
        # larger a batch to be reused as often: B* / weight_uses_per_example.
        "predicted_critical_batch": (
            specs.critical_batch_size(model.peak_f, model.bw, bytes_per_param) / uses
        ),
        "spec_device": spec.name if spec else None,
        "spec_flops_per_s": spec_f,
        # Why the datasheet B* is missing, or what stood in for the dtype's peak.
        "spec_note": spec_note,
        "spec_bytes_per_s": spec.bandwidth_bytes_per_s if spec else None,
        "spec_critical_batch": (
            specs.critical_batch_size(spec_f, spec.bandwidth_bytes_per_s, bytes_per_param) / uses
            if spec and spec_f
            else None
        ),
        "bytes_per_param": bytes_per_param,
        "whatif": whatif.whatif(
            out, roofline_cfg.whatif_devices, model.dtype, model.precision, bytes_per_param
        ),
        "whatif_nodes": whatif.whatif_nodes(
            out, model.dtype, model.precision, bytes_per_param / uses
        ),
    }


def predicted_knee(rows: list[dict[str, Any]], draws: replicates.Replicates) -> knee.KneeFit:
    """knee.fit_knee on the predicted curve.

    Its interval carries the measurement's own spread. The run's replicates are scaled onto
    the prediction, by predicted / measured per point. So it says how well a knee on this
    grid can be located at this noise. The fit's interval says the same.
    """
    predicted = [{**r, "latency_s": r["predicted_latency_s"]} for r in rows]
    scale = {r["batch_size"]: r["predicted_latency_s"] / r["latency_s"] for r in rows}
    return knee.fit_knee(predicted, {}, draws=draws, scale=scale)


def breakdown(rows: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Where the predicted time goes at the smallest and largest batch of a run.

    It gives seconds per op kind and limit and the fixed overhead. It puts the measured
    latency beside the prediction.
    """
    ends = [rows[0]] if len(rows) == 1 else [rows[0], rows[-1]]
    return {r["batch_size"]: _predicted_parts(r) for r in ends}


def _predicted_parts(r: dict[str, Any]) -> dict[str, Any]:
    return {
        "by_kind": r["predicted_by_kind"],
        # Per kind: its intensity bound and the FLOP rate the prediction gives it.
        "kinds": r.get("predicted_kinds"),
        "regime": r.get("regime"),
        "overhead_s": r["predicted_overhead_s"],
        "predicted_s": r["predicted_latency_s"],
        "measured_s": r["latency_s"],
    }


def traced_breakdown(rows: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """The points with a profiler trace, predicted against traced.

    Predicted seconds per op kind and limit sit next to the traced seconds per kind. The
    traces come from batching.measure.profiling. A point whose trace could not be read says
    why.
    """
    return {
        r["batch_size"]: {
            **_predicted_parts(r),
            "traced": r.get("traced_ops"),
            "traced_s": r.get("traced_latency_s"),
            "traced_ops_error": r.get("traced_ops_error"),
        }
        for r in rows
        if r.get("traced_ops") or r.get("traced_ops_error")
    }
