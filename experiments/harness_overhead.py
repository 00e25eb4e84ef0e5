"""Benchmark: how much the harness adds to the time of a tiny jitted call.

    python experiments/harness_overhead.py

Times `f(x) = 2x + 1` on 8 floats with the harness and with a bare
`f(x).block_until_ready()` loop in the same process, interleaved over several
rounds so drift hits both alike. The last line is JSON with `overhead_ratio`
(harness median / bare median; 1.0 means the harness adds nothing).
"""

import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from batching import timing  # noqa: E402

CALLS = 20_000
ROUNDS = 5


def bare_loop(f, x, n: int) -> np.ndarray:
    samples = np.empty(n)
    clock = time.perf_counter
    for i in range(n):
        t0 = clock()
        f(x).block_until_ready()
        samples[i] = clock() - t0
    return samples


def main() -> None:
    f = jax.jit(lambda x: x * 2.0 + 1.0)
    x = jax.device_put(jnp.ones((8,), jnp.float32))
    compiled = timing.compile_fn(lambda x: x * 2.0 + 1.0, (x,))
    # Same number of timed calls as the bare loop: no early stop, no budget cut.
    settings = timing.TimingSettings(
        warmup_runs=200, min_runs=CALLS, max_runs=CALLS, target_rel_ci=1e-9, budget_s=60.0
    )
    bare_loop(f, x, 1000)
    bare, harness = [], []
    for _ in range(ROUNDS):
        bare.append(float(np.median(bare_loop(f, x, CALLS))))
        harness.append(float(np.median(timing.measure(compiled.call, (x,), settings).samples_s)))
    ratios = [h / b for h, b in zip(harness, bare, strict=True)]
    result = {
        "device_kind": jax.devices()[0].device_kind,
        "bare_median_s": float(np.median(bare)),
        "harness_median_s": float(np.median(harness)),
        "overhead_ratio": float(np.median(ratios)),
        "ratios_per_round": ratios,
        "calls_per_round": CALLS,
    }
    print(f"bare loop: {result['bare_median_s'] * 1e6:.2f} µs per call")
    print(f"harness:   {result['harness_median_s'] * 1e6:.2f} µs per call")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
