"""The sweep: for each run and batch size, compile, time and append one row.

config -> runs -> workload per run -> one measured point per batch size -> row.
Analysis and writers read the rows afterwards; nothing here draws or reports.
"""

import contextlib
import os
import random
import sys
import threading
import time
from typing import Any

import jax
import numpy as np
from absl import logging
from tqdm import tqdm

from batching import (
    collectives,
    distributed,
    peaks,
    profiling,
    results,
    runs,
    specs,
    stats,
    timing,
    topology,
    workload,
)
from batching.tensorboard_writer import PointWriter


class Terminated(KeyboardInterrupt):
    """SIGTERM (preemption): handled like Ctrl-C, finished points kept; exit 143."""


# Set by the SIGTERM handler before it raises. A handler's exception can land inside library
# code that catches it and raises its own error instead (seen: JAX's pytree checks turned it
# into a ValueError); the sweep's handlers ask this flag first, so such an error still ends
# the sweep as a termination, and the interrupted point is left for a rerun, not recorded.
_TERMINATION = threading.Event()


def request_termination() -> None:
    _TERMINATION.set()
    raise Terminated()


def raise_if_terminated() -> None:
    if _TERMINATION.is_set():
        raise Terminated()


def clear_termination() -> None:
    _TERMINATION.clear()


# A row's status: "ok" (measured), "skipped_memory" (its program needs more than the memory
# budget, not run), "oom" (RESOURCE_EXHAUSTED), "skipped_after_oom" (a larger batch of a run
# that hit OOM), "error" (any other exception). Rows without one are ok. A rerun retries
# "error" and "skipped_memory" points (the budget may have changed; skipping costs a compile).
NOT_RETRIED = ("ok", "oom", "skipped_after_oom")
# Statuses as the codes processes exchange to agree on a point's outcome (0 is ok).
STATUS_CODES = {"ok": 0, "skipped_memory": 1, "oom": 2, "skipped_after_oom": 3, "error": 4}


class OverBudget(Exception):
    """A compiled point needs more memory than the budget; it is recorded, not run."""

    def __init__(self, fields: dict[str, Any]):
        super().__init__("over the memory budget")
        self.fields = fields


def is_oom(e: BaseException) -> bool:
    """XLA's out-of-memory: an XlaRuntimeError (or MemoryError) saying RESOURCE_EXHAUSTED."""
    return isinstance(e, MemoryError) or "RESOURCE_EXHAUSTED" in str(e)


def memory_fields(compiled: timing.Compiled, dev: jax.Device) -> dict[str, Any]:
    """What the program needs (arguments + outputs + temporaries - aliased, bytes) and has."""
    m = compiled.memory
    parts = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes")
    need = None
    if all(k in m for k in parts):
        need = sum(m[k] for k in parts) - m.get("alias_size_in_bytes", 0)
    return {"memory_bytes": need, "device_memory_bytes": specs.device_memory_bytes(dev)}


def memory_budget(cfg, device_bytes: int) -> float:
    """Bytes a point may need: config.memory.max_bytes, else max_fraction of the device."""
    mem = cfg.get("memory")
    if mem is None:
        return 0.9 * device_bytes
    if mem.get("max_bytes") is not None:
        return float(mem.max_bytes)
    return mem.max_fraction * device_bytes


def mesh_fields(run: runs.Run, batch_size: int) -> dict[str, Any]:
    """Where a point runs: the mesh, and the batch as a global and a per-device size.

    `batch_size` is the global batch (the swept size); each device holds batch_size over
    the devices `batch` maps to (mesh.data, or data x expert under the MoE decoder's GShard
    rules; topology.validate checked that it divides).
    """
    shape = topology.mesh_shape(run.config)
    shards = topology.split_size(shape, topology.axis_rules(run.config), "batch")
    return {
        "global_batch_size": batch_size,
        "per_device_batch_size": batch_size // shards,
        "num_devices": shape["data"] * shape["expert"] * shape["model"],
        "process_count": jax.process_count(),
        "mesh_shape": shape,
    }


def status_row(
    run: runs.Run, batch_size: int, fingerprint: str, status: str, **fields: Any
) -> dict[str, Any]:
    """A point's row: who, where, its status, then `fields` (what was measured, or why not)."""
    cfg = run.config
    dev = runs.device(cfg)
    return {
        "experiment": cfg.name,
        "run": run.name,
        "model": cfg.model.name,
        "batch_size": batch_size,
        "platform": dev.platform,
        "device_kind": dev.device_kind,
        **mesh_fields(run, batch_size),
        "status": status,
        "fingerprint": fingerprint,
        "jax_version": jax.__version__,
        "timestamp": time.time(),
        **fields,
    }


def measure_point(
    run: runs.Run,
    topo: topology.Topology,
    wl: workload.Workload,
    batch_size: int,
    fingerprint: str,
    settings: timing.TimingSettings,
    share: distributed.Share | None = None,
) -> tuple[dict[str, Any], np.ndarray]:
    """Compiles and times the workload at one batch size; returns the row and the samples.

    `share` (several processes) makes the memory-budget and timer decisions process 0's.
    """
    cfg = run.config
    # Flat arrays in and out: per call only jit's dispatch of a tuple of arrays runs.
    flat = workload.flat_call(wl, batch_size)
    precision = cfg.model.get("matmul_precision", "default")
    # The timed calls run this executable: compiled once, under the run's precision.
    compiled = timing.compile_fn(flat.fn, flat.args, flat.donate_argnums, precision)
    # Per device: an SPMD program's memory analysis is one device's share.
    memory = memory_fields(compiled, topo.device)
    budget = memory_budget(cfg, memory["device_memory_bytes"])
    over = memory["memory_bytes"] is not None and memory["memory_bytes"] > budget
    if share is not None:
        over = bool(share("memory", int(over)))
    if over:
        raise OverBudget({**memory, "memory_budget_bytes": budget})
    # The call's own dispatch floor (its arguments' flattening), before donation consumes
    # them: a per-point microbenchmark of the shape-aware roofline; one process only (a timed
    # call per process would not stay in step).
    per_point = cfg.roofline.enabled and cfg.roofline.shape_aware and share is None
    call_floor_s = peaks.measure_call_floor(flat.args) if per_point else None
    m = timing.measure(compiled.call, flat.args, settings, flat.next_args, share)
    del flat  # the donated arguments are gone; the rest need not outlive the point
    extra = wl.point_fields(batch_size) if wl.point_fields else {}
    summary = stats.summarize(m.samples_s, settings.confidence)
    latency = summary["latency_s"]
    examples = wl.examples(batch_size)
    cost = wl.cost(batch_size) if wl.cost else None
    calls = wl.collectives(batch_size) if wl.collectives else []
    # What XLA actually put in the program, next to the analytic count (a mesh only: one
    # device has none, and the HLO text of a big model is long).
    xla_comm = collectives.from_hlo(compiled.executable.as_text()) if topo.num_devices > 1 else None
    work_flops = cost.flops if cost else compiled.flops
    work_bytes = cost.bytes if cost else compiled.bytes_accessed
    fields = {
        "dtype": cfg.model.get("dtype"),
        "param_dtype": cfg.model.get("param_dtype"),
        "matmul_precision": precision,
        "device_count": len(jax.devices(topo.device.platform)),
        **summary,
        "converged": m.converged,
        "stop_reason": m.stop_reason,
        "compile_s": compiled.compile_s,
        "lower_s": compiled.lower_s,
        "params": wl.params,
        "param_bytes": wl.param_bytes,
        "flops": compiled.flops,
        "bytes_accessed": compiled.bytes_accessed,
        "analytic_flops": cost.flops if cost else None,
        "analytic_bytes": cost.bytes if cost else None,
        "weight_bytes": cost.weight_bytes if cost else None,
        "temp_bytes": compiled.memory.get("temp_size_in_bytes"),
        **memory,
        "achieved_flops_per_s": work_flops / latency if work_flops else None,
        "achieved_bytes_per_s": work_bytes / latency if work_bytes else None,
        "examples": examples,
        "throughput_per_s": examples / latency,
        f"{wl.example_unit}_per_s": examples / latency,
        "per_example_s": latency / examples,
        "gemm_shapes": wl.gemm_shapes(batch_size) if wl.gemm_shapes else None,
        "attention_shapes": wl.attention_shapes(batch_size) if wl.attention_shapes else None,
        "collectives": calls,
        # Payload per device of the call's collectives (Σ bytes·count; batching.collectives).
        "comm_bytes": collectives.total_bytes(calls),
        "xla_collectives": xla_comm["counts"] if xla_comm else None,
        "xla_comm_bytes": xla_comm["bytes"] if xla_comm else None,
        # The call as ops (batching.ops.Op), priced one by one by the roofline.
        "ops": [o.to_dict() for o in wl.ops(batch_size)] if wl.ops else None,
        "call_floor_s": call_floor_s,
        **wl.fields,
        "parallel_shape": wl.parallel_shape or topology.mesh_shape(run.config),
        **extra,
    }
    return status_row(run, batch_size, fingerprint, "ok", **fields), m.samples_s


def trace_point(
    wl: workload.Workload,
    batch_size: int,
    steps: int,
    logdir: str,
    capture: bool = True,
    precision: str = "default",
) -> str:
    """Captures a jax.profiler trace of `steps` calls, after the point was timed, never during;
    returns the HLO text of the program it ran (what the trace's `hlo_op` names refer to).

    The trace lands in <logdir>/plugins/profile/<time>/, where TensorBoard's
    Profile tab (the `profile` extra, xprof) finds it. Without `capture` (a process
    that does not write) the same calls run untraced, in step with process 0.
    """
    flat = workload.flat_call(wl, batch_size)
    # The timed program (same function, arguments and precision: a compilation-cache hit).
    call = timing.compile_fn(flat.fn, flat.args, flat.donate_argnums, precision).call
    args = flat.args
    out = jax.block_until_ready(call(*args))  # compiled already: this warms the dispatch path
    if flat.next_args is not None:
        args = flat.next_args(args, out)
    del out
    # Without the Python tracer: it hooks every Python call (flattening a model's parameter
    # state took ~20x longer with it: 0.57 ms vs ~0.03 ms for a small ResNet), which a
    # per-call comparison with the timed median cannot afford.
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


def profile_point(
    run: runs.Run, wl: workload.Workload, row: dict[str, Any], logdir: str, capture: bool
) -> dict[str, Any]:
    """Traces an ok point and reads the trace back per op kind (batching.profiling): the
    row's `traced_*` fields, or `traced_ops_error` saying why there are none. A trace that
    fails never fails the sweep."""
    batch_size = row["batch_size"]
    since = time.time()
    try:
        hlo_text = trace_point(
            wl,
            batch_size,
            run.config.profile.steps,
            logdir,
            capture,
            run.config.model.get("matmul_precision", "default"),
        )
        if not capture:
            return {}
        path = profiling.newest_trace(logdir, since)
        # Its own folder per point: two traces within one second would share a timestamp
        # folder (and a file name) and the second would overwrite the first.
        folder = os.path.dirname(path)
        named = f"{folder}_batch{batch_size}"
        if not os.path.exists(named):
            os.rename(folder, named)
            path = os.path.join(named, os.path.basename(path))
        lab_ops = [(o.name, o.kind) for o in wl.ops(batch_size)] if wl.ops else []
        fields = profiling.read(path, hlo_text, lab_ops)
    except Exception as e:  # noqa: BLE001 - a trace is an extra; the point stays measured
        raise_if_terminated()
        why = _why(e)
        logging.warning("%s batch=%d: no traced ops: %s", run.name, batch_size, why["message"])
        return {"traced_ops_error": f"{why['error_type']}: {why['message']}"}
    return {
        **fields,
        "trace_file": os.path.relpath(path, os.path.dirname(os.path.dirname(logdir))),
        # The traced call against the timed median (tracing adds its own overhead).
        "traced_vs_measured": fields["traced_latency_s"] / row["latency_s"],
    }


def run_sweep(
    all_runs: list[runs.Run],
    fingerprints: dict[str, str],
    store: results.Store,
    progress_bar: bool,
    writer: bool = True,
) -> int:
    """Measures every (run, batch size) not yet in the store; returns how many it measured.

    With several processes, process 0's store decides what is left to measure and only
    process 0 (`writer`) writes rows, samples and TensorBoard points.
    """
    share = distributed.sharer()
    todo, oom_at = {}, {}
    if writer:
        done = store.measured(fingerprints, NOT_RETRIED)
        todo = {r.name: [b for b in r.batch_sizes if (r.name, b) not in done] for r in all_runs}
        oom_at = store.first_oom(fingerprints)
    if share is not None:
        todo, oom_at = distributed.broadcast_json([todo, oom_at])
    total = sum(len(v) for v in todo.values())
    skipped = sum(len(r.batch_sizes) for r in all_runs) - total
    if skipped:
        logging.info("resuming: %d points already measured, %d to go", skipped, total)
    bar = tqdm(
        total=total,
        disable=not (progress_bar and sys.stderr.isatty()),
        unit="point",
        dynamic_ncols=True,
    )
    measured = 0
    try:
        for run in all_runs:
            sizes = todo[run.name]
            if not sizes:
                continue
            if run.config.sweep.shuffle:
                random.Random(f"{run.config.seed}/{run.name}").shuffle(sizes)
            wl, failure = None, None
            try:
                topo = topology.build(run.config)
                wl = workload.build(run.config, topo, store.workdir)
                if run.config.roofline.enabled and topo.num_devices > 1:
                    # The analysis reads these; every process measures them here, together.
                    collectives.measure_run(topo.mesh, run.config.roofline.peaks_cache_dir)
            except Exception as e:  # noqa: BLE001 - a broken run is rows, not a crash
                raise_if_terminated()
                failure = _why(e)
            if share is not None:
                failed = distributed.gather_codes("build", [int(failure is not None)])[:, 0]
                if failure is None and failed.any():
                    p = int(np.flatnonzero(failed)[0])
                    failure = {"error_type": "RemoteError", "message": f"process {p} failed"}
            if failure is not None:
                for batch_size in sizes:
                    if writer:
                        row = status_row(run, batch_size, fingerprints[run.name], "error")
                        store.append({**row, **failure}, None)
                logging.warning("run %s could not be built: %s", run.name, failure["message"])
                continue
            settings = runs.timing_settings(run.config)
            points = PointWriter(store.workdir, run.name) if writer else None
            try:
                for batch_size in sizes:
                    bar.set_postfix_str(f"{run.name} batch={batch_size}")
                    wall_before = oom_at.get(run.name)
                    row, samples = guarded_point(
                        run,
                        topo,
                        wl,
                        batch_size,
                        fingerprints[run.name],
                        settings,
                        oom_at,
                        share,
                    )
                    if share is not None:
                        row, samples = agree_on_outcome(run, row, samples, oom_at, wall_before)
                    if row["status"] == "ok" and batch_size in run.config.profile.batch_sizes:
                        logdir = points.logdir if points is not None else ""
                        row = {**row, **profile_point(run, wl, row, logdir, capture=writer)}
                    if writer:
                        store.append(row, samples)
                    raise_if_terminated()  # a SIGTERM some library swallowed: stop here
                    measured += 1
                    bar.update(1)
                    if row["status"] != "ok":
                        logging.warning(
                            "%s batch=%d: %s %s",
                            run.name,
                            batch_size,
                            row["status"],
                            row.get("message", ""),
                        )
                        continue
                    if points is not None:
                        points.write(run_rows(store, run.name, fingerprints[run.name]))
                    logging.log_if(
                        logging.INFO,
                        "%s batch=%d latency=%.4g ms (n=%d, %s) [%d/%d]",
                        bar.disable,
                        run.name,
                        batch_size,
                        row["latency_s"] * 1e3,
                        row["n_runs"],
                        row["stop_reason"],
                        measured,
                        total,
                    )
            finally:
                if points is not None:
                    points.close()
            del wl
    finally:
        bar.close()
    return measured


def run_rows(store: results.Store, run: str, fingerprint: str) -> list[dict[str, Any]]:
    """The run's measured (ok) points so far, latest row per batch size."""
    return [
        r
        for r in results.latest(store.rows())
        if r["run"] == run and r.get("fingerprint") == fingerprint and results.is_ok(r)
    ]


def _why(e: BaseException) -> dict[str, str]:
    return {"error_type": type(e).__name__, "message": str(e).strip().splitlines()[0][:500]}


def guarded_point(
    run: runs.Run,
    topo: topology.Topology,
    wl: workload.Workload,
    batch_size: int,
    fingerprint: str,
    settings: timing.TimingSettings,
    oom_at: dict[str, int],
    share: distributed.Share | None = None,
) -> tuple[dict[str, Any], np.ndarray | None]:
    """One point's row whatever happens; an OOM records the run's wall in `oom_at`.

    Losing the other processes (DistributedError) is not a point's failure: it ends the run.
    """
    wall = oom_at.get(run.name)
    if wall is not None and batch_size > wall:
        return status_row(
            run, batch_size, fingerprint, "skipped_after_oom", message=f"batch {wall} hit OOM"
        ), None
    try:
        return measure_point(run, topo, wl, batch_size, fingerprint, settings, share)
    except distributed.DistributedError:
        raise
    except OverBudget as e:
        need, budget = e.fields["memory_bytes"], e.fields["memory_budget_bytes"]
        msg = f"needs {need} bytes > budget {budget:.0f}"
        return status_row(
            run, batch_size, fingerprint, "skipped_memory", message=msg, **e.fields
        ), None
    except Exception as e:  # noqa: BLE001 - every failure becomes a row; the sweep goes on
        raise_if_terminated()
        if is_oom(e):
            oom_at[run.name] = min(batch_size, wall if wall is not None else batch_size)
            return status_row(run, batch_size, fingerprint, "oom", **_why(e)), None
        logging.exception("%s batch=%d failed", run.name, batch_size)
        return status_row(run, batch_size, fingerprint, "error", **_why(e)), None


def agree_on_outcome(
    run: runs.Run,
    row: dict[str, Any],
    samples: np.ndarray | None,
    oom_at: dict[str, int],
    wall_before: int | None,
) -> tuple[dict[str, Any], np.ndarray | None]:
    """A point that failed on any process is recorded alike by every process.

    Processes exchange (batch size, status); when any failed, every process takes the
    status of the first one that did (lowest index), so process 0's row, the run's OOM
    wall (`oom_at`, which was `wall_before` before this point) and what a rerun retries
    are the same everywhere, and the processes go on making the same calls.
    """
    batch_size = row["batch_size"]
    table = distributed.gather_codes("outcome", [batch_size, STATUS_CODES[row["status"]]])
    if (table[:, 0] != batch_size).any():
        raise distributed.DistributedError(
            f"distributed: processes are out of step (batch sizes {table[:, 0].tolist()})"
        )
    failed = np.flatnonzero(table[:, 1])
    if not failed.size:
        return row, samples
    p = int(failed[0])
    status = {code: name for name, code in STATUS_CODES.items()}[int(table[p, 1])]
    if status == "oom":
        oom_at[run.name] = min(batch_size, wall_before if wall_before is not None else batch_size)
    elif wall_before is None:
        oom_at.pop(run.name, None)
    else:
        oom_at[run.name] = wall_before
    if p == jax.process_index():
        return row, samples
    return status_row(
        run, batch_size, row["fingerprint"], status, message=f"process {p}: {status}"
    ), None
