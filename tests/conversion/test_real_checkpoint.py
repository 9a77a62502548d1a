"""The real training checkpoint format through the CLI (``training.checkpoint`` save -> convert)."""

from __future__ import annotations

import pytest

pytest.importorskip("torch", reason="conversion needs the train extra (torch, nncf)")
pytest.importorskip("nncf", reason="conversion needs the train extra (torch, nncf)")

from conversion import cli  # noqa: E402
from worker.engine import Engine  # noqa: E402
from worker.modelcard import ModelCard  # noqa: E402


def test_cli_converts_a_training_checkpoint(tiny_data, tmp_path, capsys):
    ckmod = pytest.importorskip("training.checkpoint")
    models = pytest.importorskip("training.models")
    import torch

    torch.manual_seed(0)
    model = models.create_model("mobilenet", 3, head_hidden=16).eval()
    spec = ckmod.model_spec("mobilenet", 3, mobilenet="v2", head_hidden=16, dropout=0.5)
    path = tmp_path / "best.pt"
    ckmod.save_checkpoint(
        path, model, model_spec=spec, classes=["normal", "pneumonia", "covid19"],
        input={"size": [32, 32], "channels": 3, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "layout": "NCHW"},
        preprocessing={"voi": "auto", "percentiles": [0.5, 99.5], "crop": "center_square"},
        training={"config": {"manifest": str(tiny_data)}, "manifest_sha256": None, "commit": "abc", "best_epoch": 0,
                  "versions": {}},
        metrics={"val": {}, "test": {}},
    )
    # --manifest omitted: taken from the checkpoint's training config
    rc = cli.main(["convert", str(path), "--out", str(tmp_path / "m"), "--log-level", "WARNING"])
    assert rc == 0, capsys.readouterr().err
    card = ModelCard.load(tmp_path / "m")
    assert card.raw["architecture"] == "mobilenet_v2"
    assert card.raw["training"]["model"]["name"] == "mobilenet"
    assert card.raw["training"]["checkpoint"]["path"].endswith("best.pt")
    assert Engine(tmp_path / "m").infer(__import__("numpy").zeros((1, 3, 32, 32), "float32")).shape == (1, 3)
