"""The batching lab: timing, sweeps, roofline analysis and writers."""

from batching.setup.specs import critical_batch_size

__all__ = ["critical_batch_size"]
