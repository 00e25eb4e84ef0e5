"""A serving run's settings (`config.serve`), each field checked before anything compiles.

A bad field raises a ValueError that names it and its value; main.py turns it into one
line and exit 2. configs/serve.py documents every field.
"""

import dataclasses
import math
import os
from typing import Any

from batching.serve.loop import POLICIES
from batching.setup import specs


@dataclasses.dataclass(frozen=True)
class Settings:
    """`config.serve` as checked values; lengths are ints or (low, high) pairs."""

    slots: int
    max_len: int
    policies: tuple[str, ...]
    of_capacity: tuple[float, ...]
    rates: tuple[float, ...]
    requests: int
    prompt_len: int | tuple[int, int]
    output_len: int | tuple[int, int]
    burstiness: float
    trace: str
    slo_ttft_s: float
    slo_tpot_s: float
    calibration_requests: int
    capacity_run_s: float
    whatif_devices: tuple[str, ...]
    decode_sweep_workdir: str
    chunk_tokens: int = 0
    refresh_requests: int = 0

    @classmethod
    def from_config(cls, serve: Any) -> "Settings":
        """Checks `config.serve`; the first bad field raises a ValueError naming it."""
        s = cls(
            slots=_count(serve.slots, "serve.slots"),
            max_len=_count(serve.max_len, "serve.max_len"),
            policies=_policies(tuple(serve.policies)),
            of_capacity=tuple(
                _rate(x, "serve.of_capacity", finite=True) for x in serve.of_capacity
            ),  # fmt: skip
            rates=tuple(_rate(x, "serve.rates", finite=True) for x in serve.rates),
            requests=_count(serve.requests, "serve.requests"),
            prompt_len=_length(serve.prompt_len, "serve.prompt_len"),
            output_len=_length(serve.output_len, "serve.output_len"),
            burstiness=_rate(serve.burstiness, "serve.burstiness", finite=True),
            trace=str(serve.trace),
            slo_ttft_s=_rate(serve.slo_ttft_s, "serve.slo_ttft_s", finite=True),
            slo_tpot_s=_rate(serve.slo_tpot_s, "serve.slo_tpot_s", finite=True),
            calibration_requests=_count(serve.calibration_requests, "serve.calibration_requests"),
            capacity_run_s=_rate(serve.capacity_run_s, "serve.capacity_run_s", finite=True),
            whatif_devices=tuple(serve.whatif_devices),
            decode_sweep_workdir=str(serve.decode_sweep_workdir),
            chunk_tokens=_count(serve.chunk_tokens, "serve.chunk_tokens"),
            refresh_requests=_count(serve.refresh_requests, "serve.refresh_requests", least=0),
        )
        s.check_fit()
        if s.max_len % s.chunk_tokens:
            raise ValueError(
                f"serve.chunk_tokens {s.chunk_tokens} must divide serve.max_len {s.max_len}"
            )
        for name in s.whatif_devices:
            if name not in specs.SPECS:
                raise ValueError(
                    f"serve.whatif_devices has an unknown device {name!r}; "
                    f"known: {sorted(specs.SPECS)}"
                )
        if s.trace and not os.path.isfile(s.trace):
            raise ValueError(f"serve.trace {s.trace!r} is not a file")
        if not (s.of_capacity or s.rates or s.trace):
            raise ValueError("serve.of_capacity and serve.rates are both empty: no rate to serve")
        return s

    def check_fit(self) -> None:
        """A generated request must fit a slot's cache (a trace's are rejected one by one)."""
        longest = lambda n: n if isinstance(n, int) else n[1]  # noqa: E731
        need = longest(self.prompt_len) + longest(self.output_len) - 1
        if need > self.max_len:
            raise ValueError(
                f"serve.prompt_len {self.prompt_len} + serve.output_len {self.output_len} - 1 "
                f"= {need} does not fit serve.max_len {self.max_len}"
            )

    @property
    def longest_prompt(self) -> int:
        """The longest prompt a generated request has."""
        return self.prompt_len if isinstance(self.prompt_len, int) else self.prompt_len[1]


def _count(value: Any, field: str, least: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise ValueError(f"{field} must be an integer >= {least}, got {value!r}")
    return value


def _rate(value: Any, field: str, finite: bool = False) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        x = math.nan
    if not x > 0 or (finite and math.isinf(x)) or isinstance(value, bool):
        need = "a finite number > 0" if finite else "a number > 0 (inf: all at once)"
        raise ValueError(f"{field} must be {need}, got {value!r}")
    return x


def _length(value: Any, field: str) -> int | tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    ok = isinstance(value, tuple | list) and len(value) == 2
    ok = ok and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    if ok and 1 <= value[0] <= value[1]:
        return int(value[0]) if value[0] == value[1] else (int(value[0]), int(value[1]))
    raise ValueError(f"{field} must be a length >= 1 or (low, high), got {value!r}")


def _policies(names: tuple[str, ...]) -> tuple[str, ...]:
    if not names:
        raise ValueError("serve.policies is empty")
    for name in names:
        if name not in POLICIES:
            raise ValueError(f"serve.policies has an unknown policy {name!r}; known: {POLICIES}")
    return names
