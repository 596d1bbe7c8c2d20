"""CPU time per process while a load runs: where the cost of a call goes.

`CpuMeter` reads user + system CPU time from /proc (Linux) for named groups of
processes at `start()` and at `stop()`, and the whole machine's busy time from
/proc/stat, so a run can report microseconds of CPU per call for each process
and how much of the machine everything else used meanwhile (other work on a
shared machine shows up there, and makes throughput figures move).
Where /proc is missing every figure is simply absent.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

_PROC = Path("/proc")
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

# Name of the machine-wide figure in `CpuMeter.seconds`.
MACHINE = "machine"
PidSource = Callable[[], Iterable[int]]


def process_seconds(pid: int) -> float | None:
    """User + system CPU seconds of ``pid`` (all its threads), None if it is gone."""
    try:
        stat = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces; the fields after it do not.
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def machine_busy_seconds() -> float | None:
    """CPU seconds all cores spent not idle since boot, None without /proc."""
    try:
        values = [int(v) for v in (_PROC / "stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return (sum(values) - idle) / _TICK


def pids_named(name: str) -> list[int]:
    """Processes whose command name is ``name`` (e.g. every Postgres backend)."""
    found = []
    for entry in _PROC.glob("[0-9]*"):
        try:
            if (entry / "comm").read_text().strip() == name:
                found.append(int(entry.name))
        except OSError:
            continue
    return found


class CpuMeter:
    """CPU seconds used by each group of processes between `start` and `stop`.

    ``groups`` maps a name to a function listing the group's pids; it is asked
    at both ends, so processes that come and go (Postgres backends) count
    while they live, and a process that ended counts only up to its last sample.
    """

    def __init__(self, groups: Mapping[str, PidSource]) -> None:
        self._groups = dict(groups)
        self._start: dict[str, dict[int, float]] = {}
        self._stop: dict[str, dict[int, float]] = {}
        self._machine: list[float | None] = []

    def start(self) -> None:
        self._start = self._sample()
        self._machine = [machine_busy_seconds()]

    def stop(self) -> None:
        self._stop = self._sample()
        self._machine.append(machine_busy_seconds())

    def seconds(self) -> dict[str, float]:
        """CPU seconds per group (and `MACHINE`: all cores, busy time) in the window."""
        used = {}
        for name, before in self._start.items():
            after = self._stop.get(name, {})
            used[name] = sum(after[pid] - before.get(pid, 0.0) for pid in after)
        if len(self._machine) == 2 and None not in self._machine:
            first, last = self._machine
            assert first is not None and last is not None
            used[MACHINE] = last - first
        return used

    def _sample(self) -> dict[str, dict[int, float]]:
        sample: dict[str, dict[int, float]] = {}
        for name, pids in self._groups.items():
            seconds = {pid: process_seconds(pid) for pid in pids()}
            sample[name] = {pid: s for pid, s in seconds.items() if s is not None}
        return sample
