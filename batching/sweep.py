"""The sweep: for each run and batch size, compile, time and append one row.

config -> runs -> workload per run -> one measured point per batch size -> row.
Analysis and writers read the rows afterwards; nothing here draws or reports.
"""

import contextlib
import random
import sys
import time
from typing import Any

import jax
import numpy as np
from absl import logging
from tqdm import tqdm

from batching import results, runs, stats, timing, workload
from batching.tensorboard_writer import PointWriter


def measure_point(
    run: runs.Run,
    wl: workload.Workload,
    batch_size: int,
    fingerprint: str,
    settings: timing.TimingSettings,
) -> tuple[dict[str, Any], np.ndarray]:
    """Compiles and times the workload at one batch size; returns the row and the samples."""
    cfg = run.config
    dev = runs.device(cfg)
    args = wl.make_args(batch_size)
    precision = cfg.model.get("matmul_precision", "default")
    ctx = (
        jax.default_matmul_precision(precision)
        if precision != "default"
        else contextlib.nullcontext()
    )
    with ctx:
        compiled = timing.compile_fn(wl.fn, args, wl.donate_argnums)
    m = timing.measure(compiled.call, args, settings, wl.next_args)
    del args
    extra = wl.point_fields(batch_size) if wl.point_fields else {}
    summary = stats.summarize(m.samples_s, settings.confidence)
    latency = summary["latency_s"]
    examples = wl.examples(batch_size)
    cost = wl.cost(batch_size) if wl.cost else None
    work_flops = cost.flops if cost else compiled.flops
    work_bytes = cost.bytes if cost else compiled.bytes_accessed
    row = {
        "experiment": cfg.name,
        "run": run.name,
        "model": cfg.model.name,
        "batch_size": batch_size,
        "dtype": cfg.model.get("dtype"),
        "param_dtype": cfg.model.get("param_dtype"),
        "matmul_precision": precision,
        "platform": dev.platform,
        "device_kind": dev.device_kind,
        "device_count": len(jax.devices(dev.platform)),
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
        "achieved_flops_per_s": work_flops / latency if work_flops else None,
        "achieved_bytes_per_s": work_bytes / latency if work_bytes else None,
        "examples": examples,
        "throughput_per_s": examples / latency,
        f"{wl.example_unit}_per_s": examples / latency,
        "per_example_s": latency / examples,
        "gemm_shapes": wl.gemm_shapes(batch_size) if wl.gemm_shapes else None,
        "attention_shapes": wl.attention_shapes(batch_size) if wl.attention_shapes else None,
        "fingerprint": fingerprint,
        "jax_version": jax.__version__,
        "timestamp": time.time(),
        **wl.fields,
        **extra,
    }
    return row, m.samples_s


def trace_point(wl: workload.Workload, batch_size: int, steps: int, logdir: str) -> None:
    """Captures a jax.profiler trace of `steps` calls, after the point was timed, never during.

    The trace lands in <logdir>/plugins/profile/<time>/, where TensorBoard's
    Profile tab (the `profile` extra, xprof) finds it.
    """
    call = jax.jit(wl.fn, donate_argnums=wl.donate_argnums)
    args = tuple(wl.make_args(batch_size))
    out = call(*args)  # compiled already: this only warms the dispatch path
    jax.block_until_ready(out)
    if wl.next_args is not None:
        args = tuple(wl.next_args(args, out))
    with jax.profiler.trace(logdir):
        for step in range(steps):
            with jax.profiler.StepTraceAnnotation(f"batch_{batch_size}", step_num=step):
                out = call(*args)
                jax.block_until_ready(out)
            if wl.next_args is not None:
                args = tuple(wl.next_args(args, out))


def run_sweep(
    all_runs: list[runs.Run],
    fingerprints: dict[str, str],
    store: results.Store,
    progress_bar: bool,
) -> int:
    """Measures every (run, batch size) not yet in the store; returns how many it measured."""
    done = store.measured(fingerprints)
    todo = {r.name: [b for b in r.batch_sizes if (r.name, b) not in done] for r in all_runs}
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
            wl = workload.build(run.config, runs.device(run.config), store.workdir)
            settings = runs.timing_settings(run.config)
            writer = PointWriter(store.workdir, run.name)
            try:
                for batch_size in sizes:
                    bar.set_postfix_str(f"{run.name} batch={batch_size}")
                    row, samples = measure_point(
                        run, wl, batch_size, fingerprints[run.name], settings
                    )
                    store.append(row, samples)
                    writer.write(row)
                    if batch_size in run.config.profile.batch_sizes:
                        trace_point(wl, batch_size, run.config.profile.steps, writer.logdir)
                    measured += 1
                    bar.update(1)
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
                writer.close()
            del wl
    finally:
        bar.close()
    return measured
