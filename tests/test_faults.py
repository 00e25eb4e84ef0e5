"""Fault injection: the memory wall, failing points, kills, locks and broken files."""

import errno
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from batching import app, sweep
from batching.measure import peaks_cache
from batching.outputs import results
from batching.predict import claims
from batching.setup import interrupt
from batching.workloads import registry
from tests.conftest import ROOT, main_env, run_main, start_main, tiny
from tests.test_sweep import _accumulator, read_rows

OOM_MESSAGE = "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1099511627776 bytes."


def failing_build(monkeypatch, fails):
    """Wraps the real workload so that make_args raises `fails(batch_size)` when not None."""
    real = registry.Bench.workload

    def build(self, workdir):
        wl = real(self, workdir)
        if getattr(wl, "wrapped", False):
            return wl
        wl.wrapped = True
        make_args = wl.make_args

        def make(batch_size):
            error = fails(batch_size)
            if error is not None:
                raise error
            return make_args(batch_size)

        wl.make_args = make
        return wl

    monkeypatch.setattr(registry.Bench, "workload", build)


def statuses(workdir):
    return {r["batch_size"]: r.get("status", "ok") for r in results.latest(read_rows(workdir))}


def test_oom_ends_the_run_at_the_wall_and_exits_cleanly(tmp_path, monkeypatch, capsys):
    # A real XlaRuntimeError (jax.errors.JaxRuntimeError) saying RESOURCE_EXHAUSTED.
    failing_build(
        monkeypatch,
        lambda b: jax.errors.JaxRuntimeError(OOM_MESSAGE) if b >= 64 else None,
    )
    config = tiny()
    config.sweep.batch_sizes = (8, 128, 16, 64, 32, 256)
    config.output.plots = True  # the memory figure draws the wall and the failed points
    summaries = app.run(config, str(tmp_path))
    # Sizes are visited shuffled: a larger batch visited before 64 really ran and hit OOM
    # too; every larger one visited after it is skipped by size.
    order = list(config.sweep.batch_sizes)
    random.Random(f"{config.seed}/tiny").shuffle(order)
    after = order[order.index(64) :]
    assert statuses(tmp_path) == {
        8: "ok",
        16: "ok",
        32: "ok",
        64: "oom",
        **{b: "skipped_after_oom" if b in after else "oom" for b in (128, 256)},
    }
    oom = next(r for r in read_rows(tmp_path) if r["batch_size"] == 64)
    assert "RESOURCE_EXHAUSTED" in oom["message"]
    (s,) = summaries
    assert s["max_batch_measured"] == 32 and s["first_oom_batch"] == 64
    assert s["batch_sizes"] == [8, 16, 32]
    assert (tmp_path / "report.md").exists()
    assert "memory wall" in (tmp_path / "report.md").read_text()
    steps = [e.step for e in _accumulator(tmp_path / "tb" / "tiny").Tensors("latency/ms")]
    assert sorted(steps) == [8, 16, 32]
    out = capsys.readouterr().out
    assert "3 of 6 points not ok" in out
    # A rerun keeps the wall: nothing is measured again.
    before = len(read_rows(tmp_path))
    config.output.plots = False
    app.run(config, str(tmp_path))
    assert len(read_rows(tmp_path)) == before


def test_memory_budget_skips_points_that_do_not_fit(tmp_path):
    config = tiny()
    config.sweep.batch_sizes = (1, 64, 4096)
    app.run(config, str(tmp_path / "free"))
    need = {r["batch_size"]: r["memory_bytes"] for r in read_rows(tmp_path / "free")}
    assert need[1] < need[64] < need[4096]
    assert all(r["device_memory_bytes"] > 0 for r in read_rows(tmp_path / "free"))
    config.memory.max_bytes = need[64]
    config.output.plots = True  # the memory figure with a point skipped by size
    (s,) = app.run(config, str(tmp_path / "capped"))
    assert statuses(tmp_path / "capped") == {1: "ok", 64: "ok", 4096: "skipped_memory"}
    assert s["max_batch_measured"] == 64
    # Memory is linear in the batch: the fit predicts the need of the skipped point.
    predicted = s["memory_fixed_bytes"] + s["bytes_per_example"] * 4096
    assert predicted == pytest.approx(need[4096], rel=0.05)


def test_an_erroring_point_is_a_row_and_a_rerun_retries_it(tmp_path, monkeypatch):
    broken = {2}
    failing_build(monkeypatch, lambda b: ValueError("boom") if b in broken else None)
    config = tiny()
    with pytest.raises(app.PointsFailed, match=r"1 points failed: tiny@2 \(ValueError: boom\)"):
        app.run(config, str(tmp_path))
    assert statuses(tmp_path) == {1: "ok", 2: "error", 4: "ok"}
    assert (tmp_path / "report.md").exists()
    broken.clear()
    app.run(config, str(tmp_path))
    assert statuses(tmp_path) == {1: "ok", 2: "ok", 4: "ok"}
    assert sorted(r["batch_size"] for r in read_rows(tmp_path)) == [1, 2, 4]


def test_every_point_failing_still_writes_the_report(tmp_path, monkeypatch):
    failing_build(monkeypatch, lambda b: jax.errors.JaxRuntimeError(OOM_MESSAGE))
    config = tiny()
    config.report.claims = ("C3", "C5")
    assert app.run(config, str(tmp_path)) == []
    assert set(statuses(tmp_path).values()) == {"oom", "skipped_after_oom"}
    assert (tmp_path / "report.md").exists()


def test_unwritable_workdir_mid_sweep_is_one_error_and_keeps_rows(tmp_path, monkeypatch):
    real = results.Store.append
    calls = []

    def append(self, row, samples, pass_index=0):
        calls.append(row["batch_size"])
        if len(calls) > 2:
            raise OSError(errno.ENOSPC, "No space left on device", self.path("results.jsonl"))
        real(self, row, samples, pass_index)

    monkeypatch.setattr(results.Store, "append", append)
    with pytest.raises(results.WorkdirError, match="results.jsonl.*No space left"):
        app.run(tiny(), str(tmp_path))
    assert len(read_rows(tmp_path)) == 2


@pytest.mark.parametrize("sizes", [(1,), (1, 2)])
def test_claims_on_degenerate_sweeps_never_raise(sizes):
    rows = [
        {"run": "r", "batch_size": b, "latency_s": 1e-3, "platform": "cpu", "status": "ok"}
        for b in sizes
    ]
    summaries = [{"run": "r", "points": len(sizes), "knee_batch_size": None, "model": "mlp"}]
    out = claims.verdicts(tuple(claims.VERDICTS), summaries, rows)
    assert set(out) == set(claims.VERDICTS)
    assert {v["verdict"] for v in out.values()} == {"not enough points"}


def family_config(family):
    from tests.test_decode_workload import tiny_decoder
    from tests.test_moe_workload import tiny_moe
    from tests.test_resnet_workload import tiny_resnet

    return {"mlp": tiny, "decoder": tiny_decoder, "moe": tiny_moe, "resnet": tiny_resnet}[family]()


@pytest.mark.parametrize("family", ["mlp", "decoder", "moe", "resnet"])
def test_one_and_two_point_sweeps_write_every_output(tmp_path, family):
    # Measured once with two points, then analysed from the stored rows as 1 and 2 points.
    config = family_config(family)
    config.sweep.batch_sizes = (1, 2)
    config.report.claims = tuple(claims.VERDICTS)
    config.output.plots = True  # every output: figures of one and two points included
    app.run(config, str(tmp_path))
    assert "not enough points" in (tmp_path / "report.md").read_text()
    config.sweep.batch_sizes = (1,)
    rows = [r for r in read_rows(tmp_path) if r["batch_size"] == 1]
    results.Store(str(tmp_path)).rewrite_rows(rows)
    (s,) = app.run(config, str(tmp_path))
    assert s["points"] == 1 and s["bytes_per_example"] is None
    assert "not enough points" in (tmp_path / "report.md").read_text()


def test_corrupt_peaks_cache_is_remeasured_and_parallel_writers_keep_every_entry(tmp_path):
    path = peaks_cache.cache_path(str(tmp_path))
    with open(path, "w") as f:
        f.write('{"cpu:cpu": {"matmul')  # killed mid-write by an older version
    assert peaks_cache._load(path) == {}

    def save(i):
        peaks_cache._save(path, {}, f"dev{i}", {"i": i})

    threads = [threading.Thread(target=save, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with open(path) as f:
        cache = json.load(f)
    assert cache == {f"dev{i}": {"i": i} for i in range(8)}


def test_truncated_samples_line_is_tolerated_and_the_point_measured_again(tmp_path):
    config = tiny()
    app.run(config, str(tmp_path))
    rows = read_rows(tmp_path)
    # Killed while writing the last point: its samples line is torn and it has no row.
    with open(tmp_path / "results.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows[:-1])
    with open(tmp_path / "samples.jsonl", "a") as f:
        f.write('{"run": "tiny", "batch_size": 99, "samp')
    app.run(config, str(tmp_path))
    assert sorted(r["batch_size"] for r in read_rows(tmp_path)) == [1, 2, 4]
    assert set(results.Store(str(tmp_path)).samples()) == {("tiny", b) for b in (1, 2, 4)}


FAST = [
    "--config=" + os.path.join(ROOT, "configs", "mlp.py"),
    "--config.model.width=16",
    "--config.model.depth=2",
    "--config.timing.min_runs=3",
    "--config.timing.warmup_runs=1",
    "--config.timing.warmup_s=0",
    "--config.timing.pass_s=0.025",
    # Two passes: a kill can land between a point's passes, and the rerun must finish them.
    "--config.sweep.passes=2",
    "--config.timing.run_budget_s=0",
    "--config.roofline.enabled=false",
    "--config.output.plots=false",
]
MANY = "--config.sweep.batch_sizes=(" + ",".join(str(b) for b in range(1, 13)) + ")"


def wait_for_rows(workdir, n, proc, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if os.path.exists(workdir / "results.jsonl") and len(read_rows(workdir)) >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"no {n} rows: {proc.poll()} {proc.stderr.read()[-2000:]}")


def test_sigterm_keeps_points_exits_143_and_resumes(tmp_path):
    proc = start_main(*FAST, MANY, f"--workdir={tmp_path}")
    wait_for_rows(tmp_path, 2, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 143, proc.stderr.read()[-2000:]
    kept = len(read_rows(tmp_path))
    assert 2 <= kept < 2 * 12  # rows: one per point and pass
    done = run_main(*FAST, MANY, f"--workdir={tmp_path}")
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(r["batch_size"] for r in read_rows(tmp_path)) == list(range(1, 13))


HANGS_AFTER_SIGTERM = """
import os, signal, time
from batching import app
from batching.setup import interrupt
interrupt.GRACE_S = 1.0
signal.signal(signal.SIGTERM, app._terminate)
while True:  # code that swallows every interrupt
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
    except KeyboardInterrupt:
        pass
"""


def test_a_process_that_hangs_after_sigterm_still_exits_143_with_its_stacks():
    done = subprocess.run(
        [sys.executable, "-c", HANGS_AFTER_SIGTERM],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=main_env(),
        timeout=60,
    )
    assert done.returncode == 143, done.stderr[-2000:]
    assert "still running 1 s after SIGTERM" in done.stderr
    # one timer however many signals came, and the main thread's stack in the dump
    assert done.stderr.count("most recent call first") == 2, done.stderr[-2000:]
    assert 'File "<string>"' in done.stderr


def test_sigterm_that_a_library_turns_into_another_error_still_terminates(tmp_path, monkeypatch):
    # Seen once in CI: the handler's exception landed inside JAX's pytree code, which raised
    # a ValueError instead; the sweep recorded an error row and ran on (exit 1, not 143).
    measure = sweep.measure_point

    def swallowing(ctx, batch_size, *args):
        if batch_size == 4:
            try:
                interrupt.request_termination()
            except KeyboardInterrupt as e:
                raise ValueError("Exception raised while checking equality of metadata") from e
        return measure(ctx, batch_size, *args)

    monkeypatch.setattr(sweep, "measure_point", swallowing)
    config = tiny()
    config.sweep.batch_sizes = (1, 2, 4, 8)
    config.sweep.shuffle = False
    with pytest.raises(app.Terminated):
        app.run(config, str(tmp_path))
    # the points before it are kept, the interrupted one is not recorded (a rerun measures it)
    assert [r["batch_size"] for r in read_rows(tmp_path)] == [1, 2]
    monkeypatch.setattr(sweep, "measure_point", measure)
    app.run(config, str(tmp_path))  # the flag is cleared: a new run resumes and finishes
    assert sorted(r["batch_size"] for r in read_rows(tmp_path)) == [1, 2, 4, 8]


def test_second_run_into_a_busy_workdir_is_refused(tmp_path):
    # This process holds the workdir's OS lock, as a running sweep does.
    lock = results.lock_workdir(str(tmp_path))
    try:
        listing = sorted(os.listdir(tmp_path))
        second = run_main(*FAST, MANY, f"--workdir={tmp_path}")
    finally:
        os.close(lock)
    assert second.returncode == 2
    errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"in use by process {os.getpid()}" in errors[0], second.stderr
    assert sorted(os.listdir(tmp_path)) == listing
    # Closing the descriptor (or dying) frees it: no stale lock.
    os.close(results.lock_workdir(str(tmp_path)))


def test_sigkill_at_random_moments_loses_and_repeats_nothing(tmp_path):
    rng = random.Random(0)
    sizes = "--config.sweep.batch_sizes=(" + ",".join(str(b) for b in range(1, 13)) + ")"
    kept = 0
    for _ in range(5):
        proc = start_main(*FAST, sizes, f"--workdir={tmp_path}")
        # Killed mid-sweep (never during the imports): once this process has stored a point
        # of its own, at a random moment in the points after it.
        wait_for_rows(tmp_path, kept + 1, proc)
        time.sleep(rng.uniform(0.0, 0.3))
        proc.kill()
        proc.wait()
        rows = len(read_rows(tmp_path))
        assert rows > kept  # nothing stored before the kill was lost
        kept = rows
        if kept == 2 * 12:  # every point, both passes
            break
    done = run_main(*FAST, sizes, f"--workdir={tmp_path}")
    assert done.returncode == 0, done.stderr[-2000:]
    with open(tmp_path / "results.jsonl") as f:
        batch_sizes = [json.loads(line)["batch_size"] for line in f]
    assert sorted(batch_sizes) == list(range(1, 13))
    steps = [e.step for e in _accumulator(tmp_path / "tb" / "mlp").Tensors("latency/ms")]
    assert len(steps) == len(set(steps))


@pytest.mark.parametrize(
    "content, expected",
    [
        (None, "config file not found"),
        ("def get_config(:\n", "line 1"),
    ],
)
def test_bad_config_file_is_one_line(tmp_path, content, expected):
    path = tmp_path / "cfg.py"
    if content is not None:
        path.write_text(content)
    proc = run_main(f"--config={path}", f"--workdir={tmp_path / 'wd'}")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0] and str(path) in errors[0]
    assert not (tmp_path / "wd").exists()


def heavy(x):
    """About 50 ms of device work on two cores: repeated matmuls of a 512x512 matrix."""
    for _ in range(40):
        x = jax.numpy.tanh(x @ x)
    return x


@pytest.mark.parametrize("pytree", [False, True])
def test_the_timer_brackets_the_device_work(pytree):
    from batching.measure import timing

    fn = jax.jit(lambda x: {"a": heavy(x), "b": [x[0]]} if pytree else heavy(x))
    x = jax.numpy.ones((512, 512), jax.numpy.float32) / 512
    jax.block_until_ready(fn(x))
    settings = timing.TimingSettings(
        warmup_runs=1, warmup_s=0.0, min_runs=3, max_runs=3, budget_s=10.0
    )
    harness = np.median(timing.measure(fn, (x,), settings).samples_s)
    blocked = []
    for _ in range(3):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(x))
        blocked.append(time.perf_counter() - t0)
    # Without the block inside the clock the harness sees only the dispatch (~100x less).
    assert harness / np.median(blocked) > 0.5


def test_a_short_run_is_left_out_of_a_verdict_not_the_whole_claim(monkeypatch):
    long_rows = [{"run": "long", "batch_size": b} for b in (1, 2, 4)]
    short_rows = [{"run": "short", "batch_size": 1}]
    summaries = [
        {"run": "long", "points": 3, "knee_batch_size": 1.0},
        {"run": "short", "points": 1},
    ]
    seen = {}

    def verdict(s, r):
        seen["runs"] = [x["run"] for x in s] + sorted({x["run"] for x in r})
        return {"verdict": "confirmed", "evidence": "e"}

    monkeypatch.setitem(claims.VERDICTS, "C1", verdict)
    out = claims.verdicts(("C1",), summaries, long_rows + short_rows)
    assert seen["runs"] == ["long", "long"]
    assert out["C1"]["verdict"] == "confirmed" and "left out: short" in out["C1"]["evidence"]
