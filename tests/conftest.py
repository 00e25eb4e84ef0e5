"""Shared fixtures: a tiny, fast config so sweeps finish in a second or two."""

import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import jax  # noqa: E402

from configs import default  # noqa: E402

# Every folder the tests make outside pytest's tmp_path lives under one root per test
# session, shared by the xdist workers and the child processes they start (through the
# environment), and removed when the session ends (pytest_sessionfinish).
TEST_ROOT = os.environ.get("LAB_TEST_ROOT") or tempfile.mkdtemp(prefix="lab_tests_")
os.environ["LAB_TEST_ROOT"] = TEST_ROOT
os.makedirs(TEST_ROOT, exist_ok=True)


def _session_dir(name: str) -> str:
    """A folder of this test session, shared by its pytest-xdist workers."""
    path = os.path.join(TEST_ROOT, name)
    os.makedirs(path, exist_ok=True)
    return path


def pytest_sessionfinish(session, exitstatus):
    del exitstatus
    if not hasattr(session.config, "workerinput"):  # the controller, after every worker
        shutil.rmtree(TEST_ROOT, ignore_errors=True)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """Work stealing (a worker that runs dry takes half of the other's queue, so the two
    finish together; the longest tests go first, below). A hook rather than `--dist` in
    pyproject's addopts, so `pytest -p no:xdist` still runs."""
    from xdist.scheduler import WorkStealingScheduling

    return WorkStealingScheduling(config, log)


def once_per_session(name: str, make: Callable[[str], None]) -> str:
    """A folder filled by make(folder) once per test session. A module fixture runs once per
    xdist worker that runs its tests, and xdist may hand a module's tests to both workers:
    the first to ask runs `make`, the other waits for it and reads the same folder."""
    folder = os.path.join(SESSION_DIR, name)
    with open(folder + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        done = os.path.join(folder, ".done")
        if not os.path.exists(done):
            shutil.rmtree(folder, ignore_errors=True)
            os.makedirs(folder)
            make(folder)
            open(done, "w").close()
    return folder


SESSION_DIR = _session_dir("session")

# Many tests compile the same tiny programs; a session-wide persistent cache turns the
# repeats into loads. Timings in tests are never asserted, so this hides nothing.
# The programs are tiny, so compiling dominates and LLVM's optimizations do not pay off:
# on CPU the flag only lowers the backend's code generation; XLA's HLO passes run as
# before, so counted FLOPs and bytes, memory sizes and the collectives in the compiled
# text are the same (tests/test_peaks.py turns it off: it times real kernels).
# The environment carries both to every xdist worker and to child processes (main.py
# runs, forced-device children), which would compile the same programs again otherwise.
XLA_SETTINGS = {
    "jax_compilation_cache_dir": _session_dir("xla"),
    "jax_persistent_cache_min_compile_time_secs": 0,
    "jax_persistent_cache_min_entry_size_bytes": 0,
    "jax_disable_most_optimizations": True,
}
for name, value in XLA_SETTINGS.items():
    jax.config.update(name, value)
    os.environ[name.upper()] = str(value)

# Device peaks for tests: seeded so sweeps do not spend seconds on the 256 MiB
# bandwidth benchmark. These are inputs to the analysis under test, not results;
# tests/test_peaks.py measures real peaks at small sizes.
PEAKS_DIR = tempfile.mkdtemp(prefix="peaks_", dir=TEST_ROOT)
SEEDED_PEAKS = {
    "matmul_flops_per_s": {"float32": 1e11},
    "bandwidth": {"read_bytes_per_s": 2e10, "copy_bytes_per_s": 1e10, "buffer_bytes": 1.0},
    "dispatch_floor_s": 1e-5,
    "kernel_overhead_s": 1e-6,
    "cache_bandwidth_bytes_per_s": 4e10,
    "gemm_flops_per_s": {},
}
with open(os.path.join(PEAKS_DIR, "device_peaks.json"), "w") as f:
    json.dump({"cpu:cpu": SEEDED_PEAKS}, f)


MAIN = os.path.join(ROOT, "main.py")


def main_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment a main.py child runs in: this one (the session's caches), on the CPU,
    unbuffered, with `env` on top."""
    return {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1", **(env or {})}


def run_main(*args: str, cwd: str = ROOT, env: dict[str, str] | None = None, timeout=120):
    """`python main.py *args` to completion: the CompletedProcess, output captured as text."""
    return subprocess.run(
        [sys.executable, MAIN, *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=main_env(env),
        timeout=timeout,
    )


def start_main(*args: str, cwd: str = ROOT, env: dict[str, str] | None = None):
    """`python main.py *args` started in the background: the Popen, stdout and stderr piped."""
    return subprocess.Popen(
        [sys.executable, MAIN, *args],
        cwd=cwd,
        env=main_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def tiny(**model) -> "default.config_dict.ConfigDict":
    config = default.get_config()
    config.name = "tiny"
    config.model.width = 16
    config.model.depth = 2
    config.model.update(model)
    config.sweep.batch_sizes = (1, 2, 4)
    config.timing.warmup_runs = 1
    config.timing.warmup_s = 0.0
    config.timing.min_runs = 5
    config.timing.max_runs = 50
    config.timing.pass_s = 0.02
    # Tests check what a sweep writes, not its precision: one pass, a target every point
    # meets, no passes beyond (tests of passes and of unconverged points set their own).
    config.sweep.passes = 1
    config.timing.target_rel_ci = 10.0
    config.timing.run_budget_s = 0.0
    config.output.progress_bar = False
    # Drawing and saving the figures costs ~4 s per app.run on 2 cores, 20x the tiny sweep
    # itself; tests that check plots (or their TensorBoard images) turn them back on.
    config.output.plots = False
    config.roofline.peaks_cache_dir = PEAKS_DIR
    # The seeded peaks are not this machine's on purpose: no check that would replace them.
    config.roofline.check_peaks = False
    config.roofline.bootstrap = 30
    # Per-shape GEMM microbenchmarks cost seconds; test_roofline.py turns them back on.
    config.roofline.shape_aware = False
    return config


@pytest.fixture
def tiny_config():
    return tiny()


# The longest tests (about 8-35 s each on 2 quiet cores), longest first. With
# `--dist worksteal` (pyproject.toml) a worker that runs dry takes the end of the other's
# queue: starting these first keeps a long one from running alone at the end.
LONGEST_FIRST = (
    "tests/test_moe_ablation.py::test_ablation_trains_sweeps_judges_and_resumes",
    "tests/test_mesh.py::test_sharded_outputs_equal_one_device",  # runs the 8-device child
    "tests/test_decode_workload.py::test_decode_experiment_rows_report_and_plots",
    "tests/test_faults.py::test_one_and_two_point_sweeps_write_every_output",
    "tests/test_faults.py::test_sigterm_keeps_points_exits_143_and_resumes",
    "tests/test_distributed.py::test_two_process_sweep_writes_once_from_process_0",
    "tests/test_collectives.py::test_analysis_adds_the_measured_comm_term",
    "tests/test_distributed.py::test_killing_one_process_ends_the_other_with_an_error",
    "tests/test_decode_workload.py::test_shape_aware_prediction_times",
    "tests/test_faults.py::test_sigkill_at_random_moments",
    "tests/test_accelerator_run.py::test_reduced_accelerator_run_completes_on_a_cpu",
    "tests/test_train.py::test_training_lowers_the_loss",  # trains the shared run
)


def pytest_collection_modifyitems(config, items):
    def rank(item) -> int:
        prefixes = (i for i, p in enumerate(LONGEST_FIRST) if item.nodeid.startswith(p))
        return next(prefixes, len(LONGEST_FIRST))

    items.sort(key=rank)  # stable: the rest keep pytest's order
