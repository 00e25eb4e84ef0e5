"""The batching lab: timing, sweeps, roofline analysis and writers."""

from batching.hardware import critical_batch_size

__all__ = ["critical_batch_size"]
