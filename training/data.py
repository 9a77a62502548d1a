"""Manifest-defined data sets, patient-wise splits and radiograph augmentation.

Pixels: every image goes through ``worker.imaging`` exactly as the edge worker does it.  PNG/JPEG
files are decoded to 8-bit grey the way ``worker.imaging.load_image_file`` does; DICOM files
through ``decode`` + ``to_grey8`` (bit-identical to ``preprocess``).  The 8-bit grey image is
cached in memory (2,552 x 256 x 256 = 167 MB for the shared set) and each sample is made by
``worker.imaging.grey_to_input`` (crop, Pillow resize, normalise, replicate to 3 channels).
Without augmentation a sample is therefore bit-identical to ``load_image_file(path, spec)``
(PNG) or ``preprocess(ds, spec)`` (DICOM); tests check both.

Augmentation (training only) acts on the 8-bit grey image *before* ``grey_to_input``: a small
random affine (rotation, isotropic scale, shift; bilinear; borders filled with black, as
collimated film edges are), and brightness/contrast jitter.  No vertical flip (never seen in
practice); horizontal flip is off by default because it moves the heart to the right, and can be
enabled.  Randomness comes from a generator seeded by (seed, epoch, index), so a run is
reproducible regardless of batch order or resumption.
"""

from __future__ import annotations

import csv
import hashlib
import math
import os
from collections import Counter
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from worker import imaging
from worker.imaging import PreprocessSpec

__all__ = [
    "read_manifest",
    "manifest_sha256",
    "ManifestDataset",
    "Augment",
    "load_grey8",
    "labelled_rows",
    "class_weights",
    "split_rows",
    "cv_folds",
]

DICOM_SUFFIXES = (".dcm", ".dicom")


def read_manifest(path: str | os.PathLike) -> list[dict]:
    """Rows of a manifest CSV as dicts (all values strings), plus ``_path``: the absolute file path
    (``file`` is relative to the manifest's folder)."""
    root = Path(path).resolve().parent
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for col in ("file", "patient_id"):
        if rows and col not in rows[0]:
            raise ValueError(f"{path}: manifest has no {col!r} column")
    for r in rows:
        r["_path"] = str(root / r["file"])
    return rows


def manifest_sha256(path: str | os.PathLike) -> str:
    """sha256 of the manifest file's bytes (identifies the data a run was trained on)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read())
    return h.hexdigest()


def labelled_rows(rows: Sequence[dict], label: str) -> list[dict]:
    """Rows with a non-empty ``label`` column (``label4`` is empty for unspecified pneumonia)."""
    if rows and label not in rows[0]:
        raise ValueError(f"manifest has no {label!r} column")
    return [r for r in rows if (r.get(label) or "").strip()]


def load_grey8(path: str | os.PathLike, spec: PreprocessSpec = PreprocessSpec()) -> np.ndarray:
    """The 8-bit grey image the worker's pipeline produces before ``grey_to_input``.

    PNG/JPEG: EXIF orientation, then the worker's own conversion to grey (``imaging.pil_to_grey8``,
    the exact code inside ``load_image_file``).  DICOM: ``to_grey8(ds, decode(ds))`` (the worker's
    ``preprocess`` is bit-identical to ``grey_to_input`` of this)."""
    p = str(path)
    if p.lower().endswith(DICOM_SUFFIXES):
        import pydicom

        ds = pydicom.dcmread(p, force=True)
        return imaging.to_grey8(ds, imaging.decode(ds, spec), spec)
    with Image.open(p) as im:
        im = ImageOps.exif_transpose(im) or im
        return imaging.pil_to_grey8(im)


@dataclass(frozen=True)
class Augment:
    """Radiograph augmentation parameters (all on the 8-bit grey image)."""

    rotate_deg: float = 7.0
    scale: float = 0.08  # isotropic zoom in [1 - scale, 1 + scale]
    shift: float = 0.06  # fraction of the image size, each axis
    brightness: float = 0.10  # additive, fraction of 255
    contrast: float = 0.15  # multiplicative around the image mean, in [1 - c, 1 + c]
    hflip: float = 0.0  # probability; 0 by default (dextrocardia is not a training signal)

    @classmethod
    def from_config(cls, cfg: dict[str, Any] | None, strength: float = 1.0) -> Augment:
        base = cls(**(cfg or {}))
        return cls(
            rotate_deg=base.rotate_deg * strength,
            scale=base.scale * strength,
            shift=base.shift * strength,
            brightness=base.brightness * strength,
            contrast=base.contrast * strength,
            hflip=base.hflip,
        )

    def __call__(self, grey: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        h, w = grey.shape
        ang = math.radians(rng.uniform(-self.rotate_deg, self.rotate_deg))
        s = 1.0 + rng.uniform(-self.scale, self.scale)
        tx, ty = rng.uniform(-self.shift, self.shift, 2) * (w, h)
        # Inverse map (output -> input) about the centre, as PIL's AFFINE transform expects.
        cx, cy = w / 2.0, h / 2.0
        cos, sin = math.cos(ang) / s, math.sin(ang) / s
        a, b = cos, sin
        d, e = -sin, cos
        c = cx - a * (cx + tx) - b * (cy + ty)
        f = cy - d * (cx + tx) - e * (cy + ty)
        img = Image.fromarray(grey).transform((w, h), Image.Transform.AFFINE, (a, b, c, d, e, f), Image.Resampling.BILINEAR, fillcolor=0)
        out = np.asarray(img, dtype=np.float32)
        con = 1.0 + rng.uniform(-self.contrast, self.contrast)
        bri = rng.uniform(-self.brightness, self.brightness) * 255.0
        out = (out - out.mean()) * con + out.mean() + bri
        if self.hflip > 0 and rng.random() < self.hflip:
            out = out[:, ::-1]
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)


class ManifestDataset(torch.utils.data.Dataset):
    """Labelled rows of a manifest -> ``(float32 CHW tensor, label index)``.

    Args:
        rows: manifest rows (from :func:`read_manifest`; each needs ``_path`` or ``file`` + ``root``),
            or the manifest's path.
        split: keep only rows whose ``split`` column equals this (None: all rows).
        classes: class names in output order (index = label).
        label: label column, ``label3`` or ``label4``; rows with it empty are dropped.
        spec: the worker's :class:`PreprocessSpec` (size, mean/std, channels, crop).
        augment: an :class:`Augment` for training, None for evaluation.
        seed: augmentation seed; call :meth:`set_epoch` each epoch.
        cache: keep the 8-bit grey images in memory (loaded once, eagerly).
        group_column: optional grouping column (``age_group``), exposed as :attr:`groups`.
    """

    def __init__(
        self,
        rows: Sequence[dict] | str | os.PathLike,
        classes: Sequence[str],
        *,
        split: str | None = None,
        label: str = "label3",
        spec: PreprocessSpec = PreprocessSpec(),
        augment: Augment | None = None,
        seed: int = 0,
        cache: bool = True,
        group_column: str | None = "age_group",
        root: str | os.PathLike | None = None,
        grey_cache: MutableMapping[str, np.ndarray] | Mapping[str, np.ndarray] | None = None,
    ):
        if isinstance(rows, (str, os.PathLike)):
            rows = read_manifest(rows)
        if split is not None:
            rows = [r for r in rows if r.get("split") == split]
        self.classes = list(classes)
        self.index = {c: i for i, c in enumerate(self.classes)}
        self.rows = labelled_rows(rows, label)
        unknown = sorted({r[label] for r in self.rows} - set(self.index))
        if unknown:
            raise ValueError(f"labels not in classes {self.classes}: {unknown}")
        self.paths = [r.get("_path") or str(Path(root or ".") / r["file"]) for r in self.rows]
        self.labels = np.array([self.index[r[label]] for r in self.rows], dtype=np.int64)
        self.patients = [r.get("patient_id", "") for r in self.rows]
        self.groups = [(r.get(group_column) or "unknown") if group_column else "all" for r in self.rows]
        self.files = [r.get("file", p) for r, p in zip(self.rows, self.paths, strict=True)]
        self.spec = spec
        self.augment = augment
        self.seed = seed
        self.epoch = 0
        self._grey: list[np.ndarray] | None = None
        if cache:
            shared = grey_cache if grey_cache is not None else {}
            self._grey = []
            for p in self.paths:
                if p not in shared:
                    shared[p] = load_grey8(p, spec)
                self._grey.append(shared[p])

    def __len__(self) -> int:
        return len(self.rows)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def set_size(self, size: int) -> None:
        """Serve samples at ``size`` x ``size`` from now on (progressive resizing); the cached
        grey images stay at the largest size and are resized per sample."""
        if self.spec.size != (size, size):
            self.spec = replace(self.spec, size=(size, size))

    def grey(self, i: int) -> np.ndarray:
        return self._grey[i] if self._grey is not None else load_grey8(self.paths[i], self.spec)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        g = self.grey(i)
        if self.augment is not None:
            rng = np.random.default_rng([self.seed, self.epoch, i])
            g = self.augment(g, rng)
        x = imaging.grey_to_input(g, self.spec)
        return torch.from_numpy(np.ascontiguousarray(x)), int(self.labels[i])

    def class_counts(self) -> list[int]:
        c = Counter(self.labels.tolist())
        return [c.get(i, 0) for i in range(len(self.classes))]


def class_weights(counts: Sequence[int]) -> list[float]:
    """Balanced class weights ``n / (k * n_c)`` (sklearn's "balanced"); 0 for an absent class."""
    n, k = sum(counts), len(counts)
    return [n / (k * c) if c else 0.0 for c in counts]


# --------------------------------------------------------------------------------------------
# Splits (always by patient)
# --------------------------------------------------------------------------------------------


def split_rows(rows: Sequence[dict], column: str = "split") -> dict[str, list[dict]]:
    """The manifest's own patient-wise split: {"train": [...], "val": [...], "test": [...]}.

    Raises ValueError when a patient appears in two splits."""
    out: dict[str, list[dict]] = {}
    seen: dict[str, str] = {}
    for r in rows:
        s = r.get(column, "")
        pid = r.get("patient_id", "")
        if pid in seen and seen[pid] != s:
            raise ValueError(f"patient {pid!r} is in splits {seen[pid]!r} and {s!r}")
        seen[pid] = s
        out.setdefault(s, []).append(r)
    return out


def _sgkf(y: np.ndarray, groups: np.ndarray, n_splits: int, seed: int):
    from sklearn.model_selection import StratifiedGroupKFold

    return StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed).split(np.zeros(len(y)), y, groups)


def cv_folds(
    rows: Sequence[dict], label: str, *, folds: int = 5, val_fraction: float = 0.1, seed: int = 0
) -> list[dict[str, list[int]]]:
    """The paper's protocol, patient-wise: ``folds`` folds over ``rows`` (the training patients),
    stratified by class (sklearn ``StratifiedGroupKFold``, groups = patient_id); within each fold's
    training part, ``val_fraction`` of the patients (again stratified and grouped) for validation.

    Returns one dict per fold with index lists into ``rows``: ``train``, ``val``, ``test``.
    """
    y = np.array([r[label] for r in rows])
    groups = np.array([r["patient_id"] for r in rows])
    out = []
    for k, (trval, test) in enumerate(_sgkf(y, groups, folds, seed)):
        n_val_splits = max(2, int(round(1.0 / val_fraction)))
        inner = _sgkf(y[trval], groups[trval], n_val_splits, seed + 1000 + k)
        tr_i, va_i = next(iter(inner))
        out.append(
            {
                "train": sorted(int(i) for i in trval[tr_i]),
                "val": sorted(int(i) for i in trval[va_i]),
                "test": sorted(int(i) for i in test),
            }
        )
    return out
