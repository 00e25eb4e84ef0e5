"""Measurements from other machines, kept in the repository, shown beside this run's.

A lab run measures only the device it runs on. Some sweeps ran once on an accelerator, such
as a lent GPU. They are committed under `experiments/results/<device>/<workdir>/`. Each
folder holds what its sweep wrote:

- `results.jsonl.gz` or `results.jsonl`: the rows.
- `summary.json`: the run summaries, where the analysis finished.

Each device folder has a README saying what ran where. Later runs of the same experiment
read them back, on a laptop CPU say. Their reports show them as measured there and then,
not here. `config.report.archive_dir` names the archive; "" turns it off.
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
    """One committed sweep of the experiment: its folder and its rows.

    The rows are the ok ones, the latest per point.
    """

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
        """The JAX versions its rows ran under and the first day measured (UTC).

        The text reads like "jax 0.4.35, 2025-01-31".
        """
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
    """Every committed sweep under `archive_dir` whose rows are of `experiment`.

    The rows' `experiment` field decides, not the folder's name. So a folder may be named
    for its variant. Sweeps measured on `exclude_device_kind` are left out. That is this
    run's own device: the run has its own numbers there. Unreadable folders are skipped. The
    archive is context for a report, never a reason to fail one.
    """
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
    """A run's first `n` batches and their latencies relative to the first.

    Returns (batch, latency / latency at the smallest batch) pairs in batch order.
    """
    rs = sorted((r for r in rows if r["run"] == run), key=lambda r: r["batch_size"])
    if not rs:
        return []
    return [(r["batch_size"], r["latency_s"] / rs[0]["latency_s"]) for r in rs[:n]]
