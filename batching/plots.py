"""Figures of a sweep: every run of an experiment overlaid in one figure per quantity."""

import os
from collections import defaultdict
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

# Figure name -> (row field, y label, scale).
CURVES = {
    "latency": ("latency_s", "latency (ms, median, p10-p90 bars)", 1e3),
    "throughput": ("throughput_per_s", "throughput (examples/s)", 1.0),
    "per_example": ("per_example_s", "latency per example (µs)", 1e6),
}


def by_run(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    runs = defaultdict(list)
    for row in rows:
        runs[row["run"]].append(row)
    return {run: sorted(rs, key=lambda r: r["batch_size"]) for run, rs in runs.items()}


def curve_figure(rows: list[dict[str, Any]], name: str, title: str) -> plt.Figure:
    field, ylabel, scale = CURVES[name]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for run, rs in by_run(rows).items():
        b = np.array([r["batch_size"] for r in rs])
        y = np.array([r[field] for r in rs]) * scale
        if name == "latency":
            lo = np.array([r["latency_p10_s"] for r in rs]) * scale
            hi = np.array([r["latency_p90_s"] for r in rs]) * scale
            ax.errorbar(b, y, yerr=[y - lo, hi - y], marker="o", ms=3, capsize=2, label=run)
        else:
            ax.plot(b, y, marker="o", ms=3, label=run)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small", ncol=2)
    fig.tight_layout()
    return fig


def to_image(fig: plt.Figure) -> np.ndarray:
    """The figure as an HxWx3 uint8 array (for TensorBoard)."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def save_all(figures: dict[str, plt.Figure], plots_dir: str) -> dict[str, np.ndarray]:
    """Saves each figure as <plots_dir>/<name>.png, closes it, returns the images by name."""
    os.makedirs(plots_dir, exist_ok=True)
    images = {}
    for name, fig in figures.items():
        fig.savefig(os.path.join(plots_dir, f"{name}.png"))
        images[name] = to_image(fig)
        plt.close(fig)
    return images


def sweep_figures(rows: list[dict[str, Any]], experiment: str) -> dict[str, plt.Figure]:
    return {name: curve_figure(rows, name, f"{experiment}: {name}") for name in CURVES}
