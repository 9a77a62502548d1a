"""A pynetdicom SCU for tests and benchmarks (C-STORE, C-ECHO over loopback), free loopback
ports, and a short-poll wait.
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Callable, Iterable

from pydicom.dataset import Dataset
from pynetdicom import AE, build_context
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # made at import time


def free_port() -> int:
    """A TCP port that is free on loopback right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])

def send(
    datasets: Iterable[Dataset],
    port: int,
    *,
    calling: str = "TESTSCU",
    called: str = "CXRTRIAGE",
    transfer_syntax: str | None = None,
) -> list[int | None]:
    """C-STORE each data set over one association; returns each status (None: not sent)."""
    datasets = list(datasets)
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    seen: set[tuple[str, str]] = set()
    for ds in datasets:
        ts = transfer_syntax or str(ds.file_meta.TransferSyntaxUID)
        key = (str(ds.SOPClassUID), ts)
        if key not in seen:
            seen.add(key)
            ae.add_requested_context(key[0], key[1])
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if not assoc.is_established:
        return [None] * len(datasets)
    out: list[int | None] = []
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            out.append(int(status.Status) if status and "Status" in status else None)
    finally:
        assoc.release()
    return out


def echo(port: int, *, calling: str = "TESTSCU", called: str = "CXRTRIAGE", timeout: float = 10,
         tls: ssl.SSLContext | None = None) -> int | None:
    """C-ECHO (over TLS with ``tls``); the status, or None when no association could be made."""
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title=called, tls_args=(tls, "127.0.0.1") if tls else None)
    if not assoc.is_established:
        return None
    try:
        status = assoc.send_c_echo()
        return int(status.Status) if status and "Status" in status else None
    finally:
        assoc.release()


def requested(sop_class: str, ts: str) -> PresentationContext:  # pragma: no cover - small convenience
    return build_context(sop_class, ts)


def wait_for(predicate: Callable[[], object], timeout: float = 10.0, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until true or the timeout (short polls, never long sleeps)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())
