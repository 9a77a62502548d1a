"""The queue API: intake (``enqueue``, ``record_resend``, ``record_event``), then the pipeline's
``claim_batch``, ``finish``, ``release``, lease recovery and re-screening.

Every change of a job's state is one transaction, so a crash leaves each job either before or
after a step, never half way (the package docstring says how claims are made safe).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from sqlalchemy import (
    func,
    select,
    update,
)
from sqlalchemy.orm import Session

from worker.store.db import Database
from worker.store.schema import Delivery, Instance, IntakeEvent, SendState, State, utcnow

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- intake


@dataclass(frozen=True)
class Received:
    """What the listener knows about one stored object."""

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str | None
    series_instance_uid: str | None
    accession_number: str | None
    modality: str | None
    transfer_syntax: str
    calling_ae: str | None
    path: str
    size_bytes: int
    sha256: str


def find(db: Database, sop_instance_uid: str) -> Instance | None:
    """The row of one instance, or None."""
    with db.sessions() as s:
        return s.scalar(select(Instance).where(Instance.sop_instance_uid == sop_instance_uid))


def enqueue(db: Database, item: Received, now: dt.datetime | None = None) -> Instance:
    """Record a newly stored object as a queued job (one commit)."""
    now = now or utcnow()
    row = Instance(
        sop_instance_uid=item.sop_instance_uid,
        sop_class_uid=item.sop_class_uid,
        study_instance_uid=item.study_instance_uid,
        series_instance_uid=item.series_instance_uid,
        accession_number=item.accession_number,
        modality=item.modality,
        transfer_syntax=item.transfer_syntax,
        calling_ae=item.calling_ae,
        path=item.path,
        size_bytes=item.size_bytes,
        sha256=item.sha256,
        receive_count=1,
        state=State.QUEUED.value,
        attempts=0,
        received_at=now,
        last_received_at=now,
    )
    with db.sessions.begin() as s:
        s.add(row)
    return row


def record_resend(db: Database, sop_instance_uid: str, sha256: str, calling_ae: str | None, peer: str | None) -> bool:
    """Count a re-send of a known instance; return True when its content is identical.

    The first object kept is the one screened (as Orthanc does by default); a re-send with
    different bytes is recorded as ``duplicate_differs`` so that a person can look at it.
    """
    now = utcnow()
    with db.sessions.begin() as s:
        row = s.scalar(select(Instance).where(Instance.sop_instance_uid == sop_instance_uid))
        if row is None:
            return False
        row.receive_count += 1
        row.last_received_at = now
        same = row.sha256 == sha256
        s.add(
            IntakeEvent(
                at=now,
                kind="duplicate" if same else "duplicate_differs",
                status=0x0000,
                calling_ae=calling_ae,
                peer=peer,
                sop_instance_uid=sop_instance_uid,
                sop_class_uid=row.sop_class_uid,
                reason="re-send of a stored instance; acknowledged, not queued again"
                if same
                else "re-send with different content; the first received object is kept",
            )
        )
        return same


def record_event(
    db: Database,
    kind: str,
    reason: str,
    *,
    status: int | None = None,
    calling_ae: str | None = None,
    peer: str | None = None,
    sop_instance_uid: str | None = None,
    sop_class_uid: str | None = None,
) -> None:
    """Record an intake event; never raises (it is called from network handlers)."""

    def clip(v: str | None, n: int) -> str | None:
        if v is None:
            return None
        v = "".join(c if c.isprintable() else "?" for c in str(v))
        return v[:n]

    try:
        with db.sessions.begin() as s:
            s.add(
                IntakeEvent(
                    at=utcnow(),
                    kind=kind,
                    status=status,
                    calling_ae=clip(calling_ae, 16),
                    peer=clip(peer, 64),
                    sop_instance_uid=clip(sop_instance_uid, 128),
                    sop_class_uid=clip(sop_class_uid, 128),
                    reason=reason,
                )
            )
    except Exception:  # pragma: no cover - the database itself is failing
        log.exception("could not record intake event %s", kind)


# --------------------------------------------------------------------------- pipeline


@dataclass(frozen=True)
class Claimed:
    """A job handed to one worker under a lease."""

    id: int
    sop_instance_uid: str
    path: str
    attempts: int


def claim_batch(
    db: Database, n: int, owner: str, lease_seconds: int, now: dt.datetime | None = None
) -> list[Claimed]:
    """Atomically take up to ``n`` jobs: expired leases first, then the oldest queued.

    One transaction; on PostgreSQL the rows are locked with SKIP LOCKED so concurrent workers
    take disjoint sets; on SQLite ``BEGIN IMMEDIATE`` serialises claimers.
    Both queries walk an index on (state, ...) so claiming does not slow down as the table grows.
    """
    now = now or utcnow()
    expires = now + dt.timedelta(seconds=lease_seconds)
    with db.sessions.begin() as s:
        ids: list[int] = list(
            s.scalars(
                select(Instance.id)
                .where(Instance.state == State.RUNNING.value, Instance.lease_expires < now)
                .order_by(Instance.lease_expires)
                .limit(n)
                .with_for_update(skip_locked=True)
            )
        )
        if len(ids) < n:
            ids += list(
                s.scalars(
                    select(Instance.id)
                    .where(Instance.state == State.QUEUED.value)
                    .order_by(Instance.id)
                    .limit(n - len(ids))
                    .with_for_update(skip_locked=True)
                )
            )
        if not ids:
            return []
        s.execute(
            update(Instance)
            .where(Instance.id.in_(ids))
            .values(
                state=State.RUNNING.value,
                lease_owner=owner,
                lease_expires=expires,
                attempts=Instance.attempts + 1,
                started_at=now,
            )
        )
        rows = s.execute(
            select(Instance.id, Instance.sop_instance_uid, Instance.path, Instance.attempts)
            .where(Instance.id.in_(ids))
            .order_by(Instance.id)
        ).all()
    return [Claimed(r.id, r.sop_instance_uid, r.path, r.attempts) for r in rows]


@dataclass(frozen=True)
class Outcome:
    """What the pipeline decided for one claimed job."""

    job_id: int
    state: State
    reason: str | None = None
    predicted_class: str | None = None
    probabilities: dict[str, float] | None = None
    priority: str | None = None
    triage_reason: str | None = None
    timings: dict[str, float] | None = None


@dataclass(frozen=True)
class NewDelivery:
    """A result object waiting to be sent to one destination."""

    destination: str
    kind: str
    sop_class_uid: str
    sop_instance_uid: str
    path: str


def _add_deliveries(s: Session, instance_id: int, items: Iterable[NewDelivery], now: dt.datetime) -> None:
    """Insert deliveries, or put an existing one (same object, same destination) back to pending."""
    for d in items:
        row = s.scalar(
            select(Delivery).where(
                Delivery.sop_instance_uid == d.sop_instance_uid, Delivery.destination == d.destination
            )
        )
        if row is None:
            s.add(
                Delivery(
                    instance_id=instance_id, destination=d.destination, kind=d.kind, sop_class_uid=d.sop_class_uid,
                    sop_instance_uid=d.sop_instance_uid, path=d.path, state=SendState.PENDING.value, attempts=0,
                    next_attempt_at=now, created_at=now,
                )
            )
        else:
            row.state, row.attempts, row.next_attempt_at, row.path = SendState.PENDING.value, 0, now, d.path


def finish(
    db: Database,
    owner: str,
    outcomes: Iterable[Outcome],
    *,
    deliveries: dict[int, list[NewDelivery]] | None = None,
    model_name: str | None,
    model_version: str | None,
    model_precision: str | None,
    max_attempts: int,
    now: dt.datetime | None = None,
) -> set[int]:
    """Store the outcomes of a batch in one commit; return the ids of the jobs applied.

    Only jobs still leased by ``owner`` are updated (a fence: a worker that lost its lease
    must not overwrite the work of the one that took over). A ``failed`` outcome with attempts
    left goes back to ``queued`` with its reason kept, so a person can see the last error.
    """
    now = now or utcnow()
    applied: set[int] = set()
    with db.sessions.begin() as s:
        for o in outcomes:
            row = s.get(Instance, o.job_id)
            if row is None or row.state != State.RUNNING.value or row.lease_owner != owner:
                log.warning("job %s: lease lost before finishing; outcome dropped", o.job_id)
                continue
            row.reason = o.reason
            row.timings = o.timings
            row.lease_owner = None
            row.lease_expires = None
            if o.state is State.FAILED and row.attempts < max_attempts:
                row.state = State.QUEUED.value
                row.reason = f"attempt {row.attempts} of {max_attempts} failed: {o.reason}"
            else:
                row.state = o.state.value
                row.finished_at = now
            if o.state is State.DONE:
                row.predicted_class = o.predicted_class
                row.probabilities = o.probabilities
                row.top_probability = max(o.probabilities.values()) if o.probabilities else None
                row.priority = o.priority
                row.triage_reason = o.triage_reason
                row.model_name = model_name
                row.model_version = model_version
                row.model_precision = model_precision
                if deliveries and o.job_id in deliveries:
                    _add_deliveries(s, row.id, deliveries[o.job_id], now)
            applied.add(o.job_id)
    return applied


def reclaim_dead_leases(
    db: Database,
    host: str,
    is_alive: Callable[[int], bool],
    *,
    exclude: Iterable[str] = (),
    now: dt.datetime | None = None,
) -> dict[str, int]:
    """Expire at once the leases of earlier processes on ``host`` that are gone; {owner: jobs}.

    A lease owner is ``host:pid:suffix`` (:func:`worker.pipeline.worker_id`). A node restarted
    after a crash would otherwise wait ``batch.lease_seconds`` (300 s) before taking its own dead
    process's jobs back. Only this host's owners are looked at, since a process id means nothing
    on another machine; owners in ``exclude`` (this process's) and owners whose process id
    ``is_alive`` are left alone. The expired leases are then claimed like any other (attempts
    count on), and :func:`finish` still fences by owner, so a wrong guess (another machine with
    the same host name sharing the queue) costs a repeated job, never a wrong result.
    """
    now = now or utcnow()
    skip = set(exclude)
    found: dict[str, int] = {}
    with db.sessions.begin() as s:
        rows = s.execute(
            select(Instance.lease_owner, func.count())
            .where(Instance.state == State.RUNNING.value, Instance.lease_owner.like(f"{host}:%"),
                   Instance.lease_expires > now)
            .group_by(Instance.lease_owner)
        ).all()
        for owner, n in rows:
            if owner is None or owner in skip:
                continue
            parts = owner.split(":")
            if len(parts) != 3 or parts[0] != host or not parts[1].isdigit():
                continue
            if is_alive(int(parts[1])):
                continue
            s.execute(
                update(Instance)
                .where(Instance.state == State.RUNNING.value, Instance.lease_owner == owner)
                .values(lease_expires=now - dt.timedelta(seconds=1))
            )
            found[owner] = int(n)
    return found


@dataclass(frozen=True)
class PreviousResult:
    """What a job's row still says about its last screening (kept while it is screened again)."""

    model_name: str
    model_version: str
    predicted_class: str
    probabilities: dict[str, float]
    priority: str | None
    triage_reason: str | None


def previous_results(db: Database, job_ids: Sequence[int]) -> dict[int, PreviousResult]:
    """The earlier results of jobs (re-screened ones: :func:`rescreen` keeps them), by job id."""
    if not job_ids:
        return {}
    out: dict[int, PreviousResult] = {}
    with db.sessions() as s:
        for r in s.scalars(select(Instance).where(Instance.id.in_(list(job_ids)), Instance.probabilities.is_not(None))):
            if r.model_name and r.model_version and r.predicted_class:
                out[r.id] = PreviousResult(
                    r.model_name,
                    r.model_version,
                    r.predicted_class,
                    dict(r.probabilities or {}),
                    r.priority,
                    r.triage_reason,
                )
    return out


@dataclass(frozen=True)
class RescreenFilter:
    """Which finished jobs ``cxr-triage rescreen`` puts back in the queue (all given criteria apply)."""

    states: tuple[str, ...] = (State.DONE.value, State.SKIPPED.value, State.FAILED.value)
    since: dt.datetime | None = None
    until: dt.datetime | None = None
    predicted_class: str | None = None
    model_version: str | None = None
    sop_instance_uid: str | None = None


def rescreen(
    db: Database, flt: RescreenFilter, has_image: Callable[[str], bool], *, dry_run: bool = False
) -> tuple[list[str], list[str]]:
    """Put the finished jobs matching ``flt`` back to ``queued`` (fresh attempts); returns
    (SOP Instance UIDs queued, those left alone because ``has_image(path)`` is false: purged).

    The previous result (class, probabilities, model) stays on the row until the new screening
    replaces it, so that the same model version re-sends the very same objects
    (worker/pipeline.py) and ``query`` shows what was there meanwhile.
    """
    finished = {State.DONE.value, State.SKIPPED.value, State.FAILED.value}
    states = [st for st in flt.states if st in finished]
    stmt = select(Instance).where(Instance.state.in_(states)).order_by(Instance.id)
    if flt.since is not None:
        stmt = stmt.where(Instance.received_at >= flt.since)
    if flt.until is not None:
        stmt = stmt.where(Instance.received_at < flt.until)
    if flt.predicted_class:
        stmt = stmt.where(Instance.predicted_class == flt.predicted_class)
    if flt.model_version:
        stmt = stmt.where(Instance.model_version == flt.model_version)
    if flt.sop_instance_uid:
        stmt = stmt.where(Instance.sop_instance_uid == flt.sop_instance_uid)
    queued: list[str] = []
    missing: list[str] = []
    with db.sessions.begin() as s:
        for row in s.scalars(stmt):
            if not has_image(row.path):
                missing.append(row.sop_instance_uid)
                continue
            queued.append(row.sop_instance_uid)
            if not dry_run:
                row.state, row.attempts, row.reason = State.QUEUED.value, 0, "queued again by cxr-triage rescreen"
                row.lease_owner = row.lease_expires = row.started_at = row.finished_at = None
    return queued, missing


def release(db: Database, owner: str, job_ids: Sequence[int]) -> None:
    """Give claimed jobs back to the queue untouched (orderly shutdown mid-batch)."""
    if not job_ids:
        return
    with db.sessions.begin() as s:
        s.execute(
            update(Instance)
            .where(Instance.id.in_(list(job_ids)), Instance.lease_owner == owner, Instance.state == State.RUNNING.value)
            .values(state=State.QUEUED.value, lease_owner=None, lease_expires=None, attempts=Instance.attempts - 1)
        )
