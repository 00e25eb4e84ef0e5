"""The MoE decoder as a workload: trained on stdlib bytes first, then a decode step timed.

`prepare` trains the run's model (batching/train.py) unless its parameters are
already in <workdir>/params/<run>.npz, so an ablation run is one command and a
rerun resumes without retraining. The timed call is the plain decode step; after
its timing, the routing statistics of a decode step at that batch size are
measured on held-out text (B held-out windows prefilled, then one step), so drop
fraction and max/mean load are seen as functions of the batch size. Its collectives are
the decoder's (batching.workloads.decoder.step_collectives): the tensor-parallel
all-reduces and, on an expert axis, two all-to-alls per MoE block.
"""

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from batching.setup.topology import Topology
from batching.workloads import checkpoint, text_data, train, train_log
from batching.workloads import decoder as decoder_workload
from batching.workloads import moe as moe_workload
from batching.workloads.base import Workload
from models import decoder, decoding

# Its decode step shares the dense decoder's attention over the cache.
ATTEND = decoder_workload.ATTEND


def model_config(model_cfg: ml_collections.ConfigDict) -> decoder.DecoderConfig:
    """The model's config from the run's `model` section (train.model_config)."""
    return train.model_config(model_cfg)


def validate(model_cfg: ml_collections.ConfigDict) -> None:
    """Checks the model section (DecoderConfig, phase, cache_len or prompt_len); raises ValueError
    naming the bad model.* field."""
    decoder_workload.check_phase(model_cfg, model_config(model_cfg))


def _summary_path(workdir: str, run: str) -> str:
    return os.path.join(workdir, "params", f"{run}.train_summary.json")


def prepare(
    run_cfg: ml_collections.ConfigDict, run: str, workdir: str, log: train_log.Log | None = None
) -> dict[str, Any]:
    """Trains the run's model unless its parameters exist, its curves into `log`; returns the
    training summary."""
    path = _summary_path(workdir, run)
    if os.path.exists(checkpoint.params_path(workdir, run)) and os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    cfg = run_cfg.copy_and_resolve_references()
    with cfg.unlocked():
        cfg.name = run  # params/<run>.npz and the run's own TensorBoard folder
    summary = train.run(cfg, workdir, log)
    summary["cross_sequence_logit_change"] = cross_sequence_dependence(run_cfg, workdir, run)
    with open(path + ".tmp", "w") as f:
        json.dump(summary, f, indent=2)
    os.replace(path + ".tmp", path)
    return summary


def cross_sequence_dependence(run_cfg: ml_collections.ConfigDict, workdir: str, run: str) -> float:
    """Largest change in sequence 0's decode logits when only sequence 1's token changes.

    Zero means a sequence's next token depends on itself alone (token-choice without
    drops); expert-choice routes the step's tokens as one group, so it is not zero (C8).
    Sixteen replacement tokens are tried on a batch of eight, taking the largest change.
    """
    cfg = model_config(run_cfg.model)
    model = decoder_workload.abstract_decoder(cfg)
    nnx.update(model, checkpoint.load_params(checkpoint.params_path(workdir, run), cfg))
    model.init_cache(8, 16)
    graphdef, params, cache = nnx.split(model, nnx.Param, nnx.Cache)
    step = jax.jit(decoding.decode_step)
    base = jnp.asarray(np.frombuffer(b"def main", np.uint8).astype(np.int32))
    logits_a, _ = step(graphdef, params, cache, base)
    change = 0.0
    for token in range(0, 256, 16):
        logits_b, _ = step(graphdef, params, cache, base.at[1].set(token))
        change = max(change, float(jnp.max(jnp.abs(logits_a[0] - logits_b[0]))))
    return change


def build(run_cfg: ml_collections.ConfigDict, topo: Topology, workdir: str) -> Workload:
    """The MoE decoder's decode step on the run's mesh, with the run's trained params (random where
    none are saved); each point's routing is measured on held-out text, untimed."""
    # A decode step's routing groups are the devices' token shards (GShard); 1 on one device.
    cfg = dataclasses.replace(model_config(run_cfg.model), decode_groups=topo.token_shards)
    path = checkpoint.params_path(workdir, run_cfg.run_name) if workdir else ""
    params = checkpoint.load_params(path, cfg) if path and os.path.exists(path) else None
    t = run_cfg.train
    heldout = text_data.load_split(t.max_text_bytes, t.heldout_fraction).heldout
    if params is None:
        params = decoder_workload.random_params(cfg, run_cfg.seed)
        trained = False
    else:
        trained = True
    wl = decoder_workload.build_decoder(run_cfg, cfg, topo, params, tokens=heldout)
    model = decoder_workload.abstract_decoder(cfg)
    length = run_cfg.model.cache_len
    rng = np.random.default_rng(run_cfg.seed)
    prefill = jax.jit(decoding.prefill)
    step_stats = jax.jit(decoding.decode_step_with_stats)

    def point_fields(batch: int) -> dict[str, Any]:
        """Routing of one decode step over `batch` held-out windows, prefilled first."""
        model.init_cache(batch, length)
        graphdef, _, cache = nnx.split(model, nnx.Param, nnx.Cache)
        starts = rng.integers(0, heldout.size - length, batch)
        windows = np.stack([heldout[s : s + length] for s in starts]).astype(np.int32)
        prompt, nxt = jnp.asarray(windows[:, :-1]), jnp.asarray(windows[:, -1])
        lengths = jnp.full((batch,), length - 1, jnp.int32)
        _, cache = prefill(graphdef, params, cache, prompt, lengths)
        _, _, stats = step_stats(graphdef, params, cache, nxt)
        model.init_cache(1, 1)
        return {
            **moe_workload.mean_stats(jax.device_get(stats), topo.expert_shards),
            "routing_group_size": batch // cfg.decode_groups,
        }

    wl.point_fields = point_fields
    wl.fields.update(
        router=cfg.router,
        num_experts=cfg.num_experts,
        top_k=cfg.top_k,
        capacity_factor=cfg.capacity_factor,
        aux_loss_weight=t.aux_loss_weight,
        aux_loss_scope=t.aux_loss_scope,
        trained=trained,
        active_params=decoder.num_active_params(cfg),
    )
    return wl
