"""Predictions on devices the run did not use.

They cover each spec-table device. They also cover each multi-device node, with the run's
mesh laid on it. They are lower bounds, since the overhead there is unknown.
"""

from typing import Any

from batching.predict import pricing, roofline
from batching.setup import specs


def whatif_nodes(
    rows: list[dict[str, Any]], dtype: str, precision: str, bytes_per_param: float
) -> dict[str, Any]:
    """Predicted latency per global batch on each multi-device node of the spec table.

    The run's mesh is laid on the node as it is. It keeps the same expert and model axes.
    The node's other devices become data replicas: data' = devices / (expert·model).

    Each point prices one device's share (roofline.per_device_work) at data'. Where the
    global batch is smaller than data', it splits over that many replicas instead. A
    single example is never split across replicas. The share runs under the node device's
    datasheet memory and compute limits. The row's collectives are added at the node's
    interconnect, per direction. Their payloads are scaled by data/data', the tokens per
    device, capacity rounding aside.

    Like `whatif`, these are lower bounds: the overhead there is unknown.
    """
    result = {}
    for name, node in specs.NODES.items():
        spec = node.device
        shape = roofline.mesh_shape_of(rows[0], "parallel_shape")
        group = shape["expert"] * shape["model"]
        if node.num_devices % group:
            continue
        node_data = node.num_devices // group
        f = specs.matmul_peak(spec, dtype, precision)[0]
        if f is None:
            continue
        node_shape = {**shape, "data": node_data}
        curve, comm = {}, {}
        for r in rows:
            # A global batch smaller than the data replicas is not split below one example:
            # the other replicas idle.
            data = max(1, min(node_data, r["batch_size"]))
            flops, bytes_moved = roofline.work(
                roofline.per_device_work({**r, "parallel_shape": {**shape, "data": data}})
            )
            scale = shape["data"] / data
            calls = [{**c, "bytes": c["bytes"] * scale} for c in r.get("collectives") or []]
            comm[r["batch_size"]] = roofline.comm_time(calls, node.interconnect_bytes_per_s)
            curve[r["batch_size"]] = (
                max(bytes_moved / spec.bandwidth_bytes_per_s, flops / f) + comm[r["batch_size"]]
            )
        per_device = specs.critical_batch_size(f, spec.bandwidth_bytes_per_s, bytes_per_param)
        result[name] = {
            "num_devices": node.num_devices,
            "mesh_shape": node_shape,
            "flops_per_s": f,
            "bandwidth_bytes_per_s": spec.bandwidth_bytes_per_s,
            "interconnect_bytes_per_s": node.interconnect_bytes_per_s,
            "critical_batch": per_device,
            "critical_batch_global": per_device * node_data,
            "latency_s": curve,
            "comm_s": comm,
            "source": node.source,
        }
    return result


def whatif(
    rows: list[dict[str, Any]],
    devices: tuple[str, ...],
    dtype: str,
    precision: str,
    bytes_per_param: float,
) -> dict[str, Any]:
    """Predicted latency per batch size on spec-table devices.

    It is the same per-op model. Each op costs max(bytes / spec bandwidth, FLOPs / spec
    peak). There is no dispatch floor, no launch and no cache. Every op runs at the
    datasheet peak. Overhead on a device we did not run on is unknown. So these curves are
    lower bounds.
    """
    result = {}
    for name in devices:
        spec = specs.SPECS[name]
        f, note = specs.matmul_peak(spec, dtype, precision)
        if f is None:
            continue
        rates = pricing.Rates(
            dram_bytes_per_s=spec.bandwidth_bytes_per_s,
            cache_bytes_per_s=spec.bandwidth_bytes_per_s,
            cache_bytes=0.0,
            peak_flops_per_s=f,
            dispatch_floor_s=0.0,
            kernel_overhead_s=0.0,
            weights_warm=False,
        )
        curve = {
            r["batch_size"]: pricing.predict_call(roofline.row_ops(r), rates).seconds for r in rows
        }
        result[name] = {
            "flops_per_s": f,
            "bandwidth_bytes_per_s": spec.bandwidth_bytes_per_s,
            "critical_batch": specs.critical_batch_size(
                f, spec.bandwidth_bytes_per_s, bytes_per_param
            ),
            "latency_s": curve,
            "source": spec.source + (f"; {note}" if note else ""),
        }
    return result
