"""What changes over a run: the learning rate (per step) and the input size (per epoch).

On two CPU cores a run has a fixed budget of epochs, so the schedules are made for one:

* ``linear``: linear warm-up over ``warmup_epochs``, then a linear decay to ``min_lr`` at the
  end of the last epoch (the budget-aware schedule of Li et al., "Budgeted training", 2020).
* ``onecycle``: from ``lr / 25`` up to ``lr`` over ``warmup_epochs`` (30 % of the run when 0),
  then a cosine down to ``min_lr`` (Smith & Topin, 2019).
* ``constant`` and ``cosine`` keep their per-epoch behaviour (the factor changes only at epoch
  boundaries), so older recipes train exactly as before.

Progressive resizing (fastai, EfficientNetV2; FixRes for why the last epochs run at the served
size): the epochs before the last ``final_epochs`` are split evenly over ``progressive_sizes``
in order (earlier sizes get the remainder), the last ones run at ``data.size``.  A step at 160 px
costs about half of one at 224 px on this CPU (bench/train_speed.py).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["lr_factor", "epoch_sizes"]

ONECYCLE_START = 1 / 25


def lr_factor(pos: float, t: Mapping[str, Any]) -> float:
    """Multiplier of ``t["lr"]`` at ``pos`` epochs into the run (fractional: step / steps per epoch)."""
    epochs = int(t["epochs"])
    w = int(t["warmup_epochs"])
    floor = t["min_lr"] / t["lr"] if t["lr"] else 0.0
    kind = t["schedule"]
    if kind in ("constant", "cosine"):
        epoch = int(math.floor(pos + 1e-9))
        if w and epoch < w:
            return (epoch + 1) / (w + 1)
        if kind == "cosine":
            span = max(1, epochs - w)
            prog = min(1.0, (epoch - w) / span)
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * prog))
        return 1.0
    if kind == "linear":
        if w and pos < w:
            return max(pos / w, 1e-3)
        span = max(1e-9, epochs - w)
        prog = min(1.0, max(0.0, (pos - w) / span))
        return floor + (1 - floor) * (1 - prog)
    if kind == "onecycle":
        rise = w if w else 0.3 * epochs
        if pos < rise:
            return ONECYCLE_START + (1 - ONECYCLE_START) * pos / rise
        prog = min(1.0, (pos - rise) / max(1e-9, epochs - rise))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * prog))
    raise ValueError(f"unknown schedule {kind!r}")


def epoch_sizes(epochs: int, size: int, progressive: Sequence[int] = (), final_epochs: int = 0) -> list[int]:
    """The input size of every epoch (see the module docstring)."""
    if not progressive:
        return [size] * epochs
    early = max(0, epochs - final_epochs)
    k = len(progressive)
    base, extra = divmod(early, k)
    out: list[int] = []
    for i, s in enumerate(progressive):
        out += [int(s)] * (base + (1 if i < extra else 0))
    return out + [size] * (epochs - len(out))
