"""How far the a-priori prediction is from the measurement, per experiment and per run.

    python -m experiments.prediction_error /tmp/mlp_article /tmp/decode ...

For each workdir: the median and 90th percentile over its points of
|predicted_latency_s / latency_s - 1|, then each run's median with its fitted
knee and the knee read from the predicted curve (95% intervals). Where the rows also
carry the prediction priced from the compiled program's op list
(`program_predicted_latency_s`), its median stands beside the hand list's, and XLA's own
estimate's (`xla_estimated_latency_s`, GPU) where the compiler wrote one.
"""

import json
import os
import sys

import numpy as np


def _rows(workdir: str) -> list[dict]:
    if not os.path.exists(os.path.join(workdir, "results.jsonl")):
        return []
    with open(os.path.join(workdir, "results.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if r.get("status", "ok") == "ok" and r.get("predicted_latency_s")]


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3g}"


def describe(workdir: str) -> str:
    rows = _rows(workdir)
    if not rows:
        return f"== {workdir}: no analysed points"
    errors = np.array([abs(r["predicted_latency_s"] / r["latency_s"] - 1) for r in rows])
    program = [
        abs(r["program_predicted_latency_s"] / r["latency_s"] - 1)
        for r in rows
        if r.get("program_predicted_latency_s")
    ]
    xla = [
        abs(r["xla_estimated_latency_s"] / r["latency_s"] - 1)
        for r in rows
        if r.get("xla_estimated_latency_s")
    ]
    summary = {}
    path = os.path.join(workdir, "summary.json")
    if os.path.exists(path):
        with open(path) as f:
            summary = {s["run"]: s for s in json.load(f)}
    lines = [
        f"== {workdir}: {len(rows)} points, median {np.median(errors):.3f}, "
        f"p90 {np.percentile(errors, 90):.3f}"
        + (f"; from the program's ops: median {np.median(program):.3f}" if program else "")
        + (f"; XLA's own estimate: median {np.median(xla):.3f}" if xla else "")
    ]
    for run in dict.fromkeys(r["run"] for r in rows):
        err = [abs(r["predicted_latency_s"] / r["latency_s"] - 1) for r in rows if r["run"] == run]
        prog = [
            abs(r["program_predicted_latency_s"] / r["latency_s"] - 1)
            for r in rows
            if r["run"] == run and r.get("program_predicted_latency_s")
        ]
        s = summary.get(run, {})
        lines.append(
            f"  {run:28s} n={len(err):2d} median={np.median(err):.3f} "
            + (f"program={np.median(prog):.3f} " if prog else "")
            + f"knee fit={_fmt(s.get('knee_batch_size'))} "
            f"[{_fmt(s.get('knee_low'))}, {_fmt(s.get('knee_high'))}] "
            f"predicted curve={_fmt(s.get('predicted_curve_knee_batch_size'))} "
            f"[{_fmt(s.get('predicted_curve_knee_low'))}, "
            f"{_fmt(s.get('predicted_curve_knee_high'))}]"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python -m experiments.prediction_error WORKDIR [WORKDIR ...]")
    for workdir in sys.argv[1:]:
        print(describe(workdir))
