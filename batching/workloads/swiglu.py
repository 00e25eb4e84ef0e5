"""A dense SwiGLU stack as a workload: y = SwiGLUStack(x) for x [batch, d_model].

Each example is one token. It is the MoE MLP's dense counterpart, with the same active
parameters.
"""

import ml_collections
from flax import nnx

from batching.setup.topology import Topology
from batching.workloads import base
from batching.workloads.base import Workload
from batching.workloads.family import Family
from batching.workloads.ops import Op
from models import swiglu
from models.dtypes import resolve_dtype


def model_config(model_cfg: ml_collections.ConfigDict) -> swiglu.SwiGLUConfig:
    """The model's config from the run's `model` section (base.config_of)."""
    return base.config_of(swiglu.SwiGLUConfig, model_cfg)


def validate(model_cfg: ml_collections.ConfigDict) -> None:
    """Checks the model section (SwiGLUConfig).

    A bad value raises a ValueError naming its model.* field.
    """
    model_config(model_cfg)


def ops(cfg: swiglu.SwiGLUConfig, batch_size: int) -> list[Op]:
    """One forward pass as ops, three per layer.

    The gate and up products are [B, D] × [D, F]. The SiLU-gated product is an elementwise
    pass over [B, F]. The down product is [B, F] × [F, D], with its residual add. Weights are
    read once. The input and output activations are charged to the first and last product.
    """
    B, D, F, layers = batch_size, cfg.d_model, cfg.mlp_dim, cfg.depth
    pb, ab = resolve_dtype(cfg.param_dtype).itemsize, resolve_dtype(cfg.dtype).itemsize
    w = D * F * pb
    return [
        Op("gate_up", "gemm", (B, D, F), 2 * B * D * F, w + B * D * ab, w, count=2 * layers,
           dtype=cfg.dtype),
        Op("swiglu", "elementwise", (B, F), 3 * B * F, 0, count=layers, dtype=cfg.dtype),
        Op("down", "gemm", (B, F, D), 2 * B * F * D, w + B * D * ab, w, count=layers,
           dtype=cfg.dtype),
    ]  # fmt: skip


def build(run_cfg: ml_collections.ConfigDict, topo: Topology, workdir: str) -> Workload:
    """The SwiGLU stack, placed on the run's mesh, timed on random tokens."""
    del workdir
    cfg = model_config(run_cfg.model)
    model = swiglu.SwiGLUStack(cfg, rngs=nnx.Rngs(run_cfg.seed))
    graphdef, state = nnx.split(model)
    state = topo.put_state(state)
    dtype = resolve_dtype(cfg.dtype)

    def forward(state, x_BxD):
        with topo.activate():
            return nnx.merge(graphdef, state)(x_BxD)

    def make_args(batch_size: int):
        x_BxD = base.normal_input(run_cfg.seed + batch_size, (batch_size, cfg.d_model), dtype)
        return state, topo.put_batch(x_BxD)

    params = swiglu.num_params(cfg)
    return Workload(
        fn=forward,
        make_args=make_args,
        params=params,
        param_bytes=params * resolve_dtype(cfg.param_dtype).itemsize,
        ops=lambda batch_size: ops(cfg, batch_size),
        parallel_shape=topo.parallel_shape(experts=False, model=True),
        fields={
            "d_model": cfg.d_model,
            "mlp_dim": cfg.mlp_dim,
            "depth": cfg.depth,
            "active_params": params,
        },  # fmt: skip
    )


FAMILY = Family("swiglu", build=build, validate=validate)
