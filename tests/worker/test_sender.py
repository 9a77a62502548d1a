"""Delivery of result objects: folder and C-STORE destinations, retries, backoff, resend."""

from __future__ import annotations

import dataclasses
import random
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE, AllStoragePresentationContexts, evt
from sqlalchemy import select
from support import free_port, make_image, to_bytes

from worker import sender
from worker import store as db_store
from worker.settings import Destination, Settings
from worker.spool import Spool


class ScriptedSCP:
    """An in-process Storage SCP answering each C-STORE with the next scripted status."""

    def __init__(self, statuses: list[int], aet: str = "PACS") -> None:
        self.statuses = list(statuses)
        self.received: list[str] = []
        self.encoded: list[bytes] = []  # each C-STORE's data set as it came over the wire
        self.contexts: list[str] = []
        self.port = free_port()
        ae = AE(ae_title=aet)
        ae.supported_contexts = AllStoragePresentationContexts
        ae.require_called_aet = True

        lock = threading.Lock()  # several associations at once: each object's status is the next one

        def on_store(event: evt.Event) -> int:
            with lock:
                self.received.append(str(event.request.AffectedSOPInstanceUID))
                self.encoded.append(event.request.DataSet.getvalue())
                return self.statuses.pop(0) if self.statuses else 0x0000

        def on_accept(event: evt.Event) -> None:
            self.contexts = [str(cx.abstract_syntax) for cx in event.assoc.accepted_contexts]

        self.server = ae.start_server(
            ("127.0.0.1", self.port), block=False,
            evt_handlers=[(evt.EVT_C_STORE, on_store), (evt.EVT_ACCEPTED, on_accept)],
        )

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[tuple[db_store.Database, Spool]]:
    db = db_store.Database.open(f"sqlite:///{tmp_path / 'q.db'}")
    yield db, Spool(tmp_path / "spool")
    db.close()


def _settings(settings: Settings, *dests: Destination, **send: object) -> Settings:
    return dataclasses.replace(
        settings, destinations=list(dests), send=dataclasses.replace(settings.send, **send)
    )


def _result(db: db_store.Database, spool: Spool, dests: list[str], n: int = 1) -> list[str]:
    """Queue ``n`` done jobs, each with a result object (a small image) for the destinations."""
    uids = []
    for i in range(n):
        src = make_image(rows=32, cols=32, seed=i)
        obj = make_image(rows=32, cols=32, seed=100 + i)
        rel = Spool.result_relpath_for(obj.SOPInstanceUID)
        spool.write(rel, to_bytes(obj))
        db_store.enqueue(db, db_store.Received(src.SOPInstanceUID, src.SOPClassUID, None, None, None, "CR", "1.2.840.10008.1.2.1",
                                       None, "x", 1, "0" * 64))
        (c,) = db_store.claim_batch(db, 1, "w", 60)
        db_store.finish(db, "w", [db_store.Outcome(c.id, db_store.State.DONE, predicted_class="normal",
                                           probabilities={"normal": 1.0}, priority="routine")],
                    deliveries={c.id: [db_store.NewDelivery(d, "sr", obj.SOPClassUID, obj.SOPInstanceUID, rel) for d in dests]},
                    model_name="m", model_version="1", model_precision="f32", max_attempts=3)
        uids.append(obj.SOPInstanceUID)
    return uids


def _deliveries(db: db_store.Database) -> list[db_store.Delivery]:
    with db.sessions() as s:
        return list(s.scalars(select(db_store.Delivery).order_by(db_store.Delivery.id)))


def test_folder_destination_writes_each_object_once(store, settings: Settings, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    db, spool = store
    s = _settings(settings, Destination(name="out", type="folder", path=tmp_path / "out"))
    uids = _result(db, spool, ["out"], n=3)
    rep = sender.send_due(db, spool, s)
    assert (rep.sent, rep.retrying, rep.failed) == (3, 0, 0)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(f"{u}.dcm" for u in uids)
    assert dcmread(tmp_path / "out" / f"{uids[0]}.dcm").SOPInstanceUID == uids[0]
    assert all(d.state == "sent" and d.sent_at for d in _deliveries(db))
    assert sender.send_due(db, spool, s).sent == 0  # nothing due twice


@pytest.mark.parametrize("status", [0x0000, 0xB000, 0xB006, 0xB007])
def test_success_and_warnings_count_as_delivered(store, settings: Settings, status: int) -> None:  # type: ignore[no-untyped-def]
    db, spool = store
    scp = ScriptedSCP([status])
    try:
        s = _settings(settings, Destination(name="pacs", type="dicom", ae_title="PACS", host="127.0.0.1", port=scp.port))
        (uid,) = _result(db, spool, ["pacs"])
        assert sender.send_due(db, spool, s).sent == 1
        assert scp.received == [uid]
        assert scp.contexts == ["1.2.840.10008.5.1.4.1.1.1"]  # only the context the object needs
        (d,) = _deliveries(db)
        assert d.state == "sent" and d.last_status == status
    finally:
        scp.stop()


def test_failure_status_retries_with_backoff_then_delivers(store, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    db, spool = store
    scp = ScriptedSCP([0xA700])
    try:
        s = _settings(settings, Destination(name="pacs", type="dicom", ae_title="PACS", host="127.0.0.1", port=scp.port),
                      backoff_seconds=0.2, backoff_max_seconds=1.0, jitter=0.0)
        _result(db, spool, ["pacs"])
        rep = sender.send_due(db, spool, s)
        assert (rep.sent, rep.retrying) == (0, 1) and "0xA700" in rep.errors[0]
        (d,) = _deliveries(db)
        assert d.state == "pending_send" and d.last_status == 0xA700 and d.attempts == 1
        assert sender.send_due(db, spool, s).sent == 0  # not due yet
        from support import wait_for

        assert wait_for(lambda: sender.send_due(db, spool, s).sent == 1, timeout=5)
        assert _deliveries(db)[0].state == "sent"
    finally:
        scp.stop()


def test_unreachable_peer_ends_send_failed_then_resend_delivers(store, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    db, spool = store
    port = free_port()  # nobody listens
    dest = Destination(name="pacs", type="dicom", ae_title="PACS", host="127.0.0.1", port=port)
    s = _settings(settings, dest, backoff_seconds=0.01, backoff_max_seconds=0.01, jitter=0.0, max_attempts=3, timeout=2)
    (uid,) = _result(db, spool, ["pacs"])
    from support import wait_for

    assert wait_for(lambda: (sender.send_due(db, spool, s), _deliveries(db)[0].state)[1] == "send_failed", timeout=20)
    (d,) = _deliveries(db)
    assert d.attempts == 3 and "no association (connection refused" in d.last_error
    # the PACS comes back; an operator resends
    scp = ScriptedSCP([], aet="PACS")
    try:
        s2 = _settings(settings, dataclasses.replace(dest, port=scp.port))
        assert db_store.resend(db, sop_instance_uid=uid) == 1
        assert sender.send_due(db, spool, s2).sent == 1
        assert scp.received == [uid] and _deliveries(db)[0].state == "sent"
    finally:
        scp.stop()


def test_rejected_association_is_a_readable_error(store, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    db, spool = store
    scp = ScriptedSCP([], aet="PACS")
    try:
        s = _settings(settings, Destination(name="pacs", type="dicom", ae_title="WRONGAET", host="127.0.0.1", port=scp.port),
                      max_attempts=1)
        _result(db, spool, ["pacs"])
        assert sender.send_due(db, spool, s).failed == 1
        (d,) = _deliveries(db)
        assert d.state == "send_failed" and "association rejected" in d.last_error
    finally:
        scp.stop()


def test_unconfigured_destination_fails_with_reason(store, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    db, spool = store
    s = _settings(settings, max_attempts=1)
    _result(db, spool, ["gone"])
    sender.send_due(db, spool, s)
    (d,) = _deliveries(db)
    assert d.state == "send_failed" and "no longer configured" in d.last_error


def test_backoff_doubles_caps_and_jitters(settings: Settings) -> None:
    s = _settings(settings, backoff_seconds=10.0, backoff_max_seconds=60.0, jitter=0.0)
    assert [sender.backoff_seconds(a, s) for a in (1, 2, 3, 4, 5)] == [10, 20, 40, 60, 60]
    s = _settings(settings, backoff_seconds=10.0, backoff_max_seconds=60.0, jitter=0.2)
    rng = random.Random(1)
    delays = [sender.backoff_seconds(2, s, rng) for _ in range(200)]
    assert min(delays) >= 16 and max(delays) <= 24 and len(set(delays)) > 100


def test_peer_gets_the_spool_files_bytes_and_a_broken_file_fails_alone(store, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    """C-STORE sends the stored data set as it is (no decode and re-encode): what the peer gets is
    the spool file after its preamble and File Meta Information, byte for byte.  A stored file
    that is not DICOM fails its own delivery with a reason; the others of the association go."""
    from pynetdicom.dsutils import split_dataset

    db, spool = store
    scp = ScriptedSCP([])
    try:
        s = _settings(settings, Destination(name="pacs", type="dicom", ae_title="PACS", host="127.0.0.1", port=scp.port))
        uids = _result(db, spool, ["pacs"], n=3)
        broken = Spool.result_relpath_for(uids[1])
        spool.write(broken, b"not a DICOM file")
        rep = sender.send_due(db, spool, s)
        assert (rep.sent, rep.retrying) == (2, 1)
        assert scp.received == [uids[0], uids[2]]
        for uid, got in zip([uids[0], uids[2]], scp.encoded, strict=True):
            path = spool.path(Spool.result_relpath_for(uid))
            _meta, offset = split_dataset(path)
            assert path.read_bytes()[offset:] == got
        (d,) = [d for d in _deliveries(db) if d.state != "sent"]
        assert d.last_error and "not a DICOM file" in d.last_error
    finally:
        scp.stop()


def test_objects_are_spread_over_send_associations_and_reported_in_order(store, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    """send.associations = 2: two associations at once, every object stored once, each delivery's
    status on its own row (the SCP refuses the third object it gets: that one retries)."""
    db, spool = store
    scp = ScriptedSCP([0x0000, 0x0000, 0xA700])
    accepted: list[int] = []
    scp.server.bind(evt.EVT_ACCEPTED, lambda event: accepted.append(1))
    try:
        s = _settings(settings, Destination(name="pacs", type="dicom", ae_title="PACS", host="127.0.0.1", port=scp.port),
                      associations=2)
        uids = _result(db, spool, ["pacs"], n=8)
        rep = sender.send_due(db, spool, s)
        assert (rep.sent, rep.retrying) == (7, 1) and len(accepted) == 2
        assert sorted(scp.received) == sorted(uids)
        refused = scp.received[2]
        by_uid = {d.sop_instance_uid: d for d in _deliveries(db)}
        assert by_uid[refused].state != "sent" and by_uid[refused].last_status == 0xA700
        assert all(d.state == "sent" for u, d in by_uid.items() if u != refused)
    finally:
        scp.stop()
