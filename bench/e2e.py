"""End-to-end benchmark: is the node as fast as its model? (one command, one run, JSON + table)

    .venv/bin/python bench/e2e.py [--model DIR] [--n 30] [--out bench/out/e2e.json]

Parts, all in one run on the same machine so that ratios compare like with like:

1. model limit: the IR's best throughput (images/s) over batch sizes 1/4/8/16, through
   ``worker.engine.Engine`` (the worker's own inference path); default: the shipped model;
2. decode + preprocess of a 2,000 x 2,500 16-bit CR, uncompressed / JPEG 2000 / JPEG lossless,
   on one core (median of repeats);
3. end to end: N realistic studies (2,000 x 2,500 16-bit CR, a third JPEG 2000 and a third JPEG
   lossless) sent by dcmtk ``storescu`` to the node (``cxr-triage serve`` in its own process),
   screened, and the SR delivered to a real Orthanc: images/s from first send to last SR sent,
   receive-to-SR latency median and p95, in continuous mode;
4. backlog: ``serve --no-batch`` fills the queue once; then copies of that data folder are
   drained by ``batch --once`` with batch sizes 1/4/8/16 and with 1 and 2 worker processes
   (images/s from start to last SR sent, peak RSS); stage breakdown per image from the database
   and the audit trail;
5. idle latency: single studies sent one at a time to an idle node on its default schedule
   settings; receive-to-SR median and p95;
6. claim latency with 1k / 5k / 10k queued jobs (it must stay flat);
7. installed footprint of the worker (the base install's dependency closure, from the installed
   distributions' file lists);
8. ``--parts utilisation`` (issue 18): does the node keep the cores busy?  A backlog of
   ``--backlog-n`` studies (copies of the N with new UIDs), uncompressed only and the mix, drained
   by one ``batch --once`` process (batch 16) to a folder and to Orthanc.  The window runs from
   the first claim (the first ``batch_finished`` event's time less its duration: process start-up
   and model loading are not in it) to the last result sent.  ``bench/cpuwatch.py`` samples the
   CPU time of the node and of Orthanc over that window; their sum over the images is the
   per-image CPU cost, ``limit = cores / cost`` the throughput those costs allow on this machine,
   and ``throughput / limit`` (target >= 0.85) the share of the cores the run kept busy.  With
   ``--before REV`` the node runs from a checkout of REV (same venv, same backlog, alternating
   with the working tree), for before/after in one run.  The machine's whole CPU use in the window
   is recorded too: it shows load from other processes.
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

import numpy as np  # noqa: E402
from pydicom.uid import JPEG2000Lossless  # noqa: E402
from sqlalchemy import select  # noqa: E402

from worker import imaging, store  # noqa: E402
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
    from worker.testing.dicom import make_image

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
        db = store.Database.open(f"sqlite:///{tmp / f'claim{n}.db'}")
        now = store.utcnow()
        with db.sessions.begin() as s:
            s.execute(
                store.Instance.__table__.insert(),
                [dict(sop_instance_uid=f"1.2.3.{i}", sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
                      transfer_syntax="1.2.840.10008.1.2.1", path=f"x/{i}.dcm", size_bytes=1, sha256="0" * 64,
                      receive_count=1, state="queued", attempts=0, received_at=now,
                      last_received_at=now) for i in range(n)],
            )
        raw = db.sql_engine.raw_connection()  # outside a transaction: a checkpoint cannot run inside one
        try:
            raw.cursor().execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            raw.close()
        dbs[n] = db
    times: dict[int, list[float]] = {n: [] for n in dbs}
    for _ in range(rounds):
        for n, db in dbs.items():
            t0 = time.perf_counter()
            got = store.claim_batch(db, 16, "bench", 60)
            times[n].append((time.perf_counter() - t0) * 1e3)
            store.release(db, "bench", [c.id for c in got])
    for db in dbs.values():
        db.close()
    return {n: round(statistics.median(v), 3) for n, v in times.items()}


def run_node(args: list[str], env: dict[str, str], repo: Path = REPO) -> subprocess.Popen:
    """``python -m worker.cli ARGS`` with the worker package of ``repo`` (its folder comes first on sys.path)."""
    return subprocess.Popen([sys.executable, "-m", "worker.cli", *args], env=env, cwd=repo,
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


ENV_FAST = {"CXR_TRIAGE_STORAGE_DISK_RESERVE_MB": "0", "CXR_TRIAGE_BATCH_POLL_SECONDS": "0.1",
            "CXR_TRIAGE_SCHEDULE_GATHER_SECONDS": "0.05", "CXR_TRIAGE_LOG_LEVEL": "WARNING"}


def _results(data_dir: Path, start: float) -> dict[str, Any]:
    """Throughput, latency and stage medians of a finished run, from its database and audit trail."""
    db = store.Database.open(f"sqlite:///{data_dir / 'triage.db'}", upgrade=False)
    with db.sessions() as s:
        rows = list(s.scalars(select(store.Instance)))
        sends = list(s.scalars(select(store.Delivery)))
    db.close()
    assert all(r.state == "done" for r in rows), [(r.state, r.reason) for r in rows if r.state != "done"]
    assert len(sends) == len(rows) and all(d.state == "sent" for d in sends), [d.state for d in sends]
    last_sent = max(d.sent_at for d in sends).timestamp()
    out: dict[str, Any] = {"n": len(rows), "seconds": round(last_sent - start, 2),
                           "images_per_s": round(len(rows) / (last_sent - start), 2)}
    sent_at = {d.instance_id: d.sent_at for d in sends}
    lat = sorted((sent_at[r.id] - r.received_at).total_seconds() for r in rows)
    out["latency_median_s"] = round(statistics.median(lat), 3)
    out["latency_p95_s"] = round(lat[int(0.95 * (len(lat) - 1))], 3)
    stages: dict[str, list[float]] = {}
    for r in rows:
        for k, v in (r.timings or {}).items():
            stages.setdefault(k, []).append(v)
    audit_path = data_dir / "audit.jsonl"
    if audit_path.exists():
        audit = [json.loads(x) for x in audit_path.read_text().splitlines()]
        stages["receive_and_spool_ms"] = [d["ms"] for d in audit if d["event"] == "object_received"]
    out["stage_median_ms"] = {k: round(statistics.median(v), 2) for k, v in stages.items() if v}
    if audit_path.exists():  # per-batch stages (claim, commit, send) as a mean per image
        batches = [d for d in audit if d["event"] == "batch_finished" and d["claimed"]]
        n = sum(d["claimed"] for d in batches)
        for key, name in (("claim", "db_claim_ms"), ("store", "db_commit_ms"), ("send", "send_ms")):
            if n:
                out["stage_median_ms"][name + "_mean"] = round(sum(d["stage_ms"][key] for d in batches) / n, 2)
    return out


def _start_node(
    model: Path, data_dir: Path, port: int, dest: str, env: dict[str, str], *extra: str
) -> subprocess.Popen:
    node = run_node(["serve", "--data-dir", str(data_dir), "--port", str(port), "--bind", "127.0.0.1", "--model",
                     str(model), "--destination", dest, *extra], env)
    assert wait(lambda: echo(port), 90), node.stderr.read() if node.poll() is not None else "no echo"
    return node


def continuous(model: Path, files: list[Path], tmp: Path, dest: str) -> dict[str, Any]:
    """Send everything to a running node (fast polling) and wait for the last SR."""
    from worker.testing.scu import free_port

    data_dir, port = tmp / "var-continuous", free_port()
    node = _start_node(model, data_dir, port, dest, {**os.environ, **ENV_FAST})
    try:
        time.sleep(1.0)
        idle = round(rss_kib(node.pid, "VmRSS") / 1024, 1)
        t0 = time.time()
        send_all(files, port)
        intake = time.time() - t0
        db = store.Database.open(f"sqlite:///{data_dir / 'triage.db'}", upgrade=False)
        ok = wait(lambda: store.delivery_counts(db).get("sent", 0) >= len(files), 900, 0.1)
        db.close()
        assert ok, "not all results were sent"
        peak = round(rss_kib(node.pid, "VmHWM") / 1024, 1)
    finally:
        node.send_signal(signal.SIGTERM)
        node.wait(60)
    return {**_results(data_dir, t0), "intake_seconds": round(intake, 2), "idle_rss_mib": idle, "peak_rss_mib": peak}


def fill_backlog(model: Path, files: list[Path], tmp: Path, dest: str) -> Path:
    """A data folder with every study queued (listener only), to be drained by copies of it."""
    from worker.testing.scu import free_port

    data_dir, port = tmp / "var-backlog", free_port()
    node = _start_node(model, data_dir, port, dest, {**os.environ, **ENV_FAST}, "--no-batch")
    try:
        send_all(files, port)
    finally:
        node.send_signal(signal.SIGTERM)
        node.wait(60)
    db = store.Database.open(f"sqlite:///{data_dir / 'triage.db'}", upgrade=False)
    assert store.counts(db) == {"queued": len(files)}
    db.close()
    return data_dir


def copy_backlog(backlog: Path, data_dir: Path) -> None:
    """A copy of a filled data folder to drain; the spool is read-only to the pipeline, so hard
    links instead of copies of 10 MB images."""
    shutil.copytree(backlog, data_dir, copy_function=lambda a, b: os.link(a, b) if "spool" in a else shutil.copy2(a, b))


def drain(model: Path, backlog: Path, tmp: Path, dest: str, workers: int, batch_size: int) -> dict[str, Any]:
    """``workers`` concurrent ``batch --once`` processes on a copy of the backlog."""
    data_dir = tmp / f"var-drain-{workers}x{batch_size}"
    copy_backlog(backlog, data_dir)
    env = {**os.environ, **ENV_FAST}
    args = ["batch", "--once", "--data-dir", str(data_dir), "--model", str(model), "--destination", dest,
            "--batch-size", str(batch_size)]
    start = time.time()
    procs = [run_node(args, env) for _ in range(workers)]
    peak = 0
    while any(p.poll() is None for p in procs):
        peak = max([peak] + [rss_kib(p.pid, "VmHWM") for p in procs if p.poll() is None])
        time.sleep(0.05)
    for p in procs:
        assert p.returncode == 0, p.stderr.read()
    out = _results(data_dir, start)
    out.pop("latency_median_s"), out.pop("latency_p95_s")  # receive times are from the fill, not this run
    return {**out, "workers": workers, "batch_size": batch_size, "peak_rss_mib": round(peak / 1024, 1)}


def idle_latency(model: Path, files: list[Path], tmp: Path, dest: str, gap: float = 1.5) -> dict[str, Any]:
    """One study at a time into an idle node on its DEFAULT schedule settings (poll, gather)."""
    from worker.testing.scu import free_port

    data_dir, port = tmp / "var-idle", free_port()
    env = {**os.environ, "CXR_TRIAGE_STORAGE_DISK_RESERVE_MB": "0", "CXR_TRIAGE_LOG_LEVEL": "WARNING"}
    node = _start_node(model, data_dir, port, dest, env)
    try:
        time.sleep(2.0)
        idle = round(rss_kib(node.pid, "VmRSS") / 1024, 1)
        t0 = time.time()
        for f in files:
            send_all([f], port)
            time.sleep(gap)
        db = store.Database.open(f"sqlite:///{data_dir / 'triage.db'}", upgrade=False)
        ok = wait(lambda: store.delivery_counts(db).get("sent", 0) >= len(files), 120, 0.1)
        db.close()
        assert ok, "not all results were sent"
    finally:
        node.send_signal(signal.SIGTERM)
        node.wait(60)
    out = _results(data_dir, t0)
    return {"n": out["n"], "gap_s": gap, "latency_median_s": out["latency_median_s"],
            "latency_p95_s": out["latency_p95_s"], "idle_rss_mib": idle, "stage_median_ms": out["stage_median_ms"]}


def footprint() -> dict[str, Any]:
    """Bytes on disk of the worker's base install: cxr-triage's base requirements and their
    requirements, recursively (no extras), summed over each distribution's recorded files."""
    import re
    from importlib import metadata

    def name_of(req: str) -> str:
        return re.split(r"[ ;<>=!~\[(]", req, maxsplit=1)[0].lower().replace("_", "-")

    seen: dict[str, int] = {}
    todo = [name_of(r) for r in metadata.requires("cxr-triage") or [] if "extra ==" not in r]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        size = 0
        for f in dist.files or []:
            path = Path(str(dist.locate_file(f)))
            if path.is_file():
                size += path.stat().st_size
        seen[name] = size
        todo += [name_of(r) for r in dist.requires or [] if "extra ==" not in r]
    # our own package: the worker (with its default model) as an install would carry it
    worker_dir = REPO / "worker"
    seen["cxr-triage (worker/)"] = sum(f.stat().st_size for f in worker_dir.rglob("*")
                                       if f.is_file() and "__pycache__" not in f.parts)
    total = sum(seen.values())
    top = sorted(seen.items(), key=lambda kv: -kv[1])[:6]
    return {"total_mib": round(total / 2**20, 1), "distributions": len(seen),
            "largest_mib": {k: round(v / 2**20, 1) for k, v in top}}


def main(argv: list[str] | None = None) -> int:
    from worker.modelcard import default_model_dir

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=default_model_dir(), help="IR folder (default: the shipped model)")
    p.add_argument("--n", type=int, default=30)
    p.add_argument("--idle-n", type=int, default=8)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "e2e.json")
    p.add_argument("--parts", default="all", help="all (parts 1-7) | utilisation (part 8) | all,utilisation")
    p.add_argument("--backlog-n", type=int, default=96, help="part 8: studies in each backlog")
    p.add_argument("--rounds", type=int, default=1, help="part 8: repeats of each before/after pair")
    p.add_argument("--before", help="part 8: also drain with the node of this git revision, alternating")
    p.add_argument("--workers", default="1", help="part 8: comma-separated numbers of batch processes, e.g. 1,2")
    args = p.parse_args(argv)
    parts = set(args.parts.split(","))
    if "utilisation" in parts and "all" not in parts:
        return _utilisation_only(args)
    if args.model is None:
        print("no --model and no shipped default model", file=sys.stderr)
        return 2
    for tool in ("storescu", "echoscu", "dcmcjpeg", "Orthanc"):
        if shutil.which(tool) is None:
            print(f"needs {tool} (see README: dcmtk, orthanc)", file=sys.stderr)
            return 2
    from worker.testing.orthanc import Orthanc

    report: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
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
        report["footprint"] = footprint()
        orthanc = Orthanc(tmp / "orthanc").start()
        dest = f"ORTHANC@127.0.0.1:{orthanc.dicom_port}"
        try:
            print("end to end, continuous ...", flush=True)
            report["continuous"] = continuous(args.model, files, tmp, dest)
            print("backlog: filling ...", flush=True)
            backlog = fill_backlog(args.model, files, tmp, dest)
            report["backlog"] = []
            for workers, bs in ((1, 1), (1, 4), (1, 8), (1, 16), (2, 16)):
                print(f"backlog: {workers} worker(s), batch size {bs} ...", flush=True)
                report["backlog"].append(drain(args.model, backlog, tmp, dest, workers, bs))
            print("idle latency ...", flush=True)
            report["idle"] = idle_latency(args.model, [f for f in files if f.stem.startswith("raw")][: args.idle_n],
                                          tmp, dest)
            report["delivered_in_orthanc"] = len(orthanc.find_instances(Modality="SR"))
        finally:
            orthanc.stop()
    limit = report["model_limit"]["best_images_per_s"]
    best = max(report["backlog"], key=lambda r: r["images_per_s"])
    report["ratio_backlog_to_model"] = round(best["images_per_s"] / limit, 3)
    c = report["claim_ms"]
    report["claim_growth_1k_to_10k"] = round(c[10000] / c[1000], 3)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str))
    one16 = next(r for r in report["backlog"] if r["workers"] == 1 and r["batch_size"] == 16)
    rows = [
        ("model limit (best img/s, batch 1/4/8/16)", f"{limit} ({report['model_limit']['by_batch']})", ""),
        ("decode+preprocess ms raw / J2K / JPEG-LL", " / ".join(str(v) for v in report["preprocess_ms"].values()),
         "raw <= 8 ms"),
        ("backlog img/s, 1 worker, batch 1/4/8/16",
         " / ".join(str(r["images_per_s"]) for r in report["backlog"] if r["workers"] == 1), ""),
        ("backlog img/s, 2 workers, batch 16",
         " / ".join(str(r["images_per_s"]) for r in report["backlog"] if r["workers"] == 2), ""),
        ("best backlog / model limit", report["ratio_backlog_to_model"], ">= 0.85"),
        ("continuous img/s", report["continuous"]["images_per_s"], ""),
        ("continuous latency median / p95 s (loaded)",
         f"{report['continuous']['latency_median_s']} / {report['continuous']['latency_p95_s']}", ""),
        ("idle latency median / p95 s (default schedule)",
         f"{report['idle']['latency_median_s']} / {report['idle']['latency_p95_s']}", "median <= 1 s"),
        ("node peak RSS MiB (continuous)", report["continuous"]["peak_rss_mib"], "<= 400"),
        ("batch peak RSS MiB (1 worker, batch 16)", one16["peak_rss_mib"], "<= 400"),
        ("node idle RSS MiB", report["idle"]["idle_rss_mib"], "<= 250"),
        ("worker install footprint MiB", report["footprint"]["total_mib"], "<= 400"),
        ("claim ms at 1k / 5k / 10k", " / ".join(str(v) for v in c.values()), "flat (within 20 %)"),
    ]
    w = max(len(r[0]) for r in rows)
    for name, value, target in rows:
        print(f"{name:<{w}}  {str(value):<44}  {target}")
    print("stage medians (ms, backlog 1 worker, batch 16):", one16["stage_median_ms"])
    print("stage medians (ms, idle):", report["idle"]["stage_median_ms"])
    print(f"wrote {args.out}")
    return 0


def _utilisation_only(args: argparse.Namespace) -> int:
    """Part 8 alone (bench/utilisation.py): its JSON to --out, its table to stdout."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import utilisation

    from worker.testing.orthanc import Orthanc

    report: dict[str, Any] = {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                              "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                              "model": str(args.model), "load_1min_at_start": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="cxr-e2e-") as t:
        tmp = Path(t)
        studies = tmp / "studies"
        studies.mkdir()
        kinds = ["raw", "j2k", "jpegll"]
        print("making studies ...", flush=True)
        files = [make_study(i, kinds[i % 3], studies) for i in range(args.n)]
        orthanc = Orthanc(tmp / "orthanc").start()
        try:
            report["utilisation"] = utilisation.run(args.model, files, tmp, orthanc, args.backlog_n, args.before,
                                                    args.rounds, tuple(int(w) for w in args.workers.split(",")))
        finally:
            orthanc.stop()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str))
    print("\n".join(utilisation.table(report["utilisation"])))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
