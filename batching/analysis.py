"""Roofline analysis of a finished sweep: per-row predictions and fits, per-run summaries.

Reads rows and samples, measures (or loads cached) device peaks, and returns
rows augmented with `predicted_latency_s`, `regime`, `fitted_latency_s` and the
XLA-vs-analytic cost check, plus the roofline fields of each run's summary.

On a mesh the prediction is the single-device one at ONE device's share of the work
(roofline.per_device_work) plus, as a separate summand, the call's collectives at the
mesh's measured bus bandwidth (roofline.comm_time, batching.collectives): the row's
`predicted_comm_s`.
"""

import dataclasses
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from batching import collectives, peaks, roofline, specs, workload
from batching import ops as ops_lib
from models.dtypes import resolve_dtype


class NoPeaks(ValueError):
    """A peaks file holds nothing for a run's device (or dtype): the run is not analysed."""


@dataclasses.dataclass(frozen=True)
class DeviceRef:
    """A device known by its platform and kind only: the rows' device when a workdir measured
    elsewhere is analysed here from a peaks file (nothing is measured on it)."""

    platform: str
    device_kind: str
    id: int = 0


# Seconds of per-shape microbenchmarks a run's analysis may spend on an accelerator when
# roofline.microbenchmark_budget_s is unset (a CPU: no limit). A GPU lease is minutes long,
# and every shape costs a compile; beyond the budget, rates are interpolated.
ACCELERATOR_BUDGET_S = 45.0


def microbenchmark_budget(roofline_cfg: Any, platform: str) -> float | None:
    """The run's budget for per-shape microbenchmarks in seconds (None: no limit)."""
    budget = roofline_cfg.get("microbenchmark_budget_s")
    if budget is None:
        return None if platform == "cpu" else ACCELERATOR_BUDGET_S
    return float(budget)


class PeakSource:
    """Where a run's analysis takes the device's peaks and per-shape rates from.

    From the peaks cache (`cache_dir`), measuring what is missing: the base peaks always, the
    per-shape rates (GEMM, conv, attention, lone ops) within the run's budget (`start_run`).
    Or from a peaks file (`peaks_file`, a workdir's device_peaks.json: rows measured on
    another machine analysed here), measuring nothing. A per-shape rate that is neither
    cached nor measured is interpolated from the measured shapes of its family
    (peaks.interpolate), else the op runs at the peak; `unmeasured` names them.
    """

    def __init__(
        self, cache_dir: str, refresh: bool, peaks_file: str | None = None, check: bool = True
    ):
        self.peaks_file = peaks_file
        self._check = check
        if peaks_file:
            if not os.path.isfile(peaks_file):
                raise ValueError(f"roofline.peaks_file does not exist: {peaks_file!r}")
            # A private copy as the cache: lookups read it, and nothing can write the file.
            # Removed with this object.
            self._copy = tempfile.TemporaryDirectory(prefix="lab_peaks_file_")
            cache_dir = self._copy.name
            shutil.copy(peaks_file, peaks.cache_path(cache_dir))
        self.cache_dir = cache_dir
        self._refresh = refresh and not peaks_file
        self._refreshed: set[str] = set()
        self.budget = peaks.Budget(0.0 if peaks_file else None)
        self.unmeasured: dict[str, str] = {}
        # Per device: this run's check of the cached peaks (peaks.check_cached).
        self.checks: dict[str, dict[str, Any] | None] = {}

    def start_run(self, budget_s: float | None) -> None:
        """A new run: its own microbenchmark budget (none with a peaks file) and tally."""
        self.budget = peaks.Budget(0.0 if self.peaks_file else budget_s)
        self.unmeasured = {}

    def entry(self, device: Any) -> dict[str, Any]:
        return peaks.device_entry(device, self.cache_dir)

    def peaks(self, device: Any, dtype: str, precision: str = "default") -> peaks.MeasuredPeaks:
        key = f"{device.platform}:{device.device_kind}"
        if self.peaks_file:
            entry = self.entry(device)
            if "bandwidth" not in entry or peaks.dtype_key(dtype, precision) not in entry.get(
                "matmul_flops_per_s", {}
            ):
                raise NoPeaks(
                    f"roofline.peaks_file {self.peaks_file!r} has no {dtype} "
                    f"({precision} precision) peaks for {key}"
                )
            return peaks.peaks_of(entry, device.platform, device.device_kind)
        first = key not in self._refreshed
        self._refreshed.add(key)
        if first and self._check and not self._refresh:
            # Once per device and process: are the cached peaks still this device's?
            self.checks[key] = peaks.check_cached(device, self.cache_dir, dtype, precision)
        refresh = self._refresh and first
        return peaks.measured_peaks(device, (dtype,), self.cache_dir, refresh, precision)

    def _or_interpolated(self, device: Any, table: str, name: str, value: Any) -> Any:
        if value is None and table != "lone_op_s":
            value = peaks.interpolate(self.entry(device), table, name)
            self.unmeasured[f"{table}:{name}"] = "interpolated" if value else "peak"
        elif value is None:
            self.unmeasured[f"{table}:{name}"] = "not small-op priced"
        return value

    def gemm(self, device: Any, dtype: str, cold: bool, precision: str = "default"):
        def rate(shape):
            name = peaks.gemm_key(peaks.dtype_key(dtype, precision), shape, cold)
            found = peaks.gemm_flops(
                device, dtype, shape, self.cache_dir, cold, precision, self.budget
            )
            return self._or_interpolated(device, "gemm_flops_per_s", name, found)

        return rate

    def conv(self, device: Any, dtype: str, precision: str = "default"):
        def rate(shape):
            name = peaks.conv_key(peaks.dtype_key(dtype, precision), shape)
            found = peaks.conv_flops(device, dtype, shape, self.cache_dir, precision, self.budget)
            return self._or_interpolated(device, "conv_flops_per_s", name, found)

        return rate

    def lone(self, device: Any, dtype: str, precision: str = "default"):
        """Seconds of a call running one small op alone, beyond the dispatch floor, cached."""

        def seconds(op):
            shape = tuple(op.shape)
            name = peaks.lone_key(peaks.dtype_key(dtype, precision), op.kind, shape)
            found = peaks.lone_op_seconds(
                device, dtype, op.kind, shape, self.cache_dir, precision, self.budget
            )
            return self._or_interpolated(device, "lone_op_s", name, found)

        return seconds

    def attention(self, device: Any, attend: Callable[..., jax.Array], precision: str = "default"):
        """Seconds of one attention shape (a row's `attention_shapes` entry), cached;
        `attend` is the model's attention over its cache (the workload module's ATTEND)."""

        def seconds(s: dict[str, Any]) -> float | None:
            shape = (s["batch"], s["kv_heads"], s["cache_len"], s["q_per_kv"], s["head_dim"])
            name = peaks.attention_key(peaks.dtype_key(s["dtype"], precision), s["layout"], shape)
            found = peaks.attention_seconds(
                device,
                s["dtype"],
                s["layout"],
                shape,
                self.cache_dir,
                attend,
                precision,
                self.budget,
            )
            return self._or_interpolated(device, "attention_s", name, found)

        return seconds

    def collective(self, device: Any) -> Callable[[dict[str, Any]], float | None]:
        """The bus bandwidth (bytes/s) a row's collectives entry reaches at its own payload,
        from the latency-bandwidth model of the cached microbenchmarks the sweep ran
        (collectives.measure_run, collectives.effective_busbw); None where not measured."""
        return lambda c: collectives.effective_busbw(device, c, self.cache_dir)


def mesh_shape_of(row: dict[str, Any], key: str = "mesh_shape") -> dict[str, int]:
    """The row's mesh (`mesh_shape`) or how many ways each axis splits its work
    (`parallel_shape`, falling back to the mesh for rows written without it)."""
    mesh = row.get(key) or row.get("mesh_shape") or {}
    return {a: int(mesh.get(a) or 1) for a in collectives.AXES}


def comm_bandwidth(
    rows: list[dict[str, Any]], device: jax.Device, peak_source: PeakSource
) -> tuple[float | Callable[[dict[str, Any]], float] | None, str | None]:
    """What the comm term divides by, and where it comes from: the bus bandwidths measured on
    this run's mesh (during the sweep), else the spec interconnect (per direction), else
    nothing (no term)."""
    calls = [c for r in rows for c in r.get("collectives") or []]
    if not calls:
        return None, None
    measured = peak_source.collective(device)
    if all(measured(c) for c in calls):
        return measured, "measured on this mesh"
    spec = specs.detect(device.device_kind)
    if spec is not None:
        return spec.interconnect_bytes_per_s, f"spec {spec.name}: {spec.interconnect_source}"
    return None, None


def _ratio(xla: float | None, analytic: float | None) -> float | None:
    if xla is None or not analytic:
        return None
    return xla / analytic


@dataclasses.dataclass
class DeviceModel:
    """What one run's analysis knows of its device: the peaks it uses (the compute roof a
    ceiling over every measurement of the dtype), the per-op rates, the interconnect."""

    device: Any
    dtype: str
    precision: str
    peaks: peaks.MeasuredPeaks
    rates: ops_lib.Rates
    peak_f: float  # the compute roof, FLOP/s (ceiling)
    peak_source: str  # which measurement set it
    square_f: float  # the square-matmul microbenchmark alone
    bw: float  # streaming DRAM bandwidth, bytes/s
    llc: float  # last-level cache, bytes
    cold: bool  # the run's weights overflow the last-level cache
    comm_bw: Any
    comm_source: str | None

    @property
    def roof_bytes_per_s(self) -> float:
        """The memory roof: DRAM, or the last-level cache when the weights stay in it."""
        return self.bw if self.cold else (self.rates.cache_bytes_per_s or self.bw)

    @property
    def ridge(self) -> float:
        """FLOPs per byte where the compute roof meets the memory roof."""
        return self.peak_f / self.roof_bytes_per_s


def analyze_run(
    rows: list[dict[str, Any]],
    samples: dict[int, Any],
    device: jax.Device,
    roofline_cfg: Any,
    peak_source: PeakSource,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Returns (rows with roofline fields, the run's roofline summary fields). `samples` are
    each point's timing samples per sweep pass ({batch: [pass 0, pass 1, ...]})."""
    rows = sorted(rows, key=lambda r: r["batch_size"])
    # One device's share of each call (the rows themselves on a single device).
    device_rows = [roofline.per_device_work(r) for r in rows]
    model = device_model(rows, device_rows, device, roofline_cfg, peak_source)
    # The knee is fitted on the points whose median met its precision target (points that
    # stopped on their budget are drawn and predicted, not fitted), unless too few did: then
    # on every point, and the knee says so; its interval across passes carries the noise.
    converged = [r for r in rows if r.get("converged", True)]
    fitted = converged if len(converged) >= roofline.MIN_POINTS_TO_FIT else rows
    fit = roofline.fit_knee(fitted, samples, n_bootstrap=roofline_cfg.bootstrap)
    out, not_measured = predicted_rows(rows, device_rows, model, fit, peak_source, roofline_cfg)
    summary = {
        **roof_fields(out, model, peak_source, not_measured),
        **knee_fields(out, samples, fit, fitted, model, roofline_cfg),
        "points_converged": len(converged),
        **error_fields(out),
        "shape_aware": bool(roofline_cfg.shape_aware),
        "cold_weights": bool(model.cold),
        **spec_fields(out, model, roofline_cfg),
        "breakdown": breakdown(out),
        "traced_breakdown": traced_breakdown(out),
        **mesh_summary(out, mesh_shape_of(rows[0]), device, model.comm_source, peak_source),
    }
    # Each data replica batches on its own: a device turns compute-bound at B* of its own
    # share, so the global batch does at B* x data (the model and expert axes share one
    # replica's batch, so they do not multiply it).
    split = mesh_shape_of(rows[0], "parallel_shape")
    for key in ("predicted_critical_batch", "spec_critical_batch"):
        per_device = summary[key]
        summary[f"{key}_global"] = per_device * split["data"] if per_device else None
    summary["num_devices"] = int(np.prod(list(mesh_shape_of(rows[0]).values())))
    summary["parallel_shape"] = split
    return out, summary


def device_model(
    rows: list[dict[str, Any]],
    device_rows: list[dict[str, Any]],
    device: Any,
    roofline_cfg: Any,
    peak_source: PeakSource,
) -> DeviceModel:
    """The run's peaks and per-op rates: every shape the run needs is measured (within the
    budget; the sweep's ends first), then the compute roof is set to the best rate measured
    for the dtype (ceiling), and the rates priced with it."""
    dtype = rows[0]["dtype"] or "float32"
    precision = rows[0].get("matmul_precision", "default")
    measured = peak_source.peaks(device, dtype, precision)
    square_f = measured.matmul_flops_per_s[peaks.dtype_key(dtype, precision)]
    bw = measured.bandwidth_bytes_per_s
    llc = measured.details.get("last_level_cache_bytes") or peaks.last_level_cache_bytes(device)
    # Weights bigger than the last-level cache stream from DRAM on every call: time the
    # GEMMs the same way, or small batches look faster than they can be.
    cold = (device_rows[0].get("weight_bytes") or 0) > llc
    shape_aware = roofline_cfg.shape_aware
    # A workload whose rows carry attention_shapes names its attention as ATTEND.
    attend = None
    if any(r.get("attention_shapes") for r in rows):
        attend = getattr(workload.workload_module(rows[0]["model"]), "ATTEND", None)
    attention = peak_source.attention(device, attend, precision) if shape_aware and attend else None
    rates = ops_lib.Rates(
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
        # What a call pays once for handing a small op to XLA:CPU's worker threads; a GPU or
        # TPU has no such hand-off, and measuring it there cost a GPU lease minutes.
        lone=(
            peak_source.lone(device, dtype, precision)
            if shape_aware and device.platform == "cpu"
            else None
        ),
        attention=(lambda op: attention(ops_lib.attention_shapes([op])[0])) if attention else None,
    )
    # Measure every shape the run's predictions ask for, the sweep's ends first, then the
    # middles: what a bounded budget cannot measure lies between measured shapes.
    for i in spread_order(len(device_rows)):
        ops_lib.predict_call(row_ops(device_rows[i]), rates)
    peak_f, source = compute_ceiling(
        square_f, peak_source.entry(device), peaks.dtype_key(dtype, precision), device_rows
    )
    comm_bw, comm_source = comm_bandwidth(rows, device, peak_source)
    return DeviceModel(
        device, dtype, precision, measured, dataclasses.replace(rates, peak_flops_per_s=peak_f),
        peak_f, source, square_f, bw, llc, cold, comm_bw, comm_source,
    )  # fmt: skip


# Measurements of less work than this per kernel do not set the compute roof: their rate
# rests on subtracting a call's fixed costs, which a small kernel does not dwarf.
CEILING_MIN_FLOPS = 1e8


def compute_ceiling(
    square_f: float, entry: dict[str, Any], dkey: str, device_rows: list[dict[str, Any]]
) -> tuple[float, str]:
    """The compute roof: the best FLOP rate this device was measured at in the dtype, so no
    row or op sits above it. Candidates: the square-matmul microbenchmark, the per-shape GEMM
    and conv rates of at least CEILING_MIN_FLOPS per kernel, and the run's own points of at
    least that much work per call (one device's share). Returns (FLOP/s, what set it)."""
    best, source = square_f, "square-matmul microbenchmark"
    for table, pattern in (
        ("gemm_flops_per_s", r"(?:(\d+)@)?(\d+)x(\d+)x(\d+):\w+"),
        ("conv_flops_per_s", r"(\d+x){6}\d+"),
    ):
        for key, rate in entry.get(table, {}).items():
            name = key[len(dkey) + 1 :] if key.startswith(dkey + ":") else None
            m = re.fullmatch(pattern, name or "")
            if not m or not rate or rate <= best:
                continue
            if table == "gemm_flops_per_s":
                flops = 2.0 * int(m.group(1) or 1) * math.prod(int(x) for x in m.groups()[1:])
            else:
                flops = peaks.conv_flops_of(tuple(int(x) for x in name.split("x")))
            if flops >= CEILING_MIN_FLOPS:
                best, source = float(rate), f"{table.split('_')[0].upper()} microbenchmark {name}"
    for r in device_rows:
        flops = r.get("analytic_flops") or 0.0
        if flops >= CEILING_MIN_FLOPS and flops / r["latency_s"] > best:
            best, source = flops / r["latency_s"], f"measured point batch {r['batch_size']}"
    return best, source


def predicted_rows(
    rows: list[dict[str, Any]],
    device_rows: list[dict[str, Any]],
    model: DeviceModel,
    fit: roofline.KneeFit,
    peak_source: PeakSource,
    roofline_cfg: Any,
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Each row with its prediction, regime, roof fractions, fit and cost check; and every
    per-shape rate the run could not measure."""
    split = mesh_shape_of(rows[0], "parallel_shape")
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
        out.append(
            {
                **r,
                "predicted_latency_s": call.seconds + comm_s,
                "predicted_overhead_s": call.overhead_s,
                # Of which paid once per call by its small ops' lone calls (ops.call_extra).
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
        )
    return out, not_measured


def predict_device(rd: dict[str, Any], model: DeviceModel) -> ops_lib.CallTime:
    """The per-op predicted call of one device's share of a call, no communication; the
    floor is the call's own (its arguments) where the sweep measured it."""
    floor_s = rd.get("call_floor_s") or model.peaks.dispatch_floor_s
    rates = dataclasses.replace(model.rates, dispatch_floor_s=floor_s)
    return ops_lib.predict_call(row_ops(rd), rates)


def naive_prediction(rd: dict[str, Any], model: DeviceModel) -> float:
    """The whole-program max(overhead, bytes / BW, FLOPs / square-matmul peak) baseline."""
    flops, bytes_moved = roofline.work(rd)
    overhead_s = roofline.overhead_time(
        rd.get("gemm_shapes"), model.peaks.dispatch_floor_s, model.peaks.kernel_overhead_s
    )
    return roofline.predict(flops, bytes_moved, overhead_s, model.bw, flops / model.square_f)[0]


def regime_fields(
    r: dict[str, Any], rd: dict[str, Any], call: ops_lib.CallTime, model: DeviceModel
) -> dict[str, Any]:
    """Which limit a point is at, by the roofline: one device's FLOPs per byte against the
    ridge of the measured roofs (compute or memory), or overhead where the predicted fixed
    cost per call exceeds both roof times; and the achieved fraction of each roof."""
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


def roof_fields(
    out: list[dict[str, Any]],
    model: DeviceModel,
    peak_source: PeakSource,
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
    fit: roofline.KneeFit,
    fitted: list[dict[str, Any]],
    model: DeviceModel,
    roofline_cfg: Any,
) -> dict[str, Any]:
    """The fitted knee (converged points, interval across passes), the predicted curve's knee
    read the same way, the a-priori crossing of the three limits, and the free-batching
    limit."""
    predicted_fit = predicted_knee(out, samples, roofline_cfg.bootstrap)
    return {
        # Where the a-priori three limits cross, with this workload's own bytes per example
        # (activations, a KV cache) rather than the weights-only formula of B*.
        "predicted_knee_batch_size": roofline.knee_of(
            np.log([model.peaks.dispatch_floor_s, model.bw, model.peak_f]),
            roofline.LinearCost.from_rows(out),
        ),
        # The knee of the per-op predicted curve, read with the fitted knee's definition
        # (roofline.fit_knee on the predicted latencies), so the two compare like with like.
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
        "free_batching_limit": (
            roofline.free_batching_limit(samples, roofline_cfg.free_batching_alpha)
            # A limit read off fewer than three points is the sweep's grid, not a finding.
            if len(samples) == len(out) and len(out) >= 3
            else None
        ),
        # The fitted three-limit model's own parameters (not measurements).
        "overhead_s": fit.overhead_s,
        "effective_flops_per_s": fit.effective_flops_per_s,
        "effective_bytes_per_s": fit.effective_bytes_per_s,
    }


def error_fields(out: list[dict[str, Any]]) -> dict[str, Any]:
    """Median |predicted / measured − 1| of the per-op prediction, the naive one and the fit."""
    measured = np.array([r["latency_s"] for r in out])

    def median_error(field: str) -> float:
        return float(np.median(np.abs(np.array([r[field] for r in out]) / measured - 1)))

    return {
        "prediction_error_median": median_error("predicted_latency_s"),
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
        "whatif": whatif(
            out, roofline_cfg.whatif_devices, model.dtype, model.precision, bytes_per_param
        ),
        "whatif_nodes": whatif_nodes(out, model.dtype, model.precision, bytes_per_param / uses),
    }


def spread_order(n: int) -> list[int]:
    """0..n-1 with the ends first, then each gap's middle, breadth first: 0, n-1, n/2, ..."""
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


def mesh_summary(
    rows: list[dict[str, Any]],
    mesh_shape: dict[str, int],
    device: jax.Device,
    comm_source: str | None,
    peak_source: PeakSource,
) -> dict[str, Any]:
    """The run's mesh facts for the report: the comm term's share of the predicted latency,
    the mesh's measured collective bandwidths next to the spec interconnect, the slowest
    expert device's cost, and whether the mesh is a functional simulation (host devices)."""
    spec = specs.detect(device.device_kind)
    num_devices = int(np.prod(list(mesh_shape.values())))
    comm = [r for r in rows if r.get("collectives")]
    measured = {}
    for axis, n in mesh_shape.items():
        for kind in collectives.MEASURED:
            r = n > 1 and collectives.lookup(
                device, kind, n, collectives.DEFAULT_PAYLOAD_BYTES, peak_source.cache_dir
            )
            if r:
                measured.setdefault(axis, {})[kind] = r["busbw_bytes_per_s"]
    out = {
        "mesh_shape": mesh_shape,
        # Forced host devices share the same CPU cores: their timings say nothing about
        # accelerators or interconnects (README, "functional simulation").
        "functional_simulation": device.platform == "cpu" and num_devices > 1,
        "comm_bandwidth_source": comm_source,
        "collective_busbw_bytes_per_s": measured,
        "spec_interconnect_bytes_per_s": spec.interconnect_bytes_per_s if spec else None,
        "spec_interconnect_source": spec.interconnect_source if spec else None,
        "comm_bytes_last": rows[-1].get("comm_bytes"),
        "xla_comm_bytes_last": rows[-1].get("xla_comm_bytes"),
        "comm_share_median": (
            float(np.median([r["predicted_comm_s"] / r["predicted_latency_s"] for r in comm]))
            if comm and comm_source
            else None  # no bandwidth to divide by: unknown, not zero
        ),
    }
    loads = [r for r in rows if r.get("device_max_mean_load")]
    if loads:
        first, last = loads[0], loads[-1]
        out["device_max_mean_load_first"] = first["device_max_mean_load"]
        out["device_max_mean_load_last"] = last["device_max_mean_load"]
        costs = [
            r["predicted_latency_s"] / r["predicted_balanced_latency_s"] - 1
            for r in loads
            if r.get("predicted_balanced_latency_s")
        ]
        # Predicted extra latency from waiting on the most-loaded device, median over points.
        out["slowest_device_cost_median"] = float(np.median(costs)) if costs else None
    return out


def whatif_nodes(
    rows: list[dict[str, Any]], dtype: str, precision: str, bytes_per_param: float
) -> dict[str, Any]:
    """Predicted latency per global batch on each multi-device node of the spec table.

    The run's mesh is laid on the node as it is (same expert and model axes), and the node's
    remaining devices become data replicas: data' = devices / (expert·model). Each point is
    one device's share (roofline.per_device_work at data', or at the global batch where that
    is smaller: an example is not split over replicas) under the node device's datasheet
    memory and compute limits, plus the row's collectives at the node's interconnect
    (per direction), their payloads scaled by data/data' (the tokens per device; capacity
    rounding aside). Lower bounds, like `whatif`: the overhead there is unknown.
    """
    result = {}
    for name, node in specs.NODES.items():
        spec = node.device
        shape = mesh_shape_of(rows[0], "parallel_shape")
        group = shape["expert"] * shape["model"]
        if node.num_devices % group:
            continue
        node_data = node.num_devices // group
        f = specs.matmul_peak(spec, dtype, precision)[0]
        if f is None:
            continue
        node_shape = {**shape, "data": node_data}
        curve, comm = {}, {}
        for r in rows:
            # A global batch smaller than the data replicas is not split below one example:
            # the other replicas idle.
            data = max(1, min(node_data, r["batch_size"]))
            flops, bytes_moved = roofline.work(
                roofline.per_device_work({**r, "parallel_shape": {**shape, "data": data}})
            )
            scale = shape["data"] / data
            calls = [{**c, "bytes": c["bytes"] * scale} for c in r.get("collectives") or []]
            comm[r["batch_size"]] = roofline.comm_time(calls, node.interconnect_bytes_per_s)
            curve[r["batch_size"]] = (
                max(bytes_moved / spec.bandwidth_bytes_per_s, flops / f) + comm[r["batch_size"]]
            )
        per_device = specs.critical_batch_size(f, spec.bandwidth_bytes_per_s, bytes_per_param)
        result[name] = {
            "num_devices": node.num_devices,
            "mesh_shape": node_shape,
            "flops_per_s": f,
            "bandwidth_bytes_per_s": spec.bandwidth_bytes_per_s,
            "interconnect_bytes_per_s": node.interconnect_bytes_per_s,
            "critical_batch": per_device,
            "critical_batch_global": per_device * node_data,
            "latency_s": curve,
            "comm_s": comm,
            "source": node.source,
        }
    return result


def row_ops(r: dict[str, Any]) -> list[ops_lib.Op]:
    """A row's call as ops: its `ops`, or for a row written without them (a workload that
    describes none) its GEMM and attention shapes plus one op for the rest of its work,
    priced at the peak FLOP rate and the DRAM bandwidth."""
    if r.get("ops"):
        return [ops_lib.Op.from_dict(o) for o in r["ops"]]
    flops, bytes_moved = roofline.work(r)
    out = []
    for m, k, n, count in r.get("gemm_shapes") or []:
        out.append(ops_lib.Op("gemm", "gemm", (m, k, n), 2.0 * m * k * n, 0.0, count=count))
    for a in r.get("attention_shapes") or []:
        shape = (a["batch"], a["kv_heads"], a["cache_len"], a["q_per_kv"], a["head_dim"])
        B, K, S, G, H = shape
        item = a["bytes"]
        out.append(
            ops_lib.Op(
                "attention",
                "attention",
                shape,
                4.0 * B * K * G * S * H,
                2.0 * B * K * S * H * item,
                count=a["count"],
                dtype=a["dtype"],
                layout=a["layout"],
            )
        )
    t = ops_lib.totals(out)
    rest_flops = max((flops or 0) - t.flops, 0.0)
    rest_bytes = max((bytes_moved or 0) - t.bytes, 0.0)
    if rest_flops or rest_bytes or not out:
        out.append(ops_lib.Op("rest", "gemm", (), rest_flops, rest_bytes))
    return out


def predicted_knee(
    rows: list[dict[str, Any]], samples: dict[int, Any], n_bootstrap: int
) -> roofline.KneeFit:
    """roofline.fit_knee on the predicted curve. Its interval carries the measurement's own
    spread: each point's samples (each pass's) scaled onto its prediction (samples ·
    predicted / measured), so it says how well a knee on this grid can be located at this
    noise, as for the fit."""
    predicted = [{**r, "latency_s": r["predicted_latency_s"]} for r in rows]
    passes = roofline.pass_lists(samples)
    scaled = {
        r["batch_size"]: [p * (r["predicted_latency_s"] / r["latency_s"]) for p in passes[b]]
        for r in rows
        if (b := r["batch_size"]) in passes
    }
    return roofline.fit_knee(predicted, scaled, n_bootstrap=n_bootstrap)


def breakdown(rows: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Where the predicted time goes at the smallest and largest batch of a run: seconds per
    op kind and limit, the fixed overhead, and the measured latency beside the prediction."""
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
    """The points with a profiler trace: predicted seconds per op kind and limit next to the
    traced seconds per kind (batching.profiling), or why the trace could not be read."""
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


def whatif(
    rows: list[dict[str, Any]],
    devices: tuple[str, ...],
    dtype: str,
    precision: str,
    bytes_per_param: float,
) -> dict[str, Any]:
    """Predicted latency per batch size on spec-table devices: the same per-op model, each op
    at max(bytes / spec bandwidth, FLOPs / spec peak).

    No dispatch floor, no launches, no cache and every op at the datasheet peak: overhead
    on a device we did not run on is unknown, so these curves are lower bounds.
    """
    result = {}
    for name in devices:
        spec = specs.SPECS[name]
        f, note = specs.matmul_peak(spec, dtype, precision)
        if f is None:
            continue
        rates = ops_lib.Rates(
            dram_bytes_per_s=spec.bandwidth_bytes_per_s,
            cache_bytes_per_s=spec.bandwidth_bytes_per_s,
            cache_bytes=0.0,
            peak_flops_per_s=f,
            dispatch_floor_s=0.0,
            kernel_overhead_s=0.0,
            weights_warm=False,
        )
        curve = {r["batch_size"]: ops_lib.predict_call(row_ops(r), rates).seconds for r in rows}
        result[name] = {
            "flops_per_s": f,
            "bandwidth_bytes_per_s": spec.bandwidth_bytes_per_s,
            "critical_batch": specs.critical_batch_size(
                f, spec.bandwidth_bytes_per_s, bytes_per_param
            ),
            "latency_s": curve,
            "source": spec.source + (f"; {note}" if note else ""),
        }
    return result
