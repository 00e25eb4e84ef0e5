"""Run by tests/test_mesh.py in a child process that sees 8 forced host devices.

Each check builds a workload (or the decoder's pure functions) on a one-device mesh and on
a sharded mesh of the 8 devices, runs both at fp32 with matmul precision "highest", and
prints one JSON line: the largest relative difference of every output, and which
collectives the compiled sharded programs contain.
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dataclasses  # noqa: E402
import json  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

from batching.measure import timing  # noqa: E402
from batching.setup import topology  # noqa: E402
from batching.workloads import base as workload  # noqa: E402
from batching.workloads import decoder as decoder_workload  # noqa: E402
from batching.workloads import mlp as mlp_workload  # noqa: E402
from batching.workloads import moe as moe_workload  # noqa: E402
from batching.workloads import train  # noqa: E402
from configs import decoder as decoder_configs  # noqa: E402
from configs import default  # noqa: E402
from configs import moe as moe_configs  # noqa: E402
from configs import moe_decoder as moe_decoder_configs  # noqa: E402
from models import decoder, decoding  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def rel_diff(a, b) -> float:
    """max |a - b| / max |b| over every leaf."""
    diffs = [
        float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
        / max(float(np.max(np.abs(np.asarray(y, np.float64)))), 1e-30)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    ]
    return max(diffs)


def one_device(cfg) -> topology.Topology:
    """The reference: a mesh of the first device alone, the same code path."""
    dev = jax.devices()[0]
    mesh = Mesh(np.array([dev]).reshape(1, 1, 1), topology.MESH_AXES)
    return topology.Topology(mesh=mesh, axis_rules=topology.axis_rules(cfg), device=dev)


def config(model, batch_sizes, data=1, expert=1, tp=1):
    cfg = default.get_config()
    cfg.model = model
    cfg.sweep.batch_sizes = batch_sizes
    cfg.mesh.data, cfg.mesh.expert, cfg.mesh.model = data, expert, tp
    with cfg.unlocked():
        cfg.run_name = "mesh"
    return cfg


def collectives(text: str) -> list[str]:
    return sorted(k for k in ("all-reduce", "all-to-all", "all-gather") if k in text)


def run(module, cfg, topo, batch):
    wl = module.build(cfg, topo, "")
    args = wl.make_args(batch)
    compiled = timing.compile_fn(wl.fn, args, wl.donate_argnums)
    out = jax.device_get(compiled.call(*args))
    return wl, out, compiled


def check_mlp() -> dict:
    model = default.get_config().model
    model.width, model.depth = 32, 3
    cfg = config(model, (16,), data=8)
    _, ref, _ = run(mlp_workload, cfg, one_device(cfg), 16)
    _, out, compiled = run(mlp_workload, cfg, topology.build(cfg), 16)
    # 2 data replicas of 4: the expert axis holds replicas of a dense MLP and splits nothing.
    replicas = config(model, (16,), data=2, expert=4)
    wl = mlp_workload.build(replicas, topology.build(replicas), "")
    return {
        "mlp_dp": rel_diff(out, ref),
        "mlp_dp_hlo": collectives(compiled.executable.as_text()),
        "mlp_replicas_parallel_shape": wl.parallel_shape,
    }


def check_user_model() -> dict:
    """A user's module on a 4x2 data-model mesh: without logical axes it splits no weight."""
    from batching.workloads import user

    cfg = config(default.get_config().model, (8,), data=4, tp=2)
    topo = topology.build(cfg)
    plain = nnx.Linear(16, 16, rngs=nnx.Rngs(0))
    split = nnx.with_partitioning(
        nnx.initializers.lecun_normal(), ("embed", "mlp"), eager_sharding=False
    )
    named = nnx.Linear(16, 16, kernel_init=split, rngs=nnx.Rngs(0))
    inputs = lambda b: (np.ones((b, 16), np.float32),)  # noqa: E731
    return {
        "user_plain_parallel_shape": user.build(plain, inputs, topo).parallel_shape,
        "user_named_parallel_shape": user.build(named, inputs, topo).parallel_shape,
    }


def check_moe() -> dict:
    result = {}
    for router in ("token_choice", "expert_choice"):
        model = moe_configs.model(router)
        model.d_model, model.mlp_dim, model.depth = 16, 32, 1
        ref = None
        for name, mesh in (("dp", dict(data=8)), ("ep", dict(expert=8))):
            cfg = config(model.copy_and_resolve_references(), (32,), **mesh)
            topo = topology.build(cfg)
            if ref is None:
                # The same groups (one per device's token shard) routed on one device.
                ref_cfg = cfg.copy_and_resolve_references()
                ref_cfg.model.group_size = 32 // topo.token_shards
                _, ref, _ = run(moe_workload, ref_cfg, one_device(ref_cfg), 32)
            wl, out, compiled = run(moe_workload, cfg, topo, 32)
            fields = wl.point_fields(32)
            key = f"moe_{router}_{name}"
            result[key] = rel_diff(out, ref)
            result[f"{key}_hlo"] = collectives(compiled.executable.as_text())
            result[f"{key}_device_loads"] = fields["device_loads"]
            result[f"{key}_device_max_mean_load"] = fields["device_max_mean_load"]
            result[f"{key}_routing_group_size"] = fields["routing_group_size"]
            result[f"{key}_parallel_shape"] = wl.parallel_shape
        # The same 8-device mesh with experts and groups mapped to no axis: replicas, no
        # all-to-all in the analytic collectives either.
        cfg = config(model.copy_and_resolve_references(), (32,), expert=8)
        cfg.mesh.axis_rules = tuple(
            (name, None) if name in ("experts", "groups") else (name, axes)
            for name, axes in cfg.mesh.axis_rules
        )
        wl = moe_workload.build(cfg, topology.build(cfg), "")
        result[f"moe_{router}_replicas_parallel_shape"] = wl.parallel_shape
        result[f"moe_{router}_replicas_collectives"] = wl.collectives(32)
    return result


def check_moe_dropless() -> dict:
    """Dropless token-choice (capacity 0, ragged products) split over 8 expert devices, and
    over 2 data x 4 expert, against one device: no group can drop, so the output does not
    depend on the grouping at all."""
    model = moe_configs.model("token_choice")
    model.d_model, model.mlp_dim, model.depth, model.capacity_factor = 16, 32, 2, 0.0
    one = config(model.copy_and_resolve_references(), (32,))
    _, ref, _ = run(moe_workload, one, one_device(one), 32)
    result = {}
    for name, mesh in (("ep", dict(expert=8)), ("dp_ep", dict(data=2, expert=4))):
        cfg = config(model.copy_and_resolve_references(), (32,), **mesh)
        wl, out, compiled = run(moe_workload, cfg, topology.build(cfg), 32)
        fields = wl.point_fields(32)
        result[f"moe_dropless_{name}"] = rel_diff(out, ref)
        result[f"moe_dropless_{name}_hlo"] = collectives(compiled.executable.as_text())
        result[f"moe_dropless_{name}_drop_fraction"] = fields["drop_fraction"]
        result[f"moe_dropless_{name}_device_max_mean_load"] = fields["device_max_mean_load"]
        result[f"moe_dropless_{name}_collectives"] = wl.collectives(32)
    return result


def decoder_config(**mesh):
    model = decoder_configs.model("decode")
    model.update(
        vocab_size=64, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=8,
        mlp_dim=64, max_seq_len=16, cache_len=8,
    )  # fmt: skip
    return config(model, (8,), **mesh)


def prefill_then_decode(cfg, topo, layout: str, tokens_BxL, steps: int = 2, dcfg=None):
    """Logits of a prefill of tokens_BxL[:, :-steps] and then `steps` decode steps."""
    dcfg = dcfg or decoder_workload.model_config(cfg.model)
    dcfg = decoder.DecoderConfig(**{**dcfg.__dict__, "cache_layout": layout})
    params = topo.put_state(decoder_workload.random_params(dcfg, 0))
    model = decoder_workload.abstract_decoder(dcfg)
    model.init_cache(tokens_BxL.shape[0], dcfg.max_seq_len)
    graphdef, _, cache = nnx.split(model, nnx.Param, nnx.Cache)
    cache = topo.put_state(cache)

    def prefill(params, cache, tokens, lengths):
        with topo.activate():
            return decoding.prefill(graphdef, params, cache, tokens, lengths)

    def step(params, cache, tokens):
        with topo.activate():
            return decoding.decode_step(graphdef, params, cache, tokens)

    B, L = tokens_BxL.shape
    prompt = topo.put_batch(tokens_BxL[:, : L - steps])
    lengths = topo.put_batch(jnp.full((B,), L - steps, jnp.int32))
    logits, cache = jax.jit(prefill, donate_argnums=1)(params, cache, prompt, lengths)
    outs = [jax.device_get(logits)]
    decode = jax.jit(step, donate_argnums=1)
    for t in range(L - steps, L):
        logits, cache = decode(params, cache, topo.put_batch(tokens_BxL[:, t]))
        outs.append(jax.device_get(logits))
    return outs


def check_decoder() -> dict:
    result = {}
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (8, 6)), jnp.int32)
    for name, mesh, layout in (
        ("dp", dict(data=8), "bksh"),
        ("tp", dict(tp=2, expert=4), "bskh"),
    ):
        cfg = decoder_config(**mesh)
        ref = prefill_then_decode(cfg, one_device(cfg), layout, tokens)
        out = prefill_then_decode(cfg, topology.build(cfg), layout, tokens)
        result[f"decoder_{name}"] = rel_diff(out, ref)
    # The timed tensor-parallel decode step: its collectives, and the cache still donated.
    cfg = decoder_config(tp=2, expert=4)
    topo = topology.build(cfg)
    wl = decoder_workload.build(cfg, topo, "")
    flat = workload.flat_call(wl, 8)
    compiled = timing.compile_fn(flat.fn, flat.args, flat.donate_argnums)
    result["decoder_tp_decode_hlo"] = collectives(compiled.executable.as_text())
    cache_bytes = sum(flat.args[i].nbytes for i in flat.donate_argnums if flat.args[i].ndim > 1)
    out = compiled.call(*flat.args)
    # The cache fed back keeps its placement: the compiled executable (which refuses
    # arguments placed otherwise instead of recompiling) takes it again.
    out = compiled.call(*flat.next_args(flat.args, out))
    result["decoder_tp_fed_back"] = True
    result["decoder_tp_alias_bytes"] = compiled.memory.get("alias_size_in_bytes", 0)
    result["decoder_tp_cache_bytes_per_device"] = cache_bytes // topo.shape["model"]
    # The data-parallel decode step in the CPU's default layout: each device writes its own
    # sequences' cache rows, so no collective at all (XLA alone gathered the cache there).
    cfg = decoder_config(data=8)
    cfg.model.cache_layout = "bksh"
    wl = decoder_workload.build(cfg, topology.build(cfg), "")
    dp = timing.compile_fn(wl.fn, wl.make_args(8), wl.donate_argnums)
    result["decoder_dp_decode_hlo"] = collectives(dp.executable.as_text())
    result["decoder_tp_cache_spec"] = str(out[1].sharding.spec)  # the cache's first leaf: layer 0 k
    return result


def check_moe_decoder() -> dict:
    """The MoE decoder under its own config's rules (batch -> data x expert, GShard), 8-way
    expert parallel: prefill + 2 decode steps against one device routing the same groups
    (one per device: decode_groups = 8), and the decode step's compiled collectives."""
    model = moe_decoder_configs.model()
    model.update(
        vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
        mlp_dim=64, max_seq_len=16, cache_len=8,
    )  # fmt: skip
    cfg = moe_decoder_configs.get_config()
    cfg.model = model
    cfg.sweep.batch_sizes = (8,)
    cfg.mesh.expert = 8
    dcfg = dataclasses.replace(train.model_config(cfg.model), decode_groups=8)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 64, (8, 6)), jnp.int32)
    topo = topology.build(cfg)
    ref = prefill_then_decode(cfg, one_device(cfg), "bksh", tokens, dcfg=dcfg)
    out = prefill_then_decode(cfg, topo, "bksh", tokens, dcfg=dcfg)
    params = topo.put_state(decoder_workload.random_params(dcfg, 0))
    model = decoder_workload.abstract_decoder(dcfg)
    model.init_cache(8, dcfg.max_seq_len)
    graphdef, _, cache = nnx.split(model, nnx.Param, nnx.Cache)

    def step(params, cache, tokens):
        with topo.activate():
            return decoding.decode_step(graphdef, params, cache, tokens)

    args = (params, topo.put_state(cache), topo.put_batch(tokens[:, 0]))
    text = jax.jit(step, donate_argnums=1).lower(*args).compile().as_text()
    return {
        "moe_decoder_ep": rel_diff(out, ref),
        "moe_decoder_ep_decode_hlo": collectives(text),
        "moe_decoder_ep_parallel_shape": topo.parallel_shape(experts=True, model=True),
    }


if __name__ == "__main__":
    assert jax.device_count() == 8, jax.devices()
    checks = {
        "mlp": check_mlp,
        "moe": check_moe,
        "moe_dropless": check_moe_dropless,
        "decoder": check_decoder,
        "moe_decoder": check_moe_decoder,
        "user_model": check_user_model,
    }
    for name in sys.argv[1:] or checks:
        print(json.dumps(checks[name]()), flush=True)
