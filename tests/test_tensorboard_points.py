"""Every measured point in TensorBoard's Scalars tab, in batch order, as a real server serves it
(started the way docs/viewing.md says), after a shuffled sweep and after the run is extended."""

import json
import os
import random
import subprocess
import sys
import time
import urllib.parse
import urllib.request

from batching import app
from batching.outputs.tensorboard import POINT_SCALARS
from tests.conftest import tiny
from tests.test_tensorboard_hparams import _free_port

TIMEOUT_S = 90


def _served_steps(logdir: str, run: str, tags: list[str], want: list[int]) -> dict[str, list]:
    """tag -> steps the server serves for the run, once every tag serves `want` (or time out)."""
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", logdir,
         "--host", "127.0.0.1", "--port", str(port), "--reload_interval", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    served: dict[str, list] = {}
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline and any(served.get(t) != want for t in tags):
            time.sleep(1)
            for tag in tags:
                query = urllib.parse.urlencode({"run": run, "tag": tag})
                url = f"http://127.0.0.1:{port}/data/plugin/scalars/scalars?{query}"
                try:
                    with urllib.request.urlopen(url, timeout=10) as response:
                        served[tag] = [step for _, step, _ in json.loads(response.read())]
                except OSError:
                    continue  # not listening yet, or the run not loaded yet
        assert server.poll() is None, "tensorboard exited"
    finally:
        server.terminate()
        server.wait(timeout=10)
    return served


def test_shuffled_and_extended_sweeps_serve_every_point_in_batch_order(tmp_path):
    config = tiny()
    config.sweep.batch_sizes = (1, 2, 4, 8, 16, 32)
    order = list(config.sweep.batch_sizes)
    random.Random(f"{config.seed}/{config.name}").shuffle(order)
    assert order != sorted(order)  # the sweep visits them out of order
    app.run(config, str(tmp_path))
    config.sweep.batch_sizes = (1, 2, 3, 4, 8, 16, 32, 64)  # the same run, extended
    app.run(config, str(tmp_path))
    # One pass per point (tiny()): no spread between passes to show.
    tags = [tag for f, (tag, _) in POINT_SCALARS.items() if f != "pass_cv"] + ["timing/converged"]
    want = [1, 2, 3, 4, 8, 16, 32, 64]
    served = _served_steps(os.path.join(tmp_path, "tb"), "tiny", tags, want)
    assert served == {tag: want for tag in tags}
