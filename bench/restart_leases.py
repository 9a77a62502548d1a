"""A node SIGKILLed while it screens, started again: how long until every image is screened (issue 19).

    python bench/restart_leases.py [--images 64] [--kills 5] [--model DIR] [--out bench/out/restart_leases.json]

A real ``cxr-triage serve`` process (default model unless ``--model``, default ``batch.lease_seconds``
of 300 s) receives the images over DICOM; each time it holds leased jobs it is SIGKILLed and
started again, ``--kills`` times; after the last start the run waits until every image is
``done`` and prints how long that took from the last start and how many jobs the dead processes
had left leased. Before the change, those jobs waited for their lease to expire (300 s).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

from worker import store  # noqa: E402
from worker.testing.dicom import make_image  # noqa: E402
from worker.testing.scu import echo, free_port, send  # noqa: E402


def _start(data: Path, port: int, model: str | None) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "worker.cli", "serve", "--data-dir", str(data), "--port", str(port),
           "--bind", "127.0.0.1"] + (["--model", model] if model else [])
    env = {**os.environ, "CXR_TRIAGE_STORAGE_DISK_RESERVE_MB": "0", "CXR_TRIAGE_CONFIG": ""}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=open(data.parent / "node.log", "ab"))
    while echo(port) != 0:
        if proc.poll() is not None:
            raise SystemExit(f"the node exited with {proc.returncode}; see {data.parent / 'node.log'}")
        time.sleep(0.1)
    return proc


def _leased_by(db: store.Database, pid: int) -> int:
    from sqlalchemy import func, select

    with db.sessions() as s:
        return int(s.scalar(select(func.count()).where(store.Instance.state == "running",
                                                       store.Instance.lease_owner.like(f"%:{pid}:%"))) or 0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--kills", type=int, default=5)
    ap.add_argument("--model", default=None, help="model folder (default: the packaged default model)")
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="cxr-restart-"))
    data, port = work / "var", free_port()
    proc = _start(data, port, args.model)
    db = store.Database.open(f"sqlite:///{data / 'triage.db'}")
    statuses = send([make_image(rows=512, cols=512, seed=i) for i in range(args.images)], port)
    assert statuses == [0] * args.images, statuses
    leased_at_kills = []
    try:
        for _ in range(args.kills):
            while _leased_by(db, proc.pid) == 0:  # a batch of this process holds leases
                if store.counts(db).get("done", 0) == args.images:
                    raise SystemExit("every image was screened before all kills: use more --images")
                time.sleep(0.02)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            leased_at_kills.append(_leased_by(db, proc.pid))
            t0 = time.monotonic()
            proc = _start(data, port, args.model)
        while store.counts(db).get("done", 0) < args.images:
            if time.monotonic() - t0 > args.timeout:
                raise SystemExit(f"not screened after {args.timeout:.0f} s: {store.counts(db)}")
            time.sleep(0.1)
        seconds = time.monotonic() - t0
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
        db.close()
    result = {"images": args.images, "kills": args.kills, "leased_by_each_killed_process": leased_at_kills,
              "seconds_from_last_start_to_all_done": round(seconds, 1), "lease_seconds": 300}
    print(json.dumps(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
