"""DICOM (and PNG/JPEG) to model-input tensor: the ONE preprocessing for serving and training.

The edge worker calls :func:`preprocess` on received DICOM objects; training calls
:func:`load_image_file` on its 8-bit PNGs.  Both end in :func:`grey_to_input`, so the model sees
the same pixel pipeline in both places.  This module never imports torch.

Pipeline (DICOM PS3.4 N.2, "Grayscale Transformations"; PS3.3 C.11):

1. :func:`decode`: stored pixel values of the first frame (PS3.5 8.1.1 / 8.2, Annex A.4), by the
   decoder measured fastest for the transfer syntax (:mod:`worker.decoders`), pydicom's own
   decoders as the fallback; an image is refused only when every decoder fails.
2. :func:`to_grey8`: Modality LUT (PS3.3 C.11.1), VOI LUT or window (C.11.2), and the
   MONOCHROME1 inversion (C.7.6.3.1.2), folded into one lookup table over every possible stored
   value, giving an 8-bit display image in which bone is bright.
3. :func:`grey_to_input`: centre-square crop, Pillow resize, scale to [0, 1], normalise, replicate
   grey to the model's channels.

Speed: for integer stored data of up to 16 bits the whole grey-scale chain is one 64 KiB
(or 256 B) table applied with ``np.take``; robust percentiles come from a histogram of a strided
subsample.  :func:`preprocess` additionally crops *before* the table lookup, so a 2000x2500 image
only maps its 2000x2000 centre.  The result is bit-identical to
``grey_to_input(to_grey8(ds, decode(ds, spec), spec), spec)`` (tested).

The package, one stage per module: ``spec`` (the card's preprocessing, validated), ``codestream``
(Pixel Data and codestream headers before decoding), ``decoding`` (stored values of the first
frame), ``grey`` (LUTs and VOI to 8-bit grey), ``tensor`` (crop, resize, normalise; image files).
The public names are re-exported here (``from worker.imaging import preprocess``).
"""

from __future__ import annotations

from worker.imaging.decoding import decode
from worker.imaging.grey import to_grey8
from worker.imaging.spec import PixelError, PreprocessSpec
from worker.imaging.tensor import fit_grey, grey_to_input, load_image_file, pil_to_grey8, preprocess

__all__ = [
    "PixelError",
    "PreprocessSpec",
    "decode",
    "to_grey8",
    "grey_to_input",
    "fit_grey",
    "preprocess",
    "load_image_file",
    "pil_to_grey8",
]
