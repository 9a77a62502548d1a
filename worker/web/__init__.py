"""The read-only worklist page served by the node (``[web]``; ``serve --web-port N``).

Starlette routes with Jinja2 templates (worker/web/pages.py), served by uvicorn in a thread of
the node, so it reads the same database as ``cxr-triage query``. Off by default and bound to
loopback by default; a login (worker/web/auth.py) is required beyond loopback. TLS uses
``web.tls_cert`` / ``web.tls_key`` like the DICOM listener. Needs the ``web`` extra.
"""

from __future__ import annotations

import logging
import threading
import time

from worker import store
from worker.modelcard import ModelCard
from worker.settings import Settings
from worker.spool import Spool

log = logging.getLogger(__name__)


class WebServer:
    """uvicorn in a daemon thread; :meth:`stop` ends it."""

    def __init__(self, settings: Settings, db: store.Database, spool: Spool, card: ModelCard | None) -> None:
        import uvicorn

        from worker.web.pages import Pages

        w = settings.web
        self.app = Pages(settings, db, spool, card).app()
        config = uvicorn.Config(
            self.app, host=w.bind_address, port=int(w.port or 0), log_level="warning", access_log=False,
            ssl_certfile=str(w.tls_cert) if w.tls_cert else None, ssl_keyfile=str(w.tls_key) if w.tls_key else None,
            lifespan="off",
        )
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, name="cxr-triage-web", daemon=True)
        self.scheme = "https" if w.tls_cert else "http"

    def start(self, timeout: float = 15.0) -> WebServer:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise OSError("the web page could not start (port in use?)")
            time.sleep(0.02)
        log.info("worklist page on %s://%s:%d/", self.scheme, self.host, self.port)
        return self

    @property
    def host(self) -> str:
        return str(self.server.config.host)

    @property
    def port(self) -> int:
        """The bound port (useful when configured as 0)."""
        return int(self.server.servers[0].sockets[0].getsockname()[1])

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(10)
