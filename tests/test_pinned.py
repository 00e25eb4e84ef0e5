"""The models' outputs on fixed inputs, pinned: decoder logits (forward, prefill, decode, both
cache layouts), the MoE decoder's logits and routing losses, the routers' dispatch, combine and
aux losses. A refactor of a model must leave them unchanged to PINNED_TOL of each output's
scale (its largest magnitude). XLA:CPU's code differs between CPUs, so float32 sums
re-associate: a pin holds across machines only to some ulps of its scale.

    python -m tests.test_pinned    # rewrites tests/data/pinned_outputs.npz (only on purpose)
"""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import decoding, routers
from models.decoder import Decoder, DecoderConfig
from models.moe import MoEConfig, MoELayer

PINNED = os.path.join(os.path.dirname(__file__), "data", "pinned_outputs.npz")
PINNED_TOL = 1e-5  # of each output's scale

DENSE = DecoderConfig(
    vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, mlp_dim=48,
    max_seq_len=32, cache_layout="bksh",
)  # fmt: skip
MOE = {
    "token_choice": dataclasses.replace(
        DENSE, n_layers=4, moe_every=2, num_experts=4, top_k=2, capacity_factor=1.0
    ),
    "expert_choice": dataclasses.replace(
        DENSE, n_layers=2, moe_every=1, num_experts=4, router="expert_choice", capacity_factor=1.0
    ),
    "dropless": dataclasses.replace(
        DENSE, n_layers=2, moe_every=1, num_experts=4, top_k=2, capacity_factor=0.0
    ),
}
LENGTHS = np.array([5, 1, 7], np.int32)
STEPS = 3
STAT_KEYS = ("aux_loss", "aux_loss_batch", "z_loss", "tokens_per_expert", "drop_fraction")


def _model(cfg: DecoderConfig, seed: int = 0):
    """graphdef and numpy-drawn weights of a Decoder (no per-shape jax.random compiles)."""
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)

    def draw(x):
        if x.ndim == 1:
            return (1 + 0.1 * rng.standard_normal(x.shape)).astype(x.dtype)
        return (rng.standard_normal(x.shape) / np.sqrt(x.shape[-2])).astype(x.dtype)

    return graphdef, jax.tree.map(draw, abstract)


def _tokens(seed: int, shape: tuple[int, ...]) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).integers(0, DENSE.vocab_size, shape), jnp.int32)


def decoder_outputs(name: str, cfg: DecoderConfig) -> dict[str, np.ndarray]:
    """Forward logits and routing stats, prefill logits, then STEPS greedy decode logits."""
    graphdef, params = _model(cfg)
    out = {}
    tokens_BxL = _tokens(1, (3, 9))
    logits, stats = decoding.forward(graphdef, params, tokens_BxL, stats=True)
    out[f"{name}/forward"] = logits
    for i, layer in enumerate(stats):
        for key in STAT_KEYS:
            out[f"{name}/forward/stats{i}/{key}"] = layer[key]
    model = nnx.merge(graphdef, params, copy=True)
    model.init_cache(3, 16)
    graphdef, params, cache = nnx.split(model, nnx.Param, nnx.Cache)
    prompt_BxL = _tokens(2, (3, 7))
    logits_BxV, cache = decoding.prefill(graphdef, params, cache, prompt_BxL, LENGTHS)
    out[f"{name}/prefill"] = logits_BxV
    for step in range(STEPS):
        token_B = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
        logits_BxV, cache = decoding.decode_step(graphdef, params, cache, token_B)
        out[f"{name}/decode{step}"] = logits_BxV
    return out


def router_outputs() -> dict[str, np.ndarray]:
    """Each router on fixed logits: dispatch and combine (or sorted choices), and losses."""
    logits_GxMxE = jnp.asarray(np.random.default_rng(3).standard_normal((2, 8, 4)), jnp.float32)
    out = {}
    settings = (("token_choice", 2, 1.0), ("token_choice", 1, 1.25), ("expert_choice", 1, 1.0))
    for kind, k, cap in settings:
        result = routers.route(kind, logits_GxMxE, k, cap)
        name = f"router/{kind}_k{k}"
        out[f"{name}/dispatch"] = result.dispatch_GxMxExC
        out[f"{name}/combine"] = result.combine_GxMxExC
        for key in STAT_KEYS:
            out[f"{name}/{key}"] = routers.routing_stats(result)[key]
    dropless = routers.dropless_token_choice(logits_GxMxE, 2, False, None)
    out["router/dropless/expert"] = dropless.expert_GxMxA
    out["router/dropless/gate"] = dropless.gate_GxMxA
    for key in STAT_KEYS:
        out[f"router/dropless/{key}"] = routers.dropless_stats(dropless)[key]
    return out


def moe_layer_outputs() -> dict[str, np.ndarray]:
    cfg = MoEConfig(d_model=16, mlp_dim=24, num_experts=4, top_k=2, capacity_factor=1.0)
    layer = MoELayer(cfg, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(4).standard_normal((2, 8, 16)), jnp.float32)
    y, stats = layer(x, 8, stats=True)
    return {"moe_layer/y": y, "moe_layer/aux_loss": stats["aux_loss"]}


def all_outputs() -> dict[str, np.ndarray]:
    out = {}
    out.update(decoder_outputs("dense_bksh", DENSE))
    out.update(decoder_outputs("dense_bskh", dataclasses.replace(DENSE, cache_layout="bskh")))
    for name, cfg in MOE.items():
        out.update(decoder_outputs(f"moe_{name}", cfg))
    out.update(router_outputs())
    out.update(moe_layer_outputs())
    return {k: np.asarray(v) for k, v in out.items()}


def test_model_outputs_are_pinned():
    pinned = np.load(PINNED)
    now = all_outputs()
    assert sorted(now) == sorted(pinned.files)
    for key in pinned.files:
        scale = max(float(np.abs(pinned[key]).max(initial=0.0)), 1.0)
        np.testing.assert_allclose(
            now[key], pinned[key], rtol=0, atol=PINNED_TOL * scale, err_msg=key
        )


if __name__ == "__main__":
    np.savez_compressed(PINNED, **all_outputs())
    print(f"wrote {PINNED}")
