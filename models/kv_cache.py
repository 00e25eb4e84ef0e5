"""The KV cache an attention layer owns during inference (MaxText style), and decode attention
over it.

Letters in array names: B batch, S cache slots per sequence (max_len), L length of a prompt,
K kv heads, G query heads per kv head, H head dim.

Two layouts of the cache arrays (MaxText makes the axis order a knob too,
`ar_cache_axis_order`), because the layout decides whether the decode attention streams the
cache or copies it:

- "bksh": [B, K, S, H]. Each (sequence, kv head) owns one contiguous [S, H] slab, so the scores
  K·qᵀ and the weighted sum pᵀ·V are batched matrix products over (B, K) that read every slab
  once, in place. On a 2-core CPU one layer's decode attention (B 32, S 4096, K 4 of H 64, G 3,
  fp32, 268 MB of K and V) took 38 ms with XLA counting 325 MB.
- "bskh": [B, S, K, H], the order the projections produce. The (B, K) batch axes are not
  leading, so XLA transposes the cache into a temporary before each product: the same
  attention took 176 ms with XLA counting 862 MB (same process, machine shared).

"auto" picks per platform from DEFAULT_LAYOUT (README, "KV-cache layout").
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

LAYOUTS = ("bksh", "bskh")
# jax.default_backend() -> layout. CPU: measured (module docstring, README). GPU and TPU are
# not measured here: "bksh" is chosen because it keeps each (sequence, head) slab contiguous,
# the [batch, heads, seq, head_dim] order FlashAttention and PyTorch's
# scaled_dot_product_attention take; measure with `cache_layout` before trusting it.
DEFAULT_LAYOUT = {"cpu": "bksh", "gpu": "bksh", "tpu": "bksh"}


def resolve_layout(layout: str, platform: str) -> str:
    """`layout` itself, or for "auto" the default of `platform` (a jax backend name)."""
    if layout == "auto":
        return DEFAULT_LAYOUT.get(platform, "bksh")
    if layout not in LAYOUTS:
        raise ValueError(f"model.cache_layout must be 'auto' or one of {LAYOUTS}, got {layout!r}")
    return layout


def _write_bskh(cache_SxKxH: jax.Array, new_KxH: jax.Array, position: jax.Array) -> jax.Array:
    return jax.lax.dynamic_update_slice(cache_SxKxH, new_KxH[None], (position, 0, 0))


def _write_bksh(cache_KxSxH: jax.Array, new_KxH: jax.Array, position: jax.Array) -> jax.Array:
    return jax.lax.dynamic_update_slice(cache_KxSxH, new_KxH[:, None], (0, position, 0))


def attend_cache(
    q_BxKxGxH: jax.Array, k: jax.Array, v: jax.Array, lengths_B: jax.Array, layout: str
) -> jax.Array:
    """One query per sequence over its cache: slots s < lengths_B[b] are attended.

    `k` and `v` are in `layout` ("bksh": [B, K, S, H], "bskh": [B, S, K, H]). Query head
    (k, g) reads kv head k (grouped-query attention without repeating K/V). Scores and softmax
    are float32. Returns out_BxKxGxH.
    """
    H = q_BxKxGxH.shape[-1]
    q_BxKxGxH = (q_BxKxGxH / math.sqrt(H)).astype(k.dtype)
    s_axis = 2 if layout == "bksh" else 1
    valid_BxS = jnp.arange(k.shape[s_axis]) < lengths_B[:, None]
    if layout == "bksh":
        # Scores as K·qᵀ: the cache is the left operand with its rows (s) streaming once.
        scores_BxKxSxG = jnp.einsum(
            "bksh,bkgh->bksg", k, q_BxKxGxH, preferred_element_type=jnp.float32
        )
        scores_BxKxSxG = jnp.where(
            valid_BxS[:, None, :, None], scores_BxKxSxG, jnp.finfo(jnp.float32).min
        )
        probs_BxKxSxG = jax.nn.softmax(scores_BxKxSxG, axis=2).astype(v.dtype)
        out_BxKxGxH = jnp.einsum(
            "bksg,bksh->bkgh", probs_BxKxSxG, v, preferred_element_type=jnp.float32
        )
    elif layout == "bskh":
        scores_BxKxGxS = jnp.einsum(
            "bkgh,bskh->bkgs", q_BxKxGxH, k, preferred_element_type=jnp.float32
        )
        scores_BxKxGxS = jnp.where(
            valid_BxS[:, None, None], scores_BxKxGxS, jnp.finfo(jnp.float32).min
        )
        probs_BxKxGxS = jax.nn.softmax(scores_BxKxGxS, axis=-1).astype(v.dtype)
        out_BxKxGxH = jnp.einsum(
            "bkgs,bskh->bkgh", probs_BxKxGxS, v, preferred_element_type=jnp.float32
        )
    else:
        raise ValueError(f"cache layout must be one of {LAYOUTS}, got {layout!r}")
    return out_BxKxGxH


class KVCache(nnx.Module):
    """Keys and values of one attention layer for `batch` sequences of up to `max_len` tokens.

    `k` and `v` are [batch, max_len, n_kv_heads, head_dim] ("bskh") or
    [batch, n_kv_heads, max_len, head_dim] ("bksh"), stored before heads are repeated for
    grouped-query attention; `lengths[b]` (int32) counts the positions of sequence b that hold
    real tokens. Shapes never change, so a jitted decode step compiles once per
    (batch, max_len). A batch smaller than `batch` uses the first slots.

    Positions at or past `max_len` cannot be written: inside jit a decode step cannot raise,
    and `dynamic_update_slice` clamps the index, so the caller keeps `lengths < max_len`.
    """

    def __init__(
        self,
        batch: int,
        max_len: int,
        n_kv_heads: int,
        head_dim: int,
        dtype: jnp.dtype,
        layout: str = "bksh",
    ):
        if layout not in LAYOUTS:
            raise ValueError(f"cache layout must be one of {LAYOUTS}, got {layout!r}")
        self.layout = layout
        if layout == "bksh":
            shape = (batch, n_kv_heads, max_len, head_dim)
        else:
            shape = (batch, max_len, n_kv_heads, head_dim)
        self.k = nnx.Cache(jnp.zeros(shape, dtype))
        self.v = nnx.Cache(jnp.zeros(shape, dtype))
        self.lengths = nnx.Cache(jnp.zeros((batch,), jnp.int32))

    @property
    def batch(self) -> int:
        return self.k.shape[0]

    @property
    def max_len(self) -> int:
        return self.k.shape[2 if self.layout == "bksh" else 1]

    def _stored(self, x_BxLxKxH: jax.Array) -> jax.Array:
        """Projection-ordered [B, L, K, H] in this cache's layout and dtype."""
        x = x_BxLxKxH.astype(self.k.dtype)
        return x.transpose(0, 2, 1, 3) if self.layout == "bksh" else x

    def write_prompt(
        self, k_BxLxKxH: jax.Array, v_BxLxKxH: jax.Array, lengths_B: jax.Array
    ) -> None:
        """Writes a right-padded prompt batch at positions [0, L) and sets each sequence's length.

        Padding is written too: the length mask hides it and decode steps overwrite it.
        """
        with jax.named_scope("kv_cache_update"):
            start = (0, 0, 0, 0)
            self.k[...] = jax.lax.dynamic_update_slice(self.k[...], self._stored(k_BxLxKxH), start)
            self.v[...] = jax.lax.dynamic_update_slice(self.v[...], self._stored(v_BxLxKxH), start)
            self.lengths[...] = jax.lax.dynamic_update_slice(
                self.lengths[...], lengths_B.astype(jnp.int32), (0,)
            )

    def append(
        self, k_BxKxH: jax.Array, v_BxKxH: jax.Array
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Writes one position per sequence, at that sequence's own length, and advances lengths.

        The write is a scatter of B·K·H elements into the donated buffer, in place (the test
        reads the compiled program's aliasing). Returns the first B slots of the updated cache,
        k and v in the cache's layout, and the new lengths_B (each sequence attends to
        positions < its new length).
        """
        batch = k_BxKxH.shape[0]
        write = jax.vmap(_write_bksh if self.layout == "bksh" else _write_bskh)
        with jax.named_scope("kv_cache_update"):
            positions_B = self.lengths[...][:batch]
            k = write(self.k[...][:batch], k_BxKxH.astype(self.k.dtype), positions_B)
            v = write(self.v[...][:batch], v_BxKxH.astype(self.v.dtype), positions_B)
            lengths_B = positions_B + 1
            if batch == self.batch:
                self.k[...], self.v[...], self.lengths[...] = k, v, lengths_B
            else:
                self.k[...] = jax.lax.dynamic_update_slice(self.k[...], k, (0, 0, 0, 0))
                self.v[...] = jax.lax.dynamic_update_slice(self.v[...], v, (0, 0, 0, 0))
                self.lengths[...] = jax.lax.dynamic_update_slice(self.lengths[...], lengths_B, (0,))
        return k, v, lengths_B
