"""PNG plots (matplotlib, Agg backend): confusion matrices, ROC curves, training curves."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from .metrics import binary_auroc, roc_curve

__all__ = ["plot_confusion", "plot_roc", "plot_roc_models", "plot_curves"]


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(cm: Sequence[Sequence[int]], classes: Sequence[str], path: str | Path, title: str = "") -> None:
    plt = _plt()
    cm = np.asarray(cm)
    fig, ax = plt.subplots(figsize=(1.3 * len(classes) + 2, 1.3 * len(classes) + 1.5))
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, f"{cm[i, j]}\n{norm[i, j]:.0%}", ha="center", va="center", color="white" if norm[i, j] > 0.5 else "black", fontsize=9)
    ax.set_xticks(range(len(classes)), classes, rotation=30, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _roc_figure(curves: Sequence[tuple[str, np.ndarray, np.ndarray]], path: str | Path, title: str) -> None:
    """One ROC panel: a curve per ``(label, positives, scores)``, skipped when AUROC is undefined."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 5))
    for label, pos, score in curves:
        auc = binary_auroc(pos, score)
        if auc is None:
            continue
        fpr, tpr = roc_curve(pos, score)
        ax.plot(fpr, tpr, label=f"{label} (AUROC {auc:.3f})")
    ax.plot([0, 1], [0, 1], ls=":", c="grey")
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_roc(y: np.ndarray, prob: np.ndarray, classes: Sequence[str], path: str | Path, title: str = "") -> None:
    """One-vs-rest ROC curve of every class, one panel."""
    _roc_figure([(name, np.asarray(y) == c, prob[:, c]) for c, name in enumerate(classes)], path, title)


def plot_roc_models(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], cls: int, name: str, path: str | Path, title: str = "") -> None:
    """ROC of one class (one-vs-rest) for several models: curves = {model: (y, prob)}."""
    _roc_figure([(model, np.asarray(y) == cls, prob[:, cls]) for model, (y, prob) in curves.items()], path,
                title or f"ROC: {name} vs rest")


def plot_curves(histories: Mapping[str, Sequence[dict]], path: str | Path, title: str = "") -> None:
    """Training and validation loss and validation accuracy per epoch; one line per run."""
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for i, (name, hist) in enumerate(histories.items()):
        if not hist:
            continue
        ep = [h["epoch"] + 1 for h in hist]
        col = f"C{i % 10}"
        a1.plot(ep, [h["train_loss"] for h in hist], ls="--", c=col, alpha=0.7)
        a1.plot(ep, [h["val_loss"] for h in hist], c=col, label=name, marker="o", ms=3)
        a2.plot(ep, [h["val_accuracy"] for h in hist], c=col, label=name, marker="o", ms=3)
    a1.set_xlabel("epoch")
    a1.set_ylabel("loss (solid: val, dashed: train)")
    a2.set_xlabel("epoch")
    a2.set_ylabel("validation accuracy")
    a2.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
