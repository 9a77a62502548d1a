"""Delivery of results: C-STORE to DICOM peers, files in a folder, HL7 v2 to a RIS, FHIR to a server.

Every result object is durably in the spool (``results/``) and its delivery row committed
before any send is tried, so a failed send loses nothing. A send that fails is retried with
exponential backoff and jitter (``send.backoff_seconds`` doubling up to
``send.backoff_max_seconds``, +/- ``send.jitter``), up to ``send.max_attempts``; then the row is
``send_failed`` with the last DIMSE status or network error, and ``cxr-triage resend`` puts it
back.

C-STORE warnings 0xB000 (coercion of data elements), 0xB006 (elements discarded) and 0xB007
(data set does not match SOP class) mean the peer stored the object (PS3.4 B.2.3), so they count
as delivered. The association proposes only the presentation contexts the objects need
(their SOP classes, in Explicit VR Little Endian, as written).

HL7 (worker/hl7.py) and FHIR (worker/fhir.py) messages are files in the spool too, built with
the SR; they go through the same rows, leases, backoff and ``send_failed`` as C-STORE.

Result UIDs are deterministic (worker/results/common.py), so sending the same object twice replaces it
in PACS rather than duplicating it.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom import _config as pynetdicom_config

from worker import audit as audit_log
from worker import store, tls
from worker.settings import Destination, Settings
from worker.spool import Spool, SpoolError

log = logging.getLogger(__name__)

# C-STORE from a file path sends the file's encoded data set as it is, read in chunks (pynetdicom
# STORE_SEND_CHUNKED_DATASET), instead of dcmread + re-encode: the result objects in the spool are
# already in the transfer syntax proposed for them (Explicit VR Little Endian), and decoding and
# re-encoding an SR of ~160 nested items cost ~20 ms of CPU per object (issue 18).  The bytes the
# peer gets are the spool's, byte for byte.  Module-level: pynetdicom reads it per C-STORE.
pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True

DELIVERED = frozenset({0x0000, 0xB000, 0xB006, 0xB007})


@dataclass
class SendReport:
    """What one pass over due deliveries did."""

    sent: int = 0
    retrying: int = 0
    failed: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)


def backoff_seconds(attempt: int, settings: Settings, rng: random.Random | None = None) -> float:
    """Delay after failed attempt number ``attempt`` (1-based): exponential, capped, jittered."""
    se = settings.send
    base = min(se.backoff_max_seconds, se.backoff_seconds * 2 ** max(attempt - 1, 0))
    r = (rng or random).uniform(-se.jitter, se.jitter)
    return cast(float, max(0.0, base * (1.0 + r)))


def _to_folder(
    dest: Destination, spool: Spool, items: Sequence[store.DeliveryClaim]
) -> list[tuple[int | None, str | None]]:
    """Copy each object durably to ``<path>/<sop_instance_uid>.dcm`` (atomic, fsync'd)."""
    assert dest.path is not None
    target = Spool(dest.path, fsync=spool.fsync)
    out: list[tuple[int | None, str | None]] = []
    for d in items:
        try:
            data = spool.path(d.path).read_bytes()
            target.write(f"{d.sop_instance_uid}.dcm", data)
            out.append((None, None))
        except (OSError, SpoolError) as exc:
            out.append((None, f"folder {dest.path}: {getattr(exc, 'strerror', None) or exc}"))
    return out


def _stored_file(spool: Spool, relpath: str) -> Path:
    """The spool file of a result object, checked to be a DICOM file (PS3.10 7.1: 128-byte preamble
    and "DICM") with a File Meta Information header that names its SOP class, instance and
    transfer syntax, which a C-STORE from the file needs; raises ValueError or OSError otherwise."""
    path = spool.path(relpath)
    try:
        meta = read_file_meta_info(path)  # checks the preamble and "DICM" first
    except InvalidDicomError:
        raise ValueError(f"{relpath} is not a DICOM file") from None
    missing = [kw for kw in ("MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID", "TransferSyntaxUID")
               if kw not in meta]
    if missing:
        raise ValueError(f"{relpath} lacks {', '.join(missing)} in its file meta")
    return path


def _to_peer(
    dest: Destination, spool: Spool, items: Sequence[store.DeliveryClaim], settings: Settings
) -> list[tuple[int | None, str | None]]:
    """C-STORE the objects over up to ``send.associations`` associations at once, each object on
    one of them, in order within each; (status, error) per object, in the order of ``items``.

    A PACS stores an object in tens of milliseconds of mostly disk waits (Orthanc: file and index
    synced per instance, about 100 ms here), so one association at a time leaves the node's
    cores idle; PACS accept several associations from one AE (Orthanc: DicomThreadsCount, 4 by
    default), as modalities and routers use them."""
    n = max(1, min(settings.send.associations, len(items) // _MIN_PER_ASSOCIATION or 1))
    if n == 1:
        return _to_peer_one(dest, spool, items, settings)
    chunks = [list(items[i::n]) for i in range(n)]
    with ThreadPoolExecutor(n, thread_name_prefix=f"send-{dest.name}") as pool:
        parts = list(pool.map(lambda chunk: _to_peer_one(dest, spool, chunk, settings), chunks))
    out: list[tuple[int | None, str | None]] = [(None, None)] * len(items)
    for i, part in enumerate(parts):
        out[i::n] = part
    return out


#: Fewer objects than this per association are sent over one (an association costs a few ms).
_MIN_PER_ASSOCIATION = 4


def _to_peer_one(
    dest: Destination, spool: Spool, items: Sequence[store.DeliveryClaim], settings: Settings
) -> list[tuple[int | None, str | None]]:
    """C-STORE each object over one association; (status, error) per object."""
    ae = AE(ae_title=dest.calling_ae_title or settings.listener.ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = settings.send.timeout
    for sop_class in sorted({d.sop_class_uid for d in items}):
        ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
    datasets: list[Path | Exception] = []
    for d in items:
        try:
            datasets.append(_stored_file(spool, d.path))
        except (OSError, ValueError) as exc:
            datasets.append(exc)
    if all(isinstance(ds, Exception) for ds in datasets):
        return [(None, f"result object unreadable: {ds}") for ds in datasets]
    tls_args = None
    if dest.tls:
        try:
            tls_args = (tls.client_context(dest.tls_ca, dest.tls_cert, dest.tls_key), dest.host)
        except (OSError, ValueError) as exc:
            return [(None, f"{dest.name}: TLS set-up failed: {exc}")] * len(items)
    try:
        assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, tls_args=tls_args)
    except Exception as exc:  # DNS failure and the like
        return [(None, f"{dest.name}: cannot associate: {exc}")] * len(items)
    if not assoc.is_established:
        # pynetdicom reports a refused or timed-out TCP connection as an abort
        why = (
            "association rejected" if assoc.is_rejected else "no association (connection refused, timed out or aborted)"
        )
        return [(None, f"{dest.name} ({dest.ae_title}@{dest.host}:{dest.port}): {why}")] * len(items)
    out: list[tuple[int | None, str | None]] = []
    try:
        for ds in datasets:
            if isinstance(ds, Exception):
                out.append((None, f"result object unreadable: {ds}"))
                continue
            if not assoc.is_established:
                out.append((None, f"{dest.name}: association lost"))
                continue
            try:
                rsp = assoc.send_c_store(ds)
            except Exception as exc:
                out.append((None, f"{dest.name}: C-STORE error: {exc}"))
                continue
            if rsp is None or "Status" not in rsp:
                out.append((None, f"{dest.name}: no response (timeout or abort)"))
                continue
            status = int(rsp.Status)
            if status in DELIVERED:
                out.append((status, None))
            else:
                comment = str(rsp.get("ErrorComment", "")).strip()
                out.append((status, f"{dest.name}: status 0x{status:04X}" + (f" ({comment})" if comment else "")))
    finally:
        if assoc.is_established:
            assoc.release()
    return out


def _to_service(
    dest: Destination, spool: Spool, items: Sequence[store.DeliveryClaim], settings: Settings
) -> list[tuple[int | None, str | None]]:
    """Send the spooled HL7 or FHIR messages: one MLLP connection, or one HTTP POST each."""
    payloads: list[bytes | Exception] = []
    for d in items:
        try:
            payloads.append(spool.path(d.path).read_bytes())
        except (OSError, ValueError) as exc:
            payloads.append(exc)
    if dest.type == "hl7":
        from worker import hl7

        errors = hl7.send(dest, [p.decode("utf-8") if isinstance(p, bytes) else p for p in payloads],
                          settings.send.timeout)
    else:
        from worker import fhir

        errors = [fhir.post(dest, p, settings.send.timeout) if isinstance(p, bytes) else f"message unreadable: {p}"
                  for p in payloads]
    return [(None, e) for e in errors]


def send_due(
    db: store.Database,
    spool: Spool,
    settings: Settings,
    *,
    only: Sequence[int] | None = None,
    limit: int = 256,
    audit: audit_log.AuditLog = audit_log.NULL,
) -> SendReport:
    """Send every due delivery (or only the given ids); mark each sent, retrying or send_failed."""
    t0 = time.perf_counter()
    report = SendReport()
    claims = store.claim_deliveries(db, limit, settings.send.lease_seconds, only=only)
    if not claims:
        return report
    by_dest: dict[str, list[store.DeliveryClaim]] = defaultdict(list)
    for c in claims:
        by_dest[c.destination].append(c)
    configured = {d.name: d for d in settings.result_destinations}
    for name, items in by_dest.items():
        dest = configured.get(name)
        results: list[tuple[int | None, str | None]]
        if dest is None:
            results = [(None, f"destination {name!r} is no longer configured")] * len(items)
        elif dest.type == "folder":
            results = _to_folder(dest, spool, items)
        elif dest.message_based:
            results = _to_service(dest, spool, items, settings)
        else:
            results = _to_peer(dest, spool, items, settings)
        for claim, (status, error) in zip(items, results, strict=True):
            if error is None:
                store.mark_sent(db, claim.id, status)
                audit.record("result_sent", sop_instance_uid=claim.sop_instance_uid, destination=name,
                             status=f"0x{status:04X}" if status is not None else None, attempt=claim.attempts)
                report.sent += 1
                continue
            state = store.mark_retry(
                db, claim.id, status=status, error=error,
                delay_seconds=backoff_seconds(claim.attempts, settings),
                max_attempts=settings.send.max_attempts,
            )
            report.errors.append(error)
            audit.record("result_send_failed", sop_instance_uid=claim.sop_instance_uid, destination=name,
                         status=f"0x{status:04X}" if status is not None else None, attempt=claim.attempts,
                         final=state == store.SendState.FAILED.value, error=error)
            if state == store.SendState.FAILED.value:
                report.failed += 1
                log.error("delivery of %s to %s failed for good: %s", claim.sop_instance_uid, name, error)
            else:
                report.retrying += 1
                log.warning("delivery of %s to %s will be retried (attempt %d): %s", claim.sop_instance_uid, name,
                            claim.attempts, error)
    report.seconds = time.perf_counter() - t0
    return report


def send_until_idle(
    db: store.Database,
    spool: Spool,
    settings: Settings,
    *,
    audit: audit_log.AuditLog = audit_log.NULL,
    should_stop: Callable[[], bool] | None = None,
) -> SendReport:
    """:func:`send_due` passes until one finds nothing due (or ``should_stop`` says so); the totals.

    Deliveries that fail come back only after their backoff, so the loop ends."""
    total = SendReport()
    while should_stop is None or not should_stop():
        r = send_due(db, spool, settings, audit=audit)
        total.sent += r.sent
        total.retrying += r.retrying
        total.failed += r.failed
        total.seconds += r.seconds
        total.errors += r.errors
        if r.sent + r.retrying + r.failed == 0:
            break
    return total


class BackgroundSender:
    """Sends due deliveries in its own thread, so the pipeline never waits for a PACS.

    Woken by :meth:`wake` when a batch has committed result objects (and every
    ``send.retry_poll_seconds`` for retries that have come due), it runs :func:`send_due`
    passes until nothing is due.  Meanwhile the next batch decodes and infers: the time a
    destination takes to store an object (about 100 ms per SR into an Orthanc in the end-to-end
    benchmark) overlaps with our own work instead of adding to it.  Deliveries are rows with
    leases, so this thread, a retry pass and another worker process never send one twice.
    """

    def __init__(
        self, db: store.Database, spool: Spool, settings: Settings, *, audit: audit_log.AuditLog = audit_log.NULL
    ) -> None:
        self.db, self.spool, self.settings, self.audit = db, spool, settings, audit
        self.total = SendReport()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="cxr-triage-sender", daemon=True)

    def start(self) -> BackgroundSender:
        self._thread.start()
        return self

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def wake(self) -> None:
        """Results were committed: send them now rather than at the next retry poll."""
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.settings.send.retry_poll_seconds)
            self._wake.clear()
            self._send()

    def _send(self) -> None:
        try:
            r = send_until_idle(self.db, self.spool, self.settings, audit=self.audit, should_stop=self._stop.is_set)
        except Exception:  # keep the thread alive; the rows keep their leases and come back
            log.exception("delivery pass failed")
            return
        self.total.sent += r.sent
        self.total.retrying += r.retrying
        self.total.failed += r.failed

    def stop(self, timeout: float | None = 60.0) -> None:
        """Finish the pass in progress (no new one) and end the thread."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
