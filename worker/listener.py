"""The DICOM listener: Storage SCP (PS3.4 Annex B) and Verification SCP (PS3.4 Annex A).

Handlers are plain functions with their dependencies bound explicitly
(``evt_handlers=[(evt.EVT_C_STORE, handle_store, [intake])]``). They never raise into the
network stack: every path returns a DIMSE status, and every refusal is recorded as a row of
``intake_events`` with a reason a person can read.

A C-STORE is answered with success only after the object, exactly as received (file meta
information + the encoded data set; pixels are never decoded here), is durably in the spool and
its queue row is committed. Decoding happens later, in the batch pipeline, so intake stays fast.

Status codes returned (PS3.4 Table B.2-1, PS3.7 Annex C):

========  ===============================================================
0x0000    stored and queued, or a re-send of an instance already stored; with
          ``listener.accept_out_of_scope``, also an object of another SOP class (not stored,
          recorded as an ``ignored`` intake event)
0x0122    refused: SOP class not supported (not CR, DX or greyscale SC)
0xA700    refused: out of resources (disk reserve reached, spool or database failure)
0xA900    error: data set does not match SOP class (UIDs in data set differ from request)
0xC000    error: cannot understand (invalid UID, also one over 64 characters; unreadable data set)
========  ===============================================================
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from io import BytesIO
from typing import Any, cast

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # made at import time
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy.exc import IntegrityError

from worker import audit as audit_log
from worker import store, tls
from worker.settings import Settings
from worker.spool import Spool, SpoolError, uid_problem

log = logging.getLogger(__name__)

#: SOP classes this node screens (PS3.4 B.5): chest radiographs and greyscale secondary captures.
ACCEPTED_SOP_CLASSES: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.1": "Computed Radiography Image Storage",
    "1.2.840.10008.5.1.4.1.1.1.1": "Digital X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "Digital X-Ray Image Storage - For Processing",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.2": "Multi-frame Grayscale Byte Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.3": "Multi-frame Grayscale Word Secondary Capture Image Storage",
}

#: Transfer syntaxes accepted; each has a decoder in the base install (pylibjpeg plugins, pydicom).
ACCEPTED_TRANSFER_SYNTAXES: list[str] = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
]

STATUS_SUCCESS = 0x0000
STATUS_SOP_CLASS_NOT_SUPPORTED = 0x0122
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DOES_NOT_MATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC000

_HEADER_TAGS = [
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "AccessionNumber",
    "Modality",
    "PatientID",  # compared on a re-send with other content; never logged or stored
]


@dataclass
class Intake:
    """Everything the C-STORE handler needs, bound to it explicitly."""

    db: store.Database
    spool: Spool
    settings: Settings
    audit: audit_log.AuditLog = audit_log.NULL


def _status(code: int, comment: str) -> Dataset:
    """A status data set with an Error Comment (LO, 64 characters) for the peer's log."""
    ds = Dataset()
    ds.Status = code
    if code != STATUS_SUCCESS:
        ds.ErrorComment = comment[:64]
    return ds


class _Sha256InBackground:
    """sha256 of a buffer, computed on a helper thread while the caller goes on.

    hashlib releases the GIL for large buffers, so hashing a 10 MB object (about 9 ms) runs
    on the second core while the duplicate lookup and the durable spool write (write, fsync,
    rename, fsync folder: they release the GIL too) run here. The bytes hashed and the digest
    are exactly what a synchronous ``hashlib.sha256(data).hexdigest()`` gives. Small objects
    (under ``MIN_BYTES``) are hashed at once: a thread would cost more than it saves.
    """

    MIN_BYTES = 1 << 20

    def __init__(self, data: bytes) -> None:
        self._data: bytes | None = data
        self._digest: str | None = None
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        if len(data) >= self.MIN_BYTES:
            self._thread = threading.Thread(target=self._run, name="sha256", daemon=True)
            try:
                self._thread.start()
                return
            except RuntimeError:  # pragma: no cover - no thread to be had: hash here instead
                self._thread = None
        self._run()

    def _run(self) -> None:
        try:
            self._digest = hashlib.sha256(self._data or b"").hexdigest()
        except BaseException as exc:  # pragma: no cover - MemoryError
            self._error = exc
        finally:
            self._data = None

    def hexdigest(self) -> str:
        if self._thread is not None:
            self._thread.join()
        if self._error is not None:  # pragma: no cover
            raise self._error
        assert self._digest is not None
        return self._digest


def _text(value: Any) -> str | None:
    if value is None:
        return None
    s = str(value).strip()
    return s or None


def _clip(value: str | None, n: int) -> str | None:
    return value[:n] if value is not None else None


def handle_store(event: evt.Event, intake: Intake) -> Dataset | int:
    """C-STORE: validate, store durably, enqueue, then answer (PS3.4 B.2.2)."""
    try:
        return _store(event, intake)
    except Exception as exc:  # never raise into pynetdicom
        log.exception("unexpected error while storing an object")
        reason = f"internal error while storing: {type(exc).__name__}"
        store.record_event(intake.db, "refused", reason, status=STATUS_OUT_OF_RESOURCES)
        return _status(STATUS_OUT_OF_RESOURCES, reason)


def _store(event: evt.Event, intake: Intake) -> Dataset | int:
    req = cast(C_STORE, event.request)  # EVT_C_STORE carries a C-STORE request
    sop_uid = str(req.AffectedSOPInstanceUID or "")
    sop_class = str(req.AffectedSOPClassUID or "")
    calling = _text(event.assoc.requestor.ae_title)
    peer = f"{event.assoc.requestor.address}:{event.assoc.requestor.port}"

    def refuse(code: int, reason: str) -> Dataset:
        log.warning("refused C-STORE from %s (status 0x%04X): %s", calling, code, reason)
        intake.audit.record("object_refused", calling_ae=calling, peer=peer, status=f"0x{code:04X}", reason=reason,
                            sop_instance_uid=sop_uid if not uid_problem(sop_uid) else None)
        store.record_event(
            intake.db, "refused", reason, status=code, calling_ae=calling, peer=peer,
            sop_instance_uid=sop_uid, sop_class_uid=sop_class,
        )
        return _status(code, reason)

    if sop_class not in ACCEPTED_SOP_CLASSES:
        if intake.settings.listener.accept_out_of_scope:
            # A PACS auto-route sends whole studies: acknowledge what we do not screen, store
            # nothing, and say so (PS3.4 B.2.3 leaves what an SCP keeps to its conformance statement).
            reason = (f"SOP class {sop_class} is not screened by this node; acknowledged without storing "
                      "(listener.accept_out_of_scope)")
            log.info("ignored C-STORE of SOP class %s from %s (not stored)", sop_class, calling)
            intake.audit.record("object_ignored", calling_ae=calling, peer=peer, sop_class_uid=sop_class,
                                sop_instance_uid=sop_uid if not uid_problem(sop_uid) else None)
            store.record_event(intake.db, "ignored", reason, status=STATUS_SUCCESS, calling_ae=calling, peer=peer,
                              sop_instance_uid=sop_uid, sop_class_uid=sop_class)
            return STATUS_SUCCESS
        return refuse(STATUS_SOP_CLASS_NOT_SUPPORTED, f"SOP class {sop_class} is not accepted by this node")
    problem = uid_problem(sop_uid)
    if problem:
        return refuse(STATUS_CANNOT_UNDERSTAND, f"invalid SOP Instance UID: {problem}")

    t0 = time.perf_counter()
    data = event.encoded_dataset(include_meta=True)
    limit = intake.settings.listener.max_object_mb
    if len(data) > limit * 2**20:
        return refuse(STATUS_OUT_OF_RESOURCES, f"object of {len(data) / 2**20:.0f} MB exceeds listener.max_object_mb")
    if not intake.spool.has_room(len(data)):
        return refuse(
            STATUS_OUT_OF_RESOURCES,
            f"spool below its free-space reserve ({intake.settings.storage.disk_reserve_mb} MB)",
        )

    # Header only: stop before the pixels, so nothing large is decoded here.
    try:
        header = dcmread(BytesIO(data), stop_before_pixels=True, specific_tags=_HEADER_TAGS)
        ds_sop_uid = _text(header.get("SOPInstanceUID"))
        ds_sop_class = _text(header.get("SOPClassUID"))
    except Exception as exc:
        return refuse(STATUS_CANNOT_UNDERSTAND, f"data set cannot be parsed: {type(exc).__name__}")
    if ds_sop_uid != sop_uid or ds_sop_class != sop_class:
        return refuse(STATUS_DOES_NOT_MATCH, "SOP Instance/Class UID in data set differ from the request")
    for key in ("StudyInstanceUID", "SeriesInstanceUID"):
        value = _text(header.get(key))
        if value is not None and uid_problem(value):
            return refuse(STATUS_CANNOT_UNDERSTAND, f"invalid {key}: {uid_problem(value)}")

    # Hash while the lookup and the durable write run (see _Sha256InBackground).
    sha256 = _Sha256InBackground(data)
    existing = store.find(intake.db, sop_uid)
    if existing is not None:
        digest = sha256.hexdigest()
        if digest != existing.sha256:
            # A re-send may differ in bytes (another transfer syntax, coerced attributes), but
            # the same UID on another patient's or study's image is a UID collision: saying
            # success would drop that image unscreened while its sender deletes it.
            clash = _identity_clash(intake.spool, existing, header)
            if clash:
                return refuse(STATUS_CANNOT_UNDERSTAND, f"SOP Instance UID is already stored for another {clash}")
        same = store.record_resend(intake.db, sop_uid, digest, calling, peer)
        intake.audit.record("object_resent", sop_instance_uid=sop_uid, calling_ae=calling, peer=peer, identical=same)
        log.info("re-send of stored instance %s acknowledged, not queued again", sop_uid)
        return STATUS_SUCCESS

    relpath = Spool.relpath_for(sop_uid)
    try:
        size = intake.spool.write(relpath, data)
    except SpoolError as exc:
        return refuse(STATUS_OUT_OF_RESOURCES, f"spool write failed: {exc.strerror}")
    digest = sha256.hexdigest()

    item = store.Received(
        sop_instance_uid=sop_uid,
        sop_class_uid=sop_class,
        study_instance_uid=_text(header.get("StudyInstanceUID")),
        series_instance_uid=_text(header.get("SeriesInstanceUID")),
        # Clipped to the columns' widths (SH 16 / CS 16 by the standard; senders exceed them):
        # PostgreSQL would refuse the row, and the peer would get 0xA700 for ever.
        accession_number=_clip(_text(header.get("AccessionNumber")), 64),
        modality=_clip(_text(header.get("Modality")), 16),
        transfer_syntax=str(event.context.transfer_syntax),
        calling_ae=_clip(calling, 16),
        path=relpath,
        size_bytes=size,
        sha256=digest,
    )
    try:
        store.enqueue(intake.db, item)
    except IntegrityError:
        # Another association stored the same instance a moment ago: a re-send.
        store.record_resend(intake.db, sop_uid, digest, calling, peer)
        return STATUS_SUCCESS
    except Exception as exc:
        # The file may stay in the spool, but the peer gets a failure and will send again.
        return refuse(STATUS_OUT_OF_RESOURCES, f"database unavailable: {type(exc).__name__}")
    log.info("stored %s (%d bytes, %s) from %s", sop_uid, size, item.transfer_syntax, calling)
    intake.audit.record("object_received", sop_instance_uid=sop_uid, sop_class_uid=sop_class,
                        study_instance_uid=item.study_instance_uid, calling_ae=calling, peer=peer, size=size,
                        transfer_syntax=item.transfer_syntax, ms=round((time.perf_counter() - t0) * 1e3, 1))
    return STATUS_SUCCESS


def _identity_clash(spool: Spool, existing: store.Instance, header: Dataset) -> str | None:
    """"study" or "patient" when ``header`` names another study or patient than the stored
    object with the same SOP Instance UID; None when they agree or the stored one is unreadable."""
    study = _text(header.get("StudyInstanceUID"))
    if study is not None and existing.study_instance_uid is not None and study != existing.study_instance_uid:
        return "study"
    try:
        stored = dcmread(spool.path(existing.path), stop_before_pixels=True, specific_tags=["PatientID"])
    except Exception:
        return None
    if _text(stored.get("PatientID")) != _text(header.get("PatientID")):
        return "patient"
    return None


def handle_echo(event: evt.Event) -> int:
    """C-ECHO (PS3.4 A.4): always success while the node runs."""
    return STATUS_SUCCESS


def handle_rejected(event: evt.Event, intake: Intake) -> None:
    """Record why an association was rejected (calling AE not allowed, called AE wrong, busy)."""
    try:
        rq = event.assoc.requestor.primitive
        calling = _text(getattr(rq, "calling_ae_title", None))
        called = _text(getattr(rq, "called_ae_title", None))
        li = intake.settings.listener
        if li.allowed_calling_aets and calling not in li.allowed_calling_aets:
            reason = f"calling AE title {calling!r} is not in listener.allowed_calling_aets"
        elif li.require_called_aet and called != li.ae_title:
            reason = f"called AE title {called!r} is not {li.ae_title!r}"
        else:
            reason = "association rejected (too many associations or failed negotiation)"
        log.warning("rejected association from %s: %s", event.assoc.requestor.address, reason)
        intake.audit.record("association_rejected", calling_ae=calling, called_ae=called,
                            peer=f"{event.assoc.requestor.address}:{event.assoc.requestor.port}", reason=reason)
        store.record_event(
            intake.db, "association_rejected", reason, calling_ae=calling,
            peer=f"{event.assoc.requestor.address}:{event.assoc.requestor.port}",
        )
    except Exception:  # pragma: no cover
        log.exception("could not record a rejected association")


def _ui_without_length_limit(value: Any) -> tuple[bool, str]:
    """pynetdicom's check of UIDs in DIMSE messages, less its 64-character limit.

    pynetdicom refuses a command whose Affected SOP Instance UID is longer than 64 characters
    (PS3.5 9.1) while decoding it, before any handler runs, and aborts the association; a sender
    retries an aborted association for ever. Let through, the request reaches
    :func:`handle_store`, whose :func:`worker.spool.uid_problem` refuses it with 0xC000 and a
    recorded reason, like every other invalid UID (and nothing is stored: file names come only
    from valid UIDs). Every other check of pynetdicom's stays.
    """
    from pynetdicom import _validators

    ok, why = _validators.validate_ui(value)
    if not ok and why == "must not exceed 64 characters":
        return True, ""
    return ok, why


def make_ae(settings: Settings) -> AE:
    """An Application Entity configured from ``[listener]``."""
    from pynetdicom import _config

    # PS3.7 C.4.2 / pynetdicom's documented hook (_config.VALIDATORS): see _ui_without_length_limit
    _config.VALIDATORS["UI"] = _ui_without_length_limit
    li = settings.listener
    ae = AE(ae_title=li.ae_title)
    ae.maximum_pdu_size = li.max_pdu
    ae.maximum_associations = li.max_associations
    ae.acse_timeout = li.acse_timeout
    ae.dimse_timeout = li.dimse_timeout
    ae.network_timeout = li.network_timeout
    ae.require_called_aet = li.require_called_aet
    ae.require_calling_aet = list(li.allowed_calling_aets)
    ae.add_supported_context(Verification)
    # Every storage SOP class is accepted at association so that an object we do not screen
    # (a CT slice routed here by mistake) gets an explicit per-object status, 0x0122, and a
    # recorded reason, rather than vanishing in negotiation.
    uids = list(ACCEPTED_SOP_CLASSES) + [
        cx.abstract_syntax for cx in AllStoragePresentationContexts
        if cx.abstract_syntax is not None and cx.abstract_syntax not in ACCEPTED_SOP_CLASSES
    ]
    for uid in uids:
        ae.add_supported_context(uid, ACCEPTED_TRANSFER_SYNTAXES)
    return ae


def handle_accepted(event: evt.Event, intake: Intake) -> None:
    """Audit an accepted association (who, from where, over TLS or not)."""
    a = event.assoc
    intake.audit.record("association_accepted", calling_ae=_text(a.requestor.ae_title),
                        peer=f"{a.requestor.address}:{a.requestor.port}",
                        tls=intake.settings.listener.tls_cert is not None)


def handle_released(event: evt.Event, intake: Intake) -> None:
    """Audit the end of an association."""
    a = event.assoc
    intake.audit.record("association_released", calling_ae=_text(a.requestor.ae_title),
                        peer=f"{a.requestor.address}:{a.requestor.port}")


class NodeServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with two changes a hospital network needs.

    * ``verify_request``: connections from addresses outside ``listener.allowed_peers`` are
      closed before any DICOM is spoken, and recorded.
    * ``get_request``: the TLS handshake runs in the association's own thread (on first read),
      not in the accept loop, so a slow or silent TLS client cannot stall every other sender.

    Made by ``AE.make_server(..., server_class=NodeServer, allowed_networks=..., intake=...)``:
    pynetdicom passes the extra keyword arguments to this constructor.
    """

    def __init__(
        self,
        *args: Any,
        allowed_networks: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network] = (),
        intake: Intake | None = None,
        **kwargs: Any,
    ) -> None:
        # set before the base constructor: it binds and listens, and may verify requests at once
        self.allowed_networks = list(allowed_networks)
        self.intake = intake
        super().__init__(*args, **kwargs)

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None  # set by the server's constructor
        client_socket, address = self.socket.accept()
        # An accepted socket is blocking with no timeout (Python gives it none, whatever the
        # listening socket has), and pynetdicom reads a whole PDU in one blocking loop: a peer
        # that sends part of a PDU and then nothing held its association thread, and one of
        # max_associations slots, for ever. With network_timeout on the socket, the read fails
        # after that long and the association is closed (tests/reliability/test_corpus.py).
        if self.ae.network_timeout is not None:
            client_socket.settimeout(self.ae.network_timeout)
        if self.ssl_context:
            client_socket = self.ssl_context.wrap_socket(client_socket, server_side=True, do_handshake_on_connect=False)
        return client_socket, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        if not self.allowed_networks:
            return True
        host = client_address[0] if isinstance(client_address, tuple) else str(client_address)
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            ip = None
        if ip is not None and any(ip in net for net in self.allowed_networks):
            return True
        reason = f"peer address {host} is not in listener.allowed_peers"
        log.warning("refused connection: %s", reason)
        if self.intake is not None:
            self.intake.audit.record("association_rejected", peer=f"{host}", reason=reason)
            store.record_event(self.intake.db, "association_rejected", reason, peer=str(host))
        return False


def start(settings: Settings, intake: Intake) -> ThreadedAssociationServer:
    """Start the SCP in a background thread; returns the server (``.shutdown()`` stops it)."""
    intake.spool.remove_stale_temp_files()
    ae = make_ae(settings)
    handlers: list[Any] = [
        (evt.EVT_C_STORE, handle_store, [intake]),
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_REJECTED, handle_rejected, [intake]),
        (evt.EVT_ACCEPTED, handle_accepted, [intake]),
        (evt.EVT_RELEASED, handle_released, [intake]),
    ]
    li = settings.listener
    ssl_context = None
    if li.tls_cert is not None and li.tls_key is not None:
        ssl_context = tls.server_context(li.tls_cert, li.tls_key, li.tls_ca, li.tls_require_client_cert)

    server = ae.make_server(
        (li.bind_address, li.port), ssl_context=ssl_context, evt_handlers=handlers, server_class=NodeServer,
        allowed_networks=[ipaddress.ip_network(p, strict=False) for p in li.allowed_peers], intake=intake,
    )
    _register(ae, server)
    thread = threading.Thread(target=server.serve_forever, name="dicom-listener", daemon=True)
    thread.start()
    log.info("listening as %s on %s:%d%s", li.ae_title, li.bind_address, server.server_address[1],
             " (TLS)" if ssl_context else "")
    return server



def _register(ae: AE, server: ThreadedAssociationServer) -> None:
    """The one use of pynetdicom internals: ``AssociationServer.shutdown()`` removes the server
    from ``ae._servers`` (ValueError when it is not there), and only ``AE.start_server`` adds it,
    which cannot take our server class (it hard-codes ``ThreadedAssociationServer``). So a server
    made with the public ``AE.make_server`` is added here, as ``start_server`` would (pynetdicom
    3.0, ``ae.py`` ``start_server`` and ``transport.py`` ``AssociationServer.shutdown``)."""
    ae._servers.append(server)
