"""The per-op roofline: a call's ops (batching.workloads.ops) priced one by one.

A call is a sequence of kernels. Each kernel runs at its own limit. So the prediction
(`predict_call`) is a sum over ops.

    t = dispatch floor + Σ_ops count·max(bytes / BW_op, flops / F(op)) + launches·kernel overhead
        + call extra

The terms are these.

- The dispatch floor is a trivial jitted call given the call's own arguments. It includes
  flattening the parameter pytree, Python work paid on every call.
- A launch is the measured cost of one more kernel.
- An op is small when its roofline time is under SMALL_OP_S. A per-call cost can then be
  as large as the op. So a small op is priced from lone calls (`lone_costs`). One call
  runs one instance at its shape, another LONE_COPIES instances. Each instance costs the
  slope between them.
- The call extra is what a real program pays once per call beyond that floor. Waking a
  worker thread or a thread pool is such a cost. `call_extra` takes the median of the
  small ops' `once` costs (`lone_costs`).
- F(op) is measured at the op's own shape where the lab can. Microbenchmarks cover GEMMs
  (batched or not, attention's products in a program's list among them: ops.dot_shaped),
  the MoE dispatch/combine einsums, convolutions and attention. Other ops are
  bandwidth-bound. They are priced on their bytes only.
- BW_op is the DRAM bandwidth by default. Some bytes stay in the last-level cache (LLC)
  between calls or ops. They get the measured LLC bandwidth. The weights stay there when
  they fit in half of the LLC (analysis.WARM_WEIGHTS_SHARE). They then stay warm between
  timed calls. An op's activations stay there when they fit in half of it. The op before
  produced them, and this op reads them straight after.
- Ops that XLA fuses into the producer's epilogue (`fused`) move no bytes. They cost no
  launch of their own. Their FLOPs stay in the totals.

Fusion differs by backend. On a CPU, XLA runs the elementwise work after a product apart.
It is a loop fusion of its own. A trace shows `ynn_fusion`, then `broadcast_maximum_fusion`.
So the workloads list that work as an op. It has a launch, and its bytes are in the cache.
Where fusion is not certain, the producer's microbenchmark runs the epilogue too. For
example, shape_bench.measure_conv_flops times conv + BN + ReLU. Either way the time is
measured.
"""

import dataclasses
import math
import statistics
from collections.abc import Callable
from typing import Any

from batching.workloads.ops import GEMM_LIKE, LONE_COPIES, LONE_KINDS, Op, dot_shaped, launches

# An op whose roofline time (seconds) is under this is small. A per-call cost, such as a
# worker thread woken (call_extra), can then be as large as the op, so it is measured alone.
SMALL_OP_S = 100e-6
# A kernel traced this much slower than both its roofs is flagged `slower_than_roofs`.
SLOWER_THAN_ROOFS = 1.2


@dataclasses.dataclass(frozen=True)
class Rates:
    """What a device offers each op.

    A rate function gives the FLOP/s of one instance at its shape. The attention function
    gives seconds instead. A function returns None where a shape has no rate. Such a shape
    was not measured, and there is nothing to interpolate from. A function left None
    means the kind has no microbenchmark on the device. Either way the op runs at
    `peak_flops_per_s`. That gives a lower bound on its time.
    """

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
    """One op's prediction, summed over its `count` instances.

    It holds the seconds and the limit that set them. It also holds FLOPs and roof terms.
    """

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
    """(memory_s, compute_s, memory limit) of one instance at the per-shape rates."""
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
    """Seconds of one instance's arithmetic at the rate measured at its shape.

    The rate may be interpolated between measured shapes. None means the device has no such
    rate. The op is then priced at the peak.
    """
    if op.kind == "attention" and op.layout and rates.attention is not None:
        return rates.attention(op)
    if rates.gemm is not None and dot_shaped(op):
        rate = rates.gemm(op.shape)
        # Epilogue FLOPs beyond the product (a bias add) ride along at no extra time.
        return 2.0 * math.prod(op.shape) / rate if rate else None
    if op.kind == "ragged_gemm" and rates.ragged is not None and op.flops:
        rate = rates.ragged(op.shape)
        return op.flops / rate if rate else None
    if op.kind == "conv" and rates.conv is not None and op.flops and len(op.shape) in (7, 8):
        rate = rates.conv(op.shape)
        return op.flops / rate if rate else None
    return None


def lone_costs(op: Op, rates: Rates) -> tuple[float, float] | None:
    """(each, once) of a small op, in seconds.

    Both come from lone calls (peaks.lone_op_seconds). One runs one instance of the op alone,
    the other LONE_COPIES instances. Their seconds are beyond the dispatch floor.

    - `each` is what one more instance costs in a call, launch included. It is
      (many − one) / (LONE_COPIES − 1).
    - `once` is what the call paid once for the op. It is one − each.

    None for an op that is not measurable or not small. An op is small when its roofline
    time per instance is under `rates.small_op_s`.
    """
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

    A small op (lone_costs) is priced from its lone calls instead. One more instance in a
    call costs the slope between them. Its launch is taken off, as launches are counted
    apart. What the call pays once for it goes to call_extra.
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
    """A call's predicted seconds: its overhead plus its ops' times.

    The overhead is the dispatch floor, the launches and the call extra.
    """

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
        """Per op kind: predicted seconds, FLOPs, intensity bound and FLOP rate.

        The bound is memory or compute, whichever roof term is larger. The FLOP rate is the
        one the prediction gives the kind. `slower_than_roofs` flags a kind predicted over
        SLOWER_THAN_ROOFS times its larger roof term. A skinny GEMM can be such a kind. Its
        microbenchmark clocks it at a fraction of either roof. By intensity it is
        memory-bound, yet it runs slower than its bytes allow.
        """
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
    """What a call pays once beyond its floor, unseen by chained microbenchmarks.

    The per-shape microbenchmarks run many instances of an op in one call and divide. A cost
    paid once per call is spread thin there. The dispatch floor is a trivial program that
    runs inline. On XLA:CPU a real program can cost more per call.

    - The PjRt client hands a program of 1000 FLOPs or more to a thread. Its cpu_client
      decides this in `cheap_computation`.
    - A library kernel forks onto the intra-op thread pool. Its threads sleep between
      calls. A product from 2 rows up runs as such a kernel, a YNNPACK fusion.

    Each small op's lone calls are measured (lone_costs). The one-instance call's seconds
    minus the slope is what a call paid once for that op. A call pays this once, not once
    per op.
    experiments/results/cpu-2core-epyc/README.md shows it on MLPs of different depths. Each
    small op of a call measures the same hand-off. So the call pays the median of their
    estimates. One noisy lone call among many does not set it.
    """
    extras = []
    for op in ops:
        lone = lone_costs(op, rates)
        if lone is not None:
            extras.append(lone[1])
    return max(float(statistics.median(extras)), 0.0) if extras else 0.0


def predict_call(ops: list[Op], rates: Rates) -> CallTime:
    """Predicted seconds of one call.

    It sums the dispatch floor, the op times, the launches and the call extra. This does
    not say which limit the call is at. The roofline says that, by intensity
    (batching.predict.analysis.regime_fields). Which ops' measured rates happen to be slow
    does not decide it.
    """
    times = [op_time(o, rates) for o in ops]
    extra_s = call_extra(ops, rates)
    overhead_s = rates.dispatch_floor_s + launches(ops) * rates.kernel_overhead_s + extra_s
    return CallTime(overhead_s + sum(t.seconds for t in times), overhead_s, times, extra_s)
