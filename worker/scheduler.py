"""When batches run: APScheduler drives the pipeline and the delivery retries.

Modes (``[schedule] mode``):

* ``continuous``: a tick every ``batch.poll_seconds``; a run starts when a full batch is queued
  or the oldest queued image has waited ``schedule.gather_seconds`` (a small gather window, so
  a burst of images is inferred together without delaying a lone image for long).
* ``interval``: a run every ``schedule.interval_minutes``.
* ``cron``: a run at the times of the crontab ``schedule.cron`` (UTC), e.g. nights only.

A run drains the queue, or stops after ``schedule.max_batch_seconds`` and leaves the rest
queued. Runs never overlap in one process (``max_instances=1``); a run missed because the
previous one was still going is coalesced into one, within ``misfire_grace_seconds``.

The queue in the database, not the scheduler's memory, says what is pending. APScheduler keeps
its schedule in memory, so runs missed while the node was *down* are handled explicitly: at
start, if a scheduled time fell within the last ``misfire_grace_seconds`` and images queued
before it are still waiting, one catch-up run starts at once.

Results are sent by a :class:`worker.sender.BackgroundSender` thread, woken after each batch
and every ``send.retry_poll_seconds`` for retries, so a batch never waits for a PACS.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from worker import audit as audit_log
from worker import pipeline, sender, store
from worker.engine import Engine
from worker.settings import Settings
from worker.spool import Spool

log = logging.getLogger(__name__)


def make_trigger(settings: Settings) -> BaseTrigger:
    """The APScheduler trigger of the configured mode."""
    sc = settings.schedule
    if sc.mode == "continuous":
        return IntervalTrigger(seconds=settings.batch.poll_seconds, timezone="UTC")
    if sc.mode == "interval":
        return IntervalTrigger(minutes=sc.interval_minutes, timezone="UTC")
    return CronTrigger.from_crontab(sc.cron, timezone="UTC")


def missed_run(settings: Settings, now: dt.datetime) -> dt.datetime | None:
    """The latest scheduled time within the misfire grace before ``now`` (interval/cron), else None."""
    sc = settings.schedule
    if sc.mode == "continuous" or sc.misfire_grace_seconds <= 0:
        return None
    since = now - dt.timedelta(seconds=sc.misfire_grace_seconds)
    if sc.mode == "interval":
        # an interval schedule restarts with the process; every waiting image is "missed"
        return now
    trigger = CronTrigger.from_crontab(sc.cron, timezone="UTC")
    last, t = None, trigger.get_next_fire_time(None, since)
    while t is not None and t <= now:
        last = t
        t = trigger.get_next_fire_time(t, t + dt.timedelta(seconds=1))
    return last


def should_start(settings: Settings, queued: int, oldest: dt.datetime | None, now: dt.datetime) -> bool:
    """Continuous mode's gather window: a full batch, or the oldest image waited long enough."""
    if queued == 0 or oldest is None:
        return False
    if settings.schedule.mode != "continuous":
        return True
    return queued >= settings.batch.size or (now - oldest).total_seconds() >= settings.schedule.gather_seconds


class BatchScheduler:
    """Runs the pipeline and the delivery retries on a schedule, in background threads."""

    def __init__(
        self,
        db: store.Database,
        spool: Spool,
        engine: Engine,
        settings: Settings,
        *,
        clock: Callable[[], dt.datetime] = store.utcnow,
        on_batch: Callable[[pipeline.BatchReport], None] | None = None,
        audit: audit_log.AuditLog = audit_log.NULL,
    ) -> None:
        self.db = db
        self.spool = spool
        self.engine = engine
        self.settings = settings
        self.clock = clock
        self.on_batch = on_batch
        self.audit = audit
        self.owner = pipeline.worker_id()
        self.stopping = threading.Event()
        self.total = pipeline.BatchReport()
        self.runs = 0
        self._scheduler = BackgroundScheduler(timezone="UTC")
        #: sends results (woken after each batch) and due retries (every send.retry_poll_seconds)
        self.sender = sender.BackgroundSender(db, spool, settings, audit=audit)

    def run_once(self, *, force: bool = False) -> pipeline.BatchReport:
        """One run: drain the queue (gather window unless ``force``), bounded by max_batch_seconds."""
        if self.stopping.is_set():
            return pipeline.BatchReport()
        queued, oldest = store.queued_summary(self.db)
        if not force and not should_start(self.settings, queued, oldest, self.clock()):
            return pipeline.BatchReport()
        limit = self.settings.schedule.max_batch_seconds
        t0 = time.monotonic()

        def stop() -> bool:
            return self.stopping.is_set() or (limit > 0 and time.monotonic() - t0 >= limit)

        self.runs += 1
        report = pipeline.drain(
            self.db, self.spool, self.engine, self.settings, self.owner, should_stop=stop, audit=self.audit,
            on_results=self.sender.wake if self.sender.running else None,  # not started: send inline
        )
        self.total.add(report)
        if self.on_batch is not None:
            self.on_batch(report)
        return report

    def _run(self, force: bool = False) -> None:
        try:
            self.run_once(force=force)
        except Exception:  # keep the schedule alive; leases bring claimed jobs back
            log.exception("batch run failed; claimed jobs return to the queue when their lease expires")

    def _purge(self) -> None:
        from worker import retention

        try:
            retention.purge(self.db, self.spool, self.settings, audit=self.audit)
        except Exception:  # keep the schedule alive; the next hour tries again
            log.exception("purge failed")

    def start(self) -> None:
        """Schedule the batch job, start the sender; run a catch-up batch if one was missed;
        purge hourly (and now) when a retention is set."""
        sc = self.settings.schedule
        pipeline.reclaim_dead_leases(self.db, self.audit)  # our own crashed process's jobs: now, not in 300 s
        grace = sc.misfire_grace_seconds or None
        self._scheduler.add_job(
            self._run, make_trigger(self.settings), id="batch", max_instances=1, coalesce=True, misfire_grace_time=grace
        )
        if self.settings.storage.retention_days or self.settings.database.retention_days:
            self._scheduler.add_job(self._purge, IntervalTrigger(hours=1, timezone="UTC"), id="purge",
                                    max_instances=1, coalesce=True, next_run_time=dt.datetime.now(dt.UTC))
        self.sender.start()
        now = self.clock()
        missed = missed_run(self.settings, now)
        if missed is not None:
            queued, oldest = store.queued_summary(self.db)
            if queued and oldest is not None and oldest <= missed:
                log.info("catch-up run: %d image(s) waited through a scheduled run at %s", queued, missed.isoformat())
                self._scheduler.add_job(self._run, kwargs={"force": True}, id="catch-up", max_instances=1)
        self._scheduler.start()
        log.info("batch scheduler started (%s)", sc.mode)

    def next_run(self) -> dt.datetime | None:
        """When the batch job runs next (for status output and tests)."""
        job = self._scheduler.get_job("batch")
        return job.next_run_time if job else None

    def stop(self) -> None:
        """Stop taking new runs and wait for the running one to commit."""
        self.stopping.set()
        self._scheduler.shutdown(wait=True)
        self.sender.stop()
        log.info("batch scheduler stopped")
