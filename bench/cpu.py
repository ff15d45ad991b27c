"""CPU time of the benchmark's processes and of the machine, read from ``/proc`` (Linux).

Elsewhere every reading is ``None``: the report then shows "-" instead of a figure.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    """``/proc/<pid>/stat`` after the command name (which may hold spaces and parentheses)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None


def process_cpu_seconds(pid: int) -> float | None:
    """CPU seconds one process (every live thread) has used so far.

    From each thread's ``schedstat`` (nanoseconds) where the kernel keeps it, else from
    ``stat`` (clock ticks, 10 ms: too coarse for a sink's share of a short run).
    """
    try:
        tasks = Path(f"/proc/{pid}/task").iterdir()
        nanoseconds = sum(int(t.joinpath("schedstat").read_text().split()[0]) for t in tasks)
        return nanoseconds / 1e9
    except (OSError, ValueError, IndexError):
        pass
    fields = _stat_fields(pid)
    if fields is None:
        return None
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def tree_cpu_seconds(pid: int) -> float | None:
    """CPU seconds of a process, its live descendants, and the children each has reaped.

    For a server that forks workers (Postfix's master): the workers that ended were reaped
    by their parent and count in its children's time; those still running count themselves.
    """
    parents: dict[int, int] = {}
    ticks: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is None:
            continue  # ended while we looked
        parents[int(entry.name)] = int(fields[1])
        ticks[int(entry.name)] = sum(int(value) for value in fields[11:15])
    if pid not in ticks:
        return None
    family, grew = {pid}, True
    while grew:
        grew = False
        for child, parent in parents.items():
            if parent in family and child not in family:
                family.add(child)
                grew = True
    total = sum(ticks[member] for member in family)
    return total / CLOCK_TICKS


def own_cpu_seconds() -> float:
    """CPU seconds of this process (every thread) and of the children it has waited for."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class BackgroundLoad:
    """How much CPU processes other than the benchmark's used while it ran."""

    def __init__(self, sink_cpu: Callable[[], float | None]) -> None:
        self._read_sink = sink_cpu
        self.start = self._sample()

    def _sample(self) -> tuple[float, float, float] | None:
        try:
            fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        except OSError:
            return None
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
        busy = (user + nice + system + irq + softirq + steal) / CLOCK_TICKS
        return busy, own_cpu_seconds() + (self._read_sink() or 0.0), time.monotonic()

    def background_cores(self) -> float | None:
        end = self._sample()
        if self.start is None or end is None:
            return None
        busy, ours, wall = (b - a for a, b in zip(self.start, end, strict=True))
        return round(max(busy - ours, 0.0) / wall, 2) if wall > 0 else None
