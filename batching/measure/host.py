"""How busy the host was while a pass ran, from what the kernel counts (Linux /proc/stat).

A pass that ran while other processes (or, in a VM, the hypervisor: `steal`) took the CPUs
is slower for reasons that are not the model's. The share of the host's CPU time that was
not this process's, over a pass, says so on the row: `pass_host_busy`. Elsewhere (no
/proc/stat) it is None.
"""

import os
import time

STAT = "/proc/stat"
# /proc/stat counts in USER_HZ ticks (100 per second on Linux, sysconf(SC_CLK_TCK)).
TICKS_PER_S = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _busy_s() -> float | None:
    """CPU seconds the host spent busy since boot (all CPUs): every column of /proc/stat's
    `cpu` line but idle and iowait; steal (another guest on the hypervisor) counts as busy."""
    try:
        with open(STAT) as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    ticks = [int(x) for x in fields[1:9]]  # user nice system idle iowait irq softirq steal
    return (sum(ticks) - ticks[3] - ticks[4]) / TICKS_PER_S


class Window:
    """A stretch of time (a pass) over which the host's busy share is read."""

    def __init__(self):
        self.wall0 = time.perf_counter()
        self.own0 = time.process_time()
        self.busy0 = _busy_s()

    def others_share(self) -> float | None:
        """The share of the host's CPU time since the window opened that went to other
        processes or the hypervisor: (host busy − this process) / (wall · CPUs), in [0, 1];
        None where the kernel does not say. Ticks are 10 ms: a short window reads coarsely."""
        busy = _busy_s()
        if busy is None or self.busy0 is None:
            return None
        wall = time.perf_counter() - self.wall0
        cpus = os.cpu_count() or 1
        if wall <= 0:
            return None
        others = (busy - self.busy0) - (time.process_time() - self.own0)
        return min(max(others / (wall * cpus), 0.0), 1.0)
