"""The post's first figures: ResNet50 at 224x224 on every platform JAX sees, plus small networks.

    python main.py --config=experiments/resnet_cpu_vs_gpu.py --workdir=/tmp/resnet

Runs ResNet50 over batch 1..64 on the CPU and, when there is one, on the GPU (or TPU), drawn
side by side (beside an accelerator the CPU run's analysis measures no per-shape rates:
roofline.microbenchmark_budget_s 0); on a CPU-only machine the report shows the roofline's
predicted curves for spec devices (T4 first), labelled as predictions. Then a small CNN
(ResNet18, width 16, 32x32 images) and a small MLP over batch 1..512 for claim C5, and for
claim C6 a stack of 3x3 convolutions next to dense stacks with the same weights per layer,
one with the same FLOPs (256 tokens per example) and one with a single token. JAX's
persistent compilation cache is on: ResNet50 compiles once per batch size and a second run
loads them.
"""

import jax
from ml_collections import config_dict

from configs import default, resnet

RESNET50_BATCHES = (1, 2, 4, 8, 16, 32, 64)
SMALL_BATCHES = tuple(2**i for i in range(10))  # 1 .. 512


def platforms() -> list[str]:
    """Every platform with a device here, the CPU first."""
    found = ["cpu"]
    for name in ("gpu", "tpu"):
        try:
            if jax.devices(name):
                found.append(name)
        except RuntimeError:
            pass
    return found


# Claim C6 controlled: a stack of 3x3 convolutions (C channels on 16x16) against dense
# stacks with the same weights per layer (width 3C): over 16x16 = 256 tokens per example the
# same FLOPs (each weight used 256 times per example, as the convolution uses it), over one
# token 256 times fewer.
C6_CHANNELS, C6_IMAGE, C6_DEPTH = 64, 16, 4
C6_BATCHES = (1, 2, 4, 8, 16, 32, 64)


def c6_runs(mlp_model: dict) -> dict[str, dict]:
    width = 3 * C6_CHANNELS
    conv = {"name": "conv_stack", "channels": C6_CHANNELS, "depth": C6_DEPTH,
            "image_size": C6_IMAGE, "kernel": 3, "dtype": "float32",
            "param_dtype": "float32", "matmul_precision": "default"}  # fmt: skip
    dense = {**mlp_model, "width": width, "depth": C6_DEPTH}
    return {
        f"conv_c{C6_CHANNELS}_{C6_IMAGE}px": {
            "model": conv, "sweep": {"batch_sizes": C6_BATCHES}, "timing": {"min_runs": 10},
        },
        f"dense_w{width}_t{C6_IMAGE**2}": {
            "model": {**dense, "tokens": C6_IMAGE**2},
            "sweep": {"batch_sizes": C6_BATCHES},
            "timing": {"min_runs": 10},
        },
        f"dense_w{width}_t1": {
            "model": {**dense, "tokens": 1},
            "sweep": {"batch_sizes": C6_BATCHES},
            "timing": {"min_runs": 10},
        },
    }  # fmt: skip


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
    del arg
    config = default.get_config()
    config.name = "resnet_cpu_vs_gpu"
    config.model = resnet.model(50)
    config.sweep.batch_sizes = RESNET50_BATCHES
    # Seconds per call at the large batches on a CPU: a few calls per pass (its median).
    config.timing.min_runs = 3
    config.timing.run_budget_s = 10.0
    # Per-op prediction: each conv and GEMM timed at its own shape (cached per device).
    config.roofline.shape_aware = True
    config.compilation_cache_dir = "~/.cache/batching_lab/xla"
    small_mlp = {"name": "mlp", "width": 64, "depth": 2, "activation": "relu",
                 "dtype": "float32", "param_dtype": "float32", "use_bias": True,
                 "matmul_precision": "default"}  # fmt: skip
    found = platforms()
    # A ResNet50 call at batch 64 takes seconds on a CPU: four passes (t with 3 degrees of
    # freedom, a wider interval) keep the run near its length before passes were the unit.
    runs = {f"resnet50_{p}": {"platform": p, "sweep": {"passes": 4}} for p in found}
    if len(found) > 1:
        # Beside an accelerator the host CPU's run is the post's reference curve, not the
        # subject: its analysis prices convolutions at the measured matmul peak instead of
        # microbenchmarking ~125 conv shapes of the host (minutes of a short GPU lease).
        runs["resnet50_cpu"]["roofline"] = {"microbenchmark_budget_s": 0.0}
    runs["resnet18_32px_w16"] = {
        "model": {"depth": 18, "image_size": 32, "width": 16, "small_input": True,
                  "num_classes": 10},
        "sweep": {"batch_sizes": SMALL_BATCHES},
        "timing": {"min_runs": 10},
    }  # fmt: skip
    runs["mlp_w64_d2"] = {
        "model": small_mlp,
        "sweep": {"batch_sizes": SMALL_BATCHES},
        "timing": {"min_runs": 10},
    }
    runs.update(c6_runs(small_mlp))
    config.runs = runs
    config.report.claims = ("C1", "C2", "C5", "C6")
    return config
