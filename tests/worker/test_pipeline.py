"""From association to stored triage result: intake over a real socket, then run_batch."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from sqlalchemy import select
from support import SC_STORAGE, echo, j2k_dataset, make_image, send, tile_cod_codestream

from worker import pipeline, store
from worker.engine import Engine
from worker.node import Node
from worker.settings import Settings


@pytest.fixture
def screening(model_settings: Settings):  # type: ignore[no-untyped-def]
    """A listener node plus an engine, with batches run by the test itself."""
    n = Node(model_settings, batch=False)
    n.start()
    engine = Engine(model_settings.model.path)
    owner = pipeline.worker_id()

    def run() -> pipeline.BatchReport:
        return pipeline.drain(n.db, n.spool, engine, model_settings, owner)

    yield n, run
    n.stop()


def _dcmtk_compress(ds: Dataset, tool: str, flag: str, tmp: Path) -> Dataset:
    src, dst = tmp / f"src-{flag}.dcm", tmp / f"dst-{flag}.dcm"
    ds.save_as(src, enforce_file_format=True)
    subprocess.run([tool, flag, str(src), str(dst)], check=True, capture_output=True)
    return dcmread(dst)


def _encoded(ts: str, tmp: Path, seed: int) -> Dataset:
    """A radiograph in transfer syntax ``ts``, made with pydicom's encoders or dcmtk's."""
    if ts in (JPEGBaseline8Bit,):
        ds = make_image(bits=8, seed=seed)
    else:
        ds = make_image(bits=16, stored=12, seed=seed)
    if ts in (ExplicitVRLittleEndian,):
        return ds
    if ts in (ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian):
        ds.file_meta.TransferSyntaxUID = ts
        path = tmp / f"{seed}.dcm"
        ds.save_as(path, enforce_file_format=True)
        return dcmread(path)
    if ts == RLELossless:
        ds.compress(RLELossless)
        return ds
    if ts == JPEGLSLossless:
        ds.compress(JPEGLSLossless)
        return ds
    if ts == JPEGLSNearLossless:
        ds.compress(JPEGLSNearLossless, jls_error=2)
        return ds
    if ts == JPEG2000Lossless:
        ds.compress(JPEG2000Lossless)
        return ds
    if ts == JPEG2000:
        ds.compress(JPEG2000, j2k_cr=[20])
        return ds
    if shutil.which("dcmcjpeg") is None:
        pytest.skip("dcmtk's dcmcjpeg is needed to encode JPEG baseline / lossless test files")
    flag = {JPEGBaseline8Bit: "+eb", JPEGLosslessSV1: "+e1"}[ts]
    return _dcmtk_compress(ds, "dcmcjpeg", flag, tmp)


ALL_SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
]


def test_every_accepted_transfer_syntax_is_received_and_screened(screening, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    node, run = screening
    sent = {}
    for i, ts in enumerate(ALL_SYNTAXES):
        ds = _encoded(ts, tmp_path, seed=i)
        assert str(ds.file_meta.TransferSyntaxUID) == ts
        assert send([ds], node.port) == [0x0000], ts.name
        sent[ts] = ds.SOPInstanceUID
    report = run()
    assert report.done == len(ALL_SYNTAXES), [(r.transfer_syntax, r.reason) for r in _rows(node)]
    for ts, uid in sent.items():
        row = store.find(node.db, uid)
        assert row.transfer_syntax == ts  # stored as received, never transcoded
        assert row.state == "done" and row.model_name == "toy" and row.priority in {"urgent", "routine"}
        assert sum(row.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
        assert set(row.timings) >= {"read_ms", "decode_ms", "preprocess_ms", "infer_ms", "build_ms"}


def test_jpeg2000_that_cannot_be_decoded_at_reduced_resolution_is_screened(screening) -> None:  # type: ignore[no-untyped-def]
    """Issue 18: valid JPEG 2000 (lossless and lossy) that OpenJPEG through Pillow cannot reduce
    used to be skipped ("broken data stream"); now the full decoder reads it and it is screened."""
    node, run = screening
    yy, xx = np.mgrid[0:1000, 0:1200]
    pix = ((yy * 2 + xx) % 4096).astype(np.uint16)
    sent = [j2k_dataset(tile_cod_codestream(pix, 12, lossy=ts == JPEG2000), pix, 12, ts) for ts in (JPEG2000Lossless, JPEG2000)]
    assert send(sent, node.port) == [0, 0]
    run()
    for ds in sent:
        row = store.find(node.db, ds.SOPInstanceUID)
        assert row.state == "done", row.reason


def _rows(node: Node) -> list[store.Instance]:
    with node.db.sessions() as s:
        return list(s.scalars(select(store.Instance)))


def test_lossless_syntaxes_give_identical_results(screening, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    node, run = screening
    base = make_image(bits=16, stored=12, seed=42)
    uids = []
    for ts in (ExplicitVRLittleEndian, RLELossless, JPEGLSLossless, JPEG2000Lossless):
        ds = make_image(bits=16, stored=12, seed=42)
        ds.PixelData = base.PixelData
        if ts != ExplicitVRLittleEndian:
            ds.compress(ts)
        assert send([ds], node.port) == [0]
        uids.append(ds.SOPInstanceUID)
    run()
    probs = [store.find(node.db, u).probabilities for u in uids]
    assert all(p == probs[0] for p in probs)


@pytest.mark.parametrize(
    "build, state, reason",
    [
        (lambda: make_image(view="LL"), "skipped", "lateral"),
        (lambda: make_image(body_part="KNEE"), "skipped", "KNEE"),
        (lambda: make_image(photometric="RGB"), "skipped", "greyscale"),
        (lambda: make_image(sop_class=SC_STORAGE, modality="OT", body_part=None), "skipped", ""),
    ],
)
def test_filter_rejections_are_skipped_with_reason(screening, build, state: str, reason: str) -> None:  # type: ignore[no-untyped-def]
    node, run = screening
    ds = build()
    assert send([ds], node.port) == [0]
    run()
    row = store.find(node.db, ds.SOPInstanceUID)
    assert row.state == state and row.reason and reason in row.reason
    assert row.predicted_class is None


def test_no_pixel_data_and_truncated_pixels_are_skipped(screening) -> None:  # type: ignore[no-untyped-def]
    node, run = screening
    nopix = make_image()
    del nopix.PixelData
    truncated = make_image(rows=256, cols=200)
    truncated.PixelData = truncated.PixelData[: len(truncated.PixelData) // 2]
    doubled = make_image(rows=64, cols=64)
    doubled.PixelData = doubled.PixelData * 2
    assert send([nopix, truncated, doubled], node.port) == [0, 0, 0]
    run()
    assert "no pixel data" in store.find(node.db, nopix.SOPInstanceUID).reason
    for ds in (truncated, doubled):
        row = store.find(node.db, ds.SOPInstanceUID)
        assert row.state == "skipped" and row.reason.startswith("pixel data:"), row.reason
    assert echo(node.port) == 0


def test_monochrome1_and_rescale_are_screened(screening) -> None:  # type: ignore[no-untyped-def]
    node, run = screening
    pix = (np.arange(128 * 128, dtype=np.uint16).reshape(128, 128) % 4096)
    mono1 = make_image(pix, photometric="MONOCHROME1", stored=12)
    mono2 = make_image(4095 - pix, photometric="MONOCHROME2", stored=12)
    rescaled = make_image(pix, slope=2.0, intercept=-1024.0, stored=12)
    assert send([mono1, mono2, rescaled], node.port) == [0, 0, 0]
    assert run().done == 3
    # MONOCHROME1 is inverted before inference: the same picture as its MONOCHROME2 twin
    p1 = store.find(node.db, mono1.SOPInstanceUID).probabilities
    p2 = store.find(node.db, mono2.SOPInstanceUID).probabilities
    assert p1 == pytest.approx(p2, abs=1e-4)


def test_unreadable_stored_file_fails_after_retries(screening, model_settings: Settings) -> None:  # type: ignore[no-untyped-def]
    node, run = screening
    ds = make_image()
    assert send([ds], node.port) == [0]
    row = store.find(node.db, ds.SOPInstanceUID)
    node.spool.path(row.path).unlink()  # the disk lost it
    for _ in range(model_settings.batch.max_attempts):
        run()
    row = store.find(node.db, ds.SOPInstanceUID)
    assert row.state == "failed" and "could not be read" in row.reason
    assert row.attempts == model_settings.batch.max_attempts


def test_a_model_that_returns_too_few_rows_fails_the_batch_leaving_nothing_running(  # type: ignore[no-untyped-def]
    screening, model_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rows are zipped to the jobs with strict=True: a short result (a broken model or
    runtime) is an inference failure of every job, not jobs left ``running`` until the lease ends."""
    node, _ = screening
    dss = [make_image(rows=64, cols=64, seed=i) for i in range(3)]
    assert send(dss, node.port) == [0] * 3
    engine = Engine(model_settings.model.path)
    real = engine.probabilities
    monkeypatch.setattr(engine, "probabilities", lambda batch: real(batch)[:-1])
    report = pipeline.run_batch(node.db, node.spool, engine, model_settings, "w")
    assert (report.claimed, report.done, report.failed) == (3, 0, 3)
    for ds in dss:
        row = store.find(node.db, ds.SOPInstanceUID)
        assert row.state == "queued" and row.lease_owner is None  # back in the queue, an attempt spent
        assert row.attempts == 1 and "inference failed: ValueError: zip() argument 2 is shorter" in row.reason


def test_real_chest_dicom_files(screening, shared_dir: Path) -> None:  # type: ignore[no-untyped-def]
    node, run = screening
    files = sorted((shared_dir / "data" / "dicom").glob("*.dcm"))
    assert len(files) == 3
    dss = []
    for f in files:
        ds = dcmread(f, force=True)
        if "TransferSyntaxUID" not in getattr(ds, "file_meta", Dataset()):
            from pydicom.dataset import FileMetaDataset

            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = ds.SOPClassUID
            meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            meta.TransferSyntaxUID = ImplicitVRLittleEndian
            ds.file_meta = meta
        dss.append(ds)
    assert send(dss, node.port) == [0, 0, 0]
    assert run().done == 3, [(r.sop_instance_uid, r.reason) for r in _rows(node)]


def test_batch_size_is_respected_and_queue_drains(screening, model_settings: Settings) -> None:  # type: ignore[no-untyped-def]
    node, run = screening
    dss = [make_image(rows=64, cols=64, seed=i) for i in range(19)]
    assert send(dss, node.port) == [0] * 19
    engine = Engine(model_settings.model.path)
    first = pipeline.run_batch(node.db, node.spool, engine, model_settings, "w")
    assert first.claimed == model_settings.batch.size
    rest = run()
    assert rest.done == 19 - model_settings.batch.size
    assert store.counts(node.db) == {"done": 19}


def test_a_restarted_node_takes_back_its_dead_process_leases_at_once(tmp_path: Path, toy_model: Path) -> None:
    """Issue 19, item 6: jobs leased by this host's earlier process that is gone (SIGKILL) are
    screened by the next start at once, not after batch.lease_seconds (300 s); a live process's
    lease is left alone."""
    import json
    import os
    import socket
    import sys

    from support import free_port

    from worker.settings import load_settings

    data_dir = tmp_path / "var"
    s = load_settings(None, {"storage.data_dir": str(data_dir), "listener.port": free_port(),
                             "listener.bind_address": "127.0.0.1", "storage.disk_reserve_mb": 0}, environ={})
    host = socket.gethostname()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a process id of this host that no longer runs
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        n = Node(s, batch=False)
        n.start()
        try:
            assert send([make_image(rows=64, cols=64, seed=i) for i in range(6)], n.port) == [0] * 6
            store.claim_batch(n.db, 4, f"{host}:{gone.pid}:deadbeef", 300)  # it died holding 4 jobs
            (held,) = store.claim_batch(n.db, 1, f"{host}:{alive.pid}:a11ve000", 300)  # still running
        finally:
            n.stop()
        r = subprocess.run([sys.executable, "-m", "worker.cli", "batch", "--once", "--data-dir", str(data_dir),
                            "--model", str(toy_model)], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "CXR_TRIAGE_STORAGE_DISK_RESERVE_MB": "0"})
    finally:
        alive.kill()
        alive.wait()
    assert r.returncode == 0, r.stderr
    assert "screened 5, skipped 0, failed 0 of 5 claimed" in r.stdout  # 4 taken back + 1 queued
    assert f"took back 4 job(s) leased by {host}:{gone.pid}:deadbeef" in r.stderr
    db = store.Database.open(s.storage.url)
    try:
        assert store.counts(db) == {"done": 5, "running": 1}
        assert store.find(db, held.sop_instance_uid).lease_owner == f"{host}:{alive.pid}:a11ve000"
    finally:
        db.close()
    audit = [json.loads(ln) for ln in s.storage.audit_path.read_text().splitlines()]
    (ev,) = [a for a in audit if a["event"] == "leases_reclaimed"]
    assert ev["owner"] == f"{host}:{gone.pid}:deadbeef" and ev["jobs"] == 4


# --------------------------------------------------------------------------- heatmaps (issue 17)


def _heatmap_settings(model_settings: Settings, model: Path) -> Settings:
    return dataclasses.replace(
        model_settings, model=dataclasses.replace(model_settings.model, path=model),
        send=dataclasses.replace(model_settings.send, heatmap=True),
    )


def test_heatmap_sc_is_built_referenced_and_delivered(model_settings: Settings, tmp_path: Path) -> None:
    from worker.testing.toymodel import build_toy_heatmap_model

    s = _heatmap_settings(model_settings, build_toy_heatmap_model(tmp_path / "hm"))
    node = Node(s, batch=False)
    node.start()
    try:
        dss = [make_image(rows=300, cols=240, seed=i) for i in range(2)]
        assert send(dss, node.port) == [0, 0]
        engine = Engine(s.model.path)
        assert pipeline.drain(node.db, node.spool, engine, s, pipeline.worker_id()).done == 2
        rows = {r.sop_instance_uid: r for r in _rows(node)}
        deliveries = store.deliveries_of(node.db, [r.id for r in rows.values()])
        for ds in dss:
            row = rows[ds.SOPInstanceUID]
            assert "heatmap_ms" in row.timings
            kinds = {d["kind"]: d for d in deliveries[row.id]}
            assert set(kinds) == {"sr", "heatmap"} and all(d["state"] == "sent" for d in kinds.values())
        files = {str(dcmread(p).SOPInstanceUID): dcmread(p) for p in (s.storage.data_dir / "results").iterdir()}
        assert len(files) == 4
        srs = [d for d in files.values() if d.Modality == "SR"]
        scs = [d for d in files.values() if d.Modality == "OT"]
        assert len(srs) == 2 and len(scs) == 2
        for sr in srs:
            (ev,) = sr.PertinentOtherEvidenceSequence
            ref = ev.ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            sc = files[ref]
            assert sc.PhotometricInterpretation == "RGB" and sc.SeriesDescription == "AI heatmap - not for diagnosis"
            assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == sr.CurrentRequestedProcedureEvidenceSequence[
                0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
    finally:
        node.stop()


def test_heatmap_setting_with_a_model_without_heatmaps_screens_as_usual(
    model_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    from worker.node import load_engine

    s = _heatmap_settings(model_settings, model_settings.model.path)  # the plain toy model
    with caplog.at_level("WARNING", logger="worker.node"):
        engine = load_engine(s)
    assert engine.heatmap is None
    assert any("send.heatmap is on, but no heatmap Secondary Captures will be sent" in r.getMessage()
               and "no 'heatmap' block" in r.getMessage() for r in caplog.records)
    node = Node(s, batch=False)
    node.start()
    try:
        ds = make_image(rows=64, cols=64, seed=3)
        assert send([ds], node.port) == [0]
        assert pipeline.drain(node.db, node.spool, engine, s, pipeline.worker_id()).done == 1
        row = store.find(node.db, ds.SOPInstanceUID)
        assert [d["kind"] for d in store.deliveries_of(node.db, [row.id])[row.id]] == ["sr"]
    finally:
        node.stop()


def _batch_settings(settings: Settings, threads: int) -> Settings:
    return dataclasses.replace(settings, batch=dataclasses.replace(settings.batch, threads=threads))


def test_per_job_steps_run_on_the_pool_concurrently(screening, model_settings: Settings, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """With batch.threads = 2 two images are preprocessed at the same time: each preprocess call
    waits at a two-party barrier, which only a second, concurrent call can open (in one thread
    the first call would time out and its job would fail)."""
    import threading

    node, _run = screening
    barrier = threading.Barrier(2, timeout=20)
    seen: set[str] = set()
    real = pipeline.imaging.preprocess

    def preprocess(ds, spec, **kw):  # type: ignore[no-untyped-def]
        seen.add(threading.current_thread().name)
        barrier.wait()
        return real(ds, spec, **kw)

    monkeypatch.setattr(pipeline.imaging, "preprocess", preprocess)
    dss = [make_image(rows=64, cols=64, seed=i) for i in range(4)]
    assert send(dss, node.port) == [0] * 4
    settings = _batch_settings(model_settings, 2)
    report = pipeline.run_batch(node.db, node.spool, Engine(settings.model.path), settings, "w")
    assert report.done == 4, [(r.state, r.reason) for r in (store.find(node.db, d.SOPInstanceUID) for d in dss)]
    assert len(seen) == 2 and all(name.startswith("batch") for name in seen)


def _timeless(path: Path) -> str:
    """A result object as JSON without the times it was made at (Content, Instance Creation,
    Contribution date/time): what two runs of the same batch must agree on."""
    import json

    ds = dcmread(path)
    for kw in ("ContentDate", "ContentTime", "InstanceCreationDate", "InstanceCreationTime"):
        if kw in ds:
            delattr(ds, kw)
    for item in ds.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item:
            del item.ContributionDateTime
    return json.dumps(ds.to_json_dict(), sort_keys=True)


def test_threads_change_neither_results_nor_their_order(screening, model_settings: Settings, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The same queue drained with 1 and with 3 threads (copies of one node's database and spool):
    the same states, reasons, probabilities and result objects (but for the times they were made
    at), and the audit
    trail's job events in claim order."""
    import json

    node, _run = screening
    dss = [make_image(rows=64, cols=64, seed=i) for i in range(7)]
    dss.append(make_image(view="LL", seed=99))  # skipped by the filter, between screened ones
    dss.append(make_image(rows=64, cols=64, seed=7))
    assert send(dss, node.port) == [0] * len(dss)
    node.stop()
    data = Path(model_settings.storage.data_dir)
    outcomes = []
    for threads in (1, 3):
        copy = tmp_path / f"copy-{threads}"
        shutil.copytree(data, copy)
        settings = dataclasses.replace(_batch_settings(model_settings, threads),
                                       storage=dataclasses.replace(model_settings.storage, data_dir=copy))
        from worker import audit as audit_log
        from worker.node import open_storage

        db, spool = open_storage(settings)
        audit = audit_log.AuditLog(copy / "audit-run.jsonl")
        pipeline.drain(db, spool, Engine(settings.model.path), settings, f"w{threads}", audit=audit)
        rows = {d.SOPInstanceUID: store.find(db, d.SOPInstanceUID) for d in dss}
        db.close()
        finished = [json.loads(x) for x in (copy / "audit-run.jsonl").read_text().splitlines()]
        results = sorted(_timeless(p) for p in (spool.root / "results").rglob("*.dcm"))
        outcomes.append(({u: (r.state, r.reason, r.probabilities) for u, r in rows.items()},
                         [e["sop_instance_uid"] for e in finished if e["event"] == "job_finished"], results))
    assert outcomes[0][0] == outcomes[1][0]
    assert outcomes[0][1] == outcomes[1][1] == [d.SOPInstanceUID for d in dss]
    assert outcomes[0][2] == outcomes[1][2] and len(outcomes[0][2]) == len(dss) - 1


def test_a_stopped_drain_gives_back_the_batch_it_prepared_ahead(screening, model_settings: Settings) -> None:  # type: ignore[no-untyped-def]
    """drain prepares the next batch while finishing the current one; stopped after the first
    batch, it gives the second back to the queue untouched (queued, no attempt spent), and a later
    drain screens it."""
    node, _run = screening
    settings = _batch_settings(model_settings, 2)
    dss = [make_image(rows=64, cols=64, seed=i) for i in range(2 * settings.batch.size)]
    assert send(dss, node.port) == [0] * len(dss)
    engine = Engine(settings.model.path)
    report = pipeline.drain(node.db, node.spool, engine, settings, "w", should_stop=lambda: True)
    assert report.done == settings.batch.size
    assert store.counts(node.db) == {"done": settings.batch.size, "queued": settings.batch.size}
    left = [store.find(node.db, d.SOPInstanceUID) for d in dss[settings.batch.size:]]
    assert all(r.state == "queued" and r.attempts == 0 and r.lease_owner is None for r in left)
    assert pipeline.drain(node.db, node.spool, engine, settings, "w").done == settings.batch.size
    assert store.counts(node.db) == {"done": len(dss)}
