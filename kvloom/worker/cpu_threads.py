"""How many CPU threads a step uses, chosen from what the machine offers while it runs.

Every CPU step is OpenMP regions with barriers between kernels (60+ per decode step). When another
process keeps the cores busy, one of kvloom's threads is often descheduled and its partner waits at the
next barrier for a whole time slice, again and again: `kvloom generate` fell from 104 to 1.6 tok/s beside
a 2-thread matmul on 2 cores. Measured on that machine (bench/contention.py, best of 2, tok/s alone /
contended): 2 threads 97-101 / 1.6-58 (bimodal: it depends on where the scheduler puts the threads), a
10000 or 30000 spin count (GOMP_SPINCOUNT) 90-105 / 6-62 (as erratic), OMP_WAIT_POLICY=PASSIVE 38-39 /
47-58, one thread 57 / 40-45. Barriers are the trouble and only one thread has none, so:

``ThreadGovernor`` reads, every half second of steps, how much CPU time the machine's other processes
took on the CPUs this process may use (/proc/stat, minus this process's own time): with ``others`` cores'
worth busy, steps use ``cpus - round(others)`` threads (at least 1, at most the configured count). The
reading does not depend on kvloom's own speed, so it neither probes nor oscillates: beside a 2-thread job
kvloom's one thread leaves it more than a core and the reading stays above 0.5. Alone, nothing changes.
An explicit ``num_threads`` is kept as given (no governor).
"""

from __future__ import annotations

import os
import time

import torch

from kvloom.logger import init_logger

logger = init_logger(__name__)

WINDOW_S = 0.5  # seconds between readings
_BUSY_FIELDS = (0, 1, 2, 5, 6, 7)  # user nice system irq softirq steal (idle and iowait are not busy)


def _cpu_busy_seconds(cpus: set[int], tick: float) -> float | None:
    """Busy CPU-seconds so far of ``cpus`` (all processes), or None without /proc/stat."""
    try:
        with open("/proc/stat") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    busy = 0
    for line in lines:
        name, _, rest = line.partition(" ")
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            fields = rest.split()
            busy += sum(int(fields[i]) for i in _BUSY_FIELDS if i < len(fields))
    return busy * tick


def _own_seconds() -> float:
    t = os.times()
    return t.user + t.system


class ThreadGovernor:
    """Called once per step on the engine thread; sets torch's (and so the kernels') thread count."""

    def __init__(self, max_threads: int) -> None:
        self.max_threads = self.threads = max_threads
        self.cpus = os.sched_getaffinity(0)
        self._tick = 1.0 / os.sysconf("SC_CLK_TCK")
        self._last: tuple[float, float, float] | None = None  # (wall, machine busy, own)
        self.others = 0.0  # cores' worth of CPU the other processes used in the last window

    @classmethod
    def create(cls, device: str, num_threads: int | None) -> ThreadGovernor | None:
        """A governor for CPU engines without an explicit thread count, where /proc/stat exists."""
        if device != "cpu" or num_threads is not None or not hasattr(os, "sched_getaffinity"):
            return None
        gov = cls(torch.get_num_threads())
        if gov.max_threads < 2 or _cpu_busy_seconds(gov.cpus, gov._tick) is None:
            return None
        return gov

    def describe(self) -> str:
        return f"up to {self.max_threads} threads, fewer while other processes keep the CPUs busy"

    def step(self) -> None:
        now = time.monotonic()
        if self._last is not None and now - self._last[0] < WINDOW_S:
            return
        busy, own = _cpu_busy_seconds(self.cpus, self._tick), _own_seconds()
        if busy is None:
            return
        if self._last is not None:
            wall, busy0, own0 = self._last
            self.others = max(0.0, (busy - busy0) - (own - own0)) / (now - wall)
            self._set(self.wanted(self.others))
        self._last = (now, busy, own)

    def wanted(self, others: float) -> int:
        return max(1, min(self.max_threads, len(self.cpus) - round(others)))

    def _set(self, threads: int) -> None:
        if threads == self.threads:
            return
        logger.info(
            "Other processes used %.1f of %d CPUs: steps now run on %d thread%s (was %d)",
            self.others,
            len(self.cpus),
            threads,
            "" if threads == 1 else "s",
            self.threads,
        )
        torch.set_num_threads(threads)
        self.threads = threads
