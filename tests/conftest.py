"""Shared fixtures: free port, temp data dir, settings, toy model, in-process node, PostgreSQL."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import SHARED, free_port, wait_for  # noqa: F401  (wait_for: re-exported for old imports)

from worker.settings import Settings, load_settings


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    d = tmp_path / "var"
    d.mkdir()
    return d


@pytest.fixture(scope="session")
def toy_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny OpenVINO IR + card (built with the opset API, no torch) at 224 px."""
    from worker.testing.toymodel import build_toy_model

    return build_toy_model(tmp_path_factory.mktemp("toy") / "model", thresholds={"covid19": 0.5, "pneumonia": 0.5})


@pytest.fixture
def settings(data_dir: Path, port: int) -> Settings:
    """Node settings for tests: loopback, a free port, small batches, fast polling, no model."""
    return load_settings(
        None,
        {
            "storage.data_dir": str(data_dir),
            "storage.disk_reserve_mb": "0",
            "listener.bind_address": "127.0.0.1",
            "listener.port": str(port),
            "batch.size": "8",
            "batch.poll_seconds": "0.2",
        },
        environ={},
    )


@pytest.fixture
def model_settings(settings: Settings, toy_model: Path) -> Settings:
    """``settings`` with the toy model configured."""
    import dataclasses

    return dataclasses.replace(settings, model=dataclasses.replace(settings.model, path=toy_model))


@pytest.fixture
def node(settings: Settings) -> Iterator[object]:
    """The listener alone (no scheduler), in process; tests run batches explicitly."""
    from worker.node import Node

    n = Node(settings, batch=False)
    n.start()
    yield n
    n.stop()


@pytest.fixture
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"needs the shared data folder {SHARED} (not present in this checkout)")
    return SHARED


def _pg_bin() -> Path | None:
    for root in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (root / "initdb").exists():
            return root
    return None


@pytest.fixture(scope="session")
def postgres_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A throw-away PostgreSQL server from the Debian package, on a free loopback port.

    Started with initdb/pg_ctl in a temp folder (as user ``postgres`` when the tests run as
    root, since the server refuses to run as root) and stopped at the end of the session.
    ``CXR_TRIAGE_TEST_POSTGRES_URL`` uses an existing server instead.
    """
    if os.environ.get("CXR_TRIAGE_TEST_POSTGRES_URL"):
        yield os.environ["CXR_TRIAGE_TEST_POSTGRES_URL"]
        return
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.skip("psycopg is not installed (pip install -e '.[dev]')")
    bindir = _pg_bin()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries not found (apt-get install postgresql)")
    # Not under pytest's temp root: that is private to root, and the server runs as postgres.
    base = Path(tempfile.mkdtemp(prefix="cxr-pg-"))
    datadir, sockdir = base / "data", base / "sock"
    sockdir.mkdir()
    prefix: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(base, "postgres")
        shutil.chown(sockdir, "postgres")
        os.chmod(base, 0o700)
        prefix = ["runuser", "-u", "postgres", "--"]
    pgport = free_port()
    subprocess.run(
        prefix + [str(bindir / "initdb"), "-D", str(datadir), "-U", "cxr", "--auth=trust", "-E", "UTF8"],
        check=True, capture_output=True,
    )
    subprocess.run(
        prefix + [str(bindir / "pg_ctl"), "-D", str(datadir), "-l", str(base / "log"), "-w", "-o",
                  f"-p {pgport} -k {sockdir} -c listen_addresses=127.0.0.1 -c fsync=off", "start"],
        check=True, capture_output=True,
    )
    try:
        subprocess.run(
            prefix + [str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(pgport), "-U", "cxr", "cxr"],
            check=True, capture_output=True,
        )
        yield f"postgresql+psycopg://cxr@127.0.0.1:{pgport}/cxr"
    finally:
        subprocess.run(prefix + [str(bindir / "pg_ctl"), "-D", str(datadir), "-m", "fast", "stop"], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def pg_fresh_url(postgres_url: str) -> Iterator[str]:
    """The PostgreSQL URL with an empty schema (tables dropped before the test)."""
    from sqlalchemy import create_engine, text

    engine = create_engine(postgres_url)
    with engine.begin() as conn:
        conn.execute(text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
    engine.dispose()
    yield postgres_url


@pytest.fixture
def orthanc(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A real Orthanc on free loopback ports; stopped (by pid) after the test."""
    if shutil.which("Orthanc") is None:
        pytest.skip("Orthanc is not installed (apt-get install orthanc)")
    from worker.testing.orthanc import Orthanc

    o = Orthanc(tmp_path / "orthanc")
    yield o
    o.stop()
