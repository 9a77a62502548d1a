"""The triage database, which is also the work queue.

One row per SOP Instance UID (PS3.3 C.12.1.1.1: the UID identifies the instance, so a re-send
is the same instance, recorded but never queued twice). The row is born ``queued`` in the same
commit that lets the listener answer the C-STORE with success, so there is no moment where an
acknowledged object is on disk but not in the queue.

States::

    queued -> running -> done | skipped | failed
               ^   |
               +---+  (attempt failed with attempts left, or the lease expired)

``running`` rows carry a lease (owner, expiry): a worker that dies leaves jobs that the next
claim takes over once the lease has expired. Claiming is one transaction: ``BEGIN IMMEDIATE``
on SQLite (one writer at a time, WAL lets readers go on), ``SELECT ... FOR UPDATE SKIP
LOCKED`` on PostgreSQL so that several workers share a queue without taking the same job.

Refused C-STOREs and re-sends are rows of ``intake_events``, so every failure has a reason a
person can read, even when the object never reached the spool.
"""

from __future__ import annotations

import datetime as dt
import enum
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Engine,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    create_engine,
    event,
    func,
    select,
    update,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

log = logging.getLogger(__name__)


def utcnow() -> dt.datetime:
    """Timezone-aware UTC now (all timestamps in the database are UTC)."""
    return dt.datetime.now(dt.UTC)


def iso(v: dt.datetime | None) -> str | None:
    """ISO 8601 in UTC with a ``Z`` (the form of every time in query output)."""
    return v.astimezone(dt.UTC).isoformat().replace("+00:00", "Z") if v else None


class State(str, enum.Enum):
    """Job states; every non-success state carries a reason."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    SKIPPED = "skipped"
    FAILED = "failed"


class UTCDateTime(TypeDecorator[dt.datetime]):
    """A timestamp stored as UTC and always returned timezone-aware (UTC).

    SQLite has no time zones: values are stored as naive UTC so that SQL comparisons (lease
    expiry) compare like with like; PostgreSQL stores ``timestamptz``.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(dt.UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)


class Base(DeclarativeBase):
    pass


class Instance(Base):
    """One received SOP instance and its screening job."""

    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True, nullable=False)
    sop_class_uid: Mapped[str] = mapped_column(String(64), nullable=False)
    study_instance_uid: Mapped[str | None] = mapped_column(String(64), index=True)
    series_instance_uid: Mapped[str | None] = mapped_column(String(64))
    accession_number: Mapped[str | None] = mapped_column(String(64), index=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    transfer_syntax: Mapped[str] = mapped_column(String(64), nullable=False)
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    path: Mapped[str] = mapped_column(String(255), nullable=False)
    size_bytes: Mapped[int] = mapped_column(BigInteger, nullable=False)
    sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    receive_count: Mapped[int] = mapped_column(Integer, nullable=False, default=1)

    state: Mapped[str] = mapped_column(String(16), nullable=False, default=State.QUEUED.value)
    reason: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_expires: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())

    received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), nullable=False)
    last_received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), nullable=False)
    started_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())

    predicted_class: Mapped[str | None] = mapped_column(String(32))
    probabilities: Mapped[dict[str, float] | None] = mapped_column(JSON)
    top_probability: Mapped[float | None] = mapped_column(Float)
    priority: Mapped[str | None] = mapped_column(String(16))
    triage_reason: Mapped[str | None] = mapped_column(Text)
    model_name: Mapped[str | None] = mapped_column(String(64))
    model_version: Mapped[str | None] = mapped_column(String(64))
    model_precision: Mapped[str | None] = mapped_column(String(8))
    timings: Mapped[dict[str, float] | None] = mapped_column(JSON)

    __table_args__ = (
        Index("ix_instances_state_id", "state", "id"),
        Index("ix_instances_state_lease", "state", "lease_expires"),
        Index("ix_instances_received_at", "received_at"),
    )

    def as_dict(self) -> dict[str, Any]:
        """The stable JSON shape of ``cxr-triage query --format json``."""

        return {
            "sop_instance_uid": self.sop_instance_uid,
            "sop_class_uid": self.sop_class_uid,
            "study_instance_uid": self.study_instance_uid,
            "series_instance_uid": self.series_instance_uid,
            "accession_number": self.accession_number,
            "modality": self.modality,
            "state": self.state,
            "reason": self.reason,
            "attempts": self.attempts,
            "receive_count": self.receive_count,
            "predicted_class": self.predicted_class,
            "probabilities": self.probabilities,
            "priority": self.priority,
            "triage_reason": self.triage_reason,
            "model_name": self.model_name,
            "model_version": self.model_version,
            "model_precision": self.model_precision,
            "received_at": iso(self.received_at),
            "started_at": iso(self.started_at),
            "finished_at": iso(self.finished_at),
            "transfer_syntax": self.transfer_syntax,
            "calling_ae": self.calling_ae,
        }


class IntakeEvent(Base):
    """Something at intake that is not a plain new instance: a refusal or a re-send.

    A refused C-STORE leaves the object with its sender (it got a failure status), and this row
    says why, so that nothing is refused silently.
    """

    __tablename__ = "intake_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), nullable=False, index=True)
    # refused | duplicate | duplicate_differs | association_rejected | ignored
    kind: Mapped[str] = mapped_column(String(32), nullable=False)
    status: Mapped[int | None] = mapped_column(Integer)  # DIMSE status returned, if any
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    peer: Mapped[str | None] = mapped_column(String(64))
    sop_instance_uid: Mapped[str | None] = mapped_column(String(128))  # as received (sanitised), may be invalid
    sop_class_uid: Mapped[str | None] = mapped_column(String(128))
    reason: Mapped[str] = mapped_column(Text, nullable=False)

    def as_dict(self) -> dict[str, Any]:
        return {
            "at": iso(self.at),
            "kind": self.kind,
            "status": f"0x{self.status:04X}" if self.status is not None else None,
            "calling_ae": self.calling_ae,
            "peer": self.peer,
            "sop_instance_uid": self.sop_instance_uid,
            "sop_class_uid": self.sop_class_uid,
            "reason": self.reason,
        }


class SendState(str, enum.Enum):
    """Delivery states of one result object to one destination."""

    PENDING = "pending_send"
    SENT = "sent"
    FAILED = "send_failed"


class Delivery(Base):
    """One result object (SR or SC) or message (HL7, FHIR) for one destination.

    Rows are created in the same commit that marks their job ``done``, so a result is in the
    database (and its object durably in the spool's ``results/``) before any send is tried: a
    failed send loses nothing. ``next_attempt_at`` doubles as the sending lease: a claim moves it
    ``send.lease_seconds`` ahead, so no other worker takes the row while it is being sent.
    """

    __tablename__ = "deliveries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id", ondelete="CASCADE"), nullable=False, index=True)
    destination: Mapped[str] = mapped_column(String(64), nullable=False)
    kind: Mapped[str] = mapped_column(String(8), nullable=False)  # sr | sc | hl7 | fhir
    sop_class_uid: Mapped[str] = mapped_column(String(64), nullable=False)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), nullable=False)
    path: Mapped[str] = mapped_column(String(255), nullable=False)
    state: Mapped[str] = mapped_column(String(16), nullable=False, default=SendState.PENDING.value)
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), nullable=False)
    last_status: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), nullable=False)
    sent_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())

    __table_args__ = (
        UniqueConstraint("sop_instance_uid", "destination", name="uq_deliveries_object_destination"),
        Index("ix_deliveries_state_next", "state", "next_attempt_at"),
    )

    def as_dict(self) -> dict[str, Any]:
        return {
            "destination": self.destination,
            "kind": self.kind,
            "sop_instance_uid": self.sop_instance_uid,
            "state": self.state,
            "attempts": self.attempts,
            "last_status": f"0x{self.last_status:04X}" if self.last_status is not None else None,
            "last_error": self.last_error,
            "next_attempt_at": iso(self.next_attempt_at) if self.state == SendState.PENDING.value else None,
            "sent_at": iso(self.sent_at),
        }


# --------------------------------------------------------------------------- engine


def make_engine(url: str) -> Engine:
    """Create the SQLAlchemy engine with the pragmas durability needs.

    SQLite: WAL (readers never block the writer), ``synchronous=FULL`` (a commit is on disk
    before the C-STORE is acknowledged; NORMAL may lose the last commits on power loss),
    a busy timeout, and ``BEGIN IMMEDIATE`` for every transaction so that a claim takes the
    write lock up front instead of failing on upgrade from a read lock.
    """
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _rec: Any) -> None:
            dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Any) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return create_engine(url, pool_pre_ping=True)


#: The newest revision in ``worker/migrations/versions`` (a test keeps the two in step).
HEAD_REVISION = "0002"


def current_revision(engine: Engine) -> str | None:
    """The schema revision recorded in ``alembic_version``; None for a new or foreign database."""
    from sqlalchemy import inspect, text

    with engine.connect() as conn:
        if not inspect(conn).has_table("alembic_version"):
            return None
        return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest Alembic revision (run on every start).

    A current schema is recognised with one query and Alembic is not even imported (it and its
    template engine cost the resident node about 10 MB for nothing).
    """
    if current_revision(engine) == HEAD_REVISION:
        return
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(resources.files("worker") / "migrations"))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


@dataclass
class Database:
    """The engine plus a session factory, opened once per process."""

    engine: Engine
    sessions: sessionmaker[Session]

    @classmethod
    def open(cls, url: str, *, upgrade: bool = True) -> Database:
        engine = make_engine(url)
        if upgrade:
            migrate(engine)
        return cls(engine, sessionmaker(engine, expire_on_commit=False))

    def close(self) -> None:
        self.engine.dispose()


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
