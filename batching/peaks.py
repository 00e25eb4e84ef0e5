"""Measured peaks: microbenchmarks timed with the lab's own harness, cached per device.

Matmul, GEMM-shape and convolution FLOP/s, streaming and last-level-cache bandwidth, the
dispatch floor, kernel overhead and the decoder's own attention, each measured once per
device and kept in a JSON file (atomic, locked) so sweeps do not re-measure every time.
"""

import dataclasses
import fcntl
import json
import os
import re
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from batching import ops, specs, timing


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
    # Re-reading a buffer that fits the last-level cache (warm weights and activations).
    cache_bandwidth_bytes_per_s: float = 0.0


class Budget:
    """Seconds a run's per-shape microbenchmarks may spend; None: no limit. A shape asked
    for once it is spent is not measured (cached_measurement returns None)."""

    def __init__(self, seconds: float | None = None):
        self.seconds = seconds
        self.spent_s = 0.0
        self.refused = 0  # shapes not measured for want of budget

    @property
    def exhausted(self) -> bool:
        return self.seconds is not None and self.spent_s >= self.seconds


QUICK = timing.TimingSettings(warmup_runs=2, min_runs=5, max_runs=200, budget_s=0.5)
# A big matmul or a stream over a buffer far larger than any cache takes the same time call
# after call (tens to hundreds of ms each): three calls after one warm-up pin its median, and
# a cold start pays for every call.
STREAM_SETTINGS = timing.TimingSettings(
    warmup_runs=1, warmup_s=0.0, min_runs=3, max_runs=50, budget_s=0.3
)


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
    return 2.0 * n**3 / _median_time(lambda a, b: a @ b, (a, b), STREAM_SETTINGS)


# A sweep measures one GEMM shape per batch size: keep each short (cold start <= 25 s).
GEMM_SETTINGS = timing.TimingSettings(
    warmup_runs=1, warmup_s=0.0, min_runs=5, max_runs=1000, budget_s=0.12
)


# A warm GEMM microbenchmark repeats a small product in one call up to this many FLOPs.
WARM_CALL_FLOPS = 1e8
# A cold one overflows the last-level cache with weights, but stops at this many FLOPs per
# call (a few tens of ms on a CPU): beyond it the weights' source no longer shows.
COLD_CALL_FLOPS = 4e9


# Where no datasheet gives a device's last-level cache: larger than any GPU's L2 in the spec
# table (H100/H200 50 MB, A100 40 MB), so a model is never wrongly taken to fit it.
ASSUMED_CACHE_BYTES = 64 << 20


def last_level_cache(device: jax.Device) -> tuple[int, str]:
    """(bytes, where the figure comes from) of the cache that warm weights can sit in: a
    CPU's L3 read from sysfs; an accelerator's L2 from the spec table (batching.specs, with
    its datasheet or whitepaper); else ASSUMED_CACHE_BYTES, said so."""
    if device.platform == "cpu":
        try:
            with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
                text = f.read().strip()
            units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
            size = int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)
            return size, "sysfs: /sys/devices/system/cpu/cpu0/cache/index3/size"
        except (OSError, ValueError):
            pass
    spec = specs.detect(device.device_kind)
    if spec is not None and spec.cache_bytes:
        return int(spec.cache_bytes), f"spec {spec.name}: {spec.cache_source}"
    return ASSUMED_CACHE_BYTES, "assumed (no spec for this device): 64 MiB"


def last_level_cache_bytes(device: jax.Device) -> int:
    """Size of the cache that warm weights can sit in (last_level_cache)."""
    return last_level_cache(device)[0]


# The last weight set measure_gemm_flops made: a sweep measures one GEMM shape per batch
# size against the same [k, n] weights, so they are made once (up to 64 × k·n values).
_WEIGHTS: dict[tuple[Any, ...], list[jax.Array]] = {}


def _gemm_weights(
    device: jax.Device, dtype: str, shape: tuple[int, ...], copies: int
) -> list[jax.Array]:
    """`copies` distinct weights of `shape` on `device` (the i-th filled with (i + 1) / k),
    reused from the previous call for the same device, dtype and shape."""
    key = (device.id, device.platform, dtype, shape)
    made = _WEIGHTS.get(key, [])
    if len(made) < copies:
        k = shape[-2]
        made = made + [
            jax.device_put(jnp.full(shape, (i + 1) / k, jnp.dtype(dtype)), device)
            for i in range(len(made), copies)
        ]
        _WEIGHTS.clear()  # one set at a time: a cold set is twice the last-level cache
        _WEIGHTS[key] = made
    return made[:copies]


def _per_instance(
    t: float, copies: int, dispatch_floor_s: float, kernel_overhead_s: float = 0.0
) -> float:
    """Seconds of one of `copies` instances of an op timed together in a call of `t` seconds:
    the call's dispatch floor, then each instance's launch, taken off (never below 5%: a
    floor measured on a noisier call must not leave nothing)."""
    each = max(t - dispatch_floor_s, 0.05 * t) / copies
    return max(each - kernel_overhead_s, 0.05 * each)


def _products(a: jax.Array, bs: tuple[jax.Array, ...], chain: bool):
    """a @ b for every b: chained (each product feeding the next, as a stack of square layers
    runs: independent products could overlap and look faster than they run), else each on
    `a`, every output kept so none can be merged."""
    if chain:
        y = a
        for b in bs:
            y = y @ b
        return y
    return tuple(a @ b for b in bs)


def measure_gemm_flops(
    device: jax.Device,
    dtype: str,
    m: int,
    k: int,
    n: int,
    dispatch_floor_s: float = 0.0,
    cold: bool = False,
    batch: int = 1,
    kernel_overhead_s: float = 0.0,
) -> float:
    """FLOP/s of one [m, k] × [k, n] product: what the device reaches at a model's real shape.
    With `batch` > 1, of a batched product [batch, m, k] × [batch, k, n] in one kernel, as an
    einsum over experts or routing groups runs (FLOPs counted over the whole batch).

    Inside a model the product is one kernel among many: it pays no dispatch of its own, and
    the roofline adds its launch (`kernel_overhead_s`) separately. So one call runs the product
    against several distinct [k, n] weights (every output kept, none can be merged; chained,
    each product feeding the next, where the shape allows), and the call's dispatch floor and
    one launch per product are taken off. With `cold` there are
    enough weights to overflow the last-level cache twice, so every weight comes from DRAM, as
    in a model whose weights exceed the cache (fewer for a product so heavy that a call of them
    would pass COLD_CALL_FLOPS: it is compute-bound wherever its weights are); warm, enough
    to reach WARM_CALL_FLOPS (a tiny product alone would be all dispatch noise) while all of
    them fit a quarter of the cache.
    """
    item = jnp.dtype(dtype).itemsize
    weight_bytes = batch * k * n * item
    llc = last_level_cache_bytes(device)
    if cold:
        copies = max(1, min(64, -(-2 * llc // weight_bytes)))
        # A product this heavy is compute-bound whatever its weights' source (a [512, 1024]
        # row block does 256 FLOPs per weight byte): enough copies for COLD_CALL_FLOPS.
        copies = min(copies, max(2, -(-int(COLD_CALL_FLOPS) // (2 * batch * m * k * n))))
    else:
        wanted = -(-int(WARM_CALL_FLOPS) // (2 * batch * m * k * n))
        copies = max(1, min(64, wanted, llc // 4 // weight_bytes))
    lead = (batch,) if batch > 1 else ()
    a = jax.device_put(jnp.ones((*lead, m, k), jnp.dtype(dtype)), device)
    bs = _gemm_weights(device, dtype, (*lead, k, n), copies)

    t = _median_time(
        lambda a, *bs: _products(a, bs, chain=k == n and not cold), (a, *bs), GEMM_SETTINGS
    )
    return 2.0 * batch * m * k * n / _per_instance(t, copies, dispatch_floor_s, kernel_overhead_s)


# Above this many FLOPs a convolution runs at its saturated rate: a larger batch of the same
# layer is measured at the batch that reaches it (keeps a cold start short, ResNet50 at batch
# 64 would otherwise cost minutes of microbenchmarks).
CONV_SATURATION_FLOPS = 2e9
CONV_SETTINGS = timing.TimingSettings(
    warmup_runs=1, warmup_s=0.0, min_runs=3, max_runs=1000, budget_s=0.3
)


def conv_flops_of(shape: tuple[int, ...]) -> float:
    """2 FLOPs per multiply-accumulate of a conv at shape (B, H, W, Cin, Cout, k, stride)
    with (k - 1) // 2 padding: models.resnet's count."""
    B, H, W, cin, cout, k, stride = shape
    pad = (k - 1) // 2
    ho, wo = (H + 2 * pad - k) // stride + 1, (W + 2 * pad - k) // stride + 1
    return 2.0 * B * ho * wo * cout * k * k * cin


def conv_measured_batch(shape: tuple[int, ...]) -> int:
    """The batch a conv at `shape` is measured at: its own, or the smallest power of two whose
    FLOPs reach CONV_SATURATION_FLOPS, whichever is smaller."""
    B = shape[0]
    per_example = conv_flops_of((1, *shape[1:]))
    b = 1
    while b < B and b * per_example < CONV_SATURATION_FLOPS:
        b *= 2
    return min(b, B)


NHWC = ("NHWC", "HWIO", "NHWC")


def _conv_program(
    device: jax.Device, dtype: str, shape: tuple[int, ...], copies: int
) -> tuple[Callable[..., Any], tuple[jax.Array, ...]]:
    """`copies` convs at shape (B, H, W, Cin, Cout, k, stride), each with its BatchNorm
    (inference: per-channel scale and shift) and ReLU, distinct weights, every output kept: the
    function and its arguments, on `device`."""
    B, H, W, cin, cout, k, stride = shape
    dt = jnp.dtype(dtype)
    pad = (k - 1) // 2
    x = jax.device_put(jnp.ones((B, H, W, cin), dt), device)
    ws = [
        jax.device_put(jnp.full((k, k, cin, cout), 0.01 * (i + 1), dt), device)
        for i in range(copies)
    ]
    scale = jax.device_put(jnp.ones((cout,), dt), device)
    shift = jax.device_put(jnp.zeros((cout,), dt), device)

    def conv_bn_relu(x, scale, shift, *ws):
        outs = []
        for w in ws:
            y = jax.lax.conv_general_dilated(
                x, w, (stride, stride), ((pad, pad),) * 2, dimension_numbers=NHWC
            )
            outs.append(jax.nn.relu(y * scale + shift))
        return tuple(outs)

    return conv_bn_relu, (x, scale, shift, *ws)


def measure_conv_flops(
    device: jax.Device,
    dtype: str,
    shape: tuple[int, ...],
    dispatch_floor_s: float = 0.0,
    kernel_overhead_s: float = 0.0,
) -> float:
    """FLOP/s of one NHWC convolution at shape (B, H, W, Cin, Cout, k, stride) with its
    BatchNorm (inference: a per-channel scale and shift) and ReLU, as models.resnet runs it
    (lax.conv_general_dilated, "HWIO" kernel, (k - 1) // 2 padding). The epilogue is timed with
    the conv so its cost counts whether the backend fuses it or not. Weights stay warm between
    calls; the roofline adds DRAM weight reads through the op's bytes. As for a warm GEMM, a
    small conv runs several times in one call (distinct weights, every output kept) up to
    WARM_CALL_FLOPS, and the dispatch floor and one launch per conv are taken off."""
    copies = max(1, min(16, -(-int(WARM_CALL_FLOPS) // int(conv_flops_of(shape)))))
    fn, args = _conv_program(device, dtype, shape, copies)
    t = _median_time(fn, args, CONV_SETTINGS)
    return conv_flops_of(shape) / _per_instance(t, copies, dispatch_floor_s, kernel_overhead_s)


def conv_flops(
    device: jax.Device,
    dtype: str,
    shape: tuple[int, ...],
    cache_dir: str,
    matmul_precision: str = "default",
    budget: Budget | None = None,
) -> float | None:
    """Measured FLOP/s of a conv shape (measure_conv_flops at conv_measured_batch), cached;
    None when it is not cached and `budget` is spent."""
    measured_shape = (conv_measured_batch(shape), *shape[1:])
    return cached_measurement(
        device,
        cache_dir,
        "conv_flops_per_s",
        conv_key(dtype_key(dtype, matmul_precision), shape),
        lambda entry: measure_conv_flops(
            device,
            dtype,
            measured_shape,
            dispatch_floor_s=entry.get("dispatch_floor_s", 0.0),
            kernel_overhead_s=entry.get("kernel_overhead_s", 0.0),
        ),
        matmul_precision=matmul_precision,
        budget=budget,
    )


# A call that runs a small op alone: timed long enough for a stable median of a ~10-100 µs
# call (hundreds of calls), whose distribution can be bimodal (a worker thread awake or not).
LONE_SETTINGS = timing.TimingSettings(
    warmup_runs=5, warmup_s=0.0, min_runs=30, max_runs=5000, target_rel_ci=0.02, budget_s=0.05
)


def _lone_program(
    device: jax.Device, dtype: str, kind: str, shape: tuple[int, ...], copies: int
) -> tuple[Callable[..., Any], tuple[jax.Array, ...]]:
    """`copies` instances of an op in one program, one after another: chained (each feeding
    the next, as layers do) where the op maps its output shape to its input shape, else on
    the same input with distinct weights (a program this short runs its kernels in order)."""
    if kind == "conv":
        B, H, W, cin, cout, k, stride = shape
        if cin != cout or stride != 1 or k % 2 == 0:  # the output keeps the input shape
            return _conv_program(device, dtype, shape, copies)
        fn, args = _conv_program(device, dtype, shape, 1)
        x, scale, shift, w = args

        def chained_convs(x, scale, shift, *ws):
            for w in ws:
                x = fn(x, scale, shift, w)[0]
            return x

        ws = [w * (i + 1) for i in range(copies)]
        return chained_convs, (x, scale, shift, *ws)
    if kind not in ops.LONE_KINDS or len(shape) not in ops.LONE_KINDS[kind]:
        raise ValueError(f"no lone-op microbenchmark for kind {kind!r} at shape {shape}")
    *lead, m, k, n = shape
    dt = jnp.dtype(dtype)
    a = jax.device_put(jnp.ones((*lead, m, k), dt), device)
    bs = [jax.device_put(jnp.full((*lead, k, n), (i + 1) / k, dt), device) for i in range(copies)]

    return (lambda a, *bs: _products(a, bs, chain=k == n)), (a, *bs)


def measure_lone_op_seconds(
    device: jax.Device, dtype: str, kind: str, shape: tuple[int, ...], dispatch_floor_s: float
) -> list[float]:
    """Seconds a jitted call running ONE instance of an op, and one running TWO in a row, cost
    beyond the trivial call's dispatch floor: medians of back-to-back calls, as the sweep
    times a point. [one, two].

    The chained microbenchmarks (measure_gemm_flops, measure_conv_flops) run many instances
    in one call and divide, so what a call pays once whatever its kernels do (handing the
    program to a worker thread, waking the intra-op thread pool that a library kernel such as
    XLA:CPU's YNNPACK fusion forks onto) is spread thin there and vanishes. Here it stays:
    two − one is what one more instance costs inside a call (with its launch), and
    one − (two − one) what the call paid once for it (ops.call_extra). Two instances keep
    their weights in the cache, as a small model's layers do. Shapes: gemm and
    moe_dispatch_combine (m, k, n) or (batch, m, k, n); conv (B, H, W, Cin, Cout, k, stride),
    with its BatchNorm and ReLU as measure_conv_flops runs it.
    """
    out = []
    for copies in (1, 2):
        fn, args = _lone_program(device, dtype, kind, shape, copies)
        out.append(max(_median_time(fn, args, LONE_SETTINGS) - dispatch_floor_s, 0.0))
    return out


def lone_op_seconds(
    device: jax.Device,
    dtype: str,
    kind: str,
    shape: tuple[int, ...],
    cache_dir: str,
    matmul_precision: str = "default",
    budget: Budget | None = None,
) -> tuple[float, float] | None:
    """measure_lone_op_seconds of one (kind, dtype, shape), cached with the device's peaks;
    None when it is not cached and `budget` is spent."""
    found = cached_measurement(
        device,
        cache_dir,
        "lone_op_s",
        lone_key(dtype_key(dtype, matmul_precision), kind, shape),
        lambda entry: measure_lone_op_seconds(
            device, dtype, kind, shape, entry.get("dispatch_floor_s", 0.0)
        ),
        matmul_precision=matmul_precision,
        budget=budget,
    )
    return None if found is None else (found[0], found[1])


def _pass_seconds(body, x: jax.Array, passes: int, settings: timing.TimingSettings) -> float:
    """Seconds of one pass `body(x, c) -> scalar` over a buffer, from inside one call: a call
    of `passes` passes minus a call of one, over passes − 1, so the call's fixed cost
    (dispatch, launch, synchronisation: 60-120 µs on an H200 in a VM, against ~2 µs for a
    pass over a 16 MiB buffer in its L2) cancels. Each pass reads the buffer scaled by the
    scalar the last pass returned, so XLA can neither merge the passes nor hoist them."""

    def run(n: int):
        def f(x):
            # Unrolled, not a while loop: an accelerator would pay a host round trip per trip.
            c = jnp.float32(1)
            for _ in range(n):
                c = 1.0 + 1e-30 * body(x, c)
            return c

        return f

    one = _median_time(run(1), (x,), settings)
    many = _median_time(run(passes), (x,), settings)
    return max(many - one, 0.01 * many / passes) / (passes - 1)


def measure_cache_bandwidth(
    device: jax.Device, buffer_bytes: int | None = None, passes: int | None = None
) -> float:
    """Bytes/s of re-reading a buffer a quarter of the last-level cache's size: what warm
    weights and activations that stay in the cache between calls are read at.

    On a CPU one pass per call (a pass over 8 MiB takes ~300 µs, the call ~10 µs more). On an
    accelerator a pass takes microseconds and the call tens of them (on an H200 in a VM one
    pass per call read as ~240 GB/s), so `passes` (default 32) are timed inside one call
    against one (_pass_seconds)."""
    buffer_bytes = buffer_bytes or max(last_level_cache_bytes(device) // 4, 1 << 20)
    x = jax.device_put(jnp.ones((buffer_bytes // 4,), jnp.float32), device)
    passes = passes or (1 if device.platform == "cpu" else 32)
    if passes == 1:
        return buffer_bytes / _median_time(lambda x: jnp.sum(x), (x,))

    def read(x, c):
        return jnp.sum(x * c)

    return buffer_bytes / _pass_seconds(read, x, passes, QUICK)


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
    return _per_instance(t, copies, dispatch_floor_s)


def attention_seconds(
    device: jax.Device,
    dtype: str,
    layout: str,
    shape: tuple[int, int, int, int, int],
    cache_dir: str,
    attend: Callable[..., jax.Array],
    matmul_precision: str = "default",
    budget: Budget | None = None,
) -> float | None:
    """measure_attention_seconds of one (dtype, layout, shape), cached with the device's
    peaks; None when it is not cached and `budget` is spent."""
    return cached_measurement(
        device,
        cache_dir,
        "attention_s",
        attention_key(dtype_key(dtype, matmul_precision), layout, shape),
        lambda entry: measure_attention_seconds(
            device,
            dtype,
            layout,
            shape,
            attend,
            dispatch_floor_s=entry.get("dispatch_floor_s", 0.0),
        ),
        matmul_precision=matmul_precision,
        budget=budget,
    )


def measure_bandwidth(
    device: jax.Device,
    buffer_bytes: int | None = None,
    dispatch_floor_s: float = 0.0,
    passes: int | None = None,
) -> dict[str, float]:
    """Streaming bandwidth (bytes/s): a full read (sum) and a read+write (scale) of a big buffer.

    The buffer is 4x the last-level cache on a CPU (128 MiB for a 32 MiB L3; at least 64 MiB)
    and 2 GiB on an accelerator, so neither fits in a cache; a larger one gives the same rate
    and costs a cold start more seconds. A CPU reads it once per call (the call's ~10 µs are
    under 0.5% of it). On an accelerator a 2 GiB read takes ~0.5 ms (H200) and a call 60-120
    µs more, so the read is `passes` (default 8) dependent passes in one call against one
    (_pass_seconds), which cancels the call's fixed cost; the read+write is one pass per call
    with the dispatch floor taken off.
    """
    if not buffer_bytes:
        llc = last_level_cache_bytes(device)
        buffer_bytes = max(4 * llc, 64 << 20) if device.platform == "cpu" else 2 << 30
    passes = passes or (1 if device.platform == "cpu" else 8)
    x = jax.device_put(jnp.ones((buffer_bytes // 4,), jnp.float32), device)

    def stream_s(fn) -> float:
        t = _median_time(fn, (x,), STREAM_SETTINGS)
        return max(t - dispatch_floor_s, 0.5 * t)

    if passes == 1:
        read_s = stream_s(lambda x: jnp.sum(x))
    else:
        read_s = _pass_seconds(lambda x, c: jnp.sum(x * c), x, passes, STREAM_SETTINGS)
    copy_s = stream_s(lambda x: x * 2.0)
    return {
        "read_bytes_per_s": buffer_bytes / read_s,
        "copy_bytes_per_s": 2 * buffer_bytes / copy_s,
        "buffer_bytes": float(buffer_bytes),
        "read_passes_per_call": float(passes),
    }


FLOOR_SETTINGS = timing.TimingSettings(
    warmup_runs=50, min_runs=300, max_runs=5000, target_rel_ci=0.01, budget_s=0.25
)


def measure_dispatch_floor(device: jax.Device) -> float:
    """Median seconds of a trivial jitted call: the per-call overhead no batch can avoid."""
    x = jax.device_put(jnp.ones((8,), jnp.float32), device)
    return _median_time(lambda x: x + 1.0, (x,), FLOOR_SETTINGS)


CALL_FLOOR_SETTINGS = timing.TimingSettings(
    warmup_runs=5, warmup_s=0.0, min_runs=30, max_runs=2000, target_rel_ci=0.02, budget_s=0.1
)


def measure_call_floor(args: Any) -> float:
    """Median seconds of a trivial jitted call that takes a workload's own arguments.

    What a call costs before any kernel runs depends on what it is handed: flattening an
    nnx.State of many parameters is Python work on every call (~80 µs for an 8-layer MLP on a
    2-core CPU, against ~7 µs for one array). The roofline uses this floor for the workload's
    points instead of the one-array dispatch floor. Nothing is donated: the args stay alive.
    """

    def trivial(*args):
        return jnp.zeros((), jnp.float32)

    return _median_time(trivial, tuple(args), CALL_FLOOR_SETTINGS)


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


def dtype_key(dtype: str, matmul_precision: str = "default") -> str:
    """How the cache names a dtype measured under a matmul precision: "float32" for XLA's
    default, "float32@highest" otherwise (on a GPU, fp32 at default precision runs as TF32)."""
    if matmul_precision in (None, "default"):
        return dtype
    return f"{dtype}@{matmul_precision}"


def measured_peaks(
    device: jax.Device,
    dtypes: tuple[str, ...],
    cache_dir: str,
    refresh: bool = False,
    matmul_precision: str = "default",
) -> MeasuredPeaks:
    """Measured peaks for `device`, from the cache file unless missing, incomplete or `refresh`.
    Matmul peaks are keyed by (dtype, precision) (dtype_key) and measured under that precision."""
    path = cache_path(cache_dir)
    cache = _load(path)
    key = _device_key(device)
    entry = {} if refresh else dict(cache.get(key, {}))
    flops = dict(entry.get("matmul_flops_per_s", {}))
    changed = False
    for dtype in dtypes:
        name = dtype_key(dtype, matmul_precision)
        if name not in flops:
            with timing.precision_context(matmul_precision):
                flops[name] = measure_matmul_flops(device, dtype)
            changed = True
    if "last_level_cache_bytes" not in entry:
        entry["last_level_cache_bytes"], entry["last_level_cache_source"] = last_level_cache(device)
        changed = True
    if "dispatch_floor_s" not in entry:
        entry["dispatch_floor_s"] = measure_dispatch_floor(device)
        changed = True
    if "bandwidth" not in entry:
        entry["bandwidth"] = measure_bandwidth(device, dispatch_floor_s=entry["dispatch_floor_s"])
        changed = True
    if "cache_bandwidth_bytes_per_s" not in entry:
        entry["cache_bandwidth_bytes_per_s"] = measure_cache_bandwidth(device)
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
    return peaks_of(entry, device.platform, device.device_kind)


# A cached peak and this run's quick measurement of it disagree when one is more than this
# fraction above the other.
CHECK_TOLERANCE = 0.25
# Tables of rates measured at a model's shapes: measured in the same sitting as the peaks, so
# they go with them when a check finds the peaks stale.
PER_SHAPE_TABLES = ("gemm_flops_per_s", "conv_flops_per_s", "attention_s", "lone_op_s")


def quick_peaks(device: jax.Device, dtype: str) -> dict[str, float]:
    """The matmul peak and the streaming read bandwidth measured again, briefly (about a
    second on a CPU): the same square product as the cached peak, and one read of a buffer
    overflowing the last-level cache (several passes in one call on an accelerator)."""
    llc = last_level_cache_bytes(device)
    buffer_bytes = max(4 * llc, 64 << 20) if device.platform == "cpu" else 1 << 30
    x = jax.device_put(jnp.ones((buffer_bytes // 4,), jnp.float32), device)
    if device.platform == "cpu":
        read_s = _median_time(lambda x: jnp.sum(x), (x,), STREAM_SETTINGS)
    else:
        read_s = _pass_seconds(lambda x, c: jnp.sum(x * c), x, 4, STREAM_SETTINGS)
    return {
        "matmul_flops_per_s": measure_matmul_flops(device, dtype),
        "read_bytes_per_s": buffer_bytes / read_s,
    }


def check_cached(
    device: jax.Device, cache_dir: str, dtype: str, matmul_precision: str = "default"
) -> dict[str, Any] | None:
    """Checks the cached peaks a run is about to use against quick_peaks, measured now.

    A peak cached while the machine was busy (a first run beside other work) makes every
    later prediction wrong: such a cache held 57 GFLOP/s where the quiet machine does ~143.
    When a quick measurement now exceeds a cached value by more than CHECK_TOLERANCE, the
    device's entry is measured again (its per-shape tables dropped, to be re-measured as
    asked); when it falls short by as much, the cache is kept (the machine is busier now
    than then) and the report says so. Returns what was compared and done; None when there
    is nothing cached yet (measured_peaks measures it)."""
    entry = device_entry(device, cache_dir)
    key = dtype_key(dtype, matmul_precision)
    if key not in entry.get("matmul_flops_per_s", {}) or "bandwidth" not in entry:
        return None
    with timing.precision_context(matmul_precision):
        now = quick_peaks(device, dtype)
    cached = {
        "matmul_flops_per_s": entry["matmul_flops_per_s"][key],
        "read_bytes_per_s": entry["bandwidth"]["read_bytes_per_s"],
    }
    ratios = {k: now[k] / cached[k] for k in cached}
    out = {
        "cached": cached,
        "now": now,
        "tolerance": CHECK_TOLERANCE,
        "measured_at": entry.get("measured_at"),
    }
    if any(r > 1 + CHECK_TOLERANCE for r in ratios.values()):
        logging.warning("peaks cache for %s reads below this machine now %s: measuring again",
                        _device_key(device), ratios)  # fmt: skip
        for table in PER_SHAPE_TABLES:
            entry.pop(table, None)
        _save(cache_path(cache_dir), {}, _device_key(device), {
            k: v for k, v in entry.items()
            if k in ("collectives", "last_level_cache_bytes", "last_level_cache_source")
        })  # fmt: skip
        out["verdict"] = "re-measured"
    elif any(r < 1 / (1 + CHECK_TOLERANCE) for r in ratios.values()):
        out["verdict"] = "kept: the device is slower now than when they were measured"
    else:
        out["verdict"] = "agreed"
    return out


def peaks_of(entry: dict[str, Any], platform: str, device_kind: str) -> MeasuredPeaks:
    """The MeasuredPeaks a cache entry (or a workdir's device_peaks.json entry) holds."""
    bw = entry["bandwidth"]
    return MeasuredPeaks(
        device_kind=device_kind,
        platform=platform,
        matmul_flops_per_s=dict(entry.get("matmul_flops_per_s", {})),
        bandwidth_bytes_per_s=max(bw["read_bytes_per_s"], bw["copy_bytes_per_s"]),
        dispatch_floor_s=entry["dispatch_floor_s"],
        kernel_overhead_s=entry["kernel_overhead_s"],
        details=entry,
        cache_bandwidth_bytes_per_s=entry["cache_bandwidth_bytes_per_s"],
    )


def gemm_flops(
    device: jax.Device,
    dtype: str,
    shape: tuple[int, ...],
    cache_dir: str,
    cold: bool = False,
    matmul_precision: str = "default",
    budget: Budget | None = None,
) -> float | None:
    """Measured FLOP/s of one GEMM shape (m, k, n), or of a batched one (batch, m, k, n),
    warm or with cold weights, cached; None when it is not cached and `budget` is spent."""
    return cached_measurement(
        device,
        cache_dir,
        "gemm_flops_per_s",
        gemm_key(dtype_key(dtype, matmul_precision), shape, cold),
        lambda entry: measure_gemm_flops(
            device,
            dtype,
            *shape[-3:],
            dispatch_floor_s=entry.get("dispatch_floor_s", 0.0),
            cold=cold,
            batch=shape[0] if len(shape) == 4 else 1,
            kernel_overhead_s=entry.get("kernel_overhead_s", 0.0),
        ),
        matmul_precision=matmul_precision,
        budget=budget,
    )


def gemm_key(dkey: str, shape: tuple[int, ...], cold: bool) -> str:
    """ "float32:1024x1024x1024:warm", or "float32:8@64x512x512:cold" for 8 batched products."""
    batch, (m, k, n) = (1, shape) if len(shape) == 3 else (shape[0], shape[1:])
    prefix = f"{batch}@" if batch > 1 else ""
    return f"{dkey}:{prefix}{m}x{k}x{n}" + (":cold" if cold else ":warm")


def conv_key(dkey: str, shape: tuple[int, ...]) -> str:
    """ "float32:16x56x56x64x64x3x1": a conv at the batch it is measured at
    (conv_measured_batch)."""
    return f"{dkey}:{_dims((conv_measured_batch(shape), *shape[1:]))}"


def attention_key(dkey: str, layout: str, shape: tuple[int, ...]) -> str:
    """ "float32:bksh:8x4x1024x3x64": (batch, kv_heads, cache_len, q_per_kv, head_dim)."""
    return f"{dkey}:{layout}:{_dims(shape)}"


def lone_key(dkey: str, kind: str, shape: tuple[int, ...]) -> str:
    """ "gemm:float32:2x64x64"."""
    return f"{kind}:{dkey}:{_dims(shape)}"


def _dims(shape: tuple[int, ...]) -> str:
    """A shape as a cache key part: (2, 64, 64) -> "2x64x64"."""
    return "x".join(str(int(n)) for n in shape)


def device_entry(device: jax.Device, cache_dir: str) -> dict[str, Any]:
    """What the peaks cache holds for `device` (a copy; empty if nothing)."""
    return dict(_load(cache_path(cache_dir)).get(_device_key(device), {}))


def cached_measurement(
    device: jax.Device,
    cache_dir: str,
    table: str,
    name: str,
    measure: Callable[[dict[str, Any]], Any],
    refresh: bool = False,
    matmul_precision: str = "default",
    budget: Budget | None = None,
) -> Any:
    """Item `name` of the device's `table` in the peaks cache, `measure(entry)` (under
    `matmul_precision`) only when it is missing (or `refresh`), then saved; `entry` is the
    device's cached peaks (its dispatch floor and kernel overhead, which the per-shape
    microbenchmarks take off). A missing item with `budget` spent is None, not measured; the
    seconds a measurement takes are charged to `budget`."""
    entry = device_entry(device, cache_dir)
    values = dict(entry.get(table, {}))
    if refresh or name not in values:
        if budget is not None and budget.exhausted:
            budget.refused += 1
            return None
        start = time.perf_counter()
        with timing.precision_context(matmul_precision):
            values[name] = measure(entry)
        if budget is not None:
            budget.spent_s += time.perf_counter() - start
        entry = device_entry(device, cache_dir)  # others may have added items meanwhile
        entry[table] = {**entry.get(table, {}), name: values[name]}
        _save(cache_path(cache_dir), {}, _device_key(device), entry)
    return values[name]


# Per-shape tables, and how their keys vary along the swept dimension (a GEMM's m, a conv's or
# an attention's batch): the key's text before and after that number, and whether the value
# is a rate (FLOP/s, grows with the work) or seconds.
_SWEPT = {
    "gemm_flops_per_s": (r"(?P<pre>[^:]+:(?:\d+@)?)(?P<x>\d+)(?P<post>(?:x\d+){2}:\w+)", True),
    "conv_flops_per_s": (r"(?P<pre>[^:]+:)(?P<x>\d+)(?P<post>(?:x\d+){6})", True),
    "attention_s": (r"(?P<pre>[^:]+:[^:]+:)(?P<x>\d+)(?P<post>(?:x\d+){4})", False),
}


def interpolate(entry: dict[str, Any], table: str, name: str) -> float | None:
    """An unmeasured per-shape item from the measured items of the same family (the same key
    but for the swept dimension x): the rate (x / seconds for attention) interpolated
    linearly in log rate over log x between the nearest measured x on each side, and held at
    the nearest measured one beyond them. None when the family has no measured item."""
    pattern, is_rate = _SWEPT[table]
    match = re.fullmatch(pattern, name)
    if match is None:
        return None
    known = []
    for other, value in entry.get(table, {}).items():
        m = re.fullmatch(pattern, other)
        if m and m["pre"] == match["pre"] and m["post"] == match["post"] and value:
            x = float(m["x"])
            known.append((x, float(value) if is_rate else x / float(value)))
    if not known:
        return None
    known.sort()
    xs, rates = np.log([k[0] for k in known]), np.log([k[1] for k in known])
    x = float(match["x"])
    rate = float(np.exp(np.interp(np.log(x), xs, rates)))
    return rate if is_rate else x / rate


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
