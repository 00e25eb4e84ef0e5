"""What main.py hands off to: validate, prepare the workdir, sweep, then write every output."""

import collections
import fcntl
import math
import os
import signal
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from batching import (
    analysis,
    archive,
    distributed,
    plots,
    report,
    results,
    runs,
    summary,
    sweep,
    workload,
)
from batching.tensorboard_writer import write_experiment_config, write_run_summary


def prepare(
    config: ml_collections.ConfigDict, workdir: str, writer: bool = True
) -> tuple[list[runs.Run], dict]:
    """Checks everything that can be checked before writing; raises ConfigError/WorkdirError.

    Only the writer (process 0) looks at the workdir: the others never touch it.
    """
    all_runs = runs.expand(config)
    runs.validate(config, all_runs)
    if distributed.is_multiprocess():
        for r in all_runs:
            if hasattr(workload.workload_module(r.config.model.name), "prepare"):
                raise runs.ConfigError(
                    f"model.name {r.config.model.name!r} trains before it is timed, which "
                    "runs in one process only; unset distributed.* for this run"
                )
    fingerprints = {r.name: results.fingerprint(runs.measurement_view(r)) for r in all_runs}
    if not writer:
        return all_runs, fingerprints
    results.check_writable(workdir)
    store = results.Store(workdir)
    clashing = store.conflicts(fingerprints)
    if clashing and not config.overwrite:
        raise results.WorkdirError(
            f"workdir {workdir!r} holds runs {clashing} measured under another config or "
            "device; use a new workdir or --config.overwrite=true to archive them"
        )
    return all_runs, fingerprints


Terminated = sweep.Terminated


class PointsFailed(RuntimeError):
    """Some points raised (status "error"); every output was still written. Exit 1."""


def _terminate(signum, frame):
    del signum, frame
    sweep.request_termination()


def lock_workdir(workdir: str):
    """An OS-level lock on the workdir (released when the process dies); WorkdirError if held."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, ".lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise results.WorkdirError(
            f"workdir {workdir!r} is in use by process {holder}; wait or use another workdir"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


def run(config: ml_collections.ConfigDict, workdir: str) -> list[dict[str, Any]]:
    """Runs the experiment described by `config` into `workdir`; returns the run summaries.

    With several processes (config.distributed) every process calls this with the same
    config; process 0 writes and the others only take part in the measurements.
    """
    distributed.initialize(config)  # before anything else touches JAX
    writer = distributed.is_writer()
    error, lock = None, None
    try:
        all_runs, fingerprints = prepare(config, workdir, writer)
    except (runs.ConfigError, results.WorkdirError) as e:
        error = e
    # A process that refused the config must not leave the others waiting for it.
    distributed.agree_on_failure(error)
    distributed.check_same_config(agreement(config, all_runs, fingerprints))
    if writer:
        try:
            lock = lock_workdir(workdir)
        except results.WorkdirError as e:
            error = e
    distributed.agree_on_failure(error)
    sweep.clear_termination()
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return _run_locked(config, workdir, all_runs, fingerprints, writer)
    finally:
        signal.signal(signal.SIGTERM, previous)
        if lock is not None:
            os.close(lock)


# Fields that may differ between processes: where each host keeps its caches, how it prints.
PER_PROCESS = ("distributed", "compilation_cache_dir", "output")


def agreement(
    config: ml_collections.ConfigDict, all_runs: list[runs.Run], fingerprints: dict[str, str]
) -> dict[str, Any]:
    """What every process must share with process 0, by name (distributed.check_same_config)."""
    rest = {k: v for k, v in config.to_dict().items() if k not in PER_PROCESS}
    rest.get("roofline", {}).pop("peaks_cache_dir", None)
    points = {r.name: [r.batch_sizes, r.config.sweep.shuffle, r.config.seed] for r in all_runs}
    return {"fingerprints": fingerprints, "points": points, "config": rest}


def _run_locked(config, workdir, all_runs, fingerprints, writer=True) -> list[dict[str, Any]]:
    store = results.Store(workdir)
    if config.compilation_cache_dir:
        enable_compilation_cache(config.compilation_cache_dir)
    if not writer:
        # Another process: measure in step with process 0, write nothing.
        sweep.run_sweep(all_runs, fingerprints, store, False, writer=False)
        return []
    if config.overwrite and store.has_outputs():
        logging.info("overwrite: previous outputs moved to %s", store.archive())
    store.write_config(config.to_dict(), fingerprints)
    prepared = prepare_runs(all_runs, store.workdir)
    try:
        sweep.run_sweep(all_runs, fingerprints, store, config.output.progress_bar)
    except KeyboardInterrupt:
        logging.warning("interrupted: every finished point is in %s; rerun to resume", workdir)
        raise
    except OSError as e:
        where = e.filename or workdir
        raise results.WorkdirError(
            f"cannot write {where!r}: {e.strerror or e}; the rows already written are intact"
        ) from None
    summaries = finalize(config, all_runs, fingerprints, store, prepared)
    failed = [
        f"{r['run']}@{r['batch_size']} ({r.get('error_type')}: {r.get('message')})"
        for r in results.latest(store.rows())
        if r.get("status") == "error" and fingerprints.get(r["run"]) == r.get("fingerprint")
    ]
    if failed:
        raise PointsFailed(f"{len(failed)} points failed: " + "; ".join(failed))
    return summaries


def prepare_runs(all_runs: list[runs.Run], workdir: str) -> dict[str, dict[str, Any]]:
    """Steps a workload needs before it can be timed (training an MoE decoder), per run."""
    done = {}
    for run in all_runs:
        module = workload.workload_module(run.config.model.name)
        if hasattr(module, "prepare"):
            logging.info("preparing run %s", run.name)
            done[run.name] = module.prepare(run.config, run.name, workdir)
    return done


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
    prepared: dict[str, dict[str, Any]] | None = None,
    devices: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Analysis, summaries, plots, TensorBoard run summaries, the report and the printed table.

    `devices` (run name -> device) stands in for the run's configured device: rows measured
    elsewhere, analysed here (experiments/reanalyze.py)."""
    stored = store.rows()
    all_rows = results.latest(stored)
    current_all = [r for r in all_rows if fingerprints.get(r["run"]) == r.get("fingerprint")]
    grouped = plots.by_run([r for r in current_all if results.is_ok(r)])
    done = [r for r in all_runs if r.name in grouped]
    summaries, analyzed_rows = analyze(config, done, grouped, current_all, store, prepared, devices)
    if config.roofline.enabled or len(all_rows) < len(stored):
        by_key = {(r["run"], r["batch_size"]): r for r in analyzed_rows}
        store.rewrite_rows([by_key.get((r["run"], r["batch_size"]), r) for r in all_rows])
    here = {r.get("device_kind") for r in analyzed_rows}
    archived = archive.load(
        config.report.get("archive_dir", ""),
        config.name,
        exclude_device_kind=here.pop() if len(here) == 1 else None,
    )
    images = draw(config, analyzed_rows, current_all, summaries, archived, store)
    write_tensorboard(store, done, summaries, analyzed_rows, images)
    plot_paths = {name: store.path("plots", f"{name}.png") for name in images}
    verdicts = report.write(
        store.workdir,
        config.name,
        tuple(config.report.claims),
        summaries,
        analyzed_rows,
        plot_paths,
        archived,
    )
    for s in summaries:
        s["verdicts"] = verdicts
    store.write_summary(summaries)
    print(summary.format_table(analyzed_rows), flush=True)
    for cid, v in verdicts.items():
        print(f"{cid}: {v['verdict']}")
    print(closing_line(store, current_all), flush=True)
    return summaries


def analyze(
    config: ml_collections.ConfigDict,
    done: list[runs.Run],
    grouped: dict[str, list[dict[str, Any]]],
    current_all: list[dict[str, Any]],
    store: results.Store,
    prepared: dict[str, dict[str, Any]] | None,
    devices: dict[str, Any] | None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Each measured run's summary (its ends, memory wall, roofline and training fields) and
    its rows with their analysis; the peaks it used go to the workdir's device_peaks.json."""
    all_samples = store.pass_samples()
    peak_source = analysis.PeakSource(
        config.roofline.peaks_cache_dir,
        config.roofline.refresh_peaks,
        config.roofline.get("peaks_file"),
        config.roofline.get("check_peaks", True),
    )
    summaries, analyzed_rows, used_peaks = [], [], {}
    for run in done:
        rows = grouped[run.name]
        s = summary.run_summary(rows)
        s.update(summary.memory_summary([r for r in current_all if r["run"] == run.name]))
        s["whatif_max_batch"] = summary.whatif_max_batch(s, run.config.roofline.whatif_devices)
        device = devices[run.name] if devices else runs.device(run.config)
        if config.roofline.enabled:
            # Each point's samples per sweep pass.
            samples = {
                b: [np.asarray(p) for p in all_samples[(run.name, b)]]
                for b in (r["batch_size"] for r in rows)
                if (run.name, b) in all_samples
            }
            peak_source.start_run(
                analysis.microbenchmark_budget(run.config.roofline, device.platform)
            )
            try:
                rows, roof = analysis.analyze_run(
                    rows, samples, device, run.config.roofline, peak_source
                )
            except analysis.NoPeaks as e:  # a peaks file without this run's device
                logging.warning("run %s is not analysed: %s", run.name, e)
                roof = {"not_analysed": str(e)}
            s.update(roof)
            if "not_analysed" not in roof:
                used_peaks[f"{device.platform}:{device.device_kind}"] = peak_source.entry(device)
        if prepared and run.name in prepared:
            s.update(summary.training_fields(prepared[run.name]))
        summaries.append(s)
        analyzed_rows.extend(rows)
    if used_peaks:
        store.write_peaks(used_peaks)
    return summaries, analyzed_rows


def draw(
    config: ml_collections.ConfigDict,
    analyzed_rows: list[dict[str, Any]],
    current_all: list[dict[str, Any]],
    summaries: list[dict[str, Any]],
    archived: list[archive.Archived],
    store: results.Store,
) -> dict[str, np.ndarray]:
    """Every figure the runs carry data for, saved under plots/; the images by name."""
    if not (config.output.plots and analyzed_rows):
        return {}
    figures = plots.sweep_figures(analyzed_rows, config.name)
    analyzed = [s for s in summaries if "knee_batch_size" in s]
    if analyzed:
        figures["roofline"] = plots.roofline_figure(
            [r for r in analyzed_rows if any(r["run"] == s["run"] for s in analyzed)], analyzed
        )
        for s in analyzed:
            run_rows = [r for r in analyzed_rows if r["run"] == s["run"]]
            figures[f"fit_{s['run']}"] = plots.fit_figure(run_rows, s)
            figures[f"whatif_{s['run']}"] = plots.whatif_figure(run_rows, s)
            figures[f"breakdown_{s['run']}"] = plots.breakdown_figure(s)
        figures.update(plots.extra_figures(analyzed_rows, analyzed))
    if any(r.get("memory_bytes") for r in current_all):
        figures["memory"] = plots.memory_figure(current_all, summaries)
    figures.update(plots.routing_figures(analyzed_rows, summaries))
    if archived:
        figures["archive"] = plots.archive_figure(analyzed_rows, archived)
    return plots.save_all(figures, store.path("plots"))


def write_tensorboard(
    store: results.Store,
    done: list[runs.Run],
    summaries: list[dict[str, Any]],
    analyzed_rows: list[dict[str, Any]],
    images: dict[str, np.ndarray],
) -> None:
    """Each run's TensorBoard summary (config, hparams, metrics, its figures, the derived
    per-point scalars), then the experiment's one HParams config."""
    for run, s in zip(done, summaries, strict=True):
        per_run = ("fit", "whatif", "breakdown")
        others = {f"{kind}_{r.name}" for r in done if r is not run for kind in per_run}
        own = {name: image for name, image in images.items() if name not in others}
        write_run_summary(
            store.workdir,
            run.name,
            config=run.config.to_dict(),
            hparams=hparams(run, s),
            metrics=metrics(s),
            images={f"plots/{name}": image for name, image in own.items()},
            point_scalars=derived_point_scalars([r for r in analyzed_rows if r["run"] == run.name]),
        )
    if done:
        write_experiment_config(
            store.workdir,
            {run.name: hparams(run, s) for run, s in zip(done, summaries, strict=True)},
            sorted({tag for s in summaries for tag in metrics(s)}),
        )


def closing_line(store: results.Store, rows: list[dict[str, Any]]) -> str:
    """Where the report is, how to open TensorBoard, and how many points were not ok and why."""
    line = f"report: {store.path('report.md')} | tensorboard --logdir {store.path('tb')}"
    ok = [r for r in rows if results.is_ok(r)]
    converged = sum(bool(r.get("converged", True)) for r in ok)
    line += f" | {converged} of {len(ok)} measured points converged"
    if converged < len(ok):
        line += " (the others stopped on their budget; marked in the table and plots)"
    why = collections.Counter(r["status"] for r in rows if not results.is_ok(r))
    if why:
        counts = ", ".join(f"{n} {status}" for status, n in sorted(why.items()))
        line += f" | {sum(why.values())} of {len(rows)} points not ok: {counts}"
    return line


METRICS = {
    "latency_first_s": ("hparams/latency_first_ms", 1e3),
    "latency_last_s": ("hparams/latency_last_ms", 1e3),
    "slowdown_last_vs_first": ("hparams/slowdown_last_vs_first", 1.0),
    "best_throughput_per_s": ("hparams/best_throughput_per_s", 1.0),
    "points_converged": ("hparams/points_converged", 1.0),
    "predicted_critical_batch": ("roofline/predicted_critical_batch", 1.0),
    "spec_critical_batch": ("roofline/spec_critical_batch", 1.0),
    "predicted_critical_batch_global": ("roofline/predicted_critical_batch_global", 1.0),
    "comm_share_median": ("roofline/comm_share_median", 1.0),
    "slowest_device_cost_median": ("roofline/slowest_device_cost_median", 1.0),
    "knee_batch_size": ("roofline/knee_batch_size", 1.0),
    "knee_low": ("roofline/knee_low", 1.0),
    "knee_high": ("roofline/knee_high", 1.0),
    "free_batching_limit": ("roofline/free_batching_limit", 1.0),
    "overhead_s": ("roofline/overhead_us", 1e6),
    "effective_flops_per_s": ("roofline/effective_gflops_per_s", 1e-9),
    "effective_bytes_per_s": ("roofline/effective_gbytes_per_s", 1e-9),
    "peak_flops_per_s": ("roofline/peak_gflops_per_s", 1e-9),
    "peak_bytes_per_s": ("roofline/peak_gbytes_per_s", 1e-9),
    "prediction_error_median": ("roofline/prediction_error_median", 1.0),
    "fit_error_median": ("roofline/fit_error_median", 1.0),
    "heldout_loss": ("hparams/heldout_loss", 1.0),
    "heldout_load_cv": ("hparams/heldout_load_cv", 1.0),
    "heldout_drop_fraction": ("hparams/heldout_drop_fraction", 1.0),
    "heldout_max_mean_load": ("hparams/heldout_max_mean_load", 1.0),
    "drop_fraction_first": ("hparams/drop_fraction_first_batch", 1.0),
    "drop_fraction_last": ("hparams/drop_fraction_last_batch", 1.0),
    "max_mean_load_first": ("hparams/max_mean_load_first_batch", 1.0),
    "max_mean_load_last": ("hparams/max_mean_load_last_batch", 1.0),
    "load_cv_first": ("hparams/load_cv_first_batch", 1.0),
    "load_cv_last": ("hparams/load_cv_last_batch", 1.0),
}


def metrics(s: dict[str, Any]) -> dict[str, float]:
    """The run's final numbers as hparams metrics (scalar tags the HParams tab reads)."""
    return {
        tag: s[field] * scale for field, (tag, scale) in METRICS.items() if s.get(field) is not None
    }


def derived_point_scalars(rows: list[dict[str, Any]]) -> dict[str, dict[int, float]]:
    """Per-point predicted and fitted latencies (ms), step = batch size; at profiled points
    also the traced call and the traced and predicted ms per op kind."""
    out = {}
    for field, tag in (
        ("predicted_latency_s", "latency/predicted_ms"),
        ("fitted_latency_s", "latency/fitted_ms"),
        ("predicted_comm_s", "latency/predicted_comm_ms"),
    ):
        values = {
            r["batch_size"]: r[field] * 1e3
            for r in rows
            if r.get(field) is not None and math.isfinite(r[field])
        }
        if values and any(values.values()):  # a run without collectives: no comm curve
            out[tag] = values
    # Profiled points: traced ms per op kind next to the predicted ms of that kind.
    for r in rows:
        traced = r.get("traced_ops")
        if not traced:
            continue
        b = r["batch_size"]
        out.setdefault("latency/traced_ms", {})[b] = r["traced_latency_s"] * 1e3
        for kind, t in traced.items():
            out.setdefault(f"ops/traced_{kind}_ms", {})[b] = t["seconds"] * 1e3
        for kind, limits in (r.get("predicted_by_kind") or {}).items():
            out.setdefault(f"ops/predicted_{kind}_ms", {})[b] = sum(limits.values()) * 1e3
    return out


def hparams(run: runs.Run, s: dict[str, Any]) -> dict[str, Any]:
    """Run-level hyperparameters: every model field plus where the run ran."""
    hp = {f"model.{k}": v for k, v in run.config.model.to_dict().items()}
    if "train" in run.config:
        hp.update({f"train.{k}": v for k, v in run.config.train.to_dict().items()})
    hp.update(
        run=run.name,
        platform=s["platform"],
        device_kind=s["device_kind"],
        params=s["params"],
        batch_min=min(s["batch_sizes"]),
        batch_max=max(s["batch_sizes"]),
    )
    return hp
