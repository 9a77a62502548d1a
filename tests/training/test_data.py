"""Data: manifest reading, patient-wise folds, the same pixels as the worker, augmentation."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from support import make_image
from synth import CLASSES3

from training.data import (
    Augment,
    ManifestDataset,
    class_weights,
    cv_folds,
    labelled_rows,
    manifest_sha256,
    read_manifest,
    split_rows,
)
from worker import imaging
from worker.imaging import PreprocessSpec

SPEC = PreprocessSpec(size=(64, 64))


def _check_folds(rows: list[dict], folds: list[dict], label: str, k: int, tol: float) -> None:
    n = len(rows)
    tests = [i for f in folds for i in f["test"]]
    assert sorted(tests) == list(range(n)), "test folds must partition the pool"
    overall = Counter(r[label] for r in rows)
    for f in folds:
        parts = {p: {rows[i]["patient_id"] for i in f[p]} for p in ("train", "val", "test")}
        assert not parts["train"] & parts["val"], "patient in train and val"
        assert not parts["train"] & parts["test"], "patient in train and test"
        assert not parts["val"] & parts["test"], "patient in val and test"
        assert len(f["train"]) + len(f["val"]) + len(f["test"]) == n
        # stratified: each class's share of the test fold is close to its share overall
        c = Counter(rows[i][label] for i in f["test"])
        for cls, cnt in overall.items():
            assert abs(c[cls] / len(f["test"]) - cnt / n) < tol, (cls, c, overall)
    return None


def test_folds_patientwise_and_stratified_synthetic(tiny_manifest: Path) -> None:
    rows = labelled_rows(read_manifest(tiny_manifest), "label3")
    folds = cv_folds(rows, "label3", folds=4, val_fraction=0.25, seed=1)
    assert len(folds) == 4
    _check_folds(rows, folds, "label3", 4, tol=0.2)
    # deterministic
    assert folds == cv_folds(rows, "label3", folds=4, val_fraction=0.25, seed=1)


def test_folds_on_shared_data(shared_data: Path) -> None:
    """The paper's protocol on the real training patients: 5 folds, 10 % validation patients."""
    rows = [r for r in labelled_rows(read_manifest(shared_data), "label3") if r["split"] in ("train", "val")]
    folds = cv_folds(rows, "label3", folds=5, val_fraction=0.1, seed=0)
    _check_folds(rows, folds, "label3", 5, tol=0.03)
    for f in folds:
        trval_patients = {rows[i]["patient_id"] for i in f["train"] + f["val"]}
        val_patients = {rows[i]["patient_id"] for i in f["val"]}
        assert 0.07 < len(val_patients) / len(trval_patients) < 0.13


def test_split_rows_refuses_patient_in_two_splits() -> None:
    rows = [{"patient_id": "a", "split": "train"}, {"patient_id": "a", "split": "test"}]
    with pytest.raises(ValueError, match="patient"):
        split_rows(rows)


def test_manifest_reading(tiny_manifest: Path) -> None:
    rows = read_manifest(tiny_manifest)
    assert len(rows) == 48 and Path(rows[0]["_path"]).is_file()
    assert len(labelled_rows(rows, "label4")) < 48  # unspecified pneumonia has no label4
    assert len(manifest_sha256(tiny_manifest)) == 64
    assert class_weights([10, 30, 20]) == pytest.approx([2.0, 2 / 3, 1.0])


def test_dataset_matches_worker_load_image_file(tiny_manifest: Path) -> None:
    rows = read_manifest(tiny_manifest)
    ds = ManifestDataset(rows, CLASSES3, spec=SPEC)
    for i in (0, 17, 40):
        x, y = ds[i]
        assert x.dtype == torch.float32 and x.shape == (3, 64, 64)
        ref = imaging.load_image_file(ds.paths[i], SPEC)
        assert np.array_equal(x.numpy(), ref)
        assert CLASSES3[y] == ds.rows[i]["label3"]
    assert ds.groups[0] in ("adult", "child")
    test_only = ManifestDataset(tiny_manifest, CLASSES3, spec=SPEC, split="test", cache=False)
    assert len(test_only) == 12 and {r["split"] for r in test_only.rows} == {"test"}
    assert np.array_equal(test_only[0][0].numpy(), imaging.load_image_file(test_only.paths[0], SPEC))


def test_dicom_and_png_of_the_same_pixels_give_the_same_tensor(tmp_path: Path) -> None:
    """Training (PNG) and serving (DICOM through worker.imaging.preprocess) see the same input."""
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (120, 90), dtype=np.uint8)  # not square: the centre crop is exercised
    ds = make_image(pixels, bits=8)
    dcm = tmp_path / "a.dcm"
    ds.save_as(dcm, enforce_file_format=True)
    png = tmp_path / "a.png"
    Image.fromarray(pixels).save(png)
    rows = [{"file": "a.dcm", "_path": str(dcm), "label3": "normal", "patient_id": "p"},
            {"file": "a.png", "_path": str(png), "label3": "normal", "patient_id": "p"}]
    data = ManifestDataset(rows, CLASSES3, spec=SPEC, group_column=None)
    a, b = data[0][0].numpy(), data[1][0].numpy()
    assert np.array_equal(a, b)
    import pydicom

    assert np.array_equal(a, imaging.preprocess(pydicom.dcmread(dcm), SPEC))


def test_augmentation(tiny_manifest: Path) -> None:
    rows = read_manifest(tiny_manifest)
    ds = ManifestDataset(rows, CLASSES3, spec=SPEC, augment=Augment(), seed=5)
    a1, a2 = ds[3][0], ds[3][0]
    assert torch.equal(a1, a2), "same seed/epoch/index -> same augmentation"
    ds.set_epoch(1)
    assert not torch.equal(a1, ds[3][0]), "a new epoch draws new parameters"
    grey = ds.grey(3)
    # zero strength is the identity
    assert np.array_equal(Augment.from_config({}, 0.0)(grey, np.random.default_rng(0)), grey)
    # a small transform: the image stays close to the original (no flips)
    out = Augment()(grey, np.random.default_rng(0)).astype(float)
    flipped = grey[::-1].astype(float)
    assert np.abs(out - grey).mean() < np.abs(out - flipped).mean()
