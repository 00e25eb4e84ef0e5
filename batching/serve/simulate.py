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
from batching.serve.loop import IDLE, Loop
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
    and a prefill chunk.

    With `samples` (calls' seconds by their names in Loop.calls), each simulated call draws
    one of its own, so the costs' spread reaches the tails. A call after idle draws from its
    IDLE samples when there are some. "host" samples are the loop's own time per step.
    """

    step_s: float
    insert_s: float
    prefill_s: dict[int, float]
    chunk_s: float = 0.0  # one chunk of a chunked prefill (0: the run has none)
    samples: dict[str, tuple[float, ...]] = dataclasses.field(default_factory=dict)

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

    def mean(self, name: str) -> float:
        """A call's cost by its name in Loop.calls."""
        if name.startswith("prefill:"):
            return self.prefill(int(name.split(":")[1]))
        return {"step": self.step_s, "insert": self.insert_s, "chunk": self.chunk_s}.get(name, 0.0)

    def draw(self, name: str, rng: np.random.Generator, idle: bool = False) -> float:
        """One call's cost: a sample of its own (after idle, of those), else its mean."""
        pool = (idle and self.samples.get(name + IDLE)) or self.samples.get(name)
        return float(pool[rng.integers(len(pool))]) if pool else self.mean(name)


class Clock:
    """A virtual clock: `now` seconds, moved on by the costs and by the loop's sleeps."""

    def __init__(self):
        self.now = 0.0
        self.idle = False  # the loop slept since the last call

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        """The loop waiting moves the clock on."""
        self.now += max(seconds, 0.0)
        self.idle = True

    def pay(self, seconds: float) -> None:
        """An engine call moves the clock on."""
        self.now += seconds
        self.idle = False


class SimEngine:
    """The engine's interface over a virtual clock: every call costs its measured seconds."""

    def __init__(
        self,
        costs: Costs,
        slots: int,
        max_len: int,
        clock: Clock,
        vocab: int = 2,
        chunk: int = 0,
        seed: int = 0,
    ):
        self.costs, self.slots, self.max_len, self.clock, self.vocab = (
            costs, slots, max_len, clock, vocab,
        )  # fmt: skip
        self.chunk, self.rng = chunk, np.random.default_rng(seed)
        self.reached = None  # it routes nothing

    bucket = Engine.bucket

    def _pay(self, name: str) -> None:
        self.clock.pay(self.costs.draw(name, self.rng, self.clock.idle))

    def prefill(self, prompt: np.ndarray) -> int:
        """The prefill's cost; token 0."""
        self._pay(f"prefill:{self.bucket(len(prompt))}")
        return 0

    def prefill_chunk(self, part: np.ndarray, first: bool) -> int:
        """A chunk's cost; token 0."""
        del part, first
        self._pay("chunk")
        return 0

    def insert(self, slot: int) -> None:
        """The insert's cost."""
        del slot
        self._pay("insert")

    def step(self, tokens_B: np.ndarray, active_B: np.ndarray) -> np.ndarray:
        """The decode step's cost and the loop's own time around it; tokens 0."""
        del active_B
        self._pay("step")
        self.clock.pay(self.costs.draw("host", self.rng))
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
    """Costs fitted to a real run: its engine calls' samples, and their means.

    A step after a prefill or an insert runs slower. The insert's work runs on while the
    host goes on, and the next step waits for it. The samples hold such steps at the run's
    share. A call after idle (IDLE) is kept apart: the machine wakes slower.
    """

    def mean(name: str) -> float:
        got = calls.get(name) or calls.get(name + IDLE)
        return float(np.mean(got)) if got else 0.0

    buckets = {int(k.split(":")[1].removesuffix(IDLE)) for k in calls if k.startswith("prefill:")}
    prefill = {b: mean(f"prefill:{b}") for b in sorted(buckets)}
    samples = {k: tuple(float(x) for x in v) for k, v in calls.items() if v}
    return Costs(mean("step"), mean("insert"), prefill, mean("chunk"), samples)


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
    seed: int = 0,
) -> tuple[list[Record], float, list[int]]:
    """The loop's records and duration for `requests`, and its occupancy per step.

    `seed` picks the costs drawn from their samples.
    """
    clock = Clock()
    engine = SimEngine(costs, slots, max_len, clock, chunk=chunk, seed=seed)
    loop = Loop(engine, policy, clock=clock, sleep=clock.sleep)
    records, duration = loop.run(requests)
    return records, duration, loop.occupancy
