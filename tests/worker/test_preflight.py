"""Start-up checks (issue 19, item 1): one line naming the setting and value, exit 2, before the model loads.

Each case runs the real command in its own process and gives it a model folder that does not
exist: if the model were loaded first, the error would be about the model. So an error about the
port, the address or the folder shows that the check came first.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import free_port

from worker import preflight
from worker.settings import load_settings


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A loopback port with a listening socket on it (another server), closed after the test."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "worker.cli", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def _one_line(r: subprocess.CompletedProcess[str]) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and len(lines) == 1, r.stderr
    return lines[0]


def test_listener_port_in_use(tmp_path: Path, taken_port: int) -> None:
    r = _run("serve", "--data-dir", str(tmp_path / "var"), "--bind", "127.0.0.1", "--port", str(taken_port),
             "--model", str(tmp_path / "no-model"))
    line = _one_line(r)
    assert f"listener.port: port {taken_port} on 127.0.0.1 is already in use" in line
    assert "configuration error" not in line and "model" not in line


def test_health_port_in_use(tmp_path: Path, taken_port: int) -> None:
    r = _run("serve", "--data-dir", str(tmp_path / "var"), "--bind", "127.0.0.1", "--port", str(free_port()),
             "--model", str(tmp_path / "no-model"),
             env={"CXR_TRIAGE_HEALTH_ENABLED": "true", "CXR_TRIAGE_HEALTH_PORT": str(taken_port)})
    assert f"health.port: port {taken_port} on 127.0.0.1 is already in use" in _one_line(r)


def test_web_port_in_use(tmp_path: Path, taken_port: int) -> None:
    r = _run("serve", "--data-dir", str(tmp_path / "var"), "--bind", "127.0.0.1", "--port", str(free_port()),
             "--web-port", str(taken_port), "--model", str(tmp_path / "no-model"))
    assert f"web.port: port {taken_port} on 127.0.0.1 is already in use" in _one_line(r)


@pytest.mark.parametrize("address", ["192.0.2.1", "no-such-host.invalid"])
def test_bind_address_not_of_this_host(tmp_path: Path, address: str) -> None:
    # 192.0.2.1 is TEST-NET-1 (RFC 5737): never an address of this machine
    r = _run("serve", "--data-dir", str(tmp_path / "var"), "--bind", address, "--port", str(free_port()),
             "--model", str(tmp_path / "no-model"))
    line = _one_line(r)
    assert "listener.bind_address" in line and address in line and "not an address of this host" in line


def test_data_dir_not_a_folder(tmp_path: Path) -> None:
    f = tmp_path / "a-file"
    f.write_text("x")
    for data_dir, expected in ((f, f"storage.data_dir: {f} is not a folder"),
                               (f / "sub", f"storage.data_dir: {f} (in {f / 'sub'}) is not a folder")):
        r = _run("serve", "--data-dir", str(data_dir), "--bind", "127.0.0.1", "--port", str(free_port()),
                 "--model", str(tmp_path / "no-model"))
        assert expected in _one_line(r)
        r = _run("batch", "--once", "--data-dir", str(data_dir), "--model", str(tmp_path / "no-model"))
        assert expected in _one_line(r)
    assert f.read_text() == "x"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write to any folder")
def test_data_dir_not_writable(tmp_path: Path) -> None:  # pragma: no cover - CI runs as root
    d = tmp_path / "ro"
    d.mkdir(mode=0o500)
    r = _run("serve", "--data-dir", str(d), "--bind", "127.0.0.1", "--port", str(free_port()))
    assert f"storage.data_dir: {d} is not writable" in _one_line(r)


def test_the_checks_pass_on_a_good_configuration(tmp_path: Path) -> None:
    s = load_settings(None, {"storage.data_dir": str(tmp_path / "new" / "var"), "listener.bind_address": "127.0.0.1",
                             "listener.port": free_port()}, environ={})
    preflight.check_node(s)
    assert not (tmp_path / "new").exists()  # the checks create nothing


def test_a_bind_lost_after_the_check_reads_the_same(taken_port: int) -> None:
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", taken_port))
    except OSError as exc:
        err = preflight.bind_error("listener", "127.0.0.1", taken_port, exc)
    assert str(err) == f"listener.port: port {taken_port} on 127.0.0.1 is already in use by another process"
