"""``cxr-triage``: one command, with subcommands; each entry is ``main(argv=None) -> int``.

Subcommands: ``demo`` (the main job end to end on the shipped samples), ``serve`` (listener +
batches), ``batch`` (batches only; ``--once`` drains the queue, sends what is due and exits, for
cron or systemd timers), ``query`` and ``status`` (the triage database), ``resend`` (failed
deliveries back to the queue), ``migrate`` (schema upgrade; also done on every start); and in
worker/maintenance.py ``rescreen`` (finished jobs back to the queue), ``purge`` (the data
lifecycle) and ``model`` (the model card for people). ``--version`` prints the version.

Exit status: 0 success, 1 runtime failure, 2 bad usage, configuration or a failed start-up check
(one line each: configuration errors name the setting, see worker/preflight.py and
worker/commandline.py).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

from worker import store
from worker.commandline import CommandError, check_class, open_existing, parse_when
from worker.maintenance import cmd_model, cmd_purge, cmd_rescreen, purge_line
from worker.modelcard import ModelCardError
from worker.priority import PRIORITIES
from worker.settings import Settings, SettingsError, load_settings

log = logging.getLogger(__name__)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="TOML configuration file (env CXR_TRIAGE_CONFIG)")
    p.add_argument("--data-dir", metavar="DIR", help="spool and SQLite database folder [storage.data_dir]")
    p.add_argument(
        "--database", metavar="URL", help="SQLAlchemy URL, e.g. postgresql+psycopg://... [storage.database_url]"
    )
    p.add_argument("--log-level", metavar="LEVEL", help="DEBUG, INFO, WARNING, ERROR [log_level]")
    p.add_argument("--log-format", choices=["text", "json"], help="one JSON object per line with json [log_format]")


def _node_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="DIR", help="folder with model.xml, model.bin, model.json [model.path]")
    p.add_argument(
        "--precision", choices=["f32", "bf16", "f16", "int8"], help="override the model card [model.precision]"
    )
    p.add_argument("--batch-size", type=int, metavar="N", help="images per batch [batch.size]")
    p.add_argument("--destination", action="append", metavar="SPEC",
                   help="result destination AET@host:port or folder:PATH, repeatable [destinations]")
    p.add_argument("--schedule", choices=["continuous", "interval", "cron"], help="[schedule.mode]")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cxr-triage",
        description="Chest X-ray triage node: DICOM intake, durable queue, OpenVINO screening, results to PACS.",
    )
    parser.add_argument("--version", action="version", version=f"cxr-triage {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="receive DICOM and screen it (listener + batch scheduler)")
    _common(p)
    _node_options(p)
    p.add_argument("--port", type=int, help="DICOM port [listener.port]")
    p.add_argument("--ae-title", metavar="AET", help="our AE title [listener.ae_title]")
    p.add_argument("--bind", metavar="ADDR", help="address to listen on [listener.bind_address]")
    p.add_argument("--no-batch", action="store_true", help="listener only; run `cxr-triage batch` separately")
    p.add_argument("--web-port", type=int, metavar="N", help="serve the worklist page on port N [web.port]")

    p = sub.add_parser("hash-password", help="print a web.password_hash for a password read from standard input")
    _common(p)

    p = sub.add_parser("batch", help="screen queued images (without the listener)")
    _common(p)
    _node_options(p)
    p.add_argument("--once", action="store_true", help="drain the queue once and exit")

    p = sub.add_parser("query", help="list screened and waiting images from the triage database")
    _common(p)
    p.add_argument("--state", action="append", choices=[s.value for s in store.State], help="repeatable")
    p.add_argument("--class", dest="predicted_class", metavar="NAME", help="predicted class")
    p.add_argument("--priority", choices=["urgent", "high", "routine"])
    p.add_argument("--min-probability", type=float, metavar="P", help="probability of the predicted class >= P")
    p.add_argument("--since", metavar="WHEN", help="received at or after (ISO 8601 date or time, UTC)")
    p.add_argument("--until", metavar="WHEN", help="received before (ISO 8601 date or time, UTC)")
    p.add_argument("--study", metavar="UID", help="Study Instance UID")
    p.add_argument("--accession", metavar="NUMBER", help="Accession Number")
    p.add_argument("--events", action="store_true", help="list intake events (refusals, re-sends) instead")
    p.add_argument("--limit", type=int, default=1000, help="at most N rows (default 1000; 0 = all)")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table")

    p = sub.add_parser("status", help="counts per state and the oldest waiting image")
    _common(p)
    p.add_argument("--format", choices=["table", "json"], default="table")

    p = sub.add_parser("resend", help="put failed deliveries back to the queue")
    _common(p)
    p.add_argument("--sop", metavar="UID", help="only this source image or result object")
    p.add_argument("--to", metavar="NAME", help="only this destination")
    p.add_argument("--now", action="store_true", help="also try to send them now (needs the destinations configured)")

    for name, (_, text) in UPSTREAM.items():
        sub.add_parser(name, help=text, add_help=False)

    from worker import demo

    demo.add_parser(sub, _common)

    p = sub.add_parser("rescreen", help="put finished jobs back in the queue by filter (e.g. after a model upgrade)")
    _common(p)
    p.add_argument(
        "--state", action="append", choices=["done", "skipped", "failed"], help="repeatable (default: all three)"
    )
    p.add_argument("--since", metavar="WHEN", help="received at or after (ISO 8601 date or time, UTC)")
    p.add_argument("--until", metavar="WHEN", help="received before (ISO 8601 date or time, UTC)")
    p.add_argument("--class", dest="predicted_class", metavar="NAME", help="predicted class")
    p.add_argument("--model-version", metavar="V", help="screened by this model version")
    p.add_argument("--sop", metavar="UID", help="this SOP Instance UID")
    p.add_argument("--all", action="store_true", help="every finished job (no filter)")
    p.add_argument("--dry-run", action="store_true", help="only count")

    p = sub.add_parser(
        "purge", help="delete spooled images (PHI) of finished, delivered jobs past storage.retention_days"
    )
    _common(p)
    p.add_argument("--dry-run", action="store_true", help="only count what would be deleted")
    p.add_argument("--days", type=int, metavar="N", help="older than N days instead of storage.retention_days")

    p = sub.add_parser("model", help="the model card: name, version, precision, classes, thresholds, metrics, data")
    _common(p)
    p.add_argument("--model", metavar="DIR", help="a model folder instead of the configured one [model.path]")

    p = sub.add_parser("migrate", help="upgrade the database schema to the newest revision")
    _common(p)
    return parser


def package_version() -> str:
    """The installed package's version (``pyproject.toml``), or ``unknown`` in a bare checkout."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cxr-triage")
    except PackageNotFoundError:
        return "unknown"


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {
        "storage.data_dir": args.data_dir,
        "storage.database_url": args.database,
        "log_level": args.log_level,
        "log_format": args.log_format,
    }
    for flag, key in (
        ("model", "model.path"),
        ("precision", "model.precision"),
        ("batch_size", "batch.size"),
        ("port", "listener.port"),
        ("ae_title", "listener.ae_title"),
        ("bind", "listener.bind_address"),
        ("destination", "destinations"),
        ("schedule", "schedule.mode"),
        ("web_port", "web.port"),
    ):
        if hasattr(args, flag):
            overrides[key] = getattr(args, flag)
    from worker.settings import default_config_file

    # not for the demo: it must not take a production node's destinations (its PACS) from the host
    default = default_config_file() if args.command != "demo" else None
    return load_settings(args.config or default, overrides)


def _setup_logging(settings: Settings) -> None:
    from worker import logs

    logs.configure(settings.log_level, settings.log_format)


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    from worker.node import Node

    return Node(settings, batch=not args.no_batch).run_forever()


def cmd_batch(args: argparse.Namespace, settings: Settings) -> int:
    import os

    from worker import audit as audit_log
    from worker import pipeline, preflight, sender
    from worker.node import load_engine, open_storage, sd_notify

    preflight.check_storage(settings)  # before the model loads
    engine = load_engine(settings)
    db, spool = open_storage(settings)
    audit = audit_log.AuditLog(settings.storage.audit_path)
    audit.record("batch_started", pid=os.getpid(), once=bool(args.once), model_name=engine.card.name,
                 model_version=engine.card.version, model_sha256=engine.card.bin_sha256)
    try:
        if args.once:
            pipeline.reclaim_dead_leases(db, audit)  # an earlier run of this host that died mid-batch
            # results go out from a background thread while the next batches are screened
            bg = sender.BackgroundSender(db, spool, settings, audit=audit).start()
            try:
                report = pipeline.drain(db, spool, engine, settings, pipeline.worker_id(), audit=audit,
                                        on_results=bg.wake)
            finally:
                bg.stop()
            last = sender.send_until_idle(db, spool, settings, audit=audit)  # what the thread had not reached
            sent, retrying, failed = (bg.total.sent + last.sent, bg.total.retrying + last.retrying,
                                      bg.total.failed + last.failed)
            print(
                f"screened {report.done}, skipped {report.skipped}, failed {report.failed} "
                f"of {report.claimed} claimed in {report.seconds:.1f} s; "
                f"results sent {sent}, retrying {retrying}, send_failed {failed}"
            )
            if settings.storage.retention_days or settings.database.retention_days:
                from worker import retention

                rep = retention.purge(db, spool, settings, audit=audit)
                if rep.jobs or rep.rows:
                    print(purge_line(rep))
            return 0
        import signal
        import threading

        from worker.scheduler import BatchScheduler

        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        sched = BatchScheduler(db, spool, engine, settings, audit=audit)
        sched.start()
        sd_notify("READY=1\nSTATUS=batch scheduler running")
        stop.wait()
        sd_notify("STOPPING=1")
        sched.stop()
        return 0
    finally:
        audit.record("batch_stopped", pid=os.getpid())
        audit.close()
        db.close()


def _query_rows(args: argparse.Namespace, db: store.Database) -> list[dict[str, Any]]:
    from worker import worklist

    since = parse_when(args.since, "--since") if args.since else None
    until = parse_when(args.until, "--until") if args.until else None
    if args.events:
        return worklist.events(db, since=since, until=until, limit=args.limit)
    return worklist.rows(db, worklist.Filters(
        states=args.state or (), predicted_class=args.predicted_class, priority=args.priority,
        min_probability=args.min_probability, since=since, until=until, study=args.study,
        accession=args.accession, limit=args.limit,
    ))


def _print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3f}"
        return "" if v is None else str(v)

    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


def cmd_query(args: argparse.Namespace, settings: Settings) -> int:
    if args.min_probability is not None and not 0.0 <= args.min_probability <= 1.0:
        raise CommandError(f"--min-probability must be a probability in [0, 1], got {args.min_probability:g}")
    if args.limit < 0:
        raise CommandError(f"--limit must be >= 0 (0 = all), got {args.limit}")
    db = open_existing(settings)
    try:
        if args.predicted_class and not args.events:
            check_class(args.predicted_class, settings, db)
        rows = _query_rows(args, db)
    finally:
        db.close()
    if args.format == "json":
        json.dump(rows, sys.stdout, indent=2)
        print()
        return 0
    if not args.events:
        for r in rows:
            r["probability"] = r["probabilities"][r["predicted_class"]] if r["probabilities"] else None
    if args.format == "csv":
        classes = sorted({k for r in rows for k in (r.get("probabilities") or {})})
        fields = [k for k in (rows[0] if rows else {}) if k not in ("probabilities", "deliveries")]
        writer = csv.writer(sys.stdout)
        writer.writerow(fields + [f"p_{c}" for c in classes])
        for r in rows:
            probs = r.get("probabilities") or {}
            writer.writerow([r.get(k) for k in fields] + [probs.get(c) for c in classes])
        return 0
    if args.events:
        _print_table(rows, ["at", "kind", "status", "calling_ae", "sop_instance_uid", "reason"])
    else:
        for r in rows:  # why a result is not delivered yet, or never will be (also in --format json: deliveries)
            errors = [
                d["last_error"] for d in r["deliveries"] if d["state"] != store.SendState.SENT.value and d["last_error"]
            ]
            r["send_error"] = "; ".join(dict.fromkeys(errors)) or None
        _print_table(
            rows,
            ["sop_instance_uid", "state", "predicted_class", "probability", "priority", "send_state", "received_at",
             "reason", "send_error"],
        )
    print(f"({len(rows)} rows)")
    return 0


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    db = open_existing(settings)
    try:
        counts = store.counts(db)
        oldest = store.oldest_waiting(db)
        sends = store.delivery_counts(db)
        by_priority = store.priority_counts(db)
        refused = store.intake_event_count(db, not_kinds=["duplicate", "ignored"])
        ignored = store.intake_event_count(db, kinds=["ignored"])
    finally:
        db.close()
    out: dict[str, Any] = {
        "counts": {st.value: counts.get(st.value, 0) for st in store.State},
        "total": sum(counts.values()),
        "intake_refusals": refused,
        "priorities": {p: by_priority.get(p, 0) for p in PRIORITIES},
        "intake_ignored": ignored,
        "deliveries": {st.value: sends.get(st.value, 0) for st in store.SendState},
        "oldest_waiting": None,
    }
    if oldest is not None:
        age = (store.utcnow() - oldest.received_at).total_seconds()
        out["oldest_waiting"] = {"sop_instance_uid": oldest.sop_instance_uid, "age_seconds": round(age, 1)}
    if args.format == "json":
        print(json.dumps(out, indent=2))
        return 0
    for state, n in out["counts"].items():
        print(f"{state:<10}{n:>8}")
    print(f"{'total':<10}{out['total']:>8}")
    print("screened by priority: " + ", ".join(f"{k} {v}" for k, v in out["priorities"].items()))
    print(f"intake refusals and conflicts: {refused}")
    if ignored:
        print(f"ignored (out of scope, not stored): {ignored}")
    print("deliveries: " + ", ".join(f"{k} {v}" for k, v in out["deliveries"].items()))
    if out["oldest_waiting"]:
        o = out["oldest_waiting"]
        print(f"oldest waiting: {o['sop_instance_uid']} ({o['age_seconds']:.0f} s)")
    else:
        print("oldest waiting: none")
    return 0


def cmd_resend(args: argparse.Namespace, settings: Settings) -> int:
    db = open_existing(settings)
    try:
        if args.to:
            recorded = store.recorded_destinations(db)
            configured = [d.name for d in settings.result_destinations]
            if args.to not in recorded and args.to not in configured:
                known = configured + sorted(recorded - set(configured))
                raise CommandError(
                    f"--to {args.to!r} is not a destination (destinations: {', '.join(known) or 'none'})"
                )
        n = store.resend(db, sop_instance_uid=args.sop, destination=args.to)
        print(f"{n} failed deliver{'y' if n == 1 else 'ies'} queued again")
        if args.now and n:
            from worker import sender
            from worker.node import open_storage

            db2, spool = open_storage(settings)
            try:
                rep = sender.send_due(db2, spool, settings)
            finally:
                db2.close()
            print(f"sent {rep.sent}, retrying {rep.retrying}, send_failed {rep.failed}")
        return 0
    finally:
        db.close()


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from worker import demo

    return demo.run(args, settings)


def cmd_hash_password(args: argparse.Namespace, settings: Settings) -> int:
    import getpass

    from worker.web.auth import hash_password

    password = getpass.getpass("password: ") if sys.stdin.isatty() else sys.stdin.readline().rstrip("\n")
    if len(password) < 8:
        print("cxr-triage hash-password: use at least 8 characters", file=sys.stderr)
        return 2
    print(hash_password(password))
    return 0


def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    if settings.storage.database_url is None:
        settings.storage.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    store.Database.open(settings.storage.url).close()
    print("database schema is current")
    return 0


COMMANDS = {
    "serve": cmd_serve,
    "batch": cmd_batch,
    "query": cmd_query,
    "status": cmd_status,
    "resend": cmd_resend,
    "migrate": cmd_migrate,
    "demo": cmd_demo,
    "hash-password": cmd_hash_password,
    "model": cmd_model,
    "purge": cmd_purge,
    "rescreen": cmd_rescreen,
}


#: Subcommands of the upstream stages: dispatched to their own CLIs, imported only when used, so
#: the edge worker never imports torch (they need the ``train`` extra).
UPSTREAM = {
    "train": ("training.cli", "train a model from a manifest (extra: train)"),
    "evaluate": ("training.cli", "evaluate runs and folds (extra: train)"),
    "report": ("training.cli", "write the experiment report (extra: train)"),
    "compare": ("training.cli", "single-split runs side by side (extra: train)"),
    "convert": ("conversion.cli", "convert a checkpoint to an OpenVINO IR + model card (extra: train)"),
}


def _upstream(command: str, rest: Sequence[str]) -> int:
    module_name, _ = UPSTREAM[command]
    try:
        import importlib

        module = importlib.import_module(module_name)
    except ImportError as exc:
        print(
            f"cxr-triage {command}: needs the training dependencies ({exc.name or exc}); "
            "install them with: pip install 'cxr-triage[train]'",
            file=sys.stderr,
        )
        return 2
    return int(module.main([command, *rest]))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``cxr-triage``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in UPSTREAM:
        return _upstream(argv[0], argv[1:])
    args = build_parser().parse_args(argv)
    from worker.preflight import StartupError

    try:
        settings = _settings(args)
        _setup_logging(settings)
        return COMMANDS[args.command](args, settings)
    except StartupError as exc:
        print(f"cxr-triage {args.command}: cannot start: {exc}", file=sys.stderr)
        return 2
    except CommandError as exc:
        print(f"cxr-triage {args.command}: {exc}", file=sys.stderr)
        return 2
    except (SettingsError, ModelCardError) as exc:
        print(f"cxr-triage {args.command}: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `cxr-triage model | head`: the reader left; say nothing more
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
