"""The SR's Part 10 encoding with pre-encoded, shared, read-only items spliced in verbatim.

Why: pydicom's writer costs about 10 us per element (``write_data_element``, ambiguous VR
correction of every nested dataset, character set conversion), and an SR has ~160 nested items
and ~590 elements, most of them the same in every SR of a model (codes, observation context,
algorithm identification).  A sequence item is self-contained bytes (PS3.5 7.5: Item tag, its
length and its elements, or undefined length and an Item Delimitation Item), so an item that
never changes can be encoded once and its bytes copied into every file that contains it.

What is here:

* :class:`EncodedItem`: a read-only :class:`~pydicom.dataset.Dataset` (every nested element,
  sequence and item read-only too: changing one raises :class:`ReadOnlyItemError`, never
  silently) that keeps its encoding per character set, made by pydicom's own
  ``write_sequence_item`` the first time an SR with that character set needs it.  Shared by
  every SR built from one template; ``copy.deepcopy`` gives an editable plain copy.
* :func:`encode`: the DICOM file (PS3.10 7.1: preamble, ``DICM``, File Meta Information by
  pydicom's ``write_file_meta_info``, then the data set in Explicit VR Little Endian), the same
  bytes as ``ds.save_as(buf, enforce_file_format=True)``: elements in tag order, retired group
  lengths left out, SpecificCharacterSet inherited by items, sequences and items with defined
  length unless marked undefined; every element that is not a sequence is written by pydicom's
  ``write_data_element``.  Whatever it does not handle (another transfer syntax, pixel data,
  raw or ambiguous-VR elements, anything that raises) is written by pydicom's ``dcmwrite``.
"""

from __future__ import annotations

import copy
import logging
import struct
from collections.abc import Iterable, Iterator
from io import BytesIO
from types import MappingProxyType
from typing import Any, NoReturn, cast

import pydicom
from pydicom.charset import convert_encodings, default_encoding
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset, validate_file_meta
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element, write_file_meta_info, write_sequence_item, writers
from pydicom.tag import BaseTag
from pydicom.uid import UID, ExplicitVRLittleEndian
from pydicom.valuerep import AMBIGUOUS_VR, IS, DSdecimal, DSfloat

log = logging.getLogger(__name__)

__all__ = ["EncodedItem", "ReadOnlyItemError", "encode", "freeze", "is_frozen", "thaw"]


class ReadOnlyItemError(TypeError):
    """A shared pre-encoded SR item (or an element or sequence inside one) was to be changed."""


def _refuse(what: object, *_args: Any, **_kwargs: Any) -> NoReturn:
    raise ReadOnlyItemError(
        f"{type(what).__name__} is part of a pre-encoded SR item shared by many SRs and is read "
        "only; copy.deepcopy() the item (or its parent) for an editable copy"
    )


#: Scalar value types an item may hold to be frozen: immutable, and encoded from their value
#: alone.  Anything else (MultiValue, PersonName, bytes-like buffers, ...) keeps the item plain.
_SCALARS = (str, UID, int, float, DSfloat, DSdecimal, IS, bytes, type(None))

_EMPTY_DATASET_STATE: dict[str, Any] = dict(Dataset().__dict__)


def _same(obj: object) -> object:
    """copy and pickle make a frozen object's plain, editable copy with this."""
    return obj


class _FrozenElement(DataElement):
    """A DataElement whose attributes (value, VR, ...) cannot be set."""

    __setattr__ = _refuse
    __delattr__ = _refuse

    def __deepcopy__(self, memo: dict[int, Any]) -> DataElement:
        new = DataElement.__new__(DataElement)
        state = self.__dict__.copy()
        value = state["_value"]
        if isinstance(value, _FrozenSequence):
            state["_value"] = copy.deepcopy(value, memo)
        new.__dict__ = state
        return new

    def __reduce_ex__(self, protocol: Any) -> Any:
        return _same, (copy.deepcopy(self),)


class _FrozenSequence(pydicom.Sequence):
    """A Sequence of :class:`EncodedItem` that cannot be changed."""

    __setattr__ = _refuse
    __delattr__ = _refuse
    __setitem__ = _refuse
    __delitem__ = _refuse
    __iadd__ = _refuse
    append = _refuse
    extend = _refuse
    insert = _refuse

    def __deepcopy__(self, memo: dict[int, Any]) -> pydicom.Sequence:
        return pydicom.Sequence([copy.deepcopy(item, memo) for item in self._list])

    def __reduce_ex__(self, protocol: Any) -> Any:
        return _same, (copy.deepcopy(self),)


class EncodedItem(Dataset):
    """A read-only sequence item that keeps its own encoding, one per character set.

    Made only by :func:`freeze`.  Reading works as for any Dataset (attributes, ``item[tag]``,
    iteration, equality, ``str``, pydicom's writer); every change raises ReadOnlyItemError.
    """

    __setattr__ = _refuse
    __delattr__ = _refuse
    __setitem__ = _refuse
    __delitem__ = _refuse
    add = _refuse
    add_new = _refuse
    clear = _refuse
    pop = _refuse
    popitem = _refuse
    setdefault = _refuse
    update = _refuse

    def __init__(self, *_args: Any, **_kwargs: Any) -> None:
        raise TypeError("EncodedItem is made by worker.results.encoding.freeze()")

    def encoded(self, encodings: tuple[str, ...]) -> bytes:
        """The item as pydicom writes it in a sequence (Explicit VR Little Endian, PS3.5 7.5)
        under the Python codecs ``encodings`` inherited from its parent."""
        cache: dict[tuple[str, ...], bytes] = self.__dict__["_encoded"]
        data = cache.get(encodings)
        if data is None:
            fp = DicomBytesIO()
            fp.is_little_endian, fp.is_implicit_VR = True, False
            write_sequence_item(fp, self, list(encodings))
            data = fp.getvalue()
            if len(cache) < 8:  # a site uses one or two character sets
                cache[encodings] = data  # a race stores equal bytes twice
        return data

    def __deepcopy__(self, memo: dict[int, Any]) -> Dataset:
        return thaw(self, memo)

    def __reduce_ex__(self, protocol: Any) -> Any:
        return _same, (thaw(self),)


def _freezable(ds: Dataset) -> bool:
    if type(ds) is EncodedItem:
        return True
    if type(ds) is not Dataset or getattr(ds, "is_undefined_length_sequence_item", False):
        return False
    for tag, elem in ds._dict.items():
        if type(elem) is not DataElement or elem.VR in AMBIGUOUS_VR or elem.VR not in writers:
            return False
        if tag >> 16 in (0, 2) or elem.is_undefined_length:
            return False
        value = elem._value
        if elem.VR == "SQ":
            if type(value) is not pydicom.Sequence or not all(_freezable(i) for i in value._list):
                return False
        elif type(value) not in _SCALARS:
            return False
    return True


def _frozen(ds: Dataset) -> EncodedItem:
    if type(ds) is EncodedItem:
        return ds
    elements: dict[BaseTag, DataElement] = {}
    for tag, elem in ds._dict.items():
        state = elem.__dict__.copy()
        if elem.VR == "SQ":
            seq = _FrozenSequence.__new__(_FrozenSequence)
            object.__setattr__(seq, "_list", [_frozen(i) for i in state["_value"]._list])
            state["_value"] = seq
        new = _FrozenElement.__new__(_FrozenElement)
        object.__setattr__(new, "__dict__", state)
        elements[tag] = new
    item = object.__new__(EncodedItem)
    state = {k: (v.copy() if isinstance(v, (dict, list, set)) else v) for k, v in _EMPTY_DATASET_STATE.items()}
    state["_dict"] = MappingProxyType(elements)
    state["_encoded"] = {}
    object.__setattr__(item, "__dict__", state)
    return item


def freeze(ds: Dataset) -> Dataset:
    """A read-only :class:`EncodedItem` equal to ``ds`` (which is left as it is), or ``ds``
    itself when it holds anything this module does not freeze (raw or ambiguous-VR elements,
    multi-values, person names, undefined lengths, a Dataset subclass)."""
    return _frozen(ds) if _freezable(ds) else ds


def is_frozen(ds: Dataset) -> bool:
    return type(ds) is EncodedItem


def thaw(ds: Dataset, memo: dict[int, Any] | None = None) -> Dataset:
    """A plain, editable deep copy of ``ds`` (an EncodedItem or any Dataset)."""
    if type(ds) is not EncodedItem:
        return copy.deepcopy(ds, memo)
    out = Dataset()
    for tag, elem in ds._dict.items():
        out._dict[tag] = copy.deepcopy(elem, memo)
    return out


# --------------------------------------------------------------------------- the writer


class _Unsupported(Exception):
    """Raised inside the fast writer: pydicom writes this dataset."""


_ITEM = struct.pack("<HH", 0xFFFE, 0xE000)
_ITEM_DELIMITER = struct.pack("<HHL", 0xFFFE, 0xE00D, 0)
_SEQUENCE_DELIMITER = struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
_UNDEFINED = struct.pack("<L", 0xFFFFFFFF)
_pack_tag_sq = struct.Struct("<HH2sH").pack  # tag, VR "SQ", 2 reserved bytes (PS3.5 7.1.2)
_pack_ul = struct.Struct("<L").pack
_SQ = b"SQ"


def _encodings(value: Any) -> tuple[str, ...]:
    """The Python codecs pydicom's write_data_element hands a sequence's items."""
    return tuple(convert_encodings(value or [default_encoding]))


def _write_dataset(fp: DicomBytesIO, ds: Dataset, parent_encoding: Any) -> None:
    """pydicom's write_dataset for a dataset whose elements are plain DataElements."""
    if type(ds) is not Dataset and type(ds) is not pydicom.FileDataset:
        raise _Unsupported(type(ds).__name__)
    d = ds._dict
    charset = ds.get("SpecificCharacterSet", parent_encoding) if 0x00080005 in d else parent_encoding
    item_encodings: tuple[str, ...] | None = None
    for tag in sorted(d):
        if not tag & 0xFFFF and tag >> 16 > 6:  # retired group length (PS3.5 7.2)
            continue
        elem = d[tag]
        if type(elem) is not DataElement:
            raise _Unsupported("raw element")
        vr = elem.VR
        if vr == "SQ":
            if item_encodings is None:
                item_encodings = _encodings(charset)
            _write_sequence(fp, elem, item_encodings)
        elif vr in AMBIGUOUS_VR or vr not in writers:
            raise _Unsupported(vr)
        else:
            write_data_element(fp, elem, charset)


def _write_sequence(fp: DicomBytesIO, elem: DataElement, encodings: tuple[str, ...]) -> None:
    """write_data_element + write_sequence + write_sequence_item for one SQ element."""
    tag = elem.tag
    items: Iterable[Dataset] = elem._value
    undefined = elem.is_undefined_length
    fp.write(_pack_tag_sq(tag >> 16, tag & 0xFFFF, _SQ, 0))
    at = fp.tell()
    fp.write(_UNDEFINED)
    start = fp.tell()
    if not elem.is_empty:
        if type(items) is not pydicom.Sequence:
            raise _Unsupported(type(items).__name__)
        enc_list = list(encodings)
        for item in items:
            if type(item) is EncodedItem:
                fp.write(item.encoded(encodings))
                continue
            fp.write(_ITEM)
            item_at = fp.tell()
            fp.write(_UNDEFINED)
            _write_dataset(fp, item, enc_list)
            if getattr(item, "is_undefined_length_sequence_item", False):
                fp.write(_ITEM_DELIMITER)
            else:
                _patch(fp, item_at)
    if undefined:
        fp.write(_SEQUENCE_DELIMITER)
    else:
        end = fp.tell()
        fp.seek(at)
        fp.write(_pack_ul(end - start))
        fp.seek(end)


def _patch(fp: DicomBytesIO, at: int) -> None:
    end = fp.tell()
    fp.seek(at)
    fp.write(_pack_ul(end - at - 4))
    fp.seek(end)


def _file_meta(ds: Dataset) -> FileMetaDataset:
    """What dcmwrite(..., enforce_file_format=True) makes of the file meta (a copy)."""
    meta = copy.deepcopy(ds.file_meta) if hasattr(ds, "file_meta") else FileMetaDataset()
    if meta.get("TransferSyntaxUID", None) != ExplicitVRLittleEndian:
        raise _Unsupported("transfer syntax")
    meta_class = meta.get("MediaStorageSOPClassUID", None)
    ds_class = ds.get("SOPClassUID", None)
    if meta_class is None or (ds_class and ds_class != meta_class):
        meta.MediaStorageSOPClassUID = ds_class
    meta_instance = meta.get("MediaStorageSOPInstanceUID", None)
    ds_instance = ds.get("SOPInstanceUID", None)
    if meta_instance is None or (ds_instance and ds_instance != meta_instance):
        meta.MediaStorageSOPInstanceUID = ds_instance
    validate_file_meta(meta, enforce_standard=True)
    return meta


def _encode_fast(ds: Dataset) -> bytes:
    if any(tag >> 16 in (0, 2) for tag in ds._dict) or 0x7FE00010 in ds._dict:
        raise _Unsupported("command, meta or pixel data elements")
    if ds.original_encoding[1] not in (None, True):
        raise _Unsupported("big endian original")
    meta = _file_meta(ds)
    preamble = getattr(ds, "preamble", None)
    if preamble and len(preamble) != 128:
        raise _Unsupported("preamble")
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    fp.write(preamble or b"\x00" * 128)
    fp.write(b"DICM")
    write_file_meta_info(fp, meta, enforce_standard=True)
    _write_dataset(fp, ds, default_encoding)
    return bytes(fp.getvalue())


def encode(ds: Dataset) -> bytes:
    """``ds`` as a DICOM file (PS3.10 7.1): the bytes of ``ds.save_as(buf,
    enforce_file_format=True)``, with pre-encoded items copied rather than re-encoded."""
    try:
        return _encode_fast(ds)
    except Exception as exc:  # pydicom writes it, or raises its own error
        log.debug("encoding with pydicom's writer (%s: %s)", type(exc).__name__, exc)
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def walk_items(ds: Dataset) -> Iterator[Dataset]:
    """Every item nested in ``ds`` (depth first), for tests and statistics."""
    for elem in ds._dict.values():
        if getattr(elem, "VR", None) == "SQ":
            seq = cast("Iterable[Dataset]", elem.value)
            for item in seq:
                yield item
                yield from walk_items(item)


