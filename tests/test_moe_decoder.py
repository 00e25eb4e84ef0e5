"""MoE blocks inside the decoder: dense behaviour kept, cached inference exact when nothing
drops, counts exact, routing groups as documented, and claim C8's causality point.

Letters in array names: B batch, L prompt length, T total length, V vocab.
"""

import dataclasses
import functools

import jax
import numpy as np
import pytest
from flax import nnx

from models import decoder, decoding
from models.decoder import Decoder, DecoderConfig

DENSE = DecoderConfig(
    vocab_size=61,
    d_model=32,
    n_layers=4,
    n_heads=4,
    n_kv_heads=2,
    head_dim=8,
    mlp_dim=48,
    max_seq_len=32,
)
# Blocks 1 and 3 are MoE. Token-choice with capacity_factor = E / k gives every expert S slots
# per group: nothing can drop, so a token's routing depends only on the token itself.
MOE = dataclasses.replace(
    DENSE, moe_every=2, num_experts=4, top_k=2, capacity_factor=2.0, router="token_choice"
)
MAX_LEN = 16
PROMPT_LEN = 7
LENGTHS = (5, 1, 7)
TOL = 1e-4
STAT_KEYS = {
    "aux_loss",
    "aux_loss_batch",
    "z_loss",
    "tokens_per_expert",
    "tokens_per_expert_wanted",
    "load_cv",
    "max_mean_load",
    "drop_fraction",
    "token_drop_fraction",
    "expert_usage",
    "router_confidence",
    "router_entropy",
    "max_vio_group",
    "max_vio_batch",
    "experts_per_token",
    "f_e",
    "p_e",
}


def _random_model(cfg: DecoderConfig, seed: int = 0):
    """nnx.split of a Decoder with numpy-drawn weights (no per-shape jax.random compiles)."""
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)

    def draw(x):
        if x.ndim == 1:  # RMSNorm scales
            return (1 + 0.1 * rng.standard_normal(x.shape)).astype(x.dtype)
        fan_in = x.shape[-2]  # [in, out] kernels, [E, in, out] experts
        return (rng.standard_normal(x.shape) / np.sqrt(fan_in)).astype(x.dtype)

    return graphdef, jax.device_put(jax.tree.map(draw, abstract))


def _with_cache(graphdef, params, batch: int, max_len: int):
    model = nnx.merge(graphdef, params, copy=True)
    model.init_cache(batch, max_len)
    return nnx.split(model, nnx.Param, nnx.Cache)


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, params, tokens_BxL):
    return decoding.forward(graphdef, params, tokens_BxL, stats=True)


@functools.partial(jax.jit, static_argnums=0)
def _decode(graphdef, params, cache, tokens_B):
    return decoding.decode_step(graphdef, params, cache, tokens_B, stats=True)


@functools.cache
def _tokens(batch: int = len(LENGTHS), length: int = MAX_LEN) -> np.ndarray:
    return np.random.default_rng(1).integers(0, DENSE.vocab_size, (batch, length), np.int32)


def _param_sizes(cfg: DecoderConfig) -> dict[str, int]:
    state = nnx.state(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    return {jax.tree_util.keystr(p): x.size for p, x in jax.tree.leaves_with_path(state)}


def test_moe_every_0_is_the_dense_decoder():
    """MoE fields do nothing while moe_every is 0: same params from the same seed, same
    logits, same count."""
    off = dataclasses.replace(MOE, moe_every=0, router="expert_choice", num_experts=3)
    init = lambda cfg: jax.jit(lambda: nnx.split(Decoder(cfg, rngs=nnx.Rngs(3)))[1])()
    dense_params, off_params = init(DENSE), init(off)
    assert jax.tree.structure(dense_params) == jax.tree.structure(off_params)
    for a, b in zip(jax.tree.leaves(dense_params), jax.tree.leaves(off_params), strict=True):
        np.testing.assert_array_equal(a, b)
    assert decoder.num_params(off) == decoder.num_params(DENSE) == sum(_param_sizes(DENSE).values())
    assert decoder.num_active_params(off) == decoder.num_params(DENSE)
    assert decoder.moe_layers(off) == ()

    tokens_BxL = _tokens()
    dense_graphdef, _ = nnx.split(nnx.eval_shape(lambda: Decoder(DENSE, rngs=nnx.Rngs(0))))
    off_graphdef, _ = nnx.split(nnx.eval_shape(lambda: Decoder(off, rngs=nnx.Rngs(0))))
    dense_BxLxV, dense_stats = _forward(dense_graphdef, dense_params, tokens_BxL)
    off_BxLxV, off_stats = _forward(off_graphdef, off_params, tokens_BxL)
    np.testing.assert_array_equal(dense_BxLxV, off_BxLxV)
    assert dense_stats == off_stats == []


@functools.cache
def _moe_setup():
    graphdef, params = _random_model(MOE)
    tokens_BxL = _tokens()
    full_BxLxV, stats = _forward(graphdef, params, tokens_BxL)
    return graphdef, params, tokens_BxL, np.asarray(full_BxLxV), jax.device_get(stats)


def test_blocks_every_moe_every_are_moe_layers():
    graphdef, params, *_ = _moe_setup()
    model = nnx.merge(graphdef, params)
    kinds = [type(block.mlp).__name__ for block in model.blocks]
    assert kinds == ["SwiGLU", "DecoderMoE", "SwiGLU", "DecoderMoE"]
    assert decoder.moe_layers(MOE) == (1, 3)
    assert model.blocks[1].mlp.w_gate_ExDxF.shape == (4, MOE.d_model, MOE.mlp_dim)


@pytest.mark.parametrize("layout", ["bksh", "bskh"])
def test_prefill_and_decode_match_the_full_forward_when_nothing_drops(layout):
    """Full forward routes groups of T tokens, prefill groups of L, decode the B tokens of a
    step: with no drops under token-choice the logits still agree at every position, whatever
    the cache layout (the MoE decoder shares the dense decoder's attention)."""
    _, params, tokens_BxL, full_BxLxV, full_stats = _moe_setup()
    graphdef, _ = _random_model(dataclasses.replace(MOE, cache_layout=layout))
    for stats in full_stats:
        assert stats["drop_fraction"] == 0.0
    cached_graphdef, params, cache = _with_cache(graphdef, params, len(LENGTHS), MAX_LEN)
    lengths_B = np.array(LENGTHS, np.int32)
    pad_BxL = np.random.default_rng(2).integers(0, MOE.vocab_size, (3, PROMPT_LEN), np.int32)
    prompt_BxL = np.where(np.arange(PROMPT_LEN) < lengths_B[:, None], tokens_BxL[:, :7], pad_BxL)
    rows_B = np.arange(len(LENGTHS))

    prefill = jax.jit(functools.partial(decoding.prefill, cached_graphdef, stats=True))
    logits_BxV, cache, _ = prefill(params, cache, prompt_BxL, lengths_B)
    errors = [np.abs(np.asarray(logits_BxV) - full_BxLxV[rows_B, lengths_B - 1]).max()]
    for step in range(MAX_LEN - max(LENGTHS)):
        positions_B = lengths_B + step
        logits_BxV, cache, stats = _decode(
            cached_graphdef, params, cache, tokens_BxL[rows_B, positions_B]
        )
        errors.append(np.abs(np.asarray(logits_BxV) - full_BxLxV[rows_B, positions_B]).max())
        assert [float(s["drop_fraction"]) for s in stats] == [0.0, 0.0]
    assert max(errors) < TOL, errors


def test_stats_have_one_entry_per_moe_layer_and_count_the_group():
    graphdef, params, tokens_BxL, _, full_stats = _moe_setup()
    B, T = tokens_BxL.shape
    assert len(full_stats) == len(decoder.moe_layers(MOE)) == 2
    for stats in full_stats:
        assert set(stats) == STAT_KEYS
        assert stats["experts_per_token"].shape == (B * T,)
        # top-2 of 4 experts with nothing dropped: every token reaches 2 experts.
        assert stats["tokens_per_expert"].sum() == B * T * MOE.top_k
        np.testing.assert_array_equal(stats["experts_per_token"], MOE.top_k)

    cached_graphdef, params, cache = _with_cache(graphdef, params, B, MAX_LEN)
    _, _, decode_stats = _decode(cached_graphdef, params, cache, tokens_BxL[:, 0])
    assert len(decode_stats) == 2
    for stats in decode_stats:
        assert set(stats) == STAT_KEYS
        assert stats["experts_per_token"].shape == (B,)  # one group: the step's B tokens
        assert float(stats["tokens_per_expert"].sum()) == B * MOE.top_k


def _decode_row_change(cfg: DecoderConfig, row: int, other: int, values: range) -> float:
    """Largest change of sequence `row`'s decode logits when sequence `other`'s token is
    replaced by each of `values`, all from empty caches in one decode batch."""
    graphdef, params = _random_model(cfg)
    tokens_B = np.array([3, 8, 13, 21], np.int32)
    cached_graphdef, params, cache = _with_cache(graphdef, params, len(tokens_B), 4)
    base_BxV, _, _ = _decode(cached_graphdef, params, cache, tokens_B)
    change = 0.0
    for value in values:
        perturbed_B = tokens_B.copy()
        perturbed_B[other] = value
        logits_BxV, _, _ = _decode(cached_graphdef, params, cache, perturbed_B)
        change = max(change, float(np.abs(np.asarray(logits_BxV - base_BxV)[row]).max()))
    return change


def test_expert_choice_decode_couples_sequences_and_token_choice_does_not():
    """Claim C8's causality point: expert-choice routes a decode step's B tokens together,
    so a sequence's next-token logits depend on the other sequences in the batch."""
    # 4 tokens, 4 experts, capacity 1: each expert picks one token of the step.
    expert_choice = dataclasses.replace(MOE, router="expert_choice", capacity_factor=1.0)
    assert _decode_row_change(expert_choice, row=0, other=1, values=range(0, 60, 3)) > 1e-3
    assert _decode_row_change(MOE, row=0, other=1, values=range(0, 60, 3)) < 1e-6


def test_full_forward_routes_one_group_per_sequence_by_default():
    """moe_group_size 0: under expert-choice a sequence's logits do not depend on the rest
    of the batch; one group spanning the batch couples them."""
    tokens_BxL = _tokens()
    perturbed_BxL = tokens_BxL.copy()
    perturbed_BxL[1:] = (perturbed_BxL[1:] + 7) % MOE.vocab_size

    def row0_change(cfg):
        graphdef, params = _random_model(cfg)
        a, _ = _forward(graphdef, params, tokens_BxL)
        b, _ = _forward(graphdef, params, perturbed_BxL)
        return float(np.abs(np.asarray(a - b)[0]).max())

    per_sequence = dataclasses.replace(MOE, router="expert_choice", capacity_factor=1.0)
    assert row0_change(per_sequence) < 1e-6
    across = dataclasses.replace(per_sequence, moe_group_size=tokens_BxL.size)
    assert row0_change(across) > 1e-3


def test_group_size_must_divide_the_tokens():
    graphdef, params = _random_model(dataclasses.replace(MOE, moe_group_size=5))
    with pytest.raises(ValueError, match=r"multiple of the routing group size \(5"):
        _forward(graphdef, params, _tokens())


@pytest.mark.parametrize(
    "changes",
    [
        dict(),
        dict(router="expert_choice", capacity_factor=1.5),
        dict(tie_embeddings=True, moe_every=1, top_k=1),
    ],
    ids=["token_choice", "expert_choice", "tied_all_moe"],
)
def test_num_params_matches_the_module(changes):
    cfg = dataclasses.replace(MOE, **changes)
    sizes = _param_sizes(cfg)
    assert decoder.num_params(cfg) == sum(sizes.values())
    non_embedding = sum(n for path, n in sizes.items() if "embed" not in path)
    assert decoder.num_non_embedding_params(cfg) == non_embedding
    D, F, E = cfg.d_model, cfg.mlp_dim, cfg.num_experts
    n_moe = len(decoder.moe_layers(cfg))
    experts = sum(n for path, n in sizes.items() if "_ExDxF" in path or "_ExFxD" in path)
    assert experts == n_moe * E * 3 * D * F
    reached = cfg.top_k if cfg.router == "token_choice" else cfg.capacity_factor
    unused = n_moe * (E - reached) * 3 * D * F
    assert decoder.num_active_params(cfg) == int(decoder.num_params(cfg) - unused)


def test_named_scopes_appear_in_the_lowered_moe_decode_step():
    graphdef, params, tokens_BxL, _, _ = _moe_setup()
    cached_graphdef, params, cache = _with_cache(graphdef, params, len(LENGTHS), MAX_LEN)
    text = _decode.lower(cached_graphdef, params, cache, tokens_BxL[:, 0]).as_text(debug_info=True)
    for scope in ("attention", "kv_cache_update", "mlp"):
        assert f"{scope}/" in text, scope


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(moe_every=-1), "model.moe_every must be an integer >= 0, got -1"),
        (dict(moe_every=5), "model.moe_every must be <= model.n_layers=4"),
        (dict(top_k=0), "model.top_k must be a positive integer, got 0"),
        (dict(top_k=5), r"model.top_k must be <= model.num_experts \(4\), got 5"),
        (dict(capacity_factor=-1.0), "model.capacity_factor must be > 0, or 0 for dropless"),
        (dict(capacity_factor=0.0, router="expert_choice"), "0.0 with expert_choice"),
        (dict(router="switch"), "model.router must be one of"),
        (dict(num_experts=0), "model.num_experts must be an integer >= 1, got 0"),
        (dict(moe_group_size=-2), "model.moe_group_size must be an integer >= 0, got -2"),
        (dict(renormalize="yes"), "model.renormalize must be a bool"),
        (dict(moe_every=0, router="switch"), "model.router must be one of"),
        (dict(cache_layout="sbkh"), "model.cache_layout must be one of"),
    ],
)
def test_bad_moe_config_is_rejected(changes, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(MOE, **changes)
