"""A training experiment killed mid-epoch (SIGKILL) resumes with ``--resume`` where it stopped.

The reference is the same run uninterrupted.  Same seed, same thread count, float32 on CPU: the
resumed run ends with bit-identical weights (the data order, the augmentation and dropout are
seeded per epoch or restored from ``last.pt``; oneDNN's float32 kernels are deterministic for a
fixed thread count, which is what this test shows)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from synth import write_manifest

REPO = Path(__file__).resolve().parents[2]
RUN = ["--mode", "cv", "--models", "mobilenet", "--set", "cv.folds=2", "--set", "cv.val_fraction=0.3", "--set", "data.size=48",
       "--set", "train.batch_size=8", "--set", "train.epochs=4", "--set", "train.threads=2", "--set", "train.progress=\"none\"",
       "--set", "model.head_hidden=16", "--set", "train.seed=7", "--set", "train.schedule=\"linear\"",
       "--set", "train.progressive_sizes=[32]", "--set", "train.final_epochs=2"]


def _cmd(manifest: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "worker.cli", "train", "--set", f'data.manifest="{manifest}"', *RUN, *extra, "--out", str(out)]


def _history(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / "history.jsonl").read_text().splitlines() if ln.strip()]


def _same_epochs(a: list[dict], b: list[dict]) -> None:
    timing = {"seconds", "train_seconds", "images_per_second", "cpu_seconds"}
    assert [{k: v for k, v in h.items() if k not in timing} for h in a] == [{k: v for k, v in h.items() if k not in timing} for h in b]


def _wait(cond, what: str, proc: subprocess.Popen, timeout: float = 240.0) -> None:
    t0 = time.monotonic()
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"training ended (rc {proc.returncode}) before {what}: {proc.stderr.read() if proc.stderr else ''}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.mark.timeout(600)
def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path / "data", patients_per_class=16, images_per_patient=3, size=64)
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    ref = tmp_path / "ref"  # fold 1 alone, uninterrupted (fold seeds do not depend on the order)
    subprocess.run(_cmd(manifest, ref, "--set", "cv.only_folds=[1]"), check=True, cwd=REPO, env=env, capture_output=True, timeout=300)

    out = tmp_path / "killed"
    fold0, fold1 = out / "mobilenet" / "fold-0", out / "mobilenet" / "fold-1"
    proc = subprocess.Popen(_cmd(manifest, out), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait(lambda: (fold1 / "last.pt").exists(), "fold 1's first epoch", proc)
        epoch_s = _history(fold1)[0]["train_seconds"]
        time.sleep(max(0.05, 0.5 * epoch_s))  # into the second epoch
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert (fold0 / "done.json").exists() and not (fold1 / "done.json").exists()
    state = torch.load(fold1 / "last.pt", map_location="cpu", weights_only=False)
    killed_after = int(state["epoch"])
    assert killed_after < 3
    before_kill = _history(fold1)
    fold0_best = (fold0 / "best.pt").stat().st_mtime_ns

    # without --resume the folder is refused, nothing is touched
    r = subprocess.run(_cmd(manifest, out), cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "--resume" in r.stderr
    r = subprocess.run(_cmd(manifest, out, "--resume"), cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"resumed after epoch {killed_after}" in r.stderr
    assert "fold-0: complete, skipped" in r.stderr
    assert (fold0 / "best.pt").stat().st_mtime_ns == fold0_best  # the finished run was not trained again

    after = _history(fold1)
    assert [h["epoch"] for h in after] == [0, 1, 2, 3] and [h["size"] for h in after] == [32, 32, 48, 48]
    _same_epochs(after[: killed_after + 1], before_kill[: killed_after + 1])  # the history up to the kill is kept as it was
    ref_run = ref / "mobilenet" / "fold-1"
    _same_epochs(after, _history(ref_run))  # ... and the whole run is the uninterrupted one
    a = torch.load(fold1 / "best.pt", map_location="cpu", weights_only=True)["state_dict"]
    b = torch.load(ref_run / "best.pt", map_location="cpu", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (fold1 / "last.pt").exists() and json.loads((out / "experiment.json").read_text())["resumed"]
