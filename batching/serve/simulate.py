"""A discrete-event simulator of the serving loop, driven by the engine's measured costs.

It runs the loop's own policies (batching.serve.loop.Loop) on a virtual clock. Its engine
computes nothing: a prefill, an insert and a decode step each move the clock by their
cost. So simulation and loop differ only where the costs do. The costs are the engine's as
the loop calls it. They are a decode step over every slot (its tokens copied to the host),
an insert, and a prefill per padded prompt length. They come from a real run's own calls
(`costs_from_loop`), or from the engine called alone (`measure_costs`). Called alone, a
step runs faster than between a loop's prefills and inserts. The step attends the whole
static cache. So its cost depends on the slots and `max_len`, not on how many slots are
busy or how full their sequences are.
"""

import dataclasses
import time
from collections.abc import Sequence

import jax
import numpy as np

from batching.predict import whatif
from batching.serve.engine import Engine, bucket
from batching.serve.load import Request
from batching.serve.loop import Loop
from batching.serve.metrics import Record
from batching.setup import specs
from batching.workloads import decoder as decoder_workload
from models import decoder
from models.dtypes import resolve_dtype

# Each cost is the median of this many calls of the engine, after WARM_CALLS more.
COST_CALLS = 60
WARM_CALLS = 5


@dataclasses.dataclass(frozen=True)
class Costs:
    """Seconds of the loop's device calls: a decode step, an insert, a prefill per bucket,
    and a prefill chunk."""

    step_s: float
    insert_s: float
    prefill_s: dict[int, float]
    chunk_s: float = 0.0  # one chunk of a chunked prefill (0: the run has none)

    def prefill(self, padded: int) -> float:
        """A prefill at a padded length; an unmeasured one is scaled from the nearest."""
        if padded in self.prefill_s:
            return self.prefill_s[padded]
        near = min(self.prefill_s, key=lambda b: abs(np.log(b / padded)))
        return self.prefill_s[near] * padded / near

    def admit(self, prompt_len: int, max_len: int, chunk: int = 0) -> float:
        """Bringing a prompt into a slot: its prefill (or its chunks), then the insert."""
        if chunk:
            return -(-prompt_len // chunk) * self.chunk_s + self.insert_s
        return self.prefill(bucket(prompt_len, max_len)) + self.insert_s


class Clock:
    """A virtual clock: `now` seconds, moved on by the costs and by sleeps."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        """Waiting moves the clock on."""
        self.now += max(seconds, 0.0)


class SimEngine:
    """The engine's interface over a virtual clock: every call costs its measured seconds."""

    def __init__(
        self, costs: Costs, slots: int, max_len: int, clock: Clock, vocab: int = 2, chunk: int = 0
    ):
        self.costs, self.slots, self.max_len, self.clock, self.vocab = (
            costs, slots, max_len, clock, vocab,
        )  # fmt: skip
        self.chunk = chunk

    bucket = Engine.bucket

    def prefill(self, prompt: np.ndarray) -> int:
        """The prefill's cost; token 0."""
        self.clock.sleep(self.costs.prefill(self.bucket(len(prompt))))
        return 0

    def prefill_chunk(self, part: np.ndarray, first: bool) -> int:
        """A chunk's cost; token 0."""
        del part, first
        self.clock.sleep(self.costs.chunk_s)
        return 0

    def insert(self, slot: int) -> None:
        """The insert's cost."""
        del slot
        self.clock.sleep(self.costs.insert_s)

    def step(self, tokens_B: np.ndarray, active_B: np.ndarray) -> np.ndarray:
        """The decode step's cost, whatever the slots hold; tokens 0."""
        del active_B
        self.clock.sleep(self.costs.step_s)
        return np.zeros_like(tokens_B)


def _median_s(fn, calls: int = COST_CALLS) -> float:
    for _ in range(WARM_CALLS):
        fn()
    samples = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return float(np.median(samples))


def measure_costs(engine: Engine, prompt_lens: Sequence[int]) -> Costs:
    """The engine's costs as the loop pays them: each call, then its results on the host."""
    tokens, active = np.zeros(engine.slots, np.int32), np.ones(engine.slots, bool)
    step_s = _median_s(lambda: engine.step(tokens, active))
    prefill_s = {}
    for padded in sorted({engine.bucket(n) for n in prompt_lens}):
        prefill_s[padded] = _median_s(lambda b=padded: engine.prefill(np.zeros(b, np.int32)))

    def insert():
        engine.insert(0)
        jax.block_until_ready(engine.cache)

    chunk_s = 0.0
    if engine.chunk:
        part = np.zeros(engine.chunk, np.int32)
        chunk_s = _median_s(lambda: engine.prefill_chunk(part, first=False))
    return Costs(step_s, _median_s(insert), prefill_s, chunk_s)


def costs_from_loop(calls: dict[str, list[float]]) -> Costs:
    """Costs fitted to a real run: the mean host seconds of each of its engine calls.

    It takes the mean, as a request's TPOT is a mean over its steps. A step after a prefill
    or an insert runs slower. The insert's work runs on while the host goes on, and the
    next step waits for it. The mean holds such steps at the calibration run's share.
    """
    prefill = {int(k.split(":")[1]): float(np.mean(v)) for k, v in calls.items()
               if k.startswith("prefill:")}  # fmt: skip
    chunk = float(np.mean(calls["chunk"])) if calls.get("chunk") else 0.0
    return Costs(float(np.mean(calls["step"])), float(np.mean(calls["insert"])), prefill, chunk)


def spec_costs(
    cfg: decoder.DecoderConfig,
    slots: int,
    max_len: int,
    buckets: Sequence[int],
    device: str,
    chunk: int = 0,
) -> Costs:
    """Costs on a spec-table device, from the decoder's op lists at its datasheet peaks.

    The step is `slots` tokens over a `max_len` cache, a prefill one prompt of each padded
    length (batching.workloads.decoder.step_ops, priced by batching.predict.whatif), an
    insert one slot's keys and values read and written at the device's bandwidth. No
    dispatch or launch is charged: the costs are lower bounds, the capacity an upper one.
    A chunk is priced as a prompt of `chunk` tokens, without the cache it attends.
    """
    param_bytes = resolve_dtype(cfg.param_dtype).itemsize
    cache_bytes = resolve_dtype(cfg.cache_dtype).itemsize

    def seconds(batch: int, length: int, phase: str) -> float:
        listed = decoder_workload.step_ops(
            cfg, batch, length, phase, param_bytes, cache_bytes, cfg.cache_layout
        )
        rows = [{"batch_size": batch, "ops": [o.to_dict() for o in listed]}]
        curve = whatif.whatif(rows, (device,), cfg.dtype, "default", param_bytes)[device]
        return curve["latency_s"][batch]

    kv = 2 * cfg.n_layers * max_len * cfg.n_kv_heads * cfg.head_dim * cache_bytes
    insert_s = 2 * kv / specs.SPECS[device].bandwidth_bytes_per_s
    prefill = {b: seconds(1, b, "prefill") for b in sorted(set(buckets))}
    chunk_s = seconds(1, chunk, "prefill") if chunk else 0.0
    return Costs(seconds(slots, max_len, "decode"), insert_s, prefill, chunk_s)


def simulate(
    requests: Sequence[Request],
    costs: Costs,
    slots: int,
    max_len: int,
    policy: str,
    chunk: int = 0,
) -> tuple[list[Record], float, list[int]]:
    """The loop's records and duration for `requests`, and its occupancy per step."""
    clock = Clock()
    engine = SimEngine(costs, slots, max_len, clock, chunk=chunk)
    loop = Loop(engine, policy, clock=clock, sleep=clock.sleep)
    records, duration = loop.run(requests)
    return records, duration, loop.occupancy
