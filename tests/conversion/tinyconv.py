"""Helpers for the conversion tests (imported only when torch and nncf are installed); see conftest.py."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

CLASSES = ["normal", "pneumonia", "covid19"]
SIZE = 32
MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]
LEVEL = {"normal": 60, "pneumonia": 128, "covid19": 196}
COUNTS = {"train": 16, "val": 8, "test": 10}  # per class


class TinyNet(nn.Module):
    def __init__(self, n: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(16, n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class TinyHybrid(nn.Module):
    """Two conv branches, global average pooling, concat, a two-layer ReLU head: the hybrid's
    shape at toy size, naming its branches for ``conversion.heatmap`` (issue 17)."""

    def __init__(self, n: int = 3) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
                               nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(3, 8, 5, stride=4, padding=2), nn.ReLU())
        self.head = nn.Sequential(nn.Linear(24, 10), nn.ReLU(inplace=True), nn.Dropout(0.5), nn.Linear(10, n))

    def heatmap_branches(self) -> list[tuple[str, nn.Module]]:
        return [("features_a", self.a), ("features_b", self.b)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.a(x).mean(dim=(2, 3)), self.b(x).mean(dim=(2, 3))], dim=1))


class TraceTrap(nn.Module):
    """Broken on purpose: a data-dependent Python branch that tracing freezes on the example input.

    Eager: logits for any real image (std > 0).  The exporter traces with an all-zero example,
    so the IR records the other branch (negated logits): torch and IR disagree.
    """

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.inner(x)
        if bool(x.std() > 0):
            return logits
        return -logits


def make_dataset(root: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    rows = []
    yy = np.linspace(-1, 1, 40)[:, None]
    for split, n in COUNTS.items():
        for cls in CLASSES:
            for i in range(n):
                grad = 20 * yy * rng.uniform(-1, 1)
                img = LEVEL[cls] + grad + rng.normal(0, 12, (40, 40))
                img = np.clip(img, 0, 255).astype(np.uint8)
                name = f"images/{split}_{cls}_{i}.png"
                Image.fromarray(img, mode="L").save(root / name)
                age = "child" if i % 3 == 0 else ("unknown" if i % 7 == 0 else "adult")
                rows.append({
                    "file": name, "label4": "" if cls == "pneumonia" else cls, "label3": cls,
                    "patient_id": f"syn:{split}{cls}{i}", "source": "synthetic", "source_path": name,
                    "license": "CC0", "split": split, "age_group": age,
                })
    manifest = root / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return manifest


def make_checkpoint_dict(model: nn.Module, name: str = "tiny") -> dict[str, Any]:
    return {
        "format": "cxr-triage-checkpoint/1",
        "model": {"name": name, "num_classes": 3, "kwargs": {}},
        "state_dict": model.state_dict(),
        "classes": list(CLASSES),
        "input": {"size": [SIZE, SIZE], "channels": 3, "mean": MEAN, "std": STD, "layout": "NCHW"},
        "preprocessing": {"voi": "auto", "percentiles": [0.5, 99.5], "crop": "center_square"},
        "training": {"config": {"seed": 0}, "manifest_sha256": None, "commit": "test", "best_epoch": 1,
                     "versions": {"torch": torch.__version__}},
        "metrics": {"val": {}, "test": {}},
    }


def train_tiny(manifest: Path, model_class: type[nn.Module] | None = None) -> nn.Module:
    from conversion.data import load_split
    from worker.imaging import PreprocessSpec

    spec = PreprocessSpec(size=(SIZE, SIZE), mean=tuple(MEAN), std=tuple(STD))
    tr = load_split(manifest, "train", CLASSES, spec)
    torch.manual_seed(0)
    model = (model_class or TinyNet)()
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    x, y = torch.from_numpy(tr.x), torch.from_numpy(tr.y)
    for _ in range(150):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    return model.eval()


