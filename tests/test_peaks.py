"""Microbenchmarks and their per-device cache."""

import json

import jax
import pytest

from batching.measure import microbench, peaks, peaks_cache, rates, shape_bench
from batching.predict import analysis
from batching.workloads import ops
from models.kv_cache import attend_cache as ATTEND


@pytest.fixture(autouse=True, scope="module")
def _optimized_xla():
    # tests/conftest.py compiles with most optimizations off; these time real kernels.
    before = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", False)
    yield
    jax.config.update("jax_disable_most_optimizations", before)


def test_microbenchmarks_measure_something_plausible():
    dev = jax.devices()[0]
    f = microbench.measure_matmul_flops(dev, "float32", n=256)
    assert 1e8 < f < 1e15
    bw = microbench.measure_bandwidth(dev, buffer_bytes=8 << 20)
    assert 1e8 < bw["read_bytes_per_s"] < 1e13
    assert 0 < microbench.measure_dispatch_floor(dev) < 0.01
    assert 0 <= microbench.measure_kernel_overhead(dev, chain=4) < 0.01
    warm = shape_bench.measure_gemm_flops(dev, "float32", 4, 64, 64)
    cold = shape_bench.measure_gemm_flops(dev, "float32", 4, 64, 64, cold=True)
    assert 1e6 < warm < 1e15 and 1e6 < cold < 1e15
    batched = shape_bench.measure_gemm_flops(dev, "float32", 4, 64, 64, batch=3)
    assert 1e6 < batched < 1e15


def test_attention_microbenchmark_is_cached_and_slower_for_a_longer_cache(tmp_path):
    dev = jax.devices()[0]
    short = peaks.attention_seconds(
        dev, "float32", "bksh", (4, 2, 256, 2, 64), str(tmp_path), ATTEND
    )
    long = peaks.attention_seconds(
        dev, "float32", "bksh", (4, 2, 8192, 2, 64), str(tmp_path), ATTEND
    )
    assert 0 < short < long < 1.0
    with open(peaks_cache.cache_path(str(tmp_path))) as f:
        table = next(iter(json.load(f).values()))["attention_s"]
    assert table["float32:bksh:4x2x8192x2x64"] == long
    # cached: a second call measures nothing
    assert (
        peaks.attention_seconds(dev, "float32", "bksh", (4, 2, 8192, 2, 64), str(tmp_path), ATTEND)
        == long
    )


def test_conv_microbenchmark_is_cached_and_capped_at_its_saturating_batch(tmp_path, monkeypatch):
    dev = jax.devices()[0]
    shape = (2, 8, 8, 4, 8, 3, 1)
    f = peaks.conv_flops(dev, "float32", shape, str(tmp_path))
    assert 1e6 < f < 1e15
    with open(peaks_cache.cache_path(str(tmp_path))) as fh:
        table = next(iter(json.load(fh).values()))["conv_flops_per_s"]
    assert table == {"float32:2x8x8x4x8x3x1": f}
    # cached: a second call measures nothing
    monkeypatch.setattr(shape_bench, "measure_conv_flops", lambda *a, **k: 1 / 0)
    assert peaks.conv_flops(dev, "float32", shape, str(tmp_path)) == f
    # 2·56·56·64·9·64 ≈ 0.23 GFLOP per example: measured at batch 16 (>= 2 GFLOP), not 64
    assert shape_bench.conv_measured_batch((64, 56, 56, 64, 64, 3, 1)) == 16
    assert shape_bench.conv_measured_batch((4, 56, 56, 64, 64, 3, 1)) == 4
    assert shape_bench.conv_flops_of((1, 56, 56, 64, 64, 3, 2)) == 2 * 28 * 28 * 64 * 9 * 64


def test_call_floor_is_measured_with_the_workloads_own_arguments():
    from flax import nnx

    from models import mlp

    state = nnx.state(mlp.MLP(mlp.MLPConfig(width=8, depth=8), rngs=nnx.Rngs(0)))
    x = jax.numpy.ones((1, 8))
    floor = microbench.measure_call_floor((state, x))
    assert 0 < floor < 0.01
    assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(state))  # nothing donated


def test_cache_bandwidth_is_measured_on_a_buffer_that_fits():
    bw = microbench.measure_cache_bandwidth(jax.devices()[0], buffer_bytes=1 << 20)
    assert 1e8 < bw < 1e14


def test_cache_bandwidth_timed_as_passes_inside_one_call_agrees_with_one_pass():
    # Accelerators time 32 dependent passes against one (their call overhead dwarfs a pass);
    # on this CPU, where one pass per call is accurate, both ways must read the same cache.
    dev = jax.devices()[0]
    one = microbench.measure_cache_bandwidth(dev, buffer_bytes=2 << 20, passes=1)
    many = microbench.measure_cache_bandwidth(dev, buffer_bytes=2 << 20, passes=8)
    assert 0.25 < many / one < 4, (one, many)


def test_last_level_cache_is_read_or_bounded():
    assert (1 << 20) <= microbench.last_level_cache_bytes(jax.devices()[0]) <= (1 << 30)


def test_peaks_are_cached_per_device(tmp_path, monkeypatch):
    dev = jax.devices()[0]
    calls = []
    monkeypatch.setattr(microbench, "measure_matmul_flops", lambda d, t: calls.append(t) or 1e11)
    monkeypatch.setattr(
        microbench,
        "measure_bandwidth",
        lambda d, **kw: {"read_bytes_per_s": 2e10, "copy_bytes_per_s": 1e10, "buffer_bytes": 1.0},
    )
    monkeypatch.setattr(microbench, "measure_dispatch_floor", lambda d: 1e-5)
    monkeypatch.setattr(microbench, "measure_kernel_overhead", lambda d: 1e-6)
    monkeypatch.setattr(microbench, "measure_cache_bandwidth", lambda d: 4e10)
    p = peaks.measured_peaks(dev, ("float32",), str(tmp_path))
    peaks.measured_peaks(dev, ("float32",), str(tmp_path))
    assert calls == ["float32"]  # second call read the cache
    assert p.bandwidth_bytes_per_s == 2e10
    peaks.measured_peaks(dev, ("float32",), str(tmp_path), refresh=True)
    assert calls == ["float32", "float32"]
    # Another matmul precision is another peak, measured under that precision.
    precisions = []
    monkeypatch.setattr(
        microbench,
        "measure_matmul_flops",
        lambda d, t: precisions.append(jax.config.jax_default_matmul_precision) or 3e11,
    )
    p = peaks.measured_peaks(dev, ("float32",), str(tmp_path), matmul_precision="highest")
    assert precisions == ["highest"]
    assert p.matmul_flops_per_s == {"float32": 1e11, "float32@highest": 3e11}


def test_unmeasured_shape_rates_are_interpolated_within_their_family(tmp_path):
    """With the budget spent, a GEMM shape between two measured ones of the same weights gets
    the log-log interpolation of their rates, past the ends the nearest one's; a shape with
    no measured relative is left to the peak; nothing is measured."""
    dev = jax.devices()[0]
    entry = {
        "gemm_flops_per_s": {"float32:1x16x16:warm": 1e9, "float32:4x16x16:warm": 4e9},
        "attention_s": {"float32:bksh:2x1x64x2x8": 2e-5, "float32:bksh:8x1x64x2x8": 2e-5},
        # a ragged family's cold rates are interpolated apart from its warm one
        "ragged_flops_per_s": {
            "float32:8@2x16x16:cold": 1e9,
            "float32:8@8x16x16:cold": 4e9,
            "float32:8@4x16x16:warm": 9e9,
        },
    }
    with open(peaks_cache.cache_path(str(tmp_path)), "w") as f:
        json.dump({f"{dev.platform}:{dev.device_kind}": entry}, f)
    source = rates.RateSource(str(tmp_path), refresh=False)
    source.start_run(0.0)
    rate = source.gemm(dev, "float32", cold=False)
    assert rate((2, 16, 16)) == pytest.approx(2e9)
    assert rate((64, 16, 16)) == pytest.approx(4e9)
    assert rate((2, 32, 32)) is None
    assert source.ragged(dev, "float32", cold=True)((8, 4, 16, 16)) == pytest.approx(2e9)
    # attention is stored as seconds: interpolated as sequences per second, 4 -> 2e-5 too
    shape = dict(batch=4, kv_heads=1, cache_len=64, q_per_kv=2, head_dim=8)
    attend = source.attention(dev, ATTEND)
    assert attend({**shape, "dtype": "float32", "layout": "bksh"}) == pytest.approx(2e-5)
    assert source.unmeasured == {
        "gemm_flops_per_s:float32:2x16x16:warm": "interpolated",
        "gemm_flops_per_s:float32:64x16x16:warm": "interpolated",
        "gemm_flops_per_s:float32:2x32x32:warm": "peak",
        "ragged_flops_per_s:float32:8@4x16x16:cold": "interpolated",
        "attention_s:float32:bksh:4x1x64x2x8": "interpolated",
    }
    assert source.budget.refused == 5
    with open(peaks_cache.cache_path(str(tmp_path))) as f:
        assert next(iter(json.load(f).values())) == entry  # nothing was measured


def test_lone_op_microbenchmark_is_cached_per_kind_and_shape(tmp_path, monkeypatch):
    dev = jax.devices()[0]
    gemm = peaks.lone_op_seconds(dev, "float32", "gemm", (2, 16, 16), str(tmp_path))
    conv = peaks.lone_op_seconds(dev, "float32", "conv", (1, 8, 8, 4, 4, 3, 1), str(tmp_path))
    for one, many in (gemm, conv):
        assert 0 <= one < 0.01 and 0 <= many < 0.01
    # `many` runs LONE_COPIES products, chained as layers are
    fn, args = shape_bench._lone_program(dev, "float32", "gemm", (2, 16, 16), ops.LONE_COPIES)
    assert jax.jit(fn).lower(*args).as_text().count("dot_general") == ops.LONE_COPIES
    # a batched product and a conv that changes its shape (not chainable) run too
    for kind, shape in (("gemm", (3, 2, 16, 8)), ("conv", (1, 8, 8, 4, 8, 3, 2))):
        assert all(
            0 < t < 0.01
            for t in shape_bench.measure_lone_op_seconds(dev, "float32", kind, shape, 0.0)
        )
    with open(peaks_cache.cache_path(str(tmp_path))) as f:
        table = next(iter(json.load(f).values()))["lone_op_chain_s"]
    assert table == {"gemm:float32:2x16x16": list(gemm), "conv:float32:1x8x8x4x4x3x1": list(conv)}
    with pytest.raises(ValueError, match="attention"):
        shape_bench.measure_lone_op_seconds(dev, "float32", "attention", (1, 1, 8, 1, 8), 0.0)
    monkeypatch.setattr(shape_bench, "measure_lone_op_seconds", lambda *a, **k: 1 / 0)
    assert peaks.lone_op_seconds(dev, "float32", "gemm", (2, 16, 16), str(tmp_path)) == gemm


def test_gemm_microbenchmarks_of_one_weight_shape_share_their_weights():
    dev = jax.devices()[0]
    shape_bench.measure_gemm_flops(dev, "float32", 2, 32, 48, cold=True)
    made = list(next(iter(shape_bench._WEIGHTS.values())))
    shape_bench.measure_gemm_flops(
        dev, "float32", 8, 32, 48, cold=True
    )  # another batch, same weights
    again = next(iter(shape_bench._WEIGHTS.values()))
    assert len(made) > 1 and all(a is b for a, b in zip(made, again, strict=True))
    first = made[0]
    assert first.shape == (32, 48) and float(first[0, 0]) == 1 / 32


def _mock_device_measurements(monkeypatch, f=1e11, read=2e10):
    """This 'device' measures f FLOP/s and `read` bytes/s, whatever a cache says."""
    monkeypatch.setattr(microbench, "measure_matmul_flops", lambda d, t: f)
    monkeypatch.setattr(
        microbench,
        "measure_bandwidth",
        lambda d, **kw: {"read_bytes_per_s": read, "copy_bytes_per_s": read, "buffer_bytes": 1.0},
    )
    monkeypatch.setattr(microbench, "measure_dispatch_floor", lambda d: 1e-5)
    monkeypatch.setattr(microbench, "measure_kernel_overhead", lambda d: 1e-6)
    monkeypatch.setattr(microbench, "measure_cache_bandwidth", lambda d: 4e10)
    monkeypatch.setattr(
        microbench, "quick_peaks", lambda d, t: {"matmul_flops_per_s": f, "read_bytes_per_s": read}
    )


def test_a_cache_filled_on_a_busy_machine_is_noticed_and_measured_again(tmp_path, monkeypatch):
    """Every rate of the cache scaled by 0.4 (a first run beside other work): this run's
    check reads 2.5x more, the entry is measured again and its per-shape rates dropped, the
    report says so, and the predictions equal those made from a fresh cache."""
    from batching import app
    from tests.conftest import tiny

    dev = jax.devices()[0]
    _mock_device_measurements(monkeypatch)
    fresh, busy = tmp_path / "fresh", tmp_path / "busy"
    peaks.measured_peaks(dev, ("float32",), str(fresh))
    entry = peaks_cache.device_entry(dev, str(fresh))
    poisoned = {
        **entry,
        "matmul_flops_per_s": {"float32": 0.4e11},
        "bandwidth": {"read_bytes_per_s": 0.8e10, "copy_bytes_per_s": 0.8e10, "buffer_bytes": 1},
        "gemm_flops_per_s": {"float32:1x16x16:warm": 0.4e9},
    }
    busy.mkdir()
    with open(peaks_cache.cache_path(str(busy)), "w") as f:
        json.dump({f"{dev.platform}:{dev.device_kind}": poisoned}, f)
    predicted = {}
    for name, cache in (("fresh", fresh), ("busy", busy)):
        config = tiny()
        config.roofline.peaks_cache_dir = str(cache)
        config.roofline.check_peaks = True
        (s,) = app.run(config, str(tmp_path / f"run_{name}"))
        rows = results_of(tmp_path / f"run_{name}")
        predicted[name] = {r["batch_size"]: r["predicted_latency_s"] for r in rows}
        assert s["peak_flops_per_s"] == 1e11
        check = s["peaks_check"]
        assert check["verdict"] == ("agreed" if name == "fresh" else "re-measured")
    assert predicted["busy"] == predicted["fresh"]
    assert "gemm_flops_per_s" not in peaks_cache.device_entry(
        dev, str(busy)
    ) or not peaks_cache.device_entry(dev, str(busy))["gemm_flops_per_s"].get(
        "float32:1x16x16:warm"
    )
    report = (tmp_path / "run_busy" / "report.md").read_text()
    assert "measured again" in report


def test_rates_measured_while_the_machine_is_busier_are_not_cached(tmp_path, monkeypatch):
    """The device reads 2.5x slower than when its peaks were cached: the cache is kept, this
    run measures its shapes' rates and uses them, but saves none of them to the shared cache
    (a quiet machine would inherit them); the report says so."""
    from batching import app
    from tests.conftest import tiny

    dev = jax.devices()[0]
    _mock_device_measurements(monkeypatch, f=1e11, read=2e10)
    cache = tmp_path / "cache"
    peaks.measured_peaks(dev, ("float32",), str(cache))
    entry = peaks_cache.device_entry(dev, str(cache))
    quiet = {
        **entry,
        "matmul_flops_per_s": {"float32": 2.5e11},
        "bandwidth": {"read_bytes_per_s": 5e10, "copy_bytes_per_s": 5e10, "buffer_bytes": 1},
    }
    with open(peaks_cache.cache_path(str(cache)), "w") as f:
        json.dump({f"{dev.platform}:{dev.device_kind}": quiet}, f)
    before = peaks_cache.device_entry(dev, str(cache))
    config = tiny()
    config.roofline.peaks_cache_dir = str(cache)
    config.roofline.check_peaks = True
    config.roofline.shape_aware = True  # the per-shape rates this is about
    (s,) = app.run(config, str(tmp_path / "run"))
    assert s["peaks_check"]["verdict"].startswith("kept")
    assert peaks_cache.device_entry(dev, str(cache)) == before  # nothing measured was saved
    with open(tmp_path / "run" / "device_peaks.json") as f:
        used = next(iter(json.load(f).values()))
    assert used.get("gemm_flops_per_s")  # measured and used by this run
    assert "not saved to the cache" in (tmp_path / "run" / "report.md").read_text()


def results_of(workdir):
    from batching.outputs import results

    return results.Store(str(workdir)).rows()


def test_the_compute_roof_is_the_best_rate_measured(tmp_path):
    """A large GEMM microbenchmark above the square matmul raises the roof; a tiny one (its
    rate rests on subtracting fixed costs) does not; a measured point above both does."""
    dev = jax.devices()[0]
    entry = {
        "gemm_flops_per_s": {
            "float32:256x2048x2048:cold": 1.8e11,  # 2.1 GFLOP per product
            "float32:1x64x64:warm": 9e11,  # 8 kFLOP: not a ceiling
            "bfloat16:512x4096x4096:cold": 5e12,  # another dtype
        }
    }
    with open(peaks_cache.cache_path(str(tmp_path)), "w") as f:
        json.dump({f"{dev.platform}:{dev.device_kind}": entry}, f)
    best = rates.RateSource(str(tmp_path), refresh=False).best_rate(dev, "float32", "default", 1e8)
    assert best[0] == 1.8e11 and "256x2048x2048" in best[1]
    rows = [{"batch_size": 512, "analytic_flops": 8.6e9, "latency_s": 8.6e9 / 1.9e11}]
    f, source = analysis.compute_ceiling(1.5e11, best, [])
    assert f == 1.8e11 and "256x2048x2048" in source
    f, source = analysis.compute_ceiling(1.5e11, best, rows)
    assert f == pytest.approx(1.9e11) and "batch 512" in source
    assert analysis.compute_ceiling(2e11, best, rows)[0] == 2e11


@pytest.mark.parametrize("cold", [False, True])
def test_ragged_microbenchmark_reads_its_weights_warm_or_from_beyond_the_cache(monkeypatch, cold):
    """A cold ragged dot runs over enough distinct weight sets to overflow the last-level
    cache twice (a model whose experts exceed it reads them from DRAM: ~4x slower on the CPU
    here); a warm one keeps them within a quarter of it."""
    llc = 64 << 10
    monkeypatch.setattr(microbench, "last_level_cache_bytes", lambda device: llc)
    seen = []

    def fake_median_time(fn, args, settings):
        seen.append(sum(a.nbytes for a in args[2:]))
        return 1e-3

    monkeypatch.setattr(microbench, "_median_time", fake_median_time)
    shape = (4, 8, 16, 32)  # 4 experts of [16, 32] float32: 8 KiB per weight set
    rate = shape_bench.measure_ragged_flops(jax.devices()[0], "float32", shape, cold=cold)
    assert rate == pytest.approx(2 * 8 * 16 * 32 / (1e-3 / (seen[0] // (4 * 16 * 32 * 4))))
    assert seen[0] >= 2 * llc if cold else seen[0] <= llc // 4


def test_one_stray_check_reading_changes_nothing(tmp_path, monkeypatch):
    """A check whose first quick reading is 1.5x the cached stream (one stray reading on a
    host whose bandwidth wanders) takes a second one; the second agrees, so the cache and
    its per-shape rates stay, and the report gives both readings. Two fast readings in a
    row still re-measure."""
    from batching.outputs import report_sections

    dev = jax.devices()[0]
    _mock_device_measurements(monkeypatch)
    peaks.measured_peaks(dev, ("float32",), str(tmp_path))
    entry = peaks_cache.device_entry(dev, str(tmp_path))
    entry["gemm_flops_per_s"] = {"float32:1x16x16:warm": 1e9}
    with open(peaks_cache.cache_path(str(tmp_path)), "w") as f:
        json.dump({f"{dev.platform}:{dev.device_kind}": entry}, f)
    normal = {"matmul_flops_per_s": 1e11, "read_bytes_per_s": 2e10}
    stray = {**normal, "read_bytes_per_s": 3e10}
    readings = iter([stray, normal, stray, stray])
    monkeypatch.setattr(microbench, "quick_peaks", lambda d, t: next(readings))
    check = peaks.check_cached(dev, str(tmp_path), "float32")
    assert check["verdict"] == "agreed" and check["readings"] == [stray, normal]
    assert check["now"] == normal
    assert peaks_cache.device_entry(dev, str(tmp_path)) == entry  # nothing dropped
    sentence = report_sections._check_sentence(check)
    assert "agreed" in sentence and "matmul 100 and 100 GFLOP/s, stream 30 and 20 GB/s" in sentence
    again = peaks.check_cached(dev, str(tmp_path), "float32")
    assert again["verdict"] == "re-measured"
    assert "gemm_flops_per_s" not in peaks_cache.device_entry(dev, str(tmp_path))
