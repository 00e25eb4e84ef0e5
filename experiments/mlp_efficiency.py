"""Benchmark: how close the MLP's matmuls come to the device's square-matmul FLOP/s.

    python experiments/mlp_efficiency.py [--depth 4] [--batch 1024 2048]

Times an fp32 MLP of width 4096 at batch sizes >= 1024 and a 4096×4096 square
matmul with the lab's harness in the same process, interleaved. The last line
is JSON with `efficiency` = best MLP achieved FLOP/s / square-matmul FLOP/s.
"""

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from batching import timing, topology  # noqa: E402
from batching.workloads import mlp as mlp_workload  # noqa: E402
from configs import default  # noqa: E402

SETTINGS = timing.TimingSettings(warmup_runs=2, min_runs=5, max_runs=50, budget_s=8.0)


def median_s(fn, args) -> float:
    compiled = timing.compile_fn(fn, args)
    return float(np.median(timing.measure(compiled.call, args, SETTINGS).samples_s))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--batch", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--square", type=int, default=4096)
    args = parser.parse_args()

    config = default.get_config()
    config.model.width, config.model.depth = args.width, args.depth
    topo = topology.build(config)
    device = topo.device
    wl = mlp_workload.build(config, topo, "")
    n = args.square
    a = jax.device_put(jnp.ones((n, n), jnp.float32), device)
    b = jax.device_put(jnp.ones((n, n), jnp.float32), device)

    square, mlp = [], {}
    for batch in args.batch:
        square.append(2.0 * n**3 / median_s(lambda a, b: a @ b, (a, b)))
        cost = mlp_workload.cost(mlp_workload.model_config(config.model), batch)
        mlp[batch] = cost.flops / median_s(wl.fn, wl.make_args(batch))
    square_flops = float(np.median(square))
    best = max(mlp.values())
    for batch, f in mlp.items():
        print(f"MLP width {args.width} depth {args.depth} batch {batch}: {f / 1e9:.1f} GFLOP/s")
    print(f"square matmul {n}x{n}: {square_flops / 1e9:.1f} GFLOP/s")
    result = {
        "device_kind": device.device_kind,
        "mlp_flops_per_s": {str(k): v for k, v in mlp.items()},
        "square_matmul_flops_per_s": square_flops,
        "efficiency": best / square_flops,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
