"""The router ablation end to end on a tiny MoE decoder: train, sweep, stats, C8, resume."""

import json
import os

import matplotlib.pyplot as plt
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
    config.sweep.batch_sizes = (2, 8)
    config.runs = {
        "tc_k2_cf1_noaux": {"model": {"capacity_factor": 1.0}, "train": {"aux_loss_weight": 0.0}},
        "ec_cf1": {"model": {"router": "expert_choice", "capacity_factor": 1.0}},
    }
    return config


def test_default_grid_and_full_grid():
    assert len(moe_router_ablation.grid(False)) == 7
    full = moe_router_ablation.grid(True)
    # expert-choice has no aux loss to switch on; one run trains the global-batch aux loss
    assert len(full) == 3 * 3 * 2 - 3 + 1
    names = set(moe_router_ablation.get_config("full").runs.keys())
    assert "tc_k1_cf125_noaux" in names and "ec_cf200_noaux" in names
    runs = moe_router_ablation.get_config().runs
    # the scope axis: same router, k, capacity and weight, only the scope differs
    group, batch = runs["tc_k2_cf100_aux"], runs["tc_k2_cf100_auxbatch"]
    assert group.model == batch.model
    assert (group.train.aux_loss_scope, batch.train.aux_loss_scope) == ("group", "batch")
    assert group.train.aux_loss_weight == batch.train.aux_loss_weight > 0


def test_ablation_trains_sweeps_judges_and_resumes(tmp_path):
    summaries = app.run(tiny_ablation(), str(tmp_path))
    by_run = {s["run"]: s for s in summaries}
    for s in summaries:
        assert s["trained"] is True
        assert s["heldout_loss"] < 5.55  # below a uniform guess over 256 bytes
        assert s["heldout_load_cv"] is not None
    # expert-choice couples the sequences of a decode batch; token-choice here may too
    # (k=2 with drops), so only expert-choice's coupling is asserted
    assert by_run["ec_cf1"]["cross_sequence_logit_change"] > 1e-4
    assert by_run["ec_cf1"]["load_cv_last"] == pytest.approx(0.0, abs=1e-6)
    with open(tmp_path / "results.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == 4
    assert all("drop_fraction" in r and "max_mean_load" in r for r in rows)
    report = (tmp_path / "report.md").read_text()
    assert "### C8:" in report
    # the router section: a table with one line per run, then the verdict
    routers = report.split("## Routers")[1].split("\n## ")[0]
    assert "| aux scope |" in routers and "Verdict on C8" in routers
    assert (
        sum(line.startswith(("| tc_k2_cf1_noaux |", "| ec_cf1 |")) for line in routers.split("\n"))
        == 2
    )
    # routing figures drawn from what the runs carry; one cache length: no knee-vs-context
    plots = set(os.listdir(tmp_path / "plots"))
    assert {f"routing_{n}.png" for n in ROUTING_FIGURES} <= plots
    assert "knee_vs_context.png" not in plots and "routing_latency_vs_dense.png" not in plots
    tb_run = str(tmp_path / "tb" / "ec_cf1")
    acc = plugin_event_accumulator.EventAccumulator(tb_run, size_guidance={"tensors": 0})
    acc.Reload()
    images = set(acc.PluginTagToContent("images"))
    assert {f"plots/routing_{n}" for n in ROUTING_FIGURES} <= images
    params = tmp_path / "params" / "ec_cf1.npz"
    mtime = os.path.getmtime(params)
    resume = tiny_ablation()
    resume.output.plots = False  # output is no part of the fingerprint; figures checked above
    app.run(resume, str(tmp_path))  # resumes: no retraining, no new points
    assert os.path.getmtime(params) == mtime
    with open(tmp_path / "results.jsonl") as f:
        assert len(f.readlines()) == 4


def _summary(run, router, aux_weight=0.0, scope="group", **numbers):
    s = dict(run=run, router=router, top_k=2, capacity_factor=1.0, batch_sizes=[1, 16])
    s |= dict(aux_loss_weight=aux_weight, aux_loss_scope=scope, load_cv_last=0.3)
    s |= dict(drop_fraction_last=0.1, heldout_loss=2.0, heldout_load_cv=0.2)
    s |= dict(cross_sequence_logit_change=0.0)
    return s | numbers


def test_c8_verdict_is_short_and_compares_the_aux_scopes():
    summaries = [
        _summary("off", "token_choice", heldout_loss=2.3, heldout_load_cv=0.5),
        _summary("group", "token_choice", 0.01, "group", heldout_loss=2.2, heldout_load_cv=0.1),
        _summary("batch", "token_choice", 0.01, "batch", heldout_loss=2.1, heldout_load_cv=0.3),
        _summary("ec", "expert_choice", load_cv_last=0.0, cross_sequence_logit_change=0.02),
    ]
    v = claims_models.c8_moe_routers(summaries, [])
    assert v["verdict"] == "confirmed"
    assert v["evidence"].count(". ") <= 2  # two or three sentences
    assert "Aux loss off / per group / over the batch" in v["evidence"]
    assert "held-out loss 2.3 / 2.2 / 2.1" in v["evidence"]
    assert "held-out load CV 0.5 / 0.1 / 0.3" in v["evidence"]
    # without an aux comparison there is no third sentence
    v = claims_models.c8_moe_routers([summaries[1], summaries[3]], [])
    assert "Aux loss" not in v["evidence"]


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
