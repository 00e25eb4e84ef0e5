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
"""

from ml_collections import config_dict

from configs import moe_decoder

ROUTERS = {"tc_k1": ("token_choice", 1), "tc_k2": ("token_choice", 2), "ec": ("expert_choice", 2)}
CAPACITY = (1.0, 1.25, 2.0)
AUX_WEIGHT = 0.01
# (router, capacity factor, aux loss on): the default subset.
SUBSET = (
    ("tc_k1", 1.0, True),
    ("tc_k2", 1.0, True),
    ("tc_k2", 1.0, False),
    ("tc_k2", 1.25, True),
    ("tc_k2", 2.0, True),
    ("ec", 1.0, False),
)


def grid(full: bool) -> tuple[tuple[str, float, bool], ...]:
    if not full:
        return SUBSET
    # Expert-choice has no auxiliary loss to switch on.
    return tuple(
        (r, cf, aux)
        for r in ROUTERS
        for cf in CAPACITY
        for aux in (True, False)
        if not (r == "ec" and aux)
    )


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
        runs[f"{router}_cf{cf * 100:.0f}_{'aux' if aux else 'noaux'}"] = {
            "model": {"router": kind, "top_k": top_k, "capacity_factor": cf},
            "train": {"aux_loss_weight": AUX_WEIGHT if aux else 0.0},
        }
    config.runs = runs
    config.report.claims = ("C8",)
    return config
