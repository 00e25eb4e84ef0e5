"""A serving run from main.py: `python main.py --config=configs/serve.py --workdir=...`.

It checks the config (the decoder's fields as a decode run's, then `config.serve`), locks
the workdir and builds the engine. Per policy it calibrates and bisects the capacity
(batching.serve.session). Then it serves each rate, appending its row and its requests'
records. Last it writes the figures, TensorBoard and the report. A rerun with the same
config resumes: a policy's calibration is read back, and a (policy, rate) whose row is
written is not served again. So Ctrl-C loses only the rate in flight.
"""

import dataclasses
import math
import os
import time
from typing import Any

import jax
import ml_collections
from absl import logging

from batching import rows, rows_serving
from batching.outputs import report_serving, results
from batching.outputs import serving as serving_outputs
from batching.serve import session, simulate
from batching.serve.engine import Engine, bucket
from batching.serve.settings import Settings
from batching.setup import runs
from batching.text import fmt

SERVED_MODELS = ("decoder", "moe_decoder")


def validate(config: ml_collections.ConfigDict, benches: list):
    """The run's bench and its checked Settings; a bad field raises a ConfigError.

    `benches` are the config's runs as batching.app.validate checked them (decode runs).
    """
    if len(benches) != 1:
        raise runs.ConfigError(f"a serving config is one run, got runs {[b.name for b in benches]}")
    if config.model.name not in SERVED_MODELS:
        raise runs.ConfigError(f"model.name must be one of {SERVED_MODELS} to serve, "
                               f"got {config.model.name!r}")  # fmt: skip
    if config.distributed.get("num_processes") or config.distributed.get("coordinator_address"):
        raise runs.ConfigError("a serving run is one process; unset distributed.*")
    try:
        return benches[0], Settings.from_config(config.serve)
    except ValueError as e:
        raise runs.ConfigError(str(e)) from None


def rate_key(policy: str, rate: float) -> tuple[str, str]:
    """A served rate's identity across reruns."""
    return policy, f"{rate:.9g}"


def rates_of(s: Settings, calibration: dict[str, Any]) -> list[tuple[float, float | None]]:
    """(rate, share of capacity or None) to serve: the shares, then `serve.rates`."""
    if s.trace:
        requests = session.requests_at(s, math.inf)
        return [(len(requests) / max(requests[-1].arrival_s, 1e-9), None)]
    cap = calibration["capacity_per_s"]
    return [(f * cap, f) for f in s.of_capacity if cap > 0] + [(r, None) for r in s.rates]


def point_fields(bench, fp: str) -> dict[str, Any]:
    """The point group of a serving row: what ran, where, under which fingerprint."""
    m, dev = bench.config.model, runs.device(bench.config)
    fields = dict(
        experiment=bench.config.name, run=bench.name, setting=bench.name, seed=bench.config.seed,
        model=m.name, dtype=m.dtype, param_dtype=m.param_dtype, platform=dev.platform,
        device_kind=dev.device_kind, device_count=len(jax.devices(dev.platform)),
        jax_version=jax.__version__, status="ok", fingerprint=fp, d_model=m.d_model,
        cache_dtype=m.cache_dtype, row_kind="serving",
    )  # fmt: skip
    if m.name == "moe_decoder":
        fields.update(router=m.router, num_experts=m.num_experts)
    return fields


def calibrate(engine, model, s: Settings, policy: str) -> dict[str, Any]:
    """A policy's calibration (session.calibrate) and its what-if capacities."""
    calibration = session.calibrate(engine, s, policy)
    calibration["whatif"] = {}
    buckets = [bucket(s.longest_prompt, s.max_len)]
    for device in s.whatif_devices:
        costs = simulate.spec_costs(model.cfg, s.slots, s.max_len, buckets, device, s.chunk_tokens)
        cap = session.simulated_capacity(s, costs, policy)
        calibration["whatif"][device] = {"costs": dataclasses.asdict(costs), **cap}
    logging.info("calibrated %s: capacity %.4g req/s", policy, calibration["capacity_per_s"])
    return calibration


def serve_all(bench, s: Settings, store: results.Store, fp: str) -> dict[str, dict[str, Any]]:
    """Calibrates each policy and serves its rates; rows and records are appended as they end."""
    model = session.build_decoder(bench.config.model, bench.config.seed)
    engine = Engine(model, s.slots, s.max_len, s.chunk_tokens)
    engine.warm_up(session.prompt_lengths(s))
    alone = session.Alone(model, s)
    saved = store.read_json(results.CALIBRATION) or {}
    calibrations = saved.get("policies", {}) if saved.get("fingerprint") == fp else {}
    done = {rate_key(r["policy"], r["request_rate"]) for r in current_rows(store, fp)}
    for policy in s.policies:
        if policy not in calibrations:
            calibrations[policy] = calibrate(engine, model, s, policy)
            store.write_json(results.CALIBRATION, {"fingerprint": fp, "policies": calibrations})
        cal = calibrations[policy]
        for rate, share in rates_of(s, cal):
            if rate_key(policy, rate) in done:
                continue
            fields, records = session.serve_rate(engine, s, policy, rate, cal, alone)
            row = rows.make(
                **point_fields(bench, fp), **fields, policy=policy, request_rate=rate,
                rate_share=share, slots=s.slots, max_len=s.max_len, slo_ttft_s=s.slo_ttft_s,
                slo_tpot_s=s.slo_tpot_s, capacity_per_s=cal["capacity_per_s"],
                capacity_upper_per_s=cal["upper_per_s"], capacity_rel_tol=cal["rel_tol"],
                step_cost_s=cal["costs"]["step_s"], insert_cost_s=cal["costs"]["insert_s"],
                prefill_cost_s=cal["costs"]["prefill_s"], timestamp=time.time(),
            )  # fmt: skip
            rows_serving.check(row)
            key = {"run": bench.name, "policy": policy, "request_rate": rate}
            store.append_lines(
                results.REQUESTS, [{**key, **session.record_line(r)} for r in records]
            )
            store.append(row, None)
            print(rate_line(row), flush=True)
    return calibrations


def current_rows(store: results.Store, fp: str) -> list[dict[str, Any]]:
    """The serving rows of this fingerprint, the last one of each (policy, rate)."""
    latest = {}
    for r in store.rows():
        if r.get("row_kind") == "serving" and r.get("fingerprint") == fp:
            latest[rate_key(r["policy"], r["request_rate"])] = r
    return list(latest.values())


def rate_line(r: dict[str, Any]) -> str:
    """One served rate as a line of text."""
    return (
        f"{r['policy']:>10} {fmt(r['request_rate']):>8} req/s: {fmt(r['output_throughput_per_s'])}"
        f" tok/s, TTFT p90 {fmt(r['ttft_p90_s'] * 1e3)} ms (simulated "
        f"{fmt(r['simulated_ttft_p90_s'] * 1e3)}), TPOT p90 {fmt(r['tpot_p90_s'] * 1e3)} ms "
        f"(simulated {fmt(r['simulated_tpot_p90_s'] * 1e3)}), {fmt(r['mean_occupancy'])} busy "
        f"slots{'' if r['meets_slo'] else ', misses the SLOs'}"
    )


def context(bench, s: Settings) -> str:
    """What the report's first paragraph says ran."""
    m = bench.config.model
    return (
        f"{m.name} (d_model {m.d_model}, {m.n_layers} layers, random weights) on "
        f"{runs.device(bench.config).device_kind}: {s.slots} slots of {s.max_len} positions; "
        f"prompts {s.prompt_len}, outputs {s.output_len} tokens; {s.requests} requests per "
        f"rate, Poisson-like arrivals (burstiness {s.burstiness}); SLOs p90 TTFT <= "
        f"{s.slo_ttft_s} s, p90 TPOT <= {s.slo_tpot_s} s."
    )


def run(config: ml_collections.ConfigDict, workdir: str, benches: list) -> list[dict[str, Any]]:
    """Serves the config's decoder into `workdir`; returns the serving rows.

    `benches` are batching.app.validate's, which dispatches here.
    """
    bench, s = validate(config, benches)
    fp = results.fingerprint(runs.measurement_view(bench.run))
    results.check_writable(workdir)
    store = results.Store(workdir)
    if store.conflicts({bench.name: fp}) and not config.overwrite:
        raise results.WorkdirError(
            f"workdir {workdir!r} holds runs [{bench.name!r}] served under another config or "
            "device; use a new workdir or --config.overwrite=true to archive them"
        )
    lock = results.lock_workdir(workdir)
    try:
        if config.overwrite and store.has_outputs():
            logging.info("overwrite: previous outputs moved to %s", store.archive())
        store.write_config(config.to_dict(), {bench.name: fp})
        try:
            calibrations = serve_all(bench, s, store, fp)
        except KeyboardInterrupt:
            logging.warning("interrupted: every finished rate is in %s; rerun to resume", workdir)
            raise
        served = current_rows(store, fp)
        images, paths = serving_outputs.save_figures(served, store.path("plots"))
        serving_outputs.write_tensorboard(store.workdir, bench.name, config.to_dict(), served,
                                          calibrations, images)  # fmt: skip
        report_serving.write(store.workdir, config.name, context(bench, s), served, calibrations,
                             paths, s.decode_sweep_workdir)  # fmt: skip
        print(f"served {len(served)} rates; report: {store.path('report.md')}", flush=True)
        return served
    finally:
        os.close(lock)
