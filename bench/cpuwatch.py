"""CPU time of a set of processes over a wall-clock window, sampled from /proc (bench/e2e.py).

A sampler thread reads ``utime + stime`` of each watched process (``/proc/PID/stat``, clock ticks)
and of the whole machine (``/proc/stat``) every ``step`` seconds, with the wall time of each
sample.  :meth:`CpuWatch.cpu_seconds` then gives the CPU seconds a process spent between two wall
times, interpolated between the samples around them (resolution: the kernel's 10 ms tick and
``step``).  Used to turn a run's measured per-image CPU cost into the throughput the machine's
cores allow: limit = cores / (CPU seconds per image), so that throughput / limit is the share of
the cores the run kept busy.
"""

from __future__ import annotations

import bisect
import os
import threading
import time

_TICK = os.sysconf("SC_CLK_TCK")


def proc_cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process (all its threads), seconds; None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / _TICK


def machine_cpu_seconds() -> float:
    """Busy CPU seconds of the whole machine since boot, all cores: user, nice, system, irq and
    softirq (idle, iowait and steal, time taken by the hypervisor, excluded)."""
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]] + [0] * 8
    return (parts[0] + parts[1] + parts[2] + parts[5] + parts[6]) / _TICK


class CpuWatch:
    """Samples the CPU time of named processes (added while it runs) and of the machine."""

    def __init__(self, step: float = 0.02) -> None:
        self.step = step
        self.pids: dict[str, int] = {}
        self.samples: dict[str, list[tuple[float, float]]] = {"machine": []}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="cpuwatch", daemon=True)

    def watch(self, name: str, pid: int) -> None:
        with self._lock:
            self.pids[name] = pid
            self.samples.setdefault(name, [])

    def start(self) -> CpuWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.time()
            with self._lock:
                self.samples["machine"].append((now, machine_cpu_seconds()))
                for name, pid in self.pids.items():
                    cpu = proc_cpu_seconds(pid)
                    if cpu is not None:
                        self.samples[name].append((now, cpu))
            self._stop.wait(self.step)

    def cpu_seconds(self, name: str, start: float, end: float) -> float:
        """CPU seconds of ``name`` between wall times ``start`` and ``end`` (0 if never seen)."""
        s = self.samples.get(name, [])
        if not s:
            return 0.0
        return max(0.0, _at(s, end) - _at(s, start))


def _at(samples: list[tuple[float, float]], t: float) -> float:
    """The cumulative CPU time at wall time ``t``, linear between samples, clamped at the ends."""
    times = [x[0] for x in samples]
    i = bisect.bisect_left(times, t)
    if i <= 0:
        return samples[0][1]
    if i >= len(samples):
        return samples[-1][1]
    (t0, c0), (t1, c1) = samples[i - 1], samples[i]
    return c0 + (c1 - c0) * (t - t0) / (t1 - t0) if t1 > t0 else c1
