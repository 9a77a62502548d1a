"""Classification metrics in plain numpy (checked against scikit-learn in the tests).

``classification_metrics(y, prob, classes, groups=None)`` returns a JSON-able dict: accuracy,
balanced accuracy, confusion matrix (rows = true, columns = predicted), per class precision,
recall (= sensitivity), specificity, F1, one-vs-rest AUROC (Mann-Whitney with tie correction),
macro averages, and ``by_group`` (the same per value of a grouping column such as ``age_group``)
with a ``shortcut`` analysis flagging when predictions follow the group rather than the disease.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "confusion_matrix",
    "roc_auc_ovr",
    "roc_curve",
    "classification_metrics",
    "group_shortcut",
    "bootstrap_ci",
    "cramers_v",
]


def confusion_matrix(y: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (np.asarray(y, dtype=np.int64), np.asarray(pred, dtype=np.int64)), 1)
    return cm


def _rankdata(x: np.ndarray) -> np.ndarray:
    """Average ranks (1-based), ties get the mean rank."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(len(x), dtype=np.float64)
    i = 0
    n = len(x)
    while i < n:
        j = i
        while j + 1 < n and xs[j + 1] == xs[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def binary_auroc(pos: np.ndarray, score: np.ndarray) -> float | None:
    """AUROC of ``score`` for the boolean ``pos``; None when only one class is present."""
    pos = np.asarray(pos, dtype=bool)
    n1 = int(pos.sum())
    n0 = len(pos) - n1
    if n1 == 0 or n0 == 0:
        return None
    r = _rankdata(np.asarray(score, dtype=np.float64))
    return float((r[pos].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))


def roc_auc_ovr(y: np.ndarray, prob: np.ndarray) -> list[float | None]:
    """One-vs-rest AUROC per class."""
    return [binary_auroc(np.asarray(y) == c, prob[:, c]) for c in range(prob.shape[1])]


def roc_curve(pos: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) at every distinct threshold, from (0, 0) to (1, 1)."""
    pos = np.asarray(pos, dtype=bool)
    order = np.argsort(-np.asarray(score, dtype=np.float64), kind="mergesort")
    s = np.asarray(score)[order]
    p = pos[order]
    tps = np.cumsum(p)
    fps = np.cumsum(~p)
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]
    tpr = np.r_[0.0, tps[last] / max(p.sum(), 1)]
    fpr = np.r_[0.0, fps[last] / max((~p).sum(), 1)]
    return fpr, tpr


def _div(a: float, b: float) -> float:
    return float(a / b) if b else 0.0


def cramers_v(a: Sequence[Any], b: Sequence[Any]) -> float:
    """Cramér's V between two categorical sequences (0 = independent, 1 = one determines the other)."""
    av, ai = np.unique(np.asarray(a).astype(str), return_inverse=True)
    bv, bi = np.unique(np.asarray(b).astype(str), return_inverse=True)
    if len(av) < 2 or len(bv) < 2:
        return 0.0
    t = confusion_matrix(ai, bi, max(len(av), len(bv)))[: len(av), : len(bv)].astype(float)
    n = t.sum()
    exp = t.sum(1, keepdims=True) * t.sum(0, keepdims=True) / n
    chi2 = float(((t - exp) ** 2 / np.where(exp > 0, exp, 1)).sum())
    return math.sqrt(chi2 / (n * (min(len(av), len(bv)) - 1)))


def _core(y: np.ndarray, prob: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    k = len(classes)
    pred = prob.argmax(1)
    cm = confusion_matrix(y, pred, k)
    n = int(cm.sum())
    auc = roc_auc_ovr(y, prob)
    per: dict[str, Any] = {}
    for c, name in enumerate(classes):
        tp = int(cm[c, c])
        fn = int(cm[c].sum() - tp)
        fp = int(cm[:, c].sum() - tp)
        tn = n - tp - fn - fp
        prec = _div(tp, tp + fp)
        rec = _div(tp, tp + fn)
        per[name] = {
            "support": tp + fn,
            "precision": prec,
            "recall": rec,
            "sensitivity": rec,
            "specificity": _div(tn, tn + fp),
            "f1": _div(2 * prec * rec, prec + rec),
            "auroc": auc[c],
        }
    present = [c for c in classes if per[c]["support"] > 0]
    aucs = [per[c]["auroc"] for c in classes if per[c]["auroc"] is not None]
    return {
        "n": n,
        "accuracy": _div(np.trace(cm), n),
        "balanced_accuracy": float(np.mean([per[c]["recall"] for c in present])) if present else 0.0,
        "macro_f1": float(np.mean([per[c]["f1"] for c in classes])),
        "macro_auroc": float(np.mean(aucs)) if aucs else None,
        "confusion": cm.tolist(),
        "per_class": per,
    }


def group_shortcut(y: np.ndarray, pred: np.ndarray, groups: Sequence[str], classes: Sequence[str], min_n: int = 10) -> dict[str, Any]:
    """Does the model predict the group rather than the disease?

    Two checks, both reported with their numbers:

    * association: Cramér's V(prediction, group) against V(true label, group).  A model that reads
      the disease shows at most the association the labels have; a clearly larger one
      (``> +0.10``) means the predictions separate the groups more than the truth does.
    * recall gap: a class recognised in one group (recall >= 0.8) but mostly missed in another
      (recall < 0.5, at least ``min_n`` images there), with the class it is mistaken for.

    ``flag`` is true when either check fires; ``reasons`` says which.
    """
    groups = np.asarray(groups).astype(str)
    keep = groups != "unknown"
    v_pred = cramers_v(pred[keep], groups[keep]) if keep.any() else 0.0
    v_true = cramers_v(y[keep], groups[keep]) if keep.any() else 0.0
    reasons = []
    if v_pred > v_true + 0.10:
        reasons.append(f"predictions are more associated with the group (Cramér's V {v_pred:.2f}) than the labels are ({v_true:.2f})")
    gaps = []
    for c, name in enumerate(classes):
        rec = {}
        for g in np.unique(groups[keep]):
            m = (groups == g) & (y == c)
            if m.sum() >= min_n:
                rec[g] = (float((pred[m] == c).mean()), int(m.sum()), np.bincount(pred[m], minlength=len(classes)))
        for g_lo, (r_lo, n_lo, counts) in rec.items():
            for g_hi, (r_hi, _, _) in rec.items():
                if r_lo < 0.5 <= 0.8 <= r_hi:
                    wrong = counts.copy()
                    wrong[c] = 0
                    as_ = classes[int(wrong.argmax())]
                    gaps.append({"class": name, "group_low": g_lo, "recall_low": r_lo, "n_low": n_lo, "group_high": g_hi, "recall_high": r_hi, "mostly_called": as_})
                    reasons.append(f"{name}: recall {r_lo:.2f} in {g_lo} (n={n_lo}, mostly called {as_}) vs {r_hi:.2f} in {g_hi}")
    return {"cramers_v_pred_group": v_pred, "cramers_v_true_group": v_true, "recall_gaps": gaps, "flag": bool(reasons), "reasons": reasons}


def classification_metrics(
    y: Sequence[int], prob: np.ndarray, classes: Sequence[str], groups: Sequence[str] | None = None, loss: float | None = None
) -> dict[str, Any]:
    y = np.asarray(y, dtype=np.int64)
    prob = np.asarray(prob, dtype=np.float64)
    out = _core(y, prob, classes)
    if loss is not None:
        out["loss"] = float(loss)
    if groups is not None:
        groups = np.asarray(groups).astype(str)
        out["by_group"] = {str(g): _core(y[groups == g], prob[groups == g], classes) for g in np.unique(groups)}
        out["shortcut"] = group_shortcut(y, prob.argmax(1), groups, classes)
    return out


def bootstrap_ci(y: Sequence[int], pred: Sequence[int], *, n_boot: int = 2000, seed: int = 0, alpha: float = 0.05) -> tuple[float, float]:
    """Percentile bootstrap (images resampled with replacement) CI of accuracy."""
    correct = (np.asarray(y) == np.asarray(pred)).astype(np.float64)
    if len(correct) == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(correct), size=(n_boot, len(correct)))
    accs = correct[idx].mean(1)
    return float(np.quantile(accs, alpha / 2)), float(np.quantile(accs, 1 - alpha / 2))
