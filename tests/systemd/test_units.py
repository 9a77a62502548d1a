"""The systemd units: they verify, they harden, and the node speaks sd_notify."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from support import REPO, free_port

UNITS = sorted((REPO / "systemd").glob("*.service"))


def test_units_exist() -> None:
    assert [u.name for u in UNITS] == ["cxr-triage-batch.service", "cxr-triage.service"]


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_systemd_analyze_verify(unit: Path, tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    # verify checks that ExecStart's program exists: point it at this checkout's console script
    exe = Path(sys.executable).parent / "cxr-triage"
    if not exe.exists():
        pytest.skip(f"{exe} is missing (pip install -e .)")
    text = unit.read_text().replace("/opt/cxr-triage/venv/bin/cxr-triage", str(exe))
    copy = tmp_path / unit.name
    copy.write_text(text)
    r = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True, text=True)
    problems = [ln for ln in (r.stdout + r.stderr).splitlines() if unit.name in ln or "cxr-triage" in ln]
    assert r.returncode == 0 and not problems, r.stdout + r.stderr


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_units_are_hardened(unit: Path) -> None:
    text = unit.read_text()
    for line in (
        "Type=notify", "Restart=on-failure", "User=cxr-triage", "StateDirectory=cxr-triage", "StateDirectoryMode=0700",
        "NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes",
        "ReadWritePaths=/var/lib/cxr-triage", "CapabilityBoundingSet=\n", "EnvironmentFile=-/etc/cxr-triage/env",
        "UMask=0077",
    ):
        assert line in text, f"{unit.name} lacks {line!r}"
    assert "MemoryDenyWriteExecute=yes" not in text  # OpenVINO JIT needs W+X pages


def test_serve_notifies_ready_and_stopping(tmp_path: Path) -> None:
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(60)
    env = {**os.environ, "NOTIFY_SOCKET": str(sock_path), "CXR_TRIAGE_STORAGE_DISK_RESERVE_MB": "0"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "serve", "--no-batch", "--data-dir", str(tmp_path / "var"),
         "--port", str(free_port()), "--bind", "127.0.0.1"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        msg = sock.recv(4096).decode()
        assert msg.startswith("READY=1") and "listening on port" in msg
        proc.send_signal(signal.SIGTERM)
        assert sock.recv(4096).decode() == "STOPPING=1"
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        sock.close()
