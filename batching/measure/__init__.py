"""Measuring, the third floor: the timer, one point's visit, the statistics of samples, and
the microbenchmarks (peaks, per-shape rates, collectives) with their cache, handed to the
analysis as a rate source; and the profiler trace read back per op kind."""
