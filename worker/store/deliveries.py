"""Deliveries: one row per result object (or message) and destination, leased to one sender at a
time, with retries and their reasons (worker/sender.py sends them).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    func,
    select,
    update,
)

from worker.store.db import Database
from worker.store.schema import Delivery, Instance, SendState, utcnow

# --------------------------------------------------------------------------- deliveries


@dataclass(frozen=True)
class DeliveryClaim:
    """A delivery handed to a sender; ``attempts`` counts this attempt."""

    id: int
    destination: str
    kind: str
    sop_class_uid: str
    sop_instance_uid: str
    path: str
    attempts: int


def claim_deliveries(
    db: Database, n: int, lease_seconds: int, now: dt.datetime | None = None, only: Sequence[int] | None = None
) -> list[DeliveryClaim]:
    """Take up to ``n`` due deliveries (one transaction, SKIP LOCKED on PostgreSQL)."""
    now = now or utcnow()
    with db.sessions.begin() as s:
        stmt = (
            select(Delivery.id)
            .where(Delivery.state == SendState.PENDING.value, Delivery.next_attempt_at <= now)
            .order_by(Delivery.next_attempt_at, Delivery.id)
            .limit(n)
            .with_for_update(skip_locked=True)
        )
        if only is not None:
            stmt = stmt.where(Delivery.id.in_(list(only)))
        ids = list(s.scalars(stmt))
        if not ids:
            return []
        s.execute(
            update(Delivery)
            .where(Delivery.id.in_(ids))
            .values(next_attempt_at=now + dt.timedelta(seconds=lease_seconds), attempts=Delivery.attempts + 1)
        )
        rows = s.scalars(select(Delivery).where(Delivery.id.in_(ids)).order_by(Delivery.id)).all()
        return [
            DeliveryClaim(r.id, r.destination, r.kind, r.sop_class_uid, r.sop_instance_uid, r.path, r.attempts)
            for r in rows
        ]


def mark_sent(db: Database, delivery_id: int, status: int | None, now: dt.datetime | None = None) -> None:
    """A destination accepted the object (success, or warning 0xB000/0xB006/0xB007)."""
    with db.sessions.begin() as s:
        row = s.get(Delivery, delivery_id)
        if row is not None:
            row.state, row.last_status, row.sent_at, row.last_error = (
                SendState.SENT.value,
                status,
                now or utcnow(),
                None,
            )


def mark_retry(
    db: Database,
    delivery_id: int,
    *,
    status: int | None,
    error: str,
    delay_seconds: float,
    max_attempts: int,
    now: dt.datetime | None = None,
) -> str:
    """A send failed: schedule the next attempt, or ``send_failed`` after ``max_attempts``."""
    now = now or utcnow()
    with db.sessions.begin() as s:
        row = s.get(Delivery, delivery_id)
        if row is None:
            return "gone"
        row.last_status, row.last_error = status, error
        if row.attempts >= max_attempts:
            row.state = SendState.FAILED.value
        else:
            row.next_attempt_at = now + dt.timedelta(seconds=delay_seconds)
        return row.state


def resend(db: Database, *, sop_instance_uid: str | None = None, destination: str | None = None) -> int:
    """Put ``send_failed`` deliveries back to pending with fresh attempts; returns how many.

    ``sop_instance_uid`` may name the source image or the result object.
    """
    now = utcnow()
    with db.sessions.begin() as s:
        stmt = select(Delivery).where(Delivery.state == SendState.FAILED.value)
        if destination:
            stmt = stmt.where(Delivery.destination == destination)
        if sop_instance_uid:
            source_ids = select(Instance.id).where(Instance.sop_instance_uid == sop_instance_uid)
            stmt = stmt.where((Delivery.sop_instance_uid == sop_instance_uid) | Delivery.instance_id.in_(source_ids))
        rows = list(s.scalars(stmt))
        for row in rows:
            row.state, row.attempts, row.next_attempt_at = SendState.PENDING.value, 0, now
        return len(rows)


def deliveries_of(db: Database, instance_ids: Sequence[int]) -> dict[int, list[dict[str, Any]]]:
    """Delivery summaries per instance id (for ``query``)."""
    out: dict[int, list[dict[str, Any]]] = {}
    if not instance_ids:
        return out
    with db.sessions() as s:
        for row in s.scalars(
            select(Delivery).where(Delivery.instance_id.in_(list(instance_ids))).order_by(Delivery.id)
        ):
            out.setdefault(row.instance_id, []).append(row.as_dict())
    return out


def delivery_counts(db: Database) -> dict[str, int]:
    """Number of deliveries per state."""
    with db.sessions() as s:
        return {st: n for st, n in s.execute(select(Delivery.state, func.count()).group_by(Delivery.state)).all()}
