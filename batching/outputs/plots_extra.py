"""Figures that only some experiments have data for.

- Where the predicted time goes, per op kind.
- The knee against context length, for decode runs.
- Prefill latency against prompt length.
- The MoE router's statistics.
"""

from typing import Any

import numpy as np

from batching.outputs.plot_style import finish, plt
from batching.outputs.summary import by_run

# The hatch of a breakdown segment marks the limit its op is at.
LIMIT_HATCH = {"memory": "", "cache": "..", "compute": "//"}


def breakdown_figure(s: dict[str, Any]) -> plt.Figure:
    """Where the predicted time goes at the run's smallest and largest batch.

    Each batch gets one stacked bar of shares of the predicted latency. The fixed overhead
    sits at the bottom. Above it, the colour is the op kind and the hatch the op's limit.

    - Plain: memory (DRAM).
    - Dots: the cache.
    - Stripes: compute.

    A point with a profiler trace gets a second bar beside its predicted one. Such points
    can be at any batch; they come from the summary's `traced_breakdown`. The second bar
    holds the traced time per kind, as shares of the traced call. At its bottom is what no
    kernel covers ("other": dispatch, copies, gaps). The latencies are written over each bar
    or pair.
    """
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    traced = {int(b): e for b, e in (s.get("traced_breakdown") or {}).items() if e.get("traced")}
    points = {int(b): e for b, e in s["breakdown"].items()}
    points.update(traced)
    ends = sorted(points.items())
    kinds = sorted(
        {k for _, e in ends for k in e["by_kind"]}
        | {k for e in traced.values() for k in e["traced"] if k != "other"}
    )
    bars = _StackedBars(ax, kinds, width=0.4 if traced else 0.8)
    for x, (batch, e) in enumerate(ends):
        text = bars.predicted(x - bars.width / 2 if batch in traced else x, e)
        if batch in traced:
            text += bars.traced(x + bars.width / 2, e)
        ax.text(x, 1.02, text, ha="center", fontsize="small")
    labels = [f"batch {b}" + ("\npred. | traced" if b in traced else "") for b, _ in ends]
    ax.set_xticks(range(len(ends)), labels)
    ax.set_ylim(0, 1.3)
    ax.set_ylabel("share of the call")
    ax.set_title(f"{s['run']}: time per op kind and limit, predicted (and traced)")
    ax.legend(fontsize="x-small", loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    return fig


class _StackedBars:
    """The breakdown figure's bars.

    Each bar stacks the shares of one call. Each op kind has its own colour. Each label
    enters the legend once.
    """

    def __init__(self, ax: plt.Axes, kinds: list[str], width: float):
        self.ax, self.width, self.labelled = ax, width, set()
        self.colors = dict(zip(kinds, plt.cm.tab10.colors, strict=False))
        self.kinds = kinds

    def segment(self, x, share, bottom, color, label, hatch=""):
        self.ax.bar(
            x,
            share,
            self.width,
            bottom=bottom,
            color=color,
            hatch=hatch,
            edgecolor="white",
            label=None if label in self.labelled else label,
        )
        self.labelled.add(label)

    def predicted(self, x: float, e: dict[str, Any]) -> str:
        """Draws the predicted call's bar at `x` and returns its caption.

        The overhead comes first, then each kind's time by limit.
        """
        total = e["predicted_s"]
        bottom = e["overhead_s"] / total
        self.segment(x, bottom, 0.0, "0.7", "overhead / other")
        for kind in self.kinds:
            for limit, seconds in sorted(e["by_kind"].get(kind, {}).items()):
                share = seconds / total
                hatch = LIMIT_HATCH.get(limit, "xx")
                self.segment(x, share, bottom, self.colors[kind], f"{kind} ({limit})", hatch)
                bottom += share
        return f"pred. {total * 1e3:.3g} ms\nmeas. {e['measured_s'] * 1e3:.3g} ms"

    def traced(self, x: float, e: dict[str, Any]) -> str:
        """Draws the traced call's bar at `x` and returns its caption.

        What no kernel covers comes first, then each kind's traced time.
        """
        t, wall = e["traced"], e["traced_s"]
        bottom = t["other"]["seconds"] / wall
        self.segment(x, bottom, 0.0, "0.7", "overhead / other")
        for kind in self.kinds:
            if kind in t:
                share = t[kind]["seconds"] / wall
                self.segment(x, share, bottom, self.colors[kind], f"{kind} (traced)")
                bottom += share
        return f"\ntraced {wall * 1e3:.3g} ms"


def knee_vs_context_figure(summaries: list[dict[str, Any]]) -> plt.Figure:
    """For decode runs: the fitted and a-priori knees against cache length.

    The fitted knee carries its 95% interval. The a-priori knee is where compute overtakes
    memory, counting the weights and the KV cache. A context without a knee is marked at
    the top of the axis. The weights-only B* is drawn for reference.
    """
    decode = sorted(
        (s for s in summaries if s.get("phase") == "decode"), key=lambda s: s["cache_len"]
    )
    L = np.array([s["cache_len"] for s in decode])
    knee = np.array([s["knee_batch_size"] for s in decode])
    # The full fit's knee can sit just outside its bootstrap percentiles. A run with no
    # knee has an infinite one. So draw what is finite, and never a negative error bar.
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
    return finish(
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
    return finish(
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
    """One routing statistic against batch size, with every run overlaid.

    The y axis is linear, since the statistic can be 0.
    """
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for run, rs in by_run(rows).items():
        rs = [r for r in rs if r.get(field) is not None]
        ax.plot([r["batch_size"] for r in rs], [r[field] for r in rs], marker="o", ms=3, label=run)
    return finish(fig, ax, "batch size", ylabel, title, xbase=2, ncol=2, linear="y")


def tokens_per_expert_figure(rows: list[dict[str, Any]]) -> plt.Figure:
    """The first MoE layer's load per expert, at each run's largest batch.

    The loads are sorted, most loaded first, and divided by the mean load.
    """
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
    return finish(
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
    return finish(
        fig,
        ax,
        "held-out load CV (std/mean tokens per expert)",
        "held-out loss (nats/byte)",
        "quality vs balance, one point per run",
        ncol=2,
        linear="xy",
    )


def moe_latency_figure(rows: list[dict[str, Any]]) -> plt.Figure:
    """Latency against batch size, a line per run.

    A run with num_experts == top_k is drawn dashed. Every token there reaches every
    expert. So it is the dense model with the same active params.
    """
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
    return finish(
        fig, ax, "batch size", "latency (ms, median)", "MoE vs dense latency", xbase=2, ncol=2
    )


def routing_figures(
    rows: list[dict[str, Any]], summaries: list[dict[str, Any]]
) -> dict[str, plt.Figure]:
    """The router ablation figures, drawn only from what the runs carry.

    - Drop fraction and max/mean load per batch, when rows hold routing statistics.
    - Tokens per expert, when rows hold that histogram.
    - Loss against load CV, when at least one run was trained.
    - MoE against dense latency, when one run is the dense model.
    """
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
