"""Benchmark: the lab's decoder behind a continuous-batching loop, at request rates.

    python -m experiments.serving_loop                       # a small decoder, 4 slots
    python -m experiments.serving_loop --rates=2,8,inf --policy=static --requests=64

For each request rate (requests/s; inf sends all at once) it serves `--requests` open-loop
Poisson requests of fixed prompt and output lengths (batching.serve) and prints vLLM's
serving metrics: throughputs, goodput under the SLOs, TTFT, TPOT and E2E percentiles,
queueing delay and mean slot occupancy. It then times the engine's bare decode step at
batch `--slots` (batching.measure.timing, the sweep's timer) and sets the saturated run's
output tokens/s against what that step time allows, slots / step: the loop's own cost
(scheduling, prefill, insert, host transfers). The last line is JSON.
"""

import json
import math

import numpy as np
from absl import app, flags
from flax import nnx

from batching.measure import timing
from batching.serve import load, metrics
from batching.serve.engine import Engine
from batching.serve.loop import POLICIES, Loop
from batching.workloads import decoder as decoder_workload
from configs import decoder as decoder_config

FLAGS = flags.FLAGS
flags.DEFINE_list("rates", ["1", "4", "inf"], "Request rates (requests/s); inf: all at once.")
flags.DEFINE_enum("policy", "continuous", list(POLICIES), "Which requests a step admits.")
flags.DEFINE_integer("slots", 4, "Decode slots: the largest batch.")
flags.DEFINE_integer("max_len", 128, "Cache positions per slot.")
flags.DEFINE_integer("requests", 32, "Requests per rate.")
flags.DEFINE_integer("prompt_len", 32, "Prompt tokens per request.")
flags.DEFINE_integer("output_len", 32, "Output tokens per request.")
flags.DEFINE_float("slo_ttft_s", 1.0, "Time-to-first-token SLO (s), for goodput.")
flags.DEFINE_float("slo_tpot_s", 0.1, "Time-per-output-token SLO (s), for goodput.")
flags.DEFINE_integer("d_model", 256, "Decoder width (configs/decoder.py for the rest).")
flags.DEFINE_integer("n_layers", 4, "Decoder layers.")
flags.DEFINE_string("json_out", None, "Also write the JSON result to this file.")


def small_decoder(d_model: int, n_layers: int):
    """The lab's decoder (configs/decoder.py) at this width and depth, random weights."""
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


def main(argv):
    del argv
    rates = [float(r) for r in FLAGS.rates]
    engine = Engine(small_decoder(FLAGS.d_model, FLAGS.n_layers), FLAGS.slots, FLAGS.max_len)
    engine.warm_up([FLAGS.prompt_len])
    out = {"policy": FLAGS.policy, "slots": FLAGS.slots, "rates": {}}
    print(f"{'rate/s':>7} {'req/s':>7} {'tok/s':>8} {'good/s':>7} {'TTFT p50/p90 ms':>17} "
          f"{'TPOT p50/p90 ms':>17} {'queue ms':>9} {'occupancy':>9}")  # fmt: skip
    for rate in rates:
        requests = load.open_loop(FLAGS.requests, rate, FLAGS.prompt_len, FLAGS.output_len)
        loop = Loop(engine, FLAGS.policy)
        records, duration = loop.run(requests)
        m = metrics.summarize(records, duration, FLAGS.slo_ttft_s, FLAGS.slo_tpot_s)
        m["mean_occupancy"] = float(np.mean(loop.occupancy)) if loop.occupancy else 0.0
        out["rates"][str(rate)] = m
        ttft = f"{m['ttft_median_s'] * 1e3:.4g}/{m['ttft_p90_s'] * 1e3:.4g}"
        tpot = f"{m['tpot_median_s'] * 1e3:.4g}/{m['tpot_p90_s'] * 1e3:.4g}"
        print(f"{rate:7g} {m['request_throughput_per_s']:7.3g} {m['output_throughput_per_s']:8.4g} "
              f"{m['goodput_per_s']:7.3g} {ttft:>17} {tpot:>17} "
              f"{m['queueing_delay_mean_s'] * 1e3:9.4g} {m['mean_occupancy']:9.3g}")  # fmt: skip
    step_s = bare_step_s(engine)
    out["bare_step_s"] = step_s
    saturated = out["rates"].get(str(math.inf))
    if saturated:
        out["loop_over_step_bound"] = saturated["output_throughput_per_s"] / (FLAGS.slots / step_s)
        print(f"bare decode step at batch {FLAGS.slots}: {step_s * 1e3:.4g} ms; saturated loop "
              f"{saturated['output_throughput_per_s']:.4g} tok/s = "
              f"{out['loop_over_step_bound']:.3f} of slots / step")  # fmt: skip
    line = json.dumps(out)
    print(line)
    if FLAGS.json_out:
        with open(FLAGS.json_out, "w") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    app.run(main)
