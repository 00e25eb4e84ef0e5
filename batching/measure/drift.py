"""How far the machine itself moves between runs, from a log of quick readings.

A host can run 10% slower for a whole run. A neighbour on the hypervisor can cause it. So can
memory bandwidth shared with other guests, or clocks. Every point of that run is then 10%
slower. No spread between one run's passes can show that.

So the lab keeps a log per device and dtype (DRIFT_LOG). It lies beside the peaks cache. Each
run checks the cached peaks (peaks.check_cached). The check reads two rates
(microbench.quick_peaks). One is the square matmul's FLOP/s. The other is the streaming read
bandwidth. Every reading is logged with its time. A reading's speed index is the geometric mean
of its two rates. The spread of that index over recent readings is the drift. The analysis adds
it to each point's interval (pass_stats.with_drift).
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
    """The machine's drift between runs.

    - `sd`: the standard deviation of the log speed index.
    - `readings`: how many readings it comes from.
    - `span_s`: the seconds those readings span.
    """

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
    """Appends `readings` for `key` to the log, under a lock.

    `readings` are quick_peaks dicts. `key` is "<device>/<dtype>". `when` is the readings' time
    in epoch seconds, now by default. The log keeps the newest MAX_READINGS per key. A log that
    cannot be written is skipped with a warning. It is context for intervals. It is never a
    reason to fail a run.
    """
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
    """The drift for `key`, from its readings of the last WINDOW_S seconds.

    It is None below MIN_READINGS readings. It is None when a logged rate is not positive.
    """
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
