"""Fault-injection harness: storescu sends while the node is SIGKILLed and restarted.

Used by ``tests/reliability/test_faults.py`` (a short run) and ``bench/faults.py`` (the long
run). The node runs as a subprocess (``python -m worker.cli serve``) with the toy model and a
real Orthanc as its only result destination. A sender thread sends every file with its own
``storescu`` call (one file per call, so the exit status and the response line belong to that
file) and re-sends whatever was not acknowledged, as a modality would; a killer SIGKILLs the
node at random moments and restarts it. The phase at each kill (receive in flight, a job
``running``, a delivery claimed) is read from the database just before the kill.

Afterwards the node runs undisturbed until the queue and the deliveries are empty, is stopped
with SIGTERM, and the database, spool, audit trail and Orthanc are checked:

* every acknowledged instance is in the database and on disk, byte-identical (sha256);
* each is screened exactly once for the model version (one committed outcome; the audit
  trail's ``job_finished`` lines per SOP Instance UID are counted too);
* every result is in Orthanc exactly once (deterministic SR UIDs; no SR Orthanc holds that is
  not the expected one for a source), every delivery row ``sent``;
* nothing is ``running`` with an expired lease, nothing ``queued``.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from worker.testing.dicom import make_image
from worker.testing.orthanc import Orthanc
from worker.testing.scu import free_port

REPO = Path(__file__).resolve().parents[2]

AET = "CXRTRIAGE"


def node_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Fast polling, short leases and backoff, so a restarted node picks up quickly."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_TRIAGE_")}
    env.update(
        {
            "CXR_TRIAGE_STORAGE_DISK_RESERVE_MB": "0",
            "CXR_TRIAGE_BATCH_SIZE": "4",
            "CXR_TRIAGE_BATCH_POLL_SECONDS": "0.1",
            "CXR_TRIAGE_BATCH_LEASE_SECONDS": "3",
            "CXR_TRIAGE_SCHEDULE_GATHER_SECONDS": "0.2",
            "CXR_TRIAGE_SEND_LEASE_SECONDS": "5",
            "CXR_TRIAGE_SEND_BACKOFF_SECONDS": "0.5",
            "CXR_TRIAGE_SEND_BACKOFF_MAX_SECONDS": "2",
            "CXR_TRIAGE_SEND_RETRY_POLL_SECONDS": "0.5",
            "CXR_TRIAGE_SEND_MAX_ATTEMPTS": "1000",
            "CXR_TRIAGE_SEND_TIMEOUT": "10",
            "CXR_TRIAGE_LOG_LEVEL": "WARNING",
            "OMP_NUM_THREADS": "1",
        }
    )
    env.update(extra or {})
    return env


class NodeProcess:
    """``python -m worker.cli serve`` as a subprocess; started, SIGKILLed, restarted by pid."""

    def __init__(self, data_dir: Path, port: int, model: Path, destination: str, env: dict[str, str]) -> None:
        self.data_dir, self.port, self.model, self.destination, self.env = data_dir, port, model, destination, env
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = (data_dir.parent / "node.log").open("ab")
        self.starts = 0

    def start(self, timeout: float = 60) -> None:
        cmd = [sys.executable, "-m", "worker.cli", "serve", "--data-dir", str(self.data_dir), "--port", str(self.port),
               "--bind", "127.0.0.1", "--model", str(self.model), "--destination", self.destination]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=self.log, env=self.env, cwd=str(REPO))
        self.starts += 1
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"node exited with {self.proc.returncode}; see {self.log.name}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("node did not open its port")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self.proc = None
        return rc


def storescu(path: Path, port: int, timeout: float = 20) -> bool:
    """One file, one association. True only for exit 0 and a Success response for the file."""
    cmd = ["storescu", "-v", "-aet", "FAULTSCU", "-aec", AET, "-to", "10", "-ta", "10", "-td", "10",
           "127.0.0.1", str(port), str(path)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False
    out = r.stdout + r.stderr
    return r.returncode == 0 and "Received Store Response (Success)" in out


def _db_phase(db_path: Path) -> tuple[int, int]:
    """(jobs running, deliveries claimed and not sent) right now; read-only, best effort."""
    try:
        con = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=0.5)
        try:
            # a live lease (not one left by an earlier kill), a delivery claim (its lease moves
            # next_attempt_at send.lease_seconds = 5 s ahead; backoff stays under 2 s)
            running = con.execute(
                "SELECT count(*) FROM instances WHERE state='running' AND "
                "lease_expires > strftime('%Y-%m-%d %H:%M:%f', 'now')"
            ).fetchone()[0]
            claimed = con.execute(
                "SELECT count(*) FROM deliveries WHERE state='pending_send' AND attempts > 0 AND "
                "next_attempt_at > strftime('%Y-%m-%d %H:%M:%f', 'now', '+2 seconds')"
            ).fetchone()[0]
            return int(running), int(claimed)
        finally:
            con.close()
    except sqlite3.Error:
        return -1, -1


@dataclass
class Counts:
    studies: int = 0
    instances: int = 0
    sent: int = 0  # storescu calls
    acknowledged: int = 0  # distinct instances that got a success status
    in_db: int = 0
    on_disk: int = 0
    screened: int = 0  # done rows for the model version
    skipped_or_failed: int = 0
    screened_twice: int = 0  # SOP instances with more than one job_finished line (audit)
    delivered: int = 0  # expected SR present in Orthanc
    orthanc_sr: int = 0
    duplicates: int = 0  # SR in Orthanc beyond one per source, or not expected
    redeliveries: int = 0  # result_sent audit lines beyond one per SR (same UID, replaced in Orthanc)
    lost: int = 0
    not_delivered: int = 0
    stuck_running: int = 0  # still running after the recovery
    expired_running_idle: int = 0  # left running with an expired lease while the node idled (known gap)
    left_queued: int = 0
    kills: int = 0
    kill_phases: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    def ok(self) -> bool:
        return (
            self.lost == 0 and self.duplicates == 0 and self.not_delivered == 0 and self.stuck_running == 0
            and self.left_queued == 0 and self.screened_twice == 0 and self.acknowledged == self.instances
            and not self.problems
        )

    def line(self) -> str:
        return (
            f"sent {self.sent}, acknowledged {self.acknowledged}/{self.instances}, screened {self.screened}, "
            f"delivered {self.delivered}, duplicates {self.duplicates}, lost {self.lost}, "
            f"re-deliveries {self.redeliveries}, kills {self.kills} {dict(self.kill_phases)}, "
            f"expired leases left while idle {self.expired_running_idle}, stuck running {self.stuck_running}, "
            f"{self.seconds:.0f} s"
        )


def make_corpus(folder: Path, studies: int, seed: int) -> list[tuple[Path, str, str]]:
    """``studies`` studies of 1-2 small CR chest images; (path, sop uid, study uid) each."""
    from pydicom.uid import generate_uid

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for s in range(studies):
        study = generate_uid()
        for i in range(rng.choice((1, 2))):
            ds = make_image(rows=128, cols=112, seed=seed * 100003 + s * 7 + i)
            ds.StudyInstanceUID = study
            ds.InstanceNumber = i + 1
            ds.AccessionNumber = f"F{s:05d}"
            p = folder / f"{s:05d}-{i}.dcm"
            ds.save_as(p, enforce_file_format=True)
            out.append((p, str(ds.SOPInstanceUID), study))
    return out


def run(
    workdir: Path,
    *,
    studies: int,
    kills: int,
    seed: int = 0,
    min_up: float = 0.3,
    max_up: float = 2.5,
    deadline_s: float | None = None,
    say: Callable[[str], None] = print,
) -> Counts:
    """The whole fault run; returns the counts (``Counts.ok()`` is the verdict)."""
    from worker.results import result_uids
    from worker.testing.toymodel import build_toy_model

    t0 = time.monotonic()
    rng = random.Random(seed)
    workdir.mkdir(parents=True, exist_ok=True)
    model = build_toy_model(workdir / "model")
    card = json.loads((model / "model.json").read_text())
    files = make_corpus(workdir / "in", studies, seed)
    c = Counts(studies=studies, instances=len(files))

    orthanc = Orthanc(workdir / "orthanc").start()
    data_dir = workdir / "var"
    port = free_port()
    node = NodeProcess(data_dir, port, model, f"ORTHANC@127.0.0.1:{orthanc.dicom_port}", node_env())
    acked: set[str] = set()
    lock = threading.Lock()
    sending_now = threading.Event()
    stop_sending = threading.Event()

    def sender() -> None:
        pending = list(files)
        while pending and not stop_sending.is_set():
            nxt = []
            for path, uid, _study in pending:
                if stop_sending.is_set():
                    nxt.append((path, uid, _study))
                    continue
                sending_now.set()
                ok = storescu(path, port)
                sending_now.clear()
                with lock:
                    c.sent += 1
                    if ok:
                        acked.add(uid)
                if not ok:
                    nxt.append((path, uid, _study))
            pending = nxt
            if pending:
                time.sleep(0.2)

    try:
        node.start()
        th = threading.Thread(target=sender, name="storescu", daemon=True)
        th.start()
        phases: collections.Counter[str] = collections.Counter()
        for k in range(kills):
            if deadline_s is not None and time.monotonic() - t0 > deadline_s:
                say(f"deadline reached after {k} kills")
                break
            time.sleep(rng.uniform(min_up, max_up))
            receiving = sending_now.is_set()
            running, claimed = _db_phase(data_dir / "triage.db")
            node.kill()
            c.kills += 1
            for name, hit in (("receive", receiving), ("batch", running > 0), ("send", claimed > 0)):
                if hit:
                    phases[name] += 1
            if not (receiving or running > 0 or claimed > 0):
                phases["idle"] += 1
            if (k + 1) % 10 == 0:
                say(f"  {k + 1} kills, {len(acked)}/{len(files)} acknowledged, phases {dict(phases)}")
            node.start()
        c.kill_phases = dict(phases)
        th.join(timeout=max(60.0, 3.0 * len(files)))
        stop_sending.set()
        th.join(timeout=30)

        # Let the node finish undisturbed: nothing queued/running, every delivery sent.
        end = time.monotonic() + max(60.0, 2.0 * len(files))
        while time.monotonic() < end:
            con = sqlite3.connect(f"file:{data_dir / 'triage.db'}?mode=ro", uri=True, timeout=5)
            try:
                busy = con.execute(
                    "SELECT count(*) FROM instances WHERE state = 'queued' OR (state = 'running' AND "
                    "lease_expires >= strftime('%Y-%m-%d %H:%M:%f', 'now', '-5 seconds'))"
                ).fetchone()[0]
                unsent = con.execute("SELECT count(*) FROM deliveries WHERE state != 'sent'").fetchone()[0]
            finally:
                con.close()
            if busy == 0 and unsent == 0:  # idle (jobs whose lease expired > 5 s ago count as idle)
                break
            time.sleep(0.5)
        rc = node.stop()
        if rc not in (0, None):
            c.problems.append(f"node exited {rc} on SIGTERM")
        # Jobs a killed node left `running`: a running node reclaims them only when new work
        # arrives (the scheduler's gather check counts `queued` rows only). Count them while the
        # node was idle, then recover the way an operator would (`cxr-triage batch --once`).
        con = sqlite3.connect(f"file:{data_dir / 'triage.db'}?mode=ro", uri=True)
        c.expired_running_idle = con.execute("SELECT count(*) FROM instances WHERE state='running'").fetchone()[0]
        con.close()
        if c.expired_running_idle:
            say(f"  {c.expired_running_idle} job(s) left running by a killed node were not reclaimed while idle; "
                "running `cxr-triage batch --once`")
            time.sleep(3.5)  # past batch.lease_seconds
            r = subprocess.run(
                [sys.executable, "-m", "worker.cli", "batch", "--once", "--data-dir", str(data_dir), "--model",
                 str(model), "--destination", node.destination],
                env=node.env, cwd=str(REPO), capture_output=True, text=True, timeout=300,
            )
            if r.returncode != 0:
                c.problems.append(f"batch --once exited {r.returncode}: {r.stderr[-500:]}")

        # ---- verify
        c.acknowledged = len(acked)
        con = sqlite3.connect(f"file:{data_dir / 'triage.db'}?mode=ro", uri=True)
        rows = {
            r[0]: r[1:]
            for r in con.execute(
                "SELECT sop_instance_uid, path, sha256, state, model_version, lease_expires, study_instance_uid, reason "
                "FROM instances"
            )
        }
        deliveries = collections.Counter(
            r[0] for r in con.execute(
                "SELECT i.sop_instance_uid FROM deliveries d JOIN instances i ON i.id = d.instance_id WHERE d.state='sent'"
            )
        )
        c.stuck_running = con.execute("SELECT count(*) FROM instances WHERE state='running'").fetchone()[0]
        c.left_queued = con.execute("SELECT count(*) FROM instances WHERE state='queued'").fetchone()[0]
        con.close()
        spool = data_dir / "spool"
        for uid in acked:
            row = rows.get(uid)
            if row is None:
                c.lost += 1
                c.problems.append(f"{uid}: acknowledged, not in the database")
                continue
            c.in_db += 1
            f = spool / row[0]
            if not f.is_file() or hashlib.sha256(f.read_bytes()).hexdigest() != row[1]:
                c.lost += 1
                c.problems.append(f"{uid}: acknowledged, file missing or altered in the spool")
                continue
            c.on_disk += 1
        finished: collections.Counter[str] = collections.Counter()
        sent_lines: collections.Counter[str] = collections.Counter()
        audit = data_dir / "audit.jsonl"
        if audit.exists():
            for line in audit.read_text().splitlines():
                try:
                    e = json.loads(line)
                except ValueError:
                    continue  # a line cut by SIGKILL
                if e.get("event") == "job_finished":
                    finished[e.get("sop_instance_uid")] += 1
                elif e.get("event") == "result_sent":
                    sent_lines[e.get("sop_instance_uid")] += 1
        c.screened_twice = sum(1 for n in finished.values() if n > 1)
        c.redeliveries = sum(n - 1 for n in sent_lines.values() if n > 1)

        expected: dict[str, str] = {}
        for uid, (_path, _sha, state, version, _lease, study, reason) in rows.items():
            if state == "done" and version == card["version"]:
                c.screened += 1
                expected[str(result_uids(uid, study, card["name"], card["version"]).sr_instance)] = uid
            elif state in ("skipped", "failed"):
                c.skipped_or_failed += 1
                c.problems.append(f"{uid}: {state}: {reason}")
        in_orthanc = [
            i["MainDicomTags"].get("SOPInstanceUID")
            for i in orthanc.post("/tools/find", {"Level": "Instance", "Query": {"Modality": "SR"}, "Expand": True})
        ]
        c.orthanc_sr = len(in_orthanc)
        per_source = collections.Counter(expected.get(u) for u in in_orthanc)
        c.delivered = sum(1 for src in expected.values() if per_source.get(src, 0) >= 1)
        c.duplicates = sum(n - 1 for src, n in per_source.items() if src is not None and n > 1) + per_source.get(None, 0)
        c.not_delivered = len(expected) - c.delivered + sum(1 for src in expected.values() if deliveries.get(src, 0) != 1)
        c.seconds = time.monotonic() - t0
        return c
    finally:
        stop_sending.set()
        node.kill()
        orthanc.stop()
