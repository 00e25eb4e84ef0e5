"""A device's measured peaks, from the cache or measured once and cached: the square-matmul
FLOP/s per dtype and precision, the stream and cache bandwidths, the dispatch floor and the
kernel overhead; checked against a quick measurement before use; and the per-shape rates
(GEMM, conv, lone op, attention) looked up or measured within a run's budget.
"""

import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any

import jax
from absl import logging

from batching.measure import microbench, peaks_cache, shape_bench, timing


@dataclasses.dataclass(frozen=True)
class MeasuredPeaks:
    """What the device reached in microbenchmarks (FLOP/s, bytes/s, seconds)."""

    device_kind: str
    platform: str
    matmul_flops_per_s: dict[str, float]
    bandwidth_bytes_per_s: float
    dispatch_floor_s: float
    kernel_overhead_s: float
    details: dict[str, Any]
    # Re-reading a buffer that fits the last-level cache (warm weights and activations).
    cache_bandwidth_bytes_per_s: float = 0.0

    def matmul(self, dtype: str, matmul_precision: str = "default") -> float:
        """The square-matmul peak in FLOP/s of a dtype under a matmul precision."""
        return self.matmul_flops_per_s[peaks_cache.dtype_key(dtype, matmul_precision)]


def conv_flops(
    device: jax.Device,
    dtype: str,
    shape: tuple[int, ...],
    cache_dir: str,
    matmul_precision: str = "default",
    budget: peaks_cache.Budget | None = None,
) -> float | None:
    """Measured FLOP/s of a conv shape (shape_bench.measure_conv_flops at
    shape_bench.conv_measured_batch), cached; None when it is not cached and `budget` is
    spent."""
    measured_shape = (shape_bench.conv_measured_batch(shape), *shape[1:])
    return peaks_cache.cached_measurement(
        device,
        cache_dir,
        "conv_flops_per_s",
        peaks_cache.conv_key(peaks_cache.dtype_key(dtype, matmul_precision), shape),
        lambda entry: shape_bench.measure_conv_flops(
            device,
            dtype,
            measured_shape,
            dispatch_floor_s=entry.get("dispatch_floor_s", 0.0),
            kernel_overhead_s=entry.get("kernel_overhead_s", 0.0),
        ),
        matmul_precision=matmul_precision,
        budget=budget,
    )


def lone_op_seconds(
    device: jax.Device,
    dtype: str,
    kind: str,
    shape: tuple[int, ...],
    cache_dir: str,
    matmul_precision: str = "default",
    budget: peaks_cache.Budget | None = None,
) -> tuple[float, float] | None:
    """shape_bench.measure_lone_op_seconds of one (kind, dtype, shape), cached with the
    device's peaks; None when it is not cached and `budget` is spent."""
    found = peaks_cache.cached_measurement(
        device,
        cache_dir,
        "lone_op_chain_s",
        peaks_cache.lone_key(peaks_cache.dtype_key(dtype, matmul_precision), kind, shape),
        lambda entry: shape_bench.measure_lone_op_seconds(
            device, dtype, kind, shape, entry.get("dispatch_floor_s", 0.0)
        ),
        matmul_precision=matmul_precision,
        budget=budget,
    )
    return None if found is None else (found[0], found[1])


def attention_seconds(
    device: jax.Device,
    dtype: str,
    layout: str,
    shape: tuple[int, int, int, int, int],
    cache_dir: str,
    attend: Callable[..., jax.Array],
    matmul_precision: str = "default",
    budget: peaks_cache.Budget | None = None,
) -> float | None:
    """shape_bench.measure_attention_seconds of one (dtype, layout, shape), cached with the device's
    peaks; None when it is not cached and `budget` is spent."""
    return peaks_cache.cached_measurement(
        device,
        cache_dir,
        "attention_s",
        peaks_cache.attention_key(peaks_cache.dtype_key(dtype, matmul_precision), layout, shape),
        lambda entry: shape_bench.measure_attention_seconds(
            device,
            dtype,
            layout,
            shape,
            attend,
            dispatch_floor_s=entry.get("dispatch_floor_s", 0.0),
        ),
        matmul_precision=matmul_precision,
        budget=budget,
    )


def measured_peaks(
    device: jax.Device,
    dtypes: tuple[str, ...],
    cache_dir: str,
    refresh: bool = False,
    matmul_precision: str = "default",
) -> MeasuredPeaks:
    """Measured peaks for `device`, from the cache file unless missing, incomplete or `refresh`.
    Matmul peaks are keyed by (dtype, precision) (peaks_cache.dtype_key) and measured under
    that precision."""
    path = peaks_cache.cache_path(cache_dir)
    cache = peaks_cache._load(path)
    key = peaks_cache._device_key(device)
    entry = {} if refresh else dict(cache.get(key, {}))
    flops = dict(entry.get("matmul_flops_per_s", {}))
    changed = False
    for dtype in dtypes:
        name = peaks_cache.dtype_key(dtype, matmul_precision)
        if name not in flops:
            with timing.precision_context(matmul_precision):
                flops[name] = microbench.measure_matmul_flops(device, dtype)
            changed = True
    if "last_level_cache_bytes" not in entry:
        entry["last_level_cache_bytes"], entry["last_level_cache_source"] = (
            microbench.last_level_cache(device)
        )
        changed = True
    if "dispatch_floor_s" not in entry:
        entry["dispatch_floor_s"] = microbench.measure_dispatch_floor(device)
        changed = True
    if "bandwidth" not in entry:
        entry["bandwidth"] = microbench.measure_bandwidth(
            device, dispatch_floor_s=entry["dispatch_floor_s"]
        )
        changed = True
    if "cache_bandwidth_bytes_per_s" not in entry:
        entry["cache_bandwidth_bytes_per_s"] = microbench.measure_cache_bandwidth(device)
        changed = True
    if "kernel_overhead_s" not in entry:
        entry["kernel_overhead_s"] = microbench.measure_kernel_overhead(device)
        changed = True
    entry["matmul_flops_per_s"] = flops
    entry.setdefault("gemm_flops_per_s", {})
    if changed:
        entry["measured_at"] = time.time()
        entry["jax_version"] = jax.__version__
        peaks_cache._save(path, cache, key, entry)
    return peaks_of(entry, device.platform, device.device_kind)


# A cached peak and this run's quick measurement of it disagree when one is more than this
# fraction above the other.
CHECK_TOLERANCE = 0.25


def check_cached(
    device: jax.Device, cache_dir: str, dtype: str, matmul_precision: str = "default"
) -> dict[str, Any] | None:
    """Checks the cached peaks a run is about to use against microbench.quick_peaks, measured now.

    A peak cached while the machine was busy (a first run beside other work) makes every
    later prediction wrong: such a cache held 57 GFLOP/s where the quiet machine does ~143.
    When a quick measurement now exceeds a cached value by more than CHECK_TOLERANCE, the
    device's entry is measured again (its per-shape tables dropped, to be re-measured as
    asked); when it falls short by as much, the cache is kept (the machine is busier now
    than then) and the report says so. A reading beyond the tolerance is taken again and the
    reading nearer the cache is the one that counts, so one stray reading changes nothing.
    Returns what was compared and done; None when there is nothing cached yet
    (measured_peaks measures it)."""
    entry = peaks_cache.device_entry(device, cache_dir)
    key = peaks_cache.dtype_key(dtype, matmul_precision)
    if key not in entry.get("matmul_flops_per_s", {}) or "bandwidth" not in entry:
        return None
    cached = {
        "matmul_flops_per_s": entry["matmul_flops_per_s"][key],
        "read_bytes_per_s": entry["bandwidth"]["read_bytes_per_s"],
    }
    with timing.precision_context(matmul_precision):
        readings = [microbench.quick_peaks(device, dtype)]
        if _beyond_tolerance(readings[0], cached):
            # Confirmed by a second reading before the cache is dropped or distrusted: one
            # check read the stream at 35.8 GB/s against 26.9 cached on a host whose
            # bandwidth wanders, re-measured everything, and the re-measurement read 25.5
            # and GEMM rates at half their usual values (mlp_widths' median went to 0.78).
            readings.append(microbench.quick_peaks(device, dtype))
    now = {k: _confirmed([r[k] for r in readings], cached[k]) for k in cached}
    ratios = {k: now[k] / cached[k] for k in cached}
    out = {
        "cached": cached,
        "now": now,
        "tolerance": CHECK_TOLERANCE,
        "measured_at": entry.get("measured_at"),
    }
    if len(readings) > 1:
        out["readings"] = readings
    if any(_side(r) > 0 for r in ratios.values()):
        logging.warning("peaks cache for %s reads below this machine now %s: measuring again",
                        peaks_cache._device_key(device), ratios)  # fmt: skip
        # The entry keeps only what no peak decides (the interconnect's collectives, the cache's
        # size): the peaks and every per-shape table (GEMM, conv, ragged, attention, lone-op
        # rates, measured in the same sitting as the peaks) go, to be measured again as asked.
        peaks_cache._save(peaks_cache.cache_path(cache_dir), {}, peaks_cache._device_key(device), {
            k: v for k, v in entry.items()
            if k in ("collectives", "last_level_cache_bytes", "last_level_cache_source")
        })  # fmt: skip
        out["verdict"] = "re-measured"
    elif any(_side(r) < 0 for r in ratios.values()):
        out["verdict"] = "kept: the device is slower now than when they were measured"
    else:
        out["verdict"] = "agreed"
    return out


def _side(ratio: float) -> int:
    """+1 where a reading now is more than CHECK_TOLERANCE above its cached value, −1 where
    it is as far below, 0 within."""
    if ratio > 1 + CHECK_TOLERANCE:
        return 1
    return -1 if ratio < 1 / (1 + CHECK_TOLERANCE) else 0


def _beyond_tolerance(now: dict[str, float], cached: dict[str, float]) -> bool:
    """Whether any quick reading is more than CHECK_TOLERANCE above or below its cached value."""
    return any(_side(now[k] / cached[k]) for k in cached)


def _confirmed(readings: list[float], cached: float) -> float:
    """The reading a check goes by: the one nearest the cached value (on a log scale), so a
    disagreement counts only when every reading shows it."""
    return min(readings, key=lambda r: abs(math.log(r / cached)))


def peaks_of(entry: dict[str, Any], platform: str, device_kind: str) -> MeasuredPeaks:
    """The MeasuredPeaks a cache entry (or a workdir's device_peaks.json entry) holds."""
    bw = entry["bandwidth"]
    return MeasuredPeaks(
        device_kind=device_kind,
        platform=platform,
        matmul_flops_per_s=dict(entry.get("matmul_flops_per_s", {})),
        bandwidth_bytes_per_s=max(bw["read_bytes_per_s"], bw["copy_bytes_per_s"]),
        dispatch_floor_s=entry["dispatch_floor_s"],
        kernel_overhead_s=entry["kernel_overhead_s"],
        details=entry,
        cache_bandwidth_bytes_per_s=entry["cache_bandwidth_bytes_per_s"],
    )


def ragged_flops(
    device: jax.Device,
    dtype: str,
    shape: tuple[int, ...],
    cache_dir: str,
    cold: bool = False,
    matmul_precision: str = "default",
    budget: peaks_cache.Budget | None = None,
) -> float | None:
    """Measured FLOP/s of the rows routed through a grouped product (groups, m, k, n)
    (shape_bench.measure_ragged_flops), warm or with cold weights, cached; None when it is
    not cached and `budget` is spent."""
    return peaks_cache.cached_measurement(
        device,
        cache_dir,
        "ragged_flops_per_s",
        peaks_cache.ragged_key(peaks_cache.dtype_key(dtype, matmul_precision), shape, cold),
        lambda entry: shape_bench.measure_ragged_flops(
            device,
            dtype,
            tuple(shape),
            dispatch_floor_s=entry.get("dispatch_floor_s", 0.0),
            kernel_overhead_s=entry.get("kernel_overhead_s", 0.0),
            cold=cold,
        ),
        matmul_precision=matmul_precision,
        budget=budget,
    )


def gemm_flops(
    device: jax.Device,
    dtype: str,
    shape: tuple[int, ...],
    cache_dir: str,
    cold: bool = False,
    matmul_precision: str = "default",
    budget: peaks_cache.Budget | None = None,
) -> float | None:
    """Measured FLOP/s of one GEMM shape (m, k, n), or of a batched one (batch, m, k, n),
    warm or with cold weights, cached; None when it is not cached and `budget` is spent."""
    return peaks_cache.cached_measurement(
        device,
        cache_dir,
        "gemm_flops_per_s",
        peaks_cache.gemm_key(peaks_cache.dtype_key(dtype, matmul_precision), shape, cold),
        lambda entry: shape_bench.measure_gemm_flops(
            device,
            dtype,
            *shape[-3:],
            dispatch_floor_s=entry.get("dispatch_floor_s", 0.0),
            cold=cold,
            batch=shape[0] if len(shape) == 4 else 1,
            kernel_overhead_s=entry.get("kernel_overhead_s", 0.0),
        ),
        matmul_precision=matmul_precision,
        budget=budget,
    )
