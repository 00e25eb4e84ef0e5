"""Figures of a sweep.

Every run of an experiment is overlaid in one figure per quantity.
"""

from typing import Any

import numpy as np

from batching.outputs import plots_extra
from batching.outputs.plot_style import finish, mark_unconverged, plt, save_all
from batching.outputs.summary import by_run

__all__ = ["all_figures", "save_all"]

# Figure name -> (row field, y label, scale).
CURVES = {
    "latency": ("latency_s", "latency (ms, bars: 95% interval)", 1e3),
    "throughput": ("throughput_per_s", "throughput (examples/s)", 1.0),
    "per_example": ("per_example_s", "latency per example (µs)", 1e6),
}


def curve_figure(rows: list[dict[str, Any]], name: str, title: str) -> plt.Figure:
    """Figure `name` of CURVES against batch size, with a line per run.

    The latency figure adds each point's 95% interval as error bars. Hollow rings mark
    points whose interval missed the precision target.
    """
    field, ylabel, scale = CURVES[name]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for run, rs in by_run(rows).items():
        b = np.array([r["batch_size"] for r in rs])
        y = np.array([r[field] for r in rs]) * scale
        if name == "latency":
            lo = np.array([r["latency_ci_low_s"] for r in rs]) * scale
            hi = np.array([r["latency_ci_high_s"] for r in rs]) * scale
            line = ax.errorbar(b, y, yerr=[y - lo, hi - y], marker="o", ms=3, capsize=2, label=run)
            color = line.lines[0].get_color()
        else:
            color = ax.plot(b, y, marker="o", ms=3, label=run)[0].get_color()
        mark_unconverged(ax, rs, y, color)
    if any(not r.get("converged", True) for r in rows):
        ax.plot([], [], "o", mfc="white", mec="k", ms=7, label="not converged")
    return finish(fig, ax, "batch size", ylabel, title, xbase=2, ncol=2)


def sweep_figures(rows: list[dict[str, Any]], experiment: str) -> dict[str, plt.Figure]:
    """Every CURVES figure of the rows, by name.

    Each is titled "<experiment>: <name>".
    """
    return {name: curve_figure(rows, name, f"{experiment}: {name}") for name in CURVES}


def fit_figure(rows: list[dict[str, Any]], s: dict[str, Any]) -> plt.Figure:
    """One run's measured latency against batch size, with what explains it.

    Beside the measurements it draws the following.

    - The a-priori prediction, and the one at the square-matmul peak.
    - The fitted three-limit model.
    - The fitted knee and its interval, where the fit has a knee.
    - The predicted critical batch B*.
    - The memory wall, where the run hit one.
    """
    rows = sorted(rows, key=lambda r: r["batch_size"])
    b = np.array([r["batch_size"] for r in rows])
    ms = lambda field: np.array([r[field] for r in rows]) * 1e3
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    y, lo, hi = ms("latency_s"), ms("latency_ci_low_s"), ms("latency_ci_high_s")
    ax.errorbar(b, y, yerr=[y - lo, hi - y], fmt="o", ms=4, capsize=2,
                label="measured (95% interval)")  # fmt: skip
    mark_unconverged(ax, rows, y, "C0")
    if any(not r.get("converged", True) for r in rows):
        ax.plot([], [], "o", mfc="white", mec="C0", ms=7, label="not converged")
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
    return finish(
        fig, ax, "batch size", "latency (ms)", f"{s['run']} on {s['device_kind']}", xbase=2
    )


def draw_wall(ax: plt.Axes, s: dict[str, Any]) -> None:
    """Marks the memory wall: the first batch that hit OOM here.

    The region past it is shaded. A run without an OOM draws nothing.
    """
    wall = s.get("first_oom_batch")
    if wall:
        ax.axvline(wall, color="C1", lw=2, label=f"memory wall (OOM at {wall})")
        ax.axvspan(wall, wall * 2, color="C1", alpha=0.15)


def memory_figure(rows: list[dict[str, Any]], summaries: list[dict[str, Any]]) -> plt.Figure:
    """Each run's memory need against batch size, in MiB.

    The points are memory_bytes, what XLA says the compiled program needs. Each run's
    fitted line and memory wall are drawn too. A dashed line marks the device's memory.
    """
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
    return finish(fig, ax, "batch size", "memory needed (MiB)", "memory per point", xbase=2)


def roofline_figure(rows: list[dict[str, Any]], summaries: list[dict[str, Any]]) -> plt.Figure:
    """Achieved FLOP/s against arithmetic intensity, under the device's measured roofs.

    Intensity is the analytic FLOPs over the analytic bytes. The datasheet roofs are drawn
    dashed where the spec table has the device.
    """
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
    return finish(
        fig,
        ax,
        "arithmetic intensity (FLOP/byte, analytic)",
        "achieved GFLOP/s",
        f"roofline on {s['device_kind']}",
    )


def whatif_figure(rows: list[dict[str, Any]], s: dict[str, Any]) -> plt.Figure:
    """This run as measured here, beside its roofline prediction on spec-table devices.

    The predictions are per-op lower bounds without overhead. A multi-GPU node adds its
    global B* and the comm term.
    """
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
    return finish(
        fig,
        ax,
        "batch size",
        "latency (ms)",
        f"{s['run']}: what-if on spec devices (per-op lower bounds, no overhead)",
        xbase=2,
    )


def archive_figure(rows: list[dict[str, Any]], archived: list[Any]) -> plt.Figure:
    """This run's measured latencies beside the experiment's sweeps from other machines.

    This run's lines are solid. The committed sweeps (batching.outputs.archive) are dashed.
    Those were measured there, not here.
    """
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
    return finish(
        fig,
        ax,
        "batch size",
        "latency (ms, median)",
        "measured here (solid) and on other machines, archived (dashed)",
        xbase=2,
        ncol=1,
    )


def all_figures(
    experiment: str,
    analyzed_rows: list[dict[str, Any]],
    current_all: list[dict[str, Any]],
    summaries: list[dict[str, Any]],
    archived: list[Any],
) -> dict[str, plt.Figure]:
    """Every figure the runs carry data for, by name.

    - The sweep's curves, always.
    - The roofline, where a run was analysed.
    - Each analysed run's fit, what-if and breakdown.
    - The plots_extra figures that the analysed runs have data for.
    - The memory figure, where rows hold memory_bytes.
    - The routing figures, where rows hold routing statistics.
    - The archive figure, where other machines' sweeps are committed.
    """
    figures = sweep_figures(analyzed_rows, experiment)
    analyzed = [s for s in summaries if "knee_batch_size" in s]
    if analyzed:
        figures["roofline"] = roofline_figure(
            [r for r in analyzed_rows if any(r["run"] == s["run"] for s in analyzed)], analyzed
        )
        for s in analyzed:
            run_rows = [r for r in analyzed_rows if r["run"] == s["run"]]
            figures[f"fit_{s['run']}"] = fit_figure(run_rows, s)
            figures[f"whatif_{s['run']}"] = whatif_figure(run_rows, s)
            figures[f"breakdown_{s['run']}"] = plots_extra.breakdown_figure(s)
        figures.update(plots_extra.extra_figures(analyzed_rows, analyzed))
    if any(r.get("memory_bytes") for r in current_all):
        figures["memory"] = memory_figure(current_all, summaries)
    figures.update(plots_extra.routing_figures(analyzed_rows, summaries))
    if archived:
        figures["archive"] = archive_figure(analyzed_rows, archived)
    return figures
