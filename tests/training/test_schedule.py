"""Learning-rate schedules and progressive input sizes (training.schedule)."""

from __future__ import annotations

import math

import pytest

from training.config import DEFAULTS, ConfigError, load_config
from training.schedule import ONECYCLE_START, epoch_sizes, lr_factor


def _t(**kw: object) -> dict:
    return {**DEFAULTS["train"], **kw}


def test_epoch_sizes_split_early_epochs_and_end_at_the_served_size() -> None:
    assert epoch_sizes(4, 224) == [224] * 4
    assert epoch_sizes(8, 224, [128, 160], 2) == [128, 128, 128, 160, 160, 160, 224, 224]
    assert epoch_sizes(7, 224, [128, 160], 2) == [128, 128, 128, 160, 160, 224, 224]  # earlier sizes get the remainder
    assert epoch_sizes(3, 224, [128], 3) == [224, 224, 224]


def test_legacy_schedules_change_only_at_epoch_boundaries() -> None:
    t = _t(schedule="cosine", epochs=8, warmup_epochs=1, lr=3e-4, min_lr=0.0)
    assert lr_factor(0.0, t) == lr_factor(0.99, t) == 0.5  # warm-up epoch 0: (0 + 1) / (1 + 1)
    assert lr_factor(1.0, t) == pytest.approx(1.0) and lr_factor(1.5, t) == pytest.approx(1.0)
    assert lr_factor(7.0, t) == pytest.approx(0.5 * (1 + math.cos(math.pi * 6 / 7)))
    assert lr_factor(3.7, _t(schedule="constant")) == 1.0


def test_budget_schedules_per_step() -> None:
    lin = _t(schedule="linear", epochs=10, warmup_epochs=1, lr=1e-3, min_lr=1e-5)
    assert lr_factor(0.5, lin) == pytest.approx(0.5)
    assert lr_factor(1.0, lin) == pytest.approx(1.0)
    assert lr_factor(5.5, lin) == pytest.approx(0.01 + 0.99 * 0.5)
    assert lr_factor(10.0, lin) == pytest.approx(0.01)
    one = _t(schedule="onecycle", epochs=10, warmup_epochs=0, lr=1e-3, min_lr=0.0)
    assert lr_factor(0.0, one) == pytest.approx(ONECYCLE_START)
    assert lr_factor(3.0, one) == pytest.approx(1.0)  # 30 % of the run rising
    assert lr_factor(10.0, one) == pytest.approx(0.0, abs=1e-12)
    values = [lr_factor(i / 10, one) for i in range(101)]
    peak = values.index(max(values))
    assert all(a <= b for a, b in zip(values[:peak], values[1:peak + 1], strict=True))
    assert all(a >= b for a, b in zip(values[peak:], values[peak + 1:], strict=False))


def test_progressive_config_is_validated() -> None:
    cfg = load_config(None, ["train.progressive_sizes=[128, 160]", "train.epochs=6", "train.final_epochs=2", "train.schedule=\"linear\""])
    assert cfg["train"]["progressive_sizes"] == [128, 160]
    with pytest.raises(ConfigError, match="train.progressive_sizes"):
        load_config(None, ["train.progressive_sizes=[256]"])  # above data.size
    with pytest.raises(ConfigError, match="train.final_epochs"):
        load_config(None, ["train.progressive_sizes=[128]", "train.epochs=4", "train.final_epochs=0"])
    with pytest.raises(ConfigError, match="at least one epoch per entry"):
        load_config(None, ["train.progressive_sizes=[96, 128, 160]", "train.epochs=4", "train.final_epochs=2"])
    with pytest.raises(ConfigError, match="train.schedule"):
        load_config(None, ["train.schedule=\"step\""])
