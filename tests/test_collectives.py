"""Collectives: bus-bandwidth factors, the microbenchmarks on 8 forced host devices, caching."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from batching.measure import collectives
from batching.predict import roofline
from batching.workloads import collectives as comm
from batching.workloads import decoder as decoder_wl
from batching.workloads import moe as moe_wl
from models import decoder
from models.moe import MoEMLPConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bus_factors_follow_nccl_tests():
    assert comm.bus_factor("all_reduce", 8) == pytest.approx(2 * 7 / 8)
    assert comm.bus_factor("all_to_all", 8) == pytest.approx(7 / 8)
    assert comm.bus_factor("all_gather", 4) == pytest.approx(3 / 4)
    # One device sends nothing.
    assert comm.bus_factor("all_reduce", 1) == 0.0
    with pytest.raises(ValueError, match="all_reduce"):
        comm.bus_factor("broadcast", 2)


def test_latency_bandwidth_model_through_two_cached_points(tmp_path, monkeypatch):
    # t(S) = 1e-4 s + S / 1e9 B/s, cached as the microbenchmarks would leave it.
    def result(payload):
        t = 1e-4 + payload / 1e9
        return {"seconds": t, "payload_bytes": payload, "algbw_bytes_per_s": payload / t}

    monkeypatch.setattr(collectives.jax, "process_count", lambda: 1)
    table = {
        f"all_reduce:n4:{p}B": result(p)
        for p in (collectives.SMALL_PAYLOAD_BYTES, collectives.DEFAULT_PAYLOAD_BYTES)
    }
    with open(tmp_path / "device_peaks.json", "w") as f:
        json.dump({"cpu:cpu": {"collectives": table}}, f)

    class Cpu:
        platform, device_kind = "cpu", "cpu"

    alpha, beta = collectives.latency_model(Cpu, "all_reduce", 4, str(tmp_path))
    assert alpha == pytest.approx(1e-4) and beta == pytest.approx(1e9)
    # An all-gather uses the all-reduce's model; an all-to-all was never measured.
    c = comm.entry("all_gather", "model", 4, 1e5, 3)
    t = roofline.comm_time([c], lambda c: collectives.effective_busbw(Cpu, c, str(tmp_path)))
    assert t == pytest.approx(3 * (1e-4 + 1e5 / 1e9))  # count x (α + S/β)
    a2a = comm.entry("all_to_all", "model", 4, 1e5, 1)
    assert collectives.effective_busbw(Cpu, a2a, str(tmp_path)) is None


HLO = """
  %all-reduce = f32[2,1,64]{2,1,0} all-reduce(%fusion.3), channel_id=9, replica_groups={{0,1}}
  %all-to-all.4 = (f32[1,3,64]{2,1,0}, f32[1,3,64]{2,1,0}) all-to-all(%a, %b), channel_id=2
  %get-tuple-element.17 = f32[1,3,64]{2,1,0} get-tuple-element(%all-to-all.4), index=0
  %ags = (bf16[4,8]{1,0}, bf16[16,8]{1,0}) all-gather-start(%p), dimensions={0}
  %agd = bf16[16,8]{1,0} all-gather-done(%ags)
  %add = f32[2,1,64]{2,1,0} add(%all-reduce, %all-reduce)
"""


def test_collectives_read_from_hlo_text():
    got = comm.from_hlo(HLO)
    assert got["counts"] == {"all_reduce": 1, "all_to_all": 1, "all_gather": 1}
    # 2*64*4 all-reduce + 2 x 3*64*4 all-to-all tuple + the all-gather's 16*8*2 result.
    assert got["bytes"] == 512 + 2 * 768 + 256
    assert comm.from_hlo("%x = f32[4]{0} add(%a, %b)") == {"counts": {}, "bytes": 0.0}
    # Tuples of 6 or more carry /*index=5*/ comments (the MoE decoder's EP all-to-all): once
    # missed, so its rows showed no collective at all.
    parts = ", ".join(("/*index=5*/" if i == 5 else "") + "f32[1,3,128]{2,1,0}" for i in range(8))
    got = comm.from_hlo(f"  %all-to-all.2 = ({parts}) all-to-all(%a, %b), channel_id=4")
    assert got == {"counts": {"all_to_all": 1}, "bytes": 8 * 3 * 128 * 4.0}


def test_total_and_wire_bytes():
    cs = [
        comm.entry("all_reduce", "model", 4, 1000, 6),
        comm.entry("all_to_all", "expert", 8, 800, 2),
    ]
    assert comm.total_bytes(cs) == 1000 * 6 + 800 * 2
    assert comm.total_bytes(None) == 0.0
    assert comm.wire_bytes(cs[0]) == pytest.approx(1000 * 6 * 1.5)
    assert comm.wire_bytes(cs[1]) == pytest.approx(800 * 2 * 7 / 8)


CHILD = textwrap.dedent(
    """
    import json, os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, numpy as np
    from jax.sharding import Mesh
    from batching.measure import collectives
    from batching.workloads import collectives as comm

    cache_dir = sys.argv[1]
    devices = np.array(jax.devices()).reshape(2, 1, 4)
    mesh = Mesh(devices, ("data", "expert", "model"))
    first = collectives.mesh_bandwidths(mesh, cache_dir)
    calls = []
    real = collectives.measure
    collectives.measure = lambda *a, **k: calls.append(a) or real(*a, **k)
    second = collectives.mesh_bandwidths(mesh, cache_dir)
    print(json.dumps({"first": first, "second": second, "measured_again": len(calls),
                      "one_device_axis": collectives.bandwidth(mesh, "expert", "all_reduce",
                                                               cache_dir)}))
    """
)


def run_child(code: str, *args: str) -> dict:
    """Runs `code` (which forces 8 host devices before importing jax) in a fresh Python and
    returns the JSON object its last output line holds."""
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_microbenchmarks_on_8_forced_host_devices_are_positive_and_cached(tmp_path):
    got = run_child(CHILD, str(tmp_path))
    first = got["first"]
    # Only axes of more than one device communicate: data (2) and model (4), not expert (1).
    assert set(first) == {"data", "model"}
    for axis, n in (("data", 2), ("model", 4)):
        for kind in collectives.MEASURED:
            r = first[axis][kind]
            assert r["seconds"] > 0 and r["payload_bytes"] > 0
            assert r["algbw_bytes_per_s"] == pytest.approx(r["payload_bytes"] / r["seconds"])
            assert r["busbw_bytes_per_s"] == pytest.approx(
                r["algbw_bytes_per_s"] * comm.bus_factor(kind, n)
            )
            # Host memory moves somewhere between 1 MB/s and 1 TB/s: anything else is a bug.
            assert 1e6 < r["busbw_bytes_per_s"] < 1e12
    assert got["measured_again"] == 0
    assert got["second"] == first
    assert got["one_device_axis"] is None
    with open(os.path.join(tmp_path, "device_peaks.json")) as f:
        cache = json.load(f)
    (entry,) = cache.values()
    assert set(entry["collectives"]) == {
        f"{kind}:n{n}:{collectives.DEFAULT_PAYLOAD_BYTES}B"
        for kind in collectives.MEASURED
        for n in (2, 4)
    }


# ---------------------------------------------------------------- analytic collectives


def _tiny_decoder(**kw):
    base = dict(vocab_size=32, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=4)
    base.update(kw)
    base.setdefault("mlp_dim", 32)
    base.setdefault("max_seq_len", 16)
    return decoder.DecoderConfig(**base)


MESH = {"data": 2, "expert": 1, "model": 2}


@pytest.mark.parametrize("batch, per_device_tokens", [(4, 2), (8, 4)])
def test_tensor_parallel_decode_step_all_reduces_hand_counted(batch, per_device_tokens):
    # 2 all-reduces per layer (after the attention out-projection and the MLP
    # down-projection), each of this device's [tokens, d_model=16] fp32 activations.
    got = decoder_wl.step_collectives(_tiny_decoder(), MESH, batch, 8, decode=True)
    assert got == [
        {
            "kind": "all_reduce",
            "axis": "model",
            "axis_size": 2,
            "bytes": per_device_tokens * 16 * 4,
            "count": 2 * 2,
        }
    ]


def test_tensor_parallel_prefill_counts_every_prompt_token_in_bf16():
    cfg = _tiny_decoder(dtype="bfloat16")
    (got,) = decoder_wl.step_collectives(cfg, MESH, 4, 3, decode=False)
    assert got["bytes"] == 2 * 3 * 16 * 2  # 2 sequences x 3 tokens x 16 x 2 bytes
    assert got["count"] == 4


def test_data_parallel_inference_communicates_nothing():
    dp = {"data": 4, "expert": 1, "model": 1}
    assert decoder_wl.step_collectives(_tiny_decoder(), dp, 8, 8, decode=True) == []


@pytest.mark.parametrize("batch, payload", [(8, 512), (16, 1024)])
def test_expert_parallel_moe_decoder_all_to_alls_hand_counted(batch, payload):
    # One MoE block (moe_every=2 of 2 layers), E=4, top-2, cf 1: a decode step routes this
    # device's batch/2 tokens as one group S; C = ceil(S*2/4) slots; payload E*C*D*4 bytes.
    # batch 8: S=4, C=2 -> 4*2*16*4 = 512; batch 16: S=8, C=4 -> 1024. Dispatch + combine.
    cfg = _tiny_decoder(moe_every=2, num_experts=4, top_k=2, capacity_factor=1.0)
    got = decoder_wl.step_collectives(
        cfg, {"data": 1, "expert": 2, "model": 1}, batch, 8, decode=True
    )
    assert got == [
        {"kind": "all_to_all", "axis": "expert", "axis_size": 2, "bytes": payload, "count": 2}
    ]


@pytest.mark.parametrize("batch, payload", [(8, 128), (32, 384)])
def test_expert_parallel_moe_layer_all_to_alls_hand_counted(batch, payload):
    # Tokens over data*expert = 4 devices; one group per device of S tokens, E=4, top-1,
    # cf 1.25: C = ceil(1.25*S/4). batch 8: S=2, C=1 -> 4*1*8*4 = 128 bytes;
    # batch 32: S=8, C=3 -> 4*3*8*4 = 384. Two all-to-alls per layer, depth 2.
    cfg = MoEMLPConfig(d_model=8, mlp_dim=16, num_experts=4, top_k=1, depth=2)
    got = moe_wl.layer_collectives(cfg, {"data": 2, "expert": 2, "model": 1}, batch)
    assert got == [
        {"kind": "all_to_all", "axis": "expert", "axis_size": 2, "bytes": payload, "count": 4}
    ]


def test_a_batch_that_does_not_split_over_the_mesh_is_an_error_naming_it():
    with pytest.raises(ValueError, match="batch_size"):
        moe_wl.layer_collectives(MoEMLPConfig(), {"data": 2, "expert": 2, "model": 1}, 6)


def test_comm_time_uses_the_bus_factor_and_the_bandwidth():
    cs = [
        comm.entry("all_reduce", "model", 4, 1e6, 2),
        comm.entry("all_to_all", "expert", 8, 8e5, 2),
    ]
    # 1e6*2*1.5 + 8e5*2*7/8 = 3e6 + 1.4e6 bytes at 1e9 B/s.
    assert roofline.comm_time(cs, 1e9) == pytest.approx(4.4e-3)
    per_kind = {"all_reduce": 1e9, "all_to_all": 1e8}
    assert roofline.comm_time(cs, lambda c: per_kind[c["kind"]]) == pytest.approx(3e-3 + 1.4e-2)
    assert roofline.comm_time([], 1e9) == 0.0
    assert roofline.comm_time(None, 1e9) == 0.0


def test_per_device_work_splits_the_global_call():
    row = {
        "analytic_flops": 1200.0,
        "analytic_bytes": 1000.0,
        "weight_bytes": 600.0,
        "gemm_shapes": [[8, 16, 32, 2]],
        "mesh_shape": {"data": 2, "expert": 1, "model": 1},
    }
    dp = roofline.per_device_work(row)
    assert dp["analytic_flops"] == 600.0
    assert dp["analytic_bytes"] == 600.0 + 400.0 / 2  # weights whole, the rest halved
    assert dp["gemm_shapes"] == [[4, 16, 32, 2]]
    tp = roofline.per_device_work({**row, "mesh_shape": {"data": 1, "expert": 1, "model": 4}})
    assert tp["analytic_flops"] == 300.0
    assert tp["analytic_bytes"] == 600.0 / 4 + 400.0 / 4
    assert tp["gemm_shapes"] == [[8, 16, 8, 2]]
    ep = roofline.per_device_work(
        {**row, "mesh_shape": {"data": 1, "expert": 2, "model": 1}, "device_max_mean_load": 1.5}
    )
    assert ep["analytic_flops"] == 1200.0 / 2 * 1.5  # the slowest device's load
    one = {**row, "mesh_shape": {"data": 1, "expert": 1, "model": 1}}
    assert roofline.per_device_work(one) is one


ANALYSIS_CHILD = textwrap.dedent(
    """
    import json, os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, ml_collections, numpy as np
    from batching.measure import collectives
    from batching.workloads import collectives as comm
    from batching.outputs.doc import Doc, ReportData
    from batching.outputs.report_mesh import mesh_section
    from batching.measure import rates
    from batching.predict import analysis, roofline
    from configs import default
    from tests import conftest

    # Rows of a tensor-parallel run over model=4, data=2 (synthetic work, real mesh).
    mesh_shape = {"data": 2, "expert": 1, "model": 4}
    rows, samples = [], {}
    for b in (2, 4, 8, 16):
        calls = [comm.entry("all_reduce", "model", 4, b / 2 * 64 * 4, 4)]
        rows.append({
            "run": "tp", "model": "decoder", "batch_size": b, "latency_s": 1e-3 * (1 + b / 8),
            "dtype": "float32", "param_dtype": "float32", "analytic_flops": 2e6 * b,
            "analytic_bytes": 4e6 + 1e4 * b, "weight_bytes": 4e6, "flops": None,
            "bytes_accessed": None, "achieved_bytes_per_s": 1e9, "mesh_shape": mesh_shape,
            "collectives": calls, "comm_bytes": comm.total_bytes(calls),
        })
        samples[b] = np.full(5, rows[-1]["latency_s"])
    cfg = default.get_config().roofline
    cfg.shape_aware = False
    cfg.bootstrap = 5
    # No check of the seeded peaks: on a loaded machine the check reads slower than the seed,
    # moves the source to a private copy of the cache, and the collectives measured below
    # into the shared one would be out of its sight (a flaky comm term of 0).
    source = rates.RateSource(conftest.PEAKS_DIR, refresh=False, check=False)
    # Nothing measured yet and a CPU has no spec interconnect: no comm term at all.
    _, before = analysis.analyze_run(rows, samples, jax.devices()[0], cfg, source)
    mesh = jax.make_mesh((2, 1, 4), comm.AXES)
    # What the sweep does before its points: measure every collective the rows list.
    collectives.measure_run(mesh, conftest.PEAKS_DIR)
    out, s = analysis.analyze_run(rows, samples, jax.devices()[0], cfg, source)
    alpha, beta = collectives.latency_model(jax.devices()[0], "all_reduce", 4, conftest.PEAKS_DIR)
    # Expert-parallel rows whose slowest device carries 1.5x the mean load.
    ep_rows = [
        {**r, "run": "ep", "mesh_shape": {"data": 1, "expert": 8, "model": 1},
         "collectives": [], "device_max_mean_load": 1.5}
        for r in rows
    ]
    ep_out, ep = analysis.analyze_run(ep_rows, samples, jax.devices()[0], cfg, source)
    doc = Doc()
    mesh_section(doc, ReportData("/", "x", (), [
        {**s, "run": "tp", "knee_batch_size": 1.0, "router": None},
        {**ep, "run": "ep", "knee_batch_size": 1.0, "router": "token_choice"},
    ], [], {}, []))
    print(json.dumps({
        "rows": out, "summary": s, "ep_rows": ep_out, "ep": ep, "alpha": alpha, "beta": beta,
        "before": before, "report": doc.markdown("/"),
    }, default=str))
    """
)


def test_analysis_adds_the_measured_comm_term_on_a_forced_8_device_mesh():
    got = run_child(ANALYSIS_CHILD)
    s, alpha, beta = got["summary"], got["alpha"], got["beta"]
    assert alpha >= 0 and beta > 0
    assert got["before"]["comm_bandwidth_source"] is None
    assert got["before"]["comm_share_median"] is None
    for r in got["rows"]:
        # Each collective at α + bytes/β, whatever the bus factor (it cancels).
        want = sum(c["count"] * (alpha + c["bytes"] / beta) for c in r["collectives"])
        assert r["predicted_comm_s"] == pytest.approx(want) and want > 0
        assert r["predicted_latency_s"] > r["predicted_comm_s"]
    assert s["functional_simulation"] is True and s["num_devices"] == 8
    assert s["predicted_critical_batch_global"] == pytest.approx(2 * s["predicted_critical_batch"])
    assert 0 < s["comm_share_median"] < 1
    assert set(s["collective_busbw_bytes_per_s"]) == {"data", "model"}
    assert s["comm_bandwidth_source"] == "measured on this mesh"
    # The node keeps model=4 and fills the other 4 devices with data replicas.
    node = s["whatif_nodes"]["8x H100 SXM (HGX)"]
    assert node["mesh_shape"] == {"data": 2, "expert": 1, "model": 4}
    assert all(v > 0 for v in node["comm_s"].values())
    # The slowest expert device: 1.5x the mean device's FLOPs, so a slower prediction.
    ep = got["ep"]
    assert ep["device_max_mean_load_first"] == 1.5
    for r in got["ep_rows"]:
        assert r["predicted_latency_s"] >= r["predicted_balanced_latency_s"] > 0
    assert ep["slowest_device_cost_median"] >= 0
    assert "predicted cost of the slowest device" in got["report"]
    assert "Functional simulation" in got["report"]
    assert "measured bus GB/s" in got["report"]
