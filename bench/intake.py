"""Benchmark: DICOM intake (C-STORE) throughput of this node against dcmtk storescp, and the
batch pipeline's throughput with the tiny test model, in one run.

Run from the repository root:  python bench/intake.py [--n 40] [--max-pdu 131072] [--repeats 7]
Prints a table and writes bench/out/intake.json.  Not a test: timings depend on the machine.

Intake: N uncompressed 2500 x 2000 16-bit CR files (12 bits stored, ~9.5 MiB each, each with its
own SOP Instance UID) are sent by dcmtk ``storescu`` over ONE association (same ``--max-pdu`` on
both sides) to three receivers, each started fresh on an empty folder:

  node          ``python -m worker.cli serve --no-batch`` in its own process, durable writes
                (temp file + fsync + rename + folder fsync, row committed with SQLite
                synchronous=FULL before the C-STORE succeeds): what production runs
  node-nofsync  the same with CXR_TRIAGE_STORAGE_FSYNC=false (only the spool's two fsyncs are
                skipped; SQLite stays synchronous=FULL): shows what the durable file write costs
  storescp      dcmtk ``storescp -od DIR`` (writes each file, no fsync): the reference

The clock runs from the start of ``storescu`` to its exit (association, N C-STOREs, release).
The receivers are started and answered a C-ECHO before the clock starts. ``sync`` is called
before each timed run so that one run's dirty pages are not flushed during the next. The order
of the receivers rotates each round (the machine is shared and noisy). Reported for each
receiver: the best and the median run, and every run; the target is judged on both (best/best
and median/median), because storescp's own rate is bimodal on a small VM (see bench/README.md)
and one fast storescp run moves the best/best ratio a lot. After every node run the
database must hold exactly N rows, all ``queued``, and the spool N files; storescp's folder must
hold N files; otherwise the run is an error, not a number.

Pipeline (``--pipeline``, on by default): ``worker.pipeline.drain`` in this process, with the toy
model (``worker.testing.toymodel.build_toy_model``), on the N jobs queued by the last durable node run:
images/s over the whole drain and the per-stage seconds from the BatchReport.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]

from worker import store  # noqa: E402
from worker.testing.dicom import make_image  # noqa: E402

ROWS, COLS = 2500, 2000  # portrait 35x43 cm cassette, ~0.17 mm pixels
SCU_AET = "BENCHSCU"
NODE_AET = "CXRTRIAGE"
STORESCP_AET = "STORESCP"
TARGET_RATIO = 1.5  # the issue: intake >= 1.5x storescp in the same run
TARGETS = ("node", "node-nofsync", "storescp")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def need_tools() -> None:
    missing = [t for t in ("storescu", "storescp", "echoscu") if shutil.which(t) is None]
    if missing:
        sys.exit(f"intake.py: dcmtk tools not found on PATH: {', '.join(missing)} (apt-get install dcmtk)")


def generate(folder: Path, n: int) -> tuple[list[Path], int]:
    """N CR files (Explicit VR Little Endian), different UIDs and slightly different pixels."""
    folder.mkdir(parents=True, exist_ok=True)
    base = make_image(rows=ROWS, cols=COLS, bits=16, stored=12, seed=0)
    pixels = np.frombuffer(base.PixelData, dtype=np.uint16).reshape(ROWS, COLS)
    files, total = [], 0
    for i in range(n):
        # same header shape as make_image (CR, CHEST, PA, window), fresh UIDs for every file
        ds = make_image(pixels=(pixels + (i % 64)).astype(np.uint16), stored=12, window=(2048.0, 4096.0),
                        patient_id=f"BENCH-{i:04d}")
        ds.AccessionNumber = f"ACC{i:06d}"
        p = folder / f"img{i:04d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        files.append(p)
        total += p.stat().st_size
    return files, total


def wait_for_echo(port: int, called: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"receiver exited with {proc.returncode} before answering C-ECHO; see {log}:\n"
                               + log.read_text(errors="replace")[-2000:])
        r = subprocess.run(["echoscu", "-aet", SCU_AET, "-aec", called, "127.0.0.1", str(port)],
                           capture_output=True)
        if r.returncode == 0:
            return
        time.sleep(0.2)
    raise RuntimeError(f"receiver did not answer C-ECHO on port {port} within {timeout:.0f} s; see {log}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def send(files: list[Path], port: int, called: str, max_pdu: int, log: Path) -> float:
    """storescu, one association, all files; seconds from start to exit."""
    cmd = ["storescu", "-aet", SCU_AET, "-aec", called, "--max-pdu", str(max_pdu),
           "127.0.0.1", str(port), *map(str, files)]
    os.sync()  # flush earlier runs' dirty pages now, not during this run
    with log.open("ab") as out:
        t0 = time.perf_counter()
        r = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT)
        seconds = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"storescu exited with {r.returncode}; see {log}")
    text = log.read_text(errors="replace")
    if " E: " in text or "Store Failed" in text:
        raise RuntimeError(f"storescu reported errors; see {log}")
    return seconds


def run_node(files: list[Path], workdir: Path, max_pdu: int, fsync: bool) -> tuple[float, Path]:
    """Start a listener-only node on an empty data dir, send, stop, verify N queued rows."""
    data = workdir / "var"
    log = workdir / "node.log"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_TRIAGE_")}
    env.update(
        CXR_TRIAGE_STORAGE_DISK_RESERVE_MB="0",
        CXR_TRIAGE_LISTENER_MAX_PDU=str(max_pdu),
        CXR_TRIAGE_STORAGE_FSYNC="true" if fsync else "false",
    )
    cmd = [sys.executable, "-m", "worker.cli", "serve", "--no-batch", "--data-dir", str(data),
           "--port", str(port), "--bind", "127.0.0.1"]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for_echo(port, NODE_AET, proc, log)
        seconds = send(files, port, NODE_AET, max_pdu, workdir / "storescu.log")
    finally:
        stop(proc)
    db = store.Database.open(f"sqlite:///{(data / 'triage.db').resolve()}", upgrade=False)
    try:
        counts = store.counts(db)
    finally:
        db.close()
    stored = len(list((data / "spool").glob("*/*.dcm")))
    if counts != {"queued": len(files)} or stored != len(files):
        raise RuntimeError(f"node run did not store everything: rows {counts}, files {stored}; see {log}")
    return seconds, data


def run_storescp(files: list[Path], workdir: Path, max_pdu: int) -> float:
    out_dir = workdir / "received"
    out_dir.mkdir()
    log = workdir / "storescp.log"
    port = free_port()
    cmd = ["storescp", "-aet", STORESCP_AET, "--max-pdu", str(max_pdu), "-od", str(out_dir), str(port)]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for_echo(port, STORESCP_AET, proc, log)
        seconds = send(files, port, STORESCP_AET, max_pdu, workdir / "storescu.log")
    finally:
        stop(proc)
    stored = len([p for p in out_dir.iterdir() if p.is_file()])
    if stored != len(files):
        raise RuntimeError(f"storescp stored {stored} of {len(files)} files; see {log}")
    return seconds


def wait_for_modules(seconds: float) -> str | None:
    """The pipeline needs worker.engine, worker.testing.toymodel (and what they import); None when ready."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            import worker.engine  # noqa: F401
            import worker.pipeline  # noqa: F401
            import worker.testing.toymodel  # noqa: F401

            return None
        except ImportError as exc:
            if time.monotonic() >= deadline:
                return f"{type(exc).__name__}: {exc}"
            for name in [m for m in sys.modules if m.startswith("worker.")]:
                if name in ("worker.engine", "worker.testing.toymodel", "worker.pipeline", "worker.modelcard"):
                    del sys.modules[name]
            time.sleep(5)


def run_pipeline(data: Path, n: int, tmp: Path) -> dict[str, Any]:
    from worker import pipeline
    from worker.engine import Engine
    from worker.node import open_storage
    from worker.settings import load_settings
    from worker.testing.toymodel import build_toy_model

    model_dir = build_toy_model(tmp / "toy-model")
    settings = load_settings(None, {"storage.data_dir": str(data), "storage.disk_reserve_mb": "0",
                                    "model.path": str(model_dir)}, environ={})
    engine = Engine(model_dir)
    db, spool = open_storage(settings)
    try:
        t0 = time.perf_counter()
        report = pipeline.drain(db, spool, engine, settings, pipeline.worker_id())
        seconds = time.perf_counter() - t0
        counts = store.counts(db)
    finally:
        db.close()
    if counts != {"done": n}:
        raise RuntimeError(f"pipeline did not screen every job: {counts} ({report})")
    stages = {k: round(v, 3) for k, v in report.stage_seconds.items()}
    return {
        "images": report.done,
        "batch_size": settings.batch.size,
        "seconds": round(seconds, 3),
        "images_per_s": round(report.done / seconds, 2),
        "stage_seconds": stages,
        "stage_ms_per_image": {k: round(v * 1e3 / report.done, 2) for k, v in report.stage_seconds.items()},
        "model": "worker.testing.toymodel.build_toy_model (tiny IR; measures everything around inference)",
    }


def machine() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import pydicom
    import pynetdicom

    dcmtk = subprocess.run(["storescu", "--version"], capture_output=True, text=True).stdout.split("\n")[0].strip("$ ")
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "pydicom": pydicom.__version__,
        "pynetdicom": pynetdicom.__version__,
        "dcmtk": dcmtk,
        "platform": platform.platform(),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="DICOM intake throughput of this node (durable and without fsync) against dcmtk storescp, "
        "then the batch pipeline with the toy model. See bench/README.md."
    )
    ap.add_argument("--n", type=int, default=40, help="images per run (default 40)")
    ap.add_argument("--max-pdu", type=int, default=131072, help="max PDU, both sides (default 131072)")
    ap.add_argument("--repeats", type=int, default=7, help="runs per receiver, order rotated (default 7)")
    ap.add_argument("--pipeline", action=argparse.BooleanOptionalAction, default=True,
                    help="also drain the queue with the toy model (default on)")
    ap.add_argument("--wait-modules", type=float, default=0.0, metavar="S",
                    help="wait up to S seconds for worker.engine / worker.testing.toymodel to become importable")
    ap.add_argument("--tmp", type=Path, default=None, help="scratch folder (default: system temp)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "intake.json", help="JSON results")
    args = ap.parse_args(argv)
    if args.n < 1 or args.repeats < 1:
        ap.error("--n and --repeats must be >= 1")
    if not 4096 <= args.max_pdu <= 131072:
        ap.error("--max-pdu must be 4096..131072 (dcmtk's range)")
    need_tools()

    t_all = time.perf_counter()
    load_before = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="cxr-intake-", dir=args.tmp))
    try:
        t = time.perf_counter()
        files, total_bytes = generate(tmp / "input", args.n)
        print(
            f"generated {args.n} files, {total_bytes / 2**20:.1f} MiB, in {time.perf_counter() - t:.1f} s", flush=True
        )

        runs: dict[str, list[float]] = {k: [] for k in TARGETS}
        keep: Path | None = None  # data dir of the last durable node run, for the pipeline
        for r in range(args.repeats):
            order = TARGETS[r % 3:] + TARGETS[: r % 3]
            for target in order:
                work = tmp / f"{target}-{r}"
                work.mkdir()
                if target == "storescp":
                    seconds = run_storescp(files, work, args.max_pdu)
                else:
                    seconds, data = run_node(files, work, args.max_pdu, fsync=(target == "node"))
                    if target == "node":
                        if keep is not None:
                            shutil.rmtree(keep.parent, ignore_errors=True)
                        keep = data
                runs[target].append(seconds)
                print(f"  round {r + 1} {target:<13} {seconds:6.2f} s  {args.n / seconds:6.2f} img/s", flush=True)
                if keep is None or not keep.is_relative_to(work):
                    shutil.rmtree(work, ignore_errors=True)

        mib = total_bytes / 2**20
        results: dict[str, Any] = {}
        for target in TARGETS:
            best = min(runs[target])
            med = statistics.median(runs[target])
            results[target] = {
                "seconds": [round(s, 3) for s in runs[target]],
                "best_images_per_s": round(args.n / best, 2),
                "median_images_per_s": round(args.n / med, 2),
                "best_mib_per_s": round(mib / best, 1),
                "median_mib_per_s": round(mib / med, 1),
            }
        ref_best = results["storescp"]["best_images_per_s"]
        ref_med = results["storescp"]["median_images_per_s"]
        for target in TARGETS:
            results[target]["ratio_best"] = round(results[target]["best_images_per_s"] / ref_best, 2)
            results[target]["ratio_median"] = round(results[target]["median_images_per_s"] / ref_med, 2)
        # what the spool's two fsyncs cost per image; best and median runs (noisy: a few ms)
        fsync_ms = round((min(runs["node"]) - min(runs["node-nofsync"])) * 1e3 / args.n, 1)
        fsync_med_ms = round(
            (statistics.median(runs["node"]) - statistics.median(runs["node-nofsync"])) * 1e3 / args.n, 1
        )
        ratio = results["node"]["ratio_best"]
        ratio_med = results["node"]["ratio_median"]
        # node/storescp within each round (adjacent runs, so slow drifts in load cancel)
        paired = [round(s_ref / s_node, 2) for s_node, s_ref in zip(runs["node"], runs["storescp"], strict=True)]

        print()
        print(f"intake: {args.n} x {total_bytes / args.n / 2**20:.2f} MiB, max PDU {args.max_pdu}, "
              f"{args.repeats} runs each; best run (median in brackets)")
        hdr = f"{'target':<14}{'images/s':>18}{'MiB/s':>18}{'x storescp':>18}"
        print(hdr)
        print("-" * len(hdr))
        for target in TARGETS:
            res = results[target]
            print(f"{target:<14}"
                  f"{res['best_images_per_s']:>9.2f} ({res['median_images_per_s']:>5.2f})"
                  f"{res['best_mib_per_s']:>10.1f} ({res['median_mib_per_s']:>5.1f})"
                  f"{res['ratio_best']:>11.2f} ({res['ratio_median']:>4.2f})")
        print(f"durable spool write (2 fsyncs): {fsync_ms:.1f} ms per image best-to-best, "
              f"{fsync_med_ms:.1f} ms median-to-median (node - node-nofsync)")
        def verdict(r: float, ref: float) -> str:
            return "met" if r >= TARGET_RATIO else f"MISSED, needs {TARGET_RATIO * ref:.1f} img/s"

        print(f"target node >= {TARGET_RATIO}x storescp: best/best {ratio:.2f}x ({verdict(ratio, ref_best)}); "
              f"median/median {ratio_med:.2f}x ({verdict(ratio_med, ref_med)})")
        print(f"  per-round node/storescp: {', '.join(f'{x:.2f}' for x in paired)} "
              f"(median {statistics.median(paired):.2f})")

        out: dict[str, Any] = {
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
            "machine": machine(),
            "n": args.n,
            "bytes_per_image": total_bytes // args.n,
            "max_pdu": args.max_pdu,
            "repeats": args.repeats,
            "headline": "best of repeats (order rotated each round); medians also given",
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after_intake": [round(x, 2) for x in os.getloadavg()],
            "intake": results,
            "fsync_cost_ms_per_image": {"best": fsync_ms, "median": fsync_med_ms},
            "target": {"ratio": TARGET_RATIO, "achieved_best": ratio, "achieved_median": ratio_med,
                       "met_best": ratio >= TARGET_RATIO, "met_median": ratio_med >= TARGET_RATIO,
                       "per_round_ratios": paired, "per_round_ratio_median": statistics.median(paired)},
        }

        if args.pipeline:
            problem = wait_for_modules(args.wait_modules)
            if problem:
                print(f"\npipeline: skipped, the model modules are not importable ({problem})")
                out["pipeline"] = {"skipped": problem}
            else:
                assert keep is not None
                p = run_pipeline(keep, args.n, tmp)
                out["pipeline"] = p
                print(f"\npipeline (toy model, batch {p['batch_size']}): {p['images']} images in "
                      f"{p['seconds']:.2f} s = {p['images_per_s']:.2f} img/s")
                print("  stage    seconds  ms/image")
                for k, v in p["stage_seconds"].items():
                    print(f"  {k:<9}{v:>7.3f}{p['stage_ms_per_image'][k]:>10.2f}")

        out["wall_seconds"] = round(time.perf_counter() - t_all, 1)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2) + "\n")
        print(f"\nwrote {args.out} ({out['wall_seconds']:.0f} s in all)")
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
