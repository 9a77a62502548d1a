"""Data lifecycle (issue 19, item 7): storage.retention_days, database.retention_days, `cxr-triage purge`."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from sqlalchemy import update
from support import make_image, receive, run_cli, wait_for

from worker import store
from worker.settings import Settings


@pytest.fixture
def screened(tmp_path: Path, toy_model: Path) -> tuple[Settings, list[str]]:
    """Three images received, screened and delivered (folder destination), finished 40 days ago;
    the third one's delivery put back to pending_send (not delivered)."""
    data_dir = tmp_path / "var"
    dss = [make_image(rows=64, cols=64, seed=i) for i in range(3)]
    s = receive(data_dir, dss)
    r = run_cli("batch", "--once", "--data-dir", str(data_dir), "--model", str(toy_model))
    assert r.returncode == 0 and "results sent 3" in r.stdout, r.stdout + r.stderr
    db = store.Database.open(s.storage.url)
    try:
        third = store.find(db, dss[2].SOPInstanceUID)
        with db.sessions.begin() as sess:
            sess.execute(update(store.Instance).values(finished_at=store.utcnow() - dt.timedelta(days=40)))
            sess.execute(update(store.Delivery).where(store.Delivery.instance_id == third.id)
                         .values(state=store.SendState.PENDING.value, next_attempt_at=store.utcnow() + dt.timedelta(days=1)))
    finally:
        db.close()
    return s, [d.SOPInstanceUID for d in dss]


def _files(s: Settings) -> dict[str, list[Path]]:
    """Spooled images and result objects (results/), by kind."""
    root = s.storage.spool_path
    everything = sorted(p for p in root.rglob("*.dcm"))
    return {"images": [p for p in everything if "results" not in p.relative_to(root).parts],
            "results": [p for p in everything if "results" in p.relative_to(root).parts]}


def test_purge_deletes_only_finished_and_delivered_images_and_keeps_rows(screened) -> None:  # type: ignore[no-untyped-def]
    s, uids = screened
    data = str(s.storage.data_dir)
    before = _files(s)
    assert len(before["images"]) == 3 and len(before["results"]) == 3

    r = run_cli("purge", "--dry-run", "--days", "30", "--data-dir", data)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("purge (dry run): would delete 2 image(s) and 2 result object(s) of 2 job(s)")
    assert r.stdout.rstrip().endswith("; rows kept")
    assert _files(s) == before  # a dry run deletes nothing

    r = run_cli("purge", "--data-dir", data, env={"CXR_TRIAGE_STORAGE_RETENTION_DAYS": "30"})
    assert r.returncode == 0 and r.stdout.startswith("purge: deleted 2 image(s) and 2 result object(s) of 2 job(s)")
    after = _files(s)
    assert [p.name for p in after["images"]] == [f"{uids[2]}.dcm"]  # the undelivered one stays
    assert len(after["results"]) == 1
    rows = json.loads(run_cli("query", "--data-dir", data, "--format", "json").stdout)
    assert len(rows) == 3 and all(r["state"] == "done" for r in rows)  # rows stay

    audit = [json.loads(ln) for ln in s.storage.audit_path.read_text().splitlines()]
    purged = sorted(a["sop_instance_uid"] for a in audit if a["event"] == "object_purged")
    assert purged == sorted(uids[:2]) and all(a["files"] == 2 for a in audit if a["event"] == "object_purged")
    (summary,) = [a for a in audit if a["event"] == "purge_finished"]
    assert summary["images"] == 2 and summary["results"] == 2

    # nothing older is left: a second purge deletes nothing
    r = run_cli("purge", "--days", "30", "--data-dir", data)
    assert "deleted 0 image(s)" in r.stdout


def test_database_retention_prunes_rows_after_the_images(screened) -> None:  # type: ignore[no-untyped-def]
    s, uids = screened
    data = str(s.storage.data_dir)
    env = {"CXR_TRIAGE_STORAGE_RETENTION_DAYS": "30", "CXR_TRIAGE_DATABASE_RETENTION_DAYS": "35"}
    r = run_cli("purge", "--data-dir", data, env=env)
    assert r.returncode == 0, r.stderr
    assert "deleted 2 row(s)" in r.stdout
    rows = json.loads(run_cli("query", "--data-dir", data, "--format", "json").stdout)
    assert [r["sop_instance_uid"] for r in rows] == [uids[2]]  # only the undelivered job is left
    audit = [json.loads(ln) for ln in s.storage.audit_path.read_text().splitlines()]
    (pruned,) = [a for a in audit if a["event"] == "rows_pruned"]
    assert pruned["instances"] == 2


def test_purge_needs_a_retention_and_an_existing_database(tmp_path: Path) -> None:
    r = run_cli("purge", "--data-dir", str(tmp_path / "var"), "--days", "30")
    assert r.returncode == 2 and "no triage database at" in r.stderr
    r = run_cli("purge", "--data-dir", str(tmp_path / "var"))
    assert r.returncode == 2
    assert r.stderr.strip() == ("cxr-triage purge: storage.retention_days is 0 (images are kept for ever): "
                                "set it, or pass --days N")
    r = run_cli("purge", env={"CXR_TRIAGE_STORAGE_RETENTION_DAYS": "30", "CXR_TRIAGE_DATABASE_RETENTION_DAYS": "7"})
    assert r.returncode == 2 and "database.retention_days (7) needs storage.retention_days between 1 and it" in r.stderr
    assert not (tmp_path / "var").exists()


def test_the_batch_scheduler_purges_when_it_starts(screened, toy_model: Path) -> None:  # type: ignore[no-untyped-def]
    import dataclasses

    from worker.engine import Engine
    from worker.scheduler import BatchScheduler
    from worker.spool import Spool

    s, uids = screened
    s = dataclasses.replace(s, storage=dataclasses.replace(s.storage, retention_days=30))
    db = store.Database.open(s.storage.url)
    sched = BatchScheduler(db, Spool(s.storage.spool_path), Engine(toy_model), s)
    sched.start()
    try:
        assert wait_for(lambda: len(_files(s)["images"]) == 1, timeout=30)
    finally:
        sched.stop()
        db.close()
