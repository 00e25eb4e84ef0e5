"""A dense stack of SwiGLU MLPs with residuals: an MoE MLP's dense counterpart.

The stack has `depth` layers of y = x + W_down·(silu(W_gate·x) ⊙ W_up·x). Each goes
d_model → mlp_dim → d_model, as each expert of models.moe computes.

Set mlp_dim = top_k × an MoE's expert mlp_dim. The stack then has that MoE's active parameters and
FLOPs per token, without routing. Only the MoE's router is left out. It is the baseline an MoE
layer's routing and capacity cost are measured against.

Letters in array names (models/__init__.py): B batch, D d_model, F mlp_dim. Each example
is one token.
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from models import partitioning
from models.dtypes import resolve_dtype


@dataclasses.dataclass(frozen=True)
class SwiGLUConfig:
    """The SwiGLU stack: `depth` residual layers d_model → mlp_dim → d_model.

    A bad field raises ValueError naming model.<field>.
    """

    d_model: int = 512
    mlp_dim: int = 2048
    depth: int = 2
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        for name in ("d_model", "mlp_dim", "depth"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"model.{name} must be a positive integer, got {value!r}")
        resolve_dtype(self.dtype)
        resolve_dtype(self.param_dtype)


class SwiGLUStack(nnx.Module):
    """x_BxD -> y_BxD through `depth` residual SwiGLU layers."""

    def __init__(self, cfg: SwiGLUConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        D, F = cfg.d_model, cfg.mlp_dim
        param_dtype = resolve_dtype(cfg.param_dtype)
        init = nnx.initializers.lecun_normal()
        in_init = partitioning.param_init(init, "embed", "mlp")
        out_init = partitioning.param_init(init, "mlp", "embed")
        self.w_gate = nnx.List([nnx.Param(in_init(rngs.params(), (D, F), param_dtype))
                                for _ in range(cfg.depth)])  # fmt: skip
        self.w_up = nnx.List([nnx.Param(in_init(rngs.params(), (D, F), param_dtype))
                              for _ in range(cfg.depth)])  # fmt: skip
        self.w_down = nnx.List([nnx.Param(out_init(rngs.params(), (F, D), param_dtype))
                                for _ in range(cfg.depth)])  # fmt: skip

    def __call__(self, x_BxD: jax.Array) -> jax.Array:
        dtype = resolve_dtype(self.cfg.dtype)
        x_BxD = x_BxD.astype(dtype)
        for gate_DxF, up_DxF, down_FxD in zip(self.w_gate, self.w_up, self.w_down, strict=True):
            h_BxF = jax.nn.silu(x_BxD @ gate_DxF[...].astype(dtype)) * (
                x_BxD @ up_DxF[...].astype(dtype)
            )
            x_BxD = x_BxD + h_BxF @ down_FxD[...].astype(dtype)
        return jnp.asarray(x_BxD)


def num_params(cfg: SwiGLUConfig) -> int:
    """Gate, up and down weights: 3·D·F per layer, no biases."""
    return cfg.depth * 3 * cfg.d_model * cfg.mlp_dim
