"""A Mixture-of-Experts MLP swept over batch sizes (each example is one token).

    python main.py --config=configs/moe.py --workdir=/tmp/moe
    python main.py --config=configs/moe.py:expert_choice --workdir=/tmp/moe_ec

The argument, if given, is the router ("token_choice" or "expert_choice").
"""

from ml_collections import config_dict

from configs import default


def model(router: str = "token_choice") -> config_dict.ConfigDict:
    m = config_dict.ConfigDict()
    m.name = "moe"
    m.d_model = 512
    m.mlp_dim = 1024
    m.depth = 2
    m.num_experts = 8
    m.top_k = 2
    m.capacity_factor = 1.25
    m.router = router
    m.renormalize = False
    # Tokens per routing group; 0 = the whole batch is one group.
    m.group_size = 0
    m.dtype = "float32"
    m.param_dtype = "float32"
    m.matmul_precision = "default"
    return m


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
    config = default.get_config()
    config.name = "moe"
    config.model = model(arg or "token_choice")
    config.sweep.batch_sizes = tuple(2**i for i in range(10))
    # Per-op prediction: each GEMM (and conv) timed at its own shape, cached per device.
    config.roofline.shape_aware = True
    return config
