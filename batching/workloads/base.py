"""What the sweep times: a model bound to its inputs, its costs and its run-level facts.

Each model family has a module `batching/workloads/<model.name>.py` with
`validate(model_cfg)` (raises ValueError naming the field) and
`build(run_cfg, topo, workdir) -> Workload` (topo: the run's batching.setup.topology.Topology,
whose mesh the workload places its parameters and inputs on; workdir: where a workload finds
files an earlier step wrote, such as trained parameters). The sweep picks it by name, so adding a
model touches no dispatcher.
"""

import copy
import dataclasses
import importlib
import inspect
import re
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import jax
import ml_collections
import numpy as np

from batching.setup import runs, topology
from batching.setup.topology import Topology
from batching.workloads import ops as ops_lib

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Cost:
    """Analytic work of one call: FLOPs, bytes moved to and from memory, weight bytes."""

    flops: float
    bytes: float
    weight_bytes: float


@dataclasses.dataclass
class Workload:
    """A pure function to time and everything the sweep needs to know about it.

    `make_args(batch_size)` returns the call's arguments already on the mesh (inputs split
    over `data`: batch_size is the global batch);
    `carry` = {output index: argument index} feeds outputs back in (a donated cache) between
    calls (the output must have the argument's structure);
    `ops(batch_size)` describes one call as a list of ops (batching.workloads.ops.Op), the one
    source of truth that `cost` (the analytic work), `gemm_shapes` (the call's matrix products as
    (m, k, n, count)) and `attention_shapes` (a decode step's attention over its KV cache)
    are derived from when a workload gives ops; `examples(batch_size)` is the
    number of examples (or tokens) one call processes; `fields` are run-level
    facts that go on every row and into the hparams.
    """

    fn: Callable[..., Any]
    make_args: Callable[[int], Sequence[Any]]
    params: int
    param_bytes: int
    cost: Callable[[int], Cost] | None = None
    donate_argnums: tuple[int, ...] = ()
    carry: dict[int, int] = dataclasses.field(default_factory=dict)
    gemm_shapes: Callable[[int], list[tuple[int, int, int, int]]] | None = None
    # Attention over a KV cache, timed at its own shape by the roofline (peaks.attention_seconds).
    attention_shapes: Callable[[int], list[dict[str, Any]]] | None = None
    # The call's collectives at a batch size, one dict per kind and axis: {"kind":
    # "all_reduce"|"all_to_all"|"all_gather", "axis": mesh axis, "axis_size": devices on it,
    # "bytes": payload per device of ONE collective, "count": how many per call}
    # (batching.workloads.collectives); None or [] when the call communicates nothing.
    collectives: Callable[[int], list[dict[str, Any]]] | None = None
    # Per-point facts measured after the timing, never inside it (MoE routing statistics).
    point_fields: Callable[[int], dict[str, Any]] | None = None
    examples: Callable[[int], int] = lambda batch_size: batch_size
    # What `examples` counts; rows also get `<unit>_per_s` (tokens_per_s for a decoder).
    example_unit: str = "examples"
    # How many ways each mesh axis splits this workload (Topology.parallel_shape); None: the
    # mesh's own shape.
    parallel_shape: dict[str, int] | None = None
    fields: dict[str, Any] = dataclasses.field(default_factory=dict)
    ops: Callable[[int], list[ops_lib.Op]] | None = None

    def __post_init__(self):
        if self.ops is None:
            return
        describe = self.ops
        self.cost = lambda batch_size: cost_of(describe(batch_size))
        self.gemm_shapes = lambda batch_size: ops_lib.gemm_shapes(describe(batch_size))
        attention = lambda batch_size: ops_lib.attention_shapes(describe(batch_size))  # noqa: E731
        self.attention_shapes = lambda batch_size: attention(batch_size) or None


class FlatCall:
    """A workload's call with its arguments as flat arrays in and flat arrays out: what the
    sweep compiles and times.

    jit flattens every pytree argument on every call, and an nnx.State flattens in Python,
    about 3 µs per Variable (vllm-project/tpu-inference measured ~2.3 µs per
    `_variable_flatten` and moved to pre-flattened leaves): a small network timed over its
    State measured the harness (an 8-layer, 64-wide MLP at batch 1: 137 µs against 20 µs).
    Here the arguments are flattened once; `fn(*leaves)` rebuilds the pytrees (and the
    module, in the workload's own fn) inside jit, where it is trace-time work, and returns
    its outputs' leaves (one array as itself, several as a tuple). Per call only jit's C++
    dispatch of a tuple of arrays remains.
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        args: Sequence[Any],
        donate_argnums: tuple[int, ...] = (),
        carry: dict[int, int] | None = None,
    ):
        flat = [jax.tree.flatten(a) for a in args]
        self._in_trees = [tree for _, tree in flat]
        names = _leaf_names(fn, args)
        sizes = [len(leaves) for leaves, _ in flat]
        self._offsets = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
        self.args = tuple(leaf for leaves, _ in flat for leaf in leaves)
        self.donate_argnums = tuple(
            i for a in donate_argnums for i in range(self._offsets[a], self._offsets[a + 1])
        )
        self._carry = dict(carry or {})
        self._out_tree = None
        self._feedback: list[tuple[int, int]] | None = None

        def flat_fn(*leaves):
            structured = [
                jax.tree.unflatten(tree, leaves[self._offsets[i] : self._offsets[i + 1]])
                for i, tree in enumerate(self._in_trees)
            ]
            out_leaves, self._out_tree = jax.tree.flatten(fn(*structured))
            return out_leaves[0] if len(out_leaves) == 1 else tuple(out_leaves)

        # Each leaf's parameter is named after its path in the pytree it came from, so the
        # compiled program's entry parameters keep the Flax module path (the trace reader maps
        # kernels to the lab's ops by it: "state__stages___0__0___conv1____kernel___value").
        flat_fn.__signature__ = inspect.Signature(
            [inspect.Parameter(n, inspect.Parameter.POSITIONAL_ONLY) for n in names]
        )
        self.fn = flat_fn

    def rebind(self, args: Sequence[Any]) -> "FlatCall":
        """The same call (function, structure, feedback) with new arguments of the same
        structure: a point timed again runs the executable already compiled for it."""
        flat = [jax.tree.flatten(a) for a in args]
        if [tree for _, tree in flat] != self._in_trees:
            raise ValueError("FlatCall.rebind: the arguments' structure changed")
        other = copy.copy(self)
        other.args = tuple(leaf for leaves, _ in flat for leaf in leaves)
        return other

    @property
    def next_args(self) -> Callable[[tuple, Any], tuple] | None:
        """`next_args(args, out)`: the arguments with the carried outputs' leaves in place of
        the arguments they feed (None without `carry`). A tuple rebuilt from indices fixed
        once the function has been traced (lowered)."""
        if not self._carry:
            return None
        return self._next_args

    def _next_args(self, args: tuple, out: Any) -> tuple:
        if self._feedback is None:
            self._feedback = self._feedback_pairs()
        out = out if isinstance(out, tuple) else (out,)
        new = list(args)
        for i, j in self._feedback:
            new[i] = out[j]
        return tuple(new)

    def _feedback_pairs(self) -> list[tuple[int, int]]:
        if self._out_tree is None:
            raise RuntimeError("FlatCall.next_args before the call was traced (compiled)")
        outs = self._out_tree.children() if self._out_tree.num_nodes > 1 else [self._out_tree]
        out_offsets = [0]
        for t in outs:
            out_offsets.append(out_offsets[-1] + t.num_leaves)
        pairs = []
        for k, a in self._carry.items():
            if outs[k] != self._in_trees[a]:
                raise ValueError(f"output {k} does not have argument {a}'s structure")
            n = out_offsets[k + 1] - out_offsets[k]
            pairs += [(self._offsets[a] + i, out_offsets[k] + i) for i in range(n)]
        return pairs


def _leaf_names(fn: Callable[..., Any], args: Sequence[Any]) -> list[str]:
    """A distinct identifier per leaf of `args`: fn's argument name and the leaf's key path,
    every other character as "_" (as XLA writes parameter names)."""
    try:
        arg_names = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        arg_names = []
    names, seen = [], set()
    for i, a in enumerate(args):
        base = arg_names[i] if i < len(arg_names) else f"arg{i}"
        for path, _ in jax.tree_util.tree_flatten_with_path(a)[0]:
            name = re.sub(r"\W", "_", base + jax.tree_util.keystr(path))
            if name[0].isdigit() or name in seen:
                name = f"a{len(names)}_{name}"
            seen.add(name)
            names.append(name)
    return names


def normal_input(seed: int, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """Standard-normal input values made on the host with numpy: jax.random would compile
    one program per input shape, 0.1-0.3 s each on a 2-core CPU (3 s of a cold 10-point
    sweep), before the point's own program."""
    values = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
    return values.astype(dtype)


def flat_call(wl: "Workload", batch_size: int) -> FlatCall:
    """The workload's call at `batch_size` with its arguments made and flattened once."""
    return FlatCall(wl.fn, wl.make_args(batch_size), wl.donate_argnums, wl.carry)


def config_of(cls: type[T], model_cfg: Mapping[str, Any] | ml_collections.ConfigDict) -> T:
    """`cls` (a model's config dataclass) from a config's `model` section: each of its fields
    the section has, the others at the dataclass's defaults. Keys that are not fields of `cls`
    (name, phase, tokens, ...) are the workload's own. Bad values raise the dataclass's
    ValueError, which names model.<field>."""
    names = [f.name for f in dataclasses.fields(cls)]
    return cls(**{name: model_cfg[name] for name in names if name in model_cfg})


def cost_of(ops: list[ops_lib.Op]) -> Cost:
    """A call's Cost: the totals of its ops."""
    t = ops_lib.totals(ops)
    return Cost(flops=t.flops, bytes=t.bytes, weight_bytes=t.weight_bytes)


# Modules of this package that are not model families.
NOT_FAMILIES = ("base", "ops", "collectives", "train", "text_data")


def workload_module(name: str) -> types.ModuleType:
    """The module that binds model family `name`; ValueError if there is none."""
    if not isinstance(name, str) or not name.isidentifier() or name in NOT_FAMILIES:
        raise ValueError(f"model.name is not a known model, got {name!r}")
    try:
        return importlib.import_module(f"batching.workloads.{name}")
    except ModuleNotFoundError as e:
        if e.name == f"batching.workloads.{name}":
            raise ValueError(f"model.name is not a known model, got {name!r}") from None
        raise


class Bench:
    """A run's workload family, found by name once, and its topology and workload, each built
    once on first use: what the sweep times and the analysis reads, handed to both."""

    def __init__(self, run: runs.Run):
        self.run = run
        self.module = workload_module(run.config.model.name)
        self._topo: Topology | None = None
        self._workload: Workload | None = None

    @property
    def name(self) -> str:
        """The run's name."""
        return self.run.name

    @property
    def config(self) -> ml_collections.ConfigDict:
        """The run's config."""
        return self.run.config

    @property
    def attend(self) -> Callable[..., Any] | None:
        """The family's attention over its KV cache (`ATTEND`), which the roofline's attention
        microbenchmark times; None for a family without one."""
        return getattr(self.module, "ATTEND", None)

    @property
    def prepares(self) -> bool:
        """Whether the family has a step before timing (`prepare`: training)."""
        return hasattr(self.module, "prepare")

    def topology(self) -> Topology:
        """The run's mesh, built on first use."""
        if self._topo is None:
            self._topo = topology.build(self.run.config)
        return self._topo

    def workload(self, workdir: str) -> Workload:
        """The run's workload on its mesh, built on first use."""
        if self._workload is None:
            self._workload = self.module.build(self.run.config, self.topology(), workdir)
        return self._workload
