"""Which part of the hybrid breaks under INT8 PTQ? (issue 14, exploration; results -> ptq_explore.json)"""
import json, sys, time, logging
import numpy as np, openvino as ov, nncf
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[3]))
from training.checkpoint import load_checkpoint
from conversion.data import load_split, spec_from_checkpoint
from conversion.export import to_openvino, torch_probabilities, compile_ir, ir_probabilities
logging.basicConfig(level=logging.WARNING)
import torch; torch.set_num_threads(2)
man = "../shared/data/cxr/manifest.csv"  # run from the repository root
model, ck = load_checkpoint(sys.argv[1]); model.eval()
spec = spec_from_checkpoint(ck); classes = list(ck["classes"])
t = time.time()
cal = load_split(man, "train", classes, spec, limit=300, seed=0)
val = load_split(man, "val", classes, spec); test = load_split(man, "test", classes, spec)
cal2 = load_split(man, "train", classes, spec, limit=1000, seed=0) if "3" in (sys.argv[2] if len(sys.argv) > 2 else "") else cal
print("loaded", time.time() - t, flush=True)
ovm = to_openvino(model, (3, 224, 224))
st = ovm.clone(); st.reshape({st.input(0): ov.PartialShape([1, 3, 224, 224])})
cf = compile_ir(st, "f32")
pf = {s.name: ir_probabilities(cf, s.x, batch=1) for s in (val, test)}
print("float", time.time() - t, flush=True)
items = [cal.x[i:i+1] for i in range(len(cal))]
names = [op.get_friendly_name() for op in st.get_ops() if op.get_type_name() in ("Convolution", "GroupConvolution", "MatMul")]
print(len(names), names[:3], names[-3:], flush=True)
def evalm(q, tag, extra):
    c = compile_ir(q, "f32")
    res = {"variant": tag, **extra}
    for s in (val, test):
        p = ir_probabilities(c, s.x, batch=1)
        adult = np.array([g == "adult" for g in s.age_groups])
        res[s.name] = {"agreement": float((p.argmax(1) == pf[s.name].argmax(1)).mean()),
                       "acc": float((p.argmax(1) == s.y).mean()), "acc_float": float((pf[s.name].argmax(1) == s.y).mean()),
                       "adult_acc": float((p.argmax(1) == s.y)[adult].mean()), "adult_acc_float": float((pf[s.name].argmax(1) == s.y)[adult].mean()),
                       "max_diff": float(np.abs(p - pf[s.name]).max())}
    print(json.dumps(res), flush=True)
    return res
def branch(model, which):
    cat = next(op for op in model.get_ops() if op.get_type_name() == "Concat")
    start = cat.input(which).get_source_output().get_node()
    seen, stack = set(), [start]
    while stack:
        n = stack.pop()
        if n.get_friendly_name() in seen or n.get_type_name() == "Parameter":
            continue
        seen.add(n.get_friendly_name())
        stack += [i.get_source_output().get_node() for i in n.inputs()]
    return [op.get_friendly_name() for op in model.get_ops() if op.get_friendly_name() in seen and op.get_type_name() in ("Convolution", "GroupConvolution", "MatMul")]
res_names, mob_names = branch(st, 0), branch(st, 1)
print("resnet convs", len(res_names), "mobilenet convs", len(mob_names), flush=True)
first = [res_names[0], mob_names[0]]
out = []
AP = nncf.AdvancedQuantizationParameters
variants = [
    ("all, performance", {}),
    ("all, mixed preset", {"preset": nncf.QuantizationPreset.MIXED}),
    ("first conv of each branch in float", {"ignored_scope": nncf.IgnoredScope(names=first)}),
    ("all, 1000 calibration images", {"subset_size": 1000}),
    ("mobilenet in float", {"ignored_scope": nncf.IgnoredScope(names=mob_names)}),
    ("resnet in float", {"ignored_scope": nncf.IgnoredScope(names=res_names)}),
    ("head in float", {"ignored_scope": nncf.IgnoredScope(patterns=[".*head.*"])}),
]
which = sys.argv[2].split(",") if len(sys.argv) > 2 else [str(i) for i in range(len(variants))]
for i in map(int, which):
    tag, kw = variants[i]
    t0 = time.time()
    try:
        kw = dict(kw); n = kw.pop('subset_size', len(items)); its = items if n <= len(items) else [cal2.x[i:i+1] for i in range(len(cal2))]
        q = nncf.quantize(st, nncf.Dataset(its), subset_size=len(its), **kw)
    except Exception as e:
        print(tag, "failed", e, flush=True); continue
    out.append(evalm(q, tag, {"seconds": round(time.time() - t0, 1)}))
    json.dump(out, open(f"runs/ptq_explore_{sys.argv[3] if len(sys.argv)>3 else 'x'}.json", "w"), indent=1)
