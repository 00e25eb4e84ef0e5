"""A run's devices and mesh, known once: built from `config.mesh` and handed to the workload.

The mesh has three axes, ("data", "expert", "model"), sized by `config.mesh.data`,
`config.mesh.expert` and `config.mesh.model`; their product must equal the number of devices
JAX sees across all processes. Parameters and activations carry logical axis names
(`batch`, `embed`, `mlp`, `heads`, `experts`, ...); `config.mesh.axis_rules` maps each to a
mesh axis or to None (replicated), as MaxText's `logical_axis_rules` do. A mesh of one device
runs the same code path: every sharding is then the one device.
"""

import contextlib
import dataclasses
import math
from collections.abc import Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "expert", "model")


class MeshError(ValueError):
    """A mesh field does not fit the devices or the model; the message names the field."""


@dataclasses.dataclass(frozen=True)
class Topology:
    """The mesh a run shards over, its logical-axis rules, and the device peaks are taken on."""

    mesh: Mesh
    axis_rules: tuple[tuple[str, str | None], ...]
    # The first addressable device: microbenchmarks, memory limits and row labels use it.
    device: jax.Device

    @property
    def shape(self) -> dict[str, int]:
        return {name: int(self.mesh.shape[name]) for name in MESH_AXES}

    @property
    def num_devices(self) -> int:
        return int(self.mesh.devices.size)

    @property
    def process_count(self) -> int:
        return jax.process_count()

    @property
    def process_index(self) -> int:
        return jax.process_index()

    def spec(self, logical: Sequence[str | None]) -> PartitionSpec:
        """The mesh PartitionSpec of an array whose dims carry these logical names."""
        return nn.logical_to_mesh_axes(tuple(logical), self.axis_rules)

    def sharding(self, logical: Sequence[str | None]) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(logical))

    def put(self, x: Any, logical: Sequence[str | None]) -> jax.Array:
        """`x` placed on the mesh with its dims sharded by their logical names."""
        return jax.device_put(x, self.sharding(logical))

    def put_batch(self, x: Any) -> jax.Array:
        """An input whose leading dim is the batch: split over `data`, the rest replicated."""
        return self.put(x, ("batch",) + (None,) * (np.ndim(x) - 1))

    def state_shardings(self, state: nnx.State) -> nnx.State:
        """Each variable's NamedSharding from its logical axis names (no names: replicated)."""
        specs = nnx.get_partition_spec(state)
        return jax.tree.map(
            lambda p: NamedSharding(self.mesh, self.spec(tuple(p))),
            specs,
            is_leaf=lambda x: isinstance(x, PartitionSpec),
        )

    def put_state(self, state: nnx.State) -> nnx.State:
        """Parameters (or a cache) placed on the mesh by their logical axis names."""
        return jax.device_put(state, self.state_shardings(state))

    @contextlib.contextmanager
    def activate(self) -> Iterator[None]:
        """Mesh and rules while a workload traces (inside jit): logical constraints take effect.

        Models call `flax.linen.with_logical_constraint`, which is a no-op outside this
        context, so a model traced without a topology is the single-device program.
        """
        with (
            jax.sharding.use_abstract_mesh(self.mesh.abstract_mesh),
            nn.logical_axis_rules(self.axis_rules),
        ):
            yield


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def mesh_shape(run_cfg: ml_collections.ConfigDict) -> dict[str, int]:
    """`config.mesh`'s axis sizes; MeshError naming the field if one is not a positive int."""
    mesh_cfg = run_cfg.get("mesh")
    shape = {}
    for name in MESH_AXES:
        value = mesh_cfg.get(name, 1) if mesh_cfg is not None else 1
        if not _positive_int(value):
            raise MeshError(f"mesh.{name} must be a positive integer, got {value!r}")
        shape[name] = value
    return shape


def axis_rules(run_cfg: ml_collections.ConfigDict) -> tuple[tuple[str, str | None], ...]:
    """`config.mesh.axis_rules` as a tuple of (logical name, mesh axis or None) pairs."""
    mesh_cfg = run_cfg.get("mesh")
    rules = mesh_cfg.get("axis_rules", ()) if mesh_cfg is not None else ()
    out = []
    for rule in rules:
        if (
            not isinstance(rule, (tuple, list))
            or len(rule) != 2
            or not isinstance(rule[0], str)
            or (rule[1] is not None and rule[1] not in MESH_AXES)
        ):
            raise MeshError(
                f"mesh.axis_rules must hold (logical name, one of {MESH_AXES} or None) pairs, "
                f"got {rule!r}"
            )
        out.append((rule[0], rule[1]))
    return tuple(out)


def devices(run_cfg: ml_collections.ConfigDict) -> list[jax.Device]:
    """Every device of the configured platform across all processes (JAX's default if unset)."""
    return jax.devices(run_cfg.platform) if run_cfg.platform else jax.devices()


def validate(run_cfg: ml_collections.ConfigDict) -> dict[str, int]:
    """Checks the mesh fields against the devices, the batch sizes and the model; the shape."""
    shape = mesh_shape(run_cfg)
    axis_rules(run_cfg)
    count = len(devices(run_cfg))
    if math.prod(shape.values()) != count:
        raise MeshError(
            f"mesh data*expert*model must equal the {count} devices JAX sees, got "
            f"{shape['data']}*{shape['expert']}*{shape['model']}"
        )
    for b in run_cfg.sweep.batch_sizes:
        if b % shape["data"]:
            raise MeshError(
                f"sweep.batch_sizes must be divisible by mesh.data={shape['data']}, got {b}"
            )
    experts = run_cfg.model.get("num_experts")
    if experts is not None and experts % shape["expert"]:
        raise MeshError(
            f"mesh.expert must divide model.num_experts={experts}, got {shape['expert']}"
        )
    return shape


def build(run_cfg: ml_collections.ConfigDict) -> Topology:
    """The run's Topology: its mesh over every device, validated first."""
    shape = validate(run_cfg)
    devs = devices(run_cfg)
    # Auto axes: XLA's partitioner places the collectives (MaxText's default); explicit axes
    # would make every op's sharding part of its type.
    mesh = jax.make_mesh(
        tuple(shape[a] for a in MESH_AXES),
        MESH_AXES,
        axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
        devices=devs,
    )
    local = [d for d in devs if d.process_index == jax.process_index()]
    return Topology(mesh=mesh, axis_rules=axis_rules(run_cfg), device=local[0])
