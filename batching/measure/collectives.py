"""What a mesh's collectives reach: microbenchmarks of its bus bandwidths, cached.

The microbenchmarks time `jax.lax.psum` and `jax.lax.all_to_all` under `shard_map`. Each runs
over one axis of the run's mesh. The lab's timer times them (batching.measure.timing), as it
times the peaks. The results go to the peaks cache file, as bus bandwidths. Their key is the
device kind, collective, axis size and payload bytes. A bus bandwidth is payload / time · bus
factor (batching.workloads.collectives).

Two payloads, 4 KiB and 4 MiB, fix a latency-bandwidth model. It is t(S) = α + S/β (Hockney). A
call's small collectives then pay their latency (`effective_busbw`). An axis of one device has
no collective. Nothing is measured there.
"""

import time
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from batching.measure import peaks_cache, timing
from batching.workloads.collectives import bus_factor

# What the microbenchmarks time (all-gather is costed, not measured).
MEASURED = ("all_reduce", "all_to_all")
# Large enough that the link, not the launch, sets the time; small enough for a 2-core CPU.
DEFAULT_PAYLOAD_BYTES = 4 << 20
# Small enough that the latency sets the time: with the large one, fixes t(S) = α + S/β.
SMALL_PAYLOAD_BYTES = 4 << 10

SETTINGS = timing.TimingSettings(
    warmup_runs=2, warmup_s=0.0, min_runs=5, max_runs=200, target_rel_ci=0.05, budget_s=0.5
)
# Across processes every one must run the same number of collectives, or one waits forever
# for a partner that stopped: a fixed count, no adaptive stop.
LOCKSTEP = timing.TimingSettings(
    warmup_runs=2, warmup_s=0.0, min_runs=10, max_runs=10, target_rel_ci=0.05, budget_s=1e9
)


# ---------------------------------------------------------------- microbenchmarks


def _program(mesh: Mesh, axis: str, kind: str):
    """The collective over `axis` as a shard_map, and the sharding of its input.

    Every device holds one [rows, 128] float32 block. `kind` is "all_reduce" or "all_to_all".
    """
    spec = PartitionSpec(axis)

    if kind == "all_reduce":

        def body(x):
            return jax.lax.psum(x, axis)
    elif kind == "all_to_all":

        def body(x):
            # Split the block into n row chunks, send chunk i to device i.
            return jax.lax.all_to_all(x, axis, split_axis=0, concat_axis=0, tiled=True)
    else:
        raise ValueError(f"collective kind to measure must be one of {MEASURED}, got {kind!r}")
    mapped = jax.shard_map(body, mesh=mesh, in_specs=spec, out_specs=spec)
    return mapped, NamedSharding(mesh, spec)


def measure(mesh: Mesh, axis: str, kind: str, payload_bytes: int) -> dict[str, float]:
    """Times one collective of `payload_bytes` per device over `axis` of `mesh`.

    It returns four fields:

    - `seconds`: the median seconds of a call.
    - `payload_bytes`: the payload per device, rounded to whole rows.
    - `algbw_bytes_per_s`: payload / seconds.
    - `busbw_bytes_per_s`: algbw · bus factor.

    The other mesh axes run the same collective side by side. Each slice along `axis` is one
    group. So every group communicates at once, as in a sweep.
    """
    n = mesh.shape[axis]
    if n < 2:
        raise ValueError(f"mesh axis {axis!r} has {n} device: no collective to measure")
    # Rows divisible by n (the all-to-all splits them), 128 float32 each.
    rows = max(n, (payload_bytes // (4 * 128)) // n * n)
    payload = rows * 128 * 4
    fn, sharding = _program(mesh, axis, kind)
    x = jax.device_put(np.ones((n * rows, 128), np.float32), sharding)
    compiled = timing.compile_fn(fn, (x,))
    m = timing.measure(compiled.call, (x,), SETTINGS if jax.process_count() == 1 else LOCKSTEP)
    seconds = float(np.median(m.samples_s))
    algbw = payload / seconds
    return {
        "seconds": seconds,
        "payload_bytes": float(payload),
        "algbw_bytes_per_s": algbw,
        "busbw_bytes_per_s": algbw * bus_factor(kind, n),
    }


def _name(kind: str, axis_size: int, payload_bytes: int) -> str:
    name = f"{kind}:n{axis_size}:{int(payload_bytes)}B"
    # Across hosts a collective crosses the network, not the links inside one box.
    return name + (f":p{jax.process_count()}" if jax.process_count() > 1 else "")


def bandwidth(
    mesh: Mesh,
    axis: str,
    kind: str,
    cache_dir: str,
    payload_bytes: int = DEFAULT_PAYLOAD_BYTES,
    refresh: bool = False,
) -> dict[str, float] | None:
    """`measure` of one collective, axis size and payload, cached.

    The cache is the peaks file, under the device's key. `refresh` measures it again. It is None
    on an axis of one device.
    """
    n = mesh.shape[axis]
    if n < 2:
        return None
    return peaks_cache.cached_measurement(
        mesh.devices.flat[0],
        cache_dir,
        "collectives",
        _name(kind, n, payload_bytes),
        lambda entry: {**measure(mesh, axis, kind, payload_bytes), "measured_at": time.time()},
        refresh,
    )


def mesh_bandwidths(
    mesh: Mesh, cache_dir: str, payload_bytes: int = DEFAULT_PAYLOAD_BYTES, refresh: bool = False
) -> dict[str, dict[str, dict[str, float]]]:
    """Measured bus bandwidths of every axis of more than one device.

    The result is {axis: {kind: bandwidth's result}}.
    """
    out = {}
    for axis, n in mesh.shape.items():
        if n > 1:
            out[axis] = {
                kind: bandwidth(mesh, axis, kind, cache_dir, payload_bytes, refresh)
                for kind in MEASURED
            }
    return out


def measured_kind(kind: str) -> str:
    """The microbenchmark that stands for `kind`.

    An all-gather is not measured. It takes the all-reduce's bandwidth. A ring all-reduce is a
    reduce-scatter and an all-gather. Each runs at the same bus bandwidth (nccl-tests).
    """
    return kind if kind in MEASURED else "all_reduce"


def measure_run(mesh: Mesh, cache_dir: str) -> None:
    """Measures everything the analysis of a run on `mesh` looks up.

    That is every axis of more than one device and every measured collective. Each is measured
    at the small and the large payload (`latency_model`).

    It runs during the sweep. There every process runs the same collectives in the same order. A
    collective that only process 0 entered would wait forever. The analysis only reads.
    """
    # Each host has its own cache file: one host skipping a measurement it has cached while
    # another runs it would hang both, so with several processes every one measures.
    refresh = jax.process_count() > 1
    for payload in (SMALL_PAYLOAD_BYTES, DEFAULT_PAYLOAD_BYTES):
        mesh_bandwidths(mesh, cache_dir, payload, refresh)


def lookup(
    device: jax.Device, kind: str, axis_size: int, payload_bytes: int, cache_dir: str
) -> dict[str, float] | None:
    """A cached measurement of `kind` over `axis_size` devices at `payload_bytes`.

    It is `bandwidth`'s result for those arguments. It is None if it was never measured.
    """
    table = peaks_cache.device_entry(device, cache_dir).get("collectives", {})
    return table.get(_name(measured_kind(kind), axis_size, payload_bytes))


def latency_model(
    device: jax.Device, kind: str, axis_size: int, cache_dir: str
) -> tuple[float, float] | None:
    """(α seconds, β bytes/s) of t(S) = α + S/β for `kind` over `axis_size` devices.

    S is the payload per device. This is Hockney's latency-bandwidth model. It goes through the
    two cached measurements (SMALL_PAYLOAD_BYTES, DEFAULT_PAYLOAD_BYTES). It is None if either
    is missing. A small message pays the latency α. A large-message bandwidth alone would hide
    it.
    """
    small = lookup(device, kind, axis_size, SMALL_PAYLOAD_BYTES, cache_dir)
    large = lookup(device, kind, axis_size, DEFAULT_PAYLOAD_BYTES, cache_dir)
    if not small or not large:
        return None
    dt = large["seconds"] - small["seconds"]
    if dt <= 0:  # noise swamped the slope: all latency at this scale, the large rate as β
        return max(small["seconds"], 0.0), large["algbw_bytes_per_s"]
    beta = (large["payload_bytes"] - small["payload_bytes"]) / dt
    alpha = max(small["seconds"] - small["payload_bytes"] / beta, 0.0)
    return alpha, beta


def effective_busbw(device: jax.Device, c: dict[str, Any], cache_dir: str) -> float | None:
    """The bus bandwidth that a collectives entry `c` reaches at its own payload.

    It follows `latency_model`: bytes·factor / (α + bytes/β). It is None where the mesh was not
    measured.
    """
    model = latency_model(device, c["kind"], c["axis_size"], cache_dir)
    if model is None:
        return None
    alpha, beta = model
    return c["bytes"] * bus_factor(c["kind"], c["axis_size"]) / (alpha + c["bytes"] / beta)
