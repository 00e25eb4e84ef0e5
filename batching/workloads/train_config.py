"""The training section of a config, and the decoder config it trains.

The section is checked field by field before anything is written.
"""

from collections.abc import Mapping
from typing import Any

import ml_collections
import numpy as np

from batching.setup.topology import Topology
from batching.workloads import decoder as decoder_workload
from batching.workloads import text_data
from models import decoder

SCHEDULES = ("cosine", "constant")
# train.aux_loss_scope -> the routing statistic trained as the load-balancing loss.
# "group" balances within each routing group, as GShard, Switch, flaxformer and MaxText do.
# "batch" balances over the pooled global batch.
# Qwen 2025 ("Demons in the Detail") and OLMo-core do that. See routers.routing_stats.
AUX_LOSS_STAT = {"group": "aux_loss", "batch": "aux_loss_batch"}


# Config.


def model_config(
    model_cfg: Mapping | ml_collections.ConfigDict, topo: Topology | None = None
) -> decoder.DecoderConfig:
    """The DecoderConfig of `model_cfg`, its cache resolved for `topo` (decoder workload)."""
    return decoder_workload.model_config(model_cfg, topo)


def _check_int(name: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_float(name: str, value: Any, positive: bool) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not np.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if (positive and not value > 0) or value < 0:
        raise ValueError(f"{name} must be {'> 0' if positive else '>= 0'}, got {value!r}")


def validate(config: ml_collections.ConfigDict) -> decoder.DecoderConfig:
    """Checks the fields training reads, and returns the model config.

    A bad field raises a ValueError naming it. The fields are config.train.*, config.name,
    config.seed and model.*.
    """
    t = config.get("train")
    if t is None:
        raise ValueError("config.train is missing: see configs/moe_decoder.py for its fields")
    ints = {"steps": 1, "batch_size": 1, "seq_len": 1, "warmup_steps": 0, "log_every": 1}
    ints |= {"eval_every": 1, "eval_batches": 1, "max_text_bytes": 1}
    floats = {"learning_rate": True, "weight_decay": False, "grad_clip_norm": False}
    floats |= {"aux_loss_weight": False, "z_loss_weight": False, "heldout_fraction": True}
    floats |= {"router_bias_update_rate": False}
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
    if t.router_bias_update_rate and not cfg.router_bias:
        raise ValueError(
            "config.train.router_bias_update_rate > 0 needs model.router_bias = True (a bias "
            f"to move), got router_bias_update_rate={t.router_bias_update_rate!r}"
        )
    if cfg.moe_group_size and (t.batch_size * t.seq_len) % cfg.moe_group_size:
        raise ValueError(
            f"model.moe_group_size={cfg.moe_group_size} must divide config.train.batch_size * "
            f"config.train.seq_len = {t.batch_size * t.seq_len}"
        )
    return cfg
