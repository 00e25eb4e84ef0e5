"""The cited spec table: entries, detection, dense figures, the critical batch."""

import pytest

from batching import critical_batch_size
from batching.setup import specs


def test_critical_batch_on_the_posts_inputs_and_t4_fp32():
    # The post: 65e12 FLOP/s over 300e9 B/s with 2-byte weights -> its ~216.
    assert critical_batch_size(65e12, 300e9, 2) == pytest.approx(216.67, abs=0.01)
    t4 = specs.SPECS["T4"]
    fp32 = critical_batch_size(t4.flops_per_s["float32"], t4.bandwidth_bytes_per_s, 4)
    assert fp32 == pytest.approx(50.6, abs=0.1)


def test_critical_batch_rejects_nonpositive_inputs():
    with pytest.raises(ValueError):
        critical_batch_size(0, 1e9, 2)


# B* = peak·bytes/(2·BW) for fp32 and 2-byte weights, worked out by hand from each
# datasheet's figures and rounded.
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


@pytest.mark.parametrize("name", sorted(specs.SPECS))
def test_spec_entries_are_sourced_positive_and_match_the_anchor_table(name):
    spec = specs.SPECS[name]
    assert spec.source and spec.kinds and spec.memory_source
    assert spec.memory_bytes >= 16e9
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
    assert specs.SPECS["H100 SXM"].flops_per_s["bfloat16"] == pytest.approx(989e12)
    assert specs.SPECS["A100 80GB SXM"].flops_per_s["bfloat16"] == pytest.approx(312e12)


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
    spec = specs.detect(kind)
    assert (spec.name if spec else None) == name


def test_fp32_uses_tf32_peak_unless_highest():
    h100 = specs.SPECS["H100 SXM"]
    assert specs.spec_flops(h100, "float32") == h100.flops_per_s["tf32"]
    assert specs.spec_flops(h100, "float32", "highest") == h100.flops_per_s["float32"]
    assert specs.spec_flops(specs.SPECS["T4"], "float32") == 8.1e12


@pytest.mark.parametrize("name", sorted(specs.SPECS))
def test_every_spec_has_a_sourced_per_direction_interconnect(name):
    spec = specs.SPECS[name]
    assert spec.interconnect_bytes_per_s > 0
    assert "per direction" in spec.interconnect_source
    # Device-to-device links are slower than the device's own memory on every entry.
    assert spec.interconnect_bytes_per_s < spec.bandwidth_bytes_per_s


def test_interconnect_figures_are_per_direction_not_the_bidirectional_total():
    # NVLink datasheets quote the total of both directions: H100 SXM 900 GB/s, A100 600 GB/s.
    assert specs.SPECS["H100 SXM"].interconnect_bytes_per_s == pytest.approx(450e9)
    assert specs.SPECS["A100 80GB SXM"].interconnect_bytes_per_s == pytest.approx(300e9)
    # PCIe x16 per direction: Gen3 15.75, Gen4 31.5, Gen5 63 GB/s.
    assert specs.SPECS["T4"].interconnect_bytes_per_s == pytest.approx(15.75e9, rel=1e-3)
    assert specs.SPECS["L4"].interconnect_bytes_per_s == pytest.approx(31.5e9, rel=1e-3)
    assert specs.SPECS["H100 PCIe"].interconnect_bytes_per_s == pytest.approx(63e9, rel=1e-3)


def test_the_8_gpu_node_is_built_from_its_device_entry():
    node = specs.NODES["8x H100 SXM (HGX)"]
    assert node.device is specs.SPECS["H100 SXM"]
    assert node.num_devices == 8 and node.source
    assert node.interconnect_bytes_per_s == node.device.interconnect_bytes_per_s
