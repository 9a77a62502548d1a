"""worker/heatmap.py and Engine.infer_maps: exact Grad-CAM from the head's weights (issue 17).

The torch autograd comparison on the real checkpoint is the conversion stage's gate
(tests/conversion/test_heatmap_export.py); here the oracle is the model whose answer is known: a toy IR
whose COVID-19 score comes from one image quadrant only.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from worker import heatmap
from worker.engine import Engine
from worker.testing.toymodel import QUADRANTS, build_toy_heatmap_model, build_toy_model

SIZE = (224, 224)


def _quadrant_share(cam: np.ndarray, quadrant: str) -> float:
    qr, qc = QUADRANTS[quadrant]
    h, w = cam.shape
    part = cam[qr * h // 2 : (qr + 1) * h // 2, qc * w // 2 : (qc + 1) * w // 2]
    return float(part.sum() / cam.sum())


@pytest.mark.parametrize("quadrant", sorted(QUADRANTS))
def test_heatmap_of_the_toy_model_peaks_in_its_quadrant(tmp_path: Path, quadrant: str) -> None:
    engine = Engine(build_toy_heatmap_model(tmp_path / quadrant, quadrant=quadrant))
    assert engine.heatmap is not None and engine.heatmap_unavailable is None
    rng = np.random.default_rng(1)
    x = rng.normal(0.3, 1.0, (3, 3, *SIZE)).astype(np.float32)
    probs, maps = engine.infer_maps(x)
    covid = engine.card.classes.index("covid19")
    for m in maps:
        cam = heatmap.gradcam(engine.heatmap, m, [covid], SIZE)[0]
        assert cam.shape == SIZE and cam.dtype == np.float32
        assert cam.max() == pytest.approx(1.0) and cam.min() >= 0.0
        qr, qc = QUADRANTS[quadrant]
        y, xx = np.unravel_index(int(cam.argmax()), cam.shape)
        assert (y >= SIZE[0] // 2) == bool(qr) and (xx >= SIZE[1] // 2) == bool(qc)
        # all of the evidence is in the quadrant; bilinear upsampling leaks a little over its edge
        assert _quadrant_share(cam, quadrant) > 0.9
    np.testing.assert_allclose(probs, engine.infer(x), atol=1e-6)


def test_analytic_gradient_equals_finite_differences() -> None:
    rng = np.random.default_rng(0)
    f, hidden, k = 12, 7, 3
    head = heatmap.Head(("a",), rng.normal(size=(hidden, f)), rng.normal(size=hidden),
                        rng.normal(size=(k, hidden)), rng.normal(size=k))
    pooled = rng.normal(size=f)
    grads = head.score_gradients(pooled, [0, 1, 2])
    eps = 1e-6
    for c in range(k):
        num = np.array([
            (head.logits((pooled + eps * e)[None])[0, c] - head.logits((pooled - eps * e)[None])[0, c]) / (2 * eps)
            for e in np.eye(f)
        ])
        np.testing.assert_allclose(grads[c], num, rtol=1e-6, atol=1e-8)
    linear = heatmap.Head(("a",), rng.normal(size=(k, f)), rng.normal(size=k), None, None)
    np.testing.assert_array_equal(linear.score_gradients(pooled, [2]), linear.w1[[2]])


def test_gradcam_is_the_channel_weighted_sum_of_the_maps() -> None:
    # One branch, a one-layer head: the map is sum_k W[c, k] / (h w) * A_k, upsampled
    rng = np.random.default_rng(2)
    a = np.abs(rng.normal(size=(4, 2, 2)))
    w = np.array([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 2.0]])
    head = heatmap.Head(("a",), w, np.zeros(2), None, None)
    cam = heatmap.gradcam(head, [a], [0, 1], (2, 2))  # no resampling at the maps' own size
    np.testing.assert_allclose(cam[0], a[0] / a[0].max(), rtol=1e-6)
    np.testing.assert_allclose(cam[1], a[3] / a[3].max(), rtol=1e-6)
    negative = heatmap.Head(("a",), -w, np.zeros(2), None, None)
    assert not heatmap.gradcam(negative, [a], [0], (2, 2)).any()  # no positive evidence: all zero


def test_upsample_matrix_uses_half_pixel_centres() -> None:
    m = heatmap.upsample_matrix(2, 4)
    np.testing.assert_allclose(m.sum(axis=1), 1.0)
    # torch.nn.functional.interpolate([0, 1], size=4, mode="linear", align_corners=False)
    np.testing.assert_allclose(m @ np.array([0.0, 1.0]), [0.0, 0.25, 0.75, 1.0])
    np.testing.assert_array_equal(heatmap.upsample_matrix(7, 7), np.eye(7))


def test_model_without_heatmap_outputs_is_reported_not_fatal(tmp_path: Path) -> None:
    engine = Engine(build_toy_model(tmp_path / "plain"))
    assert engine.heatmap is None
    assert "no 'heatmap' block" in (engine.heatmap_unavailable or "")
    with pytest.raises(RuntimeError, match="no heatmaps from this model"):
        engine.infer_maps(np.zeros((1, 3, *SIZE), np.float32))
    assert engine.infer(np.zeros((1, 3, *SIZE), np.float32)).shape == (1, 3)


def test_tampered_head_or_missing_output_disables_heatmaps(tmp_path: Path) -> None:
    d = build_toy_heatmap_model(tmp_path / "m")
    with open(d / heatmap.HEAD_FILE, "ab") as f:
        f.write(b"x")
    engine = Engine(d)
    assert engine.heatmap is None and "does not match heatmap.sha256" in (engine.heatmap_unavailable or "")

    d2 = build_toy_heatmap_model(tmp_path / "m2")
    card = json.loads((d2 / "model.json").read_text())
    card["heatmap"]["outputs"] = ["features_quadrant", "features_nowhere"]
    (d2 / "model.json").write_text(json.dumps(card))
    engine2 = Engine(d2)
    assert engine2.heatmap is None and "features_nowhere" in (engine2.heatmap_unavailable or "")
    assert engine2.infer(np.zeros((2, 3, *SIZE), np.float32)).shape == (2, 3)  # triage still works


def test_cam_classes_are_the_predicted_class_and_those_over_threshold() -> None:
    classes = ("normal", "pneumonia", "covid19")
    thr = {"pneumonia": 0.3, "covid19": 0.3}
    assert heatmap.cam_classes({"normal": 0.6, "pneumonia": 0.1, "covid19": 0.3}, thr, classes) == ["normal", "covid19"]
    assert heatmap.cam_classes({"normal": 0.1, "pneumonia": 0.5, "covid19": 0.4}, thr, classes) == ["pneumonia", "covid19"]
    assert heatmap.cam_classes({"normal": 0.8, "pneumonia": 0.1, "covid19": 0.1}, thr, classes) == ["normal"]
