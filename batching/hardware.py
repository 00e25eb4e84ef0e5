"""Device peaks: a cited spec table, detection from `device_kind`, and measured peaks.

The spec figures are dense (no 2:4 sparsity) peaks from the vendors' datasheets
and the jax-ml scaling book, as collected in shared/ANCHORS.md §2. Measured
peaks come from microbenchmarks timed with the lab's own harness and are cached
per device in a JSON file, so sweeps do not re-measure every time.
"""

import dataclasses
import fcntl
import json
import os
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging

from batching import timing

TFLOPS = 1e12
GBPS = 1e9


@dataclasses.dataclass(frozen=True)
class DeviceSpec:
    """Datasheet peaks: FLOP/s per dtype and memory bandwidth in bytes/s."""

    name: str
    flops_per_s: dict[str, float]
    bandwidth_bytes_per_s: float
    source: str
    kinds: tuple[str, ...]  # lower-case substrings of jax's device_kind that mean this device


NVIDIA_A100 = "NVIDIA A100 datasheet (2021), dense Tensor Core figures"
NVIDIA_H100 = "NVIDIA H100 Tensor Core GPU datasheet (2023), dense (without sparsity)"
SPECS: dict[str, DeviceSpec] = {
    s.name: s
    for s in [
        DeviceSpec(
            "T4",
            {"float32": 8.1 * TFLOPS, "float16": 65 * TFLOPS, "int8": 130 * TFLOPS},
            320 * GBPS,
            "NVIDIA T4 datasheet: 8.1 TFLOPS fp32, 65 TFLOPS fp16 mixed, 320 GB/s",
            ("t4",),
        ),
        DeviceSpec(
            "V100 SXM2",
            {"float32": 15.7 * TFLOPS, "float16": 125 * TFLOPS},
            900 * GBPS,
            "NVIDIA V100 datasheet: 15.7 TFLOPS fp32, 125 TFLOPS tensor, 900 GB/s",
            ("v100",),
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
        ),
        DeviceSpec(
            "TPU v4",
            {"bfloat16": 275 * TFLOPS, "int8": 275 * TFLOPS},
            1200 * GBPS,
            "Google Cloud TPU v4 docs; jax-ml scaling book tpus.md: 2.75e14 bf16, 1.2e12 B/s",
            ("tpu v4",),
        ),
        DeviceSpec(
            "TPU v5e",
            {"bfloat16": 197 * TFLOPS, "int8": 394 * TFLOPS},
            819 * GBPS,
            "Google Cloud TPU v5e docs; scaling book tpus.md: 1.97e14 bf16, 8.1e11 B/s",
            ("tpu v5 lite", "tpu v5e"),
        ),
        DeviceSpec(
            "TPU v5p",
            {"bfloat16": 459 * TFLOPS, "int8": 918 * TFLOPS},
            2765 * GBPS,
            "Google Cloud TPU v5p docs; scaling book tpus.md: 4.59e14 bf16, 2.8e12 B/s",
            ("tpu v5p", "tpu v5"),
        ),
    ]
}

GB = 1e9
GIB = 2**30
# Device memory per device in bytes, with its source (vendor datasheets / Cloud TPU docs).
SPEC_MEMORY: dict[str, tuple[float, str]] = {
    "T4": (16 * GB, "NVIDIA T4 datasheet: 16 GB GDDR6"),
    "V100 SXM2": (32 * GB, "NVIDIA V100 datasheet: 32 GB HBM2 (16 GB variant also sold)"),
    "A10": (24 * GB, "NVIDIA A10 datasheet: 24 GB GDDR6"),
    "A100 40GB SXM": (40 * GB, "NVIDIA A100 datasheet (2021): 40 GB HBM2"),
    "A100 80GB SXM": (80 * GB, "NVIDIA A100 datasheet (2021): 80 GB HBM2e"),
    "L4": (24 * GB, "NVIDIA L4 datasheet: 24 GB GDDR6"),
    "H100 SXM": (80 * GB, "NVIDIA H100 datasheet (2023): 80 GB HBM3"),
    "H100 PCIe": (80 * GB, "NVIDIA H100 datasheet (2023): 80 GB HBM2e"),
    "H200": (141 * GB, "NVIDIA H200 datasheet: 141 GB HBM3e"),
    "B200": (180 * GB, "NVIDIA DGX B200 datasheet: 1,440 GB HBM3e over 8 GPUs"),
    "TPU v4": (32 * GIB, "Google Cloud TPU v4 docs: 32 GiB HBM per chip"),
    "TPU v5e": (16 * GIB, "Google Cloud TPU v5e docs: 16 GiB HBM per chip"),
    "TPU v5p": (95 * GIB, "Google Cloud TPU v5p docs: 95 GiB HBM per chip"),
}


def device_memory_bytes(device: jax.Device) -> int:
    """What the device can hold: JAX's reported `bytes_limit`, else physical RAM (a CPU)."""
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
    """Batch size at which a dense layer turns from memory- to compute-bound.

    A dense layer does 2 FLOPs per parameter per example and reads each parameter
    (`bytes_per_param` bytes) once per call, so compute time 2·P·B/F equals
    memory time P·bytes/BW at B* = F·bytes_per_param / (2·BW). The post's
    "FLOPS / bandwidth" is this only for 2-byte weights.
    """
    if peak_flops <= 0 or bandwidth <= 0 or bytes_per_param <= 0:
        raise ValueError("critical_batch_size needs positive peak_flops, bandwidth and bytes")
    return peak_flops * bytes_per_param / (2.0 * bandwidth)


def detect(device_kind: str) -> DeviceSpec | None:
    """The spec entry whose name matches JAX's `device_kind`, most specific match first."""
    kind = device_kind.lower()
    best, best_len = None, 0
    for spec in SPECS.values():
        for pattern in spec.kinds:
            if pattern in kind and len(pattern) > best_len:
                best, best_len = spec, len(pattern)
    return best


def spec_flops(spec: DeviceSpec, dtype: str, matmul_precision: str = "default") -> float | None:
    """Peak FLOP/s for `dtype`; fp32 matmuls run as TF32 on GPUs that have it unless 'highest'."""
    if dtype == "float32" and matmul_precision == "default" and "tf32" in spec.flops_per_s:
        return spec.flops_per_s["tf32"]
    return spec.flops_per_s.get(dtype)


# ---------------------------------------------------------------- measured peaks


@dataclasses.dataclass(frozen=True)
class MeasuredPeaks:
    """What the device reached in microbenchmarks (FLOP/s, bytes/s, seconds)."""

    device_kind: str
    platform: str
    matmul_flops_per_s: dict[str, float]
    bandwidth_bytes_per_s: float
    dispatch_floor_s: float
    kernel_overhead_s: float
    details: dict[str, Any]


QUICK = timing.TimingSettings(warmup_runs=2, min_runs=5, max_runs=200, budget_s=0.5)


def _median_time(fn, args, settings: timing.TimingSettings = QUICK) -> float:
    compiled = timing.compile_fn(fn, args)
    m = timing.measure(compiled.call, args, settings)
    return float(sorted(m.samples_s)[len(m.samples_s) // 2])


def _matmul_size(platform: str) -> int:
    # Large enough to reach the peak, small enough to time quickly on a 2-core CPU.
    return 2048 if platform == "cpu" else 8192


def measure_matmul_flops(device: jax.Device, dtype: str, n: int | None = None) -> float:
    """FLOP/s of an n×n by n×n product in `dtype` (2·n³ FLOPs per call)."""
    n = n or _matmul_size(device.platform)
    a = jax.device_put(jnp.ones((n, n), jnp.dtype(dtype)), device)
    b = jax.device_put(jnp.ones((n, n), jnp.dtype(dtype)), device)
    return 2.0 * n**3 / _median_time(lambda a, b: a @ b, (a, b))


# A sweep measures one GEMM shape per batch size: keep each short (cold start <= 30 s).
GEMM_SETTINGS = timing.TimingSettings(
    warmup_runs=1, warmup_s=0.0, min_runs=5, max_runs=1000, budget_s=0.4
)


def last_level_cache_bytes(device: jax.Device) -> int:
    """Size of the cache that warm weights can sit in: L3 from sysfs on a CPU.

    Accelerators do not report theirs through JAX; 64 MiB bounds the L2 of every GPU
    in the spec table (A100 40 MB, H100 50 MB).
    """
    if device.platform == "cpu":
        try:
            with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
                text = f.read().strip()
            units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
            return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)
        except (OSError, ValueError):
            pass
    return 64 << 20


def measure_gemm_flops(
    device: jax.Device,
    dtype: str,
    m: int,
    k: int,
    n: int,
    dispatch_floor_s: float = 0.0,
    cold: bool = False,
) -> float:
    """FLOP/s of one [m, k] × [k, n] product: what the device reaches at a model's real shape.

    The call's dispatch floor is taken off its time: inside a model the product is one
    kernel among many and pays no dispatch of its own. With `cold`, one call runs the
    product against enough distinct [k, n] weights to overflow the last-level cache
    twice, so every weight comes from DRAM, as in a model whose weights exceed the cache.
    """
    item = jnp.dtype(dtype).itemsize
    copies = 1
    if cold:
        copies = max(1, min(64, -(-2 * last_level_cache_bytes(device) // (k * n * item))))
    a = jax.device_put(jnp.ones((m, k), jnp.dtype(dtype)), device)
    bs = [jax.device_put(jnp.full((k, n), i + 1, jnp.dtype(dtype)), device) for i in range(copies)]

    def products(a, *bs):
        # Each product is kept (summed after), so none can be skipped or merged.
        return sum(a @ b for b in bs)

    t = _median_time(products, (a, *bs), GEMM_SETTINGS)
    return 2.0 * m * k * n * copies / max(t - dispatch_floor_s, 0.05 * t)


def measure_attention_seconds(
    device: jax.Device,
    dtype: str,
    layout: str,
    shape: tuple[int, int, int, int, int],
    attend: Callable[..., jax.Array],
    dispatch_floor_s: float = 0.0,
) -> float:
    """Seconds of one layer's decode attention at `shape` = (batch, kv_heads, cache_len,
    q_per_kv, head_dim) over a cache in `layout` and `dtype`. `attend(q_BxKxGxH, k, v,
    lengths_B, layout)` is the model's own attention, handed in by the workload (the decoder's
    `models.kv_cache.attend_cache`), so the lab times what the model runs without importing it.

    Attention over a cache is neither a weight GEMM nor a plain streaming read (skinny
    products, a softmax between them), so it is timed as it runs. The cache is cold, as in a
    decode step where every layer's weights pass through the last-level cache between two
    attentions: one call attends over enough distinct caches to overflow it twice, and the
    time per cache is returned, the call's dispatch floor taken off.
    """
    B, K, S, G, H = shape
    dt = jnp.dtype(dtype)
    kv_shape = (B * K, S, H) if layout == "bksh" else (B, S, K, H)
    kv_bytes = 2 * B * K * S * H * dt.itemsize
    copies = max(1, min(64, -(-2 * last_level_cache_bytes(device) // kv_bytes)))
    q = jax.device_put(jnp.ones((B, K, G, H), dt), device)
    lengths = jax.device_put(jnp.full((B,), S, jnp.int32), device)
    kvs = [
        jax.device_put(jnp.full(kv_shape, 1 + i / copies, dt), device) for i in range(2 * copies)
    ]

    def attend_all(q, lengths, *kvs):
        # Every output is kept (summed), so no attention can be skipped.
        outs = [attend(q, kvs[i], kvs[i + 1], lengths, layout) for i in range(0, len(kvs), 2)]
        return sum(outs)

    t = _median_time(attend_all, (q, lengths, *kvs), GEMM_SETTINGS)
    return max(t - dispatch_floor_s, 0.05 * t) / copies


def attention_seconds(
    device: jax.Device,
    dtype: str,
    layout: str,
    shape: tuple[int, int, int, int, int],
    cache_dir: str,
    attend: Callable[..., jax.Array],
) -> float:
    """measure_attention_seconds of one (dtype, layout, shape), cached with the device's peaks."""
    path = cache_path(cache_dir)
    cache = _load(path)
    key = _device_key(device)
    entry = dict(cache.get(key, {}))
    table = dict(entry.get("attention_s", {}))
    name = f"{dtype}:{layout}:" + "x".join(str(int(n)) for n in shape)
    if name not in table:
        table[name] = measure_attention_seconds(
            device,
            dtype,
            layout,
            shape,
            attend,
            dispatch_floor_s=entry.get("dispatch_floor_s", 0.0),
        )
        entry["attention_s"] = table
        _save(path, cache, key, entry)
    return table[name]


def measure_bandwidth(device: jax.Device, buffer_bytes: int | None = None) -> dict[str, float]:
    """Streaming bandwidth (bytes/s): a full read (sum) and a read+write (scale) of a big buffer.

    The buffer is 256 MiB on a CPU (8x a 32 MiB last-level cache) and 2 GiB on an
    accelerator, so neither fits in a cache.
    """
    buffer_bytes = buffer_bytes or (256 << 20 if device.platform == "cpu" else 2 << 30)
    x = jax.device_put(jnp.ones((buffer_bytes // 4,), jnp.float32), device)
    read_s = _median_time(lambda x: jnp.sum(x), (x,))
    copy_s = _median_time(lambda x: x * 2.0, (x,))
    return {
        "read_bytes_per_s": buffer_bytes / read_s,
        "copy_bytes_per_s": 2 * buffer_bytes / copy_s,
        "buffer_bytes": float(buffer_bytes),
    }


FLOOR_SETTINGS = timing.TimingSettings(
    warmup_runs=50, min_runs=300, max_runs=5000, target_rel_ci=0.01, budget_s=0.4
)


def measure_dispatch_floor(device: jax.Device) -> float:
    """Median seconds of a trivial jitted call: the per-call overhead no batch can avoid."""
    x = jax.device_put(jnp.ones((8,), jnp.float32), device)
    return _median_time(lambda x: x + 1.0, (x,), FLOOR_SETTINGS)


def measure_kernel_overhead(device: jax.Device, chain: int = 32) -> float:
    """Seconds each extra kernel in a program costs when it does almost no work.

    Times a chain of `chain` dependent 8x8 matmuls (XLA cannot fuse them) against a
    single one; the difference per link is the launch/scheduling cost per kernel,
    which is what keeps small networks flat (overhead-bound) as the batch grows.
    """
    x = jax.device_put(jnp.eye(8, dtype=jnp.float32), device)

    def chained(n):
        def f(x):
            y = x
            for _ in range(n):
                y = y @ x
            return y

        return f

    one = _median_time(chained(1), (x,), FLOOR_SETTINGS)
    many = _median_time(chained(chain), (x,), FLOOR_SETTINGS)
    return max(many - one, 0.0) / (chain - 1)


def cache_path(cache_dir: str) -> str:
    return os.path.join(os.path.expanduser(cache_dir), "device_peaks.json")


def _device_key(device: jax.Device) -> str:
    return f"{device.platform}:{device.device_kind}"


def measured_peaks(
    device: jax.Device, dtypes: tuple[str, ...], cache_dir: str, refresh: bool = False
) -> MeasuredPeaks:
    """Measured peaks for `device`, from the cache file unless missing, incomplete or `refresh`."""
    path = cache_path(cache_dir)
    cache = _load(path)
    key = _device_key(device)
    entry = {} if refresh else dict(cache.get(key, {}))
    flops = dict(entry.get("matmul_flops_per_s", {}))
    changed = False
    for dtype in dtypes:
        if dtype not in flops:
            flops[dtype] = measure_matmul_flops(device, dtype)
            changed = True
    if "bandwidth" not in entry:
        entry["bandwidth"] = measure_bandwidth(device)
        changed = True
    if "dispatch_floor_s" not in entry:
        entry["dispatch_floor_s"] = measure_dispatch_floor(device)
        changed = True
    if "kernel_overhead_s" not in entry:
        entry["kernel_overhead_s"] = measure_kernel_overhead(device)
        changed = True
    entry["matmul_flops_per_s"] = flops
    entry.setdefault("gemm_flops_per_s", {})
    if changed:
        entry["measured_at"] = time.time()
        entry["jax_version"] = jax.__version__
        _save(path, cache, key, entry)
    bw = entry["bandwidth"]
    return MeasuredPeaks(
        device_kind=device.device_kind,
        platform=device.platform,
        matmul_flops_per_s=flops,
        bandwidth_bytes_per_s=max(bw["read_bytes_per_s"], bw["copy_bytes_per_s"]),
        dispatch_floor_s=entry["dispatch_floor_s"],
        kernel_overhead_s=entry["kernel_overhead_s"],
        details=entry,
    )


def gemm_flops(
    device: jax.Device,
    dtype: str,
    shape: tuple[int, int, int],
    cache_dir: str,
    cold: bool = False,
) -> float:
    """Measured FLOP/s of one GEMM shape (m, k, n), warm or with cold weights, cached."""
    path = cache_path(cache_dir)
    cache = _load(path)
    key = _device_key(device)
    entry = dict(cache.get(key, {}))
    table = dict(entry.get("gemm_flops_per_s", {}))
    name = f"{dtype}:{shape[0]}x{shape[1]}x{shape[2]}" + (":cold" if cold else "")
    if name not in table:
        table[name] = measure_gemm_flops(
            device, dtype, *shape, dispatch_floor_s=entry.get("dispatch_floor_s", 0.0), cold=cold
        )
        entry["gemm_flops_per_s"] = table
        _save(path, cache, key, entry)
    return table[name]


def _load(path: str) -> dict[str, Any]:
    """The peaks cache; a corrupt or unreadable one reads as empty (re-measured) with a warning."""
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            cache = json.load(f)
    except (OSError, ValueError) as e:
        logging.warning("peaks cache %s is unreadable (%s); measuring the peaks again", path, e)
        return {}
    if not isinstance(cache, dict):
        logging.warning("peaks cache %s is not a JSON object; measuring the peaks again", path)
        return {}
    return cache


def _save(path: str, cache: dict[str, Any], key: str, entry: dict[str, Any]) -> None:
    """Merges `entry` into the cache on disk under a lock; written to a temp file, then renamed.

    Two processes measuring at once both keep their entries and never leave half a file.
    """
    del cache  # re-read under the lock: another process may have written since
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        cache = {**_load(path), key: entry}
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".peaks-", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(cache, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
