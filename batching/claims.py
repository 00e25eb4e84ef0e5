"""The post's claims (shared/ANCHORS.md §1) and the verdict the data gives on each.

A verdict function reads an experiment's run summaries and rows and returns
{"verdict": ..., "evidence": ...}. The evidence quotes the numbers it used;
a claim the data cannot decide says so instead of guessing.
"""

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from batching import specs

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
    knee = s.get("knee_batch_size")
    return knee is not None and math.isfinite(knee) and min(sizes) < knee < max(sizes)


SIMULATION = (
    "not judged: a functional simulation (forced host devices share the same CPU cores, so "
    "their timings say nothing about a device)"
)


def _simulated(summaries: list[dict[str, Any]]) -> bool:
    return any(s.get("functional_simulation") for s in summaries)


def testing_batch(s: dict[str, Any]) -> int:
    """A batch size a sweep must reach to see this run turn compute-bound: 4x the largest of
    the measured B*, the predicted curve's knee and the a-priori crossing, as a power of 2."""
    marks = [
        s.get(k)
        for k in ("predicted_critical_batch", "predicted_curve_knee_batch_size",
                  "predicted_knee_batch_size")
        if s.get(k) is not None and math.isfinite(s.get(k))
    ]  # fmt: skip
    target = 4 * max(marks or [max(s["batch_sizes"])])
    return int(2 ** math.ceil(math.log2(max(target, 2))))


def _regimes_below(rows: list[dict[str, Any]], run: str, below: float) -> list[str]:
    return sorted({r["regime"] for r in rows if r["run"] == run and r["batch_size"] < below})


def t4_sentence(s: dict[str, Any]) -> str:
    """The post's T4 under the roofline for this run's dtype: the datasheet peak that applies
    (or says it has none), its B*, and the post's knee near 128 set against it."""
    t4 = specs.SPECS["T4"]
    f, note = specs.matmul_peak(t4, s["dtype"], s.get("matmul_precision", "default"))
    if f is None:
        return f"The post's T4 cannot run {s['dtype']} matmuls at a datasheet rate ({note})."
    b = specs.critical_batch_size(f, t4.bandwidth_bytes_per_s, s.get("bytes_per_param", 4))
    side = (
        "later than"
        if POST_T4_KNEE > 1.25 * b
        else "earlier than"
        if POST_T4_KNEE < b / 1.25
        else "near"
    )
    return (
        f"On the post's T4 the datasheet ({_fmt(f / 1e12)} TFLOP/s {s['dtype']}"
        + (f", {note}" if note else "")
        + f"; {_fmt(t4.bandwidth_bytes_per_s / 1e9)} GB/s) puts B* at {_fmt(b)}; the post saw "
        f"its MLP slow down near batch {POST_T4_KNEE}, {side} that."
    )


# Where the post's T4 MLP (depth 8, width 1024) started slowing down.
POST_T4_KNEE = 128


def c3_mlp_knee(summaries: list[dict[str, Any]], rows: list[dict[str, Any]]) -> Verdict:
    s = summaries[0]
    if _simulated(summaries):
        return {"verdict": SIMULATION, "evidence": f"Run {s['run']} ran on forced host devices."}
    pred, knee = s["predicted_critical_batch"], s["knee_batch_size"]
    regimes = _regimes_below(rows, s["run"], knee if math.isfinite(knee) else max(s["batch_sizes"]))
    evidence = (
        f"Run {s['run']} on {s['device_kind']}: fitted knee {knee_text(s)}; B* = "
        f"F·bytes/(2·BW) = {_fmt(pred)} from the measured roofs "
        f"({_fmt(s['peak_flops_per_s'] / 1e9)} GFLOP/s, {_fmt(s['peak_bytes_per_s'] / 1e9)} GB/s); "
        f"regimes by intensity below the knee: {', '.join(regimes) or 'none'}; free-batching "
        f"limit {s['free_batching_limit']}. {t4_sentence(s)}"
    )
    if not _knee_inside(s):
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
    if pred / 1.5 <= knee <= pred * 1.5:
        return {"verdict": "confirmed", "evidence": evidence}
    return {
        "verdict": f"partly confirmed: a knee exists, at {_fmt(knee / pred)}x the B* "
        "FLOPS/bandwidth gives",
        "evidence": evidence,
    }


def knee_text(s: dict[str, Any]) -> str:
    """'21.7 [21.2, 22.1] (±2% across passes), fitted on 10 converged of 10 points', or why
    there is no knee or no interval."""
    knee = s.get("knee_batch_size")
    if knee is None or not math.isfinite(knee):
        return "none" + _fit_points(s).replace(", fitted", " (fitted", 1) + ")"
    lo, hi = s["knee_low"], s["knee_high"]
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return f"{_fmt(knee)} (no interval: no timing samples kept)" + _fit_points(s)
    text = f"{_fmt(knee)} [{_fmt(lo)}, {_fmt(hi)}]"
    if s.get("knee_interval_degenerate"):
        text += " (a degenerate interval: the fit sits at an end)"
    else:
        width = (hi - lo) / 2 / knee
        where = "across passes" if s.get("knee_interval_from") == "passes" else "within one pass"
        text += f" (±{width:.0%} {where})"
    return text + _fit_points(s)


def _fit_points(s: dict[str, Any]) -> str:
    """Which points the knee rests on: the converged ones, or all when too few converged."""
    fitted, converged = s.get("knee_fit_points"), s.get("points_converged", s["points"])
    if fitted is not None and fitted > converged:
        return f", fitted on all {fitted} points (only {converged} converged)"
    return f", fitted on {fitted if fitted is not None else '?'} converged of {s['points']} points"


def c4_knee_across_widths(summaries: list[dict[str, Any]], rows: list[dict[str, Any]]) -> Verdict:
    del rows
    if _simulated(summaries):
        return {"verdict": SIMULATION, "evidence": "The widths ran on forced host devices."}
    inside = [s for s in summaries if _knee_inside(s)]
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
    s = min(summaries, key=lambda s: s["params"])
    small = _run_rows(rows, s["run"])
    first, last = small[0], small[-1]
    if _simulated(summaries):
        return {"verdict": SIMULATION, "evidence": f"Run {s['run']} ran on forced host devices."}
    slowdown = last["latency_s"] / first["latency_s"]
    work = last["batch_size"] / first["batch_size"]
    evidence = (
        f"Smallest network {s['run']} ({s['params']:,} params): batch {first['batch_size']} "
        f"takes {_fmt(first['latency_s'] * 1e6)} µs (measured), batch {last['batch_size']} "
        f"{_fmt(last['latency_s'] * 1e6)} µs ({_fmt(slowdown)}x for {_fmt(work)}x the work); "
        f"the fitted model's flat floor {_fmt(s['overhead_s'] * 1e6)} µs (fitted), a trivial "
        f"call's dispatch floor {_fmt(s['dispatch_floor_s'] * 1e6)} µs (measured); regime by "
        f"intensity at batch {first['batch_size']}: {first['regime']}; free-batching limit "
        f"{s['free_batching_limit']}."
    )
    # "Almost no scaling": the whole sweep costs less than doubling the smallest batch's time.
    # Partly: time grows, but by less than a tenth of the work (overhead dominates).
    if slowdown < 2:
        verdict = "confirmed"
    elif slowdown < 0.1 * work:
        verdict = "partly confirmed: latency grows, but far slower than the work"
    else:
        verdict = "refuted on this device"
    return {"verdict": verdict, "evidence": evidence}


def _trend(values: list[float]) -> str:
    """How a quantity moves from the first to the last value ("none" counts as beyond)."""
    first, last = values[0], values[-1]
    if not math.isfinite(last) and math.isfinite(first):
        return "moves out of reach"
    if not (math.isfinite(first) and math.isfinite(last)):
        return "cannot be followed"
    if last < first / 1.25:
        return "falls"
    return "rises" if last > first * 1.25 else "stays about the same"


def c7_decode_like_mlp(summaries: list[dict[str, Any]], rows: list[dict[str, Any]]) -> Verdict:
    decode = sorted(
        (s for s in summaries if s.get("phase") == "decode"), key=lambda s: s["cache_len"]
    )
    if not decode:
        return {"verdict": "not tested here", "evidence": "no decode runs"}
    if _simulated(summaries):
        return {"verdict": SIMULATION, "evidence": "The decode runs ran on forced host devices."}
    short, long_ = decode[0], decode[-1]
    per_context = "; ".join(
        f"cache {s['cache_len']}: fitted knee {knee_text(s)}, predicted-curve knee "
        f"{_fmt(s['predicted_curve_knee_batch_size'])}, a-priori compute crossing "
        f"{_fmt(s['predicted_knee_batch_size'])}, weights-only B* "
        f"{_fmt(s['predicted_critical_batch'])}"
        for s in decode
    )
    fitted = [s["knee_batch_size"] for s in decode]
    crossing = [s["predicted_knee_batch_size"] for s in decode]
    long_rows = _run_rows(rows, long_["run"])
    memory_share = sum(r["regime"] == "memory" for r in long_rows) / max(len(long_rows), 1)
    evidence = (
        f"{per_context}. Knees here are where latency starts to grow (the fitted three-limit "
        "model, and the same fit read off the per-op prediction); the a-priori crossing is "
        "where FLOPs/F overtakes bytes/BW with the KV cache's bytes per sequence (none: never). "
        f"From cache {short['cache_len']} to {long_['cache_len']} the fitted knee "
        f"{_trend(fitted)} ({' → '.join(_fmt(x) for x in fitted)}) and the compute crossing "
        f"{_trend(crossing)} ({' → '.join(_fmt(x) for x in crossing)}). At cache "
        f"{long_['cache_len']}, {memory_share:.0%} of the points are memory-bound by intensity"
    )
    if _trend(crossing) in ("rises", "moves out of reach") and memory_share >= 2 / 3:
        evidence += (
            ": every sequence adds KV-cache bytes that never amortise over the batch, so the "
            "step's growth with the batch is memory traffic, not arithmetic."
        )
    else:
        evidence += "."
    evidence += " " + _c7_cache_reads(decode, rows)
    like_mlp = _knee_inside(short) and (
        short["predicted_critical_batch"] / 2
        <= short["knee_batch_size"]
        <= short["predicted_critical_batch"] * 2
    )
    breaks = _trend(crossing) in ("rises", "moves out of reach") or not _knee_inside(long_)
    if not _knee_inside(short):
        verdict = "not tested by this sweep: no knee at short context"
        evidence += f" Sweep the short context to batch {testing_batch(short)} to test it."
    elif like_mlp and breaks:
        verdict = (
            "partly confirmed: like the MLP at short context; the KV-cache term breaks the "
            "analogy at long context"
        )
    elif like_mlp:
        verdict = "confirmed"
    else:
        verdict = "refuted on this device"
    return {"verdict": verdict, "evidence": evidence}


def _c7_cache_reads(decode: list[dict[str, Any]], rows: list[dict[str, Any]]) -> str:
    """Whether the KV-cache term above is the cache's bytes or the attention's implementation.

    Until the cache layout became a choice (issue 9) the decode attention over a
    [B, S, K, H] cache made XLA transpose the cache before each product: 4-5x the analytic
    bytes and 1-2 GB/s where the cache dominated, so the knee moving in with the context was
    mostly that. The rows say how the attention that ran here reads the cache.
    """
    runs = {s["run"]: s for s in decode}
    points = [r for r in rows if r.get("run") in runs and r.get("phase") == "decode"]
    if not points:
        return ""
    layouts = sorted({str(r.get("cache_layout")) for r in points})
    text = f"The cache was stored as {', '.join(layouts)} (model.cache_layout)."
    # Judge at the longest context, where the cache outweighs everything else a step moves; at
    # short context and large batch XLA's bytes also count activations, which the analytic
    # count leaves out, and the weight matmuls' arithmetic sets the time.
    longest = decode[-1]
    own = [r for r in points if r["run"] == longest["run"] and r.get("achieved_bytes_per_s")]
    if not own:
        return text
    fractions = [r["achieved_bytes_per_s"] / longest["peak_bytes_per_s"] for r in own]
    ratios = [r["xla_bytes_ratio"] for r in own if r.get("xla_bytes_ratio") is not None]
    text += (
        f" At cache {longest['cache_len']} the step moves its analytic bytes at "
        f"{_fmt(min(fractions))}-{_fmt(max(fractions))} of the measured bandwidth"
    )
    if not ratios:
        return text + "."
    text += f" and XLA counts at most {_fmt(max(ratios))}x the analytic bytes"
    if max(ratios) <= 1.5:
        return text + (
            ": the attention reads each sequence's cache once, so the KV-cache growth above "
            "is the cache's own bytes, not a copy made by the implementation."
        )
    return text + (
        ": the attention moves the cache more than once (copies or transposes), so part of "
        "the growth with context is the implementation, not the cache's bytes; judge the "
        "knee with that in mind."
    )


def _loglog_slope(rows: list[dict[str, Any]]) -> float:
    b = np.log([r["batch_size"] for r in rows])
    t = np.log([r["latency_s"] for r in rows])
    return float(np.polyfit(b, t, 1)[0])


def _resnet50(summaries: list[dict[str, Any]], platform: str) -> dict[str, Any] | None:
    return next((s for s in summaries if s.get("depth") == 50 and s["platform"] == platform), None)


def _run_rows(rows: list[dict[str, Any]], run: str) -> list[dict[str, Any]]:
    return sorted((r for r in rows if r["run"] == run), key=lambda r: r["batch_size"])


def c1_resnet_cpu_linear(summaries: list[dict[str, Any]], rows: list[dict[str, Any]]) -> Verdict:
    s = _resnet50(summaries, "cpu")
    if s is None:
        return {"verdict": "not tested here", "evidence": "no ResNet50 run on a CPU"}
    rs = _run_rows(rows, s["run"])
    slope = _loglog_slope(rs)
    best = max(rs, key=lambda r: r["throughput_per_s"])
    gain = best["throughput_per_s"] / rs[0]["throughput_per_s"]
    evidence = (
        f"ResNet50 on {s['device_kind']}: {_fmt(rs[0]['latency_s'] * 1e3)} ms at batch "
        f"{rs[0]['batch_size']}, {_fmt(rs[-1]['latency_s'] * 1e3)} ms at batch "
        f"{rs[-1]['batch_size']}; log-log slope of latency vs batch {_fmt(slope)} (1 = linear); "
        f"the best throughput, at batch {best['batch_size']}, is {_fmt(gain)}x batch "
        f"{rs[0]['batch_size']}'s; fitted knee {knee_text(s)}; regime by intensity at batch "
        f"{rs[0]['batch_size']}: {rs[0]['regime']}."
    )
    verdict = "confirmed" if slope >= 0.8 else "refuted on this device"
    return {"verdict": verdict, "evidence": evidence}


def c2_accelerator_flat(summaries: list[dict[str, Any]], rows: list[dict[str, Any]]) -> Verdict:
    for platform in ("gpu", "tpu"):
        s = _resnet50(summaries, platform)
        if s is not None:
            rs = _run_rows(rows, s["run"])
            ratios = ", ".join(
                f"batch {r['batch_size']}: {_fmt(r['latency_s'] / rs[0]['latency_s'])}x"
                for r in rs[1:4]
            )
            evidence = (
                f"Measured ResNet50 on {s['device_kind']}: latency relative to batch "
                f"{rs[0]['batch_size']}: {ratios}; free-batching limit (no significant "
                f"slowdown) {s['free_batching_limit']}; fitted knee {knee_text(s)}."
            )
            if s["free_batching_limit"] is not None:
                ok = s["free_batching_limit"] >= 2
            else:
                # No samples kept to test a slowdown: the medians, within 10%.
                ok = len(rs) > 1 and rs[1]["latency_s"] <= 1.1 * rs[0]["latency_s"]
                evidence += " Without timing samples the medians decide, within 10%."
            return {"verdict": "confirmed" if ok else "refuted on this device",
                    "evidence": evidence}  # fmt: skip
    s = _resnet50(summaries, "cpu")
    if s is None or "T4" not in s["whatif"]:
        return {"verdict": "not tested here", "evidence": "no accelerator and no T4 what-if"}
    w = s["whatif"]["T4"]
    t4 = w["latency_s"]
    sizes = sorted(t4)
    ratios = ", ".join(f"batch {b}: {_fmt(t4[b] / t4[sizes[0]])}x" for b in sizes[1:4])
    flat = t4[sizes[1]] / t4[sizes[0]] < 1.2
    evidence = (
        "No accelerator ran: this is a prediction, not a measurement. The T4 roofline (spec "
        f"{_fmt(w['flops_per_s'] / 1e12)} TFLOP/s {s['dtype']}, "
        f"{_fmt(w['bandwidth_bytes_per_s'] / 1e9)} GB/s; no overhead term) for ResNet50 gives, "
        f"relative to batch {sizes[0]}: {ratios}."
    )
    if not flat:
        evidence += (
            " By this bound ResNet50's time grows from the first batch sizes on a T4, so a flat "
            "stretch like the post's must come from per-call overhead or from too little work "
            "to fill the GPU at batch 1-3, which a roofline does not model."
        )
    return {
        "verdict": "predicted: " + ("consistent" if flat else "not explained by the roofline"),
        "evidence": evidence,
    }


def _throughput_gain(rows: list[dict[str, Any]], run: str, up_to: int) -> float:
    """Best throughput at batch <= up_to over the smallest batch's: what batching bought."""
    rs = [r for r in _run_rows(rows, run) if r["batch_size"] <= up_to]
    return max(r["throughput_per_s"] for r in rs) / rs[0]["throughput_per_s"]


def c6_convolutions_reuse_weights(
    summaries: list[dict[str, Any]], rows: list[dict[str, Any]]
) -> Verdict:
    """Controlled: a conv stack against dense stacks with the same weights per layer, one with
    the same FLOPs (a token per output position) and one with a single token."""
    if _simulated(summaries):
        return {"verdict": SIMULATION, "evidence": "The networks ran on forced host devices."}
    conv = next((s for s in summaries if s["model"] == "conv_stack"), None)
    if conv is None:
        return _c6_resnet_only(summaries, rows)
    width = 3 * conv["channels"]  # kernel 3: a layer of k²C² weights is a dense layer of width kC
    same_flops = next(
        (s for s in summaries if s["model"] == "mlp" and s.get("width") == width
         and s.get("tokens") == conv["image_size"] ** 2), None)  # fmt: skip
    one_token = next(
        (s for s in summaries if s["model"] == "mlp" and s.get("width") == width
         and s.get("tokens") == 1), None)  # fmt: skip
    if same_flops is None or one_token is None:
        why = (
            f"needs both dense stacks beside the convolutions (width {width}, 1 and "
            f"{conv['image_size'] ** 2} tokens)"
        )
        return {"verdict": "not tested here", "evidence": why}
    up_to = min(max(s["batch_sizes"]) for s in (conv, same_flops, one_token))
    gains = {
        s["run"]: _throughput_gain(rows, s["run"], up_to) for s in (conv, same_flops, one_token)
    }
    g_conv, g_flops, g_one = gains[conv["run"]], gains[same_flops["run"]], gains[one_token["run"]]
    evidence = (
        f"Up to batch {up_to}, batching raised throughput {_fmt(g_conv)}x for the "
        f"convolutions ({conv['run']}, {conv['params']:,} params, each weight used "
        f"{conv['image_size'] ** 2} times per example), {_fmt(g_flops)}x for a dense stack with "
        f"the same weights and FLOPs ({same_flops['run']}) and {_fmt(g_one)}x for the same "
        f"dense stack on one token per example ({one_token['run']}). Regimes by intensity at "
        f"batch 1: {_first_regime(rows, conv['run'])}, {_first_regime(rows, same_flops['run'])}, "
        f"{_first_regime(rows, one_token['run'])}."
    )
    less = g_conv < g_one / 1.5
    like_dense = g_flops / 1.5 <= g_conv <= g_flops * 1.5
    if less and like_dense:
        return {"verdict": "confirmed, and it is the reuse, not the convolution: dense layers "
                "with the same reuse gain as little", "evidence": evidence}  # fmt: skip
    if less:
        return {"verdict": "confirmed", "evidence": evidence}
    return {"verdict": "refuted on this device", "evidence": evidence}


def _first_regime(rows: list[dict[str, Any]], run: str) -> str:
    return _run_rows(rows, run)[0]["regime"]


def _c6_resnet_only(summaries: list[dict[str, Any]], rows: list[dict[str, Any]]) -> Verdict:
    """Without the controlled stacks: ResNet's per-layer intensity against a dense layer's.
    Not a controlled comparison (different sizes, different work): said so."""
    convs = [s for s in summaries if s.get("intensity_b1")]
    conv = max(convs, key=lambda s: s["params"]) if convs else None
    if conv is None:
        return {"verdict": "not tested here", "evidence": "no convolutional run"}
    kinds = conv["intensity_b1"]
    evidence = (
        f"FLOPs per byte at batch 1 in {conv['run']}: "
        + ", ".join(f"{k} {_fmt(v)}" for k, v in sorted(kinds.items()))
        + f"; a dense layer at batch 1: {_fmt(2 / conv['bytes_per_param'])}. Without a conv "
        "stack and dense stacks of the same weights and FLOPs this compares unlike networks."
    )
    return {"verdict": "not tested here: no controlled comparison", "evidence": evidence}


def c8_moe_routers(summaries: list[dict[str, Any]], rows: list[dict[str, Any]]) -> Verdict:
    """Two or three sentences; the report's router table holds every run's numbers."""
    del rows
    moe = [s for s in summaries if s.get("router")]
    tc = [s for s in moe if s["router"] == "token_choice"]
    ec = [s for s in moe if s["router"] == "expert_choice"]
    if not tc or not ec:
        return {"verdict": "not tested here", "evidence": "needs token- and expert-choice runs"}

    uneven = max(tc, key=lambda s: s.get("load_cv_last") or 0)
    dropping = max(tc, key=lambda s: s.get("drop_fraction_last") or 0)
    ec_cv = max(s.get("load_cv_last") or 0 for s in ec)
    last_b = max(uneven["batch_sizes"])
    evidence = (
        f"Token-choice spread the batch unevenly: load CV up to "
        f"{_fmt(uneven.get('load_cv_last'))} ({uneven['run']}) and up to "
        f"{_fmt(dropping.get('drop_fraction_last'))} of assignments dropped "
        f"({dropping['run']}) at batch {last_b}, while expert-choice's load CV is "
        f"{_fmt(ec_cv)} by construction."
    )
    spread = (uneven.get("load_cv_last") or 0) > 0.05 and ec_cv < 0.05
    probed = [s for s in ec if s.get("cross_sequence_logit_change") is not None]
    if not probed:
        evidence += (
            " Whether expert-choice is awkward for autoregressive decoding is not tested by "
            "this experiment (no decode step was probed; moe_router_ablation probes one)."
        )
        aux = _aux_comparison(tc)
        return {
            "verdict": ("partly tested: " + ("confirmed" if spread else "refuted"))
            + " for the spread; the decoding part not tested here",
            "evidence": evidence + (" " + aux if aux else ""),
        }
    coupled = max(probed, key=lambda s: s["cross_sequence_logit_change"])
    ec_coupled = coupled["cross_sequence_logit_change"]
    evidence += (
        f" Expert-choice routes a decode step's tokens as one group: changing another "
        f"sequence's token moved this sequence's logits by up to {_fmt(ec_coupled)} "
        f"({coupled['run']})"
    )
    evidence += (
        ", which breaks the independence autoregressive serving relies on."
        if ec_coupled > 1e-4
        else "; no coupling was seen."
    )
    aux = _aux_comparison(tc)
    if aux:
        evidence += " " + aux
    confirmed = spread and ec_coupled > 1e-4
    return {"verdict": "confirmed" if confirmed else "partly confirmed", "evidence": evidence}


def _aux_comparison(tc: list[dict[str, Any]]) -> str:
    """One sentence on aux off / per group / over the batch, among token-choice runs that
    share router, k and capacity factor (the ablation's scope axis); '' if fewer than two."""
    by_setting: dict[tuple, dict[str, dict[str, Any]]] = {}
    for s in tc:
        label = (
            "over the batch"
            if s.get("aux_loss_weight") and s.get("aux_loss_scope") == "batch"
            else "per group"
            if s.get("aux_loss_weight")
            else "off"
        )
        key = (s.get("top_k"), s.get("capacity_factor"))
        by_setting.setdefault(key, {}).setdefault(label, s)
    (k, cf), runs = max(by_setting.items(), key=lambda kv: len(kv[1]))
    if len(runs) < 2:
        return ""
    order = [label for label in ("off", "per group", "over the batch") if label in runs]
    return (
        f"Aux loss {' / '.join(order)} (token-choice k={k}, capacity {_fmt(cf)}, same seed): "
        f"held-out loss {' / '.join(_fmt(runs[o].get('heldout_loss')) for o in order)}, "
        f"held-out load CV {' / '.join(_fmt(runs[o].get('heldout_load_cv')) for o in order)}, "
        f"drop fraction at the last batch "
        f"{' / '.join(_fmt(runs[o].get('drop_fraction_last')) for o in order)}."
    )


VERDICTS: dict[str, Callable[[list[dict[str, Any]], list[dict[str, Any]]], Verdict]] = {
    "C1": c1_resnet_cpu_linear,
    "C2": c2_accelerator_flat,
    "C3": c3_mlp_knee,
    "C4": c4_knee_across_widths,
    "C5": c5_small_networks,
    "C6": c6_convolutions_reuse_weights,
    "C7": c7_decode_like_mlp,
    "C8": c8_moe_routers,
}


def verdicts(
    claim_ids: tuple[str, ...], summaries: list[dict[str, Any]], rows: list[dict[str, Any]]
) -> dict[str, Verdict]:
    """A verdict per requested claim; a claim without a verdict function is 'not tested'.

    A verdict fits trends within runs, so runs with fewer than MIN_POINTS ok batch sizes are
    left out of what it reads (named in its evidence); with none left it is 'not enough points'.
    """
    out = {}
    enough = [s for s in summaries if s.get("points", 0) >= MIN_POINTS]
    short = sorted(s["run"] for s in summaries if s not in enough)
    kept = {s["run"] for s in enough}
    enough_rows = [r for r in rows if r["run"] in kept]
    for cid in claim_ids:
        fn = VERDICTS.get(cid)
        if fn is None or not summaries or "knee_batch_size" not in summaries[0]:
            out[cid] = {"verdict": "not tested here", "evidence": "no analysis for this claim"}
        elif not enough:
            fewest = min(s.get("points", 0) for s in summaries)
            out[cid] = not_enough_points(f"a run has {fewest} measured batch sizes")
        else:
            try:
                out[cid] = fn(enough, enough_rows)
            except (np.linalg.LinAlgError, ValueError, ZeroDivisionError, FloatingPointError) as e:
                # A degenerate sweep (equal latencies, one size per run) must not end the report.
                out[cid] = not_enough_points(f"{type(e).__name__}: {e}")
                continue
            if short:
                out[cid]["evidence"] += (
                    f" (runs with fewer than {MIN_POINTS} ok batch sizes left out: "
                    f"{', '.join(short)})"
                )
    return out


# A verdict fits a trend: fewer measured batch sizes in a run than this give none.
MIN_POINTS = 3


def not_enough_points(why: str) -> Verdict:
    return {
        "verdict": "not enough points",
        "evidence": f"{why}; a verdict needs at least {MIN_POINTS} ok points per run",
    }
