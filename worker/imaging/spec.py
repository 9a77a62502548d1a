"""What the preprocessing does, as the model card says it (:class:`PreprocessSpec`), validated
once with errors that name the card key; and :class:`PixelError`, the readable reason an image is
skipped.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

log = logging.getLogger(__name__)

#: Native (not encapsulated) little-endian transfer syntaxes whose Pixel Data we read directly
#: with ``np.frombuffer``.  Deflate (PS3.5 A.5) is undone by pydicom when the file is read, so
#: its Pixel Data is native too.
_NATIVE_LE = frozenset({ImplicitVRLittleEndian, ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian})

_VOI_MODES = ("auto", "minmax")
_CROP_MODES = ("center_square", "none")

#: Target number of pixels for the percentile subsample (every k-th row and column); about
#: 650 samples lie beyond a 0.5% bound, plenty for a display window.
_STAT_PIXELS = 1 << 17
#: Elements per ``np.take`` chunk: keeps the intp index temporary in L2 cache.
_TAKE_CHUNK = 1 << 16
#: Pillow: box-reduce by an integer factor first while the remaining scale stays >= this.
_REDUCING_GAP = 2.0


class PixelError(ValueError):
    """Pixel data that cannot be decoded or fails a sanity check. str(e) is a reason a person can read."""


# --------------------------------------------------------------------------------------------
# Specification
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreprocessSpec:
    """How an image becomes a model input.  Frozen and hashable; normally built from a model card.

    Attributes:
        size: (height, width) of the model input.
        channels: grey is replicated to this many channels.
        mean, std: per-channel normalisation applied to grey scaled to [0, 1] (one value, or one
            per channel).
        voi: ``"auto"``: VOI LUT Sequence if present, else the first Window Center/Width, else
            robust min-max (8-bit unsigned data with an identity modality LUT and no VOI is
            taken as already being display grey levels); ``"minmax"``: always robust min-max.
        percentiles: (low, high) bounds of the robust min-max, in percent.
        crop: ``"center_square"`` (centre crop to a square on the shorter side, as the training
            PNGs were made) or ``"none"`` (squash to ``size``).
        max_bytes: declared pixel data larger than this is refused before decoding.
        j2k_reduce: decode JPEG 2000 (PS3.5 A.4.4) at the smallest wavelet resolution level whose
            shorter side is still at least twice the model input (ISO 15444-1: each level halves
            both sides), instead of at full size and then throwing 99 % of the pixels away.  The
            level's LL band is a proper low-pass image and the usual resize does the last step,
            so the model sees nearly what the full decode gives; a 2000 x 2500 lossless image
            decodes about 20 times faster.
    """

    size: tuple[int, int] = (224, 224)
    channels: int = 3
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    voi: str = "auto"
    percentiles: tuple[float, float] = (0.5, 99.5)
    crop: str = "center_square"
    max_bytes: int = 512 * 2**20
    j2k_reduce: bool = True

    def __post_init__(self) -> None:
        # Validate, and normalise sequences to tuples so the spec stays hashable.
        channels = _check_channels(self.channels, "channels")
        object.__setattr__(self, "size", _check_size(self.size, "size"))
        object.__setattr__(self, "mean", _check_norm(self.mean, channels, "mean", positive=False))
        object.__setattr__(self, "std", _check_norm(self.std, channels, "std", positive=True))
        _check_choice(self.voi, _VOI_MODES, "voi")
        object.__setattr__(self, "percentiles", _check_percentiles(self.percentiles, "percentiles"))
        _check_choice(self.crop, _CROP_MODES, "crop")
        if isinstance(self.max_bytes, bool) or not isinstance(self.max_bytes, int) or self.max_bytes <= 0:
            raise ValueError("max_bytes must be a positive integer")

    @classmethod
    def from_card(cls, card: Mapping[str, Any]) -> PreprocessSpec:
        """From a model card dict: card["input"] = {"size":[h,w], "channels":3, "mean":[...],
        "std":[...], "layout":"NCHW"}, card.get("preprocessing", {}) = {"voi":...,
        "percentiles":[lo,hi], "crop":...}. Missing keys take defaults; bad values raise ValueError
        naming the key (e.g. "model card input.size must be two positive integers")."""
        if not isinstance(card, Mapping):
            raise ValueError("model card must be an object")
        inp = card.get("input", {})
        pre = card.get("preprocessing", {})
        if inp is None:
            inp = {}
        if pre is None:
            pre = {}
        if not isinstance(inp, Mapping):
            raise ValueError("model card input must be an object")
        if not isinstance(pre, Mapping):
            raise ValueError("model card preprocessing must be an object")

        kwargs: dict[str, Any] = {}
        if "size" in inp:
            kwargs["size"] = _check_size(inp["size"], "model card input.size")
        if "channels" in inp:
            kwargs["channels"] = _check_channels(inp["channels"], "model card input.channels")
        channels = kwargs.get("channels", cls.channels)
        if "mean" in inp:
            kwargs["mean"] = _check_norm(inp["mean"], channels, "model card input.mean", positive=False)
        if "std" in inp:
            kwargs["std"] = _check_norm(inp["std"], channels, "model card input.std", positive=True)
        if "layout" in inp and inp["layout"] != "NCHW":
            raise ValueError(f"model card input.layout must be NCHW (got {inp['layout']!r})")
        if "voi" in pre:
            kwargs["voi"] = _check_choice(pre["voi"], _VOI_MODES, "model card preprocessing.voi")
        if "percentiles" in pre:
            kwargs["percentiles"] = _check_percentiles(pre["percentiles"], "model card preprocessing.percentiles")
        if "crop" in pre:
            kwargs["crop"] = _check_choice(pre["crop"], _CROP_MODES, "model card preprocessing.crop")
        unknown = sorted(set(pre) - {"voi", "percentiles", "crop"})
        if unknown:
            log.warning("model card preprocessing keys ignored (not understood): %s", ", ".join(unknown))
        try:
            return cls(**kwargs)
        except ValueError as exc:  # e.g. default mean (3 values) with channels=1
            raise ValueError(f"model card: {exc}") from None


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_num(v: Any) -> bool:
    return (
        isinstance(v, (int, float, np.integer, np.floating))
        and not isinstance(v, (bool, np.bool_))
        and math.isfinite(v)
    )


def _check_size(v: Any, key: str) -> tuple[int, int]:
    if (
        isinstance(v, (str, bytes))
        or not isinstance(v, Sequence)
        or len(v) != 2
        or not all(_is_int(x) and x > 0 for x in v)
    ):
        raise ValueError(f"{key} must be two positive integers")
    return (int(v[0]), int(v[1]))


def _check_channels(v: Any, key: str) -> int:
    if not _is_int(v) or v <= 0:
        raise ValueError(f"{key} must be a positive integer")
    return int(v)


def _check_norm(v: Any, channels: int, key: str, *, positive: bool) -> tuple[float, ...]:
    what = "positive" if positive else "finite"
    if isinstance(v, (str, bytes)) or not isinstance(v, Sequence) or len(v) not in (1, channels):
        raise ValueError(f"{key} must be 1 or {channels} (channels) {what} numbers")
    if not all(_is_num(x) and (x > 0 or not positive) for x in v):
        raise ValueError(f"{key} must be 1 or {channels} (channels) {what} numbers")
    return tuple(float(x) for x in v)


def _check_choice(v: Any, choices: tuple[str, ...], key: str) -> str:
    if v not in choices:
        raise ValueError(f"{key} must be one of {', '.join(choices)} (got {v!r})")
    return str(v)


def _check_percentiles(v: Any, key: str) -> tuple[float, float]:
    if (
        isinstance(v, (str, bytes))
        or not isinstance(v, Sequence)
        or len(v) != 2
        or not all(_is_num(x) for x in v)
        or not 0.0 <= v[0] < v[1] <= 100.0
    ):
        raise ValueError(f"{key} must be two numbers 0 <= low < high <= 100")
    return (float(v[0]), float(v[1]))
