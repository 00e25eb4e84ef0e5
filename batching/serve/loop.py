"""The serving loop: requests arrive on the host clock, take free slots, leave at their length.

Each iteration admits what the policy lets in, then runs one decode step over all slots.

- `continuous`: at every step boundary, each free slot takes the oldest arrived request
  (prefilled, then inserted; Orca's iteration-level scheduling, vLLM's default).
- `static`: a batch is gathered only when every slot is free, then run until its last
  request ends; requests arriving meanwhile wait.
- `chunked`: a free slot's request is prefilled one chunk of the engine's `chunk` tokens
  per iteration, between decode steps (Sarathi-Serve's token budget), so a long prompt never
  stalls the running requests for more than one chunk. One request fills at a time.

Closed-loop users (load.closed_loop) each send their next request when the last one ends
(`run_closed`). A request is prefilled alone. Its first token is the prefill's; each
decode step gives the next. Tokens are greedy, so a request's tokens do not depend on what
else is in the batch (tests/test_serve.py). A request whose prompt and output cannot fit
`max_len` is rejected with the reason, and the run goes on. Every token's time is read on
the host clock after the device has produced it (batching.serve.metrics turns the records
into vLLM's metrics).
"""

import collections
import dataclasses
import time
from collections.abc import Callable, Sequence

import numpy as np

from batching.serve.engine import Engine
from batching.serve.load import Request
from batching.serve.metrics import Record

POLICIES = ("static", "continuous", "chunked")
IDLE = "@idle"  # suffix of a call's name in Loop.calls when it came right after a sleep


def prompt_tokens(request: Request, vocab: int, seed: int = 0) -> np.ndarray:
    """The request's prompt: tokens drawn from its id, the same in every run."""
    rng = np.random.default_rng((seed, request.id))
    return rng.integers(0, vocab, size=request.prompt_len).astype(np.int32)


class Loop:
    """One serving run over an engine: the slots' state and the requests' records."""

    def __init__(
        self,
        engine: Engine,
        policy: str,
        clock: Callable[[], float] = time.perf_counter,
        sleep: Callable[[float], None] = time.sleep,
    ):
        """`clock` and `sleep` are the host's; the simulator hands in a virtual pair."""
        if policy not in POLICIES:
            raise ValueError(f"serve.policy must be one of {POLICIES}, got {policy!r}")
        self.engine, self.policy, self.clock, self._sleep = engine, policy, clock, sleep
        self.slot_record: list[Record | None] = [None] * engine.slots
        self.tokens = np.zeros(engine.slots, np.int32)
        self.occupancy: list[int] = []  # active slots at each decode step
        # Host seconds of each engine call, by call ("prefill:<bucket>" per padded length). A
        # call right after the loop slept is filed under its name + IDLE. "host" is the loop's
        # own seconds per iteration: its wall time less its calls and sleeps.
        self.calls: dict[str, list[float]] = collections.defaultdict(list)
        self._idle, self._paid = False, 0.0
        self.finished: list[Record] = []  # served or refused, not yet followed up
        # chunked: the request being prefilled, its record, slot, prompt and next position.
        self.filling: list | None = None
        if policy == "chunked" and not engine.chunk:
            raise ValueError("serve.policies 'chunked' needs serve.chunk_tokens > 0")

    def _timed(self, name: str, fn, *args):
        t0 = self.clock()
        out = fn(*args)
        spent = self.clock() - t0
        self.calls[name + IDLE if self._idle else name].append(spent)
        self._idle, self._paid = False, self._paid + spent
        return out

    def sleep(self, seconds: float) -> None:
        """Waits for the next arrival; the next engine call is filed as after idle."""
        t0 = self.clock()
        self._sleep(seconds)
        self._idle, self._paid = True, self._paid + self.clock() - t0

    def fits(self, r: Request) -> str:
        """Why a request cannot be served ("" when it can)."""
        need = r.prompt_len + r.output_len - 1
        if need > self.engine.max_len:
            return (
                f"prompt {r.prompt_len} + output {r.output_len} - 1 > max_len {self.engine.max_len}"
            )
        return ""

    def admit(self, r: Request, slot: int, t0: float, record: Record) -> None:
        """Prefills `r` and seats it (its first token, then its slot)."""
        record.admitted_s = self.clock() - t0
        prompt = prompt_tokens(r, self.engine.vocab)
        first = self._timed(
            f"prefill:{self.engine.bucket(len(prompt))}", self.engine.prefill, prompt
        )
        self.seat(r, record, slot, first, t0)

    def seat(self, r: Request, record: Record, slot: int, first: int, t0: float) -> None:
        """A prefilled request's first token; then its slot, unless that token was all."""
        record.token_s.append(self.clock() - t0)
        record.tokens.append(first)
        if r.output_len == 1:
            self.finished.append(record)
        else:
            self._timed("insert", self.engine.insert, slot)
            self.slot_record[slot], self.tokens[slot] = record, first

    def admit_chunk(self, pending: collections.deque, now: float, t0: float, records) -> None:
        """chunked: one chunk of the filling request's prompt, taking a new one if none fills."""
        free = [s for s, r in enumerate(self.slot_record) if r is None]
        while self.filling is None and free and pending and pending[0].arrival_s <= now:
            r = pending.popleft()
            record = records[r.id]
            record.error = self.fits(r)
            if record.error:
                self.finished.append(record)
                continue
            record.admitted_s = now
            self.filling = [r, record, free[0], prompt_tokens(r, self.engine.vocab), 0]
        if self.filling is None:
            return
        r, record, slot, prompt, start = self.filling
        chunk = self.engine.chunk
        token = self._timed(
            "chunk", self.engine.prefill_chunk, prompt[start : start + chunk], start == 0
        )
        if start + chunk < len(prompt):
            self.filling[4] = start + chunk
            return
        self.filling = None
        self.seat(r, record, slot, token, t0)

    def admit_arrived(self, pending: collections.deque, now: float, t0: float, records) -> None:
        """static and continuous: each free slot the policy opens takes the oldest arrival."""
        for slot in self.free_slots():
            if not pending or pending[0].arrival_s > now:
                break
            r = pending.popleft()
            records[r.id].error = self.fits(r)
            if records[r.id].error:
                self.finished.append(records[r.id])
                continue
            self.admit(r, slot, t0, records[r.id])

    def free_slots(self) -> list[int]:
        """Slots the policy lets take a request now."""
        free = [s for s, r in enumerate(self.slot_record) if r is None]
        return free if self.policy == "continuous" or len(free) == self.engine.slots else []

    def step(self, t0: float) -> None:
        """One decode step; each active slot's token, and the slots whose requests ended."""
        active = np.array([r is not None for r in self.slot_record])
        self.occupancy.append(int(active.sum()))
        out = self._timed("step", self.engine.step, self.tokens, active)
        now = self.clock() - t0
        for s, record in enumerate(self.slot_record):
            if record is None:
                continue
            record.token_s.append(now)
            record.tokens.append(int(out[s]))
            if self.engine.reached is not None:
                record.experts.append(self.engine.reached[:, s].tolist())
            self.tokens[s] = out[s]
            if len(record.token_s) == record.output_len:
                self.slot_record[s] = None
                self.finished.append(record)

    def run(
        self, requests: Sequence[Request], follow: dict[int, Request] | None = None
    ) -> tuple[list[Record], float]:
        """Serves every request; returns their records by id and the run's duration (s).

        `follow` maps a request's id to the one its user sends when it ends (closed loop):
        that one arrives then.
        """
        follow = follow or {}
        records = {r.id: Record(r.id, r.arrival_s, r.prompt_len, r.output_len) for r in requests}
        pending = collections.deque(sorted(requests, key=lambda r: r.arrival_s))
        t0 = self.clock()
        admit = self.admit_chunk if self.policy == "chunked" else self.admit_arrived
        while pending or self.filling or any(r is not None for r in self.slot_record):
            now, self._paid = self.clock() - t0, 0.0
            admit(pending, now, t0, records)
            if any(r is not None for r in self.slot_record):
                self.step(t0)
            elif not self.filling and pending and pending[0].arrival_s > now:
                self.sleep(min(pending[0].arrival_s - now, 0.05))
            for done in self.finished:
                if done.id in follow:
                    ended = done.token_s[-1] if done.token_s else self.clock() - t0
                    nxt = dataclasses.replace(follow[done.id], arrival_s=ended)
                    records[nxt.id] = Record(nxt.id, ended, nxt.prompt_len, nxt.output_len)
                    pending.append(nxt)
            self.finished.clear()
            self.calls["host"].append(self.clock() - t0 - now - self._paid)
        return [records[i] for i in sorted(records)], self.clock() - t0

    def run_closed(self, users: Sequence[Sequence[Request]]) -> tuple[list[Record], float]:
        """Closed loop: each user sends its first request at 0, each next one as the last ends."""
        first = [dataclasses.replace(queue[0], arrival_s=0.0) for queue in users if queue]
        follow = {q[i].id: q[i + 1] for q in users for i in range(len(q) - 1)}
        return self.run(first, follow)
