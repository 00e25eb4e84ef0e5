"""A decoder-only transformer with the KV cache inside attention (MaxText style).

Blocks are pre-norm: RMSNorm -> grouped-query self-attention with rotary positions -> residual
-> RMSNorm -> SwiGLU MLP -> residual. Three modes share the weights:

- full forward, `model(tokens_BxL) -> logits_BxLxV`: causal, no cache (training shape);
- prefill, `model.prefill(tokens_BxL, lengths_B) -> logits_BxV`: a right-padded prompt batch
  writes the cache and returns the logits at each sequence's last real token;
- decode, `model.decode_step(tokens_B) -> logits_BxV`: one token per sequence, written at that
  sequence's own position; attention runs over the whole static cache under a length mask,
  in the cache's own layout (`cache_layout`, models.kv_cache.attend_cache).

The cache exists only after `model.init_cache(batch, max_len)`. The harness jits the pure
functions at the bottom over `graphdef, params, cache = nnx.split(model, nnx.Param, nnx.Cache)`.

Mixture of experts: with `moe_every = n > 0`, block `layer` uses an MoE layer instead of SwiGLU
when (layer + 1) % n == 0 (blocks n-1, 2n-1, ...). Each has `num_experts` SwiGLU experts of
hidden dim `mlp_dim`. Its routing group, the tokens a router sees together, is:

- full forward and prefill of a [B, L] batch: the tokens flattened in order (sequence by
  sequence) and cut into groups of `moe_group_size`; 0 means one group per sequence (L tokens),
  so no sequence's routing depends on another's. Prefill's padding tokens route too, so they
  can take expert capacity that real tokens of their group would otherwise get;
- decode step: the B tokens of the step, one per sequence, whatever `moe_group_size`.

`with_stats`, `prefill_with_stats` and `decode_step_with_stats` also return one routing
statistics dict per MoE block (models.routers.routing_stats), in block order.

Letters in array names: B batch, L length, S cache slots per sequence (max_len), D model dim,
K kv heads, G query heads per kv head, N query heads (N = K*G), H head dim, V vocab,
F mlp dim, T generated steps.
"""

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from models import kv_cache, moe, partitioning
from models.dtypes import resolve_dtype
from models.kv_cache import KVCache
from models.moe import MoEConfig, MoELayer

Stats = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    vocab_size: int = 32000
    d_model: int = 2048
    n_layers: int = 16
    n_heads: int = 16
    n_kv_heads: int = 4
    head_dim: int = 128
    mlp_dim: int = 8192
    max_seq_len: int = 4096
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    dtype: str = "float32"
    param_dtype: str = "float32"
    cache_dtype: str = "float32"
    # "bksh" [B, K, S, H], "bskh" [B, S, K, H], or "auto": the platform's default
    # (models.kv_cache.DEFAULT_LAYOUT), resolved when the cache is made.
    cache_layout: str = "auto"
    # Mixture of experts (see the module docstring); 0 keeps every block dense. The MoE fields
    # are checked even then, so a typo does not wait for moe_every to be set.
    moe_every: int = 0
    num_experts: int = 8
    top_k: int = 2
    capacity_factor: float = 1.25
    router: str = "token_choice"
    renormalize: bool = False
    moe_group_size: int = 0
    # A decode step routes its B tokens in this many groups of B / decode_groups (1: one
    # group). Under expert parallelism it is the number of devices holding token shards, so a
    # group is one device's tokens (GShard); the run sets it, not the config.
    decode_groups: int = 1

    def __post_init__(self):
        for name in (
            "vocab_size",
            "d_model",
            "n_layers",
            "n_heads",
            "n_kv_heads",
            "head_dim",
            "mlp_dim",
            "max_seq_len",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"model.{name} must be a positive integer, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"model.n_heads must be a multiple of model.n_kv_heads for grouped-query "
                f"attention, got n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(
                f"model.head_dim must be even for rotary embeddings, got {self.head_dim}"
            )
        if not self.rope_theta > 0:
            raise ValueError(f"model.rope_theta must be positive, got {self.rope_theta!r}")
        if not isinstance(self.tie_embeddings, bool):
            raise ValueError(f"model.tie_embeddings must be a bool, got {self.tie_embeddings!r}")
        for name in ("dtype", "param_dtype", "cache_dtype"):
            resolve_dtype(getattr(self, name))
        kv_cache.resolve_layout(self.cache_layout, "cpu")  # raises naming model.cache_layout
        if not isinstance(self.decode_groups, int) or self.decode_groups <= 0:
            raise ValueError(
                f"decode_groups must be a positive integer, got {self.decode_groups!r}"
            )
        for name in ("moe_every", "moe_group_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"model.{name} must be an integer >= 0, got {value!r}")
        if self.moe_every > self.n_layers:
            raise ValueError(
                f"model.moe_every must be <= model.n_layers={self.n_layers} (or 0 for no MoE), "
                f"got {self.moe_every}: no block would be an MoE"
            )
        self.moe_config()  # MoEConfig checks the router fields and names them model.*

    def moe_config(self) -> MoEConfig:
        """The config of this decoder's MoE layers (expert hidden dim = mlp_dim)."""
        return MoEConfig(
            d_model=self.d_model,
            mlp_dim=self.mlp_dim,
            num_experts=self.num_experts,
            top_k=self.top_k,
            capacity_factor=self.capacity_factor,
            router=self.router,
            renormalize=self.renormalize,
            group_size=self.moe_group_size,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )


def moe_layers(cfg: DecoderConfig) -> tuple[int, ...]:
    """Indices of the blocks that use an MoE layer: (layer + 1) % moe_every == 0."""
    if not cfg.moe_every:
        return ()
    return tuple(i for i in range(cfg.n_layers) if (i + 1) % cfg.moe_every == 0)


def apply_rope(x_BxLxNxH: jax.Array, positions_BxL: jax.Array, theta: float) -> jax.Array:
    """Rotates the two halves of each head by angles position * theta^(-2i/H), in float32."""
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
    """Grouped-query attention without repeating K/V: query head n reads kv head n // G.

    Scores and softmax are float32; masked positions get zero weight. Returns out_BxLxNxH.
    """
    B, L, N, H = q_BxLxNxH.shape
    K = k_BxSxKxH.shape[2]
    q_BxLxKxGxH = q_BxLxNxH.reshape(B, L, K, N // K, H)
    k_BxSxKxH = k_BxSxKxH.astype(q_BxLxNxH.dtype)
    v_BxSxKxH = v_BxSxKxH.astype(q_BxLxNxH.dtype)
    scores_BxKxGxLxS = jnp.einsum("blkgh,bskh->bkgls", q_BxLxKxGxH, k_BxSxKxH)
    scores_BxKxGxLxS = scores_BxKxGxLxS.astype(jnp.float32) / math.sqrt(H)
    scores_BxKxGxLxS = jnp.where(
        mask_BxLxS[:, None, None], scores_BxKxGxLxS, jnp.finfo(jnp.float32).min
    )
    probs_BxKxGxLxS = jax.nn.softmax(scores_BxKxGxLxS, axis=-1).astype(v_BxSxKxH.dtype)
    out_BxLxKxGxH = jnp.einsum("bkgls,bskh->blkgh", probs_BxKxGxLxS, v_BxSxKxH)
    return out_BxLxKxGxH.reshape(B, L, N, H)


# nnx.Linear's and nnx.Embed's own default initialisers, named so their weights carry axes.
_KERNEL_INIT = nnx.initializers.lecun_normal()
_EMBED_INIT = nnx.initializers.variance_scaling(1.0, "fan_in", "normal", out_axis=0)


def _dense(
    cfg: DecoderConfig, d_in: int, d_out: int, rngs: nnx.Rngs, axes: tuple[str, str]
) -> nnx.Linear:
    """A bias-free projection whose kernel [d_in, d_out] carries logical `axes` (Megatron
    tensor parallelism: `heads`/`mlp` out of the column-parallel ones, into the row-parallel)."""
    return nnx.Linear(
        d_in,
        d_out,
        use_bias=False,
        dtype=resolve_dtype(cfg.dtype),
        param_dtype=resolve_dtype(cfg.param_dtype),
        kernel_init=partitioning.param_init(_KERNEL_INIT, *axes),
        rngs=rngs,
    )


def _rms_norm(cfg: DecoderConfig, rngs: nnx.Rngs) -> nnx.RMSNorm:
    return nnx.RMSNorm(
        cfg.d_model,
        dtype=resolve_dtype(cfg.dtype),
        param_dtype=resolve_dtype(cfg.param_dtype),
        scale_init=partitioning.param_init(nnx.initializers.ones_init(), "embed"),
        rngs=rngs,
    )


class Attention(nnx.Module):
    """Self-attention with rotary positions and grouped-query heads; owns the KV cache."""

    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        D, N, K, H = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        # The N·H and K·H columns are head-major, so splitting them over `model` splits heads.
        self.query = _dense(cfg, D, N * H, rngs, ("embed", "heads"))
        self.key = _dense(cfg, D, K * H, rngs, ("embed", "kv_heads"))
        self.value = _dense(cfg, D, K * H, rngs, ("embed", "kv_heads"))
        self.out = _dense(cfg, N * H, D, rngs, ("heads", "embed"))
        self.cache = nnx.data(None)

    def init_cache(self, batch: int, max_len: int, dtype: jnp.dtype, layout: str) -> None:
        cfg = self.cfg
        self.cache = KVCache(batch, max_len, cfg.n_kv_heads, cfg.head_dim, dtype, layout)

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
        """Causal attention over the sequence itself; reads and writes no cache."""
        B, L, _ = x_BxLxD.shape
        with jax.named_scope("attention"):
            positions_BxL = jnp.broadcast_to(jnp.arange(L), (B, L))
            q_BxLxNxH, k_BxLxKxH, v_BxLxKxH = self._project(x_BxLxD, positions_BxL)
            mask_BxLxL = jnp.broadcast_to(jnp.tril(jnp.ones((L, L), bool)), (B, L, L))
            return self._output(attend(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, mask_BxLxL))

    def prefill(self, x_BxLxD: jax.Array, lengths_B: jax.Array) -> jax.Array:
        """Causal attention over a right-padded prompt that also writes its K/V to the cache.

        Padding sits after each sequence's real tokens, so the causal mask alone keeps it out
        of the real positions.
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
        """One token per sequence at position lengths[b]; attends over the static cache."""
        with jax.named_scope("attention"):
            positions_Bx1 = self.cache.lengths[...][: x_BxD.shape[0], None]
            q_Bx1xNxH, k_Bx1xKxH, v_Bx1xKxH = self._project(x_BxD[:, None], positions_Bx1)
        k, v, lengths_B = self.cache.append(k_Bx1xKxH[:, 0], v_Bx1xKxH[:, 0])
        with jax.named_scope("attention"):
            B, _, N, H = q_Bx1xNxH.shape
            K = self.cfg.n_kv_heads
            q_BxKxGxH = q_Bx1xNxH.reshape(B, K, N // K, H)
            out_BxKxGxH = kv_cache.attend_cache(q_BxKxGxH, k, v, lengths_B, self.cache.layout)
            return self._output(out_BxKxGxH.astype(q_Bx1xNxH.dtype).reshape(B, 1, N, H))[:, 0]


class SwiGLU(nnx.Module):
    """x_BxLxD -> y_BxLxD as down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
        self.gate = _dense(cfg, cfg.d_model, cfg.mlp_dim, rngs, ("embed", "mlp"))
        self.up = _dense(cfg, cfg.d_model, cfg.mlp_dim, rngs, ("embed", "mlp"))
        self.down = _dense(cfg, cfg.mlp_dim, cfg.d_model, rngs, ("mlp", "embed"))

    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        h_BxLxF = jax.nn.silu(self.gate(x_BxLxD)) * self.up(x_BxLxD)
        return self.down(h_BxLxF)


class DecoderMoE(MoELayer):
    """The MoE a decoder block uses: an MoELayer whose routing group the block picks per
    call (L tokens of a sequence in a full forward, the B tokens of a decode step)."""


class Block(nnx.Module):
    """Pre-norm block: x + attention(norm(x)), then x + mlp(norm(x)); x_BxLxD -> x_BxLxD.

    The `*_with_stats` methods also return the MoE layer's routing stats, or None for SwiGLU.
    """

    def __init__(self, cfg: DecoderConfig, layer: int, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.attn_norm = _rms_norm(cfg, rngs)
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = _rms_norm(cfg, rngs)
        self.mlp = self.make_mlp(cfg, layer, rngs=rngs)

    def make_mlp(self, cfg: DecoderConfig, layer: int, *, rngs: nnx.Rngs) -> nnx.Module:
        """The one place a block picks its MLP: any module mapping x_BxLxD -> y_BxLxD fits.

        Blocks in `moe_layers(cfg)` get a mixture of experts, the others SwiGLU.
        """
        if layer in moe_layers(cfg):
            return DecoderMoE(cfg.moe_config(), rngs=rngs)
        return SwiGLU(cfg, rngs=rngs)

    def _mlp(self, x_BxLxD: jax.Array, group_size: int) -> tuple[jax.Array, Stats | None]:
        with jax.named_scope("mlp"):
            h_BxLxD = self.mlp_norm(x_BxLxD)
            if isinstance(self.mlp, DecoderMoE):
                y_BxLxD, stats = self.mlp.with_stats(h_BxLxD, group_size)
            else:
                y_BxLxD, stats = self.mlp(h_BxLxD), None
            return x_BxLxD + y_BxLxD, stats

    def _sequence_group(self, length: int) -> int:
        return self.cfg.moe_group_size or length

    def with_stats(self, x_BxLxD: jax.Array) -> tuple[jax.Array, Stats | None]:
        x_BxLxD = x_BxLxD + self.attn(self.attn_norm(x_BxLxD))
        return self._mlp(x_BxLxD, self._sequence_group(x_BxLxD.shape[1]))

    def prefill_with_stats(
        self, x_BxLxD: jax.Array, lengths_B: jax.Array
    ) -> tuple[jax.Array, Stats | None]:
        x_BxLxD = x_BxLxD + self.attn.prefill(self.attn_norm(x_BxLxD), lengths_B)
        return self._mlp(x_BxLxD, self._sequence_group(x_BxLxD.shape[1]))

    def decode_with_stats(self, x_BxD: jax.Array) -> tuple[jax.Array, Stats | None]:
        """One token per sequence; the MoE routes the step's B tokens in cfg.decode_groups
        groups (1: one group)."""
        x_BxD = x_BxD + self.attn.decode(self.attn_norm(x_BxD))
        group_size = x_BxD.shape[0] // self.cfg.decode_groups
        x_Bx1xD, stats = self._mlp(x_BxD[:, None], group_size=group_size)
        return x_Bx1xD[:, 0], stats

    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        return self.with_stats(x_BxLxD)[0]

    def prefill(self, x_BxLxD: jax.Array, lengths_B: jax.Array) -> jax.Array:
        return self.prefill_with_stats(x_BxLxD, lengths_B)[0]

    def decode(self, x_BxD: jax.Array) -> jax.Array:
        return self.decode_with_stats(x_BxD)[0]


class Decoder(nnx.Module):
    """tokens (int) -> logits (float32) over `vocab_size`; see the module docstring for modes."""

    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = nnx.Embed(
            cfg.vocab_size,
            cfg.d_model,
            dtype=resolve_dtype(cfg.dtype),
            param_dtype=resolve_dtype(cfg.param_dtype),
            embedding_init=partitioning.param_init(_EMBED_INIT, "vocab", "embed"),
            rngs=rngs,
        )
        self.blocks = nnx.List([Block(cfg, i, rngs=rngs) for i in range(cfg.n_layers)])
        self.final_norm = _rms_norm(cfg, rngs)
        self.unembed = (
            None
            if cfg.tie_embeddings
            else _dense(cfg, cfg.d_model, cfg.vocab_size, rngs, ("embed", "vocab"))
        )

    def init_cache(self, batch: int, max_len: int, dtype: str | None = None) -> None:
        """Gives every attention layer an empty KVCache of `batch` x `max_len` positions.

        `dtype` names the cache's dtype (default `cfg.cache_dtype`); its layout is
        `cfg.cache_layout`, "auto" resolved for jax.default_backend(). Replaces any earlier cache.
        """
        for name, value in (("batch", batch), ("max_len", max_len)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"cache {name} must be a positive integer, got {value!r}")
        if max_len > self.cfg.max_seq_len:
            raise ValueError(
                f"cache max_len must be <= model.max_seq_len={self.cfg.max_seq_len}, got {max_len}"
            )
        cache_dtype = resolve_dtype(self.cfg.cache_dtype if dtype is None else dtype)
        layout = kv_cache.resolve_layout(self.cfg.cache_layout, jax.default_backend())
        for block in self.blocks:
            block.attn.init_cache(batch, max_len, cache_dtype, layout)

    def _cache(self) -> KVCache:
        cache = self.blocks[0].attn.cache
        if cache is None:
            raise ValueError("the model has no KV cache: call model.init_cache(batch, max_len)")
        return cache

    def _check_batch(self, batch: int) -> KVCache:
        cache = self._cache()
        if batch > cache.batch:
            raise ValueError(f"batch {batch} is larger than the cache's batch {cache.batch}")
        return cache

    def _logits(self, x_BxLxD: jax.Array) -> jax.Array:
        x_BxLxD = self.final_norm(x_BxLxD)
        unembed = self.embed.attend if self.unembed is None else self.unembed
        return unembed(x_BxLxD).astype(jnp.float32)

    def with_stats(self, tokens_BxL: jax.Array) -> tuple[jax.Array, list[Stats]]:
        """Full causal forward without a cache: tokens_BxL -> (logits_BxLxV, stats).

        stats holds one routing_stats dict per MoE block, in block order ([] if dense). Each
        MoE routes groups of model.moe_group_size tokens (0: one group per sequence).
        """
        if tokens_BxL.ndim != 2:
            raise ValueError(f"tokens must be [batch, length], got shape {tokens_BxL.shape}")
        if tokens_BxL.shape[1] > self.cfg.max_seq_len:
            raise ValueError(
                f"tokens length {tokens_BxL.shape[1]} exceeds "
                f"model.max_seq_len={self.cfg.max_seq_len}"
            )
        x_BxLxD = self.embed(tokens_BxL)
        all_stats = []
        for block in self.blocks:
            x_BxLxD, stats = block.with_stats(x_BxLxD)
            _collect(all_stats, stats)
        return self._logits(x_BxLxD), all_stats

    def __call__(self, tokens_BxL: jax.Array) -> jax.Array:
        """Full causal forward without a cache: tokens_BxL -> logits_BxLxV."""
        return self.with_stats(tokens_BxL)[0]

    def prefill_with_stats(
        self, tokens_BxL: jax.Array, lengths_B: jax.Array
    ) -> tuple[jax.Array, list[Stats]]:
        """`prefill` that also returns one routing_stats dict per MoE block.

        The stats count every prompt position, padding included: padding routes like any token.
        """
        if tokens_BxL.ndim != 2:
            raise ValueError(f"prompt must be [batch, length], got shape {tokens_BxL.shape}")
        batch, length = tokens_BxL.shape
        if lengths_B.shape != (batch,):
            raise ValueError(f"lengths must have shape ({batch},), got {lengths_B.shape}")
        cache = self._check_batch(batch)
        if length > cache.max_len:
            raise ValueError(
                f"prompt length {length} is longer than the cache's max_len {cache.max_len}"
            )
        x_BxLxD = self.embed(tokens_BxL)
        all_stats = []
        for block in self.blocks:
            x_BxLxD, stats = block.prefill_with_stats(x_BxLxD, lengths_B)
            _collect(all_stats, stats)
        last_B = jnp.clip(lengths_B - 1, 0, length - 1)
        x_BxD = jnp.take_along_axis(x_BxLxD, last_B[:, None, None], axis=1)[:, 0]
        return self._logits(x_BxD), all_stats

    def prefill(self, tokens_BxL: jax.Array, lengths_B: jax.Array) -> jax.Array:
        """Writes a right-padded prompt batch into the cache; returns logits_BxV at each
        sequence's last real token, position lengths_B[b] - 1.

        Each length must lie in [1, L]; inside jit that cannot be checked. Sequences go to cache
        slots [0, B) and the prompt to positions [0, L): prefill starts sequences afresh.
        """
        return self.prefill_with_stats(tokens_BxL, lengths_B)[0]

    def decode_step_with_stats(self, tokens_B: jax.Array) -> tuple[jax.Array, list[Stats]]:
        """`decode_step` that also returns one routing_stats dict per MoE block.

        Each MoE routes the step's B tokens (one per sequence) as one group: under
        expert-choice a sequence's next token then depends on the other sequences in the batch.
        """
        if tokens_B.ndim != 1:
            raise ValueError(f"decode tokens must be [batch], got shape {tokens_B.shape}")
        self._check_batch(tokens_B.shape[0])
        x_BxD = self.embed(tokens_B)
        all_stats = []
        for block in self.blocks:
            x_BxD, stats = block.decode_with_stats(x_BxD)
            _collect(all_stats, stats)
        return self._logits(x_BxD), all_stats

    def decode_step(self, tokens_B: jax.Array) -> jax.Array:
        """Appends one token per sequence at its own position; returns the next logits_BxV.

        The caller keeps every length below the cache's max_len (see KVCache).
        """
        return self.decode_step_with_stats(tokens_B)[0]


def _collect(all_stats: list[Stats], stats: Stats | None) -> None:
    if stats is not None:
        all_stats.append(stats)


# Pure functions over (params, cache) for the harness to jit.


def forward_with_stats(
    graphdef: nnx.GraphDef, params: nnx.State, tokens_BxL: jax.Array
) -> tuple[jax.Array, list[Stats]]:
    """Decoder.with_stats as a pure function: returns (logits_BxLxV, stats per MoE block).

    Differentiable in params, stats["aux_loss"] and stats["z_loss"] included: the train step.
    """
    model = nnx.merge(graphdef, params, copy=True)
    return model.with_stats(tokens_BxL)


def prefill_with_stats(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    cache: nnx.State,
    tokens_BxL: jax.Array,
    lengths_B: jax.Array,
) -> tuple[jax.Array, nnx.State, list[Stats]]:
    """Decoder.prefill_with_stats as a pure function: returns (logits_BxV, new cache, stats)."""
    model = nnx.merge(graphdef, params, cache, copy=True)
    logits_BxV, stats = model.prefill_with_stats(tokens_BxL, lengths_B)
    return logits_BxV, nnx.state(model, nnx.Cache), stats


def decode_step_with_stats(
    graphdef: nnx.GraphDef, params: nnx.State, cache: nnx.State, tokens_B: jax.Array
) -> tuple[jax.Array, nnx.State, list[Stats]]:
    """Decoder.decode_step_with_stats as a pure function: returns (logits_BxV, new cache,
    stats per MoE block)."""
    model = nnx.merge(graphdef, params, cache, copy=True)
    logits_BxV, stats = model.decode_step_with_stats(tokens_B)
    return logits_BxV, nnx.state(model, nnx.Cache), stats


def prefill(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    cache: nnx.State,
    tokens_BxL: jax.Array,
    lengths_B: jax.Array,
) -> tuple[jax.Array, nnx.State]:
    """Decoder.prefill as a pure function: returns (logits_BxV, new cache)."""
    model = nnx.merge(graphdef, params, cache, copy=True)
    logits_BxV = model.prefill(tokens_BxL, lengths_B)
    return logits_BxV, nnx.state(model, nnx.Cache)


def decode_step(
    graphdef: nnx.GraphDef, params: nnx.State, cache: nnx.State, tokens_B: jax.Array
) -> tuple[jax.Array, nnx.State]:
    """Decoder.decode_step as a pure function: returns (logits_BxV, new cache)."""
    model = nnx.merge(graphdef, params, cache, copy=True)
    logits_BxV = model.decode_step(tokens_B)
    return logits_BxV, nnx.state(model, nnx.Cache)


def make_prefill_fn(graphdef: nnx.GraphDef) -> Callable:
    """jit of `prefill` with graphdef bound: fn(params, cache, tokens_BxL, lengths_B); the cache
    argument is donated, so the caller must use the returned cache."""

    def fn(params: nnx.State, cache: nnx.State, tokens_BxL: jax.Array, lengths_B: jax.Array):
        return prefill(graphdef, params, cache, tokens_BxL, lengths_B)

    return jax.jit(fn, donate_argnames="cache")


def make_decode_fn(graphdef: nnx.GraphDef) -> Callable:
    """jit of `decode_step` with graphdef bound: fn(params, cache, tokens_B); cache donated."""

    def fn(params: nnx.State, cache: nnx.State, tokens_B: jax.Array):
        return decode_step(graphdef, params, cache, tokens_B)

    return jax.jit(fn, donate_argnames="cache")


def generate(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    cache: nnx.State,
    prompt_BxL: jax.Array,
    lengths_B: jax.Array,
    steps: int,
) -> tuple[jax.Array, nnx.State]:
    """Greedy decoding: prefill, then `steps - 1` decode steps inside one lax.scan.

    Returns (tokens_BxT, cache) with T = steps: token 0 comes from the prefill logits, token
    t from the decode step fed token t-1. The last token is returned but not written, so the
    cache ends at lengths_B + steps - 1. `steps` is static; under jit mark it static.
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps <= 0:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    max_len = nnx.merge(graphdef, params, cache, copy=True)._cache().max_len
    # Lengths are traced, so the static prompt length bounds them.
    if prompt_BxL.shape[1] + steps - 1 > max_len:
        raise ValueError(
            f"prompt length {prompt_BxL.shape[1]} + steps {steps} - 1 does not fit the "
            f"cache's max_len {max_len}"
        )
    logits_BxV, cache = prefill(graphdef, params, cache, prompt_BxL, lengths_B)
    token_B = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)

    def step(carry, _):
        cache, token_B = carry
        logits_BxV, cache = decode_step(graphdef, params, cache, token_B)
        token_B = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
        return (cache, token_B), token_B

    (cache, _), tokens_TxB = jax.lax.scan(step, (cache, token_B), length=steps - 1)
    return jnp.concatenate([token_B[:, None], tokens_TxB.T], axis=1), cache


def make_generate_fn(graphdef: nnx.GraphDef, steps: int) -> Callable:
    """jit of `generate` with graphdef and steps bound: fn(params, cache, prompt_BxL, lengths_B);
    cache donated."""

    def fn(params: nnx.State, cache: nnx.State, prompt_BxL: jax.Array, lengths_B: jax.Array):
        return generate(graphdef, params, cache, prompt_BxL, lengths_B, steps)

    return jax.jit(fn, donate_argnames="cache")


# Counts and costs, pure math on the config.


def _moe_stack(cfg: DecoderConfig) -> moe.MoEMLPConfig | None:
    """The decoder's MoE layers as models.moe counts them (depth = number of MoE blocks)."""
    n_moe = len(moe_layers(cfg))
    if not n_moe:
        return None
    return moe.MoEMLPConfig(**dataclasses.asdict(cfg.moe_config()), depth=n_moe)


def num_params(cfg: DecoderConfig) -> int:
    """Exact parameter count of Decoder(cfg), embedding and unembedding included.

    An MoE block counts its router (D*E) and all E experts (3*D*F each) instead of SwiGLU.
    """
    D, V = cfg.d_model, cfg.vocab_size
    attn = D * cfg.head_dim * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)
    mlp = 3 * D * cfg.mlp_dim
    per_block = attn + mlp + 2 * D
    unembed = 0 if cfg.tie_embeddings else D * V
    dense = V * D + cfg.n_layers * per_block + D + unembed
    stack = _moe_stack(cfg)
    if stack is None:
        return dense
    return dense - stack.depth * mlp + moe.num_params(stack)


def num_active_params(cfg: DecoderConfig) -> int:
    """Parameters one token uses: num_params with each MoE block's experts counted only as
    many as a token reaches (models.moe.num_active_params: top_k for token-choice, about
    capacity_factor for expert-choice). Equals num_params for a dense decoder."""
    stack = _moe_stack(cfg)
    if stack is None:
        return num_params(cfg)
    return num_params(cfg) - moe.num_params(stack) + moe.num_active_params(stack)


def num_non_embedding_params(cfg: DecoderConfig) -> int:
    """Parameters outside the embedding and unembedding tables (P in the cost formulas)."""
    tables = 1 if cfg.tie_embeddings else 2
    return num_params(cfg) - tables * cfg.vocab_size * cfg.d_model


def decode_step_cost(
    cfg: DecoderConfig, batch: int, cache_len: int, param_bytes: float, cache_bytes: float
) -> dict[str, float]:
    """Model FLOPs and HBM bytes of one decode step for `batch` sequences (ANCHORS §4).

    flops (FLOP) = 2·B·(P + D·V) weight matmuls + 4·B·n_layers·N·H·cache_len for QKᵀ and AV.
    bytes (B) = param_bytes·(P + D·V) weights read once per step
              + B·2·n_layers·K·H·cache_len·cache_bytes K/V read per sequence
              + B·2·n_layers·K·H·cache_bytes K/V written for the new token.
    Activations, the B embedding rows and the logits are left out (O(B·(D + V)) bytes).
    `param_bytes` and `cache_bytes` are bytes per element. Our decode step attends over the
    whole static cache, so pass max_len to model this implementation, or the filled length
    to model an ideal kernel. With MoE blocks P counts every expert, so the flops are those of
    the dense-equivalent model, B slots per expert: exact at batch 1, where each expert computes
    one slot; above, an expert computes C = min(ceil(cf·B·k/E), B) <= B slots, so this is an
    upper bound (dispatch and combine left out; see models.moe.moe_layer_cost). The weight
    bytes stay right: the capacity-padded einsums read every expert's weights.
    """
    P, DV = num_non_embedding_params(cfg), cfg.d_model * cfg.vocab_size
    kv_per_position = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim
    flops = 2 * batch * (P + DV) + 4 * batch * cfg.n_layers * cfg.n_heads * cfg.head_dim * cache_len
    weight_bytes = param_bytes * (P + DV)
    kv_bytes = batch * kv_per_position * (cache_len + 1) * cache_bytes
    return {"flops": float(flops), "bytes": float(weight_bytes + kv_bytes)}


def prefill_cost(
    cfg: DecoderConfig, batch: int, prompt_len: int, param_bytes: float, cache_bytes: float
) -> dict[str, float]:
    """Model FLOPs and HBM bytes of prefilling `batch` prompts of `prompt_len` tokens.

    flops (FLOP) = 2·B·L·P weight matmuls + 2·B·D·V unembedding at the last token only
                 + 4·B·n_layers·N·H·L² for QKᵀ and AV over the full L x L score matrix, as this
                   implementation computes it (an ideal causal kernel does half).
    bytes (B) = param_bytes·(P + D·V) weights read once
              + B·2·n_layers·K·H·L·cache_bytes K/V written to the cache.
    Activations are left out. `param_bytes` and `cache_bytes` are bytes per element.
    With MoE blocks the flops count every expert for every token (see decode_step_cost).
    """
    P, DV = num_non_embedding_params(cfg), cfg.d_model * cfg.vocab_size
    L = prompt_len
    attention = 4 * batch * cfg.n_layers * cfg.n_heads * cfg.head_dim * L * L
    flops = 2 * batch * L * P + 2 * batch * DV + attention
    kv_bytes = batch * 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * L * cache_bytes
    return {"flops": float(flops), "bytes": float(param_bytes * (P + DV) + kv_bytes)}
