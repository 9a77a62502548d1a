"""The tables: one row per SOP Instance (the job), intake events, deliveries; their states.

Times are stored as UTC (``UTCDateTime``) whatever the database does with zones. Alembic
migrations (``worker/migrations``) create and change these tables; ``Base.metadata`` is their
target.
"""

from __future__ import annotations

import datetime as dt
import enum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


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
    kind: Mapped[str] = mapped_column(String(8), nullable=False)  # sr | sc | heatmap | hl7 | fhir
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
