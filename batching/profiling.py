"""Traced per-op times: a profiler trace of a point, read back per lab op kind.

The sweep captures a `jax.profiler` trace of a few calls of a point after timing it
(`config.profile`). This module reads that trace with JAX's own reader
(`jax.profiler.ProfileData`, the XSpace protobuf) and sums the time of every HLO instruction
XLA ran, by the lab's op kind (batching.ops.KINDS), so the per-op prediction can stand next
to what the hardware did.

Where the events are (XSpace conventions, tsl/profiler/utils/xplane_schema.h):
- XLA:CPU: the thunk executor records one event per executed HLO instruction (thunk) on the
  host plane "/host:CPU", on whichever thread ran it, with stats `hlo_op` (the instruction's
  name), `hlo_module` (the program, e.g. "jit_forward") and `device_ordinal`; an
  asynchronous thunk lasts until its "end: <op>" event (see ASYNC_END_PREFIX).
- XLA:GPU: CUPTI records each kernel on the device plane "/device:GPU:<N>" (one line per
  stream); XLA's launch annotation `#hlo_op=...,hlo_module=...#` becomes the same two stats on
  the kernel event (tsl cupti_collector). Kernels replayed as a CUDA graph (XLA's command
  buffers) carry the command buffer as `hlo_op` and the fused instruction as their name.
  Tested on a trace from an H200 (tests/data) and on a synthetic XSpace.
- The calls themselves: the sweep wraps each in `StepTraceAnnotation("batch_<B>")`, an event
  on the host plane whose duration is the call's wall time as the timer sees it (dispatch,
  run, block until ready).

Which kind an instruction is comes from the compiled HLO text of that point: its opcode, or
for a fusion or custom call, what its called computations contain (a fusion with a
convolution is conv, with a dot is gemm, ...) and the custom-call target (cuBLAS gemm, cuDNN
convolution or fused attention). Instructions that are no op of the lab (copies, control
flow bookkeeping) and the gaps between kernels (dispatch, argument handling, waiting) go
in `OTHER`, so the kinds plus other add up to the traced wall time of a call.
"""

import dataclasses
import glob
import os
import re
from typing import Any

import jax

from batching import ops as ops_lib

OTHER = "other"
COLLECTIVE = "collective"

# Where kernels are: an accelerator's device planes (the first one is read; TPU untested),
# else the host plane; and the stats that name a kernel's HLO instruction and program.
HOST_PLANE = "/host:CPU"
DEVICE_PLANE_PREFIXES = ("/device:GPU:", "/device:TPU:")
HLO_OP_STAT = "hlo_op"
HLO_MODULE_STAT = "hlo_module"
DEVICE_ORDINAL_STAT = "device_ordinal"  # XLA:CPU: which device of the host ran the thunk
# XLA:CPU runs some thunks asynchronously (an Eigen convolution on the intra-op pool): the
# thunk's event covers its launch, and an event "end: <op>" on the thread that completes it
# marks its end. The two are linked by a flow id: `_p` (producer) on the thunk's event, `_c`
# (consumer) on the end event (tsl/profiler/utils/xplane_schema.h, kProducerId/kConsumerId).
ASYNC_END_PREFIX = "end: "
FLOW_PRODUCER_STAT = "_p"
FLOW_CONSUMER_STAT = "_c"

# Opcodes that are no lab op: bookkeeping, layout copies, host transfer.
_OTHER_OPS = {
    "copy", "copy-start", "copy-done", "parameter", "tuple", "get-tuple-element", "bitcast",
    "constant", "after-all", "opt-barrier", "add-dependency", "domain", "partition-id",
    "replica-id", "send", "send-done", "recv", "recv-done", "infeed", "outfeed", "iota",
}  # fmt: skip
# Control flow: its body's instructions are traced one by one, so its own event is skipped.
_CONTROL_OPS = {"while", "conditional", "call", "async-start", "async-done", "async-update"}
_COLLECTIVE_OPS = {
    "all-reduce", "all-reduce-start", "all-reduce-done", "all-gather", "all-gather-start",
    "all-gather-done", "all-to-all", "reduce-scatter", "collective-permute",
    "collective-permute-start", "collective-permute-done", "ragged-all-to-all",
}  # fmt: skip
_GATHER_SCATTER_OPS = {"gather", "scatter", "dynamic-slice", "dynamic-update-slice"}
_REDUCTION_OPS = {"reduce", "reduce-window", "select-and-scatter", "sort"}
# Custom-call targets of the vendor libraries (XLA:GPU): cuBLAS / cuBLASLt GEMMs, cuDNN
# convolutions and fused attention.
_CUSTOM_CALL_KINDS = (
    ("cudnn$conv", "conv"),
    ("cudnn$fmha", "attention"),
    ("cudnn$flash", "attention"),
    ("cublas", "gemm"),
    ("topk", "reduction"),
    ("gemm", "gemm"),
    ("matmul", "gemm"),
)
# When a fusion holds several kinds, the one that dominates its time names it.
_PRIORITY = (
    "conv",
    "attention",
    "gemm",
    "moe_dispatch_combine",
    "gather_scatter",
    "reduction",
    COLLECTIVE,
    "elementwise",
)
# A dot with batch dimensions (scores q·kᵀ and probs·v, batched over sequences and heads)
# whose jax name stack says attention (a model's `attention` named scope or `attend`
# function) is attention; other dots are GEMMs, the Q/K/V and output projections inside that
# scope too (x·W has no batch dimensions).
_ATTENTION_NAME = re.compile(r"attention|attend", re.IGNORECASE)

_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?(?P<name>[\w.\-]+)\s+\(.*\{\s*$")
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<type>.+?)\s+(?P<op>[a-z][\w\-]*)\("
)
_CALLS = re.compile(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TARGET = re.compile(r'custom_call_target="([^"]*)"')
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_MODULE = re.compile(r"^HloModule\s+([\w.\-]+)", re.MULTILINE)


class TraceError(Exception):
    """A trace that cannot be read into per-op times; the message says why."""


@dataclasses.dataclass(frozen=True)
class _Instruction:
    opcode: str
    calls: tuple[str, ...]
    target: str
    op_name: str
    operands: tuple[str, ...]
    batched: bool  # a dot with batch dimensions (an einsum over batch or heads)


def _operands(rest: str) -> tuple[str, ...]:
    """The instruction names in an operand list `a, %b, f32[2] %c), attrs...`."""
    depth = 1
    for i, ch in enumerate(rest):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth == 0:
            return tuple(re.findall(r"%([\w.\-]+)", rest[:i]))
    return ()


def _parse(hlo_text: str) -> tuple[dict[str, dict[str, _Instruction]], str]:
    """(computation name -> instruction name -> instruction, the entry computation's name),
    from HLO text."""
    comps: dict[str, dict[str, _Instruction]] = {}
    current, entry = None, ""
    for line in hlo_text.splitlines():
        m = _COMPUTATION.match(line)
        if m and "=" not in line.split("(", 1)[0]:
            current = comps.setdefault(m["name"], {})
            entry = m["name"] if line.startswith("ENTRY") else entry
            continue
        if current is None:
            continue
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        calls = _CALLS.findall(line)
        for group in _BRANCHES.findall(line):
            calls += [c.strip().lstrip("%") for c in group.split(",") if c.strip()]
        target = _TARGET.search(line)
        op_name = _OP_NAME.search(line)
        current[m["name"]] = _Instruction(
            m["op"],
            tuple(calls),
            target[1] if target else "",
            op_name[1] if op_name else "",
            _operands(line[m.end() :]),
            "lhs_batch_dims={" in line,
        )
    return comps, entry


def module_name(hlo_text: str) -> str:
    """The program's name as the trace's `hlo_module` stat gives it ("jit_forward")."""
    m = _MODULE.search(hlo_text)
    return m[1] if m else ""


def instruction_kinds(hlo_text: str) -> dict[str, str]:
    """Every instruction of a compiled program -> the lab op kind (batching.ops.KINDS),
    COLLECTIVE, OTHER, or "" for control flow (while, conditional, call: not an op)."""
    comps, _ = _parse(hlo_text)
    memo: dict[str, set[str]] = {}

    def own_kind(ins: _Instruction) -> str:
        op = ins.opcode
        if op == "custom-call":
            target = ins.target.lower()
            return next((k for key, k in _CUSTOM_CALL_KINDS if key in target), OTHER)
        if op == "convolution":
            return "conv"
        if op in ("dot", "ragged-dot"):
            attention = ins.batched and _ATTENTION_NAME.search(ins.op_name)
            return "attention" if attention else "gemm"
        if op in _GATHER_SCATTER_OPS:
            return "gather_scatter"
        if op in _REDUCTION_OPS:
            return "reduction"
        if op in _COLLECTIVE_OPS:
            return COLLECTIVE
        if op in _OTHER_OPS:
            return OTHER
        return "elementwise"

    def contents(comp: str) -> set[str]:
        if comp not in memo:
            memo[comp] = set()  # a cycle (never in valid HLO) ends here
            kinds = set()
            for ins in comps.get(comp, {}).values():
                kinds |= kinds_of(ins)
            memo[comp] = kinds
        return memo[comp]

    def kinds_of(ins: _Instruction) -> set[str]:
        if ins.opcode == "fusion" or (ins.opcode == "custom-call" and ins.calls):
            inner = set().union(*(contents(c) for c in ins.calls)) if ins.calls else set()
            if ins.opcode == "custom-call":
                inner.add(own_kind(ins))
            return inner - {OTHER} or {OTHER}
        if ins.opcode in _CONTROL_OPS:
            return set()
        return {own_kind(ins)}

    out = {}
    for instructions in comps.values():
        for name, ins in instructions.items():
            kinds = kinds_of(ins)
            out[name] = next((k for k in _PRIORITY if k in kinds), OTHER if kinds else "")
    return out


def _tokens(name: str) -> tuple[str, ...]:
    """A module path's words and indices: "stages.0.0.conv1" and the flattened parameter name
    "state__stages___0__0___conv1____kernel___value.1" both give stages, 0, 0, conv, 1, ..."""
    return tuple(re.findall(r"[A-Za-z]+|\d+", name.lower()))


def _within(part: tuple[str, ...], whole: tuple[str, ...]) -> bool:
    return any(whole[i : i + len(part)] == part for i in range(len(whole) - len(part) + 1))


def lab_op_names(hlo_text: str, lab_ops: list[tuple[str, str]]) -> dict[str, str]:
    """Entry instructions -> the lab op (name, kind) they run, where the parameters they read
    name it: XLA keeps a Flax module's parameter path in the entry parameter's name
    ("state__stages___0__0___conv1____kernel___value.1" for the op "stages.0.0.conv1"). An
    instruction maps when its kind is the op's and exactly one lab op's path is among the
    parameters it reads (a fusion of several convolutions maps to none)."""
    comps, entry = _parse(hlo_text)
    if not entry:
        return {}
    kinds = instruction_kinds(hlo_text)
    instructions = comps[entry]
    params = {n: _tokens(n) for n, ins in instructions.items() if ins.opcode == "parameter"}
    out = {}
    for name, ins in instructions.items():
        read = [params[o] for o in ins.operands if o in params]
        hits = {
            op
            for op, kind in lab_ops
            if kind == kinds.get(name) and any(_within(_tokens(op), p) for p in read)
        }
        if len(hits) == 1:
            out[name] = hits.pop()
    return out


@dataclasses.dataclass(frozen=True)
class _Event:
    op: str  # the HLO instruction
    start_ns: float
    end_ns: float


def _kernel_events(
    profile: Any, module: str, kinds: dict[str, str]
) -> tuple[list[_Event], list[tuple[float, float]]]:
    """The program's kernel events on its first device, and the traced calls' windows."""
    host = None
    device_planes = []
    for plane in profile.planes:
        if plane.name == HOST_PLANE:
            host = plane
        elif plane.name.startswith(DEVICE_PLANE_PREFIXES):
            device_planes.append(plane)
    if host is None:
        raise TraceError(f"no {HOST_PLANE} plane in the trace")
    steps = []
    for line in host.lines:
        for e in line.events:
            if e.name.startswith("batch_") and "step_num" in dict(e.stats):
                steps.append((e.start_ns, e.start_ns + e.duration_ns))
    if not steps:
        raise TraceError("no traced calls (StepTraceAnnotation 'batch_<B>') in the trace")
    # An accelerator's kernels are on its first device plane; XLA:CPU's thunks are host
    # events of one device ordinal (a mesh of host devices runs them all on these threads).
    planes = sorted(device_planes, key=lambda p: p.name)[:1] or [host]
    raw = []
    done_at = {}  # flow id -> when an async thunk's completion event ("end: <op>") ended
    for plane in planes:
        for line in plane.lines:
            for e in line.events:
                stats = dict(e.stats)
                if e.name.startswith(ASYNC_END_PREFIX) and FLOW_CONSUMER_STAT in stats:
                    done_at[stats[FLOW_CONSUMER_STAT]] = e.start_ns + e.duration_ns
                op = stats.get(HLO_OP_STAT)
                if op is None or (module and stats.get(HLO_MODULE_STAT, module) != module):
                    continue
                # XLA:GPU replays a run of kernels as one CUDA graph (a command buffer): its
                # kernels' `hlo_op` then names the command buffer, and the kernel event's own
                # name is the fused instruction it runs (seen on an H200, jax 0.11.2).
                if not kinds.get(str(op)) and e.name in kinds:
                    op = e.name
                raw.append((stats.get(DEVICE_ORDINAL_STAT, 0), str(op), stats, e))
    if not raw:
        raise TraceError(f"no kernel events of {module or 'the program'} in the trace")
    first = min(r[0] for r in raw)
    events = []
    for ordinal, op, stats, e in raw:
        if ordinal != first or not kinds.get(op, OTHER):  # "": control flow, traced op by op
            continue
        end = e.start_ns + e.duration_ns
        end = max(end, done_at.get(stats.get(FLOW_PRODUCER_STAT), end))
        events.append(_Event(op, e.start_ns, end))
    return events, sorted(steps)


def _attribute(events: list[_Event], start: float, end: float) -> dict[str, float]:
    """Nanoseconds per HLO instruction inside [start, end]; where kernels overlap (threads,
    streams), each gets an equal share of the overlap, so they add up to the busy time."""
    edges = sorted(
        (t, step, e.op)
        for e in events
        for t, step in ((max(e.start_ns, start), 1), (min(e.end_ns, end), -1))
    )
    active: dict[str, int] = {}
    out: dict[str, float] = {}
    last = start
    for t, step, kind in edges:
        n = sum(active.values())
        if n and t > last:
            for k, c in active.items():
                out[k] = out.get(k, 0.0) + (t - last) * c / n
        last = max(last, t)
        active[kind] = active.get(kind, 0) + step
    return out


def traced_ops(profile: Any, hlo_text: str, lab_ops: list[tuple[str, str]] = ()) -> dict[str, Any]:
    """The median traced call of a point, by op kind.

    Returns `traced_ops` {kind: {"seconds": in the call, "count": kernels in the call}}
    (kinds of batching.ops.KINDS that ran, COLLECTIVE where any, and OTHER: every second of
    the call that no op kernel covers), `traced_by_op` {lab op name: {"seconds", "count"}}
    for the instructions `lab_op_names` maps to one of `lab_ops` ((name, kind) pairs; only
    those that map), `traced_latency_s` (that call's wall time) and
    `traced_steps` (the calls it is the median of: all but the first). The median call
    (the lower middle one for an even count), like the timer's median, so that one call
    the OS descheduled does not move it; its kinds add up to its wall time. Raises
    TraceError when the trace holds no usable call.
    """
    kinds = instruction_kinds(hlo_text)
    events, steps = _kernel_events(profile, module_name(hlo_text), kinds)
    # The first call after the profiler starts pays for its start (on a CPU, 2-3x the next).
    steps = steps[1:] if len(steps) > 1 else steps
    calls = []
    for start, end in steps:
        inside = [e for e in events if start <= e.start_ns < end]
        if not inside:
            continue
        by_op = {op: ns * 1e-9 for op, ns in _attribute(inside, start, end).items()}
        calls.append(((end - start) * 1e-9, by_op, [e.op for e in inside]))
    if not calls:
        raise TraceError("no kernel ran inside the traced calls")
    calls.sort(key=lambda c: c[0])
    wall, by_op, ran = calls[(len(calls) - 1) // 2]
    seconds: dict[str, float] = {}
    counts: dict[str, int] = {}
    for op, sec in by_op.items():
        seconds[kinds.get(op, OTHER)] = seconds.get(kinds.get(op, OTHER), 0.0) + sec
    for op in ran:
        counts[kinds.get(op, OTHER)] = counts.get(kinds.get(op, OTHER), 0) + 1
    busy = sum(v for k, v in seconds.items() if k != OTHER)
    out = {
        k: {"seconds": seconds.get(k, 0.0), "count": counts[k]}
        for k in (*ops_lib.KINDS, COLLECTIVE)
        if k in counts
    }
    out[OTHER] = {"seconds": wall - busy, "count": counts.get(OTHER, 0)}
    names = lab_op_names(hlo_text, list(lab_ops)) if lab_ops else {}
    by_name: dict[str, dict[str, float]] = {}
    for op in ran:
        if op in names:
            t = by_name.setdefault(names[op], {"seconds": 0.0, "count": 0})
            t["count"] += 1
    for op, sec in by_op.items():
        if op in names:
            by_name[names[op]]["seconds"] += sec
    return {
        "traced_ops": out,
        "traced_by_op": by_name,
        "traced_latency_s": wall,
        "traced_steps": len(steps),
    }


def newest_trace(logdir: str, since_s: float) -> str:
    """The .xplane.pb written under <logdir>/plugins/profile/ at or after `since_s`."""
    files = glob.glob(os.path.join(logdir, "plugins", "profile", "*", "*.xplane.pb"))
    fresh = [f for f in files if os.path.getmtime(f) >= since_s - 1.0]
    if not fresh:
        raise TraceError(f"no .xplane.pb written under {logdir}/plugins/profile")
    return max(fresh, key=os.path.getmtime)


def read(path: str, hlo_text: str, lab_ops: list[tuple[str, str]] = ()) -> dict[str, Any]:
    """traced_ops() of the trace file at `path` (TraceError if it cannot be read)."""
    try:
        profile = jax.profiler.ProfileData.from_file(path)
    except Exception as e:  # noqa: BLE001 - the reader raises its own error types
        raise TraceError(f"cannot read {os.path.basename(path)}: {e}") from None
    return traced_ops(profile, hlo_text, lab_ops)
