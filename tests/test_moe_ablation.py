"""The router ablation end to end on a tiny MoE decoder: train, sweep, stats, C8, resume."""

import json
import os

import matplotlib.pyplot as plt
import numpy as np
import pytest
from tensorboard.backend.event_processing import plugin_event_accumulator

from batching import app
from batching.outputs import plots_extra
from batching.predict import claims_models
from experiments import moe_router_ablation
from tests.conftest import tiny

TINY_MODEL = dict(d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16, mlp_dim=64,
                  num_experts=4, cache_len=32)  # fmt: skip
TINY_TRAIN = dict(steps=6, batch_size=8, seq_len=32, warmup_steps=2, log_every=3, eval_every=6,
                  eval_batches=2, max_text_bytes=400_000, heldout_fraction=0.2)  # fmt: skip


ROUTING_FIGURES = ("drop_fraction", "max_mean_load", "tokens_per_expert", "loss_vs_load_cv")


def tiny_ablation():
    config = moe_router_ablation.get_config()
    base = tiny()
    config.timing = base.timing
    config.roofline = base.roofline
    config.output = base.output
    config.output.plots = True
    config.model.update(TINY_MODEL)
    config.train.update(TINY_TRAIN)
    config.train.seeds = 1
    config.sweep.batch_sizes = (2, 8)
    config.runs = {
        # dropless token-choice with the loss-free bias, and expert-choice
        "tc_k2_dropless_bias": {
            "model": {"capacity_factor": 0.0, "router_bias": True},
            "train": {"aux_loss_weight": 0.0, "router_bias_update_rate": 0.01},
        },
        "ec_cf100_none": {"model": {"router": "expert_choice", "capacity_factor": 1.0}},
    }
    return config


def test_default_grid_and_full_grid():
    default = moe_router_ablation.grid(False)
    assert len(default) == 8
    # the balancing axis: token-choice k=2 at capacity 1, five ways to balance
    axis = [b for r, cf, b in default if (r, cf) == ("tc_k2", 1.0)]
    assert axis == ["none", "aux", "auxbatch", "bias", "biasaux"]
    assert ("tc_k2", 0.0, "aux") in default and ("ec", 1.0, "none") in default
    full = moe_router_ablation.grid(True)
    # routers x capacities x aux on/off (expert-choice has no aux), then the default's rest
    assert len(full) == 3 * 3 * 2 - 3 + 4 and set(default) <= set(full)
    config = moe_router_ablation.get_config()
    assert config.train.seeds == 2 and moe_router_ablation.get_config("full").train.seeds == 3
    runs = config.runs
    bias = runs["tc_k2_cf100_bias"]
    assert bias.model.router_bias and bias.train.router_bias_update_rate == 0.001
    assert bias.train.aux_loss_weight == 0.0
    assert runs["tc_k2_cf100_biasaux"].train.aux_loss_weight > 0
    assert runs["tc_k2_dropless_aux"].model.capacity_factor == 0.0
    group, batch = runs["tc_k2_cf100_aux"], runs["tc_k2_cf100_auxbatch"]
    assert (group.train.aux_loss_scope, batch.train.aux_loss_scope) == ("group", "batch")


def test_seeds_expand_a_setting_into_runs():
    from batching.setup import runs

    config = tiny_ablation()
    config.train.seeds = 2
    expanded = runs.expand(config)
    assert sorted(r.name for r in expanded) == [
        "ec_cf100_none_seed0", "ec_cf100_none_seed1",
        "tc_k2_dropless_bias_seed0", "tc_k2_dropless_bias_seed1",
    ]  # fmt: skip
    bias = sorted((r for r in expanded if r.setting == "tc_k2_dropless_bias"), key=lambda r: r.name)
    assert [r.config.seed for r in bias] == [config.seed, config.seed + 1]
    assert [r.config.run_name for r in bias] == [r.name for r in bias]
    config.train.seeds = 0
    with pytest.raises(runs.ConfigError, match="train.seeds must be a positive integer"):
        runs.expand(config)


def test_ablation_trains_sweeps_judges_and_resumes(tmp_path):
    summaries = app.run(tiny_ablation(), str(tmp_path))
    by_run = {s["run"]: s for s in summaries}
    for s in summaries:
        assert s["trained"] is True
        assert s["heldout_loss"] < 5.55  # below a uniform guess over 256 bytes
        assert s["heldout_max_vio_global"] is not None and s["heldout_max_vio_global"] >= 0
    # the probe: expert-choice couples the sequences of a decode step; dropless token-choice
    # routes each token by its own logits and never can
    ec, dropless = by_run["ec_cf100_none"], by_run["tc_k2_dropless_bias"]
    assert ec["cross_seq_leak_fraction_max"] > 0
    assert dropless["cross_seq_leak_fraction_max"] == 0.0 and dropless["cross_seq_max_change"] == 0
    assert ec["max_vio_batch_last"] == pytest.approx(0.0, abs=1e-6)
    with open(tmp_path / "results.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == 4
    assert all(r["max_vio_group"] >= 0 and "cross_seq_trials" in r for r in rows)
    assert all(r["drop_fraction"] == 0 for r in rows if r["run"] == "tc_k2_dropless_bias")
    # the trained routing bias moved, and inference loads it with the parameters
    with np.load(tmp_path / "params" / "tc_k2_dropless_bias.npz") as params:
        biases = [params[k] for k in params.files if k.endswith("router_bias")]
    assert biases and any(np.abs(b).max() > 0 for b in biases)
    report = (tmp_path / "report.md").read_text()
    assert "### C8:" in report
    # priced at the peak (no per-shape microbenchmarks): said to be a lower bound
    assert "2 of 2 runs priced every op at the device's peak rates" in report
    # the router section: a table with one line per setting, then the verdict
    routers = report.split("## Routers")[1].split("\n## ")[0]
    assert "| balancing |" in routers and "Verdict on C8" in routers
    lines = routers.split("\n")
    assert (
        sum(line.startswith(("| tc_k2_dropless_bias |", "| ec_cf100_none |")) for line in lines)
        == 2
    )
    assert "| 0 (dropless) | loss-free bias |" in routers and "none possible" in routers
    # routing figures drawn from what the runs carry; one cache length: no knee-vs-context
    plots = set(os.listdir(tmp_path / "plots"))
    assert {f"routing_{n}.png" for n in ROUTING_FIGURES} <= plots
    assert "knee_vs_context.png" not in plots and "routing_latency_vs_dense.png" not in plots
    tb_run = str(tmp_path / "tb" / "ec_cf100_none")
    acc = plugin_event_accumulator.EventAccumulator(tb_run, size_guidance={"tensors": 0})
    acc.Reload()
    images = set(acc.PluginTagToContent("images"))
    assert {f"plots/routing_{n}" for n in ROUTING_FIGURES} <= images
    assert "moe/max_vio_batch" in acc.Tags()["tensors"]
    params = tmp_path / "params" / "ec_cf100_none.npz"
    mtime = os.path.getmtime(params)
    resume = tiny_ablation()
    resume.output.plots = False  # output is no part of the fingerprint; figures checked above
    app.run(resume, str(tmp_path))  # resumes: no retraining, no new points
    assert os.path.getmtime(params) == mtime
    with open(tmp_path / "results.jsonl") as f:
        assert len(f.readlines()) == 4


def _summary(run, router, cf=1.0, aux_weight=0.0, scope="group", bias=0.0, **numbers):
    s = dict(run=run, setting=run, router=router, top_k=2, capacity_factor=cf)
    s |= dict(batch_sizes=[1, 16], aux_loss_weight=aux_weight, aux_loss_scope=scope)
    s |= dict(router_bias_update_rate=bias, max_vio_batch_last=0.6, drop_fraction_last=0.1)
    s |= dict(heldout_loss=2.0, heldout_max_vio_global=0.4, cross_seq_leak_fraction_max=0.0)
    s |= dict(cross_seq_leak_batch=16, cross_seq_max_change=0.0, cross_seq_trials=32)
    s |= dict(cross_seq_trials_total=32)
    return s | numbers


def _seeded(setting, router, values, **common):
    """One summary per seed of `setting`, each taking its numbers from `values`."""
    return [
        _summary(f"{setting}_seed{i}", router, **common, **v) | {"setting": setting}
        for i, v in enumerate(values)
    ]


def test_c8_verdict_from_the_probe_and_the_balancing_axis_over_seeds():
    ec = _summary("ec", "expert_choice", max_vio_batch_last=0.0, cross_seq_leak_fraction_max=0.9,
                  cross_seq_max_change=0.3)  # fmt: skip
    dropless = _summary("dl", "token_choice", cf=0.0, drop_fraction_last=0.0)
    none = _seeded(
        "none",
        "token_choice",
        [
            dict(heldout_loss=2.30, heldout_max_vio_global=0.9),
            dict(heldout_loss=2.32, heldout_max_vio_global=0.92),
        ],
    )
    bias = _seeded("bias", "token_choice", [dict(heldout_loss=2.31, heldout_max_vio_global=0.10),
                                            dict(heldout_loss=2.29, heldout_max_vio_global=0.12)],
                   bias=0.001)  # fmt: skip
    v = claims_models.c8_moe_routers([*none, *bias, dropless, ec], [])
    assert v["verdict"] == "confirmed"
    assert "90% of the trials under expert-choice" in v["evidence"]
    assert "dropless token-choice in 0% of 32 trials" in v["evidence"]
    assert "2 seeds each" in v["evidence"]
    # MaxVio's intervals do not overlap; the losses' do
    assert "loss-free bias vs none in MaxVio" in v["evidence"] or (
        "none vs loss-free bias in MaxVio" in v["evidence"]
    )
    assert "in loss" not in v["evidence"]
    # a run of the same code at other seeds of the probe: the same verdict
    ec2 = ec | dict(cross_seq_leak_fraction_max=0.8, cross_seq_max_change=0.2)
    assert (
        claims_models.c8_moe_routers([*none, *bias, dropless, ec2], [])["verdict"] == v["verdict"]
    )
    # without a probe, the decoding half is not tested
    unprobed = [s | dict(cross_seq_leak_fraction_max=None) for s in (ec, dropless)]
    assert "not tested" in claims_models.c8_moe_routers(unprobed, [])["verdict"]


def test_the_probe_gives_the_same_verdict_at_other_seeds():
    """Untrained decoders, one per router: expert-choice leaks in some trials at both probe
    seeds, dropless token-choice in none, so the verdict does not hinge on the seed.
    Capacity-based top-1 leaks too: the kept sequence is drawn, and a later one's only
    choice can lose its slot (the first sequence's never does: slots fill in token order)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from batching.workloads import decoder as decoder_workload
    from batching.workloads import moe_decoder
    from models import decoder, decoding

    step = jax.jit(decoding.decode_step)
    found = {}
    for name, changes in (("ec", dict(router="expert_choice", capacity_factor=1.0)),
                          ("dropless", dict(capacity_factor=0.0)),
                          ("tc_k1", dict(top_k=1, capacity_factor=1.0))):  # fmt: skip
        model_cfg = tiny_ablation().model
        model_cfg.update(changes)
        cfg = moe_decoder.model_config(model_cfg)
        model = decoder_workload.abstract_decoder(cfg)
        nnx.update(model, decoder_workload.random_params(cfg, 0))
        model.init_cache(8, 16)
        graphdef, params, cache = nnx.split(model, decoder.WEIGHTS, nnx.Cache)
        tokens = jnp.arange(8, dtype=jnp.int32) * 7
        for seed in (0, 1):
            rng = np.random.default_rng(seed)
            probe = moe_decoder.cross_sequence_probe(
                step, graphdef, params, cache, tokens, rng, 256
            )
            found[name, seed] = probe["cross_seq_leak_fraction"]
    assert found["ec", 0] > 0 and found["ec", 1] > 0
    assert found["dropless", 0] == 0.0 and found["dropless", 1] == 0.0
    assert found["tc_k1", 0] > 0 and found["tc_k1", 1] > 0


def test_only_figures_that_apply_are_drawn():
    def row(run, b, experts):
        stats = dict(drop_fraction=0.0, max_mean_load=1.5, tokens_per_expert=[3, 1])
        return dict(run=run, batch_size=b, latency_s=1e-3 * b, num_experts=experts, top_k=2) | stats

    rows = [row(run, b, e) for run, e in (("moe", 8), ("dense", 2)) for b in (1, 4)]
    figures = plots_extra.routing_figures(rows, [{"run": "moe"}, {"run": "dense"}])
    # no trained run: no loss-vs-CV point to draw; a dense run of the same active params: drawn
    assert set(figures) == {f"routing_{n}" for n in ROUTING_FIGURES[:3]} | {
        "routing_latency_vs_dense"
    }
    assert all(isinstance(f, plt.Figure) for f in figures.values())
    assert plots_extra.routing_figures([dict(r, drop_fraction=None) for r in rows], []) == {}
    # two decode runs with one cache length: no knee-vs-context figure
    decode = [{"phase": "decode", "cache_len": 128}] * 2
    assert "knee_vs_context" not in plots_extra.extra_figures([], decode)
    plt.close("all")
