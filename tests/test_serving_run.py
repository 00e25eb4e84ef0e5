"""A serving run through main.py: rows of the serving kind, per-request records, resume
after Ctrl-C, bad input refused before anything is written, and the report's sentences."""

import json
import os

import pytest

from batching import app, rows_serving
from batching.outputs import report_serving, results
from batching.outputs.serving import COMPARED
from batching.serve import session
from batching.serve.settings import Settings
from configs import serve as serve_config
from tests.conftest import run_main

TINY = {"d_model": 32, "head_dim": 8, "n_layers": 1, "mlp_dim": 64, "vocab_size": 256}


def tiny_config():
    config = serve_config.get_config()
    config.model.update(**TINY)
    config.serve.update(requests=6, calibration_requests=6, capacity_run_s=2.0,
                        policies=("continuous",), of_capacity=(0.5,), rates=(40.0,),
                        whatif_devices=())  # fmt: skip
    config.output.progress_bar = False
    return config


def lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_a_serving_run_writes_its_rows_records_report_and_resumes(tmp_path, monkeypatch):
    workdir = str(tmp_path / "serve")
    real = session.serve_rate
    calls = []

    def interrupted_second(*args):
        calls.append(args[3])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(session, "serve_rate", interrupted_second)
    with pytest.raises(KeyboardInterrupt):
        app.run(tiny_config(), workdir)
    first = lines(os.path.join(workdir, results.RESULTS))
    assert len(first) == 1  # the rate finished before Ctrl-C is kept
    monkeypatch.setattr(session, "serve_rate", real)
    served = app.run(tiny_config(), workdir)
    # Only the rate in flight was served again; the calibration was read back.
    assert len(lines(os.path.join(workdir, results.RESULTS))) == 2
    assert {r["request_rate"] for r in served} == {first[0]["request_rate"], 40.0}
    for row in served:
        rows_serving.check(row)
        assert row["completed"] == 6 and row["capacity_per_s"] > 0
        assert row["ttft_p90_low_s"] <= row["ttft_p90_s"] <= row["ttft_p90_high_s"]
        assert row["simulated_tpot_p90_s"] > 0 and 0 < row["mean_occupancy"] <= 4
        assert row["replayed_tpot_p90_s"] > 0 and row["step_paid_s"] > 0
        assert row["batchmates_changed"] == 0  # a dense decoder's tokens are its own
    records = lines(os.path.join(workdir, results.REQUESTS))
    assert len(records) == 12 and all(len(r["tokens"]) == r["output_len"] for r in records)
    with open(os.path.join(workdir, "report.md")) as f:
        report = f.read()
    assert "## Where batching stopped being free" in report and "continuous:" in report
    assert os.listdir(os.path.join(workdir, "tb", "serve"))
    assert os.path.exists(os.path.join(workdir, "plots", "serving_frontier.png"))
    # A third run has nothing left to serve.
    assert len(app.run(tiny_config(), workdir)) == 2
    assert len(lines(os.path.join(workdir, results.RESULTS))) == 2


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.serve.slo_tpot_s=0", "serve.slo_tpot_s must be a finite number > 0"),
        ("--config.serve.output_len=(8,200)", "does not fit serve.max_len 128"),
        ("--config.serve.policies=('fifo',)", "serve.policies has an unknown policy 'fifo'"),
    ],
)
def test_bad_serving_input_is_one_line_exit_2_and_nothing_written(tmp_path, override, message):
    workdir = tmp_path / "w"
    proc = run_main("--config=configs/serve.py", f"--workdir={workdir}", override)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not workdir.exists()


def test_settings_refuse_each_bad_field_by_name():
    good = serve_config.serve()
    assert Settings.from_config(good).slots == 4 and Settings.from_config(good).prompt_len == 32
    for field, value, text in [
        ("slots", 0, "serve.slots must be an integer >= 1"),
        ("rates", (float("inf"),), "serve.rates must be a finite number > 0"),
        ("prompt_len", (40, 20), "serve.prompt_len must be a length"),
        ("whatif_devices", ("Z9",), "serve.whatif_devices has an unknown device 'Z9'"),
        ("refresh_requests", -1, "serve.refresh_requests must be an integer >= 0, got -1"),
        ("trace", "/no/such.jsonl", "serve.trace '/no/such.jsonl' is not a file"),
    ]:
        bad = serve_config.serve()
        bad[field] = value
        with pytest.raises(ValueError, match=text.replace("(", r"\(")):
            Settings.from_config(bad)


def row(rate, occ, p90, low, high, **kw):
    base = {"policy": "p", "request_rate": rate, "mean_occupancy": occ, "tpot_p90_s": p90,
            "tpot_p90_low_s": low, "tpot_p90_high_s": high, "slots": 4}  # fmt: skip
    return {**base, **kw}


def test_the_report_says_tpot_rose_only_where_the_intervals_part():
    overlapping = [row(1, 1.0, 0.010, 0.009, 0.012), row(2, 2.0, 0.011, 0.0105, 0.013)]
    assert "stayed within" in report_serving.tpot_rise(overlapping)
    parted = [*overlapping, row(4, 3.5, 0.02, 0.015, 0.025)]
    assert "rose beyond its interval at 4 req/s" in report_serving.tpot_rise(parted)


def test_the_report_ranks_capacities_only_beyond_the_bisections_tolerance():
    close = {"a": {"capacity_per_s": 10.0, "upper_per_s": 10.4},
             "b": {"capacity_per_s": 10.2, "upper_per_s": 10.6}}  # fmt: skip
    assert "does not rank them" in report_serving.capacity_sentences(close)[0]
    apart = {"a": {"capacity_per_s": 10.0, "upper_per_s": 10.4},
             "b": {"capacity_per_s": 20.0, "upper_per_s": 20.8}}  # fmt: skip
    assert report_serving.capacity_sentences(apart)[0].startswith("b serves more than a")


def test_simulator_and_rerun_errors_are_judged_at_20_to_90_percent_of_capacity_only():
    def served(rate, share, measured, simulated=0.0, replayed=0.0):
        r = {"request_rate": rate, "rate_share": share}
        for m in COMPARED:  # every metric the same numbers
            r.update({m: measured, f"simulated_{m}": simulated, f"replayed_{m}": replayed})
        return r

    first = [served(1.0, 0.2, 0.010, 0.012, 0.011), served(4.0, 0.9, 0.020, 0.018, 0.021),
             served(6.0, 1.2, 0.100, 0.500, 0.500)]  # fmt: skip
    rerun = [served(1.0, None, 0.015), served(6.0, None, 1.0)]
    for got in report_serving.error_summary(first, rerun).values():
        assert got["predicted"] == {"median": pytest.approx(0.15), "max": pytest.approx(0.2)}
        assert got["replayed"] == {"median": pytest.approx(0.075), "max": pytest.approx(0.1)}
        assert got["rerun"] == {"median": pytest.approx(0.5), "max": pytest.approx(0.5)}
