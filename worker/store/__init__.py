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

The package: ``schema`` (tables and states), ``db`` (engine, sessions, migrations), ``jobs``
(intake and the pipeline's claims), ``deliveries`` (the sender's leases), ``queries`` (read-only
counts and rows). Every SQL statement of the worker is in one of them; the names are re-exported
here (``from worker import store``; ``store.enqueue(db, ...)``).
"""

from __future__ import annotations

from worker.store.db import HEAD_REVISION, Database, current_revision, make_sql_engine, migrate
from worker.store.deliveries import (
    DeliveryClaim,
    claim_deliveries,
    deliveries_of,
    delivery_counts,
    mark_retry,
    mark_sent,
    resend,
)
from worker.store.jobs import (
    Claimed,
    NewDelivery,
    Outcome,
    PreviousResult,
    Received,
    RescreenFilter,
    claim_batch,
    enqueue,
    find,
    finish,
    previous_results,
    reclaim_dead_leases,
    record_event,
    record_resend,
    release,
    rescreen,
)
from worker.store.queries import (
    FINISHED,
    Filters,
    MetricCounts,
    Purgeable,
    counts,
    delivery_counts_by_destination,
    delivery_path,
    instance_paths,
    instances,
    instances_by_uid,
    intake_event_count,
    intake_events,
    metric_counts,
    oldest_waiting,
    ping,
    priority_counts,
    prune_rows,
    purgeable,
    queued_summary,
    recorded_classes,
    recorded_destinations,
)
from worker.store.schema import Base, Delivery, Instance, IntakeEvent, SendState, State, UTCDateTime, iso, utcnow

__all__ = [
    "FINISHED",
    "Purgeable",
    "purgeable",
    "prune_rows",
    "Filters",
    "instances",
    "intake_events",
    "intake_event_count",
    "recorded_destinations",
    "recorded_classes",
    "instances_by_uid",
    "instance_paths",
    "delivery_counts_by_destination",
    "delivery_path",
    "MetricCounts",
    "metric_counts",
    "ping",
    "Base",
    "Claimed",
    "Database",
    "Delivery",
    "DeliveryClaim",
    "HEAD_REVISION",
    "Instance",
    "IntakeEvent",
    "NewDelivery",
    "Outcome",
    "PreviousResult",
    "Received",
    "RescreenFilter",
    "SendState",
    "State",
    "UTCDateTime",
    "claim_batch",
    "claim_deliveries",
    "counts",
    "current_revision",
    "deliveries_of",
    "delivery_counts",
    "enqueue",
    "find",
    "finish",
    "iso",
    "make_sql_engine",
    "mark_retry",
    "mark_sent",
    "migrate",
    "oldest_waiting",
    "previous_results",
    "priority_counts",
    "queued_summary",
    "reclaim_dead_leases",
    "record_event",
    "record_resend",
    "release",
    "rescreen",
    "resend",
    "utcnow",
]
