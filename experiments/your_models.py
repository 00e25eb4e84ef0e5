"""Benchmark: the prediction from the compiled program, on models none of the lab's uses.

    python -m experiments.your_models --workdir=/tmp/your_models
    python -m experiments.your_models --models=gru --batch_sizes=1,8 --workdir=/tmp/y

Three models, each written here as a user would write it, none with a hand-written op
list: a GRU over time (one `lax.scan`, its body counted by the trip count), a ResNeXt-style
net of grouped convolutions, and a stack of pre-norm transformer blocks (causal attention,
SwiGLU). Each is swept by `batching.sweep_model` over batch 1..64, into a workdir of its
own. The sweep prices every point from the ops read off its compiled program
(batching.measure.hlo_ops) before timing it. The table gives per model the median and the
largest |predicted / measured - 1| over its points; the last line is JSON.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

import batching
from experiments import print_json

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Where each model's sweep goes (one folder per model).")
flags.DEFINE_list("models", ["gru", "grouped_conv", "transformer"], "Models to sweep.")
flags.DEFINE_list("batch_sizes", ["1", "2", "4", "8", "16", "32", "64"], "Batch sizes.")
flags.DEFINE_string("json_out", None, "Also write the JSON result to this file.")
flags.mark_flag_as_required("workdir")


class GRU(nnx.Module):
    """A GRU (Cho et al. 2014) over T steps: inputs [B, T, E] to the last state [B, H]."""

    def __init__(self, inputs: int, hidden: int, rngs: nnx.Rngs):
        self.hidden = hidden
        self.wx = nnx.Linear(inputs, 3 * hidden, rngs=rngs)
        self.wh = nnx.Linear(hidden, 3 * hidden, use_bias=False, rngs=rngs)

    def __call__(self, x_BxTxE: jax.Array) -> jax.Array:
        def step(h_BxH, x_BxE):
            gx_r, gx_z, gx_n = jnp.split(self.wx(x_BxE), 3, axis=-1)
            gh_r, gh_z, gh_n = jnp.split(self.wh(h_BxH), 3, axis=-1)
            r = jax.nn.sigmoid(gx_r + gh_r)
            z = jax.nn.sigmoid(gx_z + gh_z)
            n = jnp.tanh(gx_n + r * gh_n)
            return (1 - z) * n + z * h_BxH, None

        h0_BxH = jnp.zeros((x_BxTxE.shape[0], self.hidden), x_BxTxE.dtype)
        return jax.lax.scan(step, h0_BxH, jnp.swapaxes(x_BxTxE, 0, 1))[0]


class GroupedBlock(nnx.Module):
    """A ResNeXt block (Xie et al. 2017): 1x1 up, 3x3 grouped, 1x1 down, a residual."""

    def __init__(self, channels: int, width: int, groups: int, rngs: nnx.Rngs):
        self.up = nnx.Conv(channels, width, (1, 1), rngs=rngs)
        self.grouped = nnx.Conv(width, width, (3, 3), feature_group_count=groups, rngs=rngs)
        self.down = nnx.Conv(width, channels, (1, 1), rngs=rngs)

    def __call__(self, x_BxIxJxC: jax.Array) -> jax.Array:
        h = jax.nn.relu(self.up(x_BxIxJxC))
        h = jax.nn.relu(self.grouped(h))
        return jax.nn.relu(x_BxIxJxC + self.down(h))


class GroupedConvNet(nnx.Module):
    """Images [B, I, J, 3] through a stem and grouped blocks to logits [B, V]."""

    def __init__(self, channels: int, width: int, groups: int, depth: int, rngs: nnx.Rngs):
        self.stem = nnx.Conv(3, channels, (3, 3), rngs=rngs)
        self.blocks = nnx.List([GroupedBlock(channels, width, groups, rngs) for _ in range(depth)])
        self.head = nnx.Linear(channels, 10, rngs=rngs)

    def __call__(self, images_BxIxJx3: jax.Array) -> jax.Array:
        x = jax.nn.relu(self.stem(images_BxIxJx3))
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(axis=(1, 2)))


class TransformerBlock(nnx.Module):
    """Pre-norm decoder block: causal multi-head attention, then a SwiGLU MLP."""

    def __init__(self, dim: int, heads: int, mlp: int, rngs: nnx.Rngs):
        self.heads = heads
        self.norm1 = nnx.RMSNorm(dim, rngs=rngs)
        self.qkv = nnx.Linear(dim, 3 * dim, use_bias=False, rngs=rngs)
        self.out = nnx.Linear(dim, dim, use_bias=False, rngs=rngs)
        self.norm2 = nnx.RMSNorm(dim, rngs=rngs)
        self.gate_up = nnx.Linear(dim, 2 * mlp, use_bias=False, rngs=rngs)
        self.down = nnx.Linear(mlp, dim, use_bias=False, rngs=rngs)

    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        B, L, D = x_BxLxD.shape
        N, H = self.heads, D // self.heads
        q, k, v = jnp.split(self.qkv(self.norm1(x_BxLxD)), 3, axis=-1)
        q_BxNxLxH, k_BxNxLxH, v_BxNxLxH = (t.reshape(B, L, N, H).swapaxes(1, 2) for t in (q, k, v))
        s_BxNxLxL = jnp.einsum("bnlh,bnmh->bnlm", q_BxNxLxH, k_BxNxLxH) / np.sqrt(H)
        causal_LxL = jnp.tril(jnp.ones((L, L), bool))
        p_BxNxLxL = jax.nn.softmax(jnp.where(causal_LxL, s_BxNxLxL, -1e9), axis=-1)
        o_BxNxLxH = jnp.einsum("bnlm,bnmh->bnlh", p_BxNxLxL, v_BxNxLxH)
        x_BxLxD = x_BxLxD + self.out(o_BxNxLxH.swapaxes(1, 2).reshape(B, L, D))
        gate, up = jnp.split(self.gate_up(self.norm2(x_BxLxD)), 2, axis=-1)
        return x_BxLxD + self.down(jax.nn.silu(gate) * up)


class TransformerStack(nnx.Module):
    """Token embeddings [B, L, D] through `depth` blocks."""

    def __init__(self, dim: int, heads: int, mlp: int, depth: int, rngs: nnx.Rngs):
        self.blocks = nnx.List([TransformerBlock(dim, heads, mlp, rngs) for _ in range(depth)])

    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        for block in self.blocks:
            x_BxLxD = block(x_BxLxD)
        return x_BxLxD


def _normal(*shape):
    def inputs(batch_size: int):
        rng = np.random.default_rng(batch_size)
        return (rng.standard_normal((batch_size, *shape), np.float32),)

    return inputs


# name -> (model, inputs), sized so that batch 64 takes milliseconds on a 2-core CPU.
MODELS = {
    "gru": lambda: (GRU(256, 256, nnx.Rngs(0)), _normal(64, 256)),
    "grouped_conv": lambda: (GroupedConvNet(64, 128, 8, 4, nnx.Rngs(0)), _normal(16, 16, 3)),
    "transformer": lambda: (TransformerStack(128, 4, 512, 4, nnx.Rngs(0)), _normal(32, 128)),
}


def errors(result: batching.SweepResult) -> dict[int, float]:
    """predicted / measured - 1 per measured batch size."""
    return {r["batch_size"]: r["predicted_latency_s"] / r["latency_s"] - 1 for r in result.rows}


def main(argv):
    del argv
    unknown = sorted(set(FLAGS.models) - set(MODELS))
    if unknown:
        raise app.UsageError(f"--models has unknown models {unknown}; known: {sorted(MODELS)}")
    sizes = [int(b) for b in FLAGS.batch_sizes]
    out = {}
    print(f"{'model':14s} {'batch':>5s} {'measured ms':>12s} {'predicted ms':>13s} {'error':>7s}")
    for name in FLAGS.models:
        model, inputs = MODELS[name]()
        workdir = os.path.join(FLAGS.workdir, name)
        result = batching.sweep_model(model, inputs, batch_sizes=sizes, workdir=workdir, name=name)
        err = errors(result)
        for r in result.rows:
            b, ms, predicted_ms = (
                r["batch_size"],
                r["latency_s"] * 1e3,
                r["predicted_latency_s"] * 1e3,
            )
            print(f"{name:14s} {b:5d} {ms:12.4g} {predicted_ms:13.4g} {err[b]:+7.3f}")
        absolute = [abs(e) for e in err.values()]
        out[name] = {
            "median_abs_error": float(np.median(absolute)),
            "max_abs_error": float(max(absolute)),
            "latency_s": result.latency_s(),
            "predicted_latency_s": {r["batch_size"]: r["predicted_latency_s"] for r in result.rows},
            "failed": [r["batch_size"] for r in result.failed],
        }
    for name, o in out.items():
        print(f"{name}: median |pred/meas - 1| {o['median_abs_error']:.3f}, "
              f"max {o['max_abs_error']:.3f}, failed {o['failed']}")  # fmt: skip
    print_json(out, FLAGS.json_out)


if __name__ == "__main__":
    app.run(main)
