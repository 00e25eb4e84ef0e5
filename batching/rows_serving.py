"""The serving group of the row schema: one row per (run, policy, request rate).

A serving run (configs/serve.py, batching/serve/) writes these rows. They share the
point group with the sweep's rows and carry `row_kind` "serving". The latencies follow
`vllm bench serve` (batching.serve.metrics). `simulated_<field>` is the simulator's value
of the same metric at the same rate, over the costs known before the rate (the
calibration's, refreshed by `serve.refresh_requests`); `replayed_<field>` is its value over
the costs the rate's own loop paid.
"""

DESCRIPTION = "serving rows: a decoder under load at one request rate (docs/serving.md)"

# (name, unit, meaning) of each field the serving group adds.
METRICS = (
    ("ttft_p50_s", "s", "time to first token (arrival to first token, queueing in it), median"),
    ("ttft_p90_s", "s", "its 90th percentile"),
    ("ttft_p99_s", "s", "its 99th percentile"),
    ("tpot_p50_s", "s", "time per output token after the first, median over requests"),
    ("tpot_p90_s", "s", "its 90th percentile"),
    ("tpot_p99_s", "s", "its 99th percentile"),
    ("itl_p50_s", "s", "gap between a request's consecutive tokens, pooled, median"),
    ("itl_p90_s", "s", "its 90th percentile"),
    ("itl_p99_s", "s", "its 99th percentile"),
    ("e2e_p50_s", "s", "arrival to last token, median"),
    ("e2e_p90_s", "s", "its 90th percentile"),
    ("e2e_p99_s", "s", "its 99th percentile"),
    ("request_throughput_per_s", "requests/s", "completed requests over the run's duration"),
    ("output_throughput_per_s", "tokens/s", "their output tokens over the duration"),
    ("goodput_per_s", "requests/s", "requests meeting every SLO, per second"),
    ("mean_occupancy", "slots", "busy slots per decode step, mean over the run's steps"),
    ("queueing_delay_mean_s", "s", "arrival to admission (its prefill began), mean"),
)

ENTRIES = (
    ("row_kind", "", "`serving` for these rows; sweep rows have none"),
    ("policy", "", "`static`, `continuous` or `chunked` (batching.serve.loop)"),
    ("request_rate", "requests/s", "the open-loop arrival rate (inf: all at once)"),
    ("rate_share", "", "the rate as a share of `capacity_per_s`, where it was set that way"),
    ("slots", "slots", "decode slots: the server's largest batch"),
    ("max_len", "tokens", "KV-cache positions per slot"),
    ("n_requests", "requests", "requests sent at this rate"),
    ("completed", "requests", "requests served to their last token"),
    ("failed", "requests", "requests rejected (they could not fit the cache)"),
    ("duration_s", "s", "start to the last completion"),
    ("steps", "steps", "decode steps the loop ran"),
    *METRICS,
    ("ttft_p90_low_s", "s", "95% interval of `ttft_p90_s` (order statistics)"),
    ("ttft_p90_high_s", "s", "its high end"),
    ("tpot_p90_low_s", "s", "95% interval of `tpot_p90_s`"),
    ("tpot_p90_high_s", "s", "its high end"),
    ("slo_ttft_s", "s", "`serve.slo_ttft_s`: the p90 TTFT SLO"),
    ("slo_tpot_s", "s", "`serve.slo_tpot_s`: the p90 TPOT SLO"),
    ("meets_slo", "", "whether p90 TTFT and p90 TPOT are within the SLOs"),
    (
        "capacity_per_s",
        "requests/s",
        "the policy's capacity: the highest rate whose p90s meet the SLOs, bisected on "
        "the simulator driven by this run's calibration",
    ),
    ("capacity_upper_per_s", "requests/s", "the lowest rate the bisection saw fail"),
    ("capacity_rel_tol", "", "the bisection's tolerance, a share of the capacity"),
    ("step_cost_s", "s", "the calibration's decode step over every slot, as the loop paid it"),
    ("insert_cost_s", "s", "the calibration's insert"),
    ("prefill_cost_s", "s", "the calibration's prefill per padded prompt length"),
    (
        "drop_fraction_mean",
        "",
        "MoE rows: per request, its decode steps' routing lost (token-choice: assignments "
        "dropped; expert-choice: tokens no expert picked), mean (batching.serve.session)",
    ),
    ("drop_fraction_max", "", "MoE rows: the largest request's drop fraction"),
    (
        "batchmates_changed",
        "requests",
        "served requests whose greedy tokens differ from the same request served alone",
    ),
    ("step_paid_s", "s", "the decode step as this rate's loop paid it, mean"),
    (
        "step_refreshed_s",
        "s",
        "the decode step the simulator's prediction took: the calibration's, or a saturated "
        "run's of `serve.refresh_requests` just before the rate",
    ),
    *(
        (f"simulated_{name}", unit, f"the simulator's `{name}` over the costs before the rate")
        for name, unit, _ in METRICS
    ),  # fmt: skip
    *(
        (f"replayed_{name}", unit, f"the simulator's `{name}` over this rate's paid costs")
        for name, unit, _ in METRICS
    ),  # fmt: skip
)

# What every serving row carries (batching.rows.check_serving).
REQUIRED = (
    "row_kind", "policy", "request_rate", "slots", "max_len", "n_requests", "completed",
    "duration_s", "ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "tpot_p50_s", "tpot_p90_s",
    "tpot_p99_s", "goodput_per_s", "capacity_per_s", "slo_ttft_s", "slo_tpot_s",
)  # fmt: skip


def check(row: dict) -> None:
    """Raises a KeyError naming the fields a serving row lacks."""
    missing = [k for k in REQUIRED if row.get(k) is None]
    if missing:
        raise KeyError(f"serving row lacks {missing} (batching.rows_serving.REQUIRED)")
