"""Where a training run came from: package versions, the git commit, the CPU's abilities.

Recorded in every run's checkpoint and ``experiment.json`` so that a result can be traced to the
code and machine that made it.
"""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path

import torch

__all__ = ["versions", "git_commit", "cpu_has_bf16"]




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


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512_BF16 or AMX-BF16 in /proc/cpuinfo's flags).
    Without them PyTorch emulates bf16: measured on a 2-core AVX-512 VNNI Xeon without them
    (2026-12-08, hybrid at 160 px, batch 32) 3.4 images/s in bf16 against 9.7 in float32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags
