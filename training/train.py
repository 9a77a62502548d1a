"""Training loop and experiment driver (single split or the paper's 5-fold protocol).

Layout of an experiment folder (``--out``)::

    experiment.json         resolved config, git commit, manifest sha256, library versions, command
    config.toml             the resolved config as TOML (re-runnable with --config)
    folds.json              (cv) patient ids and class counts of every fold's train/val/test
    <model>/fold-<k>/       (cv) one run per model and fold
    <model>/                (single, several models)     or the folder itself (single, one model)
        run.json            model, fold, sizes, class weights
        history.jsonl       one JSON line per epoch (losses, accuracy, AUROC, lr, seconds)
        best.pt             checkpoint (cxr-triage-checkpoint/1) of the selected epoch, with metrics
        last.pt             resume state (model, optimiser, scheduler, epoch), removed when done
        predictions_<split>.csv   per image: file, patient, group, label, prediction, probabilities
        metrics.json        {"val": ..., "test": ..., "holdout": ...}
        done.json           present once complete (a re-run skips complete runs and resumes others)

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
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from worker.imaging import PreprocessSpec

from . import config as config_mod
from .checkpoint import model_spec, save_checkpoint
from .data import Augment, ManifestDataset, class_weights, cv_folds, labelled_rows, manifest_sha256, read_manifest, split_rows
from .metrics import classification_metrics
from .models import count_parameters, create_model

log = logging.getLogger(__name__)

__all__ = ["run_experiment", "train_run", "predict", "versions", "git_commit", "spec_of"]


# --------------------------------------------------------------------------------------------
# Provenance
# --------------------------------------------------------------------------------------------


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": str(torch.__version__)}
    for mod in ("torchvision", "timm", "numpy", "sklearn", "scipy", "PIL", "pydicom"):
        try:
            m = __import__(mod)
            out[mod] = str(getattr(m, "__version__", "?"))
        except ImportError:
            pass
    out["cuda"] = torch.version.cuda or ""
    return out


def git_commit(path: str | Path | None = None) -> str:
    """HEAD commit of the repository holding this package, ``+dirty`` when it has local changes."""
    here = Path(path or Path(__file__).resolve().parent)
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=here, capture_output=True, text=True, timeout=10)
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


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


def _lr_factor(epoch: int, t: dict) -> float:
    """Multiplier of the base lr for ``epoch`` (0-based): linear warm-up, then constant or cosine."""
    w = int(t["warmup_epochs"])
    if w and epoch < w:
        return (epoch + 1) / (w + 1)
    if t["schedule"] == "cosine":
        span = max(1, int(t["epochs"]) - w)
        prog = min(1.0, (epoch - w) / span)
        floor = t["min_lr"] / t["lr"] if t["lr"] else 0.0
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * prog))
    return 1.0


def _optimizer(model: nn.Module, t: dict) -> torch.optim.Optimizer:
    if t["optimizer"] == "adam":
        return torch.optim.Adam(model.parameters(), lr=t["lr"], weight_decay=t["weight_decay"])
    if t["optimizer"] == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=t["lr"], weight_decay=t["weight_decay"])
    return torch.optim.SGD(model.parameters(), lr=t["lr"], momentum=t["momentum"], weight_decay=t["weight_decay"], nesterov=True)


def _progress(it, total: int, desc: str, mode: str):
    if mode == "auto":
        try:
            from tqdm.auto import tqdm

            return tqdm(it, total=total, desc=desc, leave=False, mininterval=5.0, file=sys.stderr)
        except ImportError:
            pass
    return it


@torch.inference_mode()
def predict(model: nn.Module, ds: ManifestDataset, *, batch_size: int = 64, device: torch.device | str = "cpu",
            criterion: nn.Module | None = None, amp: bool = False) -> tuple[np.ndarray, float | None]:
    """(softmax probabilities (N, K), mean loss or None)."""
    device = torch.device(device)
    model.eval()
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=0)
    probs, total, n = [], 0.0, 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x)
        logits = logits.float()
        if criterion is not None:
            total += float(criterion(logits, y)) * len(y)
            n += len(y)
        probs.append(torch.softmax(logits, 1).cpu().numpy())
    p = np.concatenate(probs) if probs else np.zeros((0, len(ds.classes)), np.float32)
    return p, (total / n if n else None)


def _write_predictions(path: Path, ds: ManifestDataset, prob: np.ndarray) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "patient_id", "group", "label", "pred", *[f"p_{c}" for c in ds.classes]])
        for i in range(len(ds)):
            w.writerow([ds.files[i], ds.patients[i], ds.groups[i], ds.classes[ds.labels[i]], ds.classes[int(prob[i].argmax())],
                        *[f"{v:.6f}" for v in prob[i]]])


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
    grey_cache: dict | None = None,
) -> dict:
    """Train one model; returns its metrics dict ({"val": ..., <eval set>: ...}). Resumes from
    ``run_dir/last.pt``; returns the stored metrics when ``run_dir/done.json`` exists."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if (run_dir / "done.json").exists() and (run_dir / "metrics.json").exists():
        log.info("%s: complete, skipped", run_dir)
        return json.loads((run_dir / "metrics.json").read_text())
    t, d, mcfg = cfg["train"], cfg["data"], cfg["model"]
    if t["threads"]:
        torch.set_num_threads(int(t["threads"]))
    seed = int(t["seed"]) + (1000 * (fold + 1) if fold is not None else 0)
    classes = config_mod.classes_of(cfg)
    spec = spec_of(cfg)
    group_col = d["group_column"] or None
    device = _device(cfg)
    cache = grey_cache if grey_cache is not None else {}
    aug = Augment.from_config(cfg["augment"], t["augment_strength"]) if t["augment"] else None
    mk = dict(classes=classes, label=d["label"], spec=spec, cache=d["cache"], group_column=group_col, grey_cache=cache)
    train_ds = ManifestDataset(train_rows, augment=aug, seed=seed, **mk)
    val_ds = ManifestDataset(val_rows, **mk)
    counts = train_ds.class_counts()
    cw = class_weights(counts) if t["class_weights"] == "balanced" else [1.0] * len(classes)

    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    kwargs = {"mobilenet": mcfg["mobilenet"], "head_hidden": int(mcfg["head_hidden"]), "dropout": float(mcfg["dropout"])}
    model = create_model(model_name, len(classes), weights=mcfg["weights"], resnet_weights=mcfg["resnet_weights"] or None,
                         mobilenet_weights=mcfg["mobilenet_weights"] or None, **kwargs)
    model.to(device)
    cpu_amp = bool(t["cpu_amp"]) and device.type == "cpu"
    channels_last = (device.type == "cuda" and t["channels_last"]) or cpu_amp
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = _optimizer(model, t)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: _lr_factor(e, t))
    weight = torch.tensor(cw, dtype=torch.float32, device=device)
    crit = nn.CrossEntropyLoss(weight=weight, label_smoothing=float(t["label_smoothing"]))
    val_crit = nn.CrossEntropyLoss(weight=weight)
    amp = (bool(t["amp"]) and device.type == "cuda") or cpu_amp

    mspec = model_spec(model_name, len(classes), **kwargs)
    training_meta = {
        "config": cfg,
        "model_weights": {"weights": mcfg["weights"], "resnet_weights": mcfg["resnet_weights"], "mobilenet_weights": mcfg["mobilenet_weights"]},
        "fold": fold,
        "seed": seed,
        "class_counts": dict(zip(classes, counts)),
        "class_weights": dict(zip(classes, cw)),
        **(provenance or {}),
    }
    run_info = {"model": model_name, "fold": fold, "classes": classes, "n_train": len(train_ds), "n_val": len(val_ds),
                "eval_sets": {k: len(labelled_rows(v, d["label"])) for k, v in eval_sets.items()},
                "class_counts": training_meta["class_counts"], "class_weights": training_meta["class_weights"],
                "parameters_keras": count_parameters(model), "parameters": count_parameters(model, keras_style=False),
                "device": str(device), "seed": seed}
    _write_json(run_dir / "run.json", run_info)

    start_epoch, best, best_epoch, bad = 0, math.inf, -1, 0
    hist_path = run_dir / "history.jsonl"
    last = run_dir / "last.pt"
    if last.exists():
        st = torch.load(last, map_location=device, weights_only=False)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        sched.load_state_dict(st["sched"])
        start_epoch, best, best_epoch, bad = st["epoch"] + 1, st["best"], st["best_epoch"], st["bad"]
        torch.set_rng_state(st["torch_rng"])
        log.info("%s: resumed after epoch %d", run_dir, st["epoch"])
        # drop history lines of epochs after the resume point
        if hist_path.exists():
            lines = [ln for ln in hist_path.read_text().splitlines() if ln and json.loads(ln)["epoch"] < start_epoch]
            hist_path.write_text("".join(ln + "\n" for ln in lines))
    elif hist_path.exists():
        hist_path.unlink()

    epochs = int(t["epochs"])
    gen = torch.Generator()
    for epoch in range(start_epoch, epochs):
        t0 = time.time()
        model.train()
        train_ds.set_epoch(epoch)
        gen.manual_seed(seed * 1009 + epoch)
        loader = torch.utils.data.DataLoader(train_ds, batch_size=int(t["batch_size"]), shuffle=True, generator=gen,
                                             num_workers=int(t["num_workers"]), drop_last=len(train_ds) > int(t["batch_size"]))
        nb = len(loader) if not t["max_train_batches"] else min(len(loader), int(t["max_train_batches"]))
        tl, tc, tn = 0.0, 0, 0
        for b, (x, y) in enumerate(_progress(loader, nb, f"{run_dir.name} e{epoch}", t["progress"])):
            if b >= nb:
                break
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logits = model(x)
            loss = crit(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tl += float(loss.detach()) * len(y)
            tc += int((logits.argmax(1) == y).sum())
            tn += len(y)
        lr = opt.param_groups[0]["lr"]
        sched.step()
        prob, vloss = predict(model, val_ds, batch_size=int(t["eval_batch_size"]), device=device, criterion=val_crit, amp=amp)
        vm = classification_metrics(val_ds.labels, prob, classes)
        rec = {"epoch": epoch, "train_loss": tl / max(tn, 1), "train_accuracy": tc / max(tn, 1), "val_loss": vloss,
               "val_accuracy": vm["accuracy"], "val_auroc": vm["macro_auroc"], "val_balanced_accuracy": vm["balanced_accuracy"],
               "lr": lr, "seconds": round(time.time() - t0, 2)}
        value = _select_value(t, rec)
        improved = value < best
        if improved:
            best, best_epoch, bad = value, epoch, 0
            save_checkpoint(run_dir / "best.pt", model, model_spec=mspec, classes=classes, input=_input_entry(spec),
                            preprocessing=_pre_entry(spec), training={**training_meta, "best_epoch": epoch}, metrics={"val": vm})
        else:
            bad += 1
        rec["best_epoch"] = best_epoch
        with open(hist_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        log.info("%s epoch %d: train loss %.4f acc %.3f | val loss %.4f acc %.3f auroc %s | %.0fs%s", run_dir, epoch, rec["train_loss"],
                 rec["train_accuracy"], vloss, vm["accuracy"], f"{vm['macro_auroc']:.3f}" if vm["macro_auroc"] else "n/a",
                 rec["seconds"], " *" if improved else "")
        stop = bool(t["patience"]) and bad >= int(t["patience"]) and t["select"] != "last"
        if epoch + 1 < epochs and not stop or t["keep_last"]:  # resume state (not needed after the last epoch)
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(), "epoch": epoch, "best": best,
                        "best_epoch": best_epoch, "bad": bad, "torch_rng": torch.get_rng_state()}, last)
        if stop:
            log.info("%s: early stop at epoch %d (best %d)", run_dir, epoch, best_epoch)
            break

    # Final evaluation with the selected weights
    # (the selected weights go into the model already built: building a second one costs a
    # ResNet50 initialisation for nothing)
    ck = torch.load(run_dir / "best.pt", map_location=device, weights_only=True)
    model.load_state_dict(ck["state_dict"])
    best_model, meta = model.eval(), {"training": {"best_epoch": ck["training"]["best_epoch"]}}
    del ck
    metrics: dict[str, Any] = {}
    for name, rows in [("val", val_rows), *eval_sets.items()]:
        ds = val_ds if name == "val" else ManifestDataset(rows, **mk)
        if len(ds) == 0:
            continue
        # the reported metrics in float32 on CPU (bf16 there is a training speed-up, not the served model)
        prob, loss = predict(best_model, ds, batch_size=int(t["eval_batch_size"]), device=device, criterion=val_crit,
                             amp=amp and device.type == "cuda")
        _write_predictions(run_dir / f"predictions_{name}.csv", ds, prob)
        metrics[name] = classification_metrics(ds.labels, prob, classes, groups=ds.groups if group_col else None, loss=loss)
    save_checkpoint(run_dir / "best.pt", best_model, model_spec=mspec, classes=classes, input=_input_entry(spec),
                    preprocessing=_pre_entry(spec), training={**training_meta, "best_epoch": meta["training"]["best_epoch"]}, metrics=metrics)
    _write_json(run_dir / "metrics.json", metrics)
    _write_json(run_dir / "done.json", {"finished": datetime.now(timezone.utc).isoformat(), "best_epoch": meta["training"]["best_epoch"]})
    if not t["keep_last"] and last.exists():
        last.unlink()
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


def run_experiment(cfg: dict, out: str | Path, *, command: str | None = None) -> dict:
    """Run every model of ``cfg['experiment']['models']`` in ``cfg['experiment']['mode']``.

    Writes ``experiment.json`` and ``config.toml`` first, then the runs (folds outer, models inner,
    so an interrupted cv run has every model on the folds it finished).  Returns
    ``{model: {fold or "single": metrics}}``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    e, d = cfg["experiment"], cfg["data"]
    manifest = Path(d["manifest"])
    rows = labelled_rows(read_manifest(manifest), d["label"])
    by_split = split_rows(rows, d["split_column"])
    if d["max_per_split"]:
        by_split = {k: _limit(v, int(d["max_per_split"])) for k, v in by_split.items()}
    provenance = {"manifest": str(manifest.resolve()), "manifest_sha256": manifest_sha256(manifest), "commit": git_commit(),
                  "versions": versions()}
    _write_json(out / "experiment.json", {"config": cfg, **provenance, "command": command or " ".join(shlex.quote(a) for a in sys.argv),
                                          "started": datetime.now(timezone.utc).isoformat(), "host": platform.node(),
                                          "cpu_threads": torch.get_num_threads()})
    (out / "config.toml").write_text(config_mod.to_toml(cfg))
    cache: dict = {}
    results: dict[str, dict] = {m: {} for m in e["models"]}
    t0 = time.time()
    if e["mode"] == "single":
        for m in e["models"]:
            run_dir = out if len(e["models"]) == 1 else out / m
            results[m]["single"] = train_run(cfg, m, by_split.get("train", []), by_split.get("val", []),
                                             {"test": by_split.get("test", [])}, run_dir, provenance=provenance, grey_cache=cache)
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
                results[m][k] = train_run(cfg, m, [pool[i] for i in f["train"]], [pool[i] for i in f["val"]], sets,
                                          out / m / f"fold-{k}", fold=k, provenance=provenance, grey_cache=cache)
            log.info("fold %d done after %.0f s", k, time.time() - t0)
    _write_json(out / "finished.json", {"finished": datetime.now(timezone.utc).isoformat(), "seconds": round(time.time() - t0, 1)})
    return results
