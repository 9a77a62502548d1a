"""Plain pydicom datasets, made and copied fast (the SR builder's building blocks, worker/results/sr.py).

``Dataset()`` and ``copy.deepcopy`` go through pydicom's per-attribute ``__setattr__`` and
validation, most of the cost of an SR of ~160 small items; these helpers build the same objects
(plain Datasets, Sequences and DataElements, values converted exactly as pydicom converts them)
without that overhead.  Read-only pre-encoded items (:class:`~worker.results.encoding.EncodedItem`)
are shared by :func:`_clone`, not copied.
"""

from __future__ import annotations

import copy
from typing import Any

import pydicom
from pydicom import config
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag

from worker.results.encoding import EncodedItem

__all__ = ["_clone", "_ds", "_el", "_new_ds", "_plain"]

_new_element = DataElement.__new__


def _el(tag: BaseTag, vr: str, value: Any) -> DataElement:
    """A new element; its value converted exactly as ``Dataset.__setattr__`` converts it."""
    return DataElement(tag, vr, value, validation_mode=config.IGNORE)


#: The attributes of a new, empty Dataset; ``Dataset()`` sets them one by one through pydicom's
#: ``__setattr__`` (about 3 us, most of the cost of a small item), _new_ds copies them at once.
_EMPTY_DATASET_STATE: dict[str, Any] = dict(Dataset().__dict__)
_MUTABLE_DATASET_STATE = tuple(k for k, v in _EMPTY_DATASET_STATE.items() if isinstance(v, (dict, list, set)))


def _new_ds(elements: dict[BaseTag, DataElement]) -> Dataset:
    """``Dataset(elements)``, without the per-attribute ``__setattr__`` overhead."""
    ds = object.__new__(Dataset)
    state = _EMPTY_DATASET_STATE.copy()
    for k in _MUTABLE_DATASET_STATE:
        state[k] = state[k].copy()
    state["_dict"] = elements
    object.__setattr__(ds, "__dict__", state)
    return ds


def _ds(*elems: DataElement) -> Dataset:
    return _new_ds({e.tag: e for e in elems})


_SQ = pydicom.Sequence
_new_sequence = _SQ.__new__


def _clone(ds: Dataset) -> Dataset:
    """A deep copy, as a plain Dataset, of a dataset built by :func:`_plain` or worker/results/sr.py: plain
    DataElements whose values are immutable (str, UID, numbers, DS/IS/DA/TM, PersonName) except
    sequences (pydicom.Sequence, copied item by item; read-only pre-encoded items,
    :class:`~worker.results.encoding.EncodedItem`, are shared) and multi-values (deep-copied)."""
    out: dict[BaseTag, DataElement] = {}
    for tag, elem in ds._dict.items():
        state = elem.__dict__.copy()
        value = state["_value"]
        vt = type(value)
        if vt is _SQ:
            seq = _new_sequence(_SQ)  # Sequence(items) without re-validating items we made
            # pre-encoded items are read only: shared, not copied
            seq.__dict__["_list"] = [item if type(item) is EncodedItem else _clone(item) for item in value._list]
            state["_value"] = seq
        elif vt is MultiValue or vt is list:
            state["_value"] = copy.deepcopy(value)
        new = _new_element(DataElement)
        new.__dict__ = state
        out[tag] = new
    return _new_ds(out)


def _plain(ds: Dataset) -> Dataset:
    """A deep copy of any dataset (e.g. highdicom's content items and sequences) made of plain
    pydicom Datasets, Sequences and DataElements, for :func:`_clone`."""
    out: dict[BaseTag, DataElement] = {}
    for tag in list(ds.keys()):
        elem = ds[tag]  # converts a RawDataElement
        value = elem.value
        if isinstance(value, pydicom.Sequence):
            value = _SQ([_plain(item) for item in value])
        elif isinstance(value, (MultiValue, list)):
            value = copy.deepcopy(value)
        new = _new_element(DataElement)
        new.__dict__ = {**elem.__dict__, "_value": value}
        out[tag] = new
    return _new_ds(out)
