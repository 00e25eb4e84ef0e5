"""A decoder-only transformer with the KV cache inside attention (MaxText style).

Blocks are pre-norm. A block runs RMSNorm, grouped-query self-attention with rotary
positions, and a residual add. It then runs RMSNorm, a SwiGLU MLP, and a residual add.

Three modes share the weights:

- Full forward, `model(tokens_BxL) -> logits_BxLxV`. It is causal and uses no cache. This is
  the training shape.
- Prefill, `model.prefill(tokens_BxL, lengths_B) -> logits_BxV`. A right-padded prompt batch
  writes the cache. It returns the logits at each sequence's last real token.
- Decode, `model.decode_step(tokens_B) -> logits_BxV`. Each sequence gets one token, written
  at that sequence's own position. Attention runs over the whole static cache under a length
  mask. It reads the cache in its own layout (`cache_layout`, models.kv_cache.attend_cache).

The cache exists only after `model.init_cache(batch, max_len)`. The harness jits the pure
functions of models.decoding. They take the state split as `graphdef, params, cache =
nnx.split(model, WEIGHTS, nnx.Cache)`.

With `moe_every = n > 0`, some blocks use a mixture of experts instead of SwiGLU. Block `layer` is
one when (layer + 1) % n == 0 (blocks n-1, 2n-1, ...). Each MoE layer has `num_experts` SwiGLU
experts of hidden dim `mlp_dim`.

A routing group is the set of tokens a router sees together. Each mode makes its own groups.

- Full forward and prefill of a [B, L] batch flatten the tokens in order, sequence by
  sequence. They cut them into groups of `moe_group_size`. The default 0 means one group per
  sequence (L tokens). So no sequence's routing depends on another's.
- Prefill's padding tokens route too. They can take expert capacity that real tokens of
  their group would otherwise get.
- A decode step routes its B tokens, one per sequence, whatever `moe_group_size`. They form
  `decode_groups` groups of B / decode_groups tokens, one group by default.

Each mode takes `stats=True` to also return the routing statistics. They come as one dict per
MoE block (models.routers.routing_stats), in block order.

Letters in array names (models/__init__.py):

- B batch, L length, S cache slots per sequence (max_len).
- D model dim, F MLP hidden dim, V vocab.
- N query heads, K kv heads, H head dim.
- Q query heads per kv head, so N = K·Q.
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
    """The MoE layer of a decoder block: an MoELayer whose routing group the block picks.

    A full forward or prefill routes groups of `moe_group_size` tokens. The default is one
    sequence's L tokens. A decode step routes its B tokens in `decode_groups` groups.
    """


class Block(nnx.Module):
    """A pre-norm block, x_BxLxD -> x_BxLxD.

    It computes x + attention(norm(x)), then x + mlp(norm(x)). With `stats=True` each mode
    also returns the MLP's routing stats. A SwiGLU block returns None for them.
    """

    def __init__(self, cfg: DecoderConfig, layer: int, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.attn_norm = _rms_norm(cfg, rngs)
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = _rms_norm(cfg, rngs)
        self.mlp = self.make_mlp(cfg, layer, rngs=rngs)

    def make_mlp(self, cfg: DecoderConfig, layer: int, *, rngs: nnx.Rngs) -> nnx.Module:
        """The one place a block picks its MLP.

        Any module mapping x_BxLxD -> y_BxLxD fits. Blocks in `moe_layers(cfg)` get a
        mixture of experts, and the others get SwiGLU.
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
        """Full causal forward without a cache."""
        x_BxLxD = x_BxLxD + self.attn(self.attn_norm(x_BxLxD))
        y, s = self._mlp(x_BxLxD, self._sequence_group(x_BxLxD.shape[1]))
        return (y, s) if stats else y

    def prefill(self, x_BxLxD: jax.Array, lengths_B: jax.Array, *, stats: bool = False):
        """Prefill of a right-padded prompt.

        It writes the prompt's keys and values to the cache.
        """
        x_BxLxD = x_BxLxD + self.attn.prefill(self.attn_norm(x_BxLxD), lengths_B)
        y, s = self._mlp(x_BxLxD, self._sequence_group(x_BxLxD.shape[1]))
        return (y, s) if stats else y

    def extend(self, x_BxCxD: jax.Array, counts_B: jax.Array, *, stats: bool = False):
        """The next C tokens of each sequence after its cached ones (a prompt's chunk)."""
        x_BxCxD = x_BxCxD + self.attn.extend(self.attn_norm(x_BxCxD), counts_B)
        y, s = self._mlp(x_BxCxD, self._sequence_group(x_BxCxD.shape[1]))
        return (y, s) if stats else y

    def decode(self, x_BxD: jax.Array, *, stats: bool = False):
        """One token per sequence. The MoE routes the B tokens in cfg.decode_groups groups."""
        x_BxD = x_BxD + self.attn.decode(self.attn_norm(x_BxD))
        group_size = x_BxD.shape[0] // self.cfg.decode_groups
        x_Bx1xD, s = self._mlp(x_BxD[:, None], group_size=group_size)
        return (x_Bx1xD[:, 0], s) if stats else x_Bx1xD[:, 0]


class Decoder(nnx.Module):
    """Maps int tokens to float32 logits over `vocab_size`.

    The module docstring describes its three modes.
    """

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

        With `stats` it also returns one routing_stats dict per MoE block. The list is empty
        for a dense model. Each MoE routes groups of model.moe_group_size tokens. The default
        0 makes one group per sequence.
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
        Each length must lie in [1, L]. Inside jit this cannot be checked. Sequences go to
        cache slots [0, B), and the prompt goes to positions [0, L). So prefill starts every
        sequence afresh.

        With `stats` it also returns one routing_stats dict per MoE block. They count every
        prompt position, since padding routes like any token.
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

    def extend(self, tokens_BxC: jax.Array, counts_B: jax.Array, *, stats: bool = False):
        """Appends a chunk of C tokens per sequence after its cached ones (chunked prefill).

        Sequence b's first counts_B[b] tokens are real, the rest padding. Returns logits_BxV at
        its last real token. A prompt prefilled in chunks (prefill, then extend) gives the
        logits and cache of prefilling it at once (tests/test_chunked_prefill.py). The caller keeps
        every length + C within max_len. An MoE block routes each chunk as one group.
        """
        if tokens_BxC.ndim != 2:
            raise ValueError(f"chunk must be [batch, length], got shape {tokens_BxC.shape}")
        self._check_batch(tokens_BxC.shape[0])
        x_BxCxD = self.embed(tokens_BxC)
        all_stats = []
        for block in self.blocks:
            x_BxCxD, s = block.extend(x_BxCxD, counts_B, stats=True)
            _collect(all_stats, s)
        last_B = jnp.clip(counts_B - 1, 0, tokens_BxC.shape[1] - 1)
        x_BxD = jnp.take_along_axis(x_BxCxD, last_B[:, None, None], axis=1)[:, 0]
        logits = self._logits(x_BxD)
        return (logits, all_stats) if stats else logits

    def decode_step(self, tokens_B: jax.Array, *, stats: bool = False):
        """Appends one token per sequence, each at its own position.

        Returns the next logits_BxV. The caller keeps every length below the cache's max_len
        (see KVCache). Each MoE routes the step's B tokens in cfg.decode_groups groups, one
        by default. Under expert-choice a sequence's next token then depends on the other
        sequences of its group. With `stats` it also returns the routing stats.
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
        Blocks without a routing bias are left alone.
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
