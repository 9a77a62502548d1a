"""Part 8 of bench/e2e.py (issue 18): the backlog throughput against the limit its CPU costs allow.

    .venv/bin/python bench/e2e.py --parts utilisation [--backlog-n 96] [--before REV]

See bench/e2e.py's docstring for the method.  Kept apart from e2e.py's other parts (it reuses
their study maker, backlog filler and result reader).
"""

from __future__ import annotations

import datetime as dt
import os
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from cpuwatch import CpuWatch
from e2e import ENV_FAST, REPO, _results, copy_backlog, fill_backlog, rss_kib, run_node
from pydicom import dcmread
from pydicom.uid import generate_uid

BATCH = 16


def clone_studies(files: list[Path], n: int, out_dir: Path) -> list[Path]:
    """``n`` studies cycling through ``files``, each with new Study/Series/SOP Instance UIDs; the
    pixel data stay the encoded bytes they were (no re-compression)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    made = []
    for i in range(n):
        src = files[i % len(files)]
        ds = dcmread(src)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        path = out_dir / f"{src.stem.split('-')[0]}-c{i}.dcm"
        ds.save_as(path, enforce_file_format=False)
        made.append(path)
    return made


def checkout(rev: str, tmp: Path) -> Path:
    """The tree of ``rev`` in a folder (``git archive``), for a node that runs the old code."""
    out = tmp / f"checkout-{rev[:12]}"
    out.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True)
    return out


def _first_claim(data_dir: Path) -> float:
    import json

    first = None
    for line in (data_dir / "audit.jsonl").read_text().splitlines():
        d = json.loads(line)
        if d["event"] == "batch_finished" and d.get("claimed"):
            t = dt.datetime.fromisoformat(d["ts"].replace("Z", "+00:00")).timestamp() - d["ms"] / 1e3
            first = t if first is None else min(first, t)
    assert first is not None, "no batch ran"
    return first


def drain_measured(model: Path, backlog: Path, tmp: Path, dest: str, label: str, repo: Path,
                   orthanc_pid: int | None, workers: int = 1) -> dict[str, Any]:
    """``workers`` ``batch --once`` processes (batch 16) on a copy of ``backlog``, their CPU measured."""
    data_dir = tmp / f"var-util-{label}"
    copy_backlog(backlog, data_dir)
    if dest.startswith("folder:"):
        dest = f"folder:{tmp / ('results-' + label)}"
    args = ["batch", "--once", "--data-dir", str(data_dir), "--model", str(model), "--destination", dest,
            "--batch-size", str(BATCH)]
    watch = CpuWatch().start()
    if orthanc_pid is not None:
        watch.watch("orthanc", orthanc_pid)
    nodes = [run_node(args, {**os.environ, **ENV_FAST}, repo) for _ in range(workers)]
    for i, node in enumerate(nodes):
        watch.watch(f"node{i}", node.pid)
    peak = 0
    while any(node.poll() is None for node in nodes):
        peak = max([peak] + [rss_kib(node.pid, "VmHWM") for node in nodes if node.poll() is None])
        time.sleep(0.05)
    time.sleep(0.1)
    watch.stop()
    for node in nodes:
        assert node.returncode == 0, node.stderr.read() if node.stderr else node.returncode
    out = _results(data_dir, 0.0)
    out.pop("latency_median_s"), out.pop("latency_p95_s")
    start = _first_claim(data_dir)
    from sqlalchemy import select

    from worker import store

    db = store.Database.open(f"sqlite:///{data_dir / 'triage.db'}", upgrade=False)
    with db.sessions() as s:
        end = max(d.sent_at for d in s.scalars(select(store.Delivery))).timestamp()
    db.close()
    wall = end - start
    n = out["n"]
    cpu = {"node": sum(watch.cpu_seconds(f"node{i}", start, end) for i in range(workers)),
           "orthanc": watch.cpu_seconds("orthanc", start, end)}
    machine = watch.cpu_seconds("machine", start, end)
    cores = os.cpu_count() or 1
    per_image = sum(cpu.values()) / n
    limit = cores / per_image
    throughput = n / wall
    out.update({
        "label": label, "workers": workers, "images_per_s": round(throughput, 2), "seconds": round(wall, 2),
        "cpu_ms_per_image": {k: round(v * 1e3 / n, 1) for k, v in cpu.items()},
        "cpu_limit_images_per_s": round(limit, 2), "ratio_to_cpu_limit": round(throughput / limit, 3),
        "machine_busy_cores": round(machine / wall, 2),
        "other_processes_busy_cores": round(max(0.0, machine - sum(cpu.values())) / wall, 2),
        "peak_rss_mib": round(peak / 1024, 1), "load_1min": os.getloadavg()[0],
    })
    return out


def run(model: Path, files: list[Path], tmp: Path, orthanc: Any, n: int, before: str | None,
        rounds: int = 1, workers: tuple[int, ...] = (1,)) -> dict[str, Any]:
    """Every (code, content, destination) combination, before and after alternating."""
    studies = clone_studies(files, n, tmp / "clones")
    raw_all = clone_studies([f for f in files if f.stem.startswith("raw")], n, tmp / "clones-raw")
    repos = {"after": REPO}
    if before:
        repos = {"before": checkout(before, tmp), "after": REPO}
    dests = {"folder": "folder:", "orthanc": f"ORTHANC@127.0.0.1:{orthanc.dicom_port}"}
    out: dict[str, Any] = {"n": n, "batch_size": BATCH, "before": before, "runs": []}
    for content, group in (("uncompressed", raw_all), ("mix", studies)):
        print(f"utilisation: filling the {content} backlog ({len(group)} studies) ...", flush=True)
        backlog = fill_backlog(model, group, tmp / f"fill-{content}", dests["orthanc"])
        for dest_name, dest in dests.items():
            for r in range(rounds):
                for w in workers:
                    for code, repo in repos.items():
                        label = f"{content}-{dest_name}-{code}-{w}w-{r}"
                        print(f"utilisation: {label} ...", flush=True)
                        res = drain_measured(model, backlog, tmp, dest, label, repo,
                                             orthanc.proc.pid if dest_name == "orthanc" else None, w)
                        out["runs"].append({"content": content, "destination": dest_name, "code": f"{code}, {w} process"
                                            + ("es" if w > 1 else ""), **res})
    return out


def table(u: dict[str, Any]) -> list[str]:
    """Markdown rows: one per run, then the medians per (content, destination, code)."""
    rows = ["| content | destination | code | img/s | CPU ms/img node / Orthanc | CPU limit img/s | ratio | "
            "other processes (cores) | stage medians ms (read, decode, preprocess, infer, build) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    keys = sorted({(r["content"], r["destination"], r["code"]) for r in u["runs"]},
                  key=lambda k: (k[0] != "uncompressed", k[1], not k[2].startswith("before"), k[2]))
    for key in keys:
        rs = [r for r in u["runs"] if (r["content"], r["destination"], r["code"]) == key]

        def med(f: Any, rs: list[dict[str, Any]] = rs) -> float:
            return round(statistics.median(f(r) for r in rs), 2)

        st = rs[0]["stage_median_ms"]
        stages = ", ".join(str(round(statistics.median(r["stage_median_ms"].get(k, 0) for r in rs), 1))
                           for k in ("read_ms", "decode_ms", "preprocess_ms", "infer_ms", "build_ms") if k in st)
        node, pacs = med(lambda r: r["cpu_ms_per_image"]["node"]), med(lambda r: r["cpu_ms_per_image"]["orthanc"])
        rows.append(f"| {key[0]} | {key[1]} | {key[2]} | {med(lambda r: r['images_per_s'])} | {node} / {pacs} | "
                    f"{med(lambda r: r['cpu_limit_images_per_s'])} | **{med(lambda r: r['ratio_to_cpu_limit'])}** | "
                    f"{med(lambda r: r['other_processes_busy_cores'])} | {stages} |")
    return rows
