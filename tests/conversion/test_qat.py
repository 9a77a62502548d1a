"""Quantisation-aware training (``--int8 qat``): a tiny trained CNN fine-tuned with FakeQuantize,
exported as a static INT8 IR, gated like every candidate, PTQ reported beside it, resumable."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch", reason="conversion needs the train extra (torch, nncf)")
pytest.importorskip("nncf", reason="conversion needs the train extra (torch, nncf)")

from conversion.qat import QatOptions, quantization_aware_training  # noqa: E402

# QAT runs real fine-tuning epochs: minutes on a busy two-core box (the default limit is 300 s).
pytestmark = pytest.mark.timeout(1200)
from worker.engine import Engine  # noqa: E402
from worker.modelcard import ModelCard  # noqa: E402


@pytest.fixture()
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # the training grey cache goes here
    return tmp_path / "cache"


def test_qat_conversion_deploys_a_static_int8_ir_with_ptq_beside_it(tiny_model, tiny_ckpt, tiny_data, tmp_path, cache_home):
    from conversion.convert import ConvertOptions, convert_model

    out = tmp_path / "qat"
    opts = ConvertOptions(manifest=tiny_data, int8="qat", calibration=12,
                          qat=QatOptions(epochs=2, lr=1e-4, batch_size=8, calibration=12))
    r = convert_model(tiny_model, tiny_ckpt, out, opts)
    assert r.passed and r.precision == "int8"
    names = [g.name for g in r.gates]
    assert "int8_agreement" in names and "int8_adult_accuracy_drop" in names and "int8_macro_auroc_drop" in names
    card = ModelCard.load(out)
    conv = card.raw["conversion"]
    q = conv["int8"]
    assert q["method"].startswith("quantization-aware training")
    assert [h["epoch"] for h in q["history"]] == [-1, 0, 1] and q["selected_epoch"] in (-1, 0, 1)
    assert q["options"]["epochs"] == 2 and q["label_smoothing"] == 0.0
    assert q["ptq"]["method"] == "nncf.quantize"  # PTQ measured and reported, not deployed
    assert q["dynamic_batch_check"]["images"] == 8 and q["export_max_prob_diff"] < 0.05
    cands = conv["candidates"]
    assert cands["ir_int8"]["deployed"] is True and cands["ir_int8_ptq"]["deployed"] is False
    assert {"ir_int8", "ir_int8_ptq", "ir_f32"} <= set(card.raw["metrics"])
    # the deployed IR: FakeQuantize, static batch 1, loads in the worker at int8
    xml = (out / "model.xml").read_text()
    assert "FakeQuantize" in xml
    e = Engine(out)
    assert e.precision == "int8"
    assert e.infer(np.zeros((2, 3, 32, 32), dtype=np.float32)).shape == (2, 3)
    readme = (out / "README.md").read_text()
    assert "float vs candidates" in readme and "INT8 `ir_int8_ptq`" in readme and "(deployed)" in readme
    assert "per source collection" in readme and "| synthetic |" in readme
    report = json.loads((out / "conversion.json").read_text())
    assert report["conversion"]["candidates"]["ir_int8"]["measures"]["agreement"]["candidate"] >= 0.97
    assert not out.with_name("qat.qat").exists() and not (out / "ptq").exists()  # QAT state removed once accepted


def test_qat_resumes_a_finished_epoch_instead_of_training_again(tiny_model, tiny_ckpt, tiny_data, tmp_path, cache_home):
    from conversion.data import load_split, spec_from_checkpoint

    calib = load_split(tiny_data, "train", tiny_ckpt["classes"], spec_from_checkpoint(tiny_ckpt), limit=12).x
    opts = QatOptions(epochs=1, lr=1e-4, batch_size=8, calibration=12)
    work = tmp_path / "work"
    m1, info1 = quantization_aware_training(tiny_model, tiny_ckpt, tiny_data, calib, work, opts, checkpoint_sha256="abc")
    state = work / "state.pt"
    assert state.exists() and [h["epoch"] for h in info1["history"]] == [-1, 0]
    before = state.stat().st_mtime_ns
    m2, info2 = quantization_aware_training(tiny_model, tiny_ckpt, tiny_data, calib, work, opts, checkpoint_sha256="abc")
    assert info2["history"] == info1["history"]  # the finished epoch was read back, not run again
    assert state.stat().st_mtime_ns == before
    import torch

    for (k, a), (_, b) in zip(m1.state_dict().items(), m2.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    # another checkpoint's state is not resumed
    _, info3 = quantization_aware_training(tiny_model, tiny_ckpt, tiny_data, calib, work, opts, checkpoint_sha256="other")
    assert state.stat().st_mtime_ns != before and [h["epoch"] for h in info3["history"]] == [-1, 0]


def test_qat_options_are_checked():
    with pytest.raises(ValueError, match="qat epochs"):
        QatOptions(epochs=0)
    with pytest.raises(ValueError, match="qat lr"):
        QatOptions(lr=0)


def test_float_scope_finds_the_hybrids_parts_by_the_graph():
    import torch
    from torch import nn

    from conversion.export import to_openvino
    from conversion.quantize import float_scope, quantize_int8

    def branch(ch: int, convs: int) -> nn.Sequential:
        layers: list[nn.Module] = [nn.Conv2d(3, ch, 3, padding=1), nn.BatchNorm2d(ch), nn.ReLU()]
        for _ in range(convs - 1):
            layers += [nn.Conv2d(ch, ch, 3, padding=1), nn.ReLU()]
        return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())

    class TinyHybrid(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.resnet, self.mobilenet = branch(8, 3), branch(4, 2)
            self.head = nn.Sequential(nn.Linear(12, 6), nn.ReLU(), nn.Linear(6, 3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.cat([self.resnet(x), self.mobilenet(x)], dim=1))

    torch.manual_seed(0)
    ovm = to_openvino(TinyHybrid().eval(), (3, 16, 16))
    assert len(float_scope(ovm, ["resnet"]).names) == 3
    assert len(float_scope(ovm, ["mobilenet"]).names) == 2
    assert len(float_scope(ovm, ["head"]).names) == 2
    assert len(float_scope(ovm, ["mobilenet", "head"]).names) == 4
    assert float_scope(ovm, []) is None
    with pytest.raises(ValueError, match="unknown part"):
        float_scope(ovm, ["vit"])
    plain = to_openvino(nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval(), (3, 16, 16))
    with pytest.raises(ValueError, match="needs the hybrid"):
        float_scope(plain, ["head"])
    calib = np.random.default_rng(0).normal(size=(4, 3, 16, 16)).astype(np.float32)
    full = quantize_int8(ovm, calib)
    mixed = quantize_int8(ovm, calib, ignored_scope=float_scope(ovm, ["mobilenet"]))

    def fq(m):
        return sum(op.get_type_name() == "FakeQuantize" for op in m.get_ops())

    assert 0 < fq(mixed) < fq(full)
