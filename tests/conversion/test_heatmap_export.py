"""conversion/heatmap.py: feature-map outputs in every precision, the head beside the IR, and the
heatmap_exact gate (the worker's analytic Grad-CAM against torch autograd) - issue 17.

The real checkpoint's numbers come from the same gate in a real conversion (docs/heatmaps.md);
here a tiny two-branch hybrid trained for a second stands in for it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch", reason="conversion needs the train extra (torch, nncf)")
pytest.importorskip("nncf", reason="conversion needs the train extra (torch, nncf)")

import torch  # noqa: E402

from conversion import heatmap as HM  # noqa: E402
from worker import heatmap as wheat  # noqa: E402
from worker.engine import Engine  # noqa: E402


@pytest.fixture(scope="module")
def hybrid(tiny_data: Path):  # type: ignore[no-untyped-def]
    from tinyconv import TinyHybrid, make_checkpoint_dict, train_tiny

    model = train_tiny(tiny_data, TinyHybrid)
    return model, make_checkpoint_dict(model, name="tinyhybrid")


@pytest.fixture(scope="module")
def converted(hybrid, tiny_data: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from conversion.convert import ConvertOptions, convert_model

    model, ckpt = hybrid
    fp16 = convert_model(model, ckpt, tmp_path_factory.mktemp("hm16") / "model", ConvertOptions(manifest=tiny_data))
    int8 = convert_model(model, ckpt, tmp_path_factory.mktemp("hm8") / "model",
                         ConvertOptions(manifest=tiny_data, int8=True, calibration=12))
    return fp16, int8


def test_analytic_gradcam_equals_autograd_on_torch_feature_maps(hybrid, tiny_data: Path) -> None:
    from tinyconv import CLASSES, MEAN, SIZE, STD

    from conversion.data import load_split
    from worker.imaging import PreprocessSpec

    model, _ = hybrid
    x = load_split(tiny_data, "test", CLASSES, PreprocessSpec(size=(SIZE, SIZE), mean=tuple(MEAN), std=tuple(STD))).x[:6]
    ref = HM.torch_gradcam(model, x, [0, 1, 2])
    fm = HM.FeatureMapModel(model, HM.branches(model)).eval()
    w1, b1, w2, b2 = HM.head_arrays(model)
    head = wheat.Head(("features_a", "features_b"), w1, b1, w2, b2)
    with torch.no_grad():
        probs, a, b = fm(torch.from_numpy(x))
        np.testing.assert_allclose(probs.numpy(), torch.softmax(model(torch.from_numpy(x)), 1).numpy(), atol=1e-6)
    got = np.stack([wheat.gradcam(head, [a[i].double().numpy(), b[i].double().numpy()], [0, 1, 2], (SIZE, SIZE))
                    for i in range(len(x))])
    assert ref.max() == pytest.approx(1.0)
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_every_precision_carries_feature_maps_and_the_head(converted) -> None:  # type: ignore[no-untyped-def]
    fp16, int8 = converted
    for res in (fp16, int8):
        assert res.passed
        gate = next(g for g in res.gates if g.name == "heatmap_exact")
        assert gate.passed and gate.value <= 1e-3, gate.line()
    dirs = [(fp16.out_dir, "f32"), (int8.out_dir, "int8"), (int8.out_dir / "float", "f32")]
    for d, precision in dirs:
        card = json.loads((d / "model.json").read_text())
        assert card["heatmap"]["outputs"] == ["features_a", "features_b"]
        assert (d / "heatmap.npz").is_file()
        engine = Engine(d)
        assert engine.precision == precision and engine.heatmap is not None, engine.heatmap_unavailable
        x = np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32)
        probs, maps = engine.infer_maps(x)
        assert [m.shape for m in maps[0]] == [(16, 8, 8), (8, 8, 8)]
        np.testing.assert_allclose(probs, engine.infer(x), atol=1e-6)
    for res in (fp16, int8):  # the shortcut-attention report of the deployed model
        att = json.loads((res.out_dir / "attention" / "attention.json").read_text())
        assert att["n"] == 30 and set(att["by_class"]) == {"normal", "pneumonia", "covid19"}
        assert 0.0 <= att["overall"]["outside"] <= 1.0 and att["by_source"]
        assert (res.out_dir / "attention" / "montage_outside.png").is_file()
        assert json.loads((res.out_dir / "conversion.json").read_text())["attention"]["n"] == 30
    report = json.loads((int8.out_dir / "conversion.json").read_text())["conversion"]["heatmap"]
    assert report["exactness"]["max_abs_diff"] <= 1e-3
    assert report["int8"]["precision"] == "int8" and -1.0 <= report["int8"]["correlation"] <= 1.0
    assert report["float"]["correlation"] > 0.99


def test_a_model_without_known_branches_converts_without_heatmaps(fp16_result) -> None:  # type: ignore[no-untyped-def]
    assert "heatmap_exact" not in [g.name for g in fp16_result.gates]
    assert not (fp16_result.out_dir / "heatmap.npz").exists()
    engine = Engine(fp16_result.out_dir)
    assert engine.heatmap is None and "no 'heatmap' block" in (engine.heatmap_unavailable or "")


def test_region_shares_of_known_heatmaps() -> None:
    from conversion.attention import region_shares

    uniform = region_shares(np.ones((224, 224)))
    assert uniform["top"] == pytest.approx(28 / 224) and uniform["bottom"] == pytest.approx(28 / 224)
    assert uniform["outside"] == pytest.approx(1 - (168 * 156) / (224 * 224))  # rows 28..196, columns 34..190
    top = np.zeros((224, 224))
    top[:10, 100:120] = 1.0  # a burned-in label at the top edge
    assert region_shares(top) == {"outside": 1.0, "top": 1.0, "bottom": 0.0}
    centre = np.zeros((224, 224))
    centre[100:120, 100:120] = 1.0
    assert region_shares(centre) == {"outside": 0.0, "top": 0.0, "bottom": 0.0}
    assert np.isnan(region_shares(np.zeros((8, 8)))["outside"])


def test_montage_shows_only_redistributable_images() -> None:
    from conversion.attention import redistributable

    for ok in ("CC BY 4.0 (Kermany et al. 2018)", "CC BY 3.0", "CC BY", "CC0-like, NIH Clinical Center, no restriction"):
        assert redistributable(ok), ok
    for no in ("unknown", "CC BY-NC-SA 4.0", "CC BY-NC-ND", "CC BY-NC-SA", "", None):
        assert not redistributable(no), no


def test_a_model_whose_rebuilt_forward_differs_is_exported_without_maps(hybrid, caplog: pytest.LogCaptureFixture) -> None:
    """A wrapped or modified model (say, one prepared for QAT) whose forward is not
    head(concat(GAP(branches))) is exported as it is, with a log line, never with wrong maps."""
    from tinyconv import TinyHybrid

    from conversion.export import to_openvino

    class Shifted(TinyHybrid):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) + torch.tensor([0.0, 0.0, 3.0])

    model, _ = hybrid
    shifted = Shifted()
    shifted.load_state_dict(model.state_dict())
    with caplog.at_level("WARNING", logger="conversion.heatmap"):
        ov_model = to_openvino(shifted.eval(), (3, 32, 32))
    assert len(ov_model.outputs) == 1
    assert any("differs from its own" in r.getMessage() for r in caplog.records)
    assert len(to_openvino(model, (3, 32, 32)).outputs) == 3
