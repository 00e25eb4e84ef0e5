"""The report's "Devices and interconnect" section: what a device mesh changes.

- B* per device and global.
- The comm term.
- The measured bus bandwidths.
- The slowest expert device.
- A what-if on a multi-GPU node.
"""

from typing import Any

from batching.measure import collectives
from batching.outputs.doc import Doc, ReportData
from batching.text import fmt


def _mesh(shape: dict[str, int] | None) -> str:
    shape = shape or {}
    return "×".join(str(shape.get(a, 1)) for a in ("data", "expert", "model"))


def mesh_section(doc: Doc, data: ReportData) -> None:
    """Writes the "Devices and interconnect" section, for analysed runs only.

    Each part appears, in this order, where the runs have its data.

    - A note when the runs are a functional simulation.
    - B* per device and global, with the comm term (meshed runs).
    - The measured collective bandwidths beside the spec interconnect.
    - What the slowest expert device costs.
    - The what-if on a multi-GPU node.
    """
    analyzed = data.analyzed
    if not analyzed:
        return
    meshed = [s for s in analyzed if (s.get("num_devices") or 1) > 1]
    doc.heading("Devices and interconnect")
    _simulation_note(doc, analyzed)
    if meshed:
        _critical_batch_table(doc, analyzed)
    _busbw_table(doc, meshed)
    _slowest_device_table(doc, analyzed)
    _node_whatif_table(doc, analyzed)


def _simulation_note(doc: Doc, analyzed: list[dict[str, Any]]) -> None:
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


def _critical_batch_table(doc: Doc, analyzed: list[dict[str, Any]]) -> None:
    """The B* table: per run, B* per device and global. It also sets the comm bytes against
    XLA's, and gives the comm share."""
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


def _busbw_table(doc: Doc, meshed: list[dict[str, Any]]) -> None:
    """The mesh's measured bus bandwidth per axis and collective. The datasheet's
    interconnect bandwidth stands beside it."""
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


def _slowest_device_table(doc: Doc, analyzed: list[dict[str, Any]]) -> None:
    """For expert parallelism: the load per expert and per device. It also gives what the
    slowest device costs."""
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
                    f"{fmt(s.get('max_mean_load_first'))}→{fmt(s.get('max_mean_load_last'))}",
                    f"{fmt(s['device_max_mean_load_first'])}→{fmt(s['device_max_mean_load_last'])}",
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


def _node_whatif_table(doc: Doc, analyzed: list[dict[str, Any]]) -> None:
    """The first run's what-if on multi-GPU nodes of the spec table."""
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
