"""Router ablation: train a small MoE decoder per router setting, then time its decode step.

    python main.py --config=experiments/moe_router_ablation.py --workdir=/tmp/ablation
    python main.py --config=experiments/moe_router_ablation.py:full --workdir=/tmp/ablation_full

Each run trains on the standard library's own source bytes (batching/train.py),
saves its parameters in the workdir, then sweeps the decode step over batch
sizes with the routing statistics measured at each batch on held-out text.
TensorBoard's HParams tab compares the runs: held-out loss, load CV, max/mean
load, drop fraction and decode latency at the smallest and largest batch. The
default is a subset of the grid sized for ~15 minutes on 2 cores; `full` runs
router {token-choice k=1, k=2, expert-choice} x capacity {1.0, 1.25, 2.0} x aux on/off.
Both grids add the load-balancing loss's scope as an axis at token-choice, k=2, capacity 1.0:
"aux" trains the per-group loss (GShard/Switch/flaxformer/MaxText), "auxbatch" the same weight
on the global-batch loss (Qwen 2025 "Demons in the Detail"; OLMo-core), same seed.
"""

from ml_collections import config_dict

from configs import moe_decoder

ROUTERS = {"tc_k1": ("token_choice", 1), "tc_k2": ("token_choice", 2), "ec": ("expert_choice", 2)}
CAPACITY = (1.0, 1.25, 2.0)
AUX_WEIGHT = 0.01
# Aux loss setting -> (train.aux_loss_weight, train.aux_loss_scope).
AUX = {"aux": (AUX_WEIGHT, "group"), "auxbatch": (AUX_WEIGHT, "batch"), "noaux": (0.0, "group")}
SCOPE_RUN = ("tc_k2", 1.0, "auxbatch")
# (router, capacity factor, aux loss setting): the default subset.
SUBSET = (
    ("tc_k1", 1.0, "aux"),
    ("tc_k2", 1.0, "aux"),
    ("tc_k2", 1.0, "noaux"),
    SCOPE_RUN,
    ("tc_k2", 1.25, "aux"),
    ("tc_k2", 2.0, "aux"),
    ("ec", 1.0, "noaux"),
)


def grid(full: bool) -> tuple[tuple[str, float, str], ...]:
    if not full:
        return SUBSET
    # Expert-choice has no auxiliary loss to switch on.
    on_off = tuple(
        (r, cf, aux)
        for r in ROUTERS
        for cf in CAPACITY
        for aux in ("aux", "noaux")
        if not (r == "ec" and aux == "aux")
    )
    return (*on_off, SCOPE_RUN)


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
    config = moe_decoder.get_config()
    config.name = "moe_router_ablation"
    config.train.steps = 200
    config.sweep.batch_sizes = (1, 4, 16, 64, 256)
    config.timing.budget_s = 0.5
    config.roofline.shape_aware = False
    runs = {}
    for router, cf, aux in grid(arg == "full"):
        kind, top_k = ROUTERS[router]
        weight, scope = AUX[aux]
        runs[f"{router}_cf{cf * 100:.0f}_{aux}"] = {
            "model": {"router": kind, "top_k": top_k, "capacity_factor": cf},
            "train": {"aux_loss_weight": weight, "aux_loss_scope": scope},
        }
    config.runs = runs
    config.report.claims = ("C8",)
    return config
