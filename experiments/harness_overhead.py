"""Benchmark: what the lab's timer adds to a model's call, against a bare loop over the same
jitted function with the workload's own arguments.

    python -m experiments.harness_overhead                      # the six CPU workloads
    python -m experiments.harness_overhead --cases=mlp_d8_w64 --rounds=3
    python -m experiments.harness_overhead --suite=accelerator  # the GPU overhead study

The accelerator suite (experiments/accelerator_run.sh runs it with XLA's command buffers on
and off) times the post's MLP (depth 8, width 1024, fp32) at batch 1, 8 and 512 and a bf16
one of width 8192 at batch 1 and 512, adds the trivial call's floor (a blocking loop, and
200 calls dispatched before one wait) and, per case, a profiler trace (Python tracer off)
read back into kernel seconds against wall seconds per call.

For each case, at its batch size, in interleaved rounds (the methods' order shuffled each
round, so drift hits them alike), it times:

- `lab`: the sweep's own path: the workload's call as flat arrays
  (batching.workloads.base.FlatCall), compiled once (batching.measure.timing.compile_fn) and
  timed by batching.measure.timing.measure;
- `bare`: `jax.jit` of the same flat function, `f(*arrays)` then blocking on its outputs, in a
  plain loop (the decoder's donated cache fed back outside the clock in both);
- `state`: `jax.jit` of the workload's own function over its pytree arguments (the model's
  parameters as an nnx.State, flattened in Python on every call): what the lab timed before;
- `lab_keep` (with --keep_outputs): the lab's timer holding each call's outputs through the
  next call, as `out = f(x)` in a loop does (on a GPU the outputs then alternate between two
  buffers and XLA updates its CUDA graph on every call; docs/measuring.md).

It also measures the call floor the prediction uses
(batching.measure.microbench.measure_call_floor: a trivial jitted call handed the same
arguments), flat and as pytrees. The table gives µs per
call (median over rounds of each round's median) and lab / bare; the last line is JSON.
"""

import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from absl import app, flags

from batching.measure import microbench, profiling, timing
from batching.setup import runs
from batching.workloads import base as workload
from batching.workloads import registry
from configs import custom, default
from configs import decoder as decoder_config
from configs import resnet as resnet_config
from experiments import print_json

FLAGS = flags.FLAGS
flags.DEFINE_enum("suite", "cpu", ["cpu", "accelerator"], "Which cases (CPU targets or GPU study).")
flags.DEFINE_list("cases", None, "Cases to time (default: the suite's).")
flags.DEFINE_bool("trace", None, "Trace each case (default: on in the accelerator suite).")
flags.DEFINE_integer("rounds", 15, "Interleaved rounds.")
flags.DEFINE_float("seconds", 0.1, "Seconds per method per round (at least --min_calls calls).")
flags.DEFINE_integer("min_calls", 5, "Calls per method per round, at least.")
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


def _vit(depth: int):
    config = custom.get_config("examples.vit:FAMILY")  # a user's model, as sweep_model runs it
    config.model.depth = depth
    return config


def _decoder():
    config = default.get_config()
    config.model = decoder_config.model("decode")
    return config


# name -> (config maker, batch size). Batch 1 of the smallest
# and largest networks, and the decoder's decode step (12 layers, cache 1024).
CASES: dict[str, tuple[Callable[[], Any], int]] = {
    "mlp_d8_w64": (lambda: _mlp(64, 8), 1),
    "mlp_d8_w1024": (lambda: _mlp(1024, 8), 1),
    "resnet18_w8_32": (lambda: _resnet(18, 8, 32), 1),
    "resnet50_224": (lambda: _resnet(50, 64, 224), 1),
    "decoder_decode": (_decoder, 1),
    # A model from outside the lab (examples/vit.py, 104 parameter arrays), as the API runs it.
    "vit_d6": (lambda: _vit(6), 1),
    # The accelerator study: the post's MLP, and a bf16 one wide enough to leave the floor.
    "mlp_d8_w1024_b8": (lambda: _mlp(1024, 8), 8),
    "mlp_d8_w1024_b512": (lambda: _mlp(1024, 8), 512),
    "mlp_d8_w8192_bf16_b1": (lambda: _mlp(8192, 8, "bfloat16"), 1),
    "mlp_d8_w8192_bf16_b512": (lambda: _mlp(8192, 8, "bfloat16"), 512),
}
SUITES = {
    "cpu": [
        "mlp_d8_w64",
        "mlp_d8_w1024",
        "resnet18_w8_32",
        "resnet50_224",
        "decoder_decode",
        "vit_d6",
    ],  # fmt: skip
    "accelerator": [
        "mlp_d8_w1024",
        "mlp_d8_w1024_b8",
        "mlp_d8_w1024_b512",
        "mlp_d8_w8192_bf16_b1",
        "mlp_d8_w8192_bf16_b512",
    ],
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
        wl = registry.Bench(runs.Run(name, config)).workload("")
        self.wl = wl
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
        self.floor_flat_s = microbench.measure_call_floor(self.args["bare"])
        self.floor_state_s = microbench.measure_call_floor(self.args["state"])

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


def trivial_floor(n: int = 2000, queued: int = 200) -> dict[str, float]:
    """A trivial jitted call (8 floats in, x + 1 out): µs per call in a blocking loop, and per
    call when `queued` calls are dispatched before one wait (dispatch alone, overlapped)."""
    f = jax.jit(lambda x: x + 1.0)
    x = jax.device_put(np.ones(8, np.float32))
    blocking, _ = loop(f, (x,), n, None)
    blocking, _ = loop(f, (x,), n, None)
    pipelined = []
    clock = time.perf_counter
    for _ in range(10):
        t0 = clock()
        outs = [f(x) for _ in range(queued)]
        jax.block_until_ready(outs)
        pipelined.append((clock() - t0) / queued)
        del outs
    return {
        "blocking_us": float(np.median(blocking)) * 1e6,
        "dispatched_before_one_wait_us": float(np.median(pipelined)) * 1e6,
        "queued_calls": queued,
    }


def traced(case: Case, steps: int = 12) -> dict[str, float]:
    """Kernel seconds against wall seconds of the median traced call (the lab's own trace of
    a point, batching.measure.profiling.trace_point, read back by batching.measure.profiling)."""
    logdir = tempfile.mkdtemp(prefix="overhead_trace_")
    since = time.time()
    hlo = profiling.trace_point(case.wl, case.batch, steps, logdir)
    fields = profiling.read(profiling.newest_trace(logdir, since), hlo)
    wall = fields["traced_latency_s"]
    other = fields["traced_ops"].get(profiling.OTHER, {}).get("seconds", 0.0)
    shutil.rmtree(logdir, ignore_errors=True)
    return {
        "traced_wall_us": wall * 1e6,
        "traced_kernels_us": (wall - other) * 1e6,
        "traced_outside_kernels_us": other * 1e6,
    }


def benchmark(
    names: list[str], rounds: int, seconds: float, min_calls: int, keep: bool, trace: bool
) -> dict:
    methods = ["lab", "bare", "state"] + (["lab_keep"] if keep else [])
    rng = random.Random(0)
    result = {
        "device_kind": jax.devices()[0].device_kind,
        "platform": jax.devices()[0].platform,
        "jax_version": jax.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "rounds": rounds,
        "trivial_call": trivial_floor(),
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
            **(traced(case) if trace else {}),
        }
        del case
    return result


def table(result: dict) -> str:
    keep = any("lab_keep_us" in c for c in result["cases"].values())
    trace = any("traced_wall_us" in c for c in result["cases"].values())
    floor = result["trivial_call"]
    lines = [
        f"trivial call: {floor['blocking_us']:.1f} µs blocking, "
        f"{floor['dispatched_before_one_wait_us']:.1f} µs each with {floor['queued_calls']} "
        "dispatched before one wait"
    ]
    header = (
        f"{'case':<24} {'arrays':>6} {'lab µs':>10} {'bare µs':>10} {'state µs':>10} "
        + (f"{'keep µs':>10} " if keep else "")
        + f"{'lab/bare':>9} {'floor flat µs':>14} {'floor state µs':>15}"
        + (f" {'traced µs':>10} {'kernels µs':>11}" if trace else "")
    )
    lines += [header, "-" * len(header)]
    for name, c in result["cases"].items():
        lines.append(
            f"{name:<24} {c['arrays']:>6} {c['lab_us']:>10.1f} {c['bare_us']:>10.1f} "
            f"{c['state_us']:>10.1f} "
            + (f"{c['lab_keep_us']:>10.1f} " if keep else "")
            + f"{c['lab_over_bare']:>9.3f} {c['call_floor_flat_us']:>14.1f} "
            f"{c['call_floor_state_us']:>15.1f}"
            + (f" {c['traced_wall_us']:>10.1f} {c['traced_kernels_us']:>11.1f}" if trace else "")
        )
    return "\n".join(lines)


def main(argv):
    del argv
    names = FLAGS.cases or SUITES[FLAGS.suite]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        raise app.UsageError(f"--cases has unknown cases {unknown}; known: {sorted(CASES)}")
    trace = FLAGS.trace if FLAGS.trace is not None else FLAGS.suite == "accelerator"
    result = benchmark(
        names, FLAGS.rounds, FLAGS.seconds, FLAGS.min_calls, FLAGS.keep_outputs, trace
    )
    print(f"{result['device_kind']} ({result['platform']}), jax {result['jax_version']}, "
          f"XLA_FLAGS={result['xla_flags']!r}")  # fmt: skip
    print(table(result))
    print_json(result, FLAGS.json_out)


if __name__ == "__main__":
    app.run(main)
