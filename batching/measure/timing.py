"""The one timer: compile separated from run, adaptive repetition, honest blocking.

A measured call is `out = compiled(*args)`, then a block on every output leaf. The clock
brackets exactly that. Inputs are already on the device. Nothing moves to the host inside the
timed region.
"""

import contextlib
import dataclasses
import gc
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from batching.measure import host, pass_stats, stats


@dataclasses.dataclass(frozen=True)
class TimingSettings:
    """How one series of timed calls runs, in seconds and fractions.

    It warms up first, for `warmup_runs` calls and `warmup_s` seconds. Then it makes at least
    `min_runs` and at most `max_runs` calls. It stops once its own median's `confidence`
    interval is within ±`target_rel_ci`. It also stops once `budget_s` seconds of calls have
    gone.
    """

    warmup_runs: int = 3
    warmup_s: float = 0.05
    min_runs: int = 10
    max_runs: int = 5000
    target_rel_ci: float = 0.03
    confidence: float = stats.CONFIDENCE
    budget_s: float = 2.0

    def __post_init__(self):
        checks = {
            "warmup_runs": self.warmup_runs >= 1,
            "warmup_s": self.warmup_s >= 0,
            "min_runs": self.min_runs >= 3,
            "max_runs": self.max_runs >= self.min_runs,
            "target_rel_ci": self.target_rel_ci > 0,
            "confidence": 0 < self.confidence < 1,
            "budget_s": self.budget_s > 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"timing.{name} is out of range, got {getattr(self, name)!r}")


# What the caches hold when a timed call starts (timing.cache).
CACHE_STATES = ("warm", "cold")


@dataclasses.dataclass(frozen=True)
class RunTiming:
    """A run's `timing` section.

    It sets the plan that every pass of a point follows. It says how a point's passes make its
    latency, and when a point is done.

    - Every pass, first or later, follows one plan. It warms up for `warmup_runs` calls and
      `warmup_s` seconds. Then it times calls, at least `min_runs` and at most `max_runs`. It
      stops when its own median is known to ±`target_rel_ci`, or after `pass_s` seconds.
    - The point's latency is `estimator` over its pass medians (batching.measure.pass_stats).
      Its `confidence` interval comes from their spread.
    - The point is converged once that interval is within ±`target_rel_ci`.
    - Passes beyond sweep.passes go to unconverged points. They stop once the run has spent
      `run_budget_s` seconds.
    - `cache`: "warm" times calls back to back. "cold" evicts the last-level cache before each
      call, outside the clock.
    - A point whose passes differ by more than `max_pass_cv` (std / mean) is flagged. The report
      says it was timed on a noisy machine.
    """

    warmup_runs: int = 1
    warmup_s: float = 0.01
    min_runs: int = 3
    max_runs: int = 1000
    pass_s: float = 0.03
    target_rel_ci: float = 0.03
    confidence: float = stats.CONFIDENCE
    run_budget_s: float = 20.0
    estimator: str = "geomean"
    cache: str = "warm"
    max_pass_cv: float = 0.10

    def __post_init__(self):
        checks = {
            "pass_s": self.pass_s > 0,
            "run_budget_s": self.run_budget_s >= 0,
            "max_pass_cv": self.max_pass_cv > 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"timing.{name} is out of range, got {getattr(self, name)!r}")
        if self.estimator not in pass_stats.ESTIMATORS:
            raise ValueError(
                f"timing.estimator must be one of {pass_stats.ESTIMATORS}, got {self.estimator!r}"
            )
        if self.cache not in CACHE_STATES:
            raise ValueError(f"timing.cache must be one of {CACHE_STATES}, got {self.cache!r}")
        self.pass_settings()  # the pass plan's own checks

    @classmethod
    def from_config(cls, cfg: Any) -> "RunTiming":
        """A run config's `timing` section; TypeError naming an unknown field."""
        return cls(**cfg.timing.to_dict())

    def pass_settings(self) -> TimingSettings:
        """The timer's settings for one pass, the same for every pass of every point."""
        return TimingSettings(
            warmup_runs=self.warmup_runs,
            warmup_s=self.warmup_s,
            min_runs=self.min_runs,
            max_runs=self.max_runs,
            target_rel_ci=self.target_rel_ci,
            confidence=self.confidence,
            budget_s=self.pass_s,
        )


@dataclasses.dataclass(frozen=True)
class Compiled:
    """An executable, with what compiling it cost and what XLA says it does.

    - `call`: the compiled executable itself.
    - `compile_s`, `lower_s`: the seconds each stage took.
    - `flops`, `bytes_accessed`: XLA's cost analysis, None where it did not count.
    - `memory`: XLA's memory analysis, in bytes per field.

    `call` is jax's AOT `Compiled`, with its C++ dispatch path. It is never the `jax.jit`
    function it came from. jit's cache key includes the matmul precision and other context.
    Calling the jit function outside the context it was compiled in would compile another
    program. The timer would time that one. The executable cannot retrace.
    """

    call: Callable[..., Any]
    compile_s: float
    lower_s: float
    flops: float | None
    bytes_accessed: float | None
    memory: dict[str, int]

    @property
    def executable(self) -> Any:
        """The compiled executable (`call`)."""
        return self.call


def _cost_value(cost: Any, key: str) -> float | None:
    # cost_analysis() is best effort: a dict, a one-element list in old JAX, or None;
    # -1 or a missing key means XLA did not count it.
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if not cost or key not in cost:
        return None
    value = float(cost[key])
    return value if value >= 0 and math.isfinite(value) else None


def precision_context(matmul_precision: str = "default"):
    """`jax.default_matmul_precision(p)`, or nothing for "default" (XLA's choice)."""
    if matmul_precision in (None, "default"):
        return contextlib.nullcontext()
    return jax.default_matmul_precision(matmul_precision)


def compile_fn(
    fn: Callable,
    args: Sequence[Any],
    donate_argnums: tuple[int, ...] = (),
    matmul_precision: str = "default",
) -> Compiled:
    """Lowers and compiles `fn` for `args` under `matmul_precision`, timing each stage apart.
    The returned `call` is that executable, so every timed call runs under that precision.
    """
    jitted = jax.jit(fn, donate_argnums=donate_argnums)
    with precision_context(matmul_precision):
        t0 = time.perf_counter()
        lowered = jitted.lower(*args)
        t1 = time.perf_counter()
        executable = lowered.compile()
        t2 = time.perf_counter()
    try:
        cost = executable.cost_analysis()
    except Exception:  # noqa: BLE001 - some backends raise instead of returning None
        cost = None
    memory = {}
    try:
        mem = executable.memory_analysis()
        for field in (
            "argument_size_in_bytes",
            "output_size_in_bytes",
            "temp_size_in_bytes",
            "alias_size_in_bytes",
        ):
            if mem is not None and hasattr(mem, field):
                memory[field] = int(getattr(mem, field))
    except Exception:  # noqa: BLE001
        pass
    return Compiled(
        call=executable,
        compile_s=t2 - t1,
        lower_s=t1 - t0,
        flops=_cost_value(cost, "flops"),
        bytes_accessed=_cost_value(cost, "bytes accessed"),
        memory=memory,
    )


def _blocker(out: Any) -> Callable[[Any], None]:
    """How to wait for a call's outputs. One array blocks on itself. Several go through
    jax.block_until_ready: a flat tuple, or any pytree. It waits for all of them in one C++
    call.
    """
    if isinstance(out, jax.Array):
        return lambda out: out.block_until_ready()
    return jax.block_until_ready


@dataclasses.dataclass(frozen=True)
class Measurement:
    """One series of timed calls: a sweep pass or a microbenchmark.

    - `samples_s`: the seconds of each call.
    - `converged`: whether its own median reached the precision target.
    - `stop_reason`: why the loop stopped.
    - `wall_s`: the wall seconds of warm-up and timing.
    - `host_busy`: the share of the host's CPU time that other processes took meanwhile
      (host.Window). It is None where unknown.
    """

    samples_s: np.ndarray
    converged: bool
    stop_reason: str  # "precision", "budget" or "max_runs"
    wall_s: float
    host_busy: float | None = None


# Why the timed loop stopped, as the code a shared decision carries (0: go on).
STOP_REASONS = {1: "precision", 2: "budget"}


@contextlib.contextmanager
def no_garbage_collection():
    """Collects the young generations, then allows no collection until the block ends.

    A collection inside the timed loop would land in one call's sample. A full collection walks
    every object that JAX holds, which takes long. So the old generation waits until after the
    block.
    """
    gc.collect(1)
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def measure(
    call: Callable[..., Any],
    args: Sequence[Any],
    settings: TimingSettings,
    next_args: Callable[[Sequence[Any], Any], Sequence[Any]] | None = None,
    share: Callable[[str, int], int] | None = None,
    keep_outputs: bool = False,
    before_call: Callable[[], None] | None = None,
) -> Measurement:
    """Times `call(*args)` until its median is known to `target_rel_ci` or the budget is spent.

    The clock brackets the call and the wait for every output, nothing else. Only this series'
    own samples decide when it stops. Around the clock:

    - `next_args(args, out)` feeds a call's output back in, such as a donated KV cache. It runs
      outside the clock. What it returns is waited for before the clock starts again.
    - `before_call()` runs before every call, outside the clock. It finishes before the call
      starts. It is a cache flush (timing.cache = "cold").
    - The previous call's outputs are released before the next call, unless they are fed back.
      So that call's outputs can take the same device buffers. On a GPU, XLA runs a program as a
      CUDA graph ("command buffer"). Outputs at new addresses make it update the graph on every
      call (openxla/xla#35315). That is a cost of the harness, not of the model. `keep_outputs`
      holds each call's outputs through the next call instead. A loop `out = f(x)` does that. It
      serves to measure the difference.
    - `share(tag, decision)` serves several processes (batching.setup.distributed.share). It
      replaces each clock-dependent decision by process 0's. So every process makes the same
      number of calls. It runs outside the clock, only where a decision is due. That is after
      warmup_runs, then at the precision checks.
    - Python's garbage collector does not run inside the series (no_garbage_collection).

    Returns the series' Measurement.
    """
    window = host.Window()
    with no_garbage_collection():
        samples, stop_reason, start = _timed_series(
            call, args, settings, next_args, share, keep_outputs, before_call
        )
    return Measurement(
        samples_s=samples,
        converged=stop_reason == "precision",
        stop_reason=stop_reason,
        wall_s=time.perf_counter() - start,
        host_busy=window.others_share(),
    )


def _timed_series(call, args, settings, next_args, share, keep_outputs, before_call):
    """Warm-up, then the timed loop: (samples, why it stopped, when it started)."""
    clock = time.perf_counter
    start = clock()
    args, block, kept = _warm_up(
        call, tuple(args), settings, next_args, share, keep_outputs, before_call
    )
    samples = np.empty(settings.max_runs, dtype=np.float64)
    n = 0
    next_check = settings.min_runs
    stop_reason = "max_runs"
    t_begin = clock()
    while n < settings.max_runs:
        if before_call is not None:
            before_call()
        t0 = clock()
        out = call(*args)
        block(out)
        samples[n] = clock() - t0
        n += 1
        args, kept = _between_calls(args, out, next_args, keep_outputs)
        del out
        if n >= next_check:
            # Checking costs a sort, so look again only after ~10% more samples.
            next_check = n + max(1, n // 10)
            if stats.relative_halfwidth(samples[:n], settings.confidence) <= settings.target_rel_ci:
                code = 1
            else:
                code = 2 if clock() - t_begin >= settings.budget_s else 0
            if share is not None:
                code = share("stop", code)
            if code:
                stop_reason = STOP_REASONS[code]
                break
    del kept
    return samples[:n].copy(), stop_reason, start


def _warm_up(
    call: Callable[..., Any],
    args: tuple[Any, ...],
    settings: TimingSettings,
    next_args: Callable[[Sequence[Any], Any], Sequence[Any]] | None,
    share: Callable[[str, int], int] | None,
    keep_outputs: bool,
    before_call: Callable[[], None] | None = None,
) -> tuple[tuple[Any, ...], Callable[[Any], None], Any]:
    """`warmup_runs` calls, then more until `warmup_s` (or the budget) has passed.

    Returns the next arguments and how to wait for an output. It also returns what stays alive
    into the first timed call (see _between_calls).
    """
    clock = time.perf_counter
    start = clock()
    runs, block, kept = 0, None, None
    while True:
        if runs >= settings.warmup_runs:
            elapsed = clock() - start
            go_on = elapsed < settings.warmup_s and elapsed < settings.budget_s
            if share is not None:
                go_on = bool(share("warmup", int(go_on)))
            if not go_on:
                return args, block, kept
        if before_call is not None:
            before_call()
        out = call(*args)
        block = block or _blocker(out)
        block(out)
        args, kept = _between_calls(args, out, next_args, keep_outputs)
        del out
        runs += 1


def _between_calls(
    args: tuple[Any, ...],
    out: Any,
    next_args: Callable[[Sequence[Any], Any], Sequence[Any]] | None,
    keep_outputs: bool,
) -> tuple[tuple[Any, ...], Any]:
    """The next call's arguments, ready, and what stays alive through it beside them. That is
    the outputs with `keep_outputs`, else nothing.
    """
    if next_args is not None:
        args = tuple(next_args(args, out))
        jax.block_until_ready(args)
    return args, (out if keep_outputs else None)
