"""Microbenchmarks and their per-device cache."""

import json

import jax

from batching import peaks
from models.kv_cache import attend_cache as ATTEND


def test_microbenchmarks_measure_something_plausible():
    dev = jax.devices()[0]
    f = peaks.measure_matmul_flops(dev, "float32", n=256)
    assert 1e8 < f < 1e15
    bw = peaks.measure_bandwidth(dev, buffer_bytes=8 << 20)
    assert 1e8 < bw["read_bytes_per_s"] < 1e13
    assert 0 < peaks.measure_dispatch_floor(dev) < 0.01
    assert 0 <= peaks.measure_kernel_overhead(dev, chain=4) < 0.01
    warm = peaks.measure_gemm_flops(dev, "float32", 4, 64, 64)
    cold = peaks.measure_gemm_flops(dev, "float32", 4, 64, 64, cold=True)
    assert 1e6 < warm < 1e15 and 1e6 < cold < 1e15


def test_attention_microbenchmark_is_cached_and_slower_for_a_longer_cache(tmp_path):
    dev = jax.devices()[0]
    short = peaks.attention_seconds(
        dev, "float32", "bksh", (4, 2, 256, 2, 64), str(tmp_path), ATTEND
    )
    long = peaks.attention_seconds(
        dev, "float32", "bksh", (4, 2, 8192, 2, 64), str(tmp_path), ATTEND
    )
    assert 0 < short < long < 1.0
    with open(peaks.cache_path(str(tmp_path))) as f:
        table = next(iter(json.load(f).values()))["attention_s"]
    assert table["float32:bksh:4x2x8192x2x64"] == long
    # cached: a second call measures nothing
    assert (
        peaks.attention_seconds(dev, "float32", "bksh", (4, 2, 8192, 2, 64), str(tmp_path), ATTEND)
        == long
    )


def test_last_level_cache_is_read_or_bounded():
    assert (1 << 20) <= peaks.last_level_cache_bytes(jax.devices()[0]) <= (1 << 30)


def test_peaks_are_cached_per_device(tmp_path, monkeypatch):
    dev = jax.devices()[0]
    calls = []
    monkeypatch.setattr(peaks, "measure_matmul_flops", lambda d, t: calls.append(t) or 1e11)
    monkeypatch.setattr(
        peaks,
        "measure_bandwidth",
        lambda d: {"read_bytes_per_s": 2e10, "copy_bytes_per_s": 1e10, "buffer_bytes": 1.0},
    )
    monkeypatch.setattr(peaks, "measure_dispatch_floor", lambda d: 1e-5)
    monkeypatch.setattr(peaks, "measure_kernel_overhead", lambda d: 1e-6)
    p = peaks.measured_peaks(dev, ("float32",), str(tmp_path))
    peaks.measured_peaks(dev, ("float32",), str(tmp_path))
    assert calls == ["float32"]  # second call read the cache
    assert p.bandwidth_bytes_per_s == 2e10
    peaks.measured_peaks(dev, ("float32",), str(tmp_path), refresh=True)
    assert calls == ["float32", "float32"]
