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
functions of models.decoding over `graphdef, params, cache = nnx.split(model, WEIGHTS,
nnx.Cache)`.

Mixture of experts: with `moe_every = n > 0`, block `layer` uses an MoE layer instead of SwiGLU
when (layer + 1) % n == 0 (blocks n-1, 2n-1, ...). Each has `num_experts` SwiGLU experts of
hidden dim `mlp_dim`. Its routing group, the tokens a router sees together, is:

- full forward and prefill of a [B, L] batch: the tokens flattened in order (sequence by
  sequence) and cut into groups of `moe_group_size`; 0 means one group per sequence (L tokens),
  so no sequence's routing depends on another's. Prefill's padding tokens route too, so they
  can take expert capacity that real tokens of their group would otherwise get;
- decode step: the B tokens of the step, one per sequence, whatever `moe_group_size`.

Each mode takes `stats=True` to also return the routing statistics: one dict per MoE block
(models.routers.routing_stats), in block order.

Letters in array names (models/__init__.py): B batch, L length, S cache slots per sequence
(max_len), D model dim, K kv heads, Q query heads per kv head, N query heads (N = K·Q),
H head dim, V vocab, F mlp dim.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from models import partitioning
from models.attention import EMBED_INIT, Attention, dense
from models.decoder_config import (  # noqa: F401 - the decoder's config and counts
    DecoderConfig,
    moe_layers,
    num_active_params,
    num_non_embedding_params,
    num_params,
)
from models.dtypes import resolve_dtype
from models.kv_cache import KVCache
from models.moe import MoELayer, RouterBias

Stats = dict[str, jax.Array]


def _rms_norm(cfg: DecoderConfig, rngs: nnx.Rngs) -> nnx.RMSNorm:
    return nnx.RMSNorm(
        cfg.d_model,
        dtype=resolve_dtype(cfg.dtype),
        param_dtype=resolve_dtype(cfg.param_dtype),
        scale_init=partitioning.param_init(nnx.initializers.ones_init(), "embed"),
        rngs=rngs,
    )


class SwiGLU(nnx.Module):
    """x_BxLxD -> y_BxLxD as down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
        self.gate = dense(cfg, cfg.d_model, cfg.mlp_dim, rngs, ("embed", "mlp"))
        self.up = dense(cfg, cfg.d_model, cfg.mlp_dim, rngs, ("embed", "mlp"))
        self.down = dense(cfg, cfg.mlp_dim, cfg.d_model, rngs, ("mlp", "embed"))

    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        h_BxLxF = jax.nn.silu(self.gate(x_BxLxD)) * self.up(x_BxLxD)
        return self.down(h_BxLxF)


class DecoderMoE(MoELayer):
    """The MoE a decoder block uses: an MoELayer whose routing group the block picks per
    call (L tokens of a sequence in a full forward, the B tokens of a decode step)."""


class Block(nnx.Module):
    """Pre-norm block: x + attention(norm(x)), then x + mlp(norm(x)); x_BxLxD -> x_BxLxD.

    With `stats=True` each mode also returns the MoE layer's routing stats (None for SwiGLU).
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
                y_BxLxD, stats = self.mlp(h_BxLxD, group_size, stats=True)
            else:
                y_BxLxD, stats = self.mlp(h_BxLxD), None
            return x_BxLxD + y_BxLxD, stats

    def _sequence_group(self, length: int) -> int:
        return self.cfg.moe_group_size or length

    def __call__(self, x_BxLxD: jax.Array, *, stats: bool = False):
        """Full forward: causal, no cache."""
        x_BxLxD = x_BxLxD + self.attn(self.attn_norm(x_BxLxD))
        y, s = self._mlp(x_BxLxD, self._sequence_group(x_BxLxD.shape[1]))
        return (y, s) if stats else y

    def prefill(self, x_BxLxD: jax.Array, lengths_B: jax.Array, *, stats: bool = False):
        """Prefill of a right-padded prompt; writes its K/V to the cache."""
        x_BxLxD = x_BxLxD + self.attn.prefill(self.attn_norm(x_BxLxD), lengths_B)
        y, s = self._mlp(x_BxLxD, self._sequence_group(x_BxLxD.shape[1]))
        return (y, s) if stats else y

    def decode(self, x_BxD: jax.Array, *, stats: bool = False):
        """One token per sequence. The MoE routes the B tokens in cfg.decode_groups groups."""
        x_BxD = x_BxD + self.attn.decode(self.attn_norm(x_BxD))
        group_size = x_BxD.shape[0] // self.cfg.decode_groups
        x_Bx1xD, s = self._mlp(x_BxD[:, None], group_size=group_size)
        return (x_Bx1xD[:, 0], s) if stats else x_Bx1xD[:, 0]


class Decoder(nnx.Module):
    """tokens (int) -> logits (float32) over `vocab_size`; see the module docstring for modes."""

    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = nnx.Embed(
            cfg.vocab_size,
            cfg.d_model,
            dtype=resolve_dtype(cfg.dtype),
            param_dtype=resolve_dtype(cfg.param_dtype),
            embedding_init=partitioning.param_init(EMBED_INIT, "vocab", "embed"),
            rngs=rngs,
        )
        self.blocks = nnx.List([Block(cfg, i, rngs=rngs) for i in range(cfg.n_layers)])
        self.final_norm = _rms_norm(cfg, rngs)
        self.unembed = (
            None
            if cfg.tie_embeddings
            else dense(cfg, cfg.d_model, cfg.vocab_size, rngs, ("embed", "vocab"))
        )

    def init_cache(self, batch: int, max_len: int, dtype: str | None = None) -> None:
        """Gives every attention layer an empty KVCache of `batch` x `max_len` positions.

        `dtype` names the cache's dtype (default `cfg.cache_dtype`). Its layout and update
        come from the config. Replaces any earlier cache.
        """
        for name, value in (("batch", batch), ("max_len", max_len)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"cache {name} must be a positive integer, got {value!r}")
        if max_len > self.cfg.max_seq_len:
            raise ValueError(
                f"cache max_len must be <= model.max_seq_len={self.cfg.max_seq_len}, got {max_len}"
            )
        cache_dtype = resolve_dtype(self.cfg.cache_dtype if dtype is None else dtype)
        for block in self.blocks:
            block.attn.init_cache(batch, max_len, cache_dtype)

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

    def __call__(self, tokens_BxL: jax.Array, *, stats: bool = False):
        """Full causal forward without a cache: tokens_BxL -> logits_BxLxV.

        With `stats`, also one routing_stats dict per MoE block ([] if dense). Each MoE
        routes groups of model.moe_group_size tokens (0: one group per sequence).
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
            x_BxLxD, s = block(x_BxLxD, stats=True)
            _collect(all_stats, s)
        logits = self._logits(x_BxLxD)
        return (logits, all_stats) if stats else logits

    def prefill(self, tokens_BxL: jax.Array, lengths_B: jax.Array, *, stats: bool = False):
        """Writes a right-padded prompt batch into the cache.

        Returns logits_BxV at each sequence's last real token, position lengths_B[b] - 1.
        Each length must lie in [1, L]; inside jit that cannot be checked. Sequences go to
        cache slots [0, B) and the prompt to positions [0, L): prefill starts sequences
        afresh. With `stats`, also one routing_stats dict per MoE block. They count every
        prompt position: padding routes like any token.
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
            x_BxLxD, s = block.prefill(x_BxLxD, lengths_B, stats=True)
            _collect(all_stats, s)
        last_B = jnp.clip(lengths_B - 1, 0, length - 1)
        x_BxD = jnp.take_along_axis(x_BxLxD, last_B[:, None, None], axis=1)[:, 0]
        logits = self._logits(x_BxD)
        return (logits, all_stats) if stats else logits

    def decode_step(self, tokens_B: jax.Array, *, stats: bool = False):
        """Appends one token per sequence at its own position; returns the next logits_BxV.

        The caller keeps every length below the cache's max_len (see KVCache). Each MoE
        routes the step's B tokens as one group. Under expert-choice a sequence's next token
        then depends on the other sequences. With `stats`, also the routing stats.
        """
        if tokens_B.ndim != 1:
            raise ValueError(f"decode tokens must be [batch], got shape {tokens_B.shape}")
        self._check_batch(tokens_B.shape[0])
        x_BxD = self.embed(tokens_B)
        all_stats = []
        for block in self.blocks:
            x_BxD, s = block.decode(x_BxD, stats=True)
            _collect(all_stats, s)
        logits = self._logits(x_BxD)
        return (logits, all_stats) if stats else logits

    def update_router_bias(self, stats: list[Stats], rate: float) -> None:
        """Moves each MoE block's routing bias by its own step's loads.

        `stats` holds one dict per MoE block, in block order, as `stats=True` returns them.
        """
        layers = [b.mlp for b in self.blocks if isinstance(b.mlp, DecoderMoE)]
        if len(layers) != len(stats):
            raise ValueError(f"{len(stats)} routing stats for {len(layers)} MoE blocks")
        for layer, layer_stats in zip(layers, stats, strict=True):
            if layer.router_bias is not None:
                layer.update_router_bias(layer_stats, rate)


# What inference reads from a Decoder: its parameters and the routing biases training set
# (models.moe.RouterBias; none without model.router_bias). Split a model with
# nnx.split(model, WEIGHTS, nnx.Cache) where a decode step or prefill is jitted.
WEIGHTS = nnx.Any(nnx.Param, RouterBias)


def _collect(all_stats: list[Stats], stats: Stats | None) -> None:
    if stats is not None:
        all_stats.append(stats)
