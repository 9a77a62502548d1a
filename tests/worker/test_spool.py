"""Durable spool writes and UID validation."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from worker.spool import Spool, SpoolError, uid_problem


@pytest.mark.parametrize(
    "uid, problem",
    [
        ("1.2.840.10008.5.1.4.1.1.1", None),
        ("1.2.03.4", None),  # leading zero: invalid by PS3.5 9.1 but harmless, accepted
        ("", "empty"),
        ("1." + "2" * 63, "at most 64"),
        ("../../x", "digits"),
        ("1.2.3.", "digits"),
        (".1.2", "digits"),
        ("1.2\x00", "digits"),
        ("1.2 ", "digits"),
    ],
)
def test_uid_problem(uid: str, problem: str | None) -> None:
    got = uid_problem(uid)
    assert (got is None) if problem is None else (problem in got)


def test_write_is_atomic_and_private(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    rel = Spool.relpath_for("1.2.3.4")
    assert rel.endswith("/1.2.3.4.dcm") and len(rel.split("/")[0]) == 2
    assert spool.write(rel, b"x" * 1000) == 1000
    p = spool.path(rel)
    assert p.read_bytes() == b"x" * 1000
    assert p.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "spool").stat().st_mode & 0o777 == 0o700
    assert [f.name for f in p.parent.iterdir()] == ["1.2.3.4.dcm"]


def test_relpath_refuses_invalid_uid_and_path_escapes(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    with pytest.raises(ValueError):
        Spool.relpath_for("../../etc/passwd")
    with pytest.raises(ValueError, match="outside the spool"):
        spool.path("../escape.dcm")


def test_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spool = Spool(tmp_path / "spool")
    rel = Spool.relpath_for("1.2.3.5")

    def boom(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(SpoolError, match="No space left"):
        spool.write(rel, b"data")
    assert not [p for p in (tmp_path / "spool").rglob("*") if p.is_file()]


def test_reserve_and_stale_temp_cleanup(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", reserve_bytes=0)
    assert spool.has_room(1)
    assert not Spool(tmp_path / "spool", reserve_bytes=spool.free_bytes() + 2**30).has_room()
    (tmp_path / "spool" / "ab").mkdir()
    (tmp_path / "spool" / "ab" / ".tmp-deadbeef").write_bytes(b"partial")
    assert spool.remove_stale_temp_files() == 1
