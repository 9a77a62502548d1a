"""torch -> OpenVINO IR, and the reference inference used by the gates.

Decision: **softmax is appended in the IR** (the exported graph is ``softmax(model(x), dim=1)``),
so the card says ``"output": "probabilities"``.  The worker then receives the same numbers the
gates compare (softmax of torch vs softmax computed inside OpenVINO at the stated precision),
and the engine's row-sum check catches a card/IR mix-up.

The input is exported with a dynamic batch ``[?, C, H, W]`` (the worker reshapes it to batch 1).
Weights are saved FP16-compressed by default (``compress_to_fp16=True``: half the file, the CPU
plugin decompresses them to f32 at compile time) and FP32 on request.  The compute precision is
never implied by the file: every compile here sets ``INFERENCE_PRECISION_HINT`` explicitly and
checks it reads back, because this CPU (AVX-512 BF16) would otherwise run "FP32" as bf16.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov
import torch
from torch import nn

log = logging.getLogger(__name__)

__all__ = [
    "ProbabilityModel",
    "compile_ir",
    "ir_probabilities",
    "save_ir",
    "to_openvino",
    "torch_probabilities",
]

XML = "model.xml"
BIN = "model.bin"


class ProbabilityModel(nn.Module):
    """``softmax(model(x), dim=1)``: the graph that is exported (the checkpoint's model returns logits)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model(x), dim=1)


def to_openvino(model: nn.Module, input_shape: tuple[int, int, int], *, heatmap: bool = True) -> ov.Model:
    """Convert ``model`` (returning logits) to an in-memory FP32 ``ov.Model`` that returns probabilities.

    ``input_shape`` is ``(C, H, W)``; the IR input is ``[?, C, H, W]`` float32, named ``input``,
    the first output ``probabilities``.  With ``heatmap`` (default) a hybrid or single-backbone
    model gets one more output per branch, its last feature maps (``conversion.heatmap``).
    """
    c, h, w = input_shape
    # Issue 17: the branches' last feature maps as extra outputs (conversion.heatmap), when known.
    from conversion.heatmap import export_model

    example = torch.zeros(1, c, h, w, dtype=torch.float32)
    probe = torch.linspace(-2.0, 2.0, c * h * w, dtype=torch.float32).reshape(1, c, h, w)  # not all-zero
    wrapped, map_names = export_model(model, probe) if heatmap else (None, [])
    wrapped = wrapped if wrapped is not None else ProbabilityModel(model).eval()
    with torch.no_grad():
        ov_model = ov.convert_model(wrapped, example_input=example, input=[ov.PartialShape([-1, c, h, w])])
    ov_model.inputs[0].get_tensor().set_names({"input"})
    ov_model.outputs[0].get_tensor().set_names({"probabilities"})
    for out, name in zip(ov_model.outputs[1:], map_names, strict=True):
        out.get_tensor().set_names({name})
    return ov_model


def save_ir(ov_model: ov.Model, out_dir: str | os.PathLike[str], *, fp16: bool) -> Path:
    """Save ``out_dir/model.xml`` + ``model.bin``; FP16-compressed weights when ``fp16``.  Returns the xml path."""
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    xml = d / XML
    ov.save_model(ov_model, str(xml), compress_to_fp16=fp16)
    log.info("saved %s (%s weights, %.1f MB)", xml, "FP16" if fp16 else "FP32", (d / BIN).stat().st_size / 1e6)
    return xml


def compile_ir(model: ov.Model | str | os.PathLike[str], hint: str = "f32", *, core: ov.Core | None = None) -> ov.CompiledModel:
    """Compile on CPU with an explicit ``INFERENCE_PRECISION_HINT`` and check that it reads back.

    ``hint`` is ``"f32"`` or ``"bf16"`` (an INT8 IR is compiled with ``"f32"``: see
    ``worker.engine``).  Raises RuntimeError when the plugin reports another precision.
    """
    core = core or ov.Core()
    m = core.read_model(str(model)) if not isinstance(model, ov.Model) else model
    compiled = core.compile_model(m, "CPU", {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY"})
    got = compiled.get_property("INFERENCE_PRECISION_HINT")
    got_s = got.get_type_name() if isinstance(got, ov.Type) else str(got)
    if got_s != hint:
        raise RuntimeError(f"CPU reports INFERENCE_PRECISION_HINT {got_s} after {hint} was requested")
    return compiled


def ir_probabilities(compiled: ov.CompiledModel, x: np.ndarray, batch: int = 8) -> np.ndarray:
    """Probabilities (N, K) float64 from a compiled IR that outputs probabilities, in chunks of ``batch``."""
    req = compiled.create_infer_request()
    out: list[np.ndarray] = []
    for i in range(0, x.shape[0], batch):
        res = req.infer({0: np.ascontiguousarray(x[i : i + batch], dtype=np.float32)})
        out.append(np.array(res[compiled.output(0)], dtype=np.float64))
    return np.concatenate(out) if out else np.empty((0, 0))


def torch_probabilities(model: nn.Module, x: np.ndarray, batch: int = 16) -> np.ndarray:
    """softmax(model(x)) in torch f32 (eval, inference_mode), as float64 (N, K)."""
    model.eval()
    out: list[np.ndarray] = []
    with torch.inference_mode():
        for i in range(0, x.shape[0], batch):
            logits = model(torch.from_numpy(np.ascontiguousarray(x[i : i + batch], dtype=np.float32)))
            out.append(torch.softmax(logits.float(), dim=1).double().numpy())
    return np.concatenate(out) if out else np.empty((0, 0))


def describe(model: nn.Module) -> dict[str, Any]:
    """Parameter count of a torch model (for logs and the card)."""
    return {"parameters": int(sum(p.numel() for p in model.parameters()))}
