"""A Decoder as pure functions over its split state, `graphdef, params, cache =
nnx.split(model, models.decoder.WEIGHTS, nnx.Cache)`: what the harness and the train step
jit. Each merges a copy of the model, runs one of its modes and returns the new cache beside
the outputs.

Letters in array names: B batch, L length, V vocab, T generated steps.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from models.decoder import Stats

# Pure functions over (params, cache) for the harness to jit.


def forward_with_stats(
    graphdef: nnx.GraphDef, params: nnx.State, tokens_BxL: jax.Array, *rest: nnx.State
) -> tuple[jax.Array, list[Stats]]:
    """Decoder.with_stats as a pure function: returns (logits_BxLxV, stats per MoE block).

    Differentiable in params, stats["aux_loss"] and stats["z_loss"] included: the train step,
    which splits the routing biases off the parameters and hands them in `rest`.
    """
    model = nnx.merge(graphdef, params, *rest, copy=True)
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
