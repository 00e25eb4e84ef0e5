"""A call's collectives as a workload describes them, and as XLA compiled them.

Take a collective over a mesh axis of n devices. Its payload is S bytes per device. That is
the buffer each device holds. It is the input of an all-reduce or all-to-all. It is the
OUTPUT of an all-gather. Per device and direction, over a ring or a switch, it moves this.

- all-reduce: 2·(n−1)/n · S, a reduce-scatter then an all-gather.
- all-to-all: (n−1)/n · S, as every device keeps 1/n of its buffer.
- all-gather: (n−1)/n · S.

These are the "bus bandwidth" factors of nccl-tests (doc/PERFORMANCE.md). There busbw =
algbw · factor, with algbw = S / time. A bus bandwidth compares to one device's link
bandwidth per direction, whatever n is. That link bandwidth is
specs.DeviceSpec.interconnect_bytes_per_s. So a collective takes S · factor / busbw seconds
(batching.predict.roofline.comm_time). `from_hlo` reads the collectives a compiled program
holds. It checks a workload's count.
"""

import math
import re
from typing import Any

from batching.setup import topology

AXES = topology.MESH_AXES
KINDS = ("all_reduce", "all_to_all", "all_gather")


def bus_factor(kind: str, axis_size: int) -> float:
    """Bytes each device sends per payload byte (nccl-tests' busbw factor)."""
    n = axis_size
    if kind == "all_reduce":
        return 2.0 * (n - 1) / n
    if kind in ("all_to_all", "all_gather"):
        return (n - 1) / n
    raise ValueError(f"collective kind must be one of {KINDS}, got {kind!r}")


def wire_bytes(c: dict[str, Any]) -> float:
    """Bytes one device sends for a collectives entry (all its `count` calls)."""
    return c["bytes"] * c["count"] * bus_factor(c["kind"], c["axis_size"])


def total_bytes(collectives: list[dict[str, Any]] | None) -> float:
    """Σ bytes·count: the payload of a call's collectives per device (a row's comm_bytes)."""
    return float(sum(c["bytes"] * c["count"] for c in collectives or []))


def entry(kind: str, axis: str, axis_size: int, payload_bytes: float, count: int) -> dict:
    """One collectives entry as the contract names it (see batching.workloads.base.Workload)."""
    if kind not in KINDS:
        raise ValueError(f"collective kind must be one of {KINDS}, got {kind!r}")
    return {
        "kind": kind,
        "axis": axis,
        "axis_size": int(axis_size),
        "bytes": float(payload_bytes),
        "count": int(count),
    }


def shards(total: int, parts: int, what: str) -> int:
    """`total` split evenly over `parts` devices.

    It raises a ValueError naming `what` if `total` does not split.
    """
    if total % parts:
        raise ValueError(f"{what} ({total}) must be divisible by its mesh axes ({parts} devices)")
    return total // parts


# ---------------------------------------------------------------- what XLA compiled

# One HLO instruction: `%name = TYPE op(` with TYPE an array `f32[2,64]{1,0}` or a tuple of them.
_HLO_OP = re.compile(
    # A tuple result may carry /*index=5*/ comments (8 or more elements): no '=' limit.
    r"=\s*(?P<type>\([^()]*\)|\w+\[[\d,]*\](?:\{[^}]*\})?)\s+"
    r"(?P<op>all-reduce|all-gather|all-to-all|reduce-scatter|collective-permute)"
    r"(?P<start>-start)?\("
)
_HLO_ARRAY = re.compile(r"(\w+)\[([\d,]*)\]")
_HLO_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4}
_HLO_BYTES.update({"s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16})


def from_hlo(text: str) -> dict[str, Any]:
    """The collectives in a compiled program's HLO text.

    It returns {"counts": {op: n}, "bytes": Σ per device}. The analytic `collectives` are
    checked against it, as xla_flops_ratio checks FLOPs. Bytes are each op's result per
    device. That is an all-gather's output, or an all-reduce's or all-to-all's buffer. A
    combined op's tuple is summed. An async `-start` op counts once, by its largest array.
    That array is its result; the tuple also holds the operand.
    """
    counts: dict[str, int] = {}
    total = 0
    for m in _HLO_OP.finditer(text):
        op = m["op"].replace("-", "_")
        arrays = [
            _HLO_BYTES.get(dt, 4) * math.prod(int(d) for d in dims.split(",") if d)
            for dt, dims in _HLO_ARRAY.findall(m["type"])
        ]
        counts[op] = counts.get(op, 0) + 1
        total += (max(arrays) if m["start"] else sum(arrays)) if arrays else 0
    return {"counts": counts, "bytes": float(total)}
