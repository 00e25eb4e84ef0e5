"""The KV cache an attention layer owns during inference (MaxText style).

The module also holds decode attention over that cache.

Letters in array names (models/__init__.py):

- B batch, L prompt length, S cache slots per sequence (max_len).
- K kv heads, Q query heads per kv head, H head dim.
- R rows of the merged B·K axis.

The cache has two layouts. MaxText makes the axis order a knob too (`ar_cache_axis_order`).
The layout decides whether decode attention streams the cache or copies it.

- "bksh": [B, K, S, H], stored as [B·K, S, H]. Each (sequence, kv head) owns one
  contiguous [S, H] slab. The scores k·qᵀ and the sum pᵀ·v are batched products over
  (B, K). They read every slab once, in place.
- "bskh": [B, S, K, H], the order the projections produce. The (B, K) batch axes are not
  leading. XLA then transposes the cache into a temporary before each product.

`experiments/attention_layouts.py` times both layouts.

`update` picks one of two ways to write a decode step's new keys and values.

- "scatter": one vmapped `dynamic_update_slice`, one kernel.
- "loop": a `fori_loop` of per-sequence slices. It also runs in place. XLA's cost analysis
  then counts only the rows written. For a scatter, the fusion counts the whole cache.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from models import partitioning

LAYOUTS = ("bksh", "bskh")
UPDATES = ("scatter", "loop")


def _write_bskh(cache_SxKxH: jax.Array, new_KxH: jax.Array, position: jax.Array) -> jax.Array:
    return jax.lax.dynamic_update_slice(cache_SxKxH, new_KxH[None], (position, 0, 0))


def _write_bksh(cache_KxSxH: jax.Array, new_KxH: jax.Array, position: jax.Array) -> jax.Array:
    return jax.lax.dynamic_update_slice(cache_KxSxH, new_KxH[:, None], (0, position, 0))


def write_positions(
    cache: jax.Array,
    new_BxKxH: jax.Array,
    positions_B: jax.Array,
    layout: str,
    update: str = "scatter",
) -> jax.Array:
    """`cache` with new_BxKxH[b] written at position positions_B[b] of sequence b.

    `cache` is stored as KVCache stores `layout`. Only the first B sequences change. The
    write runs in place on a donated buffer. `update` picks a scatter or a loop, as the
    module docstring describes. Both write the same values.
    """
    batch, K, _ = new_BxKxH.shape
    if update == "loop" and batch > 1:

        def write_one(b, cache):
            if layout == "bksh":  # [B·K, S, H]: sequence b owns rows b·K .. b·K + K - 1
                start = (b * K, positions_B[b], 0)
                return jax.lax.dynamic_update_slice(cache, new_BxKxH[b][:, None], start)
            start = (b, positions_B[b], 0, 0)
            return jax.lax.dynamic_update_slice(cache, new_BxKxH[b][None, None], start)

        return jax.lax.fori_loop(0, batch, write_one, cache)
    if layout == "bksh":
        if batch == 1:
            return jax.lax.dynamic_update_slice(
                cache, new_BxKxH[0][:, None], (0, positions_B[0], 0)
            )
        S, H = cache.shape[1:]
        written = jax.vmap(_write_bksh)(
            cache[: batch * K].reshape(batch, K, S, H), new_BxKxH, positions_B
        ).reshape(batch * K, S, H)
    else:
        written = jax.vmap(_write_bskh)(cache[:batch], new_BxKxH, positions_B)
    if written.shape == cache.shape:
        return written
    return jax.lax.dynamic_update_slice(cache, written, (0,) * cache.ndim)


def attend_cache(
    q_BxKxQxH: jax.Array, k: jax.Array, v: jax.Array, lengths_B: jax.Array, layout: str
) -> jax.Array:
    """One query per sequence over its cache: slots s < lengths_B[b] are attended.

    `k` and `v` hold the first B sequences as KVCache stores `layout`. That is [B·K, S, H]
    for "bksh" and [B, S, K, H] for "bskh". The Q query heads q_BxKxQxH[:, k] all read kv
    head k. So the keys and values are never repeated. Scores and softmax are float32.
    Returns out_BxKxQxH (float32).
    """
    B, K, Q, H = q_BxKxQxH.shape
    q_BxKxQxH = (q_BxKxQxH / math.sqrt(H)).astype(k.dtype)
    S = k.shape[1]
    valid_BxS = jnp.arange(S) < lengths_B[:, None]
    if layout == "bksh":
        # Scores as k·qᵀ, one [S, H] x [H, Q] product per (sequence, kv head) row block r: the
        # cache is the left operand and each slab streams once.
        q_RxQxH = q_BxKxQxH.reshape(B * K, Q, H)
        scores_RxSxQ = jnp.einsum("rsh,rqh->rsq", k, q_RxQxH, preferred_element_type=jnp.float32)
        valid_RxS = jnp.repeat(valid_BxS, K, axis=0)
        scores_RxSxQ = jnp.where(valid_RxS[:, :, None], scores_RxSxQ, jnp.finfo(jnp.float32).min)
        probs_RxSxQ = jax.nn.softmax(scores_RxSxQ, axis=1).astype(v.dtype)
        out_RxQxH = jnp.einsum("rsq,rsh->rqh", probs_RxSxQ, v, preferred_element_type=jnp.float32)
        return out_RxQxH.reshape(B, K, Q, H)
    if layout == "bskh":
        scores_BxKxQxS = jnp.einsum(
            "bkqh,bskh->bkqs", q_BxKxQxH, k, preferred_element_type=jnp.float32
        )
        scores_BxKxQxS = jnp.where(
            valid_BxS[:, None, None], scores_BxKxQxS, jnp.finfo(jnp.float32).min
        )
        probs_BxKxQxS = jax.nn.softmax(scores_BxKxQxS, axis=-1).astype(v.dtype)
        return jnp.einsum("bkqs,bskh->bkqh", probs_BxKxQxS, v, preferred_element_type=jnp.float32)
    raise ValueError(f"cache layout must be one of {LAYOUTS}, got {layout!r}")


# Logical axes of the stored k and v: "bskh" splits over sequences and kv heads; "bksh"'s
# merged B·K axis is sequence-major, so it can be split over sequences only (never by head).
CACHE_AXES = {"bksh": ("batch", None, None), "bskh": ("batch", None, "kv_heads", None)}


class KVCache(nnx.Module):
    """Keys and values of one attention layer for `batch` sequences of up to `max_len` tokens.

    The layout sets the shape of `k` and `v`:

    - "bskh": [batch, max_len, n_kv_heads, head_dim].
    - "bksh": [batch * n_kv_heads, max_len, head_dim], which is [B, K, S, H] in memory. B
      and K are merged so that no axis has size 1 at batch 1. XLA drops a size-1 batch axis
      of a product, with a bitcast it cannot fuse in place. It then copies the cache every
      step.

    The cache stores the K kv heads, never repeated to the N query heads. `lengths[b]`
    (int32) counts the positions of sequence b that hold real tokens. Shapes never change.
    So a jitted decode step compiles once per (batch, max_len). A batch smaller than `batch`
    uses the first slots.

    Positions at or past `max_len` cannot be written. Inside jit a decode step cannot raise,
    and `dynamic_update_slice` clamps the index. So the caller keeps `lengths < max_len`.
    """

    def __init__(
        self,
        batch: int,
        max_len: int,
        n_kv_heads: int,
        head_dim: int,
        dtype: jnp.dtype,
        layout: str = "bksh",
        update: str = "scatter",
    ):
        if layout not in LAYOUTS:
            raise ValueError(f"cache layout must be one of {LAYOUTS}, got {layout!r}")
        if update not in UPDATES:
            raise ValueError(f"cache update must be one of {UPDATES}, got {update!r}")
        self.layout = layout
        self.update = update
        axes = CACHE_AXES[layout]
        if layout == "bksh":
            shape = (batch * n_kv_heads, max_len, head_dim)
        else:
            shape = (batch, max_len, n_kv_heads, head_dim)
        self.k = nnx.Cache(jnp.zeros(shape, dtype), out_sharding=axes, eager_sharding=False)
        self.v = nnx.Cache(jnp.zeros(shape, dtype), out_sharding=axes, eager_sharding=False)
        self.lengths = nnx.Cache(
            jnp.zeros((batch,), jnp.int32), out_sharding=("batch",), eager_sharding=False
        )

    @property
    def batch(self) -> int:
        """Sequences the cache holds."""
        return self.lengths.shape[0]

    @property
    def max_len(self) -> int:
        """Positions per sequence."""
        return self.k.shape[1]

    def _stored(self, x_BxLxKxH: jax.Array) -> jax.Array:
        """Projection-ordered [B, L, K, H] in this cache's layout and dtype."""
        x = x_BxLxKxH.astype(self.k.dtype)
        if self.layout == "bksh":
            B, L, K, H = x.shape
            return x.transpose(0, 2, 1, 3).reshape(B * K, L, H)
        return x

    def write_prompt(
        self, k_BxLxKxH: jax.Array, v_BxLxKxH: jax.Array, lengths_B: jax.Array
    ) -> None:
        """Writes a right-padded prompt batch at positions [0, L).

        It also sets each sequence's length from lengths_B. Padding is written too. The
        length mask hides it, and decode steps overwrite it.
        """
        with jax.named_scope("kv_cache_update"):
            start = (0,) * self.k.ndim
            self.k[...] = jax.lax.dynamic_update_slice(self.k[...], self._stored(k_BxLxKxH), start)
            self.v[...] = jax.lax.dynamic_update_slice(self.v[...], self._stored(v_BxLxKxH), start)
            self.lengths[...] = jax.lax.dynamic_update_slice(
                self.lengths[...], lengths_B.astype(jnp.int32), (0,)
            )

    def write_chunk(
        self, k_BxCxKxH: jax.Array, v_BxCxKxH: jax.Array, counts_B: jax.Array
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Writes C positions per sequence from its own length; lengths advance by counts_B.

        A chunk's padding (positions past counts_B[b]) is written too: the length mask hides
        it, and the next chunk or decode step overwrites it. The caller keeps every length + C
        within max_len, as `dynamic_update_slice` clamps. Returns the whole k and v of the
        first B sequences, in the cache's layout, and each sequence's first chunk position.
        """
        batch, C, K, H = k_BxCxKxH.shape
        with jax.named_scope("kv_cache_update"):
            starts_B = self.lengths[...][:batch]

            def write(cache, new_BxCxKxH):
                new = self._stored(new_BxCxKxH)
                if self.layout == "bksh":  # [B·K, S, H] as [B, K, S, H]
                    S = cache.shape[1]
                    slabs = cache[: batch * K].reshape(batch, K, S, H)
                    put = lambda c, n, p: jax.lax.dynamic_update_slice(c, n, (0, p, 0))  # noqa: E731
                    done = jax.vmap(put)(slabs, new.reshape(batch, K, C, H), starts_B)
                    done = done.reshape(batch * K, S, H)
                else:
                    put = lambda c, n, p: jax.lax.dynamic_update_slice(c, n, (p, 0, 0))  # noqa: E731
                    done = jax.vmap(put)(cache[:batch], new, starts_B)
                return jax.lax.dynamic_update_slice(cache, done, (0,) * cache.ndim)

            self.k[...] = write(self.k[...], k_BxCxKxH)
            self.v[...] = write(self.v[...], v_BxCxKxH)
            lengths_B = starts_B + counts_B.astype(jnp.int32)
            self.lengths[...] = jax.lax.dynamic_update_slice(self.lengths[...], lengths_B, (0,))
        rows = batch * K if self.layout == "bksh" else batch
        return self.k[...][:rows], self.v[...][:rows], starts_B

    def append(
        self, k_BxKxH: jax.Array, v_BxKxH: jax.Array
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Writes one position per sequence, at that sequence's own length, and advances lengths.

        The write touches B·K·H elements of the donated buffer, in place (write_positions). The
        tests read the compiled program's aliasing to check this. Returns k and v for the first B
        sequences, in the cache's layout. It also returns the new lengths_B. Each sequence then
        attends to the positions below its new length.
        """
        batch = k_BxKxH.shape[0]
        with jax.named_scope("kv_cache_update"):
            positions_B = self.lengths[...][:batch]
            dtype = self.k.dtype

            def write(k, v, k_BxKxH, v_BxKxH, positions_B):
                return (
                    write_positions(k, k_BxKxH, positions_B, self.layout, self.update),
                    write_positions(v, v_BxKxH, positions_B, self.layout, self.update),
                )

            if batch == self.batch:
                # Each sequence's write is its own: on a mesh, each device writes its own
                # sequences (and kv heads) in place, instead of XLA gathering the cache.
                axes = CACHE_AXES[self.layout]
                new = ("batch", axes[2], None)  # kv heads split as the cache splits them
                write = partitioning.shard_local(
                    write, in_axes=[axes, axes, new, new, ("batch",)], out_axes=[axes, axes]
                )
            self.k[...], self.v[...] = write(
                self.k[...], self.v[...], k_BxKxH.astype(dtype), v_BxKxH.astype(dtype), positions_B
            )
            lengths_B = positions_B + 1
            self.lengths[...] = jax.lax.dynamic_update_slice(self.lengths[...], lengths_B, (0,))
        rows = batch * k_BxKxH.shape[1] if self.layout == "bksh" else batch
        return self.k[...][:rows], self.v[...][:rows], lengths_B
