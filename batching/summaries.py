"""One object of summary.json: every field a run's summary may carry, with unit and meaning.

A summary describes one run: its ends, memory wall, roofs, knee, timing and verdicts. The
analysis builds it from several pieces. `check` runs when summary.json is written. It
refuses a field this table does not list, and a value of the wrong kind. The report and
the claims read summaries by these names. The table in docs/results.md is
`markdown_table()`, and a test keeps them equal.

Any field may be None: not known for this run (no fit, no spec entry, no probe). A number
may be nan where its statistic has no samples.
"""

import dataclasses
import math
from typing import Any

from batching import rows

Summary = dict[str, Any]

# Kind -> the Python types a value of that kind may have (None aside).
KINDS: dict[str, tuple[type, ...]] = {
    "int": (int,),
    "num": (int, float),
    "str": (str,),
    "bool": (bool,),
    "map": (dict,),
    "list": (list, tuple),
}


@dataclasses.dataclass(frozen=True)
class Field:
    """A summary field: name, group, kind (a KINDS key), unit ("" for none) and meaning."""

    name: str
    group: str
    kind: str
    unit: str
    meaning: str


GROUPS = {
    "run": "what ran, and the ends of its sweep",
    "memory": "the memory wall, fitted from every point's compiled program",
    "roofs": "the device's roofs as the analysis used them, and where they came from",
    "knee": "the knee: fitted, predicted, and the statistics around it",
    "prediction": "how far the a-priori prediction is from the measurement",
    "spec": "the datasheet's device, and the what-if devices",
    "mesh": "the devices and the interconnect",
    "timing": "how the points were timed, and how precise they came out",
    "routing": "MoE runs: routing statistics at the sweep's ends, and the cross-sequence probe",
    "training": "trained runs: the training's losses and held-out routing",
    "report": "the report's verdicts",
}

# Row fields a summary copies from the run's first row (they name the run), with their kind.
RUN_KINDS = {
    "setting": "str", "seed": "int", "matmul_precision": "str", "num_devices": "int",
    "process_count": "int",
    "width": "int", "tokens": "int", "channels": "int", "d_model": "int", "mlp_dim": "int",
    "depth": "int", "phase": "str", "cache_len": "int", "prompt_len": "int",
    "image_size": "int", "intensity_b1": "map", "router": "str", "num_experts": "int",
    "top_k": "int", "capacity_factor": "num", "aux_loss_weight": "num",
    "aux_loss_scope": "str", "router_bias_update_rate": "num", "trained": "bool",
    "factory": "str",
}  # fmt: skip
RUN_FIELDS = tuple(RUN_KINDS)
# Routing row fields a summary keeps at both ends of the sweep, as <name>_first, <name>_last.
ROUTING_ENDS = (
    "drop_fraction",
    "max_mean_load",
    "load_cv",
    "token_drop_fraction",
    "device_max_mean_load",
    "max_vio_batch",
)


def _fields(group: str, *entries: tuple[str, str, str, str]) -> tuple[Field, ...]:
    return tuple(Field(name, group, kind, unit, meaning) for name, kind, unit, meaning in entries)


def _copied(
    names: tuple[str, ...], group: str, suffix: str = "", at: str = ""
) -> tuple[Field, ...]:
    """Fields copied from rows, with the row schema's unit and meaning."""
    return tuple(
        Field(
            n + suffix,
            group,
            RUN_KINDS.get(n, "num"),
            rows.BY_NAME[n].unit,
            rows.BY_NAME[n].meaning + at,
        )
        for n in names
    )


FIELDS: tuple[Field, ...] = (
    *_fields(
        "run",
        ("run", "str", "", "the run"),
        ("experiment", "str", "", "the experiment (config name)"),
        ("model", "str", "", "the workload's name (`model.name`)"),
        ("platform", "str", "", "JAX platform"),
        ("device_kind", "str", "", "the device's `device_kind`"),
        ("dtype", "str", "", "activation dtype"),
        ("params", "int", "parameters", "the model's parameters"),
        ("param_bytes", "int", "bytes", "the parameters' bytes"),
        ("batch_sizes", "list", "examples", "the measured batch sizes, ascending"),
        ("points", "int", "points", "measured points"),
        ("points_converged", "int", "points", "points whose interval met the target"),
        ("latency_first_s", "num", "s", "latency at the smallest batch"),
        ("latency_last_s", "num", "s", "latency at the largest batch"),
        ("slowdown_last_vs_first", "num", "", "latency_last_s / latency_first_s"),
        ("best_throughput_per_s", "num", "examples/s", "the highest throughput measured"),
        ("best_throughput_batch_size", "int", "examples", "the batch it was measured at"),
        ("example_unit", "str", "", "what throughput counts: `examples` or `tokens`"),
        ("compile_s_total", "num", "s", "compile time summed over the points"),
    ),
    *_copied(RUN_FIELDS, "run"),
    *_fields(
        "memory",
        ("max_batch_measured", "int", "examples", "the largest batch that ran"),
        ("first_oom_batch", "int", "examples", "the smallest batch that ran out of memory"),
        ("device_memory_bytes", "int", "bytes", "the device's memory"),
        ("bytes_per_example", "num", "bytes", "slope of the compiled need against batch"),
        ("memory_fixed_bytes", "num", "bytes", "intercept of that line: weights and buffers"),
        ("max_batch_predicted", "int", "examples", "the largest batch the line fits"),
        ("status_counts", "map", "points", "points per status"),
        ("whatif_max_batch", "map", "examples", "spec device -> the largest batch that fits"),
    ),
    *_fields(
        "roofs",
        ("peak_flops_per_s", "num", "FLOP/s", "the compute roof"),
        ("peak_flops_source", "str", "", "where the compute roof came from"),
        ("square_matmul_flops_per_s", "num", "FLOP/s", "a large square matmul's rate"),
        ("peak_bytes_per_s", "num", "bytes/s", "the measured memory bandwidth"),
        ("memory_roof_bytes_per_s", "num", "bytes/s", "the memory roof the prediction used"),
        ("memory_roof", "str", "", "`DRAM` (weights priced cold) or `last-level cache`"),
        ("ridge_flops_per_byte", "num", "FLOP/byte", "compute roof / memory roof"),
        ("dispatch_floor_s", "num", "s", "the cost of an empty call"),
        ("kernel_overhead_s", "num", "s", "the cost of one more kernel in a call"),
        ("cache_bytes_per_s", "num", "bytes/s", "the last-level cache's bandwidth"),
        ("bandwidth_fraction_first", "num", "", "achieved bytes/s at batch 1 over the roof"),
        ("regimes", "map", "", "batch -> the bound of the point's largest term"),
        ("microbenchmark_budget_s", "num", "s", "the per-shape microbenchmarks' budget"),
        ("microbenchmark_s", "num", "s", "what they spent"),
        ("rates_interpolated", "int", "ops", "op shapes priced from neighbouring shapes"),
        ("rates_at_peak", "int", "ops", "op shapes priced at the square peak"),
        ("peaks_file", "str", "", "the peaks file the run was analysed with"),
        ("peaks_check", "map", "", "the check of cached peaks against a fresh reading"),
        ("last_level_cache_bytes", "int", "bytes", "the last-level cache"),
        ("last_level_cache_source", "str", "", "where its size came from"),
        ("peaks_measured_at", "num", "s", "Unix time the peaks were measured"),
        ("shape_aware", "bool", "", "compute priced at the model's own shapes"),
        ("cold_weights", "bool", "", "weights priced from DRAM, not the cache"),
        ("not_analysed", "str", "", "why the run has no roofline analysis"),
    ),
    *_fields(
        "knee",
        ("knee_batch_size", "num", "examples", "the knee fitted to the measured points"),
        ("knee_low", "num", "examples", "its interval's low end (whole passes drawn)"),
        ("knee_high", "num", "examples", "its interval's high end"),
        ("knee_interval_degenerate", "bool", "", "the interval says nothing about the knee"),
        ("knee_interval_from", "str", "", "what the interval spans: `passes`"),
        ("knee_fit_points", "int", "points", "points the knee was fitted to"),
        ("predicted_knee_batch_size", "num", "examples", "where the three limits cross"),
        ("predicted_curve_knee_batch_size", "num", "examples", "the predicted curve's knee"),
        ("predicted_curve_knee_low", "num", "examples", "its interval's low end"),
        ("predicted_curve_knee_high", "num", "examples", "its interval's high end"),
        ("free_batching_limit", "int", "examples", "the largest batch still free"),
        ("free_batching_test", "str", "", "the test behind that limit"),
        ("loglog_slope", "num", "", "slope of log latency against log batch"),
        ("loglog_slope_low", "num", "", "its interval's low end"),
        ("loglog_slope_high", "num", "", "its interval's high end"),
        ("slowdown_low", "num", "", "the slowdown's interval, low end"),
        ("slowdown_high", "num", "", "the slowdown's interval, high end"),
        ("overhead_s", "num", "s", "the fitted model's per-call overhead"),
        ("effective_flops_per_s", "num", "FLOP/s", "the fitted model's compute rate"),
        ("effective_bytes_per_s", "num", "bytes/s", "the fitted model's bandwidth"),
    ),
    *_fields(
        "prediction",
        ("prediction_error_median", "num", "", "median |predicted / measured - 1|, per op"),
        ("peak_prediction_error_median", "num", "", "the same, from the square peaks only"),
        (
            "program_prediction_error_median",
            "num",
            "",
            "the same, priced from the compiled program's ops (families with a hand list)",
        ),
        ("ops_source", "str", "", "`hand` (the family's op list) or `program` (read from HLO)"),
        ("fit_error_median", "num", "", "the same, for the fitted three-limit model"),
        ("cost_mismatches", "int", "points", "points where XLA's count and the lab's differ"),
        ("breakdown", "map", "", "batch -> predicted seconds per op kind, at the ends"),
        ("traced_breakdown", "map", "", "batch -> traced seconds per op kind"),
    ),
    *_fields(
        "spec",
        ("predicted_critical_batch", "num", "examples", "B* from the measured roofs"),
        ("predicted_critical_batch_global", "num", "examples", "the same over data replicas"),
        ("spec_device", "str", "", "the datasheet entry for this device"),
        ("spec_flops_per_s", "num", "FLOP/s", "the datasheet's peak for the dtype"),
        ("spec_note", "str", "", "why the datasheet B* is missing, or what stood in"),
        ("spec_bytes_per_s", "num", "bytes/s", "the datasheet's bandwidth"),
        ("spec_critical_batch", "num", "examples", "B* from the datasheet"),
        ("spec_critical_batch_global", "num", "examples", "the same over data replicas"),
        ("bytes_per_param", "int", "bytes", "bytes of one parameter"),
        ("whatif", "map", "", "spec device -> the predicted curve there"),
        ("whatif_nodes", "map", "", "node -> the predicted curve on that node"),
    ),
    *_fields(
        "mesh",
        ("mesh_shape", "map", "devices", "mesh axis -> size"),
        ("parallel_shape", "map", "devices", "how the batch splits: data, model, expert"),
        ("functional_simulation", "bool", "", "forced host devices: timings not judged"),
        ("comm_bandwidth_source", "str", "", "where the collectives' bandwidth came from"),
        ("collective_busbw_bytes_per_s", "map", "bytes/s", "collective -> measured bus bw"),
        ("spec_interconnect_bytes_per_s", "num", "bytes/s", "the datasheet's interconnect"),
        ("spec_interconnect_source", "str", "", "its source"),
        ("comm_bytes_last", "num", "bytes", "the lab's collective bytes, largest batch"),
        ("xla_comm_bytes_last", "num", "bytes", "XLA's collective bytes, largest batch"),
        ("comm_share_median", "num", "", "median share of the comm term in the prediction"),
        ("slowest_device_cost_median", "num", "", "predicted extra from the busiest device"),
    ),
    *_fields(
        "timing",
        ("interval_method", "str", "", "how the rows' intervals were made"),
        ("estimator", "str", "", "the statistic over pass medians"),
        ("cache_state", "str", "", "`warm` or `cold` between calls (timing.cache)"),
        ("passes_done_min", "int", "passes", "fewest passes at a point"),
        ("passes_done_max", "int", "passes", "most passes at a point"),
        ("pass_cv_median", "num", "", "median spread between a point's passes"),
        ("rel_halfwidth_median", "num", "", "median interval half-width over latency"),
        ("pass_halfwidth_median", "num", "", "the same, passes only (no drift term)"),
        ("target_rel_ci", "num", "", "the half-width the timing aimed for"),
        ("passes_needed", "num", "passes", "passes that target needs at this spread"),
        ("max_pass_cv", "num", "", "timing.max_pass_cv"),
        ("noisy_points", "int", "points", "points whose passes moved more than that"),
        ("host_busy_median", "num", "", "median share of the host busy during passes"),
        ("stop_reasons", "map", "points", "stop reason -> points"),
        ("machine_drift_sd", "num", "", "sd of log rates between runs of the peaks check"),
        ("machine_drift_readings", "int", "readings", "readings that sd comes from"),
        ("machine_drift_span_s", "num", "s", "the time they span"),
    ),
    *_copied(ROUTING_ENDS, "routing", "_first", ", at the smallest batch"),
    *_copied(ROUTING_ENDS, "routing", "_last", ", at the largest batch"),
    *_fields(
        "routing",
        ("cross_seq_leak_fraction_max", "num", "", "worst share of probes that leaked"),
        ("cross_seq_leak_batch", "int", "examples", "the batch it was seen at"),
        ("cross_seq_max_change", "num", "", "largest logit change from another sequence"),
        ("cross_seq_trials", "int", "trials", "probes at that batch"),
        ("cross_seq_trials_total", "int", "trials", "probes over all batches"),
        ("cross_seq_batches", "list", "examples", "the probed batches"),
    ),
    *_fields(
        "training",
        ("train_loss", "num", "nats", "the last training loss"),
        ("heldout_loss", "num", "nats", "the held-out loss"),
        ("heldout_load_cv", "num", "", "held-out load CV, mean over MoE layers"),
        ("heldout_drop_fraction", "num", "", "held-out dropped assignments"),
        ("heldout_max_mean_load", "num", "", "held-out max/mean expert load"),
        ("heldout_max_vio_global", "num", "", "MaxVio over the held-out set (Wang et al. 2024)"),
        ("heldout_tokens_per_expert", "list", "tokens", "held-out load per expert"),
        ("train_seconds", "num", "s", "training's wall time"),
    ),
    *_fields("report", ("verdicts", "map", "", "claim -> its verdict and evidence")),
)

BY_NAME = {f.name: f for f in FIELDS}


def is_field(name: str) -> bool:
    """Whether a summary may carry `name`."""
    return name in BY_NAME


def _kind_ok(kind: str, value: Any) -> bool:
    if value is None:
        return True
    if kind in ("int", "num") and isinstance(value, bool):
        return False
    if kind == "int" and isinstance(value, float):
        return math.isnan(value) or value.is_integer()
    return isinstance(value, KINDS[kind])


def check(summary: Summary) -> None:
    """Raises naming the first bad field: one the table lacks, or a value of the wrong kind."""
    unknown = sorted(k for k in summary if k not in BY_NAME)
    if unknown:
        raise KeyError(f"summary fields {unknown} are not in batching.summaries.FIELDS")
    for name, value in summary.items():
        kind = BY_NAME[name].kind
        if not _kind_ok(kind, value):
            raise TypeError(
                f"summary field {name!r} is {kind}, got {type(value).__name__} {value!r:.60}"
            )


def markdown_table() -> str:
    """The summary table of docs/results.md: one line per field, grouped."""
    lines = ["| field | group | unit | meaning |", "|---|---|---|---|"]
    for f in FIELDS:
        lines.append(f"| `{f.name}` | {f.group} | {f.unit or '–'} | {f.meaning} |")
    return "\n".join(lines)
