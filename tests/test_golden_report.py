"""Same rows, same report: a sweep's stored rows analysed again give the report tables and
the per-row predictions that the code gave when the fixture was made.

tests/data/golden/workdir holds one experiment's rows, samples, config and device peaks (a
tiny MLP and a tiny MoE, five batch sizes, two passes, on a 2-core CPU); report_tables.md
and predictions.json are what experiments/reanalyze.py made of them at the commit before the
package was redrawn into sub-packages. Nothing is timed here: the peaks come from the
workdir's own file, so the analysis is a pure function of the stored measurements.

The small-op table was made as (one, two instances) under `lone_op_s`; the lab now times one
and nine (`lone_op_chain_s`), so the fixture holds the same costs in that form, nine = one +
8·(two − one), and must give the same predictions.
"""

import json
import math
import os
import shutil

from experiments import reanalyze
from tests.conftest import ROOT

FIXTURE = os.path.join(ROOT, "tests", "data", "golden")
# Per-row fields of the analysis compared with the fixture's.
PREDICTED = (
    "predicted_latency_s",
    "predicted_peak_latency_s",
    "predicted_overhead_s",
    "predicted_call_extra_s",
    "predicted_comm_s",
    "fitted_latency_s",
    "regime",
    "regime_terms_s",
    "intensity_flops_per_byte",
    "compute_roof_fraction",
    "memory_roof_fraction",
    "xla_flops_ratio",
    "xla_bytes_ratio",
    "cost_mismatch",
)


def report_tables(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("|")]


def predictions(workdir: str) -> dict[str, dict]:
    """Each row's analysis fields, keyed run@batch (the latest row per point)."""
    out = {}
    with open(os.path.join(workdir, "results.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            out[f"{r['run']}@{r['batch_size']}"] = {k: r.get(k) for k in PREDICTED}
    return out


def close(a, b) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k]) for k in a)
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-300) or (math.isnan(a) and math.isnan(b))
    return a == b


def test_stored_rows_give_the_same_report_tables_and_predictions(tmp_path):
    workdir = str(tmp_path / "golden")
    shutil.copytree(os.path.join(FIXTURE, "workdir"), workdir)
    reanalyze.reanalyze(workdir, plots=False)
    with open(os.path.join(workdir, "report.md")) as f:
        got = report_tables(f.read())
    with open(os.path.join(FIXTURE, "report_tables.md")) as f:
        want = f.read().splitlines()
    assert len(got) >= 30  # runs, knees, where the time goes, what-if, memory wall, routers
    assert got == want
    with open(os.path.join(FIXTURE, "predictions.json")) as f:
        expected = json.load(f)
    now = predictions(workdir)
    assert now.keys() == expected.keys()
    differ = [k for k in expected if not close(now[k], expected[k])]
    assert not differ, [(k, now[k], expected[k]) for k in differ[:3]]
