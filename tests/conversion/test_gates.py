"""The gates trigger: broken models are rejected with the gate, the value and the limit."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch", reason="conversion needs the train extra (torch, nncf)")
pytest.importorskip("nncf", reason="conversion needs the train extra (torch, nncf)")

from conversion.convert import ConvertOptions, convert_model  # noqa: E402
from conversion.gates import GateError, check  # noqa: E402


def test_gate_check_and_message():
    g = check("parity_fp32", 0.115)
    assert not g.passed
    assert "parity_fp32 FAIL" in g.line() and "0.115" in g.line() and "<= 0.0001" in g.line()
    assert check("parity_fp32", 3.4e-5).passed
    assert not check("int8_agreement", 0.96).passed and check("int8_agreement", 0.97).passed
    assert not check("worker_reproduces", float("nan")).passed
    err = GateError([check("parity_fp32", 1e-6), check("int8_accuracy_drop", 0.02)])
    assert "int8_accuracy_drop" in str(err) and "parity_fp32" not in str(err)
    # the issue-14 limits, one set per candidate precision
    assert check("int8_accuracy_drop", 0.005).passed and not check("int8_accuracy_drop", 0.006).passed
    assert check("fp16_adult_accuracy_drop", 0.01).passed and not check("fp16_adult_accuracy_drop", 0.011).passed
    assert check("bf16_macro_auroc_drop", 0.005).passed and not check("bf16_macro_auroc_drop", 0.0051).passed
    g = check("int8_covid19_sensitivity_drop", 0.02)
    assert not g.passed and "covid19 sensitivity drop" in g.line() and "<= 0.01" in g.line()
    with pytest.raises(KeyError):
        check("int8_nonsense", 0.0)


def test_candidate_gates_compare_float_and_candidate_at_their_own_thresholds():
    from conversion.gates import candidate_gates, candidate_measures
    from conversion.metrics import grouped_metrics

    classes = ["normal", "pneumonia", "covid19"]
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 40)
    p = np.full((120, 3), 0.1)
    p[np.arange(120), y] = 0.8
    p += rng.uniform(0, 0.05, p.shape)
    p /= p.sum(1, keepdims=True)
    groups = ["adult"] * 60 + ["child"] * 60
    thr = {"covid19": 0.5, "pneumonia": 0.5}
    ref = grouped_metrics(p, y, classes, groups, thr)
    q = p.copy()
    q[:4] = q[:4, [2, 1, 0]]  # four adult normals now called COVID-19
    cand = grouped_metrics(q, y, classes, groups, thr)
    m = candidate_measures(ref, cand, p, q)
    assert m["agreement"]["candidate"] == pytest.approx(116 / 120)
    assert m["accuracy"]["float"] == 1.0 and m["accuracy"]["candidate"] == pytest.approx(116 / 120)
    assert m["adult_accuracy"]["candidate"] == pytest.approx(56 / 60)
    assert m["covid19_sensitivity"]["candidate"] == 1.0 and m["covid19_specificity"]["candidate"] == pytest.approx(76 / 80)
    gates = {g.name: g for g in candidate_gates("int8", m)}
    assert set(gates) == {"int8_accuracy_drop", "int8_adult_accuracy_drop", "int8_macro_auroc_drop",
                          "int8_covid19_sensitivity_drop", "int8_pneumonia_sensitivity_drop", "int8_agreement"}
    assert not gates["int8_agreement"].passed and not gates["int8_accuracy_drop"].passed
    assert gates["int8_covid19_sensitivity_drop"].passed and gates["int8_covid19_sensitivity_drop"].value == 0.0
    same = {g.name: g for g in candidate_gates("fp16", candidate_measures(ref, ref, p, p))}
    assert all(g.passed for g in same.values()) and same["fp16_agreement"].value == 1.0


def test_torch_ir_divergence_is_rejected(tiny_model, tiny_ckpt, tiny_data, tmp_path):
    from tinyconv import TraceTrap

    out = tmp_path / "broken"
    with pytest.raises(GateError) as ei:
        convert_model(TraceTrap(tiny_model), tiny_ckpt, out, ConvertOptions(manifest=tiny_data))
    msg = str(ei.value)
    assert "gate parity_fp32 FAIL" in msg and "limit <= 0.0001" in msg
    assert "gate fp16_agreement FAIL" in msg and "limit >= 0.97" in msg
    # nothing at the path a worker would be pointed at; the measurements are kept for reading
    assert not out.exists()
    rejected = out.with_name("broken.rejected")
    report = json.loads((rejected / "conversion.json").read_text())
    failed = {g["name"] for g in report["gates"] if not g["passed"]}
    assert {"parity_fp32", "fp16_agreement"} <= failed


def test_int8_gate_miss_tries_accuracy_control_then_fails(tiny_model, tiny_ckpt, tiny_data, tmp_path):
    out = tmp_path / "q"
    opts = ConvertOptions(manifest=tiny_data, int8=True, calibration=8, gate_limits={"int8_agreement": 1.01})
    with pytest.raises(GateError) as ei:
        convert_model(tiny_model, tiny_ckpt, out, opts)
    assert "gate int8_agreement FAIL" in str(ei.value) and ">= 1.01" in str(ei.value)
    report = json.loads((out.with_name("q.rejected") / "conversion.json").read_text())
    int8 = report["conversion"]["int8"]
    assert int8["plain"]["passed"] is False
    assert int8["method"] == "nncf.quantize_with_accuracy_control" and int8["validation_split"] == "val"
