"""How busy the whole machine was during a job (every CPU, fio and the kernel included), from
/proc/stat: so a run shows whether a target left a core idle (issue 21)."""

from __future__ import annotations

__all__ = ["CpuTimes", "cpu_times", "parse_cpu_line", "busy_fraction"]

#: (busy, total) clock ticks of all CPUs since boot
CpuTimes = tuple[int, int]


def parse_cpu_line(line: str) -> CpuTimes:
    """The aggregate "cpu" line of /proc/stat (user nice system idle iowait irq softirq steal
    guest guest_nice, in clock ticks): idle and iowait are not busy; guest time is already in
    user and nice, so it is not counted twice."""
    fields = line.split()
    if not fields or fields[0] != "cpu":
        raise ValueError(f"not /proc/stat's aggregate cpu line: {line!r}")
    ticks = [int(x) for x in fields[1:9]]  # up to steal; guest and guest_nice are in user/nice
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
    total = sum(ticks)
    return total - idle, total


def cpu_times(path: str = "/proc/stat") -> CpuTimes:
    with open(path) as f:
        return parse_cpu_line(f.readline())


def busy_fraction(before: CpuTimes, after: CpuTimes) -> float:
    """The share of all CPUs' time that was busy between two readings (0..1)."""
    busy = after[0] - before[0]
    total = after[1] - before[1]
    return busy / total if total > 0 else 0.0
