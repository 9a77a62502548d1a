"""The conversion side of heatmaps (issue 17): feature-map outputs in the IR, the head beside it,
and the torch autograd Grad-CAM the worker's analytic one is gated against.

What is exported
----------------
For the hybrid (``training.models.HybridNet``) and the single-backbone baselines
(``SingleNet``) the exported graph is ``(softmax(logits), A_1, ..., A_B)``: the class
probabilities first (the output every other part of the conversion reads, ``output(0)``), then
the last feature maps of each branch, before global average pooling:

* ResNet50: the output of ``layer4`` (``[N, 2048, H/32, W/32]``), IR output ``features_resnet50``;
* MobileNet v2: the output of ``features`` (``[N, 1280, H/32, W/32]``), ``features_mobilenet_v2``;
* MobileNet v1 (timm): ``forward_features`` (``[N, 1024, H/32, W/32]``), ``features_mobilenet_v1``.

The probabilities are computed from those very maps (mean over H and W, concat, head), which
is what the original modules compute, so the parity gates hold unchanged.  Every precision gets
the outputs: the FP16/FP32 IR is this graph, and the INT8 IR is NNCF's quantisation of it (NNCF
keeps a model's outputs).  The head's two dense layers go to ``heatmap.npz`` beside each IR
(:func:`worker.heatmap.write_head`) and the card's ``heatmap`` block names the file, its sha256
and the outputs.  A model of another shape (any other ``nn.Module``) is exported as before,
without heatmap outputs, and logged; the worker then reports "no heatmaps" for it.

The gate
--------
``heatmap_exact``: on the parity images (up to 8) and every class, the worker's Grad-CAM
(``worker.engine.Engine.infer_maps`` on the written float IR at f32, then
``worker.heatmap.gradcam``) against torch autograd Grad-CAM on the checkpoint's model
(:func:`torch_gradcam`: hooks on the same feature maps, ``backward`` of the class logit,
channel weights = spatial mean of the gradient, same upsampling, sum, ReLU, divide by the maximum).
The value is the largest absolute difference of the normalised maps (values in [0, 1]).
What it checks: the closed-form gradient (ReLU mask, GAP factor, branch order, head layout)
and that the IR's extra outputs are the maps the head reads.  Its limit and the measured
value on the real checkpoint are in ``conversion.gates`` and ``docs/heatmaps.md``.  For the
INT8 IR (quantised backbones, so different maps by design) the Pearson correlation of its
heatmaps with torch's is recorded in the report, not gated.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from worker import heatmap as wheat

log = logging.getLogger(__name__)

__all__ = [
    "FeatureMapModel", "attach", "branches", "correlation", "deployed_agreement", "exactness", "export_model",
    "head_arrays", "ir_gradcam", "torch_gradcam", "write_head",
]


def _resnet_trunk(m: nn.Module) -> nn.Module:
    return nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool, m.layer1, m.layer2, m.layer3, m.layer4)


class _TimmFeatures(nn.Module):
    def __init__(self, m: nn.Module) -> None:
        super().__init__()
        self.m = m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.m.forward_features(x)


def _branch(kind_module: nn.Module) -> tuple[str, nn.Module] | None:
    """(output name, trunk returning the last feature maps) of one pooled backbone, or None."""
    import torchvision

    if isinstance(kind_module, torchvision.models.ResNet):
        return "features_resnet50", _resnet_trunk(kind_module)
    if isinstance(kind_module, torchvision.models.MobileNetV2):
        return "features_mobilenet_v2", kind_module.features
    if hasattr(kind_module, "forward_features") and type(kind_module).__name__ == "MobileNet":
        return "features_mobilenet_v1", _TimmFeatures(kind_module)
    return None


def branches(model: nn.Module) -> list[tuple[str, nn.Module]] | None:
    """The model's branches in feature-concat order, or None when it is not a model this knows.

    Known: ``HybridNet``, ``SingleNet``, and any module with a ``heatmap_branches()`` method
    returning ``[(output name, trunk), ...]`` whose forward is ``head(concat(GAP(trunk(x))))``
    (the parity gates check that claim)."""
    from training.models import HybridNet, SingleNet

    own = getattr(model, "heatmap_branches", None)
    if callable(own):  # any model that names its branches itself (the conversion tests' tiny hybrid)
        return list(own())
    if isinstance(model, HybridNet):
        parts = [_branch(model.resnet), _branch(model.mobilenet)]
    elif isinstance(model, SingleNet):
        parts = [_branch(model.backbone)]
    else:
        return None
    if any(p is None for p in parts):
        return None
    return [p for p in parts if p is not None]


def head_arrays(model: nn.Module) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """``(w1, b1, w2, b2)`` of the head (``nn.Linear`` layout), or ``(w, b, None, None)`` for one layer."""
    linears = [m for m in model.head if isinstance(m, nn.Linear)]
    arr = [(m.weight.detach().double().numpy(), m.bias.detach().double().numpy()) for m in linears]
    if len(arr) == 2:
        return arr[0][0], arr[0][1], arr[1][0], arr[1][1]
    if len(arr) == 1:
        return arr[0][0], arr[0][1], None, None
    raise ValueError(f"head with {len(arr)} linear layers is not supported")


class FeatureMapModel(nn.Module):
    """``x -> (softmax(head(concat(GAP(A_b)))), A_1, ..., A_B)``; ``logits=True`` returns logits first."""

    def __init__(self, model: nn.Module, parts: list[tuple[str, nn.Module]], *, logits: bool = False) -> None:
        super().__init__()
        self.names = [n for n, _ in parts]
        self.trunks = nn.ModuleList([t for _, t in parts])
        self.head = model.head
        self.logits = logits

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        maps = [t(x) for t in self.trunks]
        z = self.head(torch.cat([a.mean(dim=(2, 3)) for a in maps], dim=1))
        return (z if self.logits else torch.softmax(z, dim=1), *maps)


def export_model(model: nn.Module, example: torch.Tensor | None = None) -> tuple[nn.Module | None, list[str]]:
    """The module to export with heatmap outputs and their names, or ``(None, [])`` (log line) when
    the model is not one whose branches are known, or when (checked on ``example``, when given)
    the rebuilt forward does not reproduce the model's probabilities (a wrapped or modified model,
    e.g. one prepared for quantisation-aware training): then the model is exported as it is."""
    parts = branches(model)
    if parts is None:
        log.warning("heatmaps: %s is not a hybrid/single-backbone model; exported without feature-map outputs",
                    type(model).__name__)
        return None, []
    fm = FeatureMapModel(model, parts).eval()
    if example is not None:  # compare logits: saturated probabilities would hide a difference
        with torch.no_grad():
            want = model(example)
            got = FeatureMapModel(model, parts, logits=True).eval()(example)[0]
        diff = float((want - got).abs().max()) if want.shape == got.shape else float("inf")
        scale = max(1.0, float(want.abs().max())) if want.numel() else 1.0
        if not diff <= 1e-4 * scale:
            log.warning("heatmaps: the feature-map forward of %s differs from its own (max |logit diff| %.3g); "
                        "exported without feature-map outputs", type(model).__name__, diff)
            return None, []
    return fm, [n for n, _ in parts]


def write_head(model_dir: str | os.PathLike[str], model: nn.Module, ir_outputs: list[str]) -> dict[str, Any] | None:
    """``heatmap.npz`` into ``model_dir`` and the card block, when the IR has the feature-map outputs."""
    parts = branches(model)
    if parts is None:
        return None
    names = [n for n, _ in parts]
    if any(n not in ir_outputs for n in names):
        log.warning("heatmaps: the IR in %s lacks outputs %s; no heatmap.npz written", model_dir, names)
        return None
    w1, b1, w2, b2 = head_arrays(model)
    return wheat.write_head(model_dir, names, w1, b1, w2, b2)


def ir_output_names(xml: str | os.PathLike[str]) -> list[str]:
    """Every tensor name of every output of the IR at ``xml``."""
    import openvino as ov

    m = ov.Core().read_model(str(xml))
    return sorted({n for o in m.outputs for n in o.get_names()})


def torch_gradcam(model: nn.Module, x: np.ndarray, classes: list[int]) -> np.ndarray:
    """Reference Grad-CAM by autograd: ``(N, len(classes), H, W)`` float64 in [0, 1].

    For each image and class: ``backward`` of the class logit to the branches' last feature maps,
    channel weights = spatial mean of the gradient, weighted sum of the maps, bilinear upsampling
    to the input (``align_corners=False``), summed over branches, ReLU, divided by the maximum."""
    parts = branches(model)
    if parts is None:
        raise ValueError(f"{type(model).__name__}: no known branches for Grad-CAM")
    fm = FeatureMapModel(model, parts, logits=True).eval()
    h, w = x.shape[2:]
    out = np.zeros((x.shape[0], len(classes), h, w))
    for i in range(x.shape[0]):
        xi = torch.from_numpy(np.ascontiguousarray(x[i : i + 1], dtype=np.float32))
        z, *maps = fm(xi)
        for maps_t in maps:
            maps_t.retain_grad()
        for j, c in enumerate(classes):
            for maps_t in maps:
                maps_t.grad = None
            z[0, c].backward(retain_graph=True)
            total = torch.zeros(1, 1, h, w, dtype=torch.float64)
            for a in maps:
                alpha = a.grad.double().mean(dim=(2, 3), keepdim=True)
                cam = (alpha * a.detach().double()).sum(dim=1, keepdim=True)
                total += torch.nn.functional.interpolate(cam, size=(h, w), mode="bilinear", align_corners=False)
            total = torch.relu(total)[0, 0].numpy()
            peak = total.max()
            out[i, j] = total / peak if peak > 0 else total
    return out


def ir_gradcam(model_dir: str | os.PathLike[str], x: np.ndarray, classes: list[int], precision: str | None = None) -> np.ndarray:
    """The worker's Grad-CAM (Engine.infer_maps + worker.heatmap.gradcam): ``(N, len(classes), H, W)``."""
    from worker.engine import Engine

    eng = Engine(Path(model_dir), precision=precision)
    if eng.heatmap is None:
        raise RuntimeError(f"{model_dir}: {eng.heatmap_unavailable}")
    _, maps = eng.infer_maps(x)
    size = (int(x.shape[2]), int(x.shape[3]))
    return np.stack([wheat.gradcam(eng.heatmap, m, classes, size) for m in maps]).astype(np.float64)


def attach(model_dir: str | os.PathLike[str], model: nn.Module) -> dict[str, Any] | None:
    """:func:`write_head` for the IR already saved in ``model_dir``: the card block, or None."""
    return write_head(model_dir, model, ir_output_names(Path(model_dir) / "model.xml"))


def _compiled_maps(compiled: Any, x: np.ndarray, names: tuple[str, ...]) -> list[list[np.ndarray]]:
    req = compiled.create_infer_request()
    out = []
    for i in range(x.shape[0]):
        res = req.infer({0: np.ascontiguousarray(x[i : i + 1], dtype=np.float32)})
        by_name = {n: v for port, v in res.items() for n in port.get_names()}
        out.append([np.array(by_name[n][0]) for n in names])
    return out


def exactness(model: nn.Module, compiled_fp32: Any, model_dir: str | os.PathLike[str], x: np.ndarray,
              n_classes: int) -> dict[str, Any]:
    """The ``heatmap_exact`` measurement: the worker's Grad-CAM (``worker.heatmap.gradcam``, the head
    read back from ``model_dir``'s card and ``heatmap.npz``) on the feature maps of the exported FP32
    graph (``compiled_fp32``, f32 hint) against :func:`torch_gradcam`: max |difference| of the
    normalised maps over the images of ``x`` and every class.  ``reference`` is kept for
    :func:`deployed_agreement`."""
    from worker.modelcard import ModelCard

    head = wheat.load(ModelCard.load(model_dir, verify_hash=False))
    classes = list(range(n_classes))
    ref = torch_gradcam(model, x, classes)
    size = (int(x.shape[2]), int(x.shape[3]))
    got = np.stack([wheat.gradcam(head, m, classes, size) for m in _compiled_maps(compiled_fp32, x, head.outputs)])
    diff = np.abs(got.astype(np.float64) - ref)
    return {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()), "images": int(x.shape[0]),
            "classes": n_classes, "reference": ref}


def deployed_agreement(model_dir: str | os.PathLike[str], precision: str, x: np.ndarray, reference: np.ndarray) -> dict[str, Any]:
    """How close the heatmaps of a written model directory (through the worker's Engine, at
    ``precision``) are to torch's: max and mean |difference| and mean Pearson correlation (recorded
    in the report, not gated: FP16 weights and INT8 backbones change the maps by design)."""
    got = ir_gradcam(model_dir, x, list(range(reference.shape[1])), precision=precision)
    diff = np.abs(got - reference)
    return {"precision": precision, "images": int(x.shape[0]), "max_abs_diff": float(diff.max()),
            "mean_abs_diff": float(diff.mean()), "correlation": correlation(got, reference)}


def correlation(a: np.ndarray, b: np.ndarray) -> float | None:
    """Mean over maps of the Pearson correlation of two stacks of heatmaps ``(..., H, W)``."""
    a2 = a.reshape(-1, a.shape[-2] * a.shape[-1])
    b2 = b.reshape(-1, b.shape[-2] * b.shape[-1])
    r = []
    for u, v in zip(a2, b2, strict=True):
        if u.std() > 0 and v.std() > 0:
            r.append(float(np.corrcoef(u, v)[0, 1]))
    return float(np.mean(r)) if r else None  # type: ignore[return-value]  # no map varies: undefined (JSON null)
