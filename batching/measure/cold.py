"""Cold calls: the last-level cache is evicted before each timed call.

This is `timing.cache = "cold"`. Calls timed back to back find the weights where the last call
left them. Weights that fit stay in the last-level cache. An H100's 50 MB L2 holds the post's
33.6 MB MLP, for example. Its "memory-bound" region is then cache-bound. A cold call finds the
weights in DRAM instead. Before it, outside the clock, one program runs. It streams a buffer
through every device of the mesh. The buffer is twice the cache's size. The program reads and
writes it. Triton's do_bench does the same to evict L2. It zeroes a 256 MB buffer before each
call.
"""

from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

# Never flush with less than this (a cache figure that is too small must not spare the LLC).
MIN_FLUSH_BYTES = 16 << 20


def flush_bytes(cache_bytes: int) -> int:
    """Bytes per device that one flush streams through. That is twice `cache_bytes`. It is never
    less than MIN_FLUSH_BYTES.
    """
    return max(2 * int(cache_bytes), MIN_FLUSH_BYTES)


class CacheFlush:
    """Streams a buffer through every device of `mesh`, to evict its cache.

    Each device holds flush_bytes(cache_bytes) of the buffer, as uint32. A call adds one to it
    in place (donated). It then waits for the result. One call is one flush.
    """

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
    """The run's flush for `timing.cache`, or None when the run is warm."""
    return CacheFlush(mesh, cache_bytes) if cache == "cold" else None
