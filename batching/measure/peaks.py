"""A device's measured peaks, read from the cache or measured once and cached.

- The square-matmul FLOP/s, per dtype and precision.
- The stream and cache bandwidths.
- The dispatch floor and the kernel overhead.

A run checks the cached peaks against a quick measurement before it uses them. The module also
looks up the per-shape rates: GEMM, conv, lone op, attention. What is missing is measured within
a run's budget.
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
    """What the device reached in microbenchmarks, in FLOP/s, bytes/s and seconds."""

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
        """The square-matmul peak in FLOP/s of `dtype` under `matmul_precision`."""
        return self.matmul_flops_per_s[peaks_cache.dtype_key(dtype, matmul_precision)]


def conv_flops(
    device: jax.Device,
    dtype: str,
    shape: tuple[int, ...],
    cache_dir: str,
    matmul_precision: str = "default",
    budget: peaks_cache.Budget | None = None,
) -> float | None:
    """Measured FLOP/s of a conv shape, cached.

    It runs shape_bench.measure_conv_flops at shape_bench.conv_measured_batch. It is None when
    it is not cached and `budget` is spent.
    """
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
    """shape_bench.measure_lone_op_seconds of one (kind, dtype, shape), cached.

    It returns (one, many) seconds. It is None when it is not cached and `budget` is spent.
    """
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
    """shape_bench.measure_attention_seconds of one (dtype, layout, shape), cached.

    It is None when it is not cached and `budget` is spent.
    """
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
    """Measured peaks for `device`, from the cache file.

    What the file lacks is measured and saved. `refresh` measures everything again. Matmul peaks
    are keyed by (dtype, precision) (peaks_cache.dtype_key). Each is measured under its
    precision.
    """
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
    """Checks the cached peaks a run will use against microbench.quick_peaks, measured now.

    A peak cached while the machine was busy makes every later prediction wrong. A first run
    beside other work can cache one. A quick reading may exceed a cached value by more than
    CHECK_TOLERANCE. The device's entry is then measured again. Its per-shape tables are
    dropped, to be measured again as asked. A reading short by as much keeps the cache. The
    machine is then busier now than before, and the report says so. A reading beyond the
    tolerance is taken a second time. The reading nearer the cache counts. So one stray reading
    changes nothing. `experiments/results/cpu-2core-epyc/README.md` ("The peaks check") shows
    the readings behind these rules.

    Returns what was compared and done: `cached`, `now`, `tolerance`, `measured_at` and
    `verdict`. With a second reading, `readings` holds both. It is None when nothing is cached
    yet. measured_peaks measures it then.
    """
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
            # A second reading confirms a disagreement before the cache is dropped or
            # distrusted: on a host whose bandwidth wanders, one stray reading would re-measure
            # everything at a bad moment ("The peaks check" in
            # experiments/results/cpu-2core-epyc/README.md).
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
    """+1 where a reading now is more than CHECK_TOLERANCE above its cached value.

    −1 where it is as far below, and 0 within.
    """
    if ratio > 1 + CHECK_TOLERANCE:
        return 1
    return -1 if ratio < 1 / (1 + CHECK_TOLERANCE) else 0


def _beyond_tolerance(now: dict[str, float], cached: dict[str, float]) -> bool:
    """Whether any quick reading is beyond CHECK_TOLERANCE of its cached value."""
    return any(_side(now[k] / cached[k]) for k in cached)


def _confirmed(readings: list[float], cached: float) -> float:
    """The reading a check goes by: the one nearest the cached value, on a log scale.

    So a disagreement counts only when every reading shows it.
    """
    return min(readings, key=lambda r: abs(math.log(r / cached)))


def peaks_of(entry: dict[str, Any], platform: str, device_kind: str) -> MeasuredPeaks:
    """The MeasuredPeaks that a cache entry holds.

    A workdir's device_peaks.json entry works too.
    """
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
    """Measured FLOP/s of the rows routed through a grouped product (groups, m, k, n), cached.

    It runs shape_bench.measure_ragged_flops with warm or `cold` weights. It is None when it is
    not cached and `budget` is spent.
    """
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
    """Measured FLOP/s of one GEMM shape, cached.

    The shape is (m, k, n), or (batch, m, k, n) for a batched product. The weights are warm, or
    cold with `cold`. It is None when it is not cached and `budget` is spent.
    """
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
