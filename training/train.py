"""Training loop and experiment driver (single split or the paper's 5-fold protocol).

Layout of an experiment folder (``--out``)::

    experiment.json         resolved config, git commit, manifest sha256, library versions, command
    config.toml             the resolved config as TOML (re-runnable with --config)
    folds.json              (cv) patient ids and class counts of every fold's train/val/test
    <model>/fold-<k>/       (cv) one run per model and fold
    <model>/                (single, several models)     or the folder itself (single, one model)
        run.json            model, fold, sizes, class weights
        history.jsonl       one JSON line per epoch (size, losses, accuracy, AUROC, lr, images/s, seconds)
        best.pt             checkpoint (cxr-triage-checkpoint/1) of the selected epoch, with metrics
        last.pt             resume state after the last finished epoch (model, optimiser, scheduler,
                            RNG states, history, early stopping), written atomically, removed when done
        predictions_<split>.csv   per image: file, patient, group, label, prediction, probabilities
        metrics.json        {"val": ..., "test": ..., "holdout": ...}
        done.json           present once complete (``--resume`` skips complete runs and resumes others)

Class imbalance: a class-weighted cross-entropy (weights ``n / (k * n_c)`` from the run's
training rows), used for the training loss and for the validation loss that drives early stopping.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import platform
import random
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from worker.imaging import PreprocessSpec

from . import config as config_mod
from . import publication
from .cache import GreyCache
from .checkpoint import model_spec, save_checkpoint
from .data import (
    Augment,
    ManifestDataset,
    class_weights,
    cv_folds,
    labelled_rows,
    manifest_sha256,
    read_manifest,
    split_rows,
)
from .metrics import classification_metrics
from .models import count_parameters, create_model
from .progress import Progress, eta
from .provenance import cpu_has_bf16, git_commit, versions
from .schedule import epoch_sizes, lr_factor

#: ``last.pt``: the resume state of an unfinished run (not a model checkpoint for other stages).
RESUME_FORMAT = "cxr-triage-resume/2"

log = logging.getLogger(__name__)

__all__ = ["run_experiment", "train_run", "predict", "versions", "git_commit", "spec_of"]


def spec_of(cfg: dict) -> PreprocessSpec:
    s = int(cfg["data"]["size"])
    return PreprocessSpec(size=(s, s), channels=3)


def _input_entry(spec: PreprocessSpec) -> dict:
    return {"size": list(spec.size), "channels": spec.channels, "mean": list(spec.mean), "std": list(spec.std), "layout": "NCHW"}


def _pre_entry(spec: PreprocessSpec) -> dict:
    return {"voi": spec.voi, "percentiles": list(spec.percentiles), "crop": spec.crop}


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# One run
# --------------------------------------------------------------------------------------------


def _device(cfg: dict) -> torch.device:
    d = cfg["train"]["device"]
    if d == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(d)

def _optimizer(model: nn.Module, t: dict) -> torch.optim.Optimizer:
    if t["optimizer"] == "adam":
        return torch.optim.Adam(model.parameters(), lr=t["lr"], weight_decay=t["weight_decay"])
    if t["optimizer"] == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=t["lr"], weight_decay=t["weight_decay"])
    return torch.optim.SGD(model.parameters(), lr=t["lr"], momentum=t["momentum"], weight_decay=t["weight_decay"], nesterov=True)


@torch.inference_mode()
def predict(model: nn.Module, ds: ManifestDataset, *, batch_size: int = 64, device: torch.device | str = "cpu",
            criterion: nn.Module | None = None, amp: bool = False, progress: str = "none") -> tuple[np.ndarray, float | None]:
    """(softmax probabilities (N, K), mean loss or None)."""
    device = torch.device(device)
    model.eval()
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=0)
    probs, total, n = [], 0.0, 0
    bar = Progress("evaluating", len(ds), mode=progress)
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x)
        logits = logits.float()
        if criterion is not None:
            total += float(criterion(logits, y)) * len(y)
            n += len(y)
        probs.append(torch.softmax(logits, 1).cpu().numpy())
        bar.update(len(y))
    bar.close()
    p = np.concatenate(probs) if probs else np.zeros((0, len(ds.classes)), np.float32)
    return p, (total / n if n else None)


def _write_predictions(path: Path, ds: ManifestDataset, prob: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "patient_id", "group", "label", "pred", *[f"p_{c}" for c in ds.classes]])
        for i in range(len(ds)):
            w.writerow([ds.files[i], ds.patients[i], ds.groups[i], ds.classes[ds.labels[i]], ds.classes[int(prob[i].argmax())],
                        *[f"{v:.6f}" for v in prob[i]]])
    os.replace(tmp, path)


def _select_value(t: dict, rec: dict) -> float:
    """Lower is better."""
    s = t["select"]
    if s == "val_loss":
        return rec["val_loss"]
    if s == "val_auroc":
        return -(rec["val_auroc"] or 0.0)
    if s == "val_accuracy":
        return -rec["val_accuracy"]
    return -rec["epoch"]  # last


@dataclass
class _Run:
    """What one training run is made of (built once, then resumed into)."""

    model: nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    crit: nn.Module
    val_crit: nn.Module
    device: torch.device
    amp: bool
    channels_last: bool
    steps_per_epoch: int


@dataclass
class _State:
    """Resume state beside the weights: where the run is and what early stopping knows."""

    start_epoch: int = 0
    best: float = math.inf
    best_epoch: int = -1
    bad: int = 0
    history: list[dict] = field(default_factory=list)


def _steps_per_epoch(n: int, t: dict) -> int:
    bs = int(t["batch_size"])
    nb = n // bs if n > bs else (1 if n else 0)  # drop_last when there is more than one batch
    return min(nb, int(t["max_train_batches"])) if t["max_train_batches"] else nb


def _build(cfg: dict, model_name: str, n_train: int, cw: list[float], n_classes: int) -> _Run:
    t, mcfg = cfg["train"], cfg["model"]
    device = _device(cfg)
    kwargs = model_kwargs(cfg)
    model = create_model(model_name, n_classes, weights=mcfg["weights"], resnet_weights=mcfg["resnet_weights"] or None,
                         mobilenet_weights=mcfg["mobilenet_weights"] or None, **kwargs)
    model.to(device)
    on_cpu = device.type == "cpu"
    cpu_amp = on_cpu and (t["cpu_amp"] is True or (t["cpu_amp"] == "auto" and cpu_has_bf16()))
    channels_last = (device.type == "cuda" and t["channels_last"]) or (on_cpu and t["cpu_amp"] in (True, "auto"))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = _optimizer(model, t)
    nb = max(1, _steps_per_epoch(n_train, t))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step / nb, t))
    weight = torch.tensor(cw, dtype=torch.float32, device=device)
    crit = nn.CrossEntropyLoss(weight=weight, label_smoothing=float(t["label_smoothing"]))
    val_crit = nn.CrossEntropyLoss(weight=weight)
    amp = (bool(t["amp"]) and device.type == "cuda") or cpu_amp
    return _Run(model, opt, sched, crit, val_crit, device, amp, channels_last, nb)


def model_kwargs(cfg: dict) -> dict[str, Any]:
    m = cfg["model"]
    return {"mobilenet": m["mobilenet"], "head_hidden": int(m["head_hidden"]), "dropout": float(m["dropout"])}


def _save_resume(path: Path, run: _Run, st: _State, epoch: int) -> None:
    """``last.pt``: everything a resumed run needs to continue as if never stopped (temp + rename)."""
    obj = {"format": RESUME_FORMAT, "epoch": epoch, "model": run.model.state_dict(), "opt": run.opt.state_dict(),
           "sched": run.sched.state_dict(), "best": st.best, "best_epoch": st.best_epoch, "bad": st.bad, "history": st.history,
           "torch_rng": torch.get_rng_state(), "numpy_rng": np.random.get_state(), "python_rng": random.getstate()}
    if run.device.type == "cuda":
        obj["cuda_rng"] = torch.cuda.get_rng_state_all()
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _resume(run_dir: Path, run: _Run) -> _State:
    """The state after the last finished epoch (``last.pt``), or a fresh one; rewrites
    ``history.jsonl`` to exactly the finished epochs (a kill can leave a later line behind)."""
    last, hist_path = run_dir / "last.pt", run_dir / "history.jsonl"
    if not last.exists():
        if hist_path.exists():
            hist_path.unlink()
        return _State()
    ck = torch.load(last, map_location=run.device, weights_only=False)
    if ck.get("format") != RESUME_FORMAT:
        raise ValueError(f"{last} is the resume state of an older version of the training stage ({ck.get('format', 'no format')}); "
                         f"delete it to restart this run from its first epoch")
    run.model.load_state_dict(ck["model"])
    run.opt.load_state_dict(ck["opt"])
    run.sched.load_state_dict(ck["sched"])
    torch.set_rng_state(ck["torch_rng"])
    if "numpy_rng" in ck:
        np.random.set_state(ck["numpy_rng"])
        random.setstate(ck["python_rng"])
    if "cuda_rng" in ck and run.device.type == "cuda":
        torch.cuda.set_rng_state_all(ck["cuda_rng"])
    start = int(ck["epoch"]) + 1
    history = ck["history"]
    tmp = hist_path.with_name(hist_path.name + ".tmp")
    tmp.write_text("".join(json.dumps(h) + "\n" for h in history))
    os.replace(tmp, hist_path)
    log.info("%s: resumed after epoch %d", run_dir, start - 1)
    return _State(start, float(ck["best"]), int(ck["best_epoch"]), int(ck["bad"]), list(history))


def _train_epoch(run: _Run, ds: ManifestDataset, t: dict, epoch: int, seed: int, desc: str) -> tuple[float, float, int]:
    """One pass over the training set: (mean loss, accuracy, images)."""
    run.model.train()
    ds.set_epoch(epoch)
    gen = torch.Generator()
    gen.manual_seed(seed * 1009 + epoch)
    loader = torch.utils.data.DataLoader(ds, batch_size=int(t["batch_size"]), shuffle=True, generator=gen,
                                         num_workers=int(t["num_workers"]), drop_last=len(ds) > int(t["batch_size"]))
    nb = run.steps_per_epoch
    bar = Progress(desc, min(nb * int(t["batch_size"]), len(ds)), mode=t["progress"])
    tl, tc, tn = 0.0, 0, 0
    for b, (x, y) in enumerate(loader):
        if b >= nb:
            break
        x, y = x.to(run.device, non_blocking=True), y.to(run.device, non_blocking=True)
        if run.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.amp):
            logits = run.model(x)
        loss = run.crit(logits.float(), y)
        run.opt.zero_grad(set_to_none=True)
        loss.backward()
        run.opt.step()
        run.sched.step()
        tl += float(loss.detach()) * len(y)
        tc += int((logits.argmax(1) == y).sum())
        tn += len(y)
        bar.update(len(y))
    bar.close()
    return tl / max(tn, 1), tc / max(tn, 1), tn


def train_run(
    cfg: dict,
    model_name: str,
    train_rows: Sequence[dict],
    val_rows: Sequence[dict],
    eval_sets: dict[str, Sequence[dict]],
    run_dir: str | Path,
    *,
    fold: int | None = None,
    provenance: dict | None = None,
    grey_cache: Mapping | None = None,
) -> dict:
    """Train one model; returns its metrics dict ({"val": ..., <eval set>: ...}).

    Resumes from ``run_dir/last.pt`` (written after every epoch) and returns the stored metrics
    when ``run_dir/done.json`` exists.  Epoch ``e`` trains at ``epoch_sizes(...)[e]``; validation
    always runs at ``data.size``, the resolution the worker serves."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if (run_dir / "done.json").exists() and (run_dir / "metrics.json").exists():
        log.info("%s: complete, skipped", run_dir)
        return json.loads((run_dir / "metrics.json").read_text())
    t, d = cfg["train"], cfg["data"]
    if t["threads"]:
        torch.set_num_threads(int(t["threads"]))
    seed = int(t["seed"]) + (1000 * (fold + 1) if fold is not None else 0)
    classes = config_mod.classes_of(cfg)
    spec = spec_of(cfg)
    group_col = d["group_column"] or None
    aug = Augment.from_config(cfg["augment"], t["augment_strength"]) if t["augment"] else None
    mk = dict(classes=classes, label=d["label"], spec=spec, cache=d["cache"], group_column=group_col,
              grey_cache=grey_cache if grey_cache is not None else {})
    train_ds = ManifestDataset(train_rows, augment=aug, seed=seed, **mk)
    val_ds = ManifestDataset(val_rows, **mk)
    counts = train_ds.class_counts()
    cw = class_weights(counts) if t["class_weights"] == "balanced" else [1.0] * len(classes)

    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    run = _build(cfg, model_name, len(train_ds), cw, len(classes))
    mspec = model_spec(model_name, len(classes), **model_kwargs(cfg))
    training_meta = {
        "config": cfg,
        "model_weights": {k: cfg["model"][k] for k in ("weights", "resnet_weights", "mobilenet_weights")},
        "fold": fold,
        "seed": seed,
        "class_counts": dict(zip(classes, counts, strict=True)),
        "class_weights": dict(zip(classes, cw, strict=True)),
        **(provenance or {}),
    }
    epochs = int(t["epochs"])
    sizes = epoch_sizes(epochs, int(d["size"]), t["progressive_sizes"], int(t["final_epochs"]))
    run_info = {"model": model_name, "fold": fold, "classes": classes, "n_train": len(train_ds), "n_val": len(val_ds),
                "eval_sets": {k: len(labelled_rows(v, d["label"])) for k, v in eval_sets.items()},
                "class_counts": training_meta["class_counts"], "class_weights": training_meta["class_weights"],
                "parameters_keras": count_parameters(run.model), "parameters": count_parameters(run.model, keras_style=False),
                "device": str(run.device), "precision": "bf16 autocast" if run.amp else "float32",
                "channels_last": run.channels_last, "seed": seed, "epoch_sizes": sizes}
    _write_json(run_dir / "run.json", run_info)

    st = _resume(run_dir, run)
    hist_path, last = run_dir / "history.jsonl", run_dir / "last.pt"
    t_run = time.time()
    for epoch in range(st.start_epoch, epochs):
        t0, c0 = time.time(), time.process_time()
        lr = run.opt.param_groups[0]["lr"]  # at the epoch's start (per-step schedules move during it)
        train_ds.set_size(sizes[epoch])
        tl, ta, tn = _train_epoch(run, train_ds, t, epoch, seed, f"{run_dir.name} epoch {epoch} ({sizes[epoch]} px)")
        train_s = time.time() - t0
        prob, vloss = predict(run.model, val_ds, batch_size=int(t["eval_batch_size"]), device=run.device, criterion=run.val_crit,
                              amp=run.amp)
        vm = classification_metrics(val_ds.labels, prob, classes)
        rec = {"epoch": epoch, "size": sizes[epoch], "train_loss": tl, "train_accuracy": ta, "val_loss": vloss,
               "val_accuracy": vm["accuracy"], "val_auroc": vm["macro_auroc"], "val_balanced_accuracy": vm["balanced_accuracy"],
               "lr": lr, "images_per_second": round(tn / train_s, 2) if train_s > 0 else None,
               "train_seconds": round(train_s, 2), "seconds": round(time.time() - t0, 2),
               "cpu_seconds": round(time.process_time() - c0, 2)}  # all threads: the cost on a shared machine
        value = _select_value(t, rec)
        improved = value < st.best
        if improved:
            st.best, st.best_epoch, st.bad = value, epoch, 0
            save_checkpoint(run_dir / "best.pt", run.model, model_spec=mspec, classes=classes, input=_input_entry(spec),
                            preprocessing=_pre_entry(spec), training={**training_meta, "best_epoch": epoch}, metrics={"val": vm})
        else:
            st.bad += 1
        rec["best_epoch"] = st.best_epoch
        st.history.append(rec)
        with open(hist_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        # time left: a step costs about size^2, so the epochs still to come are weighted by it
        spent = sum(v * v for v in sizes[st.start_epoch: epoch + 1])
        left = (time.time() - t_run) / spent * sum(v * v for v in sizes[epoch + 1:])
        log.info("%s epoch %d/%d (%d px): train loss %.4f acc %.3f | val loss %.4f acc %.3f auroc %s | %.0f s, %.1f images/s, "
                 "about %s left%s", run_dir, epoch, epochs - 1, sizes[epoch], tl, ta, vloss, vm["accuracy"],
                 f"{vm['macro_auroc']:.3f}" if vm["macro_auroc"] else "n/a", rec["seconds"], rec["images_per_second"] or 0.0,
                 eta(left), " *" if improved else "")
        stop = bool(t["patience"]) and st.bad >= int(t["patience"]) and t["select"] != "last"
        if epoch + 1 < epochs and not stop or t["keep_last"]:  # resume state (not needed after the last epoch)
            _save_resume(last, run, st, epoch)
        if stop:
            log.info("%s: early stop at epoch %d (best %d)", run_dir, epoch, st.best_epoch)
            break
    metrics = _final_evaluation(run, run_dir, val_ds, eval_sets, mk, t, group_col)
    ck_meta = {**training_meta, "best_epoch": st.best_epoch if st.best_epoch >= 0 else _best_epoch(run_dir)}
    save_checkpoint(run_dir / "best.pt", run.model, model_spec=mspec, classes=classes, input=_input_entry(spec),
                    preprocessing=_pre_entry(spec), training=ck_meta, metrics=metrics)
    _write_json(run_dir / "metrics.json", metrics)
    _write_json(run_dir / "done.json", {"finished": datetime.now(UTC).isoformat(), "best_epoch": ck_meta["best_epoch"]})
    if not t["keep_last"] and last.exists():
        last.unlink()
    return metrics


def _best_epoch(run_dir: Path) -> int:
    ck = torch.load(run_dir / "best.pt", map_location="cpu", weights_only=True)
    return int(ck["training"]["best_epoch"])


def _final_evaluation(run: _Run, run_dir: Path, val_ds: ManifestDataset, eval_sets: dict[str, Sequence[dict]], mk: dict,
                      t: dict, group_col: str | None) -> dict[str, Any]:
    """Metrics and predictions of the selected weights (``best.pt``, loaded into the model already
    built: a second model would cost a ResNet50 initialisation for nothing) on val and every set."""
    ck = torch.load(run_dir / "best.pt", map_location=run.device, weights_only=True)
    run.model.load_state_dict(ck["state_dict"])
    del ck
    model = run.model.eval()
    classes = val_ds.classes
    metrics: dict[str, Any] = {}
    for name, rows in [("val", None), *eval_sets.items()]:
        ds = val_ds if rows is None else ManifestDataset(rows, **mk)
        if len(ds) == 0:
            continue
        # the reported metrics in float32 on CPU (bf16 there is a training speed-up, not the served model)
        prob, loss = predict(model, ds, batch_size=int(t["eval_batch_size"]), device=run.device, criterion=run.val_crit,
                             amp=run.amp and run.device.type == "cuda", progress=t["progress"])
        _write_predictions(run_dir / f"predictions_{name}.csv", ds, prob)
        metrics[name] = classification_metrics(ds.labels, prob, classes, groups=ds.groups if group_col else None, loss=loss)
    return metrics


# --------------------------------------------------------------------------------------------
# Experiments
# --------------------------------------------------------------------------------------------


def _limit(rows: list[dict], n: int, seed: int = 0) -> list[dict]:
    """About ``n`` rows made of whole patients drawn at random (smoke tests on a small subset)."""
    if not n or len(rows) <= n:
        return rows
    import random

    pids = sorted({r["patient_id"] for r in rows})
    random.Random(seed).shuffle(pids)
    per: dict[str, int] = {}
    for r in rows:
        per[r["patient_id"]] = per.get(r["patient_id"], 0) + 1
    keep, total = set(), 0
    for p in pids:
        if total >= n:
            break
        keep.add(p)
        total += per[p]
    return [r for r in rows if r["patient_id"] in keep]


#: Keys a resumed experiment may change: how it runs, not what it computes.  ``train.epochs``
#: extends (or shortens) the runs not finished yet; with a decaying schedule their lr curve changes.
RESUME_MAY_CHANGE = {"train.progress", "train.threads", "train.device", "train.num_workers", "train.eval_batch_size",
                     "train.keep_last", "train.epochs", "data.cache_dir", "cv.only_folds", "experiment.note"}


class ExperimentExists(ValueError):
    """``--out`` already holds an experiment and ``--resume`` was not given (or its config differs)."""


def _flat(cfg: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    return {f"{s}.{k}": v for s, table in cfg.items() for k, v in table.items()}


def _check_resume(cfg: dict, out: Path, resume: bool) -> dict | None:
    """The stored ``experiment.json`` of ``out`` when resuming it is allowed, None for a new one."""
    path = out / "experiment.json"
    if not path.exists():
        if resume:
            log.info("%s: nothing to resume, starting a new experiment", out)
        return None
    if not resume:
        raise ExperimentExists(f"{out} already holds an experiment; --resume continues it (finished runs are skipped), "
                               f"or choose another --out")
    old = json.loads(path.read_text())
    before, now = _flat(old["config"]), _flat(cfg)
    changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k) and k not in RESUME_MAY_CHANGE)
    if changed:
        raise ExperimentExists(f"{out} was started with another configuration ({', '.join(f'{k}: {before.get(k)!r} -> {now.get(k)!r}' for k in changed)}); "
                               f"resume it with the same config, or choose another --out")
    if before.get("train.epochs") != now.get("train.epochs"):
        log.warning("%s: train.epochs %s -> %s for the runs not finished yet", out, before.get("train.epochs"), now.get("train.epochs"))
    return old


def run_experiment(cfg: dict, out: str | Path, *, command: str | None = None, resume: bool = False,
                   results: str | Path | None = None) -> dict:
    """Run every model of ``cfg['experiment']['models']`` in ``cfg['experiment']['mode']``.

    Writes ``experiment.json`` and ``config.toml`` first, then the runs (folds outer, models inner,
    so an interrupted cv run has every model on the folds it finished).  ``resume``: continue the
    experiment already in ``out`` (finished runs are skipped, an interrupted one continues after
    its last finished epoch); without it an existing experiment is an error.  ``results``: a
    folder of published small results (training.publication): its finished runs are restored
    into ``out`` first (and the experiment resumes), and each run's small results are published
    there as soon as it finishes.  Returns ``{model: {fold or "single": metrics}}``."""
    out = Path(out)
    if results is not None:
        resume = bool(publication.restore(results, out)) or resume or (out / "experiment.json").exists()
    previous = _check_resume(cfg, out, resume)

    def published(metrics: dict) -> dict:
        if results is not None:
            publication.publish(out, results)
        return metrics

    out.mkdir(parents=True, exist_ok=True)
    e, d = cfg["experiment"], cfg["data"]
    manifest = Path(d["manifest"])
    rows = labelled_rows(read_manifest(manifest), d["label"])
    by_split = split_rows(rows, d["split_column"])
    if d["max_per_split"]:
        by_split = {k: _limit(v, int(d["max_per_split"])) for k, v in by_split.items()}
    provenance = {"manifest": str(manifest.resolve()), "manifest_sha256": manifest_sha256(manifest), "commit": git_commit(),
                  "versions": versions()}
    now = datetime.now(UTC).isoformat()
    cmd = command or " ".join(shlex.quote(a) for a in sys.argv)
    exp = {"config": cfg, **provenance, "command": cmd, "started": now, "host": platform.node(), "cpu_threads": torch.get_num_threads()}
    if previous is not None:
        exp.update(command=previous.get("command", cmd), started=previous.get("started", now),
                   resumed=[*previous.get("resumed", []), {"at": now, "command": cmd, "commit": provenance["commit"]}])
    _write_json(out / "experiment.json", exp)
    (out / "config.toml").write_text(config_mod.to_toml(cfg))
    cache: Mapping = {}
    if d["cache"]:
        cache = GreyCache.open(manifest, spec_of(cfg), d["cache_dir"] or None, progress=cfg["train"]["progress"])
    done: dict[str, dict] = {m: {} for m in e["models"]}
    t0 = time.time()
    if e["mode"] == "single":
        for m in e["models"]:
            run_dir = out if len(e["models"]) == 1 else out / m
            done[m]["single"] = published(train_run(cfg, m, by_split.get("train", []), by_split.get("val", []),
                                                    {"test": by_split.get("test", [])}, run_dir, provenance=provenance,
                                                    grey_cache=cache))
    else:
        c = cfg["cv"]
        pool = [r for s in c["pool"] for r in by_split.get(s, [])]
        holdout = by_split.get(c["holdout"], []) if c["holdout"] else []
        folds = cv_folds(pool, d["label"], folds=int(c["folds"]), val_fraction=float(c["val_fraction"]), seed=int(c["seed"]))
        classes = config_mod.classes_of(cfg)
        summary = []
        for k, f in enumerate(folds):
            entry = {"fold": k}
            for part in ("train", "val", "test"):
                rs = [pool[i] for i in f[part]]
                entry[part] = {"n": len(rs), "patients": sorted({r["patient_id"] for r in rs}),
                               "classes": {cl: sum(r[d["label"]] == cl for r in rs) for cl in classes}}
            summary.append(entry)
        _write_json(out / "folds.json", {"pool": c["pool"], "holdout": c["holdout"], "folds": summary})
        todo = [k for k in range(len(folds)) if not c["only_folds"] or k in c["only_folds"]]
        for k in todo:
            f = folds[k]
            sets = {"test": [pool[i] for i in f["test"]]}
            if holdout:
                sets["holdout"] = holdout
            for m in e["models"]:
                done[m][k] = published(train_run(cfg, m, [pool[i] for i in f["train"]], [pool[i] for i in f["val"]], sets,
                                                 out / m / f"fold-{k}", fold=k, provenance=provenance, grey_cache=cache))
            log.info("fold %d done after %.0f s", k, time.time() - t0)
    _write_json(out / "finished.json", {"finished": datetime.now(UTC).isoformat(), "seconds": round(time.time() - t0, 1)})
    published({})
    return done
