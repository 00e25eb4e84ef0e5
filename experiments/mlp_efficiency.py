"""Benchmark: how close the MLP's matmuls come to the device's square-matmul FLOP/s.

    python -m experiments.mlp_efficiency [--depth=4] [--batch=1024,2048]

Times an fp32 MLP of width 4096 at batch sizes >= 1024 and a 4096×4096 square matmul with
the lab's harness in the same process, interleaved: the MLP as the sweep times it (its call
as flat arrays, batching.workloads.base.FlatCall, compiled once and timed by
batching.measure.timing.measure). The last line is JSON with `efficiency` = best MLP achieved
FLOP/s / square-matmul FLOP/s.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from batching.measure import timing
from batching.setup import topology
from batching.workloads import base as workload
from batching.workloads import mlp as mlp_workload
from configs import default

FLAGS = flags.FLAGS
flags.DEFINE_integer("width", 4096, "MLP width.")
flags.DEFINE_integer("depth", 4, "MLP depth.")
flags.DEFINE_list("batch", ["1024", "2048"], "Batch sizes of the MLP.")
flags.DEFINE_integer("square", 4096, "Side of the square matmul.")

SETTINGS = timing.TimingSettings(warmup_runs=2, min_runs=5, max_runs=50, budget_s=8.0)


def median_s(fn, args, donate_argnums=(), next_args=None) -> float:
    """Median seconds per call of `fn(*args)`, compiled once and timed by the lab's timer."""
    compiled = timing.compile_fn(fn, args, donate_argnums)
    return float(np.median(timing.measure(compiled.call, args, SETTINGS, next_args).samples_s))


def efficiency(width: int, depth: int, batches: list[int], n: int) -> dict:
    """The MLP's achieved FLOP/s per batch against the square matmul's, measured in turn."""
    config = default.get_config()
    config.model.width, config.model.depth = width, depth
    topo = topology.build(config)
    wl = mlp_workload.build(config, topo, "")
    a = jax.device_put(jnp.ones((n, n), jnp.float32), topo.device)
    b = jax.device_put(jnp.ones((n, n), jnp.float32), topo.device)
    square, mlp = [], {}
    for batch in batches:
        square.append(2.0 * n**3 / median_s(lambda a, b: a @ b, (a, b)))
        flat = workload.flat_call(wl, batch)
        seconds = median_s(flat.fn, flat.args, flat.donate_argnums, flat.next_args)
        mlp[batch] = wl.cost(batch).flops / seconds
    square_flops = float(np.median(square))
    return {
        "device_kind": topo.device.device_kind,
        "mlp_flops_per_s": {str(k): v for k, v in mlp.items()},
        "square_matmul_flops_per_s": square_flops,
        "efficiency": max(mlp.values()) / square_flops,
    }


def main(argv):
    del argv
    batches = [int(b) for b in FLAGS.batch]
    result = efficiency(FLAGS.width, FLAGS.depth, batches, FLAGS.square)
    for batch, f in result["mlp_flops_per_s"].items():
        print(f"MLP width {FLAGS.width} depth {FLAGS.depth} batch {batch}: {f / 1e9:.1f} GFLOP/s")
    print(f"square matmul {FLAGS.square}²: {result['square_matmul_flops_per_s'] / 1e9:.1f} GFLOP/s")
    print(json.dumps(result))


if __name__ == "__main__":
    app.run(main)
