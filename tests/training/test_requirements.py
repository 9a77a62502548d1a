"""Reports why the training tests are skipped when the ``train`` extra is not installed."""

from __future__ import annotations

import importlib.util

import pytest


def test_train_extra_installed() -> None:
    missing = [m for m in ("torch", "torchvision", "timm", "sklearn", "scipy", "matplotlib") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"training tests need the train extra (missing: {', '.join(missing)}): pip install -e '.[dev,train]'")
