"""How far the machine itself moves between runs, from a log of quick reference readings.

A run timed while its host is 10% slower (a neighbour on the hypervisor, memory bandwidth
shared with other guests, clocks) is 10% slower at every point for the whole run; no spread
between one run's passes can show that. The lab keeps a log per device and dtype, beside the
peaks cache (DRIFT_LOG): each run's check of the cached peaks (peaks.check_cached) reads the
square matmul's FLOP/s and the streaming read bandwidth (microbench.quick_peaks), and every
reading is logged with its time. The spread of the log's speed index (the geometric mean of
the two rates) over its recent readings is the machine's drift between runs: the analysis
adds it to each point's interval (pass_stats.with_drift).
"""

import dataclasses
import fcntl
import json
import math
import os
import tempfile
import time
from typing import Any

import numpy as np
from absl import logging

DRIFT_LOG = "drift_log.json"
# Readings older than this say nothing about today's machine; the log keeps at most
# MAX_READINGS per device and dtype, and a drift needs MIN_READINGS.
WINDOW_S = 24 * 3600.0
MAX_READINGS = 50
MIN_READINGS = 4


@dataclasses.dataclass(frozen=True)
class Drift:
    """The machine's drift between runs: the standard deviation of the log speed index over
    `readings` readings spanning `span_s` seconds."""

    sd: float
    readings: int
    span_s: float


def _path(cache_dir: str) -> str:
    return os.path.join(os.path.expanduser(cache_dir), DRIFT_LOG)


def _load(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            log = json.load(f)
        return log if isinstance(log, dict) else {}
    except (OSError, ValueError):
        return {}


def record(cache_dir: str, key: str, readings: list[dict[str, float]], when: float | None = None):
    """Appends `readings` (quick_peaks dicts) for `key` ("<device>/<dtype>") to the log, under a
    lock, keeping the newest MAX_READINGS; a log that cannot be written is skipped with a
    warning (it is context for intervals, never a reason to fail a run)."""
    when = time.time() if when is None else when
    path = _path(cache_dir)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            log = _load(path)
            entries = log.get(key, []) + [
                [when, r["matmul_flops_per_s"], r["read_bytes_per_s"]] for r in readings
            ]
            log[key] = entries[-MAX_READINGS:]
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".drift-")
            with os.fdopen(fd, "w") as f:
                json.dump(log, f)
            os.replace(tmp, path)
    except OSError as e:
        logging.warning("drift log %s not written: %s", path, e)


def drift(cache_dir: str, key: str, now: float | None = None) -> Drift | None:
    """The drift for `key` from its readings of the last WINDOW_S; None below MIN_READINGS."""
    now = time.time() if now is None else now
    entries = [e for e in _load(_path(cache_dir)).get(key, []) if now - e[0] <= WINDOW_S]
    if len(entries) < MIN_READINGS:
        return None
    t, matmul, read = (np.array(col, dtype=float) for col in zip(*entries, strict=True))
    if not (np.all(matmul > 0) and np.all(read > 0)):
        return None
    speed = 0.5 * (np.log(matmul) + np.log(read))
    sd = float(np.std(speed, ddof=1))
    return Drift(sd, len(entries), float(t.max() - t.min())) if math.isfinite(sd) else None
