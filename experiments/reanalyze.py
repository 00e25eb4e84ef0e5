"""Analyse a workdir measured elsewhere (a rented GPU, a colleague's machine) here, with the
peaks measured there, and write its summary, report, plots and TensorBoard run summaries anew.

    python -m experiments.reanalyze --workdir=runs/h200_mlp
    python -m experiments.reanalyze --workdir=experiments/results/nvidia-h200/mlp_article \\
        --peaks_file=experiments/results/nvidia-h200/device_peaks.json

The rows (`results.jsonl`, or `results.jsonl.gz` as committed), `samples.jsonl` where kept,
and the run's config (`config.json`) are read back; nothing is timed. The device is the
rows' own (platform and kind); the peaks come from `--peaks_file` (default: the workdir's own
`device_peaks.json`, which every analysed run writes), and per-shape rates missing from it are
interpolated between the shapes it has, or priced at the peak, never measured on this machine
(the report's Device line names the file). Outputs go to `--out` (default: the workdir
itself); a workdir whose rows were gzipped keeps them gzipped.
"""

import gzip
import json
import os
import shutil

import ml_collections
from absl import app, flags

from batching import app as lab
from batching.measure import rates
from batching.outputs import results
from batching.setup import runs
from batching.workloads import registry

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "The workdir to analyse (its rows and config.json).")
flags.DEFINE_string("peaks_file", None, "Device peaks (default: <workdir>/device_peaks.json).")
flags.DEFINE_string("out", None, "Where the outputs go (default: the workdir).")
flags.mark_flag_as_required("workdir")


def _copy_inputs(workdir: str, out: str) -> bool:
    """The rows, samples and config in `out`, plain; True if the rows were gzipped."""
    os.makedirs(out, exist_ok=True)
    gz = os.path.join(workdir, results.RESULTS + ".gz")
    zipped = not os.path.exists(os.path.join(workdir, results.RESULTS)) and os.path.exists(gz)
    if zipped:
        with gzip.open(gz, "rb") as src, open(os.path.join(out, results.RESULTS), "wb") as dst:
            shutil.copyfileobj(src, dst)
    for name in (results.RESULTS, results.SAMPLES, results.CONFIG):
        src = os.path.join(workdir, name)
        if os.path.exists(src) and os.path.abspath(src) != os.path.abspath(os.path.join(out, name)):
            shutil.copy(src, os.path.join(out, name))
    return zipped


def reanalyze(
    workdir: str, peaks_file: str | None = None, out: str | None = None, plots: bool = True
) -> list[dict]:
    """Runs the lab's analysis and outputs on a finished workdir; returns the run summaries."""
    out = out or workdir
    peaks_file = peaks_file or os.path.join(workdir, results.PEAKS)
    if not os.path.exists(os.path.join(workdir, results.CONFIG)):
        raise ValueError(f"workdir {workdir!r} has no {results.CONFIG}")
    if not os.path.exists(peaks_file):
        raise ValueError(f"peaks file not found: {peaks_file!r} (pass --peaks_file)")
    zipped = _copy_inputs(workdir, out)
    store = results.Store(out)
    with open(store.path(results.CONFIG)) as f:
        stored = json.load(f)
    config = ml_collections.ConfigDict(stored["config"])
    with config.unlocked():
        config.roofline.peaks_file = os.path.abspath(peaks_file)
        config.output.progress_bar = False
        config.output.plots = plots
    all_runs = runs.expand(config)
    rows = results.latest(store.rows())
    devices = {}
    for r in rows:
        devices.setdefault(r["run"], rates.DeviceRef(r["platform"], r["device_kind"]))
    measured = [registry.Bench(run) for run in all_runs if run.name in devices]
    summaries = lab.finalize(config, measured, stored["fingerprints"], store, devices=devices)
    if zipped:
        plain = store.path(results.RESULTS)
        with open(plain, "rb") as src, gzip.open(plain + ".gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.remove(plain)
    return summaries


def main(argv):
    del argv
    try:
        reanalyze(FLAGS.workdir, FLAGS.peaks_file, FLAGS.out)
    except ValueError as e:
        raise app.UsageError(str(e)) from None


if __name__ == "__main__":
    app.run(main)
