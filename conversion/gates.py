"""The conversion gates: each one a measured value against a stated limit.

A conversion is only accepted when every gate it ran passes; otherwise :class:`GateError` is
raised with one line per failed gate naming the gate, the measured value and the limit, and
``cxr-triage convert`` exits non-zero.  There is no option to skip the gates.

Gates (issue 4):

* ``parity_fp32``: max |softmax(torch) - IR| over 32 real images, FP32 IR compiled with
  ``INFERENCE_PRECISION_HINT=f32``: <= 1e-4.
* Candidate gates (issue 14), one set per lower-precision candidate ``P`` (``fp16``: the
  FP16-compressed weights; ``bf16``: bf16 compute; ``int8``: the INT8 IR, from PTQ or QAT),
  each the float model (torch, equal to the FP32 IR within ``parity_fp32``) against the
  candidate on the TEST split, each at its own operating thresholds calibrated on the
  validation split with its own scores (:func:`candidate_measures`):

  - ``P_accuracy_drop``: float accuracy - candidate accuracy: <= 0.005;
  - ``P_adult_accuracy_drop``: the same on the adults (``age_group`` adult): <= 0.01;
  - ``P_macro_auroc_drop``: float macro AUROC (one-vs-rest, mean over classes) - candidate's: <= 0.005;
  - ``P_<class>_sensitivity_drop`` for each thresholded class (COVID-19, pneumonia): float
    sensitivity at its thresholds - candidate's at its thresholds: <= 0.01;
  - ``P_agreement``: top-1 agreement candidate vs float: >= 0.97.

  The largest softmax difference stays in the report as a figure, not a gate: a few
  probabilities near a tie may move a lot without changing what a user relies on.
* ``worker_reproduces``: the worker's ``Engine`` loads the written model directory (card,
  hash check, precision from the card) and, through the worker's DICOM preprocessing path,
  reproduces the card's test metrics (accuracy, balanced accuracy, macro-F1) within 0.005.
* ``heatmap_exact`` (issue 17, ``conversion.heatmap``): the worker's analytic Grad-CAM on the
  exported FP32 graph's feature maps against torch autograd Grad-CAM, 8 test images x every
  class, max |difference| of the maps normalised to [0, 1]: <= 1e-3.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = [
    "LIMITS",
    "Gate",
    "GateError",
    "CANDIDATES",
    "CANDIDATE_LIMITS",
    "agreement",
    "candidate_gates",
    "candidate_measures",
    "check",
    "limit_of",
    "max_abs_diff",
    "raise_if_failed",
]

#: name -> (limit, "<=" or ">=")
LIMITS: dict[str, tuple[float, str]] = {
    "parity_fp32": (1e-4, "<="),
    "worker_reproduces": (0.005, "<="),
    "heatmap_exact": (1e-3, "<="),
}

#: Candidate precisions (the prefix of a candidate gate's name).
CANDIDATES = ("fp16", "bf16", "int8")

#: candidate gate suffix -> (limit, op); ``sensitivity_drop`` applies per thresholded class.
CANDIDATE_LIMITS: dict[str, tuple[float, str]] = {
    "accuracy_drop": (0.005, "<="),
    "adult_accuracy_drop": (0.01, "<="),
    "macro_auroc_drop": (0.005, "<="),
    "sensitivity_drop": (0.01, "<="),
    "agreement": (0.97, ">="),
}

_CANDIDATE_WHAT = {
    "accuracy_drop": "accuracy drop float -> {p}, test split",
    "adult_accuracy_drop": "adults' accuracy drop float -> {p}, test split",
    "macro_auroc_drop": "macro AUROC drop float -> {p}, test split",
    "sensitivity_drop": "{c} sensitivity drop float -> {p} at their own thresholds, test split",
    "agreement": "top-1 agreement {p} vs float, test split",
}

_WHAT = {
    "parity_fp32": "max |softmax diff| torch vs FP32 IR (f32 hint)",
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
        return f"gate {self.name} {status}: {_what(self.name)} = {self.value:.6g}, limit {self.op} {self.limit:g}{extra}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class GateError(RuntimeError):
    """One or more gates failed; ``gates`` holds every gate that ran (passed and failed)."""

    def __init__(self, gates: Iterable[Gate]) -> None:
        self.gates = list(gates)
        failed = [g for g in self.gates if not g.passed]
        hint = ""
        if any(g.name.startswith("fp16_") for g in failed) and not any(g.name == "parity_fp32" for g in failed):
            hint = "\n  (FP32 parity holds: the FP16 weight compression is what loses precision; convert with --fp32)"
        super().__init__("conversion rejected, gate(s) missed:\n  " + "\n  ".join(g.line() for g in failed) + hint)


def _split(name: str) -> tuple[str, str, str]:
    """``int8_covid19_sensitivity_drop`` -> ("int8", "covid19", "sensitivity_drop"); ("", "", name) otherwise."""
    prefix, _, rest = name.partition("_")
    if prefix not in CANDIDATES:
        return "", "", name
    if rest in CANDIDATE_LIMITS:
        return prefix, "", rest
    if rest.endswith("_sensitivity_drop"):
        return prefix, rest[: -len("_sensitivity_drop")], "sensitivity_drop"
    raise KeyError(f"unknown gate {name!r}")


def limit_of(name: str) -> tuple[float, str]:
    """``(limit, op)`` of a gate, plain or candidate."""
    prefix, _, suffix = _split(name)
    return CANDIDATE_LIMITS[suffix] if prefix else LIMITS[name]


def _what(name: str) -> str:
    prefix, cls, suffix = _split(name)
    if not prefix:
        return _WHAT.get(name, name)
    return _CANDIDATE_WHAT[suffix].format(p=prefix.upper() if prefix != "bf16" else "bf16", c=cls)


def check(name: str, value: float, detail: str = "", *, limit: float | None = None) -> Gate:
    """Compare ``value`` with the gate's limit (``limit`` overrides it; tests only).  NaN always fails."""
    lim, op = limit_of(name)
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


def _macro_auroc(m: Mapping[str, Any]) -> float | None:
    aucs = [v.get("auc") for v in (m.get("per_class") or {}).values() if v.get("n")]
    return None if not aucs or any(a is None for a in aucs) else float(np.mean(aucs))


def candidate_measures(
    float_metrics: Mapping[str, Any], candidate_metrics: Mapping[str, Any], p_float: np.ndarray, p_candidate: np.ndarray
) -> dict[str, dict[str, float | None]]:
    """What a user relies on, float and candidate side by side (the gates and the card's table).

    ``*_metrics`` are :func:`conversion.metrics.grouped_metrics` results on the test split, each
    computed at its own thresholds; ``p_*`` the test probabilities.  Returns
    ``{measure: {"float": v, "candidate": v}}`` for accuracy, adult accuracy, macro AUROC, the
    sensitivity and specificity at the thresholds per thresholded class, plus ``agreement`` and
    ``max_prob_diff`` (both under ``candidate``).
    """
    out: dict[str, dict[str, float | None]] = {}

    def both(key: str, get: Any) -> None:
        out[key] = {"float": get(float_metrics), "candidate": get(candidate_metrics)}

    both("accuracy", lambda m: m["overall"]["accuracy"])
    both("adult_accuracy", lambda m: ((m.get("by_age_group") or {}).get("adult") or {}).get("accuracy"))
    both("macro_auroc", lambda m: _macro_auroc(m["overall"]))
    classes = list((float_metrics["overall"].get("triage") or {}).get("per_class") or {})
    for c in classes:
        for rate in ("sensitivity", "specificity"):
            both(f"{c}_{rate}", lambda m, c=c, rate=rate: ((m["overall"].get("triage") or {}).get("per_class") or {}).get(c, {}).get(rate))
    out["agreement"] = {"float": 1.0, "candidate": agreement(p_candidate, p_float)}
    out["max_prob_diff"] = {"float": 0.0, "candidate": max_abs_diff(p_candidate, p_float)}
    return out


def candidate_gates(prefix: str, measures: Mapping[str, Mapping[str, float | None]], detail: str = "",
                    *, limits: Mapping[str, float] | None = None) -> list[Gate]:
    """The candidate gates of ``prefix`` from :func:`candidate_measures` (a measure that is
    undefined on this test split, e.g. no adults, gives no gate for it; NaN for the candidate fails)."""
    if prefix not in CANDIDATES:
        raise ValueError(f"unknown candidate precision {prefix!r}")
    lim = dict(limits or {})

    def drop(key: str) -> float | None:
        f, c = measures[key]["float"], measures[key]["candidate"]
        if f is None:
            return None
        return float("nan") if c is None else float(f) - float(c)

    wanted: list[tuple[str, float | None]] = [
        (f"{prefix}_accuracy_drop", drop("accuracy")),
        (f"{prefix}_adult_accuracy_drop", drop("adult_accuracy")),
        (f"{prefix}_macro_auroc_drop", drop("macro_auroc")),
    ]
    wanted += [(f"{prefix}_{k[: -len('_sensitivity')]}_sensitivity_drop", drop(k)) for k in measures if k.endswith("_sensitivity")]
    wanted.append((f"{prefix}_agreement", measures["agreement"]["candidate"]))
    return [check(n, v, detail, limit=lim.get(n)) for n, v in wanted if v is not None]
