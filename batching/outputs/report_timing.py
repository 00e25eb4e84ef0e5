"""The report's account of how the points were timed.

- What a point's latency and interval are.
- The cache state the calls found.
- What precision this machine allowed.
- The Device line's warning when the machine was noisy.
"""

import math
from typing import Any

from batching.outputs.doc import Doc, ReportData

OLD_KIND = "pooled samples"


def noisy_sentence(summaries: list[dict[str, Any]]) -> str:
    """The Device line's warning about a noisy machine; '' on a quiet one.

    It counts the points whose passes moved more than timing.max_pass_cv. It also says how
    much of the host's CPU other processes took during passes.
    """
    noisy = [s for s in summaries if s.get("noisy_points")]
    if not noisy:
        return ""
    worst = max(noisy, key=lambda s: s.get("pass_cv_median") or 0)
    points = sum(s["noisy_points"] for s in noisy)
    total = sum(s["points"] for s in summaries)
    text = (
        f"The machine was noisy while this ran: at {points} of {total} points the passes "
        f"moved by more than timing.max_pass_cv = {worst['max_pass_cv']:.0%} (std / mean of "
        f"their medians; run {worst['run']}: median {worst['pass_cv_median']:.0%})"
    )
    busy = [s["host_busy_median"] for s in summaries if s.get("host_busy_median") is not None]
    if busy:
        text += (
            f"; other processes and the hypervisor took a median {max(busy):.0%} of the host's "
            "CPU time during passes"
        )
    return text + ". Intervals below are wide accordingly; a quieter machine narrows them."


def timing_section(doc: Doc, data: ReportData) -> None:
    """The Timing section: how a point is measured and what its interval means.

    A table follows, one line per run. Then comes the machine's drift between runs.
    """
    if not data.summaries:
        return
    doc.heading("Timing")
    doc.para(
        "A pass visits every point of a run once, in a new shuffled order; a point's passes "
        "are spread over the run. Within a pass the calls only estimate that pass's value (its "
        "median): what moves between passes (a busy neighbour, clocks, the host) is what moves "
        "between reruns, so the pass is the unit. A point's latency is its estimator over the "
        "pass medians, each pass weighing the same; its 95% interval comes from the spread "
        "between passes, and a point is converged once that interval is within "
        "±timing.target_rel_ci. Every point gets sweep.passes; the unconverged get more, one "
        "round at a time, until the run has spent timing.run_budget_s or they have "
        "sweep.max_passes. Warm calls run back to back, so weights that fit the last-level "
        "cache are read from it; cold calls (timing.cache = cold) find the cache evicted, so "
        "the weights come from DRAM. The roofline prices each run as it was timed."
    )
    doc.table(
        ["run", "cache", "priced from", "latency, interval", "passes", "pass spread (median)",
         "± passes (median)", "± with drift (median)", "converged",
         "precision this machine allowed"],
        [_run_line(s) for s in data.summaries],
    )  # fmt: skip
    doc.para(drift_sentence(data.summaries))
    old = [s["run"] for s in data.summaries if not s.get("interval_method")]
    if old:
        doc.para(
            f"Runs {', '.join(old)} were stored before passes were the unit: their latency "
            "is the median of every sample pooled and their interval the pooled samples' "
            "distribution-free one, as if the samples were independent. Such intervals are "
            "narrower than what a rerun shows."
        )


def drift_sentence(summaries: list[dict[str, Any]]) -> str:
    """The machine's drift between runs, and where that reading came from.

    Where the drift is unknown, the sentence says so. Each interval then holds only the
    spread between one run's passes.
    """
    known = [s for s in summaries if s.get("machine_drift_sd")]
    if not known:
        return (
            "Drift between runs: unknown here (the drift log beside the peaks cache holds "
            "fewer readings than it needs, or the peaks came from a file), so each interval "
            "holds the spread between this run's passes only; a rerun when the machine is "
            "faster or slower as a whole moves every point, by more than that."
        )
    s = known[0]
    where = ""
    if s.get("machine_drift_readings"):
        where = (
            f" (the speed index, √(matmul FLOP/s · stream bytes/s), of "
            f"{s['machine_drift_readings']} quick readings over the last "
            f"{s['machine_drift_span_s'] / 60:.0f} min, one or two per run's peaks check)"
        )
    return (
        f"Drift between runs: this machine as a whole moved by a log standard deviation of "
        f"{s['machine_drift_sd']:.1%} from one reading to the next{where}. A whole run timed "
        "in a slow spell is slow at every point, which no spread between its passes shows, "
        "so each point's interval adds it (`latency_ci_*` = `pass_ci_*` ⊕ drift, in "
        "quadrature on a log scale); `converged` judges the passes' own interval, the part "
        "more passes narrow. Statistics of the curve's shape (the knee, the slope, the "
        "slowdown, the free-batching test) compare points of one run: a drift common to "
        "the run cancels in them."
    )


def _run_line(s: dict[str, Any]) -> list[Any]:
    method = s.get("interval_method") or f"{OLD_KIND} (rows stored before passes were the unit)"
    estimator = s.get("estimator") or "median of pooled samples"
    cv = s.get("pass_cv_median")
    passes = f"{s.get('passes_done_min')}–{s.get('passes_done_max')}"
    return [
        s["run"],
        s.get("cache_state") or "warm",
        s.get("memory_roof") or "–",
        f"{estimator}; {method}",
        passes,
        f"{cv:.1%}" if cv is not None else "–",
        _pm(s.get("pass_halfwidth_median")),
        _pm(s.get("rel_halfwidth_median")) if s.get("machine_drift_sd") else "–",
        f"{s.get('points_converged', s['points'])}/{s['points']}",
        precision_text(s),
    ]


def _pm(half: float | None) -> str:
    return f"±{half:.1%}" if half is not None else "–"


def precision_text(s: dict[str, Any]) -> str:
    """The precision this machine allowed a run. It is "–" without the numbers for it.

    The text reads like "pass-to-pass spread 16%: ±3% needs ~110 passes". It adds the
    precision the run reached and its most passes. Points that stopped on something other
    than precision are counted in parentheses.
    """
    cv, need, half = s.get("pass_cv_median"), s.get("passes_needed"), s.get("pass_halfwidth_median")
    target = s.get("target_rel_ci")
    if cv is None or need is None or target is None or not math.isfinite(need):
        return "–"
    text = f"pass-to-pass spread {cv:.0%}: ±{target:.0%} needs ~{max(round(need), 2):,} passes"
    if half is not None:
        text += f"; this run reached ±{half:.0%} with {s.get('passes_done_max')} at most"
    reasons = s.get("stop_reasons") or {}
    left = {k: v for k, v in reasons.items() if k != "precision"}
    if left:
        text += " (" + ", ".join(f"{n} stopped on {k}" for k, n in sorted(left.items())) + ")"
    return text
