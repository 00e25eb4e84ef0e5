"""A small byte-level decoder with an MoE layer in every second block, trained on stdlib text.

Train it from Python (batching/workloads/train.py):

    from batching.outputs.tensorboard import EventLog
    from batching.workloads import train
    from configs import moe_decoder
    config = moe_decoder.get_config()  # or get_config("expert_choice")
    summary = train.run(config, "/tmp/moe", EventLog("/tmp/moe", config.name))

The trained weights land in <workdir>/params/<name>.npz; batching.workloads.checkpoint's
`load_params` restores them for inference sweeps, which read `model.phase`, `model.cache_len`
and `model.prompt_len`.

arg: "token_choice_k1" (Switch), "token_choice_k2" (GShard, the default) or "expert_choice".
"""

from ml_collections import config_dict

from configs import default

ROUTER_ARGS = {
    "token_choice_k1": ("token_choice", 1),
    "token_choice_k2": ("token_choice", 2),
    "expert_choice": ("expert_choice", 2),  # top_k is unused by expert-choice
}


def model(router: str = "token_choice", top_k: int = 2) -> config_dict.ConfigDict:
    m = config_dict.ConfigDict()
    m.name = "moe_decoder"
    m.phase = "decode"
    m.vocab_size = 256  # bytes
    m.d_model = 128
    m.n_layers = 4
    m.n_heads = 4
    m.n_kv_heads = 2
    m.head_dim = 32
    m.mlp_dim = 256
    m.max_seq_len = 512
    m.rope_theta = 10000.0
    m.tie_embeddings = False
    # Blocks 1 and 3 are MoE: (layer + 1) % moe_every == 0.
    m.moe_every = 2
    m.num_experts = 8
    m.top_k = top_k
    m.capacity_factor = 1.25
    m.router = router
    m.renormalize = False
    # Tokens per routing group in a full forward; 0 = one group per sequence.
    m.moe_group_size = 0
    # A per-expert bias on the top-k choice (token-choice only), moved by training
    # (train.router_bias_update_rate); saved with the parameters.
    m.router_bias = False
    m.dtype = "float32"
    m.param_dtype = "float32"
    m.cache_dtype = "float32"
    # KV-cache axis order: "bksh" [B, K, S, H], "bskh" [B, S, K, H], or "auto" for the
    # platform's default (batching/workloads/decoder.py DEFAULT_LAYOUT; docs/models.md).
    m.cache_layout = "auto"
    m.matmul_precision = "default"
    # Inference sweeps: decode positions per sequence's cache; prefill tokens per prompt.
    m.cache_len = 128
    m.prompt_len = 64
    return m


def train() -> config_dict.ConfigDict:
    t = config_dict.ConfigDict()
    t.steps = 300
    t.batch_size = 16
    t.seq_len = 64
    t.learning_rate = 3e-3
    t.warmup_steps = 30
    # "cosine" decays to 10% of learning_rate by the last step; "constant" holds it.
    t.schedule = "cosine"
    t.weight_decay = 0.01
    t.grad_clip_norm = 1.0  # 0 disables clipping
    # Loss = cross-entropy + aux_loss_weight * mean aux loss + z_loss_weight * mean z-loss.
    t.aux_loss_weight = 0.01
    # Which load-balancing loss trains: "group" (f and P within each routing group, then
    # averaged: GShard/Switch/flaxformer/MaxText) or "batch" (f and P pooled over the global
    # batch: Qwen 2025 "Demons in the Detail", OLMo-core). Both are logged either way.
    t.aux_loss_scope = "group"
    t.z_loss_weight = 0.001
    # Auxiliary-loss-free balancing (Wang et al. 2024; DeepSeek-V3 uses 0.001): after each
    # step every routing bias moves by this rate * sign(mean load - load). Needs
    # model.router_bias = True; 0 leaves the biases alone.
    t.router_bias_update_rate = 0.0
    # Each run trains (and is swept) once per seed: runs named <run>_seed<i>, seed + i.
    t.seeds = 1
    t.log_every = 10
    t.eval_every = 100
    t.eval_batches = 8
    t.max_text_bytes = 8_000_000
    t.heldout_fraction = 0.05
    return t


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
    if arg is not None and arg not in ROUTER_ARGS:
        raise ValueError(
            f"moe_decoder config arg must be one of {sorted(ROUTER_ARGS)}, got {arg!r}"
        )
    router, top_k = ROUTER_ARGS[arg or "token_choice_k2"]
    config = default.get_config()
    config.name = "moe_decoder"
    config.model = model(router, top_k)
    config.train = train()
    config.sweep.batch_sizes = (1, 2, 4, 8, 16, 32, 64)
    config.timing.run_budget_s = 10.0
    # GShard (Lepikhin et al. 2020, §3.2) shards every token over every device: the
    # sequences, their KV cache and the attention split over data x expert as the MoE's
    # routing groups do, so a decode step's MoE blocks exchange tokens by all-to-all
    # instead of gathering the experts' outputs onto replicated sequences.
    config.mesh.axis_rules = tuple(
        (name, ("data", "expert") if name == "batch" else axes)
        for name, axes in config.mesh.axis_rules
    )
    return config
