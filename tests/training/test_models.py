"""Model factory: every model builds and runs, logits shape, parameter counts, weights loading."""

from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn

from training.models import (
    KERAS_RESNET50_CONV_BIASES,
    PAPER_TABLE2_TOTAL,
    WeightsError,
    count_parameters,
    create_model,
    feature_dims,
)


@pytest.mark.parametrize(
    ("name", "mobilenet"),
    [("hybrid", "v1"), ("hybrid", "v2"), ("resnet50", "v2"), ("mobilenet", "v1"), ("mobilenet", "v2")],
)
def test_factory_builds_and_runs(name: str, mobilenet: str) -> None:
    m = create_model(name, 3, mobilenet=mobilenet).eval()
    with torch.inference_mode():
        out = m(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 3)
    # logits, not probabilities
    assert not torch.allclose(out.sum(1), torch.ones(2))
    head_in = m.head[0].in_features
    assert head_in == feature_dims(name, mobilenet)


def test_feature_widths() -> None:
    assert feature_dims("hybrid", "v1") == 2048 + 1024
    assert feature_dims("hybrid", "v2") == 2048 + 1280


def test_paper_table2_parameter_count() -> None:
    """The paper's 27,124,280 (Keras) = ours + the conv biases Keras' ResNet50 has."""
    m = create_model("hybrid", 4, mobilenet="v1", head_hidden=100)
    ours = count_parameters(m)
    assert ours == PAPER_TABLE2_TOTAL - KERAS_RESNET50_CONV_BIASES == 27_097_720
    conv_out = sum(mod.out_channels for mod in m.resnet.modules() if isinstance(mod, nn.Conv2d))
    assert conv_out == KERAS_RESNET50_CONV_BIASES
    # the parts: Keras ResNet50 (no top) 23,587,712 incl. conv biases; MobileNet v1 3,228,864; head 307,300 + 404
    assert count_parameters(m.resnet) + conv_out == 23_587_712
    assert count_parameters(m.mobilenet) == 3_228_864
    assert count_parameters(m.head) == 3072 * 100 + 100 + 100 * 4 + 4
    # PyTorch-style count leaves out the batch-norm running statistics
    bn = sum(b.running_mean.numel() * 2 for b in m.modules() if isinstance(b, nn.BatchNorm2d))
    assert count_parameters(m, keras_style=False) == ours - bn


def test_head_options() -> None:
    m = create_model("mobilenet", 4, head_hidden=0, dropout=0.2)
    assert isinstance(m.head[-1], nn.Linear) and m.head[-1].out_features == 4
    with pytest.raises(ValueError):
        create_model("vgg", 3)
    with pytest.raises(ValueError):
        create_model("hybrid", 3, mobilenet="v3")


def test_weights_file_verified_and_loaded(shared_weights, tmp_path) -> None:
    path = shared_weights / "mobilenet_v2-b0353104.pth"
    m = create_model("hybrid", 3, mobilenet_weights=str(path))
    ref = torch.load(path, map_location="cpu", weights_only=True)
    assert torch.equal(m.mobilenet.features[0][0].weight, ref["features.0.0.weight"])
    # a copy whose name promises another hash is refused
    bad = tmp_path / "mobilenet_v2-deadbeef.pth"
    shutil.copyfile(path, bad)
    with pytest.raises(WeightsError, match="does not match"):
        create_model("mobilenet", 3, weights=str(bad))


def test_weights_file_that_does_not_fit(tmp_path) -> None:
    p = tmp_path / "r.pth"
    torch.save({"conv.weight": torch.zeros(1)}, p)
    with pytest.raises(WeightsError, match="does not fit"):
        create_model("resnet50", 3, weights=str(p))
    with pytest.raises(WeightsError, match="not found"):
        create_model("resnet50", 3, weights=str(tmp_path / "missing.pth"))


def test_timm_file_roundtrip(tmp_path) -> None:
    """A saved backbone state dict loads back (path option, no published hash -> unverified)."""
    src = create_model("mobilenet", 3, mobilenet="v1")
    p = tmp_path / "mv1.pth"
    torch.save(src.backbone.state_dict(), p)
    dst = create_model("mobilenet", 3, mobilenet="v1", mobilenet_weights=str(p))
    for k, v in src.backbone.state_dict().items():
        assert torch.equal(v, dst.backbone.state_dict()[k])
