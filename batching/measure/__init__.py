"""Measuring, the third floor of the lab.

It holds the timer and one point's visit. It holds the statistics of samples. It holds the
microbenchmarks (peaks, per-shape rates, collectives) and their cache. The analysis receives
them as a rate source. The profiler trace is read back here, per op kind.
"""
