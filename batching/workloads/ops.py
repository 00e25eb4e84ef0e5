"""A call as a list of ops: the vocabulary every workload describes its call in.

Each workload describes one call at a batch size as ops (`Op`). An op is a GEMM, a
convolution, or an attention over a KV cache. It can be an elementwise or normalisation
pass. It can be a reduction, a gather or a scatter. An MoE dispatch or combine is one too.
The call's analytic totals (`cost`) are derived from that one list. So are its GEMM shapes
and its attention shapes. That makes one source of truth for what a call does. The
microbenchmarks, the trace reader and the per-op roofline read the same ops. The roofline is
batching.predict.pricing.

Shapes by kind (`Op.shape`) follow.

gemm and moe_dispatch_combine take (m, k, n). Each instance is one [m, k] × [k, n] product.
They may also take (batch, m, k, n): `batch` such products in one kernel. That is an einsum
over experts or groups.

ragged_gemm takes (groups, m, k, n): a grouped product (jax.lax.ragged_dot). It has m rows
in all. Each group of rows meets its own [k, n]. A dropless MoE's experts run this way.
Its FLOPs are 2·m·k·n over the rows actually routed. What the backend computes does not
change that.

conv takes (batch, height, width, c_in, c_out, kernel, stride) on an NHWC input, and its
feature groups after them when it has several. Its padding is (kernel - 1) // 2 on each
side, as in models.resnet.

attention over a KV cache takes (batch, kv_heads, cache_len, q_per_kv, head_dim). It has the
cache's `layout` and `dtype`, and the model's own attention times it. Without a layout it is
a prefill over its own prompt. Then any shape goes, priced at the peak FLOP rate. A program's
list (batching.measure.hlo_ops) has each of attention's products apart: a batched dot of
shape (batch, m, k, n), 2·batch·m·k·n FLOPs, priced as a batched GEMM (`dot_shaped`).

Other kinds take the shape of the tensor the op reads or writes.
"""

import dataclasses
import math
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
# Which limit an op is at. "memory": DRAM bytes. "cache": bytes from the last-level cache.
# "compute": its measured (or peak) FLOP rate. "fused": none of its own, inside its producer.
LIMITS = ("memory", "cache", "compute", "fused")
# Ops whose FLOP rate is a GEMM's at their (m, k, n): a one-hot einsum is a real matmul.
GEMM_LIKE = ("gemm", "moe_dispatch_combine")


def dot_shaped(op: "Op") -> bool:
    """Whether an op is one product of shape (m, k, n) or (batch, m, k, n), by its FLOPs.

    GEMMs are. So are attention's products as a compiled program lists them.
    """
    return (
        op.kind in (*GEMM_LIKE, "attention")
        and not op.layout
        and len(op.shape) in (3, 4)
        and bool(op.flops)
        and (op.kind != "attention" or op.flops == 2 * math.prod(op.shape))
    )


@dataclasses.dataclass(frozen=True)
class Op:
    """One kernel of a call, run `count` times.

    flops, bytes and weight_bytes are per instance. bytes include weight_bytes. That part is
    parameters, which can stay warm in a cache.
    """

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
    """A call's FLOPs, bytes and weight bytes, summed over its ops."""

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
    """The call's weight matmuls as (m, k, n, count), in order.

    Only kind "gemm" counts. A batched product counts as `batch` products of its (m, k, n).
    """
    out = []
    for o in ops:
        if o.kind == "gemm":
            batch, mkn = (1, o.shape) if len(o.shape) == 3 else (o.shape[0], o.shape[1:])
            out.append((*mkn, o.count * batch))
    return out


def attention_shapes(ops: list[Op]) -> list[dict[str, Any]]:
    """The call's attentions over a KV cache, as dicts of their shape.

    Only ops with a cache `layout` count. The dicts match peaks.attention_seconds's keys.
    """
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
    """Kernels a call launches: its unfused ops, each times its count."""
    return sum(o.count for o in ops if not o.fused)


# Kinds a lone-op microbenchmark runs (shape_bench.measure_lone_op_seconds).
# Each maps to the ranks of the shapes it takes. gemm and moe_dispatch_combine take
# (m, k, n) or (batch, m, k, n); conv takes 7 dims, 8 for a grouped one.
LONE_KINDS = {"gemm": (3, 4), "moe_dispatch_combine": (3, 4), "conv": (7, 8)}
# It times a call running one instance and one running LONE_COPIES in a row.
# The slope between them is what one more instance costs. A call has its own noise: a
# sleeping worker thread is woken or not. Eight instances apart, that noise is divided by
# eight. One and two instances apart, it swamps a small product's time.
LONE_COPIES = 9
