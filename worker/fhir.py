"""FHIR R4 results: a DiagnosticReport with Observations per screened image, POSTed to a server.

One transaction Bundle (FHIR R4 3.1.0.11 "Transactions") per image and ``fhir`` destination,
built with the SR and kept in the spool until the server accepts it, so every retry sends the
same bytes.  Entries are conditional updates on deterministic identifiers (``PUT
Observation?identifier=...``), so a retry after a lost response replaces rather than duplicates.

* ``Observation`` per class: code (122157, DCM, "Probability"), ``valueQuantity`` 0..1 (UCUM
  ``1``), a component (121071, DCM, "Finding") = the class's SNOMED CT code.
* ``Observation`` predicted class: (121071, DCM, "Finding") = the class's code.
* ``Observation`` priority: (260870009, SCT, "Priority") = HL7 table 0027 ``S``/``A``/``R`` and
  our word (``urgent``/``high``/``routine``), the same priority as the SR and the HL7 message.
* ``DiagnosticReport``: status ``preliminary`` (unverified AI result), ``imagingStudy`` referencing
  the ImagingStudy by its Study Instance UID (identifier ``urn:dicom:uid`` = ``urn:oid:<uid>``),
  subject by Patient ID, ``result`` the Observations, a conclusion with the disclaimer.

Every resource is validated with ``fhir.resources`` (its R4B models: DiagnosticReport,
Observation and Bundle have R4's structure) before anything is written; the HTTP side is the
standard library (``urllib``), with an optional bearer token.  ``fhir.resources`` comes with the
``fhir`` extra and is imported only when a ``fhir`` destination is configured.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import urllib.error
import urllib.request
import uuid
from typing import Any

from pydicom.dataset import Dataset

from worker import tls
from worker.hl7 import PRIORITY_0027
from worker.results import DISCLAIMER, LOCAL_SCHEME, TriageResult, finding_code
from worker.settings import Destination

log = logging.getLogger(__name__)

DCM = "http://dicom.nema.org/resources/ontology/DCM"
SCT = "http://snomed.info/sct"
UCUM = "http://unitsofmeasure.org"
V2_0027 = "http://terminology.hl7.org/CodeSystem/v2-0027"
V2_0074 = "http://terminology.hl7.org/CodeSystem/v2-0074"
DICOM_UID = "urn:dicom:uid"
LOCAL = f"urn:cxr-triage:{LOCAL_SCHEME}"
_NS = uuid.UUID("0d5e1b6c-5f0a-4d6e-9a55-c8a1d7c1e0f3")  # the namespace of our resource identifiers


def _system(scheme: str) -> str:
    return {"SCT": SCT, "DCM": DCM}.get(scheme, LOCAL)


def _coding(code: Any) -> dict[str, str]:
    return {"system": _system(code.scheme_designator), "code": code.value, "display": code.meaning}


def _ref_study(study_uid: str) -> dict[str, Any]:
    return {"type": "ImagingStudy", "identifier": {"system": DICOM_UID, "value": f"urn:oid:{study_uid}"}}


def _text(ds: Dataset, keyword: str) -> str:
    v = ds.get(keyword)
    return "" if v is None else str(v).strip()


def _effective(ds: Dataset) -> str | None:
    """Acquisition, else Study date and time of the image as a FHIR dateTime (no zone: a date)."""
    for d, _t in (("AcquisitionDate", "AcquisitionTime"), ("StudyDate", "StudyTime")):
        date = _text(ds, d)
        if len(date) == 8 and date.isdigit():
            return f"{date[:4]}-{date[4:6]}-{date[6:]}"
    return None


def build_bundle(source: Dataset, result: TriageResult, sr_uid: str, *, now: dt.datetime | None = None) -> bytes:
    """The transaction Bundle (JSON, validated) for one screened image."""
    from fhir.resources.R4B.bundle import Bundle

    now = now or dt.datetime.now(dt.UTC)
    study_uid = _text(source, "StudyInstanceUID")
    subject = {"identifier": {"value": _text(source, "PatientID")}} if _text(source, "PatientID") else None
    model = f"{result.model_name} {result.model_version} ({result.model_precision})"
    common: dict[str, Any] = {
        "status": "preliminary",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                  "code": "imaging", "display": "Imaging"}]}],
        "derivedFrom": [_ref_study(study_uid)] if study_uid else None,
        "issued": now.isoformat(),
        "method": {"text": f"AI triage model {model}"},
        "note": [{"text": f"{DISCLAIMER}: not for diagnostic use"}],
    }
    if subject:
        common["subject"] = subject
    eff = _effective(source)
    if eff:
        common["effectiveDateTime"] = eff
    finding = finding_code(result.predicted_class)
    prio_code, prio_text = PRIORITY_0027[result.priority]
    observations: list[tuple[str, dict[str, Any]]] = [
        ("class", {"code": {"coding": [{"system": DCM, "code": "121071", "display": "Finding"}],
                            "text": "Predicted class"},
                   "valueCodeableConcept": {"coding": [_coding(finding)], "text": result.predicted_class}}),
    ]
    for cls_name, p in result.probabilities.items():
        observations.append((f"p-{cls_name}", {
            "code": {"coding": [{"system": DCM, "code": "122157", "display": "Probability"}], "text": f"P({cls_name})"},
            "valueQuantity": {"value": float(p), "unit": "1", "system": UCUM, "code": "1"},
            "component": [{"code": {"coding": [{"system": DCM, "code": "121071", "display": "Finding"}]},
                           "valueCodeableConcept": {"coding": [_coding(finding_code(cls_name))]}}],
        }))
    observations.append(("priority", {
        "code": {"coding": [{"system": SCT, "code": "260870009", "display": "Priority"}]},
        "valueCodeableConcept": {"coding": [{"system": V2_0027, "code": prio_code, "display": prio_text},
                                            {"system": LOCAL, "code": result.priority.upper(),
                                             "display": result.priority.capitalize()}],
                                 "text": result.priority},
    }))
    entries: list[dict[str, Any]] = []
    refs: list[dict[str, str]] = []
    for key, body in observations:
        ident = uuid.uuid5(_NS, f"{sr_uid}/{key}")
        resource = {"resourceType": "Observation",
                    "identifier": [{"system": "urn:ietf:rfc:3986", "value": f"urn:uuid:{ident}"}],
                    **{k: v for k, v in common.items() if v is not None}, **body}
        entries.append(
            {
                "fullUrl": f"urn:uuid:{ident}",
                "resource": resource,
                "request": {"method": "PUT", "url": f"Observation?identifier=urn:ietf:rfc:3986|urn:uuid:{ident}"},
            }
        )
        refs.append({"reference": f"urn:uuid:{ident}"})
    report_id = uuid.uuid5(_NS, f"{sr_uid}/report")
    report: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "identifier": [{"system": DICOM_UID, "value": f"urn:oid:{sr_uid}"}],
        "status": "preliminary",
        "category": [{"coding": [{"system": V2_0074, "code": "RAD", "display": "Radiology"}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": "18748-4", "display": "Diagnostic imaging study"}],
                 "text": "AI chest X-ray triage"},
        "issued": now.isoformat(),
        "result": refs,
        "conclusion": f"{DISCLAIMER} (not for diagnostic use): {result.predicted_class}, priority {result.priority} "
                      f"({result.triage_reason}); model {model}",
    }
    if study_uid:
        report["imagingStudy"] = [_ref_study(study_uid)]
    if subject:
        report["subject"] = subject
    if eff:
        report["effectiveDateTime"] = eff
    accession = _text(source, "AccessionNumber")
    if accession:
        report["basedOn"] = [{"type": "ServiceRequest", "identifier": {
            "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}]},
            "value": accession}}]
    entries.insert(0, {"fullUrl": f"urn:uuid:{report_id}", "resource": report,
                       "request": {"method": "PUT",
                                   "url": f"DiagnosticReport?identifier={DICOM_UID}|urn:oid:{sr_uid}"}})
    bundle = Bundle.model_validate({"resourceType": "Bundle", "type": "transaction", "entry": entries})
    return bundle.model_dump_json(exclude_none=True).encode("utf-8")


def _outcome_text(body: bytes) -> str:
    """The first issue of an OperationOutcome, or the start of the body."""
    try:
        doc = json.loads(body)
        issue = (doc.get("issue") or [{}])[0]
        return str(issue.get("diagnostics") or issue.get("details", {}).get("text") or "")[:300]
    except (ValueError, AttributeError):
        return body[:200].decode("utf-8", "replace")


def _redact(text: str, payload: bytes) -> str:
    """The server's text without the patient ID we sent (servers echo identifiers; the text goes
    to the log and the delivery row, which carry no patient identifiers)."""
    try:
        report = json.loads(payload)["entry"][0]["resource"]
        pid = str(report["subject"]["identifier"]["value"])
    except (ValueError, KeyError, IndexError, TypeError):
        return text
    return text.replace(pid, "<patient>") if len(pid) > 1 else text


def post(dest: Destination, payload: bytes, timeout: float) -> str | None:
    """POST one transaction Bundle to the base URL: ``None`` when every entry was accepted (2xx),
    else an error text for the delivery row."""
    req = urllib.request.Request(dest.url.rstrip("/"), data=payload, method="POST", headers={
        "Content-Type": "application/fhir+json; charset=utf-8", "Accept": "application/fhir+json"})
    if dest.token:
        req.add_header("Authorization", f"Bearer {dest.token}")
    ctx = tls.client_context(dest.tls_ca, dest.tls_cert, dest.tls_key) if dest.url.startswith("https") else None
    where = f"{dest.name} (fhir {dest.url})"
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=ctx) as rsp:
            body = rsp.read()
    except urllib.error.HTTPError as exc:
        text = _redact(_outcome_text(exc.read()), payload)
        return f"{where}: HTTP {exc.code}" + (f" ({text})" if text else "")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return f"{where}: {getattr(exc, 'reason', None) or exc}"
    try:
        entries = json.loads(body).get("entry") or []
    except (ValueError, AttributeError):
        return f"{where}: the response is not a FHIR Bundle"
    bad = [str((e.get("response") or {}).get("status", "")) for e in entries
           if not str((e.get("response") or {}).get("status", "")).startswith("2")]
    if bad:
        return f"{where}: transaction entries not accepted: {', '.join(bad)}"
    return None
