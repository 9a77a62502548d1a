"""FHIR R4 destination: a transaction Bundle POSTed to a real HTTP server on loopback."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

pytest.importorskip("fhir.resources", reason="the fhir extra (fhir.resources) is not installed")

from fhir.resources.R4B.bundle import Bundle  # noqa: E402
from support import make_image, send  # noqa: E402

from worker import pipeline, sender, store  # noqa: E402
from worker.engine import Engine  # noqa: E402
from worker.node import Node  # noqa: E402
from worker.settings import Destination, Settings, SettingsError, load_settings  # noqa: E402


class FhirServer:
    """Answers each POST with the next scripted HTTP status (then 200) and a transaction-response."""

    def __init__(self, statuses: list[int] | None = None) -> None:
        self.statuses = list(statuses or [])
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.requests.append((self.path, dict(self.headers), body))
                status = outer.statuses.pop(0) if outer.statuses else 200
                if status == 200:
                    n = len(json.loads(body)["entry"])
                    reply = {"resourceType": "Bundle", "type": "transaction-response",
                             "entry": [{"response": {"status": "201 Created"}} for _ in range(n)]}
                else:
                    pid = json.loads(body)["entry"][0]["resource"]["subject"]["identifier"]["value"]
                    reply = {"resourceType": "OperationOutcome",  # servers echo identifiers
                             "issue": [{"severity": "error", "code": "transient", "diagnostics": f"busy ({pid})"}]}
                data = json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/fhir+json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/fhir"
        self._t = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._t.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server() -> Iterator[FhirServer]:
    s = FhirServer()
    yield s
    s.stop()


def _screen(s: Settings, ds) -> Node:  # type: ignore[no-untyped-def]
    node = Node(s, batch=False)
    node.start()
    assert send([ds], node.port) == [0]
    assert pipeline.drain(node.db, node.spool, Engine(s.model.path), s, pipeline.worker_id()).done == 1
    return node


def _deliveries(node: Node) -> list[store.Delivery]:
    with node.db.sessions() as ses:
        return list(ses.query(store.Delivery).order_by(store.Delivery.id))


def test_spec_and_validation(tmp_path) -> None:  # type: ignore[no-untyped-def]
    cfg = tmp_path / "n.toml"
    cfg.write_text('[[destinations]]\nname = "emr"\ntype = "fhir"\nurl = "https://fhir.example/r4"\ntoken = "abc"\n'
                   '[[destinations]]\nname = "ris"\ntype = "hl7"\nhost = "ris.example"\n')
    emr, ris = load_settings(cfg, environ={}).destinations
    assert (emr.type, emr.url, emr.token) == ("fhir", "https://fhir.example/r4", "abc")
    assert (ris.type, ris.port) == ("hl7", 2575)
    d = Destination.parse("fhir:https://fhir.example/base")
    assert (d.name, d.type, d.url) == ("fhir", "fhir", "https://fhir.example/base")
    with pytest.raises(SettingsError, match="needs url"):
        load_settings(None, environ={"CXR_TRIAGE_DESTINATIONS": "fhir:ftp://x"})


def test_report_and_observations_posted_with_the_token(model_settings: Settings, server: FhirServer) -> None:
    dest = Destination(name="emr", type="fhir", url=server.url, token="s3cret")
    s = dataclasses.replace(model_settings, destinations=[dest])
    ds = make_image(rows=64, cols=64, patient_id="P-77")
    ds.AccessionNumber = "ACC-9"
    node = _screen(s, ds)
    try:
        row = store.find(node.db, ds.SOPInstanceUID)
        (d,) = _deliveries(node)
        assert (d.kind, d.state, d.last_error) == ("fhir", "sent", None)
    finally:
        node.stop()
    ((path, headers, body),) = server.requests
    assert path == "/fhir" and headers["Authorization"] == "Bearer s3cret"
    assert headers["Content-Type"].startswith("application/fhir+json")
    bundle = Bundle.model_validate_json(body)  # what arrived is valid FHIR
    assert bundle.type == "transaction"
    doc = json.loads(body)
    report = doc["entry"][0]["resource"]
    assert report["resourceType"] == "DiagnosticReport" and report["status"] == "preliminary"
    assert report["imagingStudy"][0]["identifier"] == {"system": "urn:dicom:uid",
                                                       "value": f"urn:oid:{ds.StudyInstanceUID}"}
    assert report["subject"]["identifier"]["value"] == "P-77"
    assert report["basedOn"][0]["identifier"]["value"] == "ACC-9"
    assert "not for diagnostic use" in report["conclusion"]
    obs = {e["fullUrl"]: e["resource"] for e in doc["entry"][1:]}
    assert [r["reference"] for r in report["result"]] == list(obs)
    probs = {o["code"]["text"]: o["valueQuantity"]["value"] for o in obs.values() if "valueQuantity" in o}
    assert probs == pytest.approx({f"P({k})": v for k, v in row.probabilities.items()})
    (prio,) = [o for o in obs.values() if o["code"]["coding"][0]["code"] == "260870009"]
    assert prio["valueCodeableConcept"]["text"] == row.priority
    assert prio["valueCodeableConcept"]["coding"][0]["code"] == {"urgent": "S", "high": "A", "routine": "R"}[row.priority]
    assert all(e["request"]["method"] == "PUT" and "?identifier=" in e["request"]["url"] for e in doc["entry"])


def test_server_error_is_retried_with_the_same_bundle(model_settings: Settings) -> None:
    srv = FhirServer(statuses=[503])
    try:
        dest = Destination(name="emr", type="fhir", url=srv.url)
        s = dataclasses.replace(model_settings, destinations=[dest],
                                send=dataclasses.replace(model_settings.send, backoff_seconds=0.1, jitter=0.0))
        node = _screen(s, make_image(rows=64, cols=64))
        try:
            (d,) = _deliveries(node)
            assert d.state == "pending_send" and d.last_error.endswith("HTTP 503 (busy (<patient>))"), d.last_error
            time.sleep(0.15)
            assert sender.send_due(node.db, node.spool, s).sent == 1
            assert _deliveries(node)[0].state == "sent"
            assert len(srv.requests) == 2 and srv.requests[0][2] == srv.requests[1][2]
            assert "Authorization" not in srv.requests[0][1]
        finally:
            node.stop()
    finally:
        srv.stop()
