"""Many processes: JAX's distributed runtime from the config, who writes, and shared decisions.

Every process runs the same command with the same config. There is one process per host,
or per accelerator. `jax.distributed` connects them through process 0's coordinator. The
mesh then spans every process's devices. The lab keeps the processes in lockstep.

- `check_same_config`: every process measures what process 0 measures. The fingerprints
  and points must match. Otherwise every process raises a one-line ConfigError.
- `share`: process 0 takes each decision that depends on a clock or a file. It hands the
  result to all. Examples are the adaptive timer's stop and the memory budget. So are a
  point's outcome and what a resumed sweep still has to measure. So every process makes
  the same calls in the same order. No collective waits forever.
- `is_writer`: only process 0 writes the workdir.

A single process never reaches a collective here. `share` is None there. The callers then
take their single-process path.

One case is not covered. A call may fail on one process only, inside a collective. The
others then wait inside XLA's collective. They wait until the failed process
exits or JAX's heartbeat gives up. SPMD programs fail alike on every process, so this is
rare.
"""

import hashlib
import json
import os
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from batching.setup.runs import ConfigError

# config.distributed.coordinator_address = "auto" lets JAX fill what is unset.
# JAX reads it from the cluster's environment (jax._src.clusters).
# Slurm, Open MPI, Cloud TPU and Kubernetes are covered.
AUTO = "auto"
FIELDS = ("coordinator_address", "num_processes", "process_id")
# What each shared decision is about. A process asking about something else has lost
# step with the others. Its collective is matched against the wrong one: an error.
TAGS = {
    "prepare": 1,
    "config": 2,
    "plan": 3,
    "warmup": 4,
    "stop": 5,
    "memory": 6,
    "outcome": 7,
    "json_length": 8,
    "build": 9,
    "run_budget": 10,
}

Share = Callable[[str, int], int]
SHUTDOWN_TIMEOUT_S = 3600


class DistributedError(RuntimeError):
    """The processes lost each other or their step; the one-line message says which."""


def settings(config: ml_collections.ConfigDict) -> dict[str, Any] | None:
    """`jax.distributed.initialize` arguments from config.distributed; None: one process.

    All three fields unset means a single process. With coordinator_address "auto", JAX's
    cluster auto-detection fills the unset ones. Otherwise all three must be set.
    """
    d = config.get("distributed")
    if d is None:
        return None
    values = {f: d.get(f) for f in FIELDS}
    if all(v is None for v in values.values()):
        return None
    address = values["coordinator_address"]
    if address == AUTO:
        kwargs = {f: v for f, v in values.items() if f != "coordinator_address" and v is not None}
    else:
        missing = [f for f, v in values.items() if v is None]
        if missing:
            set_ = ", ".join(f"{f}={v!r}" for f, v in values.items() if v is not None)
            raise ConfigError(
                f"distributed.{missing[0]} is unset while {set_} is set; set all three "
                f"(or coordinator_address={AUTO!r} to take them from the cluster)"
            )
        if not isinstance(address, str) or not address.rpartition(":")[2].isdigit():
            raise ConfigError(
                f"distributed.coordinator_address must be host:port or {AUTO!r}, got {address!r}"
            )
        kwargs = dict(values)
    n, pid = values["num_processes"], values["process_id"]
    if n is not None and (not isinstance(n, int) or n < 1):
        raise ConfigError(f"distributed.num_processes must be a positive int, got {n!r}")
    if pid is not None and (not isinstance(pid, int) or pid < 0 or (n is not None and pid >= n)):
        raise ConfigError(f"distributed.process_id must be in [0, num_processes={n}), got {pid!r}")
    for field in ("initialization_timeout_s", "heartbeat_timeout_s"):
        value = d.get(field)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"distributed.{field} must be a positive int, got {value!r}")
    kwargs["initialization_timeout"] = d.initialization_timeout_s
    kwargs["heartbeat_timeout_seconds"] = d.heartbeat_timeout_s
    # At exit every process waits at JAX's shutdown barrier for the others. They wait there
    # while process 0 alone analyses and writes peaks, plots and the report. That can
    # outlast JAX's default timeout. A dead process still ends the wait at once. The
    # coordinator or its heartbeat notices it.
    kwargs["shutdown_timeout_seconds"] = SHUTDOWN_TIMEOUT_S
    return kwargs


def initialize(config: ml_collections.ConfigDict) -> None:
    """Joins the processes named by config.distributed; does nothing for a single process.

    It must run before anything else touches JAX. Listing devices starts the backend.
    `jax.distributed.initialize` refuses to run after that.
    """
    kwargs = settings(config)
    if kwargs is None or jax.distributed.is_initialized():
        return
    # CPU processes exchange data over TCP with gloo; accelerators use their own fabric.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(**kwargs)
    except Exception as e:  # noqa: BLE001 - a timeout or refusal reads as one line
        where = kwargs.get("coordinator_address", "the cluster's coordinator")
        raise DistributedError(f"distributed: could not join {where}: {_first_line(e)}") from None


def is_multiprocess() -> bool:
    """Whether JAX runs in more than one process."""
    return jax.process_count() > 1


def is_writer() -> bool:
    """Whether this process writes: only process 0 does.

    It writes the results, samples, TensorBoard events, plots, the report and the lock.
    """
    return jax.process_index() == 0


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:300]


def _gather(values: list[int]) -> np.ndarray:
    """Every process's int32 `values`, as rows [process_index, len(values)]."""
    try:
        table = multihost_utils.process_allgather(np.asarray(values, np.int32))
    except Exception as e:  # noqa: BLE001 - gloo/coordination errors when a peer is gone
        raise DistributedError(
            f"distributed: lost the other processes (process {jax.process_index()}): "
            f"{_first_line(e)}"
        ) from None
    return np.asarray(table).reshape(jax.process_count(), len(values))


def _gather_tagged(tag: str, values: list[int]) -> np.ndarray:
    table = _gather([TAGS[tag], *values])
    tags = table[:, 0]
    if (tags != tags[0]).any():
        names = {v: k for k, v in TAGS.items()}
        seen = ", ".join(f"process {p}: {names.get(int(t), t)}" for p, t in enumerate(tags))
        raise DistributedError(f"distributed: processes are out of step ({seen})")
    return table[:, 1:]


def share(tag: str, value: int) -> int:
    """Process 0's `value` for the decision `tag`, on every process (a collective)."""
    return int(_gather_tagged(tag, [int(value)])[0, 0])


def sharer() -> Share | None:
    """`share` when there are several processes, else None.

    None keeps one process free of collectives.
    """
    return share if is_multiprocess() else None


def gather_codes(tag: str, values: list[int]) -> np.ndarray:
    """Every process's `values` for `tag` (a collective): rows by process index."""
    return _gather_tagged(tag, values)


def broadcast_json(obj: Any) -> Any:
    """Process 0's JSON-serialisable `obj` on every process (a resumed sweep's plan)."""
    if not is_multiprocess():
        return obj
    blob = json.dumps(obj, sort_keys=True).encode() if is_writer() else b""
    length = share("json_length", len(blob))
    data = np.zeros(length, np.int32)
    if is_writer():
        data[:] = np.frombuffer(blob, np.uint8)
    try:
        data = multihost_utils.broadcast_one_to_all(data)
    except Exception as e:  # noqa: BLE001
        raise DistributedError(f"distributed: lost the other processes: {_first_line(e)}") from None
    return json.loads(np.asarray(data).astype(np.uint8).tobytes().decode())


def _hash31(obj: Any) -> int:
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return int(hashlib.sha256(blob).hexdigest()[:7], 16)


def check_same_config(parts: dict[str, Any]) -> None:
    """ConfigError on every process unless each of `parts` equals process 0's.

    `parts` names what must agree. It holds the runs' measurement fingerprints, the
    points to measure and the rest of the config. The error names the parts that differ.
    """
    if not is_multiprocess():
        return
    table = gather_codes("config", [_hash31(v) for v in parts.values()])
    names = list(parts)
    for p in range(1, len(table)):
        differ = [names[i] for i in np.flatnonzero(table[p] != table[0])]
        if differ:
            raise ConfigError(
                f"distributed: process {p} runs another config than process 0 "
                f"({', '.join(differ)} differ); start every process with the same "
                "--config and overrides"
            )


def agree_on_failure(error: BaseException | None) -> None:
    """Raises on every process if any process raised during setup (a collective).

    A process whose own setup failed re-raises its error. The others raise a ConfigError
    naming that process. So none goes on to wait for it.
    """
    if not is_multiprocess():
        if error is not None:
            raise error
        return
    failed = gather_codes("prepare", [int(error is not None)])[:, 0]
    if error is not None:
        raise error
    if failed.any():
        bad = ", ".join(str(int(p)) for p in np.flatnonzero(failed))
        raise ConfigError(f"distributed: process {bad} stopped before the sweep; see its error")


def exit_now(code: int) -> None:
    """Exits without JAX's shutdown barrier, which would wait for a process that is gone."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
