"""The HParams tab as TensorBoard serves it: a real `tensorboard` server on 127.0.0.1."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

from batching.outputs.tensorboard import write_experiment_config, write_run_summary

RUNS = {
    "tc_k2_cf100_aux": {"model.router": "token_choice", "model.top_k": 2,
                        "model.capacity_factor": 1.0, "train.aux_loss_weight": 0.01,
                        "model.num_experts": 4, "params": 1000},
    "tc_k2_cf200_aux": {"model.router": "token_choice", "model.top_k": 2,
                        "model.capacity_factor": 2.0, "train.aux_loss_weight": 0.01,
                        "model.num_experts": 4, "params": 1000},
    "ec_cf100_noaux": {"model.router": "expert_choice", "model.top_k": 2,
                       "model.capacity_factor": 1.0, "train.aux_loss_weight": 0.0,
                       "model.num_experts": 4, "params": 1200},
}  # fmt: skip
METRIC = "hparams/heldout_loss"
TIMEOUT_S = 90


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def test_hparams_tab_filters_by_router_and_lists_differing_columns_first(tmp_path):
    workdir = str(tmp_path)
    for i, (run, hp) in enumerate(RUNS.items()):
        write_run_summary(workdir, run, {}, hp, {METRIC: 1.5 + i}, {})
    write_experiment_config(workdir, RUNS, [METRIC])

    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", os.path.join(workdir, "tb"),
         "--host", "127.0.0.1", "--port", str(port), "--load_fast", "false",
         "--reload_interval", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/data/plugin/hparams/experiment"
    try:
        deadline, experiment = time.monotonic() + TIMEOUT_S, {}
        while time.monotonic() < deadline and not experiment.get("hparamInfos"):
            time.sleep(1)
            try:
                experiment = _post(url, {"experimentName": "", "includeMetrics": True})
            except OSError:
                continue  # not listening yet, or still loading
        assert server.poll() is None, "tensorboard exited"
    finally:
        server.terminate()
        server.wait(timeout=10)

    infos = {h["name"]: h for h in experiment["hparamInfos"]}
    router = infos["model.router"]
    assert sorted(router["domainDiscrete"]) == ["expert_choice", "token_choice"]
    assert router["differs"] is True
    assert sorted(infos["model.capacity_factor"]["domainDiscrete"]) == [1.0, 2.0]
    assert sorted(infos["train.aux_loss_weight"]["domainDiscrete"]) == [0.0, 0.01]
    assert infos["params"]["domainInterval"] == {"minValue": 1000.0, "maxValue": 1200.0}
    assert not infos["model.top_k"].get("differs", False)
    # differing columns first: capacity, params, router, aux weight, then the rest
    names = [h["name"] for h in experiment["hparamInfos"]]
    differing = [n for n in names if infos[n].get("differs")]
    assert names[: len(differing)] == differing and len(differing) == 4
    assert [m["name"]["tag"] for m in experiment["metricInfos"]] == [METRIC]
