"""Replicates of a run's point latencies.

They give the interval of anything computed from several points. The knee and a log-log
slope are examples. A replicate draws whole passes by pass index
(batching.measure.pass_stats). Every point gets the same draw. A slow spell slowed every
point timed in it. In a replicate those points then move together.

Some rows have one pass per point, as with sweep.passes = 1. They have no spread between
passes to draw from. Their replicates resample the samples within the pass instead. Each
point's value is the median of a resample of its samples. That holds only what moves
between calls, and the replicates say so (`kind` "samples").
"""

import dataclasses
from typing import Any

import numpy as np

from batching.measure import pass_stats


def pass_lists(samples: dict[int, Any]) -> dict[int, list[np.ndarray]]:
    """{batch: [samples of pass 0, of pass 1, ...]} from either that or {batch: samples}."""
    out = {}
    for b, s in samples.items():
        if isinstance(s, np.ndarray) or (len(s) and not hasattr(s[0], "__len__")):
            s = [s]
        out[int(b)] = [np.asarray(p, np.float64) for p in s if len(p)]
    return out


@dataclasses.dataclass(frozen=True)
class Replicates:
    """A run's replicates of its point latencies.

    - `latency_s` (R, points): each replicate's latency at every point of `batch_sizes`. A
      column is nan where its point had no samples.
    - `kind`: "passes" when whole passes were drawn. It is "samples" when samples within
      each point's one pass were drawn. It is None when there was nothing to draw from.
    """

    latency_s: np.ndarray | None
    kind: str | None
    batch_sizes: tuple[int, ...] = ()

    def at(self, sizes: list[int], scale: dict[int, float] | None = None) -> np.ndarray | None:
        """The replicates of the points `sizes`, with columns in that order.

        Each column is multiplied by `scale[b]`. Every estimator here is scale-equivariant. So
        this draws a curve other than the measured one, with the measurement's spread.
        """
        if self.latency_s is None:
            return None
        scale = scale or {}
        cols = [self.batch_sizes.index(b) for b in sizes]
        return self.latency_s[:, cols] * np.array([scale.get(b, 1.0) for b in sizes])


# Rows that record no estimator: the median of every sample of the point, pooled.
POOLED = "pooled"


def estimator_of(rows: list[dict[str, Any]]) -> str:
    """The estimator the rows' latencies were made with (timing.estimator).

    It is POOLED for rows that do not record one.
    """
    return (rows[0].get("estimator") or POOLED) if rows else POOLED


# Replicates drawn from the samples of one pass. A within-pass interval, labelled so, needs
# fewer than the pass bootstrap's stable tails. Each costs a median of every sample.
SAMPLE_REPLICATES = 200


def draw(
    batch_sizes: list[int], samples: dict[int, Any], estimator: str, replicates: int, seed: int = 0
) -> Replicates:
    """R replicates of the points `batch_sizes` from their samples per pass.

    R is at most SAMPLE_REPLICATES when each point has one pass. Points without samples have
    no spread. They are left out of the draw, and their column is nan.
    """
    passes = pass_lists(samples)
    sizes = tuple(int(b) for b in batch_sizes)
    lists = [passes.get(b, []) for b in sizes]
    if replicates <= 0 or not any(lists):
        return Replicates(None, None, sizes)
    out = np.full((replicates, len(sizes)), np.nan)
    if all(len(p) >= 2 for p in lists if p):
        weights = pass_stats.poisson_weights(max(len(p) for p in lists), replicates, seed)
        have = [j for j, p in enumerate(lists) if p]
        if estimator == POOLED:
            for j in have:
                out[:, j] = _pooled_medians(lists[j], weights[:, : len(lists[j])])
        else:
            medians = [np.array([np.median(s) for s in lists[j]]) for j in have]
            out[:, have] = pass_stats.replicate_estimates(medians, estimator, weights, seed)
        return Replicates(out, "passes", sizes)
    replicates = min(replicates, SAMPLE_REPLICATES)
    out = out[:replicates]
    rng = np.random.default_rng(seed)
    for j, p in enumerate(lists):
        if p:
            s = np.concatenate(p)
            step = max(1, CHUNK // s.size)  # replicates per draw: bounded memory
            for r in range(0, replicates, step):
                k = min(step, replicates - r)
                out[r : r + k, j] = np.median(s[rng.integers(0, s.size, (k, s.size))], axis=1)
    return Replicates(out, "samples", sizes)


CHUNK = 1 << 21  # samples drawn at once when resampling within a pass


def _pooled_medians(passes: list[np.ndarray], weights: np.ndarray) -> np.ndarray:
    """Each replicate's median of the point's samples, pooled.

    Replicate r counts every sample of pass i weights[r, i] times. A replicate that draws
    none of the passes counts them all once.
    """
    values = np.concatenate(passes)
    index = np.concatenate([np.full(len(p), i) for i, p in enumerate(passes)])
    order = np.argsort(values)
    w = weights.copy()
    w[w.sum(axis=1) == 0] = 1.0
    return pass_stats.estimate(values[order], "median", w[:, index[order]])
