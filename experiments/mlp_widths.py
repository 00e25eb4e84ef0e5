"""The post's log-log figure over widths: MLP depth 8, widths 64..4096, batch 1..512.

    python main.py --config=experiments/mlp_widths.py --workdir=/tmp/mlp_widths
    python main.py --config=experiments/mlp_widths.py:64,256,1024 --workdir=/tmp/some_widths

The argument, if given, is a comma-separated list of widths.
"""

from ml_collections import config_dict

from configs import default

WIDTHS = tuple(2**i for i in range(6, 13))  # 64 .. 4096


def runs(widths: tuple[int, ...]) -> dict[str, dict]:
    return {f"mlp_d8_w{w:04d}": {"model": {"width": w}} for w in widths}


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
    widths = tuple(int(w) for w in arg.split(",")) if arg else WIDTHS
    config = default.get_config()
    config.name = "mlp_widths"
    config.model.depth = 8
    config.sweep.batch_sizes = default.POWERS_OF_TWO_TO_512
    # Seven runs: each gets its six passes per point, and 5 s of passes beyond them.
    config.timing.run_budget_s = 5.0
    config.runs = runs(widths)
    config.report.claims = ("C4", "C5")
    return config
