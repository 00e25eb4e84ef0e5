"""The post's MLP: `depth` square dense layers of size `width`.

Letters in array names (models/__init__.py): B batch, D width.
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from models import partitioning
from models.dtypes import resolve_dtype

# nnx.Linear's own default, named here so the kernel can carry its logical axes.
KERNEL_INIT = nnx.initializers.lecun_normal()
ACTIVATIONS = {"relu": jax.nn.relu, "gelu": jax.nn.gelu, "tanh": jnp.tanh, "identity": lambda x: x}


@dataclasses.dataclass(frozen=True)
class MLPConfig:
    """The MLP: `depth` dense layers of `width`, with `activation` between them.

    A bad field raises ValueError naming model.<field>.
    """

    width: int = 1024
    depth: int = 8
    activation: str = "relu"
    dtype: str = "float32"
    param_dtype: str = "float32"
    use_bias: bool = True

    def __post_init__(self):
        for name in ("width", "depth"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"model.{name} must be a positive integer, got {value!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"model.activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}"
            )
        resolve_dtype(self.dtype)
        resolve_dtype(self.param_dtype)


class MLP(nnx.Module):
    """x_BxD -> y_BxD through `depth` dense layers.

    The activation runs between layers, not after the last one.
    """

    def __init__(self, cfg: MLPConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.layers = nnx.List(
            [
                nnx.Linear(
                    cfg.width,
                    cfg.width,
                    use_bias=cfg.use_bias,
                    dtype=resolve_dtype(cfg.dtype),
                    param_dtype=resolve_dtype(cfg.param_dtype),
                    kernel_init=partitioning.param_init(KERNEL_INIT, "embed", "mlp"),
                    bias_init=partitioning.param_init(nnx.initializers.zeros_init(), "mlp"),
                    rngs=rngs,
                )
                for _ in range(cfg.depth)
            ]
        )

    def __call__(self, x_BxD: jax.Array) -> jax.Array:
        act = ACTIVATIONS[self.cfg.activation]
        for i, layer in enumerate(self.layers):
            x_BxD = layer(x_BxD)
            if i < len(self.layers) - 1:
                x_BxD = act(x_BxD)
        return x_BxD


def num_params(cfg: MLPConfig) -> int:
    """Weights and biases: D² + D per layer with D = `width` (D² without bias)."""
    return cfg.depth * (cfg.width * cfg.width + (cfg.width if cfg.use_bias else 0))
