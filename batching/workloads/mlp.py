"""The post's MLP as a workload: y = MLP(x) for x of shape [batch, width].

On a mesh the batch is split over `data` (data parallelism) and the weights are placed by
their logical axes (`embed`, `mlp`; replicated under the default rules unless mesh.model > 1).
"""

import jax
import ml_collections
from flax import nnx

from batching.topology import Topology
from batching.workload import Cost, Workload
from models import mlp
from models.dtypes import resolve_dtype


def model_config(model_cfg: ml_collections.ConfigDict) -> mlp.MLPConfig:
    return mlp.MLPConfig(
        width=model_cfg.width,
        depth=model_cfg.depth,
        activation=model_cfg.activation,
        dtype=model_cfg.dtype,
        param_dtype=model_cfg.param_dtype,
        use_bias=model_cfg.use_bias,
    )


def validate(model_cfg: ml_collections.ConfigDict) -> None:
    model_config(model_cfg)


def cost(cfg: mlp.MLPConfig, batch_size: int) -> Cost:
    """FLOPs and bytes of one forward pass.

    FLOPs: 2 per weight per example (multiply and add), plus the bias adds.
    Bytes: every weight read once, plus each layer's input read and output
    written (activations in the compute dtype).
    """
    w_bytes = resolve_dtype(cfg.param_dtype).itemsize
    a_bytes = resolve_dtype(cfg.dtype).itemsize
    bias = 1 if cfg.use_bias else 0
    flops = cfg.depth * batch_size * (2 * cfg.width * cfg.width + bias * cfg.width)
    weight_bytes = mlp.num_params(cfg) * w_bytes
    activation_bytes = cfg.depth * 2 * batch_size * cfg.width * a_bytes
    return Cost(flops=flops, bytes=weight_bytes + activation_bytes, weight_bytes=weight_bytes)


def build(run_cfg: ml_collections.ConfigDict, topo: Topology, workdir: str) -> Workload:
    del workdir
    cfg = model_config(run_cfg.model)
    model = mlp.MLP(cfg, rngs=nnx.Rngs(run_cfg.seed))
    # Split once: timing nnx.jit in graph mode would add ~250 µs of Python per call.
    graphdef, state = nnx.split(model)
    state = topo.put_state(state)
    dtype = resolve_dtype(cfg.dtype)

    def forward(state, x_BxD):
        with topo.activate():
            return nnx.merge(graphdef, state)(x_BxD)

    def make_args(batch_size: int):
        key = jax.random.key(run_cfg.seed + batch_size)
        x_BxD = jax.random.normal(key, (batch_size, cfg.width), dtype)
        return state, topo.put_batch(x_BxD)

    params = mlp.num_params(cfg)
    return Workload(
        fn=forward,
        make_args=make_args,
        params=params,
        param_bytes=params * resolve_dtype(cfg.param_dtype).itemsize,
        cost=lambda batch_size: cost(cfg, batch_size),
        gemm_shapes=lambda batch_size: [(batch_size, cfg.width, cfg.width, cfg.depth)],
        fields={"width": cfg.width, "depth": cfg.depth, "activation": cfg.activation},
    )
