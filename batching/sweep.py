"""The sweep visits each run's batch sizes in passes, appending a row per visit.

The flow: config -> runs -> a bench per run -> visits -> rows. There is one visit per point
and pass. A bench holds the run's mesh and workload. batching.measure.point makes each
visit. Analysis and writers read the rows afterwards. Nothing here draws or reports. A point
that fails is a row, never a crash. An interrupted sweep keeps every row it wrote. A rerun
resumes from them.
"""

import random
import sys
import time
from typing import Any

import jax
import numpy as np
from absl import logging
from tqdm import tqdm

from batching import rows
from batching.measure import cold, microbench
from batching.measure import collectives as collectives_bench
from batching.measure.point import (
    OverBudget,
    PointContext,
    PointState,
    is_oom,
    measure_point,
    repeat_point,
    status_row,
    why,
)
from batching.measure.profiling import profile_point
from batching.outputs import results
from batching.outputs.tensorboard import PointWriter
from batching.setup import distributed, runs
from batching.setup.interrupt import raise_if_terminated
from batching.workloads.registry import Bench

# A row's status says what happened to the point. "ok": measured.
# "skipped_memory": not run, as its program needs more than the memory budget.
# "oom": RESOURCE_EXHAUSTED. "skipped_after_oom": a larger batch of a run that hit OOM.
# "error": any other exception. Rows without a status are ok.
# A rerun retries "error" and "skipped_memory" points.
# The budget may have changed, and a skip costs only a compile.
NOT_RETRIED = ("ok", "oom", "skipped_after_oom")
# Statuses as the codes processes exchange to agree on a point's outcome (0 is ok).
STATUS_CODES = {"ok": 0, "skipped_memory": 1, "oom": 2, "skipped_after_oom": 3, "error": 4}
# A point's stop reasons once the sweep is done with it.
# "pending" rows get more passes.
FINAL = ("precision", "budget", "max_passes")


def plan(
    all_runs: list[runs.Run],
    fingerprints: dict[str, str],
    store: results.Store,
    writer: bool,
    share: distributed.Share | None,
) -> tuple[dict[str, dict[int, PointState]], dict[str, int]]:
    """What is left to measure per run, and the runs' OOM walls. Each run maps batch size -> state.
    A state holds the passes already done, from the store. So a rerun resumes mid-pass. Process 0
    decides."""
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
    """A point's state from its stored row and samples. It is None when nothing is left to do.
    Either all passes are done, or a rerun keeps the status. A rerun keeps an OOM, and a point
    past the run's OOM wall."""
    if row is None or row.get("status", "ok") not in NOT_RETRIED:
        return PointState()  # never measured, or to be retried from scratch
    if not results.is_ok(row):
        return None
    done = row.get("passes_done", passes)  # a row without passes_done: one complete pass
    if done >= passes and row.get("stop_reason", "precision") in FINAL:
        return None
    return PointState(row, [np.asarray(s, np.float64) for s in pass_samples[:done]])


def run_sweep(
    benches: list[Bench],
    fingerprints: dict[str, str],
    store: results.Store,
    progress_bar: bool,
    writer: bool = True,
) -> int:
    """Measures every (run, batch size) not yet in the store; returns its visits. Each run gets
    `sweep.passes` passes. Each pass visits every batch size once, shuffled anew. With several
    processes, process 0's store decides what is left to measure. Only process 0 (`writer`)
    writes rows, samples and TensorBoard points."""
    share = distributed.sharer()
    all_runs = [b.run for b in benches]
    todo, oom_at = plan(all_runs, fingerprints, store, writer, share)
    total = sum(
        max(r.config.sweep.get("passes", 1) - st.passes_done, 0)
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
        for bench in benches:
            if todo[bench.name]:
                sweep.run(bench, todo[bench.name])
    finally:
        bar.close()
    return sweep.visits


class Sweep:
    """One sweep's shared state: store, OOM walls, progress bar and processes."""

    def __init__(self, store, fingerprints, oom_at, bar, writer, share):
        self.store, self.fingerprints, self.oom_at = store, fingerprints, oom_at
        self.bar, self.writer, self.share = bar, writer, share
        self.visits = 0

    def run(self, bench: Bench, todo: dict[int, PointState]) -> None:
        """A run's points in rounds of passes. Round p visits the points with p passes done, in a
        shuffled order. Every point gets sweep.passes. The unconverged ones then get more. That
        goes on until the run's budget (timing.run_budget_s) or sweep.max_passes. A point that
        fails leaves the later rounds."""
        ctx = self.build(bench, list(todo))
        if ctx is None:
            return
        points = PointWriter(self.store.workdir, bench.run.name) if self.writer else None
        started = time.perf_counter()
        try:
            p = min(st.passes_done for st in todo.values())
            while order := self.round(ctx, todo, p, started):
                for b in order:
                    if p >= ctx.passes and self.spent(ctx, started):
                        break
                    if not self.visit(ctx, b, todo[b], points):
                        del todo[b]
                if points is not None and p:
                    # Later rounds move points that are all shown already.
                    # So they are written once per round.
                    points.write(run_rows(self.store, bench.run.name, ctx.fingerprint))
                p += 1
            self.finish(ctx, todo)
        finally:
            if points is not None:
                points.close()

    def round(self, ctx: PointContext, todo: dict[int, PointState], p: int, started: float):
        """The points of round p, shuffled: those with p passes done. Past the passes every point
        gets, converged points drop out. So does every point once the run's budget is spent. None
        are left once p reaches sweep.max_passes. Process 0 decides for every process."""
        run = ctx.run
        due = [b for b, st in todo.items() if st.passes_done == p]
        if p >= ctx.max_passes:
            due = []
        elif p >= ctx.passes:
            due = [] if self.spent(ctx, started) else [b for b in due if not _converged(todo[b])]
        if self.share is not None:
            due = distributed.broadcast_json(due)
        if run.config.sweep.shuffle:
            seed = f"{run.config.seed}/{run.name}" + (f"/pass{p}" if p else "")
            random.Random(seed).shuffle(due)
        if p >= ctx.passes and due:
            logging.log_if(logging.INFO, "%s: pass %d over %d unconverged points", self.bar.disable,
                           run.name, p + 1, len(due))  # fmt: skip
        return due

    def spent(self, ctx: PointContext, started: float) -> bool:
        """Whether the run has spent its budget for passes. Process 0's clock decides."""
        over = time.perf_counter() - started >= ctx.timing.run_budget_s
        return bool(self.share("run_budget", int(over))) if self.share is not None else over

    def finish(self, ctx: PointContext, todo: dict[int, PointState]) -> None:
        """Rewrites each point that got no more passes before meeting its target. Its row says why.
        `max_passes` means it has sweep.max_passes. `budget` means the run's budget ran out."""
        for st in todo.values():
            if st.row is None or _converged(st) or st.row.get("stop_reason") in FINAL:
                continue
            reason = "max_passes" if st.passes_done >= ctx.max_passes else "budget"
            st.row = rows.extend(st.row, stop_reason=reason)
            if self.writer:
                self.store.append(st.row, None)

    def build(self, bench: Bench, sizes: list[int]) -> PointContext | None:
        """The run's points' context, or None after recording every point as an error. The context
        holds the mesh and workload, built once by the bench."""
        failure, topo, wl = None, None, None
        try:
            topo = bench.topology()
            wl = bench.workload(self.store.workdir)
            if bench.config.roofline.enabled and topo.num_devices > 1:
                # The analysis reads these. Every process measures them here, together.
                collectives_bench.measure_run(topo.mesh, bench.config.roofline.peaks_cache_dir)
        except Exception as e:  # noqa: BLE001 - a broken run is rows, not a crash
            raise_if_terminated()
            failure = why(e)
        if self.share is not None:
            failed = distributed.gather_codes("build", [int(failure is not None)])[:, 0]
            if failure is None and failed.any():
                p = int(np.flatnonzero(failed)[0])
                failure = {"error_type": "RemoteError", "message": f"process {p} failed"}
        fingerprint = self.fingerprints[bench.name]
        if failure is None:
            flush = cold.for_run(
                bench.config.timing.cache, topo.mesh, microbench.last_level_cache_bytes(topo.device)
            )
            return PointContext(bench.run, topo, wl, fingerprint, self.share, flush)
        broken = PointContext(bench.run, None, None, fingerprint)
        for batch_size in sizes:
            if self.writer:
                self.store.append(status_row(broken, batch_size, "error", **failure), None)
        logging.warning("run %s could not be built: %s", bench.name, failure["message"])
        return None

    def visit(self, ctx, batch_size, state, points) -> bool:
        """One pass over one point: measured, recorded and shown. The first pass compiles it. It
        returns False when the point failed. A failed point leaves the later passes."""
        run = ctx.run
        self.bar.set_postfix_str(f"{run.name} batch={batch_size} pass={state.passes_done + 1}")
        wall_before = self.oom_at.get(run.name)
        if state.passes_done == 0:
            row, samples = guarded_point(ctx, batch_size, self.oom_at, state)
        else:
            row, samples = guarded_repeat(ctx, batch_size, state)
        if self.share is not None:
            row, samples = agree_on_outcome(ctx, row, samples, self.oom_at, wall_before)
        ok = row["status"] == "ok"
        # Profiled once, after the pass that completes the passes every point gets.
        last = state.passes_done + 1 == ctx.passes
        if ok and last and batch_size in run.config.profile.batch_sizes:
            logdir = points.logdir if points is not None else ""
            row = rows.extend(row, **profile_point(ctx, row, logdir, capture=self.writer))
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
        if points is not None and state.passes_done == 1:
            # A point's first pass shows it at once.
            # Later passes show once per round, in `run`.
            points.write(run_rows(self.store, run.name, ctx.fingerprint))
        self.log_visit(ctx, row, state)
        return True

    def log_visit(self, ctx: PointContext, row: dict[str, Any], state: PointState) -> None:
        """One line per visit when there is no progress bar."""
        logging.log_if(
            logging.INFO,
            "%s batch=%d pass %d/%d latency=%.4g ms (n=%d, %s)",
            self.bar.disable,
            ctx.run.name,
            row["batch_size"],
            state.passes_done,
            row["passes"],
            row["latency_s"] * 1e3,
            row["n_runs"],
            row["stop_reason"],
        )


def _converged(state: PointState) -> bool:
    """Whether the point's latest row met its target. Process 0's rows decide."""
    return bool(state.row is not None and state.row.get("converged"))


def run_rows(store: results.Store, run: str, fingerprint: str) -> list[dict[str, Any]]:
    """The run's measured (ok) points so far, latest row per batch size."""
    return [
        r
        for r in results.latest(store.rows())
        if r["run"] == run and r.get("fingerprint") == fingerprint and results.is_ok(r)
    ]


def guarded_point(
    ctx: PointContext,
    batch_size: int,
    oom_at: dict[str, int],
    state: PointState | None = None,
) -> tuple[dict[str, Any], np.ndarray | None]:
    """A point's first visit: one row, whatever happens. An OOM records the run's wall in `oom_at`.
    The compiled program goes into `state` for the later passes. Losing the other processes is
    not a point's failure. That DistributedError ends the run."""
    wall = oom_at.get(ctx.run.name)
    if wall is not None and batch_size > wall:
        message = f"batch {wall} hit OOM"
        return status_row(ctx, batch_size, "skipped_after_oom", message=message), None
    try:
        row, samples, program = measure_point(ctx, batch_size)
        if state is not None:
            state.program = program
        return row, samples
    except distributed.DistributedError:
        raise
    except OverBudget as e:
        need, budget = e.fields["memory_bytes"], e.fields["memory_budget_bytes"]
        msg = f"needs {need} bytes > budget {budget:.0f}"
        return status_row(ctx, batch_size, "skipped_memory", message=msg, **e.fields), None
    except Exception as e:  # noqa: BLE001 - every failure becomes a row; the sweep goes on
        return _failed(ctx, batch_size, e, oom_at)


def guarded_repeat(
    ctx: PointContext, batch_size: int, state: PointState
) -> tuple[dict[str, Any], np.ndarray | None]:
    """A later pass over a point: one row, whatever happens. A failure replaces the point's row. A
    rerun then measures it again from its first pass."""
    try:
        return repeat_point(ctx, batch_size, state)
    except distributed.DistributedError:
        raise
    except Exception as e:  # noqa: BLE001
        return _failed(ctx, batch_size, e, {})


def _failed(
    ctx: PointContext, batch_size: int, e: Exception, oom_at: dict[str, int]
) -> tuple[dict[str, Any], None]:
    """The row of a point that raised: "oom" or "error". An "oom" records the run's wall."""
    raise_if_terminated()
    name = ctx.run.name
    if is_oom(e):
        wall = oom_at.get(name)
        oom_at[name] = min(batch_size, wall if wall is not None else batch_size)
        return status_row(ctx, batch_size, "oom", **why(e)), None
    logging.exception("%s batch=%d failed", name, batch_size)
    return status_row(ctx, batch_size, "error", **why(e)), None


def agree_on_outcome(
    ctx: PointContext,
    row: dict[str, Any],
    samples: np.ndarray | None,
    oom_at: dict[str, int],
    wall_before: int | None,
) -> tuple[dict[str, Any], np.ndarray | None]:
    """A point that failed on any process is recorded alike by every process. Processes exchange
    (batch size, status). When any failed, every process takes one status. It is that of the
    failed process with the lowest index. So process 0's row is the same everywhere. So is the
    run's OOM wall, `oom_at`. It was `wall_before` before this point. What a rerun retries agrees
    too. And the processes go on making the same calls."""
    run, batch_size = ctx.run, row["batch_size"]
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
    return status_row(ctx, batch_size, status, message=f"process {p}: {status}"), None
