"""The lab's figure style and how figures become files and TensorBoard images."""

import os
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402


def finish(
    fig: plt.Figure,
    ax: plt.Axes,
    xlabel: str,
    ylabel: str,
    title: str,
    xbase: int = 10,
    ybase: int = 10,
    ncol: int = 1,
    linear: str = "",
) -> plt.Figure:
    """Applies the lab's figure style to `ax` and returns `fig`.

    The axes are log-log, with bases `xbase` and `ybase`. `linear` names the linear axes:
    "x", "y" or "xy". The style adds labels, a light grid and a small legend.
    """
    ax.set_xscale("linear") if "x" in linear else ax.set_xscale("log", base=xbase)
    ax.set_yscale("linear") if "y" in linear else ax.set_yscale("log", base=ybase)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small", ncol=ncol)
    fig.tight_layout()
    return fig


def mark_unconverged(ax: plt.Axes, rows: list[dict[str, Any]], y: np.ndarray, color) -> None:
    """Draws a hollow ring over each point whose interval missed the precision target.

    Such a row has `converged` false: the run's budget or passes ran out first. The ring
    asks a reader to weigh the point less. `y` holds the plotted values, one per row.
    """
    idx = [i for i, r in enumerate(rows) if not r.get("converged", True)]
    if idx:
        b = np.array([rows[i]["batch_size"] for i in idx])
        ax.plot(b, y[idx], "o", mfc="white", mec=color, ms=7, mew=1.5, zorder=5)


def to_image(fig: plt.Figure) -> np.ndarray:
    """The figure's pixels as an HxWx3 uint8 RGB array, for TensorBoard."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def save_all(figures: dict[str, plt.Figure], plots_dir: str) -> dict[str, np.ndarray]:
    """Saves each figure as <plots_dir>/<name>.png, closes it, returns the images by name.

    Each figure is drawn only once. The PNG holds the same pixels as the TensorBoard image.
    savefig would draw each figure a second time. That second draw would be most of a cold
    start's plotting time.
    """
    os.makedirs(plots_dir, exist_ok=True)
    images = {}
    for name, fig in figures.items():
        images[name] = to_image(fig)
        # A palette of 32 colours holds a line plot's pixels: a quarter of the RGB file's
        # size, which matters for the sweeps committed under experiments/results.
        png = Image.fromarray(images[name]).convert("P", palette=Image.ADAPTIVE, colors=32)
        png.save(os.path.join(plots_dir, f"{name}.png"), optimize=True)
        plt.close(fig)
    return images
