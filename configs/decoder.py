"""A MaxText-style decoder: one decode step (or one prefill) swept over batch sizes.

    python main.py --config=configs/decoder.py --workdir=/tmp/decode
    python main.py --config=configs/decoder.py:prefill --workdir=/tmp/prefill

Default size: 12 layers, d_model 768, GQA 12 query / 4 kv heads of 64, SwiGLU 3072,
vocabulary 32000, untied: ~153M parameters, ~610 MB of fp32 weights (well past a
32 MiB last-level cache, so a batch-1 step streams its weights from DRAM).
"""

from ml_collections import config_dict

from configs import default


def model(phase: str = "decode") -> config_dict.ConfigDict:
    m = config_dict.ConfigDict()
    m.name = "decoder"
    m.phase = phase
    m.vocab_size = 32000
    m.d_model = 768
    m.n_layers = 12
    m.n_heads = 12
    m.n_kv_heads = 4
    m.head_dim = 64
    m.mlp_dim = 3072
    m.max_seq_len = 8192
    m.rope_theta = 10000.0
    m.tie_embeddings = False
    m.dtype = "float32"
    m.param_dtype = "float32"
    m.cache_dtype = "float32"
    # KV-cache axis order: "bksh" [B, K, S, H], "bskh" [B, S, K, H], or "auto" for the
    # platform's default (batching/workloads/decoder.py DEFAULT_LAYOUT; docs/models.md).
    m.cache_layout = "auto"
    m.matmul_precision = "default"
    # Decode: positions held by each sequence's cache; prefill: tokens per prompt.
    m.cache_len = 1024
    m.prompt_len = 128
    return m


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
    config = default.get_config()
    config.name = "decoder"
    config.model = model(arg or "decode")
    config.sweep.batch_sizes = (1, 2, 4, 8, 16, 32, 64)
    # Seven batch sizes per run: passes beyond the first six stop after 10 s.
    config.timing.run_budget_s = 10.0
    config.report.claims = ("C7",)
    return config
