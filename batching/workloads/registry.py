"""Which family a run's model section picks, and the bench that holds it.

A run picks its family in one of two ways.

- `model.name` names one of the lab's families, registered by import path (FAMILIES).
- `model.factory` is the import path of a Family, or of a function `make(model_cfg)` that
  returns `(model, inputs)` (batching.workloads.user wraps it).
"""

from collections.abc import Callable
from typing import Any

import ml_collections

from batching.setup import runs, topology
from batching.setup.topology import Topology
from batching.workloads import family as family_lib
from batching.workloads import user
from batching.workloads.base import Workload

# The lab's own families, by model.name.
FAMILIES = {
    name: f"batching.workloads.{name}:FAMILY"
    for name in ("conv_stack", "decoder", "mlp", "moe", "moe_decoder", "resnet", "swiglu")
}


def of(model_cfg: ml_collections.ConfigDict) -> family_lib.Family:
    """The family a run's model section picks; ValueError if it picks none."""
    factory = model_cfg.get("factory")
    if factory:
        found = family_lib.load(factory)
        if isinstance(found, family_lib.Family):
            return found
        if callable(found):
            return user.factory_family(found, factory)
        raise ValueError(f"model.factory={factory!r} is neither a Family nor a function")
    name = model_cfg.get("name")
    if name not in FAMILIES:
        known = ", ".join(sorted(FAMILIES))
        raise ValueError(
            f"model.name is not a known model, got {name!r}; the lab's are {known}, or set "
            "model.factory to your own"
        )
    return family_lib.load(FAMILIES[name], "model.name")


class Bench:
    """A run's workload family, topology and workload, handed to the sweep and the analysis.

    The family is found once (`of`). The topology and workload are
    built on first use.
    """

    def __init__(self, run: runs.Run):
        self.run = run
        self.family = of(run.config.model)
        self._topo: Topology | None = None
        self._workload: Workload | None = None

    @property
    def name(self) -> str:
        """The run's name."""
        return self.run.name

    @property
    def config(self) -> ml_collections.ConfigDict:
        """The run's config."""
        return self.run.config

    @property
    def attend(self) -> Callable[..., Any] | None:
        """The family's attention over its KV cache, or None.

        The roofline's attention microbenchmark times it.
        """
        return self.family.attend

    @property
    def prepares(self) -> bool:
        """Whether the family has a step before timing (training)."""
        return self.family.prepare is not None

    def topology(self) -> Topology:
        """The run's mesh, built on first use."""
        if self._topo is None:
            self._topo = topology.build(self.run.config)
        return self._topo

    def workload(self, workdir: str) -> Workload:
        """The run's workload on its mesh, built on first use."""
        if self._workload is None:
            self._workload = self.family.build(self.run.config, self.topology(), workdir)
        return self._workload
