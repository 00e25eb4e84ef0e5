"""Tests for the decoder and its KV cache: cached inference must agree with the full forward.

Letters in array names: B batch, L prompt length, T total length, V vocab.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import attention, decoder, decoding, kv_cache
from models.decoder import Decoder, DecoderConfig

CFG = DecoderConfig(
    vocab_size=61,
    d_model=32,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    head_dim=8,
    mlp_dim=48,
    max_seq_len=32,
)
MAX_LEN = 16
PROMPT_LEN = 7
LENGTHS = (5, 1, 7)  # different prompt lengths in one batch; 1 covers position 0
TOTAL_LEN = MAX_LEN  # decode fills the cache of the longest prompt
TOL = 1e-4


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef: nnx.GraphDef, params: nnx.State, tokens_BxL) -> jax.Array:
    return nnx.merge(graphdef, params)(tokens_BxL)


def _split_random_model(cfg: DecoderConfig, seed: int = 0):
    """nnx.split of a Decoder whose weights are drawn by numpy.

    The module is built abstractly: drawing its weights with jax.random would compile one
    program per weight shape, seconds of a test this small.
    """
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)

    def draw(x):
        if x.ndim == 1:  # RMSNorm scales
            return (1 + 0.1 * rng.standard_normal(x.shape)).astype(x.dtype)
        return (rng.standard_normal(x.shape) / np.sqrt(x.shape[0])).astype(x.dtype)

    return graphdef, jax.device_put(jax.tree.map(draw, abstract))


def _with_cache(graphdef: nnx.GraphDef, params: nnx.State, batch: int, max_len: int):
    model = nnx.merge(graphdef, params, copy=True)
    model.init_cache(batch, max_len)
    return nnx.split(model, nnx.Param, nnx.Cache)


def _setup(n_kv_heads: int = CFG.n_kv_heads, n_layers: int = CFG.n_layers):
    return _setup_once(n_kv_heads, n_layers)  # one cache key however it is called


@functools.cache
def _setup_once(n_kv_heads: int, n_layers: int):
    """A model without a cache, its jitted cached functions and reference sequences.

    Glue is numpy: eager jnp ops would each compile once, which dominates a test this small.
    """
    cfg = dataclasses.replace(CFG, n_kv_heads=n_kv_heads, n_layers=n_layers)
    graphdef, params = _split_random_model(cfg)
    cached_graphdef, _, _ = _with_cache(graphdef, params, len(LENGTHS), MAX_LEN)
    rng = np.random.default_rng(1)
    tokens_BxL = rng.integers(0, cfg.vocab_size, (len(LENGTHS), TOTAL_LEN), dtype=np.int32)
    # Padding differs from the tokens that decode later writes at those positions.
    pad_BxL = rng.integers(0, cfg.vocab_size, (len(LENGTHS), PROMPT_LEN), dtype=np.int32)
    lengths_B = np.array(LENGTHS, np.int32)
    prompt_BxL = np.where(
        np.arange(PROMPT_LEN) < lengths_B[:, None], tokens_BxL[:, :PROMPT_LEN], pad_BxL
    )
    return dict(
        graphdef=graphdef,
        params=params,
        prefill_fn=decoding.make_prefill_fn(cached_graphdef),
        decode_fn=decoding.make_decode_fn(cached_graphdef),
        tokens_BxL=tokens_BxL,
        prompt_BxL=prompt_BxL,
        lengths_B=lengths_B,
        full_BxLxV=np.asarray(_forward(graphdef, params, tokens_BxL)),
    )


def _run_cached(s, batch: int, cache_batch: int = len(LENGTHS)):
    """Prefill then teacher-forced decode; returns per-position errors and the final cache."""
    _, params, cache = _with_cache(s["graphdef"], s["params"], cache_batch, MAX_LEN)
    lengths_B = s["lengths_B"][:batch]
    rows_B = np.arange(batch)
    full_BxLxV = s["full_BxLxV"][:batch]
    logits_BxV, cache = s["prefill_fn"](params, cache, s["prompt_BxL"][:batch], lengths_B)
    errors = [np.abs(np.asarray(logits_BxV) - full_BxLxV[rows_B, lengths_B - 1]).max()]
    for step in range(TOTAL_LEN - max(LENGTHS)):
        positions_B = lengths_B + step
        token_B = s["tokens_BxL"][rows_B, positions_B]
        logits_BxV, cache = s["decode_fn"](params, cache, token_B)
        errors.append(np.abs(np.asarray(logits_BxV) - full_BxLxV[rows_B, positions_B]).max())
    return errors, cache


# The extremes of grouped-query attention use one layer: the grouping is what they test.
@pytest.mark.parametrize(
    "n_kv_heads, n_layers",
    [(4, 1), (CFG.n_kv_heads, CFG.n_layers), (1, 1)],
    ids=["mha", "gqa", "mqa"],
)
def test_prefill_and_decode_match_full_forward(n_kv_heads, n_layers):
    s = _setup(n_kv_heads, n_layers)
    errors, cache = _run_cached(s, batch=len(LENGTHS))
    assert max(errors) < TOL, errors
    steps = TOTAL_LEN - max(LENGTHS)
    for layer in cache["blocks"].values():
        np.testing.assert_array_equal(
            layer["attn"]["cache"]["lengths"][...], np.array(LENGTHS) + steps
        )


def _layout_run(s, layout: str):
    """Prefill and teacher-forced decode with the cache in `layout`: (logits per call, cache)."""
    graphdef, _ = _split_random_model(dataclasses.replace(CFG, cache_layout=layout))
    graphdef, params, cache = _with_cache(graphdef, s["params"], len(LENGTHS), MAX_LEN)
    prefill_fn, decode_fn = decoding.make_prefill_fn(graphdef), decoding.make_decode_fn(graphdef)
    logits_BxV, cache = prefill_fn(params, cache, s["prompt_BxL"], s["lengths_B"])
    logits = [np.asarray(logits_BxV)]
    rows_B = np.arange(len(LENGTHS))
    for step in range(TOTAL_LEN - max(LENGTHS)):
        token_B = s["tokens_BxL"][rows_B, s["lengths_B"] + step]
        logits_BxV, cache = decode_fn(params, cache, token_B)
        logits.append(np.asarray(logits_BxV))
    return np.stack(logits), cache


def test_decode_is_the_same_in_every_cache_layout():
    s = _setup()
    runs = {layout: _layout_run(s, layout) for layout in kv_cache.LAYOUTS}
    (logits_a, cache_a), (logits_b, cache_b) = runs["bskh"], runs["bksh"]
    # Same products summed in another order: equal to float32 rounding, not bit for bit.
    np.testing.assert_allclose(logits_a, logits_b, rtol=1e-5, atol=1e-5)
    assert np.abs(logits_a - s["full_BxLxV"][0, 0]).max() > 1e-2  # the logits are not trivial
    for layer_a, layer_b in zip(
        cache_a["blocks"].values(), cache_b["blocks"].values(), strict=True
    ):
        k_bskh, k_bksh = layer_a["attn"]["cache"]["k"][...], layer_b["attn"]["cache"]["k"][...]
        k_bksh = k_bksh.reshape(len(LENGTHS), CFG.n_kv_heads, MAX_LEN, CFG.head_dim)
        np.testing.assert_allclose(k_bskh, np.swapaxes(k_bksh, 1, 2), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("layout", kv_cache.LAYOUTS)
@pytest.mark.parametrize("batch", [1, 3, 4])
def test_cache_writes_agree_in_every_update(layout, batch):
    """The loop and the scatter write the same positions, for a batch that fills the cache
    (4), a smaller one (3) and one sequence; other slots stay untouched."""
    K, S, H = 2, 6, 3
    rng = np.random.default_rng(0)
    shape = (4 * K, S, H) if layout == "bksh" else (4, S, K, H)
    cache = rng.standard_normal(shape).astype(np.float32)
    new_BxKxH = rng.standard_normal((batch, K, H)).astype(np.float32)
    positions_B = np.array([5, 0, 3, 2][:batch], np.int32)
    expected = cache.reshape(4, K, S, H).copy() if layout == "bksh" else cache.copy()
    for b, p in enumerate(positions_B):
        if layout == "bksh":
            expected[b, :, p] = new_BxKxH[b]
        else:
            expected[b, p] = new_BxKxH[b]
    for update in kv_cache.UPDATES:
        args = (jnp.asarray(cache), jnp.asarray(new_BxKxH), jnp.asarray(positions_B))
        out = kv_cache.write_positions(*args, layout, update)
        np.testing.assert_array_equal(np.asarray(out).reshape(expected.shape), expected)


@pytest.mark.parametrize("update", kv_cache.UPDATES)
@pytest.mark.parametrize("layout, batch", [("bskh", 8), ("bksh", 8), ("bksh", 1)])
def test_decode_step_writes_the_donated_cache_in_place(layout, batch, update):
    """The compiled step aliases every cache buffer to its output; with "bksh" it also makes no
    cache-sized temporary, so neither a copy of the cache nor a transposed one can hide (at
    batch 1 a [B, K, S, H] cache was copied every step: XLA drops the size-1 axis)."""
    cfg = dataclasses.replace(CFG, cache_layout=layout, cache_update=update)
    model = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
    max_len = CFG.max_seq_len
    model.init_cache(batch, max_len)
    graphdef, params, cache = nnx.split(model, nnx.Param, nnx.Cache)
    zeros = lambda x: jnp.zeros(x.shape, x.dtype)  # noqa: E731
    params, cache = jax.tree.map(zeros, params), jax.tree.map(zeros, cache)
    tokens_B = jnp.zeros((batch,), jnp.int32)
    memory = decoding.make_decode_fn(graphdef).lower(params, cache, tokens_B).compile()
    memory = memory.memory_analysis()
    cache_bytes = sum(x.nbytes for x in jax.tree.leaves(cache))
    assert memory.alias_size_in_bytes == cache_bytes
    one_k_bytes = batch * max_len * CFG.n_kv_heads * CFG.head_dim * 4
    if layout == "bksh":
        assert memory.temp_size_in_bytes < one_k_bytes, (memory.temp_size_in_bytes, one_k_bytes)


def test_bfloat16_compute_and_cache_stay_close_to_float32():
    s = _setup()
    cfg = dataclasses.replace(CFG, dtype="bfloat16", cache_dtype="bfloat16")
    graphdef, _ = _split_random_model(cfg)  # float32 weights: _setup's params fit
    graphdef, _, cache = _with_cache(graphdef, s["params"], len(LENGTHS), MAX_LEN)
    assert cache["blocks"][0]["attn"]["cache"]["k"].dtype == jnp.bfloat16
    bf16 = dict(
        s,
        prefill_fn=decoding.make_prefill_fn(graphdef),
        decode_fn=decoding.make_decode_fn(graphdef),
    )
    errors, _ = _run_cached(bf16, batch=len(LENGTHS))
    # bfloat16 keeps ~3 significant digits; these logits have std ~1, a cache bug errs by ~1.
    assert max(errors) < 0.2, errors


def test_grouped_query_heads_share_kv_head_n_over_g():
    """Query head n reads kv head n // G, the layout of repeating K/V heads G times."""
    rng = np.random.default_rng(2)
    B, L, S, K, G, H = 2, 3, 5, 2, 3, 4
    q_BxLxNxH = rng.standard_normal((B, L, K * G, H)).astype(np.float32)
    k_BxSxKxH, v_BxSxKxH = rng.standard_normal((2, B, S, K, H)).astype(np.float32)
    mask_BxLxS = rng.random((B, L, S)) < 0.6
    mask_BxLxS[..., 0] = True
    out_BxLxNxH = jax.jit(attention.attend)(q_BxLxNxH, k_BxSxKxH, v_BxSxKxH, mask_BxLxS)

    k_BxSxNxH, v_BxSxNxH = np.repeat(k_BxSxKxH, G, axis=2), np.repeat(v_BxSxKxH, G, axis=2)
    scores_BxNxLxS = np.einsum("blnh,bsnh->bnls", q_BxLxNxH, k_BxSxNxH) / np.sqrt(H)
    scores_BxNxLxS = np.where(mask_BxLxS[:, None], scores_BxNxLxS, -np.inf)
    probs_BxNxLxS = np.exp(scores_BxNxLxS - scores_BxNxLxS.max(axis=-1, keepdims=True))
    probs_BxNxLxS /= probs_BxNxLxS.sum(axis=-1, keepdims=True)
    expected_BxLxNxH = np.einsum("bnls,bsnh->blnh", probs_BxNxLxS, v_BxSxNxH)
    np.testing.assert_allclose(out_BxLxNxH, expected_BxLxNxH, atol=1e-5)


def test_smaller_batch_uses_the_first_cache_slots():
    s = _setup()
    errors, cache = _run_cached(s, batch=2, cache_batch=3)
    assert max(errors) < TOL, errors
    steps = TOTAL_LEN - max(LENGTHS)
    lengths = cache["blocks"][0]["attn"]["cache"]["lengths"][...]
    np.testing.assert_array_equal(lengths, [LENGTHS[0] + steps, LENGTHS[1] + steps, 0])


def test_full_forward_is_causal():
    s = _setup()
    t = 6
    tokens_BxL = s["tokens_BxL"].copy()
    tokens_BxL[:, t] = (tokens_BxL[:, t] + 1) % CFG.vocab_size
    perturbed_BxLxV = np.asarray(_forward(s["graphdef"], s["params"], tokens_BxL))
    np.testing.assert_allclose(perturbed_BxLxV[:, :t], s["full_BxLxV"][:, :t], atol=1e-6)
    changed_BxL = np.abs(perturbed_BxLxV - s["full_BxLxV"]).max(axis=-1)[:, t:] > 1e-3
    assert changed_BxL.all()


def test_cached_greedy_generation_matches_recomputing_the_full_forward():
    s = _setup()
    steps = TOTAL_LEN - PROMPT_LEN
    graphdef, params, cache = _with_cache(s["graphdef"], s["params"], len(LENGTHS), MAX_LEN)
    generate_fn = decoding.make_generate_fn(graphdef, steps)
    generated_BxO, cache = generate_fn(params, cache, s["prompt_BxL"], s["lengths_B"])
    assert generated_BxO.shape == (len(LENGTHS), steps)

    rows_B = np.arange(len(LENGTHS))
    tokens_BxL = np.zeros((len(LENGTHS), TOTAL_LEN), np.int32)
    tokens_BxL[:, :PROMPT_LEN] = s["prompt_BxL"]
    expected = []
    for step in range(steps):
        positions_B = s["lengths_B"] + step
        logits_BxLxV = _forward(s["graphdef"], s["params"], tokens_BxL)
        token_B = np.asarray(logits_BxLxV)[rows_B, positions_B - 1].argmax(axis=-1)
        tokens_BxL[rows_B, positions_B] = token_B
        expected.append(token_B)
    np.testing.assert_array_equal(generated_BxO, np.stack(expected, axis=1))
    np.testing.assert_array_equal(
        cache["blocks"][1]["attn"]["cache"]["lengths"][...], np.array(LENGTHS) + steps - 1
    )


def test_decode_compiles_once_as_the_cache_fills():
    s = _setup()
    _, params, cache = _with_cache(s["graphdef"], s["params"], len(LENGTHS), MAX_LEN)
    decode_fn = s["decode_fn"]  # other tests may have compiled it for other shapes
    _, cache = decode_fn(params, cache, np.zeros((len(LENGTHS),), np.int32))
    compiled = decode_fn._cache_size()
    for step in range(1, MAX_LEN):  # the cache fills from empty to full
        _, cache = decode_fn(params, cache, np.full((len(LENGTHS),), step, np.int32))
    assert decode_fn._cache_size() == compiled
    np.testing.assert_array_equal(cache["blocks"][0]["attn"]["cache"]["lengths"][...], MAX_LEN)


def test_jitted_prefill_and_decode_donate_the_cache():
    s = _setup()
    _, params, cache = _with_cache(s["graphdef"], s["params"], len(LENGTHS), MAX_LEN)
    _, new_cache = s["prefill_fn"](params, cache, s["prompt_BxL"], s["lengths_B"])
    assert all(x.is_deleted() for x in jax.tree.leaves(cache))
    _, newer_cache = s["decode_fn"](params, new_cache, s["tokens_BxL"][:, 0])
    assert all(x.is_deleted() for x in jax.tree.leaves(new_cache))
    assert not any(x.is_deleted() for x in jax.tree.leaves(newer_cache))
    assert not any(x.is_deleted() for x in jax.tree.leaves(params))


@pytest.mark.parametrize(
    "layout, shape",
    [("bskh", (3, MAX_LEN, 1, CFG.head_dim)), ("bksh", (3 * 1, MAX_LEN, CFG.head_dim))],
)
def test_cache_exists_only_after_init_cache_and_stores_kv_heads(layout, shape):
    cfg = dataclasses.replace(CFG, n_kv_heads=1, cache_layout=layout)
    model = nnx.merge(*_split_random_model(cfg))
    assert not jax.tree.leaves(nnx.state(model, nnx.Cache))
    model.init_cache(3, MAX_LEN, dtype="bfloat16")
    cache = model.blocks[0].attn.cache
    assert cache.k.shape == cache.v.shape == shape
    assert cache.max_len == MAX_LEN and cache.layout == layout
    assert cache.k.dtype == jnp.bfloat16
    assert cache.lengths.shape == (3,) and cache.lengths.dtype == jnp.int32
    assert len(jax.tree.leaves(nnx.state(model, nnx.Cache))) == 3 * CFG.n_layers


def test_named_scopes_appear_in_the_lowered_decode_step():
    s = _setup()
    _, params, cache = _with_cache(s["graphdef"], s["params"], len(LENGTHS), MAX_LEN)
    text = s["decode_fn"].lower(params, cache, s["tokens_BxL"][:, 0]).as_text(debug_info=True)
    for scope in ("attention", "kv_cache_update", "mlp"):
        assert f"{scope}/" in text, scope


@pytest.mark.parametrize(
    "changes",
    [dict(tie_embeddings=True), dict(tie_embeddings=False), dict(n_kv_heads=1, n_layers=3)],
)
def test_num_params_matches_the_module(changes):
    cfg = dataclasses.replace(CFG, **changes)
    state = nnx.state(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    sizes = {jax.tree_util.keystr(path): x.size for path, x in jax.tree.leaves_with_path(state)}
    assert decoder.num_params(cfg) == sum(sizes.values())
    non_embedding = sum(n for path, n in sizes.items() if "embed" not in path)
    assert decoder.num_non_embedding_params(cfg) == non_embedding
    has_unembed = any("unembed" in path for path in sizes)
    assert has_unembed == (not cfg.tie_embeddings)


def test_tied_embeddings_save_one_table():
    tied = dataclasses.replace(CFG, tie_embeddings=True)
    untied = dataclasses.replace(CFG, tie_embeddings=False)
    assert decoder.num_params(untied) - decoder.num_params(tied) == CFG.vocab_size * CFG.d_model
    assert decoder.num_non_embedding_params(untied) == decoder.num_non_embedding_params(tied)


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(n_heads=6, n_kv_heads=4), "n_heads must be a multiple of model.n_kv_heads"),
        (dict(d_model=0), "d_model must be a positive integer, got 0"),
        (dict(head_dim=7), "head_dim must be even"),
        (dict(cache_dtype="int8"), "unknown dtype 'int8'"),
    ],
)
def test_bad_config_is_rejected(changes, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(CFG, **changes)


def test_bad_inputs_are_rejected():
    model = nnx.merge(*_split_random_model(CFG))
    lengths_B = np.ones((3,), np.int32)
    with pytest.raises(ValueError, match="no KV cache"):
        model.prefill(np.zeros((3, 4), np.int32), lengths_B)
    with pytest.raises(ValueError, match="max_len must be <= model.max_seq_len=32, got 33"):
        model.init_cache(3, 33)
    model.init_cache(3, MAX_LEN)
    with pytest.raises(ValueError, match="prompt length 17 is longer than the cache's max_len 16"):
        model.prefill(np.zeros((3, MAX_LEN + 1), np.int32), lengths_B)
    with pytest.raises(ValueError, match="batch 4 is larger than the cache's batch 3"):
        model.prefill(np.zeros((4, 4), np.int32), np.ones((4,), np.int32))
    with pytest.raises(ValueError, match="batch 4 is larger than the cache's batch 3"):
        model.decode_step(np.zeros((4,), np.int32))
    with pytest.raises(ValueError, match="lengths must have shape"):
        model.prefill(np.zeros((3, 4), np.int32), np.ones((2,), np.int32))
    graphdef, params, cache = nnx.split(model, nnx.Param, nnx.Cache)
    with pytest.raises(ValueError, match="does not fit the cache's max_len 16"):
        decoding.generate(graphdef, params, cache, np.zeros((3, 8), np.int32), lengths_B, 10)
