"""End-to-end benchmark: is the node as fast as its model? (one command, one run, JSON + table)

    .venv/bin/python bench/e2e.py --model DIR [--n 40] [--out bench/out/e2e.json]

Parts, all in one run on the same machine so that ratios compare like with like:

1. model limit: the IR's best throughput (images/s) over batch sizes 1/4/8/16, through
   ``worker.engine.Engine`` (the worker's own inference path);
2. decode + preprocess of a 2,000 x 2,500 16-bit CR, uncompressed / JPEG 2000 / JPEG lossless,
   on one core (median of repeats);
3. end to end: N realistic studies (2,000 x 2,500 16-bit CR, a third JPEG 2000 and a third JPEG
   lossless) sent by dcmtk ``storescu`` to the node (``cxr-triage serve`` in its own process),
   screened, and the SR delivered to a real Orthanc: images/s from first send to last SR sent,
   receive-to-SR latency median and p95, in continuous mode; then a backlog (``serve --no-batch``
   fills the queue, ``batch --once`` drains it); stage breakdown per image from the database and
   the audit trail; peak and idle RSS of the node;
4. claim latency with 1k / 5k / 10k queued jobs (it must stay flat).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import numpy as np  # noqa: E402
from pydicom.uid import JPEG2000Lossless, JPEGLosslessSV1  # noqa: E402

from worker import imaging, jobs  # noqa: E402
from worker.engine import Engine  # noqa: E402


def rss_kib(pid: int, key: str) -> int:
    """VmRSS / VmHWM of a process, KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def model_limit(model: Path, seconds: float = 4.0) -> dict[str, Any]:
    eng = Engine(model)
    shape = (3, *eng.card.input_size)
    rng = np.random.default_rng(0)
    out: dict[str, Any] = {"precision": eng.precision, "by_batch": {}}
    for bs in (1, 4, 8, 16):
        x = rng.standard_normal((bs, *shape)).astype(np.float32)
        eng.infer(x)  # warm-up
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            eng.infer(x)
            n += bs
        out["by_batch"][bs] = round(n / (time.perf_counter() - t0), 2)
    out["best_images_per_s"] = max(out["by_batch"].values())
    return out


def make_study(i: int, kind: str, out_dir: Path) -> Path:
    from support import make_image

    rng = np.random.default_rng(i)
    yy = np.linspace(0, 1, 2000, dtype=np.float32)[:, None]
    pix = (yy * 2500 + rng.normal(0, 200, (2000, 2500))).clip(0, 4095).astype(np.uint16)
    ds = make_image(pix, stored=12, seed=i, photometric="MONOCHROME1" if i % 4 == 0 else "MONOCHROME2")
    if kind == "j2k":
        ds.compress(JPEG2000Lossless)
    elif kind == "jpegll":
        src, dst = out_dir / f"tmp{i}.dcm", out_dir / f"jpegll-{i}.dcm"
        ds.save_as(src, enforce_file_format=True)
        subprocess.run(["dcmcjpeg", "+e1", str(src), str(dst)], check=True, capture_output=True)
        src.unlink()
        return dst
    path = out_dir / f"{kind}-{i}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def preprocess_cost(files: dict[str, Path], repeats: int = 15) -> dict[str, float]:
    from pydicom import dcmread

    spec = imaging.PreprocessSpec()
    out = {}
    for kind, f in files.items():
        ds = dcmread(f)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            imaging.preprocess(ds, spec)
            times.append((time.perf_counter() - t0) * 1e3)
        out[kind] = round(statistics.median(times), 2)
    return out


def claim_latency(tmp: Path, rounds: int = 60) -> dict[int, float]:
    """Median claim_batch(16) time with 1k, 5k, 10k queued rows in SQLite.

    The three databases are measured round-robin (interleaved), so machine noise hits them alike;
    each claim is released again so the backlog stays the same size.
    """
    dbs = {}
    for n in (1000, 5000, 10000):
        db = jobs.Database.open(f"sqlite:///{tmp / f'claim{n}.db'}")
        now = jobs.utcnow()
        with db.sessions.begin() as s:
            s.execute(
                jobs.Instance.__table__.insert(),
                [dict(sop_instance_uid=f"1.2.3.{i}", sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
                      transfer_syntax="1.2.840.10008.1.2.1", path=f"x/{i}.dcm", size_bytes=1, sha256="0" * 64,
                      receive_count=1, state="queued", attempts=0, received_at=now,
                      last_received_at=now) for i in range(n)],
            )
        raw = db.engine.raw_connection()  # outside a transaction: a checkpoint cannot run inside one
        try:
            raw.cursor().execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            raw.close()
        dbs[n] = db
    times: dict[int, list[float]] = {n: [] for n in dbs}
    for _ in range(rounds):
        for n, db in dbs.items():
            t0 = time.perf_counter()
            got = jobs.claim_batch(db, 16, "bench", 60)
            times[n].append((time.perf_counter() - t0) * 1e3)
            jobs.release(db, "bench", [c.id for c in got])
    for db in dbs.values():
        db.close()
    return {n: round(statistics.median(v), 3) for n, v in times.items()}


def run_node(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "worker.cli", *args], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait(pred, timeout: float, step: float = 0.05) -> bool:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(step)
    return False


def echo(port: int) -> bool:
    return subprocess.run(["echoscu", "-aec", "CXRTRIAGE", "127.0.0.1", str(port)], capture_output=True).returncode == 0


#: storescu proposes uncompressed syntaxes only, unless told which compressed one to propose
PROPOSE = {"raw": [], "j2k": ["-xv"], "jpegll": ["-xs"]}


def send_all(files: list[Path], port: int) -> None:
    """One storescu association per compression kind, as a PACS forwarding rule would."""
    by_kind: dict[str, list[Path]] = {}
    for f in files:
        by_kind.setdefault(f.stem.split("-")[0], []).append(f)
    for kind, group in by_kind.items():
        r = subprocess.run(["storescu", *PROPOSE[kind], "-aec", "CXRTRIAGE", "127.0.0.1", str(port), *map(str, group)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"storescu failed for {kind}: {r.stderr[-500:]}")


def e2e(model: Path, files: list[Path], tmp: Path, mode: str) -> dict[str, Any]:
    from orthanc import Orthanc
    from support import free_port

    orthanc = Orthanc(tmp / f"orthanc-{mode}").start()
    data_dir, port = tmp / f"var-{mode}", free_port()
    env = {**os.environ, "CXR_TRIAGE_STORAGE_DISK_RESERVE_MB": "0", "CXR_TRIAGE_BATCH_POLL_SECONDS": "0.1",
           "CXR_TRIAGE_SCHEDULE_GATHER_SECONDS": "0.05", "CXR_TRIAGE_LOG_LEVEL": "WARNING"}
    common = ["--data-dir", str(data_dir), "--port", str(port), "--bind", "127.0.0.1", "--model", str(model),
              "--destination", f"ORTHANC@127.0.0.1:{orthanc.dicom_port}"]
    result: dict[str, Any] = {"n": len(files)}
    try:
        node = run_node(["serve", *common] + (["--no-batch"] if mode == "backlog" else []), env)
        assert wait(lambda: echo(port), 60), node.stderr.read() if node.poll() is not None else "no echo"
        time.sleep(1.0)
        result["idle_rss_mib"] = round(rss_kib(node.pid, "VmRSS") / 1024, 1)
        t0 = time.time()
        send_all(files, port)
        t_sent = time.time()
        db = jobs.Database.open(f"sqlite:///{data_dir / 'triage.db'}", upgrade=False)
        if mode == "backlog":
            assert jobs.counts(db) == {"queued": len(files)}
            node.send_signal(signal.SIGTERM)
            node.wait(60)
            t_batch = time.time()
            worker = run_node(["batch", "--once", *[a for a in common if a not in ("--port", str(port), "--bind",
                                                                                      "127.0.0.1")]], env)
            peak = 0
            while worker.poll() is None:
                peak = max(peak, rss_kib(worker.pid, "VmHWM"))
                time.sleep(0.1)
            result["peak_rss_mib"] = round(peak / 1024, 1)
            start = t_batch
        else:
            ok = wait(lambda: jobs.delivery_counts(db).get("sent", 0) >= len(files), 600, 0.1)
            assert ok, jobs.delivery_counts(db)
            result["peak_rss_mib"] = round(rss_kib(node.pid, "VmHWM") / 1024, 1)
            node.send_signal(signal.SIGTERM)
            node.wait(60)
            start = t0
        with db.sessions() as s:
            rows = list(s.scalars(jobs.select(jobs.Instance)))
            sends = list(s.scalars(jobs.select(jobs.Delivery)))
        db.close()
        assert all(r.state == "done" for r in rows), [(r.state, r.reason) for r in rows if r.state != "done"]
        last_sent = max(d.sent_at for d in sends).timestamp()
        result["intake_seconds"] = round(t_sent - t0, 2)
        result["seconds"] = round(last_sent - start, 2)
        result["images_per_s"] = round(len(files) / (last_sent - start), 2)
        sent_at = {d.instance_id: d.sent_at for d in sends}
        lat = sorted((sent_at[r.id] - r.received_at).total_seconds() for r in rows)
        result["latency_median_s"] = round(statistics.median(lat), 3)
        result["latency_p95_s"] = round(lat[int(0.95 * (len(lat) - 1))], 3)
        stages: dict[str, list[float]] = {}
        for r in rows:
            for k, v in (r.timings or {}).items():
                stages.setdefault(k, []).append(v)
        audit = [json.loads(x) for x in (data_dir / "audit.jsonl").read_text().splitlines()]
        stages["receive_and_spool_ms"] = [d["ms"] for d in audit if d["event"] == "object_received"]
        result["stage_median_ms"] = {k: round(statistics.median(v), 2) for k, v in stages.items() if v}
        result["delivered_in_orthanc"] = len(orthanc.find_instances(Modality="SR"))
    finally:
        orthanc.stop()
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, required=True, help="IR folder (model.xml/.bin/.json), e.g. the INT8 default")
    p.add_argument("--n", type=int, default=40)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "e2e.json")
    args = p.parse_args(argv)
    for tool in ("storescu", "echoscu", "dcmcjpeg", "Orthanc"):
        if shutil.which(tool) is None:
            print(f"needs {tool} (see README: dcmtk, orthanc)", file=sys.stderr)
            return 2
    report: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "model": str(args.model),
    }
    with tempfile.TemporaryDirectory(prefix="cxr-e2e-") as t:
        tmp = Path(t)
        print("model limit ...", flush=True)
        report["model_limit"] = model_limit(args.model)
        print("making studies ...", flush=True)
        studies = tmp / "studies"
        studies.mkdir()
        kinds = ["raw", "j2k", "jpegll"]
        files = [make_study(i, kinds[i % 3], studies) for i in range(args.n)]
        report["preprocess_ms"] = preprocess_cost({k: files[i] for i, k in enumerate(kinds)})
        print("claim latency ...", flush=True)
        report["claim_ms"] = claim_latency(tmp)
        for mode in ("continuous", "backlog"):
            print(f"end to end, {mode} ...", flush=True)
            report[mode] = e2e(args.model, files, tmp, mode)
    limit = report["model_limit"]["best_images_per_s"]
    report["ratio_backlog_to_model"] = round(report["backlog"]["images_per_s"] / limit, 3)
    c = report["claim_ms"]
    report["claim_growth_1k_to_10k"] = round(c[10000] / c[1000], 3)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str))
    rows = [
        ("model limit (best img/s, batch 1/4/8/16)", f"{limit} ({report['model_limit']['by_batch']})", ""),
        ("decode+preprocess ms raw / J2K / JPEG-LL", " / ".join(str(v) for v in report["preprocess_ms"].values()),
         "raw <= 8 ms"),
        ("backlog end to end img/s", report["backlog"]["images_per_s"], f">= {0.85 * limit:.1f} (85 %)"),
        ("backlog / model limit", report["ratio_backlog_to_model"], ">= 0.85"),
        ("continuous img/s", report["continuous"]["images_per_s"], ""),
        ("continuous latency median / p95 s",
         f"{report['continuous']['latency_median_s']} / {report['continuous']['latency_p95_s']}", "median <= 1 s idle"),
        ("node peak RSS MiB (continuous)", report["continuous"]["peak_rss_mib"], "<= 400"),
        ("node idle RSS MiB", report["continuous"]["idle_rss_mib"], "<= 250"),
        ("claim ms at 1k / 5k / 10k", " / ".join(str(v) for v in c.values()), "flat (within 20 %)"),
    ]
    w = max(len(r[0]) for r in rows)
    for name, value, target in rows:
        print(f"{name:<{w}}  {str(value):<40}  {target}")
    print("stage medians (ms, backlog):", report["backlog"]["stage_median_ms"])
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
