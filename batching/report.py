"""<workdir>/report.md and report.html: the device, the runs, the plots and a verdict per claim.

Every number comes from this workdir's rows and summaries, from the cited spec table,
or from sweeps of other machines committed to the repository (batching.archive), which
are labelled archived; the HTML embeds the plots so it opens offline.
"""

import base64
import datetime
import html
import math
import os
from typing import Any

from batching import archive, claims, collectives, plots, specs


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        if not math.isfinite(x):
            return "∞" if x > 0 else "–"
        return f"{x:.{digits}g}"
    return str(x)


class Doc:
    """Blocks rendered both as Markdown and as HTML."""

    def __init__(self):
        self.blocks: list[tuple[str, Any]] = []

    def heading(self, text: str, level: int = 2):
        self.blocks.append(("h", (level, text)))

    def para(self, text: str):
        self.blocks.append(("p", text))

    def table(self, header: list[str], rows: list[list[Any]]):
        self.blocks.append(("table", (header, [[_fmt(c) for c in row] for row in rows])))

    def image(self, path: str, caption: str):
        self.blocks.append(("img", (path, caption)))

    def markdown(self, root: str) -> str:
        out = []
        for kind, v in self.blocks:
            if kind == "h":
                out.append("#" * v[0] + " " + v[1])
            elif kind == "p":
                out.append(v)
            elif kind == "table":
                header, rows = v
                out.append("| " + " | ".join(header) + " |")
                out.append("|" + "---|" * len(header))
                out.extend("| " + " | ".join(row) + " |" for row in rows)
            else:
                out.append(f"![{v[1]}]({os.path.relpath(v[0], root)})")
            out.append("")
        return "\n".join(out)

    def html(self, title: str) -> str:
        out = [
            "<!doctype html><meta charset='utf-8'>",
            f"<title>{html.escape(title)}</title>",
            "<style>body{font-family:sans-serif;max-width:1000px;margin:auto}"
            "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px}"
            "img{max-width:100%}</style>",
        ]
        for kind, v in self.blocks:
            if kind == "h":
                out.append(f"<h{v[0]}>{html.escape(v[1])}</h{v[0]}>")
            elif kind == "p":
                out.append(f"<p>{html.escape(v)}</p>")
            elif kind == "table":
                header, rows = v
                out.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header))
                for row in rows:
                    out.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row))
                out.append("</table>")
            else:
                with open(v[0], "rb") as f:
                    data = base64.b64encode(f.read()).decode()
                out.append(
                    f"<figure><img src='data:image/png;base64,{data}'>"
                    f"<figcaption>{html.escape(v[1])}</figcaption></figure>"
                )
        return "\n".join(out)


def post_corrections(doc: Doc, analyzed: list[dict[str, Any]], rows: list[dict[str, Any]]) -> None:
    """The post's arithmetic corrected from the spec table, and, where this run's own data
    shows it, the third limit that moves a knee past B*."""
    t4 = specs.SPECS["T4"]
    post = specs.critical_batch_size(specs.POST_T4_FLOPS, specs.POST_T4_BANDWIDTH, 2)
    t4_fp32 = specs.critical_batch_size(t4.flops_per_s["float32"], t4.bandwidth_bytes_per_s, 4)
    t4_fp16 = specs.critical_batch_size(t4.flops_per_s["float16"], t4.bandwidth_bytes_per_s, 2)
    doc.heading("What the post's arithmetic gets wrong")
    text = (
        f"The critical batch size of a dense layer is B* = peak FLOP/s × bytes per parameter / "
        f"(2 × bandwidth); it equals FLOPS/bandwidth only for 2-byte weights. The post's inputs "
        f"(65 TFLOP/s, 300 GB/s, 2 bytes) give {post:.1f}. But 65 TFLOP/s is the T4's fp16 "
        f"tensor-core peak; in fp32 the T4 does 8.1 TFLOP/s at 320 GB/s ({t4.source}), so an "
        f"fp32 MLP has B* ≈ {t4_fp32:.0f}, and an fp16 one ≈ {t4_fp16:.0f}. The knee the post "
        f"saw near {claims.POST_T4_KNEE} is later than the fp32 figure. This lab models three "
        "limits, t(B) = max(overhead, bytes/BW, flops/F)."
    )
    hidden = [
        s["run"]
        for s in analyzed
        if not s.get("functional_simulation")
        and claims._knee_inside(s)
        and s["knee_batch_size"] > 1.5 * s["predicted_critical_batch"]
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


def memory_wall(doc: Doc, summaries: list[dict[str, Any]]) -> None:
    """Where each run's memory wall is here, and where it would be on the spec devices."""
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
                ends_at_memory.append(f"{s['run']} on {name} (fits {fits} < B* {_fmt(crit[name])})")
    if not lines:
        doc.para("Not enough points for a memory fit (it needs three batch sizes).")
        return
    doc.table(
        ["run", "spec device", "memory (GB)", "largest batch that fits", "B*", "source"], lines
    )
    if ends_at_memory:
        doc.para("Batching ends at memory, not at compute, for: " + "; ".join(ends_at_memory) + ".")


def _mesh(shape: dict[str, int] | None) -> str:
    shape = shape or {}
    return "×".join(str(shape.get(a, 1)) for a in ("data", "expert", "model"))


def mesh_section(doc: Doc, summaries: list[dict[str, Any]]) -> None:
    """Devices and interconnect: per-device vs global critical batch, the comm term, the
    mesh's measured collective bandwidths next to the spec interconnect, the slowest expert
    device, and the what-if on a multi-GPU node."""
    analyzed = [s for s in summaries if "knee_batch_size" in s]
    meshed = [s for s in analyzed if (s.get("num_devices") or 1) > 1]
    doc.heading("Devices and interconnect")
    if any(s.get("functional_simulation") for s in analyzed):
        doc.para(
            "Functional simulation: these runs use several host devices forced on one CPU "
            "(XLA_FLAGS=--xla_force_host_platform_device_count). The devices share the same "
            "cores and memory, so their timings and collective bandwidths say nothing about "
            "accelerators or their interconnect, and a latency ratio between runs of different "
            "meshes is replicas taken off shared cores, not a speedup from parallelism. What "
            "they show is correctness (the sharded programs run and match one device, "
            "tests/test_mesh.py) and the collectives XLA compiled, against the analytic ones."
        )
    if meshed:
        doc.table(
            [
                "run",
                "mesh data×expert×model",
                "splits the model",
                "predicted B* per device",
                "global",
                "spec B* per device",
                "global",
                "comm bytes/device (last B)",
                "XLA's",
                "comm share of predicted latency",
                "comm bandwidth from",
            ],
            [
                [
                    s["run"],
                    _mesh(s.get("mesh_shape")),
                    _mesh(s.get("parallel_shape") or s.get("mesh_shape")),
                    s["predicted_critical_batch"],
                    s.get("predicted_critical_batch_global"),
                    s["spec_critical_batch"],
                    s.get("spec_critical_batch_global"),
                    s.get("comm_bytes_last"),
                    s.get("xla_comm_bytes_last"),
                    s.get("comm_share_median"),
                    s.get("comm_bandwidth_source") or "–",
                ]
                for s in analyzed
            ],
        )
        doc.para(
            "Splits the model: how many ways each mesh axis divides this run's work (an axis "
            "the model maps nothing to holds replicas and counts 1); the per-device prediction "
            "and the analytic collectives use it. "
            "B* per device is where one device's share of the batch turns compute-bound; each data "
            "replica batches on its own, so the global batch does at B* × data. The comm share is "
            "the median over the run's points of predicted_comm_s / predicted_latency_s: the "
            "call's collectives (TP: 2 all-reduces per layer, Megatron-LM; EP: 2 all-to-alls per "
            "MoE layer, GShard) at the bus bandwidth, added after the compute. XLA's: the "
            "collectives' bytes per device read from the compiled program's HLO."
        )
    measured = [
        [s["run"], axis, kind, bw / 1e9, _spec_gbps(s), s.get("spec_interconnect_source") or "–"]
        for s in meshed
        for axis, by_kind in (s.get("collective_busbw_bytes_per_s") or {}).items()
        for kind, bw in by_kind.items()
    ]
    if measured:
        doc.table(
            [
                "run",
                "mesh axis",
                "collective",
                "measured bus GB/s",
                "spec interconnect GB/s per direction",
                "source",
            ],
            measured,
        )
        doc.para(
            "Bus bandwidth as nccl-tests defines it: algbw (payload per device / time) × "
            "2(n−1)/n for an all-reduce, × (n−1)/n for an all-to-all, comparable to one "
            f"device's link bandwidth per direction; measured with "
            f"{collectives.DEFAULT_PAYLOAD_BYTES >> 20} MiB per device. The comm term takes each "
            "call's collectives at t(S) = α + S/β through this and a "
            f"{collectives.SMALL_PAYLOAD_BYTES >> 10} KiB measurement, so small ones pay "
            "their latency."
        )
    ep = [s for s in analyzed if s.get("device_max_mean_load_first") is not None]
    if ep:
        doc.table(
            [
                "run",
                "router",
                "max/mean load per expert first→last B",
                "max/mean load per device first→last B",
                "drop fraction last B",
                "predicted cost of the slowest device",
            ],
            [
                [
                    s["run"],
                    s.get("router"),
                    f"{_fmt(s.get('max_mean_load_first'))}→{_fmt(s.get('max_mean_load_last'))}",
                    f"{_fmt(s['device_max_mean_load_first'])}→"
                    f"{_fmt(s['device_max_mean_load_last'])}",
                    s.get("drop_fraction_last"),
                    s.get("slowest_device_cost_median"),
                ]
                for s in ep
            ],
        )
        doc.para(
            "With expert parallelism a step waits for its most-loaded device: the predicted "
            "cost is the median over points of predicted latency at device_max_mean_load over "
            "the same prediction with every device at the mean load, minus 1."
        )
    nodes = [(s, name, w) for s in analyzed[:1] for name, w in s.get("whatif_nodes", {}).items()]
    if nodes:
        doc.table(
            [
                "run",
                "node",
                "mesh there",
                "B* per device",
                "global B*",
                "latency first B (µs)",
                "last B (µs)",
                "comm at last B (µs)",
                "source",
            ],
            [
                [
                    s["run"],
                    name,
                    _mesh(w["mesh_shape"]),
                    w["critical_batch"],
                    w["critical_batch_global"],
                    w["latency_s"][min(w["latency_s"])] * 1e6,
                    w["latency_s"][max(w["latency_s"])] * 1e6,
                    w["comm_s"][max(w["comm_s"])] * 1e6,
                    w["source"],
                ]
                for s, name, w in nodes
            ],
        )
        doc.para(
            "The node what-if keeps the run's expert and model axes and fills the node's other "
            "devices with data replicas; per device the datasheet memory and compute limits, "
            "plus the collectives at the node's interconnect (a lower bound, like the what-if "
            "above)."
        )


def _spec_gbps(s: dict[str, Any]) -> float | None:
    bw = s.get("spec_interconnect_bytes_per_s")
    return bw / 1e9 if bw else None


ROUTER_COLUMNS = (
    "run",
    "router",
    "k",
    "capacity factor",
    "aux weight",
    "aux scope",
    "held-out loss",
    "held-out load CV",
    "drop first B",
    "drop last B",
    "max/mean load first→last B",
    "latency first B (ms)",
    "latency last B (ms)",
    "cross-seq logit change",
)


def router_section(doc: Doc, summaries: list[dict[str, Any]], with_verdict: bool) -> None:
    """The router ablation as a table, one row per run that routes, then (`with_verdict`)
    the C8 verdict in two or three sentences."""
    moe = [s for s in summaries if s.get("router")]
    if not moe:
        return
    doc.heading("Routers")
    doc.table(
        list(ROUTER_COLUMNS),
        [
            [
                s["run"],
                s["router"],
                s.get("top_k") if s["router"] == "token_choice" else "–",
                s.get("capacity_factor"),
                s.get("aux_loss_weight", "–"),
                s.get("aux_loss_scope", "–") if s.get("aux_loss_weight") else "–",
                s.get("heldout_loss", "–"),
                s.get("heldout_load_cv", "–"),
                s.get("drop_fraction_first"),
                s.get("drop_fraction_last"),
                f"{_fmt(s.get('max_mean_load_first'))}→{_fmt(s.get('max_mean_load_last'))}",
                s["latency_first_s"] * 1e3,
                s["latency_last_s"] * 1e3,
                s.get("cross_sequence_logit_change", "–"),
            ]
            for s in moe
        ],
    )
    doc.para(
        f"Batches {min(moe[0]['batch_sizes'])} (first) and {max(moe[0]['batch_sizes'])} (last). "
        "Held-out loss in nats/byte and held-out load CV (std/mean tokens per expert, pooled "
        "over the batch) from training; drop fraction (assignments lost to capacity) and "
        "max/mean load (before capacity: the capacity factor that drops nothing) measured on "
        "the decode step at each batch. aux scope: group = load-balancing loss per routing "
        "group, averaged (GShard/Switch/flaxformer/MaxText); batch = over the global batch "
        "(Qwen 2025, OLMo-core)."
    )
    if with_verdict:
        verdict = claims.c8_moe_routers(summaries, [])
        doc.para(f"Verdict on C8 ({verdict['verdict']}): {verdict['evidence']}")


def _predicted_parts(
    by_kind: dict[str, dict[str, float]], kinds: dict[str, dict[str, Any]] | None = None
) -> list[str]:
    """Per kind: predicted ms and the limit that set it; with `kinds` (a row's
    predicted_kinds) also the bound its intensity puts it at, and, where the rate measured
    at its shape leaves it slower than either roof, that rate: "gemm 2.08 (memory-bound by
    intensity; 8.1 GFLOP/s measured at its shape, below both roofs)"."""
    parts = []
    for kind, limits in sorted(by_kind.items()):
        detail = (kinds or {}).get(kind)
        if detail is None:
            parts += [f"{kind} {_fmt(t * 1e3)} ({limit})" for limit, t in sorted(limits.items())]
            continue
        text = f"{kind} {_fmt(sum(limits.values()) * 1e3)} ({detail['bound']}-bound by intensity"
        if detail.get("slower_than_roofs") and detail.get("flops_per_s"):
            text += (
                f"; {_fmt(detail['flops_per_s'] / 1e9)} GFLOP/s measured at its shape, below "
                "both roofs"
            )
        parts.append(text + ")")
    return parts


def _traced_parts(e: dict[str, Any]) -> list[str]:
    """Per kind: predicted ms (summed over limits) → traced ms and kernels per call; then what
    the trace spent outside any op kernel next to the predicted fixed overhead."""
    traced = e["traced"]
    kinds = sorted(set(e["by_kind"]) | (set(traced) - {"other"}))
    parts = []
    for kind in kinds:
        predicted = sum(e["by_kind"].get(kind, {}).values())
        t = traced.get(kind)
        got = f"{_fmt(t['seconds'] * 1e3)} ({_fmt(t['count'], 2)} kernels)" if t else "–"
        parts.append(f"{kind} {_fmt(predicted * 1e3)} → {got}")
    other = traced.get("other", {}).get("seconds")
    parts.append(f"overhead {_fmt(e['overhead_s'] * 1e3)} → other {_fmt(other * 1e3)}")
    return parts


def where_time_goes(doc: Doc, summaries: list[dict[str, Any]]) -> None:
    """Per run, the predicted time per op kind at its smallest and largest batch, and at
    every profiled point the traced time per kind beside it."""
    table = []
    for s in summaries:
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


def archive_section(doc: Doc, archived: list[archive.Archived], archive_dir: str) -> None:
    """The experiment's committed sweeps from other machines (batching.archive)."""
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
        for run, rs in plots.by_run(a.rows).items():
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
                    ", ".join(f"{b}: {_fmt(x)}x" for b, x in rel[1:]),
                    f"{_fmt(s.get('knee_batch_size'))} "
                    f"[{_fmt(s.get('knee_low'))}, {_fmt(s.get('knee_high'))}]"
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


def _archived_c2(archived: list[archive.Archived]) -> str | None:
    """C2 measured on an archived accelerator: ResNet50's latency relative to batch 1."""
    for a in archived:
        for run, rs in plots.by_run(a.rows).items():
            if rs[0].get("platform") in ("gpu", "tpu") and rs[0].get("depth") == 50:
                rel = archive.relative_latency(a.rows, run, n=5)
                return (
                    f"Archived measurement, not this run ({a.label}, {a.versions}): ResNet50 on "
                    f"{rs[0].get('device_kind')}, latency relative to batch {rel[0][0]}: "
                    + ", ".join(f"batch {b}: {_fmt(x)}x" for b, x in rel[1:])
                    + f"; {_fmt(rs[-1]['latency_s'] * 1e3)} ms at batch {rs[-1]['batch_size']}."
                )
    return None


def _check_sentence(check: dict[str, Any] | None) -> str:
    """What this run's check of the cached peaks found (peaks.check_cached)."""
    if not check:
        return "No check of cached peaks (none were cached yet, or roofline.check_peaks is off)."
    now, cached = check["now"], check["cached"]
    numbers = (
        f"matmul {_fmt(now['matmul_flops_per_s'] / 1e9)} GFLOP/s now against "
        f"{_fmt(cached['matmul_flops_per_s'] / 1e9)} cached, stream read "
        f"{_fmt(now['read_bytes_per_s'] / 1e9)} GB/s against "
        f"{_fmt(cached['read_bytes_per_s'] / 1e9)}"
    )
    tol = f"{check['tolerance']:.0%}"
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
        "peaks were cached: the machine is busier now; the cache was kept, and this run's "
        "timings may be slow."
    )


def _peaks_provenance(analyzed: list[dict[str, Any]]) -> str:
    """Where the peaks and per-shape rates came from, and what the budget left unmeasured."""
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
            f" The compute roof, {_fmt(a['peak_flops_per_s'] / 1e9)} GFLOP/s, is the best rate "
            f"measured in this dtype ({a['peak_flops_source']}"
        )
        if a["peak_flops_per_s"] > a["square_matmul_flops_per_s"]:
            text += (
                f"; the square-matmul microbenchmark alone: "
                f"{_fmt(a['square_matmul_flops_per_s'] / 1e9)} GFLOP/s"
            )
        text += "), so no point sits above it."
    if a.get("last_level_cache_bytes"):
        text += (
            f" Last-level cache {_fmt(a['last_level_cache_bytes'] / 1e6)} MB "
            f"({a.get('last_level_cache_source') or 'source unknown'})."
        )
    interpolated = sum(s.get("rates_interpolated") or 0 for s in analyzed)
    at_peak = sum(s.get("rates_at_peak") or 0 for s in analyzed)
    if interpolated or at_peak:
        budgets = sorted({s.get("microbenchmark_budget_s") for s in analyzed}, key=str)
        text += (
            f" Per-shape rates not measured (microbenchmark budget {', '.join(map(_fmt, budgets))} "
            f"s per run, or a peaks file): {interpolated} interpolated between measured shapes, "
            f"{at_peak} priced at the peak (no measured shape of their family)."
        )
    return text


def runs_section(
    doc: Doc,
    summaries: list[dict[str, Any]],
    rows: list[dict[str, Any]],
    analyzed: list[dict[str, Any]],
) -> None:
    """One line per run of what was measured, and how far the prediction and the fit are."""
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
            f"{_fmt(s['best_throughput_per_s'])} {unit}/s at B={s['best_throughput_batch_size']}",
            f"{s.get('points_converged', s['points'])}/{s['points']}",
        ]
        if "knee_batch_size" in s:
            row += [s["prediction_error_median"], s["fit_error_median"], s["cost_mismatches"]]
        table.append(row)
    doc.table(header, table)
    unconverged = [f"{r['run']}@{r['batch_size']}" for r in rows if not r.get("converged", True)]
    if unconverged:
        doc.para(
            f"Converged points: those whose median's 95% interval met the precision target "
            f"(timing.target_rel_ci). {len(unconverged)} of {len(rows)} stopped on their "
            f"budget instead (hollow rings in the plots): {', '.join(unconverged)}."
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
    flagged = [r for r in rows if r.get("cost_mismatch")]
    if flagged:
        doc.para(
            "XLA vs analytic cost disagreements (>tolerance): "
            + "; ".join(
                f"{r['run']} B={r['batch_size']}: flops ×{_fmt(r['xla_flops_ratio'])}, "
                f"bytes ×{_fmt(r['xla_bytes_ratio'])}"
                for r in flagged[:12]
            )
            + (" …" if len(flagged) > 12 else "")
        )


def knee_section(doc: Doc, analyzed: list[dict[str, Any]]) -> None:
    """Per run: the knee as fitted, as predicted, and B* from the roofs, side by side."""
    doc.heading("Knees and critical batch sizes")
    doc.para(
        "Fitted knee (from the measurements): where the three-limit model fitted to the "
        "converged points' medians turns compute-bound; its 95% interval is a bootstrap that "
        "draws each point's sweep pass at random (what moves between passes), ± its half "
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
                claims.knee_text(s),
                f"{_fmt(s['predicted_curve_knee_batch_size'])} "
                f"[{_fmt(s['predicted_curve_knee_low'])}, {_fmt(s['predicted_curve_knee_high'])}]",
                s["predicted_knee_batch_size"],
                s["predicted_critical_batch"],
                s["spec_critical_batch"]
                if s.get("spec_critical_batch")
                else f"none: {s.get('spec_note') or 'no spec'}",
                _ratio(s["knee_batch_size"], s["predicted_critical_batch"]),
                s["overhead_s"] * 1e6,
                s["effective_flops_per_s"] / 1e9,
                s["effective_bytes_per_s"] / 1e9,
                knee_reason(s),
            ]
            for s in analyzed
        ],
    )


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or not b or not math.isfinite(a):
        return None
    return a / b


def knee_reason(s: dict[str, Any]) -> str:
    """One sentence on why the fitted knee and B* differ, from the run's own numbers."""
    knee, b_star = s["knee_batch_size"], s["predicted_critical_batch"]
    crossing = s["predicted_knee_batch_size"]
    first = min(s["batch_sizes"])
    if not claims._knee_inside(s):
        return (
            f"no knee inside the sweep{claims._fit_points(s)}; a sweep to batch "
            f"{claims.testing_batch(s)} would test it"
        )
    ratio = knee / b_star
    predicted = s.get("predicted_curve_knee_batch_size")
    tail = (
        f"; the per-op prediction puts it at {_fmt(predicted)}"
        if predicted is not None and math.isfinite(predicted)
        else ""
    )
    if 1 / 1.5 <= ratio <= 1.5:
        return f"they agree within 1.5x{tail}"
    if ratio > 1.5:
        if s["regimes"].get(first) == "overhead":
            return (
                f"batch {first} is overhead-bound: the fixed cost per call hides the "
                f"memory-bound region, and latency starts growing past B*{tail}"
            )
        if math.isfinite(crossing) and crossing > 1.5 * b_star:
            return (
                "bytes per example besides the weights move compute-bound out to "
                f"{_fmt(crossing)}{tail}"
            )
        return f"the rates measured at the small shapes lie below the roofs{tail}"
    if not math.isfinite(crossing) or crossing > b_star:
        return (
            "latency grows before compute-bound: bytes per example (activations, a KV cache) "
            f"grow the memory time with the batch{tail}"
        )
    return f"the per-shape compute rates at these shapes lie below the ceiling{tail}"


def write(
    workdir: str,
    experiment: str,
    claim_ids: tuple[str, ...],
    summaries: list[dict[str, Any]],
    rows: list[dict[str, Any]],
    plot_paths: dict[str, str],
    archived: list[archive.Archived] = (),
) -> dict[str, claims.Verdict]:
    """Writes report.md and report.html; returns the verdicts."""
    doc = Doc()
    doc.heading(f"Batching report: {experiment}", 1)
    analyzed = [s for s in summaries if "knee_batch_size" in s]
    if summaries:
        s0 = summaries[0]
        doc.heading("Device")
        text = f"Platform {s0['platform']}, device kind {s0['device_kind']}."
        if analyzed:
            a = analyzed[0]
            text += (
                f" Measured peaks: matmul {_fmt(a['peak_flops_per_s'] / 1e9)} GFLOP/s "
                f"({s0['dtype']}), streaming bandwidth {_fmt(a['peak_bytes_per_s'] / 1e9)} GB/s, "
                f"dispatch floor {_fmt(a['dispatch_floor_s'] * 1e6)} µs per call, "
                f"{_fmt(a['kernel_overhead_s'] * 1e6)} µs per extra kernel."
            )
            if a["spec_device"]:
                text += f" Spec table entry: {a['spec_device']}."
            text += " " + _peaks_provenance(analyzed)
        doc.para(text)
        if any(r.get("num_devices", 1) > 1 and r.get("platform") == "cpu" for r in rows):
            doc.para(
                "Functional simulation: these runs use several forced host devices "
                "(XLA_FLAGS=--xla_force_host_platform_device_count), which share the same "
                "CPU cores, so their timings say nothing about accelerators, and no claim of "
                "the post is judged from them (see 'Devices and interconnect')."
            )
    runs_section(doc, summaries, rows, analyzed)
    if analyzed:
        knee_section(doc, analyzed)
        where_time_goes(doc, analyzed)
        doc.heading("What-if on spec devices")
        a = analyzed[0]
        doc.para(
            f"Run {a['run']}'s ops, each at max(bytes / datasheet bandwidth, FLOPs / datasheet "
            "peak), summed (the same per-op model as above; no dispatch floor, no launches, no "
            "cache: per-call overhead there is unmeasured, so these are lower bounds, predictions "
            "rather than measurements)."
        )
        doc.table(
            [
                "device",
                "TFLOP/s",
                "GB/s",
                "B*",
                "latency at first B (µs)",
                "at last B (µs)",
                "source",
            ],
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
        mesh_section(doc, summaries)
    memory_wall(doc, summaries)

    router_section(doc, summaries, with_verdict="C8" in claim_ids)
    if archived:
        archive_section(doc, archived, os.path.dirname(os.path.dirname(archived[0].path)))
    doc.heading("Plots")
    for name, path in plot_paths.items():
        doc.image(path, name)
    verdicts = claims.verdicts(claim_ids, analyzed, rows)
    if verdicts:
        doc.heading("Claims of the post")
        for cid, v in verdicts.items():
            doc.heading(f"{cid}: {v['verdict']}", 3)
            doc.para(f"Claim: {claims.CLAIMS[cid]}")
            doc.para(v["evidence"])
            elsewhere = _archived_c2(archived) if cid == "C2" else None
            if elsewhere:
                doc.para(elsewhere)
    post_corrections(doc, analyzed, rows)
    with open(os.path.join(workdir, "report.md"), "w") as f:
        f.write(doc.markdown(workdir))
    with open(os.path.join(workdir, "report.html"), "w") as f:
        f.write(doc.html(f"Batching report: {experiment}"))
    return verdicts
