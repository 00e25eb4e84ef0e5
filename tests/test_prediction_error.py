"""experiments/prediction_error.py: issue 13's error figures from a workdir's rows."""

import json

from experiments import prediction_error


def test_median_and_per_run_errors_from_rows_and_summary(tmp_path):
    rows = [
        {"run": "a", "batch_size": 1, "latency_s": 1.0, "predicted_latency_s": 1.1},
        {"run": "a", "batch_size": 2, "latency_s": 2.0, "predicted_latency_s": 1.0},
        {"run": "b", "batch_size": 1, "latency_s": 1.0, "predicted_latency_s": 1.3},
        {"run": "b", "batch_size": 2, "latency_s": 1.0, "status": "failed"},
        {"run": "b", "batch_size": 4, "latency_s": 1.0},  # not analysed: left out
    ]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = [{"run": "a", "knee_batch_size": 3.0, "knee_low": 2.0, "knee_high": 4.0}]
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    lines = prediction_error.describe(str(tmp_path)).splitlines()
    # errors 0.1, 0.5 (run a) and 0.3 (run b): median 0.3
    assert lines[0].endswith("3 points, median 0.300, p90 0.460")
    assert "a" in lines[1] and "median=0.300" in lines[1] and "knee fit=3 [2, 4]" in lines[1]
    assert "median=0.300" in lines[2] and "knee fit=- [-, -]" in lines[2]
    assert prediction_error.describe(str(tmp_path / "none")).endswith("no analysed points")
