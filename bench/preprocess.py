"""Benchmark: decode + preprocess of a synthetic 2000x2500 16-bit CR on one CPU core.

Run from the repository root:  python bench/preprocess.py [--runs 20]
Prints a table and writes bench/out/preprocess.json.  Not a test: timings depend on the machine.

Cases (all on the same in-memory data set, Explicit VR Little Endian, BitsStored 12):
  window      MONOCHROME1 with Window Center/Width: the usual CR case
  minmax      no VOI in the header: robust percentiles from a subsampled histogram
  composed    grey_to_input(to_grey8(decode(ds))): the public steps, no crop-before-LUT
  pydicom     pydicom apply_modality_lut + apply_voi_lut on the full image, then the same
              crop/resize/normalise (the approach this module replaces), for reference
Also: dcmread of the encoded file from memory, and the stages of "composed".
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import PIL
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

REPO = Path(__file__).resolve().parents[1]

from worker import imaging  # noqa: E402

ROWS, COLS = 2500, 2000  # portrait 35x43 cm cassette, ~0.17 mm pixels
TARGET_MS = 8.0


def synthetic_cr(*, window: bool = True) -> Dataset:
    """A 12-bit CR-like image: smooth anatomy-ish background, noise, a collimation border."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:ROWS, 0:COLS].astype(np.float32)
    body = 1800 + 900 * np.exp(-(((xx - COLS / 2) / (COLS / 3)) ** 2)) - 500 * (yy / ROWS)
    img = body + rng.normal(0, 60, (ROWS, COLS)).astype(np.float32)
    img[:80, :] = img[-80:, :] = 4000  # collimator
    px = np.clip(img, 0, 4095).astype(np.uint16)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.Modality = "CR"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.Rows, ds.Columns = px.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = 1, 0
    if window:
        ds.WindowCenter, ds.WindowWidth = 2100, 2600
    ds.PixelData = px.tobytes()
    return ds


def timed(fn: Callable[[], object], runs: int) -> dict[str, float]:
    fn()  # warm caches (lookup tables, decoders)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return {
        "median_ms": round(statistics.median(times), 2),
        "min_ms": round(times[0], 2),
        "p90_ms": round(times[min(len(times) - 1, int(0.9 * len(times)))], 2),
    }


def pydicom_reference(ds: Dataset, spec: imaging.PreprocessSpec) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    arr = apply_voi_lut(apply_modality_lut(imaging.decode(ds, spec), ds), ds)
    lo, hi = float(arr.min()), float(arr.max())
    g = ((arr - lo) * (255.0 / max(hi - lo, 1e-9))).astype(np.uint8)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        g = 255 - g
    return imaging.grey_to_input(g, spec)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "preprocess.json")
    args = ap.parse_args(argv)

    if hasattr(os, "sched_setaffinity"):  # one core, as on a busy edge box
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})

    spec = imaging.PreprocessSpec()
    ds_w, ds_m = synthetic_cr(window=True), synthetic_cr(window=False)
    buf = io.BytesIO()
    ds_w.save_as(buf, enforce_file_format=True)
    encoded = buf.getvalue()
    assert np.array_equal(
        imaging.preprocess(ds_w, spec),
        imaging.grey_to_input(imaging.to_grey8(ds_w, imaging.decode(ds_w, spec), spec), spec),
    )

    stored = imaging.decode(ds_w, spec)
    grey = imaging.to_grey8(ds_w, stored, spec)
    cases = {
        "preprocess (window, MONOCHROME1)": lambda: imaging.preprocess(ds_w, spec),
        "preprocess (robust min-max)": lambda: imaging.preprocess(ds_m, spec),
        "composed decode->to_grey8->grey_to_input": lambda: imaging.grey_to_input(
            imaging.to_grey8(ds_w, imaging.decode(ds_w, spec), spec), spec
        ),
        "  stage decode": lambda: imaging.decode(ds_w, spec),
        "  stage to_grey8 (full frame)": lambda: imaging.to_grey8(ds_w, stored, spec),
        "  stage grey_to_input": lambda: imaging.grey_to_input(grey, spec),
        "dcmread from memory (not in target)": lambda: pydicom.dcmread(io.BytesIO(encoded)),
        "pydicom apply_* reference": lambda: pydicom_reference(ds_w, spec),
    }
    results = []
    for name, fn in cases.items():
        r = timed(fn, args.runs)
        results.append({"case": name.strip(), **r})

    width = max(len(n) for n in cases)
    print(f"decode+preprocess, {COLS}x{ROWS} 16-bit (12 stored) CR, median of {args.runs} runs, 1 core")
    print(f"{'case':<{width}}  {'median ms':>9}  {'min ms':>7}  {'p90 ms':>7}")
    for name, r in zip(cases, results, strict=True):
        print(f"{name:<{width}}  {r['median_ms']:>9.2f}  {r['min_ms']:>7.2f}  {r['p90_ms']:>7.2f}")
    print(f"target: <= {TARGET_MS} ms for preprocess")

    report = {
        "benchmark": "preprocess",
        "image": {"rows": ROWS, "columns": COLS, "bits_allocated": 16, "bits_stored": 12, "modality": "CR"},
        "runs": args.runs,
        "target_ms": TARGET_MS,
        "spec": {"size": list(spec.size), "crop": spec.crop, "voi": spec.voi},
        "results": results,
        "environment": {
            "cpu": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "pillow": PIL.__version__,
            "pydicom": pydicom.__version__,
            "cores_used": 1,
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out.relative_to(REPO) if args.out.is_relative_to(REPO) else args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
