"""MoE routers as pure functions of the router logits, and the load-balance statistics.

Both capacity routers return the same `RoutingResult`. So the MoE layer and `routing_stats`
never ask which router ran. The rules and formulas follow Switch (Fedus et al. 2021), GShard
(Lepikhin et al. 2020) and ST-MoE (Zoph et al. 2022). They also follow Expert Choice (Zhou
et al. 2022) and flaxformer's `routing.py`. routing_stats cites each statistic's source.

Letters in array names (models/__init__.py):

- G routing groups, M tokens per group, T tokens (G·M).
- E experts, C slots per expert per group, A choices per token (top-k).
"""

import math

import jax
import jax.numpy as jnp
from flax import struct

ROUTERS = ("token_choice", "expert_choice")


@struct.dataclass
class RoutingResult:
    """What a router decided for one call; a pytree of fp32 arrays.

    - dispatch_GxMxExC: 1 where token m of group g sits in slot c of expert e, else 0.
    - combine_GxMxExC: the weight that slot's expert output gets in token m's output.
    - probs_GxMxE, logits_GxMxE: the router softmax and the fp32 logits it came from.
    - assigned_GxMxE: the assignments the router wanted before capacity. For token-choice it
      is the top-k mask. For expert-choice it equals what was dispatched, as nothing is
      dropped.
    """

    dispatch_GxMxExC: jax.Array
    combine_GxMxExC: jax.Array
    probs_GxMxE: jax.Array
    logits_GxMxE: jax.Array
    assigned_GxMxE: jax.Array


def expert_capacity(
    group_size: int, num_experts: int, capacity_factor: float, top_k: int = 1
) -> int:
    """Slots per expert per group: clamp(ceil(cf * M * A / E), 1, M).

    Here M is `group_size`, A is `top_k`, E is `num_experts` and cf is `capacity_factor`.
    Expert-choice uses top_k=1. The 1e-9 keeps float noise from adding a slot. An example
    of such noise is 1.1 * 10 = 11.000000000000002.
    """
    wanted = capacity_factor * group_size * top_k / num_experts
    return min(max(math.ceil(wanted - 1e-9), 1), group_size)


def check_router_args(router: str, num_experts: int, top_k: int, capacity_factor: float) -> None:
    """Raises a ValueError naming the config field (model.*) and its bad value.

    A capacity factor of 0 means dropless token-choice, with no capacity and nothing
    dropped. Expert-choice has no dropless form, since its capacity is what each expert
    takes.
    """
    if router not in ROUTERS:
        raise ValueError(f"model.router must be one of {list(ROUTERS)}, got {router!r}")
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
        raise ValueError(f"model.top_k must be a positive integer, got {top_k!r}")
    if top_k > num_experts:
        raise ValueError(f"model.top_k must be <= model.num_experts ({num_experts}), got {top_k}")
    if (
        not isinstance(capacity_factor, (int, float))
        or isinstance(capacity_factor, bool)
        or capacity_factor < 0
        or (capacity_factor == 0 and router == "expert_choice")
    ):
        raise ValueError(
            "model.capacity_factor must be > 0, or 0 for dropless token-choice, got "
            f"{capacity_factor!r}" + (" with expert_choice" if capacity_factor == 0 else "")
        )


def _check_logits(logits_GxMxE: jax.Array) -> None:
    if logits_GxMxE.ndim != 3:
        raise ValueError(f"router logits must be [G, M, E], got shape {logits_GxMxE.shape}")


def top_k_choices(
    probs_GxMxE: jax.Array, top_k: int, renormalize: bool = False, bias_E: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """(gate_GxMxA, expert_GxMxA): each token's top-k experts and their combine weights.

    `bias_E` is for auxiliary-loss-free balancing (Wang et al. 2024, arXiv 2408.15664), as
    DeepSeek-V3 uses it. With it, the experts are the top-k of probs + bias. The gates stay
    the unbiased probs of the chosen experts. So the bias steers which experts a token
    reaches, never how much their outputs weigh. `renormalize` divides the gates by their
    sum over the A choices.
    """
    if bias_E is None:
        gate_GxMxA, expert_GxMxA = jax.lax.top_k(probs_GxMxE, top_k)
    else:
        _, expert_GxMxA = jax.lax.top_k(probs_GxMxE + bias_E.astype(jnp.float32), top_k)
        gate_GxMxA = jnp.take_along_axis(probs_GxMxE, expert_GxMxA, axis=-1)
    if renormalize:
        gate_GxMxA = gate_GxMxA / jnp.sum(gate_GxMxA, axis=-1, keepdims=True)
    return gate_GxMxA, expert_GxMxA


def token_choice(
    logits_GxMxE: jax.Array,
    top_k: int,
    capacity_factor: float,
    renormalize: bool = False,
    bias_E: jax.Array | None = None,
) -> RoutingResult:
    """Each token picks its top-k experts; an expert keeps the first C choices it gets.

    Every token's first choice is ranked before any token's second choice. This is the order
    of GShard and flaxformer's `TokensChooseMaskedRouter`. Within one rank, tokens go in
    group order. A choice past capacity is dropped.

    With A = 1 a token's routing depends only on the tokens before it in the group. With
    A > 1 it can depend on later tokens too. A later token's first choice can take the slot
    an earlier token's second choice wanted. So only routing with no drops is causal.

    The combine weight is the router prob. With `renormalize` it is the prob divided by the
    sum of the token's A chosen probs. Dropped choices still count in that sum. `bias_E`
    steers the choice only (top_k_choices).
    """
    _check_logits(logits_GxMxE)
    _, M, E = logits_GxMxE.shape
    check_router_args("token_choice", E, top_k, capacity_factor)
    C = expert_capacity(M, E, capacity_factor, top_k)

    logits_GxMxE = logits_GxMxE.astype(jnp.float32)
    probs_GxMxE = jax.nn.softmax(logits_GxMxE, axis=-1)
    gate_GxMxA, expert_GxMxA = top_k_choices(probs_GxMxE, top_k, renormalize, bias_E)
    choice_GxMxAxE = jax.nn.one_hot(expert_GxMxA, E, dtype=jnp.float32)

    # Rank all first choices before all second choices: lay the choices out choice-major, and
    # count down the group how many earlier choices each expert already took.
    choice_GxAxMxE = jnp.swapaxes(choice_GxMxAxE, 1, 2)
    flat_GxAMxE = choice_GxAxMxE.reshape(choice_GxAxMxE.shape[0], top_k * M, E)
    position_GxAMxE = jnp.cumsum(flat_GxAMxE, axis=1) * flat_GxAMxE - 1.0
    position_GxMxAxE = jnp.swapaxes(position_GxAMxE.reshape(choice_GxAxMxE.shape), 1, 2)
    # One-hot of a position >= C (or of -1 for "not chosen") is all zeros: that is the drop.
    slot_GxMxAxExC = jax.nn.one_hot(position_GxMxAxE.astype(jnp.int32), C, dtype=jnp.float32)

    # A token's A choices are distinct experts, so summing over them keeps dispatch 0/1.
    dispatch_GxMxExC = jnp.sum(slot_GxMxAxExC, axis=2)
    # A broadcast product, not an einsum: matmul precision on TPU/GPU would round the gates.
    combine_GxMxExC = jnp.sum(gate_GxMxA[..., None, None] * slot_GxMxAxExC, axis=2)
    return RoutingResult(
        dispatch_GxMxExC=dispatch_GxMxExC,
        combine_GxMxExC=combine_GxMxExC,
        probs_GxMxE=probs_GxMxE,
        logits_GxMxE=logits_GxMxE,
        assigned_GxMxE=jnp.sum(choice_GxMxAxE, axis=2),
    )


def expert_choice(logits_GxMxE: jax.Array, capacity_factor: float) -> RoutingResult:
    """Each expert takes its top-C tokens of the group by router prob (Zhou et al. 2022).

    A token may get 0..E experts, and the combine weight is the prob. Slot c of an expert
    holds its c-th most confident token. This routing is not causal. A token's routing
    depends on the whole group.
    """
    _check_logits(logits_GxMxE)
    _, M, E = logits_GxMxE.shape
    check_router_args("expert_choice", E, 1, capacity_factor)
    C = expert_capacity(M, E, capacity_factor)

    logits_GxMxE = logits_GxMxE.astype(jnp.float32)
    probs_GxMxE = jax.nn.softmax(logits_GxMxE, axis=-1)
    _, token_GxExC = jax.lax.top_k(jnp.swapaxes(probs_GxMxE, 1, 2), C)
    dispatch_GxExCxM = jax.nn.one_hot(token_GxExC, M, dtype=jnp.float32)
    dispatch_GxMxExC = jnp.transpose(dispatch_GxExCxM, (0, 3, 1, 2))
    return RoutingResult(
        dispatch_GxMxExC=dispatch_GxMxExC,
        combine_GxMxExC=dispatch_GxMxExC * probs_GxMxE[..., None],
        probs_GxMxE=probs_GxMxE,
        logits_GxMxE=logits_GxMxE,
        assigned_GxMxE=jnp.sum(dispatch_GxMxExC, axis=-1),
    )


def route(
    kind: str,
    logits_GxMxE: jax.Array,
    top_k: int,
    capacity_factor: float,
    renormalize: bool = False,
    bias_E: jax.Array | None = None,
) -> RoutingResult:
    """Runs the capacity router called `kind`.

    Expert-choice ignores `top_k`, `renormalize` and `bias_E`. A config check refuses a bias
    for it, since it is balanced by construction. `top_k` is still checked against E for
    both kinds, as one config serves both.
    """
    _check_logits(logits_GxMxE)
    check_router_args(kind, logits_GxMxE.shape[-1], top_k, capacity_factor)
    if kind == "token_choice":
        return token_choice(logits_GxMxE, top_k, capacity_factor, renormalize, bias_E)
    return expert_choice(logits_GxMxE, capacity_factor)


@struct.dataclass
class DroplessRouting:
    """Dropless token-choice: every token keeps its A experts, with no capacity and no slots.

    - expert_GxMxA (int32) and gate_GxMxA: each token's chosen experts and their weights.
    - probs_GxMxE, logits_GxMxE and assigned_GxMxE: as in RoutingResult. assigned_GxMxE is
      the choices as a 0/1 mask.
    """

    expert_GxMxA: jax.Array
    gate_GxMxA: jax.Array
    probs_GxMxE: jax.Array
    logits_GxMxE: jax.Array
    assigned_GxMxE: jax.Array


def dropless_token_choice(
    logits_GxMxE: jax.Array,
    top_k: int,
    renormalize: bool = False,
    bias_E: jax.Array | None = None,
) -> DroplessRouting:
    """Each token's top-k experts, all of them kept (MaxText's sparse-matmul path, Megablocks).

    A token's routing depends on its own logits alone, whatever the rest of the group.
    """
    _check_logits(logits_GxMxE)
    E = logits_GxMxE.shape[-1]
    check_router_args("token_choice", E, top_k, 0)
    logits_GxMxE = logits_GxMxE.astype(jnp.float32)
    probs_GxMxE = jax.nn.softmax(logits_GxMxE, axis=-1)
    gate_GxMxA, expert_GxMxA = top_k_choices(probs_GxMxE, top_k, renormalize, bias_E)
    assigned_GxMxE = jnp.sum(jax.nn.one_hot(expert_GxMxA, E, dtype=jnp.float32), axis=2)
    return DroplessRouting(
        expert_GxMxA=expert_GxMxA.astype(jnp.int32),
        gate_GxMxA=gate_GxMxA,
        probs_GxMxE=probs_GxMxE,
        logits_GxMxE=logits_GxMxE,
        assigned_GxMxE=assigned_GxMxE,
    )


# The scalar statistics of `routing_stats`; the others are per-expert or per-token arrays.
SCALAR_STATS = (
    "aux_loss",
    "aux_loss_batch",
    "z_loss",
    "load_cv",
    "max_mean_load",
    "drop_fraction",
    "token_drop_fraction",
    "expert_usage",
    "router_confidence",
    "router_entropy",
    "max_vio_group",
    "max_vio_batch",
)


def routing_stats(result: RoutingResult) -> dict[str, jax.Array]:
    """Load-balance statistics of one routing, from the result alone.

    Loads are token counts. A is the number of wanted assignments per token. It is read off
    the result as sum(assigned) / T. That is top_k for token-choice and E·C/M for
    expert-choice. Below, f is the fraction of tokens that want an expert. That expert's
    mean router prob is p.

    The losses come first.

    - aux_loss: the load-balancing loss per group, averaged over groups. It is
      E * sum_e f_ge * p_ge, with f and p taken within group g. Sources are Switch eq. 4-6,
      GShard, flaxformer `_load_balancing_loss` and MaxText per sequence. It is A at perfect
      balance. The gradient flows through p only. It is constant for expert-choice, which
      has no aux loss.
    - aux_loss_batch: the global-batch load-balancing loss E * sum_e f_e * p_e. Here f and p
      are pooled over all groups first. Sources are Qwen team 2025 ("Demons in the Detail")
      and OLMo-core. Groups imbalanced in opposite directions cancel in it. With one group it
      equals aux_loss.
    - z_loss: the mean over tokens of logsumexp(z)^2, for router logits z (ST-MoE).

    The remaining statistics are pooled over all G groups, not averaged per group. Each is a
    count or fraction over all T tokens.

    - tokens_per_expert [E]: the load after capacity.
    - tokens_per_expert_wanted [E]: the load before capacity.
    - load_cv: population std / mean of tokens_per_expert, after capacity.
    - max_mean_load: max_e wanted load / (T*A/E), on loads before capacity. So it is the
      capacity factor that would drop nothing. After capacity the same ratio is capped near
      cf. It is exactly 1 for expert-choice, whose assignments are its dispatch.
    - drop_fraction: 1 - sum(dispatched) / (T*A), the assignments lost to capacity. It is 0
      for expert-choice, where no assignment is wanted and then dropped.
    - token_drop_fraction: the fraction of tokens with no expert at all (flaxformer
      `fraction_tokens_left_behind`). For expert-choice these are the tokens no expert
      picked.
    - expert_usage: slots filled / slots available (E*C*G).
    - router_confidence: sum(combine) / sum(dispatch), the mean weight of a dispatched slot.
    - router_entropy: the mean over tokens of -sum_e p log p, in nats.
    - max_vio_group, max_vio_batch: MaxVio (Wang et al. 2024, arXiv 2408.15664). It is
      max_e load_e / mean_e load_e - 1 on the wanted loads. Those are the router's choices,
      before capacity. max_vio_group takes it within each routing group and averages over the
      groups. max_vio_batch takes it over the call's tokens pooled (max_mean_load - 1).
      Over a whole held-out set it is "global" MaxVio, as in the training's held-out
      statistics.
    - experts_per_token [T]: the experts each token reached, in token order.
    - f_e [E]: the fraction of tokens whose wanted assignments include e (sums to A).
    - p_e [E]: the mean router prob of e (sums to 1).
    """
    G, M, E, C = result.dispatch_GxMxExC.shape
    return _stats(
        result.assigned_GxMxE.astype(jnp.float32),
        jnp.sum(result.dispatch_GxMxExC, axis=-1),
        jnp.sum(result.combine_GxMxExC),
        G * E * C,
        result.probs_GxMxE,
        result.logits_GxMxE,
    )


def dropless_stats(routing: DroplessRouting) -> dict[str, jax.Array]:
    """routing_stats of a dropless routing.

    Every assignment is computed. So what was dispatched is what was wanted, with no drops.
    A slot is an assignment, so expert_usage is 1.
    """
    G, M, A = routing.expert_GxMxA.shape
    assigned_GxMxE = routing.assigned_GxMxE.astype(jnp.float32)
    return _stats(
        assigned_GxMxE,
        assigned_GxMxE,
        jnp.sum(routing.gate_GxMxA),
        G * M * A,
        routing.probs_GxMxE,
        routing.logits_GxMxE,
    )


def _stats(
    assigned_GxMxE: jax.Array,
    dispatched_GxMxE: jax.Array,
    combined: jax.Array,
    slots: int,
    probs_GxMxE: jax.Array,
    logits_GxMxE: jax.Array,
) -> dict[str, jax.Array]:
    """The statistics of routing_stats from the routing's parts.

    The parts are the wanted and dispatched loads per token and expert. They also include
    the sum of combine weights. The last part is the number of slots the layer computes.
    """
    G, M, E = assigned_GxMxE.shape
    T = G * M
    logits_GxMxE = logits_GxMxE.astype(jnp.float32)
    load_E = jnp.sum(dispatched_GxMxE, axis=(0, 1))
    wanted_GxE = jnp.sum(assigned_GxMxE, axis=1)
    wanted_E = jnp.sum(wanted_GxE, axis=0)
    total_wanted = jnp.sum(wanted_E)
    total_dispatched = jnp.sum(load_E)
    f_E = wanted_E / T
    f_GxE = jnp.mean(assigned_GxMxE, axis=1)
    p_GxE = jnp.mean(probs_GxMxE, axis=1)
    p_E = jnp.mean(probs_GxMxE, axis=(0, 1))
    experts_per_token_T = jnp.sum(dispatched_GxMxE, axis=-1).reshape(T)
    log_probs_GxMxE = jax.nn.log_softmax(logits_GxMxE, axis=-1)
    max_mean_load = jnp.max(wanted_E) / _nonzero(total_wanted / E)
    max_mean_GxE = jnp.max(wanted_GxE, axis=-1) / _nonzero(jnp.mean(wanted_GxE, axis=-1))
    return {
        "aux_loss": E * jnp.mean(jnp.sum(f_GxE * p_GxE, axis=-1)),
        "aux_loss_batch": E * jnp.sum(f_E * p_E),
        "z_loss": jnp.mean(jax.nn.logsumexp(logits_GxMxE, axis=-1) ** 2),
        "tokens_per_expert": load_E,
        "tokens_per_expert_wanted": wanted_E,
        "load_cv": jnp.std(load_E) / _nonzero(jnp.mean(load_E)),
        "max_mean_load": max_mean_load,
        "drop_fraction": 1.0 - total_dispatched / _nonzero(total_wanted),
        "token_drop_fraction": jnp.mean((experts_per_token_T == 0).astype(jnp.float32)),
        "expert_usage": total_dispatched / slots,
        "router_confidence": combined / _nonzero(total_dispatched),
        "router_entropy": jnp.mean(-jnp.sum(probs_GxMxE * log_probs_GxMxE, axis=-1)),
        "max_vio_group": jnp.mean(max_mean_GxE) - 1.0,
        "max_vio_batch": max_mean_load - 1.0,
        "experts_per_token": experts_per_token_T,
        "f_e": f_E,
        "p_e": p_E,
    }


def _nonzero(x: jax.Array) -> jax.Array:
    # Counts are >= 0; a zero denominator only happens when its numerator is zero too.
    return jnp.maximum(x, jnp.finfo(jnp.float32).tiny)
