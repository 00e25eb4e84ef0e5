"""The post's central experiment: MLP depth 8, width 1024, batch 1..512 doubling.

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
    config.runs = {"mlp_d8_w1024": {}}
    config.report.claims = ("C3",)
    return config
