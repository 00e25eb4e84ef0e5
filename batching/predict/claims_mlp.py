"""Verdicts on the post's MLP claims.

- C3: the knee against B*.
- C4: the knee across widths.
- C5: small networks bound by overhead.
"""

import math
from typing import Any

from batching.predict import verdict
from batching.predict.verdict import (
    SIMULATION,
    Verdict,
    against_band,
    fmt,
    knee_inside,
    knee_text,
    regime_spans,
    regimes_below,
    run_rows,
    simulated,
    testing_batch,
)
from batching.setup import specs


def t4_sentence(s: dict[str, Any]) -> str:
    """The post's T4 under the roofline for this run's dtype.

    The sentence gives the datasheet peak that applies, or says there is none. It gives the
    B* of that peak. It sets the post's knee (POST_T4_KNEE) against that B*.
    """
    t4 = specs.SPECS["T4"]
    f, note = specs.matmul_peak(t4, s["dtype"], s.get("matmul_precision", "default"))
    if f is None:
        return f"The post's T4 cannot run {s['dtype']} matmuls at a datasheet rate ({note})."
    b = specs.critical_batch_size(f, t4.bandwidth_bytes_per_s, s.get("bytes_per_param", 4))
    side = (
        "later than"
        if POST_T4_KNEE > verdict.MOVES * b
        else "earlier than"
        if POST_T4_KNEE < b / verdict.MOVES
        else "near"
    )
    return (
        f"On the post's T4 the datasheet ({fmt(f / 1e12)} TFLOP/s {s['dtype']}"
        + (f", {note}" if note else "")
        + f"; {fmt(t4.bandwidth_bytes_per_s / 1e9)} GB/s) puts B* at {fmt(b)}; the post saw "
        f"its MLP slow down near batch {POST_T4_KNEE}, {side} that."
    )


# Where the post's T4 MLP (depth 8, width 1024) started slowing down.
POST_T4_KNEE = 128


def c3_mlp_knee(summaries: list[dict[str, Any]], rows: list[dict[str, Any]]) -> Verdict:
    """C3 on the first run: its fitted knee against the B* of the measured roofs.

    A knee within verdict.AGREE (1.5x) of B* confirms the claim. Below the knee the claim
    expects memory-bound points. If they are all overhead-bound, it is partly confirmed.
    """
    s = summaries[0]
    if simulated(summaries):
        return {"verdict": SIMULATION, "evidence": f"Run {s['run']} ran on forced host devices."}
    pred, knee = s["predicted_critical_batch"], s["knee_batch_size"]
    below = knee if math.isfinite(knee) else max(s["batch_sizes"])
    regimes = regimes_below(rows, s["run"], below)
    evidence = (
        f"Run {s['run']} on {s['device_kind']}: fitted knee {knee_text(s)}; B* = "
        f"F·bytes/(2·BW) = {fmt(pred)} from the measured roofs "
        f"({fmt(s['peak_flops_per_s'] / 1e9)} GFLOP/s, {fmt(s['peak_bytes_per_s'] / 1e9)} GB/s); "
        f"regimes by intensity below the knee: {regime_spans(rows, s['run'], below)}; "
        f"free-batching limit {s['free_batching_limit']}. {t4_sentence(s)}"
    )
    if not knee_inside(s):
        evidence += (
            f" No knee lies inside the sweep (batch {min(s['batch_sizes'])} to "
            f"{max(s['batch_sizes'])}): sweep to batch {testing_batch(s)} or more to test it."
        )
        return {"verdict": "not tested by this sweep", "evidence": evidence}
    if regimes == ["overhead"]:
        return {
            "verdict": "partly confirmed: a knee exists, but below it the call is "
            "overhead-bound, not memory-bound",
            "evidence": evidence,
        }
    low, high = pred / verdict.AGREE, pred * verdict.AGREE
    band = against_band(knee, s.get("knee_low"), s.get("knee_high"), low, high)
    if band == "inside":
        return {"verdict": "confirmed", "evidence": evidence}
    if band == "straddles":
        return {
            "verdict": f"consistent within its interval: the knee is {fmt(knee / pred)}x the "
            "B* FLOPS/bandwidth gives, and its 95% interval reaches within 1.5x of it",
            "evidence": evidence,
        }
    return {
        "verdict": f"partly confirmed: a knee exists, at {fmt(knee / pred)}x the B* "
        "FLOPS/bandwidth gives",
        "evidence": evidence,
    }


def c4_knee_across_widths(summaries: list[dict[str, Any]], rows: list[dict[str, Any]]) -> Verdict:
    """C4: confirmed for the runs (widths) whose fitted knee lies inside their sweep."""
    del rows
    if simulated(summaries):
        return {"verdict": SIMULATION, "evidence": "The widths ran on forced host devices."}
    inside = [s for s in summaries if knee_inside(s)]
    knees = "; ".join(f"{s['run']}: {knee_text(s)}" for s in summaries)
    evidence = f"{len(inside)} of {len(summaries)} widths have a knee inside the sweep. {knees}."
    outside = [s for s in summaries if s not in inside]
    if outside:
        evidence += (
            " Not tested by this sweep: "
            + ", ".join(f"{s['run']} (sweep to {testing_batch(s)})" for s in outside)
            + "."
        )
    if len(inside) == len(summaries):
        verdict = "confirmed"
    elif inside:
        verdict = f"confirmed for {len(inside)} of {len(summaries)} widths; the others not tested"
    else:
        verdict = "not tested by this sweep"
    return {"verdict": verdict, "evidence": evidence}


def c5_small_networks(summaries: list[dict[str, Any]], rows: list[dict[str, Any]]) -> Verdict:
    """C5 on the run with the fewest params.

    It is confirmed when the largest batch takes under twice the smallest batch's latency.
    It is partly confirmed when latency grows under a tenth as fast as the work.
    """
    s = min(summaries, key=lambda s: s["params"])
    small = run_rows(rows, s["run"])
    first, last = small[0], small[-1]
    if simulated(summaries):
        return {"verdict": SIMULATION, "evidence": f"Run {s['run']} ran on forced host devices."}
    slowdown = last["latency_s"] / first["latency_s"]
    lo, hi = s.get("slowdown_low"), s.get("slowdown_high")
    work = last["batch_size"] / first["batch_size"]
    evidence = (
        f"Smallest network {s['run']} ({s['params']:,} params): batch {first['batch_size']} "
        f"takes {fmt(first['latency_s'] * 1e6)} µs (measured), batch {last['batch_size']} "
        f"{fmt(last['latency_s'] * 1e6)} µs ({fmt(slowdown)}x{_interval(lo, hi)} for "
        f"{fmt(work)}x the work); "
        f"the fitted model's flat floor {fmt(s['overhead_s'] * 1e6)} µs (fitted), a trivial "
        f"call's dispatch floor {fmt(s['dispatch_floor_s'] * 1e6)} µs (measured); regime by "
        f"intensity at batch {first['batch_size']}: {first['regime']}; free-batching limit "
        f"{s['free_batching_limit']}."
    )
    # "Almost no scaling": the whole sweep costs less than doubling the smallest batch's time.
    # Partly: time grows, but by less than a tenth of the work (overhead dominates). Both are
    # judged on the slowdown's interval where it has one. A side it reaches is not excluded.
    flat = against_band(slowdown, lo, hi, 0.0, 2.0)
    slow = against_band(slowdown, lo, hi, 0.0, 0.1 * work)
    if flat == "inside":
        verdict = "confirmed"
    elif slow == "inside" and flat == "outside":
        verdict = "partly confirmed: latency grows, but far slower than the work"
    elif slow == "outside":
        verdict = "refuted on this device"
    else:
        verdict = "not determined: the slowdown's 95% interval spans the bounds this verdict draws"
    return {"verdict": verdict, "evidence": evidence}


def _interval(lo: float | None, hi: float | None) -> str:
    """' [lo, hi]' for a number's 95% interval in prose; '' without one."""
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return ""
    return f" [{fmt(lo)}, {fmt(hi)}]"
