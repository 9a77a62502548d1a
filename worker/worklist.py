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
from dataclasses import dataclass
from typing import Any

from sqlalchemy import case, select

from worker import jobs
from worker.priority import PRIORITIES


@dataclass(frozen=True)
class Filters:
    """What to select; every field optional (``None`` / empty = no condition)."""

    states: Sequence[str] = ()
    predicted_class: str | None = None
    priority: str | None = None
    min_probability: float | None = None
    since: dt.datetime | None = None
    until: dt.datetime | None = None
    study: str | None = None
    accession: str | None = None
    limit: int = 1000


def send_state(deliveries: Sequence[dict[str, Any]]) -> str | None:
    """One word for all deliveries of an image: the worst of send_failed, pending_send, sent."""
    states = {d["state"] for d in deliveries}
    if not states:
        return None
    return "send_failed" if "send_failed" in states else "pending_send" if "pending_send" in states else "sent"


def rows(db: jobs.Database, f: Filters, *, order: str = "arrival") -> list[dict[str, Any]]:
    """The stable JSON shape of ``query --format json``: ``Instance.as_dict()`` plus
    ``deliveries`` and ``send_state``; ``order`` is ``"arrival"`` (id) or ``"worklist"``."""
    Inst = jobs.Instance
    stmt = select(Inst)
    if f.states:
        stmt = stmt.where(Inst.state.in_(list(f.states)))
    if f.predicted_class:
        stmt = stmt.where(Inst.predicted_class == f.predicted_class)
    if f.priority:
        stmt = stmt.where(Inst.priority == f.priority)
    if f.min_probability is not None:
        stmt = stmt.where(Inst.top_probability >= f.min_probability)
    if f.since:
        stmt = stmt.where(Inst.received_at >= f.since)
    if f.until:
        stmt = stmt.where(Inst.received_at < f.until)
    if f.study:
        stmt = stmt.where(Inst.study_instance_uid == f.study)
    if f.accession:
        stmt = stmt.where(Inst.accession_number == f.accession)
    if order == "worklist":
        rank = case({p: i for i, p in enumerate(PRIORITIES)}, value=Inst.priority, else_=len(PRIORITIES))
        screened = case((Inst.state == jobs.State.DONE.value, 0), else_=1)
        stmt = stmt.order_by(screened, rank, Inst.top_probability.desc().nulls_last(), Inst.received_at, Inst.id)
    else:
        stmt = stmt.order_by(Inst.id)
    if f.limit:
        stmt = stmt.limit(f.limit)
    with db.sessions() as s:
        found = list(s.scalars(stmt))
    out = [row.as_dict() for row in found]
    sends = jobs.deliveries_of(db, [r.id for r in found])
    for row, d in zip(found, out, strict=True):
        d["deliveries"] = sends.get(row.id, [])
        d["send_state"] = send_state(d["deliveries"])
    return out


def events(db: jobs.Database, *, since: dt.datetime | None = None, until: dt.datetime | None = None,
           limit: int = 1000, newest_first: bool = False) -> list[dict[str, Any]]:
    """Intake events (refusals, re-sends) as ``query --events`` prints them."""
    E = jobs.IntakeEvent
    stmt = select(E).order_by(E.id.desc() if newest_first else E.id)
    if since:
        stmt = stmt.where(E.at >= since)
    if until:
        stmt = stmt.where(E.at < until)
    if limit:
        stmt = stmt.limit(limit)
    with db.sessions() as s:
        return [e.as_dict() for e in s.scalars(stmt)]
