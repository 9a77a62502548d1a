"""The process log: level, format, and how loud the libraries may be.

At ``INFO`` an idle node used to write 8 lines a second (APScheduler's "Running job" and "Job
... executed successfully" for every 0.25 s tick: about 690,000 lines a day), and Alembic,
highdicom and pynetdicom added their own chatter. The libraries' loggers are therefore held at
``WARNING`` unless ``log_level = "DEBUG"``, where everything is shown; the node's own loggers
(``worker.*``) follow ``log_level``.

APScheduler also warns "skipped: maximum number of running instances reached" at every tick that
finds the previous batch still running; in continuous mode that is the design (runs never
overlap, worker/scheduler.py), not a problem, so below DEBUG those records are dropped.

``log_format = "json"`` writes one JSON object per line (``ts``, ``level``, ``logger``,
``message``, and ``exc`` with the traceback when there is one), for journald and log shippers.
Like every log line, they carry UIDs and never patient names or IDs.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys

__all__ = ["LIBRARY_LOGGERS", "JsonFormatter", "configure"]

#: Loggers of libraries, held at WARNING unless the level is DEBUG. (SQLAlchemy holds its own at
#: WARNING by default; its SQL echo stays off at DEBUG too.)
LIBRARY_LOGGERS = ("apscheduler", "alembic", "highdicom", "pynetdicom", "pydicom", "PIL", "openvino")
#: The levels the library loggers had before we quietened them (restored at DEBUG).
_QUIETENED: dict[str, int] = {}

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False, default=str)


class _DropOverlapSkips(logging.Filter):
    """Drops APScheduler's "maximum number of running instances reached" (a batch still running)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "maximum number of running instances reached" not in str(record.msg)


_OVERLAP_FILTER = _DropOverlapSkips()


def configure(level: str, fmt: str = "text") -> None:
    """Set up the root logger on stderr; libraries at WARNING unless ``level`` is DEBUG.

    Like :func:`logging.basicConfig`, this does nothing when the root logger already has
    handlers of someone else (a host application, pytest's log capture); a second call replaces
    the handler of the first.
    """
    level = level.upper()
    root = logging.getLogger()
    if any(not getattr(h, "_cxr_triage", False) for h in root.handlers):
        return
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler._cxr_triage = True  # type: ignore[attr-defined]
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root.addHandler(handler)
    root.setLevel(level)
    quiet = level != "DEBUG"
    scheduler_log = logging.getLogger("apscheduler.scheduler")
    scheduler_log.removeFilter(_OVERLAP_FILTER)
    if quiet:
        scheduler_log.addFilter(_OVERLAP_FILTER)
    for name in LIBRARY_LOGGERS:
        lib = logging.getLogger(name)
        if quiet and logging.getLevelName(level) < logging.WARNING:
            _QUIETENED.setdefault(name, lib.level)
            lib.setLevel(logging.WARNING)
        elif name in _QUIETENED:
            lib.setLevel(_QUIETENED.pop(name))
