"""Benchmark: training step throughput per model and input size on this CPU, and what a recipe costs.

Run from the repository root (needs the ``train`` extra):

    python bench/train_speed.py                      # the table; bench/out/train_speed.json
    python bench/train_speed.py --explore            # also threads, batch size, bf16, channels-last, oneDNN
    python bench/train_speed.py --recipes training/configs/shipped-3class.toml training/configs/fast-3class.toml

A step is what the training loop does per batch: forward, class-weighted cross-entropy, backward,
Adam step, on a random batch (the data path costs ~1 ms per image and is not the bottleneck, see
bench/README.md).  Evaluation throughput (inference mode, float32: how validation runs) is measured
for the hybrid at the served size.  Each recipe's CPU time is then predicted from the measured
throughputs: for every epoch, training images / throughput at that epoch's size, plus one
validation pass at ``data.size``; recipes are compared side by side from the same run, so the ratio
holds even when the machine is shared (the load average is recorded beside the figures).
Not a test: timings depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from training.config import load_config
from training.models import create_model
from training.schedule import epoch_sizes

REPO = Path(__file__).resolve().parents[1]
N_TRAIN = 1792  # the manifest's train split, rows used per epoch (1,809 with drop_last at batch 32)
N_VAL = 232


def _load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def _step_fn(model: nn.Module, batch: int, *, amp: bool, channels_last: bool):
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    crit = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 0.6, 1.8]))
    y = torch.randint(0, 3, (batch,))

    def step(size: int) -> float:
        x = torch.randn(batch, 3, size, size)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            logits = model(x)
        loss = crit(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - t0

    return step


def step_throughput(model_name: str, sizes: list[int], *, batch: int = 32, steps: int = 3, amp: bool = True,
                    channels_last: bool = True, threads: int = 2) -> list[dict[str, Any]]:
    """Images per second of full training steps at each size (median of ``steps`` timed steps).

    One model serves every size (the networks are size-agnostic) and the sizes are measured in
    turn, round-robin, so that a change of load on a shared machine hits all sizes alike and their
    ratios hold.  Each timed step follows an untimed one at the same size: training changes size
    only between epochs, so the steady state is what counts."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = create_model(model_name, 3, weights="none")
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    step = _step_fn(model, batch, amp=amp, channels_last=channels_last)
    times: dict[int, list[float]] = {s: [] for s in sizes}
    for _ in range(steps):
        for s in sizes:
            step(s)  # untimed: the first step after a change of input shape costs up to 3x (oneDNN re-plans)
            times[s].append(step(s))
    out = []
    for s in sizes:
        med = statistics.median(times[s])
        out.append(
            {
                "model": model_name,
                "size": s,
                "batch": batch,
                "amp": amp,
                "channels_last": channels_last,
                "threads": threads,
                "step_s": round(med, 4),
                "step_s_min": round(min(times[s]), 4),
                "images_per_s": round(batch / med, 2),
                "epoch_s": round(N_TRAIN / (batch / med), 1),
            }
        )
    return out


@torch.inference_mode()
def eval_throughput(model_name: str, size: int, *, batch: int = 64, steps: int = 2, threads: int = 2) -> float:
    """Images per second of validation as the training loop runs it on the CPU (inference mode,
    bf16 autocast, channels-last)."""
    torch.set_num_threads(threads)
    model = create_model(model_name, 3, weights="none").eval().to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(x)
        if i:
            times.append(time.perf_counter() - t0)
    return round(batch / statistics.median(times), 2)


def recipe_cost(cfg_path: Path, thr: dict[tuple[str, int], float], eval_ips: float) -> dict[str, Any]:
    """Predicted CPU seconds of a recipe from the measured throughputs (model = its first model)."""
    cfg = load_config(cfg_path)
    t, d = cfg["train"], cfg["data"]
    model = cfg["experiment"]["models"][0]
    sizes = epoch_sizes(int(t["epochs"]), int(d["size"]), t["progressive_sizes"], int(t["final_epochs"]))
    missing = sorted({s for s in sizes if (model, s) not in thr})
    if missing:
        raise SystemExit(f"{cfg_path}: measure sizes {missing} too (--sizes)")
    train_s = sum(N_TRAIN / thr[(model, s)] for s in sizes)
    val_s = len(sizes) * N_VAL / eval_ips
    return {"recipe": str(cfg_path.relative_to(REPO) if cfg_path.is_relative_to(REPO) else cfg_path), "model": model,
            "epochs": len(sizes), "sizes": sizes, "train_s": round(train_s, 1), "val_s": round(val_s, 1),
            "total_s": round(train_s + val_s, 1)}


def explore(size: int, steps: int) -> list[dict[str, Any]]:
    """Other settings for the hybrid at ``size``: threads, batch size, bf16, channels-last, oneDNN."""
    rows = []
    cases: list[tuple[str, dict[str, Any]]] = [
        ("baseline (bf16, channels-last, 2 threads, batch 32)", {}),
        ("1 thread", {"threads": 1}),
        ("batch 16", {"batch": 16}),
        ("batch 64", {"batch": 64}),
        ("float32 (no bf16 autocast)", {"amp": False}),
        ("bf16 without channels-last", {"channels_last": False}),
    ]
    for name, kw in cases:
        r = step_throughput("hybrid", [size], steps=steps, **kw)[0]
        rows.append({"case": name, **r})
        print(f"  {name:<52} {r['images_per_s']:7.2f} images/s", flush=True)
    mkl = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        r = step_throughput("hybrid", [size], steps=steps)[0]
        rows.append({"case": "oneDNN off (torch.backends.mkldnn.enabled = False)", **r})
        print(f"  {rows[-1]['case']:<52} {r['images_per_s']:7.2f} images/s", flush=True)
    finally:
        torch.backends.mkldnn.enabled = mkl
    torch.set_num_threads(2)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="hybrid,resnet50,mobilenet")
    p.add_argument("--sizes", default="128,160,192,224")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument(
        "--recipes", nargs="*", default=["training/configs/shipped-3class.toml", "training/configs/fast-3class.toml"]
    )
    p.add_argument("--explore", action="store_true")
    p.add_argument("--out", default=str(REPO / "bench" / "out" / "train_speed.json"))
    a = p.parse_args(argv)
    load_before = _load()
    print(f"training step throughput, batch 32, bf16 autocast + channels-last, 2 threads; load average {load_before}")
    print(f"{'model':<10} {'size':>5} {'s/step':>8} {'images/s':>9} {'epoch (1,792 images)':>22}")
    rows, thr = [], {}
    for m in a.models.split(","):
        for r in step_throughput(m, [int(v) for v in a.sizes.split(",")], steps=a.steps):
            rows.append(r)
            thr[(m, r["size"])] = r["images_per_s"]
            print(
                f"{m:<10} {r['size']:>5} {r['step_s']:>8.3f} {r['images_per_s']:>9.2f} {r['epoch_s']:>20.1f} s",
                flush=True,
            )
    eval_ips = eval_throughput("hybrid", 224)
    print(f"hybrid validation (inference, bf16 autocast, batch 64) at 224 px: {eval_ips:.1f} images/s")
    recipes = [recipe_cost(REPO / r if not Path(r).is_absolute() else Path(r), thr, eval_ips) for r in a.recipes]
    if recipes:
        print(f"\n{'recipe':<44} {'epochs':>6} {'train s':>8} {'val s':>6} {'total s':>8} {'ratio':>6}  sizes")
        for r in recipes:
            ratio = r["total_s"] / recipes[0]["total_s"]
            r["ratio_to_first"] = round(ratio, 3)
            print(
                f"{r['recipe']:<44} {r['epochs']:>6} {r['train_s']:>8.0f} {r['val_s']:>6.0f} {r['total_s']:>8.0f}"
                f" {ratio:>6.2f}  {r['sizes']}"
            )
    extra = []
    if a.explore:
        print("\nother settings, hybrid at 160 px:")
        extra = explore(160, a.steps)
    load_after = _load()
    print(f"\nload average after: {load_after}")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "steps": rows,
                "eval_images_per_s_224": eval_ips,
                "recipes": recipes,
                "explore": extra,
                "load_before": load_before,
                "load_after": load_after,
                "cpu": platform.processor() or platform.machine(),
                "cores": os.cpu_count(),
                "torch": torch.__version__,
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
