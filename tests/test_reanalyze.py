"""Rows measured on one machine analysed on another, with the peaks measured there."""

import json
import os

import pytest

from batching import app as lab
from batching.measure import peaks, peaks_cache, shape_bench
from batching.outputs import results
from experiments import reanalyze
from tests.conftest import PEAKS_DIR, SEEDED_PEAKS, tiny


def _read(path):
    with open(path) as f:
        return json.load(f)


def test_gpu_rows_are_analysed_here_with_the_gpu_peaks_file(tmp_path, monkeypatch):
    """A sweep's rows relabelled as an H200's (a fake device kind), with an H200 peaks file:
    the analysis takes that file's peaks and the H200's spec and cache size, measures nothing
    (no lone-op microbenchmark, which only a CPU's thread hand-off needs), and says so."""
    measured = tmp_path / "measured"
    config = tiny()
    config.roofline.shape_aware = True
    config.roofline.microbenchmark_budget_s = 0.0  # the CPU sweep itself measures no shapes
    lab.run(config, str(measured))
    assert os.path.exists(measured / results.PEAKS)  # every analysed run writes its peaks
    rows = results.Store(str(measured)).rows()
    with open(measured / results.RESULTS, "w") as f:
        for r in rows:
            f.write(json.dumps({**r, "platform": "gpu", "device_kind": "NVIDIA H200"}) + "\n")
    gpu_peaks = {
        **SEEDED_PEAKS,
        "matmul_flops_per_s": {"float32": 3.8e14},
        "bandwidth": {"read_bytes_per_s": 4.2e12, "copy_bytes_per_s": 4e12, "buffer_bytes": 1.0},
        "gemm_flops_per_s": {"float32:2x16x16:warm": 1e12},
    }
    peaks_file = tmp_path / "h200_peaks.json"
    peaks_file.write_text(json.dumps({"gpu:NVIDIA H200": gpu_peaks}))
    before = os.path.getmtime(peaks_cache.cache_path(PEAKS_DIR))
    monkeypatch.setattr(peaks, "lone_op_seconds", lambda *a, **k: pytest.fail("lone op"))
    monkeypatch.setattr(shape_bench, "measure_gemm_flops", lambda *a, **k: pytest.fail("measured"))
    out = tmp_path / "here"
    (s,) = reanalyze.reanalyze(str(measured), str(peaks_file), str(out))
    assert s["peak_flops_per_s"] == 3.8e14 and s["peak_bytes_per_s"] == 4.2e12
    assert s["spec_device"] == "H200" and s["peaks_file"] == str(peaks_file)
    assert s["last_level_cache_bytes"] == 50e6  # the spec table's, not this CPU's
    # batch 2's product is in the file; 1 and 4 are interpolated from it
    assert s["rates_interpolated"] == 2 and s["rates_at_peak"] == 0
    assert os.path.getmtime(peaks_cache.cache_path(PEAKS_DIR)) == before
    report = (out / "report.md").read_text()
    assert "NVIDIA H200" in report and f"Peaks taken from the file {peaks_file}" in report
    assert _read(out / results.PEAKS) == {"gpu:NVIDIA H200": gpu_peaks}
    assert sorted(r["batch_size"] for r in results.Store(str(out)).rows()) == [1, 2, 4]


def test_a_run_whose_device_the_peaks_file_lacks_is_shown_unanalysed(tmp_path):
    lab.run(tiny(), str(tmp_path / "w"))
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"gpu:NVIDIA H200": SEEDED_PEAKS}))
    (s,) = reanalyze.reanalyze(str(tmp_path / "w"), str(other), str(tmp_path / "o"))
    assert "has no float32" in s["not_analysed"] and "cpu:cpu" in s["not_analysed"]
    assert "knee_batch_size" not in s
    assert "## Runs" in (tmp_path / "o" / "report.md").read_text()
