"""A serving run's outputs: the frontier's figures, TensorBoard, and report.md/html.

The report's sentences compare two values only where their intervals part. A p90 carries
its order-statistics interval (batching.serve.metrics). A capacity spans the bisection's
last met and failed rates. Where intervals overlap, the report says the run cannot tell.
"""

import os
from typing import Any

import numpy as np

from batching.outputs import plot_style
from batching.outputs.plot_style import finish, plt
from batching.outputs.tensorboard import write_run_summary

# Per-rate scalars in TensorBoard, tagged serving/<policy>/<field>.
SCALARS = ("ttft_p90_s", "tpot_p90_s", "output_throughput_per_s", "goodput_per_s",
           "mean_occupancy", "simulated_ttft_p90_s", "simulated_tpot_p90_s")  # fmt: skip
# The simulator's errors the report shows, per metric.
COMPARED = ("ttft_p50_s", "ttft_p90_s", "tpot_p50_s", "tpot_p90_s")


def by_policy(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The rows of each policy, by rising request rate."""
    out: dict[str, list[dict[str, Any]]] = {}
    for r in sorted(rows, key=lambda r: r["request_rate"]):
        out.setdefault(r["policy"], []).append(r)
    return out


def frontier_figure(rows: list[dict[str, Any]]) -> plt.Figure:
    """Output tokens/s against p90 TPOT and p90 TTFT, one line per policy, SLOs dashed."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for policy, rs in by_policy(rows).items():
        tok = np.array([r["output_throughput_per_s"] for r in rs])
        for ax, name in zip(axes, ("tpot", "ttft"), strict=True):
            x = np.array([r[f"{name}_p90_s"] for r in rs])
            low = np.array([r.get(f"{name}_p90_low_s", v) for r, v in zip(rs, x, strict=True)])
            high = np.array([r.get(f"{name}_p90_high_s", v) for r, v in zip(rs, x, strict=True)])
            ax.errorbar(x, tok, xerr=[x - low, high - x], marker="o", capsize=2, label=policy)
            sim = [r.get(f"simulated_{name}_p90_s") for r in rs]
            if all(v is not None for v in sim):
                ax.plot(sim, tok, ":", marker="x", label=f"{policy}, simulated")
    slo = rows[0]
    for ax, name, title in zip(axes, ("tpot", "ttft"), ("TPOT", "TTFT"), strict=True):
        ax.axvline(slo[f"slo_{name}_s"], color="gray", ls="--", label=f"{title} SLO")
        finish(fig, ax, f"p90 {title} (s)", "output tokens/s", f"Frontier: tokens/s vs p90 {title}")
    return fig


def occupancy_figure(rows: list[dict[str, Any]]) -> plt.Figure:
    """p90 TPOT against the mean busy slots, per policy: where serving stops being free."""
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for policy, rs in by_policy(rows).items():
        occ = [r["mean_occupancy"] for r in rs]
        y = np.array([r["tpot_p90_s"] for r in rs])
        low = np.array([r.get("tpot_p90_low_s", v) for r, v in zip(rs, y, strict=True)])
        high = np.array([r.get("tpot_p90_high_s", v) for r, v in zip(rs, y, strict=True)])
        ax.errorbar(occ, y, yerr=[y - low, high - y], marker="o", capsize=2, label=policy)
    return finish(fig, ax, "mean busy slots", "p90 TPOT (s)", "TPOT against occupancy",
                  linear="x")  # fmt: skip


def figures(rows: list[dict[str, Any]]) -> dict[str, plt.Figure]:
    """The serving run's figures by name."""
    return {"serving_frontier": frontier_figure(rows), "serving_occupancy": occupancy_figure(rows)}


def write_tensorboard(workdir, run, config, rows, calibrations, images) -> None:
    """The run's config, hparams, capacities, per-rate curves and the figures.

    A curve's step is its request rate in milli-requests/s, so TensorBoard's x-axis reads
    as the rate.
    """
    scalars: dict[str, dict[int, float]] = {}
    for r in rows:
        step = int(round(r["request_rate"] * 1000))
        for name in SCALARS:
            if r.get(name) is not None:
                scalars.setdefault(f"serving/{r['policy']}/{name}", {})[step] = r[name]
    metrics = {f"serving/{p}/capacity_per_s": c["capacity_per_s"] for p, c in calibrations.items()}
    serve = config.get("serve", {})
    hparams = {k: serve[k] for k in ("slots", "max_len", "slo_ttft_s", "slo_tpot_s") if k in serve}
    hparams.update({f"model.{k}": v for k, v in config.get("model", {}).items()
                    if isinstance(v, int | float | str)})  # fmt: skip
    images = {f"plots/{name}": image for name, image in images.items()}
    write_run_summary(workdir, run, config, hparams, metrics, images, point_scalars=scalars)


def save_figures(rows, plots_dir: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Saves the figures; their images (for TensorBoard) and PNG paths, by name."""
    images = plot_style.save_all(figures(rows), plots_dir)
    return images, {name: os.path.join(plots_dir, f"{name}.png") for name in images}
