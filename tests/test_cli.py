"""main.py's command line: help exits 0 and says how to override a field; every mistake is one
line naming the flag, the field and the value, exit 2, nothing written."""

import os

import pytest

from tests.conftest import ROOT, run_main
from tests.test_sweep import TINY_FLAGS

MLP = os.path.join(ROOT, "configs", "mlp.py")


@pytest.mark.parametrize(
    "args, expected",
    [
        (
            [*TINY_FLAGS, "--workdir=w", "--config.sweep.batch_size=(1,8)"],
            "--config.sweep.batch_size: no config field 'batch_size' (did you mean "
            "'batch_sizes'?); every field is listed in configs/default.py",
        ),
        (
            [f"--config={MLP}:widht=2048", "--workdir=w"],
            "no model field 'widht' (did you mean 'width'?)",
        ),
        (
            [f"--config={MLP}", "--workdir=w", "--config.model.width=abc"],
            "--config.model.width must be an int, got 'abc'",
        ),
        (
            [f"--config={MLP}", "--workdir=w", "--config.timing.pass_s=fast"],
            "--config.timing.pass_s must be a number, got 'fast'",
        ),
        ([f"--config={MLP}", "--workdri=w"], "--workdri: no such flag (did you mean --workdir?)"),
        ([f"--config={MLP}"], "--workdir is required"),
        (["--workdir=w"], "--config is required"),
        (["--config=nope.py", "--workdir=w"], "config file not found: 'nope.py'"),
    ],
)
def test_mistakes_are_one_line_exit_2(args, expected, tmp_path):
    """Through main.py itself: these exit before JAX loads, in a fraction of a second."""
    proc = run_main(*args, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines
    assert os.listdir(tmp_path) == []  # nothing written


@pytest.mark.parametrize("flag", ["--help", "-h", "--helpfull"])
def test_help_exits_0_and_says_how_to_override_a_field(flag):
    proc = run_main(flag)
    assert proc.returncode == 0
    out = proc.stdout
    assert "--config.<field>=<value>" in out and "configs/default.py" in out
    assert "experiments/mlp_article.py" in out and "(default: 'None')" not in out
    assert "experiments/harness_overhead.py" not in out  # a benchmark, not a config
    if flag == "--helpfull":
        assert "--workdir" in out and "--[no]" in out  # absl's full listing follows


def test_an_unwritable_workdir_is_one_line():
    proc = run_main(*TINY_FLAGS, "--workdir=/proc/lab/x")
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "error: workdir cannot be created: '/proc/lab/x' (No such file or directory)"
    ]
