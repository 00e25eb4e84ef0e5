"""A small Vision Transformer that is not one of the lab's models, swept as a user's would be.

Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words": patches embedded by one linear
map, a class token, learned positions, pre-norm encoder blocks, a linear head on the class
token. docs/your_model.md sweeps it from Python and from the command line:

    python main.py --config=configs/custom.py --config.model.factory=examples.vit:FAMILY \
        --config.model.depth=2 --workdir=runs/vit
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import batching


class Block(nnx.Module):
    """One pre-norm encoder block: self-attention, then an MLP, each with a residual."""

    def __init__(self, dim: int, heads: int, rngs: nnx.Rngs):
        self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
        self.attention = nnx.MultiHeadAttention(heads, dim, decode=False, rngs=rngs)
        self.norm2 = nnx.LayerNorm(dim, rngs=rngs)
        self.up = nnx.Linear(dim, 4 * dim, rngs=rngs)
        self.down = nnx.Linear(4 * dim, dim, rngs=rngs)

    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        h_BxLxD = self.norm1(x_BxLxD)
        x_BxLxD = x_BxLxD + self.attention(h_BxLxD)
        return x_BxLxD + self.down(jax.nn.gelu(self.up(self.norm2(x_BxLxD))))


class ViT(nnx.Module):
    """Images [B, I, J, Z] to class logits [B, V]."""

    def __init__(self, image: int, patch: int, dim: int, depth: int, heads: int, classes: int,
                 rngs: nnx.Rngs):  # fmt: skip
        self.patch = patch
        self.embed = nnx.Linear(patch * patch * 3, dim, rngs=rngs)
        self.cls = nnx.Param(jnp.zeros((1, 1, dim)))
        tokens = (image // patch) ** 2 + 1
        self.positions = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, tokens, dim)))
        self.blocks = nnx.List([Block(dim, heads, rngs) for _ in range(depth)])
        self.norm = nnx.LayerNorm(dim, rngs=rngs)
        self.head = nnx.Linear(dim, classes, rngs=rngs)

    def __call__(self, images_BxIxJxZ: jax.Array) -> jax.Array:
        B, I, J, Z = images_BxIxJxZ.shape  # noqa: E741 - the letter key
        p = self.patch
        patches = images_BxIxJxZ.reshape(B, I // p, p, J // p, p, Z).transpose(0, 1, 3, 2, 4, 5)
        x_BxLxD = self.embed(patches.reshape(B, (I // p) * (J // p), p * p * Z))
        cls_Bx1xD = jnp.broadcast_to(self.cls[...], (B, 1, x_BxLxD.shape[-1]))
        x_BxLxD = jnp.concatenate([cls_Bx1xD, x_BxLxD], axis=1) + self.positions[...]
        for block in self.blocks:
            x_BxLxD = block(x_BxLxD)
        return self.head(self.norm(x_BxLxD[:, 0]))


def make(model_cfg):
    """(model, inputs) for the lab: a ViT from the config's fields, and random images."""
    model = ViT(model_cfg.image, model_cfg.patch, model_cfg.dim, model_cfg.depth,
                model_cfg.heads, model_cfg.classes, nnx.Rngs(0))  # fmt: skip

    def inputs(batch_size: int):
        rng = np.random.default_rng(batch_size)
        return (rng.standard_normal((batch_size, model_cfg.image, model_cfg.image, 3), np.float32),)

    return model, inputs


# The fields this model owns, with their defaults: --config.model.<field> sets them.
FIELDS = {"image": 32, "patch": 8, "dim": 64, "depth": 4, "heads": 4, "classes": 10}
FAMILY = batching.family(make, name="vit", fields=FIELDS)
