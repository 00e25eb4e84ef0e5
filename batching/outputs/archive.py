"""Measurements from other machines, kept in the repository, shown beside this run's.

A lab run measures the device it runs on. Sweeps that ran on an accelerator once (a lent
GPU, say) are committed under `experiments/results/<device>/<workdir>/` as the sweep wrote
them: `results.jsonl.gz` (or `results.jsonl`), with `summary.json` where the analysis
finished, and a README saying what ran where. The report of a later run of the same
experiment on another machine (a laptop CPU) reads them back and shows them as what they
are: measured there and then, not here (`config.report.archive_dir`; "" turns it off).
"""

import dataclasses
import datetime
import glob
import gzip
import json
import os
from typing import Any

from batching.outputs import results


@dataclasses.dataclass(frozen=True)
class Archived:
    """One committed sweep of the experiment: where it is and its ok rows, latest per point."""

    path: str  # the sweep's folder
    name: str  # the folder relative to the archive ("nvidia-h200/mlp_article")
    device_kind: str
    rows: list[dict[str, Any]]
    summaries: dict[str, dict[str, Any]]  # by run, where its analysis finished

    @property
    def label(self) -> str:
        """The sweep as the report names it: "<device kind>, <folder>"."""
        return f"{self.device_kind}, {self.name}"

    @property
    def versions(self) -> str:
        """The JAX versions its rows ran under and the first day measured (UTC), e.g. "jax 0.4.35,
        2025-01-31"."""
        jax_versions = sorted({str(r.get("jax_version")) for r in self.rows if "jax_version" in r})
        utc = datetime.timezone.utc
        days = sorted(
            datetime.datetime.fromtimestamp(r["timestamp"], utc).date().isoformat()
            for r in self.rows
            if isinstance(r.get("timestamp"), (int, float))
        )
        return f"jax {', '.join(jax_versions) or '?'}, {days[0] if days else 'undated'}"


def _read_rows(folder: str) -> list[dict[str, Any]]:
    for name, opener in (("results.jsonl.gz", gzip.open), ("results.jsonl", open)):
        path = os.path.join(folder, name)
        if os.path.exists(path):
            with opener(path, "rt") as f:
                return [json.loads(line) for line in f if line.strip()]
    return []


def load(
    archive_dir: str, experiment: str, exclude_device_kind: str | None = None
) -> list[Archived]:
    """Every committed sweep under `archive_dir` whose rows are of `experiment` (the rows'
    `experiment` field, so a folder may be named for its variant), except those measured on
    `exclude_device_kind` (this run's own device: its numbers are the run's own). Unreadable
    folders are skipped: the archive is context for a report, never a reason to fail one."""
    if not archive_dir or not os.path.isdir(archive_dir):
        return []
    out = []
    pattern = os.path.join(archive_dir, "*", "*", "results.jsonl*")
    for folder in sorted({os.path.dirname(p) for p in glob.glob(pattern)}):
        try:
            rows = [
                r
                for r in results.latest(_read_rows(folder))
                if results.is_ok(r) and r.get("experiment") == experiment
            ]
            summaries = {}
            if os.path.exists(os.path.join(folder, "summary.json")):
                with open(os.path.join(folder, "summary.json")) as f:
                    summaries = {s["run"]: s for s in json.load(f)}
        except (OSError, ValueError, KeyError, TypeError):
            continue
        kinds = sorted({str(r.get("device_kind")) for r in rows})
        if not rows or kinds == [exclude_device_kind]:
            continue
        name = os.path.relpath(folder, archive_dir)
        out.append(Archived(folder, name, ", ".join(kinds), rows, summaries))
    return out


def relative_latency(rows: list[dict[str, Any]], run: str, n: int = 4) -> list[tuple[int, float]]:
    """(batch, latency / latency at the smallest batch) for the first `n` batches of a run."""
    rs = sorted((r for r in rows if r["run"] == run), key=lambda r: r["batch_size"])
    if not rs:
        return []
    return [(r["batch_size"], r["latency_s"] / rs[0]["latency_s"]) for r in rs[:n]]
