"""The roofline of a row: its work, one device's share of it, and the naive prediction.

The model has three limits: t(B) ≈ max(overhead, bytes(B)/BW, flops(B)/F). Two come from
Williams, Waterman and Patterson, "Roofline", CACM 2009. The third is the fixed cost per
call.

- The a-priori prediction is per op (batching.predict.pricing). A call is a list of
  kernels, each at its own limit. Microbenchmarks of the device price them.
- This module keeps the whole-program form as the naive baseline. It is
  max(overhead, bytes/BW, flops/F) with the square-matmul peak. The per-op prediction is
  compared against it.
- The fit to the measured latencies is in batching.predict.knee.
"""

from collections.abc import Callable
from typing import Any

import numpy as np

from batching.workloads import collectives as collectives_lib
from batching.workloads import ops as ops_lib
from batching.workloads.collectives import AXES

REGIMES = ("overhead", "memory", "compute")


def work(row: dict[str, Any]) -> tuple[float, float]:
    """A row's FLOPs and bytes: the analytic count, or XLA's where the workload has none."""
    return row["analytic_flops"] or row["flops"], row["analytic_bytes"] or row["bytes_accessed"]


def predict(
    flops: float,
    bytes_moved: float,
    overhead_s: float,
    bandwidth: float,
    compute_s: float,
) -> tuple[float, str]:
    """Predicted latency (s) and which of the three limits sets it."""
    terms = (overhead_s, bytes_moved / bandwidth, compute_s)
    i = int(np.argmax(terms))
    return float(terms[i]), REGIMES[i]


def comm_time(
    collectives: list[dict[str, Any]] | None,
    bandwidth: float | Callable[[dict[str, Any]], float],
) -> float:
    """Seconds a call spends in its collectives, one after another.

    No collective overlaps compute. Each sends bytes·count·factor per device. The factor is
    batching.workloads.collectives.bus_factor.

    - All-reduce: 2(n−1)/n.
    - All-to-all or all-gather: (n−1)/n.

    `bandwidth` is in bytes/s per device and direction. It is a number, a spec's
    interconnect_bytes_per_s. Or it is a function of the collective's dict. That gives a
    bus bandwidth measured on this mesh (batching.measure.collectives).
    """
    if not collectives:
        return 0.0
    bw_of = bandwidth if callable(bandwidth) else (lambda c: bandwidth)
    return float(sum(collectives_lib.wire_bytes(c) / bw_of(c) for c in collectives))


def per_device_work(row: dict[str, Any]) -> dict[str, Any]:
    """The row with its analytic work as one device of its mesh does it.

    On one device it is the row itself. The split is the row's `parallel_shape`, or its
    `mesh_shape` if it has none. Axes that hold only replicas count 1. Rows carry the global
    call's cost, which is split as follows.

    - data (DP): every device holds all the weights and 1/data of the batch. Weight bytes
      stay whole. The rest (activations, KV cache) and the FLOPs split over data. That
      equals the cost at per_device_batch_size, since the cost is linear in the batch.
    - model (TP): heads, kv heads and the MLP hidden dim split over model. So weights,
      FLOPs and KV cache all split over model. Embedding and unembedding are replicated,
      but are taken as split too. This approximation errs towards a faster device.
    - expert (EP): experts split over expert, tokens over data·expert (GShard). The step
      waits for the most-loaded device. So the FLOPs are the mean device's times
      device_max_mean_load. That load is 1 when the row has none. Zhou et al. 2022,
      "Mixture-of-Experts with Expert Choice Routing", §4.2, traces a GShard step's
      slowdown to its most-loaded expert.

    Ops (batching.workloads.ops, as dicts) are split the same way, one by one
    (per_device_op). A GEMM shape splits its token dim m over data·expert. It splits its
    output dim n over model. Megatron may split k instead, but the FLOPs are the same. An
    attention shape splits its batch over data·expert and its kv heads over model. XLA's
    flops and bytes_accessed of an SPMD program are per device already. They stay as they
    are.
    """
    mesh = row.get("parallel_shape") or row.get("mesh_shape") or {}
    d, e, m = (int(mesh.get(a) or 1) for a in ("data", "expert", "model"))
    if d * e * m == 1:
        return row
    load = float(row.get("device_max_mean_load") or 1.0) if e > 1 else 1.0
    out = dict(row)
    if row.get("analytic_flops") is not None:
        out["analytic_flops"] = row["analytic_flops"] / (d * e * m) * load
    if row.get("analytic_bytes") is not None:
        weights = row.get("weight_bytes") or 0.0
        rest = max(row["analytic_bytes"] - weights, 0.0)
        out["weight_bytes"] = weights / (e * m)
        out["analytic_bytes"] = weights / (e * m) + rest / (d * e * m)
    if row.get("gemm_shapes"):
        out["gemm_shapes"] = [
            [max(1, -(-mm // (d * e))), k, max(1, -(-n // m)), count]
            for mm, k, n, count in row["gemm_shapes"]
        ]
    if row.get("ops") and row.get("ops_source") != "program":  # a program's are per device
        out["ops"] = [per_device_op(o, d * e, m, e * m, load) for o in row["ops"]]
    if row.get("attention_shapes"):
        out["attention_shapes"] = [
            {
                **s,
                "batch": max(1, -(-s["batch"] // (d * e))),
                "kv_heads": max(1, -(-s["kv_heads"] // m)),
            }
            for s in row["attention_shapes"]
        ]
    return out


def overhead_time(
    gemm_shapes: list[list[int]] | None, dispatch_floor_s: float, kernel_overhead_s: float
) -> float:
    """Seconds a call costs even with no work: one dispatch plus a launch per kernel.

    The kernels are counted as the call's matrix products. XLA fuses the elementwise work
    around them. A call without known GEMMs counts as one kernel.
    """
    kernels = sum(count for *_, count in gemm_shapes) if gemm_shapes else 1
    return dispatch_floor_s + kernels * kernel_overhead_s


def per_device_op(
    op: dict[str, Any], tokens: int, model: int, weight_split: int, load: float
) -> dict[str, Any]:
    """One op (batching.workloads.ops.Op as a dict) as one device of the mesh runs it.

    It is split as per_device_work splits the whole call.

    - Its token or batch dim splits over `tokens` (data·expert).
    - Its output features or kv heads split over `model`.
    - Its FLOPs split over both, times the slowest expert device's `load`.
    - Its weight bytes split over `weight_split` (expert·model).
    - The rest of its bytes split over tokens·model.

    The shape only picks the microbenchmark the op is priced at.
    """
    if tokens * model * weight_split == 1:
        return op
    shape = list(op["shape"])

    def split(i: int, n: int) -> None:
        if -len(shape) <= i < len(shape) and n > 1:
            shape[i] = max(1, -(-shape[i] // n))

    kind = op["kind"]
    if kind == "ragged_gemm" and len(shape) == 4:
        split(0, weight_split // model)  # each device's experts
        split(1, tokens)  # the rows routed to them (times `load` below, in FLOPs)
        split(3, model)
    elif kind in ("gemm", "moe_dispatch_combine") and len(shape) in (3, 4):
        split(-3, tokens)  # m: the tokens
        split(-1, model)  # n: output features (Megatron splits one of k, n; the FLOPs agree)
    elif kind == "attention" and len(shape) == 5:
        split(0, tokens)
        split(1, model)
    elif shape:
        split(0, tokens)
    weights = op.get("weight_bytes") or 0.0
    rest = max(op["bytes"] - weights, 0.0)
    return {
        **op,
        "shape": shape,
        "flops": op["flops"] / (tokens * model) * load,
        "bytes": weights / weight_split + rest / (tokens * model),
        "weight_bytes": weights / weight_split,
    }


def mesh_shape_of(row: dict[str, Any], key: str = "mesh_shape") -> dict[str, int]:
    """The row's mesh (`mesh_shape`), or how many ways each axis splits its work.

    The second is `parallel_shape`. A row written without it falls back to the mesh.
    """
    mesh = row.get(key) or row.get("mesh_shape") or {}
    return {a: int(mesh.get(a) or 1) for a in AXES}


def row_ops(r: dict[str, Any]) -> list[ops_lib.Op]:
    """A row's call as ops: its `ops`, where the workload describes them.

    Otherwise the ops are its GEMM and attention shapes. One more op holds the rest of its
    work. That op is priced at the peak FLOP rate and the DRAM bandwidth.
    """
    if r.get("ops"):
        return [ops_lib.Op.from_dict(o) for o in r["ops"]]
    flops, bytes_moved = work(r)
    out = []
    for m, k, n, count in r.get("gemm_shapes") or []:
        out.append(ops_lib.Op("gemm", "gemm", (m, k, n), 2.0 * m * k * n, 0.0, count=count))
    for a in r.get("attention_shapes") or []:
        shape = (a["batch"], a["kv_heads"], a["cache_len"], a["q_per_kv"], a["head_dim"])
        B, K, S, G, H = shape
        item = a["bytes"]
        out.append(
            ops_lib.Op(
                "attention",
                "attention",
                shape,
                4.0 * B * K * G * S * H,
                2.0 * B * K * S * H * item,
                count=a["count"],
                dtype=a["dtype"],
                layout=a["layout"],
            )
        )
    t = ops_lib.totals(out)
    rest_flops = max((flops or 0) - t.flops, 0.0)
    rest_bytes = max((bytes_moved or 0) - t.bytes, 0.0)
    if rest_flops or rest_bytes or not out:
        out.append(ops_lib.Op("rest", "gemm", (), rest_flops, rest_bytes))
    return out


def program_ops(r: dict[str, Any]) -> list[ops_lib.Op]:
    """A row's call as read from its compiled program (`program_ops`), one device's share."""
    return [ops_lib.Op.from_dict(o) for o in r.get("program_ops") or []]
