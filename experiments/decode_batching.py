"""Decode-step latency vs batch size at several context lengths, and prefill vs prompt length.

    python main.py --config=experiments/decode_batching.py --workdir=/tmp/decode
    python main.py --config=experiments/decode_batching.py:full --workdir=/tmp/decode_full

Tests claim C7: the weight matmuls of a decode step amortise over the batch like
an MLP's, the KV-cache reads grow with every sequence and never do. Batch sizes
stop where the cache would pass ~3.2 GB on the default model (~25 KB per cached
token); `full` doubles every batch range for machines with more memory.
"""

from ml_collections import config_dict

from configs import decoder, default

BATCHES = tuple(2**i for i in range(10))  # 1 .. 512
# cache length -> largest batch (cache bytes ~ batch x length x 24.6 KB on the default model)
# Cache 1: attention over the step's own token only, the decoder's weights as an MLP would
# run them (no KV-cache term): what "behaves like an MLP" is measured against (claim C7).
DECODE = {1: 512, 128: 512, 1024: 128, 4096: 32}
PREFILL = {32: (1, 4), 128: (1, 4), 512: (1,)}


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
    scale = 2 if arg == "full" else 1
    config = default.get_config()
    config.name = "decode_batching"
    config.model = decoder.model("decode")
    config.timing.run_budget_s = 10.0
    config.sweep.batch_sizes = BATCHES
    runs = {}
    for length, largest in DECODE.items():
        sizes = tuple(b for b in BATCHES if b <= largest * scale)
        runs[f"decode_L{length:04d}"] = {
            "model": {"phase": "decode", "cache_len": length},
            "sweep": {"batch_sizes": sizes},
        }
    for length, sizes in PREFILL.items():
        runs[f"prefill_P{length:04d}"] = {
            "model": {"phase": "prefill", "prompt_len": length},
            # A prefill call is seconds long on a CPU: four passes, and fewer calls still give
            # a pass's median.
            "sweep": {"batch_sizes": sizes, "passes": 4},
            "timing": {"min_runs": 3, "warmup_runs": 1},
        }
    config.runs = runs
    config.report.claims = ("C7",)
    return config
