"""The rows of the triage database as people and scripts read them: ``cxr-triage query`` and the
web page's ``/api/studies`` return the same dictionaries.

Worklist order (the page and ``/api/studies``): screened images by priority (urgent, high,
routine), then by score (the probability of the predicted class, highest first), then by waiting
time (received first); images not screened yet (queued, running, skipped, failed) after them,
oldest first.  ``query`` keeps the order of arrival.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

from worker import store
from worker.store.queries import Filters

__all__ = ["Filters", "events", "rows", "send_state"]


def send_state(deliveries: Sequence[dict[str, Any]]) -> str | None:
    """One word for all deliveries of an image: the worst of send_failed, pending_send, sent."""
    states = {d["state"] for d in deliveries}
    if not states:
        return None
    return "send_failed" if "send_failed" in states else "pending_send" if "pending_send" in states else "sent"


def rows(db: store.Database, f: Filters, *, order: str = "arrival") -> list[dict[str, Any]]:
    """The stable JSON shape of ``query --format json``: ``Instance.as_dict()`` plus
    ``deliveries`` and ``send_state``; ``order`` is ``"arrival"`` (id) or ``"worklist"``."""
    found = store.instances(db, f, order=order)
    out = [row.as_dict() for row in found]
    sends = store.deliveries_of(db, [r.id for r in found])
    for row, d in zip(found, out, strict=True):
        d["deliveries"] = sends.get(row.id, [])
        d["send_state"] = send_state(d["deliveries"])
    return out


def events(db: store.Database, *, since: dt.datetime | None = None, until: dt.datetime | None = None,
           limit: int = 1000, newest_first: bool = False) -> list[dict[str, Any]]:
    """Intake events (refusals, re-sends) as ``query --events`` prints them."""
    return store.intake_events(db, since=since, until=until, limit=limit, newest_first=newest_first)
