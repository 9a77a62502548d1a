"""The conversion gates: each one a measured value against a stated limit.

A conversion is only accepted when every gate it ran passes; otherwise :class:`GateError` is
raised with one line per failed gate naming the gate, the measured value and the limit, and
``cxr-triage convert`` exits non-zero.  There is no option to skip the gates.

Gates (issue 4):

* ``parity_fp32``: max |softmax(torch) - IR| over 32 real images, FP32 IR compiled with
  ``INFERENCE_PRECISION_HINT=f32``: <= 1e-4.
* ``parity_fp16``: the same for the FP16-compressed IR (f32 compute): <= 1e-3.
* ``int8_agreement``: top-1 agreement of the INT8 IR with torch on the test split: >= 0.99.
* ``int8_accuracy_drop``: torch accuracy - INT8 accuracy on the test split: <= 0.01.
* ``bf16_agreement`` / ``bf16_accuracy_drop``: the same limits, when bf16 is the deployed precision.
* ``worker_reproduces``: the worker's ``Engine`` loads the written model directory (card,
  hash check, precision from the card) and, through the worker's DICOM preprocessing path,
  reproduces the card's test metrics (accuracy, balanced accuracy, macro-F1) within 0.005.
* ``heatmap_exact`` (issue 17, ``conversion.heatmap``): the worker's analytic Grad-CAM on the
  exported FP32 graph's feature maps against torch autograd Grad-CAM, 8 test images x every
  class, max |difference| of the maps normalised to [0, 1]: <= 1e-3.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = [
    "LIMITS",
    "Gate",
    "GateError",
    "agreement",
    "check",
    "max_abs_diff",
    "raise_if_failed",
]

#: name -> (limit, "<=" or ">=")
LIMITS: dict[str, tuple[float, str]] = {
    "parity_fp32": (1e-4, "<="),
    "parity_fp16": (1e-3, "<="),
    "int8_agreement": (0.99, ">="),
    "int8_accuracy_drop": (0.01, "<="),
    "bf16_agreement": (0.99, ">="),
    "bf16_accuracy_drop": (0.01, "<="),
    "worker_reproduces": (0.005, "<="),
    "heatmap_exact": (1e-3, "<="),
}

_WHAT = {
    "parity_fp32": "max |softmax diff| torch vs FP32 IR (f32 hint)",
    "parity_fp16": "max |softmax diff| torch vs FP16 IR (f32 hint)",
    "int8_agreement": "top-1 agreement INT8 IR vs torch, test split",
    "int8_accuracy_drop": "accuracy drop torch -> INT8 IR, test split",
    "bf16_agreement": "top-1 agreement bf16 vs torch, test split",
    "bf16_accuracy_drop": "accuracy drop torch -> bf16, test split",
    "worker_reproduces": "max |metric diff| worker Engine (DICOM path) vs card, test split",
    "heatmap_exact": "max |normalised Grad-CAM diff| worker (analytic) vs torch autograd",
}


@dataclass(frozen=True)
class Gate:
    name: str
    value: float
    limit: float
    op: str
    passed: bool
    detail: str = ""

    def line(self) -> str:
        status = "PASS" if self.passed else "FAIL"
        extra = f" ({self.detail})" if self.detail else ""
        return f"gate {self.name} {status}: {_WHAT.get(self.name, self.name)} = {self.value:.6g}, limit {self.op} {self.limit:g}{extra}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class GateError(RuntimeError):
    """One or more gates failed; ``gates`` holds every gate that ran (passed and failed)."""

    def __init__(self, gates: Iterable[Gate]) -> None:
        self.gates = list(gates)
        failed = [g for g in self.gates if not g.passed]
        hint = ""
        if any(g.name == "parity_fp16" for g in failed) and not any(g.name == "parity_fp32" for g in failed):
            hint = "\n  (FP32 parity holds: the FP16 weight compression is what loses precision; convert with --fp32)"
        super().__init__("conversion rejected, gate(s) missed:\n  " + "\n  ".join(g.line() for g in failed) + hint)


def check(name: str, value: float, detail: str = "", *, limit: float | None = None) -> Gate:
    """Compare ``value`` with the gate's limit (``limit`` overrides it; tests only).  NaN always fails."""
    lim, op = LIMITS[name]
    lim = lim if limit is None else limit
    v = float(value)
    ok = bool(np.isfinite(v)) and (v <= lim if op == "<=" else v >= lim)
    return Gate(name, v, lim, op, ok, detail)


def raise_if_failed(gates: Iterable[Gate]) -> None:
    gates = list(gates)
    if any(not g.passed for g in gates):
        raise GateError(gates)


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("inf")
    return float(np.abs(a - b).max()) if a.size else 0.0


def agreement(p: np.ndarray, q: np.ndarray) -> float:
    """Share of rows with the same argmax."""
    return float((np.asarray(p).argmax(axis=1) == np.asarray(q).argmax(axis=1)).mean())
