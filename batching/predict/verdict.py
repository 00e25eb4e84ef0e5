"""What every verdict shares.

It holds the verdict type and how its prose writes numbers. It also holds the tests of a
run's summary that several claims read. Is the knee inside the sweep? Which points does the
fit rest on? How far must a sweep go?
"""

import math
from typing import Any

import numpy as np

from batching import text

Verdict = dict[str, str]


# Two figures agree within this factor: a knee and B*, or a measured and a spec growth.
AGREE = 1.5
# A quantity moves (a trend, a knee set against the post's) beyond this factor.
MOVES = 1.25


def fmt(x: Any, digits: int = 3) -> str:
    """A number in a verdict's prose, by batching.text.fmt.

    A missing value is "none". A knee or crossing at infinity is "none" too, since it never
    comes.
    """
    if isinstance(x, float) and x == math.inf:
        return "none"
    return text.fmt(x, digits, missing="none")


def knee_inside(s: dict[str, Any]) -> bool:
    """Whether the run's fitted knee lies strictly between its smallest and largest batch."""
    sizes = s["batch_sizes"]
    knee = s.get("knee_batch_size")
    return knee is not None and math.isfinite(knee) and min(sizes) < knee < max(sizes)


SIMULATION = (
    "not judged: a functional simulation (forced host devices share the same CPU cores, so "
    "their timings say nothing about a device)"
)


def simulated(summaries: list[dict[str, Any]]) -> bool:
    """Whether any run is a functional simulation (forced host devices)."""
    return any(s.get("functional_simulation") for s in summaries)


def testing_batch(s: dict[str, Any]) -> int:
    """A batch size a sweep must reach to see this run turn compute-bound.

    It takes the largest of three marks. They are the measured B*, the predicted curve's
    knee and the a-priori crossing. It returns 4x that, rounded up to a power of 2.
    """
    marks = [
        s.get(k)
        for k in ("predicted_critical_batch", "predicted_curve_knee_batch_size",
                  "predicted_knee_batch_size")
        if s.get(k) is not None and math.isfinite(s.get(k))
    ]  # fmt: skip
    target = 4 * max(marks or [max(s["batch_sizes"])])
    return int(2 ** math.ceil(math.log2(max(target, 2))))


def _spans(rows: list[dict[str, Any]], run: str, below: float) -> list[list[Any]]:
    """[regime, first batch, last batch] of the run's points under `below`, in batch order.

    Neighbouring points of one regime are merged.
    """
    spans: list[list[Any]] = []
    for r in sorted((r for r in rows if r["run"] == run), key=lambda r: r["batch_size"]):
        if r["batch_size"] >= below:
            break
        if spans and spans[-1][0] == r["regime"]:
            spans[-1][2] = r["batch_size"]
        else:
            spans.append([r["regime"], r["batch_size"], r["batch_size"]])
    return spans


def regimes_below(rows: list[dict[str, Any]], run: str, below: float) -> list[str]:
    """The run's regimes by intensity at batch sizes under `below`, each once, sorted."""
    return sorted({regime for regime, _, _ in _spans(rows, run, below)})


def regime_spans(rows: list[dict[str, Any]], run: str, below: float) -> str:
    """The run's regimes by intensity at batch sizes under `below`, in batch order.

    Each comes with the batches it covers: 'memory at B=1–8, compute at B=16'. It is 'none'
    without such a point.
    """
    spans = _spans(rows, run, below)
    parts = (f"{regime} at B={lo}" + (f"–{hi}" if hi != lo else "") for regime, lo, hi in spans)
    return ", ".join(parts) or "none"


# A knee whose bootstrap interval leaves out the fit to the pooled medians. The bootstrap
# draws each point's passes at random, and single passes put the knee elsewhere.
OUTSIDE = (
    " (outside its interval: fits to single passes put the knee elsewhere, so this run "
    "does not determine it well)"
)


def interval_text(knee: float, lo: float, hi: float) -> str:
    """'22.7 [19.7, 26.3]' for a table, with '–' where a value is missing.

    It says so when the estimate lies outside its interval.
    """
    shown = f"{text.fmt(knee)} [{text.fmt(lo)}, {text.fmt(hi)}]"
    finite = all(x is not None and math.isfinite(x) for x in (knee, lo, hi))
    return shown + (OUTSIDE if finite and not lo <= knee <= hi else "")


def knee_text(s: dict[str, Any]) -> str:
    """The knee in prose, or why there is no knee or no interval.

    For example: '21.7 [21.2, 22.1] (±2% across passes), fitted on 10 converged of 10
    points'.
    """
    knee = s.get("knee_batch_size")
    if knee is None or not math.isfinite(knee):
        return "none" + fit_points(s).replace(", fitted", " (fitted", 1) + ")"
    lo, hi = s["knee_low"], s["knee_high"]
    if lo is not None and lo == math.inf:
        return (
            f"{fmt(knee)} [open] (in over 97.5% of resamples the fit never turns "
            "compute-bound)" + fit_points(s)
        )
    if lo is None or not math.isfinite(lo):
        return f"{fmt(knee)} (no interval: no timing samples kept)" + fit_points(s)
    if hi is None or not math.isfinite(hi):
        # Samples were resampled, so the low end exists. But in more than 2.5% of the
        # resamples the fit never turns compute-bound, so the interval has no upper end.
        return (
            f"{fmt(knee)} [{fmt(lo)}, open] (in over 2.5% of resamples the fit never turns "
            "compute-bound)" + fit_points(s)
        )
    text = interval_text(knee, lo, hi)  # says so itself when the knee lies outside
    inside = lo <= knee <= hi
    if inside and s.get("knee_interval_degenerate"):
        text += " (a degenerate interval: the fit sits at an end)"
    elif inside:
        width = (hi - lo) / 2 / knee
        where = "across passes" if s.get("knee_interval_from") == "passes" else "within one pass"
        text += f" (±{width:.0%} {where})"
    return text + fit_points(s)


def fit_points(s: dict[str, Any]) -> str:
    """Which points the knee rests on: the converged ones, else all of them."""
    fitted, converged = s.get("knee_fit_points"), s.get("points_converged", s["points"])
    if fitted is not None and fitted > converged:
        return f", fitted on all {fitted} points (only {converged} converged)"
    return f", fitted on {fitted if fitted is not None else '?'} converged of {s['points']} points"


def against_band(
    estimate: float, low: float | None, high: float | None, band_low: float, band_high: float
) -> str:
    """Where an estimate with interval [low, high] stands against [band_low, band_high].

    - "inside": the estimate lies in the band.
    - "outside": its whole interval lies out of the band.
    - "straddles": the estimate lies out, but its interval reaches in.

    Without an interval the estimate alone decides.
    """
    if band_low <= estimate <= band_high:
        return "inside"
    if low is None or high is None or not (math.isfinite(low) or math.isfinite(high)):
        return "outside"
    return "outside" if high < band_low or low > band_high else "straddles"


def knee_trend(summaries: list[dict[str, Any]]) -> str:
    """How the fitted knee moves from the first run to the last, judged by intervals.

    It "rises" or "falls" only when the two intervals do not overlap. It "moves out of
    reach" when the last run has no knee.
    """
    first, last = summaries[0], summaries[-1]
    k0, k1 = first.get("knee_batch_size"), last.get("knee_batch_size")
    finite = [k is not None and math.isfinite(k) for k in (k0, k1)]
    if not all(finite):
        return "moves out of reach" if finite == [True, False] else "cannot be followed"
    lo0, hi0 = first.get("knee_low"), first.get("knee_high")
    lo1, hi1 = last.get("knee_low"), last.get("knee_high")
    if None in (lo0, hi0, lo1, hi1) or any(math.isnan(x) for x in (lo0, hi0, lo1, hi1)):
        return trend([k0, k1])
    if lo1 > hi0:
        return "rises"
    if hi1 < lo0:
        return "falls"
    return "stays within their intervals"


def trend(values: list[float]) -> str:
    """How a quantity moves from first to last value. An infinite one ("none") is beyond."""
    first, last = values[0], values[-1]
    if not math.isfinite(last) and math.isfinite(first):
        return "moves out of reach"
    if not (math.isfinite(first) and math.isfinite(last)):
        return "cannot be followed"
    if last < first / MOVES:
        return "falls"
    return "rises" if last > first * MOVES else "stays about the same"


def loglog_slope(rows: list[dict[str, Any]]) -> float:
    """Least-squares slope of log latency against log batch size (1: linear)."""
    b = np.log([r["batch_size"] for r in rows])
    t = np.log([r["latency_s"] for r in rows])
    return float(np.polyfit(b, t, 1)[0])


def resnet50(summaries: list[dict[str, Any]], platform: str) -> dict[str, Any] | None:
    """The summary of the ResNet50 run (depth 50) on `platform`, or None."""
    return next((s for s in summaries if s.get("depth") == 50 and s["platform"] == platform), None)


def run_rows(rows: list[dict[str, Any]], run: str) -> list[dict[str, Any]]:
    """The run's rows, by batch size."""
    return sorted((r for r in rows if r["run"] == run), key=lambda r: r["batch_size"])


def throughput_gain(rows: list[dict[str, Any]], run: str, up_to: int) -> float:
    """What batching bought: best throughput at batch <= up_to over the smallest's."""
    rs = [r for r in run_rows(rows, run) if r["batch_size"] <= up_to]
    return max(r["throughput_per_s"] for r in rs) / rs[0]["throughput_per_s"]


def first_regime(rows: list[dict[str, Any]], run: str) -> str:
    """The run's regime by intensity at its smallest batch size."""
    return run_rows(rows, run)[0]["regime"]


# A verdict fits a trend. A run with fewer measured batch sizes than this gives none.
MIN_POINTS = 3


def not_enough_points(why: str) -> Verdict:
    """The verdict when runs have too few ok points; `why` says which."""
    return {
        "verdict": "not enough points",
        "evidence": f"{why}; a verdict needs at least {MIN_POINTS} ok points per run",
    }
