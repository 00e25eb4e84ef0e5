"""Where training's curves go: a Log, and the routing statistics written to it.

The lab's TensorBoard writer hands training a batching.outputs.tensorboard.EventLog.
"""

from typing import Any, Protocol

import numpy as np

from models.routers import SCALAR_STATS

Stats = dict[str, Any]


class Log(Protocol):
    """Where training's curves go (batching.outputs.tensorboard.EventLog)."""

    def scalar(self, tag: str, value: float, step: int) -> None:
        """One scalar at training step `step`."""
        ...

    def histogram(self, tag: str, values: np.ndarray, step: int) -> None:
        """One histogram of `values` at `step`."""
        ...

    def text(self, tag: str, text: str, step: int) -> None:
        """Markdown text at `step`."""
        ...

    def close(self) -> None:
        """Flushes and closes the log."""
        ...


class NoLog:
    """Curves nowhere: a training run without TensorBoard."""

    def scalar(self, tag: str, value: float, step: int) -> None:
        """Writes nothing."""
        del tag, value, step

    def histogram(self, tag: str, values: np.ndarray, step: int) -> None:
        """Writes nothing."""
        del tag, values, step

    def text(self, tag: str, text: str, step: int) -> None:
        """Writes nothing."""
        del tag, text, step

    def close(self) -> None:
        """Nothing to close."""
        pass


# TensorBoard.


def write_routing(
    log: Log,
    prefix: str,
    stats: list[Stats],
    layers: tuple[int, ...],
    step: int,
    router: str,
) -> None:
    """Writes one step's routing statistics to the log.

    Scalars go to `<prefix>moe/<stat>`, the mean over layers. Each layer's go to
    `<prefix>moe/layer_<i>/<stat>`. Histograms hold tokens per expert, over all layers and
    per layer. Expert choice also gets a histogram of experts per token.
    """
    if not stats:
        return
    for key in SCALAR_STATS:
        values = [float(s[key]) for s in stats]
        log.scalar(f"{prefix}moe/{key}", float(np.mean(values)), step)
        for layer, value in zip(layers, values, strict=True):
            log.scalar(f"{prefix}moe/layer_{layer}/{key}", value, step)
    loads = [np.asarray(s["tokens_per_expert"], np.float64) for s in stats]
    log.histogram(f"{prefix}moe/tokens_per_expert", np.concatenate(loads), step)
    for layer, load in zip(layers, loads, strict=True):
        log.histogram(f"{prefix}moe/layer_{layer}/tokens_per_expert", load, step)
    if router == "expert_choice":
        experts = np.concatenate([np.asarray(s["experts_per_token"], np.float64) for s in stats])
        log.histogram(f"{prefix}moe/experts_per_token", experts, step)
