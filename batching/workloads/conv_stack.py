"""A stack of same-size convolutions as a workload: y = ConvStack(x) for x [batch, H, W, C].

This is claim C6's convolution side. Its dense side is the MLP workload with `tokens`.
"""

import ml_collections
from flax import nnx

from batching.setup.topology import Topology
from batching.workloads import base
from batching.workloads.base import Workload
from batching.workloads.family import Family
from batching.workloads.ops import Op
from models import conv_stack
from models.dtypes import resolve_dtype


def model_config(model_cfg: ml_collections.ConfigDict) -> conv_stack.ConvStackConfig:
    """The model's config from the run's `model` section (base.config_of)."""
    return base.config_of(conv_stack.ConvStackConfig, model_cfg)


def validate(model_cfg: ml_collections.ConfigDict) -> None:
    """Checks the model section (ConvStackConfig).

    A bad value raises a ValueError naming its model.* field.
    """
    model_config(model_cfg)


def ops(cfg: conv_stack.ConvStackConfig, batch_size: int) -> list[Op]:
    """One forward pass as ops, one conv per layer.

    Each conv includes its bias and ReLU, as the conv microbenchmark runs that epilogue. It
    does 2·k²·C² FLOPs per output position. It reads its weights and input once. It writes
    its output once.
    """
    B, H, C, k = batch_size, cfg.image_size, cfg.channels, cfg.kernel
    pb, ab = resolve_dtype(cfg.param_dtype).itemsize, resolve_dtype(cfg.dtype).itemsize
    weights = (k * k * C * C + C) * pb
    activations = B * H * H * C * ab
    return [
        Op(
            name=f"layers.{i}",
            kind="conv",
            shape=(B, H, H, C, C, k, 1),
            flops=2 * B * H * H * k * k * C * C,
            bytes=weights + 2 * activations,
            weight_bytes=weights,
            dtype=cfg.dtype,
        )
        for i in range(cfg.depth)
    ]


def build(run_cfg: ml_collections.ConfigDict, topo: Topology, workdir: str) -> Workload:
    """The conv stack, placed on the run's mesh, timed on random images."""
    del workdir
    cfg = model_config(run_cfg.model)
    model = conv_stack.ConvStack(cfg, rngs=nnx.Rngs(run_cfg.seed))
    graphdef, state = nnx.split(model)
    state = topo.put_state(state)
    dtype = resolve_dtype(cfg.dtype)

    def forward(state, x_BxIxJxZ):
        with topo.activate():
            return nnx.merge(graphdef, state)(x_BxIxJxZ)

    def make_args(batch_size: int):
        shape = (batch_size, cfg.image_size, cfg.image_size, cfg.channels)
        return state, topo.put_batch(base.normal_input(run_cfg.seed + batch_size, shape, dtype))

    params = conv_stack.num_params(cfg)
    return Workload(
        fn=forward,
        make_args=make_args,
        params=params,
        param_bytes=params * resolve_dtype(cfg.param_dtype).itemsize,
        ops=lambda batch_size: ops(cfg, batch_size),
        parallel_shape=topo.parallel_shape(experts=False, model=False),
        fields={
            "channels": cfg.channels,
            "depth": cfg.depth,
            "image_size": cfg.image_size,
            # Each weight is used at every output position: FLOPs per weight per example.
            "weight_uses_per_example_position": cfg.image_size**2,
        },
    )


FAMILY = Family("conv_stack", build=build, validate=validate)
