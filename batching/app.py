"""What main.py hands off to: validate, prepare the workdir, sweep, then write every output."""

import os
from typing import Any

import jax
import ml_collections
from absl import logging

from batching import plots, results, runs, summary, sweep
from batching.tensorboard_writer import write_run_summary


def prepare(config: ml_collections.ConfigDict, workdir: str) -> tuple[list[runs.Run], dict]:
    """Checks everything that can be checked before writing; raises ConfigError/WorkdirError."""
    all_runs = runs.expand(config)
    runs.validate(config, all_runs)
    results.check_writable(workdir)
    fingerprints = {r.name: results.fingerprint(runs.measurement_view(r)) for r in all_runs}
    store = results.Store(workdir)
    clashing = store.conflicts(fingerprints)
    if clashing and not config.overwrite:
        raise results.WorkdirError(
            f"workdir {workdir!r} holds runs {clashing} measured under another config or "
            "device; use a new workdir or --config.overwrite=true to archive them"
        )
    return all_runs, fingerprints


def run(config: ml_collections.ConfigDict, workdir: str) -> list[dict[str, Any]]:
    """Runs the experiment described by `config` into `workdir`; returns the run summaries."""
    all_runs, fingerprints = prepare(config, workdir)
    store = results.Store(workdir)
    if config.overwrite and store.has_outputs():
        logging.info("overwrite: previous outputs moved to %s", store.archive())
    if config.compilation_cache_dir:
        enable_compilation_cache(config.compilation_cache_dir)
    store.write_config(config.to_dict(), fingerprints)
    try:
        sweep.run_sweep(all_runs, fingerprints, store, config.output.progress_bar)
    except KeyboardInterrupt:
        logging.warning("interrupted: every finished point is in %s; rerun to resume", workdir)
        raise
    return finalize(config, all_runs, fingerprints, store)


def enable_compilation_cache(path: str) -> None:
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(path))
    # Cache every executable: the lab's compiles are small but there are many of them.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def finalize(
    config: ml_collections.ConfigDict,
    all_runs: list[runs.Run],
    fingerprints: dict[str, str],
    store: results.Store,
) -> list[dict[str, Any]]:
    """Summaries, plots, TensorBoard run summaries and the printed table, from the stored rows."""
    rows = [r for r in store.rows() if fingerprints.get(r["run"]) == r.get("fingerprint")]
    grouped = plots.by_run(rows)
    summaries = [summary.run_summary(grouped[r.name]) for r in all_runs if r.name in grouped]
    store.write_summary(summaries)
    images = {}
    if config.output.plots and rows:
        images = plots.save_all(plots.sweep_figures(rows, config.name), store.path("plots"))
    for run, s in zip([r for r in all_runs if r.name in grouped], summaries, strict=True):
        write_run_summary(
            store.workdir,
            run.name,
            config=run.config.to_dict(),
            hparams=hparams(run, s),
            metrics={
                "hparams/latency_first_ms": s["latency_first_s"] * 1e3,
                "hparams/latency_last_ms": s["latency_last_s"] * 1e3,
                "hparams/slowdown_last_vs_first": s["slowdown_last_vs_first"],
                "hparams/best_throughput_per_s": s["best_throughput_per_s"],
            },
            images={f"plots/{name}": image for name, image in images.items()},
        )
    print(summary.format_table(rows), flush=True)
    return summaries


def hparams(run: runs.Run, s: dict[str, Any]) -> dict[str, Any]:
    """Run-level hyperparameters: every model field plus where the run ran."""
    hp = {f"model.{k}": v for k, v in run.config.model.to_dict().items()}
    hp.update(
        run=run.name,
        platform=s["platform"],
        device_kind=s["device_kind"],
        params=s["params"],
        batch_min=min(s["batch_sizes"]),
        batch_max=max(s["batch_sizes"]),
    )
    return hp
