"""The workdir's files: config.json, results.jsonl (one row per point), samples.jsonl, summary.json.

Rows are appended, flushed and fsynced one at a time, so an interrupted sweep
keeps every point it finished. A rerun resumes: a point whose run, batch size
and run fingerprint are already in results.jsonl is not measured again.
"""

import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Iterable
from typing import Any

from absl import logging

CONFIG = "config.json"
RESULTS = "results.jsonl"
SAMPLES = "samples.jsonl"
SUMMARY = "summary.json"
# The device peaks the analysis used, in the peaks cache's format: rows measured on a rented
# accelerator can be analysed anywhere with them (roofline.peaks_file).
PEAKS = "device_peaks.json"
# Files and folders a run writes; `overwrite` moves them to archive/<time>/.
OUTPUTS = (CONFIG, RESULTS, SAMPLES, SUMMARY, PEAKS, "plots", "tb", "report.md", "report.html")


def _finite_or_null(obj: Any) -> Any:
    """NaN and infinity as null: strict JSON readers (a browser's) reject them."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_null(v) for v in obj]
    return obj


class WorkdirError(ValueError):
    """The workdir cannot be used as asked; the message says why in one line."""


def fingerprint(run_measurement_cfg: dict[str, Any]) -> str:
    """Short stable hash of what decides a run's measurements."""
    blob = json.dumps(run_measurement_cfg, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def check_writable(workdir: str) -> None:
    """Raises WorkdirError unless `workdir` exists writable or can be created; leaves nothing.

    A missing workdir is created and removed again (with any parents it needed): a path
    under a folder that takes no new entries (/proc) passes os.access but not mkdir."""
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


def _read_jsonl(path: str) -> list[dict[str, Any]]:
    """Rows of a JSON-lines file; a torn last line (killed mid-write) is ignored with a warning."""
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
    """One row per (run, batch size): the last written (a retried point replaces its error)."""
    return list({(r["run"], r["batch_size"]): r for r in rows}.values())


def is_ok(row: dict[str, Any]) -> bool:
    """A measured point; rows written before statuses existed are measured points."""
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
        """Writes config.json: `config` and the runs' fingerprints, keeping those of runs it no
        longer lists."""
        os.makedirs(self.workdir, exist_ok=True)
        old = {}
        if os.path.exists(self.path(CONFIG)):
            with open(self.path(CONFIG)) as f:
                old = json.load(f).get("fingerprints", {})
        # Keep the fingerprints of runs this config no longer lists: their rows stay valid.
        merged = {**old, **fingerprints}
        self._write_json(CONFIG, {"config": config, "fingerprints": merged})

    def rows(self) -> list[dict[str, Any]]:
        """Every row of results.jsonl, in the order written (a torn last line left out)."""
        return _read_jsonl(self.path(RESULTS))

    def samples(self) -> dict[tuple[str, int], list[float]]:
        """Every timing sample of each point, its passes in order (pass_samples, pooled)."""
        return {
            key: [x for one_pass in passes for x in one_pass]
            for key, passes in self.pass_samples().items()
        }

    def pass_samples(self) -> dict[tuple[str, int], list[list[float]]]:
        """Each point's samples per sweep pass, in pass order; the newest record of a pass
        wins (a point measured again from scratch replaces its passes). Records written
        before passes existed are pass 0."""
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
        """Points of the current runs whose latest row has one of `statuses` (none reads ok)."""
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
        """Appends the point's samples of sweep pass `pass_index` (if timed), then its row;
        the row marks the pass done."""
        os.makedirs(self.workdir, exist_ok=True)
        records = [(RESULTS, _finite_or_null(row))]
        if samples_s is not None:
            sample_record = {"run": row["run"], "batch_size": row["batch_size"]}
            sample_record["pass"] = int(pass_index)
            sample_record["samples_s"] = [float(s) for s in samples_s]
            records.insert(0, (SAMPLES, sample_record))
        for name, record in records:
            _drop_torn_tail(self.path(name))
            with open(self.path(name), "a") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()
                os.fsync(f.fileno())

    def rewrite_rows(self, rows: list[dict[str, Any]]) -> None:
        """Replaces results.jsonl atomically (analysis fields are recomputed on every run)."""
        tmp = self.path(RESULTS + ".tmp")
        with open(tmp, "w") as f:
            for row in rows:
                f.write(json.dumps(_finite_or_null(row)) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path(RESULTS))

    def write_summary(self, summary: list[dict[str, Any]]) -> None:
        """Writes summary.json, a summary per run (written then renamed)."""
        self._write_json(SUMMARY, summary)

    def write_peaks(self, entries: dict[str, dict[str, Any]]) -> None:
        """device_peaks.json: {"<platform>:<device_kind>": the peaks cache's entry}."""
        self._write_json(PEAKS, entries)

    def _write_json(self, name: str, obj: Any) -> None:
        # Write then rename, so a reader never sees half a file.
        tmp = self.path(name + ".tmp")
        with open(tmp, "w") as f:
            json.dump(_finite_or_null(obj), f, indent=2, sort_keys=True, default=str)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path(name))
