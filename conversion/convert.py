"""The conversion pipeline: checkpoint -> gated IR(s) + model card(s).

Output layout (``--out DIR``)::

    DIR/model.xml, model.bin, model.json   the model the worker loads (``--model DIR``)
    DIR/float/...                          with --int8 only: the float IR, its own card (f32)
    DIR/conversion.json                    every measurement and gate (also in the cards)

Without ``--int8`` the deployed model is the float IR (FP16-compressed weights, or FP32 with
``--fp32``) at precision ``f32`` (or ``bf16`` with ``--precision bf16``).  With ``--int8 ptq``
(post-training quantisation) or ``--int8 qat`` (quantisation-aware training,
:mod:`conversion.qat`) the deployed model is the INT8 IR at precision ``int8``; the float IR
stays beside it in ``float/`` as a fallback that the worker can also load.  ``--int8 qat``
also runs PTQ and reports both side by side (``conversion.int8.ptq``).

Every lower-precision candidate (FP16 weights, bf16 compute, INT8) is decided by the same
gates on what a user relies on (:func:`conversion.gates.candidate_gates`): the float model and
the candidate side by side on the test split, each at thresholds calibrated on the validation
split with its own scores.

Work happens in ``DIR.partial``; on success its contents move into ``DIR`` (which must be
absent or empty), on a missed gate the directory is renamed ``DIR.rejected`` (cards included, so
the numbers can be read) and :class:`conversion.gates.GateError` is raised.  Nothing that missed
a gate ever sits at the path a worker is pointed at.  QAT's per-epoch state lives in
``DIR.qat`` (kept until the conversion is accepted, so a killed run resumes its fine-tuning).
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
from conversion.data import Split, label_column, load_split, read_manifest, sha256_file, spec_from_checkpoint
from conversion.export import compile_ir, ir_probabilities, save_ir, to_openvino, torch_probabilities
from conversion.metrics import DEFAULT_TARGETS, calibrate_thresholds, grouped_metrics
from conversion.qat import QatOptions
from worker.engine import Engine

log = logging.getLogger(__name__)

__all__ = ["ConvertOptions", "ConversionResult", "convert_checkpoint", "convert_model"]

_OVERALL_KEYS = ("accuracy", "balanced_accuracy", "macro_f1")
_INT8_METHODS = ("ptq", "qat")
#: Test images of the heatmap_exact gate (torch autograd costs ~5 s per image and class on 2 cores).
HM_GATE_IMAGES = 8


@dataclass
class ConvertOptions:
    """Options of ``cxr-triage convert`` (see :mod:`conversion.cli`)."""

    manifest: str | Path | None = None
    fp32: bool = False
    int8: bool | str = False  # False, "ptq" (True means "ptq") or "qat"
    precision: str | None = None  # float deployment precision: "f32" (default) or "bf16"
    calibration: int = 300
    name: str | None = None
    version: str | None = None
    targets: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_TARGETS))
    parity_images: int = 32
    int8_float: tuple[str, ...] = ()  # PTQ: hybrid parts kept in float (conversion.quantize.FLOAT_PARTS)
    accuracy_control: bool = True  # PTQ: fall back to nncf.quantize_with_accuracy_control on a missed gate
    preset: str = "performance"
    seed: int = 0
    qat: QatOptions = field(default_factory=QatOptions)
    # Subsets for tests and smoke runs only (None = the whole split, as the gates require).
    test_limit: int | None = None
    val_limit: int | None = None
    gate_limits: Mapping[str, float] | None = None  # tests only: override a gate's limit

    @property
    def int8_method(self) -> str | None:
        if self.int8 is True:
            return "ptq"
        if not self.int8:
            return None
        if self.int8 not in _INT8_METHODS:
            raise ValueError(f"--int8 must be one of {', '.join(_INT8_METHODS)}, got {self.int8!r}")
        return str(self.int8)


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


def _static_batch1(ov_model: ov.Model, input_shape: tuple[int, int, int]) -> ov.Model:
    """A copy reshaped to ``[1, C, H, W]``: the worker runs batch-1 requests, and OpenVINO 2026.4's
    CPU plugin computes a dynamic-batch INT8 model wrongly at batch 1 (measured on the
    default-3class hybrid: max |prob diff| 0.72 against the same model reshaped to [1, C, H, W];
    batch 8 agrees exactly; :func:`_dynamic_batch_check` keeps measuring it)."""
    m = ov_model.clone()
    m.reshape({m.input(0): ov.PartialShape([1, *input_shape])})
    return m


def _dynamic_batch_check(ov_model: ov.Model, x: np.ndarray) -> dict[str, Any]:
    """The check that found the dynamic-batch INT8 problem: the same dynamic-batch model at batch
    1 and batch 8, max |prob diff| (a reported figure; the deployed INT8 IR is static anyway)."""
    c = compile_ir(ov_model, "f32")
    k = min(8, x.shape[0])
    d = G.max_abs_diff(ir_probabilities(c, x[:k], batch=1), ir_probabilities(c, x[:k], batch=k))
    return {"images": k, "max_prob_diff_batch1_vs_batch8": d,
            "note": "dynamic-batch INT8 model, OpenVINO CPU; the deployed IR is static [1, C, H, W]"}


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
    job = _Conversion(model, ckpt, Path(out_dir), options or ConvertOptions(), dict(checkpoint_info or {}))
    job.load_data()
    ov_float = job.export_float()
    job.measure_float()
    if job.int8_method:
        job.quantize(ov_float)
    job.gate_candidates()
    job.write_cards()
    job.check_worker()
    return job.finish()


class _Conversion:
    """State of one conversion; :func:`convert_model` calls its steps in order."""

    def __init__(self, model: nn.Module, ckpt: Mapping[str, Any], out: Path, o: ConvertOptions,
                 checkpoint_info: dict[str, Any]) -> None:
        self.t_start = time.perf_counter()
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise FileExistsError(f"{out} exists and is not empty; choose a new --out directory")
        for key in ("classes", "input", "model"):
            if key not in ckpt:
                raise ValueError(f"checkpoint lacks {key!r} (expected format cxr-triage-checkpoint/1)")
        self.precision_float = o.precision or "f32"
        if self.precision_float not in ("f32", "bf16"):
            raise ValueError(f"--precision must be f32 or bf16 (INT8 is --int8), got {self.precision_float!r}")
        self.int8_method = o.int8_method
        self.model, self.ckpt, self.out, self.o, self.checkpoint_info = model.eval().float(), ckpt, out, o, checkpoint_info
        self.classes = list(ckpt["classes"])
        self.spec = spec_from_checkpoint(ckpt)
        self.input_shape = (self.spec.channels, *self.spec.size)
        self.name = o.name or f"cxr-{(ckpt.get('model') or {}).get('name', 'model')}"
        self.version = o.version or "0.1.0"
        manifest = o.manifest or ((ckpt.get("training") or {}).get("config") or {}).get("manifest")
        if not manifest:
            raise ValueError("no manifest: pass --manifest CSV (the checkpoint's training config names none)")
        self.manifest = Path(manifest)
        if not self.manifest.is_file():
            raise FileNotFoundError(f"manifest {self.manifest} does not exist")
        self.manifest_sha = sha256_file(self.manifest)
        trained_sha = (ckpt.get("training") or {}).get("manifest_sha256")
        if trained_sha and trained_sha != self.manifest_sha:
            log.warning("manifest %s (sha256 %s) is not the one the checkpoint was trained on (%s)",
                        self.manifest, self.manifest_sha[:12], trained_sha[:12])
        self.rows = read_manifest(self.manifest)
        self.gates: list[G.Gate] = []
        self.limits = dict(o.gate_limits or {})
        self.timings: dict[str, float] = {}
        self.probs: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # key -> (test, val) probabilities
        self.int8_info: dict[str, Any] = {}
        self.candidates: dict[str, dict[str, Any]] = {}
        self.heatmaps: dict[Path, dict[str, Any] | None] = {}  # model dir -> card "heatmap" block (issue 17)
        self.hm_info: dict[str, Any] = {}
        self.hm_ref: np.ndarray | None = None
        self.stage = out.with_name(out.name + ".partial")
        self.rejected = out.with_name(out.name + ".rejected")
        self.qat_dir = out.with_name(out.name + ".qat")
        self.float_dir = self.stage / "float" if self.int8_method else self.stage

    # ---- helpers
    def gate(self, g: G.Gate) -> G.Gate:
        log.info(g.line())
        self.gates.append(g)
        return g

    def engine_probs(self, d: Path, precision: str) -> tuple[np.ndarray, np.ndarray]:
        e = Engine(d, precision=precision)
        return e.infer(self.test.x), e.infer(self.val.x)

    def provisional_card(self, d: Path, precision: str) -> None:
        """A minimal valid card, so the worker's Engine can load the IR for measurement."""
        c = cardmod.build_card(self.ckpt, name=self.name, version=self.version, precision=precision, thresholds={})
        if self.heatmaps.get(d):
            c["heatmap"] = dict(self.heatmaps[d] or {})
        c["intended_use"] = cardmod.INTENDED_USE + " (provisional card during conversion)"
        cardmod.write(d, c)

    def calibration(self, key: str) -> dict[str, Any]:
        """Thresholds for ``key`` from its own validation scores."""
        c = calibrate_thresholds(self.probs[key][1], self.val.y, self.classes, self.o.targets)
        return {"split": "val", "n": len(self.val), "scores": key, "targets": dict(self.o.targets), **c}

    def test_metrics(self, key: str, thresholds: Mapping[str, float]) -> dict[str, Any]:
        return grouped_metrics(self.probs[key][0], self.test.y, self.classes, self.test.age_groups, thresholds,
                               sources=self.test.sources)

    def candidate(self, key: str, prefix: str) -> tuple[dict[str, Any], list[G.Gate]]:
        """Float (torch) and ``key`` side by side, and the candidate gates ``prefix`` (not recorded)."""
        ref_thr = self.calibration("torch")["thresholds"]
        thr = self.calibration(key)["thresholds"]
        measures = G.candidate_measures(self.test_metrics("torch", ref_thr), self.test_metrics(key, thr),
                                        self.probs["torch"][0], self.probs[key][0])
        gates = G.candidate_gates(prefix, measures, f"{len(self.test)} test images", limits=self.limits)
        entry = {"scores": key, "precision": prefix, "float_thresholds": ref_thr, "thresholds": thr,
                 "measures": measures, "passed": all(g.passed for g in gates)}
        return entry, gates

    # ---- steps
    def load_data(self) -> None:
        t = time.perf_counter()
        o = self.o
        self.test = load_split(self.manifest, "test", self.classes, self.spec, limit=o.test_limit, seed=o.seed, rows=self.rows)
        self.val = load_split(self.manifest, "val", self.classes, self.spec, limit=o.val_limit, seed=o.seed, rows=self.rows)
        self.calib: Split | None = None
        if self.int8_method:
            self.calib = load_split(self.manifest, "train", self.classes, self.spec, limit=o.calibration, seed=o.seed,
                                    rows=self.rows)
        self.timings["load_images_s"] = time.perf_counter() - t
        t = time.perf_counter()
        self.probs["torch"] = (torch_probabilities(self.model, self.test.x), torch_probabilities(self.model, self.val.x))
        self.timings["torch_eval_s"] = time.perf_counter() - t

    def export_float(self) -> ov.Model:
        """Export, the FP32 parity gate (f32 hint: never let bf16 masquerade as FP32), the float IR on disk."""
        t = time.perf_counter()
        ov_fp32 = to_openvino(self.model, self.input_shape)
        self.timings["export_s"] = time.perf_counter() - t
        self.parity_idx = _parity_indices(len(self.test), self.o.parity_images)
        x_par, p_par = self.test.x[self.parity_idx], self.probs["torch"][0][self.parity_idx]
        d32 = G.max_abs_diff(ir_probabilities(compile_ir(ov_fp32, "f32"), x_par), p_par)
        self.gate(G.check("parity_fp32", d32, f"{len(self.parity_idx)} test images", limit=self.limits.get("parity_fp32")))
        for d in (self.stage, self.rejected):
            if d.exists():
                shutil.rmtree(d)
        self.stage.mkdir(parents=True)
        save_ir(ov_fp32, self.float_dir, fp16=not self.o.fp32)
        self.heatmap_gate(ov_fp32)
        return ov_fp32

    def heatmap_gate(self, ov_fp32: ov.Model) -> None:
        """Issue 17: the head beside the float IR; the worker's Grad-CAM against torch autograd."""
        d = self.float_dir
        self.heatmaps[d] = HM.attach(d, self.model)
        if not self.heatmaps[d]:
            return
        t = time.perf_counter()
        self.provisional_card(d, "f32")
        self.x_hm = x_hm = self.test.x[self.parity_idx][:HM_GATE_IMAGES]
        ex = HM.exactness(self.model, compile_ir(ov_fp32, "f32"), d, x_hm, len(self.classes))
        self.hm_ref = ex.pop("reference")
        self.gate(G.check("heatmap_exact", ex["max_abs_diff"],
                          f"{ex['images']} test images x {len(self.classes)} classes, FP32 graph",
                          limit=self.limits.get("heatmap_exact")))
        self.hm_info = {"exactness": ex, "float": HM.deployed_agreement(d, "f32", x_hm, self.hm_ref),
                        "seconds": round(time.perf_counter() - t, 1)}

    def attach_heatmap(self, d: Path, model: nn.Module, precision: str) -> None:
        """The head beside an IR written to ``d`` (provisional card included) and, for the deployed
        INT8 IR, how far its heatmaps are from the float reference."""
        self.heatmaps[d] = HM.attach(d, model)
        self.provisional_card(d, precision)
        if d == self.stage and precision == "int8" and self.heatmaps[d] and self.hm_ref is not None:
            self.hm_info["int8"] = HM.deployed_agreement(d, "int8", self.x_hm, self.hm_ref)

    def measure_float(self) -> None:
        """The float IR through the worker's engine (provisional card), at f32 and, if asked, bf16."""
        t = time.perf_counter()
        self.provisional_card(self.float_dir, "f32")
        self.probs["ir_f32"] = self.engine_probs(self.float_dir, "f32")
        if self.precision_float == "bf16":
            self.probs["ir_bf16"] = self.engine_probs(self.float_dir, "bf16")
        self.timings["ir_eval_s"] = time.perf_counter() - t

    def quantize(self, ov_float: ov.Model) -> None:
        """PTQ (always measured) and, with ``--int8 qat``, QAT; the deployed INT8 IR goes to the stage."""
        from conversion.quantize import float_scope, quantize_int8, quantize_int8_with_accuracy_control

        assert self.calib is not None
        o = self.o
        t = time.perf_counter()
        static = _static_batch1(ov_float, self.input_shape)
        scope = float_scope(static, o.int8_float)
        ptq_dir = self.stage / "ptq" if self.int8_method == "qat" else self.stage
        save_ir(quantize_int8(static, self.calib.x, preset=o.preset, ignored_scope=scope), ptq_dir, fp16=not o.fp32)
        self.attach_heatmap(ptq_dir, self.model, "int8")
        key = "ir_int8_ptq" if self.int8_method == "qat" else "ir_int8"
        self.probs[key] = self.engine_probs(ptq_dir, "int8")
        ptq: dict[str, Any] = {"method": "nncf.quantize", "preset": o.preset, "calibration_split": "train",
                               "input": "static [1, C, H, W]", "calibration_images": len(self.calib),
                               "float_parts": list(o.int8_float), "float_operations": len(scope.names) if scope else 0,
                               "seconds": round(time.perf_counter() - t, 1)}
        entry, gates = self.candidate(key, "int8")
        ptq["plain"] = {"passed": entry["passed"], "failed": [g.name for g in gates if not g.passed]}
        if self.int8_method == "ptq":
            self.int8_info = ptq
            if not entry["passed"] and o.accuracy_control:
                log.warning("plain INT8 misses the gates (%s): accuracy-aware quantisation", ", ".join(ptq["plain"]["failed"]))
                t = time.perf_counter()
                q = quantize_int8_with_accuracy_control(static, self.calib.x, self.val.x, self.probs["torch"][1].argmax(1),
                                                        max_drop=0.005, preset=o.preset, ignored_scope=scope)
                for f in ("model.xml", "model.bin", "model.json"):
                    (self.stage / f).unlink()
                save_ir(q, self.stage, fp16=not o.fp32)
                self.attach_heatmap(self.stage, self.model, "int8")
                self.probs["ir_int8"] = self.engine_probs(self.stage, "int8")
                ptq.update(method="nncf.quantize_with_accuracy_control", validation_split="val",
                           metric="top-1 agreement with torch", max_drop=0.005,
                           accuracy_control_seconds=round(time.perf_counter() - t, 1))
            return
        # QAT: PTQ stays as a reported figure beside it (not gated, not deployed)
        self.candidates["ir_int8_ptq"] = {**entry, "gates": [g.to_dict() for g in gates], "deployed": False}
        shutil.rmtree(ptq_dir)
        self._qat()
        self.int8_info["ptq"] = ptq

    def _qat(self) -> None:
        from conversion.qat import quantization_aware_training

        assert self.calib is not None
        qmodel, info = quantization_aware_training(
            self.model, self.ckpt, self.manifest, self.calib.x, self.qat_dir, self.o.qat,
            label=label_column(self.rows, self.classes), checkpoint_sha256=self.checkpoint_info.get("sha256", ""))
        t = time.perf_counter()
        ov_q = to_openvino(qmodel, self.input_shape)
        info["dynamic_batch_check"] = _dynamic_batch_check(ov_q, self.test.x)
        save_ir(_static_batch1(ov_q, self.input_shape), self.stage, fp16=not self.o.fp32)
        self.attach_heatmap(self.stage, qmodel, "int8")
        self.probs["ir_int8"] = self.engine_probs(self.stage, "int8")
        # torch QAT model vs its INT8 IR: the export itself must not move the numbers
        p_q = torch_probabilities(qmodel, self.test.x[self.parity_idx])
        info["export_max_prob_diff"] = G.max_abs_diff(self.probs["ir_int8"][0][self.parity_idx], p_q)
        info["export_seconds"] = round(time.perf_counter() - t, 1)
        info.update(input="static [1, C, H, W]", calibration_split="train")
        self.int8_info = info

    def gate_candidates(self) -> None:
        """The candidate gates of the deployed precision (and FP16 weights when they are used)."""
        plan: list[tuple[str, str]] = []
        if not self.o.fp32:
            plan.append(("ir_f32", "fp16"))
        if self.precision_float == "bf16" and not self.int8_method:
            plan.append(("ir_bf16", "bf16"))
        if self.int8_method:
            plan.append(("ir_int8", "int8"))
        for key, prefix in plan:
            entry, gates = self.candidate(key, prefix)
            for g in gates:
                self.gate(g)
            self.candidates[key] = {**entry, "gates": [g.to_dict() for g in gates], "deployed": key == self.deployed}

    @property
    def deployed(self) -> str:
        return "ir_int8" if self.int8_method else ("ir_bf16" if self.precision_float == "bf16" else "ir_f32")

    def metrics_block(self, deployed_key: str) -> dict[str, Any]:
        """Test metrics of every measured model, each at its own thresholds (validation-calibrated)."""
        m: dict[str, Any] = {
            "split": "test", "manifest": str(self.manifest), "manifest_sha256": self.manifest_sha,
            "label_column": label_column(self.rows, self.classes), "n": len(self.test), "deployed": deployed_key,
            "thresholds_applied": {},
        }
        for key in self.probs:
            thr = self.calibration(key)["thresholds"]
            m["thresholds_applied"][key] = thr
            m[key] = self.test_metrics(key, thr)
        return m

    def write_cards(self) -> None:
        deployed_precision = {"ir_int8": "int8", "ir_bf16": "bf16", "ir_f32": "f32"}[self.deployed]
        self.deployed_precision = deployed_precision
        self.conversion_info = {
            "ir_weights": "fp32" if self.o.fp32 else "fp16",
            "softmax_in_ir": True,
            "int8": self.int8_info or None,
            "candidates": self.candidates,
            "parity_images": int(len(self.parity_idx)),
            "versions": _versions(),
            "timings_s": {k: round(v, 1) for k, v in self.timings.items()},
            "heatmap": self.hm_info or None,
        }
        cal = self.calibration(self.deployed)
        self.cal = cal
        self.final_card = cardmod.build_card(
            self.ckpt, name=self.name, version=self.version, precision=deployed_precision, thresholds=cal["thresholds"],
            calibration=cal, metrics=self.metrics_block(self.deployed), gates=[g.to_dict() for g in self.gates],
            conversion={**self.conversion_info, "float_ir": "float/" if self.int8_method else None},
            checkpoint_info=self.checkpoint_info,
        )
        if self.heatmaps.get(self.stage):
            self.final_card["heatmap"] = self.heatmaps[self.stage]
        cardmod.write(self.stage, self.final_card)
        self.checks: list[tuple[Path, dict[str, Any], str]] = [(self.stage, self.final_card, self.deployed)]
        if self.int8_method:
            fcal = self.calibration("ir_f32")
            float_card = cardmod.build_card(
                self.ckpt, name=self.name, version=self.version, precision="f32", thresholds=fcal["thresholds"],
                calibration=fcal, metrics=self.metrics_block("ir_f32"), gates=[g.to_dict() for g in self.gates],
                conversion={**self.conversion_info, "note": "float fallback of the INT8 model in the parent directory"},
                checkpoint_info=self.checkpoint_info, created=self.final_card["created"],
            )
            if self.heatmaps.get(self.float_dir):
                float_card["heatmap"] = self.heatmaps[self.float_dir]
            cardmod.write(self.float_dir, float_card)
            self.checks.append((self.float_dir, float_card, "ir_f32"))

    def check_worker(self) -> None:
        """The worker reproduces the card (fresh Engine, DICOM preprocessing path, spec from the card)."""
        from conversion.worker_check import worker_predictions

        image_root = self.manifest.parent
        worker_info: dict[str, Any] = {}
        for d, c, key in self.checks:
            pw, info = worker_predictions(d, image_root, self.test.files, reference_x=self.test.x)
            mw = grouped_metrics(pw, self.test.y, self.classes, self.test.age_groups)["overall"]
            diff, which = _metric_diff(mw, c["metrics"][key]["overall"])
            rel = "." if d == self.stage else str(d.relative_to(self.stage))
            self.gate(G.check("worker_reproduces", diff,
                              f"{rel}: {key} at {info['precision']}, worst {which}; pixel diff vs conversion "
                              f"{info.get('max_pixel_diff_vs_conversion', float('nan')):.3g}",
                              limit=self.limits.get("worker_reproduces")))
            worker_info[rel] = {**info, **{k: mw[k] for k in _OVERALL_KEYS}}
        # Final cards carry every gate (the .bin is unchanged, so the sha256 is too).
        for d, c, _ in self.checks:
            c["gates"] = [g.to_dict() for g in self.gates]
            c["conversion"]["worker_check"] = worker_info
            cardmod.write(d, c)
            (d / "README.md").write_text(cardmod.card_markdown(c) + "\n")  # the same card, for people

    def shortcut_attention(self) -> dict[str, Any] | None:
        """Shortcut attention of the deployed model (issue 17): stage/attention/, summary in the report."""
        if not self.heatmaps.get(self.stage):
            return None
        from conversion.attention import attention_report

        att = attention_report(self.stage, self.manifest, self.stage / "attention", limit=self.o.test_limit, seed=self.o.seed)
        return {k: att[k] for k in ("n", "overall", "by_class", "by_source", "source_check_auroc", "figures")}

    def finish(self) -> ConversionResult:
        report = {
            "out": str(self.out), "deployed": self.deployed, "precision": self.deployed_precision,
            "attention": self.shortcut_attention(),
            "gates": [g.to_dict() for g in self.gates], "thresholds": self.cal["thresholds"],
            "threshold_calibration": self.cal, "metrics": self.final_card["metrics"],
            "conversion": self.final_card["conversion"], "seconds": round(time.perf_counter() - self.t_start, 1),
        }
        (self.stage / "conversion.json").write_text(
            json.dumps(report, indent=2, default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v)) + "\n")
        if not all(g.passed for g in self.gates):
            self.stage.rename(self.rejected)
            log.error("conversion rejected; everything it measured is in %s", self.rejected)
            raise G.GateError(self.gates)
        self.out.mkdir(parents=True, exist_ok=True)
        for p in self.stage.iterdir():
            p.rename(self.out / p.name)
        self.stage.rmdir()
        if self.qat_dir.exists():
            shutil.rmtree(self.qat_dir)
        log.info("conversion accepted: %s (%s) in %.0fs", self.out, self.deployed_precision, report["seconds"])
        return ConversionResult(self.out, self.deployed_precision, self.gates, report)
