"""The lab from Python: sweep or predict a model of your own.

    import batching
    result = batching.sweep_model(model, inputs, batch_sizes=(1, 8, 64), workdir="/tmp/m")
    print(result.summary["fitted_knee_batch"], result.report_path)

`model` is an nnx.Module or a function of arrays; `inputs(batch_size)` returns the call's
arguments (batching.workloads.user says how their batch axes are read). A sweep writes
exactly what a command-line run writes: rows, TensorBoard, plots and the report.
"""

import dataclasses
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import ml_collections

from batching import app
from batching.measure import program_ops, rates, timing
from batching.outputs import results
from batching.predict import analysis, whatif
from batching.setup import runs, specs, topology
from batching.workloads import base, user
from configs import default

# In-process families of sweep_model, found like any other by an import path.
live = type("Live", (), {})()


@dataclasses.dataclass
class SweepResult:
    """What a sweep wrote: its workdir, measured rows, run summary and report."""

    workdir: str
    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    report_path: str
    # Points that raised (status "error"): the sweep went on without them.
    failed: list[dict[str, Any]]

    def latency_s(self) -> dict[int, float]:
        """Measured latency per batch size."""
        return {r["batch_size"]: r["latency_s"] for r in self.rows}


def config_for(
    name: str, batch_sizes: Sequence[int], config: Mapping[str, Any] | None
) -> ml_collections.ConfigDict:
    """A run's config: the defaults, `config`'s fields on top, and the batch sizes.

    `config` holds nested fields of a config file. A field the defaults lack raises a
    ValueError naming it.
    """
    cfg = default.get_config()
    given = (
        config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config or {})
    )
    _update(cfg, given, "config")
    cfg.name = name
    cfg.sweep.batch_sizes = tuple(int(b) for b in batch_sizes)
    cfg.report.claims = ("C3",)
    return cfg


def _update(node: ml_collections.ConfigDict, given: Mapping[str, Any], where: str) -> None:
    for key, value in given.items():
        if key not in node:
            raise ValueError(f"{where}.{key} is not a config field (configs/default.py)")
        if isinstance(node[key], ml_collections.ConfigDict) and isinstance(value, Mapping):
            if key in ("model", "runs"):
                raise ValueError(f"{where}.{key} is set by sweep_model itself")
            _update(node[key], value, f"{where}.{key}")
        else:
            try:
                node[key] = value
            except TypeError as e:
                raise ValueError(f"{where}.{key}: {e}") from None


def register(model: Any, inputs: Callable[[int], Any], batch_axes: Any, name: str | None) -> str:
    """Registers the model as an in-process family; returns its name."""
    label = name or getattr(model, "__name__", None) or type(model).__name__
    label = re.sub(r"\W", "_", label)
    fam = user.family(lambda model_cfg: (model, inputs), name=label, batch_axes=batch_axes)
    setattr(live, label, fam)
    return label


def sweep_model(
    model: Any,
    inputs: Callable[[int], Any],
    *,
    batch_sizes: Sequence[int],
    workdir: str,
    batch_axes: Any = 0,
    config: Mapping[str, Any] | None = None,
    name: str | None = None,
) -> SweepResult:
    """Times, analyses and reports `model` at each batch size, as a command-line run does.

    Bad input found before timing raises a ValueError with the command line's text. A batch
    size at which the model fails is an error row; the sweep goes on.
    """
    label = register(model, inputs, batch_axes, name)
    cfg = config_for(label, batch_sizes, config)
    cfg.model = ml_collections.ConfigDict({"name": label, "factory": f"batching.api:live.{label}"})
    try:
        summaries = app.run(cfg, workdir)
    except (runs.ConfigError, results.WorkdirError) as e:
        raise ValueError(str(e)) from None
    except app.PointsFailed:
        with open(os.path.join(workdir, "summary.json")) as f:
            summaries = json.load(f)
    store = results.Store(workdir)
    latest = [r for r in results.latest(store.rows()) if r["run"] == label]
    return SweepResult(
        workdir=workdir,
        rows=sorted((r for r in latest if results.is_ok(r)), key=lambda r: r["batch_size"]),
        summary=next((s for s in summaries if s.get("run") == label), {}),
        report_path=store.path("report.md"),
        failed=[r for r in latest if r.get("status") == "error"],
    )


def predict_model(
    model: Any,
    inputs: Callable[[int], Any],
    *,
    batch_sizes: Sequence[int],
    device: str | None = None,
    batch_axes: Any = 0,
    config: Mapping[str, Any] | None = None,
) -> dict[int, dict[str, Any]]:
    """The a-priori latency per batch size, without timing the model.

    Each point is compiled and its ops read from the program. `device` None prices them
    with this device's measured rates (cached in roofline.peaks_cache_dir). A spec-table
    name ("H100 SXM", batching.setup.specs.SPECS) prices them at its datasheet peaks: a
    lower bound. Each value holds `predicted_latency_s` and, on this device, its seconds by
    op kind.
    """
    user.check_inputs(inputs, batch_axes)
    if device is not None and device not in specs.SPECS:
        raise ValueError(f"device must be one of {sorted(specs.SPECS)} or None, got {device!r}")
    cfg = config_for("predict", batch_sizes, config)
    topo = topology.build(cfg)
    wl = user.build(model, inputs, topo, batch_axes)
    rows = [program_row(wl, b, topo) for b in cfg.sweep.batch_sizes]
    if device is not None:
        dtype = rows[0]["dtype"]
        curve = whatif.whatif(rows, (device,), dtype, "default", _itemsize(dtype))[device]
        return {b: {"predicted_latency_s": s} for b, s in curve["latency_s"].items()}
    source = rates.RateSource(cfg.roofline.peaks_cache_dir, cfg.roofline.refresh_peaks)
    source.start_run(rates.microbenchmark_budget(cfg.roofline, topo.device.platform))
    dev_model = analysis.device_model(rows, rows, topo.device, cfg.roofline, source, None)
    out = {}
    for r in rows:
        call = analysis.predict_device(r, dev_model)
        out[r["batch_size"]] = {"predicted_latency_s": call.seconds, "by_kind": call.by_kind()}
    return out


def program_row(wl: base.Workload, batch_size: int, topo: topology.Topology) -> dict[str, Any]:
    """What the pricing reads of a point: its ops from the compiled program, and its dtype."""
    flat = base.flat_call(wl, batch_size)
    compiled = timing.compile_fn(flat.fn, flat.args, flat.donate_argnums)
    ops = program_ops.read(flat, compiled, wl.weight_args)
    dtype = wl.fields.get("dtype", "float32")
    return {
        "batch_size": batch_size, "ops": [o.to_dict() for o in ops], "ops_source": "program",
        "dtype": dtype, "matmul_precision": "default", "cache_state": "warm",
        "weight_bytes": float(flat.leaf_bytes(wl.weight_args)),
        "parallel_shape": topo.shape, "mesh_shape": topo.shape,
        "analytic_flops": sum(o.flops * o.count for o in ops), "flops": compiled.flops,
    }  # fmt: skip


def _itemsize(dtype: str) -> float:
    return float(jax.numpy.dtype(dtype).itemsize)
