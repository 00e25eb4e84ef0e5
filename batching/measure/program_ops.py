"""A point's op list read from its compiled program, as row fields."""

from typing import Any

from batching.measure import hlo_ops
from batching.workloads import ops as ops_lib
from batching.workloads.ops import Op


def read(flat: Any, compiled: Any, weight_args: tuple[int, ...]) -> list[Op]:
    """The ops of a compiled flat call; the leaves of `weight_args` hold its weights."""
    weights = flat.leaf_names(weight_args)
    return hlo_ops.program_ops(compiled.executable.as_text(), weights.__contains__)


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
    ops = read(program.flat, program.compiled, ctx.wl.weight_args)
    listed = [o.to_dict() for o in ops]
    if ctx.wl.ops is not None:
        return {"ops_source": "hand", "program_ops": listed}
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
    }
