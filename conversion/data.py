"""Manifest rows -> preprocessed arrays, with the worker's own preprocessing (no torch).

Every image the conversion stage looks at (calibration, parity, test and validation metrics)
goes through :func:`worker.imaging.load_image_file` with a :class:`worker.imaging.PreprocessSpec`
built from the checkpoint's ``input`` and ``preprocessing`` blocks, i.e. the very pixels the
worker computes from the card that this stage writes.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from worker.imaging import PreprocessSpec, load_image_file

log = logging.getLogger(__name__)

__all__ = ["Split", "label_column", "load_split", "read_manifest", "sha256_file", "spec_from_checkpoint"]

_REQUIRED = ("file", "split")


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def spec_from_checkpoint(ckpt: Mapping[str, Any]) -> PreprocessSpec:
    """The worker's PreprocessSpec for a checkpoint (its ``input`` and ``preprocessing`` blocks)."""
    return PreprocessSpec.from_card({"input": ckpt.get("input", {}), "preprocessing": ckpt.get("preprocessing", {})})


def read_manifest(path: str | os.PathLike[str]) -> list[dict[str, str]]:
    """Rows of a manifest CSV (columns file, label3, label4, patient_id, split, age_group, ...)."""
    p = Path(path)
    with open(p, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in _REQUIRED if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{p}: manifest lacks column(s) {', '.join(missing)}")
        return list(reader)


def label_column(rows: Sequence[Mapping[str, str]], classes: Sequence[str]) -> str:
    """``label3`` or ``label4``: the column whose values name the checkpoint's classes."""
    for col in ("label3", "label4"):
        if rows and col in rows[0]:
            values = {r[col] for r in rows if r.get(col)}
            if values and values <= set(classes):
                return col
    raise ValueError(
        f"no manifest column (label3/label4) holds the checkpoint's classes {list(classes)}"
    )


@dataclass
class Split:
    """Preprocessed images of one manifest split: ``x`` (N, C, H, W) float32, ``y`` (N,) class indices."""

    name: str
    x: np.ndarray
    y: np.ndarray
    files: list[str]
    age_groups: list[str]
    sources: list[str] = field(default_factory=list)  # manifest ``source`` column (collection), "unknown" if absent

    def __len__(self) -> int:
        return int(self.y.size)


def _stratified(rows: list[dict[str, str]], col: str, limit: int, seed: int) -> list[dict[str, str]]:
    """``limit`` rows, drawn per label in proportion (round-robin), reproducibly."""
    rng = random.Random(seed)
    by_label: dict[str, list[dict[str, str]]] = {}
    for r in sorted(rows, key=lambda r: r["file"]):
        by_label.setdefault(r[col], []).append(r)
    for lst in by_label.values():
        rng.shuffle(lst)
    out: list[dict[str, str]] = []
    queues = [by_label[k] for k in sorted(by_label)]
    while len(out) < limit and any(queues):
        for q in queues:
            if q and len(out) < limit:
                out.append(q.pop())
    return out


def load_split(
    manifest: str | os.PathLike[str],
    split: str,
    classes: Sequence[str],
    spec: PreprocessSpec,
    *,
    limit: int | None = None,
    seed: int = 0,
    rows: Sequence[Mapping[str, str]] | None = None,
) -> Split:
    """Load (a stratified subset of) one split of a manifest through ``load_image_file``.

    Rows whose label is not one of ``classes`` (e.g. an empty ``label4``) are left out.  With
    ``limit`` a reproducible class-stratified subset is drawn (seeded), otherwise every row of
    the split in manifest order.
    """
    mpath = Path(manifest)
    all_rows = list(rows) if rows is not None else read_manifest(mpath)
    col = label_column(all_rows, classes)
    chosen = [r for r in all_rows if r["split"] == split and r.get(col) in classes]
    if not chosen:
        raise ValueError(f"{mpath}: no {split!r} rows with a {col} in {list(classes)}")
    if limit is not None and limit < len(chosen):
        chosen = _stratified(chosen, col, limit, seed)
    root = mpath.parent
    c, (h, w) = spec.channels, spec.size
    x = np.empty((len(chosen), c, h, w), dtype=np.float32)
    for i, r in enumerate(chosen):
        x[i] = load_image_file(root / r["file"], spec)
    y = np.array([list(classes).index(r[col]) for r in chosen], dtype=np.int64)
    log.info("loaded %d %s images from %s (labels: %s)", len(chosen), split, mpath, col)
    return Split(split, x, y, [r["file"] for r in chosen], [r.get("age_group") or "unknown" for r in chosen],
                 [r.get("source") or "unknown" for r in chosen])
