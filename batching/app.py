"""What main.py hands off to.

It validates the config and prepares the workdir. Then it sweeps and writes every output.
"""

import collections
import os
import signal
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from batching import sweep
from batching.measure import rates, stats, timing
from batching.outputs import archive, hparams, plots, report, results, summary
from batching.outputs.tensorboard import EventLog
from batching.predict import analysis, claims
from batching.setup import distributed, interrupt, runs
from batching.workloads import registry as workload


def prepare(
    config: ml_collections.ConfigDict, workdir: str, writer: bool = True
) -> tuple[list[workload.Bench], dict[str, str]]:
    """Checks everything that can be checked before writing.

    A problem raises a ConfigError or a WorkdirError. It returns each run's bench and
    fingerprint. A bench holds the run's workload family, found once. Only the writer
    (process 0) looks at the workdir. The others never touch it.
    """
    benches = validate(config)
    if distributed.is_multiprocess():
        for bench in benches:
            if bench.prepares:
                raise runs.ConfigError(
                    f"model.name {bench.config.model.name!r} trains before it is timed, which "
                    "runs in one process only; unset distributed.* for this run"
                )
    fingerprints = {b.name: results.fingerprint(runs.measurement_view(b.run)) for b in benches}
    if not writer:
        return benches, fingerprints
    results.check_writable(workdir)
    store = results.Store(workdir)
    clashing = store.conflicts(fingerprints)
    if clashing and not config.overwrite:
        raise results.WorkdirError(
            f"workdir {workdir!r} holds runs {clashing} measured under another config or "
            "device; use a new workdir or --config.overwrite=true to archive them"
        )
    return benches, fingerprints


def validate(config: ml_collections.ConfigDict) -> list[workload.Bench]:
    """Every run of `config`, each field checked by the floor that owns it.

    Setup checks its own fields first. Then come the timer's, the claims' and the model
    family's. Last, the mesh is checked against the devices. The first bad field raises a
    ConfigError naming it and its value.
    """
    benches = []
    try:
        for run in runs.expand(config):
            runs.check_fields(run)
            timing.RunTiming.from_config(run.config)
            for claim in run.config.report.claims:
                if claim not in claims.CLAIMS:
                    raise runs.ConfigError(f"report.claims has an unknown claim {claim!r}")
            try:
                bench = workload.Bench(run)
                bench.family.validate(run.config.model)
                if bench.family.validate_run is not None:
                    bench.family.validate_run(run.config)
            except (ValueError, TypeError) as e:
                raise runs.ConfigError(f"{e}{runs.where(run)}") from None
            runs.check_placement(run)
            benches.append(bench)
    except runs.ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise runs.ConfigError(str(e)) from None
    return benches


Terminated = interrupt.Terminated


class PointsFailed(RuntimeError):
    """Some points raised (status "error"). Every output was still written. Exit 1."""


def _terminate(signum, frame):
    """The SIGTERM handler: the process ends within interrupt.GRACE_S, whatever it is doing."""
    del signum, frame
    interrupt.exit_after()
    interrupt.request_termination()


def run(config: ml_collections.ConfigDict, workdir: str) -> list[dict[str, Any]]:
    """Runs the experiment described by `config` into `workdir`; returns the run summaries.

    With several processes (config.distributed), every process calls this with the same
    config. Process 0 writes. The others only take part in the measurements.
    """
    if "serve" in config:
        from batching import serving  # a serving run (configs/serve.py): one process

        return serving.run(config, workdir, validate(config))
    distributed.initialize(config)  # before anything else touches JAX
    writer = distributed.is_writer()
    error, lock = None, None
    try:
        benches, fingerprints = prepare(config, workdir, writer)
    except (runs.ConfigError, results.WorkdirError) as e:
        error = e
    # A process that refused the config must not leave the others waiting for it.
    distributed.agree_on_failure(error)
    distributed.check_same_config(agreement(config, [b.run for b in benches], fingerprints))
    if writer:
        try:
            lock = results.lock_workdir(workdir)
        except results.WorkdirError as e:
            error = e
    distributed.agree_on_failure(error)
    interrupt.clear_termination()
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return _run_locked(config, workdir, benches, fingerprints, writer)
    finally:
        signal.signal(signal.SIGTERM, previous)
        if lock is not None:
            os.close(lock)


# Fields that may differ between processes.
# They say where each host keeps its caches and how it prints.
PER_PROCESS = ("distributed", "compilation_cache_dir", "output")


def agreement(
    config: ml_collections.ConfigDict, all_runs: list[runs.Run], fingerprints: dict[str, str]
) -> dict[str, Any]:
    """What every process must share with process 0, by name.

    distributed.check_same_config compares it.
    """
    rest = {k: v for k, v in config.to_dict().items() if k not in PER_PROCESS}
    rest.get("roofline", {}).pop("peaks_cache_dir", None)
    points = {r.name: [r.batch_sizes, r.config.sweep.shuffle, r.config.seed] for r in all_runs}
    return {"fingerprints": fingerprints, "points": points, "config": rest}


def _run_locked(config, workdir, benches, fingerprints, writer=True) -> list[dict[str, Any]]:
    store = results.Store(workdir)
    if config.compilation_cache_dir:
        enable_compilation_cache(config.compilation_cache_dir)
    if not writer:
        # Another process measures in step with process 0 and writes nothing.
        sweep.run_sweep(benches, fingerprints, store, False, writer=False)
        return []
    if config.overwrite and store.has_outputs():
        logging.info("overwrite: previous outputs moved to %s", store.archive())
    store.write_config(config.to_dict(), fingerprints)
    prepared = prepare_runs(benches, store.workdir)
    try:
        sweep.run_sweep(benches, fingerprints, store, config.output.progress_bar)
    except KeyboardInterrupt:
        logging.warning("interrupted: every finished point is in %s; rerun to resume", workdir)
        raise
    except OSError as e:
        where = e.filename or workdir
        raise results.WorkdirError(
            f"cannot write {where!r}: {e.strerror or e}; the rows already written are intact"
        ) from None
    summaries = finalize(config, benches, fingerprints, store, prepared)
    failed = [
        f"{r['run']}@{r['batch_size']} ({r.get('error_type')}: {r.get('message')})"
        for r in results.latest(store.rows())
        if r.get("status") == "error" and fingerprints.get(r["run"]) == r.get("fingerprint")
    ]
    if failed:
        raise PointsFailed(f"{len(failed)} points failed: " + "; ".join(failed))
    return summaries


def prepare_runs(benches: list[workload.Bench], workdir: str) -> dict[str, dict[str, Any]]:
    """Runs the steps a workload needs before it can be timed, per run.

    Training an MoE decoder is one. The step's curves go to the run's TensorBoard folder.
    """
    done = {}
    for bench in benches:
        if bench.prepares:
            logging.info("preparing run %s", bench.name)
            log = EventLog(workdir, bench.name)
            done[bench.name] = bench.family.prepare(bench.config, bench.name, workdir, log)
    return done


def enable_compilation_cache(path: str) -> None:
    """Turns on JAX's persistent compilation cache in `path`.

    It keeps every executable, however small or quick to compile.
    """
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(path))
    # Cache every executable. The lab's compiles are small, but there are many.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def finalize(
    config: ml_collections.ConfigDict,
    benches: list[workload.Bench],
    fingerprints: dict[str, str],
    store: results.Store,
    prepared: dict[str, dict[str, Any]] | None = None,
    devices: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Writes the analysis, summaries, plots and TensorBoard run summaries.

    It also writes the report and prints the table. `devices` maps run name -> device. It
    stands in for the run's own device. So rows measured elsewhere are analysed here
    (experiments/reanalyze.py).
    """
    stored = store.rows()
    all_rows = results.latest(stored)
    current_all = [r for r in all_rows if fingerprints.get(r["run"]) == r.get("fingerprint")]
    grouped = summary.by_run([r for r in current_all if results.is_ok(r)])
    done = [b for b in benches if b.name in grouped]
    summaries, analyzed_rows = analyze(config, done, grouped, current_all, store, devices)
    for s in summaries:
        if prepared and s["run"] in prepared:
            s.update(summary.training_fields(prepared[s["run"]]))
    if config.roofline.enabled or len(all_rows) < len(stored):
        by_key = {(r["run"], r["batch_size"]): r for r in analyzed_rows}
        store.rewrite_rows([by_key.get((r["run"], r["batch_size"]), r) for r in all_rows])
    here = {r.get("device_kind") for r in analyzed_rows}
    archived = archive.load(
        config.report.get("archive_dir", ""),
        config.name,
        exclude_device_kind=here.pop() if len(here) == 1 else None,
    )
    images = {}
    if config.output.plots and analyzed_rows:
        figures = plots.all_figures(config.name, analyzed_rows, current_all, summaries, archived)
        images = plots.save_all(figures, store.path("plots"))
    hparams.write_runs(store.workdir, [b.run for b in done], summaries, analyzed_rows, images)
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
    done: list[workload.Bench],
    grouped: dict[str, list[dict[str, Any]]],
    current_all: list[dict[str, Any]],
    store: results.Store,
    devices: dict[str, Any] | None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Each measured run's summary, and its rows with their analysis.

    A summary holds the run's ends, memory wall and roofline fields. The peaks used go to
    the workdir's device_peaks.json.
    """
    all_samples = store.pass_samples()
    peak_source = rates.RateSource(
        config.roofline.peaks_cache_dir,
        config.roofline.refresh_peaks,
        config.roofline.get("peaks_file"),
        config.roofline.get("check_peaks", True),
    )
    summaries, analyzed_rows, used_peaks = [], [], {}
    for bench in done:
        rows = grouped[bench.name]
        s = summary.run_summary(rows)
        s.update(summary.memory_summary([r for r in current_all if r["run"] == bench.name]))
        s["whatif_max_batch"] = summary.whatif_max_batch(s, bench.config.roofline.whatif_devices)
        if config.roofline.enabled:
            device = devices[bench.name] if devices else bench.topology().device
            # Each point's samples per sweep pass.
            samples = {
                b: [np.asarray(p) for p in all_samples[(bench.name, b)]]
                for b in (r["batch_size"] for r in rows)
                if (bench.name, b) in all_samples
            }
            rows, roof = analyze_run(bench, rows, samples, device, peak_source)
            s.update(roof)
            if "not_analysed" not in roof:
                used_peaks[f"{device.platform}:{device.device_kind}"] = peak_source.entry(device)
        s.update(summary.timing_summary(rows, bench.config.timing))
        summaries.append(s)
        analyzed_rows.extend(rows)
    if used_peaks:
        store.write_peaks(used_peaks)
    return summaries, analyzed_rows


def analyze_run(bench, rows, samples, device, peak_source):
    """One run's rows and summary fields from the roofline analysis.

    `peak_source` measures its rates on `device`. A peaks file without this device leaves
    the run unanalysed.
    """
    budget = rates.microbenchmark_budget(bench.config.roofline, device.platform)
    peak_source.start_run(budget)
    try:
        # The family's attention over its KV cache.
        # So the attention microbenchmark times what the model runs.
        return analysis.analyze_run(
            rows, samples, device, bench.config.roofline, peak_source, bench.attend,
            bench.config.timing.get("confidence", stats.CONFIDENCE),
        )  # fmt: skip
    except rates.NoPeaks as e:  # a peaks file without this run's device
        logging.warning("run %s is not analysed: %s", bench.name, e)
        return rows, {"not_analysed": str(e)}


def closing_line(store: results.Store, rows: list[dict[str, Any]]) -> str:
    """The closing line: the report, TensorBoard, and the points not ok.

    It says where the report is and how to open TensorBoard. It counts the points that were
    not ok, and why.
    """
    line = f"report: {store.path('report.md')} | tensorboard --logdir {store.path('tb')}"
    ok = [r for r in rows if results.is_ok(r)]
    converged = sum(bool(r.get("converged", True)) for r in ok)
    line += f" | {converged} of {len(ok)} measured points converged"
    if converged < len(ok):
        line += (
            " (the others ran out of the run's budget or passes; the report's Timing section "
            "says what precision this machine allowed)"
        )
    why = collections.Counter(r["status"] for r in rows if not results.is_ok(r))
    if why:
        counts = ", ".join(f"{n} {status}" for status, n in sorted(why.items()))
        line += f" | {sum(why.values())} of {len(rows)} points not ok: {counts}"
    return line
