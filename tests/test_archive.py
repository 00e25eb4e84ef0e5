"""Sweeps committed from other machines are read back and shown as archived, never as ours."""

import gzip
import json
import os

from batching import app
from batching.outputs import archive, report_sections
from tests.conftest import tiny


def _write(folder: str, rows: list[dict], gz: bool = True, summary: list | None = None) -> None:
    os.makedirs(folder, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if gz:
        with gzip.open(os.path.join(folder, "results.jsonl.gz"), "wt") as f:
            f.write(text)
    else:
        with open(os.path.join(folder, "results.jsonl"), "w") as f:
            f.write(text)
    if summary is not None:
        with open(os.path.join(folder, "summary.json"), "w") as f:
            json.dump(summary, f)


def _row(run: str, b: int, latency_s: float, kind: str, experiment: str = "tiny", **extra):
    return {"run": run, "batch_size": b, "latency_s": latency_s, "status": "ok",
            "experiment": experiment, "device_kind": kind, "platform": "gpu",
            "timestamp": 1795666435.0, "jax_version": "0.11.2", **extra}  # fmt: skip


def test_load_keeps_only_this_experiment_from_other_devices(tmp_path):
    root = str(tmp_path / "results")
    _write(f"{root}/gpu-a/tiny", [_row("r", b, 1e-3 * b, "Fake GPU") for b in (1, 2, 4)],
           summary=[{"run": "r", "knee_batch_size": 3.0}])  # fmt: skip
    _write(f"{root}/gpu-a/other", [_row("r", 1, 1e-3, "Fake GPU", experiment="other")], gz=False)
    _write(f"{root}/cpu-b/tiny", [_row("r", 1, 1e-3, "cpu")])  # this run's own device kind
    os.makedirs(f"{root}/broken/tiny")
    with open(f"{root}/broken/tiny/results.jsonl", "w") as f:
        f.write("{not json\n")
    found = archive.load(root, "tiny", exclude_device_kind="cpu")
    assert [a.name for a in found] == [os.path.join("gpu-a", "tiny")]
    (a,) = found
    assert a.device_kind == "Fake GPU" and len(a.rows) == 3
    assert a.summaries["r"]["knee_batch_size"] == 3.0
    assert a.versions == "jax 0.11.2, 2026-11-26"
    assert archive.relative_latency(a.rows, "r") == [(1, 1.0), (2, 2.0), (4, 4.0)]
    assert archive.load("", "tiny") == [] and archive.load(str(tmp_path / "none"), "tiny") == []


def test_report_shows_archived_sweeps_beside_the_run_and_c2_cites_them(tmp_path):
    root = str(tmp_path / "results")
    # A ResNet50 on an accelerator, as resnet_cpu_vs_gpu would have archived it.
    resnet = [
        _row("resnet50_gpu", b, t, "Fake GPU", depth=50, dtype="float32")
        for b, t in ((1, 2.0e-3), (2, 2.2e-3), (4, 2.1e-3), (8, 2.6e-3))
    ]
    _write(f"{root}/fake-gpu/tiny", resnet)
    config = tiny()
    config.output.plots = True  # the archive figure is checked
    config.report.archive_dir = root
    app.run(config, str(tmp_path / "run"))
    with open(tmp_path / "run" / "report.md") as f:
        text = f.read()
    assert "## Measured elsewhere (archived)" in text
    assert "| fake-gpu/tiny | Fake GPU | resnet50_gpu | float32 | 1→8 | 2 | 2.6 |" in text
    assert os.path.exists(tmp_path / "run" / "plots" / "archive.png")
    line = report_sections.archived_c2(archive.load(root, "tiny"))
    assert line.startswith("Archived measurement, not this run (Fake GPU, fake-gpu/tiny")
    assert "batch 2: 1.1x, batch 4: 1.05x, batch 8: 1.3x" in line

    config.report.archive_dir = ""
    app.run(config, str(tmp_path / "run2"))
    with open(tmp_path / "run2" / "report.md") as f:
        assert "Measured elsewhere" not in f.read()
    assert not os.path.exists(tmp_path / "run2" / "plots" / "archive.png")
