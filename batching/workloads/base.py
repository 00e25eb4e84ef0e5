"""What the sweep times: a model bound to its inputs, costs and run-level facts.

A model family (batching.workloads.family.Family) builds a Workload for a run:
`build(run_cfg, topo, workdir)`. `topo` is the run's batching.setup.topology.Topology. The
workload places its parameters and inputs on its mesh. `workdir` holds files an earlier
step wrote, such as trained parameters. A workload without a hand-written op list gets one
from its compiled program (batching.measure.hlo_ops).
"""

import copy
import dataclasses
import inspect
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import jax
import ml_collections
import numpy as np

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

    Each field has its meaning in a comment above it. A workload that gives `ops` gets
    `cost`, `gemm_shapes` and `attention_shapes` derived from them. So one list of ops is
    the single source of truth for a call.
    """

    # The pure function the sweep times.
    fn: Callable[..., Any]
    # The call's arguments at a global batch size, already on the mesh.
    # Inputs are split over the `data` axis.
    make_args: Callable[[int], Sequence[Any]]
    # How many parameters the model has.
    params: int
    # The parameters' size in bytes.
    param_bytes: int
    # The analytic work of one call at a batch size.
    cost: Callable[[int], Cost] | None = None
    # Arguments whose buffers the call may reuse for its outputs.
    donate_argnums: tuple[int, ...] = ()
    # {output index: argument index}: outputs fed back in between calls, such as a cache.
    # The output must have the argument's structure.
    carry: dict[int, int] = dataclasses.field(default_factory=dict)
    # The call's matrix products as (m, k, n, count).
    gemm_shapes: Callable[[int], list[tuple[int, int, int, int]]] | None = None
    # Attention over a KV cache, one dict per shape.
    # The roofline times each at its own shape (peaks.attention_seconds).
    attention_shapes: Callable[[int], list[dict[str, Any]]] | None = None
    # The call's collectives, one dict per kind and axis (batching.workloads.collectives).
    # Keys: "kind" (all_reduce, all_to_all or all_gather), "axis" and "axis_size".
    # "bytes" is one collective's payload per device; "count" is how many per call.
    # None or [] when the call communicates nothing.
    collectives: Callable[[int], list[dict[str, Any]]] | None = None
    # Per-point facts measured after the timing, never inside it (MoE routing statistics).
    point_fields: Callable[[int], dict[str, Any]] | None = None
    # How many examples (or tokens) one call processes.
    examples: Callable[[int], int] = lambda batch_size: batch_size
    # What `examples` counts; rows also get `<unit>_per_s` (tokens_per_s for a decoder).
    example_unit: str = "examples"
    # How many ways each mesh axis splits this workload (Topology.parallel_shape).
    # None means the mesh's own shape.
    parallel_shape: dict[str, int] | None = None
    # Run-level facts for every row and the hparams.
    fields: dict[str, Any] = dataclasses.field(default_factory=dict)
    # One call as a list of ops (batching.workloads.ops.Op).
    # None: the ops are read from each point's compiled program (batching.measure.hlo_ops).
    ops: Callable[[int], list[ops_lib.Op]] | None = None
    # The arguments that hold weights; their bytes are weight bytes in program-read ops.
    weight_args: tuple[int, ...] = (0,)

    def __post_init__(self):
        if self.ops is None:
            return
        describe = self.ops
        self.cost = lambda batch_size: cost_of(describe(batch_size))
        self.gemm_shapes = lambda batch_size: ops_lib.gemm_shapes(describe(batch_size))
        attention = lambda batch_size: ops_lib.attention_shapes(describe(batch_size))  # noqa: E731
        self.attention_shapes = lambda batch_size: attention(batch_size) or None


class FlatCall:
    """A workload's call taking flat arrays and returning flat arrays.

    This is what the sweep compiles and times. jit flattens every pytree argument on every
    call. An nnx.State flattens in Python, one Variable at a time.
    vllm-project/tpu-inference measured ~2.3 µs per `_variable_flatten` call. They moved to
    pre-flattened leaves for that reason. Timed over its State, a small network's time is
    mostly the harness. `experiments/harness_overhead.py` measures this. Here the arguments
    are flattened once. `fn(*leaves)` rebuilds the pytrees inside jit, at trace time. The
    workload's own fn rebuilds the module there too. It returns its outputs' leaves. One
    array comes back as itself, several as a tuple. Per call, only jit's C++ dispatch of a
    tuple of arrays remains.
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
        self.names = names
        sizes = [len(leaves) for leaves, _ in flat]
        self._offsets = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
        self.args = tuple(leaf for leaves, _ in flat for leaf in leaves)
        self._nbytes = [int(getattr(leaf, "nbytes", 0)) for leaf in self.args]
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

        # Each leaf's parameter is named after its path in its pytree. So the compiled
        # program's entry parameters keep the Flax module path. The trace reader maps
        # kernels to the lab's ops by it: "state__stages___0__0___conv1____kernel___value".
        flat_fn.__signature__ = inspect.Signature(
            [inspect.Parameter(n, inspect.Parameter.POSITIONAL_ONLY) for n in names]
        )
        self.fn = flat_fn

    def leaf_names(self, argnums: Sequence[int]) -> set[str]:
        """The names of the leaves of arguments `argnums`, as the program's parameters."""
        return {
            self.names[i]
            for a in argnums
            if a + 1 < len(self._offsets)
            for i in range(self._offsets[a], self._offsets[a + 1])
        }

    def leaf_bytes(self, argnums: Sequence[int]) -> int:
        """Bytes of the leaves of arguments `argnums`, each array once."""
        return sum(
            self._nbytes[i]
            for a in argnums
            if a + 1 < len(self._offsets)
            for i in range(self._offsets[a], self._offsets[a + 1])
        )

    def rebind(self, args: Sequence[Any]) -> "FlatCall":
        """The same call with new arguments of the same structure.

        Function, structure and feedback are kept. So a point timed again runs the
        executable already compiled for it.
        """
        flat = [jax.tree.flatten(a) for a in args]
        if [tree for _, tree in flat] != self._in_trees:
            raise ValueError("FlatCall.rebind: the arguments' structure changed")
        other = copy.copy(self)
        other.args = tuple(leaf for leaves, _ in flat for leaf in leaves)
        return other

    @property
    def next_args(self) -> Callable[[tuple, Any], tuple] | None:
        """`next_args(args, out)`: the arguments, with carried outputs in their places.

        Each carried output's leaves replace the leaves of the argument it feeds. It is None
        without `carry`. The tuple is rebuilt from indices fixed once the function is traced.
        """
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
    """A distinct identifier per leaf of `args`.

    It joins fn's argument name and the leaf's key path. Every other character becomes "_",
    as XLA writes parameter names.
    """
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
    """Standard-normal input values, made on the host with numpy.

    jax.random would compile one program per input shape. That compile comes before the
    point's own program, and adds up over a cold sweep.
    """
    values = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
    return values.astype(dtype)


def flat_call(wl: "Workload", batch_size: int) -> FlatCall:
    """The workload's call at `batch_size` with its arguments made and flattened once."""
    return FlatCall(wl.fn, wl.make_args(batch_size), wl.donate_argnums, wl.carry)


def config_of(cls: type[T], model_cfg: Mapping[str, Any] | ml_collections.ConfigDict) -> T:
    """`cls`, a model's config dataclass, built from a config's `model` section.

    Fields the section sets take its values. The others keep the dataclass's defaults. Keys
    that are not fields of `cls` belong to the workload (name, phase, tokens, ...). A bad
    value raises the dataclass's ValueError, which names model.<field>.
    """
    names = [f.name for f in dataclasses.fields(cls)]
    return cls(**{name: model_cfg[name] for name in names if name in model_cfg})


def cost_of(ops: list[ops_lib.Op]) -> Cost:
    """A call's Cost: the totals of its ops."""
    t = ops_lib.totals(ops)
    return Cost(flops=t.flops, bytes=t.bytes, weight_bytes=t.weight_bytes)
