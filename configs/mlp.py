"""The post's MLP (depth 8, width 1024) swept over batch sizes 1..512.

    python main.py --config=configs/mlp.py --workdir=/tmp/mlp
    python main.py --config=configs/mlp.py --workdir=/tmp/mlp2048 --config.model.width=2048

The config takes no argument. Set a model field with `--config.model.<field>=<value>`.
"""

from ml_collections import config_dict

from configs import default


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
    if arg is not None:
        raise ValueError(
            f"configs/mlp.py takes no argument, got {arg!r}; set a model field with "
            "--config.model.<field>=<value>, e.g. --config.model.width=2048"
        )
    config = default.get_config()
    config.name = "mlp"
    config.report.claims = ("C3",)
    return config
