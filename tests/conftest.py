"""Shared fixtures: a tiny, fast config so sweeps finish in a second or two."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from configs import default  # noqa: E402


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
    config.timing.budget_s = 0.02
    config.output.progress_bar = False
    return config


@pytest.fixture
def tiny_config():
    return tiny()
