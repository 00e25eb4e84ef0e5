"""An MoE MLP next to a dense one with the same active parameters, over batch 1..512.

    python main.py --config=experiments/moe_vs_dense.py --workdir=/tmp/moe_vs_dense

The dense run is the same layer with E = k experts that every token reaches
(capacity factor 1 gives each expert the whole group): the same active
parameters per token and the same dispatch machinery. Each of the MoE's expert
weights serves only ~B·k/E tokens of a batch of B, so its predicted critical
batch is E/k times the dense one; the report holds the fitted knees against that.
"""

from ml_collections import config_dict

from configs import moe


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
    del arg
    config = moe.get_config()
    config.name = "moe_vs_dense"
    config.runs = {
        "moe_e8_k2": {},
        "moe_e8_k2_expert_choice": {"model": {"router": "expert_choice"}},
        "dense_e2_k2": {"model": {"num_experts": 2, "capacity_factor": 1.0}},
    }
    return config
