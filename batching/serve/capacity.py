"""Capacity: the highest request rate a policy serves within its SLOs.

A rate meets the SLOs when its p90 TTFT and p90 TPOT are both within them (MLPerf's
Server scenario judges a percentile the same way, at p99). Latency grows with the rate.
So bisection finds the capacity between a rate that meets them and one that does not. It
halves the gap in log rate until the two are within `rel_tol` of each other. The capacity
reported is the rate that met them.
"""

import math
from collections.abc import Callable
from typing import Any

# The bisection stops when the failing rate is within this share above the met one.
REL_TOL = 0.05


def meets(m: dict[str, Any], slo_ttft_s: float, slo_tpot_s: float) -> bool:
    """Whether a rate's metrics (batching.serve.metrics.summarize) meet both p90 SLOs."""
    return m["completed"] > 0 and m["ttft_p90_s"] <= slo_ttft_s and m["tpot_p90_s"] <= slo_tpot_s


def capacity(
    run: Callable[[float], dict[str, Any]],
    slo_ttft_s: float,
    slo_tpot_s: float,
    low: float,
    high: float,
    rel_tol: float = REL_TOL,
) -> dict[str, Any]:
    """Bisects `run(rate) -> metrics` between `low` and `high` requests/s.

    Returns the capacity, the failing rate above it, and every rate tried with its
    verdict. Where `low` fails the capacity is below it (0 reported); where `high`
    meets, it is at least `high`.
    """
    if not 0 < low < high or not 0 < rel_tol < 1:
        raise ValueError(f"capacity needs 0 < low < high and 0 < rel_tol < 1, got {low}, {high}")
    tried: list[tuple[float, bool]] = []

    def ok(rate: float) -> bool:
        verdict = meets(run(rate), slo_ttft_s, slo_tpot_s)
        tried.append((rate, verdict))
        return verdict

    if not ok(low):
        return {"capacity_per_s": 0.0, "upper_per_s": low, "tried": tried}
    if ok(high):
        return {"capacity_per_s": high, "upper_per_s": math.inf, "tried": tried}
    while high / low - 1 > rel_tol:
        mid = math.sqrt(low * high)
        low, high = (mid, high) if ok(mid) else (low, mid)
    return {"capacity_per_s": low, "upper_per_s": high, "tried": tried}
