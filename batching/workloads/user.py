"""A model from outside the lab as a workload: a Flax NNX module or a function of arrays.

`inputs(batch_size)` returns the call's arguments. Each argument's batch axis is its leading
one, unless `batch_axes` says otherwise. `batch_axes` is one int for every argument, or one
entry per argument: an int, or None for an argument without a batch axis (weights).

- A module is split once. Its state is the call's first argument, placed on the mesh by
  its logical axis names. It is timed through the same flat call as the lab's families.
- A function's arguments without a batch axis are its weights.

The workload has no hand-written op list. Its ops are read from each point's compiled
program (batching.measure.hlo_ops).
"""

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from batching.setup.topology import Topology, mesh_axes
from batching.workloads.base import Workload
from batching.workloads.family import Family

# Batch sizes at which the inputs are checked before any timing.
CHECK_SIZES = (1, 2)


def axes_of(args: Sequence[Any], batch_axes: Any) -> list[int | None]:
    """Each argument's batch axis; ValueError naming `batch_axes` if it does not fit."""
    if isinstance(batch_axes, int) and not isinstance(batch_axes, bool):
        return [batch_axes] * len(args)
    ok = lambda a: a is None or (isinstance(a, int) and not isinstance(a, bool))  # noqa: E731
    fits = isinstance(batch_axes, (tuple, list)) and len(batch_axes) == len(args)
    if fits and all(ok(a) for a in batch_axes):
        return list(batch_axes)
    raise ValueError(
        f"batch_axes must be an int or one int or None per argument ({len(args)}), "
        f"got {batch_axes!r}"
    )


def check_inputs(inputs: Callable[[int], Any], batch_axes: Any) -> None:
    """Checks `inputs` at CHECK_SIZES before anything is timed.

    Each must be a tuple of arrays (or pytrees of arrays) whose batch axes grow with the
    batch size. A problem raises a ValueError that says which.
    """
    seen = []
    for b in CHECK_SIZES:
        try:
            args = as_args(inputs(b))
        except Exception as e:  # noqa: BLE001 - a user's inputs may raise anything
            raise ValueError(f"inputs({b}) raised {type(e).__name__}: {e}") from None
        sizes = []
        for i, (arg, axis) in enumerate(zip(args, axes_of(args, batch_axes), strict=False)):
            for leaf in jax.tree.leaves(arg):
                if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
                    raise ValueError(f"inputs({b}): argument {i} holds a {type(leaf).__name__}, "
                                     "not an array")  # fmt: skip
                if axis is None:
                    continue
                if axis >= np.ndim(leaf) or leaf.shape[axis] % b:
                    raise ValueError(
                        f"inputs({b}): argument {i} has shape {tuple(leaf.shape)}, whose axis "
                        f"{axis} does not follow batch_size={b} (set batch_axes)"
                    )
                sizes.append(leaf.shape[axis] // b)
        seen.append(sizes)
    if seen[0] != seen[1]:
        raise ValueError(
            f"inputs: the batch axes do not grow with batch_size ({CHECK_SIZES[0]}: "
            f"{seen[0]} per example, {CHECK_SIZES[1]}: {seen[1]}; set batch_axes)"
        )


def as_args(made: Any) -> tuple:
    """The call's arguments: a tuple or list as they are, anything else as one argument."""
    return tuple(made) if isinstance(made, (tuple, list)) else (made,)


def check_outputs(fn: Callable[..., Any], args: Sequence[Any]) -> None:
    """Traces `fn` (no compile, no run); ValueError if it raises or returns other than arrays."""
    try:
        out = jax.eval_shape(fn, *args)
    except Exception as e:  # noqa: BLE001 - a user's model may raise anything
        raise ValueError(f"the model raised on its inputs: {type(e).__name__}: {e}") from None
    for leaf in jax.tree.leaves(out):
        if not isinstance(leaf, jax.ShapeDtypeStruct):
            raise ValueError(f"the model returns a {type(leaf).__name__}, not arrays")


def build(
    model: Any, inputs: Callable[[int], Any], topo: Topology, batch_axes: Any = 0,
    fields: Mapping[str, Any] | None = None,
) -> Workload:  # fmt: skip
    """The workload of a user's module or function on the run's mesh."""
    if isinstance(model, nnx.Module):
        graphdef, state = nnx.split(model)
        state = topo.put_state(state)

        def forward(state, *args):
            with topo.activate():
                return nnx.merge(graphdef, state)(*args)

        weights: list[Any] = [state]
        lead: tuple = (state,)
        split_model = splits_model(state, topo)
    elif callable(model):
        forward, lead, weights, split_model = model, (), [], False
    else:
        raise ValueError(f"model must be an nnx.Module or a function, got {type(model).__name__}")

    def make_args(batch_size: int):
        args = as_args(inputs(batch_size))
        return lead + tuple(
            place(topo, a, axis) for a, axis in zip(args, axes_of(args, batch_axes), strict=False)
        )

    first = as_args(inputs(CHECK_SIZES[0]))
    axes = axes_of(first, batch_axes)
    weights += [a for a, axis in zip(first, axes, strict=False) if axis is None]
    leaves = jax.tree.leaves(weights)
    offset = len(lead)
    return Workload(
        fn=forward,
        make_args=make_args,
        params=int(sum(np.size(x) for x in leaves)),
        param_bytes=int(sum(np.size(x) * np.dtype(x.dtype).itemsize for x in leaves)),
        weight_args=tuple(range(offset))
        + tuple(offset + i for i, a in enumerate(axes) if a is None),
        parallel_shape=topo.parallel_shape(experts=False, model=split_model),
        fields={
            "dtype": float_dtype(leaves or first),
            "param_dtype": float_dtype(leaves),
            **(fields or {}),
        },  # fmt: skip
    )


def splits_model(state: Any, topo: Topology) -> bool:
    """Whether any placed weight is split over the mesh axes that `mlp` or `heads` map to.

    A module whose Variables name no such logical axes holds a full copy on every device.
    The mesh's model axis then only replicates it.
    """
    axes = set(mesh_axes(topo.axis_rules, "mlp")) | set(mesh_axes(topo.axis_rules, "heads"))
    for leaf in jax.tree.leaves(state):
        for entry in getattr(getattr(leaf, "sharding", None), "spec", ()) or ():
            names = entry if isinstance(entry, tuple) else (entry,)
            if axes.intersection(n for n in names if n is not None):
                return True
    return False


def float_dtype(tree: Any) -> str | None:
    """The dtype of a pytree's first floating-point leaf, or None."""
    for leaf in jax.tree.leaves(tree):
        if np.issubdtype(np.dtype(leaf.dtype), np.floating) or str(leaf.dtype) == "bfloat16":
            return str(np.dtype(leaf.dtype)) if str(leaf.dtype) != "bfloat16" else "bfloat16"
    return None


def place(topo: Topology, arg: Any, axis: int | None) -> Any:
    """An argument on the mesh: split over `data` along its batch axis, else replicated."""

    def put(x):
        logical = [None] * np.ndim(x)
        if axis is not None:
            logical[axis] = "batch"
        return topo.put(x, tuple(logical))

    return jax.tree.map(put, arg)


def family(
    make: Callable[[ml_collections.ConfigDict], tuple[Any, Callable[[int], Any]]],
    name: str | None = None,
    fields: Mapping[str, Any] | None = None,
    batch_axes: Any = 0,
) -> Family:
    """A Family from `make(model_cfg) -> (model, inputs)`, owning `fields` at their defaults.

    Its check builds the model and checks its inputs and outputs, before any timing. The
    run's build reuses that model when its fields are the same: `make` runs once per run.
    """
    label = name or getattr(make, "__name__", "model")
    last: dict[str, Any] = {}

    def made(model_cfg):
        key = json.dumps(model_cfg.to_dict(), sort_keys=True, default=repr)
        if key in last:
            return last[key]
        try:
            result = make(model_cfg)
        except Exception as e:  # noqa: BLE001 - a user's factory may raise anything
            raise ValueError(f"model.factory raised {type(e).__name__}: {e}") from None
        last.clear()
        last[key] = result
        return result

    def validate(model_cfg):
        result = made(model_cfg)
        if not isinstance(result, tuple) or len(result) != 2 or not callable(result[1]):
            raise ValueError("model.factory must return (model, inputs), inputs a function")
        model, inputs = result
        check_inputs(inputs, batch_axes)
        args = as_args(inputs(CHECK_SIZES[0]))
        if isinstance(model, nnx.Module):
            graphdef, state = nnx.split(model)
            check_outputs(lambda s, *a: nnx.merge(graphdef, s)(*a), (state, *args))
        elif callable(model):
            check_outputs(model, args)
        else:
            raise ValueError(
                f"model must be an nnx.Module or a function, got {type(model).__name__}"
            )

    def build_run(run_cfg, topo, workdir):
        del workdir
        model, inputs = made(run_cfg.model)
        return build(model, inputs, topo, batch_axes, {"factory": run_cfg.model.get("factory")})

    return Family(label, build=build_run, validate=validate, fields=dict(fields or {}))


def factory_family(make: Callable[..., Any], path: str) -> Family:
    """The Family of a bare `make` function found at import path `path`."""
    return family(make, name=path.split(":")[0].rsplit(".", 1)[-1])
