"""Devices on paper: a cited spec table, detection from `device_kind`, the critical batch.

The spec figures are dense peaks, without 2:4 sparsity. They come from the vendors'
datasheets. Some come from the jax-ml scaling book, "How to Scale Your Model". Its roofline,
GPU and TPU chapters give them. Each entry names its source. What a device reaches in
microbenchmarks lives in `batching.measure.peaks`.
"""

import dataclasses
import os
from typing import Any

TFLOPS = 1e12
GBPS = 1e9
GB = 1e9
MB = 1e6
GIB = 2**30


@dataclasses.dataclass(frozen=True)
class DeviceSpec:
    """Datasheet figures: FLOP/s per dtype, memory bandwidth (bytes/s), memory (bytes)."""

    name: str
    flops_per_s: dict[str, float]
    bandwidth_bytes_per_s: float
    source: str
    kinds: tuple[str, ...]  # lower-case substrings of jax's device_kind for this device
    memory_bytes: float  # device memory per device
    memory_source: str
    # Device-to-device bandwidth of one device, in bytes/s PER DIRECTION.
    # That is what one device can send while it receives as much.
    # It sums all its links: NVLink, PCIe x16 or TPU ICI.
    # Datasheets quote NVLink as the bidirectional total (H100: 900 GB/s = 2 x 450).
    interconnect_bytes_per_s: float
    interconnect_source: str
    # The last-level cache, a GPU's L2.
    # Warm weights that fit it are read at cache speed.
    # None where no datasheet or whitepaper gives one here.
    cache_bytes: float | None = None
    cache_source: str = ""


NVIDIA_A100 = "NVIDIA A100 datasheet (2021), dense Tensor Core figures"
NVIDIA_H100 = "NVIDIA H100 Tensor Core GPU datasheet (2023), dense (without sparsity)"
A100_NVLINK = "NVIDIA A100 datasheet (2021): NVLink 3 600 GB/s total = 300 GB/s per direction"
H100_NVLINK = "NVIDIA H100 datasheet (2023): SXM NVLink 4 900 GB/s total = 450 GB/s per direction"
# PCIe x16, per direction: transfer rate x 16 lanes x 128/130 (line code) / 8 bits.
# The PCI-SIG base specs 3.0, 4.0 and 5.0 give 8, 16 and 32 GT/s per lane.
PCIE3_X16 = 8e9 * 16 * 128 / 130 / 8  # 15.75 GB/s
PCIE4_X16 = 2 * PCIE3_X16  # 31.5 GB/s
PCIE5_X16 = 4 * PCIE3_X16  # 63 GB/s
PCIE3_SOURCE = "PCI-SIG PCIe 3.0 x16: 8 GT/s x 16 x 128/130 = 15.75 GB/s per direction"
PCIE4_SOURCE = "PCI-SIG PCIe 4.0 x16: 16 GT/s x 16 x 128/130 = 31.5 GB/s per direction"
PCIE5_SOURCE = "PCI-SIG PCIe 5.0 x16: 32 GT/s x 16 x 128/130 = 63 GB/s per direction"
SPECS: dict[str, DeviceSpec] = {
    s.name: s
    for s in [
        DeviceSpec(
            "T4",
            {"float32": 8.1 * TFLOPS, "float16": 65 * TFLOPS, "int8": 130 * TFLOPS},
            320 * GBPS,
            "NVIDIA T4 datasheet: 8.1 TFLOPS fp32, 65 TFLOPS fp16 mixed, 320 GB/s",
            ("t4",),
            16 * GB,
            "NVIDIA T4 datasheet: 16 GB GDDR6",
            interconnect_bytes_per_s=PCIE3_X16,
            interconnect_source=PCIE3_SOURCE + " (T4 datasheet: PCIe Gen3 x16 32 GB/s total)",
            cache_bytes=4 * MB,
            cache_source="NVIDIA Turing architecture whitepaper (2018): TU104, 4 MB L2",
        ),
        DeviceSpec(
            "V100 SXM2",
            {"float32": 15.7 * TFLOPS, "float16": 125 * TFLOPS},
            900 * GBPS,
            "NVIDIA V100 datasheet: 15.7 TFLOPS fp32, 125 TFLOPS tensor, 900 GB/s",
            ("v100",),
            32 * GB,
            "NVIDIA V100 datasheet: 32 GB HBM2 (16 GB variant also sold)",
            interconnect_bytes_per_s=150 * GBPS,
            interconnect_source=(
                "NVIDIA V100 datasheet: NVLink 2 300 GB/s total = 150 GB/s per direction"
            ),
            cache_bytes=6 * MB,
            cache_source="NVIDIA Tesla V100 architecture whitepaper (2017): 6 MB L2",
        ),
        DeviceSpec(
            "A10",
            {
                "float32": 31.2 * TFLOPS,
                "tf32": 62.5 * TFLOPS,
                "bfloat16": 125 * TFLOPS,
                "float16": 125 * TFLOPS,
                "int8": 250 * TFLOPS,
            },
            600 * GBPS,
            "NVIDIA A10 datasheet: dense figures, 600 GB/s GDDR6",
            ("a10",),
            24 * GB,
            "NVIDIA A10 datasheet: 24 GB GDDR6",
            interconnect_bytes_per_s=PCIE4_X16,
            interconnect_source=PCIE4_SOURCE + " (A10 datasheet: PCIe Gen4 64 GB/s total)",
            cache_bytes=6 * MB,
            cache_source="NVIDIA Ampere GA102 architecture whitepaper (2021): 6 MB L2",
        ),
        DeviceSpec(
            "A100 40GB SXM",
            {
                "float32": 19.5 * TFLOPS,
                "tf32": 156 * TFLOPS,
                "bfloat16": 312 * TFLOPS,
                "float16": 312 * TFLOPS,
                "int8": 624 * TFLOPS,
            },
            1555 * GBPS,
            NVIDIA_A100 + ", 1,555 GB/s HBM2",
            ("a100-sxm4-40gb", "a100 40gb", "a100-pcie-40gb"),
            40 * GB,
            "NVIDIA A100 datasheet (2021): 40 GB HBM2",
            interconnect_bytes_per_s=300 * GBPS,
            interconnect_source=A100_NVLINK,
            cache_bytes=40 * MB,
            cache_source="NVIDIA A100 Tensor Core GPU architecture whitepaper (2020): 40 MB L2",
        ),
        DeviceSpec(
            "A100 80GB SXM",
            {
                "float32": 19.5 * TFLOPS,
                "tf32": 156 * TFLOPS,
                "bfloat16": 312 * TFLOPS,
                "float16": 312 * TFLOPS,
                "int8": 624 * TFLOPS,
            },
            2039 * GBPS,
            NVIDIA_A100 + ", 2,039 GB/s HBM2e",
            ("a100-sxm4-80gb", "a100 80gb", "a100"),
            80 * GB,
            "NVIDIA A100 datasheet (2021): 80 GB HBM2e",
            interconnect_bytes_per_s=300 * GBPS,
            interconnect_source=A100_NVLINK,
            cache_bytes=40 * MB,
            cache_source="NVIDIA A100 Tensor Core GPU architecture whitepaper (2020): 40 MB L2",
        ),
        DeviceSpec(
            "L4",
            {
                "float32": 30.3 * TFLOPS,
                "tf32": 60 * TFLOPS,
                "bfloat16": 121 * TFLOPS,
                "float16": 121 * TFLOPS,
                "int8": 242 * TFLOPS,
            },
            300 * GBPS,
            "NVIDIA L4 datasheet: dense figures (half the sparsity numbers), 300 GB/s",
            ("l4",),
            24 * GB,
            "NVIDIA L4 datasheet: 24 GB GDDR6",
            interconnect_bytes_per_s=PCIE4_X16,
            interconnect_source=PCIE4_SOURCE + " (L4 datasheet: PCIe Gen4 x16 64 GB/s total)",
            cache_bytes=48 * MB,
            cache_source="NVIDIA Ada Lovelace architecture whitepaper (2022): AD104, 48 MB L2",
        ),
        DeviceSpec(
            "H100 SXM",
            {
                "float32": 67 * TFLOPS,
                "tf32": 495 * TFLOPS,
                "bfloat16": 989 * TFLOPS,
                "float16": 989 * TFLOPS,
                "int8": 1979 * TFLOPS,
            },
            3350 * GBPS,
            NVIDIA_H100 + ", SXM5 3.35 TB/s",
            ("h100 80gb hbm3", "h100 sxm", "h100"),
            80 * GB,
            "NVIDIA H100 datasheet (2023): 80 GB HBM3",
            interconnect_bytes_per_s=450 * GBPS,
            interconnect_source=H100_NVLINK,
            cache_bytes=50 * MB,
            cache_source="NVIDIA H100 Tensor Core GPU architecture whitepaper (2022): 50 MB L2",
        ),
        DeviceSpec(
            "H100 PCIe",
            {
                "float32": 51 * TFLOPS,
                "tf32": 378 * TFLOPS,
                "bfloat16": 756 * TFLOPS,
                "float16": 756 * TFLOPS,
                "int8": 1513 * TFLOPS,
            },
            2000 * GBPS,
            NVIDIA_H100 + ", PCIe 2.0 TB/s",
            ("h100 pcie",),
            80 * GB,
            "NVIDIA H100 datasheet (2023): 80 GB HBM2e",
            interconnect_bytes_per_s=PCIE5_X16,
            interconnect_source=PCIE5_SOURCE
            + " (H100 PCIe without its NVLink bridge; datasheet: PCIe Gen5 128 GB/s total)",
            cache_bytes=50 * MB,
            cache_source="NVIDIA H100 Tensor Core GPU architecture whitepaper (2022): 50 MB L2",
        ),
        DeviceSpec(
            "H200",
            {
                "float32": 67 * TFLOPS,
                "tf32": 495 * TFLOPS,
                "bfloat16": 989 * TFLOPS,
                "float16": 989 * TFLOPS,
                "int8": 1979 * TFLOPS,
            },
            4800 * GBPS,
            "NVIDIA H200 datasheet: H100 SXM compute, 4.8 TB/s HBM3e",
            ("h200",),
            141 * GB,
            "NVIDIA H200 datasheet: 141 GB HBM3e",
            interconnect_bytes_per_s=450 * GBPS,
            interconnect_source=(
                "NVIDIA H200 datasheet: NVLink 900 GB/s total = 450 GB/s per direction"
            ),
            cache_bytes=50 * MB,
            cache_source=(
                "NVIDIA H100 Tensor Core GPU architecture whitepaper (2022): the same GH100 "
                "die, 50 MB L2"
            ),
        ),
        DeviceSpec(
            "B200",
            {
                "float32": 75 * TFLOPS,
                "tf32": 1100 * TFLOPS,
                "bfloat16": 2250 * TFLOPS,
                "float16": 2250 * TFLOPS,
                "int8": 4500 * TFLOPS,
            },
            8000 * GBPS,
            "NVIDIA HGX B200 datasheet: dense (half the sparsity figures), 8 TB/s",
            ("b200",),
            180 * GB,
            "NVIDIA DGX B200 datasheet: 1,440 GB HBM3e over 8 GPUs",
            interconnect_bytes_per_s=900 * GBPS,
            interconnect_source=(
                "NVIDIA HGX B200 datasheet: NVLink 5 1.8 TB/s total per GPU"
                " = 900 GB/s per direction"
            ),
        ),
        DeviceSpec(
            "TPU v4",
            {"bfloat16": 275 * TFLOPS, "int8": 275 * TFLOPS},
            1200 * GBPS,
            "Google Cloud TPU v4 docs; jax-ml scaling book tpus.md: 2.75e14 bf16, 1.2e12 B/s",
            ("tpu v4",),
            32 * GIB,
            "Google Cloud TPU v4 docs: 32 GiB HBM per chip",
            interconnect_bytes_per_s=6 * 45 * GBPS,
            interconnect_source=(
                "jax-ml scaling book tpus.md: ICI 4.5e10 B/s one way per link x 6 links per chip"
                " (3D torus) = 2.7e11 B/s per direction"
            ),
        ),
        DeviceSpec(
            "TPU v5e",
            {"bfloat16": 197 * TFLOPS, "int8": 394 * TFLOPS},
            819 * GBPS,
            "Google Cloud TPU v5e docs; scaling book tpus.md: 1.97e14 bf16, 8.1e11 B/s",
            ("tpu v5 lite", "tpu v5e"),
            16 * GIB,
            "Google Cloud TPU v5e docs: 16 GiB HBM per chip",
            interconnect_bytes_per_s=200 * GBPS,
            interconnect_source=(
                "Google Cloud TPU v5e docs: 400 GBps bidirectional ICI per chip (4 ports)"
                " = 200 GB/s per direction"
            ),
        ),
        DeviceSpec(
            "TPU v5p",
            {"bfloat16": 459 * TFLOPS, "int8": 918 * TFLOPS},
            2765 * GBPS,
            "Google Cloud TPU v5p docs; scaling book tpus.md: 4.59e14 bf16, 2.8e12 B/s",
            ("tpu v5p", "tpu v5"),
            95 * GIB,
            "Google Cloud TPU v5p docs: 95 GiB HBM per chip",
            interconnect_bytes_per_s=600 * GBPS,
            interconnect_source=(
                "Google Cloud TPU v5p docs: 1200 GBps bidirectional ICI per chip (6 links)"
                " = 600 GB/s per direction"
            ),
        ),
    ]
}


@dataclasses.dataclass(frozen=True)
class NodeSpec:
    """Several devices of one spec in one box, each with its own interconnect bandwidth. Nothing is
    copied from the device entry. FLOP/s, memory bandwidth and interconnect come from `device`.
    The node adds how many there are and what connects them."""

    name: str
    device: DeviceSpec
    num_devices: int
    source: str

    @property
    def interconnect_bytes_per_s(self) -> float:
        """Bytes/s per device and direction. Behind an NVSwitch every GPU talks at its full NVLink
        rate."""
        return self.device.interconnect_bytes_per_s


NODES: dict[str, NodeSpec] = {
    n.name: n
    for n in [
        NodeSpec(
            "8x H100 SXM (HGX)",
            SPECS["H100 SXM"],
            8,
            "NVIDIA HGX H100 8-GPU: 8 H100 SXM5 all-to-all through 4 NVSwitch chips, each GPU "
            "at its full NVLink 4 bandwidth; " + H100_NVLINK,
        ),
    ]
}


def device_memory_bytes(device: Any) -> int:
    """What the device can hold. That is JAX's reported `bytes_limit`, else physical RAM (a CPU)."""
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - some backends raise instead of returning None
        stats = None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


# The post's own T4 inputs: "65 TFLOPS" (really the fp16 tensor-core peak), 300 GB/s, 2 bytes.
POST_T4_FLOPS = 65 * TFLOPS
POST_T4_BANDWIDTH = 300 * GBPS


def critical_batch_size(peak_flops: float, bandwidth: float, bytes_per_param: float) -> float:
    """Batch size at which a dense layer turns from memory- to compute-bound. A dense layer does 2
    FLOPs per parameter per example. It reads each parameter once per call, at `bytes_per_param`
    bytes. Compute time is 2·P·B/F. Memory time is P·bytes/BW. They are equal at B* =
    F·bytes_per_param / (2·BW). The post's "FLOPS / bandwidth" is this only for 2-byte weights."""
    if peak_flops <= 0 or bandwidth <= 0 or bytes_per_param <= 0:
        raise ValueError("critical_batch_size needs positive peak_flops, bandwidth and bytes")
    return peak_flops * bytes_per_param / (2.0 * bandwidth)


def detect(device_kind: str) -> DeviceSpec | None:
    """The spec entry whose name matches JAX's `device_kind`. The most specific match wins."""
    kind = device_kind.lower()
    best, best_len = None, 0
    for spec in SPECS.values():
        for pattern in spec.kinds:
            if pattern in kind and len(pattern) > best_len:
                best, best_len = spec, len(pattern)
    return best


def spec_flops(spec: DeviceSpec, dtype: str, matmul_precision: str = "default") -> float | None:
    """Peak FLOP/s for `dtype`. fp32 matmuls run as TF32 on GPUs that have it, unless the precision
    is 'highest'."""
    if dtype == "float32" and matmul_precision == "default" and "tf32" in spec.flops_per_s:
        return spec.flops_per_s["tf32"]
    return spec.flops_per_s.get(dtype)


def matmul_peak(
    spec: DeviceSpec, dtype: str, matmul_precision: str = "default"
) -> tuple[float | None, str]:
    """(FLOP/s, what stands in) for a dtype's matmuls on a spec device. Where the datasheet lists
    the dtype, this is spec_flops. A T4 has float16 units only. So a bfloat16 matmul there takes
    the float16 peak. A TPU has no float32 unit. XLA runs a default-precision float32 matmul as
    one bfloat16 pass. So it takes the bfloat16 peak. An integer peak never stands in. Where
    nothing stands in, it returns None, with why."""
    f = spec_flops(spec, dtype, matmul_precision)
    if f:
        return f, ""
    if dtype == "bfloat16" and "float16" in spec.flops_per_s:
        return spec.flops_per_s["float16"], f"{spec.name} has no bfloat16 unit: its float16 peak"
    if dtype == "float32" and matmul_precision == "default" and "bfloat16" in spec.flops_per_s:
        return spec.flops_per_s["bfloat16"], (
            f"{spec.name} has no float32 unit: XLA's default precision runs one bfloat16 pass"
        )
    return None, f"{spec.name} lists no {dtype} peak"
