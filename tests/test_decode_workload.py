"""The decoder bound to the sweep: decode and prefill points, donation, no recompiles, C7."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from batching import app
from batching.measure import timing
from batching.predict import claims_models
from batching.setup import runs, topology
from batching.workloads import base as workload
from batching.workloads import decoder as decoder_workload
from configs import decoder as decoder_config
from tests.conftest import tiny

TINY_MODEL = dict(
    vocab_size=64,
    d_model=32,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    head_dim=8,
    mlp_dim=64,
    max_seq_len=256,
)


def tiny_decoder(phase="decode", **model):
    config = tiny()
    config.model = decoder_config.model(phase)
    config.model.update({**TINY_MODEL, "cache_len": 32, "prompt_len": 16, **model})
    config.name = "tiny_decoder"
    return config


def test_decode_steps_take_flat_arrays_and_reuse_the_donated_cache():
    config = tiny_decoder()
    wl = decoder_workload.build(config, topology.build(config), "")
    flat = workload.flat_call(wl, 4)
    assert all(isinstance(a, jax.Array) for a in flat.args)
    compiled = timing.compile_fn(flat.fn, flat.args, flat.donate_argnums)
    args = flat.args
    cache_leaves = set(flat.donate_argnums)
    assert cache_leaves  # the cache's leaves are donated, nothing else
    for _ in range(1000):
        # K and V are written in place (donated and aliased); the lengths are reset.
        old_kv = [args[i] for i in cache_leaves if args[i].ndim > 1]
        out = compiled.call(*args)
        assert old_kv and all(leaf.is_deleted() for leaf in old_kv)
        args = flat.next_args(args, out)
    jax.block_until_ready(out)
    # Every step starts at lengths cache_len - 1 and leaves cache_len: the cache fed back
    # never overflows, however many steps run.
    tree = jax.tree.structure(wl.make_args(4)[1])
    cache = jax.tree.unflatten(tree, [args[i] for i in sorted(cache_leaves)])
    lengths = [
        leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(cache)
        if "lengths" in jax.tree_util.keystr(path)
    ]
    assert lengths and all((np.asarray(x) == 32).all() for x in lengths)


@pytest.mark.parametrize("layout", ["bksh", "bskh"])
def test_decode_step_xla_bytes_match_the_analytic_count_with_the_cache_read_once(layout):
    """A cache big enough to dominate the step: XLA's bytes stay near the analytic count in the
    streaming layout (the cache read once, the new token written in place); the transposing
    layout shows up as extra bytes, which is what the rows flag."""
    # head_dim 64 as in the default model: the scores (G per position) stay small next to K.
    config = tiny_decoder(cache_len=256, head_dim=64, cache_layout=layout)
    wl = decoder_workload.build(config, topology.build(config), "")
    flat = workload.flat_call(wl, 16)
    compiled = timing.compile_fn(flat.fn, flat.args, flat.donate_argnums)
    ratio = compiled.bytes_accessed / wl.cost(16).bytes
    if layout == "bksh":
        assert 0.9 < ratio < 1.5, ratio
    else:
        assert ratio > 1.5, ratio


@pytest.mark.parametrize("phase", ["decode", "prefill"])
def test_analytic_flops_match_xla(phase):
    config = tiny_decoder(phase)
    wl = decoder_workload.build(config, topology.build(config), "")
    flat = workload.flat_call(wl, 4)
    compiled = timing.compile_fn(flat.fn, flat.args, flat.donate_argnums)
    assert compiled.flops == pytest.approx(wl.cost(4).flops, rel=0.25)


def test_bad_decoder_fields_are_named():
    config = tiny_decoder(cache_len=0)
    with pytest.raises(runs.ConfigError, match="model.cache_len"):
        app.validate(config)
    config = tiny_decoder(cache_len=1000)
    with pytest.raises(runs.ConfigError, match="max_seq_len"):
        app.validate(config)
    config = tiny_decoder(n_heads=3)
    with pytest.raises(runs.ConfigError, match="n_heads"):
        app.validate(config)
    config = tiny_decoder(cache_layout="bhsk")
    with pytest.raises(runs.ConfigError, match="model.cache_layout must be 'auto' or one of"):
        app.validate(config)
    config = tiny_decoder(phase="train")
    with pytest.raises(runs.ConfigError, match="model.phase"):
        app.validate(config)


def test_decode_experiment_rows_report_and_plots(tmp_path):
    config = tiny_decoder()
    config.sweep.batch_sizes = (1, 2, 4)
    config.runs = {
        "decode_L0016": {"model": {"cache_len": 16}},
        "decode_L0064": {"model": {"cache_len": 64}},
        "prefill_P0016": {"model": {"phase": "prefill"}, "sweep": {"batch_sizes": (1, 2)}},
    }
    config.report.claims = ("C7",)
    config.output.plots = True
    summaries = app.run(config, str(tmp_path))
    with open(tmp_path / "results.jsonl") as f:
        rows = [json.loads(line) for line in f]
    decode = [r for r in rows if r["phase"] == "decode"]
    prefill = [r for r in rows if r["phase"] == "prefill"]
    assert len(decode) == 6 and len(prefill) == 2
    for r in decode:
        assert r["cache_len"] in (16, 64) and r["prompt_len"] is None
        assert r["cache_layout"] in ("bksh", "bskh")
        (attention,) = r["attention_shapes"]
        assert attention["cache_len"] == r["cache_len"] and attention["batch"] == r["batch_size"]
        assert r["tokens_per_s"] == pytest.approx(r["batch_size"] / r["latency_s"])
    for r in prefill:
        assert r["prompt_len"] == 16
        assert r["tokens_per_s"] == pytest.approx(16 * r["batch_size"] / r["latency_s"])
    # more context, more bytes per sequence: the a-priori knee moves out
    by_run = {s["run"]: s for s in summaries}
    assert (
        by_run["decode_L0064"]["predicted_knee_batch_size"]
        > by_run["decode_L0016"]["predicted_knee_batch_size"]
    )
    assert (tmp_path / "plots" / "knee_vs_context.png").exists()
    assert (tmp_path / "plots" / "prefill_vs_prompt.png").exists()
    report = (tmp_path / "report.md").read_text()
    assert "### C7:" in report
    assert "The cache was stored as bksh" in report


@pytest.mark.parametrize("xla_ratio, clean", [(1.2, True), (4.7, False)], ids=["once", "copies"])
def test_c7_says_whether_the_cache_was_read_once(xla_ratio, clean):
    """Judged at the longest context: a short-context point, whose XLA bytes also count
    activations the analytic count leaves out, does not decide it."""
    summaries = [
        {"run": f"decode_L{n:04d}", "phase": "decode", "cache_len": n, "peak_bytes_per_s": 17e9}
        for n in (128, 4096)
    ]
    rows = [
        dict(
            run="decode_L0128",
            phase="decode",
            cache_len=128,
            batch_size=512,
            cache_layout="bksh",
            achieved_bytes_per_s=1e9,
            xla_bytes_ratio=2.1,
        ),
        dict(
            run="decode_L4096",
            phase="decode",
            cache_len=4096,
            batch_size=32,
            cache_layout="bksh",
            achieved_bytes_per_s=6.8e9,
            xla_bytes_ratio=xla_ratio,
        ),
    ]
    text = claims_models.c7_cache_reads(summaries, rows)
    assert text.startswith("The cache was stored as bksh")
    assert "At cache 4096 the step moves its analytic bytes at 0.4-0.4" in text
    assert ("reads each sequence's cache once" in text) == clean
    assert ("moves the cache more than once" in text) != clean


def test_shape_aware_prediction_times_the_decoders_own_attention(tmp_path):
    # The workload module names its attention (ATTEND); the analysis must find it and time
    # every decode row's attention shape into the peaks cache.
    from tests.conftest import PEAKS_DIR

    peaks = tmp_path / "peaks"
    peaks.mkdir()
    shutil.copy(os.path.join(PEAKS_DIR, "device_peaks.json"), peaks)
    config = tiny_decoder()
    config.sweep.batch_sizes = (1, 2)
    config.roofline.shape_aware = True
    config.roofline.peaks_cache_dir = str(peaks)
    app.run(config, str(tmp_path / "run"))
    timed = next(iter(json.loads((peaks / "device_peaks.json").read_text()).values()))
    layout = json.loads((tmp_path / "run" / "results.jsonl").read_text().splitlines()[0])
    names = set(timed["attention_s"])
    assert len(names) == 2 and all(f":{layout['cache_layout']}:" in n for n in names)
