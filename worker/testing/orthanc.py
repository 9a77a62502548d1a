"""A real Orthanc (Debian package) as the PACS in tests: loopback ports, config in a temp dir."""

from __future__ import annotations

import base64
import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, cast

from worker.testing.scu import free_port


class Orthanc:
    """Start/stop Orthanc by pid, talk to its REST API with urllib (no extra dependency)."""

    def __init__(self, workdir: Path, *, aet: str = "ORTHANC", modalities: dict[str, list[Any]] | None = None) -> None:
        self.workdir = workdir
        self.aet = aet
        self.http_port = free_port()
        self.dicom_port = free_port()
        self.modalities = modalities or {}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def _config(self) -> dict[str, Any]:
        return {
            "Name": "cxr-triage-test",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "storage"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.aet,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "HttpServerEnabled": True,
            "DicomCheckCalledAet": True,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "DicomModalities": self.modalities,
            "Plugins": [],
            "StorageCompression": False,
            "OverwriteInstances": True,
            "StableAge": 1,
        }

    def start(self, timeout: float = 30) -> Orthanc:
        self.workdir.mkdir(parents=True, exist_ok=True)
        cfg = self.workdir / "orthanc.json"
        cfg.write_text(json.dumps(self._config(), indent=2))
        log = (self.workdir / "orthanc.log").open("ab")
        self.proc = subprocess.Popen([shutil.which("Orthanc") or "Orthanc", str(cfg)], stdout=log, stderr=log)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited: {(self.workdir / 'orthanc.log').read_text()[-2000:]}")
            try:
                self.get("/system")
                with socket.create_connection(("127.0.0.1", self.dicom_port), timeout=1):
                    return self  # REST and DICOM both up
            except (urllib.error.URLError, OSError):
                time.sleep(0.1)
        raise RuntimeError("Orthanc did not start")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def _req(self, method: str, path: str, body: bytes | None = None, ctype: str = "application/json") -> Any:
        req = urllib.request.Request(self.url + path, data=body, method=method, headers={"Content-Type": ctype})
        with urllib.request.urlopen(req, timeout=60) as rsp:
            data = rsp.read()
        return json.loads(data) if data and data[:1] in (b"{", b"[") else data

    def get(self, path: str) -> Any:
        return self._req("GET", path)

    def post(self, path: str, body: Any, ctype: str = "application/json") -> Any:
        if not isinstance(body, bytes):
            body = json.dumps(body).encode()
        return self._req("POST", path, body, ctype)

    def upload(self, dicom_bytes: bytes) -> str:
        """Store a DICOM file over REST; returns Orthanc's instance id."""
        return str(self.post("/instances", dicom_bytes, "application/dicom")["ID"])

    def find_instances(self, **query: str) -> list[dict[str, Any]]:
        return cast(
            list[dict[str, Any]], self.post("/tools/find", {"Level": "Instance", "Query": query, "Expand": True})
        )

    def tags(self, instance_id: str) -> dict[str, Any]:
        return cast(dict[str, Any], self.get(f"/instances/{instance_id}/simplified-tags"))

    def file(self, instance_id: str) -> bytes:
        return cast(bytes, self._req("GET", f"/instances/{instance_id}/file"))


def auth_header(user: str, password: str) -> str:  # pragma: no cover - kept for secured set-ups
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
