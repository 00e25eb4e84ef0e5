"""Serving metrics exactly as `vllm bench serve` defines them (vllm-project/vllm,
vllm/benchmarks/serve.py, `calculate_metrics`), from per-request records.

A record holds a request's arrival and the time of each output token, on the host clock.
Per request:

- TTFT: first token - arrival. An open-loop request's clock starts when it arrives, so
  the time it waits for a slot is in its TTFT.
- E2E latency: last token - arrival.
- TPOT: (E2E - TTFT) / (output tokens - 1), for requests of more than one token.
- ITL: the gaps between consecutive tokens of a request, pooled over all requests.

The run's `duration_s` runs from its start to the last completion. Over it:

- request and output-token throughput: completed requests and their tokens per second.
- goodput: requests meeting every SLO (value <= SLO), per second. A one-token request's
  TPOT counts as 0 there.
- statistics: numpy's default (linear) percentiles; mean, median, population std. The
  p90s of TTFT and TPOT also carry a 95% interval (`quantile_interval`).

Failed (rejected) requests are left out of every latency and of goodput, but the run's
duration still counts their time, as vLLM's does.
"""

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

PERCENTILES = (50, 90, 99)
# The p90s that decide capacity carry a distribution-free interval at this confidence.
CONFIDENCE = 0.95


def quantile_interval(values: Sequence[float], q: float, confidence: float = CONFIDENCE):
    """Distribution-free interval for the q-quantile: two order statistics of `values`.

    The count of values below the true q-quantile is Binomial(n, q). The ranks are picked
    from that distribution, as batching.measure.stats.median_interval does at q = 1/2. With
    few values a bound can be the smallest or largest value itself: the data allow no more.
    """
    x = np.sort(np.asarray(values, float))
    n, alpha = x.size, 1.0 - confidence
    if n == 0:
        raise ValueError("quantile_interval needs at least one value")
    k = np.arange(n + 1)
    log_pmf = (
        np.array([math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) for i in k])
        + k * math.log(q) + (n - k) * math.log1p(-q)
    )  # fmt: skip
    cdf = np.cumsum(np.exp(log_pmf))
    # lower rank: the largest r with P(B <= r - 1) <= alpha / 2; upper: the smallest r with
    # P(B <= r - 1) >= 1 - alpha / 2 (1-based ranks, clipped to the data).
    low = int(np.searchsorted(cdf, alpha / 2, side="right"))
    high = int(np.searchsorted(cdf, 1 - alpha / 2, side="left")) + 1
    return float(x[max(low, 1) - 1]), float(x[min(high, n) - 1])


@dataclasses.dataclass
class Record:
    """One request as served: arrival, each output token's time (s), and how it ended."""

    id: int
    arrival_s: float
    prompt_len: int
    output_len: int
    token_s: list[float] = dataclasses.field(default_factory=list)
    tokens: list[int] = dataclasses.field(default_factory=list)  # the greedy output
    # When a slot took it (prefill started): its queueing delay is admitted_s - arrival_s.
    admitted_s: float | None = None
    error: str = ""  # why it was rejected ("" when served)
    # MoE: per decode step, the experts its token reached in each MoE block.
    experts: list[list[float]] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether it was served to its last token."""
        return not self.error and len(self.token_s) == self.output_len

    @property
    def ttft_s(self) -> float:
        """Time to first token."""
        return self.token_s[0] - self.arrival_s

    @property
    def e2e_s(self) -> float:
        """Arrival to last token."""
        return self.token_s[-1] - self.arrival_s

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first; None for a one-token request."""
        n = len(self.token_s)
        return (self.e2e_s - self.ttft_s) / (n - 1) if n > 1 else None

    @property
    def itl_s(self) -> list[float]:
        """Gaps between its consecutive tokens."""
        return list(np.diff(self.token_s))


def _stats(name: str, values: Sequence[float]) -> dict[str, float]:
    x = np.asarray(values, float) if len(values) else np.zeros(1)
    out = {
        f"{name}_mean_s": float(np.mean(x)),
        f"{name}_median_s": float(np.median(x)),
        f"{name}_std_s": float(np.std(x)),
    }
    out.update({f"{name}_p{p}_s": float(np.percentile(x, p)) for p in PERCENTILES})
    return out


def meets(r: Record, slo_ttft_s: float | None, slo_tpot_s: float | None) -> bool:
    """Whether a served request meets every SLO given (None: no such SLO)."""
    tpot = r.tpot_s if r.tpot_s is not None else 0.0
    return (slo_ttft_s is None or r.ttft_s <= slo_ttft_s) and (
        slo_tpot_s is None or tpot <= slo_tpot_s
    )


def summarize(
    records: Sequence[Record],
    duration_s: float,
    slo_ttft_s: float | None = None,
    slo_tpot_s: float | None = None,
) -> dict[str, Any]:
    """The run's metrics: counts, throughputs, goodput, and the latencies' statistics."""
    done = [r for r in records if r.ok]
    tokens = sum(r.output_len for r in done)
    out: dict[str, Any] = {
        "completed": len(done),
        "failed": len(records) - len(done),
        "duration_s": duration_s,
        "request_throughput_per_s": len(done) / duration_s,
        "output_throughput_per_s": tokens / duration_s,
        "total_token_throughput_per_s": (tokens + sum(r.prompt_len for r in done)) / duration_s,
        "goodput_per_s": sum(meets(r, slo_ttft_s, slo_tpot_s) for r in done) / duration_s,
        "queueing_delay_mean_s": float(
            np.mean([r.admitted_s - r.arrival_s for r in done]) if done else 0.0
        ),
    }
    ttft, tpot = [r.ttft_s for r in done], [r.tpot_s for r in done if r.tpot_s is not None]
    out.update(_stats("ttft", ttft))
    out.update(_stats("tpot", tpot))
    for name, values in (("ttft", ttft), ("tpot", tpot)):
        if values:
            low, high = quantile_interval(values, 0.9)
            out[f"{name}_p90_low_s"], out[f"{name}_p90_high_s"] = low, high
    out.update(_stats("itl", [g for r in done for g in r.itl_s]))
    out.update(_stats("e2e", [r.e2e_s for r in done]))
    return out
