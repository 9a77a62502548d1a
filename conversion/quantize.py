"""INT8 post-training quantisation of the OpenVINO model with NNCF.

* :func:`quantize_int8`: ``nncf.quantize`` (min-max statistics + fast bias correction) on a
  calibration subset of the TRAINING split, preprocessed by the worker's own code
  (:mod:`conversion.data`).  The FP32 ``ov.Model`` is quantised (not the torch module), so the
  quantised graph is the exported graph plus FakeQuantize nodes.  The pipeline passes a copy
  reshaped to a static ``[1, C, H, W]`` (the shape the worker runs; see ``conversion.convert``
  for the OpenVINO 2026.4 dynamic-batch INT8 problem this avoids).
* :func:`quantize_int8_with_accuracy_control`: ``nncf.quantize_with_accuracy_control``, used by
  the pipeline only when the plain result misses the INT8 gate.  Its metric is top-1
  AGREEMENT with torch on the VALIDATION split (never the test split, which the gate reads), and
  ``max_drop`` is an absolute drop of that agreement: the float model agrees with itself (1.0),
  so ``max_drop=0.005`` asks for >= 99.5 % agreement on validation, a margin over the 99 % gate
  (and agreement >= 99 % bounds the accuracy drop by 1 point, the second INT8 gate).  NNCF
  then reverts the most harmful quantised layers to float until the metric is met.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import nncf
import numpy as np
import openvino as ov

log = logging.getLogger(__name__)

__all__ = ["FLOAT_PARTS", "float_scope", "quantize_int8", "quantize_int8_with_accuracy_control"]

#: Parts of the hybrid that ``--int8-float`` can keep in float (mixed precision).
FLOAT_PARTS = ("resnet", "mobilenet", "head")
_COMPUTE = ("Convolution", "GroupConvolution", "MatMul")


def float_scope(ov_model: ov.Model, parts: Iterable[str]) -> nncf.IgnoredScope | None:
    """The compute operations of ``parts`` of the hybrid, for NNCF to leave in float.

    Found by the graph, not by names (the exporter folds BatchNorm into the convolutions and
    renames them): the concatenation of the two pooled feature vectors has one input per
    branch, named after the branch's module (``...model.resnet/...``, ``...model.mobilenet/...``);
    a branch is everything upstream of its input, the head everything downstream of the concat.
    """
    parts = list(parts)
    unknown = sorted(set(parts) - set(FLOAT_PARTS))
    if unknown:
        raise ValueError(f"--int8-float: unknown part(s) {', '.join(unknown)} (choose from {', '.join(FLOAT_PARTS)})")
    if not parts:
        return None
    concats = [op for op in ov_model.get_ops() if op.get_type_name() == "Concat"]
    if len(concats) != 1:
        raise ValueError(f"--int8-float needs the hybrid (one feature concatenation), found {len(concats)} Concat ops")
    cat = concats[0]

    def walk(start: list[Any], follow: Any) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        stack = list(start)
        while stack:
            n = stack.pop()
            name = n.get_friendly_name()
            if name in seen or n.get_type_name() in ("Parameter", "Result"):
                continue
            seen[name] = n
            stack += follow(n)
        return seen

    def upstream(n: Any) -> list[Any]:
        return [i.get_source_output().get_node() for i in n.inputs()]

    def downstream(n: Any) -> list[Any]:
        return [t.get_node() for out in n.outputs() for t in out.get_target_inputs()]

    def labels(nodes: dict[str, Any]) -> str:
        """Friendly names and output tensor names: the exporter keeps the branch's module path in
        some of them (``__module.model.mobilenet.features...``, ``features_mobilenet_v2``)."""
        return " ".join([*nodes, *(t for n in nodes.values() for o in n.outputs() for t in o.get_names())])

    branches = [walk([i.get_source_output().get_node()], upstream) for i in cat.inputs()]
    names: set[str] = set()
    for part in parts:
        if part == "head":
            nodes = walk(downstream(cat), downstream)
        else:
            hits = [b for b in branches if any(f"{sep}{part}" in labels(b) for sep in "._")]
            if len(hits) != 1:
                raise ValueError(f"--int8-float {part}: no single branch of that name feeds the feature concatenation")
            nodes = hits[0]
        names |= {name for name, n in nodes.items() if n.get_type_name() in _COMPUTE}
    log.info("INT8 mixed precision: %d compute operations of %s stay in float", len(names), "+".join(parts))
    return nncf.IgnoredScope(names=sorted(names))


def _items(x: np.ndarray) -> list[np.ndarray]:
    return [np.ascontiguousarray(x[i : i + 1], dtype=np.float32) for i in range(x.shape[0])]


def quantize_int8(ov_model: ov.Model, calibration: np.ndarray, *, preset: str = "performance",
                  ignored_scope: nncf.IgnoredScope | None = None) -> ov.Model:
    """Plain NNCF PTQ of ``ov_model`` with every image of ``calibration`` (N, C, H, W).

    ``preset``: ``"performance"`` (symmetric weights and activations, fastest kernels) or
    ``"mixed"`` (asymmetric activations; helps models with non-negative/shifted activations).
    """
    n = int(calibration.shape[0])
    if n == 0:
        raise ValueError("INT8 quantisation needs at least one calibration image")
    qp = nncf.QuantizationPreset.MIXED if preset == "mixed" else nncf.QuantizationPreset.PERFORMANCE
    log.info("nncf.quantize: %d calibration images, preset %s", n, preset)
    kw: dict[str, Any] = {"ignored_scope": ignored_scope} if ignored_scope is not None else {}
    return nncf.quantize(ov_model, nncf.Dataset(_items(calibration)), preset=qp, subset_size=n, **kw)


def quantize_int8_with_accuracy_control(
    ov_model: ov.Model,
    calibration: np.ndarray,
    validation: np.ndarray,
    reference_top1: np.ndarray,
    *,
    max_drop: float = 0.005,
    preset: str = "performance",
    max_num_iterations: int | None = None,
    ignored_scope: nncf.IgnoredScope | None = None,
) -> ov.Model:
    """Accuracy-aware PTQ: keep agreement with ``reference_top1`` (torch's top-1 on ``validation``) within ``max_drop``."""
    ref = np.asarray(reference_top1, dtype=np.int64)
    val_items = [(x, int(t)) for x, t in zip(_items(validation), ref, strict=True)]

    def validate(compiled: Any, data: Iterable[tuple[np.ndarray, int]]) -> tuple[float, list[float]]:
        out = compiled.outputs[0]
        per_item: list[float] = []
        for x, t in data:
            p = compiled(x)[out]
            per_item.append(float(int(np.argmax(p[0])) == t))
        return (float(np.mean(per_item)) if per_item else 0.0), per_item

    qp = nncf.QuantizationPreset.MIXED if preset == "mixed" else nncf.QuantizationPreset.PERFORMANCE
    restorer: dict[str, Any] = {"ignored_scope": ignored_scope} if ignored_scope is not None else {}
    if max_num_iterations is not None:
        restorer["advanced_accuracy_restorer_parameters"] = nncf.AdvancedAccuracyRestorerParameters(
            max_num_iterations=max_num_iterations
        )
    log.info(
        "nncf.quantize_with_accuracy_control: %d calibration, %d validation images, max agreement drop %.3f",
        calibration.shape[0], len(val_items), max_drop,
    )
    return nncf.quantize_with_accuracy_control(
        ov_model,
        nncf.Dataset(_items(calibration)),
        nncf.Dataset(val_items, lambda item: item[0]),
        validate,
        max_drop=max_drop,
        drop_type=nncf.DropType.ABSOLUTE,
        preset=qp,
        subset_size=int(calibration.shape[0]),
        **restorer,
    )
