"""Benchmark: what the lab's timer adds to a model's call, against a bare loop over the same
jitted function with the workload's own arguments.

    python -m experiments.harness_overhead                      # the five CPU workloads
    python -m experiments.harness_overhead --cases=mlp_d8_w64 --rounds=3

For each case, at its batch size, in interleaved rounds (the methods' order shuffled each
round, so drift hits them alike), it times:

- `lab`: the sweep's own path: the workload's call as flat arrays (batching.workload.FlatCall),
  compiled once (batching.timing.compile_fn) and timed by batching.timing.measure;
- `bare`: `jax.jit` of the same flat function, `f(*arrays)` then blocking on its outputs, in a
  plain loop (the decoder's donated cache fed back outside the clock in both);
- `state`: `jax.jit` of the workload's own function over its pytree arguments (the model's
  parameters as an nnx.State, flattened in Python on every call): what the lab timed before;
- `lab_keep` (with --keep_outputs): the lab's timer holding each call's outputs through the
  next call, as `out = f(x)` in a loop does (on a GPU the outputs then alternate between two
  buffers and XLA updates its CUDA graph on every call; README, "What a run does").

It also measures the call floor the prediction uses (batching.peaks.measure_call_floor: a
trivial jitted call handed the same arguments), flat and as pytrees. The table gives µs per
call (median over rounds of each round's median) and lab / bare; the last line is JSON.
"""

import json
import math
import random
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from absl import app, flags

from batching import peaks, timing, topology, workload
from configs import decoder as decoder_config
from configs import default
from configs import resnet as resnet_config

FLAGS = flags.FLAGS
flags.DEFINE_list("cases", None, "Cases to time (default: all of CASES).")
flags.DEFINE_integer("rounds", 5, "Interleaved rounds.")
flags.DEFINE_float("seconds", 0.4, "Seconds per method per round (at least --min_calls calls).")
flags.DEFINE_integer("min_calls", 10, "Calls per method per round, at least.")
flags.DEFINE_bool("keep_outputs", True, "Also time the lab's timer holding outputs (lab_keep).")
flags.DEFINE_string("json_out", None, "Also write the JSON result to this file.")


def _mlp(width: int, depth: int, dtype: str = "float32"):
    config = default.get_config()
    config.model.update(width=width, depth=depth, dtype=dtype, param_dtype=dtype)
    return config


def _resnet(depth: int, width: int, image_size: int):
    config = default.get_config()
    config.model = resnet_config.model(depth)
    config.model.update(width=width, image_size=image_size, small_input=image_size <= 64)
    return config


def _decoder():
    config = default.get_config()
    config.model = decoder_config.model("decode")
    return config


# name -> (config maker, batch size). The CPU targets of issue 18: batch 1 of the smallest
# and largest networks, and the decoder's decode step (12 layers, cache 1024).
CASES: dict[str, tuple[Callable[[], Any], int]] = {
    "mlp_d8_w64": (lambda: _mlp(64, 8), 1),
    "mlp_d8_w1024": (lambda: _mlp(1024, 8), 1),
    "resnet18_w8_32": (lambda: _resnet(18, 8, 32), 1),
    "resnet50_224": (lambda: _resnet(50, 64, 224), 1),
    "decoder_decode": (_decoder, 1),
}


def loop(
    f: Callable[..., Any],
    args: tuple,
    n: int,
    next_args: Callable[[tuple, Any], tuple] | None,
) -> tuple[np.ndarray, tuple]:
    """n calls of f(*args) timed one by one, blocking on every output inside the clock; the
    carried outputs fed back outside it. Returns the samples and the arguments to go on with."""
    samples = np.empty(n)
    clock = time.perf_counter
    for i in range(n):
        t0 = clock()
        out = f(*args)
        jax.block_until_ready(out)
        samples[i] = clock() - t0
        if next_args is not None:
            args = next_args(args, out)
        del out
    return samples, args


def structured_next_args(carry: dict[int, int]) -> Callable[[tuple, Any], tuple] | None:
    if not carry:
        return None

    def next_args(args, out):
        new = list(args)
        for k, a in carry.items():
            new[a] = out[k]
        return tuple(new)

    return next_args


class Case:
    """One workload at one batch size, ready to be called every way the benchmark compares."""

    def __init__(self, name: str, config: Any, batch: int):
        topo = topology.build(config)
        wl = workload.build(config, topo, "")
        self.name, self.batch = name, batch
        self.flat = workload.flat_call(wl, batch)
        self.compiled = timing.compile_fn(self.flat.fn, self.flat.args, self.flat.donate_argnums)
        self.args = {"lab": self.flat.args}
        self.jitted = jax.jit(self.flat.fn, donate_argnums=self.flat.donate_argnums)
        self.args["bare"] = workload.flat_call(wl, batch).args
        self.state_fn = jax.jit(wl.fn, donate_argnums=wl.donate_argnums)
        self.args["state"] = tuple(wl.make_args(batch))
        self.state_next = structured_next_args(wl.carry)
        self.args["lab_keep"] = workload.flat_call(wl, batch).args
        self.arrays = len(self.flat.args)
        # Each path once, to compile it and estimate a call.
        t0 = time.perf_counter()
        self.run("bare", 1)
        self.call_s = time.perf_counter() - t0
        self.run("state", 1)
        # The call floor the roofline uses, with these arguments flat and as pytrees (the
        # donated cache is alive here: the floor's trivial call donates nothing).
        self.floor_flat_s = peaks.measure_call_floor(self.args["bare"])
        self.floor_state_s = peaks.measure_call_floor(self.args["state"])

    def run(self, method: str, n: int) -> np.ndarray:
        args = self.args[method]
        if method in ("lab", "lab_keep"):
            settings = timing.TimingSettings(
                warmup_runs=1, warmup_s=0.0, min_runs=max(n, 3), max_runs=max(n, 3),
                target_rel_ci=1e-12, budget_s=1e9,
            )  # fmt: skip
            # The timer's own loop, with every call counted: no early stop, no budget cut.
            holder = {}

            def next_args(a, out):
                a = self.flat.next_args(a, out)
                holder["args"] = a
                return a

            m = timing.measure(
                self.compiled.call,
                args,
                settings,
                next_args if self.flat.next_args else None,
                keep_outputs=method == "lab_keep",
            )
            self.args[method] = holder.get("args", args)
            return m.samples_s
        if method == "bare":
            samples, self.args[method] = loop(self.jitted, args, n, self.flat.next_args)
        else:
            samples, self.args[method] = loop(self.state_fn, args, n, self.state_next)
        return samples


def benchmark(names: list[str], rounds: int, seconds: float, min_calls: int, keep: bool) -> dict:
    methods = ["lab", "bare", "state"] + (["lab_keep"] if keep else [])
    rng = random.Random(0)
    result = {
        "device_kind": jax.devices()[0].device_kind,
        "platform": jax.devices()[0].platform,
        "jax_version": jax.__version__,
        "rounds": rounds,
        "cases": {},
    }
    for name in names:
        make, batch = CASES[name]
        case = Case(name, make(), batch)
        n = max(min_calls, min(5000, math.ceil(seconds / max(case.call_s, 1e-6))))
        medians = {m: [] for m in methods}
        for _ in range(rounds):
            order = methods[:]
            rng.shuffle(order)
            for m in order:
                medians[m].append(float(np.median(case.run(m, n))))
        per_call = {m: float(np.median(v)) for m, v in medians.items()}
        ratios = [lab / bare for lab, bare in zip(medians["lab"], medians["bare"], strict=True)]
        result["cases"][name] = {
            "batch_size": batch,
            "arrays": case.arrays,
            "calls_per_round": n,
            **{f"{m}_us": per_call[m] * 1e6 for m in methods},
            "lab_over_bare": float(np.median(ratios)),
            "lab_over_bare_per_round": ratios,
            "state_over_bare": per_call["state"] / per_call["bare"],
            **({"keep_over_lab": per_call["lab_keep"] / per_call["lab"]} if keep else {}),
            "call_floor_flat_us": case.floor_flat_s * 1e6,
            "call_floor_state_us": case.floor_state_s * 1e6,
        }
        del case
    return result


def table(result: dict) -> str:
    keep = any("lab_keep_us" in c for c in result["cases"].values())
    header = (
        f"{'case':<16} {'arrays':>6} {'lab µs':>10} {'bare µs':>10} {'state µs':>10} "
        + (f"{'keep µs':>10} " if keep else "")
        + f"{'lab/bare':>9} {'floor flat µs':>14} {'floor state µs':>15}"
    )
    lines = [header, "-" * len(header)]
    for name, c in result["cases"].items():
        lines.append(
            f"{name:<16} {c['arrays']:>6} {c['lab_us']:>10.1f} {c['bare_us']:>10.1f} "
            f"{c['state_us']:>10.1f} "
            + (f"{c['lab_keep_us']:>10.1f} " if keep else "")
            + f"{c['lab_over_bare']:>9.3f} {c['call_floor_flat_us']:>14.1f} "
            f"{c['call_floor_state_us']:>15.1f}"
        )
    return "\n".join(lines)


def main(argv):
    del argv
    names = FLAGS.cases or list(CASES)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        raise app.UsageError(f"--cases has unknown cases {unknown}; known: {sorted(CASES)}")
    result = benchmark(names, FLAGS.rounds, FLAGS.seconds, FLAGS.min_calls, FLAGS.keep_outputs)
    print(f"{result['device_kind']} ({result['platform']}), jax {result['jax_version']}")
    print(table(result))
    if FLAGS.json_out:
        with open(FLAGS.json_out, "w") as f:
            json.dump(result, f, indent=2)
    print(json.dumps(result))


if __name__ == "__main__":
    app.run(main)
