"""A ResNet swept over batch sizes: ResNet50 at 224x224 by default.

    python main.py --config=configs/resnet.py --workdir=/tmp/resnet50
    python main.py --config=configs/resnet.py:18 --workdir=/tmp/resnet18

The argument, if given, is the depth (18, 34, 50, 101 or 152).
"""

from ml_collections import config_dict

from configs import default


def model(depth: int = 50) -> config_dict.ConfigDict:
    m = config_dict.ConfigDict()
    m.name = "resnet"
    m.depth = depth
    m.num_classes = 1000
    m.image_size = 224
    m.width = 64
    m.small_input = False
    m.dtype = "float32"
    m.param_dtype = "float32"
    m.matmul_precision = "default"
    return m


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
    config = default.get_config()
    config.name = "resnet"
    if arg and arg not in ("18", "34", "50", "101", "152"):
        raise ValueError(
            f"configs/resnet.py argument must be a depth (18, 34, 50, 101, 152), got {arg!r}"
        )
    config.model = model(int(arg) if arg else 50)
    config.sweep.batch_sizes = (1, 2, 4, 8, 16, 32, 64)
    # A ResNet50 call is 8 GFLOP per image: seconds at batch 64 on a CPU, so a pass times a
    # few calls (its median) and the passes give the spread.
    config.timing.min_runs = 3
    config.timing.run_budget_s = 10.0
    # Per-op prediction: each GEMM (and conv) timed at its own shape, cached per device.
    config.roofline.shape_aware = True
    config.report.claims = ("C1", "C6")
    return config
