"""The serving run's report: capacity per policy, where TPOT rose, the simulator's error.

Sentences compare values only where their intervals part: a p90 carries its 95% interval,
a capacity the bisection's last met and first failed rates.
"""

import json
import math
import os
from typing import Any

import numpy as np

from batching.outputs.doc import Doc
from batching.outputs.serving import COMPARED, by_policy
from batching.text import fmt

# The simulator's error is judged over rates between these shares of the capacity.
JUDGED_SHARES = (0.2, 0.9)


def capacity_sentences(calibrations: dict[str, dict[str, Any]]) -> list[str]:
    """Each pair of policies ranked by capacity, where their bisection intervals part."""
    out, names = [], sorted(calibrations, key=lambda p: -calibrations[p]["capacity_per_s"])
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            ca, cb = calibrations[a], calibrations[b]
            if ca["capacity_per_s"] > cb["upper_per_s"]:
                out.append(
                    f"{a} serves more than {b}: its capacity {fmt(ca['capacity_per_s'])} req/s "
                    f"is above the rate at which {b} failed ({fmt(cb['upper_per_s'])})."
                )
            else:
                out.append(
                    f"{a} and {b} are within the bisection's tolerance of each other "
                    f"({fmt(ca['capacity_per_s'])} and {fmt(cb['capacity_per_s'])} req/s): "
                    "this run does not rank them."
                )
    return out


def tpot_rise(rs: list[dict[str, Any]]) -> str:
    """Where p90 TPOT first rose beyond the lightest rate's interval, as a sentence."""
    base = rs[0]
    for r in rs[1:]:
        if r.get("tpot_p90_low_s", r["tpot_p90_s"]) > base.get("tpot_p90_high_s", math.inf):
            return (
                f"p90 TPOT rose beyond its interval at {fmt(r['request_rate'])} req/s, "
                f"{fmt(r['mean_occupancy'])} busy slots on average: "
                f"{fmt(base['tpot_p90_s'] * 1e3)} ms at {fmt(base['request_rate'])} req/s "
                f"({fmt(base['mean_occupancy'])} slots), {fmt(r['tpot_p90_s'] * 1e3)} ms there."
            )
    return (
        f"p90 TPOT stayed within the lightest rate's interval up to "
        f"{fmt(rs[-1]['request_rate'])} req/s ({fmt(rs[-1]['mean_occupancy'])} busy slots): "
        "over these rates batching cost no time per token."
    )


def settled(rs: list[dict[str, Any]]) -> str:
    """The batch the server settled at: occupancy at the highest rate within the SLOs."""
    met = [r for r in rs if r.get("meets_slo")]
    if not met:
        return "No rate served met the SLOs."
    r = met[-1]
    return (
        f"At {fmt(r['request_rate'])} req/s, the highest rate served within the SLOs, it "
        f"settled at {fmt(r['mean_occupancy'])} busy slots of {r['slots']}."
    )


def decode_knee(workdir: str, max_len: int) -> str:
    """The decode sweep's knee, read from its summary.json, as a sentence ("" without one)."""
    path = os.path.join(workdir, "summary.json")
    if not workdir or not os.path.exists(path):
        return ""
    with open(path) as f:
        found = [s for s in json.load(f) if s.get("knee_batch_size") is not None]
    if not found:
        return f"The decode sweep in {workdir} has no fitted knee."
    s = found[0]
    where = f"cache_len {s.get('cache_len', '?')}"
    same = "" if s.get("cache_len") == max_len else f" (not max_len {max_len}: another context)"
    return (
        f"The decode sweep's knee ({s['run']}, {where}{same}): batch "
        f"{fmt(s['knee_batch_size'])} [{fmt(s.get('knee_low'))}, {fmt(s.get('knee_high'))}]."
    )


def errors(rows: list[dict[str, Any]], prefix: str, name: str) -> list[float]:
    """|<prefix><name> / <name> - 1| over the rows that have both."""
    return [abs(r[prefix + name] / r[name] - 1) for r in rows
            if r.get(prefix + name) is not None and r.get(name)]  # fmt: skip


def judged(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows whose rate is a share of capacity within JUDGED_SHARES."""
    lo, hi = JUDGED_SHARES
    return [r for r in rows if r.get("rate_share") is not None and lo <= r["rate_share"] <= hi]


def error_summary(first: list[dict[str, Any]], rerun=()) -> dict[str, Any]:
    """Per compared metric at the judged shares: the median and max |x / measured - 1|.

    x is the simulator over the costs known before the rate (predicted), over the rate's paid
    costs (replayed), and `rerun`'s row at the same rate (the same policy served again).
    """
    rows, again = judged(first), {r["request_rate"]: r for r in rerun}
    out = {}
    for name in COMPARED:
        got = {
            "predicted": errors(rows, "simulated_", name),
            "replayed": errors(rows, "replayed_", name),
            "rerun": [abs(again[r["request_rate"]][name] / r[name] - 1)
                      for r in rows if r["request_rate"] in again and r.get(name)],
        }  # fmt: skip
        out[name] = {k: {"median": float(np.median(v)), "max": max(v)} if v else None
                     for k, v in got.items()}  # fmt: skip
    return out


def simulator_table(doc: Doc, rows: list[dict[str, Any]]) -> None:
    """Per policy and metric: the median and largest |simulated / measured - 1|, predicted
    from the calibration and replayed over the rate's own costs."""
    lo, hi = JUDGED_SHARES
    table = []
    for policy, rs in by_policy(rows).items():
        for name in COMPARED:
            sim, rep = errors(judged(rs), "simulated_", name), errors(judged(rs), "replayed_", name)
            if sim:
                rep_median = float(np.median(rep)) if rep else None
                table.append([policy, name, len(sim), float(np.median(sim)), max(sim),
                              rep_median, max(rep, default=None)])  # fmt: skip
    if table:
        doc.para(
            f"The simulator against the loop at the rates between {lo:.0%} and {hi:.0%} of "
            "capacity, metric by metric (never only end to end). Predicted: over the costs "
            "known before the rate (the calibration's, refreshed by a short saturated run "
            "where serve.refresh_requests is set). Replayed: over the costs each rate's loop "
            "paid, so the machine's drift is left out."
        )
        doc.table(["policy", "metric", "rates", "predicted median |sim/meas − 1|", "max",
                   "replayed median", "max"], table)  # fmt: skip


def rates_table(doc: Doc, rows: list[dict[str, Any]]) -> None:
    """Every (policy, rate) row: throughput, goodput, p50 and p90 latencies, occupancy."""
    ms = lambda r, k: fmt(r[k] * 1e3)  # noqa: E731
    ci = lambda r, k: (
        f"[{fmt(r.get(k + '_low_s', math.nan) * 1e3)}, {fmt(r.get(k + '_high_s', math.nan) * 1e3)}]"
    )  # noqa: E501, E731
    table = [
        [r["policy"], r["request_rate"], r.get("rate_share"), r["completed"],
         r["output_throughput_per_s"], r["goodput_per_s"], ms(r, "ttft_p50_s"),
         f"{ms(r, 'ttft_p90_s')} {ci(r, 'ttft_p90')}", ms(r, "tpot_p50_s"),
         f"{ms(r, 'tpot_p90_s')} {ci(r, 'tpot_p90')}", r["mean_occupancy"]]
        for rs in by_policy(rows).values() for r in rs
    ]  # fmt: skip
    doc.table(["policy", "req/s", "of capacity", "served", "tok/s", "goodput/s",
               "TTFT p50 ms", "TTFT p90 ms [95%]", "TPOT p50 ms", "TPOT p90 ms [95%]",
               "busy slots"], table)  # fmt: skip


def batchmates(doc: Doc, rows: list[dict[str, Any]]) -> None:
    """Per rate: the requests whose tokens their batch-mates changed, and MoE drop fractions."""
    counted = [r for r in rows if r.get("batchmates_changed") is not None]
    if not counted:
        return
    doc.heading("Batch-mates")
    doc.para(
        "Each served request against the same request served alone on one slot: how many "
        "came out with other tokens. A dense decoder's tokens are its own; an MoE's decode "
        "step routes every slot's token in one group, masked slots included, so batch-mates "
        "can take an expert's capacity. Drop fractions are over a request's decode steps."
    )
    table = [
        [r["policy"], r["request_rate"], r["mean_occupancy"],
         f"{r['batchmates_changed']} of {r['completed']}", r.get("drop_fraction_mean"),
         r.get("drop_fraction_max")]
        for r in counted
    ]  # fmt: skip
    doc.table(["policy", "req/s", "busy slots", "tokens changed", "drop mean", "drop max"], table)


def write(workdir: str, title: str, context: str, rows, calibrations, plot_paths, knee_dir):
    """Writes report.md and report.html for a serving run."""
    doc = Doc()
    doc.heading(f"Serving report: {title}", 1)
    doc.para(context)
    doc.heading("Capacity")
    doc.table(
        ["policy", "capacity req/s", "failed at", "step ms", "insert ms", "prefill ms"],
        [[p, c["capacity_per_s"], c["upper_per_s"], c["costs"]["step_s"] * 1e3,
          c["costs"]["insert_s"] * 1e3,
          ", ".join(f"{b}: {fmt(t * 1e3)}" for b, t in sorted(c["costs"]["prefill_s"].items()))]
         for p, c in calibrations.items()],
    )  # fmt: skip
    for sentence in capacity_sentences(calibrations):
        doc.para(sentence)
    for p, c in calibrations.items():
        for device, w in c.get("whatif", {}).items():
            doc.para(f"What-if, {p} on {device} (datasheet peaks, no overhead: an upper bound): "
                     f"at most {fmt(w['capacity_per_s'])} req/s.")  # fmt: skip
    doc.heading("Where batching stopped being free")
    knee = decode_knee(knee_dir, rows[0]["max_len"]) if rows else ""
    for policy, rs in by_policy(rows).items():
        doc.para(f"{policy}: {settled(rs)} {tpot_rise(rs)}")
    if knee:
        doc.para(knee)
    doc.heading("Rates")
    rates_table(doc, rows)
    simulator_table(doc, rows)
    batchmates(doc, rows)
    for name, path in plot_paths.items():
        doc.image(path, name)
    with open(os.path.join(workdir, "report.md"), "w") as f:
        f.write(doc.markdown(workdir))
    with open(os.path.join(workdir, "report.html"), "w") as f:
        f.write(doc.html(f"Serving report: {title}"))
