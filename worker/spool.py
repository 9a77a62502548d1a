"""Durable storage of received objects.

An object is written to a temporary file in its final folder, flushed, ``fsync``'d, renamed
into place with ``os.replace`` (atomic on POSIX) and the folder is ``fsync``'d, so that after a
crash a file in the spool is either whole or absent. Only then does the listener record the
row and answer the C-STORE with success (PS3.4 B.2.3: success means the SCP has stored it).

File names come from the SOP Instance UID, which is validated first (PS3.5 9.1: digits and
dots, at most 64 characters) so that nothing a peer sends can name a path outside the spool.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import uuid
from pathlib import Path

log = logging.getLogger(__name__)

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
TMP_PREFIX = ".tmp-"


class SpoolError(OSError):
    """The spool could not store an object (disk full, permissions)."""


def uid_problem(uid: object) -> str | None:
    """Why ``uid`` is not a valid DICOM UID (PS3.5 9.1), or None when it is valid.

    Leading zeros in a component are invalid by the standard but common in the wild; they are
    harmless for file names, so they are accepted here.
    """
    if not isinstance(uid, str) or not uid:
        return "UID is empty"
    if len(uid) > 64:
        return f"UID is {len(uid)} characters long (at most 64)"
    if not _UID_RE.match(uid):
        return "UID has characters other than digits and single dots"
    return None


class Spool:
    """A folder of received objects, addressed by relative paths derived from UIDs."""

    def __init__(self, root: str | os.PathLike[str], *, reserve_bytes: int = 0, fsync: bool = True) -> None:
        self.root = Path(root)
        self.reserve_bytes = reserve_bytes
        self.fsync = fsync
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)

    def free_bytes(self) -> int:
        """Free space on the spool's file system."""
        return shutil.disk_usage(self.root).free

    def has_room(self, incoming: int = 0) -> bool:
        """True when storing ``incoming`` more bytes keeps the configured reserve free."""
        return self.free_bytes() - incoming >= self.reserve_bytes

    @staticmethod
    def relpath_for(sop_instance_uid: str) -> str:
        """``ab/<uid>.dcm``: two hex characters of the UID's hash spread files over 256 folders."""
        problem = uid_problem(sop_instance_uid)
        if problem:
            raise ValueError(f"invalid SOP Instance UID: {problem}")
        bucket = hashlib.sha1(sop_instance_uid.encode("ascii")).hexdigest()[:2]
        return f"{bucket}/{sop_instance_uid}.dcm"

    @staticmethod
    def result_relpath_for(sop_instance_uid: str) -> str:
        """``results/ab/<uid>.dcm``: result objects live in the spool too, durable until sent."""
        return "results/" + Spool.relpath_for(sop_instance_uid)

    def path(self, relpath: str) -> Path:
        """Absolute path of a stored object; refuses anything that leaves the spool."""
        p = (self.root / relpath).resolve()
        if self.root.resolve() not in p.parents:
            raise ValueError(f"path {relpath!r} is outside the spool")
        return p

    def write(self, relpath: str, data: bytes | bytearray | memoryview) -> int:
        """Store ``data`` durably at ``relpath`` (temp file, fsync, rename, fsync folder).

        Returns the number of bytes written. Raises SpoolError on any OS failure, leaving no
        partial file behind.
        """
        final = self.path(relpath)
        folder = final.parent
        tmp = folder / f"{TMP_PREFIX}{uuid.uuid4().hex}"
        try:
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                view = memoryview(data)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, final)
            if self.fsync:
                dfd = os.open(folder, os.O_RDONLY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
        except OSError as exc:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:  # pragma: no cover
                pass
            raise SpoolError(exc.errno, f"could not store object: {exc.strerror or exc}") from exc
        return len(data)

    def remove_stale_temp_files(self) -> int:
        """Delete temporary files left by a crash mid-write (their C-STORE never succeeded)."""
        n = 0
        for tmp in [*self.root.glob(f"*/{TMP_PREFIX}*"), *self.root.glob(f"results/*/{TMP_PREFIX}*")]:
            try:
                tmp.unlink()
                n += 1
            except OSError:  # pragma: no cover
                log.warning("could not remove stale temporary file %s", tmp.name)
        if n:
            log.info("removed %d partial file(s) left by an interrupted receive", n)
        return n
