"""The decoder as a workload: one decode step or one prefill, timed with the cache donated.

- phase "decode": B sequences whose caches hold `cache_len` positions; one step writes
  position cache_len-1 and attends over all cache_len slots. Between timed steps the
  lengths are set back, so every step costs the same and the cache never overflows.
- phase "prefill": B prompts of `prompt_len` tokens written into an empty cache.

The cache's layout is `model.cache_layout`, "auto" resolved for the device's platform
(models.kv_cache.DEFAULT_LAYOUT); rows carry the resolved `cache_layout`, and decode rows the
`ops` the roofline prices one by one (batching/ops.py).
"""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from batching.ops import Op
from batching.workload import Workload
from batching.workloads import moe as moe_workload
from models import decoder, kv_cache
from models.dtypes import resolve_dtype

PHASES = ("decode", "prefill")
# The attention the roofline times at each row's attention_shapes (peaks.attention_seconds).
ATTEND = kv_cache.attend_cache


def model_config(model_cfg: ml_collections.ConfigDict) -> decoder.DecoderConfig:
    return decoder.DecoderConfig(
        vocab_size=model_cfg.vocab_size,
        d_model=model_cfg.d_model,
        n_layers=model_cfg.n_layers,
        n_heads=model_cfg.n_heads,
        n_kv_heads=model_cfg.n_kv_heads,
        head_dim=model_cfg.head_dim,
        mlp_dim=model_cfg.mlp_dim,
        max_seq_len=model_cfg.max_seq_len,
        rope_theta=model_cfg.rope_theta,
        tie_embeddings=model_cfg.tie_embeddings,
        dtype=model_cfg.dtype,
        param_dtype=model_cfg.param_dtype,
        cache_dtype=model_cfg.cache_dtype,
        cache_layout=model_cfg.get("cache_layout", "auto"),
    )


def validate(model_cfg: ml_collections.ConfigDict) -> None:
    check_phase(model_cfg, model_config(model_cfg))


def check_phase(model_cfg: ml_collections.ConfigDict, cfg: decoder.DecoderConfig) -> None:
    """The sweep fields every decoder workload shares: phase and its length."""
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
    """One decode step (B tokens attending over `length` cache slots) or one prefill (B prompts
    of `length` tokens) as ops: the source of the workload's cost and GEMM shapes.

    The totals are models.decoder.decode_step_cost and prefill_cost (ANCHORS §4): 2 FLOPs per
    parameter per token (an RMSNorm's scale counts as a parameter, as in the formula's P), the
    unembedding at one token per sequence, QKᵀ and AV over the cache (decode) or the L×L scores
    (prefill); bytes are the weights read once and the KV cache read (decode) and written.
    Activations, the embedding rows and the logits are left out, as the formulas do; the
    embedding gather is a launch with no bytes. An MoE block's MLP is models.moe's
    capacity-padded einsums (moe workload's layer_ops) with the step's tokens as one routing
    group (a sequence's L tokens in prefill), so its FLOPs are the exact count, below the
    dense-equivalent upper bound of decode_step_cost.
    """
    D, N, K, H, F = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.mlp_dim
    L, V = cfg.n_layers, cfg.vocab_size
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
    if decode:
        attention = Op(
            "attention",
            "attention",
            (batch, K, length, N // K, H),
            flops=4 * batch * K * length * (N // K) * H,
            bytes=2 * batch * K * length * H * cache_bytes,
            count=L,
            dtype=cfg.cache_dtype,
            layout=layout,
        )
    else:
        # Over the prompt's own L×L scores, no cache read: priced at the peak FLOP rate.
        attention = Op(
            "attention",
            "attention",
            (batch, N, length, length, H),
            flops=4 * batch * N * H * length * length,
            bytes=0,
            count=L,
            dtype=dt,
        )
    ops = [
        Op("embed", "gather_scatter", (T, D), 0, 0, dtype=dt),
        norm("attn_norm", L),
        gemm("query", T, D, N * H, L),
        gemm("key_value", T, D, K * H, 2 * L),
        Op("kv_write", "gather_scatter", (batch, K, H), 0, kv_written, count=L, dtype=dt),
        attention,
        gemm("out", T, N * H, D, L),
        norm("mlp_norm", L),
    ]
    if L - n_moe:
        ops += [gemm("gate_up", T, D, F, 2 * (L - n_moe)), gemm("down", T, F, D, L - n_moe)]
    if n_moe:
        group = batch if decode else length
        ops += moe_workload.layer_ops(cfg.moe_config(), T, group, pb, 0, count=n_moe)
    ops += [norm("final_norm", 1), gemm("unembed", batch, D, V, 1)]
    return ops


def abstract_decoder(cfg: decoder.DecoderConfig) -> decoder.Decoder:
    """Decoder(cfg) with shape-only weights: its graph, without running an initialiser."""
    return nnx.eval_shape(lambda: decoder.Decoder(cfg, rngs=nnx.Rngs(0)))


def random_params(cfg: decoder.DecoderConfig, seed: int) -> nnx.State:
    """Freshly initialised weights in one jitted program (eager init compiles per shape)."""
    return jax.jit(lambda: nnx.state(decoder.Decoder(cfg, rngs=nnx.Rngs(seed)), nnx.Param))()


def _set_lengths(cache: nnx.State, lengths_B: np.ndarray) -> nnx.State:
    def put(path, leaf):
        names = {getattr(p, "key", getattr(p, "name", None)) for p in path}
        return jnp.asarray(lengths_B) if "lengths" in names else leaf

    return jax.tree_util.tree_map_with_path(put, cache)


def build(run_cfg: ml_collections.ConfigDict, device: jax.Device, workdir: str) -> Workload:
    del workdir
    return build_decoder(run_cfg, model_config(run_cfg.model), device)


def build_decoder(
    run_cfg: ml_collections.ConfigDict,
    cfg: decoder.DecoderConfig,
    device: jax.Device,
    params: nnx.State | None = None,
    tokens: np.ndarray | None = None,
) -> Workload:
    """The decode or prefill workload of Decoder(cfg); `params` replace the random init
    (trained weights), and `tokens` (int32) are drawn for the inputs instead of zeros."""
    m = run_cfg.model
    layout = kv_cache.resolve_layout(cfg.cache_layout, device.platform)
    cfg = dataclasses.replace(cfg, cache_layout=layout)
    model = abstract_decoder(cfg)
    param_bytes = resolve_dtype(cfg.param_dtype).itemsize
    cache_bytes = resolve_dtype(cfg.cache_dtype).itemsize
    model.init_cache(1, 1)
    graphdef = nnx.split(model, nnx.Param, nnx.Cache)[0]
    if params is None:
        params = random_params(cfg, run_cfg.seed)
    params = jax.device_put(params, device)
    rng = np.random.default_rng(run_cfg.seed)

    def input_tokens(shape: tuple[int, ...]) -> jax.Array:
        if tokens is None:
            return jax.device_put(jnp.zeros(shape, jnp.int32), device)
        start = rng.integers(0, tokens.size - int(np.prod(shape)))
        flat = tokens[start : start + int(np.prod(shape))].astype(np.int32)
        return jax.device_put(flat.reshape(shape), device)

    decode = m.phase == "decode"
    length = m.cache_len if decode else m.prompt_len

    def empty_cache(batch: int) -> nnx.State:
        model.init_cache(batch, length)
        cache = nnx.state(model, nnx.Cache)
        model.init_cache(1, 1)  # the model keeps no big buffers between points
        return jax.device_put(cache, device)

    if decode:

        def fn(params, cache, tokens_B):
            return decoder.decode_step(graphdef, params, cache, tokens_B)

        def make_args(batch: int):
            lengths = np.full((batch,), length - 1, np.int32)
            cache = _set_lengths(empty_cache(batch), lengths)
            return params, cache, input_tokens((batch,))

        def next_args(args, out):
            # The step advanced every length to cache_len: set them back so the next step
            # writes the same slot and costs the same.
            lengths = np.full((args[2].shape[0],), length - 1, np.int32)
            return args[0], _set_lengths(out[1], lengths), args[2]

        examples = lambda batch: batch
    else:

        def fn(params, cache, tokens_BxL, lengths_B):
            return decoder.prefill(graphdef, params, cache, tokens_BxL, lengths_B)

        def make_args(batch: int):
            lengths = jnp.full((batch,), length, jnp.int32)
            prompt = input_tokens((batch, length))
            return params, empty_cache(batch), prompt, jax.device_put(lengths, device)

        def next_args(args, out):
            return args[0], out[1], args[2], args[3]

        examples = lambda batch: batch * length

    n_params = decoder.num_params(cfg)
    return Workload(
        fn=fn,
        make_args=make_args,
        params=n_params,
        param_bytes=n_params * param_bytes,
        ops=lambda batch: step_ops(cfg, batch, length, m.phase, param_bytes, cache_bytes, layout),
        donate_argnums=(1,),
        next_args=next_args,
        examples=examples,
        example_unit="tokens",
        fields={
            "phase": m.phase,
            "cache_len": length if decode else None,
            "prompt_len": None if decode else length,
            "kv_bytes_per_token": 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * cache_bytes,
            "cache_dtype": cfg.cache_dtype,
            "cache_layout": layout,
        },
    )
