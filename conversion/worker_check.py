"""The last gate: the worker itself loads the result and scores the test split its own way.

"Its own way" means: ``worker.engine.Engine(model_dir)`` (card validated, ``.bin`` sha256
verified, precision taken from the card) and the worker's DICOM path: each test PNG is wrapped
in an 8-bit MONOCHROME2 Secondary Capture data set in memory and goes through
``worker.imaging.preprocess(ds, PreprocessSpec.from_card(card))``, the function the pipeline
calls on received objects, with the spec read back from the written card (not from the
checkpoint).  Same pixels, same numbers: the metrics must match the card's within the gate.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from worker import imaging
from worker.engine import Engine
from worker.imaging import PreprocessSpec

log = logging.getLogger(__name__)

__all__ = ["grey8_dicom", "worker_predictions"]

_SC = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage


def grey8_dicom(grey: np.ndarray) -> Dataset:
    """An in-memory 8-bit MONOCHROME2 chest Secondary Capture holding ``grey`` (uint8, 2-D)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = _SC
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.Modality = "OT"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.Rows, ds.Columns = (int(v) for v in grey.shape)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(grey, dtype=np.uint8).tobytes()
    return ds


def _png_grey8(path: Path) -> np.ndarray:
    # The same decode as worker.imaging.load_image_file (EXIF orientation, then to 8-bit grey).
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im) or im
        return imaging.pil_to_grey8(im)  # one decode for PNGs, owned by worker.imaging


def worker_predictions(
    model_dir: str | os.PathLike[str], image_root: Path, files: Sequence[str], reference_x: np.ndarray | None = None
) -> tuple[np.ndarray, dict[str, Any]]:
    """Probabilities from the worker's Engine through the DICOM preprocessing path.

    Returns ``(probs, info)``; ``info`` records the engine's precision/hint and, when
    ``reference_x`` (the conversion's own tensors for the same files) is given, the max
    absolute difference between the two preprocessing paths' pixels.
    """
    engine = Engine(model_dir)
    spec = PreprocessSpec.from_card(engine.card.raw)
    c, (h, w) = spec.channels, spec.size
    x = np.empty((len(files), c, h, w), dtype=np.float32)
    for i, f in enumerate(files):
        x[i] = imaging.preprocess(grey8_dicom(_png_grey8(image_root / f)), spec)
    info: dict[str, Any] = {
        "engine": repr(engine),
        "precision": engine.precision,
        "inference_precision": engine.inference_precision,
        "path": "PNG -> 8-bit MONOCHROME2 DICOM -> worker.imaging.preprocess -> worker.engine.Engine",
    }
    if reference_x is not None:
        info["max_pixel_diff_vs_conversion"] = float(np.abs(x - reference_x).max()) if x.size else 0.0
    probs = engine.infer(x)
    return probs, info
