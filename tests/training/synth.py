"""Synthetic chest-X-ray-like images and manifests for the training tests (no ../shared needed)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared"
CLASSES3 = ["normal", "pneumonia", "covid19"]


def synthetic_grey(label: int, seed: int, size: int = 96) -> np.ndarray:
    """A toy 'radiograph' whose class is visible: normal dark and smooth, pneumonia a bright
    blob, covid19 horizontal stripes; plus noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = 60 + 40 * yy + rng.normal(0, 12, (size, size))
    if label == 1:
        img += 120 * np.exp(-(((xx - 0.5) ** 2 + (yy - 0.5) ** 2) / 0.03))
    elif label == 2:
        img += 70 * (np.sin(yy * 40) > 0)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_manifest(root: Path, *, patients_per_class: int = 8, images_per_patient: int = 2, size: int = 96) -> Path:
    """PNG images + manifest.csv in the shared set's format (label4 empty for some pneumonia)."""
    from PIL import Image

    img_dir = root / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    n = 0
    for c, name in enumerate(CLASSES3):
        for p in range(patients_per_class):
            pid = f"syn:{name}-{p}"
            split = ["train", "train", "train", "train", "train", "val", "test", "test"][p % 8]
            age = ["adult", "child"][p % 2] if name != "covid19" else "adult"
            for i in range(images_per_patient):
                f = f"images/{name}_{p}_{i}.png"
                Image.fromarray(synthetic_grey(c, n, size)).save(root / f)
                n += 1
                label4 = {"normal": "normal", "covid19": "covid19", "pneumonia": ["bacterial", "viral", ""][p % 3]}[name]
                rows.append({"file": f, "label4": label4, "label3": name, "patient_id": pid, "source": "synthetic",
                             "source_path": f, "license": "CC0", "split": split, "age_group": age})
    path = root / "manifest.csv"
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path
