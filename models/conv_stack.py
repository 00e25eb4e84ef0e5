"""A stack of same-size 3×3 convolutions: the controlled comparison for claim C6.

`depth` layers of a `kernel`×`kernel` convolution from `channels` to `channels` channels on an
`image_size`×`image_size` NHWC input (stride 1, "SAME" padding, bias, ReLU between layers).
A layer holds k²·C² weights and does 2·k²·C² FLOPs at each of the H·W output positions: every
weight is used H·W times per example. A dense stack of width k·C has the same weights per
layer; run over H·W tokens per example (models.mlp with the MLP workload's `tokens`) it does
the same FLOPs too, and over one token H·W times fewer.

Letters in array names (models/__init__.py): B batch, I, J height and width, Z channels.
"""

import dataclasses

import jax
from flax import nnx

from models import partitioning
from models.dtypes import resolve_dtype


@dataclasses.dataclass(frozen=True)
class ConvStackConfig:
    """The conv stack: `depth` `kernel`×`kernel` convolutions of `channels` channels on
    `image_size`×`image_size` inputs; a bad field raises ValueError naming model.<field>."""

    channels: int = 64
    depth: int = 4
    image_size: int = 16
    kernel: int = 3
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        for name in ("channels", "depth", "image_size", "kernel"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"model.{name} must be a positive integer, got {value!r}")
        if self.kernel % 2 == 0:
            raise ValueError(f"model.kernel must be odd (SAME padding), got {self.kernel}")
        resolve_dtype(self.dtype)
        resolve_dtype(self.param_dtype)


class ConvStack(nnx.Module):
    """x_BxHxWxC -> y_BxHxWxC through `depth` convolutions, ReLU between them."""

    def __init__(self, cfg: ConvStackConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        init = partitioning.param_init(nnx.initializers.lecun_normal(), None, None, None, "mlp")
        self.layers = nnx.List(
            [
                nnx.Conv(
                    cfg.channels,
                    cfg.channels,
                    kernel_size=(cfg.kernel, cfg.kernel),
                    padding="SAME",
                    dtype=resolve_dtype(cfg.dtype),
                    param_dtype=resolve_dtype(cfg.param_dtype),
                    kernel_init=init,
                    rngs=rngs,
                )
                for _ in range(cfg.depth)
            ]
        )

    def __call__(self, x_BxIxJxZ: jax.Array) -> jax.Array:
        for i, layer in enumerate(self.layers):
            x_BxIxJxZ = layer(x_BxIxJxZ)
            if i < len(self.layers) - 1:
                x_BxIxJxZ = jax.nn.relu(x_BxIxJxZ)
        return x_BxIxJxZ


def num_params(cfg: ConvStackConfig) -> int:
    """k²·C² kernel weights and C biases per layer."""
    return cfg.depth * (cfg.kernel**2 * cfg.channels**2 + cfg.channels)
