"""Trains a small MoE decoder on standard-library bytes and logs its routing to TensorBoard.

    from batching.outputs.tensorboard import EventLog
    from batching.workloads import train
    from configs import moe_decoder
    config = moe_decoder.get_config("expert_choice")
    summary = train.run(config, "/tmp/moe", EventLog("/tmp/moe", config.name))

Loss = mean cross-entropy + train.aux_loss_weight * (load-balancing loss averaged over MoE
layers; train.aux_loss_scope picks the per-group or the global-batch one, AUX_LOSS_STAT)
+ train.z_loss_weight * (z-loss averaged over MoE layers); adamw with a warmup and an
optional cosine decay. The train step is a pure function of (params, opt_state, batch) over
`nnx.split`, jitted with params and optimizer state donated.

Outputs under workdir, and through `log` (the lab's TensorBoard writer hands training an
`EventLog`: <workdir>/tb/<name>/, file suffix .train) the curves train/*, moe/*, eval/*:
  params/<name>.npz     trained params, one array per nnx path joined by "/"
  params/<name>.json    the model config they belong to (DecoderConfig fields)
  train_summary.json    the dict `run` returns

Routing statistics (models.routers.routing_stats) are logged as `moe/<stat>`, the mean over
MoE layers, and `moe/layer_<i>/<stat>` with i the block index. Held-out ones are means over
a fixed set of held-out batches of each batch's statistic, under `eval/`.

Letters in array names: B batch, L length, V vocab.
"""

import contextlib
import dataclasses
import json
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from batching.workloads import base, text_data
from batching.workloads.checkpoint import params_path, save_params, write_atomic
from batching.workloads.train_log import Log, NoLog, write_routing
from models import decoder, decoding
from models.routers import SCALAR_STATS

SCHEDULES = ("cosine", "constant")
# train.aux_loss_scope -> the routing statistic that is the trained load-balancing loss:
# "group" balances within each routing group (GShard/Switch/flaxformer/MaxText), "batch" over
# the pooled global batch (Qwen 2025 "Demons in the Detail", OLMo-core). See routers.routing_stats.
AUX_LOSS_STAT = {"group": "aux_loss", "batch": "aux_loss_batch"}
SUMMARY_FILE = "train_summary.json"

Batch = tuple[np.ndarray, np.ndarray]
Stats = dict[str, Any]


# Config.


def model_config(model_cfg: Mapping | ml_collections.ConfigDict) -> decoder.DecoderConfig:
    """The DecoderConfig fields present in `model_cfg` (base.config_of); other keys (name,
    phase, ...) are ignored and missing ones keep their defaults."""
    return base.config_of(decoder.DecoderConfig, model_cfg)


def _check_int(name: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_float(name: str, value: Any, positive: bool) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not np.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if (positive and not value > 0) or value < 0:
        raise ValueError(f"{name} must be {'> 0' if positive else '>= 0'}, got {value!r}")


def validate(config: ml_collections.ConfigDict) -> decoder.DecoderConfig:
    """Checks the fields training reads; returns the model config. Raises ValueError naming
    the bad field (config.train.*, config.name, config.seed or model.*)."""
    t = config.get("train")
    if t is None:
        raise ValueError("config.train is missing: see configs/moe_decoder.py for its fields")
    ints = {"steps": 1, "batch_size": 1, "seq_len": 1, "warmup_steps": 0, "log_every": 1}
    ints |= {"eval_every": 1, "eval_batches": 1, "max_text_bytes": 1}
    floats = {"learning_rate": True, "weight_decay": False, "grad_clip_norm": False}
    floats |= {"aux_loss_weight": False, "z_loss_weight": False, "heldout_fraction": True}
    for name in [*ints, *floats, "schedule", "aux_loss_scope"]:
        if name not in t:
            raise ValueError(f"config.train.{name} is missing")
    for name, minimum in ints.items():
        _check_int(f"config.train.{name}", t[name], minimum)
    for name, positive in floats.items():
        _check_float(f"config.train.{name}", t[name], positive)
    if t.warmup_steps >= t.steps:
        raise ValueError(
            f"config.train.warmup_steps must be < config.train.steps={t.steps}, "
            f"got {t.warmup_steps}"
        )
    if not t.heldout_fraction < 1:
        raise ValueError(
            f"config.train.heldout_fraction must lie in (0, 1), got {t.heldout_fraction!r}"
        )
    if t.aux_loss_scope not in AUX_LOSS_STAT:
        raise ValueError(
            f"config.train.aux_loss_scope must be one of {list(AUX_LOSS_STAT)}, "
            f"got {t.aux_loss_scope!r}"
        )
    if t.schedule not in SCHEDULES:
        raise ValueError(f"config.train.schedule must be one of {SCHEDULES}, got {t.schedule!r}")
    _check_int("config.seed", config.get("seed"), 0)
    name = config.get("name")
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name:
        raise ValueError(f"config.name must be a plain file name, got {name!r}")
    cfg = model_config(config.model)
    if cfg.vocab_size < text_data.VOCAB_SIZE:
        raise ValueError(
            f"model.vocab_size must be >= {text_data.VOCAB_SIZE} for byte-level text, "
            f"got {cfg.vocab_size}"
        )
    if t.seq_len > cfg.max_seq_len:
        raise ValueError(
            f"config.train.seq_len must be <= model.max_seq_len={cfg.max_seq_len}, got {t.seq_len}"
        )
    if cfg.moe_group_size and (t.batch_size * t.seq_len) % cfg.moe_group_size:
        raise ValueError(
            f"model.moe_group_size={cfg.moe_group_size} must divide config.train.batch_size * "
            f"config.train.seq_len = {t.batch_size * t.seq_len}"
        )
    return cfg


# Optimizer, loss and steps.


def make_optimizer(t: ml_collections.ConfigDict) -> tuple[optax.GradientTransformation, Callable]:
    """adamw (b2 0.95, decay on matrices only) after optional global-norm clipping; returns
    (optimizer, learning-rate schedule of the step count)."""
    lr, warmup = t.learning_rate, t.warmup_steps
    if t.schedule == "cosine":
        decay = optax.cosine_decay_schedule(lr, t.steps - warmup, alpha=0.1)
    else:
        decay = optax.constant_schedule(lr)
    schedule = decay
    if warmup:
        ramp = optax.linear_schedule(lr / warmup, lr, warmup)
        schedule = optax.join_schedules([ramp, decay], [warmup])
    # Norm scales stay out of weight decay: decaying them towards 0 fights the normalisation.
    matrices = lambda params: jax.tree.map(lambda x: x.ndim > 1, params)
    adamw = optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=t.weight_decay, mask=matrices)
    if t.grad_clip_norm:
        return optax.chain(optax.clip_by_global_norm(t.grad_clip_norm), adamw), schedule
    return adamw, schedule


def _layer_mean(stats: list[Stats], key: str) -> jax.Array:
    if not stats:
        return jnp.zeros((), jnp.float32)
    return jnp.mean(jnp.stack([s[key] for s in stats]))


def loss_fn(
    params: nnx.State,
    graphdef: nnx.GraphDef,
    batch: Batch,
    aux_loss_weight: float,
    z_loss_weight: float,
    aux_loss_scope: str = "group",
) -> tuple[jax.Array, tuple[jax.Array, list[Stats]]]:
    """(total loss, (mean cross-entropy in nats per byte, routing stats per MoE layer)).

    The aux term is the routing statistic AUX_LOSS_STAT[aux_loss_scope]."""
    inputs_BxL, targets_BxL = batch
    logits_BxLxV, stats = decoding.forward_with_stats(graphdef, params, inputs_BxL)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV, targets_BxL).mean()
    aux = _layer_mean(stats, AUX_LOSS_STAT[aux_loss_scope])
    z = _layer_mean(stats, "z_loss")
    return ce + aux_loss_weight * aux + z_loss_weight * z, (ce, stats)


def make_train_step(
    graphdef: nnx.GraphDef,
    optimizer: optax.GradientTransformation,
    aux_loss_weight: float,
    z_loss_weight: float,
    aux_loss_scope: str = "group",
) -> Callable:
    """jit of step(params, opt_state, batch) -> (params, opt_state, metrics, stats); params
    and opt_state are donated."""

    def step(params: nnx.State, opt_state: optax.OptState, batch: Batch):
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, (ce, stats)), grads = grad_fn(
            params, graphdef, batch, aux_loss_weight, z_loss_weight, aux_loss_scope
        )
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = {"loss": loss, "ce_loss": ce, "grad_norm": optax.global_norm(grads)}
        return params, opt_state, metrics, stats

    return jax.jit(step, donate_argnums=(0, 1))


def make_eval_step(graphdef: nnx.GraphDef) -> Callable:
    """jit of eval(params, batch) -> (mean cross-entropy, routing stats per MoE layer)."""

    def step(params: nnx.State, batch: Batch):
        _, (ce, stats) = loss_fn(params, graphdef, batch, 0.0, 0.0)
        return ce, stats

    return jax.jit(step)


def evaluate(
    eval_step: Callable, params: nnx.State, batches: list[Batch]
) -> tuple[float, list[Stats]]:
    """Held-out loss and per-layer stats over `batches`: scalar stats are means over batches
    of each batch's value; tokens_per_expert is summed and experts_per_token concatenated."""
    losses, per_batch = [], []
    for batch in batches:
        loss, stats = jax.device_get(eval_step(params, batch))
        losses.append(float(loss))
        per_batch.append(stats)
    layers = []
    for i in range(len(per_batch[0])):
        runs = [stats[i] for stats in per_batch]
        layer = {key: float(np.mean([s[key] for s in runs])) for key in SCALAR_STATS}
        layer["tokens_per_expert"] = np.sum([s["tokens_per_expert"] for s in runs], axis=0)
        layer["experts_per_token"] = np.concatenate([s["experts_per_token"] for s in runs])
        layers.append(layer)
    return float(np.mean(losses)), layers


def heldout_batches(
    split: text_data.TextSplit, t: ml_collections.ConfigDict, seed: int
) -> list[Batch]:
    """The fixed held-out batches every evaluation of a run uses: train.eval_batches batches
    of train.batch_size x train.seq_len, drawn from a generator of their own."""
    rng = np.random.default_rng([seed, 1])
    return [
        text_data.sample_batch(split.heldout, t.batch_size, t.seq_len, rng)
        for _ in range(t.eval_batches)
    ]


# The run.


def _layer_summary(layer: Stats) -> dict[str, Any]:
    out = {key: layer[key] for key in SCALAR_STATS}
    out["tokens_per_expert"] = [float(x) for x in layer["tokens_per_expert"]]
    return out


@dataclasses.dataclass
class Trainer:
    """What a training run's loop needs: the compiled steps, the data and the schedule."""

    cfg: decoder.DecoderConfig
    layers: tuple[int, ...]
    split: text_data.TextSplit
    train_step: Callable
    eval_step: Callable
    schedule: Callable
    eval_batches: list[Batch]


def make_trainer(config: ml_collections.ConfigDict, cfg: decoder.DecoderConfig):
    """(the trainer, initial params, initial optimizer state) of a validated config."""
    t = config.train
    split = text_data.load_split(t.max_text_bytes, t.heldout_fraction)
    abstract = nnx.eval_shape(lambda: decoder.Decoder(cfg, rngs=nnx.Rngs(0)))
    graphdef, _ = nnx.split(abstract, nnx.Param)
    # One jitted init instead of one eager compile per weight shape.
    params = jax.jit(
        lambda: nnx.state(decoder.Decoder(cfg, rngs=nnx.Rngs(config.seed)), nnx.Param)
    )()
    optimizer, schedule = make_optimizer(t)
    opt_state = jax.jit(optimizer.init)(params)
    trainer = Trainer(
        cfg=cfg,
        layers=decoder.moe_layers(cfg),
        split=split,
        train_step=make_train_step(
            graphdef, optimizer, t.aux_loss_weight, t.z_loss_weight, t.aux_loss_scope
        ),
        eval_step=make_eval_step(graphdef),
        schedule=schedule,
        eval_batches=heldout_batches(split, t, config.seed),
    )
    return trainer, params, opt_state


def train_loop(config: ml_collections.ConfigDict, trainer: Trainer, params, opt_state, log: Log):
    """train.steps steps, logging every train.log_every and evaluating every
    train.eval_every (and at the last step); returns (params, last metrics, held-out loss,
    held-out per-layer stats)."""
    t, cfg = config.train, trainer.cfg
    rng = np.random.default_rng(config.seed)
    precision = config.model.get("matmul_precision", "default")
    ctx = (
        jax.default_matmul_precision(precision)
        if precision != "default"
        else contextlib.nullcontext()
    )
    with ctx:
        for step in range(1, t.steps + 1):
            batch = text_data.sample_batch(trainer.split.train, t.batch_size, t.seq_len, rng)
            params, opt_state, metrics, stats = trainer.train_step(params, opt_state, batch)
            if step % t.log_every == 0 or step in (1, t.steps):
                metrics, stats = jax.device_get((metrics, stats))
                for key, value in metrics.items():
                    log.scalar(f"train/{key}", float(value), step)
                log.scalar("train/learning_rate", float(trainer.schedule(step - 1)), step)
                write_routing(log, "", stats, trainer.layers, step, cfg.router)
            if step % t.eval_every == 0 or step == t.steps:
                heldout_loss, heldout = evaluate(trainer.eval_step, params, trainer.eval_batches)
                log.scalar("eval/loss", heldout_loss, step)
                write_routing(log, "eval/", heldout, trainer.layers, step, cfg.router)
    return params, metrics, heldout_loss, heldout


def run(config: ml_collections.ConfigDict, workdir: str, log: Log | None = None) -> dict[str, Any]:
    """Trains config.model on stdlib bytes per config.train, its curves into `log` (none by
    default); returns the summary it also writes to <workdir>/train_summary.json.

    Summary: train_loss / train_ce_loss (last step), heldout_loss (nats per byte),
    heldout_stats (each routing scalar averaged over MoE layers; tokens_per_expert a list of
    per-layer lists of E counts summed over the held-out batches), heldout_stats_per_layer,
    steps, seconds (whole run) and train_seconds (the step loop, compiles and evals included).
    """
    t0 = time.perf_counter()
    cfg = validate(config)
    log = log if log is not None else NoLog()
    trainer, params, opt_state = make_trainer(config, cfg)
    log.text("config", "```\n" + config.to_json_best_effort(indent=2) + "\n```", 0)
    loop_start = time.perf_counter()
    try:
        params, metrics, heldout_loss, heldout = train_loop(config, trainer, params, opt_state, log)
        train_seconds = time.perf_counter() - loop_start
    finally:
        log.close()
    path = params_path(workdir, config.name)
    save_params(path, params, cfg)
    summary = {
        "name": config.name,
        "router": cfg.router,
        "top_k": cfg.top_k,
        "steps": config.train.steps,
        "train_loss": float(metrics["loss"]),
        "train_ce_loss": float(metrics["ce_loss"]),
        "heldout_loss": heldout_loss,
        **heldout_summary(trainer.layers, heldout),
        "num_params": decoder.num_params(cfg),
        "num_active_params": decoder.num_active_params(cfg),
        "tokens_per_step": config.train.batch_size * config.train.seq_len,
        "train_bytes": int(trainer.split.train.size),
        "heldout_bytes": int(trainer.split.heldout.size),
        "params_path": path,
        "train_seconds": train_seconds,
        "seconds": time.perf_counter() - t0,
    }
    text = json.dumps(summary, indent=2).encode()
    write_atomic(os.path.join(workdir, SUMMARY_FILE), lambda f: f.write(text))
    return summary


def heldout_summary(layers: tuple[int, ...], heldout: list[Stats]) -> dict[str, Any]:
    """The last evaluation's routing: each statistic's mean over MoE layers, and per layer."""
    per_layer = {
        f"layer_{i}": _layer_summary(layer) for i, layer in zip(layers, heldout, strict=True)
    }
    heldout_stats: dict[str, Any] = (
        {key: float(np.mean([layer[key] for layer in heldout])) for key in SCALAR_STATS}
        if heldout
        else {}
    )
    if heldout:
        heldout_stats["tokens_per_expert"] = [s["tokens_per_expert"] for s in per_layer.values()]
    return {
        "heldout_stats": heldout_stats,
        "heldout_stats_per_layer": per_layer,
        "moe_layers": list(layers),
    }
