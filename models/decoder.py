"""A decoder-only transformer with the KV cache inside attention (MaxText style).

Blocks are pre-norm: RMSNorm -> grouped-query self-attention with rotary positions -> residual
-> RMSNorm -> SwiGLU MLP -> residual. Three modes share the weights:

- full forward, `model(tokens_BxL) -> logits_BxLxV`: causal, no cache (training shape);
- prefill, `model.prefill(tokens_BxL, lengths_B) -> logits_BxV`: a right-padded prompt batch
  writes the cache and returns the logits at each sequence's last real token;
- decode, `model.decode_step(tokens_B) -> logits_BxV`: one token per sequence, written at that
  sequence's own position; attention runs over the whole static cache under a length mask.

The cache exists only after `model.init_cache(batch, max_len)`. The harness jits the pure
functions at the bottom over `graphdef, params, cache = nnx.split(model, nnx.Param, nnx.Cache)`.

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

from models.dtypes import resolve_dtype
from models.kv_cache import KVCache


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


def _dense(cfg: DecoderConfig, d_in: int, d_out: int, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(
        d_in,
        d_out,
        use_bias=False,
        dtype=resolve_dtype(cfg.dtype),
        param_dtype=resolve_dtype(cfg.param_dtype),
        rngs=rngs,
    )


def _rms_norm(cfg: DecoderConfig, rngs: nnx.Rngs) -> nnx.RMSNorm:
    return nnx.RMSNorm(
        cfg.d_model,
        dtype=resolve_dtype(cfg.dtype),
        param_dtype=resolve_dtype(cfg.param_dtype),
        rngs=rngs,
    )


class Attention(nnx.Module):
    """Self-attention with rotary positions and grouped-query heads; owns the KV cache."""

    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        D, N, K, H = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.query = _dense(cfg, D, N * H, rngs)
        self.key = _dense(cfg, D, K * H, rngs)
        self.value = _dense(cfg, D, K * H, rngs)
        self.out = _dense(cfg, N * H, D, rngs)
        self.cache = nnx.data(None)

    def init_cache(self, batch: int, max_len: int, dtype: jnp.dtype) -> None:
        self.cache = KVCache(batch, max_len, self.cfg.n_kv_heads, self.cfg.head_dim, dtype)

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
        k_BxSxKxH, v_BxSxKxH, lengths_B = self.cache.append(k_Bx1xKxH[:, 0], v_Bx1xKxH[:, 0])
        with jax.named_scope("attention"):
            mask_Bx1xS = (jnp.arange(self.cache.max_len) < lengths_B[:, None])[:, None]
            return self._output(attend(q_Bx1xNxH, k_BxSxKxH, v_BxSxKxH, mask_Bx1xS))[:, 0]


class SwiGLU(nnx.Module):
    """x_BxLxD -> y_BxLxD as down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
        self.gate = _dense(cfg, cfg.d_model, cfg.mlp_dim, rngs)
        self.up = _dense(cfg, cfg.d_model, cfg.mlp_dim, rngs)
        self.down = _dense(cfg, cfg.mlp_dim, cfg.d_model, rngs)

    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        h_BxLxF = jax.nn.silu(self.gate(x_BxLxD)) * self.up(x_BxLxD)
        return self.down(h_BxLxF)


class Block(nnx.Module):
    """Pre-norm block: x + attention(norm(x)), then x + mlp(norm(x)); x_BxLxD -> x_BxLxD."""

    def __init__(self, cfg: DecoderConfig, layer: int, *, rngs: nnx.Rngs):
        self.attn_norm = _rms_norm(cfg, rngs)
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = _rms_norm(cfg, rngs)
        self.mlp = self.make_mlp(cfg, layer, rngs=rngs)

    def make_mlp(self, cfg: DecoderConfig, layer: int, *, rngs: nnx.Rngs) -> nnx.Module:
        """The one place a block picks its MLP: any module mapping x_BxLxD -> y_BxLxD fits.

        `layer` is the block's index, so a mixture of experts can replace every n-th MLP here
        (num_params must then count it).
        """
        del layer
        return SwiGLU(cfg, rngs=rngs)

    def _mlp(self, x_BxLxD: jax.Array) -> jax.Array:
        with jax.named_scope("mlp"):
            return x_BxLxD + self.mlp(self.mlp_norm(x_BxLxD))

    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        return self._mlp(x_BxLxD + self.attn(self.attn_norm(x_BxLxD)))

    def prefill(self, x_BxLxD: jax.Array, lengths_B: jax.Array) -> jax.Array:
        return self._mlp(x_BxLxD + self.attn.prefill(self.attn_norm(x_BxLxD), lengths_B))

    def decode(self, x_BxD: jax.Array) -> jax.Array:
        x_BxD = x_BxD + self.attn.decode(self.attn_norm(x_BxD))
        return self._mlp(x_BxD[:, None])[:, 0]


class Decoder(nnx.Module):
    """tokens (int) -> logits (float32) over `vocab_size`; see the module docstring for modes."""

    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = nnx.Embed(
            cfg.vocab_size,
            cfg.d_model,
            dtype=resolve_dtype(cfg.dtype),
            param_dtype=resolve_dtype(cfg.param_dtype),
            rngs=rngs,
        )
        self.blocks = nnx.List([Block(cfg, i, rngs=rngs) for i in range(cfg.n_layers)])
        self.final_norm = _rms_norm(cfg, rngs)
        self.unembed = (
            None if cfg.tie_embeddings else _dense(cfg, cfg.d_model, cfg.vocab_size, rngs)
        )

    def init_cache(self, batch: int, max_len: int, dtype: str | None = None) -> None:
        """Gives every attention layer an empty KVCache of `batch` x `max_len` positions.

        `dtype` names the cache's dtype (default `cfg.cache_dtype`). Replaces any earlier cache.
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

    def __call__(self, tokens_BxL: jax.Array) -> jax.Array:
        """Full causal forward without a cache: tokens_BxL -> logits_BxLxV."""
        if tokens_BxL.ndim != 2:
            raise ValueError(f"tokens must be [batch, length], got shape {tokens_BxL.shape}")
        if tokens_BxL.shape[1] > self.cfg.max_seq_len:
            raise ValueError(
                f"tokens length {tokens_BxL.shape[1]} exceeds "
                f"model.max_seq_len={self.cfg.max_seq_len}"
            )
        x_BxLxD = self.embed(tokens_BxL)
        for block in self.blocks:
            x_BxLxD = block(x_BxLxD)
        return self._logits(x_BxLxD)

    def prefill(self, tokens_BxL: jax.Array, lengths_B: jax.Array) -> jax.Array:
        """Writes a right-padded prompt batch into the cache; returns logits_BxV at each
        sequence's last real token, position lengths_B[b] - 1.

        Each length must lie in [1, L]; inside jit that cannot be checked. Sequences go to cache
        slots [0, B) and the prompt to positions [0, L): prefill starts sequences afresh.
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
        for block in self.blocks:
            x_BxLxD = block.prefill(x_BxLxD, lengths_B)
        last_B = jnp.clip(lengths_B - 1, 0, length - 1)
        x_BxD = jnp.take_along_axis(x_BxLxD, last_B[:, None, None], axis=1)[:, 0]
        return self._logits(x_BxD)

    def decode_step(self, tokens_B: jax.Array) -> jax.Array:
        """Appends one token per sequence at its own position; returns the next logits_BxV.

        The caller keeps every length below the cache's max_len (see KVCache).
        """
        if tokens_B.ndim != 1:
            raise ValueError(f"decode tokens must be [batch], got shape {tokens_B.shape}")
        self._check_batch(tokens_B.shape[0])
        x_BxD = self.embed(tokens_B)
        for block in self.blocks:
            x_BxD = block.decode(x_BxD)
        return self._logits(x_BxD)


# Pure functions over (params, cache) for the harness to jit.


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


def num_params(cfg: DecoderConfig) -> int:
    """Exact parameter count of Decoder(cfg), embedding and unembedding included."""
    D, V = cfg.d_model, cfg.vocab_size
    attn = D * cfg.head_dim * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)
    mlp = 3 * D * cfg.mlp_dim
    per_block = attn + mlp + 2 * D
    unembed = 0 if cfg.tie_embeddings else D * V
    return V * D + cfg.n_layers * per_block + D + unembed


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
    to model an ideal kernel.
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
    """
    P, DV = num_non_embedding_params(cfg), cfg.d_model * cfg.vocab_size
    L = prompt_len
    attention = 4 * batch * cfg.n_layers * cfg.n_heads * cfg.head_dim * L * L
    flops = 2 * batch * L * P + 2 * batch * DV + attention
    kv_bytes = batch * 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * L * cache_bytes
    return {"flops": float(flops), "bytes": float(param_bytes * (P + DV) + kv_bytes)}
