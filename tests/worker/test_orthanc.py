"""With a real PACS: Orthanc sends a chest X-ray to the node, the node sends the SR back."""

from __future__ import annotations

import dataclasses
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from sqlalchemy import select
from support import free_port, make_image, send, to_bytes, wait_for

from worker import results, store
from worker.node import Node
from worker.settings import Destination, Settings

PROBABILITY = "122157"
FINDING = "121071"


def sr_probabilities(sr: Dataset) -> dict[str, float]:
    """Walk the SR content tree: finding code -> probability of each measurement group."""
    out: dict[str, float] = {}

    def walk(items: Any) -> None:
        for item in items or []:
            children = item.get("ContentSequence", [])
            finding = prob = None
            for c in children:
                name = c.ConceptNameCodeSequence[0].CodeValue if "ConceptNameCodeSequence" in c else None
                if name == FINDING and c.ValueType == "CODE":
                    finding = c.ConceptCodeSequence[0].CodeValue
                if name == PROBABILITY and c.ValueType == "NUM":
                    prob = float(c.MeasuredValueSequence[0].NumericValue)
            if finding is not None and prob is not None:
                out[finding] = prob
            walk(children)

    walk(sr.ContentSequence)
    return out


def predicted_finding(sr: Dataset) -> str | None:
    """The finding coded in the root 'Qualitative Evaluations' container."""
    for item in sr.ContentSequence:
        if item.ValueType == "CONTAINER" and item.ConceptNameCodeSequence[0].CodeMeaning == "Qualitative Evaluations":
            for c in item.ContentSequence:
                if c.ConceptNameCodeSequence[0].CodeValue == FINDING:
                    return str(c.ConceptCodeSequence[0].CodeValue)
    return None


@pytest.fixture
def pacs_and_node(orthanc, model_settings: Settings, tmp_path: Path):  # type: ignore[no-untyped-def]
    """Orthanc knows the node as modality 'triage'; the node sends results to Orthanc."""
    node_port = free_port()
    orthanc.modalities = {"triage": ["CXRTRIAGE", "127.0.0.1", node_port]}
    orthanc.start()
    s = dataclasses.replace(
        model_settings,
        listener=dataclasses.replace(model_settings.listener, port=node_port),
        destinations=[Destination(name="pacs", type="dicom", ae_title="ORTHANC", host="127.0.0.1",
                                  port=orthanc.dicom_port)],
        send=dataclasses.replace(model_settings.send, backoff_seconds=0.3, backoff_max_seconds=1.0, jitter=0.1,
                                 retry_poll_seconds=0.3, timeout=5, secondary_capture=True),
        schedule=dataclasses.replace(model_settings.schedule, gather_seconds=0.1),
    )
    node = Node(s, batch=True)
    node.start()
    yield orthanc, node
    node.stop()


def _srs(orthanc, study_uid: str) -> list[dict[str, Any]]:  # type: ignore[no-untyped-def]
    return orthanc.find_instances(StudyInstanceUID=study_uid, Modality="SR")


def test_pacs_to_node_and_sr_back_into_the_same_study(pacs_and_node) -> None:  # type: ignore[no-untyped-def]
    orthanc, node = pacs_and_node
    src = make_image(rows=512, cols=400, seed=3)
    oid = orthanc.upload(to_bytes(src))
    job = orthanc.post("/modalities/triage/store", {"Resources": [oid], "Synchronous": True})
    assert job is not None
    assert wait_for(lambda: len(_srs(orthanc, src.StudyInstanceUID)) == 1, timeout=60)

    (sr_meta,) = _srs(orthanc, src.StudyInstanceUID)
    sr = dcmread(BytesIO(orthanc.file(sr_meta["ID"])))
    row = store.find(node.db, src.SOPInstanceUID)
    assert row.state == "done"
    # in the source study, own series, unverified, patient copied
    assert sr.StudyInstanceUID == src.StudyInstanceUID and sr.SeriesInstanceUID != src.SeriesInstanceUID
    assert sr.PatientID == src.PatientID and sr.VerificationFlag == "UNVERIFIED"
    assert sr.SeriesDescription == results.SERIES_DESCRIPTION
    assert sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0] \
        .ReferencedSOPSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    # coded content equals the triage database
    probs = sr_probabilities(sr)
    expected = {results.finding_code(k).value: v for k, v in row.probabilities.items()}
    assert probs == pytest.approx(expected, abs=1e-6)
    assert predicted_finding(sr) == results.finding_code(row.predicted_class).value
    uids = results.result_uids(src.SOPInstanceUID, src.StudyInstanceUID, row.model_name, row.model_version)
    assert sr.SOPInstanceUID == uids.sr_instance
    # the optional Secondary Capture arrived too
    assert wait_for(lambda: len(orthanc.find_instances(StudyInstanceUID=src.StudyInstanceUID, Modality="OT")) == 1)
    assert wait_for(lambda: store.delivery_counts(node.db) == {"sent": 2}, timeout=10)

    # a re-send replaces: same UIDs, still one SR in PACS
    with node.db.sessions.begin() as s:
        for d in s.scalars(select(store.Delivery)):
            d.state, d.attempts, d.next_attempt_at = "pending_send", 0, store.utcnow()
    assert wait_for(lambda: store.delivery_counts(node.db) == {"sent": 2}, timeout=10)
    assert len(_srs(orthanc, src.StudyInstanceUID)) == 1


def test_pacs_down_during_send_then_delivered_when_back(pacs_and_node) -> None:  # type: ignore[no-untyped-def]
    orthanc, node = pacs_and_node
    orthanc.stop()
    src = make_image(rows=256, cols=256, seed=4)
    assert send([src], node.port) == [0]
    assert wait_for(lambda: store.counts(node.db) == {"done": 1}, timeout=30)
    assert wait_for(
        lambda: any(d.attempts >= 2 for d in _deliveries(node.db)), timeout=30
    ), "the send should be retried while Orthanc is down"
    assert all(d.state == "pending_send" and "no association" in (d.last_error or "") for d in _deliveries(node.db))
    orthanc.start()  # same ports and storage
    assert wait_for(lambda: store.delivery_counts(node.db) == {"sent": 2}, timeout=30)
    assert len(_srs(orthanc, src.StudyInstanceUID)) == 1


def test_destination_rejecting_the_association_ends_send_failed(orthanc, model_settings: Settings) -> None:  # type: ignore[no-untyped-def]
    orthanc.start()
    s = dataclasses.replace(
        model_settings,
        destinations=[Destination(name="pacs", type="dicom", ae_title="NOTORTHANC", host="127.0.0.1",
                                  port=orthanc.dicom_port)],
        send=dataclasses.replace(model_settings.send, max_attempts=2, backoff_seconds=0.1, backoff_max_seconds=0.1,
                                 retry_poll_seconds=0.2),
        schedule=dataclasses.replace(model_settings.schedule, gather_seconds=0.1),
    )
    node = Node(s, batch=True)
    node.start()
    try:
        assert send([make_image(rows=128, cols=128)], node.port) == [0]
        assert wait_for(lambda: store.delivery_counts(node.db) == {"send_failed": 1}, timeout=30)
        (d,) = _deliveries(node.db)
        assert "association rejected" in d.last_error and d.attempts == 2
        from worker import cli

        assert cli.main(["resend", "--data-dir", str(s.storage.data_dir)]) == 0
        assert store.delivery_counts(node.db) in ({"pending_send": 1}, {"send_failed": 1})
    finally:
        node.stop()


def _deliveries(db: store.Database) -> list[store.Delivery]:
    with db.sessions() as s:
        return list(s.scalars(select(store.Delivery)))
