"""What TensorBoard shows per run beside its points.

- The run's hparams: every model and training field, and where it ran.
- Its final numbers, as the HParams tab's metrics.
- Its figures.
- The analysis' per-point curves: predicted, fitted and traced.
"""

import math
from typing import Any

import numpy as np

from batching.outputs.tensorboard import write_experiment_config, write_run_summary
from batching.setup import runs


def write_runs(
    workdir: str,
    done: list[runs.Run],
    summaries: list[dict[str, Any]],
    analyzed_rows: list[dict[str, Any]],
    images: dict[str, np.ndarray],
) -> None:
    """Writes each run's TensorBoard summary, then the experiment's one HParams config.

    A run's summary holds its config, hparams, metrics, figures and derived per-point
    scalars. Per-run figures (fit, what-if, breakdown) go only to their own run.
    """
    for run, s in zip(done, summaries, strict=True):
        per_run = ("fit", "whatif", "breakdown")
        others = {f"{kind}_{r.name}" for r in done if r is not run for kind in per_run}
        own = {name: image for name, image in images.items() if name not in others}
        write_run_summary(
            workdir,
            run.name,
            config=run.config.to_dict(),
            hparams=hparams(run, s),
            metrics=metrics(s),
            images={f"plots/{name}": image for name, image in own.items()},
            point_scalars=derived_point_scalars([r for r in analyzed_rows if r["run"] == run.name]),
        )
    if done:
        write_experiment_config(
            workdir,
            {run.name: hparams(run, s) for run, s in zip(done, summaries, strict=True)},
            sorted({tag for s in summaries for tag in metrics(s)}),
        )


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
    "heldout_max_vio_global": ("hparams/heldout_max_vio_global", 1.0),
    "max_vio_batch_first": ("hparams/max_vio_first_batch", 1.0),
    "max_vio_batch_last": ("hparams/max_vio_last_batch", 1.0),
    "cross_seq_leak_fraction_max": ("hparams/cross_seq_leak_fraction_max", 1.0),
    "drop_fraction_first": ("hparams/drop_fraction_first_batch", 1.0),
    "drop_fraction_last": ("hparams/drop_fraction_last_batch", 1.0),
    "max_mean_load_first": ("hparams/max_mean_load_first_batch", 1.0),
    "max_mean_load_last": ("hparams/max_mean_load_last_batch", 1.0),
    "load_cv_first": ("hparams/load_cv_first_batch", 1.0),
    "load_cv_last": ("hparams/load_cv_last_batch", 1.0),
}


def metrics(s: dict[str, Any]) -> dict[str, float]:
    """The run's final numbers as hparams metrics, by tag.

    METRICS maps a summary field to its tag and scale. The HParams tab reads these tags.
    Fields the summary lacks or holds as None are left out.
    """
    return {
        tag: s[field] * scale for field, (tag, scale) in METRICS.items() if s.get(field) is not None
    }


def derived_point_scalars(rows: list[dict[str, Any]]) -> dict[str, dict[int, float]]:
    """Per-point curves from the analysed rows: {tag: {batch size: ms}}.

    Points get their predicted and fitted latency and predicted comm time, where finite.
    Profiled points add the traced call's latency. They also add the traced and predicted
    ms per op kind. The step is the batch size.
    """
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
    """Run-level hyperparameters: every model and training field, and where the run ran."""
    hp = {f"model.{k}": v for k, v in run.config.model.to_dict().items()}
    if "train" in run.config:
        hp.update({f"train.{k}": v for k, v in run.config.train.to_dict().items()})
    hp.update(
        run=run.name,
        # Seeds of one setting (train.seeds) share `setting`: the HParams tab groups by it.
        setting=run.setting or run.name,
        seed=run.config.get("seed"),
        platform=s["platform"],
        device_kind=s["device_kind"],
        params=s["params"],
        batch_min=min(s["batch_sizes"]),
        batch_max=max(s["batch_sizes"]),
    )
    return hp
