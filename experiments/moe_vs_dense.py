"""An MoE MLP next to a dense one with the same active parameters, over batch 1..512.

    python main.py --config=experiments/moe_vs_dense.py --workdir=/tmp/moe_vs_dense

- `moe_e8_k2`: 8 SwiGLU experts, token-choice top-2, capacity factor 1.25 (GShard);
- `moe_e8_ec_cf250`: expert-choice at capacity factor 2.5, FLOP-matched to it: both compute
  E·C ≈ 2.5 × the group's tokens expert slots (token-choice: k · 1.25), so a latency gap is
  routing, not arithmetic;
- `dense_swiglu_f2048`: a dense residual SwiGLU stack of hidden dim k·F = 2048 (models.swiglu):
  the same active parameters and FLOPs per token as the MoE (its router aside), no routing;
- `routed_e2_k2`: the MoE layer with 2 experts that every token reaches (capacity 1): the
  dense model's work through the dispatch/combine machinery, which measures that machinery;
- `moe_e8_k2_cf100`, `moe_e8_k2_cf200` and `moe_e8_k2_dropless`: the same token-choice MoE
  at capacity 1.0 and 2.0 and dropless (capacity 0: the assignments sorted by expert through
  jax.lax.ragged_dot, nothing padded or dropped), so the report shows, batch by batch, what
  padding to a capacity costs against computing only the tokens routed. XLA:CPU rewrites a
  ragged dot into dense dots over every expert (its cost analysis counts E times the routed
  FLOPs, and the time follows), so on a CPU dropless costs more, not less; the per-op
  prediction prices it at the rate measured for ragged_dot at its shape.

Each of the MoE's expert weights serves only ~B·k/E tokens of a batch of B, so its predicted
critical batch is E/k times the dense one; the report holds the fitted knees against that.
"""

from ml_collections import config_dict

from configs import moe


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
    """The comparison's runs (no `arg`)."""
    del arg
    config = moe.get_config()
    config.name = "moe_vs_dense"
    base = config.model
    dense = {
        "name": "swiglu",
        "d_model": base.d_model,
        "mlp_dim": base.top_k * base.mlp_dim,
        "depth": base.depth,
        "dtype": base.dtype,
        "param_dtype": base.param_dtype,
        "matmul_precision": base.matmul_precision,
    }
    config.runs = {
        "moe_e8_k2": {},
        "moe_e8_ec_cf250": {
            "model": {"router": "expert_choice", "capacity_factor": base.top_k * 1.25}
        },
        f"dense_swiglu_f{base.top_k * base.mlp_dim}": {"model": dense},
        "routed_e2_k2": {"model": {"num_experts": 2, "capacity_factor": 1.0}},
        "moe_e8_k2_cf100": {"model": {"capacity_factor": 1.0}},
        "moe_e8_k2_cf200": {"model": {"capacity_factor": 2.0}},
        "moe_e8_k2_dropless": {"model": {"capacity_factor": 0.0}},
    }
    config.report.claims = ("C8",)
    return config
