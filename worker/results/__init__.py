"""Screening results as DICOM objects for PACS: one Structured Report per screened image and an
optional Secondary Capture.  Builds datasets only; sending them is someone else's job (no network).

Structured Report
=================

SOP class: **Comprehensive SR** (1.2.840.10008.5.1.4.1.1.88.33, PS3.3 A.35.3), built with
highdicom's :class:`highdicom.sr.ComprehensiveSR`.  Why not the others highdicom offers:

* Enhanced SR (88.22, A.35.2) would carry this content too (no spatial coordinates), but it has
  narrower PACS/viewer support than Comprehensive SR and gives us nothing we need.
* Comprehensive 3D SR (88.34, A.35.13) exists for SCOORD3D; a classifier has no coordinates.  The
  IHE AI Results (AIR) profile lists Comprehensive 3D SR as its SR IOD, so a site that tests
  against AIR strictly may want it: the content tree below is valid in either class, and the
  switch is the one constant ``_SR_CLASS``.
* Comprehensive SR is the common SOP class for TID 1500 measurement reports: DICOM's own
  examples, highdicom's and dcmqi's, and it is accepted by practically every PACS.

Content tree: TID 1500 "Measurement Report" (PS3.16 A.1500), one report per source image::

    CONTAINER (126000, DCM, "Imaging Measurement Report")              TID 1500
      HAS CONCEPT MOD  Language of Content = English (eng, RFC5646)    TID 1204
      HAS OBS CONTEXT  Observer Type = Device; Device Observer UID/Name/Manufacturer/Model
                                                                       TID 1002/1004
      HAS CONCEPT MOD  Procedure Reported = (413815006, SCT, "Chest imaging")
      CONTAINS Image Library > Image Library Group > IMAGE the source   TID 1600/1601/1602
      CONTAINS Imaging Measurements                                    (126010, DCM)
        CONTAINS Measurement Group, one per model class, card order     TID 1501
          HAS OBS CONTEXT Tracking Identifier / Tracking Unique Identifier
          CONTAINS CODE Finding (121071, DCM) = the class's code (what this group measures)
          HAS CONCEPT MOD Algorithm Name / Version / Parameters           TID 4019
                          (parameters: "sha256=<model .bin sha256>", "precision=<f32|...>")
          CONTAINS IMAGE  Source image for measurement group (260753009, SCT "Source")
          CONTAINS NUM    Probability (122157, DCM) = P(class), unit ("1", UCUM, "no units")
          CONTAINS NUM    Threshold Value (122411, DCM) = card threshold   (thresholded classes)
          CONTAINS CODE   Predicted class (local) = Yes/No (373066001/373067005, SCT)
      CONTAINS Qualitative Evaluations (C0034375, UMLS)                 TID 1500 row 12
        CONTAINS CODE Finding (121071, DCM) = the predicted class     <- the coded finding
        CONTAINS CODE Priority (260870009, SCT) = Urgent | Routine     (local codes)
        CONTAINS TEXT Triage reason (local) = e.g. "P(covid19)=0.91 >= 0.50"
        CONTAINS TEXT Comment (121106, DCM) = "AI triage - not for diagnosis"

What highdicom builds and what we build ourselves, and why:

* highdicom: the SOP instance (SR Document General/Content, General Series, Equipment modules),
  the evidence (CurrentRequestedProcedureEvidenceSequence, SR Document General Module, PS3.3
  C.17.2, from ``evidence``), the TID 1500 root, observation context, TID 1501 groups, TID 4019
  algorithm identification, measurements and qualitative evaluations, and
  ContributingEquipmentSequence.
* pydicom / highdicom content items by hand:

  - the Image Library (TID 1600): highdicom's :class:`~highdicom.sr.ImageLibrary` requires
    PatientOrientation and ImagerPixelSpacing on every CR/DX image (TID 1603 descriptors) and
    raises without them; real chest images often lack both.  We emit the TID 1602/1603
    descriptors that the source actually has.
  - the root "Qualitative Evaluations" container: highdicom's MeasurementReport only supports
    imaging measurements (rows 6-9 of TID 1500), not row 12.
  - the Patient and Study modules (PS3.3 C.7.1.1, C.7.2.1, C.7.2.2): copied attribute by
    attribute from the source, type 2 attributes written empty when the source lacks them.
    highdicom would copy them itself, but it puts a Patient's Name it dislikes (no caret, e.g.
    "Anonymized") verbatim into a warning (0.28; a log record in older versions, and one with
    ``logging.captureWarnings``), rejects Patient's Sex values outside M/F/O, and reads type 2
    attributes as if always present.
    highdicom is therefore given a header-only *stand-in* for the source that holds the UIDs
    and image description but no patient identity, and we write the identity afterwards.

Speed: template plus per-image patch
------------------------------------

Built with highdicom alone (:func:`_build_sr_reference`) an SR costs about 100 ms: highdicom
validates every content item, deep-copies and re-parses the whole tree and searches it for
evidence.  :func:`build_sr` produces the *same* dataset (every element: tag, VR, value and its
Python type; file meta; preamble; encoded bytes) in about 2-3 ms: what depends only on the model
and on the source's SOP class and modality is built once with highdicom as a template (a small
LRU cache, read only, copied per image); the per-image parts (UIDs, dates and times, Patient and
Study, evidence, tracking UIDs, source references, probabilities, Yes/No codes, Image Library,
Qualitative Evaluations, the source's acquisition equipment) are written with plain pydicom the
way highdicom's classes write them.  tests/worker/test_results.py compares the two builders on
many inputs and the real sample files, so a highdicom upgrade that changes its output shows up
as a failing test instead of a silent difference.  The first SR per model and source SOP class
in a process costs one reference build (plus highdicom's own first-use set-up).

The template's items that no SR changes are frozen into read-only, pre-encoded items
(:mod:`worker.results.encoding`) shared by every SR; :func:`encode` copies their bytes into the
file instead of encoding them again, the same bytes as pydicom's ``save_as`` in a fraction of the
time.  Changing a shared item raises ``ReadOnlyItemError``; ``copy.deepcopy`` gives an editable copy.

Codes
-----

Findings (SNOMED CT): normal 17621005 "Normal"; pneumonia 233604007 "Pneumonia"; bacterial
pneumonia 53084003; viral pneumonia 75570004; covid19 840539006 "COVID-19" (its fully specified
name "Disease caused by severe acute respiratory syndrome coronavirus 2" is 65 characters, over
the 64 of Code Meaning, LO).  Any other class name (other models) gets a code of the local
scheme ``99CXRTRIAGE`` (a "99" prefix marks a private designator, PS3.16 chapter 8), declared in
CodingSchemeIdentificationSequence (PS3.3 C.12.1).  Triage priority values, "Triage reason" and
"Predicted class" are local codes too: no standard code was verifiable offline for them.

Probabilities use UCUM ``1`` ("no units"): the UCUM unit of unity, valid in every UCUM parser
and used by DICOM for dimensionless ratios; ``{probability}`` is also valid UCUM (an annotation,
equal to 1) but some consumers do not parse annotations, and the concept name "Probability"
already says what the number is.

ContributingEquipmentSequence (SOP Common, PS3.3 C.12.1): Manufacturer "cxr-triage",
Manufacturer's Model Name = model name, Software Versions = model version, Purpose of Reference
(109102, DCM, "Processing Equipment") -- the CID 7005 code for equipment that processed the data
to make this object; 109103 "Modifying Equipment" would claim we modified an existing
instance, 109104 is "De-identifying Equipment".  highdicom adds an item for the source's acquisition equipment
(109101) and one for itself (109102).

UIDs
----

:func:`result_uids` derives every UID as ``2.25.<UUID as integer>`` (PS3.5 B.2) from a
name-based UUID (RFC 4122 version 5) of the inputs, so a re-run or re-send yields the same
objects (a PACS replaces rather than duplicates) and a new model version new ones.  Note
``pydicom.uid.generate_uid(prefix=None, entropy_srcs=...)`` cannot do this: with ``prefix=None``
pydicom 3 ignores ``entropy_srcs`` and returns a random UUID; and it joins entropy strings
without a separator, so ``["ab", "c"]`` and ``["a", "bc"]`` would collide.

Secondary Capture
=================

:func:`build_sc` writes a Secondary Capture Image (PS3.3 A.8.1) with pydicom directly: a
downscaled copy of the source (long side <= 1024 px) under a burned-in banner.  highdicom's
``SCImage`` does not fit: it hard-codes ConversionType DI (we are a workstation, WSD), rejects
valid caret-less patient names such as "Anonymized", and requires a patient orientation that
sources often lack.

The package, one builder per module: ``common`` (the result, codes, UIDs and the header every
object copies from its source), ``sr_reference`` (the SR built with highdicom alone), ``sr`` (the
fast path, equal to it element for element), ``encoding`` (the SR's file encoding with its
pre-encoded items spliced in, same bytes as pydicom's), ``sc`` (the Secondary Capture). The names other
modules use are re-exported here: ``from worker.results import build_sr, TriageResult``.
"""

from __future__ import annotations

from worker.results.common import (
    DISCLAIMER,
    LOCAL_SCHEME,
    MANUFACTURER,
    PRECISIONS,
    SC_MAX_SIDE,
    SC_SERIES_NUMBER,
    SERIES_DESCRIPTION,
    SR_SERIES_NUMBER,
    ResultUIDs,
    TriageResult,
    finding_code,
    result_uids,
)
from worker.results.encoding import encode
from worker.results.sc import build_sc
from worker.results.sr import build_sr

__all__ = [
    "DISCLAIMER",
    "LOCAL_SCHEME",
    "MANUFACTURER",
    "PRECISIONS",
    "SC_MAX_SIDE",
    "SC_SERIES_NUMBER",
    "SERIES_DESCRIPTION",
    "SR_SERIES_NUMBER",
    "ResultUIDs",
    "TriageResult",
    "build_sc",
    "build_sr",
    "encode",
    "finding_code",
    "result_uids",
]
