"""The post's central experiment: MLP depth 8, width 1024, batch 1..512 doubling, timed twice:
with warm caches (calls back to back: weights that fit the last-level cache are read from
it) and cold (the cache evicted before each call: weights come from DRAM).

python main.py --config=experiments/mlp_article.py --workdir=/tmp/mlp_article
"""

from ml_collections import config_dict

from configs import default


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
    del arg
    config = default.get_config()
    config.name = "mlp_article"
    config.model.width = 1024
    config.model.depth = 8
    config.sweep.batch_sizes = default.POWERS_OF_TWO_TO_512
    # Two runs share the experiment's time: the six passes every point gets, and a little more.
    config.timing.run_budget_s = 6.0
    config.runs = {
        "mlp_d8_w1024": {},
        "mlp_d8_w1024_cold": {"timing": {"cache": "cold"}},
    }
    config.report.claims = ("C3",)
    return config
