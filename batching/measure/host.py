"""How busy the host was while a pass ran, from the kernel's counts (Linux /proc/stat).

Other processes may take the CPUs while a pass runs. In a VM the hypervisor may take them too
(`steal`). The pass is then slower for reasons that are not the model's. The row says so in
`pass_host_busy`. It is the share of the host's CPU time that others took. Without /proc/stat it
is None.
"""

import os
import time

STAT = "/proc/stat"
# /proc/stat counts in USER_HZ ticks (100 per second on Linux, sysconf(SC_CLK_TCK)).
TICKS_PER_S = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _busy_s() -> float | None:
    """CPU seconds the host spent busy since boot, over all CPUs.

    It sums the `cpu` line of /proc/stat, but for idle and iowait. Steal counts as busy. That is
    time another guest on the hypervisor took. None where /proc/stat cannot be read.
    """
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
        """The share of the host's CPU time that others took since the window opened.

        Others are other processes and the hypervisor.

        The share is (host busy − own) / (wall · CPUs). It is clipped to [0, 1]. It is None
        where the kernel does not say. The counters tick TICKS_PER_S times a second. So a short
        window reads coarsely.
        """
        busy = _busy_s()
        if busy is None or self.busy0 is None:
            return None
        wall = time.perf_counter() - self.wall0
        cpus = os.cpu_count() or 1
        if wall <= 0:
            return None
        others = (busy - self.busy0) - (time.process_time() - self.own0)
        return min(max(others / (wall * cpus), 0.0), 1.0)
