"""Verdicts and regimes on stored rows: the committed H200 sweeps, re-analysed here with the
peaks measured there (experiments/reanalyze.py)."""

import json
import math
import os
import shutil

import pytest

from batching.outputs import archive
from batching.predict import knee, verdict
from experiments import reanalyze
from tests.conftest import ROOT

H200 = os.path.join(ROOT, "experiments", "results", "nvidia-h200")


@pytest.fixture(scope="module")
def h200(tmp_path_factory):
    """mlp and mlp_widths_bf16 re-analysed into a scratch folder (no figures)."""
    out = {}
    for name in ("mlp", "mlp_widths_bf16"):
        src = tmp_path_factory.mktemp(name)
        shutil.copytree(os.path.join(H200, name), src, dirs_exist_ok=True)
        summaries = reanalyze.reanalyze(
            str(src), os.path.join(H200, "device_peaks.json"), plots=False
        )
        # The rows were gzipped, and stay so.
        rows = {(r["run"], r["batch_size"]): r for r in archive._read_rows(str(src))}
        out[name] = (summaries, rows, (src / "report.md").read_text())
    return out


def test_regimes_follow_intensity_against_the_ridge(h200):
    """bf16 width 8192 at batch 1 does 1 FLOP per byte (ridge ~220): memory-bound, not the
    'compute' the per-op rates once said; at 4096 it is compute-bound; width 1024 under the
    H200's 0.16 ms floor is overhead-bound at every batch, never 'memory' at 4096."""
    _, rows, _ = h200["mlp_widths_bf16"]
    assert rows[("mlp_d8_w8192", 1)]["regime"] == "memory"
    assert rows[("mlp_d8_w8192", 4096)]["regime"] == "compute"
    assert {r["regime"] for (run, _), r in rows.items() if run == "mlp_d8_w1024"} == {"overhead"}
    for r in rows.values():
        terms = r["regime_terms_s"]
        assert r["regime"] == max(terms, key=terms.get)
        # no point above the compute roof: the roof is the best rate measured
        assert r["compute_roof_fraction"] <= 1 + 1e-9


def test_a_knee_past_the_sweep_is_not_tested_and_says_which_sweep_would(h200):
    summaries, _, report = h200["mlp"]
    (s,) = summaries
    assert s["knee_batch_size"] > max(s["batch_sizes"])
    assert s["verdicts"]["C3"]["verdict"] == "not tested by this sweep"
    assert "sweep to batch 8192" in s["verdicts"]["C3"]["evidence"]
    assert "refuted" not in report


def test_sentences_follow_their_numbers(h200):
    """The T4 in bf16 has no unit: its fp16 peak stands in (B* 203), never int8's 130; no
    'third limit hides' sentence without a run that shows it."""
    summaries, _, report = h200["mlp_widths_bf16"]
    t4 = summaries[0]["whatif"]["T4"]
    assert t4["flops_per_s"] == 65e12 and round(t4["critical_batch"]) == 203
    assert "no bfloat16 unit" in t4["source"]
    assert "130" not in report.split("## What-if on spec devices")[1].split("##")[0]
    assert "hides the memory-bound region" not in report or "In this run the third limit" in report
    assert "(no interval: no timing samples kept)" in report  # no samples, no interval
    with open(os.path.join(H200, "device_peaks.json")) as f:
        assert "note" in json.load(f)["gpu:NVIDIA H200"]


def test_an_interval_without_an_upper_end_is_called_open_not_missing():
    """A bootstrap whose resamples sometimes never turn compute-bound has a low end and no
    high one (stored as None): the knee text says the interval is open, not that no
    samples were kept; with neither end, it says no samples were kept."""
    s = dict(knee_batch_size=39.5, knee_low=11.6, knee_high=None, points=7,
             points_converged=1, knee_fit_points=7)  # fmt: skip
    text = verdict.knee_text(s)
    assert text.startswith("39.5 [11.6, open] (in over 2.5% of resamples the fit never")
    assert "no timing samples" not in text
    assert "no timing samples kept" in verdict.knee_text(s | dict(knee_low=None))
    assert "no timing samples kept" in verdict.knee_text(s | dict(knee_low=math.nan))


def test_a_knee_outside_its_own_interval_is_said_to_be_poorly_determined():
    """bench24's mlp_article: the predicted curve's knee 25.7 with [25.8, 44.2] (fits to
    single passes skew above the fit to the pooled medians): the tables say so, and the
    fitted knee's interval counts as degenerate, not as ±x% across passes."""
    assert verdict.interval_text(25.7, 25.8, 44.2).endswith(verdict.OUTSIDE)
    assert verdict.interval_text(26.8, 26.7, 40.1) == "26.8 [26.7, 40.1]"
    assert verdict.interval_text(math.nan, math.nan, math.nan) == "– [–, –]"
    assert knee._degenerate(25.7, 25.8, 44.2) and not knee._degenerate(26.8, 26.7, 40.1)
    s = dict(knee_batch_size=25.7, knee_low=25.8, knee_high=44.2, points=10,
             knee_interval_degenerate=True, knee_interval_from="passes", knee_fit_points=6,
             points_converged=6)  # fmt: skip
    text = verdict.knee_text(s)
    assert verdict.OUTSIDE in text and "across passes" not in text


def test_regimes_below_the_knee_read_in_batch_order_with_their_batches():
    """bench26's mlp_article: memory at batch 1-8, compute from 16, knee 19.4. The C3 text
    once listed the set sorted ("compute, memory"), which reads as if batch 1 were
    compute-bound."""
    regimes = ["memory"] * 4 + ["compute"] * 6
    rows = [dict(run="r", batch_size=2**i, regime=g) for i, g in enumerate(regimes)]
    rows.append(dict(run="other", batch_size=1, regime="overhead"))
    assert verdict.regime_spans(rows, "r", 19.4) == "memory at B=1–8, compute at B=16"
    assert verdict.regime_spans(rows, "r", 2) == "memory at B=1"
    assert verdict.regime_spans(rows, "r", 1) == "none"
    assert verdict.regimes_below(rows, "r", 19.4) == ["compute", "memory"]
