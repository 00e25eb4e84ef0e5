"""Byte-level stdlib text, and a short MoE training run: learning, TensorBoard tags, params.

Letters in array names: B batch, L length, V vocab.
"""

import json
import math
import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tensorboard.backend.event_processing import plugin_event_accumulator
from tensorboard.util import tensor_util

from batching.outputs.tensorboard import EventLog
from batching.workloads import checkpoint, text_data, train
from configs import moe_decoder
from models import decoder
from models.moe import RouterBias
from models.routers import SCALAR_STATS
from tests.conftest import once_per_session

TEXT_BYTES = 400_000
ROUTING_TAGS = [f"moe/{key}" for key in SCALAR_STATS]


def tiny_config(arg: str | None = None, **train_changes):
    config = moe_decoder.get_config(arg)
    config.model.update(
        dict(d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16, mlp_dim=64)
    )
    config.model.update(dict(max_seq_len=64, moe_every=2, num_experts=4))
    config.train.update(
        dict(steps=30, batch_size=8, seq_len=32, warmup_steps=3, log_every=10, eval_every=15)
    )
    config.train.update(dict(eval_batches=2, max_text_bytes=TEXT_BYTES, heldout_fraction=0.2))
    config.train.update(dict(learning_rate=1e-2))
    config.train.update(train_changes)
    return config


# Text.


def test_split_is_deterministic_disjoint_by_file_and_capped():
    a = text_data.load_split(TEXT_BYTES, heldout_fraction=0.2)
    b = text_data.load_split(TEXT_BYTES, heldout_fraction=0.2)
    np.testing.assert_array_equal(a.train, b.train)
    np.testing.assert_array_equal(a.heldout, b.heldout)
    assert a.train_files == b.train_files and a.heldout_files == b.heldout_files
    assert not set(a.train_files) & set(a.heldout_files)
    assert a.train.size + a.heldout.size == TEXT_BYTES
    assert all(text_data.is_heldout(f, 0.2) for f in a.heldout_files)
    assert not any(text_data.is_heldout(f, 0.2) for f in a.train_files)
    # A file's side does not depend on the cap: a larger read keeps every earlier choice.
    bigger = text_data.load_split(2 * TEXT_BYTES, heldout_fraction=0.2)
    assert set(a.heldout_files) <= set(bigger.heldout_files)
    assert set(a.train_files) <= set(bigger.train_files)
    # The held-out text really is those files' bytes (the last file read may be cut short).
    first = a.heldout_files[0]
    with open(os.path.join(a.root, first), "rb") as f:
        head = f.read(64)
    assert bytes(a.heldout[: len(head)]) == head
    assert a.train.dtype == a.heldout.dtype == np.uint8


def test_list_files_skips_installed_packages_and_fails_clearly_when_empty(tmp_path):
    for rel in ("a.py", "pkg/b.py", "site-packages/numpy/c.py", "test/test_x.py", "d.txt"):
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x = 1\n")
    assert text_data.list_files(str(tmp_path)) == ["a.py", "pkg/b.py"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no \\*.py files found under"):
        text_data.load_split(1000, 0.05, root=str(empty))
    with pytest.raises(ValueError, match="config.train.heldout_fraction must lie in"):
        text_data.load_split(1000, 1.0, root=str(tmp_path))


def test_windows_are_shifted_by_one_and_seeded():
    data = (np.arange(5000) % 251).astype(np.uint8)
    inputs_BxL, targets_BxL = text_data.sample_batch(data, 6, 17, np.random.default_rng(0))
    assert inputs_BxL.shape == targets_BxL.shape == (6, 17)
    assert inputs_BxL.dtype == targets_BxL.dtype == np.int32
    np.testing.assert_array_equal(targets_BxL, (inputs_BxL + 1) % 251)
    np.testing.assert_array_equal(inputs_BxL[:, 1:], targets_BxL[:, :-1])
    again, _ = text_data.sample_batch(data, 6, 17, np.random.default_rng(0))
    np.testing.assert_array_equal(inputs_BxL, again)
    # Every window lies inside the data, the last byte included.
    edge = np.arange(18, dtype=np.uint8)
    inputs_BxL, targets_BxL = text_data.sample_batch(edge, 3, 17, np.random.default_rng(1))
    np.testing.assert_array_equal(targets_BxL[:, -1], 17)
    with pytest.raises(ValueError, match="fewer than a window"):
        text_data.sample_batch(edge, 3, 18, np.random.default_rng(1))


# Training.


def _train(folder: str) -> None:
    config, workdir = tiny_config(), os.path.join(folder, "run")
    summary = train.run(config, workdir, EventLog(workdir, config.name))
    with open(os.path.join(folder, "summary.pkl"), "wb") as f:
        pickle.dump(summary, f)  # what train.run returned, as it returned it


@pytest.fixture(scope="module")
def trained():
    # One training run per session, whichever xdist worker asks first.
    folder = once_per_session("test_train_trained", _train)
    with open(os.path.join(folder, "summary.pkl"), "rb") as f:
        return tiny_config(), os.path.join(folder, "run"), pickle.load(f)


def _event_accumulator(logdir: str):
    acc = plugin_event_accumulator.EventAccumulator(logdir, size_guidance={"tensors": 0})
    acc.Reload()
    return acc


def test_training_lowers_the_loss(trained):
    config, workdir, summary = trained
    acc = _event_accumulator(os.path.join(workdir, "tb", config.name))
    ce = [tensor_util.make_ndarray(e.tensor_proto).item() for e in acc.Tensors("train/ce_loss")]
    assert ce[0] > math.log(256) - 0.3  # starts near uniform over bytes
    assert summary["train_ce_loss"] < ce[0] - 1.0
    assert summary["heldout_loss"] < math.log(256) - 1.0
    assert summary["steps"] == 30 and summary["seconds"] > 0
    with open(os.path.join(workdir, train.SUMMARY_FILE)) as f:
        assert json.load(f) == summary


def test_tensorboard_has_every_routing_tag(trained):
    config, workdir, summary = trained
    acc = _event_accumulator(os.path.join(workdir, "tb", config.name))
    scalars = set(acc.PluginTagToContent("scalars"))
    layer = decoder.moe_layers(train.model_config(config.model))[0]
    expected = {"train/loss", "train/ce_loss", "eval/loss", *ROUTING_TAGS}
    expected |= {f"eval/{tag}" for tag in ROUTING_TAGS}
    expected |= {f"moe/layer_{layer}/{key}" for key in SCALAR_STATS}
    assert expected <= scalars, sorted(expected - scalars)
    assert "moe/tokens_per_expert" in acc.PluginTagToContent("histograms")
    steps = [e.step for e in acc.Tensors("moe/load_cv")]
    assert steps == [1, 10, 20, 30]
    assert [e.step for e in acc.Tensors("eval/loss")] == [15, 30]
    value = lambda tag: tensor_util.make_ndarray(acc.Tensors(tag)[-1].tensor_proto).item()
    assert 0.0 <= value("moe/drop_fraction") <= 1.0
    assert 0.0 < value("moe/expert_usage") <= 1.0
    assert value("moe/aux_loss") >= 1.0  # E * sum f*P is k at perfect balance, here 2
    stats = summary["heldout_stats"]
    assert set(SCALAR_STATS) <= set(stats)
    assert all(isinstance(stats[key], float) for key in SCALAR_STATS)
    (loads,) = stats["tokens_per_expert"]  # one MoE layer, 4 experts
    assert len(loads) == 4 and sum(loads) > 0


def test_saved_params_load_back_to_identical_logits(trained, tmp_path):
    config, workdir, summary = trained
    path = summary["params_path"]
    assert path == os.path.join(workdir, "params", f"{config.name}.npz")
    with open(path[: -len(".npz")] + ".json") as f:
        assert json.load(f)["model"]["num_experts"] == config.model.num_experts
    cfg = train.model_config(config.model)
    params = checkpoint.load_params(path, config.model)
    abstract = nnx.eval_shape(lambda: decoder.Decoder(cfg, rngs=nnx.Rngs(0)))
    graphdef, _ = nnx.split(abstract, decoder.WEIGHTS)

    @jax.jit
    def logits(params, tokens_BxL):
        return nnx.merge(graphdef, params)(tokens_BxL)

    # These are the final weights: they give the held-out loss the run reported.
    split = text_data.load_split(TEXT_BYTES, config.train.heldout_fraction)
    batches = train.heldout_batches(split, config.train, config.seed)
    graphdef_2, _, _ = nnx.split(abstract, nnx.Param, RouterBias)
    weights = nnx.split_state(params, nnx.Param, RouterBias)
    heldout_loss, _ = train.evaluate(train.make_eval_step(graphdef_2), weights, batches)
    assert heldout_loss == pytest.approx(summary["heldout_loss"], abs=1e-6)

    inputs_BxL = batches[0][0]
    logits_BxLxV = logits(params, inputs_BxL)

    again = str(tmp_path / "again.npz")
    checkpoint.save_params(again, params, cfg)
    np.testing.assert_array_equal(
        logits(checkpoint.load_params(again, cfg), inputs_BxL), logits_BxLxV
    )
    wider = dict(config.model.to_dict(), d_model=64)
    with pytest.raises(ValueError, match="has shape"):
        checkpoint.load_params(path, wider)
    dense = dict(config.model.to_dict(), moe_every=0)
    with pytest.raises(ValueError, match="does not fit this model config"):
        checkpoint.load_params(path, dense)


def _aux_and_z_part(summary) -> float:
    return summary["train_loss"] - summary["train_ce_loss"]


def test_aux_loss_enters_the_training_loss(trained):
    _, _, summary = trained
    # 0.01 * aux (about k = 2) + 0.001 * z-loss (about 1): well above the z part alone.
    assert 0.01 < _aux_and_z_part(summary) < 0.1


@pytest.mark.parametrize("scope", ["group", "batch"])
def test_aux_loss_scope_picks_the_trained_balancing_loss(scope):
    # Routing groups of 8 tokens: 32 groups in a batch, so the two losses differ.
    config = tiny_config(aux_loss_scope=scope)
    config.model.update(dict(moe_group_size=8))
    cfg = train.validate(config)
    abstract = nnx.eval_shape(lambda: decoder.Decoder(cfg, rngs=nnx.Rngs(0)))
    graphdef, _ = nnx.split(abstract, nnx.Param)
    # Jitted: eager ops would compile one by one.
    params = jax.jit(lambda: nnx.state(decoder.Decoder(cfg, rngs=nnx.Rngs(0)), nnx.Param))()
    tokens_BxL = np.random.default_rng(0).integers(0, 256, (8, 33)).astype(np.int32)
    batch = (jnp.asarray(tokens_BxL[:, :-1]), jnp.asarray(tokens_BxL[:, 1:]))
    loss_fn = jax.jit(train.loss_fn, static_argnums=(1, 5))
    loss, (ce, stats) = loss_fn(params, graphdef, batch, 1.0, 0.0, scope)
    group = np.mean([float(s["aux_loss"]) for s in stats])
    pooled = np.mean([float(s["aux_loss_batch"]) for s in stats])
    assert abs(group - pooled) > 1e-4
    np.testing.assert_allclose(float(loss - ce), group if scope == "group" else pooled, rtol=1e-5)


@pytest.mark.parametrize("arg", ["token_choice_k1", "expert_choice"])
def test_training_runs_without_aux_loss(arg, tmp_path):
    config = tiny_config(arg, aux_loss_weight=0.0, steps=10, eval_every=10, log_every=5)
    summary = train.run(config, str(tmp_path), EventLog(str(tmp_path), config.name))
    assert np.isfinite(summary["train_loss"]) and np.isfinite(summary["heldout_loss"])
    assert 0.0 <= _aux_and_z_part(summary) < 0.01  # only 0.001 * z-loss is left
    acc = _event_accumulator(os.path.join(str(tmp_path), "tb", config.name))
    histograms = set(acc.PluginTagToContent("histograms"))
    assert ("moe/experts_per_token" in histograms) == (arg == "expert_choice")
    if arg == "expert_choice":
        assert summary["heldout_stats"]["drop_fraction"] == 0.0  # nothing wanted is dropped


@pytest.mark.parametrize(
    "section, changes, match",
    [
        ("train", dict(steps=0), "config.train.steps must be an integer >= 1, got 0"),
        ("train", dict(batch_size=-2), "config.train.batch_size must be an integer >= 1"),
        ("train", dict(learning_rate=0.0), "config.train.learning_rate must be > 0"),
        ("train", dict(warmup_steps=30), "config.train.warmup_steps must be < config.train.steps"),
        ("train", dict(aux_loss_weight=-0.1), "config.train.aux_loss_weight must be >= 0"),
        ("train", dict(heldout_fraction=1.0), "config.train.heldout_fraction must lie in"),
        ("train", dict(schedule="linear"), "config.train.schedule must be one of"),
        ("train", dict(aux_loss_scope="seq"), "config.train.aux_loss_scope must be one of"),
        ("train", dict(seq_len=65), "config.train.seq_len must be <= model.max_seq_len=64"),
        ("model", dict(top_k=0), "model.top_k must be a positive integer"),
        ("model", dict(router="switch"), "model.router must be one of"),
        ("model", dict(vocab_size=100), "model.vocab_size must be >= 256"),
        ("model", dict(moe_group_size=7), "model.moe_group_size=7 must divide"),
        ("train", dict(router_bias_update_rate=0.01), "needs model.router_bias = True"),
        ("train", dict(router_bias_update_rate=-1.0), "router_bias_update_rate must be >= 0"),
    ],
)
def test_bad_config_is_rejected_before_anything_is_written(section, changes, match, tmp_path):
    config = tiny_config()
    config[section].update(changes)
    workdir = tmp_path / "never"
    with pytest.raises(ValueError, match=match):
        train.run(config, str(workdir))
    assert not workdir.exists()


def test_the_routing_bias_is_state_the_optimizer_never_sees():
    config = tiny_config()
    config.model.router_bias = True
    config.train.router_bias_update_rate = 0.01
    cfg = train.validate(config)
    trainer, (params, bias), opt_state = train.make_trainer(config, cfg)
    paths = ["/".join(map(str, p)) for p, _ in nnx.to_flat_state(params)]
    biases = ["/".join(map(str, p)) for p, _ in nnx.to_flat_state(bias)]
    assert biases and all(p.endswith("router_bias") for p in biases)
    assert not any("router_bias" in p for p in paths)
    n_params = len(jax.tree.leaves(params))
    # adamw's moments: one per parameter, none for a bias
    assert all(len(jax.tree.leaves(m)) == n_params for m in (opt_state[-1][0].mu,))
    batch = text_data.sample_batch(trainer.split.train, 4, 16, np.random.default_rng(0))
    before = [(p, np.asarray(v.get_value())) for p, v in nnx.to_flat_state(bias)]
    params, new_bias, _, _, stats = trainer.train_step(params, bias, opt_state, batch)
    after = [np.asarray(v.get_value()) for _, v in nnx.to_flat_state(new_bias)]
    for (path, old), new, layer in zip(before, after, stats, strict=True):
        load = np.asarray(layer["tokens_per_expert_wanted"], np.float64)
        want = old + 0.01 * np.sign(load.mean() - load)
        np.testing.assert_allclose(new, want, atol=1e-7, err_msg=str(path))
