"""A stack of same-size convolutions (3×3 by default): the controlled comparison for claim C6.

The stack has `depth` layers. Each is a `kernel`×`kernel` convolution from `channels` to
`channels` channels. The input is `image_size`×`image_size`, in NHWC order. Every layer has
stride 1, "SAME" padding and a bias, with ReLU between layers.

Write k for `kernel` and Z for `channels`. A layer holds k²·Z² weights. It does 2·k²·Z²
FLOPs at each of the I·J output positions. So every weight is used I·J times per example.

A dense stack of width k·Z has the same weights per layer. That is models.mlp, run with the
MLP workload's `tokens`. Over I·J tokens per example it does the same FLOPs too. Over one
token it does I·J times fewer.

Letters in array names (models/__init__.py): B batch, I and J height and width, Z channels.
"""

import dataclasses

import jax
from flax import nnx

from models import partitioning
from models.dtypes import resolve_dtype


@dataclasses.dataclass(frozen=True)
class ConvStackConfig:
    """The conv stack's sizes and dtypes.

    The stack is `depth` convolutions of `kernel`×`kernel`, each from `channels` to `channels`
    channels. Inputs are `image_size`×`image_size`. The kernel must be odd, for SAME padding.
    A bad field raises ValueError naming model.<field>.
    """

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
    """x_BxIxJxZ -> y_BxIxJxZ through `depth` convolutions, with ReLU between them."""

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
    """Parameters: k²·Z² kernel weights and Z biases per layer, with k = `kernel`."""
    return cfg.depth * (cfg.kernel**2 * cfg.channels**2 + cfg.channels)
