"""The post's claims and the verdict the data gives on each.

The claims are those of Finbarr Timbers, "How does batching work on modern GPUs?"
(https://www.artfintel.com/p/how-does-batching-work-on-modern). A verdict function reads
an experiment's run summaries and rows. The functions live in batching.predict.claims_mlp
and claims_models. Each returns {"verdict": ..., "evidence": ...}. The evidence quotes the
numbers it used. A claim the data cannot decide says so instead of guessing.
"""

from collections.abc import Callable
from typing import Any

import numpy as np

from batching.predict.claims_mlp import c3_mlp_knee, c4_knee_across_widths, c5_small_networks
from batching.predict.claims_models import (
    c1_resnet_cpu_linear,
    c2_accelerator_flat,
    c6_convolutions_reuse_weights,
    c7_decode_like_mlp,
    c8_moe_routers,
)
from batching.predict.verdict import MIN_POINTS, Verdict, not_enough_points

CLAIMS = {
    "C1": "ResNet50 inference time on a CPU grows linearly with batch size.",
    "C2": "On a GPU (T4) going from batch 1 to 2 to 3 costs no extra time; then time grows "
    "linearly.",
    "C3": "An MLP is memory-bound while B < FLOPS/bandwidth and compute-bound above; an MLP of "
    "depth 8, width 1024 on a T4 starts slowing around B≈128.",
    "C4": "The knee exists across widths (log-log plot over widths).",
    "C5": "Small networks show almost no scaling from batch 1 to 512: they are overhead-bound.",
    "C6": "Convolutions reuse each weight many times, so batching helps them less.",
    "C7": "A transformer with a KV cache behaves like an MLP for batching.",
    "C8": "An MoE's token-choice gating can spread a batch unevenly over experts; expert-choice "
    "avoids it but is awkward for autoregressive decoding.",
}


VERDICTS: dict[str, Callable[[list[dict[str, Any]], list[dict[str, Any]]], Verdict]] = {
    "C1": c1_resnet_cpu_linear,
    "C2": c2_accelerator_flat,
    "C3": c3_mlp_knee,
    "C4": c4_knee_across_widths,
    "C5": c5_small_networks,
    "C6": c6_convolutions_reuse_weights,
    "C7": c7_decode_like_mlp,
    "C8": c8_moe_routers,
}


def verdicts(
    claim_ids: tuple[str, ...], summaries: list[dict[str, Any]], rows: list[dict[str, Any]]
) -> dict[str, Verdict]:
    """A verdict per requested claim.

    A claim without a verdict function is 'not tested here'. A verdict fits trends within runs.
    So it leaves out runs with fewer than MIN_POINTS ok batch sizes. Its evidence names
    them. With no run left, the verdict is 'not enough points'.
    """
    out = {}
    enough = [s for s in summaries if s.get("points", 0) >= MIN_POINTS]
    short = sorted(s["run"] for s in summaries if s not in enough)
    kept = {s["run"] for s in enough}
    enough_rows = [r for r in rows if r["run"] in kept]
    for cid in claim_ids:
        fn = VERDICTS.get(cid)
        if fn is None or not summaries or "knee_batch_size" not in summaries[0]:
            out[cid] = {"verdict": "not tested here", "evidence": "no analysis for this claim"}
        elif not enough:
            fewest = min(s.get("points", 0) for s in summaries)
            out[cid] = not_enough_points(f"a run has {fewest} measured batch sizes")
        else:
            try:
                out[cid] = fn(enough, enough_rows)
            except (np.linalg.LinAlgError, ValueError, ZeroDivisionError, FloatingPointError) as e:
                # A degenerate sweep (equal latencies, one size per run) must not end the report.
                out[cid] = not_enough_points(f"{type(e).__name__}: {e}")
                continue
            if short:
                out[cid]["evidence"] += (
                    f" (runs with fewer than {MIN_POINTS} ok batch sizes left out: "
                    f"{', '.join(short)})"
                )
    return out
