"""Benchmark: the lab's decoder behind a continuous-batching loop, at request rates.

    python -m experiments.serving_loop                       # a small decoder, 4 slots
    python -m experiments.serving_loop --rates=2,8,inf --policy=static --requests=64

First a saturated calibration run of the loop gives the engine's costs as the loop pays
them: a decode step over all slots, an insert, a prefill (batching.serve.simulate). The
policy's capacity under the p90 SLOs is bisected on the simulator. Then come shares of
that capacity (`--of_capacity`) and `--rates` (requests/s; inf: all at once). At each,
`--requests` open-loop Poisson requests of fixed lengths go through the real loop, and
the same requests through the simulator. It prints vLLM's serving metrics and the
simulated / measured ratio of p50 and p90 TTFT and TPOT. Last it times the engine's bare
decode step at batch `--slots` with the sweep's timer. The saturated run's output tokens/s
stand against slots / step, and the run less its prefills against its steps at the bare
step's time: the loop's own cost (scheduling, inserts, masking, host transfers). The last
line is JSON.
"""

import dataclasses
import math

import numpy as np
from absl import app, flags
from flax import nnx

from batching.measure import timing
from batching.serve import capacity, load, metrics, simulate
from batching.serve.engine import Engine, bucket
from batching.serve.loop import POLICIES, Loop
from batching.setup import specs
from batching.workloads import decoder as decoder_workload
from configs import decoder as decoder_config
from configs import moe_decoder as moe_decoder_config
from experiments import print_json

FLAGS = flags.FLAGS
flags.DEFINE_list("rates", ["inf"], "Request rates (requests/s); inf: all at once.")
flags.DEFINE_list("of_capacity", ["0.2", "0.4", "0.6", "0.9"], "Rates as shares of the "
                  "simulated capacity, served before --rates.")  # fmt: skip
flags.DEFINE_enum("policy", "continuous", list(POLICIES), "Which requests a step admits.")
flags.DEFINE_integer("slots", 4, "Decode slots: the largest batch.")
flags.DEFINE_integer("max_len", 128, "Cache positions per slot.")
flags.DEFINE_integer("requests", 32, "Requests per rate.")
flags.DEFINE_integer("prompt_len", 32, "Prompt tokens per request.")
flags.DEFINE_integer("output_len", 32, "Output tokens per request.")
flags.DEFINE_float("slo_ttft_s", 0.25, "p90 time-to-first-token SLO (s): goodput, capacity.")
flags.DEFINE_float("slo_tpot_s", 0.05, "p90 time-per-output-token SLO (s).")
flags.DEFINE_integer("d_model", 256, "Decoder width (configs/decoder.py for the rest).")
flags.DEFINE_integer("n_layers", 4, "Decoder layers.")
flags.DEFINE_enum("model", "decoder", ["decoder", "moe_decoder"], "Dense, or MoE blocks.")
flags.DEFINE_enum("router", "token_choice", ["token_choice", "expert_choice"], "MoE router.")
flags.DEFINE_integer("batchmates", 16, "Requests served alone and batched, tokens compared.")
flags.DEFINE_list("whatif", ["H100 SXM"], "Spec devices whose simulated capacity to print "
                  "(datasheet peaks, no overhead: upper bounds).")  # fmt: skip
flags.DEFINE_string("json_out", None, "Also write the JSON result to this file.")


def small_decoder(d_model: int, n_layers: int, model: str = "decoder", router: str = ""):
    """The lab's decoder at this width and depth, random weights.

    `model` "moe_decoder" takes configs/moe_decoder.py's MoE blocks and `router`.
    """
    if model == "moe_decoder":
        model_cfg = moe_decoder_config.model(router or "token_choice")
    else:
        model_cfg = decoder_config.model("decode")
    model_cfg.update(d_model=d_model, n_layers=n_layers, mlp_dim=4 * d_model, vocab_size=4096,
                     n_heads=4, n_kv_heads=2, head_dim=d_model // 4)  # fmt: skip
    cfg = decoder_workload.model_config(model_cfg)
    graphdef, _ = nnx.split(decoder_workload.abstract_decoder(cfg))
    return nnx.merge(graphdef, decoder_workload.random_params(cfg, 0))


def bare_step_s(engine: Engine) -> float:
    """Median seconds of the engine's decode step over all slots, by the sweep's timer.

    Its cache is donated and fed back, so the engine is spent afterwards.
    """
    tokens, active = np.zeros(engine.slots, np.int32), np.ones(engine.slots, bool)
    fn = engine._step  # noqa: SLF001 - the same compiled step the loop calls
    args = (engine.params, engine.cache, tokens, active)
    compiled = timing.compile_fn(fn, args, donate_argnums=(1,))
    plan = timing.TimingSettings(warmup_runs=2, warmup_s=0.05, min_runs=20, max_runs=500,
                                 budget_s=2.0)  # fmt: skip
    result = timing.measure(
        compiled.call, args, plan, next_args=lambda a, out: (a[0], out[1], *a[2:])
    )
    return float(np.median(result.samples_s))


# The simulated metrics set beside the loop's, per rate.
COMPARED = ("ttft_median_s", "ttft_p90_s", "tpot_median_s", "tpot_p90_s")


def serve_rate(engine: Engine, costs: simulate.Costs, rate: float) -> dict:
    """One rate served by the loop and by the simulator on the same requests."""
    requests = load.open_loop(FLAGS.requests, rate, FLAGS.prompt_len, FLAGS.output_len)
    loop = Loop(engine, FLAGS.policy)
    records, duration = loop.run(requests)
    m = metrics.summarize(records, duration, FLAGS.slo_ttft_s, FLAGS.slo_tpot_s)
    m["mean_occupancy"] = float(np.mean(loop.occupancy)) if loop.occupancy else 0.0
    m["steps"] = len(loop.occupancy)
    m["engine_call_s"] = {k: float(sum(v)) for k, v in loop.calls.items()}
    sim, sim_s, _ = simulate.simulate(requests, costs, FLAGS.slots, FLAGS.max_len, FLAGS.policy)
    s = metrics.summarize(sim, sim_s, FLAGS.slo_ttft_s, FLAGS.slo_tpot_s)
    m.update({f"simulated_{k}": s[k] for k in COMPARED})
    m.update({f"simulated_over_measured_{k}": s[k] / m[k] for k in COMPARED if m[k]})
    return m


# A capacity run lasts this long at the rate it tries: a short run hides an overload, as its
# queue has too few requests to build.
CAPACITY_RUN_S = 60.0
# ... or this many requests, whichever is fewer (a fast device's minute is millions).
CAPACITY_MAX_REQUESTS = 5000


def simulated_capacity(costs: simulate.Costs) -> dict:
    """The policy's capacity under the SLOs, bisected on the simulator.

    The bisection starts from the rate the slots sustain at best: every slot busy, each
    request its prefill, its insert and a step per further token.
    """
    per_request_s = costs.prefill(FLAGS.prompt_len) + costs.insert_s
    best = FLAGS.slots / (per_request_s * FLAGS.slots + costs.step_s * (FLAGS.output_len - 1))

    def run(rate):
        n = max(FLAGS.requests, min(int(rate * CAPACITY_RUN_S), CAPACITY_MAX_REQUESTS))
        requests = load.open_loop(n, rate, FLAGS.prompt_len, FLAGS.output_len)
        sim, sim_s, _ = simulate.simulate(requests, costs, FLAGS.slots, FLAGS.max_len,
                                          FLAGS.policy)  # fmt: skip
        return metrics.summarize(sim, sim_s)

    return capacity.capacity(run, FLAGS.slo_ttft_s, FLAGS.slo_tpot_s, low=best / 100, high=2 * best)


def batchmate_effect(model, n: int) -> dict:
    """How often a request's greedy tokens change with the requests batched beside it.

    The same `n` requests are served all at once on `--slots` slots, then each alone on one.
    A dense decoder's tokens never change; an MoE's routing groups are the step's batch.
    """
    requests = load.open_loop(n, math.inf, FLAGS.prompt_len, FLAGS.output_len)
    batched = Engine(model, FLAGS.slots, FLAGS.max_len)
    together = {r.id: r.tokens for r in Loop(batched, "continuous").run(requests)[0]}
    single = Engine(model, 1, FLAGS.max_len)
    first_change = []
    for r in requests:
        alone = Loop(single, "continuous").run([r])[0][0].tokens
        diff = [i for i, (a, b) in enumerate(zip(alone, together[r.id], strict=True)) if a != b]
        if diff:
            first_change.append(diff[0])
    return {
        "requests": n,
        "changed_share": len(first_change) / n,
        "first_changed_token_mean": float(np.mean(first_change)) if first_change else None,
    }


def print_rate(rate: float, m: dict) -> None:
    ratios = " ".join(f"{m.get('simulated_over_measured_' + k, math.nan):6.3f}" for k in COMPARED)
    ttft = f"{m['ttft_median_s'] * 1e3:.4g}/{m['ttft_p90_s'] * 1e3:.4g}"
    tpot = f"{m['tpot_median_s'] * 1e3:.4g}/{m['tpot_p90_s'] * 1e3:.4g}"
    print(f"{rate:8.4g} {m['output_throughput_per_s']:8.4g} {m['goodput_per_s']:7.3g} {ttft:>15} "
          f"{tpot:>13} {m['mean_occupancy']:6.3g}  {ratios}")  # fmt: skip


def whatif_capacities(model) -> dict:
    """The simulated capacity on each --whatif device, from its datasheet costs."""
    out = {}
    for device in FLAGS.whatif:
        buckets = [bucket(FLAGS.prompt_len, FLAGS.max_len)]
        costs = simulate.spec_costs(model.cfg, FLAGS.slots, FLAGS.max_len, buckets, device)
        out[device] = {"costs": dataclasses.asdict(costs), **simulated_capacity(costs)}
        print(f"what-if {device}: step {costs.step_s * 1e6:.4g} µs, prefill "
              f"{costs.prefill_s[buckets[0]] * 1e6:.4g} µs at its datasheet peaks; simulated "
              f"capacity at most {out[device]['capacity_per_s']:.4g} req/s")  # fmt: skip
    return out


def report_saturated(out: dict, step_s: float) -> None:
    """The saturated run against the bare step: with its prefills, and without them."""
    saturated = out["rates"].get(str(math.inf))
    if saturated:
        out["loop_over_step_bound"] = saturated["output_throughput_per_s"] / (FLAGS.slots / step_s)
        # Without its prefills: the steps' bare time over the loop's time between prefills.
        calls = saturated["engine_call_s"]
        prefill_s = sum(t for k, t in calls.items() if k.startswith("prefill:"))
        decoding_s = saturated["duration_s"] - prefill_s
        out["decode_phase_efficiency"] = saturated["steps"] * step_s / decoding_s
        print(f"bare decode step at batch {FLAGS.slots}: {step_s * 1e3:.4g} ms; saturated loop "
              f"{saturated['output_throughput_per_s']:.4g} tok/s = "
              f"{out['loop_over_step_bound']:.3f} of slots / step; its decoding (the run less "
              f"its prefills, {prefill_s:.3g} s) runs its {saturated['steps']} steps at "
              f"{out['decode_phase_efficiency']:.3f} of the bare step's speed")  # fmt: skip


def check_flags() -> None:
    """Bad flags stop the run before anything compiles, one line naming the flag."""
    for name in ("rates", "of_capacity"):
        for value in getattr(FLAGS, name):
            try:
                ok = float(value) > 0
            except ValueError:
                ok = False
            if not ok:
                raise app.UsageError(f"--{name} must hold numbers > 0 (inf allowed), got {value!r}")
    for name in ("slots", "max_len", "requests", "prompt_len", "output_len"):
        if getattr(FLAGS, name) < 1:
            raise app.UsageError(f"--{name} must be >= 1, got {getattr(FLAGS, name)}")
    for name in ("slo_ttft_s", "slo_tpot_s"):
        if not getattr(FLAGS, name) > 0:
            raise app.UsageError(f"--{name} must be > 0, got {getattr(FLAGS, name)}")
    if FLAGS.prompt_len + FLAGS.output_len - 1 > FLAGS.max_len:
        raise app.UsageError(
            f"--prompt_len {FLAGS.prompt_len} + --output_len {FLAGS.output_len} - 1 does not fit "
            f"--max_len {FLAGS.max_len}"
        )
    unknown = [d for d in FLAGS.whatif if d not in specs.SPECS]
    if unknown:
        raise app.UsageError(
            f"--whatif has unknown devices {unknown}; known: {sorted(specs.SPECS)}"
        )


def main(argv):
    del argv
    check_flags()
    model = small_decoder(FLAGS.d_model, FLAGS.n_layers, FLAGS.model, FLAGS.router)
    if FLAGS.batchmates:
        effect = batchmate_effect(model, FLAGS.batchmates)
        print(f"tokens changed by batch-mates: {effect['changed_share']:.3f} of "
              f"{effect['requests']} requests (first changed token, mean: "
              f"{effect['first_changed_token_mean']})")  # fmt: skip
    engine = Engine(model, FLAGS.slots, FLAGS.max_len)
    engine.warm_up([FLAGS.prompt_len])
    # The costs: a calibration run of the real loop, saturated (all requests at once).
    calibration = Loop(engine, FLAGS.policy)
    calibration.run(load.open_loop(FLAGS.requests, math.inf, FLAGS.prompt_len, FLAGS.output_len))
    costs = simulate.costs_from_loop(calibration.calls)
    alone = simulate.measure_costs(engine, [FLAGS.prompt_len])
    cap = simulated_capacity(costs)
    rates = [float(r) for r in FLAGS.rates]
    if FLAGS.of_capacity:
        rates = [float(f) * cap["capacity_per_s"] for f in FLAGS.of_capacity] + rates
    out = {
        "policy": FLAGS.policy, "slots": FLAGS.slots, "costs": dataclasses.asdict(costs),
        "costs_alone": dataclasses.asdict(alone), "simulated_capacity": cap, "rates": {},
        "model": FLAGS.model, "router": FLAGS.router if FLAGS.model == "moe_decoder" else None,
        "batchmates": effect if FLAGS.batchmates else None,
    }  # fmt: skip
    print(
        f"engine called alone: step {alone.step_s * 1e3:.4g} ms, insert "
        f"{alone.insert_s * 1e3:.4g} ms, prefill "
        f"{ ({b: round(t * 1e3, 3) for b, t in alone.prefill_s.items()}) } ms"
    )
    print(f"costs in the loop: step {costs.step_s * 1e3:.4g} ms, "
          f"insert {costs.insert_s * 1e3:.4g} ms, "
          f"prefill {({b: round(t * 1e3, 3) for b, t in costs.prefill_s.items()})} ms; "
          f"simulated capacity {cap['capacity_per_s']:.4g} req/s (fails at "
          f"{cap['upper_per_s']:.4g}) under p90 TTFT <= {FLAGS.slo_ttft_s} s, "
          f"TPOT <= {FLAGS.slo_tpot_s} s")  # fmt: skip
    print(f"{'rate/s':>8} {'tok/s':>8} {'good/s':>7} {'TTFT p50/p90':>15} {'TPOT p50/p90':>13} "
          f"{'occup':>6}  simulated / measured: TTFT p50 p90, TPOT p50 p90")  # fmt: skip
    for rate in rates:
        out["rates"][str(rate)] = m = serve_rate(engine, costs, rate)
        print_rate(rate, m)
    step_s = bare_step_s(engine)
    out["bare_step_s"] = step_s
    report_saturated(out, step_s)
    out["whatif"] = whatif_capacities(model)
    print_json(out, FLAGS.json_out)


if __name__ == "__main__":
    app.run(main)
