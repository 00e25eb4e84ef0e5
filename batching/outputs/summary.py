"""Run-level numbers from a run's rows: the summary.json objects and the printed table."""

import math
from collections import Counter, defaultdict
from typing import Any

import numpy as np

from batching import summaries
from batching.measure import pass_stats, stats
from batching.setup import specs


def by_run(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Rows grouped by run, each run's in batch order."""
    runs = defaultdict(list)
    for row in rows:
        runs[row["run"]].append(row)
    return {run: sorted(rs, key=lambda r: r["batch_size"]) for run, rs in runs.items()}


def run_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """A run's summary object, from its ok rows.

    It holds the run's size, the ends of the sweep and where throughput peaks. The workload
    facts that name the run join it. So do the routing statistics at both ends and the
    cross-sequence probe.
    """
    rows = sorted(rows, key=lambda r: r["batch_size"])
    first, last = rows[0], rows[-1]
    best = max(rows, key=lambda r: r["throughput_per_s"])
    return {
        "run": first["run"],
        "experiment": first["experiment"],
        "model": first["model"],
        "platform": first["platform"],
        "device_kind": first["device_kind"],
        "dtype": first["dtype"],
        "params": first["params"],
        "param_bytes": first["param_bytes"],
        "batch_sizes": [r["batch_size"] for r in rows],
        "points": len(rows),
        "points_converged": sum(bool(r["converged"]) for r in rows),
        "latency_first_s": first["latency_s"],
        "latency_last_s": last["latency_s"],
        # How much slower the largest batch is than the smallest, per call.
        "slowdown_last_vs_first": last["latency_s"] / first["latency_s"],
        "best_throughput_per_s": best["throughput_per_s"],
        "best_throughput_batch_size": best["batch_size"],
        # What throughput counts: examples, or tokens for a decoder's prefill and decode.
        "example_unit": first.get("example_unit")
        or ("tokens" if first.get("phase") else "examples"),
        "compile_s_total": float(np.sum([r["compile_s"] for r in rows])),
        # Workload facts that name the run (MLP width, decoder phase and context, ...).
        **{k: first[k] for k in summaries.RUN_FIELDS if k in first},
        # Routing statistics at the ends of the sweep (MoE runs).
        **{f"{k}_first": first[k] for k in summaries.ROUTING_ENDS if k in first},
        **{f"{k}_last": last[k] for k in summaries.ROUTING_ENDS if k in last},
        **probe_summary(rows),
    }


def probe_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The cross-sequence probe over a run's batch sizes, for MoE decoder rows.

    It gives the largest fraction of trials that leaked, and at which batch. It also gives
    the largest logit change and the trial counts. Where nothing was probed it returns {}.
    That happens when no row has another sequence to change.
    """
    probed = [r for r in rows if r.get("cross_seq_leak_fraction") is not None]
    if not probed:
        return {}
    worst = max(probed, key=lambda r: (r["cross_seq_leak_fraction"], r["batch_size"]))
    return {
        "cross_seq_leak_fraction_max": worst["cross_seq_leak_fraction"],
        "cross_seq_leak_batch": worst["batch_size"],
        "cross_seq_max_change": max(r["cross_seq_max_change"] for r in probed),
        "cross_seq_trials": worst["cross_seq_trials"],
        "cross_seq_trials_total": sum(r["cross_seq_trials"] for r in probed),
        "cross_seq_batches": [r["batch_size"] for r in probed],
    }


def timing_summary(rows: list[dict[str, Any]], timing_cfg: Any) -> dict[str, Any]:
    """How a run's points were timed and how precise they came out.

    - The interval's method, the estimator and the cache state.
    - The fewest and most passes per point.
    - The median spread between passes, and the precision reached.
    - The passes the target would need at that spread.
    - The points whose passes moved more than `timing.max_pass_cv`.
    - How busy the host was during passes.
    - Why the points stopped.

    Rows without pass fields give None for the numbers drawn from them.
    """
    cvs = [r["pass_cv"] for r in rows if r.get("pass_cv") is not None]
    cvs = [c for c in cvs if math.isfinite(c)]
    halves, pass_halves = _half_widths(rows, "latency_ci"), _half_widths(rows, "pass_ci")
    busy = [b for r in rows for b in (r.get("pass_host_busy") or []) if b is not None]
    done = [r.get("passes_done", 1) for r in rows]
    cv = float(np.median(cvs)) if cvs else None
    confidence = timing_cfg.get("confidence", stats.CONFIDENCE)
    target = timing_cfg.get("target_rel_ci")
    return {
        "interval_method": rows[0].get("interval_method"),
        "estimator": rows[0].get("estimator"),
        "cache_state": rows[0].get("cache_state") or "warm",
        "passes_done_min": min(done),
        "passes_done_max": max(done),
        "pass_cv_median": cv,
        # The interval a rerun would see (passes and the machine's drift), and the passes' own.
        "rel_halfwidth_median": float(np.median(halves)) if halves else None,
        "pass_halfwidth_median": float(np.median(pass_halves)) if pass_halves else None,
        "target_rel_ci": target,
        "passes_needed": (
            pass_stats.passes_needed(cv, target, confidence) if cv is not None and target else None
        ),
        "max_pass_cv": timing_cfg.get("max_pass_cv"),
        "noisy_points": sum(c > timing_cfg.get("max_pass_cv", math.inf) for c in cvs),
        "host_busy_median": float(np.median(busy)) if busy else None,
        "stop_reasons": dict(Counter(str(r.get("stop_reason")) for r in rows)),
    }


def _half_widths(rows: list[dict[str, Any]], prefix: str) -> list[float]:
    """Each row's relative half width of its interval `<prefix>_low_s`..`<prefix>_high_s`.

    That is half the interval's width over the latency. Rows without a finite interval are
    skipped.
    """
    out = []
    for r in rows:
        lo, hi = r.get(f"{prefix}_low_s"), r.get(f"{prefix}_high_s")
        if lo is not None and hi is not None and math.isfinite(hi - lo):
            out.append((hi - lo) / (2 * r["latency_s"]))
    return out


def training_fields(train_summary: dict[str, Any]) -> dict[str, Any]:
    """Held-out loss and routing statistics of a run's training, for its summary and hparams.

    `train_summary` is what the workload's prepare step returned.
    """
    held = train_summary.get("heldout_stats", {})
    return {
        "train_loss": train_summary.get("train_loss"),
        "heldout_loss": train_summary.get("heldout_loss"),
        "heldout_load_cv": held.get("load_cv"),
        "heldout_drop_fraction": held.get("drop_fraction"),
        "heldout_max_mean_load": held.get("max_mean_load"),
        # MaxVio over the whole held-out set, mean over MoE layers (Wang et al. 2024).
        "heldout_max_vio_global": held.get("max_vio_global"),
        "heldout_tokens_per_expert": held.get("tokens_per_expert"),
        "train_seconds": train_summary.get("train_seconds"),
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of every point, one line per (run, batch size)."""
    header = (
        f"{'run':<24} {'batch':>6} {'latency ms':>11} {'95% CI ms':>19} "
        f"{'per s':>12} {'GFLOP/s':>9} {'runs':>6} {'stopped on':>10} {'compile s':>9}"
    )
    lines = [header, "-" * len(header)]
    for r in sorted(rows, key=lambda r: (r["run"], r["batch_size"])):
        gflops = r["achieved_flops_per_s"]
        ci = f"[{r['latency_ci_low_s'] * 1e3:.4g}, {r['latency_ci_high_s'] * 1e3:.4g}]"
        # "precision": the ±target interval was met; "budget"/"max_runs": it was not (*).
        stop = r.get("stop_reason", "precision")
        stop = stop if r.get("converged", True) else f"{stop} *"
        lines.append(
            f"{r['run']:<24} {r['batch_size']:>6} {r['latency_s'] * 1e3:>11.4g} {ci:>19} "
            f"{r['throughput_per_s']:>12.4g} "
            f"{(gflops or float('nan')) / 1e9:>9.4g} {r['n_runs']:>6} {stop:>10} "
            f"{r['compile_s']:>9.3f}"
        )
    if any(not r.get("converged", True) for r in rows):
        lines.append(
            "* the latency's 95% interval (from the spread between passes) missed "
            "timing.target_rel_ci"
        )
    return "\n".join(lines)


def memory_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The run's memory wall, from all its rows of any status.

    memory_bytes is linear in the batch: weights + bytes per example × batch. A
    least-squares line through the compiled programs' needs gives both terms. They are
    `memory_fixed_bytes` and `bytes_per_example`. `max_batch_predicted` is the largest
    batch whose need fits the device's memory. Fewer than three batch sizes with a known
    need give no fit. Then all three stay None.
    """
    sized = sorted(
        (r["batch_size"], r["memory_bytes"]) for r in rows if r.get("memory_bytes") is not None
    )
    ok = [r["batch_size"] for r in rows if r.get("status", "ok") == "ok"]
    oom = [r["batch_size"] for r in rows if r.get("status") == "oom"]
    device = next((r["device_memory_bytes"] for r in rows if r.get("device_memory_bytes")), None)
    out = {
        "max_batch_measured": max(ok) if ok else None,
        "first_oom_batch": min(oom) if oom else None,
        "device_memory_bytes": device,
        "bytes_per_example": None,
        "memory_fixed_bytes": None,
        "max_batch_predicted": None,
        "status_counts": {
            s: sum(r.get("status", "ok") == s for r in rows)
            for s in sorted({r.get("status", "ok") for r in rows})
        },
    }
    # A line through two points always fits: three batch sizes at least.
    if len({b for b, _ in sized}) >= 3:
        b, m = np.array(sized, dtype=np.float64).T
        slope, fixed = np.polyfit(b, m, 1)
        out["bytes_per_example"] = float(slope)
        out["memory_fixed_bytes"] = float(fixed)
        if device and slope > 0:
            out["max_batch_predicted"] = int(max(0.0, (device - fixed) / slope))
    return out


def whatif_max_batch(s: dict[str, Any], devices: tuple[str, ...]) -> dict[str, int | None]:
    """Largest batch whose program fits each spec device: (memory - fixed) / bytes per example.

    It uses this run's fitted memory line: weights and fixed buffers, plus bytes per
    example. So it holds for the same dtype and program on the other device. Without a fit
    each device gets None.
    """
    per, fixed = s.get("bytes_per_example"), s.get("memory_fixed_bytes")
    out = {}
    for name in devices:
        memory = specs.SPECS[name].memory_bytes
        out[name] = int(max(0.0, (memory - fixed) / per)) if per and per > 0 else None
    return out
