"""Quantisation-aware training (QAT) of a float checkpoint with NNCF, for the INT8 edge model.

Post-training quantisation of the hybrid loses too much (issue 14: top-1 agreement 90.5 % on
validation, test accuracy 87.3 -> 85.1 %): the ResNet50 branch, trained from random
initialisation for a few epochs, has activation ranges that per-tensor 8-bit grids cut badly.
QAT lets the weights adapt to the grid:

1. ``nncf.quantize`` on the TORCH model (the same min-max initialisation as PTQ, on
   ``calibration`` training images) inserts trainable FakeQuantize operations;
2. a few epochs of fine-tuning at a low learning rate (Adam, default 1e-5, as NNCF's guide
   advises) on the training split, with the training stage's augmentation and its on-disk grey
   cache (:class:`training.cache.GreyCache`, i.e. the worker's own preprocessing); plain
   cross-entropy with the checkpoint's class weighting and NO label smoothing (smoothing thins
   the decision margins that 8-bit arithmetic needs);
3. the epoch with the lowest validation loss is kept (validation only: the test split is the
   gates'); each epoch is checkpointed atomically in ``work_dir`` and a killed run resumes at
   the next epoch (same checkpoint, same options) instead of starting again;
4. the fine-tuned model is converted by ``ov.convert_model`` to an OpenVINO model with
   FakeQuantize nodes (INT8 when the CPU plugin compiles it), which the caller reshapes to a
   static batch 1 (see :mod:`conversion.convert`).

Training runs in float32 (bf16 autocast around FakeQuantize is not supported by NNCF's
kernels); on two CPU cores an epoch of the hybrid at 224 px takes several minutes, so
``images_per_epoch`` can cap it (a random subset per epoch, seeded).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

__all__ = ["QatOptions", "quantization_aware_training"]

STATE_FORMAT = "cxr-triage-qat/1"


@dataclass(frozen=True)
class QatOptions:
    """QAT recipe (``cxr-triage convert --int8 qat --qat-epochs N --qat-lr LR``)."""

    epochs: int = 2
    lr: float = 1e-5
    batch_size: int = 32
    images_per_epoch: int | None = None  # None: the whole training split each epoch
    calibration: int = 300
    seed: int = 0
    threads: int | None = None
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"qat epochs must be >= 1, got {self.epochs}")
        if not 0.0 < self.lr < 1.0:
            raise ValueError(f"qat lr must be in (0, 1), got {self.lr}")
        if self.batch_size < 1:
            raise ValueError(f"qat batch size must be >= 1, got {self.batch_size}")
        if self.images_per_epoch is not None and self.images_per_epoch < 1:
            raise ValueError(f"qat images per epoch must be >= 1, got {self.images_per_epoch}")


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    torch.save(obj, tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _datasets(ckpt: Mapping[str, Any], manifest: Path, classes: Sequence[str], spec: Any, label: str,
              cache_dir: str | None, seed: int) -> tuple[Any, Any]:
    from training.cache import GreyCache
    from training.data import Augment, ManifestDataset, read_manifest

    cfg = (ckpt.get("training") or {}).get("config") or {}
    t = cfg.get("train") or {}
    aug = Augment.from_config(cfg.get("augment"), float(t.get("augment_strength", 1.0))) if t.get("augment", True) else None
    cache = GreyCache.open(manifest, spec, cache_dir or ((cfg.get("data") or {}).get("cache_dir") or None), progress="none")
    rows = read_manifest(manifest)
    mk: dict[str, Any] = dict(classes=list(classes), label=label, spec=spec, grey_cache=cache)
    train = [r for r in rows if r.get("split") == "train"]
    val = [r for r in rows if r.get("split") == "val"]
    return ManifestDataset(train, augment=aug, seed=seed, **mk), ManifestDataset(val, **mk)


def _class_weights(ckpt: Mapping[str, Any], counts: Sequence[int]) -> torch.Tensor | None:
    from training.data import class_weights

    t = (((ckpt.get("training") or {}).get("config") or {}).get("train") or {})
    if t.get("class_weights", "balanced") != "balanced":
        return None
    return torch.tensor(class_weights(counts), dtype=torch.float32)


def _evaluate(model: nn.Module, ds: Any, weight: torch.Tensor | None, batch: int = 32) -> dict[str, float]:
    model.eval()
    losses, correct, n = 0.0, 0, 0
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=False, num_workers=0)
    with torch.no_grad():
        for x, y in loader:
            logits = model(x)
            losses += float(nn.functional.cross_entropy(logits, y, weight=weight, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
            n += int(y.numel())
    return {"val_loss": losses / max(n, 1), "val_accuracy": correct / max(n, 1)}


def quantization_aware_training(
    model: nn.Module,
    ckpt: Mapping[str, Any],
    manifest: str | os.PathLike[str],
    calibration: np.ndarray,
    work_dir: str | os.PathLike[str],
    options: QatOptions | None = None,
    *,
    label: str = "label3",
    checkpoint_sha256: str = "",
    cache_dir: str | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Fine-tune ``model`` (float, returns logits) with FakeQuantize; returns the QAT model and what was done.

    ``calibration``: (N, C, H, W) training images (worker preprocessing) for the initial ranges.
    ``work_dir``: per-epoch state (``state.pt``, ``history.jsonl``); an existing state of the same
    checkpoint and options is resumed.
    """
    import nncf

    from conversion.data import spec_from_checkpoint

    # NNCF compiles (first use) or loads its C++ FakeQuantize kernels in a thread with a 60-s
    # limit; on a busy two-core box loading alone took 24 s and a first compile longer, so the
    # default limit fails runs that would succeed.  Without a compiler NNCF falls back to torch
    # operations by itself.  An explicit NNCF_EXTENSION_LOAD_TIMEOUT is left as it is.
    os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", "900")
    o = options or QatOptions()
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    if o.threads:
        torch.set_num_threads(int(o.threads))
    classes = list(ckpt["classes"])
    spec = spec_from_checkpoint(ckpt)
    train_ds, val_ds = _datasets(ckpt, Path(manifest), classes, spec, label, cache_dir, o.seed)
    weight = _class_weights(ckpt, train_ds.class_counts())
    ident = {"format": STATE_FORMAT, "checkpoint_sha256": checkpoint_sha256, "options": asdict(o)}

    t0 = time.perf_counter()
    model = model.eval().float()
    cal = torch.from_numpy(np.ascontiguousarray(calibration[: o.calibration], dtype=np.float32))
    items = [cal[i : i + 1] for i in range(cal.shape[0])]
    qmodel = nncf.quantize(model, nncf.Dataset(items), subset_size=len(items))
    init_s = time.perf_counter() - t0
    opt = torch.optim.Adam([p for p in qmodel.parameters() if p.requires_grad], lr=o.lr, weight_decay=o.weight_decay)

    state_path = work / "state.pt"
    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {}
    start = 0
    if state_path.exists():
        st = torch.load(state_path, map_location="cpu", weights_only=False)
        if st.get("ident") == ident:
            qmodel.load_state_dict(st["model"])
            opt.load_state_dict(st["optimizer"])
            history, best, start = list(st["history"]), dict(st["best"]), int(st["epoch"]) + 1
            log.info("QAT: resuming %s after epoch %d", work, start)
        else:
            log.warning("QAT: %s holds another run's state (checkpoint or options differ); starting again", state_path)
    if not best:
        ev = _evaluate(qmodel, val_ds, weight)
        best = {"epoch": -1, **ev, "model": {k: v.detach().clone() for k, v in qmodel.state_dict().items()}}
        history.append({"epoch": -1, "note": "after nncf.quantize, before fine-tuning", **ev})
        log.info("QAT: before fine-tuning val loss %.4f accuracy %.4f", ev["val_loss"], ev["val_accuracy"])

    n_train = len(train_ds)
    per_epoch = min(o.images_per_epoch or n_train, n_train)
    for epoch in range(start, o.epochs):
        te = time.perf_counter()
        rng = np.random.default_rng([o.seed, epoch])
        order = rng.permutation(n_train)[:per_epoch]
        train_ds.set_epoch(epoch)
        qmodel.train()
        loss_sum, seen = 0.0, 0
        steps = math.ceil(per_epoch / o.batch_size)
        for s in range(steps):
            idx = order[s * o.batch_size : (s + 1) * o.batch_size]
            batch = [train_ds[int(i)] for i in idx]
            x = torch.stack([b[0] for b in batch])
            y = torch.tensor([b[1] for b in batch], dtype=torch.int64)
            loss = nn.functional.cross_entropy(qmodel(x), y, weight=weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += float(loss) * len(idx)
            seen += len(idx)
            if (s + 1) % 10 == 0 or s + 1 == steps:
                el = time.perf_counter() - te
                log.info("QAT epoch %d/%d: %d/%d images, %.1f images/s, loss %.4f", epoch + 1, o.epochs, seen, per_epoch,
                         seen / max(el, 1e-9), loss_sum / seen)
        train_s = time.perf_counter() - te
        ev = _evaluate(qmodel, val_ds, weight)
        rec = {"epoch": epoch, "train_loss": loss_sum / max(seen, 1), "images": seen, "train_seconds": round(train_s, 1),
               "images_per_second": round(seen / max(train_s, 1e-9), 2), **ev}
        history.append(rec)
        log.info("QAT epoch %d/%d: val loss %.4f accuracy %.4f (%.0f s)", epoch + 1, o.epochs, ev["val_loss"],
                 ev["val_accuracy"], time.perf_counter() - te)
        if ev["val_loss"] < best["val_loss"]:
            best = {"epoch": epoch, **ev, "model": {k: v.detach().clone() for k, v in qmodel.state_dict().items()}}
        _atomic_save({"ident": ident, "epoch": epoch, "model": qmodel.state_dict(), "optimizer": opt.state_dict(),
                      "history": history, "best": best}, state_path)
        (work / "history.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))

    qmodel.load_state_dict(best["model"])
    qmodel.eval()
    info = {
        "method": "quantization-aware training (nncf.quantize on torch + fine-tuning)",
        "options": asdict(o), "label_smoothing": 0.0, "class_weights": "balanced" if weight is not None else "none",
        "selected_epoch": best["epoch"], "selected_by": "lowest validation loss",
        "selected_val_loss": best["val_loss"], "selected_val_accuracy": best["val_accuracy"],
        "history": history, "init_seconds": round(init_s, 1), "seconds": round(time.perf_counter() - t0, 1),
        "calibration_images": len(items), "train_images": n_train,
    }
    return qmodel, info
