"""Grouped-query self-attention with rotary positions that owns its KV cache (MaxText style).

The module also holds the bias-free projections the decoder builds from.

`cfg` is a models.decoder_config.DecoderConfig, or any object with the same fields. Attention
reads d_model, n_heads, n_kv_heads, head_dim, rope_theta, dtype and param_dtype. Its cache
also reads cache_layout and cache_update. This module does not import the config class. So
the decoder's config can name what attention reads without an import cycle.

Letters in array names (models/__init__.py):

- B batch, L length, S cache slots per sequence.
- D model dim, H head dim.
- N query heads, K kv heads.
- Q query heads per kv head, so N = K·Q.
"""

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from models import kv_cache, partitioning
from models.dtypes import resolve_dtype
from models.kv_cache import KVCache


def apply_rope(x_BxLxNxH: jax.Array, positions_BxL: jax.Array, theta: float) -> jax.Array:
    """Rotary position embedding of x_BxLxNxH at positions_BxL.

    Each head splits into two halves, and pair i (x1[i], x2[i]) turns by an angle. The angle
    is position · theta^(-2i/H). The rotation runs in float32 and returns x's own dtype.
    """
    H = x_BxLxNxH.shape[-1]
    inv_freq = theta ** (-jnp.arange(0, H, 2, dtype=jnp.float32) / H)  # H/2 frequencies
    angles = positions_BxL.astype(jnp.float32)[:, :, None, None] * inv_freq  # B x L x 1 x H/2
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    x1, x2 = jnp.split(x_BxLxNxH.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x_BxLxNxH.dtype)


def attend(
    q_BxLxNxH: jax.Array, k_BxSxKxH: jax.Array, v_BxSxKxH: jax.Array, mask_BxLxS: jax.Array
) -> jax.Array:
    """Grouped-query attention that never repeats the keys and values.

    Query head n reads kv head n // Q. `mask_BxLxS` is True where a query may attend.
    Scores and softmax are float32, and masked positions get zero weight. Returns
    out_BxLxNxH.
    """
    B, L, N, H = q_BxLxNxH.shape
    K = k_BxSxKxH.shape[2]
    q_BxLxKxQxH = q_BxLxNxH.reshape(B, L, K, N // K, H)
    k_BxSxKxH = k_BxSxKxH.astype(q_BxLxNxH.dtype)
    v_BxSxKxH = v_BxSxKxH.astype(q_BxLxNxH.dtype)
    scores_BxKxQxLxS = jnp.einsum("blkqh,bskh->bkqls", q_BxLxKxQxH, k_BxSxKxH)
    scores_BxKxQxLxS = scores_BxKxQxLxS.astype(jnp.float32) / math.sqrt(H)
    scores_BxKxQxLxS = jnp.where(
        mask_BxLxS[:, None, None], scores_BxKxQxLxS, jnp.finfo(jnp.float32).min
    )
    probs_BxKxQxLxS = jax.nn.softmax(scores_BxKxQxLxS, axis=-1).astype(v_BxSxKxH.dtype)
    out_BxLxKxQxH = jnp.einsum("bkqls,bskh->blkqh", probs_BxKxQxLxS, v_BxSxKxH)
    return out_BxLxKxQxH.reshape(B, L, N, H)


# nnx.Linear's and nnx.Embed's own default initialisers, named so their weights carry axes.
KERNEL_INIT = nnx.initializers.lecun_normal()
EMBED_INIT = nnx.initializers.variance_scaling(1.0, "fan_in", "normal", out_axis=0)


def dense(cfg: Any, d_in: int, d_out: int, rngs: nnx.Rngs, axes: tuple[str, str]) -> nnx.Linear:
    """A bias-free projection whose kernel [d_in, d_out] carries the logical `axes`.

    The axes follow Megatron tensor parallelism. A column-parallel projection puts `heads` or
    `mlp` on its output axis. A row-parallel one puts it on its input axis.
    """
    return nnx.Linear(
        d_in,
        d_out,
        use_bias=False,
        dtype=resolve_dtype(cfg.dtype),
        param_dtype=resolve_dtype(cfg.param_dtype),
        kernel_init=partitioning.param_init(KERNEL_INIT, *axes),
        rngs=rngs,
    )


class Attention(nnx.Module):
    """Self-attention with rotary positions and grouped-query heads.

    The layer owns its KV cache, which exists only after `init_cache`.
    """

    def __init__(self, cfg: Any, *, rngs: nnx.Rngs):
        self.cfg = cfg
        D, N, K, H = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        # The N·H and K·H columns are head-major, so splitting them over `model` splits heads.
        self.query = dense(cfg, D, N * H, rngs, ("embed", "heads"))
        self.key = dense(cfg, D, K * H, rngs, ("embed", "kv_heads"))
        self.value = dense(cfg, D, K * H, rngs, ("embed", "kv_heads"))
        self.out = dense(cfg, N * H, D, rngs, ("heads", "embed"))
        self.cache = nnx.data(None)

    def init_cache(self, batch: int, max_len: int, dtype: jnp.dtype) -> None:
        """Gives the layer an empty KVCache.

        The cache holds `batch` sequences of up to `max_len` tokens, in `dtype`. Its layout
        and update method come from the config.
        """
        cfg = self.cfg
        K, H = cfg.n_kv_heads, cfg.head_dim
        self.cache = KVCache(batch, max_len, K, H, dtype, cfg.cache_layout, cfg.cache_update)

    def _project(self, x_BxLxD: jax.Array, positions_BxL: jax.Array):
        B, L, _ = x_BxLxD.shape
        N, K, H = self.cfg.n_heads, self.cfg.n_kv_heads, self.cfg.head_dim
        q_BxLxNxH = self.query(x_BxLxD).reshape(B, L, N, H)
        k_BxLxKxH = self.key(x_BxLxD).reshape(B, L, K, H)
        v_BxLxKxH = self.value(x_BxLxD).reshape(B, L, K, H)
        q_BxLxNxH = apply_rope(q_BxLxNxH, positions_BxL, self.cfg.rope_theta)
        k_BxLxKxH = apply_rope(k_BxLxKxH, positions_BxL, self.cfg.rope_theta)
        return q_BxLxNxH, k_BxLxKxH, v_BxLxKxH

    def _output(self, out_BxLxNxH: jax.Array) -> jax.Array:
        B, L, N, H = out_BxLxNxH.shape
        return self.out(out_BxLxNxH.reshape(B, L, N * H))

    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        """Causal attention over the sequence itself, x_BxLxD -> y_BxLxD.

        It reads and writes no cache.
        """
        B, L, _ = x_BxLxD.shape
        with jax.named_scope("attention"):
            positions_BxL = jnp.broadcast_to(jnp.arange(L), (B, L))
            q_BxLxNxH, k_BxLxKxH, v_BxLxKxH = self._project(x_BxLxD, positions_BxL)
            mask_BxLxL = jnp.broadcast_to(jnp.tril(jnp.ones((L, L), bool)), (B, L, L))
            return self._output(attend(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, mask_BxLxL))

    def prefill(self, x_BxLxD: jax.Array, lengths_B: jax.Array) -> jax.Array:
        """Causal attention over a right-padded prompt, x_BxLxD -> y_BxLxD.

        It also writes the prompt's keys and values to the cache. Padding sits after each
        sequence's real tokens. So the causal mask alone keeps padding out of the real
        positions.
        """
        B, L, _ = x_BxLxD.shape
        with jax.named_scope("attention"):
            positions_BxL = jnp.broadcast_to(jnp.arange(L), (B, L))
            q_BxLxNxH, k_BxLxKxH, v_BxLxKxH = self._project(x_BxLxD, positions_BxL)
        self.cache.write_prompt(k_BxLxKxH, v_BxLxKxH, lengths_B)
        with jax.named_scope("attention"):
            mask_BxLxL = jnp.broadcast_to(jnp.tril(jnp.ones((L, L), bool)), (B, L, L))
            return self._output(attend(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, mask_BxLxL))

    def decode(self, x_BxD: jax.Array) -> jax.Array:
        """Attention for one new token per sequence, x_BxD -> y_BxD.

        Sequence b's token sits at position lengths[b]. Its keys and values are appended to
        the cache. It then attends over the whole static cache under a length mask.
        """
        with jax.named_scope("attention"):
            positions_Bx1 = self.cache.lengths[...][: x_BxD.shape[0], None]
            q_Bx1xNxH, k_Bx1xKxH, v_Bx1xKxH = self._project(x_BxD[:, None], positions_Bx1)
        k, v, lengths_B = self.cache.append(k_Bx1xKxH[:, 0], v_Bx1xKxH[:, 0])
        with jax.named_scope("attention"):
            B, _, N, H = q_Bx1xNxH.shape
            K = self.cfg.n_kv_heads
            q_BxKxQxH = q_Bx1xNxH.reshape(B, K, N // K, H)
            out_BxKxQxH = kv_cache.attend_cache(q_BxKxQxH, k, v, lengths_B, self.cache.layout)
            return self._output(out_BxKxQxH.astype(q_Bx1xNxH.dtype).reshape(B, 1, N, H))[:, 0]

    def extend(self, x_BxCxD: jax.Array, counts_B: jax.Array) -> jax.Array:
        """Attention for the next C tokens of each sequence (a prompt's chunk), x_BxCxD -> y.

        Sequence b's chunk starts at position lengths[b], its first counts_B[b] tokens real.
        Their keys and values are written to the cache. Each attends every earlier position
        and itself (models.kv_cache.KVCache.write_chunk).
        """
        B, C, _ = x_BxCxD.shape
        with jax.named_scope("attention"):
            positions_BxC = self.cache.lengths[...][:B, None] + jnp.arange(C)
            q_BxCxNxH, k_BxCxKxH, v_BxCxKxH = self._project(x_BxCxD, positions_BxC)
        k, v, _ = self.cache.write_chunk(k_BxCxKxH, v_BxCxKxH, counts_B)
        with jax.named_scope("attention"):
            S, K, H = self.cache.max_len, self.cfg.n_kv_heads, self.cfg.head_dim
            if self.cache.layout == "bksh":  # [B·K, S, H] -> [B, S, K, H]
                k = k.reshape(B, K, S, H).transpose(0, 2, 1, 3)
                v = v.reshape(B, K, S, H).transpose(0, 2, 1, 3)
            mask_BxCxS = jnp.arange(S)[None, None, :] <= positions_BxC[:, :, None]
            return self._output(attend(q_BxCxNxH, k, v, mask_BxCxS))
