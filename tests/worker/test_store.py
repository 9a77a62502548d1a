"""The database as queue: enqueue, claim with lease, fencing, retries, on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
import threading
from pathlib import Path

import pytest
from sqlalchemy.exc import IntegrityError

from worker import store
from worker.store import Outcome, State


def _item(i: int) -> store.Received:
    uid = f"1.2.826.0.1.3680043.8.498.{i}"
    return store.Received(
        sop_instance_uid=uid, sop_class_uid="1.2.840.10008.5.1.4.1.1.1", study_instance_uid=f"1.2.3.{i}",
        series_instance_uid=f"1.2.3.{i}.1", accession_number=f"A{i}", modality="CR",
        transfer_syntax="1.2.840.10008.1.2.1", calling_ae="SCU", path=f"ab/{uid}.dcm", size_bytes=10, sha256="0" * 64,
    )


@pytest.fixture(params=["sqlite", "postgres"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> store.Database:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'q.db'}"
    else:
        url = request.getfixturevalue("pg_fresh_url")
    d = store.Database.open(url)
    yield d
    d.close()


def test_enqueue_one_row_per_instance(db: store.Database) -> None:
    store.enqueue(db, _item(1))
    with pytest.raises(IntegrityError):
        store.enqueue(db, _item(1))
    assert store.record_resend(db, _item(1).sop_instance_uid, "0" * 64, "SCU", "peer") is True
    assert store.record_resend(db, _item(1).sop_instance_uid, "f" * 64, "SCU", "peer") is False
    row = store.find(db, _item(1).sop_instance_uid)
    assert row is not None and row.receive_count == 3 and row.state == "queued"
    assert store.counts(db) == {"queued": 1}


def test_claim_takes_oldest_and_sets_lease(db: store.Database) -> None:
    for i in range(5):
        store.enqueue(db, _item(i))
    now = store.utcnow()
    got = store.claim_batch(db, 3, "w1", 60, now=now)
    assert [c.sop_instance_uid for c in got] == [_item(i).sop_instance_uid for i in range(3)]
    assert all(c.attempts == 1 for c in got)
    row = store.find(db, got[0].sop_instance_uid)
    assert row.state == "running" and row.lease_owner == "w1"
    assert abs((row.lease_expires - now).total_seconds() - 60) < 1
    # the rest, then nothing
    assert len(store.claim_batch(db, 10, "w2", 60)) == 2
    assert store.claim_batch(db, 10, "w3", 60) == []


def test_expired_lease_is_taken_over_and_fenced(db: store.Database) -> None:
    store.enqueue(db, _item(1))
    t0 = store.utcnow()
    (first,) = store.claim_batch(db, 1, "dead-worker", 30, now=t0)
    assert store.claim_batch(db, 1, "w2", 30, now=t0 + dt.timedelta(seconds=10)) == []  # lease still valid
    (again,) = store.claim_batch(db, 1, "w2", 30, now=t0 + dt.timedelta(seconds=31))
    assert again.id == first.id and again.attempts == 2
    # the dead worker wakes up: its outcome must not overwrite the new owner's job
    n = store.finish(db, "dead-worker", [Outcome(first.id, State.SKIPPED, "late")], model_name=None,
                    model_version=None, model_precision=None, max_attempts=3)
    assert n == set()
    n = store.finish(db, "w2", [Outcome(first.id, State.DONE, predicted_class="normal",
                                       probabilities={"normal": 0.9, "covid19": 0.1}, priority="routine")],
                    model_name="m", model_version="1", model_precision="f32", max_attempts=3)
    assert n == {first.id}
    row = store.find(db, _item(1).sop_instance_uid)
    assert row.state == "done" and row.predicted_class == "normal" and row.top_probability == pytest.approx(0.9)
    assert row.lease_owner is None and row.finished_at is not None and row.model_version == "1"


def test_failures_retry_then_fail_with_reason(db: store.Database) -> None:
    store.enqueue(db, _item(1))
    for attempt in (1, 2):
        (c,) = store.claim_batch(db, 1, "w", 30)
        store.finish(db, "w", [Outcome(c.id, State.FAILED, "disk error")], model_name=None, model_version=None,
                    model_precision=None, max_attempts=3)
        row = store.find(db, c.sop_instance_uid)
        assert row.state == "queued" and f"attempt {attempt} of 3 failed: disk error" == row.reason
    (c,) = store.claim_batch(db, 1, "w", 30)
    store.finish(db, "w", [Outcome(c.id, State.FAILED, "disk error")], model_name=None, model_version=None,
                model_precision=None, max_attempts=3)
    row = store.find(db, c.sop_instance_uid)
    assert row.state == "failed" and row.reason == "disk error" and row.attempts == 3


def test_release_returns_jobs_untouched(db: store.Database) -> None:
    store.enqueue(db, _item(1))
    (c,) = store.claim_batch(db, 1, "w", 30)
    store.release(db, "w", [c.id])
    row = store.find(db, c.sop_instance_uid)
    assert row.state == "queued" and row.attempts == 0 and row.lease_owner is None


def test_concurrent_claimers_never_share_a_job(db: store.Database) -> None:
    n_jobs, n_workers = 60, 4
    for i in range(n_jobs):
        store.enqueue(db, _item(i))
    taken: dict[str, list[int]] = {f"w{k}": [] for k in range(n_workers)}

    def work(owner: str) -> None:
        while True:
            got = store.claim_batch(db, 3, owner, 60)
            if not got:
                return
            taken[owner].extend(c.id for c in got)
            store.finish(db, owner, [Outcome(c.id, State.SKIPPED, "test") for c in got], model_name=None,
                        model_version=None, model_precision=None, max_attempts=3)

    threads = [threading.Thread(target=work, args=(o,)) for o in taken]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    all_ids = [i for ids in taken.values() for i in ids]
    assert len(all_ids) == n_jobs and len(set(all_ids)) == n_jobs
    assert store.counts(db) == {"skipped": n_jobs}


def test_as_dict_has_stable_keys_and_utc_times(db: store.Database) -> None:
    store.enqueue(db, _item(7))
    d = store.find(db, _item(7).sop_instance_uid).as_dict()
    for key in ("sop_instance_uid", "study_instance_uid", "accession_number", "state", "reason", "predicted_class",
                "probabilities", "priority", "model_name", "model_version", "received_at", "finished_at"):
        assert key in d
    assert d["received_at"].endswith("Z")
    assert dt.datetime.fromisoformat(d["received_at"].replace("Z", "+00:00")).tzinfo is not None


def test_migration_is_idempotent(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'm.db'}"
    store.Database.open(url).close()
    db = store.Database.open(url)
    from sqlalchemy import text

    with db.sql_engine.connect() as c:
        assert c.execute(text("select version_num from alembic_version")).scalar() == "0002"
        assert c.execute(text("pragma journal_mode")).scalar() == "wal"
        assert c.execute(text("pragma synchronous")).scalar() == 2  # FULL
    db.close()


def test_head_revision_constant_is_alembics_head_and_skips_alembic_when_current(tmp_path: Path) -> None:
    import subprocess
    import sys
    from importlib import resources

    from alembic.config import Config
    from alembic.script import ScriptDirectory

    cfg = Config()
    cfg.set_main_option("script_location", str(resources.files("worker") / "migrations"))
    assert ScriptDirectory.from_config(cfg).get_current_head() == store.HEAD_REVISION
    url = f"sqlite:///{tmp_path / 'h.db'}"
    store.Database.open(url).close()  # creates the schema (Alembic runs)
    code = f"import sys; from worker import store; store.Database.open({url!r}).close(); print('alembic' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_reclaim_dead_leases_of_this_host_only(db: store.Database) -> None:
    """Issue 19: leases of a gone process of this host expire at once; others keep theirs."""
    for i in range(4):
        store.enqueue(db, _item(i))
    owners = ["node1:101:aaaa", "node1:202:bbbb", "node2:101:cccc", "node1:303:dddd"]
    for owner in owners:
        store.claim_batch(db, 1, owner, 300)
    alive = {202}
    found = store.reclaim_dead_leases(db, "node1", lambda pid: pid in alive, exclude={"node1:303:dddd"})
    assert found == {"node1:101:aaaa": 1}  # 202 alive, node2 another host, 303 our own
    # the dead process's job is claimable now, not in 300 s; the others are not
    (c,) = store.claim_batch(db, 10, "node1:404:eeee", 300)
    assert c.attempts == 2  # the attempt of the dead process counts
    assert store.claim_batch(db, 10, "node1:404:eeee", 300) == []
    assert store.reclaim_dead_leases(db, "node1", lambda pid: False, exclude={"node1:404:eeee"}) == {
        "node1:202:bbbb": 1, "node1:303:dddd": 1}
