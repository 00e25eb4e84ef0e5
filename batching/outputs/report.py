"""Writes <workdir>/report.md and report.html.

The report covers the device, the runs, the plots and a verdict per claim. It is a list of
sections (SECTIONS). Each section is a function that reads the ReportData. It adds its
blocks to the document; a section without data adds nothing. Every number has one of three
sources. They are this workdir's rows and summaries, the cited spec table and archived
sweeps. Archived sweeps are other machines' runs committed to the repository
(batching.outputs.archive). The report labels them archived. The HTML embeds the plots,
so it opens offline.
"""

import math
import os
from typing import Any

from batching.outputs import archive
from batching.outputs.doc import Doc, ReportData
from batching.outputs.report_mesh import mesh_section
from batching.outputs.report_ops import ops_section
from batching.outputs.report_sections import (
    archive_section,
    archived_c2,
    memory_wall,
    peaks_provenance,
    router_section,
    where_time_goes,
)
from batching.outputs.report_timing import noisy_sentence, timing_section
from batching.predict import claims, claims_mlp, verdict
from batching.setup import specs
from batching.text import fmt


def post_corrections(doc: Doc, data: ReportData) -> None:
    """Corrects the post's T4 arithmetic from the spec table, in fp32 and fp16. This run's
    data may show the third limit: the fixed cost per call. Then the section says how it
    moves a knee past B*."""
    analyzed = data.analyzed
    t4 = specs.SPECS["T4"]
    post = specs.critical_batch_size(specs.POST_T4_FLOPS, specs.POST_T4_BANDWIDTH, 2)
    t4_fp32 = specs.critical_batch_size(t4.flops_per_s["float32"], t4.bandwidth_bytes_per_s, 4)
    t4_fp16 = specs.critical_batch_size(t4.flops_per_s["float16"], t4.bandwidth_bytes_per_s, 2)
    doc.heading("What the post's arithmetic gets wrong")
    text = (
        f"The critical batch size of a dense layer is B* = peak FLOP/s × bytes per parameter / "
        f"(2 × bandwidth); it equals FLOPS/bandwidth only for 2-byte weights. The post's inputs "
        f"({fmt(specs.POST_T4_FLOPS / 1e12)} TFLOP/s, {fmt(specs.POST_T4_BANDWIDTH / 1e9)} GB/s, "
        f"2 bytes) give {post:.1f}. But {fmt(specs.POST_T4_FLOPS / 1e12)} TFLOP/s is the T4's fp16 "
        f"tensor-core peak; in fp32 the T4 does {fmt(t4.flops_per_s['float32'] / 1e12)} TFLOP/s at "
        f"{fmt(t4.bandwidth_bytes_per_s / 1e9)} GB/s ({t4.source}), so an "
        f"fp32 MLP has B* ≈ {t4_fp32:.0f}, and an fp16 one ≈ {t4_fp16:.0f}. The knee the post "
        f"saw near {claims_mlp.POST_T4_KNEE} is later than the fp32 figure. This lab models three "
        "limits, t(B) = max(overhead, bytes/BW, flops/F)."
    )
    hidden = [
        s["run"]
        for s in analyzed
        if not s.get("functional_simulation")
        and verdict.knee_inside(s)
        and s["knee_batch_size"] > verdict.AGREE * s["predicted_critical_batch"]
        and s["regimes"].get(min(s["batch_sizes"])) == "overhead"
    ]
    if hidden:
        text += (
            " In this run the third limit shows: for "
            + ", ".join(hidden)
            + " the smallest batch is overhead-bound and the fitted knee lies past B*, the "
            "memory-bound region hidden under the fixed cost per call."
        )
    doc.para(text)


def runs_section(doc: Doc, data: ReportData) -> None:
    """The runs table: one line per run of what was measured. Analysed runs add how far the
    prediction and the fit are. Notes on unconverged points and cost flags follow."""
    summaries, rows, analyzed = data.summaries, data.rows, data.analyzed
    doc.heading("Runs")
    header = [
        "run",
        "params",
        "B first→last",
        "latency first (ms, measured)",
        "latency last (ms, measured)",
        "best throughput (measured)",
        "converged points",
    ]
    if analyzed:
        header += ["pred. err (median)", "fit err (median)", "cost flags"]
    table = []
    for s in summaries:
        unit = s.get("example_unit") or "examples"
        row = [
            s["run"],
            s["params"],
            f"{min(s['batch_sizes'])}→{max(s['batch_sizes'])}",
            s["latency_first_s"] * 1e3,
            s["latency_last_s"] * 1e3,
            f"{fmt(s['best_throughput_per_s'])} {unit}/s at B={s['best_throughput_batch_size']}",
            f"{s.get('points_converged', s['points'])}/{s['points']}",
        ]
        if "knee_batch_size" in s:
            row += [s["prediction_error_median"], s["fit_error_median"], s["cost_mismatches"]]
        table.append(row)
    doc.table(header, table)
    unconverged = [f"{r['run']}@{r['batch_size']}" for r in rows if not r.get("converged", True)]
    if unconverged:
        shown = ", ".join(unconverged[:12]) + (" …" if len(unconverged) > 12 else "")
        doc.para(
            f"Converged points: those whose latency's 95% interval, from the spread between "
            f"their passes, met timing.target_rel_ci. {len(unconverged)} of {len(rows)} did not "
            f"(hollow rings in the plots; the Timing section says why): {shown}."
        )
    if not analyzed:
        return
    doc.para(
        "pred. err and fit err: median over the run's points of |predicted / measured − 1| "
        "for the a-priori per-op roofline (dispatch floor + Σ over the call's ops of "
        "max(bytes / bandwidth, FLOPs / F(op)) + kernel launches) and for the fitted "
        "three-limit model. cost flags: points where XLA's counted FLOPs or bytes differ "
        "from the analytic count by more than the configured tolerance."
    )
    at_peak = [s["run"] for s in summaries if "knee_batch_size" in s and not s.get("shape_aware")]
    if at_peak:
        which = "" if len(at_peak) == len(summaries) else f" ({', '.join(at_peak)})"
        doc.para(
            f"{len(at_peak)} of {len(summaries)} runs{which} priced every op at the device's "
            "peak rates (roofline.shape_aware = False: no per-shape microbenchmarks): for them "
            "the prediction is the roofline's lower bound, not a forecast, and pred. err says "
            "how far below that roof they run."
        )
    cost_flags(doc, rows)


def cost_flags(doc: Doc, rows: list[dict[str, Any]]) -> None:
    """Lists the points where XLA's cost count and the lab's disagree. For ragged products it
    also says why."""
    flagged = [r for r in rows if r.get("cost_mismatch")]
    if flagged:
        doc.para(
            "XLA vs analytic cost disagreements (>tolerance): "
            + "; ".join(
                f"{r['run']} B={r['batch_size']}: flops ×{fmt(r['xla_flops_ratio'])}, "
                f"bytes ×{fmt(r['xla_bytes_ratio'])}"
                for r in flagged[:12]
            )
            + (" …" if len(flagged) > 12 else "")
        )
    ragged = [r for r in flagged if any(o["kind"] == "ragged_gemm" for o in r.get("ops") or [])]
    if ragged:
        ratio = max(r["xla_flops_ratio"] or 0 for r in ragged)
        doc.para(
            f"Of these, {len(ragged)} run ragged products (a dropless MoE): XLA on this backend "
            f"counts a ragged dot as dense over every expert (up to ×{fmt(ratio)} the rows "
            "routed, which is what the lab counts), and times it that way too where it "
            "rewrites it into dense dots (XLA:CPU); the per-op prediction takes the rate a "
            "ragged_dot microbenchmark reached at the op's shape."
        )


def knee_section(doc: Doc, data: ReportData) -> None:
    """The knee table, one row per analysed run. It sets the fitted and predicted knees
    beside B* from the roofs."""
    analyzed = data.analyzed
    if not analyzed:
        return
    doc.heading("Knees and critical batch sizes")
    doc.para(
        "Fitted knee (from the measurements): where the three-limit model fitted to the "
        "converged points' latencies turns compute-bound; its 95% interval comes from "
        "replicates that draw whole passes, the same passes for every point (a slow spell "
        "moves every point timed in it), each fitted like the run: ± its half "
        "width. Predicted-curve knee: the same fit read off the per-op prediction. A-priori "
        "crossing: where FLOPs / F overtakes bytes / BW with the workload's own bytes per "
        "example (activations, a KV cache); none when it never does. B*: F·bytes per "
        "parameter / (2·BW), weights only, from the measured roofs and from the datasheet. "
        "The fitted model's floor, F and BW are fitted parameters, not measurements."
    )
    doc.table(
        [
            "run",
            "fitted knee [95%]",
            "predicted-curve knee [95%]",
            "a-priori crossing",
            "B* (measured roofs)",
            "B* (datasheet)",
            "fitted knee / B*",
            "fitted floor (µs)",
            "fitted F (GFLOP/s)",
            "fitted BW (GB/s)",
            "why they differ",
        ],
        [
            [
                s["run"],
                verdict.knee_text(s),
                verdict.interval_text(
                    s["predicted_curve_knee_batch_size"],
                    s["predicted_curve_knee_low"],
                    s["predicted_curve_knee_high"],
                ),
                s["predicted_knee_batch_size"],
                s["predicted_critical_batch"],
                s["spec_critical_batch"]
                if s.get("spec_critical_batch")
                else f"none: {s.get('spec_note') or 'no spec'}",
                _ratio(s["knee_batch_size"], s["predicted_critical_batch"]),
                _fitted_term(s["overhead_s"] * 1e6, "overhead"),
                _fitted_term(s["effective_flops_per_s"] / 1e9, "compute"),
                _fitted_term(s["effective_bytes_per_s"] / 1e9, "memory"),
                knee_reason(s),
            ]
            for s in analyzed
        ],
    )


def _fitted_term(value: float | None, regime: str) -> Any:
    """A fitted parameter for the knee table, or why it has none. It is "none" where the fit
    put no point in the parameter's regime. The parameter then only keeps its term below the
    others, at 0 or ∞."""
    if value is None or not math.isfinite(value) or value == 0:
        return f"none: no point {regime}-bound"
    return value


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or not b or not math.isfinite(a):
        return None
    return a / b


def knee_reason(s: dict[str, Any]) -> str:
    """Why the fitted knee and B* differ. It says so in one sentence from the run's numbers."""
    knee, b_star = s["knee_batch_size"], s["predicted_critical_batch"]
    crossing = s["predicted_knee_batch_size"]
    first = min(s["batch_sizes"])
    if not verdict.knee_inside(s):
        return (
            f"no knee inside the sweep{verdict.fit_points(s)}; a sweep to batch "
            f"{verdict.testing_batch(s)} would test it"
        )
    ratio = knee / b_star
    predicted = s.get("predicted_curve_knee_batch_size")
    tail = (
        f"; the per-op prediction puts it at {fmt(predicted)}"
        if predicted is not None and math.isfinite(predicted)
        else ""
    )
    if 1 / verdict.AGREE <= ratio <= verdict.AGREE:
        return f"they agree within {fmt(verdict.AGREE)}x{tail}"
    if ratio > verdict.AGREE:
        if s["regimes"].get(first) == "overhead":
            return (
                f"batch {first} is overhead-bound: the fixed cost per call hides the "
                f"memory-bound region, and latency starts growing past B*{tail}"
            )
        if math.isfinite(crossing) and crossing > verdict.AGREE * b_star:
            return (
                "bytes per example besides the weights move compute-bound out to "
                f"{fmt(crossing)}{tail}"
            )
        return f"the rates measured at the small shapes lie below the roofs{tail}"
    if not math.isfinite(crossing) or crossing > b_star:
        return (
            "latency grows before compute-bound: bytes per example (activations, a KV cache) "
            f"grow the memory time with the batch{tail}"
        )
    return f"the per-shape compute rates at these shapes lie below the ceiling{tail}"


def device_section(doc: Doc, data: ReportData) -> None:
    """The Device section: the device, its measured peaks and where they came from. It also
    says whether the runs are a functional simulation on forced host devices."""
    if not data.summaries:
        return
    s0, analyzed = data.summaries[0], data.analyzed
    doc.heading("Device")
    text = f"Platform {s0['platform']}, device kind {s0['device_kind']}."
    if analyzed:
        a = analyzed[0]
        text += (
            f" Measured peaks: matmul {fmt(a['peak_flops_per_s'] / 1e9)} GFLOP/s "
            f"({s0['dtype']}), streaming bandwidth {fmt(a['peak_bytes_per_s'] / 1e9)} GB/s, "
            f"dispatch floor {fmt(a['dispatch_floor_s'] * 1e6)} µs per call, "
            f"{fmt(a['kernel_overhead_s'] * 1e6)} µs per extra kernel."
        )
        if a["spec_device"]:
            text += f" Spec table entry: {a['spec_device']}."
        text += " " + peaks_provenance(analyzed)
    noisy = noisy_sentence(data.summaries)
    doc.para(text + (" " + noisy if noisy else ""))
    if any(r.get("num_devices", 1) > 1 and r.get("platform") == "cpu" for r in data.rows):
        doc.para(
            "Functional simulation: these runs use several forced host devices "
            "(XLA_FLAGS=--xla_force_host_platform_device_count), which share the same "
            "CPU cores, so their timings say nothing about accelerators, and no claim of "
            "the post is judged from them (see 'Devices and interconnect')."
        )


def whatif_section(doc: Doc, data: ReportData) -> None:
    """The first analysed run's ops, priced on the spec table's devices."""
    if not data.analyzed:
        return
    a = data.analyzed[0]
    doc.heading("What-if on spec devices")
    doc.para(
        f"Run {a['run']}'s ops, each at max(bytes / datasheet bandwidth, FLOPs / datasheet "
        "peak), summed (the same per-op model as above; no dispatch floor, no launches, no "
        "cache: per-call overhead there is unmeasured, so these are lower bounds, predictions "
        "rather than measurements)."
    )
    doc.table(
        ["device", "TFLOP/s", "GB/s", "B*", "latency at first B (µs)", "at last B (µs)", "source"],
        [
            [
                name,
                w["flops_per_s"] / 1e12,
                w["bandwidth_bytes_per_s"] / 1e9,
                w["critical_batch"],
                w["latency_s"][min(w["latency_s"])] * 1e6,
                w["latency_s"][max(w["latency_s"])] * 1e6,
                w["source"],
            ]
            for name, w in a["whatif"].items()
        ],
    )


def plots_section(doc: Doc, data: ReportData) -> None:
    """Every figure saved, by name."""
    doc.heading("Plots")
    for name, path in data.plot_paths.items():
        doc.image(path, name)


def claims_section(doc: Doc, data: ReportData) -> None:
    """A verdict per claim the experiment judges. Each comes with the claim and its evidence.
    C2 adds an archived measurement, if any."""
    if not data.verdicts:
        return
    doc.heading("Claims of the post")
    for cid, v in data.verdicts.items():
        doc.heading(f"{cid}: {v['verdict']}", 3)
        doc.para(f"Claim: {claims.CLAIMS[cid]}")
        doc.para(v["evidence"])
        elsewhere = archived_c2(data.archived) if cid == "C2" else None
        if elsewhere:
            doc.para(elsewhere)


# The report, in order; the device-and-interconnect and what-if sections follow the knees.
SECTIONS = (
    device_section,
    runs_section,
    timing_section,
    knee_section,
    where_time_goes,
    ops_section,
    whatif_section,
    mesh_section,
    memory_wall,
    router_section,
    archive_section,
    plots_section,
    claims_section,
    post_corrections,
)


def write(
    workdir: str,
    experiment: str,
    claim_ids: tuple[str, ...],
    summaries: list[dict[str, Any]],
    rows: list[dict[str, Any]],
    plot_paths: dict[str, str],
    archived: list[archive.Archived] = (),
) -> dict[str, verdict.Verdict]:
    """Writes report.md and report.html, section by section. Returns the verdicts by claim."""
    data = ReportData(workdir, experiment, claim_ids, summaries, rows, plot_paths, list(archived))
    data.verdicts = claims.verdicts(claim_ids, data.analyzed, rows)
    doc = Doc()
    doc.heading(f"Batching report: {experiment}", 1)
    for section in SECTIONS:
        section(doc, data)
    with open(os.path.join(workdir, "report.md"), "w") as f:
        f.write(doc.markdown(workdir))
    with open(os.path.join(workdir, "report.html"), "w") as f:
        f.write(doc.html(f"Batching report: {experiment}"))
    return data.verdicts
