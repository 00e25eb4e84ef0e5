"""A Mixture-of-Experts MLP as a workload: y = MoEMLP(x) for x [batch, d_model].

Each example is one token. With `group_size` 0 the whole batch is one routing group. A mesh
may hold several token shards on its data x expert axes. Each device's shard is then one
group (GShard). The experts are then split over `expert`, which is expert parallelism.

The timed call computes y only. The routing statistics of the same inputs are computed
after the timing, untimed. They go on the row without the `moe/` prefix.

Letters in array names and formulas (models/__init__.py):

- B batch, T tokens, D model dim.
- E experts, F expert hidden dim, C slots per expert.
- G routing groups, M tokens per group.
- A choices per token (top-k), P assignments (T·A).
"""

import math
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from batching.setup.topology import Topology
from batching.workloads import base
from batching.workloads import collectives as comm
from batching.workloads.base import Workload
from batching.workloads.family import Family
from batching.workloads.ops import Op
from models import moe
from models.dtypes import resolve_dtype
from models.routers import SCALAR_STATS


def model_config(model_cfg: ml_collections.ConfigDict) -> moe.MoEMLPConfig:
    """The model's config from the run's `model` section (base.config_of)."""
    return base.config_of(moe.MoEMLPConfig, model_cfg)


def validate(model_cfg: ml_collections.ConfigDict) -> None:
    """Checks the model section (MoEMLPConfig); raises ValueError naming the bad model.* field."""
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

    These are GShard-style capacity-padded einsums. Every one of the E·C slots of a group is
    computed, full or empty. G, M and C come from models.moe.routing_shape. The FLOPs are:

    - router: 2·T·D·E.
    - dispatch and combine: 2·G·M·E·C·D each.
    - experts: 6·G·E·C·D·F.

    Dispatch and combine multiply by one-hot [G, M, E, C] masks. They are real matmuls,
    batched over the G groups. Dispatch is [E·C, M] × [M, D], and combine is [M, E·C] ×
    [E·C, D]. Each is priced at the measured rate of that batched product. The experts are
    one einsum each, batched over E. Gate and up are [G·C, D] × [D, F], and down is
    [G·C, F] × [F, D].

    Routing (softmax, top-k, the masks) is left out of the FLOPs and bytes. It is one kernel
    launch here. Weights are read once. The input and output activations are charged to the
    router and the combine. They cost `activation_bytes` per element, and 0 leaves them out.
    A dropless layer (capacity_factor 0) goes to dropless_layer_ops.
    """
    if cfg.capacity_factor == 0:
        return dropless_layer_ops(cfg, tokens, param_bytes, activation_bytes, count, prefix)
    D, E, F = cfg.d_model, cfg.num_experts, cfg.mlp_dim
    G, M, C = moe.routing_shape(cfg, tokens, group_size)
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
        Op(prefix + "routing", "elementwise", (G, M, E, C), 0, 0, count=count, dtype=dt),
        gemm("dispatch", (G, E * C, M, D), kind="moe_dispatch_combine"),
        gemm("gate_up", (E, G * C, D, F), weights=E * D * F * param_bytes, copies=2),
        gemm("down", (E, G * C, F, D), weights=E * F * D * param_bytes),
        gemm("combine", (G, M, E * C, D), extra=act, kind="moe_dispatch_combine"),
    ]


def dropless_layer_ops(
    cfg: moe.MoEConfig,
    tokens: int,
    param_bytes: int,
    activation_bytes: int,
    count: int = 1,
    prefix: str = "moe.",
) -> list[Op]:
    """One dropless MoELayer call (models.moe, capacity_factor 0) as its kernels.

    - The router: 2·T·D·E FLOPs.
    - The sort: the P = T·A assignments sorted by expert and gathered, one launch.
    - The experts: grouped products over E groups of the P rows (`ragged_gemm`). Gate and up
      are [P, D] × [D, F], and down is [P, F] × [F, D]. That is 6·P·D·F FLOPs, for the rows
      routed, with no slot padded.
    - The combine: the outputs scattered back and summed with their gates, 2·P·D FLOPs.

    Weights are read once. The input and output activations are charged to the router and
    the combine. The sorted copies are assumed to stay on chip, as the capacity-based
    layer's masks are.
    """
    D, E, F, A = cfg.d_model, cfg.num_experts, cfg.mlp_dim, cfg.top_k
    P = tokens * A
    act = tokens * D * activation_bytes
    dt = cfg.dtype

    def ragged(name, k, n, copies=1):
        weights = E * k * n * param_bytes
        return Op(
            prefix + name, "ragged_gemm", (E, P, k, n), 2 * P * k * n, weights, weights,
            count=copies * count, dtype=dt,
        )  # fmt: skip

    router_w = D * E * param_bytes
    return [
        Op(prefix + "router", "gemm", (tokens, D, E), 2 * tokens * D * E, router_w + act,
           router_w, count=count, dtype=dt),
        Op(prefix + "routing", "elementwise", (tokens, E), 0, 0, count=count, dtype=dt),
        Op(prefix + "sort", "gather_scatter", (P, D), 0, 0, count=count, dtype=dt),
        ragged("gate_up", D, F, copies=2),
        ragged("down", F, D),
        Op(prefix + "combine", "elementwise", (P, D), 2 * P * D, act, count=count, dtype=dt),
    ]  # fmt: skip


def device_loads(wanted_E: np.ndarray, expert_devices: int) -> np.ndarray:
    """Tokens routed to each expert-axis device, before capacity.

    Each device holds E / expert_devices experts. Its load is what a dropless layer would
    compute there.
    """
    return np.asarray(wanted_E, np.float64).reshape(expert_devices, -1).sum(axis=1)


def max_mean(loads: np.ndarray) -> float:
    """The largest load over the mean load (1: even); nan when the mean is 0."""
    mean = float(np.mean(loads))
    return float(np.max(loads)) / mean if mean > 0 else float("nan")


def mean_stats(stats: list[dict], expert_devices: int = 1) -> dict[str, float]:
    """Scalar routing statistics averaged over layers, plus per-layer values.

    `device_loads` is the layer-mean load of each of the `expert_devices` devices of the
    expert axis. `device_max_mean_load` is its max over its mean. Under expert parallelism a
    layer waits for its most-loaded device (GShard, Lepikhin et al. 2020; Zhou et al. 2022,
    §4.2).
    """
    out = {k: float(np.mean([np.asarray(s[k]) for s in stats])) for k in SCALAR_STATS}
    loads = [device_loads(np.asarray(s["tokens_per_expert_wanted"]), expert_devices) for s in stats]
    for i, s in enumerate(stats):
        for k in ("load_cv", "max_mean_load", "drop_fraction"):
            out[f"layer_{i}/{k}"] = float(np.asarray(s[k]))
        out[f"layer_{i}/device_max_mean_load"] = max_mean(loads[i])
    out["tokens_per_expert"] = np.asarray(stats[0]["tokens_per_expert"]).tolist()
    mean_loads = np.mean(loads, axis=0)
    out["device_loads"] = mean_loads.tolist()
    out["device_max_mean_load"] = max_mean(mean_loads)
    return out


def group_size(cfg: moe.MoEMLPConfig, topo: Topology, batch_size: int) -> int:
    """Tokens per routing group.

    It is the config's group size, or else one group per device's token shard.
    """
    return cfg.group_size or batch_size // topo.token_shards


def all_to_alls(
    cfg: moe.MoEConfig,
    mesh_shape: dict[str, int],
    tokens_per_device: int,
    group_size: int,
    moe_layers: int,
    act_bytes: int,
) -> list[dict]:
    """Dispatch and combine over `expert` (GShard, Lepikhin et al. 2020, §2.2/§3.2).

    Each MoE layer sends this device's dispatched tokens [E, G, C, D] out. They go to the devices
    holding their experts. It then moves the experts' outputs back. That is 2 all-to-alls per MoE
    layer, with payload G·E·C·D·act_bytes. The device has G groups of `group_size` tokens, with C
    slots per expert (models.moe.routing_shape).

    A dropless layer all-reduces its experts' partial results instead, as XLA compiles it.
    There are none without an expert axis.
    """
    n = mesh_shape["expert"]
    if n == 1 or not moe_layers:
        return []
    if cfg.capacity_factor == 0:
        # Dropless: what XLA's partitioner compiles for ragged products whose experts are
        # split (jax 0.10, tests/test_mesh.py reads the program). Every expert device runs
        # all of its data replica's P = T·A assignments through its own experts. The partial
        # results are all-reduced: gate and up [P, 2F], then down [P, D]. There is no
        # all-to-all; a ragged all-to-all would move P·D each way.
        rows = tokens_per_device * n * cfg.top_k
        F, D = cfg.mlp_dim, cfg.d_model
        return [
            comm.entry("all_reduce", "expert", n, rows * 2 * F * act_bytes, moe_layers),
            comm.entry("all_reduce", "expert", n, rows * D * act_bytes, moe_layers),
        ]
    G = comm.shards(tokens_per_device, group_size, "tokens per device over the routing group")
    _, _, C = moe.routing_shape(cfg, group_size, group_size)  # one group's slots per expert
    payload = G * cfg.num_experts * C * cfg.d_model * act_bytes
    return [comm.entry("all_to_all", "expert", n, payload, 2 * moe_layers)]


def layer_collectives(
    cfg: moe.MoEMLPConfig, mesh_shape: dict[str, int], batch_size: int
) -> list[dict]:
    """The MoE MLP's collectives at global batch `batch_size`.

    Tokens are split over data and expert. Each device routes its own tokens (GShard), as
    one group unless group_size is set. With a model axis each layer's experts split their
    hidden dim (logical `mlp` -> model). That costs one all-reduce of the [tokens, D] output
    per layer (Megatron-LM's MLP). Data parallelism alone communicates nothing in inference.
    """
    tokens = comm.shards(batch_size, mesh_shape["data"] * mesh_shape["expert"], "batch_size")
    act_bytes = resolve_dtype(cfg.dtype).itemsize
    out = all_to_alls(cfg, mesh_shape, tokens, cfg.group_size or tokens, cfg.depth, act_bytes)
    if mesh_shape["model"] > 1:
        payload = tokens * cfg.d_model * act_bytes
        out.append(comm.entry("all_reduce", "model", mesh_shape["model"], payload, cfg.depth))
    return out


def build(run_cfg: ml_collections.ConfigDict, topo: Topology, workdir: str) -> Workload:
    """The MoE MLP, placed on the run's mesh and timed on random tokens.

    Each point's routing statistics are computed after the timing, untimed.
    """
    del workdir
    cfg = model_config(run_cfg.model)
    model = moe.MoEMLP(cfg, rngs=nnx.Rngs(run_cfg.seed))
    graphdef, state = nnx.split(model)
    state = topo.put_state(state)
    dtype = resolve_dtype(cfg.dtype)
    param_bytes = resolve_dtype(cfg.param_dtype).itemsize

    def forward(state, x_BxD):
        with topo.activate():
            return nnx.merge(graphdef, state)(x_BxD, group_size(cfg, topo, x_BxD.shape[0]))

    def routing(state, x_BxD):
        with topo.activate():
            model = nnx.merge(graphdef, state)
            return model(x_BxD, group_size(cfg, topo, x_BxD.shape[0]), stats=True)[1]

    stats_fn = jax.jit(routing)

    def make_args(batch_size: int):
        x_BxD = base.normal_input(run_cfg.seed + batch_size, (batch_size, cfg.d_model), dtype)
        # Tokens split over every device that routes its own group (data x expert).
        return state, topo.put(x_BxD, ("groups", "embed"))

    def ops(batch_size: int) -> list[Op]:
        # Capacity is per routing group, so the groups the mesh makes set the padded
        # work; activations are counted at param_bytes per element.
        groups = group_size(cfg, topo, batch_size)
        return layer_ops(cfg, batch_size, groups, param_bytes, param_bytes, count=cfg.depth)

    def point_fields(batch_size: int) -> dict:
        stats = jax.device_get(stats_fn(*make_args(batch_size)))
        return {
            **mean_stats(stats, topo.expert_shards),
            "routing_group_size": group_size(cfg, topo, batch_size),
        }

    mesh_shape = topo.parallel_shape(experts=True, model=True)
    params = moe.num_params(cfg)
    return Workload(
        fn=forward,
        make_args=make_args,
        params=params,
        param_bytes=params * param_bytes,
        ops=ops,
        point_fields=point_fields,
        collectives=lambda batch_size: layer_collectives(cfg, mesh_shape, batch_size),
        parallel_shape=mesh_shape,
        fields=moe_fields(cfg),
    )


def moe_fields(cfg: moe.MoEMLPConfig) -> dict[str, Any]:
    """The run-level fields of an MoE workload's rows."""
    top_k = cfg.top_k if cfg.router == "token_choice" else cfg.capacity_factor
    return {
        "router": cfg.router,
        "num_experts": cfg.num_experts,
        "top_k": cfg.top_k,
        "capacity_factor": cfg.capacity_factor,
        "active_params": moe.num_active_params(cfg),
        # An expert's weights are reused only by the ~A/E of the batch routed to it, so it
        # takes E/A times the batch to reuse them as often as a dense layer's: B* grows by E/A.
        "weight_uses_per_example": min(top_k / cfg.num_experts, 1.0),
    }


FAMILY = Family("moe", build=build, validate=validate)
