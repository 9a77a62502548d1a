"""The audit trail: one JSON object per line, UIDs and timings only.

What a hospital's security team asks of a node on the imaging network (IHE ATNA's questions,
without its syslog transport): who associated, what was received, what was produced and sent,
and when the configuration or the model changed. Patient names, IDs and birth dates are never
written here (nor to the ordinary log): only UIDs, AE titles, addresses, statuses and timings.

Each line: ``{"ts": ISO-8601 UTC, "event": name, ...fields}``. Events: ``node_started``,
``node_stopped``, ``config_changed``, ``model_changed``, ``association_accepted``,
``association_rejected``, ``association_released``, ``object_received``, ``object_refused``,
``object_resent``, ``object_ignored``, ``leases_reclaimed``, ``object_purged``, ``rows_pruned``,
``purge_finished``, ``rescreen_requested``, ``job_finished``, ``result_produced``, ``result_sent``,
``result_send_failed``.

Lines are appended with ``O_APPEND`` (atomic for lines this short on POSIX) and flushed; several
processes may write the same file.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: Data set keywords whose values must never reach a log or the audit trail.
IDENTIFYING_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate", "OtherPatientIDs", "OtherPatientNames")


class AuditLog:
    """Append-only JSON-lines audit file; a disabled log (path None) records nothing."""

    def __init__(self, path: str | os.PathLike[str] | None) -> None:
        self.path = Path(path) if path is not None else None
        self._lock = threading.Lock()
        self._fd: int | None = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def record(self, event: str, **fields: Any) -> None:
        """Append one event; never raises (auditing must not break intake)."""
        if self._fd is None:
            return
        doc = {"ts": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
               "event": event}
        doc.update({k: v for k, v in fields.items() if v is not None})
        line = (json.dumps(doc, separators=(",", ":"), default=str) + "\n").encode()
        try:
            with self._lock:
                os.write(self._fd, line)
        except OSError:
            log.exception("could not write the audit log")

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def last(self, event: str) -> dict[str, Any] | None:
        """The most recent event of a kind (for change detection at start)."""
        if self.path is None or not self.path.exists():
            return None
        found = None
        with self.path.open("rb") as fh:
            for raw in fh:
                try:
                    doc = json.loads(raw)
                except ValueError:
                    continue
                if doc.get("event") == event:
                    found = doc
        return found


#: An audit log that records nothing (the default for code paths used without a node).
NULL = AuditLog(None)


def fingerprint(value: Any) -> str:
    """sha256 of a JSON rendering: tells that something changed without writing secrets."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()
