"""Trained decoder parameters on disk.

One .npz holds the arrays, keyed by their nnx path. A .json beside it holds the model config
they belong to. Each file is written, then renamed.
"""

import dataclasses
import json
import os
from collections.abc import Callable, Mapping

import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from batching.workloads import decoder as decoder_workload
from models import decoder

# Params on disk.


def param_arrays(params: nnx.State) -> dict[str, np.ndarray]:
    """The state's arrays keyed by their nnx path joined with "/" (e.g. blocks/1/mlp/...)."""
    arrays = {}
    for path, leaf in nnx.to_flat_state(params):
        value = leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf
        arrays["/".join(str(part) for part in path)] = np.asarray(value)
    return arrays


def write_atomic(path: str, write: Callable) -> None:
    """Calls `write` on <path>.tmp opened for binary writing, then renames it to `path`."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        write(f)
    os.replace(tmp, path)


def save_params(path: str, params: nnx.State, cfg: decoder.DecoderConfig) -> None:
    """Writes params to `path` (.npz) and cfg to the .json beside it.

    Each is written, then renamed, so a reader never sees a half-written file.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_atomic(path, lambda f: np.savez(f, **param_arrays(params)))
    sidecar = {"model": dataclasses.asdict(cfg), "num_params": decoder.num_params(cfg)}
    text = json.dumps(sidecar, indent=2, sort_keys=True).encode()
    write_atomic(os.path.splitext(path)[0] + ".json", lambda f: f.write(text))


def load_params(
    path: str, model_cfg: decoder.DecoderConfig | Mapping | ml_collections.ConfigDict
) -> nnx.State:
    """Params saved by `save_params`, as an nnx.State of Decoder(model_cfg).

    The state holds decoder.WEIGHTS: the parameters and any routing biases. Restore with
    `nnx.merge(graphdef, load_params(path, cfg))` or `nnx.update(model, ...)`. Arrays are cast
    to model.param_dtype. Routing fields may differ from training's. They are router, top_k,
    capacity_factor and group size. A missing, extra or misshapen array raises ValueError.
    """
    cfg = (
        model_cfg
        if isinstance(model_cfg, decoder.DecoderConfig)
        else decoder_workload.model_config(model_cfg)
    )
    abstract = nnx.eval_shape(lambda: decoder.Decoder(cfg, rngs=nnx.Rngs(0)))
    flat = list(nnx.to_flat_state(nnx.state(abstract, decoder.WEIGHTS)))
    with np.load(path) as npz:
        arrays = {key: npz[key] for key in npz.files}
    keys = {"/".join(str(part) for part in p): p for p, _ in flat}
    missing, extra = sorted(set(keys) - set(arrays)), sorted(set(arrays) - set(keys))
    if missing or extra:
        raise ValueError(
            f"{path} does not fit this model config: missing {missing[:5]}, unexpected "
            f"{extra[:5]} ({len(missing)} and {len(extra)} in all)"
        )
    restored = []
    for p, leaf in flat:
        key = "/".join(str(part) for part in p)
        like = leaf.get_value()
        if arrays[key].shape != like.shape:
            raise ValueError(
                f"{path}: {key} has shape {arrays[key].shape}, this model config wants {like.shape}"
            )
        restored.append((p, leaf.replace(jnp.asarray(arrays[key], like.dtype))))
    return nnx.from_flat_state(restored)


def params_path(workdir: str, name: str) -> str:
    """Where run `name`'s trained params are kept: <workdir>/params/<name>.npz."""
    return os.path.join(workdir, "params", f"{name}.npz")
