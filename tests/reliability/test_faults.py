"""Crash safety (issue 7): SIGKILL during receive / batch / send, a full disk, a locked
database, a destination PACS that is down.

The short fault run here uses the same harness as the long one (``bench/faults.py``):
``tests/reliability/faultrun.py``.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import echo, free_port, make_image, send

from worker import pipeline, sender, store
from worker.engine import Engine
from worker.node import Node
from worker.settings import Settings, load_settings
from worker.spool import Spool, SpoolError

REPO = Path(__file__).resolve().parents[2]

needs_dcmtk_orthanc = pytest.mark.skipif(
    shutil.which("storescu") is None or shutil.which("Orthanc") is None,
    reason="needs dcmtk's storescu and Orthanc (apt-get install dcmtk orthanc)",
)


def _settings(data_dir: Path, toy_model: Path, **overrides: str) -> Settings:
    s = load_settings(
        None,
        {
            "storage.data_dir": str(data_dir),
            "storage.disk_reserve_mb": "0",
            "listener.bind_address": "127.0.0.1",
            "listener.port": str(free_port()),
            "batch.size": "8",
            "batch.poll_seconds": "0.2",
            **overrides,
        },
        environ={},
    )
    return dataclasses.replace(s, model=dataclasses.replace(s.model, path=toy_model))


# ------------------------------------------------------------------ SIGKILL at random moments


@pytest.mark.dcmtk
@needs_dcmtk_orthanc
def test_short_fault_run_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    import faultrun

    t0 = time.monotonic()
    c = faultrun.run(tmp_path / "run", studies=6, kills=5, seed=3, min_up=0.4, max_up=2.0, say=print)
    print(c.line())
    assert c.kills == 5
    assert c.acknowledged == c.instances and c.lost == 0 and c.in_db == c.on_disk == c.instances, c.problems
    assert c.screened == c.instances and c.screened_twice == 0, c.problems
    assert c.delivered == c.instances and c.duplicates == 0 and c.orthanc_sr == c.instances, c.problems
    assert c.stuck_running == 0 and c.left_queued == 0 and not c.problems, c.problems
    assert time.monotonic() - t0 < 120


def test_expired_lease_is_reclaimed_without_new_work(tmp_path: Path, toy_model: Path) -> None:
    from worker.scheduler import BatchScheduler

    settings = _settings(tmp_path / "var", toy_model, **{"batch.lease_seconds": "1", "schedule.gather_seconds": "0"})
    node = Node(settings, batch=False)
    node.start()
    sched = None
    try:
        ds = make_image(rows=64, cols=64)
        assert send([ds], node.port) == [0x0000]
        (claimed,) = store.claim_batch(node.db, 8, "killed-worker", lease_seconds=1)  # dies holding it
        time.sleep(1.2)
        sched = BatchScheduler(node.db, node.spool, Engine(toy_model), settings)
        sched.start()
        end = time.monotonic() + 5
        while time.monotonic() < end and store.find(node.db, ds.SOPInstanceUID).state == "running":
            time.sleep(0.1)
        assert store.find(node.db, ds.SOPInstanceUID).state == "done"
    finally:
        if sched is not None:
            sched.stop()
        node.stop()


# ------------------------------------------------------------------ the disk fills up during a batch


def test_disk_full_during_a_batch_fails_with_a_reason_and_retries_later(tmp_path: Path, toy_model: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    settings = _settings(tmp_path / "var", toy_model, **{"batch.max_attempts": "3"})
    node = Node(settings, batch=False)
    node.start()
    try:
        engine = Engine(toy_model)
        images = [make_image(rows=64, cols=64, seed=i) for i in range(3)]
        assert send(images, node.port) == [0x0000] * 3
        real_write = Spool.write

        def full_disk(self: Spool, relpath: str, data: bytes) -> int:
            if relpath.startswith("results/"):
                # what Spool.write raises when os.write fails with ENOSPC
                raise SpoolError(errno.ENOSPC, "could not store object: No space left on device")
            return real_write(self, relpath, data)

        monkeypatch.setattr(Spool, "write", full_disk)
        report = pipeline.drain(node.db, node.spool, engine, settings, pipeline.worker_id())
        # One run, one attempt spent: the run stops at the storage failure instead of burning
        # every attempt back to back.
        assert report.storage_errors == 3 and report.claimed == 3
        for ds in images:
            row = store.find(node.db, ds.SOPInstanceUID)
            assert row.state == "queued" and row.attempts == 1
            assert row.reason.startswith("attempt 1 of 3 failed: could not store result object")
            assert "No space left on device" in row.reason
            assert node.spool.path(row.path).is_file()  # the received object is untouched
        assert not list(node.spool.root.rglob(".tmp-*"))

        # The disk stays full to the last attempt: `failed`, with the reason.
        pipeline.drain(node.db, node.spool, engine, settings, pipeline.worker_id())
        pipeline.drain(node.db, node.spool, engine, settings, pipeline.worker_id())
        assert {store.find(node.db, ds.SOPInstanceUID).state for ds in images} == {"failed"}
        assert "No space left on device" in store.find(node.db, images[0].SOPInstanceUID).reason

        # Below the free-space reserve nothing is claimed at all: no attempt spent.
        more = make_image(rows=64, cols=64, seed=9)
        assert send([more], node.port) == [0x0000]
        monkeypatch.setattr(Spool, "free_bytes", lambda self: 10 * 2**20)
        node.spool.reserve_bytes = 100 * 2**20
        report = pipeline.drain(node.db, node.spool, engine, settings, pipeline.worker_id())
        assert report.claimed == 0 and report.disk_reserve_reached
        assert store.find(node.db, more.SOPInstanceUID).attempts == 0

        # Space again: the next run screens it and its result reaches the destination.
        monkeypatch.undo()
        node.spool.reserve_bytes = 0
        report = pipeline.drain(node.db, node.spool, engine, settings, pipeline.worker_id())
        assert report.done == 1 and store.find(node.db, more.SOPInstanceUID).state == "done"
        assert store.delivery_counts(node.db).get("sent") == 1
    finally:
        node.stop()


# ------------------------------------------------------------------ the database locked by another process

_LOCKER = """
import sqlite3, sys, time
con = sqlite3.connect(sys.argv[1], isolation_level=None)
con.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
con.execute("COMMIT")
"""


def test_intake_waits_for_a_database_locked_by_another_process(tmp_path: Path, toy_model: Path) -> None:
    settings = _settings(tmp_path / "var", toy_model)
    node = Node(settings, batch=False)
    node.start()
    try:
        db_file = settings.storage.data_dir / "triage.db"
        locker = subprocess.Popen([sys.executable, "-c", _LOCKER, str(db_file), "3"], stdout=subprocess.PIPE, text=True)
        try:
            assert locker.stdout is not None and locker.stdout.readline().strip() == "locked"
            t0 = time.monotonic()
            ds = make_image(rows=64, cols=64)
            (status,) = send([ds], node.port)
            waited = time.monotonic() - t0
        finally:
            locker.wait(30)
        # Within busy_timeout (30 s): the C-STORE waits for the lock and succeeds; an object is
        # never acknowledged without its row.
        assert status == 0x0000 and waited >= 1.5
        row = store.find(node.db, ds.SOPInstanceUID)
        assert row is not None and row.state == "queued" and node.spool.path(row.path).is_file()
        assert echo(node.port) == 0
    finally:
        node.stop()


def test_intake_refuses_with_a_reason_when_the_database_stays_locked(tmp_path: Path, toy_model: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import sqlalchemy.exc

    settings = _settings(tmp_path / "var", toy_model)
    node = Node(settings, batch=False)
    node.start()
    try:
        def locked(*_a, **_k):  # what SQLite raises once busy_timeout has run out
            raise sqlalchemy.exc.OperationalError("INSERT", {}, Exception("database is locked"))

        monkeypatch.setattr(store, "enqueue", locked)
        ds = make_image(rows=64, cols=64)
        (status,) = send([ds], node.port)
        monkeypatch.undo()
        assert status == 0xA700  # the sender keeps the object and sends it again
        ev = [e for e in _events(node) if e["sop_instance_uid"] == ds.SOPInstanceUID]
        assert ev and "database unavailable" in ev[-1]["reason"]
        assert send([ds], node.port) == [0x0000]  # the re-send is stored
        assert store.find(node.db, ds.SOPInstanceUID).state == "queued"
    finally:
        node.stop()


def _events(node: Node) -> list[dict]:
    from sqlalchemy import select

    with node.db.sessions() as s:
        return [e.as_dict() for e in s.scalars(select(store.IntakeEvent))]


# ------------------------------------------------------------------ the destination PACS is down "for an hour"


@pytest.mark.skipif(shutil.which("Orthanc") is None, reason="Orthanc is not installed")
def test_pacs_down_bounded_retries_then_send_failed_then_resend(tmp_path: Path, toy_model: Path) -> None:
    from worker.results import result_uids
    from worker.testing.orthanc import Orthanc

    pacs = Orthanc(tmp_path / "orthanc")  # ports chosen, not started: "down"
    dest = f"ORTHANC@127.0.0.1:{pacs.dicom_port}"
    settings = _settings(
        tmp_path / "var", toy_model,
        **{"destinations": [dest], "send.max_attempts": "3", "send.backoff_seconds": "0.1",
           "send.backoff_max_seconds": "0.2", "send.jitter": "0", "send.timeout": "3"},
    )
    node = Node(settings, batch=False)
    node.start()
    try:
        ds = make_image(rows=64, cols=64)
        assert send([ds], node.port) == [0x0000]
        engine = Engine(toy_model)
        report = pipeline.drain(node.db, node.spool, engine, settings, pipeline.worker_id())
        assert report.done == 1  # screened; the first send failed
        for _ in range(20):  # the retry passes, as the scheduler runs them
            if store.delivery_counts(node.db).get("send_failed"):
                break
            time.sleep(0.25)
            sender.send_due(node.db, node.spool, settings)
        with node.db.sessions() as s:
            (d,) = s.query(store.Delivery).all()
            assert d.state == "send_failed" and d.attempts == 3  # bounded
            assert "connection refused" in d.last_error or "no association" in d.last_error
        for _ in range(3):
            assert sender.send_due(node.db, node.spool, settings).sent == 0  # no more tries by itself

        pacs.start()
        try:
            env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_TRIAGE_")}
            env["CXR_TRIAGE_DESTINATIONS"] = dest
            r = subprocess.run(
                [sys.executable, "-m", "worker.cli", "resend", "--now", "--data-dir", str(settings.storage.data_dir)],
                capture_output=True, text=True, env=env, cwd=str(REPO), timeout=120,
            )
            assert "1 failed delivery queued again" in r.stdout and "sent 1" in r.stdout, r.stdout + r.stderr
            assert r.returncode == 0, r.stderr
            assert store.delivery_counts(node.db) == {"sent": 1}
            card = engine.card
            expected = str(result_uids(ds.SOPInstanceUID, ds.StudyInstanceUID, card.name, card.version).sr_instance)
            srs = pacs.find_instances(Modality="SR")
            assert [i["MainDicomTags"]["SOPInstanceUID"] for i in srs] == [expected]  # once
        finally:
            pacs.stop()
    finally:
        node.stop()
