"""Many processes: two `jax.distributed` processes on 127.0.0.1 with gloo CPU collectives.

Each process is a fresh Python (JAX's distributed runtime starts once per process);
every sweep is tiny so both processes together stay within a few seconds of CPU.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from batching import app
from batching.setup import distributed
from batching.setup.runs import ConfigError
from configs import default
from tests.conftest import ROOT, start_main, tiny

ENV = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, PYTHONUNBUFFERED="1")
TINY_FLAGS = [
    "--config=" + os.path.join(ROOT, "configs", "mlp.py"),
    "--config.model.width=16",
    "--config.model.depth=2",
    "--config.timing.min_runs=3",
    # Data parallel over both processes' devices (one CPU device each).
    "--config.mesh.data=2",
    "--config.timing.pass_s=0.02",
    # Two passes, then a third for points still short of a target no point meets, while the
    # run's budget lasts: process 0 decides which points get it, for both processes.
    "--config.sweep.passes=2",
    "--config.sweep.max_passes=3",
    "--config.timing.run_budget_s=0.2",
    "--config.output.plots=false",
    # The analysis runs in process 0 alone, after the sweep: not what these tests are about.
    "--config.roofline.enabled=false",
    "--config.distributed.num_processes=2",
    # A dead peer is noticed at the next collective (gloo's connection reset); the
    # heartbeat is the backstop for a process that waits on no collective.
    "--config.distributed.heartbeat_timeout_s=10",
    "--config.distributed.initialization_timeout_s=30",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args_by_process: list[list[str]]) -> list[subprocess.Popen]:
    return [
        subprocess.Popen(
            [sys.executable, *args],
            cwd=ROOT,
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for args in args_by_process
    ]


def start_mains(args_by_process: list[list[str]]) -> list[subprocess.Popen]:
    """One main.py process per argument list (conftest.start_main), all started at once."""
    return [start_main(*args, env={"PYTHONPATH": ROOT}) for args in args_by_process]


def finish(procs: list[subprocess.Popen], timeout_s: float = 90) -> list[tuple[int, str, str]]:
    out = []
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        out.append((p.returncode, stdout, stderr))
    return out


def main_args(
    port: int, workdir: str, *extra_by_process: list[str], sizes: str = "(2,4)"
) -> list[list[str]]:
    # A tuple given twice on the command line is concatenated, so sizes are given once.
    flags = [*TINY_FLAGS, f"--config.sweep.batch_sizes={sizes}", workdir]
    address = f"--config.distributed.coordinator_address=127.0.0.1:{port}"
    return [
        [*flags, address, f"--config.distributed.process_id={pid}", *extra]
        for pid, extra in enumerate(extra_by_process)
    ]


def read_jsonl(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


# --- settings: no processes needed ------------------------------------------------------


def test_settings_single_process_when_all_unset():
    assert distributed.settings(default.get_config()) is None


def test_settings_explicit_and_auto():
    config = default.get_config()
    config.distributed.coordinator_address = "10.0.0.1:1234"
    config.distributed.num_processes = 4
    config.distributed.process_id = 3
    kwargs = distributed.settings(config)
    assert kwargs["coordinator_address"] == "10.0.0.1:1234"
    assert (kwargs["num_processes"], kwargs["process_id"]) == (4, 3)
    assert kwargs["heartbeat_timeout_seconds"] == config.distributed.heartbeat_timeout_s
    auto = default.get_config()
    auto.distributed.coordinator_address = "auto"
    # Auto-detection hands JAX no address, count or id: the cluster's environment has them.
    assert set(distributed.settings(auto)) == {
        "initialization_timeout",
        "heartbeat_timeout_seconds",
        "shutdown_timeout_seconds",
    }


@pytest.mark.parametrize(
    "fields, named",
    [
        ({"coordinator_address": "127.0.0.1:1234"}, "distributed.num_processes"),
        ({"num_processes": 2, "process_id": 0}, "distributed.coordinator_address"),
        ({"coordinator_address": "nohost", "num_processes": 2, "process_id": 0}, "host:port"),
        ({"coordinator_address": "h:1", "num_processes": 2, "process_id": 2}, "process_id"),
    ],
)
def test_settings_partial_or_bad_names_the_field(fields, named):
    config = default.get_config()
    config.name = "tiny"
    config.distributed.update(fields)
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        distributed.settings(config)


def test_partial_distributed_config_is_refused_before_anything_is_written(tmp_path):
    config = tiny()
    config.distributed.process_id = 1
    workdir = tmp_path / "w"
    with pytest.raises(ConfigError, match=r"^distributed\.coordinator_address is unset"):
        app.run(config, str(workdir))
    assert not workdir.exists()


# --- two processes ----------------------------------------------------------------------

TIMER_WORKER = textwrap.dedent(
    """
    import sys
    import numpy as np
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    from batching.measure import timing
    from batching.outputs import results
    from batching.setup import distributed, runs
    from configs import default

    pid, port = int(sys.argv[1]), int(sys.argv[2])
    config = default.get_config()
    config.name = "tiny"
    config.distributed.update(
        coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid,
        initialization_timeout_s=30, heartbeat_timeout_s=10,
    )
    distributed.initialize(config)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    x_local = np.full((4, 8), pid + 1.0, np.float32)
    x = jax.make_array_from_process_local_data(NamedSharding(mesh, PartitionSpec("data")), x_local)
    # The sum over the data axis is an all-reduce: each call needs both processes.
    fn = jax.jit(lambda x: (x * x).sum())
    assert float(fn(x)) == 4 * 8 * (1.0 + 4.0)
    # Settings that would stop the processes at different call counts if each decided
    # alone: process 1 runs out of budget almost at once, process 0 much later.
    settings = timing.TimingSettings(
        warmup_runs=1, warmup_s=0.05 if pid == 0 else 0.0, min_runs=5, max_runs=100000,
        target_rel_ci=1e-9, budget_s=0.3 if pid == 0 else 1e-6,
    )
    m = timing.measure(fn, (x,), settings, share=distributed.sharer())
    print("MEASURED", len(m.samples_s), m.stop_reason, flush=True)
    print("JSON", distributed.broadcast_json({"from": pid}), flush=True)
    try:
        distributed.share("stop" if pid == 0 else "warmup", 1)
    except distributed.DistributedError as e:
        print("DIVERGED", e, flush=True)
    # The check app.run makes before anything is written: process 1 started with another
    # timing.min_runs, which changes its runs' measurement fingerprints.
    with config.unlocked():
        config.timing.min_runs = 10 + pid
    (run,) = runs.expand(config)
    fingerprints = {run.name: results.fingerprint(runs.measurement_view(run))}
    try:
        distributed.check_same_config({"fingerprints": fingerprints, "points": run.batch_sizes})
    except runs.ConfigError as e:
        print("MISMATCH", e, flush=True)
    # A point that hit OOM on process 1 only is an OOM in process 0's row too.
    from batching import sweep
    from batching.measure.point import PointContext
    ctx = PointContext(run, None, None, "f")
    row = {"batch_size": 8, "status": "oom" if pid else "ok", "fingerprint": "f"}
    oom_at = {"tiny": 8} if pid else {}  # guarded_point set process 1's wall
    row, samples = sweep.agree_on_outcome(ctx, row, None if pid else np.ones(3), oom_at, None)
    print("OUTCOME", row["status"], samples is None, oom_at, row.get("message"), flush=True)
    # Failures that differ: every process takes the first failing process's status.
    row = {"batch_size": 16, "status": "error" if pid else "skipped_memory", "fingerprint": "f"}
    row, _ = sweep.agree_on_outcome(ctx, row, None, oom_at, 8)
    print("FIRST", row["status"], oom_at, flush=True)
    """
)


def test_timer_stop_config_check_and_point_outcome_are_shared_between_processes():
    port = free_port()
    t0 = time.perf_counter()
    results = finish(start([["-c", TIMER_WORKER, str(pid), str(port)] for pid in (0, 1)]), 60)
    wall_s = time.perf_counter() - t0
    lines = []
    for rc, stdout, stderr in results:
        assert rc == 0, stderr[-3000:]
        lines.append({line.split()[0]: line for line in stdout.splitlines()})
    measured = [dict(line)["MEASURED"].split() for line in lines]
    # Same number of calls on both, decided by process 0's budget (0.3 s), not process 1's.
    assert measured[0] == measured[1], measured
    assert measured[0][2] == "budget"
    assert int(measured[0][1]) > 5
    assert all(line["JSON"] == "JSON {'from': 0}" for line in lines)
    assert all("out of step" in line["DIVERGED"] for line in lines)
    for line in lines:
        # Both processes refuse, naming the process and what differs (not the points).
        assert line["MISMATCH"].startswith(
            "MISMATCH distributed: process 1 runs another config than process 0 (fingerprints "
        ), line["MISMATCH"]
    assert lines[0]["OUTCOME"] == "OUTCOME oom True {'tiny': 8} process 1: oom"
    assert lines[1]["OUTCOME"].startswith("OUTCOME oom True {'tiny': 8}")
    assert all(line["FIRST"] == "FIRST skipped_memory {'tiny': 8}" for line in lines)
    print(f"two-process timer test: {wall_s:.1f} s wall")


def test_two_process_sweep_writes_once_from_process_0(tmp_path):
    workdir = f"--workdir={tmp_path}"
    t0 = time.perf_counter()
    procs = start_mains(main_args(free_port(), workdir, [], []))
    (rc0, out0, err0), (rc1, out1, err1) = finish(procs)
    wall_s = time.perf_counter() - t0
    assert rc0 == 0, err0[-3000:]
    assert rc1 == 0, err1[-3000:]
    rows = read_jsonl(tmp_path / "results.jsonl")
    # One row per point, written once (both processes share this workdir).
    assert sorted(r["batch_size"] for r in rows) == [2, 4]
    assert all(r["status"] == "ok" for r in rows)
    assert all(r["process_count"] == 2 and r["num_devices"] == 2 for r in rows)
    assert {r["per_device_batch_size"] for r in rows} == {1, 2}
    # One samples record per point and pass: the two every point gets, and a third where
    # process 0 found the budget left (both processes timed the same passes, or they would
    # have been out of step at the next shared decision).
    done = [r["passes_done"] for r in rows]
    assert all(2 <= d <= 3 for d in done)
    assert len(read_jsonl(tmp_path / "samples.jsonl")) == sum(done)
    # Process 0 holds the lock and wrote the report; process 1 printed no report line.
    assert (tmp_path / ".lock").read_text() == str(procs[0].pid)
    assert (tmp_path / "report.md").exists()
    assert "report:" in out0 and "report:" not in out1
    # TensorBoard: one file of each kind per folder (a second writer would add its own).
    for root, _, files in os.walk(tmp_path / "tb"):
        kinds = [re.sub(r"tfevents\.\d+\.", "", f) for f in files if "tfevents" in f]
        assert len(kinds) == len(set(kinds)), (root, files)
    print(f"two-process sweep: {wall_s:.1f} s wall (noisy)")


def test_killing_one_process_ends_the_other_with_an_error(tmp_path):
    # A sweep long enough to be killed in the middle: many points, 0.2 s each.
    slow = ["--config.timing.pass_s=0.2"]
    sizes = "(2,4,6,8,10,12,14,16)"
    procs = start_mains(main_args(free_port(), f"--workdir={tmp_path}", slow, slow, sizes=sizes))
    deadline = time.monotonic() + 60
    results = tmp_path / "results.jsonl"
    while not (results.exists() and results.read_text().count("\n") >= 1):
        assert time.monotonic() < deadline, "the sweep did not start"
        assert procs[0].poll() is None, procs[0].communicate()[1][-3000:]
        time.sleep(0.1)
    procs[1].send_signal(signal.SIGKILL)
    t0 = time.perf_counter()
    (rc0, _, err0), _ = finish(procs, timeout_s=30)
    waited_s = time.perf_counter() - t0
    # Exit 1 with our one line when a collective notices (gloo's connection reset), or
    # JAX's coordinator aborts the process when the heartbeat runs out.
    assert rc0 == 1 or rc0 == -signal.SIGABRT, (rc0, err0[-3000:])
    if rc0 == 1:
        assert err0.strip().splitlines()[-1].startswith("error: distributed: lost the other")
    assert len(read_jsonl(results)) < 8
    print(f"survivor exited {rc0} {waited_s:.1f} s after the kill")
