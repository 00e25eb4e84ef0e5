"""Benchmark: the decode step's weight read, alone: x[B, D] @ W[D, F] at batch 1..8.

    python -m experiments.small_batch_gemm
    XLA_FLAGS=--xla_cpu_use_onednn=true python -m experiments.small_batch_gemm

A decode step below the ridge is its weights' read, so it runs at the rate the backend's dot
streams a weight matrix at a few rows. Here `--matrices` matrices of the decoder's MLP shape
(768 x 3072 by default), more bytes than a last-level cache, are multiplied by one x per
call and summed. It prints each batch's GB/s of weights, for the dot as written and for
W stored transposed (x @ W.T). The last line is JSON.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments import print_json

FLAGS = flags.FLAGS
flags.DEFINE_integer("d_in", 768, "Rows of each weight matrix (the decoder's d_model).")
flags.DEFINE_integer("d_out", 3072, "Columns (the decoder's mlp_dim).")
flags.DEFINE_integer("matrices", 24, "Weight matrices per call (their bytes pass the cache).")
flags.DEFINE_list("batches", ["1", "2", "4", "8"], "Rows of x.")
flags.DEFINE_integer("calls", 15, "Timed calls per point; the median is kept.")
flags.DEFINE_string("json_out", None, "Also write the JSON result to this file.")


def median_s(fn, x) -> float:
    """Median seconds of fn(x) over FLAGS.calls calls, after one to compile."""
    fn(x).block_until_ready()
    samples = []
    for _ in range(FLAGS.calls):
        t0 = time.perf_counter()
        fn(x).block_until_ready()
        samples.append(time.perf_counter() - t0)
    return float(np.median(samples))


def main(argv):
    del argv
    rng = np.random.default_rng(0)
    shape = (FLAGS.d_in, FLAGS.d_out)
    ws = [jnp.asarray(rng.standard_normal(shape, dtype=np.float32)) for _ in range(FLAGS.matrices)]
    wts = [jnp.asarray(np.asarray(w).T.copy()) for w in ws]
    plain = jax.jit(lambda x: sum(x @ w for w in ws))
    transposed = jax.jit(lambda x: sum(jnp.einsum("bd,fd->bf", x, w) for w in wts))
    weight_bytes = FLAGS.matrices * FLAGS.d_in * FLAGS.d_out * 4
    out = {"weight_bytes": weight_bytes, "backend": jax.default_backend(), "points": {}}
    for b in (int(x) for x in FLAGS.batches):
        x = jnp.ones((b, FLAGS.d_in), jnp.float32)
        point = {name: weight_bytes / median_s(fn, x) for name, fn in
                 (("x@W", plain), ("x@W.T", transposed))}  # fmt: skip
        out["points"][b] = point
        print(f"batch {b}: " + ", ".join(f"{k} {v / 1e9:.1f} GB/s" for k, v in point.items()))
    print_json(out, FLAGS.json_out)


if __name__ == "__main__":
    app.run(main)
