"""The op list read from a compiled program, against the lab's hand-written lists.

Each family's hand list counts the products (GEMMs, convolutions, attention, the MoE's
dispatch and combine) and the bytes a call must move. The program's list counts every
kernel that runs, at its boundary. So the two agree on the products' FLOPs and weights. The
program's extra bytes and FLOPs sit in the kinds the hand lists leave out or lump together:
elementwise passes, reductions, gathers, intermediates between kernels.
"""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from batching import app
from batching.measure import hlo_ops, shape_bench, timing, xla_estimates
from batching.predict import pricing
from batching.setup import topology
from batching.workloads import base, ops, registry, user
from batching.workloads import family as family_lib
from configs import default
from configs import moe_decoder as moe_decoder_config
from tests.conftest import tiny
from tests.test_decode_workload import tiny_decoder
from tests.test_moe_workload import tiny_moe
from tests.test_resnet_workload import tiny_resnet

# The products' FLOPs and weight bytes agree this closely.
PRODUCT_TOLERANCE = 0.02
# The hand lists name the MoE's dispatch and combine einsums apart; in HLO they are dots.
PRODUCTS = ("gemm", "conv", "attention", "moe_dispatch_combine", "ragged_gemm")


def _numerics(**model):
    return dict(dtype="float32", param_dtype="float32", matmul_precision="default", **model)


def _configs():
    yield "mlp", tiny(width=64, depth=3)
    yield "resnet", tiny_resnet()
    yield "moe", tiny_moe()
    yield "decoder_decode", tiny_decoder()
    yield "decoder_prefill", tiny_decoder("prefill")
    swiglu = tiny()
    swiglu.model = _numerics(name="swiglu", d_model=32, mlp_dim=64, depth=2)
    yield "swiglu", swiglu
    conv = tiny()
    conv.model = _numerics(name="conv_stack", channels=8, depth=2, image_size=16)
    yield "conv_stack", conv
    moe_decoder = moe_decoder_config.get_config()
    moe_decoder.run_name = "tiny"
    small = dict(d_model=32, n_layers=2, head_dim=8, mlp_dim=64, cache_len=32, prompt_len=16)
    moe_decoder.model.update(small)
    yield "moe_decoder", moe_decoder


CONFIGS = dict(_configs())


def _both_lists(config, batch: int, tmp_path) -> tuple[list[ops.Op], list[ops.Op]]:
    fam = registry.of(config.model)
    family_lib.with_fields(config.model, fam)
    wl = fam.build(config, topology.build(config), str(tmp_path))
    flat = base.flat_call(wl, batch)
    compiled = timing.compile_fn(flat.fn, flat.args, flat.donate_argnums)
    names = flat.leaf_names(wl.weight_args)
    program = hlo_ops.program_ops(compiled.executable.as_text(), names.__contains__)
    return program, wl.ops(batch)


def _sum(listed: list[ops.Op], field: str, kinds=PRODUCTS) -> float:
    return sum(getattr(o, field) * o.count for o in listed if o.kind in kinds)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_program_and_hand_lists_agree_on_the_products_and_explain_the_rest(name, tmp_path):
    program, hand = _both_lists(CONFIGS[name].copy_and_resolve_references(), 4, tmp_path)
    for field in ("flops", "weight_bytes"):
        p, h = _sum(program, field), _sum(hand, field)
        assert abs(p / h - 1) <= PRODUCT_TOLERANCE, (name, field, p, h)
    # What the program adds is in the kinds the hand list leaves out: never less in all.
    tp, th = ops.totals(program), ops.totals(hand)
    assert tp.flops >= (1 - PRODUCT_TOLERANCE) * th.flops
    assert tp.bytes >= (1 - PRODUCT_TOLERANCE) * th.bytes
    assert tp.weight_bytes >= (1 - PRODUCT_TOLERANCE) * th.weight_bytes


def test_a_grouped_conv_keeps_its_groups_and_is_measured_at_its_own_shape():
    x, w = jnp.ones((2, 8, 8, 16)), jnp.ones((3, 3, 4, 32))

    def grouped(w, x):
        return jax.lax.conv_general_dilated(
            x, w, (1, 1), "SAME", dimension_numbers=shape_bench.NHWC, feature_group_count=4
        )

    text = jax.jit(grouped).lower(w, x).compile().as_text()
    (conv,) = [o for o in hlo_ops.program_ops(text) if o.kind == "conv"]
    assert conv.shape == (2, 8, 8, 16, 32, 3, 1, 4)
    assert conv.flops == 2 * 2 * 8 * 8 * 32 * 9 * 4 == shape_bench.conv_flops_of(conv.shape)
    device = jax.devices()[0]
    assert shape_bench.measure_conv_flops(device, "float32", conv.shape) > 0


# A library fusion of two products, as XLA:CPU hands a network to YNNPACK.
TWO_PRODUCTS = """
HloModule m

%fused (p0: f32[4,8], p1: f32[8,16], p2: f32[16,8]) -> f32[4,8] {
  %p0 = f32[4,8]{1,0} parameter(0)
  %p1 = f32[8,16]{1,0} parameter(1)
  %p2 = f32[16,8]{1,0} parameter(2)
  %d1 = f32[4,16]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %r = f32[4,16]{1,0} tanh(%d1)
  ROOT %d2 = f32[4,8]{1,0} dot(%r, %p2), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

ENTRY %main (x: f32[4,8], w1: f32[8,16], w2: f32[16,8]) -> f32[4,8] {
  %x = f32[4,8]{1,0} parameter(0)
  %w1 = f32[8,16]{1,0} parameter(1)
  %w2 = f32[16,8]{1,0} parameter(2)
  ROOT %f = f32[4,8]{1,0} fusion(%x, %w1, %w2), kind=kCustom, calls=%fused
}
"""


def test_a_library_fusion_of_several_products_lists_each_product():
    listed = hlo_ops.program_ops(TWO_PRODUCTS, lambda name: name.startswith("w"))
    gemms = sorted((o for o in listed if o.kind == "gemm"), key=lambda o: o.shape)
    assert [o.shape for o in gemms] == [(4, 8, 16), (4, 16, 8)]
    assert [o.flops for o in gemms] == [2 * 4 * 8 * 16] * 2
    assert [o.weight_bytes for o in gemms] == [8 * 16 * 4] * 2
    # each reads its operands and writes its output; the tanh rides in an epilogue
    assert gemms[0].bytes == (4 * 8 + 8 * 16 + 4 * 16) * 4
    (rest,) = [o for o in listed if o.kind == "elementwise"]
    assert rest.fused and rest.flops == 4 * 16 and rest.bytes == 0


class Recurrent(nnx.Module):
    def __init__(self):
        self.w = nnx.Param(jnp.ones((32, 32)) / 32)

    def __call__(self, x):
        step = lambda h, _: (jnp.tanh(h @ self.w[...]), None)  # noqa: E731
        return jax.lax.scan(step, x, None, length=9)[0]


def test_a_loop_reads_its_weights_every_step_but_keeps_one_copy():
    config = default.get_config()
    wl = user.build(Recurrent(), lambda b: (np.ones((b, 32), np.float32),), topology.build(config))
    flat = base.flat_call(wl, 4)
    compiled = timing.compile_fn(flat.fn, flat.args, flat.donate_argnums)
    listed = hlo_ops.program_ops(
        compiled.executable.as_text(), flat.leaf_names(wl.weight_args).__contains__
    )
    assert _sum(listed, "weight_bytes") == 9 * 32 * 32 * 4  # read at every step
    assert flat.leaf_bytes(wl.weight_args) == 32 * 32 * 4  # what the cache must hold


# XLA's GPU cost models write their estimates into backend configs (a fusion's, or the
# instruction's list); a loop's body runs its trip count times.
ESTIMATED = (pathlib.Path(__file__).parent / "data" / "xla_estimates.hlo").read_text()


def test_xlas_own_estimates_are_read_per_kind_with_loops_counted():
    by_kind = xla_estimates.estimates(ESTIMATED)
    assert by_kind == pytest.approx({"gemm": 10e-6, "elementwise": 3 * 2.5e-6})
    assert xla_estimates.estimates(TWO_PRODUCTS) is None  # a program without them


def test_the_report_sets_both_lists_side_by_side_per_kind(tmp_path):
    config = tiny(width=32, depth=2)
    config.sweep.batch_sizes = (1, 4)
    app.run(config, str(tmp_path))
    rows = [
        json.loads(line) for line in (tmp_path / "results.jsonl").read_text().split("\n") if line
    ]
    assert all(r["ops_source"] == "hand" and r["program_predicted_latency_s"] > 0 for r in rows)
    report = (tmp_path / "report.md").read_text()
    section = report.split("## Hand-written and program op lists")[1].split("\n## ")[0]
    assert "| tiny | 2 |" in section and "tiny at batch 4:" in section
    gemm = next(line for line in section.splitlines() if line.startswith("| gemm |"))
    cells = [c.strip() for c in gemm.strip("|").split("|")]
    hand_gflop, program_gflop = float(cells[1]), float(cells[2])
    assert program_gflop == pytest.approx(hand_gflop, rel=PRODUCT_TOLERANCE)


def test_attentions_products_in_a_program_are_priced_as_batched_gemms():
    seen = []
    rates = pricing.Rates(
        dram_bytes_per_s=1e10, cache_bytes_per_s=1e11, cache_bytes=1e6, peak_flops_per_s=1e12,
        dispatch_floor_s=1e-5, kernel_overhead_s=1e-6, weights_warm=False,
        gemm=lambda shape: seen.append(shape) or 1e9, attention=lambda op: 2e-4,
    )  # fmt: skip
    scores = ops.Op(
        "attention/dot_general", "attention", (8, 4096, 64, 3), 2 * 8 * 4096 * 64 * 3, 1e3
    )
    assert ops.dot_shaped(scores)
    assert pricing.op_time(scores, rates).seconds == pytest.approx(scores.flops / 1e9)
    assert seen == [(8, 4096, 64, 3)]
    # the lab's own attention ops keep their pricing: over a cache, and a prefill's at the peak
    cached = ops.Op("attention", "attention", (2, 4, 128, 3, 64), 1e6, 1e3, layout="bksh")
    prefill = ops.Op("attention", "attention", (2, 4, 16, 16, 64), 1e6, 0.0)
    fused = ops.Op("fmha", "attention", (2, 16, 4, 64), 0.0, 1e3)  # a cuDNN call, no FLOPs here
    assert not any(ops.dot_shaped(o) for o in (cached, prefill, fused))
    assert pricing.op_time(cached, rates).seconds == pytest.approx(2e-4)
    assert pricing.op_time(prefill, rates).seconds == pytest.approx(1e6 / 1e12)
