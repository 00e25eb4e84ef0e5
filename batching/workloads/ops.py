"""A call as a list of ops: the vocabulary every workload describes its call in.

Each workload describes one call at a batch size as ops (`Op`): a GEMM, a convolution, an
attention over a KV cache, an elementwise or normalisation pass, a reduction, a gather or
scatter, an MoE dispatch or combine. The call's analytic totals (`cost`), its GEMM shapes
and its attention shapes are all derived from that one list, so there is one source of
truth for what a call does; the microbenchmarks, the trace reader and the per-op roofline
(batching.predict.pricing) read the same ops.

Shapes by kind (`Op.shape`):
  gemm, moe_dispatch_combine: (m, k, n), one [m, k] × [k, n] product per instance, or
    (batch, m, k, n), `batch` such products in one kernel (an einsum over experts or groups).
  ragged_gemm: (groups, m, k, n), a grouped product (jax.lax.ragged_dot): m rows in all, each
    group of rows times its own [k, n] (a dropless MoE's experts); FLOPs 2·m·k·n, the rows
    actually routed, whatever the backend computes.
  conv: (batch, height, width, c_in, c_out, kernel, stride), NHWC input, (kernel - 1) // 2
    symmetric padding as models.resnet.
  attention: over a KV cache (batch, kv_heads, cache_len, q_per_kv, head_dim) with the cache's
    `layout` and `dtype`, timed by the model's own attention; without a layout (a prefill over
    its own prompt) any shape, priced at the peak FLOP rate.
  others: the shape of the tensor the op reads or writes.
"""

import dataclasses
from typing import Any

KINDS = (
    "gemm",
    "conv",
    "attention",
    "elementwise",
    "reduction",
    "gather_scatter",
    "moe_dispatch_combine",
    "ragged_gemm",
)
# Which limit an op is at: DRAM bytes, bytes from the last-level cache, its measured (or
# peak) FLOP rate, or nothing of its own (fused into its producer).
LIMITS = ("memory", "cache", "compute", "fused")
# Ops whose FLOP rate is a GEMM's at their (m, k, n): a one-hot einsum is a real matmul.
GEMM_LIKE = ("gemm", "moe_dispatch_combine")


@dataclasses.dataclass(frozen=True)
class Op:
    """One kernel of a call, `count` times. flops, bytes and weight_bytes are per instance;
    bytes include weight_bytes (the part that is parameters, which can stay warm in a cache)."""

    name: str
    kind: str
    shape: tuple[int, ...]
    flops: float
    bytes: float
    weight_bytes: float = 0.0
    count: int = 1
    fused: bool = False
    dtype: str = "float32"
    layout: str = ""  # attention: the KV cache layout the model runs

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"op kind must be one of {KINDS}, got {self.kind!r}")

    def to_dict(self) -> dict[str, Any]:
        """The op as a JSON-ready dict (its shape a list)."""
        return {**dataclasses.asdict(self), "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Op":
        """The Op of a `to_dict` dict."""
        return cls(**{**d, "shape": tuple(int(n) for n in d["shape"])})


@dataclasses.dataclass(frozen=True)
class Totals:
    """A call's FLOPs, bytes and weight bytes, summed over its ops and their counts."""

    flops: float
    bytes: float
    weight_bytes: float


def totals(ops: list[Op]) -> Totals:
    """FLOPs, bytes and weight bytes of a call: the sums over its ops."""
    return Totals(
        flops=float(sum(o.flops * o.count for o in ops)),
        bytes=float(sum(o.bytes * o.count for o in ops)),
        weight_bytes=float(sum(o.weight_bytes * o.count for o in ops)),
    )


def gemm_shapes(ops: list[Op]) -> list[tuple[int, int, int, int]]:
    """The call's weight matmuls as (m, k, n, count), in order (kind "gemm" only); a batched
    product counts as `batch` products of its (m, k, n)."""
    out = []
    for o in ops:
        if o.kind == "gemm":
            batch, mkn = (1, o.shape) if len(o.shape) == 3 else (o.shape[0], o.shape[1:])
            out.append((*mkn, o.count * batch))
    return out


def attention_shapes(ops: list[Op]) -> list[dict[str, Any]]:
    """The call's attentions over a KV cache (those with a cache `layout`) as dicts of their
    shape, as peaks.attention_seconds is keyed."""
    out = []
    for o in ops:
        if o.kind != "attention" or not o.layout:
            continue
        B, K, S, G, H = o.shape
        item = o.bytes / (2 * B * K * S * H)
        out.append(
            dict(
                batch=B,
                kv_heads=K,
                cache_len=S,
                q_per_kv=G,
                head_dim=H,
                count=o.count,
                layout=o.layout,
                dtype=o.dtype,
                bytes=item,
            )
        )
    return out


def launches(ops: list[Op]) -> int:
    """Kernels a call launches: every op that is not fused into another, times its count."""
    return sum(o.count for o in ops if not o.fused)


# Kinds a lone-op microbenchmark runs (shape_bench.measure_lone_op_seconds), with the ranks of the
# shapes it takes: gemm and moe_dispatch_combine (m, k, n) or (batch, m, k, n), conv 7 dims.
LONE_KINDS = {"gemm": (3, 4), "moe_dispatch_combine": (3, 4), "conv": (7,)}
# It times a call running one instance and one running LONE_COPIES in a row. The slope between
# them is what one more instance costs: eight instances apart, a call's noise (a sleeping
# worker thread woken or not, tens of µs on a small VM) is divided by eight, where one and
# two instances apart it was not (width 64 at batch 1 read 14 µs per product from one and
# two, and ~0.8 µs from the 8-layer MLP itself, on a 2-core CPU).
LONE_COPIES = 9
