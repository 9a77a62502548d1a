"""HL7 v2.5.1 ORU^R01 notification to a RIS over MLLP: one message per screened image.

Built by the pipeline in the same step as the Structured Report and written to the spool
(``results/../<sr uid>.<destination>.hl7``) before the commit, so a delivery row always points at
a durable message and a retry sends exactly the same bytes (same MSH-10 control ID: a RIS can
drop duplicates).  The profile is in ``docs/conformance.md`` ("HL7 v2 notification").

Transport: MLLP (HL7 v2.5.1 Appendix C, Minimal Lower Layer Protocol) through the maintained
``hl7`` library's asyncio streams (``hl7.mllp``), optionally over TLS with the same settings
as DICOM TLS.  Acknowledgement is HL7 original mode (2.9.2): ``AA`` (or ``CA``) means
delivered; ``AE``, ``AR``, ``CE``, ``CR``, an ACK for another message, or no ACK within
``send.timeout`` is a failed attempt that the sender retries with backoff until ``send_failed``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import hl7
from hl7.mllp import open_hl7_connection
from pydicom.dataset import Dataset

from worker import tls
from worker.results import LOCAL_SCHEME, TriageResult, finding_code
from worker.settings import Destination

log = logging.getLogger(__name__)

VERSION = "2.5.1"
#: HL7 table 0027 (Priority) for our priorities: STAT, ASAP, Routine.
PRIORITY_0027: dict[str, tuple[str, str]] = {
    "urgent": ("S", "STAT"),
    "high": ("A", "ASAP"),
    "routine": ("R", "Routine"),
}
#: HL7 table 0001 (Administrative Sex) from DICOM Patient's Sex (M, F, O).
_SEX = {"M": "M", "F": "F", "O": "O"}
DELIVERED_ACKS = frozenset({"AA", "CA"})
#: The escape sequences of the delimiters (2.7.4), escape character first. Other characters stay
#: as they are: the message is UTF-8 (MSH-18), not 7-bit with \\Xhh\\ escapes.
_ESCAPES = (("\\", "\\E\\"), ("|", "\\F\\"), ("^", "\\S\\"), ("&", "\\T\\"), ("~", "\\R\\"))


def _esc(value: object) -> str:
    """A field value with the HL7 delimiters escaped; line breaks become spaces."""
    text = "" if value is None else str(value)
    text = text.replace("\r", " ").replace("\n", " ")
    for char, seq in _ESCAPES:
        text = text.replace(char, seq)
    return text


def _text(ds: Dataset, keyword: str) -> str:
    v = ds.get(keyword)
    return "" if v is None else str(v).strip()


def _ts(when: dt.datetime) -> str:
    """DTM (2.A.22) with seconds and UTC offset: ``YYYYMMDDHHMMSS+ZZZZ``."""
    return when.strftime("%Y%m%d%H%M%S%z")


def _person_name(ds: Dataset) -> str:
    """XPN from DICOM PN: family^given^middle^suffix^prefix (PN has prefix before suffix)."""
    pn = ds.get("PatientName")
    if not pn:
        return ""
    parts = (str(pn).split("=")[0].split("^") + [""] * 5)[:5]
    family, given, middle, prefix, suffix = (_esc(p) for p in parts)
    return "^".join([family, given, middle, suffix, prefix]).rstrip("^")


def _observed_at(ds: Dataset) -> str:
    """When the image was taken: Acquisition, else Content, else Study date and time (DICOM DA/TM)."""
    for d, t in (("AcquisitionDate", "AcquisitionTime"), ("ContentDate", "ContentTime"), ("StudyDate", "StudyTime")):
        date = _text(ds, d)
        if len(date) == 8 and date.isdigit():
            time = _text(ds, t).split(".")[0]
            return date + (time if time.isdigit() else "")
    return ""


def control_id(sr_uid: str, destination: str) -> str:
    """MSH-10: 20 characters (ST 20 in 2.5.1), the same for every retry of one message."""
    return hashlib.sha256(f"{sr_uid}\0{destination}".encode()).hexdigest()[:20].upper()


def build_oru(
    source: Dataset, result: TriageResult, dest: Destination, sr_uid: str, *, now: dt.datetime | None = None
) -> str:
    """The ORU^R01 for one screened image (segments joined by CR, 2.5.1 2.6.1)."""
    now = (now or dt.datetime.now(dt.UTC)).astimezone()
    stamp = _ts(now)
    prio_code, prio_text = PRIORITY_0027[result.priority]
    accession = _esc(_text(source, "AccessionNumber"))
    study_uid = _esc(_text(source, "StudyInstanceUID"))
    issuer = _esc(_text(source, "IssuerOfPatientID"))
    pid3 = _esc(_text(source, "PatientID")) + (f"^^^{issuer}" if issuer else "")
    birth = _text(source, "PatientBirthDate")
    birth = birth if len(birth) == 8 and birth.isdigit() else ""
    sex = _SEX.get(_text(source, "PatientSex").upper(), "U" if _text(source, "PatientSex") else "")
    model = f"{result.model_name} {result.model_version} ({result.model_precision})"
    finding = finding_code(result.predicted_class)
    service = f"CXRTRIAGE^AI chest X-ray triage^{LOCAL_SCHEME}"

    segments = [
        "|".join(["MSH", "^~\\&", _esc(dest.sending_application), _esc(dest.sending_facility),
                  _esc(dest.receiving_application), _esc(dest.receiving_facility), stamp, "",
                  "ORU^R01^ORU_R01", control_id(sr_uid, dest.name), "P", VERSION, "", "", "", "", "",
                  "UNICODE UTF-8"]),
        "|".join(["PID", "1", "", pid3, "", _person_name(source), "", birth, sex]),
        # OBR-3 filler order number and OBR-18 (IHE RAD: placer field 1) carry the accession number,
        # OBR-20 (filler field 1) the Study Instance UID; OBR-5 is the (2.5.1: retained) priority.
        "|".join(["OBR", "1", "", accession, service, prio_code, "", _observed_at(source), "", "", "", "", "", "",
                  "", "", "", "", accession, "", study_uid, "", stamp, "", "RAD", "P"]),
        "|".join(["NTE", "1", "L", _esc(f"AI triage - not for diagnostic use. Model {model}. "
                                        f"Triage: {result.triage_reason}")]),
        "|".join(["TQ1", "1", "", "", "", "", "", "", "", f"{prio_code}^{prio_text}^HL70027"]),
    ]
    obx = [
        ("CE", f"PREDICTEDCLASS^Predicted class^{LOCAL_SCHEME}", "",
         f"{_esc(finding.value)}^{_esc(finding.meaning)}^{_esc(finding.scheme_designator)}", ""),
    ]
    for i, (cls_name, p) in enumerate(result.probabilities.items(), start=1):
        code = finding_code(cls_name)
        obx.append(("NM", f"122157^Probability^DCM^{_esc(code.value)}^{_esc(code.meaning)}^"
                          f"{_esc(code.scheme_designator)}", str(i), f"{p:.6f}".rstrip("0").rstrip(".") or "0",
                    "1^no units^UCUM"))
    obx.append(("CE", "260870009^Priority^SCT", "",
                f"{result.priority.upper()}^{result.priority.capitalize()}^{LOCAL_SCHEME}^{prio_code}^{prio_text}^HL70027",
                ""))
    obx.append(("HD", "113014^DICOM Study^DCM", "", f"{study_uid}^{study_uid}^ISO" if study_uid else "", ""))
    for n, (vt, ident, sub, value, units) in enumerate(obx, start=1):
        segments.append("|".join(["OBX", str(n), vt, ident, sub, value, units, "", "", "", "", "P", "", "", stamp]))
    text = "\r".join(segments)
    hl7.parse(text)  # our own message must parse with the library the RIS side may use too
    return text


@dataclass(frozen=True)
class Ack:
    """What a receiver answered: MSA-1, MSA-2 and a reason text (MSA-3 or ERR-8)."""

    code: str
    control_id: str
    text: str


def parse_ack(message: hl7.Message) -> Ack:
    """Read MSA (and ERR) of an ACK; a reply without a readable MSA is an error."""
    try:
        return _read_ack(message)
    except (IndexError, KeyError, ValueError) as exc:
        return Ack("", "", f"unreadable reply ({type(exc).__name__}: {exc})")


def _read_ack(message: hl7.Message) -> Ack:
    try:
        msa = message.segment("MSA")
    except KeyError:
        return Ack("", "", "reply has no MSA segment")
    text = str(msa(3)) if len(msa) > 3 else ""
    try:
        err = message.segment("ERR")
        if len(err) > 8 and str(err(8)):
            text = str(err(8))
        elif not text and len(err) > 3:
            text = str(err(3))
    except KeyError:
        pass
    return Ack(str(msa(1)), str(msa(2)) if len(msa) > 2 else "", text)


def _redact(text: str, sent: hl7.Message) -> str:
    """The receiver's error text without our patient's ID or name parts (it may echo them, and the
    text goes to the log and the delivery row, which carry no patient identifiers)."""
    try:
        fields = str(sent.segment("PID")).split("|") + [""] * 6
    except KeyError:
        return text
    values = [fields[3].split("^")[0]] + fields[5].split("^")[:3]
    for v in sorted({sent.unescape(v) for v in values if len(v) > 1}, key=len, reverse=True):
        text = text.replace(v, "<patient>")
    return text


async def _exchange(
    dest: Destination, messages: Sequence[str | Exception], timeout: float
) -> list[str | None]:
    """Send each message on one connection and wait for its ACK; an error text per message."""
    out: list[str | None] = []
    where = f"{dest.name} (hl7 {dest.host}:{dest.port})"
    ssl_ctx = tls.client_context(dest.tls_ca, dest.tls_cert, dest.tls_key) if dest.tls else None
    try:
        reader, writer = await asyncio.wait_for(
            open_hl7_connection(dest.host, dest.port, encoding="utf-8", ssl=ssl_ctx,
                                server_hostname=dest.host if ssl_ctx else None),
            timeout,
        )
    except (TimeoutError, OSError) as exc:
        why = "timed out" if isinstance(exc, asyncio.TimeoutError) else (exc.strerror or str(exc))
        return [f"{where}: cannot connect: {why}"] * len(messages)
    try:
        for msg in messages:
            if isinstance(msg, Exception):
                out.append(f"message unreadable: {msg}")
                continue
            if len(out) > 0 and writer.is_closing():
                out.append(f"{where}: connection closed")
                continue
            try:
                writer.writeblock(msg.encode("utf-8"))
                await writer.drain()
                reply = await asyncio.wait_for(reader.readmessage(), timeout)
            except TimeoutError:
                out.append(f"{where}: no ACK within {timeout:g} s")
                break
            except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                out.append(f"{where}: no ACK ({type(exc).__name__}: {exc})")
                break
            ack = parse_ack(reply)
            sent = hl7.parse(msg)
            expected = str(sent.segment("MSH")(10))
            ack = Ack(ack.code, ack.control_id, _redact(ack.text, sent))
            if ack.code in DELIVERED_ACKS and ack.control_id == expected:
                out.append(None)
            elif ack.code in DELIVERED_ACKS:
                out.append(f"{where}: ACK for another message (MSA-2 {ack.control_id!r}, sent {expected!r})")
            else:
                out.append(f"{where}: ACK {ack.code or '?'}" + (f" ({ack.text})" if ack.text else ""))
    finally:
        writer.close()
        try:
            await asyncio.wait_for(writer.wait_closed(), timeout)
        except (TimeoutError, OSError):
            pass
    # after a lost connection or a missing ACK the rest were not sent: they fail this attempt
    out += [f"{where}: not sent (connection ended earlier)"] * (len(messages) - len(out))
    return out


def send(dest: Destination, messages: Sequence[str | Exception], timeout: float) -> list[str | None]:
    """Blocking :func:`_exchange` for the sender thread: ``None`` (delivered) or an error per message."""
    try:
        return asyncio.run(_exchange(dest, messages, timeout))
    except (OSError, ValueError) as exc:  # TLS set-up (certificate files) and the like
        return [f"{dest.name}: {type(exc).__name__}: {exc}"] * len(messages)
