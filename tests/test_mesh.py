"""Sharded runs on 8 forced host devices equal one-device runs; config errors stop early.

The checks run in child processes, because the forced device count must be set before JAX
starts (tests/mesh_child.py). Largest differences are printed (pytest -s shows them).
"""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import once_per_session, run_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EIGHT = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
# fp32 at matmul precision "highest": a sharded sum reorders additions, nothing more.
RTOL = 1e-5


def run_child(folder: str) -> None:
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tests", "mesh_child.py")],
        capture_output=True,
        text=True,
        env=EIGHT,
        cwd=ROOT,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(folder, "checks.jsonl"), "w") as f:
        f.write(proc.stdout)


@pytest.fixture(scope="module")
def checks() -> dict:
    # The child takes ~20 s: one run per session, whichever xdist worker asks first.
    folder = once_per_session("mesh_child", run_child)
    out = {}
    with open(os.path.join(folder, "checks.jsonl")) as f:
        for line in f:
            out.update(json.loads(line))
    diffs = {k: v for k, v in out.items() if isinstance(v, float) and "load" not in k}
    print("largest relative differences, sharded vs one device:", json.dumps(diffs))
    return out


def test_sharded_outputs_equal_one_device(checks):
    for key in ("mlp_dp", "decoder_dp", "decoder_tp", "moe_decoder_ep"):
        assert checks[key] <= RTOL, (key, checks[key])
    for router in ("token_choice", "expert_choice"):
        for kind in ("dp", "ep"):
            key = f"moe_{router}_{kind}"
            assert checks[key] <= RTOL, (key, checks[key])


def test_a_user_model_is_model_parallel_only_where_its_weights_are_split(checks):
    assert checks["user_plain_parallel_shape"] == {"data": 4, "expert": 1, "model": 1}
    assert checks["user_named_parallel_shape"] == {"data": 4, "expert": 1, "model": 2}


def test_dropless_moe_on_expert_devices_equals_one_device(checks):
    for name in ("ep", "dp_ep"):
        key = f"moe_dropless_{name}"
        assert checks[key] <= RTOL, (key, checks[key])
        assert checks[f"{key}_drop_fraction"] == 0.0  # nothing can drop
        assert checks[f"{key}_device_max_mean_load"] >= 1.0
        # XLA's partitioner runs every assignment of a data replica through each device's own
        # experts and all-reduces the partial results (no all-to-all); the analytic count
        # says the same: gate/up and down, once per layer each.
        assert "all-reduce" in checks[f"{key}_hlo"] and "all-to-all" not in checks[f"{key}_hlo"]
        kinds = [(c["kind"], c["count"]) for c in checks[f"{key}_collectives"]]
        assert kinds == [("all_reduce", 2), ("all_reduce", 2)]


def test_collectives_in_compiled_programs(checks):
    # Data parallelism of a replicated MLP needs no collective at all.
    assert checks["mlp_dp_hlo"] == []
    for router in ("token_choice", "expert_choice"):
        # Expert parallelism: dispatched tokens cross devices by all-to-all (GShard), and
        # routing stays on each device (no gather of the router's top-k).
        assert checks[f"moe_{router}_ep_hlo"] == ["all-to-all"], router
        assert checks[f"moe_{router}_dp_hlo"] == [], router
    # Tensor parallelism: the row-parallel projections' partial sums are all-reduced.
    assert checks["decoder_tp_decode_hlo"] == ["all-reduce"]
    assert checks["decoder_dp_decode_hlo"] == []
    # The MoE decoder's sequences split over data x expert (GShard): its expert-parallel
    # decode step exchanges tokens by all-to-all, gathering nothing.
    assert checks["moe_decoder_ep_decode_hlo"] == ["all-to-all"]


def test_tensor_parallel_cache_is_split_by_kv_head_and_donated(checks):
    # [B, S, K, H] split over kv heads (mesh.data is 1 here, so the batch is not split).
    assert checks["decoder_tp_cache_spec"] == "P(None, None, 'model')"
    assert checks["decoder_tp_fed_back"]
    # The whole per-device cache (k, v) is aliased to the output: updated in place.
    assert checks["decoder_tp_alias_bytes"] >= checks["decoder_tp_cache_bytes_per_device"]


def test_parallel_shape_counts_only_the_axes_that_split_the_model(checks):
    # Axes the model maps nothing to hold replicas: the per-device roofline and the
    # analytic collectives must not divide by them.
    assert checks["mlp_replicas_parallel_shape"] == {"data": 2, "expert": 1, "model": 1}
    for router in ("token_choice", "expert_choice"):
        assert checks[f"moe_{router}_dp_parallel_shape"] == {"data": 8, "expert": 1, "model": 1}
        assert checks[f"moe_{router}_ep_parallel_shape"] == {"data": 1, "expert": 8, "model": 1}
        assert checks[f"moe_{router}_replicas_parallel_shape"]["expert"] == 1
        assert checks[f"moe_{router}_replicas_collectives"] == []
    # A batch over (data, expert) is expert parallelism, not 8 more ways of data parallelism.
    assert checks["moe_decoder_ep_parallel_shape"] == {"data": 1, "expert": 8, "model": 1}


def test_device_loads(checks):
    for router in ("token_choice", "expert_choice"):
        ep, dp = checks[f"moe_{router}_ep_device_loads"], checks[f"moe_{router}_dp_device_loads"]
        assert len(ep) == 8 and len(dp) == 1
        # Every wanted assignment lands on exactly one device of the expert axis.
        assert sum(ep) == pytest.approx(sum(dp))
        ratio = checks[f"moe_{router}_ep_device_max_mean_load"]
        assert ratio == pytest.approx(max(ep) / (sum(ep) / len(ep)))
        assert checks[f"moe_{router}_ep_routing_group_size"] == 4  # 32 tokens / 8 devices
    assert sum(checks["moe_token_choice_ep_device_loads"]) == pytest.approx(32 * 2)
    # Expert-choice: every expert takes exactly its capacity, so no device is slower.
    assert checks["moe_expert_choice_ep_device_max_mean_load"] == pytest.approx(1.0)


@pytest.mark.parametrize(
    "flags, field",
    [
        (["--config.mesh.data=3"], "mesh"),
        (["--config.mesh.data=8", "--config.sweep.batch_sizes=(4,8)"], "sweep.batch_sizes"),
        (["--config=configs/moe.py", "--config.mesh.expert=8", "--config.model.num_experts=4"],
         "mesh.expert"),
    ],
)  # fmt: skip
def test_mesh_config_errors_are_one_line_exit_2(tmp_path, flags, field):
    workdir = tmp_path / "w"
    config = [f for f in flags if f.startswith("--config=")] or ["--config=configs/mlp.py"]
    rest = [f for f in flags if not f.startswith("--config=")]
    proc = run_main(*config, f"--workdir={workdir}", *rest, env=EIGHT, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and field in errors[0], proc.stderr[-2000:]
    assert not workdir.exists()
