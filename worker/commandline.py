"""What the operator commands share: their one-line errors, the existing database, argument checks.

``query``, ``status``, ``resend``, ``rescreen`` and ``purge`` work on the node's existing
database and never create one (worker/cli.py, worker/maintenance.py); a problem with what the
operator asked is a :class:`CommandError`: one line, exit status 2, not a "configuration error".
"""

from __future__ import annotations

import datetime as dt

from worker import store
from worker.modelcard import ModelCardError
from worker.settings import Settings, SettingsError

__all__ = ["CommandError", "check_class", "open_existing", "parse_when"]


class CommandError(Exception):
    """A command cannot do what was asked (a missing database, a bad argument): one line, exit 2."""


def open_existing(settings: Settings) -> store.Database:
    """The node's database for a read-only command: never created here (a new empty database
    would report "nothing waiting" for a node whose real queue is elsewhere)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError

    st = settings.storage
    hint = "pass --data-dir DIR or --database URL of the node, or --config FILE"
    if st.database_url is None:
        path = (st.data_dir / "triage.db").resolve()
        if not path.is_file():
            raise CommandError(f"no triage database at {path} (storage.data_dir = {st.data_dir}); {hint}")
        where = str(path)
    else:
        where = make_url(st.database_url).render_as_string(hide_password=True)
    db = store.Database.open(st.url, upgrade=False)
    try:
        revision = store.current_revision(db.sql_engine)
        if revision is None:
            raise CommandError(f"{where} is not a cxr-triage database (no schema); {hint}")
        if revision != store.HEAD_REVISION:
            store.migrate(db.sql_engine)
    except SQLAlchemyError as exc:
        db.close()
        orig = getattr(exc, "orig", None)
        detail = str(orig if orig is not None else exc).strip().splitlines()[0]
        raise CommandError(f"cannot open the triage database {where}: {detail}") from None
    except CommandError:
        db.close()
        raise
    return db


def parse_when(text: str, name: str) -> dt.datetime:
    try:
        when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise CommandError(f"{name}: {text!r} is not an ISO 8601 date or time") from None
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


def check_class(name: str, settings: Settings, db: store.Database) -> None:
    """``--class`` must be a class of the configured model (or one recorded in the database by an
    earlier model); a typo would otherwise print an empty table that reads as "none found"."""
    from worker.modelcard import ModelCard
    from worker.node import model_dir

    recorded = store.recorded_classes(db)
    try:
        card = ModelCard.load(model_dir(settings), verify_hash=False)
        model_classes, model = list(card.classes), f"model {card.name} {card.version}"
    except (SettingsError, ModelCardError):
        model_classes, model = [], "no model found"
    if name in model_classes or name in recorded:
        return
    known = model_classes + sorted(recorded - set(model_classes))
    raise CommandError(f"--class {name!r} is not a class of {model} (classes: {', '.join(known) or 'none'})")
