"""The post's MLP as a workload: y = MLP(x) for x of shape [batch, width].

On a mesh the batch is split over `data`, which is data parallelism. The weights are placed
by their logical axes, `embed` and `mlp`. The default rules replicate them unless
mesh.model > 1.
"""

import ml_collections
from flax import nnx

from batching.setup.topology import Topology
from batching.workloads import base
from batching.workloads.base import Cost, Workload, cost_of
from batching.workloads.family import Family
from batching.workloads.ops import Op
from models import mlp
from models.dtypes import resolve_dtype


def model_config(model_cfg: ml_collections.ConfigDict) -> mlp.MLPConfig:
    """The model's config from the run's `model` section (base.config_of)."""
    return base.config_of(mlp.MLPConfig, model_cfg)


def validate(model_cfg: ml_collections.ConfigDict) -> None:
    """Checks the model section: MLPConfig and model.tokens.

    A bad value raises a ValueError naming its model.* field.
    """
    model_config(model_cfg)
    tokens_of(model_cfg)


def tokens_of(model_cfg: ml_collections.ConfigDict) -> int:
    """Vectors per example (`model.tokens`, default 1).

    An example of T tokens is T rows of the product. So each weight is used T times per
    example. A convolution likewise uses each weight at every output position. This is claim
    C6's dense side.
    """
    tokens = model_cfg.get("tokens", 1)
    if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens <= 0:
        raise ValueError(f"model.tokens must be a positive integer, got {tokens!r}")
    return tokens


def ops(cfg: mlp.MLPConfig, batch_size: int) -> list[Op]:
    """One forward pass as ops: `depth` dense layers of [B, W] × [W, W].

    Each layer is followed by its bias add and activation. B is the rows: the batch times
    the tokens per example. FLOPs are 2 per weight per example, a multiply and an add. The
    bias add is counted with the product. Every weight is read once. Each layer's input is
    read and its output written, in the compute dtype. On a CPU, XLA fuses the bias add and
    activation into a loop of their own. A profiler trace shows `ynn_fusion` then
    `broadcast_maximum_fusion`. That fusion is one more kernel launch. Its B·W activations are
    the product's output, still in the cache. So it adds no bytes to the count.
    """
    w_bytes = resolve_dtype(cfg.param_dtype).itemsize
    a_bytes = resolve_dtype(cfg.dtype).itemsize
    bias = 1 if cfg.use_bias else 0
    W, B = cfg.width, batch_size
    weights = (W * W + bias * W) * w_bytes
    layer = Op(
        name="dense",
        kind="gemm",
        shape=(B, W, W),
        flops=B * (2 * W * W + bias * W),
        bytes=weights + 2 * B * W * a_bytes,
        weight_bytes=weights,
        count=cfg.depth,
        dtype=cfg.dtype,
    )
    activation = Op("activation", "elementwise", (B, W), 0, 0, count=cfg.depth, dtype=cfg.dtype)
    return [layer, activation]


def cost(cfg: mlp.MLPConfig, batch_size: int) -> Cost:
    """FLOPs and bytes of one forward pass: the totals of `ops`."""
    return cost_of(ops(cfg, batch_size))


def build(run_cfg: ml_collections.ConfigDict, topo: Topology, workdir: str) -> Workload:
    """The MLP on the run's mesh, timed on random inputs of `tokens` rows per example."""
    del workdir
    cfg = model_config(run_cfg.model)
    model = mlp.MLP(cfg, rngs=nnx.Rngs(run_cfg.seed))
    # Split once: nnx.jit in graph mode would add Python work to every timed call.
    graphdef, state = nnx.split(model)
    state = topo.put_state(state)
    dtype = resolve_dtype(cfg.dtype)

    def forward(state, x_BxD):
        with topo.activate():
            return nnx.merge(graphdef, state)(x_BxD)

    tokens = tokens_of(run_cfg.model)

    def make_args(batch_size: int):
        x_BxD = base.normal_input(
            run_cfg.seed + batch_size, (batch_size * tokens, cfg.width), dtype
        )
        return state, topo.put_batch(x_BxD)

    params = mlp.num_params(cfg)
    return Workload(
        fn=forward,
        make_args=make_args,
        params=params,
        param_bytes=params * resolve_dtype(cfg.param_dtype).itemsize,
        ops=lambda batch_size: ops(cfg, batch_size * tokens),
        parallel_shape=topo.parallel_shape(experts=False, model=True),
        fields={
            "width": cfg.width,
            "depth": cfg.depth,
            "activation": cfg.activation,
            "tokens": tokens,
        },
    )


FAMILY = Family("mlp", build=build, validate=validate)
