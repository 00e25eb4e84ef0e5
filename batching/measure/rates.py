"""Where an analysis takes a device's peaks and per-shape rates from: the peaks cache
(measuring what is missing, within a run's budget) or a peaks file (measuring nothing).

The analysis (batching.predict) is handed a RateSource and never imports a microbenchmark:
everything measured while a run is analysed is measured here, in its device-model stage
(before any prediction, the sweep's ends first), and `freeze` makes the rest read-only.
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


def _drift_key(device_key: str, dtype: str, precision: str) -> str:
    """The drift log's key: the device and the dtype its matmul reading was taken in."""
    return f"{device_key}/{peaks_cache.dtype_key(dtype, precision)}"


def microbenchmark_budget(roofline_cfg: Any, platform: str) -> float | None:
    """The run's budget for per-shape microbenchmarks in seconds (None: no limit)."""
    budget = roofline_cfg.get("microbenchmark_budget_s")
    if budget is None:
        return None if platform == "cpu" else ACCELERATOR_BUDGET_S
    return float(budget)


class RateSource:
    """Where a run's analysis takes the device's peaks and per-shape rates from.

    From the peaks cache (`cache_dir`), measuring what is missing: the base peaks always, the
    per-shape rates (GEMM, conv, attention, lone ops) within the run's budget (`start_run`).
    Or from a peaks file (`peaks_file`, a workdir's device_peaks.json: rows measured on
    another machine analysed here), measuring nothing. A per-shape rate that is neither
    cached nor measured is interpolated from the measured shapes of its family
    (peaks_cache.interpolate), else the op runs at the peak; `unmeasured` names them.
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
        """Measure nothing more this run: what is not cached is interpolated or the peak."""
        self.budget.seconds = self.budget.spent_s

    def last_level_cache(self, device: Any) -> int:
        """Bytes of the device's last-level cache (microbench.last_level_cache)."""
        return microbench.last_level_cache_bytes(device)

    def best_rate(
        self, device: Any, dtype: str, precision: str, min_flops: float
    ) -> tuple[float, str] | None:
        """The highest per-shape GEMM or conv rate cached for the device in this dtype and
        precision, among shapes of at least `min_flops` per kernel (a small kernel's rate rests
        on subtracting a call's fixed costs); (FLOP/s, which), or None."""
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
        """{mesh axis: {collective: bus bytes/s}} measured on this mesh at the default payload
        (collectives.measure_run during the sweep); axes of one device have none."""
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
        """The device's entry of the cache (or of the peaks file), a copy."""
        return peaks_cache.device_entry(device, self.cache_dir)

    def peaks(self, device: Any, dtype: str, precision: str = "default") -> peaks.MeasuredPeaks:
        """The device's peaks in `dtype` at `precision`: the peaks file's (NoPeaks where it has
        none), else the cache's, measured where missing or refreshed, checked once per device."""
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
        """The device's drift between runs (drift.Drift) from the readings logged beside the
        peaks cache; None with a peaks file (rows measured elsewhere) or too few readings."""
        if self.peaks_file:
            return None
        key = f"{device.platform}:{device.device_kind}"
        return drift.drift(self._log_dir, _drift_key(key, dtype, precision))

    def _measure_privately(self) -> None:
        """From now on, read the cache from a private copy and save what is measured there:
        rates measured while the device reads slower than when its peaks were cached would
        skew every later run (on the 2-core CPU here, mlp_widths' prediction median went from
        0.19 to 0.77 on a quiet machine once a busy run had cached its GEMM rates)."""
        if self._copy is None:
            self.cache_dir = self._private_copy(
                peaks_cache.cache_path(self.cache_dir), "lab_peaks_busy_"
            )

    def _private_copy(self, cache_file: str, prefix: str) -> str:
        """A temporary cache folder holding a copy of `cache_file` (none if it does not
        exist), removed with this object: its name."""
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
        """FLOP/s of a GEMM at its shape, (m, k, n) or (batch, m, k, n), warm or with `cold`
        weights, cached; interpolated, or None, where not measured."""

        def rate(shape):
            name = peaks_cache.gemm_key(peaks_cache.dtype_key(dtype, precision), shape, cold)
            found = peaks.gemm_flops(
                device, dtype, shape, self.cache_dir, cold, precision, self.budget
            )
            return self._or_interpolated(device, "gemm_flops_per_s", name, found)

        return rate

    def ragged(self, device: Any, dtype: str, cold: bool, precision: str = "default"):
        """FLOP/s of the rows routed through a grouped product at its shape (groups, m, k,
        n), warm or with `cold` weights, cached; interpolated, or None, where not measured."""

        def rate(shape):
            name = peaks_cache.ragged_key(peaks_cache.dtype_key(dtype, precision), shape, cold)
            found = peaks.ragged_flops(
                device, dtype, shape, self.cache_dir, cold, precision, self.budget
            )
            return self._or_interpolated(device, "ragged_flops_per_s", name, found)

        return rate

    def conv(self, device: Any, dtype: str, precision: str = "default"):
        """FLOP/s of a conv at its shape (ops.Op's conv shape), cached; interpolated, or None, where
        not measured."""

        def rate(shape):
            name = peaks_cache.conv_key(peaks_cache.dtype_key(dtype, precision), shape)
            found = peaks.conv_flops(device, dtype, shape, self.cache_dir, precision, self.budget)
            return self._or_interpolated(device, "conv_flops_per_s", name, found)

        return rate

    def lone(self, device: Any, dtype: str, precision: str = "default"):
        """Seconds of a call running one small op alone, beyond the dispatch floor, cached."""

        def seconds(op):
            shape = tuple(op.shape)
            name = peaks_cache.lone_key(peaks_cache.dtype_key(dtype, precision), op.kind, shape)
            found = peaks.lone_op_seconds(
                device, dtype, op.kind, shape, self.cache_dir, precision, self.budget
            )
            return self._or_interpolated(device, "lone_op_chain_s", name, found)

        return seconds

    def attention(self, device: Any, attend: Callable[..., jax.Array], precision: str = "default"):
        """Seconds of one attention shape (a row's `attention_shapes` entry), cached;
        `attend` is the model's attention over its cache (the workload module's ATTEND)."""

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
        """The bus bandwidth (bytes/s) a row's collectives entry reaches at its own payload,
        from the latency-bandwidth model of the cached microbenchmarks the sweep ran
        (collectives.measure_run, collectives.effective_busbw); None where not measured."""
        return lambda c: collectives.effective_busbw(device, c, self.cache_dir)
