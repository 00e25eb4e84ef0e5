import json

import jax
import pytest

from batching import critical_batch_size, hardware
from models.kv_cache import attend_cache as ATTEND


def test_critical_batch_on_the_posts_inputs_and_t4_fp32():
    # The post: 65e12 FLOP/s over 300e9 B/s with 2-byte weights -> its ~216.
    assert critical_batch_size(65e12, 300e9, 2) == pytest.approx(216.67, abs=0.01)
    t4 = hardware.SPECS["T4"]
    fp32 = critical_batch_size(t4.flops_per_s["float32"], t4.bandwidth_bytes_per_s, 4)
    assert fp32 == pytest.approx(50.6, abs=0.1)


def test_critical_batch_rejects_nonpositive_inputs():
    with pytest.raises(ValueError):
        critical_batch_size(0, 1e9, 2)


# B* columns of shared/ANCHORS.md §2 (fp32 weights, 2-byte weights), rounded there.
ANCHOR_BSTAR = {
    "T4": (51, 203),
    "V100 SXM2": (35, 139),
    "A10": (104, 208),
    "A100 40GB SXM": (25, 201),
    "A100 80GB SXM": (19, 153),
    "L4": (202, 403),
    "H100 SXM": (40, 295),
    "H100 PCIe": (51, 378),
    "H200": (28, 206),
    "B200": (19, 281),
    "TPU v4": (None, 229),
    "TPU v5e": (None, 240),
    "TPU v5p": (None, 166),
}


@pytest.mark.parametrize("name", sorted(hardware.SPECS))
def test_spec_entries_are_sourced_positive_and_match_the_anchor_table(name):
    spec = hardware.SPECS[name]
    assert spec.source and spec.kinds
    assert spec.bandwidth_bytes_per_s > 0
    assert all(v > 0 for v in spec.flops_per_s.values())
    fp32, two_byte = ANCHOR_BSTAR[name]
    half = spec.flops_per_s.get("bfloat16") or spec.flops_per_s["float16"]
    assert critical_batch_size(half, spec.bandwidth_bytes_per_s, 2) == pytest.approx(
        two_byte, abs=1.5
    )
    if fp32 is not None:
        got = critical_batch_size(spec.flops_per_s["float32"], spec.bandwidth_bytes_per_s, 4)
        assert got == pytest.approx(fp32, abs=1.5)


def test_spec_figures_are_dense_not_sparse():
    # Datasheets also quote 2x "with sparsity"; the table must hold the dense ones.
    assert hardware.SPECS["H100 SXM"].flops_per_s["bfloat16"] == pytest.approx(989e12)
    assert hardware.SPECS["A100 80GB SXM"].flops_per_s["bfloat16"] == pytest.approx(312e12)


@pytest.mark.parametrize(
    "kind, name",
    [
        ("Tesla T4", "T4"),
        ("NVIDIA A100-SXM4-40GB", "A100 40GB SXM"),
        ("NVIDIA A100-SXM4-80GB", "A100 80GB SXM"),
        ("NVIDIA H100 80GB HBM3", "H100 SXM"),
        ("NVIDIA H100 PCIe", "H100 PCIe"),
        ("NVIDIA H200", "H200"),
        ("NVIDIA L4", "L4"),
        ("TPU v5 lite", "TPU v5e"),
        ("TPU v4", "TPU v4"),
        ("cpu", None),
    ],
)
def test_detect_from_device_kind(kind, name):
    spec = hardware.detect(kind)
    assert (spec.name if spec else None) == name


def test_fp32_uses_tf32_peak_unless_highest():
    h100 = hardware.SPECS["H100 SXM"]
    assert hardware.spec_flops(h100, "float32") == h100.flops_per_s["tf32"]
    assert hardware.spec_flops(h100, "float32", "highest") == h100.flops_per_s["float32"]
    assert hardware.spec_flops(hardware.SPECS["T4"], "float32") == 8.1e12


def test_microbenchmarks_measure_something_plausible():
    dev = jax.devices()[0]
    f = hardware.measure_matmul_flops(dev, "float32", n=256)
    assert 1e8 < f < 1e15
    bw = hardware.measure_bandwidth(dev, buffer_bytes=8 << 20)
    assert 1e8 < bw["read_bytes_per_s"] < 1e13
    assert 0 < hardware.measure_dispatch_floor(dev) < 0.01
    assert 0 <= hardware.measure_kernel_overhead(dev, chain=4) < 0.01
    warm = hardware.measure_gemm_flops(dev, "float32", 4, 64, 64)
    cold = hardware.measure_gemm_flops(dev, "float32", 4, 64, 64, cold=True)
    assert 1e6 < warm < 1e15 and 1e6 < cold < 1e15


def test_attention_microbenchmark_is_cached_and_slower_for_a_longer_cache(tmp_path):
    dev = jax.devices()[0]
    short = hardware.attention_seconds(
        dev, "float32", "bksh", (4, 2, 256, 2, 64), str(tmp_path), ATTEND
    )
    long = hardware.attention_seconds(
        dev, "float32", "bksh", (4, 2, 8192, 2, 64), str(tmp_path), ATTEND
    )
    assert 0 < short < long < 1.0
    with open(hardware.cache_path(str(tmp_path))) as f:
        table = next(iter(json.load(f).values()))["attention_s"]
    assert table["float32:bksh:4x2x8192x2x64"] == long
    # cached: a second call measures nothing
    assert (
        hardware.attention_seconds(
            dev, "float32", "bksh", (4, 2, 8192, 2, 64), str(tmp_path), ATTEND
        )
        == long
    )


def test_last_level_cache_is_read_or_bounded():
    assert (1 << 20) <= hardware.last_level_cache_bytes(jax.devices()[0]) <= (1 << 30)


def test_peaks_are_cached_per_device(tmp_path, monkeypatch):
    dev = jax.devices()[0]
    calls = []
    monkeypatch.setattr(hardware, "measure_matmul_flops", lambda d, t: calls.append(t) or 1e11)
    monkeypatch.setattr(
        hardware,
        "measure_bandwidth",
        lambda d: {"read_bytes_per_s": 2e10, "copy_bytes_per_s": 1e10, "buffer_bytes": 1.0},
    )
    monkeypatch.setattr(hardware, "measure_dispatch_floor", lambda d: 1e-5)
    monkeypatch.setattr(hardware, "measure_kernel_overhead", lambda d: 1e-6)
    p = hardware.measured_peaks(dev, ("float32",), str(tmp_path))
    hardware.measured_peaks(dev, ("float32",), str(tmp_path))
    assert calls == ["float32"]  # second call read the cache
    assert p.bandwidth_bytes_per_s == 2e10
    hardware.measured_peaks(dev, ("float32",), str(tmp_path), refresh=True)
    assert calls == ["float32", "float32"]
