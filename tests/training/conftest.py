"""Fixtures for the training-stage tests: a small synthetic manifest (no ../shared needed).

The whole module needs the ``train`` extra (torch, torchvision, timm, scikit-learn, scipy,
matplotlib); without it every test here is skipped with that reason.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

#: The train extra's modules; without them only test_requirements.py is collected (and skips).
MISSING = [m for m in ("torch", "torchvision", "timm", "sklearn", "scipy", "matplotlib") if importlib.util.find_spec(m) is None]
if MISSING:
    collect_ignore_glob = ["test_[!r]*.py"]
else:
    import torch

    torch.set_num_threads(2)

from synth import SHARED, write_manifest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """48 images (3 classes x 8 patients x 2), 96 px PNG."""
    return write_manifest(tmp_path_factory.mktemp("tinydata"))


@pytest.fixture
def shared_data() -> Path:
    p = SHARED / "data" / "cxr" / "manifest.csv"
    if not p.is_file():
        pytest.skip(f"needs the shared data {p} (not present in this checkout)")
    return p


@pytest.fixture
def shared_weights() -> Path:
    p = SHARED / "weights"
    if not (p / "mobilenet_v2-b0353104.pth").is_file():
        pytest.skip(f"needs the shared weights folder {p} (not present in this checkout)")
    return p


@pytest.fixture(autouse=True)
def _grey_cache_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """The on-disk grey cache (training.cache) of these tests lives in a temporary folder."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "xdg-cache"))
