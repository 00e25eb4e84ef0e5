"""Verdicts on the claims about other models. C1 and C2 judge ResNet50 on a CPU and on an
accelerator. C6 sets convolutions against matmuls. C7 judges KV-cache decoding, C8 MoE routers."""

import math
from typing import Any

from batching.predict import seeds as seeds_lib
from batching.predict import verdict
from batching.predict.verdict import (
    SIMULATION,
    Verdict,
    against_band,
    first_regime,
    fmt,
    knee_inside,
    knee_text,
    knee_trend,
    loglog_slope,
    resnet50,
    run_rows,
    simulated,
    testing_batch,
    throughput_gain,
    trend,
)

# C2: a T4 curve is flat while the second batch costs under this factor of the first.
FLAT_GROWTH = 1.2
BALANCED_VIO = 0.05  # C8: MaxVio above it is an uneven spread over experts


def c7_decode_like_mlp(summaries: list[dict[str, Any]], rows: list[dict[str, Any]]) -> Verdict:
    """C7 over the decode runs, shortest cache to longest. At short context the knee should
    lie near the weights-only B*, like the MLP's. At long context the KV cache may break it."""
    decode = sorted(
        (s for s in summaries if s.get("phase") == "decode"), key=lambda s: s["cache_len"]
    )
    if not decode:
        return {"verdict": "not tested here", "evidence": "no decode runs"}
    if simulated(summaries):
        return {"verdict": SIMULATION, "evidence": "The decode runs ran on forced host devices."}
    short, long_ = decode[0], decode[-1]
    per_context = "; ".join(
        f"cache {s['cache_len']}: fitted knee {knee_text(s)}, predicted-curve knee "
        f"{fmt(s['predicted_curve_knee_batch_size'])}, a-priori compute crossing "
        f"{fmt(s['predicted_knee_batch_size'])}, weights-only B* "
        f"{fmt(s['predicted_critical_batch'])}"
        for s in decode
    )
    fitted = [s["knee_batch_size"] for s in decode]
    crossing = [s["predicted_knee_batch_size"] for s in decode]
    long_rows = run_rows(rows, long_["run"])
    memory_share = sum(r["regime"] == "memory" for r in long_rows) / max(len(long_rows), 1)
    evidence = (
        f"{per_context}. Knees here are where latency starts to grow (the fitted three-limit "
        "model, and the same fit read off the per-op prediction); the a-priori crossing is "
        "where FLOPs/F overtakes bytes/BW with the KV cache's bytes per sequence (none: never). "
        f"From cache {short['cache_len']} to {long_['cache_len']} the fitted knee "
        f"{knee_trend(decode)} ({' → '.join(fmt(x) for x in fitted)}) and the compute crossing "
        f"{trend(crossing)} ({' → '.join(fmt(x) for x in crossing)}). At cache "
        f"{long_['cache_len']}, {memory_share:.0%} of the points are memory-bound by intensity"
    )
    if trend(crossing) in ("rises", "moves out of reach") and memory_share >= 2 / 3:
        evidence += (
            ": every sequence adds KV-cache bytes that never amortise over the batch, so the "
            "step's growth with the batch is memory traffic, not arithmetic."
        )
    else:
        evidence += "."
    evidence += " " + c7_cache_reads(decode, rows)
    b_star = short["predicted_critical_batch"]
    like_mlp = knee_inside(short) and against_band(
        short["knee_batch_size"], short.get("knee_low"), short.get("knee_high"),
        b_star / 2, b_star * 2,
    ) != "outside"  # fmt: skip
    breaks = trend(crossing) in ("rises", "moves out of reach") or not knee_inside(long_)
    if not knee_inside(short):
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


def c7_cache_reads(decode: list[dict[str, Any]], rows: list[dict[str, Any]]) -> str:
    """Whether the KV-cache term above is the cache's bytes or the attention's implementation.

    Some layouts make XLA transpose the cache before each product. A step then moves several
    times the analytic bytes. The knee then moves in with the context for that reason alone.
    The rows say how the attention that ran here reads the cache.
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
        f"{fmt(min(fractions))}-{fmt(max(fractions))} of the measured bandwidth"
    )
    if not ratios:
        return text + "."
    text += f" and XLA counts at most {fmt(max(ratios))}x the analytic bytes"
    if max(ratios) <= verdict.AGREE:
        return text + (
            ": the attention reads each sequence's cache once, so the KV-cache growth above "
            "is the cache's own bytes, not a copy made by the implementation."
        )
    return text + (
        ": the attention moves the cache more than once (copies or transposes), so part of "
        "the growth with context is the implementation, not the cache's bytes; judge the "
        "knee with that in mind."
    )


def c1_resnet_cpu_linear(summaries: list[dict[str, Any]], rows: list[dict[str, Any]]) -> Verdict:
    """C1 on the CPU's ResNet50 run. It is confirmed when latency's log-log slope against
    batch size is at least 0.8."""
    s = resnet50(summaries, "cpu")
    if s is None:
        return {"verdict": "not tested here", "evidence": "no ResNet50 run on a CPU"}
    rs = run_rows(rows, s["run"])
    slope = s.get("loglog_slope", loglog_slope(rs))
    lo, hi = s.get("loglog_slope_low"), s.get("loglog_slope_high")
    best = max(rs, key=lambda r: r["throughput_per_s"])
    gain = best["throughput_per_s"] / rs[0]["throughput_per_s"]
    evidence = (
        f"ResNet50 on {s['device_kind']}: {fmt(rs[0]['latency_s'] * 1e3)} ms at batch "
        f"{rs[0]['batch_size']}, {fmt(rs[-1]['latency_s'] * 1e3)} ms at batch "
        f"{rs[-1]['batch_size']}; log-log slope of latency against batch size {slope:.2f}"
        + (f" [{lo:.2f}, {hi:.2f}]" if lo is not None and math.isfinite(lo) else "")
        + " (1 = linear); "
        f"the best throughput, at batch {best['batch_size']}, is {fmt(gain)}x batch "
        f"{rs[0]['batch_size']}'s; fitted knee {knee_text(s)}; regime by intensity at batch "
        f"{rs[0]['batch_size']}: {rs[0]['regime']}."
    )
    # Linear enough: a slope of at least 0.8, judged on its interval where it has one.
    band = against_band(slope, lo, hi, 0.8, math.inf)
    verdict = {
        "inside": "confirmed",
        "outside": "refuted on this device",
        "straddles": "not determined: the slope's 95% interval reaches 0.8",
    }[band]
    return {"verdict": verdict, "evidence": evidence}


def c2_accelerator_flat(summaries: list[dict[str, Any]], rows: list[dict[str, Any]]) -> Verdict:
    """C2 on a GPU or TPU ResNet50 run. It is confirmed when the free-batching limit is 2 or
    more. Without such a run, the CPU run's T4 roofline what-if gives a prediction."""
    for platform in ("gpu", "tpu"):
        s = resnet50(summaries, platform)
        if s is not None:
            rs = run_rows(rows, s["run"])
            ratios = ", ".join(
                f"batch {r['batch_size']}: {fmt(r['latency_s'] / rs[0]['latency_s'])}x"
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
    s = resnet50(summaries, "cpu")
    if s is None or "T4" not in s["whatif"]:
        return {"verdict": "not tested here", "evidence": "no accelerator and no T4 what-if"}
    w = s["whatif"]["T4"]
    t4 = w["latency_s"]
    sizes = sorted(t4)
    ratios = ", ".join(f"batch {b}: {fmt(t4[b] / t4[sizes[0]])}x" for b in sizes[1:4])
    flat = t4[sizes[1]] / t4[sizes[0]] < FLAT_GROWTH
    evidence = (
        "No accelerator ran: this is a prediction, not a measurement. The T4 roofline (spec "
        f"{fmt(w['flops_per_s'] / 1e12)} TFLOP/s {s['dtype']}, "
        f"{fmt(w['bandwidth_bytes_per_s'] / 1e9)} GB/s; no overhead term) for ResNet50 gives, "
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


def c6_convolutions_reuse_weights(
    summaries: list[dict[str, Any]], rows: list[dict[str, Any]]
) -> Verdict:
    """C6, controlled: a conv stack against dense stacks with the same weights per layer. One
    stack has the same FLOPs (a token per output position). The other has a single token."""
    if simulated(summaries):
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
        s["run"]: throughput_gain(rows, s["run"], up_to) for s in (conv, same_flops, one_token)
    }
    g_conv, g_flops, g_one = gains[conv["run"]], gains[same_flops["run"]], gains[one_token["run"]]
    evidence = (
        f"Up to batch {up_to}, batching raised throughput {fmt(g_conv)}x for the "
        f"convolutions ({conv['run']}, {conv['params']:,} params, each weight used "
        f"{conv['image_size'] ** 2} times per example), {fmt(g_flops)}x for a dense stack with "
        f"the same weights and FLOPs ({same_flops['run']}) and {fmt(g_one)}x for the same "
        f"dense stack on one token per example ({one_token['run']}). Regimes by intensity at "
        f"batch 1: {first_regime(rows, conv['run'])}, {first_regime(rows, same_flops['run'])}, "
        f"{first_regime(rows, one_token['run'])}."
    )
    less = g_conv < g_one / verdict.AGREE
    like_dense = g_flops / verdict.AGREE <= g_conv <= g_flops * verdict.AGREE
    if less and like_dense:
        return {"verdict": "confirmed, and it is the reuse, not the convolution: dense layers "
                "with the same reuse gain as little", "evidence": evidence}  # fmt: skip
    if less:
        return {"verdict": "confirmed", "evidence": evidence}
    return {"verdict": "refuted on this device", "evidence": evidence}


def _c6_resnet_only(summaries: list[dict[str, Any]], rows: list[dict[str, Any]]) -> Verdict:
    """Without the controlled stacks: ResNet's per-layer intensity against a dense layer's.
    Sizes and work differ, so this is no controlled comparison. The evidence says so."""
    convs = [s for s in summaries if s.get("intensity_b1")]
    conv = max(convs, key=lambda s: s["params"]) if convs else None
    if conv is None:
        return {"verdict": "not tested here", "evidence": "no convolutional run"}
    kinds = conv["intensity_b1"]
    evidence = (
        f"FLOPs per byte at batch 1 in {conv['run']}: "
        + ", ".join(f"{k} {fmt(v)}" for k, v in sorted(kinds.items()))
        + f"; a dense layer at batch 1: {fmt(2 / conv['bytes_per_param'])}. Without a conv "
        "stack and dense stacks of the same weights and FLOPs this compares unlike networks."
    )
    return {"verdict": "not tested here: no controlled comparison", "evidence": evidence}


def c8_moe_routers(summaries: list[dict[str, Any]], rows: list[dict[str, Any]]) -> Verdict:
    """C8 in two to four sentences; the router table holds the rest. They give each router's
    MaxVio at the largest batch, the cross-sequence probe's leaks (another sequence's token
    changing an output), and what balancing did beyond the seed spread."""
    del rows
    moe = [s for s in summaries if s.get("router")]
    tc = [s for s in moe if s["router"] == "token_choice"]
    ec = [s for s in moe if s["router"] == "expert_choice"]
    if not tc or not ec:
        return {"verdict": "not tested here", "evidence": "needs token- and expert-choice runs"}
    evidence, spread = _spread_sentence(tc, ec)
    probe, leaks = _probe_sentence(tc, ec)
    balance = balancing_comparison(tc)
    evidence += " " + (probe or _NOT_PROBED) + (" " + balance if balance else "")
    if not probe:
        verdict = "partly tested: " + ("confirmed" if spread else "refuted")
        return {"verdict": verdict + " for the spread; the decoding part not tested here",
                "evidence": evidence}  # fmt: skip
    if spread and leaks:
        return {"verdict": "confirmed", "evidence": evidence}
    if spread or leaks:
        return {"verdict": "partly confirmed", "evidence": evidence}
    return {"verdict": "refuted on this model", "evidence": evidence}


_NOT_PROBED = (
    "Whether expert-choice is awkward for autoregressive decoding is not tested by this "
    "experiment (no decode step was probed; moe_router_ablation probes each one)."
)


def _max_vio(s: dict[str, Any]) -> float:
    """A run's MaxVio at its largest batch, with the decode step's tokens pooled. A row
    without MaxVio gives its max/mean load there minus 1."""
    vio = s.get("max_vio_batch_last")
    if vio is None and s.get("max_mean_load_last") is not None:
        vio = s["max_mean_load_last"] - 1.0
    return vio if vio is not None else 0.0


def _spread_sentence(tc: list[dict[str, Any]], ec: list[dict[str, Any]]) -> tuple[str, bool]:
    """The spread of the batch over experts. It sets the most uneven token-choice run
    against expert-choice's MaxVio. It also names the token-choice run that drops most."""
    uneven = max(tc, key=_max_vio)
    dropping = max(tc, key=lambda s: s.get("drop_fraction_last") or 0)
    ec_vio = max(_max_vio(s) for s in ec)
    text = (
        f"Token-choice spread the batch unevenly: MaxVio (max/mean tokens per expert − 1) up "
        f"to {fmt(_max_vio(uneven))} ({uneven['run']}) and up to "
        f"{fmt(dropping.get('drop_fraction_last'))} of assignments dropped "
        f"({dropping['run']}) at batch {max(uneven['batch_sizes'])}, while expert-choice's "
        f"MaxVio is {fmt(ec_vio)} by construction."
    )
    return text, _max_vio(uneven) > BALANCED_VIO and ec_vio < BALANCED_VIO


def _probe_sentence(tc: list[dict[str, Any]], ec: list[dict[str, Any]]) -> tuple[str, bool]:
    """The cross-sequence probe by router. How often did other sequences' tokens change a
    sequence's output? It is '' where no expert-choice run was probed."""
    probed = [s for s in (*tc, *ec) if s.get("cross_seq_leak_fraction_max") is not None]
    ec_probed = [s for s in probed if s["router"] == "expert_choice"]
    if not ec_probed:
        return "", False
    worst = max(ec_probed, key=lambda s: s["cross_seq_leak_fraction_max"])
    text = (
        f"Changing the other sequences' next tokens of a decode step changed a sequence's "
        f"logits in {worst['cross_seq_leak_fraction_max']:.0%} of the trials under "
        f"expert-choice ({worst['run']}, batch {worst['cross_seq_leak_batch']}, by up to "
        f"{fmt(worst['cross_seq_max_change'])})"
    )
    dropless = [s for s in probed if s["router"] == "token_choice" and not s["capacity_factor"]]
    capped = [s for s in probed if s["router"] == "token_choice" and s["capacity_factor"]]
    if dropless:
        trials = sum(s.get("cross_seq_trials_total", s["cross_seq_trials"]) for s in dropless)
        leaked = max(s["cross_seq_leak_fraction_max"] for s in dropless)
        text += f"; dropless token-choice in {leaked:.0%} of {trials} trials"
    if capped:
        c = max(capped, key=lambda s: s["cross_seq_leak_fraction_max"])
        text += (
            f"; capacity-based token-choice in up to {c['cross_seq_leak_fraction_max']:.0%} "
            f"({c['run']}: where its group drops, a token's slot depends on the others)"
        )
    return text + ".", worst["cross_seq_leak_fraction_max"] > 0


def balancing_comparison(tc: list[dict[str, Any]]) -> str:
    """One sentence on balancing in capacity-based token-choice at one router k and capacity.
    The settings are none, aux (per group or over the batch), loss-free bias, or both.
    It gives held-out loss and global MaxVio as means with 95% intervals over seeds. It names
    the pairs that differ beyond the seed spread. It is '' with fewer than two settings."""
    by_key: dict[tuple, dict[str, seeds_lib.Setting]] = {}
    for setting in seeds_lib.group([s for s in tc if s.get("capacity_factor")]):
        s = setting.first
        key = (s.get("top_k"), s.get("capacity_factor"))
        by_key.setdefault(key, {}).setdefault(seeds_lib.balancing(s), setting)
    if not by_key:
        return ""
    (k, cf), settings = max(by_key.items(), key=lambda kv: len(kv[1]))
    if len(settings) < 2:
        return ""
    n = min(st.seeds for st in settings.values())
    names = list(settings)
    loss = "; ".join(f"{b} {st.text('heldout_loss')}" for b, st in settings.items())
    vio = "; ".join(f"{b} {st.text('heldout_max_vio_global')}" for b, st in settings.items())
    differ = [
        f"{a} vs {b} in {what}"
        for i, a in enumerate(names)
        for b in names[i + 1 :]
        for field, what in (("heldout_loss", "loss"), ("heldout_max_vio_global", "MaxVio"))
        if seeds_lib.differs(settings[a], settings[b], field)
    ]
    seeds = f"{n} seeds each, means [95% intervals]" if n > 1 else "one seed each"
    verdict = (
        "beyond the seed spread: " + ", ".join(differ)
        if differ
        else "no difference exceeds the seed spread (indistinguishable at this scale)"
        if n > 1
        else "one seed cannot tell a difference from seed noise"
    )
    return (
        f"Balancing at token-choice k={k}, capacity {fmt(cf)} ({seeds}): held-out loss "
        f"{loss}; held-out MaxVio (global) {vio}; {verdict}."
    )
