"""Data lifecycle: received images (PHI) leave the spool once they are no longer needed.

A job's spooled image and its result objects are needed until the job is finished and every
result is delivered: then they exist at the PACS, and the spool's copy is only a risk (patient
data at rest on an edge box) and a cost (the spool grows until the disk reserve refuses intake).
``storage.retention_days`` (0 = keep for ever, the default) deletes them that many days after the
job finished, when every delivery of the job is ``sent`` (or it has none: skipped, failed). The
rows stay, so ``query`` still answers what was screened and how; ``database.retention_days``
(0 = keep for ever) also deletes the rows (and their intake events) that many days after.

Every deletion is audited (``object_purged`` per image, ``rows_pruned``, ``purge_finished``) with
UIDs and counts only. The batch scheduler purges hourly and ``batch --once`` after its run;
``cxr-triage purge [--dry-run]`` does it on demand. A job whose image was purged cannot be
re-screened (``cxr-triage rescreen`` says so).
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass

from worker import audit as audit_log
from worker import store
from worker.settings import Settings
from worker.spool import Spool

log = logging.getLogger(__name__)

@dataclass
class PurgeReport:
    """What one purge deleted (or, with ``dry_run``, would delete)."""

    dry_run: bool = False
    jobs: int = 0
    images: int = 0
    results: int = 0
    bytes: int = 0
    rows: int = 0
    events: int = 0
    cutoff: dt.datetime | None = None
    rows_cutoff: dt.datetime | None = None


def _unlink(spool: Spool, relpath: str, dry_run: bool) -> int | None:
    """Size of the file deleted (or that would be), None when it is not there."""
    try:
        p = spool.path(relpath)
        size = p.stat().st_size
    except (OSError, ValueError):
        return None
    if not dry_run:
        try:
            p.unlink()
        except FileNotFoundError:
            return None
    return size


def purge(
    db: store.Database,
    spool: Spool,
    settings: Settings,
    *,
    days: int | None = None,
    row_days: int | None = None,
    dry_run: bool = False,
    now: dt.datetime | None = None,
    audit: audit_log.AuditLog = audit_log.NULL,
) -> PurgeReport:
    """Delete the spooled images and result objects of jobs finished and delivered more than
    ``days`` ago (default ``storage.retention_days``; 0 = none), then the rows finished more than
    ``row_days`` ago (default ``database.retention_days``; 0 = none)."""
    now = now or store.utcnow()
    days = settings.storage.retention_days if days is None else days
    row_days = settings.database.retention_days if row_days is None else row_days
    report = PurgeReport(dry_run=dry_run)
    if days > 0:
        report.cutoff = now - dt.timedelta(days=days)
        for r in store.purgeable(db, report.cutoff):
            files, size = 0, 0
            got = _unlink(spool, r.path, dry_run)
            if got is not None:
                report.images += 1
                files, size = files + 1, size + got
            for rel in dict.fromkeys(r.result_paths):  # one object, several destinations
                got = _unlink(spool, rel, dry_run)
                if got is not None:
                    report.results += 1
                    files, size = files + 1, size + got
            if files:
                report.jobs += 1
                report.bytes += size
                if not dry_run:
                    audit.record("object_purged", sop_instance_uid=r.sop_instance_uid, files=files, bytes=size)
    if row_days > 0:
        report.rows_cutoff = now - dt.timedelta(days=row_days)
        # files of pruned rows are normally gone already (rows outlive images)
        report.rows, report.events = store.prune_rows(
            db, report.rows_cutoff, dry_run=dry_run, unlink=lambda rel: _unlink(spool, rel, False)
        )
        if not dry_run and (report.rows or report.events):
            audit.record("rows_pruned", instances=report.rows, intake_events=report.events,
                         before=store.iso(report.rows_cutoff))
    if not dry_run and (days > 0 or row_days > 0):
        audit.record("purge_finished", jobs=report.jobs, images=report.images, results=report.results,
                     bytes=report.bytes, rows=report.rows, intake_events=report.events,
                     before=store.iso(report.cutoff), rows_before=store.iso(report.rows_cutoff))
        if report.jobs or report.rows:
            log.info("purge: %d image(s) and %d result object(s) of %d job(s) deleted (%.1f MB); %d row(s) pruned",
                     report.images, report.results, report.jobs, report.bytes / 2**20, report.rows)
    return report
