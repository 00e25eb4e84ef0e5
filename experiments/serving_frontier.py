"""Benchmark: the serving frontier of the dense and the MoE decoder, and the simulator's check.

    python -m experiments.serving_frontier                  # ~10 min on 2 cores
    python -m experiments.serving_frontier --models=decoder --norerun --requests=16

First a decode sweep of the served decoder at `cache_len = max_len` gives its knee and its
step time at batch `slots` (configs/decoder.py, the serving config's small sizes). Then each
model is served through main.py's serving path (configs/serve.py): per policy a
calibration, a simulated capacity, and the rates of `--of_capacity`, each served by the loop
and the simulator. With `--rerun`, each policy is served again at the same rates in a run of
its own (its own calibration too). Per model and policy it prints:

- each run's simulated capacity, and whether the two agree within their tolerance;
- per metric (p50, p90 of TTFT and TPOT) at 20-90% of capacity: the simulator's error over
  the calibration's costs (predicted) and over the rate's paid costs (replayed), beside the
  loop's own rerun spread (the rerun against the first run at the same rate);
- the capacity bisected on the real loop and on the simulator over the same requests per
  trial (`--loop_capacity_requests`), and whether they rank the policies alike;
- a saturated run's output tokens/s against slots / step, for the engine's bare step (the
  loop's own cost) and the decode sweep's (the engine's program against the sweep's).

The last line is JSON (`--json_out` writes it too). Run it with nothing else on the machine.
"""

import math
import os
from typing import Any

import numpy as np
from absl import app, flags

from batching import app as lab
from batching.measure import timing
from batching.outputs import report_serving, results
from batching.serve import capacity, metrics, session, simulate
from batching.serve.engine import Engine
from batching.serve.loop import POLICIES, Loop
from batching.serve.settings import Settings
from configs import decoder as decoder_config
from configs import serve as serve_config
from experiments import print_json

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "/tmp/serving_frontier", "Where every run writes its outputs.")
flags.DEFINE_list("models", ["decoder", "token_choice_k1", "expert_choice"],
                  "configs/serve.py args: the dense decoder and MoE routers.")  # fmt: skip
flags.DEFINE_list("dense_policies", list(POLICIES), "Policies the dense decoder is served by.")
flags.DEFINE_list("moe_policies", ["continuous"], "Policies an MoE decoder is served by.")
flags.DEFINE_list("of_capacity", ["0.2", "0.4", "0.6", "0.9", "1.2"], "Rates as shares of "
                  "each policy's simulated capacity.")  # fmt: skip
flags.DEFINE_integer("requests", 48, "Requests per rate.")
flags.DEFINE_bool("rerun", True, "Serve each policy again at the first run's rates: its own "
                  "calibration and capacity, and the loop's rerun spread.")  # fmt: skip
flags.DEFINE_integer("loop_capacity_requests", 48, "Requests per trial of the capacity "
                     "bisected on the real loop (0: skip).")  # fmt: skip
flags.DEFINE_integer("saturated_requests", 64, "Requests of the saturated run.")
flags.DEFINE_float("sweep_budget_s", 3.0, "The decode sweep's timing budget per point (s).")
flags.DEFINE_string("json_out", None, "Also write the JSON result to this file.")


def decode_sweep(workdir: str, slots: int, max_len: int) -> dict[str, Any]:
    """The served decoder's decode sweep at cache_len = max_len: its step at batch `slots`."""
    config = decoder_config.get_config()
    serve_config.small(config.model)
    config.model.cache_len = max_len
    config.timing.run_budget_s = FLAGS.sweep_budget_s
    config.output.progress_bar = False
    lab.run(config, workdir)
    rows = [r for r in results.Store(workdir).rows() if r.get("latency_s")]
    at = {r["batch_size"]: r["latency_s"] for r in rows}
    return {"workdir": workdir, "latency_s": at, "step_at_slots_s": at.get(slots)}


def policies_of(model: str) -> tuple[str, ...]:
    """The policies a model is served by."""
    return tuple(FLAGS.dense_policies if model == "decoder" else FLAGS.moe_policies)


def serve_config_for(model: str, sweep_dir: str, policy: str = "", rates=()):
    """configs/serve.py for one model at the experiment's flags.

    With `policy` and `rates`: that policy alone at those rates (a rerun), no shares.
    """
    config = serve_config.get_config(model)
    config.serve.policies = (policy,) if policy else policies_of(model)
    config.serve.of_capacity = () if policy else tuple(float(x) for x in FLAGS.of_capacity)
    config.serve.rates = tuple(rates)
    config.serve.requests = FLAGS.requests
    config.serve.decode_sweep_workdir = sweep_dir
    config.output.progress_bar = False
    return config


def loop_capacity(engine: Engine, s: Settings, policy: str, cal: dict[str, Any]) -> dict:
    """The capacity bisected on the real loop and on the simulator, on the same trials."""
    n = FLAGS.loop_capacity_requests
    costs = session.costs_of(cal)

    def real(rate):
        loop = Loop(engine, policy)
        return metrics.summarize(*loop.run(session.requests_at(s, rate, n)))

    def simulated(rate):
        sim, sim_s, _ = simulate.simulate(
            session.requests_at(s, rate, n), costs, s.slots, s.max_len, policy, s.chunk_tokens
        )
        return metrics.summarize(sim, sim_s)

    low, high = cal["capacity_per_s"] / 4, cal["capacity_per_s"] * 4
    found = {}
    for name, fn in (("loop", real), ("simulator", simulated)):
        c = capacity.capacity(fn, s.slo_ttft_s, s.slo_tpot_s, low=low, high=high)
        found[name] = {"capacity_per_s": c["capacity_per_s"], "upper_per_s": c["upper_per_s"]}
    return found


def bare_step_s(engine: Engine) -> float:
    """Median seconds of the engine's own decode step over all slots, by the sweep's timer.

    Its cache is donated and fed back, so the engine's cache is spent afterwards.
    """
    tokens, active = np.zeros(engine.slots, np.int32), np.ones(engine.slots, bool)
    args = (engine.params, engine.cache, tokens, active)
    compiled = timing.compile_fn(engine._step, args, donate_argnums=(1,))  # noqa: SLF001
    plan = timing.TimingSettings(warmup_runs=2, warmup_s=0.05, min_runs=20, max_runs=500,
                                 budget_s=2.0)  # fmt: skip
    result = timing.measure(
        compiled.call, args, plan, next_args=lambda a, out: (a[0], out[1], *a[2:])
    )
    return float(np.median(result.samples_s))


def saturated(engine: Engine, s: Settings, sweep_step_s: float | None) -> dict[str, Any]:
    """A saturated continuous run against slots / step, the engine's bare step and the sweep's.

    Its steps (the run less its prefills and inserts) against the bare step: the loop's own
    cost. The bare step against the decode sweep's at batch `slots`: the engine's program.
    """
    loop = Loop(engine, "continuous")
    records, duration = loop.run(session.requests_at(s, math.inf, FLAGS.saturated_requests))
    m = metrics.summarize(records, duration)
    admitting = sum(sum(v) for k, v in loop.calls.items()
                    if k.split(":")[0] in ("prefill", "insert", "chunk"))  # fmt: skip
    bare = bare_step_s(engine)
    out = {"output_throughput_per_s": m["output_throughput_per_s"], "steps": len(loop.occupancy),
           "mean_occupancy": float(np.mean(loop.occupancy)), "bare_step_s": bare,
           "over_bare_bound": m["output_throughput_per_s"] / (s.slots / bare),
           "decode_phase_efficiency": len(loop.occupancy) * bare / (duration - admitting),
           "sweep_step_s": sweep_step_s}  # fmt: skip
    if sweep_step_s:
        out["over_sweep_bound"] = m["output_throughput_per_s"] / (s.slots / sweep_step_s)
        out["bare_over_sweep"] = bare / sweep_step_s
    return out


def calibration(workdir: str) -> dict[str, Any]:
    """A serving run's calibrations by policy."""
    return results.Store(workdir).read_json(results.CALIBRATION)["policies"]


def model_checks(model: str, sweep: dict[str, Any]) -> dict[str, Any]:
    """One model served, then each policy again at the same rates; the checks of both."""
    root = os.path.join(FLAGS.workdir, model)
    config = serve_config_for(model, sweep["workdir"])
    first = lab.run(config, os.path.join(root, "run1"))
    s = Settings.from_config(config.serve)
    engine = Engine(session.build_decoder(config.model, config.seed), s.slots, s.max_len,
                    s.chunk_tokens)  # fmt: skip
    engine.warm_up(session.prompt_lengths(s))
    out = {"workdir": os.path.join(root, "run1"), "policies": {}}
    for policy in s.policies:
        mine = [r for r in first if r["policy"] == policy]
        caps, rerun = [calibration(os.path.join(root, "run1"))[policy]], []
        if FLAGS.rerun:
            rates = sorted(r["request_rate"] for r in mine)
            again = serve_config_for(model, sweep["workdir"], policy, rates)
            rerun = lab.run(again, os.path.join(root, f"rerun_{policy}"))
            caps.append(calibration(os.path.join(root, f"rerun_{policy}"))[policy])
        c = [x["capacity_per_s"] for x in caps]
        entry = {"capacities_per_s": c, "rel_tol": caps[0]["rel_tol"],
                 "reproduced": len(c) > 1 and abs(c[1] / c[0] - 1) <= caps[0]["rel_tol"],
                 "errors": report_serving.error_summary(mine, rerun)}  # fmt: skip
        if FLAGS.loop_capacity_requests:
            entry["bisected"] = loop_capacity(engine, s, policy, caps[0])
        out["policies"][policy] = entry
    # The sweep is of the dense decoder: an MoE's steps are set against their bare step only.
    step = sweep["step_at_slots_s"] if model == "decoder" else None
    out["saturated"] = saturated(engine, s, step)
    bis = {p: e.get("bisected") for p, e in out["policies"].items()}
    if len(bis) > 1 and all(bis.values()):
        rank = lambda who: sorted(bis, key=lambda p: -bis[p][who]["capacity_per_s"])  # noqa: E731
        out["ranking"] = {"loop": rank("loop"), "simulator": rank("simulator")}
    return out


def print_model(model: str, out: dict[str, Any]) -> None:
    """The model's checks as lines of text."""
    for policy, e in out["policies"].items():
        caps = ", ".join(f"{c:.4g}" for c in e["capacities_per_s"])
        print(f"{model} {policy}: simulated capacity {caps} req/s (tolerance {e['rel_tol']:.0%}"
              f", reproduced: {e['reproduced']})")  # fmt: skip
        for m, err in e["errors"].items():
            cells = " ".join(f"{k} {v['median']:.3f}/{v['max']:.3f}" if v else f"{k} -"
                             for k, v in err.items())  # fmt: skip
            print(f"    {m:<11} |x/measured - 1| median/max: {cells}")
        if e.get("bisected"):
            b = e["bisected"]
            print(f"    bisected on {FLAGS.loop_capacity_requests} requests a trial: loop "
                  f"{b['loop']['capacity_per_s']:.4g}, simulator "
                  f"{b['simulator']['capacity_per_s']:.4g} req/s")  # fmt: skip
    if "ranking" in out:
        print(f"{model} ranking by capacity: loop {out['ranking']['loop']}, simulator "
              f"{out['ranking']['simulator']}")  # fmt: skip
    sat = out["saturated"]
    ms = lambda k: f"{sat[k] * 1e3:.4g} ms"  # noqa: E731
    line = (f"{model} saturated: {sat['output_throughput_per_s']:.4g} tok/s = "
            f"{sat['over_bare_bound']:.3f} of slots / bare step ({ms('bare_step_s')}); its "
            f"steps at {sat['decode_phase_efficiency']:.3f} of the bare step's speed")  # fmt: skip
    if sat.get("sweep_step_s"):
        line += (f"; {sat['over_sweep_bound']:.3f} of slots / the decode sweep's step "
                 f"({ms('sweep_step_s')}), bare step {sat['bare_over_sweep']:.3f}x it")  # fmt: skip
    print(line)


def main(argv):
    del argv
    base = Settings.from_config(serve_config.serve())
    sweep = decode_sweep(os.path.join(FLAGS.workdir, "decode_sweep"), base.slots, base.max_len)
    out = {"decode_sweep": sweep, "models": {}}
    for model in FLAGS.models:
        out["models"][model] = model_checks(model, sweep)
        print_model(model, out["models"][model])
    print_json(out, FLAGS.json_out)


if __name__ == "__main__":
    app.run(main)
