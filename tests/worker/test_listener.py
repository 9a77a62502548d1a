"""The Storage/Verification SCP over real loopback associations (pynetdicom SCU in process)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import select
from support import CR_STORAGE, CT_STORAGE, DX_STORAGE, echo, make_image, send

from worker import store
from worker.node import Node
from worker.settings import Settings


def events(db: store.Database) -> list[store.IntakeEvent]:
    with db.sessions() as s:
        return list(s.scalars(select(store.IntakeEvent).order_by(store.IntakeEvent.id)))


def test_echo(node: Node) -> None:
    assert echo(node.port) == 0x0000


def test_store_is_durable_and_as_received(node: Node) -> None:
    ds = make_image(rows=300, cols=240)
    assert send([ds], node.port) == [0x0000]
    row = store.find(node.db, ds.SOPInstanceUID)
    assert row is not None and row.state == "queued" and row.receive_count == 1
    assert row.study_instance_uid == ds.StudyInstanceUID and row.accession_number == "ACC0001"
    assert row.calling_ae == "TESTSCU" and row.modality == "CR"
    stored = node.spool.path(row.path)
    assert stored.is_relative_to(node.spool.root.resolve())
    back = dcmread(stored)
    assert back.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert back.SOPInstanceUID == ds.SOPInstanceUID and back.PixelData == ds.PixelData
    assert row.size_bytes == stored.stat().st_size
    assert not list(node.spool.root.glob("*/.tmp-*"))  # no temp files left behind
    assert oct(stored.stat().st_mode & 0o777) == "0o600"


def test_resend_is_acknowledged_not_requeued(node: Node) -> None:
    ds = make_image()
    assert send([ds, ds], node.port) == [0x0000, 0x0000]
    assert send([ds], node.port) == [0x0000]
    row = store.find(node.db, ds.SOPInstanceUID)
    assert row.receive_count == 3
    assert store.counts(node.db) == {"queued": 1}
    assert [e.kind for e in events(node.db)] == ["duplicate", "duplicate"]


def test_resend_with_other_bytes_keeps_first_and_says_so(node: Node) -> None:
    """Same instance, same patient and study, other bytes (e.g. PACS re-encoded it): acknowledged."""
    ds = make_image(seed=1)
    other = make_image(seed=2)
    for key in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        setattr(other, key, getattr(ds, key))
    other.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    assert send([ds, other], node.port) == [0x0000, 0x0000]
    (ev,) = events(node.db)
    assert ev.kind == "duplicate_differs" and "first received object is kept" in ev.reason


@pytest.mark.parametrize("what", ["patient", "study"])
def test_uid_reused_for_another_patient_or_study_is_refused(node: Node, what: str) -> None:
    """A UID collision must not be acknowledged: the sender would delete an image we never screen."""
    ds = make_image(seed=1)
    other = make_image(seed=2)
    other.SOPInstanceUID = ds.SOPInstanceUID
    other.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if what == "patient":
        other.StudyInstanceUID = ds.StudyInstanceUID
        other.PatientID = "SOMEONE-ELSE"
    assert send([ds, other], node.port) == [0x0000, 0xC000]
    (ev,) = events(node.db)
    assert ev.kind == "refused" and f"already stored for another {what}" in ev.reason
    assert dcmread(node.spool.path(store.find(node.db, ds.SOPInstanceUID).path)).PatientID == "TEST-0001"


def test_ct_is_refused_with_sop_class_status(node: Node) -> None:
    ds = make_image(sop_class=CT_STORAGE, modality="CT")
    assert send([ds], node.port) == [0x0122]
    assert store.find(node.db, ds.SOPInstanceUID) is None
    (ev,) = events(node.db)
    assert ev.kind == "refused" and ev.status == 0x0122 and CT_STORAGE in ev.reason
    assert echo(node.port) == 0x0000


def test_accept_out_of_scope_acknowledges_a_whole_study_without_storing(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    """listener.accept_out_of_scope (issue 19): a PACS auto-route sends the CT and the SR of the
    study too; they get 0x0000 (no retries) and an ``ignored`` event, and nothing of them is kept."""
    import json

    from worker import cli

    s = dataclasses.replace(settings, listener=dataclasses.replace(settings.listener, accept_out_of_scope=True))
    n = Node(s, batch=False)
    n.start()
    try:
        cr, ct = make_image(), make_image(sop_class=CT_STORAGE, modality="CT")
        assert send([ct, cr], n.port) == [0x0000, 0x0000]
        assert store.find(n.db, ct.SOPInstanceUID) is None and store.find(n.db, cr.SOPInstanceUID) is not None
        (ev,) = events(n.db)
        assert ev.kind == "ignored" and ev.status == 0x0000 and ev.sop_instance_uid == ct.SOPInstanceUID
        assert CT_STORAGE in ev.reason and "listener.accept_out_of_scope" in ev.reason
        files = [p for p in n.spool.root.rglob("*") if p.is_file()]
        assert [p.name for p in files] == [f"{cr.SOPInstanceUID}.dcm"]
    finally:
        n.stop()
    audit = [json.loads(ln) for ln in s.storage.audit_path.read_text().splitlines()]
    assert [a["sop_class_uid"] for a in audit if a["event"] == "object_ignored"] == [CT_STORAGE]
    capsys.readouterr()
    assert cli.main(["status", "--data-dir", str(s.storage.data_dir), "--format", "json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["intake_ignored"] == 1 and status["intake_refusals"] == 0 and status["total"] == 1


@pytest.mark.parametrize(
    "uid, why",
    [
        ("../../x", "characters other than digits"),
        ("1.2.3/../../etc", "characters other than digits"),
        ("1.2.3.", "characters other than digits"),  # (> 64 characters: pynetdicom's SCU refuses to send it; see test_spool)
        ("1..2", "characters other than digits"),
    ],
)
def test_bad_sop_instance_uid_never_touches_the_filesystem(node: Node, tmp_path: Path, uid: str, why: str) -> None:
    ds = make_image()
    ds.SOPInstanceUID = uid
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    before = set(tmp_path.rglob("*"))
    assert send([ds], node.port) == [0xC000]
    (ev,) = events(node.db)
    assert ev.status == 0xC000 and why in ev.reason
    created = {p for p in set(tmp_path.rglob("*")) - before if "triage.db" not in p.name}
    assert created == set()
    assert store.counts(node.db) == {}
    assert echo(node.port) == 0x0000


def test_wrong_calling_ae_is_rejected_and_recorded(settings: Settings) -> None:
    s = dataclasses.replace(settings, listener=dataclasses.replace(settings.listener, allowed_calling_aets=["PACS1"]))
    n = Node(s, batch=False)
    n.start()
    try:
        assert echo(n.port, calling="INTRUDER") is None
        assert send([make_image()], n.port, calling="INTRUDER") == [None]
        assert echo(n.port, calling="PACS1") == 0x0000
        from support import wait_for

        assert wait_for(lambda: len(events(n.db)) == 2, timeout=10)
        evs = events(n.db)
        assert len(evs) == 2 and all(e.kind == "association_rejected" for e in evs)
        assert "'INTRUDER' is not in listener.allowed_calling_aets" in evs[0].reason
        assert store.counts(n.db) == {}
    finally:
        n.stop()


def test_wrong_called_ae_is_rejected(node: Node) -> None:
    from support import wait_for

    assert echo(node.port, called="SOMEONEELSE") is None
    assert wait_for(lambda: len(events(node.db)) == 1, timeout=10)  # recorded by the server thread
    (ev,) = events(node.db)
    assert "called AE title 'SOMEONEELSE'" in ev.reason
    assert echo(node.port) == 0x0000


def test_full_spool_refuses_with_out_of_resources(settings: Settings) -> None:
    s = dataclasses.replace(settings, storage=dataclasses.replace(settings.storage, disk_reserve_mb=10**9))
    n = Node(s, batch=False)
    n.start()
    try:
        ds = make_image()
        assert send([ds], n.port) == [0xA700]
        (ev,) = events(n.db)
        assert "free-space reserve" in ev.reason and ev.status == 0xA700
        assert store.find(n.db, ds.SOPInstanceUID) is None
        assert not list(n.spool.root.rglob("*.dcm"))
        assert echo(n.port) == 0x0000
    finally:
        n.stop()


def test_dx_and_many_in_one_association(node: Node) -> None:
    dss = [make_image(sop_class=DX_STORAGE, modality="DX", seed=i) for i in range(5)]
    dss += [make_image(sop_class=CR_STORAGE, seed=10 + i) for i in range(5)]
    assert send(dss, node.port) == [0] * 10
    assert store.counts(node.db) == {"queued": 10}


def test_state_is_private(node: Node) -> None:
    """Spool folders 0700, stored objects and the SQLite files 0600 (issue: security)."""
    data_dir = node.settings.storage.data_dir
    assert data_dir.stat().st_mode & 0o777 == 0o700
    assert node.spool.root.stat().st_mode & 0o777 == 0o700
    for f in data_dir.glob("triage.db*"):
        assert f.stat().st_mode & 0o777 == 0o600, f.name


def test_large_objects_hash_alongside_the_write(node: Node) -> None:
    """Objects >= 1 MiB are hashed on a helper thread: same digest, same re-send handling."""
    import hashlib

    big = make_image(rows=1200, cols=1000, seed=7)  # 2.4 MB of pixels
    assert send([big], node.port) == [0]
    row = store.find(node.db, big.SOPInstanceUID)
    assert row.sha256 == hashlib.sha256(node.spool.path(row.path).read_bytes()).hexdigest()
    changed = make_image(rows=1200, cols=1000, seed=8)
    for key in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        setattr(changed, key, getattr(big, key))
    changed.file_meta.MediaStorageSOPInstanceUID = big.SOPInstanceUID
    assert send([big, changed], node.port) == [0, 0]
    assert [e.kind for e in events(node.db)] == ["duplicate", "duplicate_differs"]
