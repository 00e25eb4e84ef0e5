"""A Decoder as pure functions over its split state.

The harness and the train step jit these functions. The state is split as `graphdef,
params, cache = nnx.split(model, models.decoder.WEIGHTS, nnx.Cache)`. Each function merges a
copy of the model and runs one of its modes. It returns the new cache beside the outputs.

Letters in array names (models/__init__.py): B batch, L length, V vocab, O generated tokens.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

# Pure functions over (params, cache) for the harness to jit. With `stats=True` each also
# returns one routing_stats dict per MoE block, last. Under jit, bind `stats` with
# functools.partial: it decides the output's structure.


def forward(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    tokens_BxL: jax.Array,
    *rest: nnx.State,
    stats: bool = False,
):
    """Decoder.__call__ as a pure function: logits_BxLxV, and the stats if asked.

    It is differentiable in params, stats["aux_loss"] and stats["z_loss"] included. The
    train step splits the routing biases off the parameters and hands them in `rest`.
    """
    model = nnx.merge(graphdef, params, *rest, copy=True)
    return model(tokens_BxL, stats=stats)


def prefill(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    cache: nnx.State,
    tokens_BxL: jax.Array,
    lengths_B: jax.Array,
    *,
    stats: bool = False,
):
    """Decoder.prefill as a pure function: (logits_BxV, new cache), then the stats if asked."""
    model = nnx.merge(graphdef, params, cache, copy=True)
    out = model.prefill(tokens_BxL, lengths_B, stats=stats)
    return _with_cache(out, model, stats)


def extend(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    cache: nnx.State,
    tokens_BxC: jax.Array,
    counts_B: jax.Array,
    *,
    stats: bool = False,
):
    """Decoder.extend as a pure function: (logits_BxV, new cache), then any stats."""
    model = nnx.merge(graphdef, params, cache, copy=True)
    out = model.extend(tokens_BxC, counts_B, stats=stats)
    return _with_cache(out, model, stats)


def decode_step(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    cache: nnx.State,
    tokens_B: jax.Array,
    *,
    stats: bool = False,
):
    """Decoder.decode_step as a pure function: (logits_BxV, new cache), then any stats."""
    model = nnx.merge(graphdef, params, cache, copy=True)
    out = model.decode_step(tokens_B, stats=stats)
    return _with_cache(out, model, stats)


def _with_cache(out, model: nnx.Module, stats: bool) -> tuple:
    cache = nnx.state(model, nnx.Cache)
    return (out[0], cache, out[1]) if stats else (out, cache)


def make_prefill_fn(graphdef: nnx.GraphDef) -> Callable:
    """jit of `prefill` with graphdef bound: fn(params, cache, tokens_BxL, lengths_B).

    The cache argument is donated. So the caller must use the returned cache.
    """

    def fn(params: nnx.State, cache: nnx.State, tokens_BxL: jax.Array, lengths_B: jax.Array):
        return prefill(graphdef, params, cache, tokens_BxL, lengths_B)

    return jax.jit(fn, donate_argnames="cache")


def make_decode_fn(graphdef: nnx.GraphDef) -> Callable:
    """jit of `decode_step` with graphdef bound: fn(params, cache, tokens_B).

    The cache argument is donated, as in make_prefill_fn.
    """

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

    Returns (tokens_BxO, cache) with O = steps. Token 0 comes from the prefill logits. Token
    t comes from the decode step fed token t-1. The last token is returned but not written.
    So the cache ends at lengths_B + steps - 1. `steps` sets shapes, so under jit mark it
    static.
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

    # [O - 1, B]: the tokens of the decode steps.
    (cache, _), tokens_OxB = jax.lax.scan(step, (cache, token_B), length=steps - 1)
    return jnp.concatenate([token_B[:, None], tokens_OxB.T], axis=1), cache


def make_generate_fn(graphdef: nnx.GraphDef, steps: int) -> Callable:
    """jit of `generate` with graphdef and steps bound.

    It is fn(params, cache, prompt_BxL, lengths_B), and the cache argument is donated.
    """

    def fn(params: nnx.State, cache: nnx.State, prompt_BxL: jax.Array, lengths_B: jax.Array):
        return generate(graphdef, params, cache, prompt_BxL, lengths_B, steps)

    return jax.jit(fn, donate_argnames="cache")
