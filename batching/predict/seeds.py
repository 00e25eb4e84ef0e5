"""Runs of one setting over seeds (train.seeds).

The runs are grouped by setting. Each number is a mean with a 95% interval over the seeds.
The module also says which settings differ beyond the seed spread.

Two settings differ in a number when their intervals do not overlap. With one seed there is
no spread to judge by. Nothing is then said to differ. With two seeds a t-interval is wide
(t = 12.7). "Indistinguishable at this scale" is then the honest finding for most pairs.
"""

import dataclasses
from typing import Any

from batching.measure import stats
from batching.text import fmt


@dataclasses.dataclass
class Setting:
    """One setting's runs (one per seed), in the order they were given."""

    name: str
    runs: list[dict[str, Any]]

    @property
    def first(self) -> dict[str, Any]:
        """The first seed's summary: what the seeds share (router, capacity, ...)."""
        return self.runs[0]

    @property
    def seeds(self) -> int:
        """How many seeds ran."""
        return len(self.runs)

    def interval(self, field: str) -> tuple[float, float, float]:
        """(mean, low, high) of `field` over the seeds (stats.mean_interval)."""
        return stats.mean_interval([r.get(field) for r in self.runs])

    def text(self, field: str) -> str:
        """The field's mean, with its interval where there are several seeds.

        An example is "1.93 [1.9, 1.96]".
        """
        mean, lo, hi = self.interval(field)
        if self.seeds < 2 or mean != mean:
            return fmt(mean)
        return f"{fmt(mean)} [{fmt(lo)}, {fmt(hi)}]"


def group(summaries: list[dict[str, Any]]) -> list[Setting]:
    """Run summaries grouped by their `setting` (a run without one is its own setting)."""
    out: dict[str, Setting] = {}
    for s in summaries:
        name = s.get("setting") or s["run"]
        out.setdefault(name, Setting(name, [])).runs.append(s)
    return list(out.values())


def differs(a: Setting, b: Setting, field: str) -> bool:
    """Whether two settings' intervals of `field` do not overlap (never with one seed)."""
    if a.seeds < 2 or b.seeds < 2:
        return False
    _, a_lo, a_hi = a.interval(field)
    _, b_lo, b_hi = b.interval(field)
    return a_hi < b_lo or b_hi < a_lo


def balancing(s: dict[str, Any]) -> str:
    """How a token-choice run was balanced in training.

    The answer is an aux loss, the loss-free routing bias (Wang et al. 2024), both, or none.
    The aux loss is per routing group or over the batch.
    """
    parts = []
    if s.get("router_bias_update_rate"):
        parts.append("loss-free bias")
    if s.get("aux_loss_weight"):
        scope = "over the batch" if s.get("aux_loss_scope") == "batch" else "per group"
        parts.append(f"aux {scope}")
    return " + ".join(parts) or "none"
