"""TensorBoard output, the lab's one writer.

Each run has its own event directory, <workdir>/tb/<run>. Each kind of event has its own
file there, told apart by its suffix.

- `.points`: the point scalars, with step = batch size. The file is rewritten in batch
  order as points are measured.
- `.run_summary`: the run-level summaries. They are the config as text, hparams, plots
  and summary scalars. Every rerun replaces them, so a resumed sweep never shows them twice.
- `.train`: a workload's own curves, such as training, written through an `EventLog`. When
  a rerun starts a new file, the earlier one moves to <workdir>/archive/.

The experiment's one HParams config lies in <workdir>/tb itself (`.hparams_experiment`).
"""

import glob
import json
import os
import shutil
import tempfile
import time
from typing import Any

import numpy as np
import tensorboardX
from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2
from tensorboardX import summary as tbx_summary
from tensorboardX.proto import summary_pb2 as tbx_summary_pb2

from batching import rows

RUN_SUMMARY_SUFFIX = ".run_summary"
EXPERIMENT_SUFFIX = ".hparams_experiment"

# Row field -> (tag, scale) of the scalars written per point.
POINT_SCALARS = {
    "latency_s": ("latency/ms", 1e3),
    "latency_p10_s": ("latency/p10_ms", 1e3),
    "latency_p90_s": ("latency/p90_ms", 1e3),
    "latency_min_s": ("latency/min_ms", 1e3),
    "per_example_s": ("latency/per_example_us", 1e6),
    "throughput_per_s": ("throughput/examples_per_s", 1.0),
    "achieved_flops_per_s": ("achieved/gflops_per_s", 1e-9),
    "achieved_bytes_per_s": ("achieved/gbytes_per_s", 1e-9),
    "compile_s": ("compile/seconds", 1.0),
    "n_runs": ("timing/n_runs", 1.0),
    # The point's interval (passes and drift), the passes' own spread and count.
    "latency_ci_low_s": ("latency/ci_low_ms", 1e3),
    "latency_ci_high_s": ("latency/ci_high_ms", 1e3),
    "pass_cv": ("timing/pass_cv", 1.0),
    "passes_done": ("timing/passes", 1.0),
}


def run_dir(workdir: str, run: str) -> str:
    """The run's event directory, <workdir>/tb/<run>."""
    return os.path.join(workdir, "tb", run)


POINTS_SUFFIX = ".points"
TRAIN_SUFFIX = ".train"
# Event files of the run's folder the point writer leaves alone (run summary, training curves).
OTHER_SUFFIXES = (RUN_SUMMARY_SUFFIX, TRAIN_SUFFIX)


class EventLog:
    """A run's own event file of one kind: scalars, histograms and text.

    `suffix` names the kind; the default is training curves. The file opens on the first
    write. So a run that fails validation writes nothing. Opening it moves an earlier file
    of the same kind to <workdir>/archive/<time>/. So a rerun starts clean curves, and
    nothing is deleted.
    """

    def __init__(self, workdir: str, run: str, suffix: str = TRAIN_SUFFIX):
        self.workdir, self.logdir, self.suffix = workdir, run_dir(workdir, run), suffix
        self._writer: tensorboardX.SummaryWriter | None = None

    def _open(self) -> tensorboardX.SummaryWriter:
        if self._writer is None:
            os.makedirs(self.logdir, exist_ok=True)
            self._archive_old_events()
            self._writer = tensorboardX.SummaryWriter(
                logdir=self.logdir, filename_suffix=self.suffix, flush_secs=10
            )
        return self._writer

    def _archive_old_events(self) -> None:
        old = [f for f in os.listdir(self.logdir) if f.endswith(self.suffix)]
        if not old:
            return
        rel = os.path.relpath(self.logdir, self.workdir)
        dest = os.path.join(self.workdir, "archive", time.strftime("%Y%m%d-%H%M%S"), rel)
        os.makedirs(dest, exist_ok=True)
        for name in old:
            shutil.move(os.path.join(self.logdir, name), os.path.join(dest, name))

    def scalar(self, tag: str, value: float, step: int) -> None:
        """One scalar at `step`."""
        self._open().add_scalar(tag, value, step)

    def histogram(self, tag: str, values: np.ndarray, step: int) -> None:
        """One histogram of `values` at `step`."""
        self._open().add_histogram(tag, values, step)

    def text(self, tag: str, text: str, step: int) -> None:
        """Markdown text at `step`."""
        self._open().add_text(tag, text, step)

    def close(self) -> None:
        """Flushes and closes the file, if one was opened."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class PointWriter:
    """One run's per-point scalars (step = batch size), every point in batch order.

    A sweep visits its batch sizes shuffled. But TensorBoard takes a step that goes back for
    a restart. It then drops the points after it. So each write replaces the run's points
    file. The new file holds every point measured so far, sorted by batch size. So at any
    moment the file holds every point in order. This holds after an interrupt, a resume, or
    a run extended with more batch sizes. The write removes the folder's other point files.
    It leaves the run summary and the training curves alone.
    """

    def __init__(self, workdir: str, run: str):
        self.logdir = run_dir(workdir, run)

    def write(self, rows: list[dict[str, Any]]) -> None:
        """Replaces the points file with `rows`, the run's ok rows, sorted by batch size.

        The new file is written in a scratch folder, then moved in.
        """
        os.makedirs(self.logdir, exist_ok=True)
        scratch = tempfile.mkdtemp(prefix=".points-", dir=self.logdir)
        try:
            writer = tensorboardX.SummaryWriter(logdir=scratch, filename_suffix=POINTS_SUFFIX)
            for row in sorted(rows, key=lambda r: int(r["batch_size"])):
                _point_scalars(writer, row)
            writer.close()
            (made,) = glob.glob(os.path.join(scratch, "*tfevents*"))
            for old in self._point_files():
                os.remove(old)
            os.replace(made, os.path.join(self.logdir, os.path.basename(made)))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def _point_files(self) -> list[str]:
        return [
            path
            for path in glob.glob(os.path.join(self.logdir, "*tfevents*"))
            if os.path.isfile(path) and not path.endswith(OTHER_SUFFIXES)
        ]

    def close(self) -> None:
        """Nothing stays open between writes."""


# The router's statistics a point's row carries (the schema's "router" group).
ROUTER_SCALARS = rows.names("router")


def _point_scalars(writer: tensorboardX.SummaryWriter, row: dict[str, Any]) -> None:
    step = int(row["batch_size"])
    for field, (tag, scale) in POINT_SCALARS.items():
        value = row.get(field)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            writer.add_scalar(tag, value * scale, step)
    # 1 where the passes' interval met the precision target, 0 where it did not.
    if "converged" in row:
        writer.add_scalar("timing/converged", float(bool(row["converged"])), step)
    for field, value in row.items():
        if field in ROUTER_SCALARS or (field.startswith("layer_") and "/" in field):
            writer.add_scalar(f"moe/{field}", value, step)
    for field in ("tokens_per_expert", "experts_per_token"):
        if row.get(field) is not None:
            writer.add_histogram(f"moe/{field}", np.asarray(row[field]), step)


def _hparam_value(value: Any) -> Any:
    if isinstance(value, (bool, int, float, str)):
        return value
    return json.dumps(value, default=str)


def write_run_summary(
    workdir: str,
    run: str,
    config: dict[str, Any],
    hparams: dict[str, Any],
    metrics: dict[str, float],
    images: dict[str, np.ndarray],
    histograms: dict[str, np.ndarray] | None = None,
    point_scalars: dict[str, dict[int, float]] | None = None,
) -> None:
    """Writes the run's config text, hparams, final metrics and images, replacing older ones.

    The hparams summaries go into the run's own event file. tensorboardX's add_hparams
    would make a separate timestamped run instead. So the HParams tab lists one row per
    run. It reads `metrics` from the scalars of the same tags. `point_scalars` adds curves
    as {tag: {step: value}}, and `histograms` adds histograms at step 0.
    """
    logdir = run_dir(workdir, run)
    for old in glob.glob(os.path.join(logdir, f"*{RUN_SUMMARY_SUFFIX}")):
        os.remove(old)
    writer = tensorboardX.SummaryWriter(logdir=logdir, filename_suffix=RUN_SUMMARY_SUFFIX)
    try:
        text = "```\n" + json.dumps(config, indent=2, sort_keys=True, default=str) + "\n```"
        writer.add_text("config", text, 0)
        clean_metrics = {k: float(v) for k, v in metrics.items() if _finite(v)}
        # The experiment summary tensorboardX makes here would describe this run alone;
        # write_experiment_config writes the one for all runs.
        _, ssi, sei = tbx_summary.hparams(
            {k: _hparam_value(v) for k, v in hparams.items()}, clean_metrics
        )
        file_writer = writer._get_file_writer()
        for s in (ssi, sei):
            file_writer.add_summary(s)
        for tag, value in clean_metrics.items():
            writer.add_scalar(tag, value, 0)
        for tag, image_HxWxC in images.items():
            writer.add_image(tag, image_HxWxC, 0, dataformats="HWC")
        for tag, by_step in (point_scalars or {}).items():
            for step, value in sorted(by_step.items()):
                writer.add_scalar(tag, value, step)
        for tag, values in (histograms or {}).items():
            writer.add_histogram(tag, np.asarray(values), 0)
    finally:
        writer.close()


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)


def hparam_infos(hparams_by_run: dict[str, dict[str, Any]]) -> list[api_pb2.HParamInfo]:
    """One HParamInfo per hparam, with its domain over the runs and whether it differs.

    - Strings and bools get the discrete set of values the runs took.
    - Numbers from the config (model.*, train.*: the ablated axes) get that set too.
    - Other numbers (params, batch_min, ...) get an interval.

    Any other value counts as its JSON string.
    """
    infos = []
    for name in sorted({k for hp in hparams_by_run.values() for k in hp}):
        values = [_hparam_value(hp[name]) for hp in hparams_by_run.values() if name in hp]
        distinct = sorted(set(values), key=repr)
        info = api_pb2.HParamInfo(name=name, differs=len(distinct) > 1)
        if all(isinstance(v, bool) for v in values):
            info.type = api_pb2.DATA_TYPE_BOOL
            info.domain_discrete.extend(distinct)
        elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            info.type = api_pb2.DATA_TYPE_FLOAT64
            if name.startswith(("model.", "train.")):
                info.domain_discrete.extend(sorted(float(v) for v in distinct))
            else:
                info.domain_interval.min_value = float(min(values))
                info.domain_interval.max_value = float(max(values))
        else:
            info.type = api_pb2.DATA_TYPE_STRING
            info.domain_discrete.extend(sorted({str(v) for v in values}))
        infos.append(info)
    return infos


def write_experiment_config(
    workdir: str, hparams_by_run: dict[str, dict[str, Any]], metric_tags: list[str]
) -> None:
    """Writes the experiment's one HParams config into <workdir>/tb, replacing an older one.

    Each hparam carries its domain across `hparams_by_run` and its `differs` flag (see
    hparam_infos). So the HParams tab offers a filter per value. It also lists the differing
    columns first. The metrics are the run-level scalar tags that write_run_summary writes.
    TensorBoard reads them per run.
    """
    logdir = os.path.join(workdir, "tb")
    for old in glob.glob(os.path.join(logdir, f"*{EXPERIMENT_SUFFIX}")):
        os.remove(old)
    metric_infos = [api_pb2.MetricInfo(name=api_pb2.MetricName(tag=t)) for t in metric_tags]
    experiment = api_pb2.Experiment(
        hparam_infos=hparam_infos(hparams_by_run), metric_infos=metric_infos
    )
    # What tensorboard.plugins.hparams.summary.experiment_pb builds (that module needs
    # TensorFlow), in tensorboardX's Summary proto.
    content = plugin_data_pb2.HParamsPluginData(
        experiment=experiment, version=metadata.PLUGIN_DATA_VERSION
    )
    meta = tbx_summary_pb2.SummaryMetadata(
        plugin_data=tbx_summary_pb2.SummaryMetadata.PluginData(
            plugin_name=metadata.PLUGIN_NAME, content=content.SerializeToString()
        )
    )
    summary = tbx_summary_pb2.Summary(
        value=[tbx_summary_pb2.Summary.Value(tag=metadata.EXPERIMENT_TAG, metadata=meta)]
    )
    writer = tensorboardX.SummaryWriter(logdir=logdir, filename_suffix=EXPERIMENT_SUFFIX)
    try:
        writer._get_file_writer().add_summary(summary)
    finally:
        writer.close()
