"""Metric code against scikit-learn on fixed inputs; the group shortcut check; bootstrap."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from training.metrics import bootstrap_ci, classification_metrics, cramers_v, roc_auc_ovr, roc_curve

CLASSES = ["normal", "pneumonia", "covid19"]


@pytest.fixture
def fixed() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(42)
    y = rng.integers(0, 3, 200)
    logits = rng.normal(0, 1, (200, 3))
    logits[np.arange(200), y] += 1.2
    logits = np.round(logits, 1)  # ties, to exercise the tie handling of the AUROC
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return y, p


def test_against_sklearn(fixed) -> None:
    y, p = fixed
    m = classification_metrics(y, p, CLASSES)
    pred = p.argmax(1)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert m["confusion"] == skm.confusion_matrix(y, pred, labels=[0, 1, 2]).tolist()
    prec, rec, f1, sup = skm.precision_recall_fscore_support(y, pred, labels=[0, 1, 2], zero_division=0)
    for c, name in enumerate(CLASSES):
        pc = m["per_class"][name]
        assert pc["precision"] == pytest.approx(prec[c])
        assert pc["recall"] == pytest.approx(rec[c])
        assert pc["f1"] == pytest.approx(f1[c])
        assert pc["support"] == sup[c]
        assert pc["auroc"] == pytest.approx(skm.roc_auc_score(y == c, p[:, c]))
        tn = ((y != c) & (pred != c)).sum()
        fp = ((y != c) & (pred == c)).sum()
        assert pc["specificity"] == pytest.approx(tn / (tn + fp))
    assert m["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert m["macro_auroc"] == pytest.approx(skm.roc_auc_score(y, p, multi_class="ovr", average="macro"))


def test_roc_curve_against_sklearn(fixed) -> None:
    y, p = fixed
    fpr, tpr = roc_curve(y == 1, p[:, 1])
    sfpr, stpr, _ = skm.roc_curve(y == 1, p[:, 1], drop_intermediate=False)
    assert np.allclose(fpr, sfpr) and np.allclose(tpr, stpr)
    assert np.trapezoid(tpr, fpr) == pytest.approx(skm.roc_auc_score(y == 1, p[:, 1]))


def test_auroc_undefined_for_one_class() -> None:
    assert roc_auc_ovr(np.zeros(4, int), np.full((4, 2), 0.5)) == [None, None]


def test_groups_and_shortcut_flag() -> None:
    """A 'model' that calls every adult covid19 and every child pneumonia is flagged."""
    groups = np.array(["adult"] * 60 + ["child"] * 60)
    y = np.array([0] * 20 + [1] * 20 + [2] * 20 + [0] * 30 + [1] * 30)
    pred = np.where(groups == "adult", 2, 1)
    prob = np.eye(3)[pred] * 0.9 + 0.1 / 3
    m = classification_metrics(y, prob, CLASSES, groups=groups)
    assert set(m["by_group"]) == {"adult", "child"}
    assert m["by_group"]["adult"]["accuracy"] == pytest.approx(20 / 60)
    sc = m["shortcut"]
    assert sc["flag"]
    assert sc["cramers_v_pred_group"] == pytest.approx(1.0)
    assert any(g["class"] == "pneumonia" and g["group_low"] == "adult" and g["mostly_called"] == "covid19" for g in sc["recall_gaps"])
    # a model that follows the labels is not flagged
    ok = classification_metrics(y, np.eye(3)[y] * 0.9 + 0.1 / 3, CLASSES, groups=groups)
    assert not ok["shortcut"]["flag"]


def test_cramers_v_and_bootstrap() -> None:
    assert cramers_v([0, 1, 0, 1], ["a", "b", "a", "b"]) == pytest.approx(1.0)
    assert cramers_v([0, 0, 1, 1], ["a", "b", "a", "b"]) == pytest.approx(0.0)
    y = np.array([0, 1] * 50)
    lo, hi = bootstrap_ci(y, y, n_boot=200)
    assert lo == hi == 1.0
    lo, hi = bootstrap_ci(y, np.r_[y[:50], 1 - y[50:]], n_boot=500)
    assert lo < 0.5 < hi
