"""The process log (issue 19, item 11): quiet libraries at INFO, everything at DEBUG, JSON lines."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from support import free_port, make_image, send, wait_for


def _serve(tmp_path: Path, toy_model: Path, *extra: str, seconds: float = 3.0,
           env: dict[str, str] | None = None) -> str:
    """Run ``serve`` idle (after one image) for ``seconds``, stop it; its stderr."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "serve", "--data-dir", str(tmp_path / "var"), "--bind", "127.0.0.1",
         "--port", str(port), "--model", str(toy_model), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "CXR_TRIAGE_STORAGE_DISK_RESERVE_MB": "0", "CXR_TRIAGE_BATCH_POLL_SECONDS": "0.1",
             **(env or {})},
    )
    try:
        assert wait_for(lambda: send([make_image(rows=64, cols=64)], port) == [0] or proc.poll() is not None, 60)
        time.sleep(seconds)  # idle: about 30 scheduler ticks at 0.1 s
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return err


def test_an_idle_node_is_quiet_at_info(tmp_path: Path, toy_model: Path) -> None:
    err = _serve(tmp_path, toy_model)
    lines = err.splitlines()
    assert not [ln for ln in lines if " apscheduler" in ln or " alembic" in ln or " pynetdicom" in ln], err
    assert any("worker.listener: listening as" in ln for ln in lines)  # our own INFO lines stay
    assert any("batch: 1 claimed, 1 done" in ln for ln in lines)
    assert len(lines) < 20, err  # start, one batch, stop; not 10 lines per tick


def test_debug_shows_the_libraries_too(tmp_path: Path, toy_model: Path) -> None:
    err = _serve(tmp_path, toy_model, "--log-level", "DEBUG", seconds=1.0)
    assert "apscheduler" in err and "pynetdicom" in err


def test_json_lines(tmp_path: Path, toy_model: Path) -> None:
    err = _serve(tmp_path, toy_model, seconds=1.0, env={"CXR_TRIAGE_LOG_FORMAT": "json"})
    docs = [json.loads(ln) for ln in err.splitlines()]  # every line is one JSON object
    assert docs and all(set(d) >= {"ts", "level", "logger", "message"} for d in docs)
    assert all(d["ts"].endswith("Z") for d in docs)
    assert any(d["logger"] == "worker.listener" and d["message"].startswith("listening as") for d in docs)
