"""A point's op list read from its compiled program, as row fields."""

from typing import Any

from batching.measure import hlo_ops, xla_estimates
from batching.workloads import ops as ops_lib
from batching.workloads.ops import Op


def read(flat: Any, compiled: Any, weight_args: tuple[int, ...], text: str = "") -> list[Op]:
    """The ops of a compiled flat call; the leaves of `weight_args` hold its weights.

    `text` is the compiled program's HLO, read from `compiled` when empty.
    """
    weights = flat.leaf_names(weight_args)
    return hlo_ops.program_ops(text or compiled.executable.as_text(), weights.__contains__)


def fields(ctx: Any, program: Any) -> dict[str, Any]:
    """The call's ops as read from its compiled program (batching.measure.hlo_ops).

    A workload without a hand-written list takes them as its `ops`, and its analytic counts
    from them, scaled from one device's share to the whole call. Its `weight_bytes` are its
    weight arguments' bytes, each array once: a loop that reads a weight at every step keeps
    one copy in the cache. A family with a list keeps the program's beside it
    (`program_ops`). Both are skipped with the roofline off.
    """
    if not ctx.config.roofline.enabled:
        return {}
    text = program.compiled.executable.as_text()
    ops = read(program.flat, program.compiled, ctx.wl.weight_args, text)
    listed = [o.to_dict() for o in ops]
    xla = xla_fields(text)
    if ctx.wl.ops is not None:
        return {"ops_source": "hand", "program_ops": listed, **xla}
    t = ops_lib.totals(ops)
    shape = ctx.wl.parallel_shape or ctx.topo.shape
    d, e, m = (int(shape.get(a) or 1) for a in ("data", "expert", "model"))
    rest = t.bytes - t.weight_bytes
    return {
        "ops_source": "program",
        "ops": listed,
        "analytic_flops": t.flops * d * e * m,
        "analytic_bytes": t.weight_bytes * e * m + rest * d * e * m,
        "weight_bytes": float(program.flat.leaf_bytes(ctx.wl.weight_args)),
        **xla,
    }


def xla_fields(hlo_text: str) -> dict[str, Any]:
    """XLA's own estimate of the call, where its GPU compiler wrote one (xla_estimates)."""
    by_kind = xla_estimates.estimates(hlo_text)
    if not by_kind:
        return {}
    return {"xla_estimated_latency_s": sum(by_kind.values()), "xla_estimated_by_kind": by_kind}
