"""Router ablation: train a small MoE decoder per setting and seed, then time its decode step.

    python main.py --config=experiments/moe_router_ablation.py --workdir=/tmp/ablation
    python main.py --config=experiments/moe_router_ablation.py:full --workdir=/tmp/ablation_full

Each run trains on the standard library's own source bytes (batching/workloads/train.py),
saves its parameters in the workdir, then sweeps the decode step over batch sizes with the
routing statistics and the cross-sequence probe measured at each batch on held-out text.

The default grid answers what MoE researchers argue about now, with seeds:

- the balancing axis at token-choice k=2, capacity 1.0: no balancing; the load-balancing
  aux loss per routing group (GShard/Switch/flaxformer/MaxText) or over the batch (Qwen 2025
  "Demons in the Detail"; OLMo-core); auxiliary-loss-free balancing, a per-expert routing
  bias moved by γ·sign(mean load − load) after each step (Wang et al. 2024, arXiv
  2408.15664; γ = 0.001 as DeepSeek-V3); and that bias with the per-group aux loss;
- token-choice k=1 (Switch), dropless token-choice (capacity 0: no drops, jax.lax.ragged_dot)
  and expert-choice (Zhou et al. 2022), which needs no balancing.

Every setting trains `train.seeds` times (2 by default, 3 with `full`): the report's router
table gives held-out loss, global MaxVio and drops as means with 95% intervals over seeds,
and says which differences exceed the seed spread. `full` adds router {token-choice k=1,
k=2, expert-choice} x capacity {1.0, 1.25, 2.0} x aux on/off.
"""

from ml_collections import config_dict

from configs import moe_decoder

ROUTERS = {"tc_k1": ("token_choice", 1), "tc_k2": ("token_choice", 2), "ec": ("expert_choice", 2)}
CAPACITY = (1.0, 1.25, 2.0)
AUX_WEIGHT = 0.01
# DeepSeek-V3's bias update speed γ (Wang et al. 2024 tune it in 1e-4..1e-2).
BIAS_RATE = 0.001
# Balancing setting -> (train.aux_loss_weight, train.aux_loss_scope,
# train.router_bias_update_rate).
BALANCING = {
    "none": (0.0, "group", 0.0),
    "aux": (AUX_WEIGHT, "group", 0.0),
    "auxbatch": (AUX_WEIGHT, "batch", 0.0),
    "bias": (0.0, "group", BIAS_RATE),
    "biasaux": (AUX_WEIGHT, "group", BIAS_RATE),
}
# (router, capacity factor, balancing): the balancing axis, then the other routers. A
# capacity factor of 0 is dropless token-choice.
BALANCING_AXIS = tuple(("tc_k2", 1.0, b) for b in BALANCING)
SUBSET = (*BALANCING_AXIS, ("tc_k1", 1.0, "aux"), ("tc_k2", 0.0, "aux"), ("ec", 1.0, "none"))
SEEDS = {False: 2, True: 3}


def grid(full: bool) -> tuple[tuple[str, float, str], ...]:
    """The (router, capacity factor, balancing) settings of the default or the full grid."""
    if not full:
        return SUBSET
    # Expert-choice has no auxiliary loss to switch on.
    on_off = tuple(
        (r, cf, b)
        for r in ROUTERS
        for cf in CAPACITY
        for b in ("aux", "none")
        if not (r == "ec" and b == "aux")
    )
    return (*dict.fromkeys((*on_off, *SUBSET)),)


def run_name(router: str, cf: float, balancing: str) -> str:
    """ "tc_k2_cf100_bias", "tc_k2_dropless_aux", "ec_cf100_none"."""
    capacity = "dropless" if cf == 0 else f"cf{cf * 100:.0f}"
    return f"{router}_{capacity}_{balancing}"


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
    """The ablation's config: `arg` None for the default grid, "full" for the full one."""
    full = arg == "full"
    config = moe_decoder.get_config()
    config.name = "moe_router_ablation"
    config.train.steps = 200
    config.train.seeds = SEEDS[full]
    config.sweep.batch_sizes = (1, 4, 16, 64, 256)
    # The decode step's latency is the table's last column; routing and the probe are not
    # timed, so one pass serves (its interval is the samples', and says so).
    config.sweep.passes = 1
    config.sweep.max_passes = 1
    config.timing.pass_s = 0.3
    config.roofline.shape_aware = False
    runs = {}
    for router, cf, balancing in grid(full):
        kind, top_k = ROUTERS[router]
        weight, scope, rate = BALANCING[balancing]
        runs[run_name(router, cf, balancing)] = {
            "model": {
                "router": kind,
                "top_k": top_k,
                "capacity_factor": cf,
                "router_bias": rate > 0,
            },
            "train": {
                "aux_loss_weight": weight,
                "aux_loss_scope": scope,
                "router_bias_update_rate": rate,
            },
        }
    config.runs = runs
    config.report.claims = ("C8",)
    return config
