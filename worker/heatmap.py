"""Grad-CAM heatmaps of the deployed model, computed exactly without autograd (no torch).

Why this is exact and cheap
---------------------------
The hybrid (``training.models.HybridNet``) is ``z = head(concat(GAP(A_1), ..., GAP(A_B)))``:
each branch ``b`` ends in feature maps ``A_b`` of shape ``(C_b, h_b, w_b)``, global average
pooling gives ``f_b = mean_ij A_b[:, i, j]``, and the head is
``z = W2 relu(W1 f + b1) + b2`` (dropout is the identity at inference).  Grad-CAM
(Selvaraju et al., ICCV 2017) weights the channels of a layer by the spatial mean of the
gradient of the class score ``z_c`` (the logit, before softmax) with respect to that layer.
Here the gradient has a closed form:

* ``dz_c / df = W1^T (m * W2[c])`` with ``m = [W1 f + b1 > 0]``, the hidden layer's ReLU
  activation pattern (the derivative of ReLU, 0 at exactly 0 as in torch);
* ``dz_c / dA_b[k, i, j] = (dz_c / df_b[k]) / (h_b w_b)`` (GAP spreads the gradient evenly), so
  the Grad-CAM channel weight ``alpha_b[k]`` (spatial mean of that gradient) is the same number.

Each branch's map is ``sum_k alpha_b[k] A_b[k]``; the branches are upsampled to the network
input (bilinear, half-pixel centres: ``torch.nn.functional.interpolate(mode="bilinear",
align_corners=False)``), summed, passed through ReLU and divided by their maximum.  Summing
before the ReLU is Grad-CAM of the concatenated feature layer; a map that is 0 everywhere stays 0.
A head without a hidden layer (``W``, ``b`` only) is the special case ``dz_c/df = W[c]``.

What the model directory provides (written by ``conversion.heatmap``)
--------------------------------------------------------------------
* the IR has, besides its class output, one extra output per branch holding ``A_b``
  (``[N, C_b, h_b, w_b]``);
* ``heatmap.npz`` beside the IR holds the head: ``w1`` ``(H, F)``, ``b1`` ``(H,)``,
  ``w2`` ``(K, H)``, ``b2`` ``(K,)`` (torch ``nn.Linear`` layout; ``F = sum C_b``, ``K`` classes), or
  ``w``/``b`` for a one-layer head;
* the card's ``heatmap`` block names both::

      "heatmap": {"method": "grad-cam (analytic head gradient)", "file": "heatmap.npz",
                  "sha256": "<hex of heatmap.npz>",
                  "outputs": ["features_resnet50", "features_mobilenet_v2"]}

A model without that block or without those outputs (an IR converted before issue 17, or a
foreign one) has no heatmaps: :func:`load` raises :class:`HeatmapUnavailable` with a sentence
that says why, and the worker logs it and carries on without heatmaps.

Cost: one ``(H x F)`` matrix-vector product and one ``(C_b x h_b w_b)`` product per branch and
class, plus two small interpolation matrix products: well under a millisecond per image for the
hybrid at 224 px (measured by ``bench/heatmap_cost.py``), next to ~100 ms of inference.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

__all__ = [
    "CARD_KEY",
    "HEAD_FILE",
    "METHOD",
    "Head",
    "HeatmapUnavailable",
    "cam_classes",
    "gradcam",
    "load",
    "upsample_matrix",
    "write_head",
]

CARD_KEY = "heatmap"
HEAD_FILE = "heatmap.npz"
METHOD = "grad-cam (analytic head gradient)"


class HeatmapUnavailable(RuntimeError):
    """This model directory cannot give heatmaps; the message says why (in one sentence)."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class Head:
    """The classifier head and the names of the feature-map outputs, as read from a model directory."""

    outputs: tuple[str, ...]  # IR output names, branch order (the concat order of the features)
    w1: np.ndarray  # (H, F) float64, or (K, F) for a one-layer head
    b1: np.ndarray  # (H,) or (K,)
    w2: np.ndarray | None  # (K, H) or None (one-layer head)
    b2: np.ndarray | None

    @property
    def n_features(self) -> int:
        return int(self.w1.shape[1])

    @property
    def n_classes(self) -> int:
        return int((self.w2 if self.w2 is not None else self.w1).shape[0])

    def logits(self, pooled: np.ndarray) -> np.ndarray:
        """``(N, F)`` pooled features -> ``(N, K)`` class scores (float64)."""
        h: np.ndarray = pooled @ self.w1.T + self.b1
        if self.w2 is None:
            return h
        z: np.ndarray = np.maximum(h, 0.0) @ self.w2.T + self.b2
        return z

    def score_gradients(self, pooled: np.ndarray, classes: Sequence[int]) -> np.ndarray:
        """``dz_c/df`` for one image: ``(F,)`` pooled features -> ``(len(classes), F)``."""
        idx = np.asarray(classes, dtype=np.int64)
        if self.w2 is None:
            g: np.ndarray = self.w1[idx]
            return g
        mask = (self.w1 @ pooled + self.b1) > 0.0  # the hidden ReLU's activation pattern
        grad: np.ndarray = (self.w2[idx] * mask[None, :]) @ self.w1
        return grad


def write_head(
    model_dir: str | os.PathLike[str],
    outputs: Sequence[str],
    w1: np.ndarray,
    b1: np.ndarray,
    w2: np.ndarray | None = None,
    b2: np.ndarray | None = None,
) -> dict[str, Any]:
    """Write ``heatmap.npz`` into ``model_dir``; returns the card's ``heatmap`` block (with its sha256).

    The arrays are stored as float32 (the precision of the trained head)."""
    d = Path(model_dir)
    arrays: dict[str, np.ndarray] = {}
    if w2 is None:
        arrays.update(w=np.asarray(w1, np.float32), b=np.asarray(b1, np.float32))
    else:
        arrays.update(
            w1=np.asarray(w1, np.float32),
            b1=np.asarray(b1, np.float32),
            w2=np.asarray(w2, np.float32),
            b2=np.asarray(b2, np.float32),
        )
    path = d / HEAD_FILE
    with open(path, "wb") as f:  # np.savez_compressed(path) would append ".npz" to other names
        np.savez(f, **arrays)  # type: ignore[arg-type]  # numpy's stub types **kwds as the allow_pickle flag
    return {"method": METHOD, "file": HEAD_FILE, "sha256": _sha256(path), "outputs": list(outputs)}


def load(card: Any, ir_output_names: Sequence[set[str]] | None = None) -> Head:
    """The :class:`Head` of a loaded :class:`worker.modelcard.ModelCard`.

    ``ir_output_names``: the tensor names of each IR output (to check that the feature-map
    outputs exist).  Raises :class:`HeatmapUnavailable` (never anything else for a bad card
    block or file) when the model cannot give heatmaps.
    """
    where = str(getattr(card, "card_path", "model.json"))
    block = card.raw.get(CARD_KEY)
    if block is None:
        raise HeatmapUnavailable(
            f"{where} has no '{CARD_KEY}' block: this model was converted without heatmap outputs "
            "(convert it again with cxr-triage convert to get them)"
        )
    if not isinstance(block, Mapping):
        raise HeatmapUnavailable(f"{where}: {CARD_KEY} must be an object")
    outputs = block.get("outputs")
    if not isinstance(outputs, list) or not outputs or not all(isinstance(o, str) and o for o in outputs):
        raise HeatmapUnavailable(f"{where}: {CARD_KEY}.outputs must be a non-empty list of IR output names")
    name = block.get("file", HEAD_FILE)
    if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
        raise HeatmapUnavailable(f"{where}: {CARD_KEY}.file must be a file name inside the model directory")
    path = Path(card.xml_path).parent / name
    if not path.is_file():
        raise HeatmapUnavailable(f"{where}: {CARD_KEY}.file {name} is missing from {Path(card.xml_path).parent}")
    sha = block.get("sha256")
    if sha is not None and _sha256(path) != sha:
        raise HeatmapUnavailable(f"{where}: {path} does not match {CARD_KEY}.sha256 (wrong or corrupted head file)")
    if ir_output_names is not None:
        known = set().union(*ir_output_names) if ir_output_names else set()
        missing = [o for o in outputs if o not in known]
        if missing:
            raise HeatmapUnavailable(
                f"{where}: the IR has no output(s) {', '.join(missing)} named in {CARD_KEY}.outputs"
            )
    try:
        with np.load(path, allow_pickle=False) as z:
            arr = {k: np.asarray(z[k], dtype=np.float64) for k in z.files}
    except Exception as exc:  # noqa: BLE001 - any unreadable file is "no heatmaps", said clearly
        raise HeatmapUnavailable(f"{where}: cannot read {path}: {type(exc).__name__}: {exc}") from None
    need: tuple[str, ...] = ("w1", "b1", "w2", "b2") if "w1" in arr else ("w", "b")
    if any(k not in arr for k in need):
        raise HeatmapUnavailable(f"{path}: needs arrays {', '.join(need)} (has {', '.join(sorted(arr))})")
    w1, b1 = (arr["w1"], arr["b1"]) if "w1" in arr else (arr["w"], arr["b"])
    w2, b2 = (arr["w2"], arr["b2"]) if "w1" in arr else (None, None)
    ok = w1.ndim == 2 and b1.shape == (w1.shape[0],)
    if w2 is not None:
        ok = ok and w2.ndim == 2 and w2.shape[1] == w1.shape[0] and b2 is not None and b2.shape == (w2.shape[0],)
    if not ok:
        raise HeatmapUnavailable(f"{path}: head arrays have inconsistent shapes")
    head = Head(tuple(outputs), w1, b1, w2, b2)
    n_classes = len(getattr(card, "classes", ()) or ())
    if n_classes and head.n_classes != n_classes:
        raise HeatmapUnavailable(f"{path}: head has {head.n_classes} classes, {where} has {n_classes}")
    return head


@functools.lru_cache(maxsize=32)
def upsample_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``(n_out, n_in)`` bilinear interpolation matrix with half-pixel centres (torch
    ``interpolate(mode="bilinear", align_corners=False)``: source coordinate
    ``(i + 0.5) n_in / n_out - 0.5``, clamped at 0; the upper neighbour clamped at the edge)."""
    m = np.zeros((n_out, n_in), dtype=np.float64)
    scale = n_in / n_out
    for i in range(n_out):
        src = max((i + 0.5) * scale - 0.5, 0.0)
        i0 = min(int(np.floor(src)), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        lam = src - i0
        m[i, i0] += 1.0 - lam
        m[i, i1] += lam
    m.flags.writeable = False
    return m


def gradcam(head: Head, maps: Sequence[np.ndarray], classes: Sequence[int], size: tuple[int, int]) -> np.ndarray:
    """Grad-CAM of one image for each class in ``classes``: ``(len(classes), H, W)`` float32 in [0, 1].

    ``maps``: the image's feature maps, one ``(C_b, h_b, w_b)`` array per branch in
    ``head.outputs`` order; ``size``: the network input ``(H, W)``.  Each map is divided by its
    maximum (a class with no positive evidence anywhere gives all zeros).
    """
    feats = [np.asarray(a, dtype=np.float64).reshape(a.shape[-3], a.shape[-2], a.shape[-1]) for a in maps]
    pooled = np.concatenate([a.mean(axis=(1, 2)) for a in feats])
    if pooled.shape[0] != head.n_features:
        raise ValueError(f"feature maps give {pooled.shape[0]} pooled features, the head expects {head.n_features}")
    grads = head.score_gradients(pooled, classes)  # (n, F)
    h, w = size
    out = np.zeros((len(classes), h, w), dtype=np.float64)
    at = 0
    for a in feats:
        c, hb, wb = a.shape
        alpha = grads[:, at : at + c] / float(hb * wb)  # spatial mean of dz/dA (GAP spreads it evenly)
        at += c
        cam = (alpha @ a.reshape(c, hb * wb)).reshape(-1, hb, wb)
        out += upsample_matrix(hb, h) @ cam @ upsample_matrix(wb, w).T
    out = np.maximum(out, 0.0)
    peak = out.reshape(len(classes), -1).max(axis=1)
    out /= np.where(peak > 0, peak, 1.0)[:, None, None]
    return out.astype(np.float32)


def cam_classes(
    probabilities: Mapping[str, float], thresholds: Mapping[str, float], classes: Sequence[str]
) -> list[str]:
    """The classes a heatmap is shown for: the predicted class first, then every thresholded
    class (COVID-19, pneumonia) whose probability reaches its threshold, in card order."""
    predicted = max(classes, key=lambda c: probabilities[c])
    out = [predicted]
    for c in classes:
        t = thresholds.get(c)
        if c != predicted and t is not None and probabilities[c] >= t:
            out.append(c)
    return out
