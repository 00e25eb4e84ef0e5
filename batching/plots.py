"""Figures of a sweep: every run of an experiment overlaid in one figure per quantity."""

import os
from collections import defaultdict
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

# Figure name -> (row field, y label, scale).
CURVES = {
    "latency": ("latency_s", "latency (ms, median, p10-p90 bars)", 1e3),
    "throughput": ("throughput_per_s", "throughput (examples/s)", 1.0),
    "per_example": ("per_example_s", "latency per example (µs)", 1e6),
}


def _finish(
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
    """The lab's figure style: log-log axes (`linear` names those that are not: "x", "y",
    "xy"), labels, a light grid, a small legend."""
    ax.set_xscale("linear") if "x" in linear else ax.set_xscale("log", base=xbase)
    ax.set_yscale("linear") if "y" in linear else ax.set_yscale("log", base=ybase)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small", ncol=ncol)
    fig.tight_layout()
    return fig


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
            line = ax.errorbar(b, y, yerr=[y - lo, hi - y], marker="o", ms=3, capsize=2, label=run)
            color = line.lines[0].get_color()
        else:
            color = ax.plot(b, y, marker="o", ms=3, label=run)[0].get_color()
        mark_unconverged(ax, rs, y, color)
    if any(not r.get("converged", True) for r in rows):
        ax.plot([], [], "o", mfc="white", mec="k", ms=7, label="stopped on its budget")
    return _finish(fig, ax, "batch size", ylabel, title, xbase=2, ncol=2)


def mark_unconverged(ax: plt.Axes, rows: list[dict[str, Any]], y: np.ndarray, color) -> None:
    """A hollow ring over each point whose median missed the precision target (converged
    false: the timer stopped on its budget), so a reader weighs it less."""
    idx = [i for i, r in enumerate(rows) if not r.get("converged", True)]
    if idx:
        b = np.array([rows[i]["batch_size"] for i in idx])
        ax.plot(b, y[idx], "o", mfc="white", mec=color, ms=7, mew=1.5, zorder=5)


def to_image(fig: plt.Figure) -> np.ndarray:
    """The figure as an HxWx3 uint8 array (for TensorBoard)."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def save_all(figures: dict[str, plt.Figure], plots_dir: str) -> dict[str, np.ndarray]:
    """Saves each figure as <plots_dir>/<name>.png, closes it, returns the images by name.

    Each figure is drawn once: the PNG is the same pixels as the TensorBoard image (savefig
    would draw it a second time, ~0.1 s a figure, most of a cold start's plotting).
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


def sweep_figures(rows: list[dict[str, Any]], experiment: str) -> dict[str, plt.Figure]:
    return {name: curve_figure(rows, name, f"{experiment}: {name}") for name in CURVES}


def fit_figure(rows: list[dict[str, Any]], s: dict[str, Any]) -> plt.Figure:
    """Measured latency with the a-priori prediction, the fit, the knee and the predicted B*."""
    rows = sorted(rows, key=lambda r: r["batch_size"])
    b = np.array([r["batch_size"] for r in rows])
    ms = lambda field: np.array([r[field] for r in rows]) * 1e3
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    y, lo, hi = ms("latency_s"), ms("latency_p10_s"), ms("latency_p90_s")
    ax.errorbar(b, y, yerr=[y - lo, hi - y], fmt="o", ms=4, capsize=2, label="measured (median)")
    mark_unconverged(ax, rows, y, "C0")
    if any(not r.get("converged", True) for r in rows):
        ax.plot([], [], "o", mfc="white", mec="C0", ms=7, label="stopped on its budget")
    label = "predicted a priori" + (" (GEMMs at their shapes)" if s.get("shape_aware") else "")
    ax.plot(b, ms("predicted_latency_s"), "--", label=label)
    ax.plot(b, ms("predicted_peak_latency_s"), ":", label="predicted with square-matmul peak")
    ax.plot(b, ms("fitted_latency_s"), "-", color="C2", alpha=0.7, label="fitted three-limit model")
    knee = s["knee_batch_size"]
    if np.isfinite(knee):
        ax.axvline(knee, color="C3", lw=1, label=f"fitted knee {knee:.3g}")
        ax.axvspan(
            max(s["knee_low"], b.min() / 2), min(s["knee_high"], b.max() * 2), color="C3", alpha=0.1
        )
    ax.axvline(
        s["predicted_critical_batch"],
        color="k",
        lw=1,
        ls="-.",
        label=f"predicted B* {s['predicted_critical_batch']:.3g}",
    )
    draw_wall(ax, s)
    return _finish(
        fig, ax, "batch size", "latency (ms)", f"{s['run']} on {s['device_kind']}", xbase=2
    )


def draw_wall(ax: plt.Axes, s: dict[str, Any]) -> None:
    """The memory wall: the first batch that hit OOM here, shaded from there on."""
    wall = s.get("first_oom_batch")
    if wall:
        ax.axvline(wall, color="C1", lw=2, label=f"memory wall (OOM at {wall})")
        ax.axvspan(wall, wall * 2, color="C1", alpha=0.15)


def memory_figure(rows: list[dict[str, Any]], summaries: list[dict[str, Any]]) -> plt.Figure:
    """memory_bytes (XLA's need) against batch per run, the fitted line and the device's memory."""
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for i, (run, rs) in enumerate(by_run(rows).items()):
        pts = sorted((r["batch_size"], r["memory_bytes"]) for r in rs if r.get("memory_bytes"))
        if pts:
            b, m = np.array(pts, dtype=float).T
            ax.plot(b, m / 2**20, "o", ms=4, color=f"C{i % 10}", label=run)
        s = next((s for s in summaries if s["run"] == run), {})
        if s.get("bytes_per_example") and pts:
            fit = s["memory_fixed_bytes"] + s["bytes_per_example"] * b
            ax.plot(b, fit / 2**20, "-", color=f"C{i % 10}", alpha=0.5)
        draw_wall(ax, s)
    device = next((r["device_memory_bytes"] for r in rows if r.get("device_memory_bytes")), None)
    if device:
        ax.axhline(device / 2**20, color="k", ls="--", lw=1, label="device memory")
    return _finish(fig, ax, "batch size", "memory needed (MiB)", "memory per point", xbase=2)


def roofline_figure(rows: list[dict[str, Any]], summaries: list[dict[str, Any]]) -> plt.Figure:
    """Achieved FLOP/s against arithmetic intensity, under the device's measured roofs."""
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for run, rs in by_run(rows).items():
        intensity = [r["analytic_flops"] / r["analytic_bytes"] for r in rs]
        achieved = [r["achieved_flops_per_s"] / 1e9 for r in rs]
        ax.plot(intensity, achieved, "o-", ms=3, label=run)
    s = summaries[0]
    peak_f, bw = s["peak_flops_per_s"] / 1e9, s["peak_bytes_per_s"] / 1e9
    lo = min(r["analytic_flops"] / r["analytic_bytes"] for r in rows) / 2
    hi = max(r["analytic_flops"] / r["analytic_bytes"] for r in rows) * 2
    x = np.geomspace(min(lo, peak_f / bw / 4), max(hi, peak_f / bw * 4), 200)
    ax.plot(
        x,
        np.minimum(peak_f, x * bw),
        "k-",
        lw=1.5,
        label=f"measured roofs: {peak_f:.3g} GFLOP/s, {bw:.3g} GB/s",
    )
    if s.get("spec_flops_per_s") and s.get("spec_bytes_per_s"):
        sf, sb = s["spec_flops_per_s"] / 1e9, s["spec_bytes_per_s"] / 1e9
        label = f"datasheet roofs ({s['spec_device']}): {sf:.3g} GFLOP/s, {sb:.3g} GB/s"
        ax.plot(x, np.minimum(sf, x * sb), "k--", lw=1, label=label)
    return _finish(
        fig,
        ax,
        "arithmetic intensity (FLOP/byte, analytic)",
        "achieved GFLOP/s",
        f"roofline on {s['device_kind']}",
    )


def whatif_figure(rows: list[dict[str, Any]], s: dict[str, Any]) -> plt.Figure:
    """This run measured here, and its roofline prediction on spec-table devices."""
    rows = sorted(rows, key=lambda r: r["batch_size"])
    b = np.array([r["batch_size"] for r in rows])
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    ax.plot(b, [r["latency_s"] * 1e3 for r in rows], "o-", label=f"measured on {s['device_kind']}")
    for name, w in s["whatif"].items():
        curve = [w["latency_s"][r["batch_size"]] * 1e3 for r in rows]
        ax.plot(b, curve, "--", label=f"{name} lower bound (B*={w['critical_batch']:.3g})")
    for name, w in s.get("whatif_nodes", {}).items():
        curve = [w["latency_s"][r["batch_size"]] * 1e3 for r in rows]
        ax.plot(
            b,
            curve,
            ":",
            label=f"{name} lower bound (global B*={w['critical_batch_global']:.3g}, with comm)",
        )
    return _finish(
        fig,
        ax,
        "batch size",
        "latency (ms)",
        f"{s['run']}: what-if on spec devices (per-op lower bounds, no overhead)",
        xbase=2,
    )


def archive_figure(rows: list[dict[str, Any]], archived: list[Any]) -> plt.Figure:
    """This run's measured latencies (solid) beside the same experiment's committed sweeps
    from other machines (dashed; batching.archive): measured there, not here."""
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for run, rs in by_run(rows).items():
        b = [r["batch_size"] for r in rs]
        here = rs[0].get("device_kind", "?")
        ax.plot(b, [r["latency_s"] * 1e3 for r in rs], "o-", ms=3, label=f"{run} ({here})")
    for a in archived:
        for run, rs in by_run(a.rows).items():
            b = [r["batch_size"] for r in rs]
            kind = rs[0].get("device_kind", "?")
            ax.plot(
                b,
                [r["latency_s"] * 1e3 for r in rs],
                "s--",
                ms=3,
                label=f"{run} ({kind}, archived)",
            )
    return _finish(
        fig,
        ax,
        "batch size",
        "latency (ms, median)",
        "measured here (solid) and on other machines, archived (dashed)",
        xbase=2,
        ncol=1,
    )


LIMIT_HATCH = {"memory": "", "cache": "..", "compute": "//"}


def breakdown_figure(s: dict[str, Any]) -> plt.Figure:
    """Where the predicted time goes at the run's smallest and largest batch: one stacked bar
    each, as shares of the predicted latency, by op kind (colour) and the limit each op is at
    (hatch: plain memory/DRAM, dots cache, stripes compute), with the fixed overhead below.
    A point with a profiler trace (`traced_breakdown`, any batch) gets a second bar beside it:
    the traced time per kind as shares of the traced call, with what no kernel covers
    ("other": dispatch, copies, gaps) below. Latencies are written over each pair."""
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    traced = {int(b): e for b, e in (s.get("traced_breakdown") or {}).items() if e.get("traced")}
    points = {int(b): e for b, e in s["breakdown"].items()}
    points.update(traced)
    ends = sorted(points.items())
    kinds = sorted(
        {k for _, e in ends for k in e["by_kind"]}
        | {k for e in traced.values() for k in e["traced"] if k != "other"}
    )
    colors = dict(zip(kinds, plt.cm.tab10.colors, strict=False))
    width = 0.4 if traced else 0.8
    labelled = set()

    def segment(x, share, bottom, color, label, hatch=""):
        ax.bar(
            x,
            share,
            width,
            bottom=bottom,
            color=color,
            hatch=hatch,
            edgecolor="white",
            label=None if label in labelled else label,
        )
        labelled.add(label)

    for x, (batch, e) in enumerate(ends):
        px = x - width / 2 if batch in traced else x
        total = e["predicted_s"]
        bottom = e["overhead_s"] / total
        segment(px, bottom, 0.0, "0.7", "overhead / other")
        for kind in kinds:
            for limit, seconds in sorted(e["by_kind"].get(kind, {}).items()):
                share = seconds / total
                segment(
                    px,
                    share,
                    bottom,
                    colors[kind],
                    f"{kind} ({limit})",
                    LIMIT_HATCH.get(limit, "xx"),
                )
                bottom += share
        text = f"pred. {total * 1e3:.3g} ms\nmeas. {e['measured_s'] * 1e3:.3g} ms"
        if batch in traced:
            t = e["traced"]
            wall = e["traced_s"]
            bottom = t["other"]["seconds"] / wall
            segment(x + width / 2, bottom, 0.0, "0.7", "overhead / other")
            for kind in kinds:
                if kind in t:
                    share = t[kind]["seconds"] / wall
                    segment(x + width / 2, share, bottom, colors[kind], f"{kind} (traced)")
                    bottom += share
            text += f"\ntraced {wall * 1e3:.3g} ms"
        ax.text(x, 1.02, text, ha="center", fontsize="small")
    labels = [f"batch {b}" + ("\npred. | traced" if b in traced else "") for b, _ in ends]
    ax.set_xticks(range(len(ends)), labels)
    ax.set_ylim(0, 1.3)
    ax.set_ylabel("share of the call")
    ax.set_title(f"{s['run']}: time per op kind and limit, predicted (and traced)")
    ax.legend(fontsize="x-small", loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    return fig


def knee_vs_context_figure(summaries: list[dict[str, Any]]) -> plt.Figure:
    """Decode runs: fitted knee (with interval) and a-priori knee against cache length."""
    decode = sorted(
        (s for s in summaries if s.get("phase") == "decode"), key=lambda s: s["cache_len"]
    )
    L = np.array([s["cache_len"] for s in decode])
    knee = np.array([s["knee_batch_size"] for s in decode])
    # The full fit's knee can sit just outside its bootstrap percentiles, and a run with
    # no knee has an infinite one: draw what is finite, never a negative error bar.
    lo = np.minimum([s["knee_low"] for s in decode], knee)
    hi = np.maximum([s["knee_high"] for s in decode], knee)
    ok = np.isfinite(knee) & np.isfinite(lo) & np.isfinite(hi)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    ax.errorbar(
        L[ok],
        knee[ok],
        yerr=[knee[ok] - lo[ok], hi[ok] - knee[ok]],
        fmt="o-",
        capsize=3,
        label="fitted knee",
    )
    # A context with no fitted knee is drawn as such, at the top of the axis, not dropped.
    top = max([s["predicted_critical_batch"] for s in decode] + list(knee[ok]) + [1.0]) * 2
    if (~ok).any():
        ax.plot(L[~ok], np.full((~ok).sum(), top), "v", color="C0", ms=8,
                label="no fitted knee (none inside the sweep)")  # fmt: skip
    crossing = np.array([s["predicted_knee_batch_size"] for s in decode], dtype=float)
    finite = np.isfinite(crossing)
    ax.plot(L[finite], crossing[finite], "s--", color="C1",
            label="a-priori compute crossing (weights + KV cache)")  # fmt: skip
    if (~finite).any():
        ax.plot(L[~finite], np.full((~finite).sum(), top), "^", color="C1", ms=8,
                label="no compute crossing (memory-bound at every batch)")  # fmt: skip
    ax.plot(
        L,
        [s["predicted_critical_batch"] for s in decode],
        "k:",
        label="weights-only B* (the MLP formula)",
    )
    return _finish(
        fig,
        ax,
        "cache length (positions per sequence)",
        "critical batch size",
        "decode step: where batching stops being free, by context",
        xbase=2,
        ybase=2,
    )


def prefill_figure(rows: list[dict[str, Any]]) -> plt.Figure:
    """Prefill latency against prompt length, one line per batch size."""
    prefill = [r for r in rows if r.get("phase") == "prefill"]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for b in sorted({r["batch_size"] for r in prefill}):
        rs = sorted((r for r in prefill if r["batch_size"] == b), key=lambda r: r["prompt_len"])
        ax.plot(
            [r["prompt_len"] for r in rs],
            [r["latency_s"] * 1e3 for r in rs],
            "o-",
            label=f"batch {b}",
        )
    return _finish(
        fig,
        ax,
        "prompt length (tokens)",
        "prefill latency (ms)",
        "prefill latency vs prompt length",
        xbase=2,
    )


def extra_figures(
    rows: list[dict[str, Any]], summaries: list[dict[str, Any]]
) -> dict[str, plt.Figure]:
    """Figures that only some experiments have data for."""
    figures = {}
    # One cache length has no knee-vs-context line to draw.
    if len({s.get("cache_len") for s in summaries if s.get("phase") == "decode"}) >= 2:
        figures["knee_vs_context"] = knee_vs_context_figure(summaries)
    if any(r.get("phase") == "prefill" for r in rows):
        figures["prefill_vs_prompt"] = prefill_figure(rows)
    return figures


def _routing_curve(rows: list[dict[str, Any]], field: str, ylabel: str, title: str) -> plt.Figure:
    """One routing statistic against batch size, every run overlaid; linear y (it can be 0)."""
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for run, rs in by_run(rows).items():
        rs = [r for r in rs if r.get(field) is not None]
        ax.plot([r["batch_size"] for r in rs], [r[field] for r in rs], marker="o", ms=3, label=run)
    return _finish(fig, ax, "batch size", ylabel, title, xbase=2, ncol=2, linear="y")


def tokens_per_expert_figure(rows: list[dict[str, Any]]) -> plt.Figure:
    """First MoE layer's load per expert at each run's largest batch, sorted, over the mean."""
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for run, rs in by_run(rows).items():
        last = [r for r in rs if r.get("tokens_per_expert") is not None][-1]
        load_E = np.sort(np.asarray(last["tokens_per_expert"], float))[::-1]
        ratio_E = load_E / max(load_E.mean(), 1e-12)
        ax.plot(
            np.arange(1, load_E.size + 1),
            ratio_E,
            marker="o",
            ms=3,
            drawstyle="steps-mid",
            label=f"{run} (batch {last['batch_size']})",
        )
    ax.axhline(1.0, color="k", lw=0.8, ls=":")
    return _finish(
        fig,
        ax,
        "expert, most loaded first",
        "tokens / mean tokens per expert",
        "tokens per expert at the largest batch (layer 0, after capacity)",
        ncol=2,
        linear="xy",
    )


def loss_vs_load_cv_figure(summaries: list[dict[str, Any]]) -> plt.Figure:
    """Held-out loss against held-out load CV, one point per trained run."""
    trained = [
        s for s in summaries if None not in (s.get("heldout_loss"), s.get("heldout_load_cv"))
    ]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for s in trained:
        ax.plot(s["heldout_load_cv"], s["heldout_loss"], "o", label=s["run"])
    return _finish(
        fig,
        ax,
        "held-out load CV (std/mean tokens per expert)",
        "held-out loss (nats/byte)",
        "quality vs balance, one point per run",
        ncol=2,
        linear="xy",
    )


def moe_latency_figure(rows: list[dict[str, Any]]) -> plt.Figure:
    """Latency vs batch; a run with num_experts == top_k (every token reaches every expert:
    the dense model of the same active params) is drawn dashed."""
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for run, rs in by_run(rows).items():
        dense = rs[0].get("num_experts") == rs[0].get("top_k")
        ax.plot(
            [r["batch_size"] for r in rs],
            [r["latency_s"] * 1e3 for r in rs],
            "o--" if dense else "o-",
            ms=3,
            label=f"{run} (dense, same active params)" if dense else run,
        )
    return _finish(
        fig, ax, "batch size", "latency (ms, median)", "MoE vs dense latency", xbase=2, ncol=2
    )


def routing_figures(
    rows: list[dict[str, Any]], summaries: list[dict[str, Any]]
) -> dict[str, plt.Figure]:
    """Router ablation figures, drawn only from what the runs carry: the per-batch ones when
    rows hold routing statistics, loss vs load CV when at least one run was trained, the
    MoE vs dense latency when one run is the dense model of the same active params."""
    routed = [r for r in rows if r.get("drop_fraction") is not None]
    if not routed:
        return {}
    figures = {
        "routing_drop_fraction": _routing_curve(
            routed,
            "drop_fraction",
            "drop fraction (assignments lost to capacity)",
            "drop fraction vs batch",
        ),
        "routing_max_mean_load": _routing_curve(
            routed,
            "max_mean_load",
            "max/mean expert load (before capacity)",
            "max/mean expert load vs batch",
        ),
    }
    if any(r.get("tokens_per_expert") is not None for r in routed):
        figures["routing_tokens_per_expert"] = tokens_per_expert_figure(
            [r for r in routed if r.get("tokens_per_expert") is not None]
        )
    if any(s.get("heldout_loss") is not None for s in summaries):
        figures["routing_loss_vs_load_cv"] = loss_vs_load_cv_figure(summaries)
    if any(r.get("num_experts") == r.get("top_k") for r in routed):
        figures["routing_latency_vs_dense"] = moe_latency_figure(routed)
    return figures
