"""The MoE decoder as a workload: trained on stdlib bytes first, then a decode step timed.

`prepare` trains the run's model (batching/workloads/train.py). It skips training when the
parameters are already in <workdir>/params/<run>.npz, beside the run's training summary. So an
ablation run is one command, and a rerun resumes without retraining.

The timed call is the plain decode step. After its timing, the workload measures the
routing of a decode step at that batch size. It uses held-out text. B held-out windows are
prefilled, then one step runs. So drop fraction and max/mean load are seen as functions of
the batch size.

Its collectives are the decoder's (batching.workloads.decoder.step_collectives). They are the
tensor-parallel all-reduces and, on an expert axis, two all-to-alls per MoE block.

Letters in array names (models/__init__.py): B batch, V vocab.
"""

import dataclasses
import functools
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
from batching.workloads.family import Family
from models import decoder, decoding

# Its decode step shares the dense decoder's attention over the cache.
ATTEND = decoder_workload.ATTEND


def model_config(
    model_cfg: ml_collections.ConfigDict, topo: Topology | None = None
) -> decoder.DecoderConfig:
    """The model's config from the run's `model` section (train.model_config)."""
    return train.model_config(model_cfg, topo)


def validate(model_cfg: ml_collections.ConfigDict) -> None:
    """Checks the model section: DecoderConfig, phase, and cache_len or prompt_len.

    A bad field raises ValueError naming it as model.<field>.
    """
    decoder_workload.check_phase(model_cfg, model_config(model_cfg))


def validate_run(run_cfg: ml_collections.ConfigDict) -> None:
    """Checks the training fields too (train.validate), before anything is written.

    A run trains before it is timed. So a bad training field must fail first.
    """
    train.validate(run_cfg)


def _summary_path(workdir: str, run: str) -> str:
    return os.path.join(workdir, "params", f"{run}.train_summary.json")


def prepare(
    run_cfg: ml_collections.ConfigDict, run: str, workdir: str, log: train_log.Log | None = None
) -> dict[str, Any]:
    """Trains the run's model unless its parameters and summary exist.

    The training curves go into `log`. Returns the training summary, read from disk when
    training is skipped.
    """
    path = _summary_path(workdir, run)
    if os.path.exists(checkpoint.params_path(workdir, run)) and os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    cfg = run_cfg.copy_and_resolve_references()
    with cfg.unlocked():
        cfg.name = run  # params/<run>.npz and the run's own TensorBoard folder
    summary = train.run(cfg, workdir, log)
    with open(path + ".tmp", "w") as f:
        json.dump(summary, f, indent=2)
    os.replace(path + ".tmp", path)
    return summary


# Trials of the cross-sequence probe per point: each changes every other sequence's token.
PROBE_TRIALS = 32


def cross_sequence_probe(
    step: Any,
    graphdef: nnx.GraphDef,
    params: nnx.State,
    cache: nnx.State,
    tokens_B: jax.Array,
    rng: np.random.Generator,
    vocab: int,
    trials: int = PROBE_TRIALS,
) -> dict[str, Any]:
    """Does a sequence's next-token output depend on the other sequences of its decode step?

    The probe runs `trials` times. Each trial draws one sequence at random and keeps its
    token. Every cache is kept too. The other B - 1 sequences get random next tokens. A
    trial leaks when the kept sequence's logits change at all.

    The kept sequence is drawn, not always the first. Capacity-based routing fills an
    expert's slots in token order (GShard). So the first sequence's first choice is never
    the one dropped. A probe of it alone would read 0 where later ones leak.

    Returns the trials, the fraction that leaked and the largest change in a logit. With
    one sequence there is nothing to change. The fraction and change are then None.

    Each router behaves differently here.

    - Dropless token-choice routes each token by its own logits alone, so it cannot leak.
    - Capacity-based token-choice leaks when other tokens take the slots this one wanted.
      That happens only where its group drops.
    - Expert-choice leaks by construction, since its experts pick among the group's tokens.
      Zhou et al. 2022 (§6) call it unfit for autoregressive decoding as it stands.
    """
    batch = tokens_B.shape[0]
    if batch < 2:
        return {
            "cross_seq_trials": 0,
            "cross_seq_leak_fraction": None,
            "cross_seq_max_change": None,
        }
    base_BxV, _ = step(graphdef, params, cache, tokens_B)
    changes = []
    for _ in range(trials):
        kept = int(rng.integers(0, batch))
        others = jnp.asarray(rng.integers(0, vocab, batch), tokens_B.dtype)
        logits_BxV, _ = step(graphdef, params, cache, others.at[kept].set(tokens_B[kept]))
        changes.append(float(jnp.max(jnp.abs(logits_BxV[kept] - base_BxV[kept]))))
    return {
        "cross_seq_trials": trials,
        "cross_seq_leak_fraction": float(np.mean(np.asarray(changes) > 0)),
        "cross_seq_max_change": float(max(changes)),
    }


def build(run_cfg: ml_collections.ConfigDict, topo: Topology, workdir: str) -> Workload:
    """The MoE decoder's decode step on the run's mesh, with the run's trained params.

    The params are random where none are saved. Each point's routing is measured on
    held-out text, untimed.
    """
    # A decode step's routing groups are the devices' token shards (GShard); 1 on one device.
    cfg = dataclasses.replace(model_config(run_cfg.model, topo), decode_groups=topo.token_shards)
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
    step_stats = jax.jit(functools.partial(decoding.decode_step, stats=True))
    step = jax.jit(decoding.decode_step)

    def point_fields(batch: int) -> dict[str, Any]:
        """Routing of one decode step over `batch` held-out windows, prefilled first.

        It also runs the cross-sequence probe on that step (cross_sequence_probe).
        """
        model.init_cache(batch, length)
        graphdef, _, cache = nnx.split(model, decoder.WEIGHTS, nnx.Cache)
        starts = rng.integers(0, heldout.size - length, batch)
        windows = np.stack([heldout[s : s + length] for s in starts]).astype(np.int32)
        prompt, nxt = jnp.asarray(windows[:, :-1]), jnp.asarray(windows[:, -1])
        lengths = jnp.full((batch,), length - 1, jnp.int32)
        _, cache = prefill(graphdef, params, cache, prompt, lengths)
        _, _, stats = step_stats(graphdef, params, cache, nxt)
        probe_rng = np.random.default_rng([run_cfg.seed, batch])
        probe = cross_sequence_probe(step, graphdef, params, cache, nxt, probe_rng, cfg.vocab_size)
        model.init_cache(1, 1)
        return {
            **moe_workload.mean_stats(jax.device_get(stats), topo.expert_shards),
            "routing_group_size": batch // cfg.decode_groups,
            **probe,
        }

    wl.point_fields = point_fields
    wl.fields.update(
        router=cfg.router,
        num_experts=cfg.num_experts,
        top_k=cfg.top_k,
        capacity_factor=cfg.capacity_factor,
        aux_loss_weight=t.aux_loss_weight,
        aux_loss_scope=t.aux_loss_scope,
        router_bias_update_rate=t.get("router_bias_update_rate", 0.0),
        trained=trained,
        active_params=decoder.num_active_params(cfg),
    )
    return wl


FAMILY = Family(
    "moe_decoder",
    build=build,
    validate=validate,
    validate_run=validate_run,
    prepare=prepare,
    attend=ATTEND,
)
