"""One serving run's measurements: calibrate a policy, bisect its capacity, serve rates.

It builds the decoder from `config.model` with random weights (the seed's). Per policy a
saturated calibration run of the real loop gives the engine's costs as the loop pays them
(batching.serve.simulate). The capacity is bisected on the simulator over those costs. Each
rate is then served by the loop and by the simulator on the same requests. Its row fields
(batching.rows_serving) and per-request records come back; batching.serving writes them.
"""

import dataclasses
import math
import time
from typing import Any

import numpy as np
from flax import nnx

from batching import rows_serving
from batching.serve import capacity, load, metrics, simulate
from batching.serve.engine import Engine, bucket
from batching.serve.loop import IDLE, Loop
from batching.serve.settings import Settings
from batching.workloads import decoder as decoder_workload

# A capacity trial lasts this long at the rate it tries: a short run hides an overload, as
# its queue has too few requests to build. It holds at most this many requests.
CAPACITY_MAX_REQUESTS = 5000
# The idle probe's gaps: IDLE_GAPS geometric between IDLE_RANGE_S, each timed IDLE_REPEATS times.
IDLE_GAPS, IDLE_RANGE_S, IDLE_REPEATS = 6, (1e-3, 0.2), 5
# A rate's simulated metrics are medians over this many draws of the sampled costs.
SIM_SEEDS = 5


def build_decoder(model_cfg: Any, seed: int):
    """The lab's decoder (or MoE decoder) of `model_cfg`, random weights of `seed`."""
    cfg = decoder_workload.model_config(model_cfg)
    graphdef, _ = nnx.split(decoder_workload.abstract_decoder(cfg))
    return nnx.merge(graphdef, decoder_workload.random_params(cfg, seed))


def requests_at(s: Settings, rate: float, n: int | None = None, seed: int = 0) -> list:
    """The requests a rate serves: the trace's, or `n` (`serve.requests`) drawn open loop."""
    if s.trace:
        return load.from_trace(s.trace)
    n = n or s.requests
    return load.open_loop(n, rate, s.prompt_len, s.output_len, s.burstiness, seed)


def prompt_lengths(s: Settings) -> list[int]:
    """Every prompt length the run's requests can have (the engine compiles their buckets)."""
    if s.trace:
        return sorted({r.prompt_len for r in load.from_trace(s.trace)})
    if isinstance(s.prompt_len, int):
        return [s.prompt_len]
    return list(range(s.prompt_len[0], s.prompt_len[1] + 1))


def simulated_capacity(s: Settings, costs: simulate.Costs, policy: str) -> dict[str, Any]:
    """The policy's capacity under the p90 SLOs, bisected on the simulator over `costs`.

    It starts from the rate the slots sustain at best: every slot busy, each request its
    prefill, its insert and a step per further token.
    """
    out_len = s.output_len if isinstance(s.output_len, int) else sum(s.output_len) / 2
    per_request_s = costs.admit(s.longest_prompt, s.max_len, s.chunk_tokens)
    best = s.slots / (per_request_s * s.slots + costs.step_s * max(out_len - 1, 1))

    def run(rate):
        n = max(s.requests, min(int(rate * s.capacity_run_s), CAPACITY_MAX_REQUESTS))
        requests = load.open_loop(n, rate, s.prompt_len, s.output_len, s.burstiness)
        sim, sim_s, _ = simulate.simulate(
            requests, costs, s.slots, s.max_len, policy, s.chunk_tokens
        )
        return metrics.summarize(sim, sim_s)

    return capacity.capacity(run, s.slo_ttft_s, s.slo_tpot_s, low=best / 100, high=2 * best)


def saturated_calls(engine: Engine, s: Settings, policy: str, n: int, seed: int) -> dict:
    """The engine calls' seconds (Loop.calls) of `n` requests served all at once."""
    loop = Loop(engine, policy)
    loop.run(requests_at(s, math.inf, n, seed=seed))
    return loop.calls


def idle_probe(engine: Engine, s: Settings, policy: str, calls: dict[str, list]) -> None:
    """A light load's first call after the host idled, timed after gaps in IDLE_RANGE_S.

    The loop idles only with every slot free, so the call is an arrival's prefill (its first
    chunk under `chunked`). Its seconds go to `calls` under the call's name + IDLE.
    """
    if policy == "chunked":
        name, part = "chunk", np.zeros(s.chunk_tokens, np.int32)
        call = lambda: engine.prefill_chunk(part, first=True)  # noqa: E731
    else:
        padded = bucket(s.longest_prompt, s.max_len)
        name, prompt = f"prefill:{padded}", np.zeros(padded, np.int32)
        call = lambda: engine.prefill(prompt)  # noqa: E731
    for gap in np.geomspace(*IDLE_RANGE_S, IDLE_GAPS).repeat(IDLE_REPEATS):
        time.sleep(gap)
        t0 = time.perf_counter()
        call()
        calls[name + IDLE].append(time.perf_counter() - t0)


def calibrate(engine: Engine, s: Settings, policy: str) -> dict[str, Any]:
    """The policy's costs from a saturated run of the loop and an idle probe; its capacity."""
    calls = saturated_calls(engine, s, policy, s.calibration_requests, seed=1)
    idle_probe(engine, s, policy, calls)
    costs = simulate.costs_from_loop(calls)
    cap = simulated_capacity(s, costs, policy)
    return {"costs": dataclasses.asdict(costs), **cap, "rel_tol": capacity.REL_TOL}


def refreshed(engine: Engine, s: Settings, policy: str, costs: simulate.Costs) -> simulate.Costs:
    """`costs` with a short saturated run's own (`serve.refresh_requests`) in their place.

    The calls it made replace the calibration's. Those it did not make (a prefill after
    idle, another prompt length) stay the calibration's.
    """
    fresh = simulate.costs_from_loop(saturated_calls(engine, s, policy, s.refresh_requests, seed=2))
    return dataclasses.replace(
        fresh,
        prefill_s={**costs.prefill_s, **fresh.prefill_s},
        samples={**costs.samples, **fresh.samples},
    )


def costs_of(calibration: dict[str, Any]) -> simulate.Costs:
    """The Costs a calibration (read back from JSON) holds."""
    c = calibration["costs"]
    prefill = {int(k): v for k, v in c["prefill_s"].items()}
    samples = {k: tuple(v) for k, v in c.get("samples", {}).items()}
    return simulate.Costs(c["step_s"], c["insert_s"], prefill, c.get("chunk_s", 0.0), samples)


# The metrics a serving row holds, by vLLM's names in batching.serve.metrics.summarize.
RENAMED = {"median": "p50"}
METRIC_NAMES = ("ttft", "tpot", "itl", "e2e")


def row_metrics(m: dict[str, Any]) -> dict[str, Any]:
    """A summary's metrics under the row schema's names (p50 for the median)."""
    out = {}
    for name in METRIC_NAMES:
        for p in ("median", "p90", "p99"):
            out[f"{name}_{RENAMED.get(p, p)}_s"] = m[f"{name}_{p}_s"]
    keep = ("request_throughput_per_s", "output_throughput_per_s", "goodput_per_s",
            "queueing_delay_mean_s", "completed", "failed", "duration_s", "ttft_p90_low_s",
            "ttft_p90_high_s", "tpot_p90_low_s", "tpot_p90_high_s")  # fmt: skip
    out.update({k: m[k] for k in keep if k in m})
    return out


def simulated_metrics(
    requests, costs: simulate.Costs, s: Settings, policy: str, seeds: int = SIM_SEEDS
) -> dict[str, Any]:
    """The simulator's row metrics over `costs`: each the median over `seeds` cost draws."""
    runs = []
    for seed in range(seeds):
        sim, sim_s, occupancy = simulate.simulate(
            requests, costs, s.slots, s.max_len, policy, s.chunk_tokens, seed
        )
        m = row_metrics(metrics.summarize(sim, sim_s, s.slo_ttft_s, s.slo_tpot_s))
        m["mean_occupancy"] = float(np.mean(occupancy)) if occupancy else 0.0
        runs.append(m)
    return {k: float(np.median([m[k] for m in runs])) for k in SIMULATED}


def drop_fractions(records: list[metrics.Record], routing: tuple[str, int]) -> list[float]:
    """Per served request of an MoE decoder: the share of its decode steps' routing lost.

    Token-choice (and dropless) wants top_k experts per token and block: the share lost is
    1 - reached / top_k (routers.routing_stats `drop_fraction`). Expert-choice wants none
    per token: the share is its (token, block) pairs no expert picked (`token_drop_fraction`).
    """
    router, top_k = routing
    out = []
    for r in records:
        if not r.ok or not r.experts:
            continue
        reached = np.asarray(r.experts, float)
        out.append(float(np.mean(reached == 0) if router == "expert_choice"
                         else 1.0 - reached.mean() / top_k))  # fmt: skip
    return out


class Alone:
    """Each request's greedy tokens served alone, on an engine of one slot (kept by request)."""

    def __init__(self, model, s: Settings):
        self.engine = Engine(model, 1, s.max_len, s.chunk_tokens)
        self.engine.warm_up(prompt_lengths(s))
        self.seen: dict[tuple, list[int]] = {}

    def tokens(self, r: load.Request, policy: str) -> list[int]:
        """The request's tokens with no batch-mates (its prompt is drawn from its id).

        A chunked policy's request is prefilled in chunks alone too: only batch-mates differ.
        """
        alone_policy = "chunked" if policy == "chunked" else "continuous"
        key = (r.id, r.prompt_len, r.output_len, alone_policy)
        if key not in self.seen:
            alone = dataclasses.replace(r, arrival_s=0.0)
            self.seen[key] = Loop(self.engine, alone_policy).run([alone])[0][0].tokens
        return self.seen[key]

    def changed(self, records: list[metrics.Record], requests, policy: str) -> int:
        """How many served requests' tokens differ from the same request served alone."""
        by_id = {r.id: r for r in requests}
        return sum(rec.tokens != self.tokens(by_id[rec.id], policy) for rec in records if rec.ok)


def batchmate_fields(
    engine: Engine, records: list[metrics.Record], requests, policy: str, alone: "Alone | None"
) -> dict[str, Any]:
    """The row's MoE drop fractions and batch-mate count, where they apply."""
    out: dict[str, Any] = {}
    if alone is not None:
        out["batchmates_changed"] = alone.changed(records, requests, policy)
    drops = drop_fractions(records, engine.routing) if engine.routing else []
    if drops:
        out.update(drop_fraction_mean=float(np.mean(drops)), drop_fraction_max=max(drops))
    return out


def serve_rate(
    engine: Engine,
    s: Settings,
    policy: str,
    rate: float,
    calibration: dict[str, Any],
    alone: Alone | None = None,
) -> tuple[dict[str, Any], list[metrics.Record]]:
    """One rate through the loop and the simulator: the row's fields, the loop's records.

    The simulator runs twice on the same requests. `simulated_` is a prediction over the costs
    known before the rate: the calibration's, refreshed by a short saturated run. `replayed_`
    is over the costs this rate's loop paid: the policy's model alone.
    With `alone`, the row counts the requests whose tokens their batch-mates changed.
    """
    requests = requests_at(s, rate)
    costs = costs_of(calibration)
    if s.refresh_requests:
        costs = refreshed(engine, s, policy, costs)
    loop = Loop(engine, policy)
    records, duration = loop.run(requests)
    m = row_metrics(metrics.summarize(records, duration, s.slo_ttft_s, s.slo_tpot_s))
    m["mean_occupancy"] = float(np.mean(loop.occupancy)) if loop.occupancy else 0.0
    m["steps"] = len(loop.occupancy)
    paid = simulate.costs_from_loop(loop.calls)
    m["step_paid_s"] = paid.step_s
    predicted = simulated_metrics(requests, costs, s, policy)
    m["step_refreshed_s"] = costs.step_s
    replayed = simulated_metrics(requests, paid, s, policy)
    m.update({f"simulated_{k}": v for k, v in predicted.items()})
    m.update({f"replayed_{k}": v for k, v in replayed.items()})
    m["n_requests"] = len(requests)
    m.update(batchmate_fields(engine, records, requests, policy, alone))
    m["meets_slo"] = bool(
        m["completed"] > 0 and m["ttft_p90_s"] <= s.slo_ttft_s and m["tpot_p90_s"] <= s.slo_tpot_s
    )
    return m, records


# The metrics the simulator's values stand beside (rows_serving: simulated_<name>).
SIMULATED = tuple(name for name, _, _ in rows_serving.METRICS)


def record_line(r: metrics.Record) -> dict[str, Any]:
    """A request's record as one JSON line of requests.jsonl."""
    return {
        "id": r.id, "arrival_s": r.arrival_s, "admitted_s": r.admitted_s,
        "prompt_len": r.prompt_len, "output_len": r.output_len, "token_s": r.token_s,
        "tokens": r.tokens, "error": r.error,
    }  # fmt: skip
