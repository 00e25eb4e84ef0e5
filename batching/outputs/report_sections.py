"""Report sections that only some experiments have data for. They are the memory wall, the
routers, the time per op kind and archived sweeps. The module also says where the peaks came
from."""

import datetime
import os
from typing import Any

from batching.measure import stats
from batching.outputs import archive, summary
from batching.outputs.doc import Doc, ReportData
from batching.predict import claims_models, seeds
from batching.setup import specs
from batching.text import fmt


def memory_wall(doc: Doc, data: ReportData) -> None:
    """Where each run's memory wall is here. It also gives the wall on the spec devices."""
    summaries = data.summaries
    doc.heading("Memory wall")
    doc.para(
        "memory_bytes is what XLA's memory analysis says a point's compiled program needs "
        "(arguments + outputs + temporaries − aliased). A line through it against the batch "
        "gives bytes per example (per sequence for a decoder) and the fixed bytes (weights, "
        "buffers); the largest batch that fits is (device memory − fixed) / bytes per example."
    )
    table = []
    for s in summaries:
        wall = (
            f"OOM at batch {s['first_oom_batch']}"
            if s.get("first_oom_batch")
            else "not reached in this sweep"
        )
        table.append(
            [
                s["run"],
                s.get("max_batch_measured"),
                wall,
                s.get("bytes_per_example"),
                s.get("memory_fixed_bytes"),
                s.get("max_batch_predicted"),
                ", ".join(f"{n} {k}" for k, n in s.get("status_counts", {}).items()),
            ]
        )
    doc.table(
        [
            "run",
            "largest ok batch",
            "memory wall here",
            "bytes/example",
            "fixed bytes",
            "largest batch that fits here",
            "points",
        ],
        table,
    )
    lines, ends_at_memory = [], []
    for s in summaries:
        crit = {name: w["critical_batch"] for name, w in s.get("whatif", {}).items()}
        for name, fits in (s.get("whatif_max_batch") or {}).items():
            memory, source = specs.SPECS[name].memory_bytes, specs.SPECS[name].memory_source
            lines.append([s["run"], name, memory / 1e9, fits, crit.get(name), source])
            if fits is not None and crit.get(name) is not None and fits < crit[name]:
                ends_at_memory.append(f"{s['run']} on {name} (fits {fits} < B* {fmt(crit[name])})")
    if not lines:
        doc.para("Not enough points for a memory fit (it needs three batch sizes).")
        return
    doc.table(
        ["run", "spec device", "memory (GB)", "largest batch that fits", "B*", "source"], lines
    )
    if ends_at_memory:
        doc.para("Batching ends at memory, not at compute, for: " + "; ".join(ends_at_memory) + ".")


ROUTER_COLUMNS = (
    "setting",
    "seeds",
    "router",
    "k",
    "capacity",
    "balancing",
    "held-out loss",
    "held-out MaxVio (global)",
    "drop last B",
    "MaxVio first→last B",
    "latency first B (ms)",
    "latency last B (ms)",
    "cross-seq leaks (trials, batch)",
)


def router_section(doc: Doc, data: ReportData) -> None:
    """The router ablation as a table, one row per setting. A row holds its seeds' mean, with
    a 95% interval where there are several. When the experiment judges C8, its verdict follows."""
    moe = [s for s in data.summaries if s.get("router")]
    if not moe:
        return
    doc.heading("Routers")
    doc.table(list(ROUTER_COLUMNS), [_router_row(st) for st in seeds.group(moe)])
    doc.para(
        f"Batches {min(moe[0]['batch_sizes'])} (first) and {max(moe[0]['batch_sizes'])} (last). "
        "Held-out loss (nats/byte) and held-out MaxVio (max/mean tokens per expert − 1 over "
        "the whole held-out set, Wang et al. 2024's global MaxVio) come from training; drop "
        "fraction (assignments lost to capacity) and MaxVio (over the decode step's tokens) "
        "are measured on the decode step at each batch. With several seeds: mean [95% "
        "t-interval over seeds] (with 2 seeds t = 12.7, so wide; not clipped at a number's "
        "bound, so a MaxVio interval can reach below 0). Balancing: aux per group = the "
        "load-balancing loss per routing group, averaged (GShard/Switch/flaxformer/MaxText); "
        "aux over the batch = on "
        "the pooled batch (Qwen 2025, OLMo-core); loss-free bias = a per-expert bias on the "
        "top-k choice moved after each step (Wang et al. 2024; DeepSeek-V3). Capacity 0 is "
        "dropless (nothing can drop). Cross-seq leaks: the share of probe trials in which "
        "changing the other sequences' next tokens changed a sequence's logits, at the batch "
        "where it was largest."
    )
    if "C8" in data.claim_ids:
        verdict = claims_models.c8_moe_routers(data.summaries, [])
        doc.para(f"Verdict on C8 ({verdict['verdict']}): {verdict['evidence']}")


def _router_row(st: seeds.Setting) -> list[Any]:
    """One setting's row of the router table."""
    s = st.first
    token_choice = s["router"] == "token_choice"
    dropless = token_choice and not s.get("capacity_factor")
    vio_first = stats.mean_interval([_max_vio(r, "first") for r in st.runs])[0]
    vio_last = stats.mean_interval([_max_vio(r, "last") for r in st.runs])[0]
    leaks = [r for r in st.runs if r.get("cross_seq_leak_fraction_max") is not None]
    worst = max(leaks, key=lambda r: r["cross_seq_leak_fraction_max"]) if leaks else None
    return [
        st.name,
        st.seeds,
        s["router"],
        s.get("top_k") if token_choice else "–",
        "0 (dropless)" if dropless else s.get("capacity_factor"),
        seeds.balancing(s) if token_choice else "none (balanced by construction)",
        st.text("heldout_loss") if s.get("heldout_loss") is not None else "–",
        st.text("heldout_max_vio_global") if s.get("heldout_max_vio_global") is not None else "–",
        "none possible" if dropless else st.text("drop_fraction_last"),
        f"{fmt(vio_first)}→{fmt(vio_last)}",
        st.interval("latency_first_s")[0] * 1e3,
        st.interval("latency_last_s")[0] * 1e3,
        f"{worst['cross_seq_leak_fraction_max']:.0%} of {worst['cross_seq_trials']}, "
        f"B={worst['cross_seq_leak_batch']}"
        if worst
        else "–",
    ]


def _max_vio(s: dict[str, Any], end: str) -> float | None:
    """A run's MaxVio at its first or last batch (`end`). Summaries without MaxVio give
    max/mean load - 1 instead. That is the same number over the step's tokens."""
    vio = s.get(f"max_vio_batch_{end}")
    load = s.get(f"max_mean_load_{end}")
    return vio if vio is not None else (load - 1.0 if load is not None else None)


def _predicted_parts(
    by_kind: dict[str, dict[str, float]], kinds: dict[str, dict[str, Any]] | None = None
) -> list[str]:
    """Per kind: predicted ms and the limit that set it. `kinds` is a row's predicted_kinds.
    With it, a part names the bound the kind's intensity puts it at. Its shape's measured
    rate may leave it slower than either roof. Then the part adds that rate. For example:
    "gemm <ms> (memory-bound by intensity; <r> GFLOP/s measured at its shape, below both roofs)"."""
    parts = []
    for kind, limits in sorted(by_kind.items()):
        detail = (kinds or {}).get(kind)
        if detail is None:
            parts += [f"{kind} {fmt(t * 1e3)} ({limit})" for limit, t in sorted(limits.items())]
            continue
        text = f"{kind} {fmt(sum(limits.values()) * 1e3)} ({detail['bound']}-bound by intensity"
        if detail.get("slower_than_roofs") and detail.get("flops_per_s"):
            text += (
                f"; {fmt(detail['flops_per_s'] / 1e9)} GFLOP/s measured at its shape, below "
                "both roofs"
            )
        parts.append(text + ")")
    return parts


def _traced_parts(e: dict[str, Any]) -> list[str]:
    """Per kind: predicted ms (summed over limits) → traced ms and kernels per call. The last
    part gives the time outside any op kernel. It stands against the predicted overhead."""
    traced = e["traced"]
    kinds = sorted(set(e["by_kind"]) | (set(traced) - {"other"}))
    parts = []
    for kind in kinds:
        predicted = sum(e["by_kind"].get(kind, {}).values())
        t = traced.get(kind)
        got = f"{fmt(t['seconds'] * 1e3)} ({fmt(t['count'], 2)} kernels)" if t else "–"
        parts.append(f"{kind} {fmt(predicted * 1e3)} → {got}")
    other = traced.get("other", {}).get("seconds")
    parts.append(f"overhead {fmt(e['overhead_s'] * 1e3)} → other {fmt(other * 1e3)}")
    return parts


def where_time_goes(doc: Doc, data: ReportData) -> None:
    """The predicted time per op kind at each run's smallest and largest batch. At every
    profiled point, the traced time per kind stands beside it."""
    table = []
    for s in data.analyzed:
        traced = s.get("traced_breakdown") or {}
        points = {**s.get("breakdown", {}), **traced}
        for batch, e in sorted(points.items(), key=lambda kv: int(kv[0])):
            if e.get("traced"):
                parts = _traced_parts(e)
            elif e.get("traced_ops_error"):
                parts = [
                    *_predicted_parts(e["by_kind"], e.get("kinds")),
                    f"no trace: {e['traced_ops_error']}",
                ]
            else:
                parts = _predicted_parts(e["by_kind"], e.get("kinds"))
            table.append(
                [
                    s["run"],
                    batch,
                    e["predicted_s"] * 1e3,
                    e["traced_s"] * 1e3 if e.get("traced_s") else None,
                    e["measured_s"] * 1e3,
                    e["overhead_s"] * 1e3,
                    "; ".join(parts),
                ]
            )
    if not table:
        return
    doc.heading("Where the time goes")
    doc.para(
        "Predicted milliseconds per op kind at each run's smallest and largest batch, with the "
        "bound each kind's intensity puts it at (its FLOPs at the compute roof against its "
        "bytes at the memory roof: DRAM, or the last-level cache for weights that stay there), "
        "and, where the rate a microbenchmark measured at that shape leaves the kind slower "
        "than either roof (a skinny GEMM), that rate. Overhead is the dispatch floor plus one "
        "launch per kernel. At points with a profiler trace (`profile.batch_sizes`) each "
        "kind reads predicted → traced: the milliseconds per call that the trace's kernels of "
        "that kind took (XLA's HLO instructions, each mapped to a kind from the compiled "
        "program), and how many kernels ran; 'other' is the rest of the traced call (dispatch, "
        "copies, gaps between kernels), to set against the predicted overhead. Traced (ms) is "
        "the wall time of the median traced call (the first is left out), taken with the profiler "
        "running, so it sits a little above the measured median."
    )
    doc.table(
        [
            "run",
            "batch",
            "predicted (ms)",
            "traced (ms)",
            "measured (ms)",
            "overhead (ms)",
            "ops by kind (ms)",
        ],
        table,
    )


def archive_section(doc: Doc, data: ReportData) -> None:
    """The experiment's committed sweeps from other machines (batching.outputs.archive)."""
    archived = data.archived
    if not archived:
        return
    archive_dir = os.path.dirname(os.path.dirname(archived[0].path))
    doc.heading("Measured elsewhere (archived)")
    doc.para(
        f"Sweeps of this experiment committed to the repository from other machines, under "
        f"{archive_dir} (`report.archive_dir`; each device folder's README says what ran "
        "where). They were measured there and then, with that "
        "machine's software, not in this run; the figure 'archive' draws them beside this "
        "run's. Knee and prediction error are those sweeps' own, where their analysis finished."
    )
    table = []
    for a in archived:
        for run, rs in summary.by_run(a.rows).items():
            s = a.summaries.get(run, {})
            rel = archive.relative_latency(a.rows, run)
            table.append(
                [
                    a.name,
                    rs[0].get("device_kind"),
                    run,
                    rs[0].get("dtype") or rs[0].get("param_dtype"),
                    f"{rs[0]['batch_size']}→{rs[-1]['batch_size']}",
                    rs[0]["latency_s"] * 1e3,
                    rs[-1]["latency_s"] * 1e3,
                    ", ".join(f"{b}: {fmt(x)}x" for b, x in rel[1:]),
                    f"{fmt(s.get('knee_batch_size'))} "
                    f"[{fmt(s.get('knee_low'))}, {fmt(s.get('knee_high'))}]"
                    if s
                    else "not analysed",
                    s.get("prediction_error_median"),
                    a.versions,
                ]
            )
    doc.table(
        [
            "folder",
            "device",
            "run",
            "dtype",
            "B first→last",
            "latency first (ms)",
            "latency last (ms)",
            "latency vs first B",
            "fitted knee [95%]",
            "pred. err",
            "software, date",
        ],
        table,
    )


def archived_c2(archived: list[archive.Archived]) -> str | None:
    """C2 on an archived accelerator: ResNet50's latency relative to its smallest batch."""
    for a in archived:
        for run, rs in summary.by_run(a.rows).items():
            if rs[0].get("platform") in ("gpu", "tpu") and rs[0].get("depth") == 50:
                rel = archive.relative_latency(a.rows, run, n=5)
                return (
                    f"Archived measurement, not this run ({a.label}, {a.versions}): ResNet50 on "
                    f"{rs[0].get('device_kind')}, latency relative to batch {rel[0][0]}: "
                    + ", ".join(f"batch {b}: {fmt(x)}x" for b, x in rel[1:])
                    + f"; {fmt(rs[-1]['latency_s'] * 1e3)} ms at batch {rs[-1]['batch_size']}."
                )
    return None


def _check_sentence(check: dict[str, Any] | None) -> str:
    """What this run's check of the cached peaks found (peaks.check_cached)."""
    if not check:
        return "No check of cached peaks (none were cached yet, or roofline.check_peaks is off)."
    now, cached = check["now"], check["cached"]
    numbers = (
        f"matmul {fmt(now['matmul_flops_per_s'] / 1e9)} GFLOP/s now against "
        f"{fmt(cached['matmul_flops_per_s'] / 1e9)} cached, stream read "
        f"{fmt(now['read_bytes_per_s'] / 1e9)} GB/s against "
        f"{fmt(cached['read_bytes_per_s'] / 1e9)}"
    )
    tol = f"{check['tolerance']:.0%}"
    if len(check.get("readings") or []) > 1:
        flops, reads = (" and ".join(fmt(r[k] / 1e9) for r in check["readings"])
                        for k in ("matmul_flops_per_s", "read_bytes_per_s"))  # fmt: skip
        numbers += f"; two readings, matmul {flops} GFLOP/s, stream {reads} GB/s"
        numbers += ", of which the one nearer the cache counts"
    if check["verdict"] == "re-measured":
        return (
            f"This run's check ({numbers}) found the cache slower than the device by more than "
            f"{tol} (filled while the machine was busy?): the peaks and per-shape rates were "
            "measured again."
        )
    if check["verdict"] == "agreed":
        return f"This run's check agreed within {tol} ({numbers})."
    return (
        f"This run's check ({numbers}) read the device more than {tol} slower than when the "
        "peaks were cached: the machine is busier now; the cache was kept, this run's "
        "timings may be slow, and the rates it measured at its shapes were used here but not "
        "saved to the cache (they would skew later runs' predictions)."
    )


def peaks_provenance(analyzed: list[dict[str, Any]]) -> str:
    """Where the peaks and per-shape rates came from. It says what the budget left unmeasured."""
    a = analyzed[0]
    if a.get("peaks_file"):
        text = (
            f"Peaks taken from the file {a['peaks_file']} (measured where the rows were, not "
            "on the machine that wrote this report)."
        )
    else:
        text = "Peaks measured on this device (cached per device)."
    if a.get("peaks_measured_at"):
        when = datetime.datetime.fromtimestamp(a["peaks_measured_at"], datetime.timezone.utc)
        text += f" They were measured {when:%Y-%m-%d %H:%M} UTC."
    if not a.get("peaks_file"):
        text += " " + _check_sentence(a.get("peaks_check"))
    if a.get("peak_flops_source") and a.get("square_matmul_flops_per_s"):
        text += (
            f" The compute roof, {fmt(a['peak_flops_per_s'] / 1e9)} GFLOP/s, is the best rate "
            f"measured in this dtype ({a['peak_flops_source']}"
        )
        if a["peak_flops_per_s"] > a["square_matmul_flops_per_s"]:
            text += (
                f"; the square-matmul microbenchmark alone: "
                f"{fmt(a['square_matmul_flops_per_s'] / 1e9)} GFLOP/s"
            )
        text += "), so no point sits above it."
    if a.get("last_level_cache_bytes"):
        text += (
            f" Last-level cache {fmt(a['last_level_cache_bytes'] / 1e6)} MB "
            f"({a.get('last_level_cache_source') or 'source unknown'})."
        )
    interpolated = sum(s.get("rates_interpolated") or 0 for s in analyzed)
    at_peak = sum(s.get("rates_at_peak") or 0 for s in analyzed)
    if interpolated or at_peak:
        budgets = sorted({s.get("microbenchmark_budget_s") for s in analyzed}, key=str)
        text += (
            f" Per-shape rates not measured (microbenchmark budget {', '.join(map(fmt, budgets))} "
            f"s per run, or a peaks file): {interpolated} interpolated between measured shapes, "
            f"{at_peak} priced at the peak (no measured shape of their family)."
        )
    return text
