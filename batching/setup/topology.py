"""A run's devices and mesh, known once: built from `config.mesh` and handed to the workload.

The mesh has three axes: ("data", "expert", "model"). `config.mesh.data`,
`config.mesh.expert` and `config.mesh.model` size them. Their product must equal the number
of devices JAX sees across all processes. Parameters and activations carry logical axis
names, such as `batch`, `embed`, `mlp`, `heads` and `experts`. `config.mesh.axis_rules` maps
each to a mesh axis, or to None (replicated). MaxText's `logical_axis_rules` work the same
way. A mesh of one device runs the same code path. Every sharding is then the one device.
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
    """The mesh a run shards over, its logical-axis rules, and its peaks' device."""

    mesh: Mesh
    axis_rules: tuple[tuple[str, str | tuple[str, ...] | None], ...]
    # The first addressable device.
    # Microbenchmarks, memory limits and row labels use it.
    device: jax.Device

    @property
    def shape(self) -> dict[str, int]:
        """Size of each mesh axis, by name (data, expert, model)."""
        return {name: int(self.mesh.shape[name]) for name in MESH_AXES}

    @property
    def num_devices(self) -> int:
        """Devices in the mesh."""
        return int(self.mesh.devices.size)

    @property
    def process_count(self) -> int:
        """Processes taking part in the run (jax.process_count)."""
        return jax.process_count()

    @property
    def process_index(self) -> int:
        """This process's index (0: the writer)."""
        return jax.process_index()

    def spec(self, logical: Sequence[str | None]) -> PartitionSpec:
        """The mesh PartitionSpec of an array whose dims carry these logical names.

        Mesh axes of size 1 and trailing unsplit dims are left out. They split nothing. XLA
        reports a program's outputs without them. An input placed with them would not match
        the same array coming back. Feeding a donated cache back in would then recompile.
        """
        spec = nn.logical_to_mesh_axes(tuple(logical), self.axis_rules)

        def used(axes):
            axes = axes if isinstance(axes, tuple) else (axes,)
            kept = tuple(a for a in axes if a is not None and self.mesh.shape[a] > 1)
            return kept[0] if len(kept) == 1 else (kept or None)

        dims = [used(axes) for axes in spec]
        while dims and dims[-1] is None:  # P('data') is how XLA reports P('data', None)
            dims.pop()
        return PartitionSpec(*dims)

    def sharding(self, logical: Sequence[str | None]) -> NamedSharding:
        """The NamedSharding of an array whose dims carry these logical names.

        See `spec`.
        """
        return NamedSharding(self.mesh, self.spec(logical))

    def put(self, x: Any, logical: Sequence[str | None]) -> jax.Array:
        """`x` placed on the mesh with its dims sharded by their logical names."""
        return jax.device_put(x, self.sharding(logical))

    def axis_size(self, logical: str) -> int:
        """How many ways the rules split a dim named `logical` (1: not split)."""
        return split_size(self.shape, self.axis_rules, logical)

    @property
    def token_shards(self) -> int:
        """Devices holding distinct tokens: an MoE's routing groups per call.

        This is what `groups` maps to, by default data x expert.
        """
        return self.axis_size("groups")

    @property
    def expert_shards(self) -> int:
        """Devices an MoE's experts are split over (what `experts` maps to)."""
        return self.axis_size("experts")

    def parallel_shape(self, experts: bool, model: bool) -> dict[str, int]:
        """How many ways each mesh axis really splits this workload.

        An axis that only holds replicas gets 1. `data` is what the batch maps to. `expert`
        counts where the model has experts and the rules split them. `model` counts where
        the model names dims the rules map to it (heads, mlp). The roofline's per-device work
        uses this, not the mesh's size. So do the analytic collectives. A k-device run can sit
        on a bigger mesh.
        """
        expert = self.expert_shards if experts else 1
        # Under GShard the batch may map to (data, expert). Its split over the expert axis
        # is the expert parallelism itself, not extra data parallelism.
        on_experts = set(mesh_axes(self.axis_rules, "experts")) if experts else set()
        batch = [a for a in mesh_axes(self.axis_rules, "batch") if a not in on_experts]
        return {
            "data": math.prod(self.shape[a] for a in batch),
            "expert": expert,
            "model": max(self.axis_size("mlp"), self.axis_size("heads")) if model else 1,
        }

    def put_batch(self, x: Any) -> jax.Array:
        """An input whose leading dim is the batch, placed on the mesh.

        The batch is split over `data`; the rest is replicated.
        """
        return self.put(x, ("batch",) + (None,) * (np.ndim(x) - 1))

    def state_shardings(self, state: nnx.State) -> nnx.State:
        """Each variable's NamedSharding, from its logical axis names.

        A variable without names is replicated.
        """
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
        """Mesh and rules while a workload traces inside jit.

        Logical constraints take effect here. Models call
        `flax.linen.with_logical_constraint`, which is a no-op outside this context. So a
        model traced without a topology is the single-device program.
        """
        with (
            jax.sharding.use_abstract_mesh(self.mesh.abstract_mesh),
            nn.logical_axis_rules(self.axis_rules),
        ):
            yield


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def mesh_shape(run_cfg: ml_collections.ConfigDict) -> dict[str, int]:
    """`config.mesh`'s axis sizes.

    A size that is not a positive int raises a MeshError naming the field.
    """
    mesh_cfg = run_cfg.get("mesh")
    shape = {}
    for name in MESH_AXES:
        value = mesh_cfg.get(name, 1) if mesh_cfg is not None else 1
        if not _positive_int(value):
            raise MeshError(f"mesh.{name} must be a positive integer, got {value!r}")
        shape[name] = value
    return shape


def axis_rules(
    run_cfg: ml_collections.ConfigDict,
) -> tuple[tuple[str, str | tuple[str, ...] | None], ...]:
    """`config.mesh.axis_rules` as (logical name, target) pairs.

    A target is a mesh axis, a tuple of mesh axes, or None.
    """
    mesh_cfg = run_cfg.get("mesh")
    rules = mesh_cfg.get("axis_rules", ()) if mesh_cfg is not None else ()
    out = []
    for rule in rules:
        ok = isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)
        target = rule[1] if ok else None
        if isinstance(target, list):
            target = tuple(target)
        axes = target if isinstance(target, tuple) else (target,)
        if not ok or not all(a is None or a in MESH_AXES for a in axes):
            raise MeshError(
                f"mesh.axis_rules must hold (logical name, mesh axis of {MESH_AXES}, a tuple "
                f"of them, or None) pairs, got {rule!r}"
            )
        out.append((rule[0], target))
    return tuple(out)


def devices(run_cfg: ml_collections.ConfigDict) -> list[jax.Device]:
    """Every device of the configured platform, across all processes.

    An unset platform means JAX's default.
    """
    return jax.devices(run_cfg.platform) if run_cfg.platform else jax.devices()


def validate(run_cfg: ml_collections.ConfigDict) -> dict[str, int]:
    """Checks the mesh fields against the devices, the batch sizes and the model.

    It returns the mesh's shape.
    """
    shape = mesh_shape(run_cfg)
    rules = axis_rules(run_cfg)
    count = len(devices(run_cfg))
    if math.prod(shape.values()) != count:
        raise MeshError(
            f"mesh data*expert*model must equal the {count} devices JAX sees, got "
            f"{shape['data']}*{shape['expert']}*{shape['model']}"
        )
    batch_shards = split_size(shape, rules, "batch")
    for b in run_cfg.sweep.batch_sizes:
        if b % batch_shards:
            raise MeshError(
                f"sweep.batch_sizes must be divisible by the {batch_shards} devices that "
                f"mesh.axis_rules' 'batch' maps to ({mesh_axes(rules, 'batch')}), got {b}"
            )
    experts = run_cfg.model.get("num_experts")
    if experts is not None and experts % shape["expert"]:
        raise MeshError(
            f"mesh.expert must divide model.num_experts={experts}, got {shape['expert']}"
        )
    shards = split_size(shape, rules, "groups")
    if experts is not None and shards > 1:
        for b in run_cfg.sweep.batch_sizes:
            if b % shards:
                raise MeshError(
                    f"sweep.batch_sizes must be divisible by the {shards} devices that "
                    f"mesh.axis_rules' 'groups' maps to (an MoE routes one group per "
                    f"device's token shard), got {b}"
                )
    if shape["model"] > 1 and run_cfg.model.get("cache_layout") == "bksh":
        raise MeshError(
            "model.cache_layout 'bksh' merges kv heads into the batch axis and cannot be "
            f"split over mesh.model={shape['model']}; use 'bskh' or 'auto'"
        )
    for name in ("n_heads", "n_kv_heads", "mlp_dim", "width"):
        value = run_cfg.model.get(name)
        if isinstance(value, int) and value % shape["model"]:
            raise MeshError(
                f"mesh.model={shape['model']} must divide model.{name}, got {name}={value}"
            )
    return shape


def mesh_axes(rules, logical: str) -> tuple[str, ...]:
    """The mesh axes the rules map a dim named `logical` to.

    The first rule for a name wins, as in flax. A replicated dim gets ().
    """
    target = next((axes for name, axes in rules if name == logical), None)
    axes = target if isinstance(target, tuple) else (target,)
    return tuple(a for a in axes if a is not None)


def split_size(shape: dict[str, int], rules, logical: str) -> int:
    """How many ways the rules split a dim named `logical`.

    It is the product of its mesh axes' sizes.
    """
    return math.prod(shape[a] for a in mesh_axes(rules, logical))


def build(run_cfg: ml_collections.ConfigDict) -> Topology:
    """The run's Topology: its mesh over every device, validated first."""
    shape = validate(run_cfg)
    devs = devices(run_cfg)
    # Auto axes let XLA's partitioner place the collectives, MaxText's default.
    # Explicit axes would make every op's sharding part of its type.
    mesh = jax.make_mesh(
        tuple(shape[a] for a in MESH_AXES),
        MESH_AXES,
        axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
        devices=devs,
    )
    local = [d for d in devs if d.process_index == jax.process_index()]
    return Topology(mesh=mesh, axis_rules=axis_rules(run_cfg), device=local[0])
