"""A sweep's passes: every pass of a point follows one plan on its own samples, unconverged
points get more rounds while the run's budget lasts, the rows say why a point stopped, a
rerun resumes an interrupted round and leaves a finished run alone, and a cold run is
timed and priced as cold."""

import json

import numpy as np
import pytest

from batching import app, sweep
from batching.measure import point, timing
from batching.outputs import results
from batching.setup.runs import ConfigError
from tests.conftest import tiny


def read_rows(workdir) -> list[dict]:
    return results.latest(results.Store(str(workdir)).rows())


def test_every_pass_follows_one_plan_and_never_sees_earlier_samples(tmp_path, monkeypatch):
    """The timer is called with the same settings on every pass, first or later, and with
    nothing from earlier passes (the old sweep handed later passes the earlier samples as a
    prior and a smaller warm-up)."""
    calls = []
    real = timing.measure

    def watched(call, args, settings, *rest, **kwargs):
        calls.append((settings, set(kwargs)))
        return real(call, args, settings, *rest, **kwargs)

    monkeypatch.setattr(point.timing, "measure", watched)
    config = tiny()
    config.sweep.passes = 3
    app.run(config, str(tmp_path))
    passes = [c for c in calls if c[0].budget_s == config.timing.pass_s]
    assert len(passes) == 3 * len(config.sweep.batch_sizes)
    assert len({s for s, _ in passes}) == 1  # one plan
    assert all(kw <= {"before_call"} for _, kw in passes)


def test_a_pass_that_stopped_on_precision_met_it_on_its_own_samples(tmp_path):
    config = tiny()
    config.sweep.passes = 3
    config.timing.target_rel_ci = 0.05
    config.timing.max_runs = 200
    app.run(config, str(tmp_path))
    store = results.Store(str(tmp_path))
    for r in read_rows(tmp_path):
        own = store.pass_samples()[("tiny", r["batch_size"])]
        for samples, reason in zip(own, r["pass_stop_reasons"], strict=True):
            if reason == "precision":
                from batching.measure import stats

                assert stats.relative_halfwidth(np.asarray(samples)) <= 0.05


def test_unconverged_points_get_more_passes_until_max_passes(tmp_path):
    config = tiny()
    config.sweep.passes = 2
    config.sweep.max_passes = 4
    config.timing.target_rel_ci = 1e-9  # unreachable
    config.timing.run_budget_s = 1e6
    app.run(config, str(tmp_path))
    rows = read_rows(tmp_path)
    assert {r["passes_done"] for r in rows} == {4}
    assert {r["stop_reason"] for r in rows} == {"max_passes"}
    assert not any(r["converged"] for r in rows)
    assert all(len(r["pass_wall_s"]) == len(r["pass_host_busy"]) == 4 for r in rows)


def test_the_run_budget_ends_the_extra_passes_and_the_rows_say_so(tmp_path):
    config = tiny()
    config.sweep.passes = 2
    config.sweep.max_passes = 50
    config.timing.target_rel_ci = 1e-9
    config.timing.run_budget_s = 0.0
    app.run(config, str(tmp_path))
    rows = read_rows(tmp_path)
    assert {r["passes_done"] for r in rows} == {2}  # the passes every point gets, no more
    assert {r["stop_reason"] for r in rows} == {"budget"}
    (s,) = json.loads((tmp_path / "summary.json").read_text())
    assert s["stop_reasons"] == {"budget": 3} and s["passes_done_max"] == 2
    assert "Timing" in (tmp_path / "report.md").read_text()


def test_a_converged_point_gets_no_more_passes(tmp_path):
    config = tiny()
    config.sweep.passes = 3
    config.sweep.max_passes = 6
    config.timing.target_rel_ci = 1e6  # met at once
    config.timing.run_budget_s = 1e6
    app.run(config, str(tmp_path))
    rows = read_rows(tmp_path)
    assert {r["passes_done"] for r in rows} == {3}
    assert all(r["converged"] and r["stop_reason"] == "precision" for r in rows)
    assert all(r["interval_method"].startswith("t on log pass medians") for r in rows)


def test_an_interrupted_round_resumes_and_a_finished_run_is_left_alone(tmp_path, monkeypatch):
    config = tiny()
    config.sweep.passes = 2
    config.sweep.max_passes = 3
    config.timing.target_rel_ci = 1e-9
    config.timing.run_budget_s = 1e6
    real, calls = sweep.repeat_point, {"n": 0}

    def dies_in_the_extra_round(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # three visits of pass 2, one of the extra round, then stop
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(sweep, "repeat_point", dies_in_the_extra_round)
    with pytest.raises(KeyboardInterrupt):
        app.run(config, str(tmp_path))
    pending = read_rows(tmp_path)
    assert sorted(r["passes_done"] for r in pending) == [2, 2, 3]
    assert {r["stop_reason"] for r in pending} == {"pending"}
    monkeypatch.setattr(sweep, "repeat_point", real)
    app.run(config, str(tmp_path))
    rows = read_rows(tmp_path)
    assert {r["passes_done"] for r in rows} == {3}
    assert {r["stop_reason"] for r in rows} == {"max_passes"}
    visits = []
    monkeypatch.setattr(sweep, "repeat_point", lambda *a, **k: visits.append(a) or 1 / 0)
    app.run(config, str(tmp_path))
    assert visits == []  # a finished run measures nothing again


def test_a_cold_run_flushes_before_every_call_and_is_priced_from_dram(tmp_path, monkeypatch):
    from batching.measure import cold

    flushes = []
    real = cold.CacheFlush.__call__
    monkeypatch.setattr(cold.CacheFlush, "__call__", lambda self: flushes.append(1) or real(self))
    config = tiny()
    config.timing.cache = "cold"
    config.sweep.batch_sizes = (1, 2, 4, 8)
    app.run(config, str(tmp_path))
    rows = read_rows(tmp_path)
    assert {r["cache_state"] for r in rows} == {"cold"}
    # Every warm-up and timed call of every pass, plus the call floor's, follows a flush.
    assert len(flushes) >= sum(r["n_runs"] for r in rows)
    (s,) = json.loads((tmp_path / "summary.json").read_text())
    # A tiny MLP's weights fit any last-level cache: warm they would be priced from it.
    assert s["cache_state"] == "cold" and s["memory_roof"] == "DRAM"
    assert "| tiny | cold | DRAM |" in (tmp_path / "report.md").read_text()


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("timing.estimator", "mean", "timing.estimator must be one of"),
        ("timing.cache", "lukewarm", "timing.cache must be one of"),
        ("timing.pass_s", 0.0, "timing.pass_s is out of range"),
        ("sweep.max_passes", 0, "sweep.max_passes must be an integer >= sweep.passes"),
    ],
)
def test_bad_timing_fields_are_named_and_nothing_is_written(tmp_path, field, value, message):
    config = tiny()
    section, name = field.split(".")
    config[section][name] = value
    workdir = tmp_path / "wd"
    with pytest.raises(ConfigError, match=message):
        app.run(config, str(workdir))
    assert not workdir.exists()
