"""One schema for a row: the README's table is the schema, sweeps write only its fields, and
rows written before today (the committed results) stay readable."""

import glob
import gzip
import json
import os

import pytest

from batching import app, rows
from batching.outputs import results
from tests.conftest import ROOT, tiny


def test_readme_field_table_is_the_schema():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    assert rows.markdown_table() in readme
    # Every group is described, every field has a group the README lists.
    assert all(f"- {group}: {meaning}" in readme for group, meaning in rows.GROUPS.items())
    assert {f.group for f in rows.FIELDS} == set(rows.GROUPS)


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
