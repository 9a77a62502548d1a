"""Fixtures for the conversion tests: a tiny labelled PNG data set and a tiny trained CNN.

Everything is generated in a temporary directory (no network, no /work/shared): 32x32
grey PNGs whose brightness encodes the class (normal dark, pneumonia mid-grey, covid19
bright, with noise and a gradient), a manifest with the real columns (file, label3, label4,
patient_id, split, age_group), and a 2-conv CNN trained on them for a second, so that its
predictions are decisive (a random network's near-ties would make INT8 agreement a coin toss).
The stand-in checkpoint dict has the ``cxr-triage-checkpoint/1`` layout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

# The conversion stage needs the "train" extra (torch, nncf): each test module starts with
# pytest.importorskip, so a worker-only venv reports these tests as skipped (with the reason).
# Fixtures import torch lazily (from tinyconv) so that this conftest imports without it.


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tinyconv import make_dataset

    return make_dataset(tmp_path_factory.mktemp("cxrdata"))


@pytest.fixture(scope="session")
def tiny_model(tiny_data: Path) -> Any:
    from tinyconv import train_tiny

    return train_tiny(tiny_data)


@pytest.fixture(scope="session")
def tiny_ckpt(tiny_model: Any) -> dict[str, Any]:
    from tinyconv import make_checkpoint_dict

    return make_checkpoint_dict(tiny_model)


@pytest.fixture(scope="session")
def fp16_result(tiny_model, tiny_ckpt, tiny_data, tmp_path_factory):
    from conversion.convert import ConvertOptions, convert_model

    out = tmp_path_factory.mktemp("fp16") / "model"
    return convert_model(tiny_model, tiny_ckpt, out, ConvertOptions(manifest=tiny_data, name="tiny", version="9.9.9"))


@pytest.fixture(scope="session")
def int8_result(tiny_model, tiny_ckpt, tiny_data, tmp_path_factory):
    from conversion.convert import ConvertOptions, convert_model

    out = tmp_path_factory.mktemp("int8") / "model"
    return convert_model(tiny_model, tiny_ckpt, out, ConvertOptions(manifest=tiny_data, int8=True, calibration=12))
