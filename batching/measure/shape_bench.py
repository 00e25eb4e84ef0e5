"""Microbenchmarks at an op's own shape.

- A GEMM, batched or not, with warm or cold weights.
- A convolution with its epilogue.
- A small op run alone.
- A decode step's attention over its cache.

Each is timed as the model runs it. The call's fixed costs are taken off.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from batching.measure import microbench, timing
from batching.workloads import ops

# A sweep measures one GEMM shape per batch size: each is kept short, for a short cold start.
GEMM_SETTINGS = timing.TimingSettings(
    warmup_runs=1, warmup_s=0.0, min_runs=5, max_runs=1000, budget_s=0.12
)


# A warm GEMM microbenchmark repeats a small product in one call up to this many FLOPs.
WARM_CALL_FLOPS = 1e8
# A cold one overflows the last-level cache with weights, but stops at this many FLOPs per
# call: beyond it the product is compute-bound, and the weights' source no longer shows.
COLD_CALL_FLOPS = 4e9


# The last weight set measure_gemm_flops made: a sweep measures one GEMM shape per batch
# size against the same [k, n] weights, so they are made once (up to 64 × k·n values).
_WEIGHTS: dict[tuple[Any, ...], list[jax.Array]] = {}


def _gemm_weights(
    device: jax.Device, dtype: str, shape: tuple[int, ...], copies: int
) -> list[jax.Array]:
    """`copies` distinct weights of `shape` on `device`.

    The i-th is filled with (i + 1) / k. They are reused from the previous call for the same
    device, dtype and shape.
    """
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
    """Seconds of one of `copies` instances of an op timed together in a call of `t` seconds.

    The call's dispatch floor comes off, then each instance's launch. Neither step leaves less
    than 5%. A floor measured on a noisier call must not leave nothing.
    """
    each = max(t - dispatch_floor_s, 0.05 * t) / copies
    return max(each - kernel_overhead_s, 0.05 * each)


def _products(a: jax.Array, bs: tuple[jax.Array, ...], chain: bool):
    """a @ b for every b in `bs`.

    With `chain`, each product feeds the next, as a stack of square layers runs. Independent
    products could overlap and look faster than they run. Without it, each product takes `a`.
    Every output is kept, so none can be merged.
    """
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

    With `batch` > 1 it times a batched product [batch, m, k] × [batch, k, n] in one kernel. An
    einsum over experts or routing groups runs that way. FLOPs count over the whole batch.

    Inside a model the product is one kernel among many. It pays no dispatch of its own. The
    roofline adds its launch (`kernel_overhead_s`) separately. So one call runs the product
    against several distinct [k, n] weights, at most 64. Every output is kept, so none can be
    merged. With warm weights and k == n the products are chained, each feeding the next. The
    call's dispatch floor and one launch per product are taken off.

    - With `cold`, there are enough weights to overflow the last-level cache twice. Every weight
      then comes from DRAM, as in a model whose weights exceed the cache. A product heavy enough
      to pass COLD_CALL_FLOPS per call gets fewer copies. It is compute-bound wherever its
      weights are.
    - Warm, there are enough copies to reach WARM_CALL_FLOPS. All of them fit a quarter of the
      cache. A tiny product alone would be all dispatch noise.
    """
    item = jnp.dtype(dtype).itemsize
    weight_bytes = batch * k * n * item
    llc = microbench.last_level_cache_bytes(device)
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

    t = microbench._median_time(
        lambda a, *bs: _products(a, bs, chain=k == n and not cold), (a, *bs), GEMM_SETTINGS
    )
    return 2.0 * batch * m * k * n / _per_instance(t, copies, dispatch_floor_s, kernel_overhead_s)


def measure_ragged_flops(
    device: jax.Device,
    dtype: str,
    shape: tuple[int, ...],
    dispatch_floor_s: float = 0.0,
    kernel_overhead_s: float = 0.0,
    cold: bool = False,
) -> float:
    """FLOP/s of the rows routed through a grouped product of shape (groups, m, k, n).

    It runs jax.lax.ragged_dot of m rows, split evenly over the groups. Each group multiplies
    its own [k, n] weights. FLOPs count as 2·m·k·n. What the backend really computes sets the
    rate. XLA:CPU rewrites a ragged dot into dense dots over every group. Its cost analysis and
    time both grow with the groups. A GPU runs a grouped GEMM.

    One call runs several distinct weight sets, at most 16. Every output is kept. The call's
    fixed costs are taken off. Warm or `cold` weights are chosen as in measure_gemm_flops. Cold
    means enough sets to overflow the last-level cache twice. A model whose experts exceed the
    cache reads every set from DRAM in the same way.
    """
    groups, m, k, n = shape
    item = jnp.dtype(dtype).itemsize
    llc = microbench.last_level_cache_bytes(device)
    weight_bytes = groups * k * n * item
    if cold:
        copies = max(2, min(16, -(-2 * llc // weight_bytes)))
        # XLA:CPU computes every group's product: cap the call as a cold GEMM's is.
        copies = min(copies, max(2, -(-int(COLD_CALL_FLOPS) // (2 * groups * m * k * n))))
    else:
        wanted = -(-int(WARM_CALL_FLOPS) // (2 * m * k * n))
        copies = max(1, min(16, wanted, llc // 4 // weight_bytes))
    x = jax.device_put(jnp.ones((m, k), jnp.dtype(dtype)), device)
    sizes = jax.device_put(
        jnp.asarray([m // groups + (g < m % groups) for g in range(groups)], jnp.int32), device
    )
    ws = _gemm_weights(device, dtype, (groups, k, n), copies)

    def products(x, sizes, *ws):
        return tuple(jax.lax.ragged_dot(x, w, sizes) for w in ws)

    t = microbench._median_time(products, (x, sizes, *ws), GEMM_SETTINGS)
    return 2.0 * m * k * n / _per_instance(t, copies, dispatch_floor_s, kernel_overhead_s)


# Above this many FLOPs a convolution runs at its saturated rate: a larger batch of the same
# layer is measured at the batch that reaches it (keeps a cold start short, ResNet50 at batch
# 64 would otherwise cost minutes of microbenchmarks).
CONV_SATURATION_FLOPS = 2e9
CONV_SETTINGS = timing.TimingSettings(
    warmup_runs=1, warmup_s=0.0, min_runs=3, max_runs=1000, budget_s=0.3
)


def conv_dims(shape: tuple[int, ...]) -> tuple[int, ...]:
    """(B, H, W, Cin, Cout, k, stride, groups) of a conv shape; groups is 1 when left out."""
    return (*shape, 1) if len(shape) == 7 else tuple(shape)


def conv_flops_of(shape: tuple[int, ...]) -> float:
    """FLOPs of a conv at shape (B, H, W, Cin, Cout, k, stride[, groups]), 2 per MAC.

    Padding is (k - 1) // 2. This is models.resnet's count. Each output feature of a
    grouped conv reads Cin / groups input features.
    """
    B, H, W, cin, cout, k, stride, groups = conv_dims(shape)
    pad = (k - 1) // 2
    ho, wo = (H + 2 * pad - k) // stride + 1, (W + 2 * pad - k) // stride + 1
    return 2.0 * B * ho * wo * cout * k * k * (cin // groups)


def conv_measured_batch(shape: tuple[int, ...]) -> int:
    """The batch a conv at `shape` is measured at.

    It is the smallest power of two whose FLOPs reach CONV_SATURATION_FLOPS. The conv's own
    batch is used where that is smaller.
    """
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
    """`copies` convs at shape (B, H, W, Cin, Cout, k, stride[, groups]), distinct weights.

    Each has its BatchNorm (inference: a per-channel scale and shift) and ReLU. Every output is
    kept. Returns the function and its arguments, on `device`.
    """
    B, H, W, cin, cout, k, stride, groups = conv_dims(shape)
    dt = jnp.dtype(dtype)
    pad = (k - 1) // 2
    x = jax.device_put(jnp.ones((B, H, W, cin), dt), device)
    ws = [
        jax.device_put(jnp.full((k, k, cin // groups, cout), 0.01 * (i + 1), dt), device)
        for i in range(copies)
    ]
    scale = jax.device_put(jnp.ones((cout,), dt), device)
    shift = jax.device_put(jnp.zeros((cout,), dt), device)

    def conv_bn_relu(x, scale, shift, *ws):
        outs = []
        for w in ws:
            y = jax.lax.conv_general_dilated(
                x, w, (stride, stride), ((pad, pad),) * 2, dimension_numbers=NHWC,
                feature_group_count=groups,
            )  # fmt: skip
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
    """FLOP/s of one NHWC convolution at shape (B, H, W, Cin, Cout, k, stride).

    The conv runs as models.resnet runs it. It is lax.conv_general_dilated with an "HWIO" kernel
    and (k - 1) // 2 padding. Its BatchNorm (inference: a per-channel scale and shift) and ReLU
    follow. This epilogue is timed with the conv. So its cost counts whether the backend fuses
    it or not.

    Weights stay warm between calls. The roofline adds DRAM weight reads through the op's bytes.
    As for a warm GEMM, a small conv runs several times in one call. It runs up to
    WARM_CALL_FLOPS, at most 16 times. Each copy has distinct weights, and every output is kept.
    The dispatch floor and one launch per conv are taken off.
    """
    copies = max(1, min(16, -(-int(WARM_CALL_FLOPS) // int(conv_flops_of(shape)))))
    fn, args = _conv_program(device, dtype, shape, copies)
    t = microbench._median_time(fn, args, CONV_SETTINGS)
    return conv_flops_of(shape) / _per_instance(t, copies, dispatch_floor_s, kernel_overhead_s)


# A call that runs a small op alone is short: it is timed over hundreds of calls for a stable
# median, since its distribution can be bimodal (a worker thread awake or not).
LONE_SETTINGS = timing.TimingSettings(
    warmup_runs=5, warmup_s=0.0, min_runs=30, max_runs=5000, target_rel_ci=0.02, budget_s=0.05
)


def _lone_program(
    device: jax.Device, dtype: str, kind: str, shape: tuple[int, ...], copies: int
) -> tuple[Callable[..., Any], tuple[jax.Array, ...]]:
    """`copies` instances of an op in one program, one after another.

    They are chained where the op maps its output shape to its input shape. Each then feeds the
    next, as layers do. Otherwise each takes the same input with distinct weights. A program
    this short runs its kernels in order. Returns the function and its arguments.
    """
    if kind == "conv":
        B, H, W, cin, cout, k, stride, groups = conv_dims(shape)
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
    """Seconds of a call running one instance of an op, and of one running ops.LONE_COPIES.

    Returns [one, many]. Each is the median of back-to-back jitted calls, as the sweep times a
    point. The trivial call's dispatch floor is taken off both.

    The chained microbenchmarks (measure_gemm_flops, measure_conv_flops) run many instances in
    one call. They divide the call's time among them. Some costs a call pays once, whatever its
    kernels do. It may hand the program to a worker thread. It may wake the intra-op thread
    pool. A library kernel such as XLA:CPU's YNNPACK fusion forks onto that pool. Those costs
    are spread thin there and vanish.

    Here they stay. (many − one) / (LONE_COPIES − 1) is what one more instance costs in a call.
    That includes its launch. One minus that is what the call paid once for it
    (pricing.call_extra). The copies keep their weights in the cache, as a small model's layers
    do.

    Shapes:

    - gemm and moe_dispatch_combine: (m, k, n) or (batch, m, k, n).
    - conv: (B, H, W, Cin, Cout, k, stride[, groups]). It runs with its BatchNorm and ReLU,
      as in measure_conv_flops.
    """
    out = []
    for copies in (1, ops.LONE_COPIES):
        fn, args = _lone_program(device, dtype, kind, shape, copies)
        out.append(max(microbench._median_time(fn, args, LONE_SETTINGS) - dispatch_floor_s, 0.0))
    return out


def measure_attention_seconds(
    device: jax.Device,
    dtype: str,
    layout: str,
    shape: tuple[int, int, int, int, int],
    attend: Callable[..., jax.Array],
    dispatch_floor_s: float = 0.0,
) -> float:
    """Seconds of one layer's decode attention at `shape`, over a cache in `layout` and `dtype`.

    `shape` is (batch, kv_heads, cache_len, q_per_kv, head_dim). `attend(q_BxKxQxH, k, v,
    lengths_B, layout)` is the model's own attention. The workload hands it in (the decoder's
    `models.kv_cache.attend_cache`). So the lab times what the model runs without importing it.

    Attention over a cache is neither a weight GEMM nor a plain streaming read. It has skinny
    products with a softmax between them. So it is timed as it runs. The cache is cold, as in a
    decode step. There every layer's weights pass through the last-level cache between two
    attentions. One call attends over enough distinct caches to overflow it twice. The time per
    cache is returned, with the call's dispatch floor taken off.
    """
    B, K, S, G, H = shape
    dt = jnp.dtype(dtype)
    kv_shape = (B * K, S, H) if layout == "bksh" else (B, S, K, H)
    kv_bytes = 2 * B * K * S * H * dt.itemsize
    copies = max(1, min(64, -(-2 * microbench.last_level_cache_bytes(device) // kv_bytes)))
    q = jax.device_put(jnp.ones((B, K, G, H), dt), device)
    lengths = jax.device_put(jnp.full((B,), S, jnp.int32), device)
    kvs = [
        jax.device_put(jnp.full(kv_shape, 1 + i / copies, dt), device) for i in range(2 * copies)
    ]

    def attend_all(q, lengths, *kvs):
        # Every output is kept (summed), so no attention can be skipped.
        outs = [attend(q, kvs[i], kvs[i + 1], lengths, layout) for i in range(0, len(kvs), 2)]
        return sum(outs)

    t = microbench._median_time(attend_all, (q, lengths, *kvs), GEMM_SETTINGS)
    return _per_instance(t, copies, dispatch_floor_s)
