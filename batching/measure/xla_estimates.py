"""XLA's own per-kernel time estimates, where the GPU compiler wrote them into the program.

With `--xla_gpu_collect_cost_model_stats=true` in XLA_FLAGS, XLA's GPU cost models record
their estimate of each fusion and library call in its backend config, as a
`reification_cost` with `exec_time_us` (openxla/xla, `xla/service/gpu/backend_configs.proto`;
the models in `xla/service/gpu/model/`). XLA uses them to decide fusions. The lab reads them
back as a baseline beside its own prediction: seconds per op kind, a loop body's counted by
its trip count. Other backends write none, and the reader returns None.
"""

import collections
import re

from batching.measure import hlo_kinds

_EXEC_US = re.compile(r'"exec_time_us":\s*"?([0-9.eE+-]+)')
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def _multiplicities(comps: dict, entry: str) -> dict[str, int]:
    """How many times each reachable computation runs per call; fusion bodies are not kernels."""
    mult = {entry: 1}
    stack = [entry]
    while stack:
        comp = stack.pop()
        for ins in comps.get(comp, {}).values():
            if ins.opcode == "fusion":
                continue
            n = 1
            if ins.opcode == "while" and (trip := _TRIP.search(ins.rest)):
                n = int(trip[1])
            for callee in ins.calls:
                if callee in comps and callee not in mult:
                    mult[callee] = mult[comp] * n
                    stack.append(callee)
    return mult


def estimates(hlo_text: str) -> dict[str, float] | None:
    """XLA's estimated seconds per op kind over one call, or None where it wrote none."""
    if "exec_time_us" not in hlo_text:
        return None
    comps, entry = hlo_kinds.parse(hlo_text)
    kinds = hlo_kinds.instruction_kinds(hlo_text, (comps, entry))
    by_kind: dict[str, float] = collections.defaultdict(float)
    found = False
    for comp, n in _multiplicities(comps, entry).items():
        for ins in comps[comp].values():
            if m := _EXEC_US.search(ins.rest):
                found = True
                by_kind[kinds.get(ins.name) or hlo_kinds.OTHER] += n * float(m[1]) * 1e-6
    return dict(by_kind) if found else None
