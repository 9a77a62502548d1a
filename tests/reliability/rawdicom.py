"""Hand-made DICOM upper-layer PDUs (PS3.8 9.3) over a raw socket, for hostile-input tests.

pynetdicom and dcmtk refuse to send malformed PDUs or data sets; this speaks the protocol byte
by byte so that tests can send exactly what an attacker or a broken modality would.
"""

from __future__ import annotations

import socket
import struct
from io import BytesIO

from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom.dsutils import encode

APP_CONTEXT = b"1.2.840.10008.3.1.1.1"
VERIFICATION = "1.2.840.10008.1.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


def _uid(u: str) -> bytes:
    b = u.encode("ascii")
    return b + (b"\0" if len(b) % 2 else b"")


def _item(kind: int, body: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(body)) + body


def pdu(kind: int, body: bytes, length: int | None = None) -> bytes:
    """A PDU: type, reserved, 4-byte big-endian length (``length`` overrides the true one)."""
    return struct.pack(">BBL", kind, 0, len(body) if length is None else length) + body


def associate_rq(
    contexts: list[tuple[int, str, list[str]]],
    *,
    called: bytes = b"CXRTRIAGE",
    calling: bytes = b"RAWSCU",
    max_pdu: int = 65536,
) -> bytes:
    """A-ASSOCIATE-RQ with presentation contexts (id, abstract syntax, transfer syntaxes)."""
    body = struct.pack(">HH", 1, 0) + called.ljust(16) + calling.ljust(16) + b"\0" * 32
    body += _item(0x10, APP_CONTEXT)
    for cid, abstract, tss in contexts:
        sub = _item(0x30, _uid(abstract)) + b"".join(_item(0x40, _uid(t)) for t in tss)
        body += _item(0x20, struct.pack(">BBBB", cid, 0, 0, 0) + sub)
    body += _item(0x50, _item(0x51, struct.pack(">L", max_pdu)) + _item(0x52, _uid("1.2.3.4")))
    return pdu(0x01, body)


def p_data(cid: int, fragment: bytes, *, command: bool, last: bool = True, pdv_length: int | None = None) -> bytes:
    """P-DATA-TF with one PDV (``pdv_length`` overrides the item length)."""
    header = (1 if command else 0) | (2 if last else 0)
    value = struct.pack(">B", cid) + struct.pack(">B", header) + fragment
    item = struct.pack(">L", len(value) if pdv_length is None else pdv_length) + value
    return pdu(0x04, item)


RELEASE_RQ = pdu(0x05, b"\0\0\0\0")


def command_set(**elements: object) -> bytes:
    """A DIMSE command set, Implicit VR Little Endian, with its Command Group Length."""
    ds = Dataset()
    for k, v in elements.items():
        setattr(ds, k, v)
    body = encode(ds, True, True)
    head = Dataset()
    head.CommandGroupLength = len(body)
    return encode(head, True, True) + body


def c_store_rq(sop_class: str, sop_uid: str, msg_id: int = 1) -> bytes:
    return command_set(
        AffectedSOPClassUID=sop_class, CommandField=0x0001, MessageID=msg_id, Priority=0,
        CommandDataSetType=0x0000, AffectedSOPInstanceUID=sop_uid,
    )


def c_echo_rq(msg_id: int = 1) -> bytes:
    return command_set(AffectedSOPClassUID=VERIFICATION, CommandField=0x0030, MessageID=msg_id,
                       CommandDataSetType=0x0101)


class RawAssociation:
    """A TCP connection that speaks raw PDUs; every read has a timeout."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.accepted: dict[int, str] = {}

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_pdu(self) -> tuple[int, bytes] | None:
        """(type, body) of the next PDU, or None when the peer closed the connection."""
        head = self._exact(6)
        if head is None:
            return None
        kind, _, length = struct.unpack(">BBL", head)
        body = self._exact(length)
        return None if body is None else (kind, body)

    def _exact(self, n: int) -> bytes | None:
        buf = bytearray()
        while len(buf) < n:
            try:
                chunk = self.sock.recv(n - len(buf))
            except (ConnectionResetError, TimeoutError):
                return None
            if not chunk:
                return None
            buf += chunk
        return bytes(buf)

    def associate(self, contexts: list[tuple[int, str, list[str]]]) -> bool:
        """Send an A-ASSOCIATE-RQ; True on A-ASSOCIATE-AC; remembers accepted contexts."""
        self.send(associate_rq(contexts))
        rsp = self.recv_pdu()
        if rsp is None or rsp[0] != 0x02:
            return False
        body, i = rsp[1], 68
        while i + 4 <= len(body):
            kind, _, n = struct.unpack(">BBH", body[i : i + 4])
            item = body[i + 4 : i + 4 + n]
            if kind == 0x21 and item[2] == 0:  # presentation context result: acceptance
                cid = item[0]
                ts_len = struct.unpack(">H", item[6:8])[0]
                self.accepted[cid] = item[8 : 8 + ts_len].rstrip(b"\0").decode()
            i += 4 + n
        return True

    def store(self, cid: int, sop_class: str, sop_uid: str, dataset: bytes, chunk: int = 16000) -> int | None:
        """C-STORE ``dataset`` (already encoded in the context's transfer syntax); the status."""
        self.send(p_data(cid, c_store_rq(sop_class, sop_uid), command=True))
        for i in range(0, max(len(dataset), 1), chunk):
            part = dataset[i : i + chunk]
            self.send(p_data(cid, part, command=False, last=i + chunk >= len(dataset)))
        return self.read_status()

    def read_status(self) -> int | None:
        """Status of the next DIMSE response (None: closed or aborted instead)."""
        frags = bytearray()
        while True:
            rsp = self.recv_pdu()
            if rsp is None or rsp[0] != 0x04:
                return None
            body, i = rsp[1], 0
            last = False
            while i + 6 <= len(body):
                n = struct.unpack(">L", body[i : i + 4])[0]
                header = body[i + 5]
                frags += body[i + 6 : i + 4 + n]
                last = bool(header & 2) and bool(header & 1)
                i += 4 + n
            if last:
                ds = dcmread(BytesIO(bytes(frags)), force=True)
                ds.is_little_endian, ds.is_implicit_VR = True, True
                return int(ds.Status)

    def echo(self, cid: int) -> int | None:
        self.send(p_data(cid, c_echo_rq(), command=True))
        return self.read_status()

    def release(self) -> None:
        try:
            self.send(RELEASE_RQ)
            self.recv_pdu()
        except OSError:
            pass
        self.close()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def closed_by_peer(self, timeout: float = 10.0) -> bool:
        """True when the peer closes (or aborts) within ``timeout`` seconds."""
        self.sock.settimeout(timeout)
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return True
                if data[:1] == b"\x07":  # A-ABORT: the peer aborted; it closes next
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False
