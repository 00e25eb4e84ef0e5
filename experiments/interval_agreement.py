"""Do two runs of the same job agree within their intervals? The benchmark that chooses
timing.estimator, read off finished workdirs (nothing is timed here).

    python -m experiments.interval_agreement --pairs=/tmp/a1,/tmp/a2 --pairs=/tmp/b1,/tmp/b2

For each pair of workdirs (the same experiment, run one after the other), each point both
measured, and each candidate rule, from the rows' pass medians (or, for `pooled`, the old
rule, from samples.jsonl): whether each run's estimate lies inside the other run's 95%
interval (two estimates with equal, honest errors do so ~83% of the time), how far apart the
two estimates are (median |log ratio|), and the median half width. The rule `row` scores what
the rows say: `latency_s` in `latency_ci_*`, the passes' interval widened by the drift
between runs once the drift log holds enough readings. The rule whose estimates
of two runs agree best, at intervals that still say something, is the default.
"""

import json
import os

import numpy as np
from absl import app, flags

from batching.measure import pass_stats, stats
from batching.outputs import results

FLAGS = flags.FLAGS
flags.DEFINE_multi_string("pairs", [], "Two workdirs of the same job, comma-separated.")
flags.DEFINE_string("json_out", None, "Also write the table as JSON here.")

RULES = (*pass_stats.ESTIMATORS, "pooled", "row")


def point_estimates(workdir: str, rule: str) -> dict[tuple[str, int], tuple[float, float, float]]:
    """(estimate, low, high) per (run, batch) of a workdir under one rule."""
    store = results.Store(workdir)
    samples = store.pass_samples()
    out = {}
    for r in results.latest(store.rows()):
        if not results.is_ok(r) or (r["run"], r["batch_size"]) not in samples:
            continue
        if rule == "row":
            out[(r["run"], r["batch_size"])] = (
                r["latency_s"],
                r["latency_ci_low_s"],
                r["latency_ci_high_s"],
            )
            continue
        passes = [np.asarray(p) for p in samples[(r["run"], r["batch_size"])]]
        if rule == "pooled":
            pooled = np.concatenate(passes)
            lo, hi = stats.median_interval(pooled)
            out[(r["run"], r["batch_size"])] = (float(np.median(pooled)), lo, hi)
        else:
            est = pass_stats.from_passes(passes, rule)
            out[(r["run"], r["batch_size"])] = (est.latency_s, est.low_s, est.high_s)
    return out


def agreement(a: str, b: str, rule: str) -> dict[str, float]:
    """The pair's figures under one rule."""
    ea, eb = point_estimates(a, rule), point_estimates(b, rule)
    keys = sorted(set(ea) & set(eb))
    inside = [lo <= ea[k][0] <= hi for k in keys for lo, hi in [eb[k][1:]]]
    inside += [lo <= eb[k][0] <= hi for k in keys for lo, hi in [ea[k][1:]]]
    gaps = [abs(np.log(ea[k][0] / eb[k][0])) for k in keys]
    halves = [(e[2] - e[1]) / (2 * e[0]) for est in (ea, eb) for e in (est[k] for k in keys)]
    return {
        "points": len(keys),
        "inside_other": float(np.mean(inside)),
        "median_abs_log_ratio": float(np.median(gaps)),
        "median_half_width": float(np.median(halves)),
    }


def main(argv):
    del argv
    table = []
    for pair in FLAGS.pairs:
        a, b = pair.split(",")
        for rule in RULES:
            table.append({"a": a, "b": b, "rule": rule, **agreement(a, b, rule)})
    print(f"{'pair':<44} {'rule':<8} {'points':>6} {'inside':>7} {'|log a/b|':>9} {'±':>7}")
    for t in table:
        name = f"{os.path.basename(t['a'].rstrip('/'))} vs {os.path.basename(t['b'].rstrip('/'))}"
        print(
            f"{name:<44} {t['rule']:<8} {t['points']:>6} {t['inside_other']:>7.2f} "
            f"{t['median_abs_log_ratio']:>9.3f} {t['median_half_width']:>7.3f}"
        )
    for rule in RULES:
        mine = [t for t in table if t["rule"] == rule]
        print(
            f"{'all pairs':<44} {rule:<8} {sum(t['points'] for t in mine):>6} "
            f"{np.mean([t['inside_other'] for t in mine]):>7.2f} "
            f"{np.median([t['median_abs_log_ratio'] for t in mine]):>9.3f} "
            f"{np.median([t['median_half_width'] for t in mine]):>7.3f}"
        )
    if FLAGS.json_out:
        with open(FLAGS.json_out, "w") as f:
            json.dump(table, f, indent=1)


if __name__ == "__main__":
    app.run(main)
