"""A run's device model: its roofs and per-op rates."""

import dataclasses
from typing import Any

from batching.predict import pricing


@dataclasses.dataclass
class DeviceModel:
    """What one run's analysis knows of its device.

    It holds the peaks in use, the per-op rates and the interconnect. The compute
    roof is a ceiling over every measurement of the dtype.
    """

    device: Any
    dtype: str
    precision: str
    peaks: Any  # batching.measure.peaks.MeasuredPeaks
    rates: pricing.Rates
    peak_f: float  # the compute roof, FLOP/s (ceiling)
    peak_source: str  # which measurement set it
    square_f: float  # the square-matmul microbenchmark alone
    bw: float  # streaming DRAM bandwidth, bytes/s
    llc: float  # last-level cache, bytes
    cold: bool  # the run's weights overflow the last-level cache
    comm_bw: Any
    comm_source: str | None

    @property
    def roof_bytes_per_s(self) -> float:
        """The memory roof: DRAM, or the last-level cache if the weights stay there."""
        return self.bw if self.cold else (self.rates.cache_bytes_per_s or self.bw)

    @property
    def ridge(self) -> float:
        """FLOPs per byte where the compute roof meets the memory roof."""
        return self.peak_f / self.roof_bytes_per_s
