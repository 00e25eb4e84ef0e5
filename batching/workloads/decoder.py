"""The decoder as a workload: one decode step or one prefill, timed with the cache donated.

- Phase "decode": B sequences whose caches hold `cache_len` positions. One step writes
  position cache_len-1 and attends over all cache_len slots. Between timed steps the
  lengths are set back. So every step costs the same, and the cache never overflows.
- Phase "prefill": B prompts of `prompt_len` tokens are written into an empty cache.

`model_config` is the one place the cache is resolved for a device. "auto" picks the
platform's layout from DEFAULT_LAYOUT, or "bskh" under tensor parallelism. The write method
follows the platform (CACHE_UPDATE). Rows carry the resolved `cache_layout`.

Letters in array names (models/__init__.py): B batch, L prompt length, V vocab.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from batching.setup.topology import Topology
from batching.workloads import base
from batching.workloads import collectives as comm
from batching.workloads import moe as moe_workload
from batching.workloads.base import Workload
from batching.workloads.family import Family
from batching.workloads.ops import Op
from models import decoder, decoding, kv_cache
from models.dtypes import resolve_dtype

PHASES = ("decode", "prefill")
# The attention the roofline times at each row's attention_shapes (peaks.attention_seconds).
ATTEND = kv_cache.attend_cache


# jax platform -> the cache layout "auto" picks. Only the CPU's is measured here
# (`experiments/attention_layouts.py`). "bksh" elsewhere keeps each (sequence, head) slab
# contiguous: the [batch, heads, seq, head_dim] order FlashAttention takes.
DEFAULT_LAYOUT = {"cpu": "bksh", "gpu": "bksh", "tpu": "bksh"}
# jax platform -> how a decode step writes the cache. On a CPU the loop costs what the
# scatter does, and XLA's byte count then matches the analytic one. An accelerator runs the
# scatter as one kernel, where a loop pays a launch per sequence.
CACHE_UPDATE = {"cpu": "loop"}


def model_config(
    model_cfg: ml_collections.ConfigDict, topo: Topology | None = None
) -> decoder.DecoderConfig:
    """The model's config from the run's `model` section (base.config_of).

    The cache is resolved for `topo`'s platform and mesh. A `topo` of None, as in
    validation, stands for one CPU.
    """
    platform = topo.device.platform if topo is not None else "cpu"
    layout = model_cfg.get("cache_layout", "auto")
    if layout == "auto":
        tensor_parallel = topo is not None and topo.shape["model"] > 1
        layout = "bskh" if tensor_parallel else DEFAULT_LAYOUT.get(platform, "bksh")
    elif layout not in kv_cache.LAYOUTS:
        raise ValueError(
            f"model.cache_layout must be 'auto' or one of {kv_cache.LAYOUTS}, got {layout!r}"
        )
    fields = {key: model_cfg[key] for key in model_cfg}
    fields.update(cache_layout=layout, cache_update=CACHE_UPDATE.get(platform, "scatter"))
    return base.config_of(decoder.DecoderConfig, fields)


def validate(model_cfg: ml_collections.ConfigDict) -> None:
    """Checks the model section: DecoderConfig, phase, and cache_len or prompt_len.

    A bad field raises ValueError naming it as model.<field>.
    """
    check_phase(model_cfg, model_config(model_cfg))


def check_phase(model_cfg: ml_collections.ConfigDict, cfg: decoder.DecoderConfig) -> None:
    """Checks the sweep fields every decoder workload shares: phase and its length."""
    if model_cfg.phase not in PHASES:
        raise ValueError(f"model.phase must be one of {PHASES}, got {model_cfg.phase!r}")
    length = model_cfg.cache_len if model_cfg.phase == "decode" else model_cfg.prompt_len
    name = "cache_len" if model_cfg.phase == "decode" else "prompt_len"
    if not isinstance(length, int) or isinstance(length, bool) or length <= 0:
        raise ValueError(f"model.{name} must be a positive integer, got {length!r}")
    if length > cfg.max_seq_len:
        raise ValueError(
            f"model.{name} must be <= model.max_seq_len={cfg.max_seq_len}, got {length!r}"
        )


def step_ops(
    cfg: decoder.DecoderConfig,
    batch: int,
    length: int,
    phase: str,
    param_bytes: int,
    cache_bytes: int,
    layout: str = "",
) -> list[Op]:
    """One decode step or one prefill as ops.

    The ops are the source of the workload's cost and GEMM shapes. A decode step is B tokens
    attending over `length` cache slots. A prefill is B prompts of `length` tokens. The
    FLOPs count these parts.

    - One multiply-add, 2 FLOPs, per parameter per token. An RMSNorm's scale counts as a
      parameter.
    - The unembedding, at one token per sequence.
    - QKᵀ and AV, over the cache in decode and over the L×L scores in prefill.

    The bytes are the weights, read once. Decode also reads the KV cache, and both phases
    write it. Activations, the embedding rows and the logits are left out. The embedding
    gather is a launch with no bytes.

    An MoE block's MLP is models.moe's capacity-padded einsums (the moe workload's
    layer_ops). Its routing group is the step's tokens in decode, and a sequence's L tokens
    in prefill. So its FLOPs are the exact count of the padded slots. They are not the
    dense-equivalent model's FLOPs.
    """
    D, N, K, H, F = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.mlp_dim
    layers, V = cfg.n_layers, cfg.vocab_size
    decode = phase == "decode"
    T = batch if decode else batch * length  # tokens through the weight matmuls
    n_moe = len(decoder.moe_layers(cfg))
    pb, dt = param_bytes, cfg.dtype

    def gemm(name, m, k, n, count):
        w = k * n * pb
        return Op(name, "gemm", (m, k, n), 2 * m * k * n, w, w, count=count, dtype=dt)

    def norm(name, count):
        return Op(name, "elementwise", (T, D), 2 * T * D, D * pb, D * pb, count=count, dtype=dt)

    kv_written = 2 * batch * K * H * (1 if decode else length) * cache_bytes
    attention = attention_op(cfg, batch, length, decode, cache_bytes, layout)
    ops = [
        Op("embed", "gather_scatter", (T, D), 0, 0, dtype=dt),
        norm("attn_norm", layers),
        gemm("query", T, D, N * H, layers),
        gemm("key_value", T, D, K * H, 2 * layers),
        Op("kv_write", "gather_scatter", (batch, K, H), 0, kv_written, count=layers, dtype=dt),
        attention,
        gemm("out", T, N * H, D, layers),
        norm("mlp_norm", layers),
    ]
    if layers - n_moe:
        ops += [
            gemm("gate_up", T, D, F, 2 * (layers - n_moe)),
            gemm("down", T, F, D, layers - n_moe),
        ]
    if n_moe:
        group = batch if decode else length
        ops += moe_workload.layer_ops(cfg.moe_config(), T, group, pb, 0, count=n_moe)
    ops += [norm("final_norm", 1), gemm("unembed", batch, D, V, 1)]
    return ops


def attention_op(
    cfg: decoder.DecoderConfig,
    batch: int,
    length: int,
    decode: bool,
    cache_bytes: int,
    layout: str,
) -> Op:
    """The layers' attention as one op.

    A decode step's attention runs QKᵀ and AV over `length` cache slots. It reads the cache
    once. A prefill's attention runs over the prompt's own L×L scores. It reads no cache, so
    it is priced at the peak FLOP rate.
    """
    N, K, H, layers = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.n_layers
    if decode:
        return Op(
            "attention",
            "attention",
            (batch, K, length, N // K, H),
            flops=4 * batch * K * length * (N // K) * H,
            bytes=2 * batch * K * length * H * cache_bytes,
            count=layers,
            dtype=cfg.cache_dtype,
            layout=layout,
        )
    return Op(
        "attention",
        "attention",
        (batch, N, length, length, H),
        flops=4 * batch * N * H * length * length,
        bytes=0,
        count=layers,
        dtype=cfg.dtype,
    )


def tensor_parallel_all_reduces(
    cfg: decoder.DecoderConfig, mesh_shape: dict[str, int], tokens_per_device: int
) -> list[dict]:
    """The all-reduces of tensor parallelism over `model` (Megatron-LM, Shoeybi et al. 2019, §3).

    The heads and the MLP hidden dim are split over `model`. So two projections leave a
    partial sum of the [tokens, D] activations. They are the attention out-projection and
    the MLP down-projection. One
    all-reduce sums each. That makes 2 per layer, with payload tokens·D in the compute
    dtype. An MoE block's experts split their hidden dim the same way (logical `mlp` ->
    model). So an MoE block also ends in one. There are none without a model axis.
    """
    n = mesh_shape["model"]
    if n == 1:
        return []
    payload = tokens_per_device * cfg.d_model * resolve_dtype(cfg.dtype).itemsize
    return [comm.entry("all_reduce", "model", n, payload, 2 * cfg.n_layers)]


def expert_parallel_all_to_alls(
    cfg: decoder.DecoderConfig,
    mesh_shape: dict[str, int],
    tokens_per_device: int,
    group_size: int,
) -> list[dict]:
    """The MoE blocks' dispatch and combine over `expert` (batching.workloads.moe.all_to_alls)."""
    return moe_workload.all_to_alls(
        cfg.moe_config(),
        mesh_shape,
        tokens_per_device,
        group_size,
        len(decoder.moe_layers(cfg)),
        resolve_dtype(cfg.dtype).itemsize,
    )


def step_collectives(
    cfg: decoder.DecoderConfig, mesh_shape: dict[str, int], batch: int, length: int, decode: bool
) -> list[dict]:
    """The collectives of one decode step or prefill at global batch `batch`.

    A decode step has one token per sequence, and a prefill has `length`. Sequences are split
    over `data`. They are split over `expert` too when the model has MoE blocks and an
    expert axis. The routing groups are then each device's own tokens (GShard). Data
    parallelism alone needs no collectives for inference.
    """
    moe = mesh_shape["expert"] > 1 and bool(decoder.moe_layers(cfg))
    seqs = comm.shards(
        batch, mesh_shape["data"] * (mesh_shape["expert"] if moe else 1), "batch_size"
    )
    tokens = seqs * (1 if decode else length)
    # Decode routes the step's tokens as one group; prefill one group per sequence (or
    # moe_group_size tokens), as models.decoder routes them.
    group = tokens if decode else (cfg.moe_group_size or length)
    return tensor_parallel_all_reduces(cfg, mesh_shape, tokens) + (
        expert_parallel_all_to_alls(cfg, mesh_shape, tokens, group) if moe else []
    )


def abstract_decoder(cfg: decoder.DecoderConfig) -> decoder.Decoder:
    """Decoder(cfg) with shape-only weights: its graph, without running an initialiser."""
    return nnx.eval_shape(lambda: decoder.Decoder(cfg, rngs=nnx.Rngs(0)))


def random_params(cfg: decoder.DecoderConfig, seed: int) -> nnx.State:
    """Fresh weights from one jitted program; an eager init would compile per weight shape."""
    return jax.jit(lambda: nnx.state(decoder.Decoder(cfg, rngs=nnx.Rngs(seed)), decoder.WEIGHTS))()


def map_lengths(cache: nnx.State, fn: Callable[[jax.Array], jax.Array]) -> nnx.State:
    """`cache` with every layer's lengths replaced by fn(lengths) (inside a jitted step)."""

    def put(path, leaf):
        names = {getattr(p, "key", getattr(p, "name", None)) for p in path}
        return fn(leaf) if "lengths" in names else leaf

    return jax.tree_util.tree_map_with_path(put, cache)


def build(run_cfg: ml_collections.ConfigDict, topo: Topology, workdir: str) -> Workload:
    """A randomly initialised decoder's decode step or prefill, as model.phase picks.

    It is placed on the run's mesh and timed with its cache donated.
    """
    del workdir
    return build_decoder(run_cfg, model_config(run_cfg.model, topo), topo)


def build_decoder(
    run_cfg: ml_collections.ConfigDict,
    cfg: decoder.DecoderConfig,
    topo: Topology,
    params: nnx.State | None = None,
    tokens: np.ndarray | None = None,
) -> Workload:
    """The decode or prefill workload of Decoder(cfg).

    `params`, such as trained weights, replace the random init. The inputs are windows of
    `tokens` (int32) when given, and zeros otherwise.
    """
    m = run_cfg.model
    layout = cfg.cache_layout
    param_bytes = resolve_dtype(cfg.param_dtype).itemsize
    cache_bytes = resolve_dtype(cfg.cache_dtype).itemsize
    decode = m.phase == "decode"
    length = m.cache_len if decode else m.prompt_len
    if params is None:
        params = random_params(cfg, run_cfg.seed)
    call = DecoderCall(cfg, topo, topo.put_state(params), length, tokens, run_cfg.seed)
    mesh_shape = topo.parallel_shape(experts=bool(decoder.moe_layers(cfg)), model=True)
    n_params = decoder.num_params(cfg)
    return Workload(
        fn=call.decode_fn if decode else call.prefill_fn,
        make_args=call.decode_args if decode else call.prefill_args,
        params=n_params,
        param_bytes=n_params * param_bytes,
        ops=lambda batch: step_ops(cfg, batch, length, m.phase, param_bytes, cache_bytes, layout),
        donate_argnums=(1,),
        # The new cache (output 1) is the next call's cache (argument 1).
        carry={1: 1},
        examples=(lambda batch: batch) if decode else (lambda batch: batch * length),
        example_unit="tokens",
        collectives=lambda batch: step_collectives(cfg, mesh_shape, batch, length, decode),
        parallel_shape=mesh_shape,
        fields={
            "phase": m.phase,
            "cache_len": length if decode else None,
            "prompt_len": None if decode else length,
            "kv_bytes_per_token": 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * cache_bytes,
            "cache_dtype": cfg.cache_dtype,
            "cache_layout": layout,
        },
    )


class DecoderCall:
    """A decoder's decode step or prefill as the sweep times it.

    It holds the pure function over (params, cache, tokens, lengths) on the run's mesh. It
    also builds that function's arguments at a batch size.
    """

    def __init__(self, cfg, topo, params, length, tokens, seed):
        self.topo, self.params, self.length, self.tokens = topo, params, length, tokens
        self.model = abstract_decoder(cfg)
        self.model.init_cache(1, 1)
        self.graphdef = nnx.split(self.model, decoder.WEIGHTS, nnx.Cache)[0]
        self.rng = np.random.default_rng(seed)

    def input_tokens(self, shape: tuple[int, ...]) -> jax.Array:
        """Zeros, or a window of the held-out tokens the workload was given."""
        if self.tokens is None:
            return self.topo.put_batch(jnp.zeros(shape, jnp.int32))
        start = self.rng.integers(0, self.tokens.size - int(np.prod(shape)))
        flat = self.tokens[start : start + int(np.prod(shape))].astype(np.int32)
        return self.topo.put_batch(flat.reshape(shape))

    def empty_cache(self, batch: int) -> nnx.State:
        """A fresh cache of `batch` sequences, placed on the mesh."""
        self.model.init_cache(batch, self.length)
        cache = nnx.state(self.model, nnx.Cache)
        self.model.init_cache(1, 1)  # the model keeps no big buffers between points
        return self.topo.put_state(cache)

    def keep_placement(self, cache: nnx.State) -> nnx.State:
        """Constrains the new cache to leave placed as the old one came in.

        XLA would otherwise pick its own placement. With the constraint, feeding the cache
        back neither recompiles nor moves it.
        """
        return jax.lax.with_sharding_constraint(cache, self.topo.state_shardings(cache))

    def decode_fn(self, params, cache, tokens_B, lengths_B):
        """One decode step, starting from the given lengths.

        Every step starts from the same lengths, cache_len - 1. It writes the same slot and
        attends over the same positions. So each timed step costs the same. The cache it
        feeds back never overflows.
        """
        with self.topo.activate():
            cache = map_lengths(cache, lambda _: lengths_B)
            logits_BxV, cache = decoding.decode_step(self.graphdef, params, cache, tokens_B)
        return logits_BxV, self.keep_placement(cache)

    def decode_args(self, batch: int):
        """(params, an empty cache, one token per sequence, lengths cache_len - 1)."""
        lengths = self.topo.put_batch(np.full((batch,), self.length - 1, np.int32))
        return self.params, self.empty_cache(batch), self.input_tokens((batch,)), lengths

    def prefill_fn(self, params, cache, tokens_BxL, lengths_B):
        """One prefill of the batch's prompts into the cache."""
        with self.topo.activate():
            logits_BxV, cache = decoding.prefill(
                self.graphdef, params, cache, tokens_BxL, lengths_B
            )
        return logits_BxV, self.keep_placement(cache)

    def prefill_args(self, batch: int):
        """(params, an empty cache, the prompts, their lengths)."""
        lengths = jnp.full((batch,), self.length, jnp.int32)
        prompt = self.input_tokens((batch, self.length))
        return self.params, self.empty_cache(batch), prompt, self.topo.put_batch(lengths)


FAMILY = Family("decoder", build=build, validate=validate, attend=ATTEND)
