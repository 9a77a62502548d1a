"""The conversion pipeline: checkpoint -> gated IR(s) + model card(s).

Output layout (``--out DIR``)::

    DIR/model.xml, model.bin, model.json   the model the worker loads (``--model DIR``)
    DIR/float/...                          with --int8 only: the float IR, its own card (f32)
    DIR/conversion.json                    every measurement and gate (also in the cards)

Without ``--int8`` the deployed model is the float IR (FP16-compressed weights, or FP32 with
``--fp32``) at precision ``f32`` (or ``bf16`` with ``--precision bf16``, gated like INT8).  With
``--int8`` the deployed model is the INT8 IR at precision ``int8``; the float IR stays beside
it in ``float/`` as a fallback that the worker can also load.

Work happens in ``DIR.partial``; on success its contents move into ``DIR`` (which must be
absent or empty), on a missed gate the directory is renamed ``DIR.rejected`` (cards included, so
the numbers can be read) and :class:`conversion.gates.GateError` is raised.  Nothing that missed
a gate ever sits at the path a worker is pointed at.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov
import torch
from torch import nn

from conversion import card as cardmod
from conversion import gates as G
from conversion import heatmap as HM
from conversion.data import Split, load_split, read_manifest, sha256_file, spec_from_checkpoint
from conversion.export import compile_ir, ir_probabilities, save_ir, to_openvino, torch_probabilities
from conversion.metrics import DEFAULT_TARGETS, calibrate_thresholds, grouped_metrics
from worker.engine import Engine

log = logging.getLogger(__name__)

__all__ = ["ConvertOptions", "ConversionResult", "convert_checkpoint", "convert_model"]

_OVERALL_KEYS = ("accuracy", "balanced_accuracy", "macro_f1")
#: Test images of the heatmap_exact gate (torch autograd costs ~5 s per image and class on 2 cores).
HM_GATE_IMAGES = 8


@dataclass
class ConvertOptions:
    """Options of ``cxr-triage convert`` (see :mod:`conversion.cli`)."""

    manifest: str | Path | None = None
    fp32: bool = False
    int8: bool = False
    precision: str | None = None  # float deployment precision: "f32" (default) or "bf16"
    calibration: int = 300
    name: str | None = None
    version: str | None = None
    targets: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_TARGETS))
    parity_images: int = 32
    accuracy_control: bool = True  # fall back to nncf.quantize_with_accuracy_control on a missed INT8 gate
    preset: str = "performance"
    seed: int = 0
    # Subsets for tests and smoke runs only (None = the whole split, as the gates require).
    test_limit: int | None = None
    val_limit: int | None = None
    gate_limits: Mapping[str, float] | None = None  # tests only: override a gate's limit


@dataclass
class ConversionResult:
    out_dir: Path
    precision: str
    gates: list[G.Gate]
    report: dict[str, Any]

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.gates)


def _versions() -> dict[str, str]:
    import nncf
    import openvino

    return {"torch": torch.__version__, "openvino": openvino.get_version(), "nncf": nncf.__version__}


def _parity_indices(n: int, k: int) -> np.ndarray:
    """``k`` indices spread evenly over ``n`` test images (deterministic)."""
    k = min(k, n)
    return np.unique(np.linspace(0, n - 1, k).round().astype(int))


def _write_provisional(d: Path, ckpt: Mapping[str, Any], name: str, version: str, precision: str,
                       heatmap: Mapping[str, Any] | None = None) -> None:
    """A minimal valid card, so the worker's Engine can load the IR for measurement."""
    c = cardmod.build_card(ckpt, name=name, version=version, precision=precision, thresholds={})
    if heatmap:
        c["heatmap"] = dict(heatmap)
    c["intended_use"] = cardmod.INTENDED_USE + " (provisional card during conversion)"
    cardmod.write(d, c)


def _engine_probs(d: Path, precision: str, x: np.ndarray) -> np.ndarray:
    return Engine(d, precision=precision).infer(x)


def _metric_diff(a: Mapping[str, Any], b: Mapping[str, Any]) -> tuple[float, str]:
    worst, worst_key = 0.0, ""
    for k in _OVERALL_KEYS:
        d = abs(float(a[k]) - float(b[k]))
        if d >= worst:
            worst, worst_key = d, k
    return worst, worst_key


def _load_checkpoint(path: Path) -> tuple[nn.Module, dict[str, Any]]:
    """``training.checkpoint.load_checkpoint`` (imported late: the training package is an extra)."""
    from training.checkpoint import load_checkpoint

    return load_checkpoint(path)


def convert_checkpoint(checkpoint: str | Path, out_dir: str | Path, options: ConvertOptions | None = None) -> ConversionResult:
    """Load a training checkpoint (``training.checkpoint.load_checkpoint``) and :func:`convert_model` it."""
    ckpt_path = Path(checkpoint)
    if not ckpt_path.is_file():
        raise FileNotFoundError(f"checkpoint {ckpt_path} does not exist")
    model, ckpt = _load_checkpoint(ckpt_path)
    info = {"path": str(ckpt_path.resolve()), "sha256": sha256_file(ckpt_path)}
    return convert_model(model, ckpt, out_dir, options, checkpoint_info=info)


def convert_model(
    model: nn.Module,
    ckpt: Mapping[str, Any],
    out_dir: str | Path,
    options: ConvertOptions | None = None,
    *,
    checkpoint_info: Mapping[str, Any] | None = None,
) -> ConversionResult:
    """Convert a loaded model + its checkpoint dict (format ``cxr-triage-checkpoint/1``); raises GateError on a missed gate."""
    o = options or ConvertOptions()
    t_start = time.perf_counter()
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not empty; choose a new --out directory")
    for key in ("classes", "input", "model"):
        if key not in ckpt:
            raise ValueError(f"checkpoint lacks {key!r} (expected format cxr-triage-checkpoint/1)")
    precision_float = o.precision or "f32"
    if precision_float not in ("f32", "bf16"):
        raise ValueError(f"--precision must be f32 or bf16 (INT8 is --int8), got {precision_float!r}")
    classes = list(ckpt["classes"])
    spec = spec_from_checkpoint(ckpt)
    input_shape = (spec.channels, *spec.size)
    model_spec = ckpt.get("model") or {}
    name = o.name or f"cxr-{model_spec.get('name', 'model')}"
    version = o.version or "0.1.0"

    manifest = o.manifest or ((ckpt.get("training") or {}).get("config") or {}).get("manifest")
    if not manifest:
        raise ValueError("no manifest: pass --manifest CSV (the checkpoint's training config names none)")
    manifest = Path(manifest)
    if not manifest.is_file():
        raise FileNotFoundError(f"manifest {manifest} does not exist")
    manifest_sha = sha256_file(manifest)
    trained_sha = (ckpt.get("training") or {}).get("manifest_sha256")
    if trained_sha and trained_sha != manifest_sha:
        log.warning("manifest %s (sha256 %s) is not the one the checkpoint was trained on (%s)", manifest, manifest_sha[:12], trained_sha[:12])
    rows = read_manifest(manifest)

    model = model.eval().float()
    gates: list[G.Gate] = []
    limits = dict(o.gate_limits or {})

    def gate(gname: str, value: float, detail: str = "") -> G.Gate:
        g = G.check(gname, value, detail, limit=limits.get(gname))
        log.info(g.line())
        gates.append(g)
        return g

    timings: dict[str, float] = {}
    t = time.perf_counter()
    test = load_split(manifest, "test", classes, spec, limit=o.test_limit, seed=o.seed, rows=rows)
    val = load_split(manifest, "val", classes, spec, limit=o.val_limit, seed=o.seed, rows=rows)
    calib: Split | None = None
    if o.int8:
        calib = load_split(manifest, "train", classes, spec, limit=o.calibration, seed=o.seed, rows=rows)
    timings["load_images_s"] = time.perf_counter() - t

    t = time.perf_counter()
    p_torch_test = torch_probabilities(model, test.x)
    p_torch_val = torch_probabilities(model, val.x)
    timings["torch_eval_s"] = time.perf_counter() - t

    # ---- export + parity (f32 hint: never let bf16 masquerade as FP32)
    t = time.perf_counter()
    ov_fp32 = to_openvino(model, input_shape)
    timings["export_s"] = time.perf_counter() - t
    idx = _parity_indices(len(test), o.parity_images)
    x_par = test.x[idx]
    p_par_torch = p_torch_test[idx]
    d32 = G.max_abs_diff(ir_probabilities(compile_ir(ov_fp32, "f32"), x_par), p_par_torch)
    gate("parity_fp32", d32, f"{len(idx)} test images")

    stage = out.with_name(out.name + ".partial")
    rejected = out.with_name(out.name + ".rejected")
    for d in (stage, rejected):
        if d.exists():
            shutil.rmtree(d)
    stage.mkdir(parents=True)
    float_dir = stage / "float" if o.int8 else stage
    save_ir(ov_fp32, float_dir, fp16=not o.fp32)
    if not o.fp32:
        d16 = G.max_abs_diff(ir_probabilities(compile_ir(float_dir / "model.xml", "f32"), x_par), p_par_torch)
        g16 = gate("parity_fp16", d16, f"{len(idx)} test images")
        if not g16.passed:
            log.error("FP16 weight compression changes this model's output by more than the limit: convert with --fp32")

    # ---- heatmaps (issue 17): the head beside the IR; the worker's Grad-CAM against torch autograd
    heatmaps: dict[Path, dict[str, Any] | None] = {float_dir: HM.attach(float_dir, model)}
    hm_info: dict[str, Any] = {}
    hm_ref: np.ndarray | None = None
    if heatmaps[float_dir]:
        t = time.perf_counter()
        _write_provisional(float_dir, ckpt, name, version, "f32", heatmaps[float_dir])
        x_hm = x_par[: HM_GATE_IMAGES]
        ex = HM.exactness(model, compile_ir(ov_fp32, "f32"), float_dir, x_hm, len(classes))
        hm_ref = ex.pop("reference")
        gate("heatmap_exact", ex["max_abs_diff"], f"{ex['images']} test images x {len(classes)} classes, FP32 graph")
        hm_info = {"exactness": ex, "float": HM.deployed_agreement(float_dir, "f32", x_hm, hm_ref),
                   "seconds": round(time.perf_counter() - t, 1)}

    # ---- float IR through the worker's engine (provisional card)
    t = time.perf_counter()
    _write_provisional(float_dir, ckpt, name, version, "f32", heatmaps[float_dir])
    probs: dict[str, tuple[np.ndarray, np.ndarray]] = {"torch": (p_torch_test, p_torch_val)}
    probs["ir_f32"] = (_engine_probs(float_dir, "f32", test.x), _engine_probs(float_dir, "f32", val.x))
    if precision_float == "bf16":
        probs["ir_bf16"] = (_engine_probs(float_dir, "bf16", test.x), _engine_probs(float_dir, "bf16", val.x))
    timings["ir_eval_s"] = time.perf_counter() - t

    acc_torch = float((p_torch_test.argmax(1) == test.y).mean())

    def low_precision_gates(prefix: str, p: np.ndarray, detail: str = "") -> list[G.Gate]:
        agr = G.agreement(p, p_torch_test)
        drop = acc_torch - float((p.argmax(1) == test.y).mean())
        n = f"{len(test)} test images" + (f", {detail}" if detail else "")
        return [gate(f"{prefix}_agreement", agr, n), gate(f"{prefix}_accuracy_drop", drop, n)]

    if precision_float == "bf16":
        low_precision_gates("bf16", probs["ir_bf16"][0])

    # ---- INT8
    int8_info: dict[str, Any] = {}
    if o.int8:
        from conversion.quantize import quantize_int8, quantize_int8_with_accuracy_control

        assert calib is not None
        t = time.perf_counter()
        # Quantise a STATIC batch-1 copy: the worker runs [1, C, H, W] requests, and OpenVINO
        # 2026.4's CPU plugin computes a dynamic-batch INT8 model wrongly at batch 1 (measured on
        # the default-3class hybrid: max |prob diff| 0.72 against the same model reshaped to
        # [1, C, H, W]; batch 8 agrees exactly).  NNCF's accuracy control validates item by item
        # at batch 1, so on the dynamic model it would optimise against those wrong numbers.
        ov_static = ov_fp32.clone()
        ov_static.reshape({ov_static.input(0): ov.PartialShape([1, *input_shape])})
        q = quantize_int8(ov_static, calib.x, preset=o.preset)
        save_ir(q, stage, fp16=not o.fp32)  # the layers left in float: FP16 unless --fp32
        heatmaps[stage] = HM.attach(stage, model)
        _write_provisional(stage, ckpt, name, version, "int8", heatmaps[stage])
        p8 = (_engine_probs(stage, "int8", test.x), _engine_probs(stage, "int8", val.x))
        int8_info = {"method": "nncf.quantize", "preset": o.preset, "calibration_split": "train", "input": "static [1, C, H, W]",
                     "calibration_images": len(calib), "seconds": round(time.perf_counter() - t, 1)}
        # Try the plain result against the gate limits without recording it yet.
        agr = G.agreement(p8[0], p_torch_test)
        drop = acc_torch - float((p8[0].argmax(1) == test.y).mean())
        plain_ok = G.check("int8_agreement", agr, limit=limits.get("int8_agreement")).passed and G.check(
            "int8_accuracy_drop", drop, limit=limits.get("int8_accuracy_drop")).passed
        int8_info["plain"] = {"agreement": agr, "accuracy_drop": drop, "passed": plain_ok}
        if not plain_ok and o.accuracy_control:
            log.warning("plain INT8 misses the gate (agreement %.4f, drop %.4f): accuracy-aware quantisation", agr, drop)
            t = time.perf_counter()
            q = quantize_int8_with_accuracy_control(
                ov_static, calib.x, val.x, p_torch_val.argmax(1), max_drop=0.005, preset=o.preset
            )
            for f in ("model.xml", "model.bin", "model.json"):
                (stage / f).unlink()
            save_ir(q, stage, fp16=not o.fp32)
            heatmaps[stage] = HM.attach(stage, model)
            _write_provisional(stage, ckpt, name, version, "int8", heatmaps[stage])
            p8 = (_engine_probs(stage, "int8", test.x), _engine_probs(stage, "int8", val.x))
            int8_info.update(method="nncf.quantize_with_accuracy_control", validation_split="val",
                             metric="top-1 agreement with torch", max_drop=0.005,
                             accuracy_control_seconds=round(time.perf_counter() - t, 1))
        probs["ir_int8"] = p8
        if heatmaps.get(stage) and hm_ref is not None:
            hm_info["int8"] = HM.deployed_agreement(stage, "int8", x_par[: HM_GATE_IMAGES], hm_ref)
        low_precision_gates("int8", p8[0], int8_info["method"])

    deployed = "ir_int8" if o.int8 else ("ir_bf16" if precision_float == "bf16" else "ir_f32")
    deployed_precision = {"ir_int8": "int8", "ir_bf16": "bf16", "ir_f32": "f32"}[deployed]

    # ---- thresholds (validation split, each directory from its own deployed probabilities) and metrics
    def calib_for(key: str) -> dict[str, Any]:
        c = calibrate_thresholds(probs[key][1], val.y, classes, o.targets)
        return {"split": "val", "n": len(val), "scores": key, "targets": dict(o.targets), **c}

    cal = calib_for(deployed)
    thresholds = cal["thresholds"]

    def metrics_block(thr: Mapping[str, float], deployed_key: str) -> dict[str, Any]:
        m: dict[str, Any] = {
            "split": "test", "manifest": str(manifest), "manifest_sha256": manifest_sha,
            "label_column": None, "n": len(test), "deployed": deployed_key, "thresholds_applied": dict(thr),
        }
        from conversion.data import label_column

        m["label_column"] = label_column(rows, classes)
        for key, (pt, _pv) in probs.items():
            m[key] = grouped_metrics(pt, test.y, classes, test.age_groups, thr)
        return m

    conversion_info = {
        "ir_weights": "fp32" if o.fp32 else "fp16",
        "softmax_in_ir": True,
        "int8": int8_info or None,
        "parity_images": int(len(idx)),
        "versions": _versions(),
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "heatmap": hm_info or None,
    }
    final_card = cardmod.build_card(
        ckpt, name=name, version=version, precision=deployed_precision, thresholds=thresholds,
        calibration=cal, metrics=metrics_block(thresholds, deployed), gates=[g.to_dict() for g in gates],
        conversion={**conversion_info, "float_ir": "float/" if o.int8 else None}, checkpoint_info=checkpoint_info,
    )
    if heatmaps.get(stage):
        final_card["heatmap"] = heatmaps[stage]
    cardmod.write(stage, final_card)
    float_card = None
    if o.int8:
        fcal = calib_for("ir_f32")
        float_card = cardmod.build_card(
            ckpt, name=name, version=version, precision="f32", thresholds=fcal["thresholds"],
            calibration=fcal, metrics=metrics_block(fcal["thresholds"], "ir_f32"), gates=[g.to_dict() for g in gates],
            conversion={**conversion_info, "note": "float fallback of the INT8 model in the parent directory"},
            checkpoint_info=checkpoint_info, created=final_card["created"],
        )
        if heatmaps.get(float_dir):
            float_card["heatmap"] = heatmaps[float_dir]
        cardmod.write(float_dir, float_card)

    # ---- the worker reproduces the card (fresh Engine, DICOM preprocessing path, spec from the card)
    from conversion.worker_check import worker_predictions

    image_root = manifest.parent
    checks = [(stage, final_card, deployed)] + ([(float_dir, float_card, "ir_f32")] if float_card else [])
    worker_info: dict[str, Any] = {}
    for d, c, key in checks:
        pw, info = worker_predictions(d, image_root, test.files, reference_x=test.x)
        mw = grouped_metrics(pw, test.y, classes, test.age_groups)["overall"]
        diff, which = _metric_diff(mw, c["metrics"][key]["overall"])
        rel = "." if d == stage else str(d.relative_to(stage))
        gate("worker_reproduces", diff, f"{rel}: {key} at {info['precision']}, worst {which}; "
             f"pixel diff vs conversion {info.get('max_pixel_diff_vs_conversion', float('nan')):.3g}")
        worker_info[rel] = {**info, **{k: mw[k] for k in _OVERALL_KEYS}}

    # Final cards carry every gate (the .bin is unchanged, so the sha256 is too).
    for d, c, _ in checks:
        c["gates"] = [g.to_dict() for g in gates]
        c["conversion"]["worker_check"] = worker_info
        cardmod.write(d, c)
        (d / "README.md").write_text(cardmod.card_markdown(c) + "\n")  # the same card, for people

    # ---- shortcut attention of the deployed model (issue 17): stage/attention/, summary in the report
    attention: dict[str, Any] | None = None
    if heatmaps.get(stage):
        from conversion.attention import attention_report

        att = attention_report(stage, manifest, stage / "attention", limit=o.test_limit, seed=o.seed)
        attention = {k: att[k] for k in ("n", "overall", "by_class", "by_source", "source_check_auroc", "figures")}

    report = {
        "out": str(out), "deployed": deployed, "precision": deployed_precision, "attention": attention,
        "gates": [g.to_dict() for g in gates], "thresholds": thresholds, "threshold_calibration": cal,
        "metrics": final_card["metrics"], "conversion": final_card["conversion"],
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    (stage / "conversion.json").write_text(json.dumps(report, indent=2, default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v)) + "\n")

    if not all(g.passed for g in gates):
        stage.rename(rejected)
        log.error("conversion rejected; everything it measured is in %s", rejected)
        raise G.GateError(gates)
    out.mkdir(parents=True, exist_ok=True)
    for p in stage.iterdir():
        p.rename(out / p.name)
    stage.rmdir()
    log.info("conversion accepted: %s (%s) in %.0fs", out, deployed_precision, report["seconds"])
    return ConversionResult(out, deployed_precision, gates, report)
