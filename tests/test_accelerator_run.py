"""experiments/accelerator_run.sh end to end on the CPU, reduced to seconds: the script a GPU
lease runs once must not fail there for a reason a CPU could have shown."""

import json
import os
import shutil
import subprocess

from tests.conftest import PEAKS_DIR, ROOT


def test_reduced_accelerator_run_completes_on_a_cpu(tmp_path):
    out, work, peaks = tmp_path / "out", tmp_path / "work", tmp_path / "peaks"
    shutil.copytree(PEAKS_DIR, peaks)
    env = {
        **os.environ,
        "OUT": str(out),
        "WORK": str(work),
        "PEAKS_CACHE": str(peaks),
        "REDUCED": "1",
        "COMMIT": "test",
    }
    done = subprocess.run(
        ["bash", os.path.join(ROOT, "experiments", "accelerator_run.sh")],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    steps = (out / "steps.txt").read_text().splitlines()
    ran = {line.split()[0]: line for line in steps}
    for name in ("overhead_command_buffers_on", "attention_layouts", "mlp"):
        assert " rc=0 " in ran[name], steps
    # The GPU-only part says it was skipped, in one line, and why.
    assert "skipped: XLA command buffers" in ran["overhead_command_buffers_off"]
    overhead = json.loads((out / "overhead_command_buffers_on.json").read_text())
    case = overhead["cases"]["mlp_d8_w64"]
    assert case["lab_us"] > 0 and case["traced_kernels_us"] <= case["traced_wall_us"]
    attention = json.loads((out / "attention_layouts.json").read_text())
    assert "dpa_cudnn/float32" in attention["skipped"] and attention["rows"][0]["bksh_us"] > 0
    assert (out / "mlp.tgz").stat().st_size > 0
    assert "cpu:cpu" in json.loads((out / "device_peaks.json").read_text())
    assert (out / "env.txt").read_text().startswith("commit test")
