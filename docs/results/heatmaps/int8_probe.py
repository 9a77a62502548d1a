"""INT8 heatmaps of the real checkpoint: plain nncf.quantize (30 train images), correlation with torch autograd."""
import json, time, logging, numpy as np, openvino as ov
from pathlib import Path
logging.basicConfig(level=logging.INFO)
for n in ("nncf","openvino"): logging.getLogger(n).setLevel(logging.WARNING)
from conversion.convert import _load_checkpoint, _parity_indices
from conversion.data import load_split, spec_from_checkpoint
from conversion.export import to_openvino, save_ir
from conversion.quantize import quantize_int8
from conversion import heatmap as HM, card as cardmod
man = Path("/work/shared/data/cxr/manifest.csv")
model, ck = _load_checkpoint(Path("/work/main/runs/full224-3class-s0/best.pt"))
classes = list(ck["classes"]); spec = spec_from_checkpoint(ck)
test = load_split(man, "test", classes, spec)
calib = load_split(man, "train", classes, spec, limit=30, seed=0)
x8 = test.x[_parity_indices(len(test), 32)][:8]
t = time.time()
m = to_openvino(model, (3, 224, 224)); m.reshape({m.input(0): ov.PartialShape([1, 3, 224, 224])})
q = quantize_int8(m, calib.x)
d = Path("/tmp/real17/int8q"); save_ir(q, d, fp16=False)
c = cardmod.build_card(ck, name="cxr-hybrid-3class", version="int8-probe", precision="int8", thresholds={})
c["heatmap"] = HM.attach(d, model); cardmod.write(d, c)
print("quantised in", time.time() - t)
ref = HM.torch_gradcam(model, x8, [0, 1, 2])
out = {"int8": HM.deployed_agreement(d, "int8", x8, ref), "f32_fp32ir": HM.deployed_agreement("/tmp/real17/fp32", "f32", x8, ref)}
from worker.engine import Engine
p8 = Engine(d).infer(x8); p32 = Engine("/tmp/real17/fp32").infer(x8)
out["top1_agreement_8"] = float((p8.argmax(1) == p32.argmax(1)).mean())
print(json.dumps(out, indent=1)); json.dump(out, open("/tmp/real17/int8_heatmap.json", "w"), indent=1)
