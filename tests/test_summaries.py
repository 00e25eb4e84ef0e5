"""One schema for a run's summary: docs/summary.md's table is the schema, the lab writes only
its fields with values of their kinds, and the report reads only its fields."""

import json
import os
import shutil

import numpy as np
import pytest

from batching import summaries
from batching.outputs import report, results
from tests import test_rows
from tests.conftest import ROOT

SCHEMA_PAGE = os.path.join(ROOT, "docs", "summary.md")
SOURCE = "batching/summaries.py"


def test_summary_page_field_table_is_the_schema():
    with open(SCHEMA_PAGE) as f:
        page = f.read()
    want = test_rows.schema_block(summaries, SOURCE)
    assert test_rows.page_block(page, SOURCE) == want, "run `python -m tests.test_rows`"
    assert {f.group for f in summaries.FIELDS} == set(summaries.GROUPS)
    assert {f.kind for f in summaries.FIELDS} <= set(summaries.KINDS)
    assert len(summaries.BY_NAME) == len(summaries.FIELDS)  # each field listed once


@pytest.mark.parametrize(
    "bad, error, name",
    [
        ({"run": "r", "knee_batch": 3.0}, KeyError, "knee_batch"),
        ({"run": "r", "points": "5"}, TypeError, "points"),
        ({"run": "r", "points": True}, TypeError, "points"),
        ({"run": "r", "knee_batch_size": [1]}, TypeError, "knee_batch_size"),
    ],
)
def test_check_names_the_bad_field(bad, error, name):
    with pytest.raises(error, match=name):
        summaries.check(bad)


def test_check_takes_none_nan_and_whole_floats():
    summaries.check({"run": "r", "knee_batch_size": None, "knee_low": float("nan")})
    summaries.check({"points": 3.0, "first_oom_batch": None, "status_counts": {"ok": 3}})


def test_a_bad_summary_is_not_written(tmp_path):
    store = results.Store(str(tmp_path))
    good = {"run": "a", "points": 2}
    store.write_summary([{"run": "a", "points": np.int64(2)}])  # NumPy scalars as numbers
    with pytest.raises(KeyError, match="pointz"):
        store.write_summary([good, {"run": "b", "pointz": 2}])
    with open(os.path.join(str(tmp_path), results.SUMMARY)) as f:
        assert json.load(f) == [good]  # the earlier file stands


class StrictSummary(dict):
    """A summary that refuses to be read by a name the schema does not list."""

    read: set[str] = set()

    def __getitem__(self, name):
        self._known(name)
        return super().__getitem__(name)

    def get(self, name, default=None):
        self._known(name)
        return super().get(name, default)

    def __contains__(self, name):
        self._known(name)
        return super().__contains__(name)

    def _known(self, name):
        if not summaries.is_field(name):
            raise KeyError(f"the report read {name!r}, which is not a summary field")
        StrictSummary.read.add(name)


def test_the_report_reads_summaries_by_schema_names(tmp_path, monkeypatch):
    from experiments import reanalyze
    from tests.test_golden_report import FIXTURE

    real = report.write

    def strict_write(workdir, name, claims, runs, *args, **kwargs):
        return real(workdir, name, claims, [StrictSummary(s) for s in runs], *args, **kwargs)

    monkeypatch.setattr(report, "write", strict_write)
    StrictSummary.read = set()
    workdir = str(tmp_path / "golden")
    shutil.copytree(os.path.join(FIXTURE, "workdir"), workdir)
    reanalyze.reanalyze(workdir, plots=False)
    assert len(StrictSummary.read) >= 20, sorted(StrictSummary.read)
    with open(os.path.join(workdir, results.SUMMARY)) as f:
        for s in json.load(f):
            summaries.check(s)


def test_committed_summaries_carry_only_schema_fields():
    import glob

    paths = glob.glob(os.path.join(ROOT, "experiments", "results", "*", "*", results.SUMMARY))
    assert paths, "no committed summaries under experiments/results"
    for path in paths:
        with open(path) as f:
            for s in json.load(f):
                summaries.check(s)
