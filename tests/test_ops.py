"""A call as ops: the totals each workload derives from its ops, and the per-op roofline."""

import dataclasses

import numpy as np
import pytest

from batching.measure import shape_bench
from batching.predict import analysis, knee, pricing, replicates, run_fields, whatif
from batching.setup import topology
from batching.workloads import decoder as decoder_workload
from batching.workloads import mlp as mlp_workload
from batching.workloads import moe as moe_workload
from batching.workloads import ops
from batching.workloads import resnet as resnet_workload
from batching.workloads.ops import Op
from models import decoder, mlp, moe, resnet
from models.routers import expert_capacity
from tests.conftest import tiny
from tests.test_decode_workload import tiny_decoder


@pytest.mark.parametrize("batch", [1, 3, 64])
def test_mlp_ops_give_todays_cost_and_gemm_shapes(batch):
    cfg = mlp.MLPConfig(width=48, depth=3, use_bias=True)
    t = ops.totals(mlp_workload.ops(cfg, batch))
    # Today's formulas: 2 FLOPs per weight per example plus the bias; weights once, and each
    # layer's input read and output written.
    assert t.flops == 3 * batch * (2 * 48 * 48 + 48)
    assert t.weight_bytes == mlp.num_params(cfg) * 4
    assert t.bytes == mlp.num_params(cfg) * 4 + 3 * 2 * batch * 48 * 4
    cfg = tiny(width=48, depth=3)
    wl = mlp_workload.build(cfg, topology.build(cfg), "")
    assert wl.gemm_shapes(batch) == [(batch, 48, 48, 3)]
    assert wl.cost(batch).flops == t.flops and wl.attention_shapes(batch) is None


@pytest.mark.parametrize("depth,batch", [(18, 1), (50, 2)])
def test_resnet_ops_total_the_layer_costs(depth, batch):
    cfg = resnet.ResNetConfig(depth=depth, image_size=64)
    o = resnet_workload.ops(cfg, batch)
    t, ref = ops.totals(o), resnet.model_costs(cfg, batch)
    assert (t.flops, t.bytes, t.weight_bytes) == (ref["flops"], ref["bytes"], ref["weight_bytes"])
    convs = [x for x in o if x.kind == "conv"]
    assert all(peaks_flops(x.shape) == x.flops for x in convs)
    assert [x.kind for x in o].count("gemm") == 1 and len(convs) == sum(
        c["kind"].startswith("conv") for c in resnet.layer_costs(cfg, batch)
    )


def peaks_flops(shape):

    return shape_bench.conv_flops_of(shape)


@pytest.mark.parametrize("phase", ["decode", "prefill"])
@pytest.mark.parametrize("batch", [1, 5])
def test_decoder_ops_give_the_reference_formulas_and_todays_gemm_shapes(phase, batch):
    cfg = decoder_workload.model_config(tiny_decoder(phase).model)
    length = 32 if phase == "decode" else 16
    o = decoder_workload.step_ops(cfg, batch, length, phase, 4, 2, "bksh")
    t = ops.totals(o)
    assert (t.flops, t.bytes) == reference_cost(cfg, batch, length, phase, 4, 2)
    D, N, K, H, F = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.mlp_dim
    L, T = cfg.n_layers, batch if phase == "decode" else batch * length
    assert ops.gemm_shapes(o) == [
        (T, D, N * H, L),
        (T, D, K * H, 2 * L),
        (T, N * H, D, L),
        (T, D, F, 2 * L),
        (T, F, D, L),
        (batch, D, cfg.vocab_size, 1),
    ]
    shapes = ops.attention_shapes(o)
    if phase == "decode":
        (a,) = shapes
        assert (a["batch"], a["cache_len"], a["bytes"], a["count"]) == (batch, 32, 2, L)
    else:
        assert shapes == []  # prefill attends over its prompt, not a cache


def reference_cost(cfg, batch, length, phase, param_bytes, cache_bytes):
    """A decoder call's (FLOPs, bytes) in closed form, written out independently of the ops
    list: a multiply-add is 2 FLOPs, so 2 per weight per token, and QKᵀ and AV 2 each per
    head dim per cached position; P non-embedding parameters, D·V unembedding.
    decode: 2·B·(P + D·V) + 4·B·n_layers·N·H·S FLOPs; weights once, K/V read per sequence over
    the cache and written for the new token.
    prefill: 2·B·L·P + 2·B·D·V (last token) + 4·B·n_layers·N·H·L² (the full score matrix);
    weights once, K/V written for L tokens."""
    P, DV = decoder.num_non_embedding_params(cfg), cfg.d_model * cfg.vocab_size
    heads, kv = cfg.n_layers * cfg.n_heads * cfg.head_dim, 2 * cfg.n_layers * cfg.n_kv_heads
    kv *= cfg.head_dim
    if phase == "decode":
        flops = 2 * batch * (P + DV) + 4 * batch * heads * length
        return float(flops), float(param_bytes * (P + DV) + batch * kv * (length + 1) * cache_bytes)
    flops = 2 * batch * length * P + 2 * batch * DV + 4 * batch * heads * length**2
    return float(flops), float(param_bytes * (P + DV) + batch * kv * length * cache_bytes)


def test_decode_ops_read_weights_once_and_the_cache_per_sequence():
    cfg = decoder_workload.model_config(tiny_decoder("decode").model)
    one = ops.totals(decoder_workload.step_ops(cfg, 8, 100, "decode", 2, 1, "bksh"))
    two = ops.totals(decoder_workload.step_ops(cfg, 16, 100, "decode", 2, 1, "bksh"))
    kv_per_token = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim
    assert two.bytes - one.bytes == 8 * kv_per_token * 101


def moe_layer_reference(cfg, tokens, param_bytes):
    """One capacity-padded MoE layer (GShard, Lepikhin et al. 2020) in closed form: router
    2·T·D·E, dispatch and combine 2·G·S·E·C·D each, experts 6·G·E·C·D·F FLOPs; the weights
    read once and the input and output activations, at `param_bytes` per element."""
    D, E, F = cfg.d_model, cfg.num_experts, cfg.mlp_dim
    S = cfg.group_size or tokens
    G, k = tokens // S, cfg.top_k if cfg.router == "token_choice" else 1
    C = expert_capacity(S, E, cfg.capacity_factor, k)
    flops = 2 * tokens * D * E + 2 * 2 * G * E * C * S * D + 3 * 2 * G * E * C * D * F
    weights = (D * E + 3 * E * D * F) * param_bytes
    return flops, weights + 2 * tokens * D * param_bytes


def test_moe_ops_count_padded_slots():
    cfg = moe.MoEConfig(d_model=8, mlp_dim=16, num_experts=4, top_k=2, capacity_factor=1.0)
    T, D, E, F, C = 32, 8, 4, 16, 16  # C = ceil(1.0 * 32 * 2 / 4)
    t = ops.totals(moe_workload.layer_ops(cfg, T, 0, 2, 2))
    assert t.flops == 2 * T * D * E + 2 * 2 * E * C * T * D + 6 * E * C * D * F
    assert t.bytes == 2 * (D * E + 3 * E * D * F) + 2 * 2 * T * D


@pytest.mark.parametrize("batch,group", [(1, 0), (64, 0), (64, 16)])
def test_moe_ops_total_the_reference_layer(batch, group):
    cfg = moe.MoEMLPConfig(d_model=32, mlp_dim=64, num_experts=4, group_size=group, depth=2)
    t = ops.totals(moe_workload.layer_ops(cfg, batch, group, 4, 4, count=2))
    flops, bytes_ = moe_layer_reference(cfg, batch, 4)
    assert t.flops == 2 * flops and t.bytes == 2 * bytes_
    assert t.weight_bytes == moe.num_params(cfg) * 4
    # The expert einsums are one batched product over E: as GEMM shapes, E products each.
    gate_up = next(
        o for o in moe_workload.layer_ops(cfg, batch, group, 4, 4) if "gate_up" in o.name
    )
    assert gate_up.shape[0] == 4 and gate_up.count == 2
    C = gate_up.shape[1] // (batch // (group or batch))
    assert ops.gemm_shapes([gate_up]) == [(gate_up.shape[1], 32, 64, 8)] and C >= 1


RATES = pricing.Rates(
    dram_bytes_per_s=1e10,
    cache_bytes_per_s=1e11,
    cache_bytes=1e6,
    peak_flops_per_s=1e12,
    dispatch_floor_s=1e-5,
    kernel_overhead_s=1e-6,
    weights_warm=False,
    gemm=lambda shape: 1e11,
    conv=lambda shape: 5e10,
    attention=lambda op: 2e-4,
)


def test_each_op_is_priced_at_its_own_limit():
    # A GEMM with 8 MB of DRAM weights (0.8 ms) and 2·4·1024·1024 FLOPs at 1e11 (84 µs): memory.
    g = Op("g", "gemm", (4, 1024, 1024), 2 * 4 * 1024 * 1024, 8e6 + 4e4, 8e6, count=2)
    t = pricing.op_time(g, RATES)
    assert t.limit == "memory" and t.seconds == pytest.approx(2 * (8e6 / 1e10 + 4e4 / 1e11))
    # A big-batch GEMM: compute at its measured shape rate.
    big = Op("g", "gemm", (4096, 1024, 1024), 2 * 4096 * 1024**2, 8e6 + 1e5, 8e6)
    t = pricing.op_time(big, RATES)
    assert t.limit == "compute" and t.seconds == pytest.approx(2 * 4096 * 1024**2 / 1e11)
    # A conv at its own measured rate.
    c = Op("c", "conv", (1, 8, 8, 4, 4, 3, 1), 1e7, 1e3, 5e2)
    t = pricing.op_time(c, RATES)
    assert (t.seconds, t.limit) == (1e7 / 5e10, "compute")
    # An elementwise op whose bytes fit half the cache: bandwidth-bound at the cache's rate.
    e = Op("e", "elementwise", (100,), 1e6, 4e5)
    t = pricing.op_time(e, RATES)
    assert (t.seconds, t.limit) == (4e5 / 1e11, "cache")
    # Fused into its producer: no time of its own, no launch.
    f = Op("f", "elementwise", (100,), 1e6, 0, fused=True)
    assert pricing.op_time(f, RATES).seconds == 0 and ops.launches([f, e]) == 1
    # Attention: its measured seconds against its bytes.
    a = Op("a", "attention", (1, 1, 10, 1, 8), 320, 640, count=3, layout="bksh")
    assert pricing.op_time(a, RATES).seconds == pytest.approx(6e-4)
    call = pricing.predict_call([g, c, e, f, a], RATES)
    overhead = 1e-5 + (2 + 1 + 1 + 3) * 1e-6
    parts = [pricing.op_time(x, RATES).seconds for x in (g, c, e, a)]
    assert call.seconds == pytest.approx(overhead + sum(parts))
    assert set(call.by_kind()) == {"gemm", "conv", "elementwise", "attention"}
    kinds = call.kind_detail()
    # By intensity: the GEMM's 8 MB of DRAM weights (1.6 ms) beat its FLOPs at the peak; the
    # conv's 1e7 FLOPs at 1e12 beat its 1 KB; the conv runs at its measured 5e10, below roofs.
    assert kinds["gemm"]["bound"] == "memory" and not kinds["gemm"]["slower_than_roofs"]
    assert kinds["conv"]["bound"] == "compute" and kinds["conv"]["slower_than_roofs"]
    assert kinds["conv"]["flops_per_s"] == pytest.approx(5e10)


def test_warm_weights_read_at_cache_bandwidth():
    g = Op("g", "gemm", (1, 256, 256), 2 * 256 * 256, 262144 + 2048, 262144)
    cold = pricing.op_time(g, RATES)
    warm = pricing.op_time(g, pricing.Rates(**{**RATES.__dict__, "weights_warm": True}))
    assert warm.limit == "cache" and cold.limit == "memory"
    assert warm.seconds == pytest.approx((262144 + 2048) / 1e11)


def test_whatif_is_the_per_op_sum_at_spec_peaks():
    o = [
        Op("g", "gemm", (1, 1000, 1000), 2e6, 4e6, 4e6),
        Op("e", "elementwise", (1000,), 1e3, 8e3),
    ]
    rows = [{"batch_size": 1, "ops": [x.to_dict() for x in o]}]
    w = whatif.whatif(rows, ("T4",), "float32", "default", 4)["T4"]
    assert w["latency_s"][1] == pytest.approx(4e6 / 320e9 + 8e3 / 320e9)


def test_predicted_curve_knee_uses_the_fitted_knee_definition():
    # A predicted curve with a known knee (compute overtakes memory at 40), measured twice
    # as slow: the knee read from the prediction is the prediction's, by fit_knee's definition.
    rng = np.random.default_rng(0)
    W, f1, bw, overhead = 3e7, 2e6, 2e10, 1e-4
    f = 40 * f1 / (W / bw)
    rows, samples = [], {}
    for b in 2 ** np.arange(10):
        pred = max(overhead, W / bw, f1 * b / f)
        samples[int(b)] = 2 * pred * rng.lognormal(0, 0.05, 100)
        rows.append(
            {
                "batch_size": int(b),
                "latency_s": float(np.median(samples[int(b)])),
                "predicted_latency_s": pred,
                "analytic_flops": f1 * b,
                "analytic_bytes": W,
            }
        )
    draws = replicates.draw([r["batch_size"] for r in rows], samples, "median", 50)
    fit = run_fields.predicted_knee(rows, draws)
    direct = knee.fit_knee(
        [{**r, "latency_s": r["predicted_latency_s"]} for r in rows], {}, n_bootstrap=0
    )
    assert fit.knee_batch_size == pytest.approx(direct.knee_batch_size)
    assert fit.knee_batch_size == pytest.approx(40, rel=0.1)
    assert fit.knee_low <= 40 <= fit.knee_high


def test_small_ops_are_priced_from_their_lone_calls_and_pay_the_call_extra_once():
    # Two small GEMMs (~1 µs at 1e11 FLOP/s, warm weights from the cache) whose calls alone
    # measured (one, many) instances beyond the floor; a big GEMM (10 ms) that is never asked.
    small = Op("s", "gemm", (2, 64, 64), 2 * 2 * 64 * 64, 0, count=2)
    other = Op("o", "gemm", (2, 64, 128), 2 * 2 * 64 * 128, 0)
    big = Op("b", "gemm", (1000, 1000, 500), 1e9, 0)
    more = ops.LONE_COPIES - 1  # instances beyond the first in the `many` call
    lone = {small.shape: (50e-6, 50e-6 + more * 6e-6), other.shape: (80e-6, 80e-6 + more * 10e-6)}
    asked = []

    def lone_s(op):
        asked.append(op.shape)
        return lone[op.shape]

    rates = pricing.Rates(**{**RATES.__dict__, "lone": lone_s})
    call = pricing.predict_call([small, other, big], rates)
    base = pricing.predict_call([small, other, big], RATES)
    # One more instance costs the slope (many − one) / more, less its launch (counted apart).
    assert pricing.op_time(small, rates).seconds == pytest.approx(2 * (6e-6 - 1e-6))
    assert pricing.op_time(other, rates).seconds == pytest.approx(10e-6 - 1e-6)
    assert pricing.op_time(big, rates) == pricing.op_time(big, RATES)
    assert big.shape not in asked  # big ops are priced as before
    # Paid once per call: the median of one − slope over the small ops (44 and 70 µs).
    assert call.call_extra_s == pytest.approx(57e-6)
    assert call.overhead_s == pytest.approx(base.overhead_s + 57e-6)
    parts = sum(pricing.op_time(o, rates).seconds for o in (small, other, big))
    assert call.seconds == pytest.approx(call.overhead_s + parts)
    # Without lone measurements nothing changes; noise (many < one) adds no negative time:
    # the op is left at its bytes (none here) and the call pays `one` once.
    assert base.call_extra_s == 0.0
    noisy = pricing.Rates(**{**RATES.__dict__, "lone": lambda op: (5e-6, 4e-6)})
    assert pricing.op_time(other, noisy).seconds == 0.0
    assert pricing.predict_call([other], noisy).call_extra_s == pytest.approx(5e-6)


def test_dropless_ops_count_the_rows_routed():
    """Dropless: the experts' FLOPs are the routed rows' own, 2·tokens·k·D·F per matrix (3),
    plus the router (and the gate-weighted sum, under 1%), whatever E; no slot padding."""
    for experts in (4, 8):
        cfg = moe.MoEMLPConfig(d_model=64, mlp_dim=128, num_experts=experts, top_k=2,
                               capacity_factor=0.0, depth=2)  # fmt: skip
        t = ops.totals(moe_workload.layer_ops(cfg, 256, 0, 4, 4, count=2))
        routed = 2 * 256 * 2 * 64 * 128 * 3 + 2 * 256 * 64 * experts
        assert t.flops == pytest.approx(2 * routed, rel=0.01)
        assert t.weight_bytes == moe.num_params(cfg) * 4
    kinds = [o.kind for o in moe_workload.layer_ops(cfg, 256, 0, 4, 4)]
    assert kinds.count("ragged_gemm") == 2 and "moe_dispatch_combine" not in kinds


def test_a_device_prices_its_own_experts_rows_times_its_load():
    from batching.predict import roofline

    op = Op("moe.down", "ragged_gemm", (8, 512, 128, 64), 2 * 512 * 128 * 64, 8 * 128 * 64 * 4,
            8 * 128 * 64 * 4).to_dict()  # fmt: skip
    one = roofline.per_device_op(op, tokens=8, model=1, weight_split=8, load=1.0)
    slow = roofline.per_device_op(op, tokens=8, model=1, weight_split=8, load=1.5)
    assert one["shape"] == [1, 64, 128, 64]  # one expert, an eighth of the rows
    assert one["flops"] == op["flops"] / 8 and slow["flops"] == 1.5 * one["flops"]
    assert one["weight_bytes"] == op["weight_bytes"] / 8


def test_ragged_products_are_priced_at_their_measured_rate():
    rates = dataclasses.replace(RATES, ragged=lambda shape: 1e9)
    op = Op("e", "ragged_gemm", (8, 512, 128, 64), 2 * 512 * 128 * 64, 0.0)
    assert pricing.op_time(op, rates).seconds == pytest.approx(op.flops / 1e9)
    # without a rate for the shape: the peak, a lower bound
    assert pricing.op_time(op, RATES).seconds == pytest.approx(op.flops / 1e12)


def test_weights_over_half_the_last_level_cache_are_priced_cold():
    """moe_vs_dense's dense SwiGLU (25 MB) in a 32 MiB L3 ran at the cold microbenchmarks'
    rates from batch 2 (1.67-1.88 ms measured, 1.76 cold, 0.99 warm): such weights do not
    stay in the cache between calls; mlp_widths' width 512 (8.4 MB) does."""
    llc = 32 * 2**20
    assert analysis.weights_cold(25.2e6, llc)
    assert not analysis.weights_cold(8.4e6, llc)
    assert analysis.weights_cold(33.6e6, llc)
    assert not analysis.weights_cold(None, llc)
