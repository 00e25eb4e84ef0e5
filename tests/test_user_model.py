"""A model from outside the lab: its ops read from the compiled program, the API and the CLI."""

import json
import os
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from batching.measure import hlo_ops
from batching.setup import topology
from batching.workloads import base, ops, registry
from batching.workloads import mlp as mlp_workload
from tests.conftest import run_main, tiny


def test_a_scan_counts_its_body_by_its_trip_count():
    def rnn(w, x):
        step = lambda h, _: (jnp.tanh(h @ w), None)  # noqa: E731
        return jax.lax.scan(step, x, None, length=7)[0]

    w, x = jnp.ones((32, 32)), jnp.ones((4, 32))
    text = jax.jit(rnn).lower(w, x).compile().as_text()
    listed = hlo_ops.program_ops(text, lambda name: name.startswith("w"))
    gemm = [o for o in listed if o.kind == "gemm"]
    assert len(gemm) == 1 and gemm[0].count == 7 and gemm[0].shape == (4, 32, 32)
    assert gemm[0].flops == 2 * 4 * 32 * 32 and gemm[0].weight_bytes == 32 * 32 * 4


def test_the_mlp_program_ops_match_its_hand_list_within_2_percent():
    cfg = tiny(width=64, depth=3)
    wl = mlp_workload.build(cfg, topology.build(cfg), "")
    for batch in (1, 16):
        flat = base.flat_call(wl, batch)
        text = jax.jit(flat.fn).lower(*flat.args).compile().as_text()
        names = flat.leaf_names(wl.weight_args)
        program = ops.totals(hlo_ops.program_ops(text, names.__contains__))
        hand = ops.totals(wl.ops(batch))
        assert abs(program.flops / hand.flops - 1) <= 0.02
        assert program.weight_bytes == pytest.approx(hand.weight_bytes, rel=0.02)


def test_a_module_outside_the_package_is_not_a_family_by_exclusion():
    with pytest.raises(ValueError, match="model.name is not a known model"):
        registry.of(tiny(name="checkpoint").model)


MODEL = textwrap.dedent(
    """
    import numpy as np
    from flax import nnx
    import batching

    def make(model_cfg):
        model = nnx.Linear(model_cfg.width, model_cfg.width, rngs=nnx.Rngs(0))
        return model, lambda b: (np.ones((b, model_cfg.width), np.float32),)

    def broken(model_cfg):
        raise RuntimeError("no weights here")

    FAMILY = batching.family(make, name="mine", fields={"width": 8})
    """
)


def cli_args(workdir, factory, *more):
    return (
        "--config=configs/custom.py",
        f"--config.model.factory={factory}",
        "--config.sweep.batch_sizes=(1,2)",
        "--config.sweep.passes=1",
        "--config.timing.run_budget_s=0",
        "--config.timing.target_rel_ci=10",
        "--config.roofline.shape_aware=false",
        "--config.output.plots=false",
        "--config.output.progress_bar=false",
        f"--workdir={workdir}",
        *more,
    )


def test_the_command_line_sweeps_a_factory_from_tmp_path(tmp_path):
    (tmp_path / "mine_pkg").mkdir()
    (tmp_path / "mine_pkg" / "__init__.py").write_text("")
    (tmp_path / "mine_pkg" / "model.py").write_text(MODEL)
    env = {"PYTHONPATH": f"{tmp_path}{os.pathsep}{os.getcwd()}"}
    out = tmp_path / "run"
    done = run_main(*cli_args(out, "mine_pkg.model:FAMILY", "--config.model.width=16"), env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {r["batch_size"] for r in rows} == {1, 2} and all(r["model"] == "mine" for r in rows)
    assert all(r["ops_source"] == "program" and r["predicted_latency_s"] > 0 for r in rows)
    assert rows[0]["params"] == 16 * 16 + 16 and (out / "report.md").exists()
    for factory in ("mine_pkg.nothing:make", "mine_pkg.model:broken"):
        bad = run_main(*cli_args(tmp_path / "bad", factory), env=env)
        assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
        assert "model.factory" in bad.stderr and not (tmp_path / "bad").exists()


def test_the_api_sweeps_a_function_and_refuses_bad_inputs(tmp_path):
    import batching

    def affine(w, x):
        return x @ w

    w = np.ones((16, 16), np.float32)
    inputs = lambda b: (w, np.ones((b, 16), np.float32))  # noqa: E731
    config = tiny().to_dict()
    keep = {k: config[k] for k in ("timing", "roofline", "output")}
    keep["sweep"] = {"passes": 1}
    result = batching.sweep_model(
        affine, inputs, batch_sizes=(1, 4), workdir=str(tmp_path / "api"),
        batch_axes=(None, 0), config=keep,
    )  # fmt: skip
    assert sorted(result.latency_s()) == [1, 4] and os.path.exists(result.report_path)
    assert result.rows[0]["params"] == 256 and result.summary["ops_source"] == "program"
    with pytest.raises(ValueError, match="does not follow batch_size"):
        batching.sweep_model(
            affine, lambda b: (w, np.ones((3, 16), np.float32)), batch_sizes=(1,),
            workdir=str(tmp_path / "bad"), batch_axes=(None, 0), config=keep,
        )  # fmt: skip
    assert not os.path.exists(tmp_path / "bad" / "results.jsonl")
