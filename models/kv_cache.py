"""The KV cache an attention layer owns during inference (MaxText style).

Letters in array names: B batch, S cache slots per sequence (max_len), L length of a prompt,
K kv heads, H head dim.
"""

import jax
import jax.numpy as jnp
from flax import nnx


def _write_at(cache_SxKxH: jax.Array, new_KxH: jax.Array, position: jax.Array) -> jax.Array:
    return jax.lax.dynamic_update_slice(cache_SxKxH, new_KxH[None], (position, 0, 0))


class KVCache(nnx.Module):
    """Keys and values of one attention layer for `batch` sequences of up to `max_len` tokens.

    `k` and `v` are [batch, max_len, n_kv_heads, head_dim], stored before heads are repeated
    for grouped-query attention; `lengths[b]` (int32) counts the positions of sequence b that
    hold real tokens. Shapes never change, so a jitted decode step compiles once per
    (batch, max_len). A batch smaller than `batch` uses the first slots.

    Positions at or past `max_len` cannot be written: inside jit a decode step cannot raise,
    and `dynamic_update_slice` clamps the index, so the caller keeps `lengths < max_len`.
    """

    def __init__(self, batch: int, max_len: int, n_kv_heads: int, head_dim: int, dtype: jnp.dtype):
        shape = (batch, max_len, n_kv_heads, head_dim)
        self.k = nnx.Cache(jnp.zeros(shape, dtype))
        self.v = nnx.Cache(jnp.zeros(shape, dtype))
        self.lengths = nnx.Cache(jnp.zeros((batch,), jnp.int32))

    @property
    def batch(self) -> int:
        return self.k.shape[0]

    @property
    def max_len(self) -> int:
        return self.k.shape[1]

    def write_prompt(
        self, k_BxLxKxH: jax.Array, v_BxLxKxH: jax.Array, lengths_B: jax.Array
    ) -> None:
        """Writes a right-padded prompt batch at positions [0, L) and sets each sequence's length.

        Padding is written too: the length mask hides it and decode steps overwrite it.
        """
        with jax.named_scope("kv_cache_update"):
            start = (0, 0, 0, 0)
            self.k[...] = jax.lax.dynamic_update_slice(
                self.k[...], k_BxLxKxH.astype(self.k.dtype), start
            )
            self.v[...] = jax.lax.dynamic_update_slice(
                self.v[...], v_BxLxKxH.astype(self.v.dtype), start
            )
            self.lengths[...] = jax.lax.dynamic_update_slice(
                self.lengths[...], lengths_B.astype(jnp.int32), (0,)
            )

    def append(
        self, k_BxKxH: jax.Array, v_BxKxH: jax.Array
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Writes one position per sequence, at that sequence's own length, and advances lengths.

        Returns the first B slots of the updated cache, k_BxSxKxH and v_BxSxKxH, and the new
        lengths_B (each sequence attends to positions < its new length).
        """
        batch = k_BxKxH.shape[0]
        with jax.named_scope("kv_cache_update"):
            positions_B = self.lengths[...][:batch]
            k_BxSxKxH = jax.vmap(_write_at)(
                self.k[...][:batch], k_BxKxH.astype(self.k.dtype), positions_B
            )
            v_BxSxKxH = jax.vmap(_write_at)(
                self.v[...][:batch], v_BxKxH.astype(self.v.dtype), positions_B
            )
            lengths_B = positions_B + 1
            if batch == self.batch:
                self.k[...], self.v[...], self.lengths[...] = k_BxSxKxH, v_BxSxKxH, lengths_B
            else:
                self.k[...] = jax.lax.dynamic_update_slice(self.k[...], k_BxSxKxH, (0, 0, 0, 0))
                self.v[...] = jax.lax.dynamic_update_slice(self.v[...], v_BxSxKxH, (0, 0, 0, 0))
                self.lengths[...] = jax.lax.dynamic_update_slice(self.lengths[...], lengths_B, (0,))
        return k_BxSxKxH, v_BxSxKxH, lengths_B
