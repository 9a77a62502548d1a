"""The audit trail, and no patient names, IDs or birth dates in any log of a full run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from support import free_port, make_image, send, wait_for

from worker.audit import AuditLog, fingerprint

NAMES = ["Zyxwvut^Qponmlk", "Aardvarkian^Bertholdine"]
IDS = ["PID-7731-ZQX", "PID-8842-YRW"]
BIRTH = "19480229"


def test_audit_log_appends_json_lines(tmp_path: Path) -> None:
    a = AuditLog(tmp_path / "a" / "audit.jsonl")
    a.record("object_received", sop_instance_uid="1.2.3", size=10, none_field=None)
    a.record("node_started", config_sha256="x")
    a.close()
    lines = [json.loads(x) for x in (tmp_path / "a" / "audit.jsonl").read_text().splitlines()]
    assert [d["event"] for d in lines] == ["object_received", "node_started"]
    assert "none_field" not in lines[0] and lines[0]["ts"].endswith("Z")
    assert oct((tmp_path / "a" / "audit.jsonl").stat().st_mode & 0o777) == "0o600"
    assert AuditLog(tmp_path / "a" / "audit.jsonl").last("node_started")["config_sha256"] == "x"
    assert fingerprint({"a": 1}) == fingerprint({"a": 1}) != fingerprint({"a": 2})


def _serve(tmp_path: Path, port: int, toy_model: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "CXR_TRIAGE_STORAGE_DISK_RESERVE_MB": "0", "CXR_TRIAGE_LOG_LEVEL": "DEBUG",
           "CXR_TRIAGE_BATCH_POLL_SECONDS": "0.2", "CXR_TRIAGE_SCHEDULE_GATHER_SECONDS": "0.1",
           "CXR_TRIAGE_SEND_SECONDARY_CAPTURE": "true"}
    return subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "serve", "--data-dir", str(tmp_path / "var"), "--port", str(port),
         "--bind", "127.0.0.1", "--model", str(toy_model), *extra],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def test_full_run_logs_no_patient_identity_and_audits_everything(tmp_path: Path, toy_model: Path) -> None:
    port = free_port()
    proc = _serve(tmp_path, port, toy_model)
    try:
        from support import echo

        assert wait_for(lambda: echo(port) == 0 or proc.poll() is not None, timeout=60)
        dss = []
        for i, (name, pid) in enumerate(zip(NAMES, IDS, strict=True)):
            ds = make_image(rows=96, cols=80, seed=i, patient_name=name, patient_id=pid)
            ds.PatientBirthDate = BIRTH
            dss.append(ds)
        lateral = make_image(rows=64, cols=64, view="LL", patient_name=NAMES[0], patient_id=IDS[0])
        assert send(dss + [dss[0], lateral], port) == [0, 0, 0, 0]
        results = tmp_path / "var" / "results"
        assert wait_for(lambda: results.is_dir() and len(list(results.iterdir())) == 4, timeout=60)  # 2 SR + 2 SC
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0
    audit_text = (tmp_path / "var" / "audit.jsonl").read_text()
    logs = out + err + audit_text
    assert "DEBUG" in err  # the scan covers the most verbose level
    # (fragments made of letters only: digits could occur by chance inside random UIDs)
    for secret in NAMES + IDS + [BIRTH, "Zyxwvut", "Qponmlk", "Aardvarkian", "Bertholdine", "ZQX", "YRW"]:
        assert secret not in logs, f"patient identity {secret!r} leaked into the logs"
    events = [json.loads(x)["event"] for x in audit_text.splitlines()]
    for e in ("node_started", "job_finished", "batch_finished", "result_produced", "result_sent", "node_stopped"):
        assert e in events, e
    assert events.count("result_sent") == 4 and events.count("job_finished") == 3


def test_config_and_model_changes_are_audited(tmp_path: Path, toy_model: Path) -> None:
    from worker.testing.toymodel import build_toy_model

    other = build_toy_model(tmp_path / "other", version="0.0.2", seed=5)
    port = free_port()
    for model, extra in ((toy_model, ()), (toy_model, ()), (other, ("--ae-title", "NEWAET"))):
        proc = _serve(tmp_path, port, model, *extra)
        from support import echo

        aet = extra[1] if extra else "CXRTRIAGE"
        assert wait_for(lambda aet=aet, proc=proc: echo(port, called=aet) == 0 or proc.poll() is not None, timeout=60)
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    docs = [json.loads(x) for x in (tmp_path / "var" / "audit.jsonl").read_text().splitlines()]
    events = [d["event"] for d in docs]
    assert events.count("node_started") == 3
    assert events.count("config_changed") == 1 and events.count("model_changed") == 1
    change = next(d for d in docs if d["event"] == "model_changed")
    assert change["previous_version"] == "0.0.1" and change["current_version"] == "0.0.2"
