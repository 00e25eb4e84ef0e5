"""Traced per-op times: a profiler trace of a point, read back per lab op kind.

After timing a point, the sweep captures a `jax.profiler` trace of a few of its calls.
`config.profile` asks for it, and profile_point here takes it. This module reads the trace with
JAX's own reader, `jax.profiler.ProfileData` (the XSpace protobuf). It sums the time of every
HLO instruction that XLA ran. It sums it by the lab's op kind (batching.workloads.ops.KINDS).
The per-op prediction can then stand next to what the hardware did.

Where the events are (XSpace conventions, tsl/profiler/utils/xplane_schema.h):

- XLA:CPU: the thunk executor records one event per executed HLO instruction (thunk). The event
  lies on the host plane "/host:CPU", on whichever thread ran it. Its stats are `hlo_op`,
  `hlo_module` and `device_ordinal`. `hlo_op` is the instruction's name. `hlo_module` is the
  program, such as "jit_forward". An asynchronous thunk lasts until its "end: <op>" event (see
  ASYNC_END_PREFIX).
- XLA:GPU: CUPTI records each kernel on the device plane "/device:GPU:<N>". It uses one line per
  stream. XLA's launch annotation `#hlo_op=...,hlo_module=...#` becomes the same two stats on
  the kernel event (tsl cupti_collector). XLA may replay kernels as a CUDA graph (its command
  buffers). Their `hlo_op` then names the command buffer. Their event name is the fused
  instruction. This case is tested on a trace from an H200 (tests/data). A synthetic XSpace
  tests it too.
- The calls themselves: the sweep wraps each in `StepTraceAnnotation("batch_<B>")`. That is an
  event on the host plane. Its duration is the call's wall time as the timer sees it. It covers
  dispatch, run and the block until ready.

The point's compiled HLO text says which kind an instruction is (batching.measure.hlo_kinds).
Some instructions are no op of the lab, such as copies and control-flow bookkeeping. They go in
`OTHER`. So do the gaps between kernels: dispatch, argument handling, waiting. So the kinds plus
OTHER add up to the traced wall time of a call.
"""

import contextlib
import dataclasses
import glob
import os
import time
from typing import Any

import jax
from absl import logging

from batching import rows
from batching.measure import timing
from batching.measure.hlo_kinds import (
    COLLECTIVE,
    OTHER,
    instruction_kinds,
    lab_op_names,
    module_name,
)
from batching.measure.point import PointContext, why
from batching.setup.interrupt import raise_if_terminated
from batching.workloads import base as workload
from batching.workloads import ops as ops_lib

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


class TraceError(Exception):
    """A trace that cannot be read into per-op times; the message says why."""


@dataclasses.dataclass(frozen=True)
class _Event:
    op: str  # the HLO instruction
    start_ns: float
    end_ns: float


def _kernel_events(
    profile: Any, module: str, kinds: dict[str, str]
) -> tuple[list[_Event], list[tuple[float, float]]]:
    """The program's kernel events on its first device, and the windows of the traced calls."""
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
    """Nanoseconds per HLO instruction inside [start, end].

    Where kernels overlap (threads, streams), each gets an equal share of the overlap. So the
    shares add up to the busy time.
    """
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

    Returns a dict of four fields:

    - `traced_ops`: {kind: {"seconds": in the call, "count": kernels in the call}}. Its kinds
      are the KINDS of batching.workloads.ops that ran, and COLLECTIVE where any ran. OTHER is
      every second of the call that no op kernel covers.
    - `traced_by_op`: {lab op name: {"seconds", "count"}}. It covers the instructions that
      `lab_op_names` maps to one of `lab_ops`, given as (name, kind) pairs. Instructions that
      map to none are left out.
    - `traced_latency_s`: the median call's wall time.
    - `traced_steps`: the calls it is the median of, all but the first.

    The median is the lower middle call for an even count, like the timer's median. So one call
    that the OS descheduled does not move it. Its kinds add up to its wall time. It raises
    TraceError when the trace holds no usable call.
    """
    kinds = instruction_kinds(hlo_text)
    events, steps = _kernel_events(profile, module_name(hlo_text), kinds)
    # The first call after the profiler starts pays for that start: left out unless alone.
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


def trace_point(
    wl: workload.Workload,
    batch_size: int,
    steps: int,
    logdir: str,
    capture: bool = True,
    precision: str = "default",
) -> str:
    """Captures a jax.profiler trace of `steps` calls, after the point was timed, never during.

    Returns the HLO text of the program it ran. The trace's `hlo_op` names refer to that text.

    The trace lands in <logdir>/plugins/profile/<time>/. TensorBoard's Profile tab finds it
    there (the `profile` extra, xprof). Without `capture` the same calls run untraced. They stay
    in step with process 0. That is for a process that does not write.
    """
    flat = workload.flat_call(wl, batch_size)
    # The timed program (same function, arguments and precision: a compilation-cache hit).
    call = timing.compile_fn(flat.fn, flat.args, flat.donate_argnums, precision).call
    args = flat.args
    out = jax.block_until_ready(call(*args))  # compiled already: this warms the dispatch path
    if flat.next_args is not None:
        args = flat.next_args(args, out)
    del out
    # Without the Python tracer: it hooks every Python call, so flattening a model's
    # parameter state runs many times slower under it. A per-call comparison with the timed
    # median cannot afford that.
    options = jax.profiler.ProfileOptions()
    options.python_tracer_level = 0
    tracing = jax.profiler.trace(logdir, profiler_options=options)
    with tracing if capture else contextlib.nullcontext():
        for step in range(steps):
            with jax.profiler.StepTraceAnnotation(f"batch_{batch_size}", step_num=step):
                out = call(*args)
                jax.block_until_ready(out)
            if flat.next_args is not None:
                args = flat.next_args(args, out)
            del out  # released before the next call, as the timer does
    return call.as_text()


def profile_point(ctx: PointContext, row: rows.Row, logdir: str, capture: bool) -> dict[str, Any]:
    """Traces an ok point and reads the trace back per op kind.

    Returns the row's `traced_*` fields. Where there are none, `traced_ops_error` says why. A
    trace that fails never fails the sweep.
    """
    batch_size = row["batch_size"]
    since = time.time()
    steps = ctx.config.profile.steps
    try:
        hlo_text = trace_point(ctx.wl, batch_size, steps, logdir, capture, ctx.precision)
        if not capture:
            return {}
        path = _own_folder(newest_trace(logdir, since), batch_size)
        lab_ops = [(o.name, o.kind) for o in ctx.wl.ops(batch_size)] if ctx.wl.ops else []
        fields = read(path, hlo_text, lab_ops)
    except Exception as e:  # noqa: BLE001 - a trace is an extra; the point stays measured
        raise_if_terminated()
        failure = why(e)
        logging.warning(
            "%s batch=%d: no traced ops: %s", ctx.run.name, batch_size, failure["message"]
        )
        return {"traced_ops_error": f"{failure['error_type']}: {failure['message']}"}
    return {
        **fields,
        "trace_file": os.path.relpath(path, os.path.dirname(os.path.dirname(logdir))),
        # The traced call against the timed median (tracing adds its own overhead).
        "traced_vs_measured": fields["traced_latency_s"] / row["latency_s"],
    }


def _own_folder(path: str, batch_size: int) -> str:
    """Moves the trace into its own folder per point, and returns its new path.

    Two traces within one second would share a timestamp folder and a file name. The second
    would then overwrite the first.
    """
    folder = os.path.dirname(path)
    named = f"{folder}_batch{batch_size}"
    if not os.path.exists(named):
        os.rename(folder, named)
        path = os.path.join(named, os.path.basename(path))
    return path
