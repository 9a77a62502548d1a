"""Does sending from a background thread help when the PACS is slow? (table + JSON)

    .venv/bin/python bench/send_overlap.py [--n 48] [--delay-ms 100]

A PACS on another machine costs the node waiting, not CPU. This stands in for one with an
in-process pynetdicom Storage SCP that sleeps ``delay-ms`` per C-STORE (a sleep releases the
CPU, like a network round trip and a remote disk). The same backlog of ``n`` studies (the shipped
samples, re-identified) is drained twice by ``pipeline.drain`` with the shipped model, alternating:
results sent inline at the end of each batch (``on_results=None``), and by a
``sender.BackgroundSender`` thread woken after each batch. Reported: images/s from the first
claim to the last result stored at the PACS.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

import pydicom  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402
from pynetdicom import AE, evt  # noqa: E402
from pynetdicom.sop_class import ComprehensiveSRStorage  # noqa: E402

from worker import pipeline, sender, store  # noqa: E402
from worker.engine import Engine  # noqa: E402
from worker.modelcard import default_model_dir  # noqa: E402
from worker.settings import Destination, load_settings  # noqa: E402
from worker.spool import Spool  # noqa: E402


def slow_pacs(port: int, delay: float, stored: list[float]):  # type: ignore[no-untyped-def]
    def on_store(event):  # type: ignore[no-untyped-def]
        time.sleep(delay)
        stored.append(time.time())
        return 0x0000

    ae = AE(ae_title="SLOWPACS")
    ae.add_supported_context(ComprehensiveSRStorage)
    return ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])


def fill(tmp: Path, n: int) -> tuple[store.Database, Spool]:
    db = store.Database.open(f"sqlite:///{tmp / 'triage.db'}")
    spool = Spool(tmp / "spool", reserve_bytes=0)
    files = sorted((REPO / "samples").glob("*.dcm"))
    for i in range(n):
        ds = pydicom.dcmread(files[i % len(files)])
        ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid(), generate_uid()
        rel = f"in/{ds.SOPInstanceUID}.dcm"
        path = tmp / "spool" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        store.enqueue(db, store.Received(
            sop_instance_uid=str(ds.SOPInstanceUID), sop_class_uid=str(ds.SOPClassUID),
            study_instance_uid=str(ds.StudyInstanceUID), series_instance_uid=str(ds.SeriesInstanceUID),
            accession_number=str(ds.get("AccessionNumber", "")), modality=str(ds.Modality),
            transfer_syntax=str(ds.file_meta.TransferSyntaxUID), calling_ae="BENCH", path=rel,
            size_bytes=path.stat().st_size, sha256="0" * 64))
    return db, spool


def run(mode: str, engine: Engine, n: int, port: int, delay: float) -> float:
    stored: list[float] = []
    server = slow_pacs(port, delay, stored)
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        settings = load_settings(None, {"storage.data_dir": str(tmp), "storage.disk_reserve_mb": "0"}, environ={})
        settings = dataclasses.replace(settings, destinations=[
            Destination(name="PACS", type="dicom", ae_title="SLOWPACS", host="127.0.0.1", port=port)])
        db, spool = fill(tmp, n)
        t0 = time.time()
        if mode == "inline":
            pipeline.drain(db, spool, engine, settings, "bench")
        else:
            bg = sender.BackgroundSender(db, spool, settings).start()
            pipeline.drain(db, spool, engine, settings, "bench", on_results=bg.wake)
            while store.delivery_counts(db).get("sent", 0) < n:
                time.sleep(0.01)
            bg.stop()
        assert len(stored) == n, (mode, len(stored))
        db.close()
    server.shutdown()
    return n / (max(stored) - t0)


def main(argv: list[str] | None = None) -> int:
    from worker.testing.scu import free_port

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=48)
    p.add_argument("--delay-ms", type=float, default=100.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "send_overlap.json")
    a = p.parse_args(argv)
    engine = Engine(default_model_dir())
    res: dict[str, list[float]] = {"inline": [], "background": []}
    for _ in range(a.rounds):
        for mode in res:
            res[mode].append(round(run(mode, engine, a.n, free_port(), a.delay_ms / 1e3), 2))
    out = {"n": a.n, "delay_ms": a.delay_ms, "images_per_s": res,
           "ratio_best": round(max(res["background"]) / max(res["inline"]), 2)}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=2))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
