"""Logical axis names for parameters and activations (MaxText's idiom); never a mesh.

A model names what each dim of a weight or activation is. Examples are `embed`, `mlp`,
`heads`, `experts` and `batch`. Where a run is set up, `config.mesh.axis_rules` maps those names
to mesh axes (batching/setup/topology.py). Outside a mesh context the constraints are no-ops.
So a model traced without one is the single-device program.
"""

from collections.abc import Callable

import flax.linen as nn
import jax
from flax import nnx


def param_init(init: Callable, *names: str | None) -> Callable:
    """`init` whose parameter carries these logical axis names, one per dim.

    With eager_sharding=False the names are metadata only. The run places the parameters.
    """
    return nnx.with_partitioning(init, names, eager_sharding=False)


def constrain(x: jax.Array, *names: str | None) -> jax.Array:
    """A sharding constraint by logical names.

    It is active only under a topology's mesh and rules.
    """
    return nn.with_logical_constraint(x, names)


def shard_local(fn: Callable, in_axes: list[tuple], out_axes: list[tuple] | tuple) -> Callable:
    """`fn` run on each device's own shard, for work that never crosses devices.

    Examples are an MoE's routing within each group and a KV-cache write within each
    sequence. `in_axes` holds the logical names of each argument's dims. `out_axes` is a list
    with the names of each output's dims. It may instead be one tuple of names. That tuple
    covers the leading dims of every output leaf.

    XLA's partitioner gathers some ops instead of splitting them:

    - top_k over a split batch dim.
    - A loop of dynamic-index writes into a split cache.

    What follows such an op is then replicated. shard_map states the locality instead.
    Outside a topology's mesh and rules, shard_local returns `fn` itself.
    """
    rules = nn.get_logical_axis_rules()
    mesh = jax.sharding.get_abstract_mesh()
    if not rules or mesh.empty:
        return fn

    def spec(names: tuple) -> jax.sharding.PartitionSpec:
        return nn.logical_to_mesh_axes(names, rules)

    in_specs = tuple(spec(names) for names in in_axes)
    out_specs = (
        tuple(spec(names) for names in out_axes) if isinstance(out_axes, list) else spec(out_axes)
    )
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs)
