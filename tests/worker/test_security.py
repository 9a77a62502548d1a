"""DICOM TLS (BCP 195) on the listener and the sender, peer allow-list, object size limit."""

from __future__ import annotations

import dataclasses
import shutil
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from pynetdicom import AE, AllStoragePresentationContexts, evt
from sqlalchemy import select
from support import echo, free_port, make_image, send, to_bytes

from worker import sender, store, tls
from worker.node import Node
from worker.settings import Destination, Settings
from worker.spool import Spool


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A test CA, a server certificate for 127.0.0.1/localhost, a client certificate; and a foreign CA."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI is needed to make test certificates")
    d = tmp_path_factory.mktemp("pki")
    for ca in ("ca", "other-ca"):
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN=cxr-triage test {ca}",
                 "-keyout", f"{ca}.key", "-out", f"{ca}.crt", cwd=d)
    for name, ext in (("server", "subjectAltName=IP:127.0.0.1,DNS:localhost"), ("client", "extendedKeyUsage=clientAuth")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
                 "-out", f"{name}.csr", cwd=d)
        (d / f"{name}.ext").write_text(ext + "\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                 "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.crt", cwd=d)
    return {p.stem + p.suffix.replace(".", "_"): p for p in d.iterdir()}


def _tls_node(settings: Settings, pki: dict[str, Path], require_client: bool) -> Node:
    li = dataclasses.replace(settings.listener, tls_cert=pki["server_crt"], tls_key=pki["server_key"],
                             tls_ca=pki["ca_crt"], tls_require_client_cert=require_client)
    n = Node(dataclasses.replace(settings, listener=li), batch=False)
    n.start()
    return n


def _tls_echo(port: int, ctx: ssl.SSLContext | None) -> int | None:
    return echo(port, calling="TLSSCU", timeout=5, tls=ctx)


@pytest.fixture
def tls_node(settings: Settings, pki: dict[str, Path]) -> Iterator[Node]:
    n = _tls_node(settings, pki, require_client=True)
    yield n
    n.stop()


def test_tls_listener_with_client_certificate(tls_node: Node, pki: dict[str, Path]) -> None:
    good = tls.client_context(pki["ca_crt"], pki["client_crt"], pki["client_key"])
    assert _tls_echo(tls_node.port, good) == 0
    anonymous = tls.client_context(pki["ca_crt"])  # no client certificate: refused when required
    assert _tls_echo(tls_node.port, anonymous) is None
    assert _tls_echo(tls_node.port, None) is None  # plain TCP to a TLS port
    assert _tls_echo(tls_node.port, good) == 0  # and the node keeps serving


def test_tls_below_1_2_is_refused(tls_node: Node, pki: dict[str, Path]) -> None:
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.load_verify_locations(str(pki["ca_crt"]))
    old.load_cert_chain(str(pki["client_crt"]), str(pki["client_key"]))
    old.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    old.maximum_version = ssl.TLSVersion.TLSv1_1
    try:
        old.set_ciphers("ALL:@SECLEVEL=0")
    except ssl.SSLError:
        pass
    assert _tls_echo(tls_node.port, old) is None
    ctx = tls.server_context(pki["server_crt"], pki["server_key"])
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2


@pytest.mark.skipif(shutil.which("storescu") is None, reason="dcmtk is not installed")
def test_dcmtk_storescu_over_tls(tls_node: Node, pki: dict[str, Path], tmp_path: Path) -> None:
    f = tmp_path / "cr.dcm"
    ds = make_image(rows=64, cols=64)
    ds.save_as(f, enforce_file_format=True)
    base = ["storescu", "-aec", "CXRTRIAGE", "+tls", str(pki["client_key"]), str(pki["client_crt"]),
            "+cf", str(pki["ca_crt"]), "+py"]
    r = subprocess.run([*base, "127.0.0.1", str(tls_node.port), str(f)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert store.find(tls_node.db, ds.SOPInstanceUID) is not None
    # a client certificate from another CA is refused
    other = ["storescu", "-aec", "CXRTRIAGE", "+tls", str(pki["other-ca_key"]), str(pki["other-ca_crt"]),
             "+cf", str(pki["ca_crt"]), "127.0.0.1", str(tls_node.port), str(f)]
    assert subprocess.run(other, capture_output=True, text=True, timeout=60).returncode != 0


class _TLSSCP:
    def __init__(self, pki: dict[str, Path]) -> None:
        self.received: list[str] = []
        self.port = free_port()
        ae = AE(ae_title="PACS")
        ae.supported_contexts = AllStoragePresentationContexts

        def on_store(event: evt.Event) -> int:
            self.received.append(str(event.request.AffectedSOPInstanceUID))
            return 0

        ctx = tls.server_context(pki["server_crt"], pki["server_key"])
        self.server = ae.start_server(("127.0.0.1", self.port), block=False, ssl_context=ctx,
                                      evt_handlers=[(evt.EVT_C_STORE, on_store)])


def test_sender_over_tls_verifies_the_peer(settings: Settings, pki: dict[str, Path], tmp_path: Path) -> None:
    scp = _TLSSCP(pki)
    db = store.Database.open(f"sqlite:///{tmp_path / 'q.db'}")
    spool = Spool(tmp_path / "spool")
    try:
        obj = make_image(rows=32, cols=32)
        rel = Spool.result_relpath_for(obj.SOPInstanceUID)
        spool.write(rel, to_bytes(obj))
        src = make_image(rows=32, cols=32)
        store.enqueue(db, store.Received(src.SOPInstanceUID, src.SOPClassUID, None, None, None, "CR",
                                       "1.2.840.10008.1.2.1", None, "x", 1, "0" * 64))
        (c,) = store.claim_batch(db, 1, "w", 60)
        store.finish(db, "w", [store.Outcome(c.id, store.State.DONE, predicted_class="normal",
                                           probabilities={"normal": 1.0}, priority="routine")],
                    deliveries={c.id: [store.NewDelivery(n, "sr", obj.SOPClassUID, obj.SOPInstanceUID, rel)
                                       for n in ("wrongca", "pacs")]},
                    model_name="m", model_version="1", model_precision="f32", max_attempts=3)
        dests = [
            Destination(name="pacs", type="dicom", ae_title="PACS", host="127.0.0.1", port=scp.port, tls=True,
                        tls_ca=pki["ca_crt"]),
            Destination(name="wrongca", type="dicom", ae_title="PACS", host="127.0.0.1", port=scp.port, tls=True,
                        tls_ca=pki["other-ca_crt"]),
        ]
        s = dataclasses.replace(settings, destinations=dests,
                                send=dataclasses.replace(settings.send, max_attempts=1, timeout=5))
        rep = sender.send_due(db, spool, s)
        assert rep.sent == 1 and rep.failed == 1
        assert scp.received == [obj.SOPInstanceUID]
        with db.sessions() as ses:
            states = {d.destination: d.state for d in ses.scalars(select(store.Delivery))}
        assert states == {"pacs": "sent", "wrongca": "send_failed"}
    finally:
        scp.server.shutdown()
        db.close()


def test_peer_allow_list(settings: Settings) -> None:
    s = dataclasses.replace(settings, listener=dataclasses.replace(settings.listener, allowed_peers=["10.0.0.0/8"]))
    n = Node(s, batch=False)
    n.start()
    try:
        assert send([make_image(rows=32, cols=32)], n.port) == [None]
        with n.db.sessions() as ses:
            (ev,) = ses.scalars(select(store.IntakeEvent))
        assert ev.kind == "association_rejected" and "127.0.0.1 is not in listener.allowed_peers" in ev.reason
    finally:
        n.stop()
    s = dataclasses.replace(settings, listener=dataclasses.replace(settings.listener, allowed_peers=["127.0.0.0/8", "::1"]))
    n = Node(s, batch=False)
    n.start()
    try:
        assert send([make_image(rows=32, cols=32)], n.port) == [0]
    finally:
        n.stop()


def test_object_size_limit(settings: Settings) -> None:
    s = dataclasses.replace(settings, listener=dataclasses.replace(settings.listener, max_object_mb=1))
    n = Node(s, batch=False)
    n.start()
    try:
        big = make_image(rows=1024, cols=1024)  # 2 MB of pixels
        small = make_image(rows=64, cols=64)
        assert send([big, small], n.port) == [0xA700, 0]
        assert store.find(n.db, big.SOPInstanceUID) is None
        with n.db.sessions() as ses:
            (ev,) = ses.scalars(select(store.IntakeEvent))
        assert "exceeds listener.max_object_mb" in ev.reason
    finally:
        n.stop()


def test_tls_settings_are_validated(tmp_path: Path) -> None:
    from worker.settings import SettingsError, load_settings

    with pytest.raises(SettingsError, match="tls_cert and listener.tls_key must be set together"):
        load_settings(None, {"listener.tls_cert": str(tmp_path)}, environ={})
    with pytest.raises(SettingsError, match="is not a readable file"):
        load_settings(None, {"listener.tls_cert": str(tmp_path / "x"), "listener.tls_key": str(tmp_path / "y")},
                      environ={})
    with pytest.raises(SettingsError, match="allowed_peers"):
        load_settings(None, {"listener.allowed_peers": "10.0.0.300"}, environ={})
