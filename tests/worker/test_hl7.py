"""HL7 v2.5.1 ORU^R01 to a real MLLP receiver (built with the ``hl7`` library) on loopback."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import hl7 as hl7lib
import pytest
from hl7.mllp import start_hl7_server
from support import free_port, make_image, send, wait_for
from test_security import pki  # noqa: F401  (the test CA and certificates, a fixture)

from worker import cli, hl7, pipeline, sender, store, tls
from worker.engine import Engine
from worker.node import Node
from worker.settings import Destination, Settings, SettingsError, load_settings


class Receiver:
    """An MLLP receiver (a RIS stand-in): answers each message with the next scripted ACK code
    (``"AA"``, ``"AE"``, ``"AR"``; ``None`` = read it and never answer)."""

    def __init__(self, acks: list[str | None] | None = None, port: int | None = None, ssl: object = None) -> None:
        self.acks, self.ssl = list(acks or []), ssl
        self.port = port or free_port()
        self.messages: list[hl7lib.Message] = []
        self.raw: list[str] = []
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._ready.wait(10), "receiver did not start"

    async def _client(self, reader, writer) -> None:  # type: ignore[no-untyped-def]
        try:
            while not writer.is_closing():
                msg = await reader.readmessage()
                self.messages.append(msg)
                self.raw.append(str(msg))
                code = self.acks.pop(0) if self.acks else "AA"
                if code is None:
                    continue
                ack = msg.create_ack(code, message_id=f"ACK{len(self.messages)}")
                if code != "AA":
                    pid = str(msg.segment("PID")).split("|")[3].split("^")[0]  # a RIS may echo the patient ID
                    ack = hl7lib.parse(str(ack).rstrip("\r") + f"\rERR||||E||||receiver says no: test {pid}")
                writer.writemessage(ack)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(
            start_hl7_server(self._client, "127.0.0.1", self.port, encoding="utf-8", ssl=self.ssl))
        self._ready.set()
        self.loop.run_forever()

    def stop(self) -> None:
        async def close() -> None:
            self.server.close()
            await self.server.wait_closed()

        asyncio.run_coroutine_threadsafe(close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.stop()


def _ris(port: int) -> Destination:
    return Destination(name="ris", type="hl7", host="127.0.0.1", port=port, sending_application="CXRTRIAGE",
                       sending_facility="EDGE1", receiving_application="RIS", receiving_facility="HOSP")


def _node_settings(model_settings: Settings, dest: Destination, **send_kw: object) -> Settings:
    return dataclasses.replace(model_settings, destinations=[dest],
                               send=dataclasses.replace(model_settings.send, **send_kw))


def _screen(s: Settings, *dss) -> Node:  # type: ignore[no-untyped-def]
    node = Node(s, batch=False)
    node.start()
    assert send(list(dss), node.port) == [0] * len(dss)
    assert pipeline.drain(node.db, node.spool, Engine(s.model.path), s, pipeline.worker_id()).done == len(dss)
    return node


def _deliveries(node: Node) -> list[store.Delivery]:
    with node.db.sessions() as ses:
        return list(ses.query(store.Delivery).order_by(store.Delivery.id))


def test_spec_and_table_settings(tmp_path: Path) -> None:
    assert Destination.parse("hl7:ris.example:2575") == Destination(name="hl7", type="hl7", host="ris.example", port=2575)
    assert Destination.parse("ris=hl7:10.0.0.9:6661").name == "ris"
    with pytest.raises(SettingsError, match="hl7:HOST:PORT"):
        Destination.parse("hl7:nohost")
    cfg = tmp_path / "n.toml"
    cfg.write_text('[[destinations]]\nname = "ris"\ntype = "hl7"\nhost = "10.0.0.9"\nport = 2575\n'
                   'receiving_application = "R|S"\n')
    with pytest.raises(SettingsError, match=r"destinations\.ris\.receiving_application must not contain HL7 delimiters"):
        load_settings(cfg, environ={})


def test_oru_fields_and_ack_end_to_end(model_settings: Settings, receiver: Receiver) -> None:
    s = _node_settings(model_settings, _ris(receiver.port))
    ds = make_image(rows=64, cols=64, patient_name="Müller^Hans^Peter^Dr^Jr", patient_id="P|01")
    ds.AccessionNumber, ds.PatientSex, ds.IssuerOfPatientID = "ACC^77", "F", "HOSP"
    ds.AcquisitionDate, ds.AcquisitionTime = "20261126", "101700.25"
    node = _screen(s, ds)
    try:
        row = store.find(node.db, ds.SOPInstanceUID)
        (d,) = _deliveries(node)
        assert (d.kind, d.state, d.destination, d.last_error) == ("hl7", "sent", "ris", None)
        (m,) = receiver.messages
    finally:
        node.stop()
    msh, pid, obr = m.segment("MSH"), m.segment("PID"), m.segment("OBR")
    assert [str(msh(i)) for i in (3, 4, 5, 6, 9, 11, 12, 18)] == [
        "CXRTRIAGE", "EDGE1", "RIS", "HOSP", "ORU^R01^ORU_R01", "P", "2.5.1", "UNICODE UTF-8"]
    assert str(msh(10)) == hl7.control_id(d.sop_instance_uid, "ris") and len(str(msh(10))) == 20
    assert m.unescape(str(pid(3)(1)(1))) == "P|01" and str(pid(3)(1)(4)) == "HOSP"
    assert str(pid(5)) == "Müller^Hans^Peter^Jr^Dr"  # XPN: suffix before prefix
    assert (str(pid(7)), str(pid(8))) == ("19700101", "F")
    assert m.unescape(str(obr(3))) == "ACC^77" and m.unescape(str(obr(18))) == "ACC^77"
    assert str(obr(20)) == ds.StudyInstanceUID and str(obr(7)) == "20261126101700"
    code = hl7.PRIORITY_0027[row.priority][0]
    assert str(obr(5)) == code and str(m.segment("TQ1")(9)) == f"{code}^{hl7.PRIORITY_0027[row.priority][1]}^HL70027"
    obx = {(str(o(3)(1)(1)), str(o(4))): o for o in m.segments("OBX")}
    probs = {str(o(3)(1)(5)): float(str(o(5))) for (ident, _), o in obx.items() if ident == "122157"}
    names = {"normal": "Normal", "pneumonia": "Pneumonia", "covid19": "COVID-19"}
    assert probs == pytest.approx({names[k]: v for k, v in row.probabilities.items()}, abs=1e-6)
    assert all(str(o(2)) == "NM" for (ident, _), o in obx.items() if ident == "122157")
    (prio,) = [o for (ident, _), o in obx.items() if ident == "260870009"]
    assert str(prio(2)) == "CE" and str(prio(5)(1)(1)) == row.priority.upper()
    (pred,) = [o for (ident, _), o in obx.items() if ident == "PREDICTEDCLASS"]
    assert str(pred(5)(1)(2)) == names[row.predicted_class]
    (study,) = [o for (ident, _), o in obx.items() if ident == "113014"]
    assert str(study(2)) == "HD" and str(study(5)(1)(1)) == ds.StudyInstanceUID
    note = str(m.segment("NTE")(3))
    assert "not for diagnostic use" in note and "toy" in note and row.model_version in note
    assert all(str(o(11)) == "P" for o in m.segments("OBX"))


def test_ae_and_ar_are_retried_then_send_failed_then_resent(model_settings: Settings) -> None:
    r = Receiver(acks=["AE", "AR"])
    try:
        s = _node_settings(model_settings, _ris(r.port), max_attempts=2, backoff_seconds=0.1, jitter=0.0)
        node = _screen(s, make_image(rows=64, cols=64))
        try:
            (d,) = _deliveries(node)
            assert d.state == "pending_send" and d.attempts == 1
            assert d.last_error.endswith("ACK AE (receiver says no: test <patient>)"), d.last_error
            time.sleep(0.15)
            rep = sender.send_due(node.db, node.spool, s)
            assert (rep.sent, rep.failed) == (0, 1)
            (d,) = _deliveries(node)
            assert d.state == "send_failed" and "ACK AR" in d.last_error
            # the same bytes both times (one control ID: the RIS can drop a duplicate)
            assert len(r.raw) == 2 and r.raw[0] == r.raw[1]
            assert store.resend(node.db, destination="ris") == 1
            assert sender.send_due(node.db, node.spool, s).sent == 1  # the receiver says AA now
            assert _deliveries(node)[0].state == "sent" and len(r.messages) == 3
        finally:
            node.stop()
    finally:
        r.stop()


def test_receiver_down_then_up(model_settings: Settings) -> None:
    port = free_port()
    s = _node_settings(model_settings, _ris(port), backoff_seconds=0.1, jitter=0.0)
    node = _screen(s, make_image(rows=64, cols=64, seed=1), make_image(rows=64, cols=64, seed=2))
    try:
        ds = _deliveries(node)
        assert [d.state for d in ds] == ["pending_send"] * 2
        assert all("cannot connect" in d.last_error for d in ds), ds[0].last_error
        r = Receiver(port=port)
        try:
            time.sleep(0.15)
            assert sender.send_due(node.db, node.spool, s).sent == 2
            assert [d.state for d in _deliveries(node)] == ["sent"] * 2 and len(r.messages) == 2
        finally:
            r.stop()
    finally:
        node.stop()


def test_no_ack_is_a_failed_attempt(model_settings: Settings) -> None:
    r = Receiver(acks=[None])
    try:
        s = _node_settings(model_settings, _ris(r.port), timeout=0.5)
        node = _screen(s, make_image(rows=64, cols=64))
        try:
            (d,) = _deliveries(node)
            assert d.state == "pending_send" and "no ACK within 0.5 s" in d.last_error
            assert len(r.messages) == 1
        finally:
            node.stop()
    finally:
        r.stop()


def test_batch_once_with_an_hl7_spec_on_the_command_line(
    model_settings: Settings, receiver: Receiver, capsys: pytest.CaptureFixture[str]
) -> None:
    data = model_settings.storage.data_dir
    node = Node(model_settings, batch=False)
    node.start()
    try:
        assert send([make_image(rows=64, cols=64)], node.port) == [0]
    finally:
        node.stop()
    rc = cli.main(["batch", "--once", "--data-dir", str(data), "--model", str(model_settings.model.path),
                   "--destination", f"hl7:127.0.0.1:{receiver.port}"])
    assert rc == 0 and "results sent 1" in capsys.readouterr().out
    assert wait_for(lambda: len(receiver.messages) == 1)
    assert str(receiver.messages[0].segment("MSH")(3)) == "CXRTRIAGE"


def test_mllp_over_tls_verifies_the_receiver(model_settings: Settings, pki: dict[str, Path]) -> None:  # noqa: F811
    r = Receiver(ssl=tls.server_context(pki["server_crt"], pki["server_key"]))
    try:
        good = dataclasses.replace(_ris(r.port), tls=True, tls_ca=pki["ca_crt"])
        wrong = dataclasses.replace(good, name="ris2", tls_ca=pki["other-ca_crt"])
        s = dataclasses.replace(model_settings, destinations=[good, wrong])
        node = _screen(s, make_image(rows=64, cols=64))
        try:
            by_dest = {d.destination: d for d in _deliveries(node)}
            assert by_dest["ris"].state == "sent" and len(r.messages) == 1
            assert by_dest["ris2"].state == "pending_send" and "CERTIFICATE_VERIFY_FAILED" in by_dest["ris2"].last_error
        finally:
            node.stop()
    finally:
        r.stop()
