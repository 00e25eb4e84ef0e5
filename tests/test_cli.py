"""main.py's command line: help exits 0 and says how to override a field; every mistake is one
line naming the flag, the field and the value, exit 2, nothing written."""

import os

import pytest

from tests.conftest import ROOT, run_main
from tests.test_sweep import TINY_FLAGS

MLP = os.path.join(ROOT, "configs", "mlp.py")
RESNET = os.path.join(ROOT, "configs", "resnet.py")
# test_sweep's tiny MLP, its size set by overrides: the mlp config takes no argument.
TINY = [
    f"--config={MLP}",
    "--config.model.width=16",
    "--config.model.depth=2",
    *(f for f in TINY_FLAGS if not f.startswith("--config=")),
]


@pytest.mark.parametrize(
    "args, expected",
    [
        (
            [*TINY, "--workdir=w", "--config.sweep.batch_size=(1,8)"],
            "--config.sweep.batch_size: no config field 'batch_size' (did you mean "
            "'batch_sizes'?); every field is listed in configs/default.py",
        ),
        (
            [f"--config={MLP}", "--workdir=w", "--config.model.widht=2048"],
            "--config.model.widht: no model field 'widht' (did you mean 'width'?); model 'mlp' has",
        ),
        (
            # A factory's fields are its family's (examples/vit.py), not configs/default.py's.
            [
                f"--config={os.path.join(ROOT, 'configs', 'custom.py')}",
                "--config.model.factory=examples.vit:FAMILY",
                "--workdir=w",
                "--config.model.dpeth=2",
            ],
            "--config.model.dpeth: no model field 'dpeth' (did you mean 'depth'?); model 'vit' "
            "has classes, depth, dim, factory, heads, image, name, patch",
        ),
        (
            [f"--config={MLP}:width=2048", "--workdir=w"],
            "configs/mlp.py takes no argument, got 'width=2048'; set a model field with "
            "--config.model.<field>=<value>",
        ),
        (
            [f"--config={RESNET}:19", "--workdir=w"],
            "resnet.py:19: configs/resnet.py argument must be a depth",
        ),
        (
            [f"--config={MLP}", "--workdir=w", "--config.model.width=abc"],
            "--config.model.width must be an int, got 'abc'",
        ),
        (
            [f"--config={MLP}", "--workdir=w", "--config.timing.pass_s=fast"],
            "--config.timing.pass_s must be a number, got 'fast'",
        ),
        (
            [f"--config={MLP}", "--workdir=w", "--config.overwrite=maybe"],
            "--config.overwrite must be true or false, got 'maybe'",
        ),
        (
            [f"--config={MLP}", "--workdir=w", "--config.model.width"],
            "--config.model.width needs a value: --config.model.width=<value>",
        ),
        ([f"--config={MLP}", "--workdir"], "--workdir needs a value: --workdir=<value>"),
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
    proc = run_main(*TINY, "--workdir=/proc/lab/x")
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "error: workdir cannot be created: '/proc/lab/x' (No such file or directory)"
    ]
