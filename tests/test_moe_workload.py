"""The MoE MLP bound to the sweep: routing statistics on rows and in TensorBoard, B* x E/k."""

import json

import pytest
from tensorboard.backend.event_processing import plugin_event_accumulator

from batching import app
from configs import moe as moe_config
from tests.conftest import tiny


def tiny_moe(**model):
    config = tiny()
    config.name = "tiny_moe"
    config.model = moe_config.model()
    config.model.update({**dict(d_model=16, mlp_dim=32, depth=2, num_experts=4, top_k=2), **model})
    config.sweep.batch_sizes = (4, 16)
    return config


def test_moe_rows_carry_routing_stats_and_tensorboard_shows_them(tmp_path):
    config = tiny_moe()
    # Expert-choice's zero assignment drops are checked in tests/test_moe.py.
    config.runs = {"tc": {}, "dense": {"model": {"num_experts": 2, "capacity_factor": 1.0}}}
    summaries = app.run(config, str(tmp_path))
    with open(tmp_path / "results.jsonl") as f:
        rows = [json.loads(line) for line in f]
    for r in rows:
        for k in ("drop_fraction", "max_mean_load", "load_cv", "router_entropy"):
            assert k in r
        assert len(r["tokens_per_expert"]) == r["num_experts"]
    # a dense layer (every token reaches every expert) drops nothing and is perfectly balanced
    for r in (r for r in rows if r["run"] == "dense"):
        assert r["drop_fraction"] == pytest.approx(0.0)
        assert r["load_cv"] == pytest.approx(0.0, abs=1e-6)
    by_run = {s["run"]: s for s in summaries}
    # each expert weight serves k/E of the batch: B* grows by E/k = 2 over the dense layer's 1
    assert by_run["tc"]["predicted_critical_batch"] == pytest.approx(
        2 * by_run["dense"]["predicted_critical_batch"]
    )
    acc = plugin_event_accumulator.EventAccumulator(
        str(tmp_path / "tb" / "tc"), size_guidance={"tensors": 0}
    )
    acc.Reload()
    scalars = set(acc.PluginTagToContent("scalars"))
    for tag in ("moe/aux_loss", "moe/load_cv", "moe/drop_fraction", "moe/layer_0/load_cv"):
        assert tag in scalars
    assert "moe/tokens_per_expert" in acc.PluginTagToContent("histograms")


def test_bad_moe_config_is_named(tmp_path):
    from batching.setup.runs import ConfigError

    for field, value in (("top_k", 5), ("capacity_factor", -1.0), ("router", "random")):
        config = tiny_moe(**{field: value})
        with pytest.raises(ConfigError, match=f"model.{field}"):
            app.run(config, str(tmp_path / "wd"))
        assert not (tmp_path / "wd").exists()
