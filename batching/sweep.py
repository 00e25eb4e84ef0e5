"""The sweep: for each run and batch size, compile, time and append one row.

config -> runs -> workload per run -> one measured point per batch size -> row.
Analysis and writers read the rows afterwards; nothing here draws or reports.
"""

import contextlib
import dataclasses
import math
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


@dataclasses.dataclass
class Program:
    """A point's compiled executable and its traced flat call, kept between passes."""

    flat: workload.FlatCall
    compiled: timing.Compiled


def measure_point(
    run: runs.Run,
    topo: topology.Topology,
    wl: workload.Workload,
    batch_size: int,
    fingerprint: str,
    settings: timing.TimingSettings,
    share: distributed.Share | None = None,
) -> tuple[dict[str, Any], np.ndarray, Program]:
    """A point's first visit: compiles and times the workload at one batch size; returns the
    row, the samples and the program later passes time again.

    `settings` are the pass's (pass_settings); `share` (several processes) makes the
    memory-budget and timer decisions process 0's.
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
    program = Program(flat, compiled)
    flat.args = ()  # the donated arguments are gone; the rest need not outlive the visit
    extra = wl.point_fields(batch_size) if wl.point_fields else {}
    cost = wl.cost(batch_size) if wl.cost else None
    calls = wl.collectives(batch_size) if wl.collectives else []
    # What XLA actually put in the program, next to the analytic count (a mesh only: one
    # device has none, and the HLO text of a big model is long).
    xla_comm = collectives.from_hlo(compiled.executable.as_text()) if topo.num_devices > 1 else None
    fields = {
        "dtype": cfg.model.get("dtype"),
        "param_dtype": cfg.model.get("param_dtype"),
        "matmul_precision": precision,
        "device_count": len(jax.devices(topo.device.platform)),
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
        "examples": wl.examples(batch_size),
        "example_unit": wl.example_unit,
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
    row = status_row(run, batch_size, fingerprint, "ok", **fields)
    return {**row, **pooled_fields(row, [m.samples_s], [m.stop_reason], run)}, m.samples_s, program


def pass_settings(
    settings: timing.TimingSettings, passes: int, first: bool = True
) -> timing.TimingSettings:
    """One pass's share of a point's timing: a P-th of the budget and of the minimum runs, and
    the same precision target (each pass pins its own median when it can; the row pools them
    and says whether together they met it). A point's first visit keeps the whole warm-up
    (right after compiling, calls run slow for a while); later visits a P-th of its time."""
    if passes == 1:
        return settings
    min_runs = max(3, math.ceil(settings.min_runs / passes))
    return dataclasses.replace(
        settings,
        warmup_s=settings.warmup_s if first else settings.warmup_s / passes,
        min_runs=min_runs,
        max_runs=max(min_runs, settings.max_runs // passes),
        budget_s=settings.budget_s / passes,
    )


def pooled_fields(
    row: dict[str, Any], samples_by_pass: list[np.ndarray], reasons: list[str], run: runs.Run
) -> dict[str, Any]:
    """A point's timing fields from every pass so far (`reasons`: why each pass stopped): the
    median and its interval over all their samples, each pass's median, whether the pooled
    interval met the configured target (`converged`), and what follows from the latency
    (throughput, achieved rates)."""
    settings = runs.timing_settings(run.config)
    pooled = np.concatenate(samples_by_pass)
    summary = stats.summarize(pooled, settings.confidence)
    latency = summary["latency_s"]
    converged = stats.relative_halfwidth(pooled, settings.confidence) <= settings.target_rel_ci
    work_flops = row["analytic_flops"] or row["flops"]
    work_bytes = row["analytic_bytes"] or row["bytes_accessed"]
    examples = row["examples"]
    return {
        **summary,
        "converged": bool(converged),
        # "precision" when the pooled interval met the target; else why the passes stopped, or
        # "pass_spread" when each met its share but the passes' samples disagree together.
        "stop_reason": "precision" if converged else _unconverged_reason(reasons),
        "passes": run.config.sweep.get("passes", 1),
        "passes_done": len(samples_by_pass),
        "pass_medians_s": [float(np.median(s)) for s in samples_by_pass],
        "pass_n_runs": [int(s.size) for s in samples_by_pass],
        "pass_stop_reasons": list(reasons),
        "achieved_flops_per_s": work_flops / latency if work_flops else None,
        "achieved_bytes_per_s": work_bytes / latency if work_bytes else None,
        "throughput_per_s": examples / latency,
        f"{row.get('example_unit', 'examples')}_per_s": examples / latency,
        "per_example_s": latency / examples,
        "timestamp": time.time(),
    }


def _unconverged_reason(reasons: list[str]) -> str:
    for reason in ("budget", "max_runs"):
        if reason in reasons:
            return reason
    return "pass_spread"


def repeat_point(
    run: runs.Run,
    wl: workload.Workload,
    batch_size: int,
    state: "PointState",
    settings: timing.TimingSettings,
    share: distributed.Share | None = None,
) -> tuple[dict[str, Any], np.ndarray]:
    """A later pass over a point: its program timed again on fresh arguments (compiled again,
    unrecorded, when the run resumed in a new process); the row pooled over every pass."""
    if state.row is None:
        # Another process's point resumed here: this process writes no row, but keeps the
        # fields its own pooled timing needs.
        state.row = status_row(
            run, batch_size, "", "ok", examples=wl.examples(batch_size),
            example_unit=wl.example_unit, analytic_flops=None, flops=None,
            analytic_bytes=None, bytes_accessed=None,
        )  # fmt: skip
    if state.program is None:
        flat = workload.flat_call(wl, batch_size)
        precision = run.config.model.get("matmul_precision", "default")
        compiled = timing.compile_fn(flat.fn, flat.args, flat.donate_argnums, precision)
        state.program = Program(flat, compiled)
    else:
        flat = state.program.flat.rebind(wl.make_args(batch_size))
    prior = np.concatenate(state.pass_samples) if state.pass_samples else None
    m = timing.measure(
        state.program.compiled.call, flat.args, settings, flat.next_args, share, prior=prior
    )
    flat.args = ()
    reasons = [*state.row.get("pass_stop_reasons", []), m.stop_reason]
    fields = pooled_fields(state.row, [*state.pass_samples, m.samples_s], reasons, run)
    return {**state.row, **fields}, m.samples_s


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


@dataclasses.dataclass
class PointState:
    """What a point carries from one pass to the next: its latest row, each earlier pass's
    samples, and its compiled program (None until compiled in this process)."""

    row: dict[str, Any] | None = None
    pass_samples: list[np.ndarray] = dataclasses.field(default_factory=list)
    program: Program | None = None
    # Passes done whose samples this process does not hold (another process's rows).
    unseen: int = 0

    @property
    def passes_done(self) -> int:
        return self.unseen + len(self.pass_samples)


def plan(
    all_runs: list[runs.Run],
    fingerprints: dict[str, str],
    store: results.Store,
    writer: bool,
    share: distributed.Share | None,
) -> tuple[dict[str, dict[int, PointState]], dict[str, int]]:
    """What is left to measure, per run: batch size -> its state (the passes already done,
    from the store: a rerun resumes mid-pass), and the runs' OOM walls. Process 0 decides."""
    todo, oom_at = {}, {}
    if writer:
        latest = store.latest_rows(fingerprints)
        samples = store.pass_samples()
        for run in all_runs:
            passes = run.config.sweep.get("passes", 1)
            todo[run.name] = {}
            for b in run.batch_sizes:
                row = latest.get((run.name, b))
                state = _resumed(row, samples.get((run.name, b), []), passes)
                if state is not None:
                    todo[run.name][b] = state
        oom_at = store.first_oom(fingerprints)
    if share is not None:
        done = {r: {b: st.passes_done for b, st in points.items()} for r, points in todo.items()}
        done, oom_at = distributed.broadcast_json([done, oom_at])
        # The other processes time the same passes; their rows are never written.
        todo = {
            r: {int(b): PointState(unseen=n) for b, n in points.items()}
            for r, points in done.items()
        }
    return todo, oom_at


def _resumed(
    row: dict[str, Any] | None, pass_samples: list[list[float]], passes: int
) -> PointState | None:
    """A point's state from its stored row and samples; None when nothing is left to do (all
    passes done, or a status a rerun keeps: an OOM, a point past the run's OOM wall)."""
    if row is None or row.get("status", "ok") not in NOT_RETRIED:
        return PointState()  # never measured, or to be retried from scratch
    if not results.is_ok(row):
        return None
    done = row.get("passes_done", passes)  # rows written before passes: one complete pass
    if done >= passes:
        return None
    return PointState(row, [np.asarray(s, np.float64) for s in pass_samples[:done]])


def run_sweep(
    all_runs: list[runs.Run],
    fingerprints: dict[str, str],
    store: results.Store,
    progress_bar: bool,
    writer: bool = True,
) -> int:
    """Measures every (run, batch size) not yet in the store, in `sweep.passes` passes per
    run (each visits every batch size once, shuffled per pass); returns how many visits it
    made. With several processes, process 0's store decides what is left to measure and
    only process 0 (`writer`) writes rows, samples and TensorBoard points.
    """
    share = distributed.sharer()
    todo, oom_at = plan(all_runs, fingerprints, store, writer, share)
    total = sum(
        r.config.sweep.get("passes", 1) - st.passes_done
        for r in all_runs
        for st in todo[r.name].values()
    )
    skipped = sum(len(r.batch_sizes) for r in all_runs) - sum(len(v) for v in todo.values())
    if skipped:
        logging.info("resuming: %d points already measured, %d visits to go", skipped, total)
    bar = tqdm(
        total=total,
        disable=not (progress_bar and sys.stderr.isatty()),
        unit="visit",
        dynamic_ncols=True,
    )
    sweep = Sweep(store, fingerprints, oom_at, bar, writer, share)
    try:
        for run in all_runs:
            if todo[run.name]:
                sweep.run(run, todo[run.name])
    finally:
        bar.close()
    return sweep.visits


class Sweep:
    """One sweep's shared state: the store, the OOM walls, the progress bar, the processes."""

    def __init__(self, store, fingerprints, oom_at, bar, writer, share):
        self.store, self.fingerprints, self.oom_at = store, fingerprints, oom_at
        self.bar, self.writer, self.share = bar, writer, share
        self.visits = 0

    def run(self, run: runs.Run, todo: dict[int, PointState]) -> None:
        """A run's points in passes: pass p visits, in a shuffled order, the points with p
        passes done; a point that fails leaves the later passes."""
        built = self.build(run, list(todo))
        if built is None:
            return
        topo, wl = built
        passes = run.config.sweep.get("passes", 1)
        settings = runs.timing_settings(run.config)
        points = PointWriter(self.store.workdir, run.name) if self.writer else None
        try:
            for p in range(min(st.passes_done for st in todo.values()), passes):
                order = [b for b, st in todo.items() if st.passes_done == p]
                if run.config.sweep.shuffle:
                    seed = f"{run.config.seed}/{run.name}" + (f"/pass{p}" if p else "")
                    random.Random(seed).shuffle(order)
                for b in order:
                    if not self.visit(run, topo, wl, b, todo[b], settings, points, p == passes - 1):
                        del todo[b]
        finally:
            if points is not None:
                points.close()

    def build(self, run: runs.Run, sizes: list[int]):
        """(topology, workload), or None after recording every point as an error."""
        failure = None
        try:
            topo = topology.build(run.config)
            wl = workload.build(run.config, topo, self.store.workdir)
            if run.config.roofline.enabled and topo.num_devices > 1:
                # The analysis reads these; every process measures them here, together.
                collectives.measure_run(topo.mesh, run.config.roofline.peaks_cache_dir)
        except Exception as e:  # noqa: BLE001 - a broken run is rows, not a crash
            raise_if_terminated()
            failure = _why(e)
        if self.share is not None:
            failed = distributed.gather_codes("build", [int(failure is not None)])[:, 0]
            if failure is None and failed.any():
                p = int(np.flatnonzero(failed)[0])
                failure = {"error_type": "RemoteError", "message": f"process {p} failed"}
        if failure is None:
            return topo, wl
        for batch_size in sizes:
            if self.writer:
                row = status_row(run, batch_size, self.fingerprints[run.name], "error")
                self.store.append({**row, **failure}, None)
        logging.warning("run %s could not be built: %s", run.name, failure["message"])
        return None

    def visit(self, run, topo, wl, batch_size, state, settings, points, last) -> bool:
        """One pass over one point: measured (the first pass compiles it), recorded, shown;
        False when the point failed and leaves the later passes."""
        self.bar.set_postfix_str(f"{run.name} batch={batch_size} pass={state.passes_done + 1}")
        wall_before = self.oom_at.get(run.name)
        fingerprint = self.fingerprints[run.name]
        passes = run.config.sweep.get("passes", 1)
        if state.passes_done == 0:
            first = pass_settings(settings, passes, first=True)
            row, samples = guarded_point(
                run, topo, wl, batch_size, fingerprint, first, self.oom_at, self.share, state
            )
        else:
            later = pass_settings(settings, passes, first=False)
            row, samples = guarded_repeat(run, wl, batch_size, state, later, self.share)
        if self.share is not None:
            row, samples = agree_on_outcome(run, row, samples, self.oom_at, wall_before)
        ok = row["status"] == "ok"
        if ok and last and batch_size in run.config.profile.batch_sizes:
            logdir = points.logdir if points is not None else ""
            row = {**row, **profile_point(run, wl, row, logdir, capture=self.writer)}
        if self.writer:
            self.store.append(row, samples, state.passes_done if ok else 0)
        raise_if_terminated()  # a SIGTERM some library swallowed: stop here
        self.visits += 1
        self.bar.update(1)
        if not ok:
            message = row.get("message", "")
            logging.warning("%s batch=%d: %s %s", run.name, batch_size, row["status"], message)
            return False
        state.row = row
        state.pass_samples.append(np.asarray(samples))
        if points is not None:
            points.write(run_rows(self.store, run.name, fingerprint))
        logging.log_if(
            logging.INFO,
            "%s batch=%d pass %d/%d latency=%.4g ms (n=%d, %s)",
            self.bar.disable,
            run.name,
            batch_size,
            state.passes_done,
            row["passes"],
            row["latency_s"] * 1e3,
            row["n_runs"],
            row["stop_reason"],
        )
        return True


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
    state: PointState | None = None,
) -> tuple[dict[str, Any], np.ndarray | None]:
    """A point's first visit, one row whatever happens; an OOM records the run's wall in
    `oom_at`; the compiled program goes into `state` for the later passes.

    Losing the other processes (DistributedError) is not a point's failure: it ends the run.
    """
    wall = oom_at.get(run.name)
    if wall is not None and batch_size > wall:
        return status_row(
            run, batch_size, fingerprint, "skipped_after_oom", message=f"batch {wall} hit OOM"
        ), None
    try:
        row, samples, program = measure_point(
            run, topo, wl, batch_size, fingerprint, settings, share
        )
        if state is not None:
            state.program = program
        return row, samples
    except distributed.DistributedError:
        raise
    except OverBudget as e:
        need, budget = e.fields["memory_bytes"], e.fields["memory_budget_bytes"]
        msg = f"needs {need} bytes > budget {budget:.0f}"
        return status_row(
            run, batch_size, fingerprint, "skipped_memory", message=msg, **e.fields
        ), None
    except Exception as e:  # noqa: BLE001 - every failure becomes a row; the sweep goes on
        return _failed(run, batch_size, fingerprint, e, oom_at)


def guarded_repeat(
    run: runs.Run,
    wl: workload.Workload,
    batch_size: int,
    state: PointState,
    settings: timing.TimingSettings,
    share: distributed.Share | None = None,
) -> tuple[dict[str, Any], np.ndarray | None]:
    """A later pass over a point, one row whatever happens (a failure replaces the point's
    row: a rerun measures it again from its first pass)."""
    try:
        return repeat_point(run, wl, batch_size, state, settings, share)
    except distributed.DistributedError:
        raise
    except Exception as e:  # noqa: BLE001
        return _failed(run, batch_size, state.row["fingerprint"], e, {})


def _failed(
    run: runs.Run, batch_size: int, fingerprint: str, e: Exception, oom_at: dict[str, int]
) -> tuple[dict[str, Any], None]:
    """The row of a point that raised: "oom" (recording the run's wall) or "error"."""
    raise_if_terminated()
    if is_oom(e):
        wall = oom_at.get(run.name)
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
