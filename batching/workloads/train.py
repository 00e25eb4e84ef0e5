"""Trains a small MoE decoder on standard-library bytes and logs its routing to TensorBoard.

    from batching.outputs.tensorboard import EventLog
    from batching.workloads import train
    from configs import moe_decoder
    config = moe_decoder.get_config("expert_choice")
    summary = train.run(config, "/tmp/moe", EventLog("/tmp/moe", config.name))

The loss is a sum of three terms.

- The mean cross-entropy.
- train.aux_loss_weight times the load-balancing loss, averaged over MoE layers.
- train.z_loss_weight times the z-loss, averaged over MoE layers.

train.aux_loss_scope picks the per-group or the global-batch load-balancing loss
(AUX_LOSS_STAT). The optimizer is adamw with a warmup and an optional cosine decay. The train
step is a pure function of (params, bias, opt_state, batch) over `nnx.split`. It is jitted
with params, routing biases and optimizer state donated.

The run writes three files under workdir.

- params/<name>.npz: the trained params, one array per nnx path joined by "/".
- params/<name>.json: the model config they belong to (DecoderConfig fields).
- train_summary.json: the dict `run` returns.

The curves train/*, moe/* and eval/* go through `log`. The lab's TensorBoard writer hands
training an `EventLog`. It writes to <workdir>/tb/<name>/, with file suffix .train.

Routing statistics (models.routers.routing_stats) are logged as `moe/<stat>`, the mean over
MoE layers. Each layer's value goes to `moe/layer_<i>/<stat>`, with i the block index.
Held-out statistics go under `eval/moe/`. Each is a mean over a fixed set of held-out batches.

Letters in array names (models/__init__.py): B batch, L length, V vocab.
"""

import contextlib
import dataclasses
import json
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from batching.workloads import text_data
from batching.workloads.checkpoint import params_path, save_params, write_atomic
from batching.workloads.train_config import (  # noqa: F401 - train's config API
    AUX_LOSS_STAT,
    SCHEDULES,
    model_config,
    validate,
)
from batching.workloads.train_log import Log, NoLog, write_routing
from models import decoder, decoding
from models.moe import RouterBias
from models.routers import SCALAR_STATS

SUMMARY_FILE = "train_summary.json"

Batch = tuple[np.ndarray, np.ndarray]
Stats = dict[str, Any]


# Optimizer, loss and steps.


def make_optimizer(t: ml_collections.ConfigDict) -> tuple[optax.GradientTransformation, Callable]:
    """adamw (b2 0.95, weight decay on matrices only) after optional global-norm clipping.

    With train.warmup_steps the learning rate first ramps up linearly. It then stays constant, or
    with the "cosine" schedule decays to 0.1 of its peak. Returns (optimizer, learning-rate schedule
    of the step count).
    """
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
    bias: nnx.State | None = None,
) -> tuple[jax.Array, tuple[jax.Array, list[Stats]]]:
    """(total loss, (mean cross-entropy in nats per byte, routing stats per MoE layer)).

    The aux term is the routing statistic AUX_LOSS_STAT[aux_loss_scope]. `bias` holds the
    routing biases (models.moe.RouterBias) of a graphdef split from them. No gradient flows
    into the biases.
    """
    inputs_BxL, targets_BxL = batch
    rest = () if bias is None else (jax.lax.stop_gradient(bias),)
    logits_BxLxV, stats = decoding.forward(graphdef, params, inputs_BxL, *rest, stats=True)
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
    bias_update_rate: float = 0.0,
) -> Callable:
    """jit of step(params, bias, opt_state, batch) -> (params, bias, opt_state, metrics, stats).

    params, bias and opt_state are donated. The optimizer sees the parameters only. With
    `bias_update_rate` the routing biases then move by that step's loads
    (Decoder.update_router_bias).
    """

    def step(params: nnx.State, bias: nnx.State, opt_state: optax.OptState, batch: Batch):
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, (ce, stats)), grads = grad_fn(
            params, graphdef, batch, aux_loss_weight, z_loss_weight, aux_loss_scope, bias
        )
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        if bias_update_rate:
            model = nnx.merge(graphdef, params, bias, copy=True)
            model.update_router_bias(stats, bias_update_rate)
            bias = nnx.state(model, RouterBias)
        metrics = {"loss": loss, "ce_loss": ce, "grad_norm": optax.global_norm(grads)}
        return params, bias, opt_state, metrics, stats

    return jax.jit(step, donate_argnums=(0, 1, 2))


def make_eval_step(graphdef: nnx.GraphDef) -> Callable:
    """jit of eval(params, bias, batch) -> (mean cross-entropy, routing stats per MoE layer)."""

    def step(params: nnx.State, bias: nnx.State, batch: Batch):
        _, (ce, stats) = loss_fn(params, graphdef, batch, 0.0, 0.0, "group", bias)
        return ce, stats

    return jax.jit(step)


def evaluate(
    eval_step: Callable, weights: tuple[nnx.State, nnx.State], batches: list[Batch]
) -> tuple[float, list[Stats]]:
    """Held-out loss and per-layer stats over `batches`.

    `weights` holds the params and the routing biases. The loss is the mean over batches.
    Per layer the stats are built as follows.

    - Each scalar stat: the mean over batches of each batch's value.
    - tokens_per_expert: summed over batches.
    - experts_per_token: concatenated over batches.
    - max_vio_global: MaxVio over the whole set, on the wanted loads summed over the batches.

    max_vio_global is Wang et al. 2024's global MaxVio.
    """
    losses, per_batch = [], []
    for batch in batches:
        loss, stats = jax.device_get(eval_step(*weights, batch))
        losses.append(float(loss))
        per_batch.append(stats)
    layers = []
    for i in range(len(per_batch[0])):
        runs = [stats[i] for stats in per_batch]
        layer = {key: float(np.mean([s[key] for s in runs])) for key in SCALAR_STATS}
        layer["tokens_per_expert"] = np.sum([s["tokens_per_expert"] for s in runs], axis=0)
        wanted = np.sum([s["tokens_per_expert_wanted"] for s in runs], axis=0)
        layer["max_vio_global"] = float(np.max(wanted) / np.mean(wanted) - 1.0)
        layer["experts_per_token"] = np.concatenate([s["experts_per_token"] for s in runs])
        layers.append(layer)
    return float(np.mean(losses)), layers


def heldout_batches(
    split: text_data.TextSplit, t: ml_collections.ConfigDict, seed: int
) -> list[Batch]:
    """The fixed held-out batches every evaluation of a run uses.

    There are train.eval_batches batches of train.batch_size x train.seq_len. They are drawn
    from a generator of their own.
    """
    rng = np.random.default_rng([seed, 1])
    return [
        text_data.sample_batch(split.heldout, t.batch_size, t.seq_len, rng)
        for _ in range(t.eval_batches)
    ]


# The run.


# What the held-out summary keeps per layer: the routing scalars and global MaxVio.
HELDOUT_STATS = (*SCALAR_STATS, "max_vio_global")


def _layer_summary(layer: Stats) -> dict[str, Any]:
    out = {key: layer[key] for key in HELDOUT_STATS}
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
    graphdef, _, _ = nnx.split(abstract, nnx.Param, RouterBias)
    # One jitted init instead of one eager compile per weight shape.
    params, bias = jax.jit(
        lambda: nnx.split(decoder.Decoder(cfg, rngs=nnx.Rngs(config.seed)), nnx.Param, RouterBias)[
            1:
        ]
    )()
    optimizer, schedule = make_optimizer(t)
    opt_state = jax.jit(optimizer.init)(params)
    trainer = Trainer(
        cfg=cfg,
        layers=decoder.moe_layers(cfg),
        split=split,
        train_step=make_train_step(
            graphdef,
            optimizer,
            t.aux_loss_weight,
            t.z_loss_weight,
            t.aux_loss_scope,
            t.get("router_bias_update_rate", 0.0),
        ),
        eval_step=make_eval_step(graphdef),
        schedule=schedule,
        eval_batches=heldout_batches(split, t, config.seed),
    )
    return trainer, (params, bias), opt_state


def train_loop(config: ml_collections.ConfigDict, trainer: Trainer, weights, opt_state, log: Log):
    """Runs train.steps steps, logging every train.log_every steps.

    It also logs at the first and last step. It evaluates every train.eval_every steps and at
    the last step. Returns ((params, biases), last metrics, held-out loss, held-out
    per-layer stats).
    """
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
            params, bias, opt_state, metrics, stats = trainer.train_step(*weights, opt_state, batch)
            weights = (params, bias)
            if step % t.log_every == 0 or step in (1, t.steps):
                metrics, stats = jax.device_get((metrics, stats))
                for key, value in metrics.items():
                    log.scalar(f"train/{key}", float(value), step)
                log.scalar("train/learning_rate", float(trainer.schedule(step - 1)), step)
                write_routing(log, "", stats, trainer.layers, step, cfg.router)
            if step % t.eval_every == 0 or step == t.steps:
                heldout_loss, heldout = evaluate(trainer.eval_step, weights, trainer.eval_batches)
                log.scalar("eval/loss", heldout_loss, step)
                write_routing(log, "eval/", heldout, trainer.layers, step, cfg.router)
    return weights, metrics, heldout_loss, heldout


def run(config: ml_collections.ConfigDict, workdir: str, log: Log | None = None) -> dict[str, Any]:
    """Trains config.model on stdlib bytes per config.train.

    The curves go into `log`, which defaults to none. Returns the summary it also writes to
    <workdir>/train_summary.json. Its fields include these.

    - train_loss and train_ce_loss: from the last step.
    - heldout_loss: in nats per byte.
    - heldout_stats: each routing scalar averaged over MoE layers. Its tokens_per_expert is a
      list of per-layer lists of E counts. Each count is summed over the held-out batches.
    - heldout_stats_per_layer: the same per layer.
    - steps, and seconds for the whole run.
    - train_seconds: the step loop, compiles and evals included.
    """
    t0 = time.perf_counter()
    cfg = validate(config)
    log = log if log is not None else NoLog()
    trainer, weights, opt_state = make_trainer(config, cfg)
    log.text("config", "```\n" + config.to_json_best_effort(indent=2) + "\n```", 0)
    loop_start = time.perf_counter()
    try:
        weights, metrics, heldout_loss, heldout = train_loop(
            config, trainer, weights, opt_state, log
        )
        train_seconds = time.perf_counter() - loop_start
    finally:
        log.close()
    path = params_path(workdir, config.name)
    save_params(path, nnx.merge_state(*weights), cfg)
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
    """The last evaluation's routing: each statistic's mean over MoE layers, and per layer.

    The list of MoE block indices goes in too, as moe_layers.
    """
    per_layer = {
        f"layer_{i}": _layer_summary(layer) for i, layer in zip(layers, heldout, strict=True)
    }
    heldout_stats: dict[str, Any] = (
        {key: float(np.mean([layer[key] for layer in heldout])) for key in HELDOUT_STATS}
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
