"""The spine end to end on a tiny MLP: rows, resume, refusal, TensorBoard, bad input."""

import json
import os

import numpy as np
import pytest
from tensorboard.backend.event_processing import plugin_event_accumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from batching import app
from batching.outputs import results
from batching.setup.runs import ConfigError
from tests.conftest import PEAKS_DIR, ROOT, run_main, tiny

ROW_FIELDS = (
    "run model batch_size dtype platform device_kind latency_s latency_p10_s latency_p90_s "
    "latency_min_s n_runs compile_s params param_bytes flops bytes_accessed "
    "achieved_flops_per_s achieved_bytes_per_s throughput_per_s per_example_s"
).split()


def read_rows(workdir):
    with open(os.path.join(workdir, "results.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_sweep_writes_one_row_per_point_with_every_field(tmp_path, capsys):
    config = tiny()
    config.output.plots = True
    summaries = app.run(config, str(tmp_path))
    rows = read_rows(tmp_path)
    assert sorted(r["batch_size"] for r in rows) == [1, 2, 4]
    for r in rows:
        for field in ROW_FIELDS:
            assert field in r, field
        assert r["params"] == 2 * (16 * 16 + 16)
        assert r["param_bytes"] == 4 * r["params"]
        assert r["latency_p10_s"] <= r["latency_s"] <= r["latency_p90_s"]
        assert r["latency_min_s"] <= r["latency_p10_s"]
        assert r["throughput_per_s"] == pytest.approx(r["batch_size"] / r["latency_s"])
        assert r["per_example_s"] == pytest.approx(r["latency_s"] / r["batch_size"])
        assert r["flops"] > 0 and r["bytes_accessed"] > 0
    # samples.jsonl keeps every timing sample behind each row's median
    samples = results.Store(str(tmp_path)).samples()
    for r in rows:
        s = samples[(r["run"], r["batch_size"])]
        assert len(s) == r["n_runs"]
        assert np.median(s) == pytest.approx(r["latency_s"])
    assert [s["run"] for s in summaries] == ["tiny"]
    with open(tmp_path / "summary.json") as f:
        assert json.load(f)[0]["points"] == 3
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["config"]["model"]["width"] == 16
    for name in ("latency", "throughput", "per_example"):
        assert (tmp_path / "plots" / f"{name}.png").stat().st_size > 1000
    assert "latency ms" in capsys.readouterr().out


def test_rerun_resumes_without_duplicates_and_extends(tmp_path):
    config = tiny()
    app.run(config, str(tmp_path))
    first = read_rows(tmp_path)
    app.run(config, str(tmp_path))
    assert read_rows(tmp_path) == first
    # More batch sizes under the same measurement config: only the new ones are measured.
    config.sweep.batch_sizes = (1, 2, 4, 8)
    app.run(config, str(tmp_path))
    rows = read_rows(tmp_path)
    assert sorted(r["batch_size"] for r in rows) == [1, 2, 4, 8]
    # The old points were not measured again (analysis fields are refitted, measurements kept).
    measured = lambda r: (r["batch_size"], r["latency_s"], r["n_runs"], r["timestamp"])
    assert [measured(r) for r in rows[:3]] == [measured(r) for r in first]


def test_interrupted_sweep_keeps_finished_points(tmp_path, monkeypatch):
    from batching import sweep

    calls = {"n": 0}
    real = sweep.measure_point

    def dies_on_third(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(sweep, "measure_point", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        app.run(tiny(), str(tmp_path))
    assert len(read_rows(tmp_path)) == 2
    monkeypatch.setattr(sweep, "measure_point", real)
    app.run(tiny(), str(tmp_path))
    assert sorted(r["batch_size"] for r in read_rows(tmp_path)) == [1, 2, 4]


def test_torn_last_line_is_ignored_and_repaired(tmp_path):
    app.run(tiny(), str(tmp_path))
    with open(tmp_path / "results.jsonl", "a") as f:
        f.write('{"run": "tiny", "batch_si')  # killed mid-write
    config = tiny()
    config.sweep.batch_sizes = (1, 2, 4, 8)
    app.run(config, str(tmp_path))
    rows = read_rows(tmp_path)  # every line parses
    assert sorted(r["batch_size"] for r in rows) == [1, 2, 4, 8]


def test_different_config_is_refused_then_overwrite_archives(tmp_path):
    app.run(tiny(), str(tmp_path))
    before = (tmp_path / "results.jsonl").read_text()
    changed = tiny(width=32)
    with pytest.raises(results.WorkdirError, match="another config"):
        app.run(changed, str(tmp_path))
    assert (tmp_path / "results.jsonl").read_text() == before
    changed.overwrite = True
    app.run(changed, str(tmp_path))
    assert all(r["width"] == 32 for r in read_rows(tmp_path))
    (archived,) = (tmp_path / "archive").iterdir()
    assert (archived / "results.jsonl").read_text() == before


def test_experiment_runs_overlay_in_one_workdir(tmp_path):
    config = tiny()
    config.runs = {"w8": {"model": {"width": 8}}, "w16": {}}
    summaries = app.run(config, str(tmp_path))
    assert {s["run"] for s in summaries} == {"w8", "w16"}
    rows = read_rows(tmp_path)
    assert {(r["run"], r["width"]) for r in rows} == {("w8", 8), ("w16", 16)}
    # one event folder per run, beside the experiment's one HParams config file
    tb = sorted(os.listdir(tmp_path / "tb"))
    assert [n for n in tb if os.path.isdir(tmp_path / "tb" / n)] == ["w16", "w8"]
    assert sum(n.endswith(".hparams_experiment") for n in tb) == 1


def _accumulator(run_dir):
    # The plugin accumulator is what `tensorboard --logdir` itself reads with.
    acc = plugin_event_accumulator.EventAccumulator(str(run_dir), size_guidance={"tensors": 0})
    acc.Reload()
    return acc


def test_tensorboard_events_hold_scalars_images_text_and_hparams(tmp_path):
    config = tiny()
    config.output.plots = True
    app.run(config, str(tmp_path))
    app.run(config, str(tmp_path))  # a resume must not duplicate run summaries
    acc = _accumulator(tmp_path / "tb" / "tiny")
    scalars = set(acc.PluginTagToContent("scalars"))
    for tag in ("latency/ms", "throughput/examples_per_s", "achieved/gflops_per_s"):
        assert tag in scalars
        assert sorted(e.step for e in acc.Tensors(tag)) == [1, 2, 4]
    assert "hparams/best_throughput_per_s" in scalars
    images = set(acc.PluginTagToContent("images"))
    assert {"plots/latency", "plots/throughput", "plots/per_example"} <= images
    assert len(acc.Tensors("plots/latency")) == 1
    assert "config/text_summary" in acc.PluginTagToContent("text")
    hparams = acc.PluginTagToContent("hparams")
    assert set(hparams) == {"_hparams_/session_start_info", "_hparams_/session_end_info"}
    # the hparams record names the run's model fields and its metrics
    start = plugin_data_pb2.HParamsPluginData.FromString(hparams["_hparams_/session_start_info"])
    assert start.session_start_info.hparams["model.width"].number_value == 16
    # the experiment config is written once, for all runs, in the tb root
    root = _accumulator(tmp_path / "tb").PluginTagToContent("hparams")
    exp = plugin_data_pb2.HParamsPluginData.FromString(root["_hparams_/experiment"]).experiment
    assert "hparams/best_throughput_per_s" in {m.name.tag for m in exp.metric_infos}


@pytest.mark.parametrize(
    "config_mod, field",
    [
        (lambda c: setattr(c.sweep, "batch_sizes", (1, 0)), "sweep.batch_sizes"),
        (lambda c: setattr(c.sweep, "batch_sizes", (1, 2.5)), "sweep.batch_sizes"),
        (lambda c: setattr(c.sweep, "batch_sizes", ()), "sweep.batch_sizes"),
        (lambda c: setattr(c.model, "width", 0), "model.width"),
        (lambda c: setattr(c.model, "depth", -3), "model.depth"),
        (lambda c: setattr(c.model, "name", "nosuchmodel"), "model.name"),
        (lambda c: setattr(c.model, "dtype", "float7"), "model.dtype"),
        (lambda c: setattr(c.timing, "min_runs", 1), "timing.min_runs"),
    ],
)
def test_bad_config_is_refused_before_writing(tmp_path, config_mod, field):
    config = tiny()
    config_mod(config)
    workdir = tmp_path / "wd"
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        app.run(config, str(workdir))
    assert not workdir.exists()


TINY_FLAGS = [
    "--config=" + os.path.join(ROOT, "configs", "mlp.py"),
    "--config.model.width=16",
    "--config.model.depth=2",
    "--config.sweep.batch_sizes=(1,2)",
    "--config.timing.min_runs=3",
    "--config.timing.pass_s=0.02",
    "--config.sweep.passes=1",
    "--config.timing.run_budget_s=0",
    # As tiny(): seeded peaks (a fresh machine would otherwise measure its peaks and the
    # per-shape GEMMs here, into the user's cache), no figures; the in-process tests check those.
    f"--config.roofline.peaks_cache_dir={PEAKS_DIR}",
    "--config.roofline.shape_aware=false",
    "--config.roofline.check_peaks=false",
    "--config.roofline.bootstrap=30",
    "--config.output.plots=false",
]


def test_main_end_to_end(tmp_path):
    proc = run_main(*TINY_FLAGS, f"--workdir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = read_rows(tmp_path)
    assert {r["batch_size"] for r in rows} == {1, 2}
    assert {r["width"] for r in rows} == {16}
    assert "latency ms" in proc.stdout


@pytest.mark.parametrize(
    "flag, field",
    [
        # Every bad input is also refused in-process above; this checks the command line,
        # once past the flags (tests/test_cli.py checks those): one line, nothing else.
        ("--config.model.width=0", "model.width"),
    ],
)
def test_main_bad_input_is_one_line_and_writes_nothing(tmp_path, flag, field):
    workdir = tmp_path / "wd"
    proc = run_main(*TINY_FLAGS, flag, f"--workdir={workdir}")
    assert proc.returncode == 2
    assert len(proc.stderr.splitlines()) == 1, proc.stderr[-2000:]
    assert proc.stderr.startswith("error: ") and field in proc.stderr
    assert not workdir.exists()


def test_main_unwritable_workdir(tmp_path):
    # A regular file where a parent folder should be: no one, root included, can create it.
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    proc = run_main(*TINY_FLAGS, f"--workdir={blocker / 'wd'}")
    assert proc.returncode != 0
    assert "workdir cannot be created" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert blocker.read_text() == "not a folder"


def test_points_that_missed_their_precision_are_flagged_everywhere_shown(tmp_path, capsys):
    config = tiny()
    config.timing.target_rel_ci = 1e-9  # unreachable: every point stops on its budget
    config.timing.max_runs = 10**6
    app.run(config, str(tmp_path))
    out = capsys.readouterr().out
    assert "0 of 3 measured points converged" in out
    assert out.count("budget *") == 3 and "missed timing.target_rel_ci" in out
    report = (tmp_path / "report.md").read_text()
    assert "3 of 3 did not" in report and "tiny@1" in report
    assert "| 0/3 |" in report


def test_passes_visit_every_point_again_and_resume_mid_pass(tmp_path, monkeypatch):
    """Three passes, interrupted in the second: the rerun finishes the passes left, each
    point ends with one samples record per pass and its row pools them."""
    from batching import sweep

    config = tiny()
    config.sweep.passes = 3
    config.sweep.batch_sizes = (1, 2, 4, 8)  # enough points for a knee
    config.timing.target_rel_ci = 10.0  # every point converges: all four are fitted
    real, calls = sweep.repeat_point, {"n": 0}

    def dies_in_pass_two(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(sweep, "repeat_point", dies_in_pass_two)
    with pytest.raises(KeyboardInterrupt):
        app.run(config, str(tmp_path))
    done = {r["batch_size"]: r["passes_done"] for r in results.latest(read_rows(tmp_path))}
    assert sorted(done.values()) == [1, 1, 1, 2]  # pass 1 whole, one point of pass 2
    monkeypatch.setattr(sweep, "repeat_point", real)
    first_visits = []
    monkeypatch.setattr(sweep, "measure_point", lambda *a, **k: first_visits.append(a[1]) or 1 / 0)
    app.run(config, str(tmp_path))
    assert first_visits == []  # nothing was measured from scratch
    rows = read_rows(tmp_path)
    passes = results.Store(str(tmp_path)).pass_samples()
    for r in rows:
        assert r["passes_done"] == 3 and len(r["pass_medians_s"]) == 3
        by_pass = passes[("tiny", r["batch_size"])]
        assert [len(p) for p in by_pass] == r["pass_n_runs"] and r["n_runs"] == sum(
            r["pass_n_runs"]
        )
        # Each pass weighs the same: the geometric mean of the pass medians.
        medians = [float(np.median(p)) for p in by_pass]
        assert r["latency_s"] == pytest.approx(float(np.exp(np.mean(np.log(medians)))))
        assert r["pass_medians_s"] == pytest.approx(medians)
    (s,) = json.loads((tmp_path / "summary.json").read_text())
    assert s["knee_interval_from"] == "passes"
