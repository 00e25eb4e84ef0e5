"""A ResNet as a workload: logits = ResNet(images) for images [batch, size, size, 3]."""

import jax
import ml_collections
from flax import nnx

from batching.setup.topology import Topology
from batching.workloads import base
from batching.workloads.base import Workload
from batching.workloads.family import Family
from batching.workloads.ops import Op
from models import resnet
from models.dtypes import resolve_dtype


def model_config(model_cfg: ml_collections.ConfigDict) -> resnet.ResNetConfig:
    """The model's config from the run's `model` section (base.config_of)."""
    return base.config_of(resnet.ResNetConfig, model_cfg)


def validate(model_cfg: ml_collections.ConfigDict) -> None:
    """Checks the model section (ResNetConfig).

    A bad value raises a ValueError naming its model.* field.
    """
    model_config(model_cfg)


def ops(cfg: resnet.ResNetConfig, batch_size: int) -> list[Op]:
    """One forward pass as ops, one per layer of models.resnet.layer_costs, in run order.

    A conv op is the convolution with its BatchNorm and ReLU. The analytic count takes
    those as fused into it. The conv microbenchmark runs them too. So their time is measured
    whether or not a backend fuses them. Pools are bandwidth-bound reductions. The
    classifier is a GEMM. The residual adds are not counted, as in layer_costs.
    """
    out = []
    for c in resnet.layer_costs(cfg, batch_size):
        moved = c["weight_bytes"] + c["input_bytes"] + c["output_bytes"]
        if c["kind"].startswith("conv"):
            kind, shape = "conv", (*c["in_shape"], c["out_shape"][-1], *c["window"])
        elif c["kind"] == "dense":
            kind, shape = "gemm", (batch_size, c["in_shape"][-1], c["out_shape"][-1])
        else:
            kind, shape = "reduction", tuple(c["out_shape"])
        out.append(
            Op(
                name=c["name"],
                kind=kind,
                shape=shape,
                flops=c["flops"],
                bytes=moved,
                weight_bytes=c["weight_bytes"],
                dtype=cfg.dtype,
            )
        )
    return out


def build(run_cfg: ml_collections.ConfigDict, topo: Topology, workdir: str) -> Workload:
    """The ResNet, placed on the run's mesh, timed on random images."""
    del workdir
    cfg = model_config(run_cfg.model)
    # An rbg key: threefry's sampler compiles a program per kernel shape, slow on a CPU.
    model = resnet.ResNet(cfg, rngs=nnx.Rngs(jax.random.key(run_cfg.seed, impl="rbg")))
    graphdef, state = nnx.split(model)
    state = topo.put_state(state)
    dtype = resolve_dtype(cfg.dtype)

    def forward(state, images_BxHxWx3):
        return nnx.merge(graphdef, state)(images_BxHxWx3)

    def make_args(batch_size: int):
        shape = (batch_size, cfg.image_size, cfg.image_size, 3)
        return state, topo.put_batch(base.normal_input(run_cfg.seed + batch_size, shape, dtype))

    intensity = resnet.arithmetic_intensity_by_kind(cfg, 1)
    params = resnet.num_params(cfg)
    return Workload(
        fn=forward,
        make_args=make_args,
        params=params,
        param_bytes=params * resolve_dtype(cfg.param_dtype).itemsize,
        ops=lambda batch_size: ops(cfg, batch_size),
        parallel_shape=topo.parallel_shape(experts=False, model=False),
        fields={
            "depth": cfg.depth,
            "image_size": cfg.image_size,
            "width": cfg.width,
            "num_classes": cfg.num_classes,
            # FLOPs per byte of each layer kind at batch 1 (claim C6).
            "intensity_b1": intensity,
        },
    )


FAMILY = Family("resnet", build=build, validate=validate)
