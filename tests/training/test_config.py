"""training.config: the tri-state train.cpu_amp and what it means on this machine."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from training import config as config_mod  # noqa: E402
from training import provenance, train  # noqa: E402


@pytest.mark.parametrize("value", ["true", "false", '"auto"'])
def test_cpu_amp_takes_true_false_or_auto(value: str) -> None:
    cfg = config_mod.load_config(None, [f"train.cpu_amp={value}"])
    assert cfg["train"]["cpu_amp"] in (True, False, "auto")


def test_cpu_amp_refuses_anything_else_naming_the_key() -> None:
    with pytest.raises(config_mod.ConfigError, match="train.cpu_amp"):
        config_mod.load_config(None, ['train.cpu_amp="bf16"'])


@pytest.mark.parametrize("value, bf16_here", [(True, True), (False, False), ("auto", None)])
def test_auto_uses_bf16_only_where_the_cpu_has_it(value: object, bf16_here: bool | None) -> None:
    cfg = config_mod.load_config(None, ["train.device=\"cpu\""])
    cfg["train"]["cpu_amp"] = value
    run = train._build(cfg, "mobilenet", 64, [1.0, 1.0, 1.0], 3)
    expected = provenance.cpu_has_bf16() if bf16_here is None else bf16_here
    assert run.amp is expected
    assert run.channels_last is (value in (True, "auto"))
