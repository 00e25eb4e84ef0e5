import json
import os

import numpy as np
import pytest

from batching import app
from batching.measure import timing
from batching.predict import knee, roofline, whatif
from batching.setup import topology
from batching.workloads import mlp as mlp_workload
from tests.conftest import tiny


def synthetic(knee_true, noise=0.05, n=300, seed=0):
    """Rows and samples from a three-limit model whose knee is known."""
    rng = np.random.default_rng(seed)
    W, f1 = 33.5e6, 2 * 8.4e6
    bw, overhead = 25e9, 2e-4
    f = knee_true * f1 / (W / bw)  # compute overtakes memory at knee_true
    rows, samples = [], {}
    for b in 2 ** np.arange(11):
        t = max(overhead, W / bw, f1 * b / f)
        s = t * rng.lognormal(0, noise, n)
        samples[int(b)] = s
        rows.append(
            {
                "batch_size": int(b),
                "latency_s": float(np.median(s)),
                "analytic_flops": f1 * b,
                "analytic_bytes": W,
                "flops": None,
                "bytes_accessed": None,
            }
        )
    return rows, samples


@pytest.mark.parametrize("knee_true", [12.0, 100.0])
def test_knee_fit_recovers_a_known_knee_with_its_interval(knee_true):
    rows, samples = synthetic(knee_true)
    fit = knee.fit_knee(rows, samples, n_bootstrap=100)
    assert fit.knee_low <= knee_true <= fit.knee_high
    assert fit.knee_batch_size == pytest.approx(knee_true, rel=0.15)
    assert fit.knee_high / fit.knee_low < 1.5  # the interval says something


def test_knee_interval_widens_with_noise():
    quiet = knee.fit_knee(*synthetic(50.0, noise=0.01), n_bootstrap=100)
    noisy = knee.fit_knee(*synthetic(50.0, noise=0.3, n=20), n_bootstrap=100)
    assert noisy.knee_high / noisy.knee_low > quiet.knee_high / quiet.knee_low


def test_knee_interval_spans_what_moves_between_passes():
    """Three passes whose points each moved by a few percent (a busy neighbour in one pass):
    within each pass the samples are tight, so only the across-pass bootstrap sees it."""
    rows, samples = synthetic(50.0, noise=0.01)
    rng = np.random.default_rng(1)
    passes = {b: [s[i::3] * rng.lognormal(0, 0.08) for i in range(3)] for b, s in samples.items()}
    for r in rows:
        r["latency_s"] = float(np.median(np.concatenate(passes[r["batch_size"]])))
    pooled = {b: np.concatenate(p) for b, p in passes.items()}
    across = knee.fit_knee(rows, passes, n_bootstrap=100)
    within = knee.fit_knee(rows, pooled, n_bootstrap=100)
    assert across.interval_from == "passes" and within.interval_from == "samples"
    assert across.knee_batch_size == within.knee_batch_size
    width = lambda f: f.knee_high / f.knee_low
    assert width(across) > 2 * (width(within) - 1) + 1


def test_a_degenerate_knee_interval_is_flagged():
    assert knee._degenerate(1.62, 1.19, 1.62)
    assert knee._degenerate(5.0, 5.0, 5.0)
    assert not knee._degenerate(25.3, 24.6, 25.9)


def test_regime_labels_on_synthetic_points():
    # 1 µs of overhead, 1 ms of memory traffic at 1 GB/s, compute 10 ms or 0.1 µs
    assert roofline.predict(1e6, 1e6, 1e-6, 1e9, 1e-2) == (1e-2, "compute")
    assert roofline.predict(1e6, 1e6, 1e-6, 1e9, 1e-7) == (1e-3, "memory")
    assert roofline.predict(1e6, 1e3, 1e-3, 1e9, 1e-7) == (1e-3, "overhead")


def test_free_batching_limit_stops_at_the_first_significant_slowdown():
    rng = np.random.default_rng(0)
    base = lambda scale: scale * rng.lognormal(0, 0.02, 200)
    samples = {1: base(1.0), 2: base(1.0), 4: base(1.0), 8: base(1.1), 16: base(1.0)}
    # One pass per point: the samples within it decide, and the limit says so.
    assert knee.free_batching_limit(samples) == (4, "samples")
    passes = {b: [s[i::5] * f for i, f in enumerate((1, 1.3, 0.8, 1.1, 0.9))]
              for b, s in samples.items()}  # fmt: skip
    assert knee.free_batching_limit(passes) == (4, "passes")


@pytest.mark.parametrize("batch", [1, 16, 128])
def test_mlp_analytic_flops_match_xla(batch):
    config = tiny(width=128, depth=3)
    wl = mlp_workload.build(config, topology.build(config), "")
    compiled = timing.compile_fn(wl.fn, wl.make_args(batch))
    analytic = mlp_workload.cost(mlp_workload.model_config(config.model), batch)
    assert compiled.flops == pytest.approx(analytic.flops, rel=0.10)


def test_sweep_rows_and_summary_carry_the_roofline(tmp_path):
    config = tiny()
    config.roofline.shape_aware = True
    config.sweep.batch_sizes = (1, 2, 4, 8)  # a knee needs more points than parameters
    config.report.claims = ("C3", "C5")
    config.profile.batch_sizes = (2,)
    config.output.plots = True
    summaries = app.run(config, str(tmp_path))
    s = summaries[0]
    for field in (
        "predicted_critical_batch",
        "spec_critical_batch",
        "knee_batch_size",
        "knee_low",
        "knee_high",
        "free_batching_limit",
        "overhead_s",
        "effective_flops_per_s",
        "effective_bytes_per_s",
        "peak_flops_per_s",
        "peak_bytes_per_s",
    ):
        assert field in s, field
    # seeded peaks: 1e11 FLOP/s, 2e10 B/s, 4-byte params
    assert s["predicted_critical_batch"] == pytest.approx(1e11 * 4 / (2 * 2e10))
    assert s["spec_critical_batch"] is None  # a CPU is not in the spec table
    assert set(s["whatif"]) == {"T4", "A100 80GB SXM", "H100 SXM"}
    # One device: no collectives, no comm term, global B* = per-device B*; the 8-GPU node
    # what-if puts 8 data replicas there, so its global B* is 8 of its device's.
    assert s["predicted_critical_batch_global"] == s["predicted_critical_batch"]
    assert s["functional_simulation"] is False and s["comm_share_median"] is None
    node = s["whatif_nodes"]["8x H100 SXM (HGX)"]
    assert node["critical_batch_global"] == pytest.approx(8 * node["critical_batch"])
    assert all(v == 0.0 for v in node["comm_s"].values())
    with open(tmp_path / "results.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == 4
    for r in rows:
        assert r["regime"] in roofline.REGIMES
        assert r["predicted_latency_s"] > 0 and r["fitted_latency_s"] > 0
        assert isinstance(r["cost_mismatch"], bool)
        assert r["collectives"] == [] and r["comm_bytes"] == 0.0 and r["predicted_comm_s"] == 0.0
        # the per-op prediction: its ops, its own call floor, where its time goes
        assert r["ops"] and r["call_floor_s"] > 0
        assert r["predicted_overhead_s"] >= r["call_floor_s"]
        # width-16 products are small ops: priced from their lone calls, the extra paid once
        assert r["predicted_call_extra_s"] >= 0.0
        assert r["predicted_overhead_s"] >= r["call_floor_s"] + r["predicted_call_extra_s"]
        assert set(r["predicted_by_kind"]) <= {"gemm"}
    assert set(s["breakdown"]) == {1, 8}
    assert "predicted_curve_knee_batch_size" in s
    assert (tmp_path / "plots" / "breakdown_tiny.png").exists()
    # trace files where TensorBoard's profile plugin looks for them
    profile_root = tmp_path / "tb" / "tiny" / "plugins" / "profile"
    traces = [f for d in profile_root.iterdir() for f in os.listdir(d)]
    assert any(f.endswith(".xplane.pb") for f in traces)
    report = (tmp_path / "report.md").read_text()
    assert "### C3:" in report and "### C5:" in report
    assert "216.7" in report  # the post's own B* reproduced from its inputs
    assert "8x H100 SXM (HGX)" in report and "Functional simulation" not in report
    assert "## Where the time goes" in report
    html = (tmp_path / "report.html").read_text()
    assert "data:image/png;base64," in html
    assert set(s["verdicts"]) == {"C3", "C5"}


def test_a_node_does_not_split_one_example_over_its_replicas():
    """On an 8-GPU node, batch 1 runs on one GPU (the others idle): never faster than one
    GPU; batch 64 splits 8 ways."""

    W = 4 * 1024 * 1024 * 8  # 8 layers of 1024x1024 fp32 weights
    rows = [
        {
            "batch_size": b,
            "analytic_flops": 2 * b * W / 4,
            "analytic_bytes": W + 8 * b * 1024 * 4,
            "weight_bytes": W,
            "flops": None,
            "bytes_accessed": None,
            "parallel_shape": {"data": 1, "expert": 1, "model": 1},
        }
        for b in (1, 8, 64)
    ]
    one = whatif.whatif(rows, ("H100 SXM",), "float32", "default", 4)["H100 SXM"]
    node = whatif.whatif_nodes(rows, "float32", "default", 4)["8x H100 SXM (HGX)"]
    assert node["latency_s"][1] >= one["latency_s"][1] * (1 - 1e-9)
    assert node["latency_s"][8] == pytest.approx(one["latency_s"][1], rel=1e-6)
    assert node["latency_s"][64] < one["latency_s"][64]
