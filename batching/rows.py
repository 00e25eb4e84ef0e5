"""One row of results.jsonl: every field a row may carry, with its group, unit and meaning.

A sweep row is one (run, batch size) point; a serving row (batching.rows_serving) one (run,
policy, request rate). A row stands alone, so rows of several machines can be concatenated.
Rows are built by `make` and extended by `extend`; both refuse a field this table does not
list. docs/results.md shows `markdown_table()` (a test keeps them equal). A row may lack any
field outside the point group, so readers use `.get` for those.
"""

import dataclasses
import re
from typing import Any

from batching import rows_serving

Row = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Field:
    """A row field: its name, group, unit ("" for none) and meaning."""

    name: str
    group: str
    unit: str
    meaning: str


GROUPS = {
    "point": "what ran, where, and whether it was measured",
    "mesh": "the devices a point ran on and how the batch splits over them",
    "timing": "the timed calls: the point's passes, its latency and interval from them",
    "cost": "the call's work: XLA's count, the lab's own, its ops and collectives",
    "memory": "what the compiled program needs and what the device has",
    "prediction": "the roofline analysis, added after the sweep",
    "profile": "profiled points: the traced call read back per op kind",
    "routing": "MoE rows: how the tokens spread over experts and devices",
    "router": "MoE rows: the router's statistics (models.routers.routing_stats), mean over layers",
    "workload": "the workload's own fields",
    "serving": rows_serving.DESCRIPTION,
}


def _fields(group: str, *entries: tuple[str, str, str]) -> tuple[Field, ...]:
    return tuple(Field(name, group, unit, meaning) for name, unit, meaning in entries)


FIELDS: tuple[Field, ...] = (
    *_fields(
        "point",
        ("experiment", "", "the experiment (config name)"),
        ("run", "", "the run within it"),
        (
            "setting",
            "",
            "the setting the run is one seed of (train.seeds > 1: runs <setting>_seed<i>), "
            "else the run itself",
        ),
        ("seed", "", "the run's config.seed (its parameters' init, its inputs, its training)"),
        ("model", "", "the workload's name (`model.name`)"),
        ("batch_size", "examples", "the swept batch (global on a mesh)"),
        ("dtype", "", "activation dtype"),
        ("param_dtype", "", "parameter dtype"),
        ("matmul_precision", "", "the precision the timed executable was compiled under"),
        ("platform", "", "JAX platform (`cpu`, `gpu`, `tpu`)"),
        ("device_kind", "", "the device's `device_kind`"),
        ("device_count", "devices", "devices of that platform JAX sees"),
        ("jax_version", "", "the JAX that measured it"),
        (
            "status",
            "",
            "`ok`, `skipped_memory`, `oom`, `skipped_after_oom` or `error` (see "
            '"Faults, statuses and exit codes"); rows without one are ok',
        ),
        ("message", "", "rows that are not ok: why"),
        ("error_type", "", "rows that raised: the exception's type"),
        ("fingerprint", "", "the run's fingerprint: a rerun resumes rows that match it"),
        ("timestamp", "s", "Unix time the row was written"),
    ),
    *_fields(
        "mesh",
        ("global_batch_size", "examples", "the swept (global) batch"),
        (
            "per_device_batch_size",
            "examples",
            "one device's share: the batch over the devices `batch` maps to (`mesh.data`, "
            "or data × expert for the MoE decoder)",
        ),
        ("num_devices", "devices", "the mesh's devices"),
        ("process_count", "processes", "JAX processes"),
        ("mesh_shape", "", '`{"data", "expert", "model"}` sizes'),
        (
            "parallel_shape",
            "",
            "how many ways each mesh axis splits this workload (`data`: what `batch` maps "
            "to; `expert`: the experts where the model has them; `model`: heads/mlp); an "
            "axis that holds only replicas counts 1. The per-device prediction, the analytic "
            "collectives and the global B* use it",
        ),
    ),
    *_fields(
        "timing",
        ("latency_s", "s", "`estimator` over the pass medians (old rows: all samples' median)"),
        ("estimator", "", "`timing.estimator`: `geomean`, `median` or `trimmed` of pass medians"),
        ("latency_ci_low_s", "s", "95% interval of `latency_s`: `pass_ci_*` ⊕ machine drift"),
        ("latency_ci_high_s", "s", "its high end"),
        ("pass_ci_low_s", "s", "95% interval from the spread between passes (`converged`'s)"),
        ("pass_ci_high_s", "s", "its high end"),
        ("machine_drift_sd", "", "the machine's log sd between runs added (drift log; null: none)"),
        ("interval_method", "", "how it was made (absent: old rows, whose interval is pooled)"),
        (
            "pooled_samples_ci_low_s",
            "s",
            "a diagnostic, not the point's interval: the median's distribution-free 95% "
            "interval over every sample pooled as if independent (too narrow)",
        ),
        ("pooled_samples_ci_high_s", "s", "its high end"),
        ("latency_p10_s", "s", "10th percentile of every sample pooled"),
        ("latency_p90_s", "s", "90th percentile of every sample pooled"),
        ("latency_min_s", "s", "fastest call"),
        ("latency_iqr_s", "s", "interquartile range of every sample pooled"),
        ("n_runs", "calls", "timed calls, all passes"),
        ("converged", "", "whether the interval met ±`timing.target_rel_ci` (from `passes` on)"),
        (
            "stop_reason",
            "",
            "`precision` (converged), `budget` (the run spent `timing.run_budget_s`), "
            "`max_passes`, or `pending` (passes due: a rerun resumes it); old rows: "
            "`max_runs`, `pass_spread`",
        ),
        ("cache_state", "", "`timing.cache`: `warm` (back to back) or `cold` (LLC evicted)"),
        ("passes", "passes", "`sweep.passes`: the passes every point gets"),
        ("passes_done", "passes", "how many this point has"),
        ("pass_medians_s", "s", "each pass's median"),
        ("pass_cv", "", "std / mean of the pass medians: how far the passes moved"),
        ("pass_n_runs", "calls", "each pass's timed calls"),
        (
            "pass_stop_reasons",
            "",
            "why each pass's calls stopped: `precision` (its own median known to the target), "
            "`budget` (`timing.pass_s` spent) or `max_runs`",
        ),
        ("pass_wall_s", "s", "each pass's wall seconds (warm-up and timed calls)"),
        ("pass_host_busy", "", "each pass: the host CPU share others and the hypervisor took"),
        (
            "modes",
            "",
            'two programs within passes: `[{"median_s", "share"}, ...]`, faster first; null '
            "when passes hold one group (a pass slower as a whole is not a mode: `pass_cv`)",
        ),
        ("compile_s", "s", "XLA compile seconds for this shape"),
        ("lower_s", "s", "lowering seconds"),
        (
            "call_floor_s",
            "s",
            "median seconds of a trivial jitted call handed this point's own arguments (the "
            "flat arrays the timed call takes): the prediction's dispatch floor; measured "
            "with `roofline.shape_aware` in one process, else null",
        ),
        ("examples", "examples", "examples per call (tokens for a decoder)"),
        ("example_unit", "", "what `examples` counts: `examples` or `tokens`"),
        ("throughput_per_s", "examples/s", "examples per second"),
        ("examples_per_s", "examples/s", "the same, named by its unit"),
        ("tokens_per_s", "tokens/s", "decoder rows: tokens per second"),
        ("per_example_s", "s", "seconds per example"),
        ("achieved_flops_per_s", "FLOP/s", "analytic FLOPs / median latency"),
        ("achieved_bytes_per_s", "bytes/s", "analytic bytes / median latency"),
    ),
    *_fields(
        "cost",
        ("params", "parameters", "model size"),
        ("param_bytes", "bytes", "the parameters' bytes"),
        ("weight_bytes", "bytes", "weight bytes one call reads"),
        ("flops", "FLOP", "XLA's cost analysis of the compiled program (null where none)"),
        ("bytes_accessed", "bytes", "XLA's bytes accessed (null where none)"),
        ("analytic_flops", "FLOP", "the lab's own count: Σ of `ops`"),
        ("analytic_bytes", "bytes", "the lab's own bytes: Σ of `ops`"),
        ("xla_flops_ratio", "", "XLA's FLOPs over the lab's"),
        ("xla_bytes_ratio", "", "XLA's bytes over the lab's"),
        ("cost_mismatch", "", "either ratio beyond `roofline.cost_tolerance`"),
        (
            "ops",
            "",
            "the call as ops (name, kind, shape, flops, bytes, weight_bytes, count, fused, "
            "dtype, layout), per instance",
        ),
        ("ops_source", "", "`ops` from `hand` (the family's list) or `program` (HLO)"),
        ("program_ops", "", "a hand-listed call as read from its compiled program"),
        ("xla_estimated_latency_s", "s", "XLA's own estimate (GPU; docs/your_model.md)"),
        ("xla_estimated_by_kind", "s", "that estimate's seconds per op kind"),
        ("gemm_shapes", "", "the call's matmuls (m, k, n, count), derived from `ops`"),
        (
            "attention_shapes",
            "",
            "decoder rows: the decode attention the roofline times (batch, kv_heads, "
            "cache_len, q_per_kv, head_dim, count, layout, dtype, bytes)",
        ),
        ("collectives", "", "the call's collectives (kind, axis, axis_size, bytes, count)"),
        ("comm_bytes", "bytes", "Σ bytes·count of `collectives`, per device"),
        ("xla_collectives", "", "on a mesh: the collectives XLA compiled in, count per op"),
        ("xla_comm_bytes", "bytes", "their bytes per device"),
    ),
    *_fields(
        "memory",
        (
            "memory_bytes",
            "bytes",
            "what the compiled program needs: arguments + outputs + temporaries − aliased "
            "(donated) bytes, from XLA's `memory_analysis()`",
        ),
        ("temp_bytes", "bytes", "of which temporaries"),
        (
            "device_memory_bytes",
            "bytes",
            'the device\'s: `memory_stats()["bytes_limit"]`, RAM on a CPU',
        ),
        ("memory_budget_bytes", "bytes", "`skipped_memory` rows: the budget it exceeded"),
    ),
    *_fields(
        "prediction",
        ("predicted_latency_s", "s", "the a-priori per-op roofline prediction"),
        ("predicted_peak_latency_s", "s", "the same from the two peak rates alone"),
        ("predicted_overhead_s", "s", "dispatch floor + launches + call extra"),
        (
            "predicted_call_extra_s",
            "s",
            "of the overhead, what the call pays once beyond the trivial floor, from its "
            "small ops' lone calls (0 without small ops or `roofline.shape_aware`)",
        ),
        ("predicted_by_kind", "s", "the prediction's seconds per op kind and limit"),
        ("program_predicted_latency_s", "s", "the prediction priced from `program_ops`"),
        ("program_predicted_by_kind", "s", "that prediction's seconds per op kind and limit"),
        (
            "predicted_kinds",
            "",
            "per op kind: predicted seconds, FLOPs, its intensity `bound`, the FLOP rate the "
            "prediction gives it and whether that leaves it `slower_than_roofs`",
        ),
        ("predicted_comm_s", "s", "the comm term of `predicted_latency_s` (0 without)"),
        ("predicted_balanced_latency_s", "s", "EP rows: the prediction at the mean device load"),
        (
            "regime",
            "",
            "the roofline's limit: `overhead`, `memory` or `compute`, the largest of "
            "`regime_terms_s`",
        ),
        ("regime_terms_s", "s", "fixed cost, bytes / memory roof, FLOPs / compute roof"),
        ("intensity_flops_per_byte", "FLOP/byte", "FLOPs per byte of one device's share"),
        ("compute_roof_fraction", "", "achieved FLOP/s over the compute roof"),
        ("memory_roof_fraction", "", "achieved bytes/s over the memory roof"),
        ("fitted_latency_s", "s", "the fitted three-limit model"),
        (
            "rates_not_measured",
            "",
            'per-shape rates the prediction could not measure: `{"<table>:<key>": '
            '"interpolated" | "peak"}`; null when all were measured',
        ),
    ),
    *_fields(
        "profile",
        (
            "traced_ops",
            "s",
            'the median traced call per op kind, `{kind: {"seconds", "count"}}`, plus '
            "`collective` and `other` (what no op kernel covers); kinds + other = "
            "`traced_latency_s`",
        ),
        (
            "traced_by_op",
            "s",
            "the same call's seconds and kernels per lab op name (`ops[].name`), where the "
            "instructions' parameters name exactly that op",
        ),
        ("traced_latency_s", "s", "the traced call's wall time"),
        ("traced_steps", "calls", "how many calls it is the median of (`profile.steps` − 1)"),
        ("traced_vs_measured", "", "its ratio to `latency_s`"),
        ("trace_file", "", "the `.xplane.pb`, relative to the workdir"),
        ("traced_ops_error", "", "why the trace could not be read (the point stays `ok`)"),
    ),
    *_fields(
        "routing",
        ("routing_group_size", "tokens", "tokens per routing group"),
        ("tokens_per_expert", "tokens", "first MoE layer: tokens per expert, after capacity"),
        ("device_loads", "", "tokens per expert-axis device (before capacity, layer mean)"),
        ("device_max_mean_load", "", "their max over mean: what the slowest device waits for"),
        ("layer_<i>/<stat>", "", "one MoE layer's `load_cv`, `max_mean_load`, ..."),
        (
            "cross_seq_trials",
            "trials",
            "MoE decoder rows: trials of the cross-sequence probe (each changes the other "
            "sequences' tokens of the decode step, one drawn sequence kept); 0 at batch 1",
        ),
        (
            "cross_seq_leak_fraction",
            "",
            "the share of trials that changed the kept sequence's logits",
        ),
        ("cross_seq_max_change", "", "the largest change of one of its logits"),
    ),
    *_fields(
        "router",
        ("aux_loss", "", "Switch/GShard load-balancing loss per routing group, mean over layers"),
        ("aux_loss_batch", "", "the same with f and P pooled over the whole batch first"),
        ("z_loss", "", "ST-MoE router z-loss"),
        ("load_cv", "", "std / mean of tokens per expert (after capacity)"),
        ("max_mean_load", "", "most-loaded expert over the mean, before capacity"),
        ("drop_fraction", "", "routed assignments past capacity"),
        ("token_drop_fraction", "", "tokens that lost every assignment"),
        ("expert_usage", "", "expert slots filled over slots available"),
        ("router_confidence", "", "mean combine weight of a dispatched slot"),
        ("router_entropy", "nats", "mean entropy of the router's distribution"),
        (
            "max_vio_group",
            "",
            "MaxVio (Wang et al. 2024): max/mean tokens per expert − 1 within each routing "
            "group, mean over groups",
        ),
        ("max_vio_batch", "", "MaxVio over the call's tokens pooled (max_mean_load − 1)"),
    ),
    *_fields(
        "workload",
        ("width", "", "MLP and ResNet width"),
        ("factory", "", "a model from outside the lab: its `model.factory` import path"),
        ("depth", "layers", "layers"),
        ("activation", "", "MLP activation"),
        ("tokens", "tokens", "MLP tokens per example"),
        ("image_size", "pixels", "ResNet and conv-stack input side"),
        ("num_classes", "", "ResNet classes"),
        ("intensity_b1", "FLOP/byte", "ResNet: FLOPs per byte at batch 1"),
        ("channels", "", "conv stack channels"),
        (
            "weight_uses_per_example_position",
            "",
            "conv stack: uses of a weight per example (output positions)",
        ),
        ("d_model", "", "model width"),
        ("mlp_dim", "", "feed-forward width"),
        ("active_params", "parameters", "parameters one token uses"),
        ("router", "", "`token_choice` or `expert_choice`"),
        ("num_experts", "experts", "experts per MoE layer"),
        ("top_k", "experts", "experts per token (token choice)"),
        ("capacity_factor", "", "expert capacity over the balanced share"),
        ("weight_uses_per_example", "", "MoE: share of the batch an expert weight serves (k/E)"),
        ("aux_loss_weight", "", "MoE decoder: the training's load-balancing weight"),
        ("aux_loss_scope", "", "MoE decoder: `group` or `batch`"),
        ("router_bias_update_rate", "", "MoE decoder: loss-free balancing rate (0: off)"),
        ("trained", "", "MoE decoder: trained before timing"),
        ("phase", "", "decoder rows: `decode` or `prefill`"),
        ("cache_len", "tokens", "decoder rows: context"),
        ("prompt_len", "tokens", "prefill rows: prompt length"),
        ("kv_bytes_per_token", "bytes", "KV-cache bytes per token"),
        ("cache_dtype", "", "the KV cache's dtype"),
        ("cache_layout", "", "the resolved KV-cache layout"),
    ),
    *_fields("serving", *rows_serving.ENTRIES),
)

BY_NAME = {f.name: f for f in FIELDS}
# Fields named by a pattern: per-layer routing statistics.
PATTERNS = (re.compile(r"layer_\d+/[a-z_]+"),)


def is_field(name: str) -> bool:
    """Whether a row may carry `name`."""
    return name in BY_NAME or any(p.fullmatch(name) for p in PATTERNS)


def check(fields: dict[str, Any]) -> None:
    """Raises a KeyError naming each field in `fields` that no row may carry."""
    unknown = sorted(k for k in fields if not is_field(k))
    if unknown:
        raise KeyError(f"row fields {unknown} are not in batching.rows.FIELDS")


def make(**fields: Any) -> Row:
    """A new row from `fields`, every one of them a schema field."""
    check(fields)
    return dict(fields)


def extend(row: Row, **fields: Any) -> Row:
    """A new dict: `row` with `fields`, each a schema field, added or replaced."""
    check(fields)
    return {**row, **fields}


def names(group: str) -> tuple[str, ...]:
    """The fields of one group, in table order."""
    if group not in GROUPS:
        raise KeyError(f"no row group {group!r}; the groups are {sorted(GROUPS)}")
    return tuple(f.name for f in FIELDS if f.group == group)


def markdown_table(groups: tuple[str, ...] = tuple(GROUPS)) -> str:
    """The field table of `groups` (docs/results.md, docs/serving.md): a line per field."""
    lines = ["| field | group | unit | meaning |", "|---|---|---|---|"]
    for f in (f for f in FIELDS if f.group in groups):
        unit = f.unit or "–"
        lines.append(f"| `{f.name}` | {f.group} | {unit} | {f.meaning} |")
    return "\n".join(lines)
