"""Helpers shared by the tests: the repository's paths, the CLI in a subprocess, a listener that
stores a few objects; and, re-exported, the DICOM builders and SCU of :mod:`worker.testing` (which
bench/ imports too)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pydicom.dataset import Dataset

from worker.testing.dicom import (  # noqa: F401  (re-exported: `from support import make_image`)
    CR_STORAGE,
    CT_STORAGE,
    DX_STORAGE,
    SC_STORAGE,
    j2k_dataset,
    make_image,
    tile_cod_codestream,
    to_bytes,
)
from worker.testing.scu import echo, free_port, requested, send, wait_for  # noqa: F401

if TYPE_CHECKING:
    from worker.settings import Settings

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``cxr-triage ARGS`` in its own process, without this environment's ``CXR_TRIAGE_*`` settings
    (and no disk reserve, so a small test disk never refuses intake)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("CXR_TRIAGE_")}
    return subprocess.run([sys.executable, "-m", "worker.cli", *args], capture_output=True, text=True, timeout=120,
                          env={**base, "CXR_TRIAGE_STORAGE_DISK_RESERVE_MB": "0", **(env or {})})


def receive(data_dir: Path, dss: Sequence[Dataset]) -> Settings:
    """A listener-only node on a free loopback port stores ``dss`` in ``data_dir`` (each must get
    0x0000), then stops; returns its settings (the database and spool a later command reads)."""
    from worker.node import Node
    from worker.settings import load_settings

    s = load_settings(None, {"storage.data_dir": str(data_dir), "listener.port": free_port(),
                             "listener.bind_address": "127.0.0.1", "storage.disk_reserve_mb": 0}, environ={})
    n = Node(s, batch=False)
    n.start()
    try:
        assert send(list(dss), n.port) == [0] * len(dss)
    finally:
        n.stop()
    return s
