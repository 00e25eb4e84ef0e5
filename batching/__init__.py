"""The batching lab: timing, sweeps, roofline analysis and writers.

From Python: `batching.sweep_model` and `batching.predict_model` (batching.api) sweep and
predict a model of your own; `batching.family` makes a Family of a factory for the command
line. They load JAX on first use, so the command line checks its flags before JAX loads.
"""

from batching.setup.specs import critical_batch_size

__all__ = [
    "critical_batch_size", "family", "predict_model", "sweep_model", "Family", "SweepResult",
]  # fmt: skip


def __getattr__(name: str):
    if name in ("sweep_model", "predict_model", "SweepResult"):
        from batching import api

        return getattr(api, name)
    if name == "family":
        from batching.workloads import user

        return user.family
    if name == "Family":
        from batching.workloads.family import Family

        return Family
    raise AttributeError(f"module 'batching' has no attribute {name!r}")
