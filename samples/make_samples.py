"""Build the sample studies in this folder from ``../shared/data/cxr`` (run once; the output is committed).

    python samples/make_samples.py [--manifest ../shared/data/cxr/manifest.csv] [--out samples]

Which images: only rows of the manifest's held-out **test** split (never seen in training) whose
licence allows redistribution with credit (CC BY 3.0/4.0, plain CC BY, NIH ChestX-ray14's
"no restriction"; never NC, ND, "unknown" or ambiguous rows).  Within each (class, source) cell
the rows are taken in the order of their file names (which are hashes of the source path, so
the order is arbitrary but fixed).  The choice is made before and independently of any model's
prediction: the samples are not picked to make the model look good.

What they are: the data set's real pixels (8-bit, 256 x 256: the collection's own downsampling)
scaled linearly to 12 bits stored in 16 (as CR/DX readers produce), with a VOI window that maps
them back onto the 8-bit values the model trained on, wrapped in realistic CR or DX headers
(PS3.3 A.2 CR Image IOD, A.26 DX Image IOD "For Presentation") with synthetic patient names and
IDs, some MONOCHROME1 (stored inverted), some JPEG 2000 lossless, some JPEG lossless (process 14,
selection value 1; encoded with dcmtk ``dcmcjpeg`` when it is installed).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
)
from pydicom.uid import (
    ComputedRadiographyImageStorage as CRImageStorage,
)

#: (class, source, licence prefixes allowed, how many, age note). Order = file numbering.
PLAN = [
    ("normal", "lecuong1502/BTL_Machine_Learning", ("CC BY 4.0",), 2),
    ("normal", "muhammedtalo/COVID-19", ("CC0-like",), 2),
    ("pneumonia", "lecuong1502/BTL_Machine_Learning", ("CC BY 4.0",), 2),
    ("pneumonia", "muhammedtalo/COVID-19", ("CC0-like",), 1),
    ("pneumonia", "ieee8023/covid-chestxray-dataset", ("CC BY",), 1),
    ("covid19", "ieee8023/covid-chestxray-dataset", ("CC BY 4.0",), 2),
    ("covid19", "ieee8023/covid-chestxray-dataset", ("CC BY 3.0",), 2),
]
#: Per sample number (1-based): modality, photometric interpretation, transfer syntax.
FORMS = {
    1: ("CR", "MONOCHROME2", "explicit"), 2: ("DX", "MONOCHROME1", "jpeg2000"),
    3: ("DX", "MONOCHROME2", "jpeg-lossless"), 4: ("CR", "MONOCHROME1", "explicit"),
    5: ("CR", "MONOCHROME2", "jpeg2000"), 6: ("DX", "MONOCHROME2", "explicit"),
    7: ("CR", "MONOCHROME1", "jpeg-lossless"), 8: ("DX", "MONOCHROME2", "jpeg2000"),
    9: ("CR", "MONOCHROME2", "explicit"), 10: ("DX", "MONOCHROME1", "explicit"),
    11: ("CR", "MONOCHROME2", "jpeg-lossless"), 12: ("DX", "MONOCHROME2", "jpeg2000"),
}
AGE = {"lecuong1502/BTL_Machine_Learning": "003Y", "muhammedtalo/COVID-19": "054Y"}
CREDIT = {
    "lecuong1502/BTL_Machine_Learning": (
        "Kermany D, Zhang K, Goldbaum M. Labeled Optical Coherence Tomography (OCT) and Chest X-Ray Images "
        "for Classification. Mendeley Data v2, 2018, doi:10.17632/rscbjbr9sj.2 (CC BY 4.0); via the GitHub "
        "copy lecuong1502/BTL_Machine_Learning"
    ),
    "muhammedtalo/COVID-19": (
        "Wang X et al. ChestX-ray8, CVPR 2017; NIH Clinical Center ChestX-ray14 (no restriction on use, "
        "citation requested); via muhammedtalo/COVID-19 (Ozturk et al. 2020)"
    ),
    "ieee8023/covid-chestxray-dataset": (
        "Cohen JP, Morrison P, Dao L et al. COVID-19 image data collection, arXiv:2006.11988, 2020 (per-image"
        " licence as listed); snapshot of 22 Jun 2020 via hida6/covid-chestxray-dataset"
    ),
}
#: A UID root for these synthetic objects: 2.25 + a fixed integer (PS3.5 B.2, UUID-derived).
UID_ROOT = "2.25."


def uid(*parts: str) -> str:
    """A deterministic UID under 2.25 (PS3.5 B.2): the same sample always gets the same UIDs."""
    return UID_ROOT + str(int(hashlib.sha256("|".join(("cxr-triage-samples", *parts)).encode()).hexdigest()[:30], 16))


def choose(manifest: Path) -> list[dict]:
    rows = list(csv.DictReader(manifest.open()))
    chosen: list[dict] = []
    for label, source, licences, n in PLAN:
        cell = sorted(
            (r for r in rows if r["split"] == "test" and r["label3"] == label and r["source"] == source
             and any(r["license"].startswith(p) for p in licences)
             and "NC" not in r["license"] and "ND" not in r["license"]),
            key=lambda r: r["file"],
        )
        if len(cell) < n:
            raise SystemExit(f"only {len(cell)} rows for {label} / {source} / {licences}")
        chosen.extend(cell[:n])
    return chosen


def build(row: dict, number: int, root: Path) -> Dataset:
    modality, photometric, _ = FORMS[number]
    grey = np.asarray(Image.open(root / row["file"]).convert("L"), dtype=np.uint16)
    stored = np.rint(grey.astype(np.float64) * 4095.0 / 255.0).astype(np.uint16)
    if photometric == "MONOCHROME1":
        stored = (4095 - stored).astype(np.uint16)
    key = f"sample{number:02d}"
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY"] if modality == "CR" else ["ORIGINAL", "PRIMARY", ""]
    ds.SOPClassUID = CRImageStorage if modality == "CR" else DigitalXRayImageStorageForPresentation
    ds.SOPInstanceUID = uid(key, "instance")
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = "20261126"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = (
        f"{8 + number // 2:02d}{(number * 7) % 60:02d}00"
    )
    ds.AccessionNumber = f"DEMO{number:04d}"
    ds.Modality = modality
    ds.Manufacturer = "cxr-triage sample builder"
    ds.InstitutionName = "Demo Hospital"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "XR CHEST 1 VIEW"
    ds.SeriesDescription = "CHEST PA" if number % 3 else "CHEST AP"
    ds.PatientName = f"DEMO^SAMPLE{number:02d}"
    ds.PatientID = f"DEMO-{number:04d}"
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.PatientAge = AGE.get(row["source"], "")
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "synthetic demographics; pixels from a public research collection"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA" if number % 3 else "AP"
    ds.PatientOrientation = ["R", "F"] if ds.ViewPosition == "PA" else ["L", "F"]
    ds.StudyInstanceUID = uid(key, "study")
    ds.SeriesInstanceUID = uid(key, "series")
    ds.StudyID = f"{number}"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    # The data set's images were downsampled to 256 px; about 35 cm across gives this spacing.
    ds.ImagerPixelSpacing = ["1.37", "1.37"]
    ds.WindowCenter = "2048"
    ds.WindowWidth = "4096"
    ds.RescaleIntercept = "0"
    ds.RescaleSlope = "1"
    ds.LossyImageCompression = "00"
    ds.BurnedInAnnotation = "NO"
    if modality == "CR":
        ds.RescaleType = "US"
    else:  # DX Image / Series / Detector / Anatomy / Positioning modules (PS3.3 C.8.11)
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.RescaleType = "US"
        ds.PixelIntensityRelationship = "LOG"
        ds.PixelIntensityRelationshipSign = 1
        ds.PresentationLUTShape = "INVERSE" if photometric == "MONOCHROME1" else "IDENTITY"
        ds.DetectorType = "SCINTILLATOR"
        ds.ImageLaterality = "U"
        region = Dataset()
        region.CodeValue, region.CodingSchemeDesignator, region.CodeMeaning = "43799004", "SCT", "Chest"
        ds.AnatomicRegionSequence = Sequence([region])
        view = Dataset()
        code = ("399348003", "postero-anterior") if ds.ViewPosition == "PA" else ("399182002", "antero-posterior")
        view.CodeValue, view.CodingSchemeDesignator, view.CodeMeaning = code[0], "SCT", code[1]  # CID 4010
        view.ViewModifierCodeSequence = Sequence()
        ds.ViewCodeSequence = Sequence([view])
        ds.PositionerType = ""
        ds.AcquisitionContextSequence = Sequence()
        ds.DetectorID = ""
        ds.DetectorManufacturerName = ""
    ds.PixelData = stored.tobytes()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    ds.preamble = b"\0" * 128
    return ds


def write(ds: Dataset, number: int, path: Path) -> str:
    """Write with the planned transfer syntax; returns the one actually used."""
    syntax = FORMS[number][2]
    if syntax == "jpeg2000":
        ds.compress(JPEG2000Lossless)
    ds.save_as(path, enforce_file_format=True)
    if syntax == "jpeg-lossless":
        if shutil.which("dcmcjpeg") is None:
            print(f"{path.name}: dcmcjpeg not found (Debian: dcmtk), kept uncompressed", file=sys.stderr)
            return str(ExplicitVRLittleEndian)
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "out.dcm"
            subprocess.run(["dcmcjpeg", "+e1", str(path), str(out)], check=True)
            shutil.move(out, path)
        return "1.2.840.10008.1.2.4.70"
    return str(ds.file_meta.TransferSyntaxUID)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--manifest", type=Path, default=Path("../shared/data/cxr/manifest.csv"))
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    a = p.parse_args(argv)
    rows = choose(a.manifest)
    fields = ["file", "expected", "age_group", "modality", "photometric", "transfer_syntax", "source", "source_path",
              "license", "manifest_file", "credit"]
    listing = []
    for number, row in enumerate(rows, 1):
        ds = build(row, number, a.manifest.parent)
        name = f"sample{number:02d}.dcm"
        ts = write(ds, number, a.out / name)
        listing.append({
            "file": name, "expected": row["label3"], "age_group": row["age_group"], "modality": FORMS[number][0],
            "photometric": FORMS[number][1], "transfer_syntax": ts, "source": row["source"],
            "source_path": row["source_path"], "license": row["license"], "manifest_file": row["file"],
            "credit": CREDIT[row["source"]],
        })
        print(f"{name}: {row['label3']:<9} {row['age_group']:<7} {FORMS[number][0]} {FORMS[number][1]} {ts}")
    with (a.out / "samples.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(listing)
    return 0


if __name__ == "__main__":
    sys.exit(main())
