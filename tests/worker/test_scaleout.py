"""Scale-out: several batch processes share one PostgreSQL queue; one is killed mid-run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy import select
from support import make_image, send, wait_for

from worker import store
from worker.node import Node
from worker.settings import load_settings

pytestmark = pytest.mark.postgres


def test_workers_drain_the_queue_once_each_even_when_one_is_killed(pg_fresh_url: str, tmp_path: Path,
                                                                   toy_model: Path) -> None:
    data_dir, n_jobs, n_workers = tmp_path / "var", 48, 3
    base = {"storage.data_dir": str(data_dir), "storage.database_url": pg_fresh_url, "storage.disk_reserve_mb": 0,
            "listener.bind_address": "127.0.0.1", "listener.port": 0}
    listener = Node(load_settings(None, base, environ={}), batch=False)  # serve --no-batch
    listener.start()
    try:
        assert send([make_image(rows=96, cols=96, seed=i) for i in range(n_jobs)], listener.port) == [0] * n_jobs
    finally:
        listener.stop()

    env = {**os.environ, "CXR_TRIAGE_BATCH_SIZE": "2", "CXR_TRIAGE_BATCH_LEASE_SECONDS": "3",
           "CXR_TRIAGE_BATCH_POLL_SECONDS": "0.1", "CXR_TRIAGE_SCHEDULE_GATHER_SECONDS": "0",
           "CXR_TRIAGE_STORAGE_DISK_RESERVE_MB": "0", "CXR_TRIAGE_SEND_LEASE_SECONDS": "3",
           "CXR_TRIAGE_SEND_RETRY_POLL_SECONDS": "0.5"}
    cmd = [sys.executable, "-m", "worker.cli", "batch", "--data-dir", str(data_dir), "--database", pg_fresh_url,
           "--model", str(toy_model)]
    workers = [subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
               for _ in range(n_workers)]
    db = store.Database.open(pg_fresh_url, upgrade=False)
    try:
        assert wait_for(lambda: store.counts(db).get("done", 0) >= 6, timeout=120)
        workers[0].send_signal(signal.SIGKILL)  # dies holding a lease, maybe mid-batch
        workers[0].wait(10)
        assert wait_for(lambda: store.counts(db) == {"done": n_jobs}, timeout=180), store.counts(db)
        assert wait_for(lambda: store.delivery_counts(db) == {"sent": n_jobs}, timeout=120)
    finally:
        for w in workers[1:]:
            w.send_signal(signal.SIGTERM)
        codes = [w.wait(60) for w in workers[1:]]
    assert codes == [0] * (n_workers - 1)

    # nothing left running with an expired lease, each job finished once (audit), one SR each
    with db.sessions() as s:
        rows = list(s.scalars(select(store.Instance)))
    assert all(r.lease_owner is None and r.state == "done" for r in rows)
    audit = [json.loads(x) for x in (data_dir / "audit.jsonl").read_text().splitlines()]
    finished = Counter(d["sop_instance_uid"] for d in audit if d["event"] == "job_finished")
    assert max(finished.values()) == 1  # no job done twice
    assert len(finished) >= n_jobs - 2  # (a SIGKILL can fall between a commit and its audit line)
    produced = Counter(d["source_sop_instance_uid"] for d in audit if d["event"] == "result_produced")
    assert max(produced.values()) == 1
    assert len(list((data_dir / "results").glob("*.dcm"))) == n_jobs
    assert sum(1 for d in audit if d["event"] == "node_started") == 1  # the listener
    assert sum(1 for d in audit if d["event"] == "batch_started") == n_workers
    assert sum(1 for d in audit if d["event"] == "batch_stopped") == n_workers - 1  # the killed one never said so
    db.close()
