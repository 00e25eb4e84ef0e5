"""Device-level microbenchmarks, timed with the lab's own harness.

- The square matmul's FLOP/s.
- The streaming bandwidth, and the last-level cache's bandwidth.
- The dispatch floor of a trivial call.
- The floor of a trivial call handed a workload's own arguments.
- The cost of one more kernel in a program.
"""

from typing import Any

import jax
import jax.numpy as jnp

from batching.measure import timing
from batching.setup import specs

QUICK = timing.TimingSettings(warmup_runs=2, min_runs=5, max_runs=200, budget_s=0.5)
# A big matmul or a stream over a buffer far larger than any cache takes the same time call
# after call (tens to hundreds of ms each): three calls after one warm-up pin its median, and
# a cold start pays for every call.
STREAM_SETTINGS = timing.TimingSettings(
    warmup_runs=1, warmup_s=0.0, min_runs=3, max_runs=50, budget_s=0.3
)


def _median_time(fn, args, settings: timing.TimingSettings = QUICK, before_call=None) -> float:
    compiled = timing.compile_fn(fn, args)
    m = timing.measure(compiled.call, args, settings, before_call=before_call)
    return float(sorted(m.samples_s)[len(m.samples_s) // 2])


def _matmul_size(platform: str) -> int:
    # Large enough to reach the peak, small enough to time quickly on a 2-core CPU.
    return 2048 if platform == "cpu" else 8192


def measure_matmul_flops(device: jax.Device, dtype: str, n: int | None = None) -> float:
    """FLOP/s of an n×n by n×n product in `dtype`. A call does 2·n³ FLOPs."""
    n = n or _matmul_size(device.platform)
    a = jax.device_put(jnp.ones((n, n), jnp.dtype(dtype)), device)
    b = jax.device_put(jnp.ones((n, n), jnp.dtype(dtype)), device)
    return 2.0 * n**3 / _median_time(lambda a, b: a @ b, (a, b), STREAM_SETTINGS)


# Where no datasheet gives a device's last-level cache: larger than any GPU's L2 in the spec
# table (H100/H200 50 MB, A100 40 MB), so a model is never wrongly taken to fit it.
ASSUMED_CACHE_BYTES = 64 << 20


def last_level_cache(device: jax.Device) -> tuple[int, str]:
    """The cache that warm weights can sit in: (bytes, where the figure comes from).

    On a CPU it is the L3, read from sysfs. On an accelerator it is the L2 from the spec table
    (batching.setup.specs). That table cites a datasheet or whitepaper. Otherwise it is
    ASSUMED_CACHE_BYTES, and the source says so.
    """
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
    """Bytes of the cache that warm weights can sit in (last_level_cache)."""
    return last_level_cache(device)[0]


def _pass_seconds(body, x: jax.Array, passes: int, settings: timing.TimingSettings) -> float:
    """Seconds of one pass `body(x, c) -> scalar` over a buffer, timed inside one call.

    It times a call of `passes` passes and a call of one. Their difference over passes − 1 is
    one pass. So the call's fixed cost cancels: dispatch, launch, synchronisation. On an
    accelerator that cost can dwarf a pass over a cached buffer.
    `experiments/harness_overhead.py` measures it there (`--suite=accelerator`). The difference
    never drops below 1% of `many / passes`.

    Each pass reads the buffer scaled by the scalar the last pass returned. So XLA can neither
    merge the passes nor hoist them.
    """

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
    """Bytes/s of re-reading a buffer a quarter of the last-level cache's size.

    Warm weights and activations are read at this rate. They stay in the cache between calls.
    The buffer is at least 1 MiB. On a CPU each call reads it once: a pass costs far more than
    the call there. On an accelerator a pass is far shorter than the call's fixed cost. So
    `passes` (default 32) run inside one call, against one (_pass_seconds). A GPU's results
    README shows the gap (`experiments/results/nvidia-h200/README.md`).
    """
    buffer_bytes = buffer_bytes or max(last_level_cache_bytes(device) // 4, 1 << 20)
    x = jax.device_put(jnp.ones((buffer_bytes // 4,), jnp.float32), device)
    passes = passes or (1 if device.platform == "cpu" else 32)
    if passes == 1:
        return buffer_bytes / _median_time(lambda x: jnp.sum(x), (x,))

    def read(x, c):
        return jnp.sum(x * c)

    return buffer_bytes / _pass_seconds(read, x, passes, QUICK)


def measure_bandwidth(
    device: jax.Device,
    buffer_bytes: int | None = None,
    dispatch_floor_s: float = 0.0,
    passes: int | None = None,
) -> dict[str, float]:
    """Streaming bandwidth in bytes/s: a read (sum) and a read+write (scale) of a big buffer.

    No cache can hold the buffer. On a CPU it is 4x the last-level cache, at least 64 MiB. A 32
    MiB L3 gives 128 MiB. On an accelerator it is 2 GiB. A larger buffer gives the same rate. It
    would cost a cold start more seconds.

    A CPU reads the buffer once per call. The call's fixed cost is small against that read. On
    an accelerator it is a large share of one read. So the read is `passes` (default 8)
    dependent passes in one call, against one (_pass_seconds). That cancels the fixed cost. The
    read+write is one pass per call. Its bytes are twice the buffer's. A one-pass timing has
    `dispatch_floor_s` taken off, keeping at least half.

    Returns `read_bytes_per_s`, `copy_bytes_per_s`, `buffer_bytes` and `read_passes_per_call`.
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
    """Median seconds of a trivial jitted call (`x + 1` on 8 floats).

    It is the per-call overhead that no batch can avoid.
    """
    x = jax.device_put(jnp.ones((8,), jnp.float32), device)
    return _median_time(lambda x: x + 1.0, (x,), FLOOR_SETTINGS)


CALL_FLOOR_SETTINGS = timing.TimingSettings(
    warmup_runs=5, warmup_s=0.0, min_runs=30, max_runs=2000, target_rel_ci=0.02, budget_s=0.1
)


def measure_call_floor(args: Any, before_call=None) -> float:
    """Median seconds of a trivial jitted call that takes a workload's own arguments.

    A call's cost before any kernel runs depends on what it is handed. Flattening an nnx.State
    of many parameters is Python work on every call. One flat array costs far less.
    `experiments/harness_overhead.py` measures both floors. The roofline uses this floor for the
    workload's points. It does not use the one-array dispatch floor.

    Nothing is donated, so the arguments stay alive. `before_call` runs before each call,
    outside the clock. It is a cold run's cache flush. On a CPU a cold cache slows the runtime's
    own path too. The floor includes that.
    """

    def trivial(*args):
        return jnp.zeros((), jnp.float32)

    return _median_time(trivial, tuple(args), CALL_FLOOR_SETTINGS, before_call)


def measure_kernel_overhead(device: jax.Device, chain: int = 32) -> float:
    """Seconds each extra kernel in a program costs when it does almost no work.

    It times a chain of `chain` dependent 8x8 matmuls against a single one. XLA cannot fuse
    them. The difference per link is one kernel's launch and scheduling cost. That cost keeps
    small networks flat (overhead-bound) as the batch grows.
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


def quick_peaks(device: jax.Device, dtype: str) -> dict[str, float]:
    """The matmul peak and the streaming read bandwidth, measured again, briefly.

    It takes about a second on a CPU. The product is the same square one as the cached peak. The
    read covers a buffer that overflows the last-level cache. On a CPU that is 4x the cache, at
    least 64 MiB. On an accelerator it is 1 GiB, read as 4 passes in one call.

    Returns `matmul_flops_per_s` and `read_bytes_per_s`.
    """
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
