"""The data-lifecycle and model commands: ``rescreen``, ``purge``, ``model``.

Each is ``cmd_<name>(args, settings) -> int``, dispatched by worker/cli.py.
"""

from __future__ import annotations

import argparse
from typing import Any

from worker import store
from worker.commandline import CommandError, check_class, open_existing, parse_when
from worker.settings import Settings

__all__ = ["cmd_model", "cmd_purge", "cmd_rescreen", "purge_line"]


def cmd_rescreen(args: argparse.Namespace, settings: Settings) -> int:
    """Finished jobs back to ``queued``: a running node screens them with its model; the same model
    version re-sends the same objects, a new one makes new objects (new UIDs) beside the old."""
    from worker import audit as audit_log

    given = [args.state, args.since, args.until, args.predicted_class, args.model_version, args.sop]
    if not args.all and not any(given):
        raise CommandError("name the jobs: --state, --since, --until, --class, --model-version, --sop, or --all")
    flt = store.RescreenFilter(
        states=tuple(args.state or ("done", "skipped", "failed")),
        since=parse_when(args.since, "--since") if args.since else None,
        until=parse_when(args.until, "--until") if args.until else None,
        predicted_class=args.predicted_class, model_version=args.model_version, sop_instance_uid=args.sop,
    )
    db = open_existing(settings)
    try:
        if args.predicted_class:
            check_class(args.predicted_class, settings, db)
        spool_root = settings.storage.spool_path

        def has_image(rel: str) -> bool:
            return (spool_root / rel).is_file()

        queued, missing = store.rescreen(db, flt, has_image, dry_run=args.dry_run)
    finally:
        db.close()
    if not args.dry_run and queued:
        audit = audit_log.AuditLog(settings.storage.audit_path)
        audit.record("rescreen_requested", jobs=len(queued), purged=len(missing), states=list(flt.states),
                     since=args.since, until=args.until, predicted_class=args.predicted_class,
                     model_version=args.model_version, sop_instance_uid=args.sop)
        audit.close()
    verb = "would queue" if args.dry_run else "queued"
    print(f"{verb} {len(queued)} job(s) again for screening"
          + (f"; {len(missing)} left as they are: their image is no longer in the spool (purged)" if missing else ""))
    return 0


def purge_line(rep: Any) -> str:
    verb = "would delete" if rep.dry_run else "deleted"
    out = (f"purge{' (dry run)' if rep.dry_run else ''}: {verb} {rep.images} image(s) and {rep.results} result "
           f"object(s) of {rep.jobs} job(s), {rep.bytes / 2**20:.1f} MB")
    if rep.cutoff is not None:
        out += f" (finished and delivered before {store.iso(rep.cutoff)})"
    if rep.rows_cutoff is not None:
        out += f"; {verb} {rep.rows} row(s) and {rep.events} intake event(s) from before {store.iso(rep.rows_cutoff)}"
    else:
        out += "; rows kept"
    return out


def cmd_purge(args: argparse.Namespace, settings: Settings) -> int:
    """Delete spooled images and result objects past ``storage.retention_days`` (and rows past
    ``database.retention_days``) now; ``--dry-run`` only counts."""
    from worker import audit as audit_log
    from worker import retention
    from worker.spool import Spool

    days = settings.storage.retention_days if args.days is None else args.days
    if days < 0:
        raise CommandError(f"--days must be >= 1, got {days}")
    if days == 0:
        raise CommandError("storage.retention_days is 0 (images are kept for ever): set it, or pass --days N")
    db = open_existing(settings)
    audit = audit_log.AuditLog(None if args.dry_run else settings.storage.audit_path)
    try:
        st = settings.storage
        spool = Spool(st.spool_path, reserve_bytes=st.disk_reserve_mb * 2**20, fsync=st.fsync)
        rep = retention.purge(db, spool, settings, days=days, dry_run=args.dry_run, audit=audit)
    finally:
        audit.close()
        db.close()
    print(purge_line(rep))
    return 0


def cmd_model(args: argparse.Namespace, settings: Settings) -> int:
    """Print the card of the model the node screens with (``model.path``, else the packaged default)."""
    from worker.modelcard import ModelCard
    from worker.modelsummary import summary_lines
    from worker.node import model_dir

    card = ModelCard.load(model_dir(settings))
    for line in summary_lines(card):
        print(line)
    return 0
