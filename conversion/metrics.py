"""Classification metrics, threshold calibration and triage metrics (numpy only, no torch).

Every number the conversion stage writes into a model card comes from here, so torch, the IRs
and the worker's engine are scored by the same code.  Rates are fractions in [0, 1]; a rate
that is undefined (no positives, no negatives, one class only for an AUC) is ``None`` (JSON
``null``), never NaN.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "DEFAULT_TARGETS",
    "calibrate_thresholds",
    "classification_metrics",
    "grouped_metrics",
    "roc_auc",
    "triage_metrics",
    "urgent_mask",
]

#: Default operating targets for threshold calibration: minimum sensitivity per urgent class.
DEFAULT_TARGETS: dict[str, float] = {"covid19": 0.95, "pneumonia": 0.90}


def _rate(num: int, den: int) -> float | None:
    return None if den == 0 else num / den


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties); None if one class is absent."""
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(scores.size, dtype=np.float64)
    sorted_scores = scores[order]
    # average ranks over ties
    i = 0
    while i < scores.size:
        j = i
        while j + 1 < scores.size and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def classification_metrics(probs: np.ndarray, y: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """Top-1 metrics of ``probs`` (N, K) against integer labels ``y`` (N,).

    Returns ``{"n", "accuracy", "balanced_accuracy", "macro_f1", "per_class": {cls: {"n",
    "sensitivity", "specificity", "precision", "f1", "auc"}}, "confusion": [[...]]}`` where
    ``confusion[i][j]`` counts true class i predicted as j.  ``balanced_accuracy`` and
    ``macro_f1`` average over the classes present in ``y``.
    """
    probs = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    k = len(classes)
    n = int(y.size)
    if n == 0:
        return {"n": 0, "accuracy": None, "balanced_accuracy": None, "macro_f1": None, "per_class": {}, "confusion": []}
    pred = probs.argmax(axis=1)
    conf = np.zeros((k, k), dtype=np.int64)
    np.add.at(conf, (y, pred), 1)
    per_class: dict[str, Any] = {}
    sens_present: list[float] = []
    f1_present: list[float] = []
    for i, c in enumerate(classes):
        tp = int(conf[i, i])
        pos = int(conf[i, :].sum())
        predicted = int(conf[:, i].sum())
        neg = n - pos
        tn = neg - (predicted - tp)
        sens = _rate(tp, pos)
        prec = _rate(tp, predicted)
        f1 = None if sens is None or prec is None or (sens + prec) == 0 else 2 * sens * prec / (sens + prec)
        if pos and f1 is None:
            f1 = 0.0
        per_class[c] = {
            "n": pos,
            "sensitivity": sens,
            "specificity": _rate(tn, neg),
            "precision": prec,
            "f1": f1,
            "auc": roc_auc(probs[:, i], y == i),
        }
        if pos:
            sens_present.append(sens or 0.0)
            f1_present.append(f1 or 0.0)
    return {
        "n": n,
        "accuracy": float((pred == y).mean()),
        "balanced_accuracy": float(np.mean(sens_present)),
        "macro_f1": float(np.mean(f1_present)),
        "per_class": per_class,
        "confusion": conf.tolist(),
    }


def urgent_mask(probs: np.ndarray, classes: Sequence[str], thresholds: Mapping[str, float]) -> np.ndarray:
    """The worker's triage rule (``worker.modelcard.triage``): urgent if P(c) >= thr[c] for any thresholded c."""
    probs = np.asarray(probs, dtype=np.float64)
    urgent = np.zeros(probs.shape[0], dtype=bool)
    for c, t in thresholds.items():
        urgent |= probs[:, list(classes).index(c)] >= t
    return urgent


def triage_metrics(
    probs: np.ndarray, y: np.ndarray, classes: Sequence[str], thresholds: Mapping[str, float]
) -> dict[str, Any]:
    """How the card's thresholds and triage rule behave on labelled data.

    ``per_class[c]``: sensitivity/specificity of ``P(c) >= thr[c]`` for class c alone.
    ``urgent``: the rule as a whole, with "urgent" as the positive call for the thresholded
    classes: sensitivity = share of images of a thresholded class flagged urgent, specificity
    = share of the other images left routine.
    """
    probs = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    out: dict[str, Any] = {"per_class": {}}
    for c, t in thresholds.items():
        i = list(classes).index(c)
        fired = probs[:, i] >= t
        pos = y == i
        out["per_class"][c] = {
            "threshold": float(t),
            "sensitivity": _rate(int((fired & pos).sum()), int(pos.sum())),
            "specificity": _rate(int((~fired & ~pos).sum()), int((~pos).sum())),
        }
    if thresholds:
        urgent = urgent_mask(probs, classes, thresholds)
        should = np.isin(y, [list(classes).index(c) for c in thresholds])
        out["urgent"] = {
            "sensitivity": _rate(int((urgent & should).sum()), int(should.sum())),
            "specificity": _rate(int((~urgent & ~should).sum()), int((~should).sum())),
            "urgent_share": float(urgent.mean()) if urgent.size else None,
        }
    return out


def grouped_metrics(
    probs: np.ndarray,
    y: np.ndarray,
    classes: Sequence[str],
    groups: Sequence[str],
    thresholds: Mapping[str, float] | None = None,
    sources: Sequence[str] | None = None,
) -> dict[str, Any]:
    """``classification_metrics`` (plus ``triage`` when thresholds are given) overall and per group.

    Returns ``{"overall": {...}, "by_age_group": {"adult": {...}, "child": {...}, ...}}``, and
    ``"by_source"`` (per collection, the manifest's ``source`` column) when ``sources`` is given:
    the classes come from different collections, so a model can learn the source (see the data
    README), and a per-source table shows it.
    """
    probs = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    g = np.asarray(list(groups), dtype=object)

    def one(mask: np.ndarray) -> dict[str, Any]:
        m = classification_metrics(probs[mask], y[mask], classes)
        if thresholds:
            m["triage"] = triage_metrics(probs[mask], y[mask], classes, thresholds)
        return m

    everything = np.ones(y.size, dtype=bool)
    out = {
        "overall": one(everything),
        "by_age_group": {str(v): one(g == v) for v in sorted(set(g.tolist()))},
    }
    if sources is not None:
        src = np.asarray(list(sources), dtype=object)
        out["by_source"] = {str(v): one(src == v) for v in sorted(set(src.tolist()))}
    return out


def calibrate_thresholds(
    probs: np.ndarray, y: np.ndarray, classes: Sequence[str], targets: Mapping[str, float]
) -> dict[str, Any]:
    """Per-class operating thresholds for a minimum sensitivity, chosen on labelled (validation) data.

    For each class c in ``targets`` the threshold is the HIGHEST value t such that
    ``mean(P(c) >= t | y == c) >= targets[c]``: the k-th largest P(c) among the true-c images,
    with ``k = ceil(target * n_c)``.  Highest, because among all thresholds meeting the target it
    flags the fewest other images (best specificity).  The threshold is rounded DOWN to 6
    decimals so that the stored value still meets the target.  Returns ``{"thresholds": {c: t},
    "achieved": {c: {"sensitivity", "specificity", "n_positive"}}}``.
    """
    probs = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    thresholds: dict[str, float] = {}
    achieved: dict[str, Any] = {}
    for c, target in targets.items():
        if c not in classes:
            raise ValueError(f"threshold target for {c!r}: not one of the model's classes {list(classes)}")
        if not 0.0 < float(target) <= 1.0:
            raise ValueError(f"threshold target for {c!r} must be in (0, 1] (got {target!r})")
        i = list(classes).index(c)
        pos_scores = np.sort(probs[y == i, i])[::-1]
        if pos_scores.size == 0:
            raise ValueError(f"cannot calibrate a threshold for {c!r}: no {c} images in the calibration split")
        k = max(1, math.ceil(float(target) * pos_scores.size - 1e-9))
        t = math.floor(float(pos_scores[k - 1]) * 1e6) / 1e6
        t = min(max(t, 0.0), 1.0)
        thresholds[c] = t
        fired = probs[:, i] >= t
        pos = y == i
        achieved[c] = {
            "target_sensitivity": float(target),
            "sensitivity": _rate(int((fired & pos).sum()), int(pos.sum())),
            "specificity": _rate(int((~fired & ~pos).sum()), int((~pos).sum())),
            "n_positive": int(pos.sum()),
        }
    return {"thresholds": thresholds, "achieved": achieved}
