"""The peaks cache: one JSON file per cache folder, with an entry per device.

An entry holds the device's peaks and its per-shape tables. Writes are atomic, under a lock. The
module also holds the keys the tables use. It holds a per-run budget for measuring missing
items. It interpolates between measured shapes too.
"""

import fcntl
import json
import os
import re
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from absl import logging

from batching.measure import shape_bench, timing


class Budget:
    """Seconds a run's per-shape microbenchmarks may spend; None means no limit.

    A shape asked for once the budget is spent is not measured. cached_measurement then returns
    None. `refused` counts those shapes.
    """

    def __init__(self, seconds: float | None = None):
        self.seconds = seconds
        self.spent_s = 0.0
        self.refused = 0  # shapes not measured for want of budget

    @property
    def exhausted(self) -> bool:
        """Whether the seconds are spent (never without a limit)."""
        return self.seconds is not None and self.spent_s >= self.seconds


def cache_path(cache_dir: str) -> str:
    """The cache's file in `cache_dir` (~ expanded): device_peaks.json."""
    return os.path.join(os.path.expanduser(cache_dir), "device_peaks.json")


def _device_key(device: jax.Device) -> str:
    return f"{device.platform}:{device.device_kind}"


def dtype_key(dtype: str, matmul_precision: str = "default") -> str:
    """How the cache names a dtype measured under a matmul precision.

    It is "float32" for XLA's default and "float32@highest" otherwise. On a GPU, fp32 at default
    precision runs as TF32.
    """
    if matmul_precision in (None, "default"):
        return dtype
    return f"{dtype}@{matmul_precision}"


def gemm_key(dkey: str, shape: tuple[int, ...], cold: bool) -> str:
    """ "float32:1024x1024x1024:warm", or "float32:8@64x512x512:cold" for 8 batched products."""
    batch, (m, k, n) = (1, shape) if len(shape) == 3 else (shape[0], shape[1:])
    prefix = f"{batch}@" if batch > 1 else ""
    return f"{dkey}:{prefix}{m}x{k}x{n}" + (":cold" if cold else ":warm")


def ragged_key(dkey: str, shape: tuple[int, ...], cold: bool = False) -> str:
    """ "float32:8@512x64x128:warm": a grouped product of 8 groups, 512 rows in all.

    Its weights are warm. ":cold" means they are read from DRAM.
    """
    groups, m, k, n = shape
    return f"{dkey}:{groups}@{m}x{k}x{n}" + (":cold" if cold else ":warm")


def conv_key(dkey: str, shape: tuple[int, ...]) -> str:
    """ "float32:16x56x56x64x64x3x1": a conv at the batch it is measured at.

    That batch is shape_bench.conv_measured_batch.
    """
    return f"{dkey}:{_dims((shape_bench.conv_measured_batch(shape), *shape[1:]))}"


def attention_key(dkey: str, layout: str, shape: tuple[int, ...]) -> str:
    """ "float32:bksh:8x4x1024x3x64": (batch, kv_heads, cache_len, q_per_kv, head_dim)."""
    return f"{dkey}:{layout}:{_dims(shape)}"


def lone_key(dkey: str, kind: str, shape: tuple[int, ...]) -> str:
    """ "gemm:float32:2x64x64": a lone op's kind, dtype key and shape."""
    return f"{kind}:{dkey}:{_dims(shape)}"


def _dims(shape: tuple[int, ...]) -> str:
    """A shape as a cache key part: (2, 64, 64) -> "2x64x64"."""
    return "x".join(str(int(n)) for n in shape)


def device_entry(device: jax.Device, cache_dir: str) -> dict[str, Any]:
    """What the peaks cache holds for `device`, as a copy; empty if nothing."""
    return dict(_load(cache_path(cache_dir)).get(_device_key(device), {}))


def cached_measurement(
    device: jax.Device,
    cache_dir: str,
    table: str,
    name: str,
    measure: Callable[[dict[str, Any]], Any],
    refresh: bool = False,
    matmul_precision: str = "default",
    budget: Budget | None = None,
) -> Any:
    """Item `name` of the device's `table` in the peaks cache, measured only when missing.

    `measure(entry)` runs when the item is missing, or with `refresh`. It runs under
    `matmul_precision`, and its result is saved. `entry` is the device's cached peaks. The
    per-shape microbenchmarks take its dispatch floor and kernel overhead off. Once `budget` is
    spent, a missing item is None, not measured. The seconds a measurement takes are charged to
    `budget`.
    """
    entry = device_entry(device, cache_dir)
    values = dict(entry.get(table, {}))
    if refresh or name not in values:
        if budget is not None and budget.exhausted:
            budget.refused += 1
            return None
        start = time.perf_counter()
        with timing.precision_context(matmul_precision):
            values[name] = measure(entry)
        if budget is not None:
            budget.spent_s += time.perf_counter() - start
        entry = device_entry(device, cache_dir)  # others may have added items meanwhile
        entry[table] = {**entry.get(table, {}), name: values[name]}
        _save(cache_path(cache_dir), {}, _device_key(device), entry)
    return values[name]


# Per-shape tables, and how their keys vary along the swept dimension (a GEMM's m, a conv's or
# an attention's batch): the key's text before and after that number, and whether the value
# is a rate (FLOP/s, grows with the work) or seconds.
_SWEPT = {
    "gemm_flops_per_s": (r"(?P<pre>[^:]+:(?:\d+@)?)(?P<x>\d+)(?P<post>(?:x\d+){2}:\w+)", True),
    "conv_flops_per_s": (r"(?P<pre>[^:]+:)(?P<x>\d+)(?P<post>(?:x\d+){6})", True),
    "ragged_flops_per_s": (r"(?P<pre>[^:]+:\d+@)(?P<x>\d+)(?P<post>(?:x\d+){2}:\w+)", True),
    "attention_s": (r"(?P<pre>[^:]+:[^:]+:)(?P<x>\d+)(?P<post>(?:x\d+){4})", False),
}


def interpolate(entry: dict[str, Any], table: str, name: str) -> float | None:
    """An unmeasured per-shape item, from measured items of the same family.

    A family shares the key but for the swept dimension x. For attention the rate is x over its
    seconds. The rate is interpolated linearly in log rate over log x. It uses the nearest
    measured x on each side. Beyond them it is held at the nearest one. It is None when the
    family has no measured item.
    """
    pattern, is_rate = _SWEPT[table]
    match = re.fullmatch(pattern, name)
    if match is None:
        return None
    known = []
    for other, value in entry.get(table, {}).items():
        m = re.fullmatch(pattern, other)
        if m and m["pre"] == match["pre"] and m["post"] == match["post"] and value:
            x = float(m["x"])
            known.append((x, float(value) if is_rate else x / float(value)))
    if not known:
        return None
    known.sort()
    xs, rates = np.log([k[0] for k in known]), np.log([k[1] for k in known])
    x = float(match["x"])
    rate = float(np.exp(np.interp(np.log(x), xs, rates)))
    return rate if is_rate else x / rate


def _load(path: str) -> dict[str, Any]:
    """The peaks cache, as a dict.

    A corrupt or unreadable file reads as empty, with a warning. Its peaks are measured again.
    """
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            cache = json.load(f)
    except (OSError, ValueError) as e:
        logging.warning("peaks cache %s is unreadable (%s); measuring the peaks again", path, e)
        return {}
    if not isinstance(cache, dict):
        logging.warning("peaks cache %s is not a JSON object; measuring the peaks again", path)
        return {}
    return cache


def _save(path: str, cache: dict[str, Any], key: str, entry: dict[str, Any]) -> None:
    """Merges `entry` into the cache on disk, under a lock.

    It writes a temp file, then renames it. Two processes measuring at once both keep their
    entries. Neither leaves half a file.
    """
    del cache  # re-read under the lock: another process may have written since
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        cache = {**_load(path), key: entry}
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".peaks-", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(cache, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
