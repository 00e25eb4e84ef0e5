"""The workdir's files, and how they are read and written.

- config.json: the config and each run's fingerprint.
- results.jsonl: one row per point.
- samples.jsonl: each point's timing samples, per pass.
- summary.json: one summary per run.
- device_peaks.json: the device peaks the analysis used.

Rows are appended, flushed and fsynced one at a time. So an interrupted sweep keeps every
point it finished. A rerun resumes where the sweep stopped. It skips a point whose run,
batch size and fingerprint are in results.jsonl already.
"""

import fcntl
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Iterable
from typing import Any

import numpy as np
from absl import logging

from batching import summaries

CONFIG = "config.json"
RESULTS = "results.jsonl"
SAMPLES = "samples.jsonl"
SUMMARY = "summary.json"
# The device peaks the analysis used, in the peaks cache's format: rows measured on a rented
# accelerator can be analysed anywhere with them (roofline.peaks_file).
PEAKS = "device_peaks.json"
# Files and folders a run writes; `overwrite` moves them to archive/<time>/.
# A serving run's per-request records, and each policy's calibration (batching.serving).
REQUESTS = "requests.jsonl"
CALIBRATION = "serving_calibration.json"
OUTPUTS = (CONFIG, RESULTS, SAMPLES, SUMMARY, PEAKS, REQUESTS, CALIBRATION, "plots", "tb",
           "report.md", "report.html")  # fmt: skip


def _finite_or_null(obj: Any) -> Any:
    """NaN and infinity as null: strict JSON readers (a browser's) reject them.

    A NumPy scalar becomes its Python number first.
    """
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_null(v) for v in obj]
    return obj


class WorkdirError(ValueError):
    """The workdir cannot be used as asked. The message says why, in one line."""


def fingerprint(run_measurement_cfg: dict[str, Any]) -> str:
    """Short stable hash of what decides a run's measurements.

    It is the first 16 hex digits of a SHA-256 over the config's sorted JSON.
    """
    blob = json.dumps(run_measurement_cfg, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def check_writable(workdir: str) -> None:
    """Raises WorkdirError unless `workdir` is writable or can be created.

    The check leaves nothing behind. A missing workdir is created and removed again, with
    any parents it needed. Only mkdir tells for sure. A path under a folder that takes no
    new entries (/proc) passes os.access but fails mkdir.
    """
    if not workdir:
        raise WorkdirError("workdir is missing: pass --workdir=<dir>")
    path = os.path.abspath(workdir)
    if os.path.exists(path) and not os.path.isdir(path):
        raise WorkdirError(f"workdir is not a directory: {workdir!r}")
    if os.path.isdir(path):
        if not os.access(path, os.W_OK | os.X_OK):
            raise WorkdirError(f"workdir is not writable: {workdir!r}")
        return
    first = path
    while not os.path.exists(os.path.dirname(first)):
        first = os.path.dirname(first)
    try:
        os.makedirs(path)
    except OSError as e:
        raise WorkdirError(f"workdir cannot be created: {workdir!r} ({e.strerror})") from None
    shutil.rmtree(first, ignore_errors=True)


def lock_workdir(workdir: str):
    """An OS-level lock on the workdir, released when the process dies.

    A held lock raises a WorkdirError.
    """
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, ".lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise WorkdirError(
            f"workdir {workdir!r} is in use by process {holder}; wait or use another workdir"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


def _read_jsonl(path: str) -> list[dict[str, Any]]:
    """Rows of a JSON-lines file. A torn line, left by a kill mid-write, ends the read.

    The torn line is skipped with a warning, and its point is measured again.
    """
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            try:
                if not line.endswith("\n"):
                    raise ValueError("no newline")
                rows.append(json.loads(line))
            except ValueError:
                logging.warning("%s: ignoring a torn line (that point is measured again)", path)
                break
    return rows


def latest(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (run, batch size): the last one written. A retried point replaces its error."""
    return list({(r["run"], r["batch_size"]): r for r in rows}.values())


def is_ok(row: dict[str, Any]) -> bool:
    """Whether the row is a measured point. A row without a status counts as one."""
    return row.get("status", "ok") == "ok"


def _drop_torn_tail(path: str) -> None:
    # A torn last line would glue itself to the next row appended after it.
    if not os.path.exists(path):
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


class Store:
    """Reads and writes one workdir."""

    def __init__(self, workdir: str):
        self.workdir = os.path.abspath(workdir)

    def path(self, *parts: str) -> str:
        """A path inside the workdir."""
        return os.path.join(self.workdir, *parts)

    def conflicts(self, fingerprints: dict[str, str]) -> list[str]:
        """Runs already in the workdir whose fingerprint differs from the one asked for."""
        if not os.path.exists(self.path(CONFIG)):
            return []
        with open(self.path(CONFIG)) as f:
            old = json.load(f).get("fingerprints", {})
        return sorted(r for r, fp in fingerprints.items() if r in old and old[r] != fp)

    def has_outputs(self) -> bool:
        """Whether the workdir holds any output of a run (OUTPUTS)."""
        return any(os.path.exists(self.path(name)) for name in OUTPUTS)

    def archive(self) -> str:
        """Moves every previous output to archive/<time>/ and returns that folder."""
        dest = self.path("archive", time.strftime("%Y%m%d-%H%M%S"))
        os.makedirs(dest, exist_ok=True)
        for name in OUTPUTS:
            if os.path.exists(self.path(name)):
                shutil.move(self.path(name), os.path.join(dest, name))
        return dest

    def write_config(self, config: dict[str, Any], fingerprints: dict[str, str]) -> None:
        """Writes config.json: `config` and the runs' fingerprints. It keeps the fingerprints
        of runs the config no longer lists."""
        os.makedirs(self.workdir, exist_ok=True)
        old = {}
        if os.path.exists(self.path(CONFIG)):
            with open(self.path(CONFIG)) as f:
                old = json.load(f).get("fingerprints", {})
        # Keep the fingerprints of runs this config no longer lists: their rows stay valid.
        merged = {**old, **fingerprints}
        self.write_json(CONFIG, {"config": config, "fingerprints": merged})

    def rows(self) -> list[dict[str, Any]]:
        """Every row of results.jsonl, in the order written. A torn last line is left out."""
        return _read_jsonl(self.path(RESULTS))

    def samples(self) -> dict[tuple[str, int], list[float]]:
        """Every timing sample of each point, its passes pooled in order (see pass_samples)."""
        return {
            key: [x for one_pass in passes for x in one_pass]
            for key, passes in self.pass_samples().items()
        }

    def pass_samples(self) -> dict[tuple[str, int], list[list[float]]]:
        """Each point's samples per sweep pass, in pass order. The newest record of a pass
        wins. A pass-0 record starts the point over. So a point measured again from scratch
        replaces its passes. A record without a pass number counts as pass 0."""
        by_pass: dict[tuple[str, int], dict[int, list[float]]] = {}
        for s in _read_jsonl(self.path(SAMPLES)):
            key = (s["run"], s["batch_size"])
            p = int(s.get("pass", 0))
            if p == 0:
                by_pass[key] = {}  # a first pass starts the point's samples over
            by_pass.setdefault(key, {})[p] = s["samples_s"]
        return {key: [passes[p] for p in sorted(passes)] for key, passes in by_pass.items()}

    def latest_rows(self, fingerprints: dict[str, str]) -> dict[tuple[str, int], dict[str, Any]]:
        """The latest row of each point of the current runs (matching fingerprint)."""
        return {
            (r["run"], r["batch_size"]): r
            for r in latest(self.rows())
            if fingerprints.get(r["run"]) == r.get("fingerprint")
        }

    def measured(
        self, fingerprints: dict[str, str], statuses: tuple[str, ...] = ("ok",)
    ) -> set[tuple[str, int]]:
        """Points of the current runs whose latest row has one of `statuses`. A row without a
        status reads ok."""
        return {
            (r["run"], r["batch_size"])
            for r in latest(self.rows())
            if fingerprints.get(r["run"]) == r.get("fingerprint")
            and r.get("status", "ok") in statuses
        }

    def first_oom(self, fingerprints: dict[str, str]) -> dict[str, int]:
        """Per current run, the smallest batch size that hit OOM."""
        out: dict[str, int] = {}
        for r in latest(self.rows()):
            if r.get("status") == "oom" and fingerprints.get(r["run"]) == r.get("fingerprint"):
                out[r["run"]] = min(r["batch_size"], out.get(r["run"], r["batch_size"]))
        return out

    def append(
        self, row: dict[str, Any], samples_s: Iterable[float] | None, pass_index: int = 0
    ) -> None:
        """Appends the point's samples of sweep pass `pass_index`, if timed, then its row.
        The row marks the pass done. Each record is flushed and fsynced."""
        os.makedirs(self.workdir, exist_ok=True)
        records = [(RESULTS, _finite_or_null(row))]
        if samples_s is not None:
            sample_record = {"run": row["run"], "batch_size": row["batch_size"]}
            sample_record["pass"] = int(pass_index)
            sample_record["samples_s"] = [float(s) for s in samples_s]
            records.insert(0, (SAMPLES, sample_record))
        for name, record in records:
            self.append_lines(name, [record])

    def append_lines(self, name: str, records: Iterable[dict[str, Any]]) -> None:
        """Appends JSON lines to `name`, after any torn last line is cut; then fsyncs."""
        os.makedirs(self.workdir, exist_ok=True)
        _drop_torn_tail(self.path(name))
        with open(self.path(name), "a") as f:
            for record in records:
                f.write(json.dumps(_finite_or_null(record)) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read_lines(self, name: str) -> list[dict[str, Any]]:
        """The JSON lines of `name`; a torn last one is left out."""
        return _read_jsonl(self.path(name))

    def read_json(self, name: str) -> Any:
        """The JSON file `name` of the workdir, None where there is none."""
        if not os.path.exists(self.path(name)):
            return None
        with open(self.path(name)) as f:
            return json.load(f)

    def rewrite_rows(self, rows: list[dict[str, Any]]) -> None:
        """Replaces results.jsonl atomically. Analysis fields are recomputed on every run."""
        tmp = self.path(RESULTS + ".tmp")
        with open(tmp, "w") as f:
            for row in rows:
                f.write(json.dumps(_finite_or_null(row)) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path(RESULTS))

    def write_summary(self, summary: list[dict[str, Any]]) -> None:
        """Writes summary.json, one summary per run. The file is written then renamed.

        Each summary is checked against batching/summaries.py first. A bad one writes nothing.
        """
        summary = _finite_or_null(summary)
        for s in summary:
            summaries.check(s)
        self.write_json(SUMMARY, summary)

    def write_peaks(self, entries: dict[str, dict[str, Any]]) -> None:
        """device_peaks.json: {"<platform>:<device_kind>": the peaks cache's entry}."""
        self.write_json(PEAKS, entries)

    def write_json(self, name: str, obj: Any) -> None:
        """Writes `name` as JSON: written, then renamed, so a reader never sees half a file."""
        tmp = self.path(name + ".tmp")
        with open(tmp, "w") as f:
            json.dump(_finite_or_null(obj), f, indent=2, sort_keys=True, default=str)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path(name))
