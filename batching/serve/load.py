"""The load a serving run takes: requests with arrival times and prompt and output lengths.

Open loop, as `vllm bench serve` draws it (vllm-project/vllm, vllm/benchmarks/serve.py):
inter-arrival gaps from a gamma distribution of shape `burstiness` and mean 1 / rate. A
burstiness of 1 is a Poisson process; below 1 the arrivals come in bursts, above 1 they
are more even. An infinite rate sends every request at time 0. Lengths are fixed, or
uniform in a range. A JSONL trace gives all three, one request per line.

    {"arrival_s": 0.25, "prompt_len": 48, "output_len": 32}

Closed loop is N users. Each sends its next request when its last one finishes, so its
requests have no arrival times of their own.
"""

import dataclasses
import json
import math

import numpy as np


@dataclasses.dataclass(frozen=True)
class Request:
    """One request: its id, when it arrives (s from the run's start), and its lengths."""

    id: int
    arrival_s: float
    prompt_len: int
    output_len: int


def arrivals(n: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> np.ndarray:
    """n arrival times (s): cumulative gamma gaps of mean 1 / rate, the first at its gap.

    As vLLM does, the times are then scaled so that the last one is n / rate: a short run
    keeps its target rate. `rate` is requests per second, math.inf for all at once. A
    ValueError names a bad one.
    """
    if not (rate > 0):
        raise ValueError(f"serve.request_rate must be > 0 (inf for all at once), got {rate!r}")
    if not (burstiness > 0) or math.isinf(burstiness):
        raise ValueError(f"serve.burstiness must be a finite number > 0, got {burstiness!r}")
    if math.isinf(rate):
        return np.zeros(n)
    gaps = np.random.default_rng(seed).gamma(burstiness, 1.0 / (rate * burstiness), size=n)
    times = np.cumsum(gaps)
    return times * (n / rate) / times[-1] if n else times


def lengths(n: int, spec: int | tuple[int, int], seed: int, field: str) -> np.ndarray:
    """n lengths: `spec` itself, or uniform integers in [low, high] for a (low, high) pair."""
    if isinstance(spec, int) and not isinstance(spec, bool):
        if spec < 1:
            raise ValueError(f"{field} must be >= 1, got {spec!r}")
        return np.full(n, spec)
    low, high = spec
    if not 1 <= low <= high:
        raise ValueError(f"{field} must be a length >= 1 or (low, high), got {spec!r}")
    return np.random.default_rng(seed).integers(low, high + 1, size=n)


def open_loop(
    n: int,
    rate: float,
    prompt_len: int | tuple[int, int],
    output_len: int | tuple[int, int],
    burstiness: float = 1.0,
    seed: int = 0,
) -> list[Request]:
    """n requests arriving at `rate`, with fixed or uniform lengths, reproducible by seed."""
    times = arrivals(n, rate, burstiness, seed)
    prompts = lengths(n, prompt_len, seed + 1, "serve.prompt_len")
    outputs = lengths(n, output_len, seed + 2, "serve.output_len")
    return [
        Request(i, float(t), int(p), int(o))
        for i, (t, p, o) in enumerate(zip(times, prompts, outputs, strict=True))
    ]


def from_trace(path: str) -> list[Request]:
    """The requests of a JSONL trace, in arrival order; a bad line names its number."""
    out = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                r = Request(len(out), float(d["arrival_s"]), int(d["prompt_len"]),
                            int(d["output_len"]))  # fmt: skip
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"serve.trace {path} line {number}: {e!r}") from None
            if r.arrival_s < 0 or r.prompt_len < 1 or r.output_len < 1:
                raise ValueError(f"serve.trace {path} line {number}: {line.strip()}")
            out.append(r)
    out.sort(key=lambda r: r.arrival_s)
    return [dataclasses.replace(r, id=i) for i, r in enumerate(out)]


def closed_loop(users: int, per_user: int, prompt_len: int, output_len: int) -> list[list[Request]]:
    """`users` queues of `per_user` requests each; a user's next request follows its last."""
    if users < 1 or per_user < 1:
        raise ValueError(f"serve.users and requests per user must be >= 1, got {users}, {per_user}")
    return [
        [Request(u * per_user + i, math.nan, prompt_len, output_len) for i in range(per_user)]
        for u in range(users)
    ]
