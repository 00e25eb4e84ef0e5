"""Logical axis names for parameters and activations (MaxText's idiom); never a mesh.

A model names what each dim of a weight or activation is (`embed`, `mlp`, `heads`,
`experts`, `batch`, ...). Where a run is set up, `config.mesh.axis_rules` maps those names
to mesh axes (batching/topology.py). Outside a mesh context the constraints are no-ops, so a
model traced without one is the single-device program.
"""

from collections.abc import Callable

import flax.linen as nn
import jax
from flax import nnx


def param_init(init: Callable, *names: str | None) -> Callable:
    """`init` whose parameter carries these logical axis names (one per dim).

    eager_sharding=False: the names are metadata only; the run places the parameters.
    """
    return nnx.with_partitioning(init, names, eager_sharding=False)


def constrain(x: jax.Array, *names: str | None) -> jax.Array:
    """A sharding constraint by logical names, active only under a topology's mesh and rules."""
    return nn.with_logical_constraint(x, names)
