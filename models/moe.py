"""Mixture-of-experts layer and an MoE MLP for sweeps.

There are two ways to run the experts.

- With a capacity (capacity_factor > 0), the experts run as capacity-padded einsums (GShard).
  Each routing group has E x C slots whatever the loads. The overflow is dropped. This works
  with token-choice and expert-choice routing.
- Dropless (capacity_factor = 0) is token-choice only. The tokens' assignments are sorted by
  expert. The experts then run as `jax.lax.ragged_dot` (MaxText's sparse-matmul path;
  Megablocks). Nothing is dropped and nothing is padded. So imbalance costs time instead of
  tokens. That holds where the backend's ragged product follows the group sizes.

Auxiliary-loss-free balancing follows Wang et al. 2024 (arXiv 2408.15664), as DeepSeek-V3
uses it. With `router_bias` each layer holds a per-expert bias. It is a RouterBias variable,
not a parameter, so no optimizer touches it. It is added only to the scores that pick the
top-k. After a training step, `update_router_bias` moves it by rate * sign(mean load -
load_e).

A call with `stats=True` returns the routing stats in a plain (y, stats) pair. They are not
sown into the module. A pure function of (params, x) can then return them from `jax.jit`.
Such a function has no state to pop. Repeated calls in a timing loop do not grow an
`nnx.Intermediate` tuple. Growing it would change the state's structure and retrace. Only the
small stats dict leaves the layer, not the [G, M, E, C] masks. Without `stats`, XLA drops
their computation under jit.

Letters in array names (models/__init__.py):

- B batch, L length, D model dim, F expert hidden dim.
- G routing groups, M tokens per group, T tokens (G·M).
- E experts, C capacity (slots per expert per group).
- A choices per token (top-k), P assignments (T·A).
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from models import partitioning
from models.dtypes import resolve_dtype
from models.routers import (
    check_router_args,
    dropless_stats,
    dropless_token_choice,
    expert_capacity,
    route,
    routing_stats,
)


class RouterBias(nnx.Variable):
    """A per-expert routing bias [E].

    It is state that training sets by a rule, not by gradients.
    """


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """One MoE layer's sizes, router and dtypes.

    group_size is the number of tokens per routing group. The default 0 puts all of a call's
    tokens in one group. A bad field raises ValueError naming model.<field>.
    """

    d_model: int = 512
    mlp_dim: int = 1024
    num_experts: int = 8
    top_k: int = 2
    capacity_factor: float = 1.25
    router: str = "token_choice"
    renormalize: bool = False
    group_size: int = 0
    dtype: str = "float32"
    param_dtype: str = "float32"
    # A per-expert bias on the scores that pick the top-k (auxiliary-loss-free balancing).
    router_bias: bool = False

    def __post_init__(self):
        for name in ("d_model", "mlp_dim", "num_experts"):
            _check_int(name, getattr(self, name), minimum=1)
        _check_int("group_size", self.group_size, minimum=0)
        check_router_args(self.router, self.num_experts, self.top_k, self.capacity_factor)
        for name in ("renormalize", "router_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"model.{name} must be a bool, got {getattr(self, name)!r}")
        if self.router_bias and self.router != "token_choice":
            raise ValueError(
                "model.router_bias applies to token-choice routing; expert-choice is balanced "
                f"by construction, got router={self.router!r}"
            )
        resolve_dtype(self.dtype)
        resolve_dtype(self.param_dtype)


@dataclasses.dataclass(frozen=True)
class MoEMLPConfig(MoEConfig):
    """`depth` MoE layers of width d_model; each example of the batch is one token."""

    depth: int = 2

    def __post_init__(self):
        super().__post_init__()
        _check_int("depth", self.depth, minimum=1)


def _check_int(name: str, value: object, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"model.{name} must be an integer >= {minimum}, got {value!r}")


class MoELayer(nnx.Module):
    """x_...xD -> y_...xD: router (fp32) -> dispatch -> E SwiGLU experts -> combine.

    Tokens are flattened in order and cut into groups of `group_size`. A dropped token gets
    zeros. The caller's residual carries it.
    """

    def __init__(self, cfg: MoEConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        E, D, F = cfg.num_experts, cfg.d_model, cfg.mlp_dim
        param_dtype = resolve_dtype(cfg.param_dtype)
        # HIGHEST so routing decisions do not depend on the backend's fp32 matmul shortcuts.
        self.router = nnx.Linear(
            D,
            E,
            use_bias=False,
            dtype=jnp.float32,
            param_dtype=param_dtype,
            precision=jax.lax.Precision.HIGHEST,
            kernel_init=partitioning.param_init(nnx.initializers.lecun_normal(), "embed", None),
            rngs=rngs,
        )
        # Fan-in init per expert: axis 0 indexes experts and is not part of the fan.
        init = nnx.initializers.variance_scaling(
            1.0, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1, batch_axis=(0,)
        )
        # Experts over `experts` (expert parallelism), each expert's hidden dim over `mlp`.
        in_init = partitioning.param_init(init, "experts", "embed", "mlp")
        out_init = partitioning.param_init(init, "experts", "mlp", "embed")
        self.w_gate_ExDxF = nnx.Param(in_init(rngs.params(), (E, D, F), param_dtype))
        self.w_up_ExDxF = nnx.Param(in_init(rngs.params(), (E, D, F), param_dtype))
        self.w_down_ExFxD = nnx.Param(out_init(rngs.params(), (E, F, D), param_dtype))
        self.router_bias = RouterBias(jnp.zeros((E,), jnp.float32)) if cfg.router_bias else None

    def __call__(self, x: jax.Array, group_size: int | None = None, *, stats: bool = False):
        """y for x of shape [..., D]; with `stats`, (y, routers.routing_stats).

        Tokens are flattened in order and cut into groups of `group_size`. None takes the
        config's group size, and 0 makes one group of all tokens. A decoder passes its own
        group size for each mode (models.decoder). stats["aux_loss"] and stats["z_loss"] are
        differentiable w.r.t. the router weights.
        """
        y, s = self._route(x, group_size)
        return (y, s) if stats else y

    def _route(self, x: jax.Array, group_size: int | None) -> tuple[jax.Array, dict]:
        cfg = self.cfg
        D = cfg.d_model
        if x.shape[-1] != D:
            raise ValueError(f"MoE input must end in model.d_model={D}, got shape {x.shape}")
        T = x.size // D
        G, M, _ = routing_shape(cfg, T, group_size)
        dtype = resolve_dtype(cfg.dtype)
        # Expert parallelism (GShard, Lepikhin et al. 2020 §3.2): groups live where their
        # tokens are (`groups`: every device holding a token shard), experts on the `experts`
        # axis. The dispatched [E, G, C, D] is constrained expert-major, so XLA moves it with
        # an all-to-all, and back after the experts. Without a mesh these are no-ops.
        x_GxMxD = partitioning.constrain(x.reshape(G, M, D), "groups", None, "embed")

        logits_GxMxE = self.router(x_GxMxD)
        bias_E = self.router_bias[...] if self.router_bias is not None else jnp.zeros((0,))
        if cfg.capacity_factor == 0:
            return self._dropless(x_GxMxD.astype(dtype), logits_GxMxE, bias_E, x.shape)
        # Routing never looks across groups, so each device routes its own groups.
        routing = partitioning.shard_local(
            lambda logits, bias: route(
                cfg.router, logits, cfg.top_k, cfg.capacity_factor, cfg.renormalize, _bias(bias)
            ),
            in_axes=[("groups",), (None,)],
            out_axes=("groups",),
        )(logits_GxMxE, bias_E)

        x_GxMxD = x_GxMxD.astype(dtype)
        x_ExGxCxD = jnp.einsum("GMD,GMEC->EGCD", x_GxMxD, routing.dispatch_GxMxExC.astype(dtype))
        x_ExGxCxD = partitioning.constrain(x_ExGxCxD, "experts", "batch", "capacity", "embed")
        gate_ExGxCxF = jnp.einsum("EGCD,EDF->EGCF", x_ExGxCxD, self.w_gate_ExDxF[...].astype(dtype))
        up_ExGxCxF = jnp.einsum("EGCD,EDF->EGCF", x_ExGxCxD, self.w_up_ExDxF[...].astype(dtype))
        h_ExGxCxF = jax.nn.silu(gate_ExGxCxF) * up_ExGxCxF
        out_ExGxCxD = jnp.einsum("EGCF,EFD->EGCD", h_ExGxCxF, self.w_down_ExFxD[...].astype(dtype))
        out_ExGxCxD = partitioning.constrain(out_ExGxCxD, "experts", "batch", "capacity", "embed")
        y_GxMxD = jnp.einsum("EGCD,GMEC->GMD", out_ExGxCxD, routing.combine_GxMxExC.astype(dtype))
        y_GxMxD = partitioning.constrain(y_GxMxD, "groups", None, "embed")
        return y_GxMxD.reshape(x.shape), routing_stats(routing)

    def _dropless(
        self, x_GxMxD: jax.Array, logits_GxMxE: jax.Array, bias_E: jax.Array, shape: tuple
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Dropless experts: every token's A assignments run as ragged products.

        The P = T·A assignments are sorted by expert. Each expert's rows then meet that
        expert's weights in `jax.lax.ragged_dot`. The outputs go back in token order and are
        summed with their gates. Nothing is dropped or padded.
        """
        cfg = self.cfg
        G, M, D = x_GxMxD.shape
        E, A, dtype = cfg.num_experts, cfg.top_k, x_GxMxD.dtype
        routing = partitioning.shard_local(
            lambda logits, bias: dropless_token_choice(logits, A, cfg.renormalize, _bias(bias)),
            in_axes=[("groups",), (None,)],
            out_axes=("groups",),
        )(logits_GxMxE, bias_E)
        T, P = G * M, G * M * A  # tokens, assignments
        expert_P = routing.expert_GxMxA.reshape(P)
        order_P = jnp.argsort(expert_P, stable=True)
        x_PxD = x_GxMxD.reshape(T, D)[order_P // A]
        sizes_E = jnp.bincount(expert_P, length=E).astype(jnp.int32)
        gate_PxF = jax.lax.ragged_dot(x_PxD, self.w_gate_ExDxF[...].astype(dtype), sizes_E)
        up_PxF = jax.lax.ragged_dot(x_PxD, self.w_up_ExDxF[...].astype(dtype), sizes_E)
        h_PxF = jax.nn.silu(gate_PxF) * up_PxF
        out_PxD = jax.lax.ragged_dot(h_PxF, self.w_down_ExFxD[...].astype(dtype), sizes_E)
        out_TxAxD = jnp.zeros_like(out_PxD).at[order_P].set(out_PxD).reshape(T, A, D)
        gate_TxAx1 = routing.gate_GxMxA.reshape(T, A, 1).astype(dtype)
        y_TxD = jnp.sum(gate_TxAx1 * out_TxAxD, axis=1)
        y_GxMxD = partitioning.constrain(y_TxD.reshape(G, M, D), "groups", None, "embed")
        return y_GxMxD.reshape(shape), dropless_stats(routing)

    def update_router_bias(self, stats: dict[str, jax.Array], rate: float) -> None:
        """After a training step, moves each expert's bias by rate * sign(mean load - load_e).

        The loads are this step's wanted token assignments, before capacity (Wang et al.
        2024, Algorithm 1).
        """
        load_E = stats["tokens_per_expert_wanted"].astype(jnp.float32)
        self.router_bias[...] = self.router_bias[...] + rate * jnp.sign(jnp.mean(load_E) - load_E)


def _bias(bias_E: jax.Array) -> jax.Array | None:
    """The routing bias, or None for the empty stand-in of a layer without one."""
    return bias_E if bias_E.size else None


class MoEMLP(nnx.Module):
    """x_BxD -> y_BxD through `depth` MoE layers, each with a residual connection.

    One example is one token. So the routing group is the whole batch unless group_size is
    set. Under expert-choice an example's output then depends on the rest of the batch.
    """

    def __init__(self, cfg: MoEMLPConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.layers = nnx.List([MoELayer(cfg, rngs=rngs) for _ in range(cfg.depth)])

    def __call__(self, x_BxD: jax.Array, group_size: int | None = None, *, stats: bool = False):
        """y_BxD; with `stats`, (y_BxD, one routing_stats dict per layer)."""
        all_stats = []
        for layer in self.layers:
            y_BxD, layer_stats = layer(x_BxD, group_size, stats=True)
            x_BxD = x_BxD + y_BxD
            all_stats.append(layer_stats)
        return (x_BxD, all_stats) if stats else x_BxD


def _layer_params(cfg: MoEConfig, experts: float) -> float:
    router = cfg.d_model * cfg.num_experts
    return router + experts * 3 * cfg.d_model * cfg.mlp_dim


def num_params(cfg: MoEMLPConfig) -> int:
    """All parameters: per layer the router (D*E) and E SwiGLU experts (3*D*F each)."""
    return int(cfg.depth * _layer_params(cfg, cfg.num_experts))


def num_active_params(cfg: MoEMLPConfig) -> int:
    """Parameters one token uses: per layer the router and the experts it reaches.

    Token-choice reaches top_k experts, or fewer if some are dropped. Expert-choice reaches
    E·C/M experts on average. That is capacity_factor up to the rounding of C. The count
    uses capacity_factor, capped at E, and the total is rounded down.
    """
    if cfg.router == "token_choice":
        experts = cfg.top_k
    else:
        experts = min(cfg.capacity_factor, cfg.num_experts)
    return int(cfg.depth * _layer_params(cfg, experts))


def routing_shape(cfg: MoEConfig, tokens: int, group_size: int | None = None) -> tuple[int, ...]:
    """(G groups, M tokens per group, C slots per expert) of one MoELayer call on `tokens`.

    The layer computes these shapes, and its cost (the lab's ops list) counts them.
    `group_size` None takes the config's. A group size of 0, given or configured, puts all
    tokens in one group. C is routers.expert_capacity at the config's capacity factor. It
    counts top_k assignments per token for token-choice (GShard, Lepikhin et al. 2020). It
    counts one for expert-choice (Expert Choice, Zhou et al. 2022).
    """
    M = (cfg.group_size if group_size is None else group_size) or tokens
    if tokens % M != 0:
        raise ValueError(
            f"tokens per call ({tokens}) must be a multiple of the routing group size "
            f"({M}, model.group_size ({cfg.group_size}))"
        )
    top_k = cfg.top_k if cfg.router == "token_choice" else 1
    return tokens // M, M, expert_capacity(M, cfg.num_experts, cfg.capacity_factor, top_k)
