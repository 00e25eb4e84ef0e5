"""A Mixture-of-Experts MLP as a workload: y = MoEMLP(x) for x [batch, d_model].

Each example is one token and, with `group_size` 0, the whole batch is one routing
group. The timed call computes y only; the routing statistics of the same inputs
are computed after the timing (untimed) and go on the row without the `moe/` prefix.
"""

import math

import jax
import ml_collections
import numpy as np
from flax import nnx

from batching.ops import Op
from batching.workload import Workload
from models import moe
from models.dtypes import resolve_dtype
from models.routers import SCALAR_STATS, expert_capacity


def model_config(model_cfg: ml_collections.ConfigDict) -> moe.MoEMLPConfig:
    return moe.MoEMLPConfig(
        d_model=model_cfg.d_model,
        mlp_dim=model_cfg.mlp_dim,
        num_experts=model_cfg.num_experts,
        top_k=model_cfg.top_k,
        capacity_factor=model_cfg.capacity_factor,
        router=model_cfg.router,
        renormalize=model_cfg.renormalize,
        group_size=model_cfg.group_size,
        dtype=model_cfg.dtype,
        param_dtype=model_cfg.param_dtype,
        depth=model_cfg.depth,
    )


def validate(model_cfg: ml_collections.ConfigDict) -> None:
    model_config(model_cfg)


def layer_ops(
    cfg: moe.MoEConfig,
    tokens: int,
    group_size: int,
    param_bytes: int,
    activation_bytes: int,
    count: int = 1,
    prefix: str = "moe.",
) -> list[Op]:
    """One MoELayer call on `tokens` tokens in groups of `group_size`, as its einsums.

    The same count as models.moe.moe_layer_cost (GShard-style capacity-padded einsums: every
    one of the E·C slots of a group is computed, full or empty): router 2·T·D·E, dispatch and
    combine 2·G·S·E·C·D each, experts 6·G·E·C·D·F. Dispatch and combine multiply by one-hot
    [G, S, E, C] masks: real matmuls, batched over the G groups, [E·C, S] × [S, D] and
    [S, E·C] × [E·C, D], priced at the measured rate of that batched product. The experts are
    one einsum each, batched over E: [G·C, D] × [D, F] (gate, up) and [G·C, F] × [F, D]
    (down). Routing (softmax, top-k, the masks) is left out of the FLOPs and bytes, as
    moe_layer_cost does; it is one kernel launch here. Weights are read once; the input and
    output activations (`activation_bytes` per element; 0 leaves them out) are charged to the
    router and the combine.
    """
    D, E, F = cfg.d_model, cfg.num_experts, cfg.mlp_dim
    S = group_size or tokens
    if tokens % S != 0:
        raise ValueError(
            f"tokens per call ({tokens}) must be a multiple of model.group_size ({group_size})"
        )
    G = tokens // S
    top_k = cfg.top_k if cfg.router == "token_choice" else 1
    C = expert_capacity(S, E, cfg.capacity_factor, top_k)
    act = tokens * D * activation_bytes
    dt = cfg.dtype

    def gemm(name, shape, weights=0, extra=0, kind="gemm", copies=1):
        # shape: (batch, m, k, n), `batch` products in one einsum kernel.
        return Op(
            name=prefix + name,
            kind=kind,
            shape=shape if shape[0] > 1 else shape[1:],
            flops=2 * math.prod(shape),
            bytes=weights + extra,
            weight_bytes=weights,
            count=copies * count,
            dtype=dt,
        )

    return [
        gemm("router", (1, tokens, D, E), weights=D * E * param_bytes, extra=act),
        Op(prefix + "routing", "elementwise", (G, S, E, C), 0, 0, count=count, dtype=dt),
        gemm("dispatch", (G, E * C, S, D), kind="moe_dispatch_combine"),
        gemm("gate_up", (E, G * C, D, F), weights=E * D * F * param_bytes, copies=2),
        gemm("down", (E, G * C, F, D), weights=E * F * D * param_bytes),
        gemm("combine", (G, S, E * C, D), extra=act, kind="moe_dispatch_combine"),
    ]


def mean_stats(stats: list[dict]) -> dict[str, float]:
    """Scalar routing statistics averaged over layers, plus per-layer values."""
    out = {k: float(np.mean([np.asarray(s[k]) for s in stats])) for k in SCALAR_STATS}
    for i, s in enumerate(stats):
        for k in ("load_cv", "max_mean_load", "drop_fraction"):
            out[f"layer_{i}/{k}"] = float(np.asarray(s[k]))
    out["tokens_per_expert"] = np.asarray(stats[0]["tokens_per_expert"]).tolist()
    return out


def build(run_cfg: ml_collections.ConfigDict, device: jax.Device, workdir: str) -> Workload:
    del workdir
    cfg = model_config(run_cfg.model)
    model = moe.MoEMLP(cfg, rngs=nnx.Rngs(run_cfg.seed))
    graphdef, state = nnx.split(model)
    state = jax.device_put(state, device)
    dtype = resolve_dtype(cfg.dtype)
    param_bytes = resolve_dtype(cfg.param_dtype).itemsize

    def forward(state, x_BxD):
        return nnx.merge(graphdef, state)(x_BxD)

    stats_fn = jax.jit(lambda state, x_BxD: nnx.merge(graphdef, state).with_stats(x_BxD)[1])

    def make_args(batch_size: int):
        key = jax.random.key(run_cfg.seed + batch_size)
        x_BxD = jax.random.normal(key, (batch_size, cfg.d_model), dtype)
        return state, jax.device_put(x_BxD, device)

    def ops(batch_size: int) -> list[Op]:
        # moe_layer_cost counts activations at param_bytes per element: so do the ops.
        return layer_ops(cfg, batch_size, cfg.group_size, param_bytes, param_bytes, count=cfg.depth)

    def point_fields(batch_size: int) -> dict:
        return mean_stats(stats_fn(*make_args(batch_size)))

    params = moe.num_params(cfg)
    top_k = cfg.top_k if cfg.router == "token_choice" else cfg.capacity_factor
    return Workload(
        fn=forward,
        make_args=make_args,
        params=params,
        param_bytes=params * param_bytes,
        ops=ops,
        point_fields=point_fields,
        fields={
            "router": cfg.router,
            "num_experts": cfg.num_experts,
            "top_k": cfg.top_k,
            "capacity_factor": cfg.capacity_factor,
            "active_params": moe.num_active_params(cfg),
            # Each expert weight serves ~k/E of the batch, so B* grows by E/k (ANCHORS §5).
            "weight_uses_per_example": min(top_k / cfg.num_experts, 1.0),
        },
    )
