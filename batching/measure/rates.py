"""Where an analysis takes a device's peaks and per-shape rates from.

One source is the peaks cache. It measures what is missing, within a run's budget. The other is
a peaks file, which measures nothing.

The analysis (batching.predict) is handed a RateSource. It never imports a microbenchmark.
Everything measured while a run is analysed is measured here, in its device-model stage. That
stage runs after the sweep and before any prediction. `freeze` makes the rest read-only.
"""

import dataclasses
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

import jax

from batching.measure import collectives, drift, microbench, peaks, peaks_cache, shape_bench


class NoPeaks(ValueError):
    """A peaks file holds nothing for a run's device (or dtype).

    The run is not analysed.
    """


@dataclasses.dataclass(frozen=True)
class DeviceRef:
    """A device known by its platform and kind only.

    It stands for the rows' device when a workdir measured elsewhere is analysed here. The peaks
    then come from a peaks file. Nothing is measured on it.
    """

    platform: str
    device_kind: str
    id: int = 0


# Seconds of per-shape microbenchmarks a run's analysis may spend on an accelerator when
# roofline.microbenchmark_budget_s is unset (a CPU: no limit). A GPU lease is minutes long,
# and every shape costs a compile; beyond the budget, rates are interpolated.
ACCELERATOR_BUDGET_S = 45.0


def _drift_key(device_key: str, dtype: str, precision: str) -> str:
    """The drift log's key: the device and the dtype its matmul reading was taken in."""
    return f"{device_key}/{peaks_cache.dtype_key(dtype, precision)}"


def microbenchmark_budget(roofline_cfg: Any, platform: str) -> float | None:
    """The run's budget for per-shape microbenchmarks, in seconds.

    None means no limit. That is the default on a CPU. An accelerator defaults to
    ACCELERATOR_BUDGET_S.
    """
    budget = roofline_cfg.get("microbenchmark_budget_s")
    if budget is None:
        return None if platform == "cpu" else ACCELERATOR_BUDGET_S
    return float(budget)


class RateSource:
    """Where a run's analysis takes the device's peaks and per-shape rates from.

    With `cache_dir` it reads the peaks cache and measures what is missing. The base peaks are
    always measured. The per-shape rates (GEMM, conv, attention, lone ops) are measured within
    the run's budget (`start_run`).

    With `peaks_file` it reads a workdir's device_peaks.json and measures nothing. That serves
    rows measured on another machine and analysed here.

    A per-shape rate may be neither cached nor measured. It is then interpolated from the
    measured shapes of its family (peaks_cache.interpolate). Failing that, the op runs at the
    peak. `unmeasured` names these rates.
    """

    def __init__(
        self, cache_dir: str, refresh: bool, peaks_file: str | None = None, check: bool = True
    ):
        self.peaks_file = peaks_file
        self._check = check
        self._copy: tempfile.TemporaryDirectory | None = None
        if peaks_file:
            if not os.path.isfile(peaks_file):
                raise ValueError(f"roofline.peaks_file does not exist: {peaks_file!r}")
            # A private copy as the cache: lookups read it, and nothing can write the file.
            cache_dir = self._private_copy(peaks_file, "lab_peaks_file_")
        self.cache_dir = cache_dir
        # The drift log stays in the shared cache folder, even when the peaks are read from
        # a private copy (a busy machine's readings are what the log is for).
        self._log_dir = cache_dir
        self._refresh = refresh and not peaks_file
        self._refreshed: set[str] = set()
        self.budget = peaks_cache.Budget(0.0 if peaks_file else None)
        self.unmeasured: dict[str, str] = {}
        # Per device: this run's check of the cached peaks (peaks.check_cached).
        self.checks: dict[str, dict[str, Any] | None] = {}

    def start_run(self, budget_s: float | None) -> None:
        """A new run: its own microbenchmark budget (none with a peaks file) and tally."""
        self.budget = peaks_cache.Budget(0.0 if self.peaks_file else budget_s)
        self.unmeasured = {}

    def freeze(self) -> None:
        """Measures nothing more this run.

        What is not cached is interpolated, or priced at the peak.
        """
        self.budget.seconds = self.budget.spent_s

    def last_level_cache(self, device: Any) -> int:
        """Bytes of the device's last-level cache (microbench.last_level_cache)."""
        return microbench.last_level_cache_bytes(device)

    def best_rate(
        self, device: Any, dtype: str, precision: str, min_flops: float
    ) -> tuple[float, str] | None:
        """The highest per-shape GEMM or conv rate cached for this device, dtype and precision.

        Only shapes of at least `min_flops` per kernel count. A small kernel's rate rests on
        subtracting a call's fixed costs. Returns (FLOP/s, which microbenchmark), or None.
        """
        dkey = peaks_cache.dtype_key(dtype, precision)
        entry, best = self.entry(device), None
        patterns = {
            "gemm_flops_per_s": r"(?:(\d+)@)?(\d+)x(\d+)x(\d+):\w+",
            "conv_flops_per_s": r"(\d+x){6}\d+",
        }
        for table, pattern in patterns.items():
            for key, rate in entry.get(table, {}).items():
                name = key[len(dkey) + 1 :] if key.startswith(dkey + ":") else ""
                m = re.fullmatch(pattern, name)
                if not m or not rate or (best and rate <= best[0]):
                    continue
                if table == "gemm_flops_per_s":
                    batch = int(m.group(1) or 1)
                    flops = 2.0 * batch * int(m.group(2)) * int(m.group(3)) * int(m.group(4))
                else:
                    flops = shape_bench.conv_flops_of(tuple(int(x) for x in name.split("x")))
                if flops >= min_flops:
                    best = (float(rate), f"{table.split('_')[0].upper()} microbenchmark {name}")
        return best

    def measured_busbw(self, device: Any, mesh_shape: dict[str, int]) -> dict[str, dict]:
        """{mesh axis: {collective: bus bytes/s}} measured on this mesh at the default payload.

        collectives.measure_run measures them during the sweep. Axes of one device have none.
        """
        out: dict[str, dict] = {}
        for axis, n in mesh_shape.items():
            for kind in collectives.MEASURED:
                r = n > 1 and collectives.lookup(
                    device, kind, n, collectives.DEFAULT_PAYLOAD_BYTES, self.cache_dir
                )
                if r:
                    out.setdefault(axis, {})[kind] = r["busbw_bytes_per_s"]
        return out

    def entry(self, device: Any) -> dict[str, Any]:
        """The device's entry of the cache (or of the peaks file), as a copy."""
        return peaks_cache.device_entry(device, self.cache_dir)

    def peaks(self, device: Any, dtype: str, precision: str = "default") -> peaks.MeasuredPeaks:
        """The device's peaks in `dtype` at `precision`.

        With a peaks file they are the file's. NoPeaks is raised where it has none. Otherwise
        they are the cache's, measured where missing or refreshed. They are checked once per
        device.
        """
        key = f"{device.platform}:{device.device_kind}"
        if self.peaks_file:
            entry = self.entry(device)
            if "bandwidth" not in entry or peaks_cache.dtype_key(dtype, precision) not in entry.get(
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
            check = self.checks[key]
            if check is not None:
                # The check's readings are the machine's speed now: the drift log's entries.
                readings = check.get("readings") or [check["now"]]
                drift.record(self._log_dir, _drift_key(key, dtype, precision), readings)
            if (self.checks[key] or {}).get("verdict", "").startswith("kept"):
                self._measure_privately()
        refresh = self._refresh and first
        return peaks.measured_peaks(device, (dtype,), self.cache_dir, refresh, precision)

    def machine_drift(self, device: Any, dtype: str, precision: str = "default") -> Any:
        """The device's drift between runs (drift.Drift), from the log beside the peaks cache.

        It is None with a peaks file: those rows were measured elsewhere. It is None with too
        few readings too.
        """
        if self.peaks_file:
            return None
        key = f"{device.platform}:{device.device_kind}"
        return drift.drift(self._log_dir, _drift_key(key, dtype, precision))

    def _measure_privately(self) -> None:
        """From now on, reads the cache from a private copy, and saves what is measured there.

        It runs when the device reads slower now than when its peaks were cached. Rates measured
        now would skew every later run. `experiments/results/cpu-2core-epyc/README.md` ("The
        peaks check") shows a busy run's GEMM rates doing so.
        """
        if self._copy is None:
            self.cache_dir = self._private_copy(
                peaks_cache.cache_path(self.cache_dir), "lab_peaks_busy_"
            )

    def _private_copy(self, cache_file: str, prefix: str) -> str:
        """A temporary cache folder holding a copy of `cache_file`, removed with this object.

        Returns the folder's name. Without `cache_file` the folder is empty.
        """
        self._copy = tempfile.TemporaryDirectory(prefix=prefix)
        if os.path.exists(cache_file):
            shutil.copy(cache_file, peaks_cache.cache_path(self._copy.name))
        return self._copy.name

    def _or_interpolated(self, device: Any, table: str, name: str, value: Any) -> Any:
        if value is None and table != "lone_op_chain_s":
            value = peaks_cache.interpolate(self.entry(device), table, name)
            self.unmeasured[f"{table}:{name}"] = "interpolated" if value else "peak"
        elif value is None:
            self.unmeasured[f"{table}:{name}"] = "not small-op priced"
        return value

    def gemm(self, device: Any, dtype: str, cold: bool, precision: str = "default"):
        """A function from a GEMM's shape to its FLOP/s, cached.

        The shape is (m, k, n) or (batch, m, k, n). The weights are warm, or cold with `cold`.
        An unmeasured rate is interpolated, or None.
        """

        def rate(shape):
            name = peaks_cache.gemm_key(peaks_cache.dtype_key(dtype, precision), shape, cold)
            found = peaks.gemm_flops(
                device, dtype, shape, self.cache_dir, cold, precision, self.budget
            )
            return self._or_interpolated(device, "gemm_flops_per_s", name, found)

        return rate

    def ragged(self, device: Any, dtype: str, cold: bool, precision: str = "default"):
        """A function from a grouped product's shape (groups, m, k, n) to its FLOP/s, cached.

        The FLOP/s are those of the rows routed through it. The weights are warm, or cold with
        `cold`. An unmeasured rate is interpolated, or None.
        """

        def rate(shape):
            name = peaks_cache.ragged_key(peaks_cache.dtype_key(dtype, precision), shape, cold)
            found = peaks.ragged_flops(
                device, dtype, shape, self.cache_dir, cold, precision, self.budget
            )
            return self._or_interpolated(device, "ragged_flops_per_s", name, found)

        return rate

    def conv(self, device: Any, dtype: str, precision: str = "default"):
        """A function from a conv's shape (ops.Op's conv shape) to its FLOP/s, cached.

        An unmeasured rate is interpolated, or None.
        """

        def rate(shape):
            name = peaks_cache.conv_key(peaks_cache.dtype_key(dtype, precision), shape)
            found = peaks.conv_flops(device, dtype, shape, self.cache_dir, precision, self.budget)
            return self._or_interpolated(device, "conv_flops_per_s", name, found)

        return rate

    def lone(self, device: Any, dtype: str, precision: str = "default"):
        """A function from a small op to its lone-op seconds (one, many), cached.

        They are the seconds of a call running the op alone, beyond the dispatch floor. An
        unmeasured op gives None.
        """

        def seconds(op):
            shape = tuple(op.shape)
            name = peaks_cache.lone_key(peaks_cache.dtype_key(dtype, precision), op.kind, shape)
            found = peaks.lone_op_seconds(
                device, dtype, op.kind, shape, self.cache_dir, precision, self.budget
            )
            return self._or_interpolated(device, "lone_op_chain_s", name, found)

        return seconds

    def attention(self, device: Any, attend: Callable[..., jax.Array], precision: str = "default"):
        """A function from an attention shape to its seconds, cached.

        The shape is a row's `attention_shapes` entry. `attend` is the model's attention over
        its cache (the workload module's ATTEND).
        """

        def seconds(s: dict[str, Any]) -> float | None:
            shape = (s["batch"], s["kv_heads"], s["cache_len"], s["q_per_kv"], s["head_dim"])
            name = peaks_cache.attention_key(
                peaks_cache.dtype_key(s["dtype"], precision), s["layout"], shape
            )
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
        """A function from a row's collectives entry to its bus bandwidth (bytes/s).

        The bandwidth is at the entry's own payload. It comes from the latency-bandwidth model
        of the cached microbenchmarks the sweep ran (collectives.measure_run).
        collectives.effective_busbw computes it. It is None where not measured.
        """
        return lambda c: collectives.effective_busbw(device, c, self.cache_dir)
