"""What the sweep times: a model bound to its inputs, its costs and its run-level facts.

Each model family has a module `batching/workloads/<model.name>.py` with
`validate(model_cfg)` (raises ValueError naming the field) and
`build(run_cfg, topo, workdir) -> Workload` (topo: the run's batching.topology.Topology,
whose mesh the workload places its parameters and inputs on; workdir: where a workload finds
files an earlier step wrote, such as trained parameters). The sweep picks it by name, so adding a
model touches no dispatcher.
"""

import dataclasses
import importlib
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections

from batching import ops as ops_lib
from batching.topology import Topology


@dataclasses.dataclass(frozen=True)
class Cost:
    """Analytic work of one call: FLOPs, bytes moved to and from memory, weight bytes."""

    flops: float
    bytes: float
    weight_bytes: float


@dataclasses.dataclass
class Workload:
    """A pure function to time and everything the sweep needs to know about it.

    `make_args(batch_size)` returns the call's arguments already on the mesh (inputs split
    over `data`: batch_size is the global batch);
    `next_args(args, out)` feeds outputs back in (a donated cache) between calls;
    `ops(batch_size)` describes one call as a list of ops (batching.ops.Op), the one source
    of truth that `cost` (the analytic work), `gemm_shapes` (the call's matrix products as
    (m, k, n, count)) and `attention_shapes` (a decode step's attention over its KV cache)
    are derived from when a workload gives ops; `examples(batch_size)` is the
    number of examples (or tokens) one call processes; `fields` are run-level
    facts that go on every row and into the hparams.
    """

    fn: Callable[..., Any]
    make_args: Callable[[int], Sequence[Any]]
    params: int
    param_bytes: int
    cost: Callable[[int], Cost] | None = None
    donate_argnums: tuple[int, ...] = ()
    next_args: Callable[[Sequence[Any], Any], Sequence[Any]] | None = None
    gemm_shapes: Callable[[int], list[tuple[int, int, int, int]]] | None = None
    # Attention over a KV cache, timed at its own shape by the roofline (peaks.attention_seconds).
    attention_shapes: Callable[[int], list[dict[str, Any]]] | None = None
    # The call's collectives at a batch size, one dict per kind and axis: {"kind":
    # "all_reduce"|"all_to_all"|"all_gather", "axis": mesh axis, "axis_size": devices on it,
    # "bytes": payload per device of ONE collective, "count": how many per call}
    # (batching.collectives); None or [] when the call communicates nothing.
    collectives: Callable[[int], list[dict[str, Any]]] | None = None
    # Per-point facts measured after the timing, never inside it (MoE routing statistics).
    point_fields: Callable[[int], dict[str, Any]] | None = None
    examples: Callable[[int], int] = lambda batch_size: batch_size
    # What `examples` counts; rows also get `<unit>_per_s` (tokens_per_s for a decoder).
    example_unit: str = "examples"
    # How many ways each mesh axis splits this workload (Topology.parallel_shape); None: the
    # mesh's own shape.
    parallel_shape: dict[str, int] | None = None
    fields: dict[str, Any] = dataclasses.field(default_factory=dict)
    ops: Callable[[int], list[ops_lib.Op]] | None = None

    def __post_init__(self):
        if self.ops is None:
            return
        describe = self.ops
        self.cost = lambda batch_size: cost_of(describe(batch_size))
        self.gemm_shapes = lambda batch_size: ops_lib.gemm_shapes(describe(batch_size))
        attention = lambda batch_size: ops_lib.attention_shapes(describe(batch_size))  # noqa: E731
        self.attention_shapes = lambda batch_size: attention(batch_size) or None


def cost_of(ops: list[ops_lib.Op]) -> Cost:
    """A call's Cost: the totals of its ops."""
    t = ops_lib.totals(ops)
    return Cost(flops=t.flops, bytes=t.bytes, weight_bytes=t.weight_bytes)


def workload_module(name: str):
    """The module that binds model family `name`; ValueError if there is none."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"model.name is not a known model, got {name!r}")
    try:
        return importlib.import_module(f"batching.workloads.{name}")
    except ModuleNotFoundError as e:
        if e.name == f"batching.workloads.{name}":
            raise ValueError(f"model.name is not a known model, got {name!r}") from None
        raise


def build(run_cfg: ml_collections.ConfigDict, topo: Topology, workdir: str) -> Workload:
    return workload_module(run_cfg.model.name).build(run_cfg, topo, workdir)
