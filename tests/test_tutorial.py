"""docs/your_model.md's tutorial, run as written: examples/vit.py from Python and the shell."""

import contextlib
import io
import json
import os
import re

from batching import api
from tests.conftest import ROOT, run_main, tiny

DOC = os.path.join(ROOT, "docs", "your_model.md")


def _blocks(language: str) -> list[str]:
    with open(DOC) as f:
        return re.findall(rf"```{language}\n(.*?)```", f.read(), re.S)


def test_the_tutorials_python_block_sweeps_and_predicts_the_vit(tmp_path, monkeypatch):
    # The block runs as written, with the tests' quick timing and seeded peaks underneath.
    quick = tiny()
    config_for = api.config_for

    def quick_config(name, batch_sizes, config):
        cfg = config_for(name, batch_sizes, config)
        for section in ("timing", "roofline", "output"):
            cfg[section] = quick[section]
        cfg.sweep.passes = 1
        return cfg

    monkeypatch.setattr(api, "config_for", quick_config)
    (code,) = _blocks("python")
    code = code.replace('"/tmp/vit"', repr(str(tmp_path / "vit")))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, DOC, "exec"), {})  # noqa: S102 - the doc's own example
    rows = [
        json.loads(line) for line in (tmp_path / "vit" / "results.jsonl").read_text().splitlines()
    ]
    assert sorted(r["batch_size"] for r in rows) == [1, 4, 16, 64]
    assert all(r["ops_source"] == "program" and r["predicted_latency_s"] > 0 for r in rows)
    assert str(tmp_path / "vit" / "report.md") in printed.getvalue()
    report = (tmp_path / "vit" / "report.md").read_text()
    assert "C3" in report and "C1" not in report  # only the claim that applies to a user's model


def test_the_tutorials_command_line_sweeps_the_vit(tmp_path):
    (command,) = _blocks("bash")[:1]
    args = command.replace("\\\n", " ").split()[2:]  # after "python main.py"
    args = [a for a in args if not a.startswith("--workdir")]
    peaks = tiny().roofline.peaks_cache_dir
    quick = (
        "--config.sweep.batch_sizes=(1,2)", "--config.sweep.passes=1",
        "--config.timing.run_budget_s=0", "--config.timing.target_rel_ci=10",
        "--config.roofline.shape_aware=false", "--config.output.plots=false",
        "--config.output.progress_bar=false", f"--config.roofline.peaks_cache_dir={peaks}",
    )  # fmt: skip
    done = run_main(*args, *quick, f"--workdir={tmp_path / 'vit'}")
    assert done.returncode == 0, done.stderr[-2000:]
    model = json.loads((tmp_path / "vit" / "config.json").read_text())["config"]["model"]
    assert model["depth"] == 2 and model["factory"] == "examples.vit:FAMILY"
    assert model["dim"] == 64  # the family's own default
    rows = (tmp_path / "vit" / "results.jsonl").read_text().splitlines()
    assert sorted(json.loads(r)["batch_size"] for r in rows) == [1, 2]
