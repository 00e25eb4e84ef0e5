"""The report's two op lists of a call side by side: the family's hand list, its program's.

A family with a hand-written op list also has the list read from each point's compiled
program (batching.measure.hlo_ops). Both are priced by the same rates. This section shows
them per op kind at each run's largest batch, and how far each prediction lands from the
measurement over the run's points. Where XLA's GPU compiler wrote its own estimates
(batching.measure.xla_estimates), they stand beside both as a baseline.
"""

import collections
import statistics
from typing import Any

from batching.outputs.doc import Doc, ReportData


def _by_kind(ops: list[dict[str, Any]]) -> dict[str, tuple[float, float]]:
    """(FLOPs, bytes) per kind, summed over instances."""
    out: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])
    for o in ops:
        out[o["kind"]][0] += o["flops"] * o["count"]
        out[o["kind"]][1] += o["bytes"] * o["count"]
    return {k: (f, b) for k, (f, b) in out.items()}


def _seconds(by_kind: dict[str, dict[str, float]] | None, kind: str) -> float | None:
    limits = (by_kind or {}).get(kind)
    return sum(limits.values()) if limits else None


def _median_error(rows: list[dict[str, Any]], field: str) -> float | None:
    errors = [abs(r[field] / r["latency_s"] - 1) for r in rows if r.get(field) and r["latency_s"]]
    return statistics.median(errors) if errors else None


def kind_table(row: dict[str, Any]) -> list[list[Any]]:
    """Per kind at one point: hand and program GFLOP, MB and predicted ms."""
    hand, program = _by_kind(row["ops"]), _by_kind(row["program_ops"])
    xla = row.get("xla_estimated_by_kind")
    table = []
    for kind in sorted(set(hand) | set(program) | set(xla or {})):
        h, p = hand.get(kind, (0.0, 0.0)), program.get(kind, (0.0, 0.0))
        hs = _seconds(row.get("predicted_by_kind"), kind)
        ps = _seconds(row.get("program_predicted_by_kind"), kind)
        line = [
            kind, h[0] / 1e9, p[0] / 1e9, h[1] / 1e6, p[1] / 1e6,
            hs * 1e3 if hs is not None else None, ps * 1e3 if ps is not None else None,
        ]  # fmt: skip
        table.append(line + ([xla[kind] * 1e3 if kind in xla else None] if xla else []))
    return table


def ops_section(doc: Doc, data: ReportData) -> None:
    """Each hand-listed run's two op lists per kind, and both predictions' median errors."""
    runs: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for r in data.rows:
        if r.get("program_ops") and r.get("ops") and r.get("latency_s"):
            runs[r["run"]].append(r)
    if not runs:
        return
    doc.heading("Hand-written and program op lists")
    doc.para(
        "Each run's call is listed twice: by its family's hand-written op list (which the "
        "prediction uses) and as read from the compiled program (every kernel that runs, at "
        "its boundary; batching.measure.hlo_ops). Both are priced by the same rates. The "
        "products (GEMMs, convolutions, attention) agree on FLOPs and weights; the program "
        "adds the elementwise passes, reductions and gathers, and the intermediates between "
        "kernels, that the hand list folds in or leaves out. The MoE's dispatch and combine "
        "einsums are GEMMs in the program. Median error is |predicted / measured - 1| over "
        "the run's points. On a GPU run with XLA_FLAGS=--xla_gpu_collect_cost_model_stats=true, "
        "XLA's own per-kernel estimates (the cost models it fuses by) stand beside both."
    )
    xla = any(r.get("xla_estimated_latency_s") for rows in runs.values() for r in rows)
    summary = []
    for run, rows in runs.items():
        line = [
            run, len(rows), _median_error(rows, "predicted_latency_s"),
            _median_error(rows, "program_predicted_latency_s"),
        ]  # fmt: skip
        summary.append(line + ([_median_error(rows, "xla_estimated_latency_s")] if xla else []))
    header = ["run", "points", "median error, hand", "median error, program"]
    doc.table(header + (["median error, XLA's estimate"] if xla else []), summary)
    for run, rows in runs.items():
        row = max(rows, key=lambda r: r["batch_size"])
        doc.para(f"{run} at batch {row['batch_size']}:")
        header = ["kind", "GFLOP hand", "GFLOP program", "MB hand", "MB program", "ms hand",
                  "ms program"]  # fmt: skip
        doc.table(
            header + (["ms XLA"] if row.get("xla_estimated_by_kind") else []), kind_table(row)
        )
