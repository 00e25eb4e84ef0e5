"""The decoder behind a continuous-batching server, at request rates up to past capacity.

    python main.py --config=configs/serve.py --workdir=/tmp/serve
    python main.py --config=configs/serve.py:expert_choice --workdir=/tmp/serve_ec

arg: "decoder" (dense, the default), or an MoE decoder's router ("token_choice_k1",
"token_choice_k2", "expert_choice"; configs/moe_decoder.py), served with random weights.
Each policy is calibrated by a saturated run and its capacity bisected on the simulator
(docs/serving.md). Then every rate in `of_capacity` (shares of that capacity) and
`rates` is served by the loop and by the simulator on the same requests.
"""

from ml_collections import config_dict

from configs import decoder, moe_decoder


def serve() -> config_dict.ConfigDict:
    s = config_dict.ConfigDict()
    # Decode slots (the largest batch) and KV-cache positions per slot.
    s.slots = 4
    s.max_len = 128
    # "static" (gather a batch, run it to its last request), "continuous" (admit at every
    # step boundary) and "chunked" (prefill chunk_tokens of a prompt between decode steps,
    # Sarathi-Serve): batching.serve.loop. chunk_tokens divides max_len.
    s.policies = ("static", "continuous", "chunked")
    s.chunk_tokens = 16
    # Rates to serve: shares of each policy's capacity, then fixed rates (requests/s).
    s.of_capacity = (0.2, 0.4, 0.6, 0.9, 1.2)
    s.rates = ()
    # Open-loop requests per rate: gamma inter-arrival gaps of shape `burstiness` (1:
    # Poisson), as `vllm bench serve` draws them. Lengths are uniform in (low, high); equal
    # ends fix them.
    s.requests = 32
    s.burstiness = 1.0
    s.prompt_len = (32, 32)
    s.output_len = (32, 32)
    # A JSONL trace (arrival_s, prompt_len, output_len per line) replaces the drawn requests.
    s.trace = ""
    # SLOs on p90 TTFT and p90 TPOT (s): goodput and capacity.
    s.slo_ttft_s = 0.25
    s.slo_tpot_s = 0.05
    # The saturated calibration run's requests, and how long a simulated capacity trial lasts.
    s.calibration_requests = 32
    # Before each rate, a saturated run of this many requests refreshes the simulator's costs
    # (the machine's step time drifts between the calibration and the rate); 0: none.
    s.refresh_requests = 8
    s.capacity_run_s = 60.0
    # Spec-table devices whose simulated capacity the report gives as an upper bound.
    s.whatif_devices = ("H100 SXM",)
    # A decode sweep's workdir (configs/decoder.py): the report quotes its knee.
    s.decode_sweep_workdir = ""
    return s


def small(m: config_dict.ConfigDict) -> config_dict.ConfigDict:
    """A decoder small enough to serve on two cores: 4 layers of width 256."""
    m.update(d_model=256, n_layers=4, mlp_dim=1024, vocab_size=4096, n_heads=4, n_kv_heads=2,
             head_dim=64, max_seq_len=1024)  # fmt: skip
    return m


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
    if arg in (None, "", "decoder"):
        config = decoder.get_config()
        config.name = "serve"
    elif arg in moe_decoder.ROUTER_ARGS:
        config = moe_decoder.get_config(arg)
        config.name = f"serve_{arg}"
    else:
        raise ValueError(
            f"serve config arg must be 'decoder' or one of {sorted(moe_decoder.ROUTER_ARGS)}, "
            f"got {arg!r}"
        )
    small(config.model)
    config.serve = serve()
    # The decode step attends the whole cache: the same context as a decode sweep at
    # cache_len = max_len.
    config.model.cache_len = config.serve.max_len
    config.report.claims = ()
    return config
