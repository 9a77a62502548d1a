"""One running node: the listener and (unless ``--no-batch``) the batch scheduler, in one process.

The two parts share only the database and the spool, so each can also run as its own process
(``cxr-triage serve --no-batch`` and ``cxr-triage batch``). SIGTERM and SIGINT stop the
listener first (no new associations), then let the running batch commit, then exit 0.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from worker import audit as audit_log
from worker import listener, store
from worker.settings import Settings, SettingsError
from worker.spool import Spool

if TYPE_CHECKING:  # a listener-only process (serve --no-batch) never loads OpenVINO
    from worker.engine import Engine
    from worker.scheduler import BatchScheduler

log = logging.getLogger(__name__)


def sd_notify(message: str) -> bool:
    """Tell systemd (``Type=notify``) about our state: ``READY=1``, ``STOPPING=1``.

    The sd_notify protocol is one datagram to the unix socket named by ``NOTIFY_SOCKET``
    (``@`` = abstract namespace); without that variable this does nothing.
    """
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(addr)
            sock.sendall(message.encode())
        return True
    except OSError:
        log.warning("could not notify systemd (%s)", message)
        return False


def open_storage(settings: Settings) -> tuple[store.Database, Spool]:
    """Create the data folder, open (and migrate) the database, open the spool."""
    st = settings.storage
    if st.database_url is None:
        st.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    if st.data_dir.exists():
        try:  # it holds patient images: private to the service user, also when created by hand
            st.data_dir.chmod(0o700)
        except OSError:
            log.warning("could not make %s private (0700)", st.data_dir)
    db = store.Database.open(st.url)
    if st.database_url is None:  # our SQLite files: private to the service user, whatever the umask
        for suffix in ("", "-wal", "-shm"):
            f = st.data_dir / f"triage.db{suffix}"
            if f.exists():
                f.chmod(0o600)
    spool = Spool(st.spool_path, reserve_bytes=st.disk_reserve_mb * 2**20, fsync=st.fsync)
    return db, spool


def model_dir(settings: Settings) -> Path:
    """The folder of the model to screen with: ``model.path``, else the default model shipped in
    the package; a clear error when neither exists (a source checkout without the packaged model)."""
    from worker.modelcard import default_model_dir

    path = settings.model.path or default_model_dir()
    if path is None:
        raise SettingsError(
            "model.path is not set and this install has no default model: screening needs --model DIR "
            "(or CXR_TRIAGE_MODEL_PATH) pointing at a folder with an OpenVINO IR (model.xml, model.bin) "
            "and its model card (model.json)"
        )
    return path


def load_engine(settings: Settings) -> Engine:
    """The model of :func:`model_dir`, compiled."""
    from worker.engine import Engine
    from worker.priority import PriorityMap

    engine = Engine(model_dir(settings), precision=settings.model.precision)
    PriorityMap.build(engine.card, settings.triage.priorities, settings.triage.thresholds)  # fail at start-up
    if settings.send.heatmap and engine.heatmap is None:
        log.warning("send.heatmap is on, but no heatmap Secondary Captures will be sent: %s",
                    engine.heatmap_unavailable)
    return engine


@dataclass
class Node:
    """Listener + scheduler with orderly start and stop."""

    settings: Settings
    batch: bool = True
    db: store.Database | None = None
    spool: Spool | None = None
    engine: Engine | None = None
    server: Any = None
    scheduler: BatchScheduler | None = None
    health: Any = None
    web: Any = None
    audit: audit_log.AuditLog = field(default_factory=lambda: audit_log.NULL)
    stopped: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        """Check the host (ports, folders), load the model (when batching), open storage, start the
        listener and the schedule. A :class:`worker.preflight.StartupError` comes before the model loads."""
        from worker import preflight

        preflight.check_node(self.settings)
        if self.batch:
            self.engine = load_engine(self.settings)  # fail before opening a port
            log.info(
                "model %s %s loaded (precision %s)",
                self.engine.card.name,
                self.engine.card.version,
                self.engine.precision,
            )
        self.db, self.spool = open_storage(self.settings)
        self.audit = audit_log.AuditLog(self.settings.storage.audit_path)
        self._audit_start()
        li = self.settings.listener
        try:
            self.server = listener.start(self.settings, listener.Intake(self.db, self.spool, self.settings, self.audit))
        except OSError as exc:  # taken since the check: the same one-line error
            self.stop()
            raise preflight.bind_error("listener", li.bind_address, li.port, exc) from None
        on_batch = None
        if self.settings.health.enabled:
            from worker.health import HealthServer, NodeState

            card = self.engine.card if self.engine is not None else None
            state = NodeState(
                self.settings, self.db, self.spool,
                model_name=card.name if card else None, model_version=card.version if card else None,
                model_precision=self.engine.precision if self.engine is not None else None,
                batch_enabled=self.batch,
            )
            h = self.settings.health
            try:
                self.health = HealthServer(state, h.bind_address, h.port).start()
            except OSError as exc:
                self.stop()
                raise preflight.bind_error("health", h.bind_address, h.port, exc) from None
            on_batch = self.health.metrics.observe
        if self.settings.web.enabled:
            self.web = self._start_web()
        if self.batch and self.engine is not None:
            from worker.scheduler import BatchScheduler

            self.scheduler = BatchScheduler(
                self.db, self.spool, self.engine, self.settings, on_batch=on_batch, audit=self.audit
            )
            self.scheduler.start()

    def _start_web(self) -> Any:
        """The worklist page, with the model card of the engine (or, listener-only, read from disk)."""
        from worker.modelcard import ModelCard, ModelCardError
        from worker.web import WebServer

        card = self.engine.card if self.engine is not None else None
        if card is None:
            try:
                card = ModelCard.load(model_dir(self.settings))
            except (ModelCardError, SettingsError, OSError) as exc:
                log.warning("the web page shows no model card: %s", exc)
        assert self.db is not None and self.spool is not None
        return WebServer(self.settings, self.db, self.spool, card).start()

    def _audit_start(self) -> None:
        """Record the start, and whether the configuration or the model changed since the last one."""
        import dataclasses

        config_sha = audit_log.fingerprint(dataclasses.asdict(self.settings))
        card = self.engine.card if self.engine is not None else None
        model = (
            {"model_name": card.name, "model_version": card.version, "model_sha256": card.bin_sha256} if card else {}
        )
        last = self.audit.last("node_started")
        if last is not None and last.get("config_sha256") != config_sha:
            self.audit.record("config_changed", previous=last.get("config_sha256"), current=config_sha)
        if last is not None and card is not None and last.get("model_sha256") != card.bin_sha256:
            self.audit.record("model_changed", previous_version=last.get("model_version"), current_version=card.version,
                              previous_sha256=last.get("model_sha256"), current_sha256=card.bin_sha256)
        self.audit.record("node_started", pid=os.getpid(), ae_title=self.settings.listener.ae_title,
                          port=self.settings.listener.port, batch=self.batch, config_sha256=config_sha, **model)

    @property
    def port(self) -> int:
        """The bound port (useful when configured as 0)."""
        return int(self.server.server_address[1])

    def stop(self) -> None:
        """Stop accepting associations, finish the running batch, close the database."""
        if self.stopped.is_set():
            return
        if self.server is not None:
            self.server.shutdown()
        if self.scheduler is not None:
            self.scheduler.stop()
        if self.health is not None:
            self.health.stop()
        if self.web is not None:
            self.web.stop()
        if self.db is not None:
            self.db.close()
        self.audit.record("node_stopped", pid=os.getpid())
        self.audit.close()
        self.stopped.set()

    def run_forever(self) -> int:
        """Start, wait for SIGTERM/SIGINT, stop; returns the exit status."""
        done = threading.Event()

        def on_signal(signum: int, _frame: Any) -> None:
            log.info("signal %s received; shutting down", signal.Signals(signum).name)
            done.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        self.start()
        print(f"cxr-triage listening as {self.settings.listener.ae_title} on port {self.port}", flush=True)
        if self.web is not None:
            print(f"worklist page on {self.web.scheme}://{self.web.host}:{self.web.port}/", flush=True)
        sd_notify(f"READY=1\nSTATUS=listening on port {self.port}")
        done.wait()
        sd_notify("STOPPING=1")
        self.stop()
        return 0
