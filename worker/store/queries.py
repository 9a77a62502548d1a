"""Read-only queries for status, metrics, the worklist and the demo: counts, the oldest waiting
job, and the rows other modules show (no SQL outside the store).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, case, delete, exists, func, select

from worker.priority import PRIORITIES
from worker.store.db import Database
from worker.store.schema import Delivery, Instance, IntakeEvent, SendState, State, utcnow

# --------------------------------------------------------------------------- queries


def counts(db: Database) -> dict[str, int]:
    """Number of rows per state."""
    with db.sessions() as s:
        rows = s.execute(select(Instance.state, func.count()).group_by(Instance.state)).all()
    return {state: n for state, n in rows}


def priority_counts(db: Database) -> dict[str, int]:
    """Number of screened (``done``) images per triage priority."""
    with db.sessions() as s:
        rows = s.execute(
            select(Instance.priority, func.count())
            .where(Instance.state == State.DONE.value)
            .group_by(Instance.priority)
        ).all()
    return {p: n for p, n in rows if p is not None}


def queued_summary(db: Database, now: dt.datetime | None = None) -> tuple[int, dt.datetime | None]:
    """How many jobs are waiting, and when the oldest of them was received.

    Waiting = ``queued``, or ``running`` under an expired lease (its worker died): those must be
    taken over even when no new work arrives.
    """
    now = now or utcnow()
    waiting = (Instance.state == State.QUEUED.value) | (
        (Instance.state == State.RUNNING.value) & (Instance.lease_expires < now)
    )
    with db.sessions() as s:
        n, oldest = s.execute(select(func.count(), func.min(Instance.received_at)).where(waiting)).one()
    if oldest is not None and oldest.tzinfo is None:  # aggregate results bypass the column type
        oldest = oldest.replace(tzinfo=dt.UTC)
    elif isinstance(oldest, str):
        oldest = dt.datetime.fromisoformat(oldest).replace(tzinfo=dt.UTC)
    return int(n), oldest


def oldest_waiting(db: Database) -> Instance | None:
    """The oldest queued job (what an operator asks first when the queue backs up)."""
    with db.sessions() as s:
        return s.scalar(
            select(Instance).where(Instance.state == State.QUEUED.value).order_by(Instance.id).limit(1)
        )


# --------------------------------------------------------------------------- worklist and reports


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


def instances(db: Database, f: Filters, *, order: str = "arrival") -> list[Instance]:
    """The rows ``f`` selects, in ``order``: ``"arrival"`` (id) or ``"worklist"`` (worker/worklist.py
    says which)."""
    Inst = Instance
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
        screened = case((Inst.state == State.DONE.value, 0), else_=1)
        stmt = stmt.order_by(screened, rank, Inst.top_probability.desc().nulls_last(), Inst.received_at, Inst.id)
    else:
        stmt = stmt.order_by(Inst.id)
    if f.limit:
        stmt = stmt.limit(f.limit)
    with db.sessions() as s:
        return list(s.scalars(stmt))


def intake_events(db: Database, *, since: dt.datetime | None = None, until: dt.datetime | None = None,
                  limit: int = 1000, newest_first: bool = False) -> list[dict[str, Any]]:
    """Intake events (refusals, re-sends) as dictionaries, oldest first unless ``newest_first``."""
    E = IntakeEvent
    stmt = select(E).order_by(E.id.desc() if newest_first else E.id)
    if since:
        stmt = stmt.where(E.at >= since)
    if until:
        stmt = stmt.where(E.at < until)
    if limit:
        stmt = stmt.limit(limit)
    with db.sessions() as s:
        return [e.as_dict() for e in s.scalars(stmt)]


def intake_event_count(db: Database, *, kinds: Sequence[str] = (), not_kinds: Sequence[str] = ()) -> int:
    """Intake events of one of ``kinds`` (all when empty) and none of ``not_kinds``."""
    stmt = select(func.count()).select_from(IntakeEvent)
    if kinds:
        stmt = stmt.where(IntakeEvent.kind.in_(list(kinds)))
    if not_kinds:
        stmt = stmt.where(IntakeEvent.kind.not_in(list(not_kinds)))
    with db.sessions() as s:
        return s.scalar(stmt) or 0


def recorded_destinations(db: Database) -> set[str]:
    """Every destination a delivery row names (configured now or not)."""
    with db.sessions() as s:
        return set(s.scalars(select(Delivery.destination).distinct()))


def recorded_classes(db: Database) -> set[str]:
    """Every predicted class the database holds (from this model or earlier ones)."""
    with db.sessions() as s:
        return {c for c in s.scalars(select(Instance.predicted_class).distinct()) if c}


def instances_by_uid(db: Database, sop_instance_uids: Sequence[str]) -> list[Instance]:
    """The rows of these SOP Instance UIDs (those that exist)."""
    with db.sessions() as s:
        return list(s.scalars(select(Instance).where(Instance.sop_instance_uid.in_(list(sop_instance_uids)))))


def instance_paths(db: Database, sop_instance_uids: Sequence[str]) -> dict[str, str]:
    """Spool path per SOP Instance UID, for those that exist."""
    if not sop_instance_uids:
        return {}
    with db.sessions() as s:
        rows = s.execute(select(Instance.sop_instance_uid, Instance.path)
                         .where(Instance.sop_instance_uid.in_(list(sop_instance_uids)))).all()
    return {uid: path for uid, path in rows}


def delivery_path(db: Database, sop_instance_uid: str, kind: str) -> str | None:
    """The spool path of one result object of an instance (e.g. its ``heatmap`` SC), or None."""
    with db.sessions() as s:
        return s.scalar(
            select(Delivery.path).join(Instance, Delivery.instance_id == Instance.id)
            .where(Instance.sop_instance_uid == sop_instance_uid, Delivery.kind == kind).limit(1)
        )


def delivery_counts_by_destination(db: Database) -> list[tuple[str, str, int]]:
    """(destination, state, count) for every pair that has rows."""
    with db.sessions() as s:
        rows = s.execute(select(Delivery.destination, Delivery.state, func.count())
                         .group_by(Delivery.destination, Delivery.state)).all()
    return [(d, st, int(n)) for d, st, n in rows]


@dataclass(frozen=True)
class MetricCounts:
    """What ``/metrics`` reads in one session: rows per state, re-sends, intake events per kind,
    deliveries per state, and the oldest queued job's receipt time."""

    by_state: dict[str, int]
    resends: int
    by_kind: dict[str, int]
    sends: dict[str, int]
    oldest_queued: dt.datetime | None


def metric_counts(db: Database) -> MetricCounts:
    """The counts of :class:`MetricCounts`, read in one session (one consistent snapshot on
    PostgreSQL; SQLite reads in one transaction too)."""
    with db.sessions() as s:
        by_state = dict(s.execute(select(Instance.state, func.count()).group_by(Instance.state)).all())
        resends = s.scalar(select(func.coalesce(func.sum(Instance.receive_count - 1), 0))) or 0
        by_kind = dict(s.execute(select(IntakeEvent.kind, func.count()).group_by(IntakeEvent.kind)).all())
        sends = dict(s.execute(select(Delivery.state, func.count()).group_by(Delivery.state)).all())
        oldest = s.scalar(select(func.min(Instance.received_at)).where(Instance.state == State.QUEUED.value))
    return MetricCounts(by_state, resends, by_kind, sends, oldest)


def ping(db: Database) -> None:
    """One round trip to the database; raises what the driver raises when it is not reachable."""
    with db.sessions() as s:
        s.execute(select(1))


# --------------------------------------------------------------------------- retention (cxr-triage purge)

#: The states a job ends in.
FINISHED = (State.DONE.value, State.SKIPPED.value, State.FAILED.value)


def _purge_eligible(cutoff: dt.datetime) -> ColumnElement[bool]:
    """Finished before ``cutoff``, and no delivery that is not sent."""
    unsent = exists().where(Delivery.instance_id == Instance.id, Delivery.state != SendState.SENT.value)
    return (Instance.state.in_(FINISHED)) & (Instance.finished_at < cutoff) & ~unsent


@dataclass(frozen=True)
class Purgeable:
    """A job finished and delivered before the cutoff: its spooled image and its result objects."""

    id: int
    sop_instance_uid: str
    path: str
    result_paths: list[str]


def purgeable(db: Database, cutoff: dt.datetime) -> list[Purgeable]:
    """The jobs whose files ``cxr-triage purge`` deletes, in id order (one read session)."""
    with db.sessions() as s:
        rows = s.execute(
            select(Instance.id, Instance.sop_instance_uid, Instance.path)
            .where(_purge_eligible(cutoff)).order_by(Instance.id)
        ).all()
        results: dict[int, list[str]] = {}
        if rows:
            for d in s.execute(select(Delivery.instance_id, Delivery.path)
                               .where(Delivery.instance_id.in_([r.id for r in rows]))):
                results.setdefault(d.instance_id, []).append(d.path)
    return [Purgeable(r.id, r.sop_instance_uid, r.path, results.get(r.id, [])) for r in rows]


def prune_rows(
    db: Database, cutoff: dt.datetime, *, dry_run: bool, unlink: Callable[[str], object]
) -> tuple[int, int]:
    """Delete the rows of jobs finished and delivered before ``cutoff`` (with their deliveries) and
    the intake events before it, in one transaction; ``unlink`` is called on each of their spool
    paths first. Returns (jobs, intake events) deleted, or that would be with ``dry_run``."""
    with db.sessions.begin() as s:
        ids = list(s.scalars(select(Instance.id).where(_purge_eligible(cutoff))))
        events = int(s.scalar(select(func.count()).where(IntakeEvent.at < cutoff)) or 0)
        if not dry_run:
            for rel in s.scalars(select(Instance.path).where(Instance.id.in_(ids))):
                unlink(rel)
            for rel in s.scalars(select(Delivery.path).where(Delivery.instance_id.in_(ids))):
                unlink(rel)
            s.execute(delete(Delivery).where(Delivery.instance_id.in_(ids)))
            s.execute(delete(Instance).where(Instance.id.in_(ids)))
            s.execute(delete(IntakeEvent).where(IntakeEvent.at < cutoff))
    return len(ids), events
