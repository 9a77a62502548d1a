"""Progress of long work (caching, training epochs, evaluation): rate and time left.

A run on two CPU cores takes minutes per epoch, so a person watching (or reading a log later)
needs to see that it moves and when it ends.  :class:`Progress` logs one line at most every
``interval`` seconds and one at the end, each with the count, the rate (items/s) and the time
left; when ``mode`` is ``"auto"`` and stderr is a terminal it shows a tqdm bar instead (when tqdm
is installed).  ``mode="none"`` keeps only the final line at DEBUG level (tests, batch jobs).
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["Progress", "eta"]


def eta(seconds: float) -> str:
    """``1 h 02 min``, ``3 min 05 s`` or ``42 s``."""
    s = max(0, int(round(seconds)))
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    if s >= 60:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s} s"


class Progress:
    """Counts ``update(n)`` calls towards ``total``; see the module docstring."""

    def __init__(self, desc: str, total: int, *, unit: str = "images", mode: str = "auto", interval: float = 30.0):
        self.desc, self.total, self.unit, self.mode, self.interval = desc, int(total), unit, mode, interval
        self.done = 0
        self.t0 = self._last = time.perf_counter()
        self._bar: Any = None
        if mode == "auto" and sys.stderr.isatty():
            try:
                from tqdm.auto import tqdm

                self._bar = tqdm(total=total, desc=desc, unit=unit[:3], leave=False, mininterval=2.0, file=sys.stderr)
            except ImportError:
                pass

    @property
    def rate(self) -> float:
        dt = time.perf_counter() - self.t0
        return self.done / dt if dt > 0 else 0.0

    def line(self) -> str:
        r = self.rate
        left = (self.total - self.done) / r if r > 0 else 0.0
        pct = 100.0 * self.done / self.total if self.total else 100.0
        return f"{self.desc}: {self.done}/{self.total} {self.unit} ({pct:.0f} %), {r:.1f} {self.unit}/s, {eta(left)} left"

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.perf_counter()
        if self.mode != "none" and now - self._last >= self.interval and self.done < self.total:
            self._last = now
            log.info("%s", self.line())

    def close(self) -> float:
        """Log the final line; returns the elapsed seconds."""
        if self._bar is not None:
            self._bar.close()
        dt = time.perf_counter() - self.t0
        msg = f"{self.desc}: {self.done} {self.unit} in {eta(dt)} ({self.rate:.1f} {self.unit}/s)"
        log.log(logging.DEBUG if self.mode == "none" else logging.INFO, "%s", msg)
        return dt
