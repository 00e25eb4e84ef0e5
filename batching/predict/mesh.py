"""What a mesh adds to a run's analysis.

It gives the bandwidth the collectives are priced at. It also gives the mesh facts the
report shows. These are the comm share, the measured bus bandwidths and the slowest device.
"""

from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from batching.setup import specs


def comm_bandwidth(
    rows: list[dict[str, Any]], device: jax.Device, peak_source: Any
) -> tuple[float | Callable[[dict[str, Any]], float] | None, str | None]:
    """What the comm term divides by, and where it comes from.

    The first choice is the bus bandwidths the sweep measured on this run's mesh. Else
    it is the spec interconnect, per direction. Else there is nothing, and no comm term.
    """
    calls = [c for r in rows for c in r.get("collectives") or []]
    if not calls:
        return None, None
    measured = peak_source.collective(device)
    if all(measured(c) for c in calls):
        return measured, "measured on this mesh"
    spec = specs.detect(device.device_kind)
    if spec is not None:
        return spec.interconnect_bytes_per_s, f"spec {spec.name}: {spec.interconnect_source}"
    return None, None


def mesh_summary(
    rows: list[dict[str, Any]],
    mesh_shape: dict[str, int],
    device: jax.Device,
    comm_source: str | None,
    peak_source: Any,
) -> dict[str, Any]:
    """The run's mesh facts for the report.

    - The comm term's share of the predicted latency.
    - The mesh's measured collective bandwidths next to the spec interconnect.
    - What the slowest expert device costs.
    - Whether the mesh is a functional simulation on host devices.
    """
    spec = specs.detect(device.device_kind)
    num_devices = int(np.prod(list(mesh_shape.values())))
    comm = [r for r in rows if r.get("collectives")]
    measured = peak_source.measured_busbw(device, mesh_shape)
    out = {
        "mesh_shape": mesh_shape,
        # Forced host devices share the same CPU cores: their timings say nothing about
        # accelerators or interconnects (docs/distributed.md).
        "functional_simulation": device.platform == "cpu" and num_devices > 1,
        "comm_bandwidth_source": comm_source,
        "collective_busbw_bytes_per_s": measured,
        "spec_interconnect_bytes_per_s": spec.interconnect_bytes_per_s if spec else None,
        "spec_interconnect_source": spec.interconnect_source if spec else None,
        "comm_bytes_last": rows[-1].get("comm_bytes"),
        "xla_comm_bytes_last": rows[-1].get("xla_comm_bytes"),
        "comm_share_median": (
            float(np.median([r["predicted_comm_s"] / r["predicted_latency_s"] for r in comm]))
            if comm and comm_source
            else None  # no bandwidth to divide by: unknown, not zero
        ),
    }
    loads = [r for r in rows if r.get("device_max_mean_load")]
    if loads:
        first, last = loads[0], loads[-1]
        out["device_max_mean_load_first"] = first["device_max_mean_load"]
        out["device_max_mean_load_last"] = last["device_max_mean_load"]
        costs = [
            r["predicted_latency_s"] / r["predicted_balanced_latency_s"] - 1
            for r in loads
            if r.get("predicted_balanced_latency_s")
        ]
        # Predicted extra latency from waiting on the most-loaded device, median over points.
        out["slowest_device_cost_median"] = float(np.median(costs)) if costs else None
    return out
