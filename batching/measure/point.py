"""One point of a sweep: compile the workload at a batch size, time it, and make its row.

The sweep (batching.sweep) decides which points to visit, in which order and pass. It also
decides what happens when one fails. This module measures one visit. It builds the visit's row
through the row schema (batching.rows).
"""

import dataclasses
import functools
import math
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from batching import rows
from batching.measure import microbench, pass_stats, program_ops, stats, timing
from batching.setup import distributed, runs, specs, topology
from batching.setup.topology import Topology
from batching.workloads import base as workload
from batching.workloads import collectives


class OverBudget(Exception):
    """A compiled point needs more memory than the budget. It is recorded, not run."""

    def __init__(self, fields: dict[str, Any]):
        super().__init__("over the memory budget")
        self.fields = fields


@dataclasses.dataclass
class PointContext:
    """What every visit of a run's points shares.

    - `run`: the run.
    - `topo`, `wl`: its mesh and workload, None when they could not be built.
    - `fingerprint`: the run's fingerprint.
    - `share`: how several processes agree on a decision.
    - `flush`: the cache flush of a cold run.
    """

    run: runs.Run
    topo: Topology | None
    wl: workload.Workload | None
    fingerprint: str
    share: distributed.Share | None = None
    # Evicts the last-level cache before each timed call (timing.cache = "cold"), else None.
    flush: Callable[[], None] | None = None

    @property
    def config(self) -> Any:
        """The run's config."""
        return self.run.config

    @property
    def passes(self) -> int:
        """The passes every point gets (`sweep.passes`, default 1)."""
        return self.run.config.sweep.get("passes", 1)

    @property
    def max_passes(self) -> int:
        """The most passes a point gets (`sweep.max_passes`, default `passes`)."""
        return max(self.passes, self.run.config.sweep.get("max_passes", self.passes))

    @functools.cached_property
    def timing(self) -> timing.RunTiming:
        """The run's timing section."""
        return timing.RunTiming.from_config(self.run.config)

    @property
    def precision(self) -> str:
        """The run's matmul precision (`model.matmul_precision`, default "default")."""
        return self.run.config.model.get("matmul_precision", "default")


@dataclasses.dataclass
class Program:
    """A point's compiled executable and its traced flat call, kept between passes."""

    flat: workload.FlatCall
    compiled: timing.Compiled


@dataclasses.dataclass
class PointState:
    """What a point carries from one pass to the next: its latest row, each earlier pass's
    samples, and its compiled program. The program is None until compiled in this process.
    """

    row: dict[str, Any] | None = None
    pass_samples: list[np.ndarray] = dataclasses.field(default_factory=list)
    program: Program | None = None
    # Passes done whose samples this process does not hold (another process's rows).
    unseen: int = 0

    @property
    def passes_done(self) -> int:
        """Passes done at the point: those whose samples this process holds, plus `unseen`."""
        return self.unseen + len(self.pass_samples)


def is_oom(e: BaseException) -> bool:
    """XLA's out-of-memory: an XlaRuntimeError (or MemoryError) saying RESOURCE_EXHAUSTED."""
    return isinstance(e, MemoryError) or "RESOURCE_EXHAUSTED" in str(e)


def why(e: BaseException) -> dict[str, str]:
    """A failed point's `error_type` and `message` (first line, at most 500 characters)."""
    return {"error_type": type(e).__name__, "message": str(e).strip().splitlines()[0][:500]}


def memory_fields(compiled: timing.Compiled, dev: jax.Device) -> dict[str, Any]:
    """What the program needs and what the device has, in bytes.

    The need is arguments + outputs + temporaries − aliased. It is None where XLA does not say.
    """
    m = compiled.memory
    parts = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes")
    need = None
    if all(k in m for k in parts):
        need = sum(m[k] for k in parts) - m.get("alias_size_in_bytes", 0)
    return {"memory_bytes": need, "device_memory_bytes": specs.device_memory_bytes(dev)}


def memory_budget(cfg, device_bytes: int) -> float:
    """Bytes a point may need: config.memory.max_bytes, else max_fraction of the device."""
    mem = cfg.memory
    if mem.get("max_bytes") is not None:
        return float(mem.max_bytes)
    return mem.max_fraction * device_bytes


def mesh_fields(ctx: PointContext, batch_size: int) -> dict[str, Any]:
    """Where a point runs: the mesh, and the batch as a global and a per-device size.

    `batch_size` is the global batch, the swept size. Each device holds batch_size over the
    devices that `batch` maps to. Those are mesh.data, or data x expert under the MoE decoder's
    GShard rules. topology.validate checked that the batch divides. A run whose mesh could not
    be built reads the mesh from its config. Its rows are errors.
    """
    if ctx.topo is not None:
        shape, shards, count = ctx.topo.shape, ctx.topo.axis_size("batch"), ctx.topo.num_devices
    else:
        shape = topology.mesh_shape(ctx.config)
        shards = topology.split_size(shape, topology.axis_rules(ctx.config), "batch")
        count = math.prod(shape.values())
    return {
        "global_batch_size": batch_size,
        "per_device_batch_size": batch_size // shards,
        "num_devices": count,
        "process_count": jax.process_count(),
        "mesh_shape": shape,
    }


def status_row(ctx: PointContext, batch_size: int, status: str, **fields: Any) -> rows.Row:
    """A point's row: who, where, its status, then `fields` (what was measured, or why not)."""
    cfg = ctx.config
    dev = ctx.topo.device if ctx.topo is not None else runs.device(cfg)
    return rows.make(
        experiment=cfg.name,
        run=ctx.run.name,
        setting=ctx.run.setting or ctx.run.name,
        seed=cfg.get("seed"),
        model=cfg.model.name,
        batch_size=batch_size,
        platform=dev.platform,
        device_kind=dev.device_kind,
        **mesh_fields(ctx, batch_size),
        status=status,
        fingerprint=ctx.fingerprint,
        jax_version=jax.__version__,
        timestamp=time.time(),
        **fields,
    )


def compile_point(ctx: PointContext, batch_size: int) -> tuple[Program, dict[str, Any]]:
    """The point's flat call compiled under the run's precision, and its memory fields.

    It raises OverBudget when the point needs more than the budget. Process 0 decides that for
    every process.
    """
    # Flat arrays in and out: per call only jit's dispatch of a tuple of arrays runs.
    flat = workload.flat_call(ctx.wl, batch_size)
    # The timed calls run this executable: compiled once, under the run's precision.
    compiled = timing.compile_fn(flat.fn, flat.args, flat.donate_argnums, ctx.precision)
    # Per device: an SPMD program's memory analysis is one device's share.
    memory = memory_fields(compiled, ctx.topo.device)
    budget = memory_budget(ctx.config, memory["device_memory_bytes"])
    over = memory["memory_bytes"] is not None and memory["memory_bytes"] > budget
    if ctx.share is not None:
        over = bool(ctx.share("memory", int(over)))
    if over:
        raise OverBudget({**memory, "memory_budget_bytes": budget})
    return Program(flat, compiled), memory


def measure_point(ctx: PointContext, batch_size: int) -> tuple[rows.Row, np.ndarray, Program]:
    """A point's first visit: compiles and times the workload at one batch size.

    Returns the row and the pass's samples. It also returns the program that later passes time
    again. With several processes (`ctx.share`), process 0 makes the memory-budget and timer
    decisions.
    """
    program, memory = compile_point(ctx, batch_size)
    flat = program.flat
    # The call's own dispatch floor (its arguments' flattening), before donation consumes
    # them: a per-point microbenchmark of the shape-aware roofline; one process only (a timed
    # call per process would not stay in step).
    roof = ctx.config.roofline
    per_point = roof.enabled and roof.shape_aware and ctx.share is None
    call_floor_s = microbench.measure_call_floor(flat.args, ctx.flush) if per_point else None
    m = time_pass(ctx, program.compiled.call, flat)
    fields = {
        **run_fields(ctx, program.compiled),
        **memory,
        **work_fields(ctx, batch_size, program.compiled),
        **program_ops.fields(ctx, program),
        "call_floor_s": call_floor_s,
        **ctx.wl.fields,
        "parallel_shape": ctx.wl.parallel_shape or ctx.topo.shape,
        **(ctx.wl.point_fields(batch_size) if ctx.wl.point_fields else {}),
    }
    row = status_row(ctx, batch_size, "ok", **fields)
    return rows.extend(row, **point_fields(row, [m.samples_s], [m], ctx)), m.samples_s, program


def time_pass(ctx: PointContext, call: Callable[..., Any], flat: workload.FlatCall):
    """One pass of a point: the run's pass plan over `flat`'s arguments, which it consumes."""
    m = timing.measure(
        call, flat.args, ctx.timing.pass_settings(), flat.next_args, ctx.share,
        before_call=ctx.flush,
    )  # fmt: skip
    flat.args = ()  # the donated arguments are gone; the rest need not outlive the visit
    return m


def run_fields(ctx: PointContext, compiled: timing.Compiled) -> dict[str, Any]:
    """The numerics, devices, compile times and model size of a compiled point."""
    return {
        "dtype": ctx.config.model.get("dtype"),
        "param_dtype": ctx.config.model.get("param_dtype"),
        "matmul_precision": ctx.precision,
        "device_count": len(jax.devices(ctx.topo.device.platform)),
        "compile_s": compiled.compile_s,
        "lower_s": compiled.lower_s,
        "params": ctx.wl.params,
        "param_bytes": ctx.wl.param_bytes,
    }


def work_fields(ctx: PointContext, batch_size: int, compiled: timing.Compiled) -> dict[str, Any]:
    """The call's work, as XLA counts it and as the lab counts it (its ops).

    The fields also give its examples, shapes and collectives. On a mesh they add the
    collectives that XLA compiled in.
    """
    wl = ctx.wl
    cost = wl.cost(batch_size) if wl.cost else None
    calls = wl.collectives(batch_size) if wl.collectives else []
    # What XLA actually put in the program, next to the analytic count (a mesh only: one
    # device has none, and the HLO text of a big model is long).
    several = ctx.topo.num_devices > 1
    xla_comm = collectives.from_hlo(compiled.executable.as_text()) if several else None
    return {
        "flops": compiled.flops,
        "bytes_accessed": compiled.bytes_accessed,
        "analytic_flops": cost.flops if cost else None,
        "analytic_bytes": cost.bytes if cost else None,
        "weight_bytes": cost.weight_bytes if cost else None,
        "temp_bytes": compiled.memory.get("temp_size_in_bytes"),
        "examples": wl.examples(batch_size),
        "example_unit": wl.example_unit,
        "gemm_shapes": wl.gemm_shapes(batch_size) if wl.gemm_shapes else None,
        "attention_shapes": wl.attention_shapes(batch_size) if wl.attention_shapes else None,
        "collectives": calls,
        # Payload per device of the call's collectives (Σ bytes·count).
        "comm_bytes": collectives.total_bytes(calls),
        "xla_collectives": xla_comm["counts"] if xla_comm else None,
        "xla_comm_bytes": xla_comm["bytes"] if xla_comm else None,
        # The call as ops (batching.workloads.ops.Op), priced one by one by the roofline.
        "ops": [o.to_dict() for o in wl.ops(batch_size)] if wl.ops else None,
    }


def point_fields(
    row: dict[str, Any], samples_by_pass: list[np.ndarray], passes: list[Any], ctx: PointContext
) -> dict[str, Any]:
    """A point's timing fields from every pass so far.

    `passes` holds each pass's timing.Measurement, or its stored fields. The fields are these:

    - The latency and its interval, from the pass medians (pass_stats.from_passes).
    - Whether that interval met the target.
    - What the pooled samples look like: a description, not the interval.
    - Two programs within passes (`modes`).
    - The passes' own records.
    - What follows from the latency: throughput and achieved rates.
    """
    settings = ctx.timing
    est = pass_stats.from_passes(samples_by_pass, settings.estimator, settings.confidence)
    pooled = np.concatenate(samples_by_pass)
    described = stats.summarize(pooled, settings.confidence)
    latency = est.latency_s
    done = len(samples_by_pass)
    # Never before the passes every point gets: an interval needs its passes first.
    converged = done >= ctx.passes and est.rel_halfwidth <= settings.target_rel_ci
    work_flops = row["analytic_flops"] or row["flops"]
    work_bytes = row["analytic_bytes"] or row["bytes_accessed"]
    examples = row["examples"]
    return {
        **{k: v for k, v in described.items() if k not in DESCRIBED_ONLY},
        "latency_s": latency,
        "estimator": settings.estimator,
        # The analysis widens this by the machine's drift between runs (pass_ci_* keep it).
        "latency_ci_low_s": est.low_s,
        "latency_ci_high_s": est.high_s,
        "pass_ci_low_s": est.low_s,
        "pass_ci_high_s": est.high_s,
        "interval_method": est.method,
        "pooled_samples_ci_low_s": described["latency_ci_low_s"],
        "pooled_samples_ci_high_s": described["latency_ci_high_s"],
        "modes": pass_stats.modes_within_passes(samples_by_pass),
        "converged": bool(converged),
        # Final once converged; the sweep sets `budget` or `max_passes` when it stops adding
        # passes to a point that is not.
        "stop_reason": "precision" if converged else "pending",
        "cache_state": settings.cache,
        "passes": ctx.passes,
        "passes_done": done,
        "pass_medians_s": [float(np.median(s)) for s in samples_by_pass],
        "pass_cv": est.pass_cv,
        "pass_n_runs": [int(s.size) for s in samples_by_pass],
        **_pass_records(row, passes),
        "achieved_flops_per_s": work_flops / latency if work_flops else None,
        "achieved_bytes_per_s": work_bytes / latency if work_bytes else None,
        "throughput_per_s": examples / latency,
        f"{row.get('example_unit', 'examples')}_per_s": examples / latency,
        "per_example_s": latency / examples,
        "timestamp": time.time(),
    }


# Fields of stats.summarize that describe the pooled samples but are not the point's.
DESCRIBED_ONLY = ("latency_s", "latency_ci_low_s", "latency_ci_high_s", "modes")


def _pass_records(row: dict[str, Any], passes: list[Any]) -> dict[str, list]:
    """Each pass's stop reason, wall seconds and host load. The earlier passes' come from the
    point's row. The new ones come from their measurements.
    """
    new = passes[len(row.get("pass_stop_reasons", [])) :]
    return {
        "pass_stop_reasons": [*row.get("pass_stop_reasons", []), *(m.stop_reason for m in new)],
        "pass_wall_s": [*row.get("pass_wall_s", []), *(m.wall_s for m in new)],
        "pass_host_busy": [*row.get("pass_host_busy", []), *(m.host_busy for m in new)],
    }


def repeat_point(
    ctx: PointContext, batch_size: int, state: PointState
) -> tuple[rows.Row, np.ndarray]:
    """A later pass over a point: its program timed again on fresh arguments.

    When the run resumed in a new process, the program is compiled again, unrecorded. Returns
    the row over every pass and this pass's samples.
    """
    wl = ctx.wl
    if state.row is None:
        # Another process's point resumed here: this process writes no row, but keeps the
        # fields its own timing fields need.
        state.row = status_row(
            dataclasses.replace(ctx, fingerprint=""), batch_size, "ok",
            examples=wl.examples(batch_size), example_unit=wl.example_unit,
            analytic_flops=None, flops=None, analytic_bytes=None, bytes_accessed=None,
        )  # fmt: skip
    if state.program is None:
        flat = workload.flat_call(wl, batch_size)
        compiled = timing.compile_fn(flat.fn, flat.args, flat.donate_argnums, ctx.precision)
        state.program = Program(flat, compiled)
    else:
        flat = state.program.flat.rebind(wl.make_args(batch_size))
    m = time_pass(ctx, state.program.compiled.call, flat)
    n_before = len(state.row.get("pass_stop_reasons", []))
    passes = [None] * n_before + [m]
    fields = point_fields(state.row, [*state.pass_samples, m.samples_s], passes, ctx)
    return rows.extend(state.row, **fields), m.samples_s
