"""Start-up checks: what would stop the node, found before the model loads.

A port already taken, a bind address this host does not have, or a data folder that is not a
writable folder used to surface as a 30-line traceback with exit status 1, some of them after
the listener had started and the model had loaded (seconds of work for nothing), and systemd's
``Restart=on-failure`` then restarted the node in a loop. These checks run first and raise
:class:`StartupError`, whose message is one line naming the setting and its value; the command
exits with status 2 (bad configuration), which the systemd units exclude from restarting
(``RestartPreventExitStatus=2``).

The ports are checked by binding a socket the way the servers do (``SO_REUSEADDR``, the address
family of the resolved address) and closing it again. Something could take the port between the
check and the real bind; :func:`bind_error` turns the real bind's ``OSError`` into the same
one-line error, so that case reads the same.
"""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

from worker.settings import Settings, SettingsError


class StartupError(SettingsError):
    """The node cannot start with this configuration on this host; the message names the setting."""


def bind_error(section: str, address: str, port: int, exc: OSError) -> StartupError:
    """A one-line :class:`StartupError` for a failed bind of ``section``'s address and port."""
    if isinstance(exc, socket.gaierror):
        return StartupError(f"{section}.bind_address: {address!r} is not an address of this host ({exc.strerror})")
    if exc.errno == errno.EADDRINUSE:
        return StartupError(f"{section}.port: port {port} on {address} is already in use by another process")
    if exc.errno == errno.EADDRNOTAVAIL:
        return StartupError(f"{section}.bind_address: {address} is not an address of this host")
    if exc.errno == errno.EACCES:
        return StartupError(f"{section}.port: port {port} on {address} needs privileges this process does not have "
                            "(ports below 1024; see docs/operations.md)")
    return StartupError(f"{section}.bind_address/port: cannot listen on {address}:{port}: {exc.strerror or exc}")


def check_bind(section: str, address: str, port: int) -> None:
    """Raise :class:`StartupError` unless a server could listen on ``address``:``port`` now."""
    try:
        infos = socket.getaddrinfo(address, port, 0, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        if isinstance(exc, socket.gaierror):
            raise bind_error(section, address, port, exc) from None
        raise StartupError(f"{section}.bind_address: {address!r} is not an address of this host") from None
    family, kind, proto, _, sockaddr = infos[0]
    try:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(sockaddr)
    except OSError as exc:
        raise bind_error(section, address, port, exc) from None


def check_folder(setting: str, path: Path) -> None:
    """Raise :class:`StartupError` unless ``path`` is (or can be created as) a writable folder.

    Nothing is created here: the first existing part of the path must be a folder this process
    may write to (``access(2)``, which also reports a read-only file system).
    """
    probe = path.expanduser().absolute()
    while not probe.exists():
        if probe.is_symlink():  # a dangling link: mkdir would fail
            raise StartupError(f"{setting}: {path} is a broken symbolic link")
        probe = probe.parent
    if not probe.is_dir():
        what = (
            f"{path} is not a folder"
            if probe == path.expanduser().absolute()
            else f"{probe} (in {path}) is not a folder"
        )
        raise StartupError(f"{setting}: {what}")
    if not os.access(probe, os.W_OK | os.X_OK):
        where = path if probe == path.expanduser().absolute() else f"{probe} (to create {path})"
        raise StartupError(f"{setting}: {where} is not writable by this user (uid {os.geteuid()})")


def check_storage(settings: Settings) -> None:
    """The folders the node writes: the data folder, the spool and the audit trail's folder."""
    st = settings.storage
    if st.database_url is None or st.spool_dir is None or st.audit_log is None:
        check_folder("storage.data_dir", st.data_dir)
    if st.spool_dir is not None:
        check_folder("storage.spool_dir", st.spool_dir)
    if st.audit_log is not None:
        check_folder("storage.audit_log", st.audit_log.parent)


def check_node(settings: Settings, *, listener: bool = True) -> None:
    """Every start-up check of ``serve`` (``listener=False``: of ``batch``), in the order an operator fixes them."""
    check_storage(settings)
    if listener:
        li = settings.listener
        check_bind("listener", li.bind_address, li.port)
        h = settings.health
        if h.enabled:
            if h.port != 0 and h.port == li.port and _same_host(h.bind_address, li.bind_address):
                raise StartupError(f"health.port: {h.port} is also listener.port")
            check_bind("health", h.bind_address, h.port)
        w = settings.web
        if w.enabled and w.port:
            for other, port, addr in (
                ("listener", li.port, li.bind_address),
                ("health", h.port if h.enabled else 0, h.bind_address),
            ):
                if port and w.port == port and _same_host(w.bind_address, addr):
                    raise StartupError(f"web.port: {w.port} is also {other}.port")
            check_bind("web", w.bind_address, w.port)


def _same_host(a: str, b: str) -> bool:
    wildcard = {"0.0.0.0", "::", ""}
    return a == b or a in wildcard or b in wildcard
