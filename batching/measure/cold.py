"""Cold calls: the last-level cache evicted before each timed call (timing.cache = "cold").

Calls timed back to back find the weights where the previous call left them: in the
last-level cache when they fit (an H100's 50 MB L2 holds the post's 33.6 MB MLP), so the
"memory-bound" region is then cache-bound. A cold call finds them in DRAM: before it, outside
the clock, one program reads and writes a buffer twice the cache's size on every device of
the mesh, as triton's do_bench zeroes a 256 MB buffer before each call to evict L2.
"""

from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

# Never flush with less than this (a cache figure that is too small must not spare the LLC).
MIN_FLUSH_BYTES = 16 << 20


def flush_bytes(cache_bytes: int) -> int:
    """Bytes of the buffer a flush streams through, per device: twice the cache."""
    return max(2 * int(cache_bytes), MIN_FLUSH_BYTES)


class CacheFlush:
    """Streams a per-device buffer of flush_bytes(cache_bytes) through every device of `mesh`
    (read and written in place: `x + 1`, donated) and waits for it; a call is one flush."""

    def __init__(self, mesh: jax.sharding.Mesh, cache_bytes: int):
        per_device = flush_bytes(cache_bytes) // 4
        sharding = NamedSharding(mesh, PartitionSpec(tuple(mesh.axis_names)))
        shape = (per_device * mesh.devices.size,)
        self.buffer = jax.make_array_from_callback(
            shape, sharding, lambda index: np.zeros(shape, np.uint32)[index]
        )
        self.bytes_per_device = per_device * 4
        self._step = jax.jit(lambda x: x + np.uint32(1), donate_argnums=0)
        self.calls = 0

    def __call__(self) -> None:
        self.buffer = self._step(self.buffer)
        self.buffer.block_until_ready()
        self.calls += 1


def for_run(cache: str, mesh: Any, cache_bytes: int) -> CacheFlush | None:
    """The run's flush for `timing.cache`: None when warm."""
    return CacheFlush(mesh, cache_bytes) if cache == "cold" else None
