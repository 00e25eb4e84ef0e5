"""Routers, routing statistics and the MoE layer (models/routers.py, models/moe.py)."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import moe, routers
from models.moe import MoEConfig, MoELayer, MoEMLP, MoEMLPConfig
from models.routers import RoutingResult, expert_capacity

# Eager mode compiles every op on its own; one jit per call keeps the file fast on CPU.
# test_jit_pure_function_matches_eager runs the eager path.
token_choice = jax.jit(routers.token_choice, static_argnums=(1, 2, 3))
expert_choice = jax.jit(routers.expert_choice, static_argnums=(1,))
route = jax.jit(routers.route, static_argnums=(0, 2, 3, 4))
routing_stats = jax.jit(routers.routing_stats)


@functools.partial(jax.jit, static_argnums=(1, 2))
def token_choice_stats(logits_GxMxE, top_k, capacity_factor):
    return routers.routing_stats(routers.token_choice(logits_GxMxE, top_k, capacity_factor))


def _jit_layer(layer: MoELayer, with_stats: bool = True):
    """layer(x, stats=True) (or layer(x)) as a jitted pure function of x."""
    graphdef, state = nnx.split(layer)

    def forward(state, x):
        layer = nnx.merge(graphdef, state)
        return layer(x, stats=True) if with_stats else layer(x)

    forward = jax.jit(forward)
    return lambda x: forward(state, x)


def _normal(seed, shape, scale=1.0, mean=0.0):
    # numpy, not jax.random: an eager jax op costs a compile per new shape.
    x = np.random.default_rng(seed).normal(mean, scale, size=shape)
    return jnp.asarray(x, jnp.float32)


def _softmax(z):
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _np_token_choice(logits, top_k, cf, renormalize=False):
    """Token-choice routing by the rule, one choice at a time."""
    G, S, E = logits.shape
    C = expert_capacity(S, E, cf, top_k)
    p = _softmax(logits)
    dispatch, combine = np.zeros((G, S, E, C)), np.zeros((G, S, E, C))
    assigned = np.zeros((G, S, E))
    for g in range(G):
        chosen = np.argsort(-p[g], axis=-1, kind="stable")[:, :top_k]
        gates = np.take_along_axis(p[g], chosen, axis=-1)
        if renormalize:
            gates = gates / gates.sum(-1, keepdims=True)
        count = np.zeros(E, int)
        for rank in range(top_k):
            for s in range(S):
                e = chosen[s, rank]
                assigned[g, s, e] = 1
                if count[e] < C:
                    dispatch[g, s, e, count[e]] = 1
                    combine[g, s, e, count[e]] = gates[s, rank]
                count[e] += 1
    return dispatch, combine, assigned


def _np_expert_choice(logits, cf):
    G, S, E = logits.shape
    C = expert_capacity(S, E, cf)
    p = _softmax(logits)
    dispatch, combine = np.zeros((G, S, E, C)), np.zeros((G, S, E, C))
    for g in range(G):
        for e in range(E):
            for c, s in enumerate(np.argsort(-p[g, :, e], kind="stable")[:C]):
                dispatch[g, s, e, c] = 1
                combine[g, s, e, c] = p[g, s, e]
    return dispatch, combine, dispatch.sum(-1)


def _np_stats(dispatch, combine, assigned, logits):
    """Every statistic straight from its definition (Switch eq. 4-6, ST-MoE's z-loss,
    flaxformer's router metrics), in float64."""
    G, S, E, C = dispatch.shape
    T = G * S
    p = _softmax(logits)
    load = dispatch.sum((0, 1, 3))
    wanted = assigned.sum((0, 1))
    k = wanted.sum() / T
    f = wanted / T
    P = p.mean((0, 1))
    per_token = dispatch.sum((2, 3)).reshape(T)
    lse = np.log(np.exp(logits.astype(np.float64)).sum(-1))
    f_group, P_group = assigned.mean(1), p.mean(1)
    wanted_group = assigned.sum(1)
    vio_group = wanted_group.max(-1) / wanted_group.mean(-1) - 1
    return {
        "max_vio_group": vio_group.mean(),
        "max_vio_batch": wanted.max() / wanted.mean() - 1,
        "aux_loss": E * np.mean(np.sum(f_group * P_group, -1)),
        "aux_loss_batch": E * np.sum(f * P),
        "z_loss": np.mean(lse**2),
        "tokens_per_expert": load,
        "tokens_per_expert_wanted": wanted,
        "load_cv": load.std() / load.mean(),
        "max_mean_load": wanted.max() / (T * k / E),
        "drop_fraction": 1 - dispatch.sum() / (T * k),
        "token_drop_fraction": np.mean(per_token == 0),
        "expert_usage": dispatch.sum() / (E * C * G),
        "router_confidence": combine.sum() / dispatch.sum(),
        "router_entropy": np.mean(-np.sum(p * np.log(p), -1)),
        "experts_per_token": per_token,
        "f_e": f,
        "p_e": P,
    }


def _assert_stats(got, want):
    assert set(got) == set(want)
    for name, value in want.items():
        np.testing.assert_allclose(np.asarray(got[name]), value, rtol=1e-5, atol=1e-6, err_msg=name)


def _onehot_logits(experts, E, scale=3.0):
    """logits_1xSxE: token s prefers experts[s] by `scale`."""
    return jnp.asarray(scale * np.eye(E)[experts][None], jnp.float32)


# ---- capacity and dropping rules --------------------------------------------------------


def test_expert_capacity():
    assert expert_capacity(4, 2, 1.0) == 2
    assert expert_capacity(8, 4, 1.25, top_k=2) == 5
    assert expert_capacity(8, 4, 0.01) == 1  # clamped up to 1
    assert expert_capacity(8, 2, 100.0) == 8  # clamped down to S
    assert expert_capacity(100, 10, 1.1) == 11  # 1.1*100/10 is 11.000000000000002 in floats


def test_token_choice_drops_choice_past_capacity():
    # S=4, E=2, k=1, cf=1 -> C=2; tokens 0, 1, 2 want expert 0, token 3 wants expert 1.
    logits = _onehot_logits([0, 0, 0, 1], E=2)
    r = token_choice(logits, top_k=1, capacity_factor=1.0)
    d = np.asarray(r.dispatch_GxMxExC[0])
    assert d.shape == (4, 2, 2)
    want = np.zeros((4, 2, 2))
    want[0, 0, 0] = want[1, 0, 1] = want[3, 1, 0] = 1  # token 2 dropped: expert 0 is full
    np.testing.assert_array_equal(d, want)
    np.testing.assert_array_equal(r.assigned_GxMxE[0], np.eye(2)[[0, 0, 0, 1]])
    p_max = math.exp(3) / (math.exp(3) + 1)
    np.testing.assert_allclose(r.combine_GxMxExC[0], want * p_max, rtol=1e-6)

    s = routing_stats(r)
    np.testing.assert_allclose(s["tokens_per_expert"], [2, 1])
    np.testing.assert_allclose(s["tokens_per_expert_wanted"], [3, 1])
    np.testing.assert_allclose(s["drop_fraction"], 0.25)
    np.testing.assert_allclose(s["token_drop_fraction"], 0.25)
    np.testing.assert_allclose(s["max_mean_load"], 1.5)
    np.testing.assert_allclose(s["expert_usage"], 0.75)
    np.testing.assert_allclose(s["experts_per_token"], [1, 1, 0, 1])


def test_token_choice_ranks_first_choices_before_second_choices():
    # S=4, E=2, k=2, cf=0.5 -> C=2. Tokens 0-2 prefer expert 0, token 3 prefers expert 1.
    # First choices: expert 0 takes tokens 0, 1 (2 dropped); expert 1 takes token 3.
    # Second choices: expert 1's last slot goes to token 0; tokens 1, 2 are dropped.
    # Token-major order would instead fill expert 1 with tokens 0, 1 and drop token 3.
    logits = _onehot_logits([0, 0, 0, 1], E=2, scale=1.0)
    r = token_choice(logits, top_k=2, capacity_factor=0.5)
    d = np.asarray(r.dispatch_GxMxExC[0])
    want = np.zeros((4, 2, 2))
    want[0, 0, 0] = want[1, 0, 1] = 1
    want[3, 1, 0] = want[0, 1, 1] = 1
    np.testing.assert_array_equal(d, want)
    np.testing.assert_array_equal(r.assigned_GxMxE[0], np.ones((4, 2)))
    p = _softmax(np.asarray(logits[0]))
    np.testing.assert_allclose(r.combine_GxMxExC[0], want * p[:, :, None], rtol=1e-6)
    s = routing_stats(r)
    np.testing.assert_allclose(s["drop_fraction"], 1 - 4 / 8)
    np.testing.assert_allclose(s["token_drop_fraction"], 0.25)  # token 2 got nothing
    np.testing.assert_allclose(s["max_mean_load"], 1.0)  # everyone wanted both experts


def test_token_choice_renormalize():
    logits = _normal(0, (2, 8, 4))
    r = token_choice(logits, top_k=2, capacity_factor=2.0, renormalize=True)
    assert float(routing_stats(r)["drop_fraction"]) == 0.0
    np.testing.assert_allclose(r.combine_GxMxExC.sum((2, 3)), 1.0, rtol=1e-6)
    _, combine, _ = _np_token_choice(np.asarray(logits), 2, 2.0, renormalize=True)
    np.testing.assert_allclose(r.combine_GxMxExC, combine, rtol=1e-5, atol=1e-7)


def test_expert_choice_takes_top_c_tokens_per_expert():
    # S=4, E=2, cf=1 -> C=2 per expert. Distinct probs, so no ties.
    logits = jnp.asarray([[[3.0, 0.0], [2.0, 0.0], [1.0, 0.0], [0.0, 0.5]]])
    r = expert_choice(logits, capacity_factor=1.0)
    d = np.asarray(r.dispatch_GxMxExC[0])
    # p(e0) falls with the token index: expert 0 takes tokens 0 then 1.
    # p(e1) is highest for token 3, then token 2: expert 1 takes tokens 3 then 2.
    want = np.zeros((4, 2, 2))
    want[0, 0, 0] = want[1, 0, 1] = want[3, 1, 0] = want[2, 1, 1] = 1
    np.testing.assert_array_equal(d, want)
    p = _softmax(np.asarray(logits[0]))
    np.testing.assert_allclose(r.combine_GxMxExC[0], want * p[:, :, None], rtol=1e-6)
    np.testing.assert_array_equal(r.assigned_GxMxE[0], want.sum(-1))

    # S=4, E=4 -> C=1: experts 0 and 1 both take token 0, experts 2 and 3 take tokens 1 and
    # 2, and no expert takes token 3.
    logits = jnp.asarray([[[3.0, 3, 0, 0], [0, 0, 3, 0], [0, 0, 0, 3], [0, 0, 0, 0]]])
    s = routing_stats(expert_choice(logits, capacity_factor=1.0))
    np.testing.assert_allclose(s["experts_per_token"], [2, 1, 1, 0])
    np.testing.assert_allclose(s["token_drop_fraction"], 0.25)
    np.testing.assert_allclose(s["drop_fraction"], 0.0)
    np.testing.assert_allclose(s["max_mean_load"], 1.0)
    np.testing.assert_allclose(s["expert_usage"], 1.0)


@pytest.mark.parametrize("G,S,E,k,cf", [(2, 8, 4, 2, 1.0), (3, 16, 4, 1, 0.5), (1, 12, 3, 2, 3.0)])
def test_routers_match_numpy_rules(G, S, E, k, cf):
    logits = _normal(G * S + E, (G, S, E), scale=2.0)
    for result, (dispatch, combine, assigned) in [
        (token_choice(logits, k, cf), _np_token_choice(np.asarray(logits), k, cf)),
        (expert_choice(logits, cf), _np_expert_choice(np.asarray(logits), cf)),
    ]:
        np.testing.assert_array_equal(result.dispatch_GxMxExC, dispatch)
        np.testing.assert_allclose(result.combine_GxMxExC, combine, rtol=1e-5, atol=1e-7)
        np.testing.assert_array_equal(result.assigned_GxMxE, assigned)


@pytest.mark.parametrize("kind", ["token_choice", "expert_choice"])
@pytest.mark.parametrize("cf", [0.5, 1.0, 2.0])
def test_masks_and_weights_sum_as_they_must(kind, cf):
    G, S, E, k = 3, 8, 4, 2
    logits = _normal(7, (G, S, E), scale=2.0)
    r = route(kind, logits, k, cf, False)
    d = np.asarray(r.dispatch_GxMxExC)
    comb = np.asarray(r.combine_GxMxExC)
    p = np.asarray(r.probs_GxMxE)
    C = d.shape[-1]
    assert set(np.unique(d)) <= {0.0, 1.0}
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-6)
    # Combine lives on dispatched slots only and carries the token's prob for that expert.
    np.testing.assert_allclose(comb, d * p[..., None], rtol=1e-6, atol=1e-7)
    assert (d.sum(-1) <= 1).all()  # a token sits in at most one slot of an expert
    slot_fill = d.sum(1)  # [G, E, C]
    if kind == "token_choice":
        assert C == expert_capacity(S, E, cf, k)
        assert (slot_fill <= 1).all()  # a slot holds at most one token
        assert (d.sum((2, 3)) <= k).all()  # a token is dispatched at most k times
        assert (d.sum(-1) <= np.asarray(r.assigned_GxMxE)).all()  # only where it wanted
        np.testing.assert_array_equal(r.assigned_GxMxE.sum(-1), k)
        assert (np.diff(slot_fill, axis=-1) <= 0).all()  # slots fill from the front
    else:
        assert C == expert_capacity(S, E, cf)
        np.testing.assert_array_equal(slot_fill, 1)  # every expert holds exactly C tokens
        np.testing.assert_array_equal(r.assigned_GxMxE, d.sum(-1))


# ---- statistics -------------------------------------------------------------------------


def test_stats_perfectly_balanced():
    # S=4, E=4, k=1, cf=1 -> C=1; token s prefers expert s.
    a = 3.0
    s = token_choice_stats(_onehot_logits([0, 1, 2, 3], E=4, scale=a), 1, 1.0)
    p_max, p_other = math.exp(a) / (math.exp(a) + 3), 1 / (math.exp(a) + 3)
    _assert_stats(
        s,
        {
            "aux_loss": 1.0,  # E * sum_e (1/4)(1/4)
            "aux_loss_batch": 1.0,  # one group: the two losses agree
            "z_loss": math.log(math.exp(a) + 3) ** 2,
            "tokens_per_expert": [1, 1, 1, 1],
            "tokens_per_expert_wanted": [1, 1, 1, 1],
            "load_cv": 0.0,
            "max_mean_load": 1.0,
            "max_vio_group": 0.0,  # MaxVio: max/mean load - 1
            "max_vio_batch": 0.0,
            "drop_fraction": 0.0,
            "token_drop_fraction": 0.0,
            "expert_usage": 1.0,
            "router_confidence": p_max,
            "router_entropy": -(p_max * math.log(p_max) + 3 * p_other * math.log(p_other)),
            "experts_per_token": [1, 1, 1, 1],
            "f_e": [0.25] * 4,
            "p_e": [0.25] * 4,
        },
    )


@pytest.mark.parametrize("cf,dispatched", [(1.0, 1), (4.0, 4)])
def test_stats_all_tokens_to_one_expert(cf, dispatched):
    # S=4, E=4, k=1: every token wants expert 0; C=1 drops three, C=4 drops none.
    a = 3.0
    s = token_choice_stats(_onehot_logits([0, 0, 0, 0], E=4, scale=a), 1, cf)
    p_max, p_other = math.exp(a) / (math.exp(a) + 3), 1 / (math.exp(a) + 3)
    load = [dispatched, 0, 0, 0]
    _assert_stats(
        s,
        {
            "aux_loss": 4 * p_max,  # E * f_0 * P_0 with f_0 = 1
            "aux_loss_batch": 4 * p_max,
            "z_loss": math.log(math.exp(a) + 3) ** 2,
            "tokens_per_expert": load,
            "tokens_per_expert_wanted": [4, 0, 0, 0],
            "load_cv": math.sqrt(3.0),  # std([1,0,0,0]) / mean = sqrt(3/16) / (1/4)
            "max_mean_load": 4.0,  # the cf needed to drop nothing, whatever cf ran
            "max_vio_group": 3.0,
            "max_vio_batch": 3.0,
            "drop_fraction": 1 - dispatched / 4,
            "token_drop_fraction": 1 - dispatched / 4,
            "expert_usage": dispatched / (4 * expert_capacity(4, 4, cf)),
            "router_confidence": p_max,
            "router_entropy": -(p_max * math.log(p_max) + 3 * p_other * math.log(p_other)),
            "experts_per_token": [1] * dispatched + [0] * (4 - dispatched),
            "f_e": [1, 0, 0, 0],
            "p_e": [p_max, p_other, p_other, p_other],
        },
    )


@pytest.mark.parametrize("kind", ["token_choice", "expert_choice"])
def test_stats_random_routing_against_numpy(kind):
    G, S, E, k, cf = 2, 16, 4, 2, 1.0
    logits = _normal(3, (G, S, E), scale=1.5)
    r = route(kind, logits, k, cf, False)
    if kind == "token_choice":
        ref = _np_token_choice(np.asarray(logits), k, cf)
    else:
        ref = _np_expert_choice(np.asarray(logits), cf)
    want = _np_stats(*ref, np.asarray(logits))
    _assert_stats(routing_stats(r), want)
    if kind == "token_choice":
        assert want["drop_fraction"] > 0  # the case exercises dropping


def test_max_mean_load_is_the_capacity_factor_that_drops_nothing():
    S, E, k = 32, 4, 2
    logits = _normal(11, (1, S, E), mean=np.asarray([1.0, 0, 0, 0]))
    needed = float(token_choice_stats(logits, k, 1.0)["max_mean_load"])
    assert needed > 1.0
    enough = token_choice_stats(logits, k, needed)
    assert float(enough["drop_fraction"]) == 0.0
    one_short = needed - 1.0 / (S * k / E)  # one slot fewer on the busiest expert
    assert float(token_choice_stats(logits, k, one_short)["drop_fraction"]) > 0


def test_routing_result_is_a_pytree():
    r = token_choice(jnp.zeros((1, 4, 2)), 1, 1.0)
    assert len(jax.tree.leaves(r)) == 5
    assert isinstance(jax.tree.map(lambda x: x, r), RoutingResult)


# ---- the MoE layer ----------------------------------------------------------------------


def _swiglu_np(x_D, wg_DxF, wu_DxF, wd_FxD):
    g = x_D @ wg_DxF
    return ((g / (1 + np.exp(-g))) * (x_D @ wu_DxF)) @ wd_FxD


def _dense_reference(layer: MoELayer, x):
    """Loop over tokens: sum over the experts a token reached of weight * SwiGLU_e(x)."""
    cfg = layer.cfg
    x_TxD = np.asarray(x, np.float64).reshape(-1, cfg.d_model)
    T = x_TxD.shape[0]
    S = cfg.group_size or T
    wr = np.asarray(layer.router.kernel[...], np.float64)
    wg, wu, wd = (
        np.asarray(w[...], np.float64)
        for w in (layer.w_gate_ExDxF, layer.w_up_ExDxF, layer.w_down_ExFxD)
    )
    logits_GxMxE = (x_TxD @ wr).reshape(T // S, S, cfg.num_experts)
    if cfg.router == "token_choice":
        _, combine, _ = _np_token_choice(
            logits_GxMxE, cfg.top_k, cfg.capacity_factor, cfg.renormalize
        )
    else:
        _, combine, _ = _np_expert_choice(logits_GxMxE, cfg.capacity_factor)
    weight_TxE = combine.sum(-1).reshape(T, cfg.num_experts)
    y_TxD = np.zeros_like(x_TxD)
    for t in range(T):
        for e in np.nonzero(weight_TxE[t])[0]:
            y_TxD[t] += weight_TxE[t, e] * _swiglu_np(x_TxD[t], wg[e], wu[e], wd[e])
    return y_TxD.reshape(np.shape(x))


@pytest.mark.parametrize(
    "router,renormalize,top_k,cf,x_shape",
    [
        ("token_choice", False, 2, 2.0, (2, 8, 8)),  # C = S: nothing can drop
        ("token_choice", True, 2, 2.0, (2, 8, 8)),
        ("token_choice", False, 1, 4.0, (16, 8)),  # [T, D] input
        ("expert_choice", False, 2, 1.5, (2, 8, 8)),
    ],
)
def test_layer_matches_dense_reference(router, renormalize, top_k, cf, x_shape):
    cfg = MoEConfig(
        d_model=8,
        mlp_dim=16,
        num_experts=4,
        top_k=top_k,
        capacity_factor=cf,
        router=router,
        renormalize=renormalize,
        group_size=8,
    )
    layer = MoELayer(cfg, rngs=nnx.Rngs(0))
    # Two groups of 8 tokens, taken in order from either input shape.
    x = _normal(1, x_shape)
    y, stats = _jit_layer(layer)(x)
    assert y.shape == x.shape
    if router == "token_choice":
        assert float(stats["drop_fraction"]) == 0.0
    np.testing.assert_allclose(y, _dense_reference(layer, x), rtol=1e-4, atol=1e-5)


def _perturb_changes(layer, x_SxD, j):
    forward = _jit_layer(layer, with_stats=False)
    y = forward(x_SxD)
    x_perturbed = np.array(x_SxD)
    x_perturbed[j] *= -4.0
    y_perturbed = forward(jnp.asarray(x_perturbed))
    others = np.delete(np.abs(np.asarray(y_perturbed - y)), j, axis=0)
    return others.max(axis=-1)  # per other token


def test_expert_choice_output_depends_on_other_tokens():
    cfg = MoEConfig(
        d_model=8, mlp_dim=16, num_experts=4, router="expert_choice", capacity_factor=1.0
    )
    layer = MoELayer(cfg, rngs=nnx.Rngs(0))
    x_SxD = _normal(2, (8, 8))
    # Gradients cannot show this (dispatch is piecewise constant), so perturb token j and
    # look for some other token whose output moved.
    assert _perturb_changes(layer, x_SxD, j=5).max() > 1e-3


@pytest.mark.parametrize("top_k,cf", [(2, 2.0), (1, 4.0)])
def test_token_choice_without_drops_is_per_token(top_k, cf):
    cfg = MoEConfig(d_model=8, mlp_dim=16, num_experts=4, top_k=top_k, capacity_factor=cf)
    layer = MoELayer(cfg, rngs=nnx.Rngs(0))
    x_SxD = _normal(2, (8, 8))
    for j in (0, 5):
        assert _perturb_changes(layer, x_SxD, j).max() < 1e-6


def test_token_choice_k1_with_drops_stays_causal():
    # k=1 with a tight capacity: changing a later token never changes an earlier token.
    cfg = MoEConfig(d_model=8, mlp_dim=16, num_experts=4, top_k=1, capacity_factor=0.5)
    layer = MoELayer(cfg, rngs=nnx.Rngs(0))
    x_SxD = _normal(4, (8, 8))
    assert float(_jit_layer(layer)(x_SxD)[1]["drop_fraction"]) > 0
    assert _perturb_changes(layer, x_SxD, j=7).max() < 1e-6


@pytest.mark.parametrize("router", ["token_choice", "expert_choice"])
def test_jit_pure_function_matches_eager(router):
    cfg = MoEMLPConfig(d_model=8, mlp_dim=16, num_experts=4, router=router, depth=2)
    model = MoEMLP(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)

    @jax.jit
    def forward(params, x_BxD):
        return nnx.merge(graphdef, params)(x_BxD, stats=True)

    x_BxD = _normal(5, (16, 8))
    y_jit, stats_jit = forward(params, x_BxD)
    y, stats = model(x_BxD, stats=True)
    assert len(stats) == 2 and set(stats[0]) == set(stats_jit[0])
    np.testing.assert_allclose(y_jit, y, rtol=1e-5, atol=1e-6)
    for layer_jit, layer in zip(stats_jit, stats, strict=True):
        for name in layer:
            np.testing.assert_allclose(layer_jit[name], layer[name], rtol=1e-5, atol=1e-6)


def _two_group_aux(p_first: float) -> dict[str, jax.Array]:
    # Two groups of two tokens, E=2, k=1: group 0 routes (p, 1-p) for both tokens, group 1
    # (1-p, p). Each group sends all its tokens to one expert; pooled, the batch is balanced.
    p = jnp.array([p_first, 1.0 - p_first])
    probs_GxMxE = jnp.stack([jnp.stack([p, p]), jnp.stack([p[::-1], p[::-1]])])
    s = token_choice_stats(jnp.log(probs_GxMxE), 1, 2.0)
    return {"aux_loss": s["aux_loss"], "aux_loss_batch": s["aux_loss_batch"]}


def test_aux_loss_per_group_sees_what_pooling_hides():
    s = _two_group_aux(0.9)
    # Per group: E * (1 * 0.9 + 0 * 0.1) = 1.8; pooled: f = P = (1/2, 1/2), E * 2 * 1/4 = 1.
    np.testing.assert_allclose(s["aux_loss"], 1.8, rtol=1e-6)
    np.testing.assert_allclose(s["aux_loss_batch"], 1.0, rtol=1e-6)
    grads = jax.grad(lambda q: _two_group_aux(q)["aux_loss"])(0.9)
    grads_batch = jax.grad(lambda q: _two_group_aux(q)["aux_loss_batch"])(0.9)
    # d/dp E * p (f held, as the top-k mask has no gradient) = 2 per group.
    np.testing.assert_allclose(grads, 2.0, rtol=1e-5)
    np.testing.assert_allclose(grads_batch, 0.0, atol=1e-6)


def test_aux_losses_agree_on_one_group():
    logits_GxMxE = _normal(3, (1, 16, 4)) * 2.0
    s = token_choice_stats(logits_GxMxE, 2, 1.0)
    np.testing.assert_allclose(s["aux_loss"], s["aux_loss_batch"], rtol=1e-6)
    many = token_choice_stats(_normal(3, (8, 4, 4)) * 2.0, 2, 1.0)
    assert abs(float(many["aux_loss"]) - float(many["aux_loss_batch"])) > 1e-3


def test_aux_and_z_loss_gradients_reach_the_router():
    cfg = MoEMLPConfig(d_model=8, mlp_dim=16, num_experts=4, depth=2)
    graphdef, params = nnx.split(MoEMLP(cfg, rngs=nnx.Rngs(0)))
    x_BxD = _normal(6, (16, 8))

    def loss(params, name):
        _, stats = nnx.merge(graphdef, params)(x_BxD, stats=True)
        return sum(s[name] for s in stats)

    for name in ("aux_loss", "aux_loss_batch", "z_loss"):
        grads = jax.jit(jax.grad(loss), static_argnums=1)(params, name)
        for i in range(cfg.depth):
            g = np.asarray(grads["layers"][i]["router"]["kernel"][...])
            assert np.isfinite(g).all() and np.abs(g).max() > 0, (name, i)
        # The last layer's balance losses see its router only, not its experts.
        assert not np.asarray(grads["layers"][cfg.depth - 1]["w_gate_ExDxF"][...]).any()


# ---- config, sizes and cost -------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides,field,value",
    [
        ({"top_k": 5}, "model.top_k", "5"),
        ({"top_k": 0}, "model.top_k", "0"),
        ({"capacity_factor": 0.0, "router": "expert_choice"}, "model.capacity_factor", "0.0"),
        ({"router_bias": True, "router": "expert_choice"}, "model.router_bias", "expert"),
        ({"capacity_factor": -1.0}, "model.capacity_factor", "-1.0"),
        ({"router": "sinkhorn"}, "model.router", "sinkhorn"),
        ({"group_size": -1}, "model.group_size", "-1"),
        ({"dtype": "int8"}, "dtype", "int8"),
    ],
)
def test_bad_config_errors(overrides, field, value):
    with pytest.raises(ValueError, match=field) as err:
        MoEConfig(num_experts=4, **overrides)
    assert value in str(err.value)


def test_route_rejects_bad_arguments():
    logits = jnp.zeros((1, 4, 2))
    with pytest.raises(ValueError, match="model.router.*'dense'"):
        routers.route("dense", logits, 1, 1.0)
    with pytest.raises(ValueError, match="model.top_k.*3"):
        routers.route("token_choice", logits, 3, 1.0)
    with pytest.raises(ValueError, match="model.capacity_factor.*0"):
        routers.route("expert_choice", logits, 1, 0)


def test_group_size_must_divide_tokens():
    layer = MoELayer(
        MoEConfig(d_model=8, mlp_dim=16, num_experts=4, group_size=3), rngs=nnx.Rngs(0)
    )
    with pytest.raises(ValueError, match=r"tokens per call \(8\).*model.group_size \(3\)"):
        layer(jnp.zeros((2, 4, 8)))


def test_param_counts():
    cfg = MoEMLPConfig(d_model=8, mlp_dim=16, num_experts=4, top_k=2, depth=3)
    model = MoEMLP(cfg, rngs=nnx.Rngs(0))
    counted = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert moe.num_params(cfg) == counted == 3 * (8 * 4 + 4 * 3 * 8 * 16)
    assert moe.num_active_params(cfg) == 3 * (8 * 4 + 2 * 3 * 8 * 16)
    ec = MoEMLPConfig(d_model=8, mlp_dim=16, num_experts=4, router="expert_choice", depth=3)
    assert moe.num_active_params(ec) == int(3 * (8 * 4 + 1.25 * 3 * 8 * 16))


# ---- loss-free balancing, MaxVio and the dropless layer ---------------------------------


def test_router_bias_steers_the_choice_and_never_the_gates():
    # Token 0 prefers expert 0, then 1; a bias on expert 2 large enough to enter its top-2.
    logits = jnp.log(jnp.asarray([[[0.5, 0.3, 0.15, 0.05]]], jnp.float32))
    bias = jnp.asarray([0.0, 0.0, 0.2, 0.0])
    r = token_choice(logits, top_k=2, capacity_factor=2.0, bias_E=bias)
    chosen = np.flatnonzero(np.asarray(r.assigned_GxMxE[0, 0]))
    assert chosen.tolist() == [0, 2]  # probs + bias: 0.5, 0.3, 0.35, 0.05
    combine = np.asarray(r.combine_GxMxExC[0, 0]).sum(-1)
    np.testing.assert_allclose(combine, [0.5, 0.0, 0.15, 0.0], rtol=1e-6)  # unbiased probs
    dropless = routers.dropless_token_choice(logits, 2, bias_E=bias)
    np.testing.assert_allclose(np.asarray(dropless.gate_GxMxA[0, 0]), [0.5, 0.15], rtol=1e-6)


def test_router_bias_update_follows_the_rule():
    """b_e <- b_e + rate * sign(mean load - load_e) on the step's wanted loads (Wang et al.
    2024, Algorithm 1), checked against numpy."""
    cfg = MoEConfig(d_model=8, mlp_dim=16, num_experts=4, top_k=2, router_bias=True)
    layer = moe.MoELayer(cfg, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(3), (16, 8))
    for step in range(3):
        before = np.asarray(layer.router_bias[...]).copy()
        _, stats = layer(x, stats=True)
        # the wanted loads from the biased top-k, in numpy
        logits = np.asarray(x @ layer.router.kernel[...], np.float64)
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        top2 = np.argsort(-(p + before), axis=-1, kind="stable")[:, :2]
        load = np.bincount(top2.ravel(), minlength=4).astype(np.float64)
        np.testing.assert_array_equal(np.asarray(stats["tokens_per_expert_wanted"]), load)
        layer.update_router_bias(stats, 0.01)
        want = before + 0.01 * np.sign(load.mean() - load)
        np.testing.assert_allclose(np.asarray(layer.router_bias[...]), want, atol=1e-7)
        assert step or np.abs(want).max() > 0


@pytest.mark.parametrize("router_bias", [False, True])
def test_dropless_layer_equals_the_capacity_layer_when_nothing_drops(router_bias):
    common = dict(d_model=16, mlp_dim=32, num_experts=4, top_k=2, depth=2, router_bias=router_bias)
    big = moe.MoEMLP(moe.MoEMLPConfig(capacity_factor=4.0, **common), rngs=nnx.Rngs(0))
    dropless = moe.MoEMLP(moe.MoEMLPConfig(capacity_factor=0.0, **common), rngs=nnx.Rngs(0))
    if router_bias:  # the same non-zero bias in both
        for a, b in zip(big.layers, dropless.layers, strict=True):
            a.router_bias[...] = b.router_bias[...] = jnp.asarray([0.1, 0.0, -0.1, 0.05])
    x = jax.random.normal(jax.random.key(1), (24, 16))
    with jax.default_matmul_precision("highest"):
        y_big, stats_big = big(x, stats=True)
        y_dropless, stats_dropless = dropless(x, stats=True)
    assert all(float(s["drop_fraction"]) == 0 for s in stats_big)
    np.testing.assert_allclose(np.asarray(y_dropless), np.asarray(y_big), rtol=1e-6, atol=1e-6)
    for a, b in zip(stats_big, stats_dropless, strict=True):
        for key in ("max_vio_group", "max_vio_batch", "aux_loss", "load_cv", "router_entropy"):
            np.testing.assert_allclose(float(b[key]), float(a[key]), rtol=1e-5, err_msg=key)
        assert float(b["expert_usage"]) == 1.0  # every assignment is computed, none padded
