"""A tiny, deterministic OpenVINO IR plus model card, for tests and benchmarks only.

It is built with the ``openvino.opset14`` graph API (no torch, no download) and compiles in
milliseconds.  It is NOT a medical model and is never used as a default model: its card says
so in ``intended_use``.

Graph (input ``[?, C, H, W]`` float32, NCHW, dynamic batch like a converted model)::

    AvgPool(kernel = stride = (H // 4, W // 4))  ->  [N, C, gh, gw]   (gh = H // kh, gw = W // kw)
    Reshape [N, C*gh*gw]  ->  MatMul W [F, n]  ->  Add b [n]  ->  (Softmax, if output="probabilities")

The weights are designed so that the wiring of the output can be tested: the first class's
column is ``-4 / F``, the last class's ``+4 / F`` (plus small seeded noise that makes the output
depend on where the brightness is, not only on the mean), so the mean normalised intensity drives
the prediction: a bright image (white, ~ +2 after ImageNet normalisation) predicts the LAST class
(``covid19`` by default), a dark one (black, ~ -2) the FIRST (``normal``).  The classes in between
get a bias of +1, so a mid-grey image (~ 0 after normalisation) predicts one of them
(``pneumonia``).

:func:`toy_reference` recomputes the same graph in numpy (float64) from the card alone (the
seed is stored in ``training.toy_seed``), as the oracle for engine tests.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import numpy as np

from worker.modelcard import DEFAULT_TRIAGE_RULE, OUTPUTS, ModelCard, write_card

log = logging.getLogger(__name__)

__all__ = ["QUADRANTS", "build_toy_heatmap_model", "build_toy_model", "toy_reference", "toy_weights"]

_GRID = 4  # the pooled feature map is about _GRID x _GRID per channel
_SCALE = 4.0  # weight of the mean intensity on the first / last class logit
_NOISE = 1.0  # weight of the seeded random part
_MIDDLE_BIAS = 1.0  # extra bias of the classes between the first and the last
_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _pool_geometry(size: tuple[int, int]) -> tuple[int, int, int, int]:
    """``(kh, kw, gh, gw)``: pooling kernel (= stride) and output grid for an ``H x W`` input."""
    h, w = size
    kh, kw = max(1, h // _GRID), max(1, w // _GRID)
    return kh, kw, h // kh, w // kw


def toy_weights(n_classes: int, size: tuple[int, int], channels: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The toy classifier's ``(W [F, n_classes], b [n_classes])`` in float32 for a given seed."""
    _, _, gh, gw = _pool_geometry(size)
    n_features = channels * gh * gw
    rng = np.random.default_rng(seed)
    base = np.zeros(n_classes)
    base[0], base[-1] = -_SCALE, _SCALE
    weights = (base[None, :] + _NOISE * rng.standard_normal((n_features, n_classes))) / n_features
    bias = 0.1 * rng.standard_normal(n_classes)
    bias[1:-1] += _MIDDLE_BIAS  # mid-grey images predict a middle class
    return weights.astype(np.float32), bias.astype(np.float32)


def _check_args(
    classes: Sequence[str], size: Sequence[int], channels: int, output: str
) -> tuple[tuple[str, ...], tuple[int, int]]:
    classes_t = tuple(classes)
    if (
        len(classes_t) < 2
        or len(set(classes_t)) != len(classes_t)
        or not all(isinstance(c, str) and c for c in classes_t)
    ):
        raise ValueError(f"classes must be at least 2 unique non-empty strings (got {classes!r})")
    if len(size) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size):
        raise ValueError(f"size must be (height, width), two positive integers (got {size!r})")
    if isinstance(channels, bool) or not isinstance(channels, int) or channels <= 0:
        raise ValueError(f"channels must be a positive integer (got {channels!r})")
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {', '.join(OUTPUTS)} (got {output!r})")
    return classes_t, (int(size[0]), int(size[1]))


def build_toy_model(
    out_dir: str | os.PathLike[str],
    *,
    classes: Sequence[str] = ("normal", "pneumonia", "covid19"),
    size: Sequence[int] = (224, 224),
    channels: int = 3,
    output: str = "logits",
    seed: int = 0,
    name: str = "toy",
    version: str = "0.0.1",
    thresholds: Mapping[str, float] | None = None,
) -> Path:
    """Write ``model.xml``, ``model.bin`` and ``model.json`` for the toy model into ``out_dir``.

    Args:
        out_dir: created if missing; existing model files are overwritten.
        classes: output order; the first is predicted for dark images, the last for bright ones.
        size: ``(height, width)`` of the input.
        channels: input channels (3 uses ImageNet mean/std, otherwise 0.5 / 0.25).
        output: ``"logits"`` (no softmax in the graph) or ``"probabilities"`` (Softmax node).
        seed: seeds the noise part of the weights (stored in the card as ``training.toy_seed``).
        thresholds: card thresholds; ``None`` gives 0.5 for every class but the first.

    Returns:
        ``out_dir`` as a :class:`~pathlib.Path`.
    """
    import openvino as ov  # local: the card helpers above do not need the runtime
    import openvino.opset14 as ops

    classes_t, (h, w) = _check_args(classes, size, channels, output)
    kh, kw, _, _ = _pool_geometry((h, w))
    weights, bias = toy_weights(len(classes_t), (h, w), channels, seed)

    image = ops.parameter(ov.PartialShape([-1, channels, h, w]), ov.Type.f32, name="image")
    pooled = ops.avg_pool(image, [kh, kw], [0, 0], [0, 0], [kh, kw], exclude_pad=True, rounding_type="floor")
    flat = ops.reshape(pooled, ops.constant(np.array([0, -1], dtype=np.int64)), special_zero=True)
    logits = ops.add(ops.matmul(flat, ops.constant(weights), False, False), ops.constant(bias))
    result = ops.softmax(logits, 1) if output == "probabilities" else logits
    result.output(0).get_tensor().set_names({output})
    model = ov.Model([result.output(0)], [image], f"{name}-{version}")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ov.save_model(model, str(out / "model.xml"), compress_to_fp16=False)

    mean, std = _IMAGENET if channels == 3 else ((0.5,) * channels, (0.25,) * channels)
    thr = {c: 0.5 for c in classes_t[1:]} if thresholds is None else dict(thresholds)
    card: dict[str, Any] = {
        "schema": 1,
        "name": name,
        "version": version,
        "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "architecture": f"toy: avgpool {kh}x{kw} + linear (openvino opset14)",
        "precision": "f32",
        "classes": list(classes_t),
        "output": output,
        "input": {"size": [h, w], "channels": channels, "mean": list(mean), "std": list(std), "layout": "NCHW"},
        "preprocessing": {"voi": "auto", "percentiles": [0.5, 99.5], "crop": "center_square"},
        "thresholds": thr,
        "triage_rule": DEFAULT_TRIAGE_RULE,
        "metrics": {},
        "training": {"toy_seed": seed, "note": "random weights; bright image -> last class, dark -> first"},
        "files": {"xml": "model.xml", "bin": "model.bin"},
        "intended_use": "toy model for tests; NOT a medical model",
    }
    write_card(out, card)
    log.debug("built toy model in %s (%s, %dx%dx%d, %s)", out, ",".join(classes_t), channels, h, w, output)
    return out


def toy_reference(card: ModelCard, batch: np.ndarray) -> np.ndarray:
    """The toy graph computed in numpy float64: ``(N, C, H, W)`` -> ``(N, n_classes)`` probabilities.

    Uses only the card (classes, input size, channels, output, ``training.toy_seed``), so it is
    an independent check of what OpenVINO computes from the IR.  Softmax is applied whatever
    the card's ``output``, to match :meth:`worker.engine.Engine.infer`.
    """
    seed = card.raw.get("training", {}).get("toy_seed")
    if not isinstance(seed, int):
        raise ValueError(f"{card.card_path}: not a toy model card (training.toy_seed missing)")
    x = np.asarray(batch, dtype=np.float64)
    kh, kw, gh, gw = _pool_geometry(card.input_size)
    n, c = x.shape[:2]
    pooled = x[:, :, : gh * kh, : gw * kw].reshape(n, c, gh, kh, gw, kw).mean(axis=(3, 5))
    weights, bias = toy_weights(len(card.classes), card.input_size, card.channels, seed)
    logits = pooled.reshape(n, -1) @ weights.astype(np.float64) + bias.astype(np.float64)
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return cast(np.ndarray, e / e.sum(axis=1, keepdims=True))


#: Quadrants of :func:`build_toy_heatmap_model`: (row half, column half) of the input.
QUADRANTS: Mapping[str, tuple[int, int]] = {
    "top_left": (0, 0), "top_right": (0, 1), "bottom_left": (1, 0), "bottom_right": (1, 1),
}


def build_toy_heatmap_model(
    out_dir: str | os.PathLike[str],
    *,
    quadrant: str = "top_left",
    classes: Sequence[str] = ("normal", "pneumonia", "covid19"),
    size: Sequence[int] = (224, 224),
    name: str = "toy-heatmap",
    version: str = "0.0.1",
) -> Path:
    """A toy IR with heatmap outputs whose LAST class's score comes from one image quadrant only.

    Shaped like the hybrid (two branches of feature maps, global average pooling, concat, a
    two-layer ReLU head, softmax), so :mod:`worker.heatmap` runs on it unchanged::

        P = AvgPool(H/8 x W/8)(image)                     [N, 3, 8, 8]
        features_quadrant = ReLU(P) * mask(quadrant)      branch 1 (zero outside the quadrant)
        features_dark     = ReLU(-P)                      branch 2 (dark evidence, everywhere)
        concat(GAP(branch 1), GAP(branch 2)) -> Dense(4) -> ReLU -> Dense(K) -> Softmax

    The last class (``covid19``) reads only hidden unit 0, which reads only branch 1: its score,
    and so its Grad-CAM, can only come from ``quadrant``.  The first class reads the dark branch.
    The head is written to ``heatmap.npz`` and the card's ``heatmap`` block as the conversion
    stage writes them.  NOT a medical model.
    """
    import openvino as ov
    import openvino.opset14 as ops

    from worker.heatmap import write_head

    if quadrant not in QUADRANTS:
        raise ValueError(f"quadrant must be one of {', '.join(QUADRANTS)} (got {quadrant!r})")
    classes_t, (h, w) = _check_args(classes, size, 3, "probabilities")
    grid = 8
    kh, kw = h // grid, w // grid
    if kh < 1 or kw < 1 or h % grid or w % grid:
        raise ValueError(f"size must be a multiple of {grid} (got {size!r})")
    qr, qc = QUADRANTS[quadrant]
    mask = np.zeros((1, 1, grid, grid), dtype=np.float32)
    mask[..., qr * grid // 2 : (qr + 1) * grid // 2, qc * grid // 2 : (qc + 1) * grid // 2] = 1.0
    k = len(classes_t)
    w1 = np.zeros((4, 6), dtype=np.float32)
    w1[0, :3] = 2.0  # bright evidence in the quadrant
    w1[1, 3:] = 2.0  # dark evidence anywhere
    w1[2, :] = -1.0  # a unit that is usually off: the ReLU mask matters
    w1[3, :3], w1[3, 3:] = 0.5, 0.5
    b1 = np.array([0.0, 0.0, -0.5, 0.1], dtype=np.float32)
    w2 = np.zeros((k, 4), dtype=np.float32)
    w2[-1, 0] = 4.0
    w2[0, 1] = 4.0
    w2[1:-1, 3] = 1.0
    b2 = np.zeros(k, dtype=np.float32)
    b2[1:-1] = 0.5

    image = ops.parameter(ov.PartialShape([-1, 3, h, w]), ov.Type.f32, name="image")
    pooled = ops.avg_pool(image, [kh, kw], [0, 0], [0, 0], [kh, kw], exclude_pad=True, rounding_type="floor")
    bright = ops.multiply(ops.relu(pooled), ops.constant(mask))
    dark = ops.relu(ops.negative(pooled))
    axes = ops.constant(np.array([2, 3], dtype=np.int64))
    feats = ops.concat([ops.reduce_mean(bright, axes, False), ops.reduce_mean(dark, axes, False)], 1)
    hidden = ops.relu(ops.add(ops.matmul(feats, ops.constant(w1), False, True), ops.constant(b1)))
    logits = ops.add(ops.matmul(hidden, ops.constant(w2), False, True), ops.constant(b2))
    probs = ops.softmax(logits, 1)
    outs = {"probabilities": probs, "features_quadrant": bright, "features_dark": dark}
    for tensor_name, node in outs.items():
        node.output(0).get_tensor().set_names({tensor_name})
    model = ov.Model([n.output(0) for n in outs.values()], [image], f"{name}-{version}")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ov.save_model(model, str(out / "model.xml"), compress_to_fp16=False)
    block = write_head(out, ["features_quadrant", "features_dark"], w1, b1, w2, b2)
    mean, std = _IMAGENET
    card: dict[str, Any] = {
        "schema": 1, "name": name, "version": version,
        "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "architecture": f"toy heatmap model: {quadrant} quadrant -> {classes_t[-1]} (openvino opset14)",
        "precision": "f32", "classes": list(classes_t), "output": "probabilities",
        "input": {"size": [h, w], "channels": 3, "mean": list(mean), "std": list(std), "layout": "NCHW"},
        "preprocessing": {"voi": "auto", "percentiles": [0.5, 99.5], "crop": "center_square"},
        "thresholds": {c: 0.5 for c in classes_t[1:]}, "triage_rule": DEFAULT_TRIAGE_RULE, "metrics": {},
        "training": {"note": f"hand-set weights; {classes_t[-1]} reads the {quadrant} quadrant only"},
        "files": {"xml": "model.xml", "bin": "model.bin"},
        "heatmap": block,
        "intended_use": "toy model for tests; NOT a medical model",
    }
    write_card(out, card)
    return out
