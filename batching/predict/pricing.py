"""The per-op roofline: a call's ops (batching.workloads.ops) priced one by one.

The prediction (`predict_call`) is a sum over ops, because a call is a sequence of kernels,
each at its own limit:

    t = dispatch floor + Σ_ops count·max(bytes / BW_op, flops / F(op)) + launches·kernel overhead
        + call extra

- The dispatch floor is a trivial jitted call handed the call's own arguments (flattening a
  model's parameter pytree is per-call Python work); each launch is the measured cost of one
  more kernel in a program.
- A small op (under SMALL_OP_S at its per-shape rates, where a per-call cost of tens of µs
  is as large as the op) is priced from calls that run one and LONE_COPIES instances of it
  alone at its shape (`lone_costs`): the slope between them per instance, and the call extra,
  what a real program pays once per call beyond the trivial floor (a worker thread or thread
  pool woken), is the median of one − slope over the call's small ops (`call_extra`).
- F(op) is measured by a microbenchmark at the op's own shape where the lab has one (GEMMs,
  batched or not, the MoE dispatch/combine einsums, convolutions, attention); other ops are
  bandwidth-bound and priced on their bytes only.
- BW_op is the DRAM bandwidth, or the measured last-level-cache bandwidth for bytes that stay
  in that cache between calls or between ops: the weights when all of the call's weights fit
  in half of the LLC (they stay warm between timed calls; analysis.WARM_WEIGHTS_SHARE), an
  op's activations when they fit in half of it (produced by the op before, consumed straight
  after).
- Ops XLA fuses into the producer's epilogue (`fused`) move no bytes and cost no launch of
  their own; their FLOPs stay in the totals. Fusion differs by backend: XLA on a CPU runs the
  elementwise work after a product as a loop fusion of its own (a trace shows `ynn_fusion`
  then `broadcast_maximum_fusion`), so workloads list it as an op (a launch, its bytes in the
  cache); where it is not certain, the producer's microbenchmark runs the epilogue too
  (shape_bench.measure_conv_flops times conv + BN + ReLU), so the time is measured either way.
"""

import dataclasses
import math
import statistics
from collections.abc import Callable
from typing import Any

from batching.workloads.ops import GEMM_LIKE, LONE_COPIES, LONE_KINDS, Op, launches

# An op whose roofline time is under this is small: a per-call cost of tens of µs (a worker
# thread woken, see call_extra) is then as large as the op itself, so it is measured.
SMALL_OP_S = 100e-6
# A kernel traced this much slower than both its roofs is flagged `slower_than_roofs`.
SLOWER_THAN_ROOFS = 1.2


@dataclasses.dataclass(frozen=True)
class Rates:
    """What a device offers each op. Rate functions return FLOP/s (seconds for attention) of
    one instance at its shape, or None where that shape has no rate (not measured, nothing to
    interpolate from); a function left None means the device has no microbenchmark for the
    kind. Either way the op then runs at `peak_flops_per_s`, a lower bound on its time."""

    dram_bytes_per_s: float
    cache_bytes_per_s: float
    cache_bytes: float
    peak_flops_per_s: float
    dispatch_floor_s: float
    kernel_overhead_s: float
    weights_warm: bool
    gemm: Callable[[tuple[int, ...]], float | None] | None = None
    conv: Callable[[tuple[int, ...]], float | None] | None = None
    attention: Callable[[Op], float | None] | None = None
    # FLOP/s of the rows routed through a grouped product (groups, m, k, n), as the backend
    # runs jax.lax.ragged_dot at that shape (shape_bench.measure_ragged_flops).
    ragged: Callable[[tuple[int, ...]], float | None] | None = None
    # (one, many): seconds beyond the dispatch floor of calls running one and LONE_COPIES
    # instances of an op alone (peaks.lone_op_seconds); asked only for ops under `small_op_s`
    # (lone_costs).
    lone: Callable[[Op], tuple[float, float] | None] | None = None
    small_op_s: float = SMALL_OP_S


@dataclasses.dataclass(frozen=True)
class OpTime:
    """One op's predicted seconds (all `count` instances), the limit that set them, its FLOPs and
    its roofline terms."""

    name: str
    kind: str
    count: int
    seconds: float  # all `count` instances
    limit: str  # what set `seconds`: memory, cache, compute (the op's FLOP rate) or fused
    flops: float = 0.0  # all instances
    # The op's roofline terms, all instances: its bytes at its memory roof (DRAM or cache)
    # and its FLOPs at the device's compute roof; its intensity bound is the larger.
    roof_memory_s: float = 0.0
    roof_compute_s: float = 0.0


def _roofline_parts(op: Op, rates: Rates) -> tuple[float, float, str]:
    """(memory_s, compute_s, memory limit) of one instance, from the per-shape rates."""
    activation_bytes = op.bytes - op.weight_bytes
    act_bw = (
        rates.cache_bytes_per_s
        if activation_bytes <= rates.cache_bytes / 2
        else rates.dram_bytes_per_s
    )
    weight_bw = rates.cache_bytes_per_s if rates.weights_warm else rates.dram_bytes_per_s
    memory_s = op.weight_bytes / weight_bw + activation_bytes / act_bw
    # "cache" where every byte the op moves comes from the cache.
    cached = (op.weight_bytes == 0 or rates.weights_warm) and act_bw == rates.cache_bytes_per_s
    memory_limit = "cache" if cached else "memory"
    compute_s = _measured_compute_s(op, rates)
    if compute_s is None and op.kind in (*GEMM_LIKE, "conv", "attention", "ragged_gemm"):
        compute_s = op.flops / rates.peak_flops_per_s
    elif compute_s is None:
        # Elementwise, normalisation, reductions, gathers: bandwidth-bound (a few FLOPs per
        # byte, far below any device's ratio), priced on their bytes only.
        compute_s = 0.0
    return memory_s, compute_s, memory_limit


def _measured_compute_s(op: Op, rates: Rates) -> float | None:
    """Seconds of an op's arithmetic at the rate measured (or interpolated) at its shape;
    None where the device has no such rate for it (it is then priced at the peak)."""
    if op.kind == "attention" and op.layout and rates.attention is not None:
        return rates.attention(op)
    if op.kind in GEMM_LIKE and rates.gemm is not None and op.flops and len(op.shape) in (3, 4):
        rate = rates.gemm(op.shape)
        # Epilogue FLOPs beyond the product (a bias add) ride along at no extra time.
        return 2.0 * math.prod(op.shape) / rate if rate else None
    if op.kind == "ragged_gemm" and rates.ragged is not None and op.flops:
        rate = rates.ragged(op.shape)
        return op.flops / rate if rate else None
    if op.kind == "conv" and rates.conv is not None and op.flops and len(op.shape) == 7:
        rate = rates.conv(op.shape)
        return op.flops / rate if rate else None
    return None


def lone_costs(op: Op, rates: Rates) -> tuple[float, float] | None:
    """(each, once) of a small op, from calls running one and LONE_COPIES instances of it alone
    (peaks.lone_op_seconds, seconds beyond the dispatch floor): what one more instance costs
    in a call, (many − one) / (LONE_COPIES − 1) with its launch, and what the call paid once
    for it, one − each. None for an op that is not small (roofline time per instance at its
    per-shape rates `rates.small_op_s` or more) or not measurable."""
    if (
        rates.lone is None
        or op.fused
        or not op.flops
        or op.kind not in LONE_KINDS
        or len(op.shape) not in LONE_KINDS[op.kind]
    ):
        return None
    memory_s, compute_s, _ = _roofline_parts(op, rates)
    if max(memory_s, compute_s) >= rates.small_op_s:
        return None
    measured = rates.lone(op)
    if measured is None:
        return None
    one, many = measured
    each = max((many - one) / (LONE_COPIES - 1), 0.0)
    return each, one - each


def op_time(op: Op, rates: Rates) -> OpTime:
    """max(bytes / BW_op, flops / F(op)) for each instance, times its count.

    A small op (lone_costs) is priced from calls that run it alone instead: one more instance
    in a call costs the slope between them (its launch taken off, as launches are counted
    apart); what the call pays once for it is call_extra's.
    """
    if op.fused:
        return OpTime(op.name, op.kind, op.count, 0.0, "fused", op.flops * op.count)
    memory_s, compute_s, memory_limit = _roofline_parts(op, rates)
    lone = lone_costs(op, rates)
    if lone is not None:
        compute_s = max(lone[0] - rates.kernel_overhead_s, 0.0)
    n = op.count
    roofs = (memory_s * n, op.flops * n / rates.peak_flops_per_s)
    if compute_s >= memory_s:
        return OpTime(op.name, op.kind, n, compute_s * n, "compute", op.flops * n, *roofs)
    return OpTime(op.name, op.kind, n, memory_s * n, memory_limit, op.flops * n, *roofs)


@dataclasses.dataclass(frozen=True)
class CallTime:
    """A call's predicted seconds: its overhead (dispatch floor, launches, call extra) plus its ops'
    times."""

    seconds: float
    overhead_s: float  # dispatch floor + launches + call_extra_s
    ops: list[OpTime]
    call_extra_s: float = 0.0  # what a call pays once beyond the floor (call_extra)

    def by_kind(self) -> dict[str, dict[str, float]]:
        """Predicted seconds per op kind, split by the limit each op is at."""
        out: dict[str, dict[str, float]] = {}
        for t in self.ops:
            if t.seconds:
                per = out.setdefault(t.kind, {})
                per[t.limit] = per.get(t.limit, 0.0) + t.seconds
        return out

    def kind_detail(self) -> dict[str, dict[str, Any]]:
        """Per op kind: predicted seconds, FLOPs, the bound its intensity puts it at (memory
        or compute: the larger of its roofline terms at the device's roofs), the FLOP rate
        the prediction gives it, and whether that rate is its shape's measured one, below
        both roofs (`slower_than_roofs`: a skinny GEMM that a microbenchmark clocks at a
        fraction of either roof is memory-bound by intensity and still slower than its
        bytes)."""
        out: dict[str, dict[str, Any]] = {}
        for t in self.ops:
            if not t.seconds:
                continue
            k = out.setdefault(t.kind, {"seconds": 0.0, "flops": 0.0, "memory_s": 0.0,
                                        "compute_s": 0.0})  # fmt: skip
            k["seconds"] += t.seconds
            k["flops"] += t.flops
            k["memory_s"] += t.roof_memory_s
            k["compute_s"] += t.roof_compute_s
        for k in out.values():
            k["bound"] = "compute" if k["compute_s"] >= k["memory_s"] else "memory"
            k["flops_per_s"] = k["flops"] / k["seconds"] if k["flops"] else None
            roof = max(k["memory_s"], k["compute_s"])
            k["slower_than_roofs"] = k["seconds"] > SLOWER_THAN_ROOFS * roof
        return out


def call_extra(ops: list[Op], rates: Rates) -> float:
    """What a call pays once, beyond its dispatch floor, that no chained microbenchmark sees.

    The per-shape microbenchmarks run many instances of an op in one call and divide, so a
    cost paid once per call is spread thin there, and the dispatch floor is a trivial program
    that runs inline. A real program can cost more per call: XLA:CPU's PjRt client hands a
    program of 1000 FLOPs or more to a worker thread (`cheap_computation` in its cpu_client),
    and a library kernel (the YNNPACK fusion XLA:CPU uses for a product from 2 rows up) forks
    onto the intra-op thread pool, whose threads sleep between calls. For each small op the
    calls running one and LONE_COPIES instances alone are measured (lone_costs); one minus the
    slope per instance is what a call paid once for it. A call pays it once, not once per op:
    on a quiet 2-core CPU the 2-layer and the 8-layer width-64 MLPs both measured ~80-100 µs
    above the per-op sum from batch 2 up. Each small op of a call measures the same hand-off,
    so the call pays the median of their estimates (one noisy lone call among many does not
    set it).
    """
    extras = []
    for op in ops:
        lone = lone_costs(op, rates)
        if lone is not None:
            extras.append(lone[1])
    return max(float(statistics.median(extras)), 0.0) if extras else 0.0


def predict_call(ops: list[Op], rates: Rates) -> CallTime:
    """Predicted seconds of one call: dispatch floor + Σ op times + kernel launches + the
    call's measured once-per-call extra (call_extra). Which limit the call is at is the
    roofline's to say (batching.predict.analysis.regime_fields), by intensity, not by which ops'
    measured rates happen to be slow."""
    times = [op_time(o, rates) for o in ops]
    extra_s = call_extra(ops, rates)
    overhead_s = rates.dispatch_floor_s + launches(ops) * rates.kernel_overhead_s + extra_s
    return CallTime(overhead_s + sum(t.seconds for t in times), overhead_s, times, extra_s)
