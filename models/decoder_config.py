"""The decoder's config, checked field by field.

The module also holds the counts that are pure math on the config. They are parameters,
active parameters and the MoE blocks. models.decoder builds the
model from the config.
"""

import dataclasses

from models import kv_cache, moe
from models.dtypes import resolve_dtype
from models.moe import MoEConfig


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """The decoder's sizes, dtypes, KV-cache layout and MoE blocks.

    A bad field raises ValueError naming model.<field>.
    """

    vocab_size: int = 32000
    d_model: int = 2048
    n_layers: int = 16
    n_heads: int = 16
    n_kv_heads: int = 4
    head_dim: int = 128
    mlp_dim: int = 8192
    max_seq_len: int = 4096
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    dtype: str = "float32"
    param_dtype: str = "float32"
    cache_dtype: str = "float32"
    # The KV cache's axis order, "bksh" or "bskh" (models.kv_cache).
    cache_layout: str = "bksh"
    # How a decode step writes its new K/V: "scatter" or "loop" (models.kv_cache).
    cache_update: str = "scatter"
    # Mixture of experts (see models.decoder's docstring); 0 keeps every block dense. The MoE fields
    # are checked even then, so a typo does not wait for moe_every to be set.
    moe_every: int = 0
    num_experts: int = 8
    top_k: int = 2
    capacity_factor: float = 1.25
    router: str = "token_choice"
    renormalize: bool = False
    moe_group_size: int = 0
    # A per-expert bias on the top-k choice, set by training (auxiliary-loss-free balancing).
    router_bias: bool = False
    # A decode step routes its B tokens in this many groups of B / decode_groups (1: one
    # group). Under expert parallelism it is the number of devices holding token shards, so a
    # group is one device's tokens (GShard); the run sets it, not the config.
    decode_groups: int = 1

    def __post_init__(self):
        for name in (
            "vocab_size",
            "d_model",
            "n_layers",
            "n_heads",
            "n_kv_heads",
            "head_dim",
            "mlp_dim",
            "max_seq_len",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"model.{name} must be a positive integer, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"model.n_heads must be a multiple of model.n_kv_heads for grouped-query "
                f"attention, got n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(
                f"model.head_dim must be even for rotary embeddings, got {self.head_dim}"
            )
        if not self.rope_theta > 0:
            raise ValueError(f"model.rope_theta must be positive, got {self.rope_theta!r}")
        if not isinstance(self.tie_embeddings, bool):
            raise ValueError(f"model.tie_embeddings must be a bool, got {self.tie_embeddings!r}")
        for name in ("dtype", "param_dtype", "cache_dtype"):
            resolve_dtype(getattr(self, name))
        if self.cache_layout not in kv_cache.LAYOUTS:
            raise ValueError(
                f"model.cache_layout must be one of {kv_cache.LAYOUTS}, got {self.cache_layout!r}"
            )
        if self.cache_update not in kv_cache.UPDATES:
            raise ValueError(
                f"model.cache_update must be one of {kv_cache.UPDATES}, got {self.cache_update!r}"
            )
        if not isinstance(self.decode_groups, int) or self.decode_groups <= 0:
            raise ValueError(
                f"decode_groups must be a positive integer, got {self.decode_groups!r}"
            )
        for name in ("moe_every", "moe_group_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"model.{name} must be an integer >= 0, got {value!r}")
        if self.moe_every > self.n_layers:
            raise ValueError(
                f"model.moe_every must be <= model.n_layers={self.n_layers} (or 0 for no MoE), "
                f"got {self.moe_every}: no block would be an MoE"
            )
        self.moe_config()  # MoEConfig checks the router fields and names them model.*

    def moe_config(self) -> MoEConfig:
        """The config of this decoder's MoE layers (expert hidden dim = mlp_dim)."""
        return MoEConfig(
            d_model=self.d_model,
            mlp_dim=self.mlp_dim,
            num_experts=self.num_experts,
            top_k=self.top_k,
            capacity_factor=self.capacity_factor,
            router=self.router,
            renormalize=self.renormalize,
            group_size=self.moe_group_size,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            router_bias=self.router_bias,
        )


def moe_layers(cfg: DecoderConfig) -> tuple[int, ...]:
    """Indices of the blocks that use an MoE layer: (layer + 1) % moe_every == 0."""
    if not cfg.moe_every:
        return ()
    return tuple(i for i in range(cfg.n_layers) if (i + 1) % cfg.moe_every == 0)


# Counts and costs, pure math on the config.


def _moe_stack(cfg: DecoderConfig) -> moe.MoEMLPConfig | None:
    """The decoder's MoE layers as models.moe counts them (depth = number of MoE blocks)."""
    n_moe = len(moe_layers(cfg))
    if not n_moe:
        return None
    return moe.MoEMLPConfig(**dataclasses.asdict(cfg.moe_config()), depth=n_moe)


def num_params(cfg: DecoderConfig) -> int:
    """Exact parameter count of Decoder(cfg), embedding and unembedding included.

    An MoE block replaces a SwiGLU's count. It counts its router (D*E) and all E experts
    (3*D*F each).
    """
    D, V = cfg.d_model, cfg.vocab_size
    attn = D * cfg.head_dim * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)
    mlp = 3 * D * cfg.mlp_dim
    per_block = attn + mlp + 2 * D
    unembed = 0 if cfg.tie_embeddings else D * V
    total = V * D + cfg.n_layers * per_block + D + unembed
    stack = _moe_stack(cfg)
    if stack is None:
        return total
    return total - stack.depth * mlp + moe.num_params(stack)


def num_active_params(cfg: DecoderConfig) -> int:
    """Parameters one token uses.

    This is num_params with each MoE block's experts counted only as far as a token reaches them.
    models.moe.num_active_params counts those experts. That is top_k experts for token-choice, and
    about capacity_factor experts for expert-choice. It equals num_params for a dense decoder.
    """
    stack = _moe_stack(cfg)
    if stack is None:
        return num_params(cfg)
    return num_params(cfg) - moe.num_params(stack) + moe.num_active_params(stack)


def num_non_embedding_params(cfg: DecoderConfig) -> int:
    """Parameters outside the embedding and unembedding tables.

    The closed-form decoder costs charge 2 FLOPs per token for each of them.
    """
    tables = 1 if cfg.tie_embeddings else 2
    return num_params(cfg) - tables * cfg.vocab_size * cfg.d_model
