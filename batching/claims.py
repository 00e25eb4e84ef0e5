"""The post's claims (shared/ANCHORS.md §1) and the verdict the data gives on each.

A verdict function reads an experiment's run summaries and rows and returns
{"verdict": ..., "evidence": ...}. The evidence quotes the numbers it used;
a claim the data cannot decide says so instead of guessing.
"""

import math
from collections.abc import Callable
from typing import Any

CLAIMS = {
    "C1": "ResNet50 inference time on a CPU grows linearly with batch size.",
    "C2": "On a GPU (T4) going from batch 1 to 2 to 3 costs no extra time; then time grows "
    "linearly.",
    "C3": "An MLP is memory-bound while B < FLOPS/bandwidth and compute-bound above; an MLP of "
    "depth 8, width 1024 on a T4 starts slowing around B≈128.",
    "C4": "The knee exists across widths (log-log plot over widths).",
    "C5": "Small networks show almost no scaling from batch 1 to 512: they are overhead-bound.",
    "C6": "Convolutions reuse each weight many times, so batching helps them less.",
    "C7": "A transformer with a KV cache behaves like an MLP for batching.",
    "C8": "An MoE's token-choice gating can spread a batch unevenly over experts; expert-choice "
    "avoids it but is awkward for autoregressive decoding.",
}

Verdict = dict[str, str]


def _fmt(x: float | None) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "none"
    return f"{x:.3g}"


def _knee_inside(s: dict[str, Any]) -> bool:
    sizes = s["batch_sizes"]
    return min(sizes) < s["knee_batch_size"] < max(sizes)


def c3_mlp_knee(summaries: list[dict[str, Any]], rows: list[dict[str, Any]]) -> Verdict:
    s = summaries[0]
    pred, knee = s["predicted_critical_batch"], s["knee_batch_size"]
    t4 = s["whatif"].get("T4")
    below = [r for r in rows if r["run"] == s["run"] and r["batch_size"] < knee]
    regimes = sorted({r["regime"] for r in below})
    evidence = (
        f"Run {s['run']} on {s['device_kind']}: fitted knee {_fmt(knee)} "
        f"(95% bootstrap interval {_fmt(s['knee_low'])}-{_fmt(s['knee_high'])}); "
        f"predicted B* = F·bytes/(2·BW) = {_fmt(pred)} from measured peaks "
        f"({_fmt(s['peak_flops_per_s'] / 1e9)} GFLOP/s, {_fmt(s['peak_bytes_per_s'] / 1e9)} GB/s); "
        f"a-priori regimes below the knee: {', '.join(regimes) or 'none'}; "
        f"free-batching limit {s['free_batching_limit']}."
    )
    if t4:
        evidence += (
            f" On the post's T4 the roofline (spec {_fmt(t4['flops_per_s'] / 1e12)} TFLOP/s "
            f"fp32, 320 GB/s) puts B* at {_fmt(t4['critical_batch'])}; the observed ~128 "
            "is later, which the post's missing overhead limit explains."
        )
    if not _knee_inside(s):
        return {"verdict": "refuted on this device", "evidence": evidence}
    if pred / 1.5 <= knee <= pred * 1.5:
        return {"verdict": "confirmed", "evidence": evidence}
    return {
        "verdict": "partly confirmed: a knee exists but not where FLOPS/bandwidth puts it",
        "evidence": evidence,
    }


def c4_knee_across_widths(summaries: list[dict[str, Any]], rows: list[dict[str, Any]]) -> Verdict:
    del rows
    inside = [s for s in summaries if _knee_inside(s)]
    knees = "; ".join(
        f"{s['run']}: {_fmt(s['knee_batch_size'])} [{_fmt(s['knee_low'])}, {_fmt(s['knee_high'])}]"
        for s in summaries
    )
    evidence = f"{len(inside)} of {len(summaries)} widths have a knee inside the sweep. {knees}."
    if len(inside) == len(summaries):
        verdict = "confirmed"
    elif len(inside) * 2 >= len(summaries):
        verdict = "partly confirmed"
    else:
        verdict = "refuted on this device"
    return {"verdict": verdict, "evidence": evidence}


def c5_small_networks(summaries: list[dict[str, Any]], rows: list[dict[str, Any]]) -> Verdict:
    s = min(summaries, key=lambda s: s["params"])
    small = sorted((r for r in rows if r["run"] == s["run"]), key=lambda r: r["batch_size"])
    first, last = small[0], small[-1]
    slowdown = last["latency_s"] / first["latency_s"]
    evidence = (
        f"Smallest network {s['run']} ({s['params']:,} params): batch {first['batch_size']} "
        f"takes {_fmt(first['latency_s'] * 1e6)} µs, batch {last['batch_size']} "
        f"{_fmt(last['latency_s'] * 1e6)} µs ({_fmt(slowdown)}x for "
        f"{last['batch_size'] // first['batch_size']}x the work); fitted overhead floor "
        f"{_fmt(s['overhead_s'] * 1e6)} µs, dispatch floor of a trivial call "
        f"{_fmt(s['dispatch_floor_s'] * 1e6)} µs; predicted regime at batch "
        f"{first['batch_size']}: {first['regime']}; free-batching limit "
        f"{s['free_batching_limit']}."
    )
    # "Almost no scaling": the whole sweep costs less than doubling the smallest batch's time.
    verdict = "confirmed" if slowdown < 2 else "refuted on this device"
    return {"verdict": verdict, "evidence": evidence}


VERDICTS: dict[str, Callable[[list[dict[str, Any]], list[dict[str, Any]]], Verdict]] = {
    "C3": c3_mlp_knee,
    "C4": c4_knee_across_widths,
    "C5": c5_small_networks,
}


def verdicts(
    claim_ids: tuple[str, ...], summaries: list[dict[str, Any]], rows: list[dict[str, Any]]
) -> dict[str, Verdict]:
    """A verdict per requested claim; a claim without a verdict function is 'not tested'."""
    out = {}
    for cid in claim_ids:
        fn = VERDICTS.get(cid)
        if fn is None or not summaries or "knee_batch_size" not in summaries[0]:
            out[cid] = {"verdict": "not tested here", "evidence": "no analysis for this claim"}
        else:
            out[cid] = fn(summaries, rows)
    return out
