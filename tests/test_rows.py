"""One schema for a row: docs/results.md's table is the schema, sweeps write only its fields,
and rows written before today (the committed results) stay readable.

    python -m tests.test_rows    # writes the schema blocks of docs/results.md and docs/summary.md
"""

import glob
import gzip
import json
import os

import pytest

from batching import app, rows
from batching.outputs import results

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEMA_PAGE = os.path.join(ROOT, "docs", "results.md")
# The serving rows' group is shown on the serving page; results.md shows the others.
SERVING_PAGE = os.path.join(ROOT, "docs", "serving.md")
SERVING = ("serving",)
SWEEP = tuple(g for g in rows.GROUPS if g not in SERVING)
BEGIN = "<!-- schema: generated from batching/rows.py by `python -m tests.test_rows` -->"
END = "<!-- end of schema -->"


def schema_block(schema=rows, source: str = "batching/rows.py", groups=None) -> str:
    """The groups (`- group: meaning`) and the field table, between their markers."""
    shown = groups or tuple(schema.GROUPS)
    listed = "\n".join(f"- {g}: {schema.GROUPS[g]}" for g in shown)
    table = schema.markdown_table(shown) if groups else schema.markdown_table()
    begin = BEGIN.replace("batching/rows.py", source)
    return f"{begin}\n{listed}\n\n{table}\n{END}"


def page_block(text: str, source: str = "batching/rows.py") -> str:
    """The schema block as the page holds it (markers included), or "" without one."""
    begin, end = text.find(BEGIN.replace("batching/rows.py", source)), text.find(END)
    return text[begin : end + len(END)] if 0 <= begin < end else ""


def test_results_page_field_table_is_the_schema():
    with open(SCHEMA_PAGE) as f:
        page = f.read()
    assert page_block(page) == schema_block(groups=SWEEP), "run `python -m tests.test_rows`"
    with open(SERVING_PAGE) as f:
        serving = f.read()
    assert page_block(serving) == schema_block(groups=SERVING), "run `python -m tests.test_rows`"
    # Every group is described on one of the pages, and every field has a group.
    assert {f.group for f in rows.FIELDS} == set(rows.GROUPS) == {*SWEEP, *SERVING}


def test_the_schema_refuses_a_field_it_does_not_list():
    with pytest.raises(KeyError, match="latency_ms"):
        rows.make(run="r", batch_size=1, latency_ms=1.0)
    row = rows.make(run="r", batch_size=1)
    assert rows.extend(row, latency_s=1e-3, **{"layer_0/load_cv": 0.1})["latency_s"] == 1e-3
    with pytest.raises(KeyError, match="layer_x"):
        rows.extend(row, **{"layer_x/load_cv": 0.1})
    assert row == {"run": "r", "batch_size": 1}  # extend makes a new row


def test_router_group_is_what_the_router_reports():
    from models.routers import SCALAR_STATS

    assert rows.names("router") == SCALAR_STATS


def test_a_sweep_writes_only_schema_fields(tmp_path):
    from tests.conftest import tiny

    config = tiny()
    config.profile.batch_sizes = (2,)
    app.run(config, str(tmp_path))
    written = results.Store(str(tmp_path)).rows()
    assert written
    for r in written:
        rows.check(r)
        # The point and timing groups are on every measured row: it reads alone.
        missing = [f for f in (*rows.names("point"), *rows.names("timing")) if f not in r]
        assert set(missing) <= {"message", "error_type", "tokens_per_s", "modes"}, missing


def committed_rows() -> dict[str, list[dict]]:
    out = {}
    for path in glob.glob(os.path.join(ROOT, "experiments", "results", "*", "*", "results.*")):
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt") as f:
            out[os.path.relpath(path, ROOT)] = [json.loads(line) for line in f if line.strip()]
    return out


def test_committed_results_carry_only_schema_fields():
    found = committed_rows()
    assert found, "no committed results under experiments/results"
    for path, written in found.items():
        unknown = sorted({k for r in written for k in r if not rows.is_field(k)})
        assert not unknown, (path, unknown)


def write_schema_page(
    page: str = SCHEMA_PAGE, schema=rows, source="batching/rows.py", groups=SWEEP
) -> None:
    """Rewrites a page's schema block from its schema module."""
    with open(page) as f:
        text = f.read()
    old = page_block(text, source)
    if not old:
        raise SystemExit(f"{page}: no schema block generated from {source}")
    with open(page, "w") as f:
        f.write(text.replace(old, schema_block(schema, source, groups)))


if __name__ == "__main__":
    from batching import summaries
    from tests import test_summaries

    write_schema_page()
    write_schema_page(SERVING_PAGE, groups=SERVING)
    write_schema_page(test_summaries.SCHEMA_PAGE, summaries, test_summaries.SOURCE, None)
