"""When batches run: APScheduler drives the pipeline.

``continuous`` mode: a job every ``batch.poll_seconds`` drains the queue (``max_instances=1``
so batches never overlap in one process, ``coalesce`` so a slow batch does not queue up
catch-up runs). The queue in the database, not the scheduler's memory, decides what is
pending, so nothing is lost when the process stops between runs.
"""

from __future__ import annotations

import logging
import threading

from apscheduler.schedulers.background import BackgroundScheduler

from worker import jobs, pipeline
from worker.engine import Engine
from worker.settings import Settings
from worker.spool import Spool

log = logging.getLogger(__name__)


class BatchScheduler:
    """Runs ``pipeline.drain`` on a schedule in a background thread."""

    def __init__(self, db: jobs.Database, spool: Spool, engine: Engine, settings: Settings) -> None:
        self.db = db
        self.spool = spool
        self.engine = engine
        self.settings = settings
        self.owner = pipeline.worker_id()
        self.stopping = threading.Event()
        self.total = pipeline.BatchReport()
        self._scheduler = BackgroundScheduler(timezone="UTC")

    def _tick(self) -> None:
        if self.stopping.is_set():
            return
        try:
            report = pipeline.drain(
                self.db, self.spool, self.engine, self.settings, self.owner, should_stop=self.stopping.is_set
            )
            self.total.add(report)
        except Exception:  # keep the schedule alive; the leases bring the jobs back
            log.exception("batch run failed; claimed jobs return to the queue when their lease expires")

    def start(self) -> None:
        """Start the schedule (continuous mode: every ``batch.poll_seconds``)."""
        self._scheduler.add_job(
            self._tick,
            "interval",
            seconds=self.settings.batch.poll_seconds,
            id="drain",
            max_instances=1,
            coalesce=True,
            misfire_grace_time=None,
        )
        self._scheduler.start()
        log.info("batch scheduler started (continuous, every %.1f s)", self.settings.batch.poll_seconds)

    def stop(self) -> None:
        """Stop taking new batches and wait for the running one to commit."""
        self.stopping.set()
        self._scheduler.shutdown(wait=True)
        log.info("batch scheduler stopped")
