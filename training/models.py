"""Model factory: the Nandi & Mulimani (2021) hybrid and its two single-backbone baselines.

``create_model(name, num_classes, ...)`` in the spirit of ``timm.create_model``:

* ``hybrid``: ResNet50 and MobileNet side by side on the same input, each global-average-pooled
  (2048 + 1024 features for MobileNet v1, 2048 + 1280 for v2), concatenated, then the paper's head
  ``Dense(head_hidden) -> ReLU -> Dropout -> Dense(num_classes)``.
* ``resnet50`` / ``mobilenet``: one backbone, global-average-pooled, the same head (so the
  comparison in the paper's Tables 3-5 differs only in the feature extractor).

All models return LOGITS (no softmax; the softmax of the paper's last layer is applied by the
loss during training and by the consumer at inference).  Input: ``(N, 3, H, W)`` float32,
grey scaled to [0, 1] and normalised by the ImageNet mean/std, exactly as
``worker.imaging.grey_to_input`` produces it.

Why 3 channels for grey radiographs: the grey value is *replicated* to the three channels the
ImageNet stems expect, rather than adapting the stem to one channel.  Replication keeps the
pretrained first convolutions usable unchanged (summing the RGB filters of a 1-channel stem is
equivalent in exact arithmetic, but would make the ImageNet files no longer load as published and
would need a second code path per backbone), keeps the models identical to the published
architectures (parameter counts comparable to the paper's Table 2), and costs only the first
layer's extra multiply-adds.  The serving side (``PreprocessSpec.channels = 3``) does the same.

Parameter counts (``count_parameters(keras_style=True)`` counts batch-norm running mean/variance
too, as Keras' ``model.count_params()`` does): hybrid with MobileNet v1 and a 3072 -> 100 -> 4
head gives 27,097,720, which is the paper's 27,124,280 minus 26,560.  The difference is exactly the
conv biases of Keras' ResNet50 (``keras.applications.ResNet50`` builds every convolution with
``use_bias=True`` although a batch norm follows; torchvision, like the original Caffe model, has
none): sum of the out-channels of ResNet50's 53 convolutions = 26,560.  Keras MobileNet v1
(no conv biases) and timm ``mobilenetv1_100`` agree exactly (3,228,864).  ``KERAS_RESNET50_CONV_BIASES``
records that number; the test asserts both facts.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

__all__ = [
    "MODEL_NAMES",
    "PAPER_TABLE2_TOTAL",
    "KERAS_RESNET50_CONV_BIASES",
    "create_model",
    "count_parameters",
    "feature_dims",
    "sha256_file",
    "WeightsError",
]

MODEL_NAMES = ("hybrid", "resnet50", "mobilenet")
MOBILENET_VERSIONS = ("v1", "v2")
#: Nandi & Mulimani (2021), Table 2: total parameters of the hybrid (ResNet50 + MobileNet v1,
#: Dense(100), Dense(4)), Keras count.
PAPER_TABLE2_TOTAL = 27_124_280
#: Conv biases Keras' ResNet50 has and torchvision's does not (see the module docstring).
KERAS_RESNET50_CONV_BIASES = 26_560

_FEATURES = {"resnet50": 2048, "v1": 1024, "v2": 1280}


class WeightsError(ValueError):
    """A weights file that is missing, fails its checksum or does not fit the backbone."""


def feature_dims(name: str, mobilenet: str = "v2") -> int:
    """Width of the pooled feature vector that feeds the head."""
    if name == "hybrid":
        return _FEATURES["resnet50"] + _FEATURES[mobilenet]
    if name == "resnet50":
        return _FEATURES["resnet50"]
    if name == "mobilenet":
        return _FEATURES[mobilenet]
    raise ValueError(f"unknown model {name!r} (one of {', '.join(MODEL_NAMES)})")


# --------------------------------------------------------------------------------------------
# Backbones (pooled feature extractors)
# --------------------------------------------------------------------------------------------


def _resnet50() -> nn.Module:
    import torchvision

    m = torchvision.models.resnet50(weights=None)
    m.fc = nn.Identity()  # avgpool + flatten -> (N, 2048)
    return m


def _mobilenet_v2() -> nn.Module:
    import torchvision

    m = torchvision.models.mobilenet_v2(weights=None)
    m.classifier = nn.Identity()  # features -> adaptive avg pool -> flatten -> (N, 1280)
    return m


def _mobilenet_v1() -> nn.Module:
    import timm

    # num_classes=0: timm's pooled feature vector (global average pool), (N, 1024)
    return timm.create_model("mobilenetv1_100", pretrained=False, num_classes=0)


def _backbone(kind: str) -> nn.Module:
    if kind == "resnet50":
        return _resnet50()
    if kind == "v2":
        return _mobilenet_v2()
    if kind == "v1":
        return _mobilenet_v1()
    raise ValueError(kind)


def _head(in_features: int, hidden: int, num_classes: int, dropout: float) -> nn.Sequential:
    if hidden and hidden > 0:
        return nn.Sequential(
            nn.Linear(in_features, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )
    return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_features, num_classes))


class HybridNet(nn.Module):
    """ResNet50 and MobileNet on the same input; pooled features concatenated; MLP head."""

    def __init__(self, num_classes: int, mobilenet: str = "v2", head_hidden: int = 100, dropout: float = 0.5):
        super().__init__()
        self.resnet = _backbone("resnet50")
        self.mobilenet = _backbone(mobilenet)
        self.head = _head(_FEATURES["resnet50"] + _FEATURES[mobilenet], head_hidden, num_classes, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.resnet(x), self.mobilenet(x)], dim=1))


class SingleNet(nn.Module):
    """One pooled backbone and the same MLP head as the hybrid (the paper's baselines)."""

    def __init__(self, backbone: str, num_classes: int, head_hidden: int = 100, dropout: float = 0.5):
        super().__init__()
        self.backbone = _backbone(backbone)
        self.head = _head(_FEATURES[backbone], head_hidden, num_classes, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _published_sha256(path: Path) -> tuple[str | None, str]:
    """The checksum the source publishes for ``path``: a ``SHA256SUMS`` line beside it (full
    hash), else torchvision's file-name convention ``<name>-<first 8+ hex of sha256>.pth``
    (prefix).  Returns (hex or prefix or None, where it came from)."""
    sums = path.parent / "SHA256SUMS"
    if sums.is_file():
        for line in sums.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[-1].lstrip("*") == path.name:
                return parts[0].lower(), str(sums)
    m = re.search(r"-([0-9a-f]{8,64})\.(pth|pt|bin)$", path.name)
    if m:
        return m.group(1), "file name (torchvision convention)"
    return None, ""


def verify_weights_file(path: str | Path) -> str:
    """sha256 of ``path``; raises WeightsError when a published checksum disagrees."""
    p = Path(path)
    if not p.is_file():
        raise WeightsError(f"weights file not found: {p}")
    digest = sha256_file(p)
    expected, where = _published_sha256(p)
    if expected is None:
        log.warning("no published sha256 for %s; loaded unverified (sha256 %s)", p, digest)
    elif not digest.startswith(expected):
        raise WeightsError(f"{p}: sha256 {digest} does not match {expected} from {where}")
    return digest


def _load_file_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    verify_weights_file(path)
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{path}: not a state_dict")
    return dict(obj)


#: classifier keys of the published ImageNet models, not part of our pooled backbones
_DROP = {"resnet50": ("fc.",), "v2": ("classifier.",), "v1": ("classifier.", "fc.", "head.")}


def _load_into(backbone: nn.Module, kind: str, state: Mapping[str, torch.Tensor], origin: str) -> None:
    own = backbone.state_dict()
    state = {k.removeprefix("module."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith(_DROP[kind])}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise WeightsError(
            f"{origin} does not fit the {kind} backbone: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    bad = [k for k in own if own[k].shape != state[k].shape]
    if bad:
        raise WeightsError(f"{origin}: shape mismatch for {bad[:5]}")
    backbone.load_state_dict(state, strict=True)
    log.info("loaded %s weights from %s", kind, origin)


def _imagenet_state(kind: str) -> dict[str, torch.Tensor] | None:
    """Official ImageNet weights, downloaded by torchvision (hash-checked: torch.hub verifies the
    sha256 prefix in the file name) or timm (from the Hugging Face hub).  Needs internet."""
    import torchvision

    if kind == "resnet50":
        return torchvision.models.ResNet50_Weights.IMAGENET1K_V1.get_state_dict(progress=False, check_hash=True)
    if kind == "v2":
        return torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1.get_state_dict(progress=False, check_hash=True)
    return None  # v1: timm builds it pretrained directly (see _apply_weights)


def _apply_weights(backbone: nn.Module, kind: str, spec: str | None) -> None:
    if spec is None or spec == "none":
        return
    if spec == "imagenet":
        state = _imagenet_state(kind)
        if state is None:  # timm mobilenetv1_100
            import timm

            state = timm.create_model("mobilenetv1_100", pretrained=True, num_classes=0).state_dict()
        _load_into(backbone, kind, state, f"ImageNet ({kind}, official download)")
        return
    p = Path(spec)
    if p.suffix == ".tflite":
        raise WeightsError(
            f"{p}: the quantised TFLite MobileNet v1 is not supported (no dequantising loader was built; "
            "see docs/results for why)"
        )
    _load_into(backbone, kind, _load_file_state_dict(p), str(p))


def create_model(
    name: str,
    num_classes: int,
    *,
    mobilenet: str = "v2",
    weights: str = "none",
    resnet_weights: str | None = None,
    mobilenet_weights: str | None = None,
    head_hidden: int = 100,
    dropout: float = 0.5,
) -> nn.Module:
    """Build ``hybrid`` | ``resnet50`` | ``mobilenet`` for ``num_classes`` classes; returns logits.

    ``weights``: ``"none"`` (random init), ``"imagenet"`` (official torchvision/timm download; needs
    internet) or a file path, applied to every backbone; ``resnet_weights`` /
    ``mobilenet_weights`` override it per backbone (same values).  Files are verified against
    the sha256 in a ``SHA256SUMS`` beside them, or the hash prefix in a torchvision file name;
    a mismatch raises :class:`WeightsError`.  The head is always randomly initialised.
    """
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r} (one of {', '.join(MODEL_NAMES)})")
    if mobilenet not in MOBILENET_VERSIONS:
        raise ValueError(f"mobilenet must be one of {', '.join(MOBILENET_VERSIONS)} (got {mobilenet!r})")
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError("num_classes must be an integer >= 2")
    rw = resnet_weights if resnet_weights is not None else weights
    mw = mobilenet_weights if mobilenet_weights is not None else weights
    if name == "hybrid":
        model: nn.Module = HybridNet(num_classes, mobilenet, head_hidden, dropout)
        _apply_weights(model.resnet, "resnet50", rw)
        _apply_weights(model.mobilenet, mobilenet, mw)
    elif name == "resnet50":
        model = SingleNet("resnet50", num_classes, head_hidden, dropout)
        _apply_weights(model.backbone, "resnet50", rw)
    else:
        model = SingleNet(mobilenet, num_classes, head_hidden, dropout)
        _apply_weights(model.backbone, mobilenet, mw)
    return model


def count_parameters(model: nn.Module, keras_style: bool = True) -> int:
    """Number of parameters; with ``keras_style`` also batch-norm running mean and variance (Keras
    counts them as non-trainable parameters; ``num_batches_tracked`` is not counted)."""
    n = sum(p.numel() for p in model.parameters())
    if keras_style:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                n += m.running_mean.numel() + m.running_var.numel()
    return int(n)
