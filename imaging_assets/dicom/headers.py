"""Read one DICOM file's header into a file-catalog record, or quarantine it with a reason.

Speed matters here (a crawl reads every file of an archive), so the common case never builds a pydicom
``Dataset``. A small structural scanner walks the top-level elements of the file straight from a buffered
read: it decodes only the ~25 tags the catalog needs, skips every other value by its length (so the Pixel
Data and big private blobs are never read), and on the way checks that every element, every nested
sequence and the Pixel Data fit inside the file. That is also the only reliable truncation test: pydicom
reads a file cut in the middle of an element without complaint.

pydicom is still used where it is the right tool:

* objects whose useful content sits in sequences (SEG, RTSTRUCT, enhanced / legacy-converted multi-frame
  images with functional groups) are read with ``dcmread(stop_before_pixels=True)`` after the scan;
* files the scanner does not handle (no 128-byte preamble, deflated transfer syntax, malformed encodings)
  are read with ``dcmread(force=True)``; a file without a preamble must then parse into a plausible
  dataset, otherwise it is ``not_dicom``.

Pixel data are never decoded here. For compressed transfer syntaxes the crawl only asks pydicom whether a
decoder plugin is installed.

The raw PatientID is reduced to a keyed pseudonym immediately (:func:`~imaging_assets.dicom.pseudonym.
patient_key`); no name, id or birth date is ever put into a record.
"""

from __future__ import annotations

import datetime as _dt
import errno
import io
import logging
import os
import struct
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from imaging_assets.dicom.pseudonym import patient_key
from imaging_assets.dicom.records import QUARANTINE_REASONS
from imaging_assets.dicom.values import coded_value_problems
from imaging_assets.errors import error_text

logger = logging.getLogger(__name__)

__all__ = [
    "SEG_SOP_CLASSES",
    "RTSTRUCT_SOP_CLASS",
    "classify_sop_class",
    "quarantine_record",
    "read_file_record",
]

#: Segmentation Storage and Label Map Segmentation Storage.
SEG_SOP_CLASSES = frozenset({"1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.66.7"})
#: RT Structure Set Storage.
RTSTRUCT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"

#: Image storage SOP classes the pipeline catalogues as ``kind='image'`` (besides any other class whose
#: pydicom name says "Image Storage", see :func:`classify_sop_class`).
IMAGE_SOP_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.1",  # Computed Radiography
        "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray (presentation)
        "1.2.840.10008.5.1.4.1.1.1.1.1",  # Digital X-Ray (processing)
        "1.2.840.10008.5.1.4.1.1.1.2",  # Digital Mammography (presentation)
        "1.2.840.10008.5.1.4.1.1.1.2.1",  # Digital Mammography (processing)
        "1.2.840.10008.5.1.4.1.1.1.3",  # Digital Intra-Oral X-Ray (presentation)
        "1.2.840.10008.5.1.4.1.1.1.3.1",  # Digital Intra-Oral X-Ray (processing)
        "1.2.840.10008.5.1.4.1.1.2",  # CT
        "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT
        "1.2.840.10008.5.1.4.1.1.2.2",  # Legacy Converted Enhanced CT
        "1.2.840.10008.5.1.4.1.1.3.1",  # Ultrasound Multi-frame
        "1.2.840.10008.5.1.4.1.1.4",  # MR
        "1.2.840.10008.5.1.4.1.1.4.1",  # Enhanced MR
        "1.2.840.10008.5.1.4.1.1.4.3",  # Enhanced MR Color
        "1.2.840.10008.5.1.4.1.1.4.4",  # Legacy Converted Enhanced MR
        "1.2.840.10008.5.1.4.1.1.6.1",  # Ultrasound
        "1.2.840.10008.5.1.4.1.1.6.2",  # Enhanced US Volume
        "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture
        "1.2.840.10008.5.1.4.1.1.7.1",  # Multi-frame Single Bit SC
        "1.2.840.10008.5.1.4.1.1.7.2",  # Multi-frame Grayscale Byte SC
        "1.2.840.10008.5.1.4.1.1.7.3",  # Multi-frame Grayscale Word SC
        "1.2.840.10008.5.1.4.1.1.7.4",  # Multi-frame True Color SC
        "1.2.840.10008.5.1.4.1.1.12.1",  # X-Ray Angiographic
        "1.2.840.10008.5.1.4.1.1.12.1.1",  # Enhanced XA
        "1.2.840.10008.5.1.4.1.1.12.2",  # X-Ray Radiofluoroscopic
        "1.2.840.10008.5.1.4.1.1.12.2.1",  # Enhanced XRF
        "1.2.840.10008.5.1.4.1.1.13.1.1",  # X-Ray 3D Angiographic
        "1.2.840.10008.5.1.4.1.1.13.1.2",  # X-Ray 3D Craniofacial
        "1.2.840.10008.5.1.4.1.1.13.1.3",  # Breast Tomosynthesis
        "1.2.840.10008.5.1.4.1.1.13.1.4",  # Breast Projection X-Ray (presentation)
        "1.2.840.10008.5.1.4.1.1.13.1.5",  # Breast Projection X-Ray (processing)
        "1.2.840.10008.5.1.4.1.1.14.1",  # IVOCT (presentation)
        "1.2.840.10008.5.1.4.1.1.14.2",  # IVOCT (processing)
        "1.2.840.10008.5.1.4.1.1.20",  # Nuclear Medicine
        "1.2.840.10008.5.1.4.1.1.30",  # Parametric Map
        "1.2.840.10008.5.1.4.1.1.128",  # PET
        "1.2.840.10008.5.1.4.1.1.128.1",  # Legacy Converted Enhanced PET
        "1.2.840.10008.5.1.4.1.1.130",  # Enhanced PET
    }
)

_TS_IMPLICIT_LE = "1.2.840.10008.1.2"
_TS_EXPLICIT_LE = "1.2.840.10008.1.2.1"
_TS_EXPLICIT_BE = "1.2.840.10008.1.2.2"
_TS_DEFLATED = "1.2.840.10008.1.2.1.99"
_NATIVE_TS = frozenset({_TS_IMPLICIT_LE, _TS_EXPLICIT_LE, _TS_EXPLICIT_BE, _TS_DEFLATED})

_CHUNK = 32768  # first read; headers of single-frame images almost always fit
_UNDEFINED = 0xFFFFFFFF
_ITEM = 0xFFFEE000
_ITEM_DELIM = 0xFFFEE00D
_SEQ_DELIM = 0xFFFEE0DD
_PIXEL_DATA = 0x7FE00010
_PIXEL_TAGS = {0x7FE00010: "Pixel Data", 0x7FE00008: "Float Pixel Data", 0x7FE00009: "Double Float Pixel Data"}
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_UPPER = frozenset(range(ord("A"), ord("Z") + 1))
_SHORT_VRS = frozenset(
    {
        b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS", b"LO", b"LT", b"PN",
        b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US",
    }
)  # fmt: skip

# Top-level tags the catalog needs: tag -> (keyword, how to decode)
_WANTED: dict[int, tuple[str, str]] = {
    0x00080005: ("SpecificCharacterSet", "cs_multi"),
    0x00080016: ("SOPClassUID", "ui"),
    0x00080018: ("SOPInstanceUID", "ui"),
    0x00080020: ("StudyDate", "text"),
    0x00080060: ("Modality", "text"),
    0x0008103E: ("SeriesDescription", "text"),
    0x00100020: ("PatientID", "text"),
    0x00180015: ("BodyPartExamined", "text"),
    0x00180050: ("SliceThickness", "ds"),
    0x0020000D: ("StudyInstanceUID", "ui"),
    0x0020000E: ("SeriesInstanceUID", "ui"),
    0x00200011: ("SeriesNumber", "is"),
    0x00200013: ("InstanceNumber", "is"),
    0x00200032: ("ImagePositionPatient", "ds"),
    0x00200037: ("ImageOrientationPatient", "ds"),
    0x00200052: ("FrameOfReferenceUID", "ui"),
    0x00280002: ("SamplesPerPixel", "us"),
    0x00280004: ("PhotometricInterpretation", "text"),
    0x00280008: ("NumberOfFrames", "is"),
    0x00280010: ("Rows", "us"),
    0x00280011: ("Columns", "us"),
    0x00280030: ("PixelSpacing", "ds"),
    0x00280100: ("BitsAllocated", "us"),
}
#: Sequences whose presence means the object needs a full pydicom read.
_FUNCTIONAL_GROUPS = frozenset({0x52009229, 0x52009230})
_TAG_TEXT = {kw: f"({tag >> 16:04X},{tag & 0xFFFF:04X})" for tag, (kw, _) in _WANTED.items()}
_TAG_NAMES = {
    "SOPClassUID": "SOP Class UID",
    "SOPInstanceUID": "SOP Instance UID",
    "SeriesInstanceUID": "Series Instance UID",
    "Rows": "Rows",
    "Columns": "Columns",
    "BitsAllocated": "Bits Allocated",
}

#: Tags stored in the catalog that must match their VR, else the file is quarantined (``invalid_value``).
_UID_TAGS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID",
             "TransferSyntaxUID", "MediaStorageSOPClassUID", "ReferencedSeriesInstanceUIDs")
_CS_TAGS = ("Modality", "BodyPartExamined", "PhotometricInterpretation")
_VR_NAMES = {
    **{kw: f"{_TAG_NAMES.get(kw, kw)} {_TAG_TEXT[kw]}" for kw in (*_UID_TAGS, *_CS_TAGS) if kw in _TAG_TEXT},
    "TransferSyntaxUID": "Transfer Syntax UID (0002,0010)",
    "MediaStorageSOPClassUID": "Media Storage SOP Class UID (0002,0002)",
    "ReferencedSeriesInstanceUIDs": "a referenced Series Instance UID",
    "StudyInstanceUID": "Study Instance UID (0020,000D)",
    "FrameOfReferenceUID": "Frame of Reference UID (0020,0052)",
    "Modality": "Modality (0008,0060)",
    "BodyPartExamined": "Body Part Examined (0018,0015)",
    "PhotometricInterpretation": "Photometric Interpretation (0028,0004)",
}


def _check_coded(values: dict[str, Any]) -> None:
    """Quarantine a file whose UIDs or coded tags violate their VR: they are stored, so a crafted value (an
    MRN as SeriesInstanceUID, a name as Modality) would be catalogued verbatim. Never quotes the value."""
    problems = coded_value_problems(values, _UID_TAGS, _CS_TAGS, _VR_NAMES)
    if problems:
        raise _Quarantine("invalid_value", "; ".join(problems))


_STRUCT = {
    True: (struct.Struct("<HHI"), struct.Struct("<HH2sH"), struct.Struct("<I"), struct.Struct("<H")),
    False: (struct.Struct(">HHI"), struct.Struct(">HH2sH"), struct.Struct(">I"), struct.Struct(">H")),
}


# --------------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------------
def quarantine_record(path: str, size: int, mtime_ns: int, reason: str, message: str) -> dict:
    """Build one quarantine row (keys of :data:`~imaging_assets.dicom.records.QUARANTINE_FIELDS`).

    Parameters
    ----------
    path, size, mtime_ns
        The file as the crawl found it.
    reason
        A code from :data:`~imaging_assets.dicom.records.QUARANTINE_REASONS`.
    message
        One sentence a person understands, naming the problem.

    Returns
    -------
    dict
        The quarantine record.
    """
    if reason not in QUARANTINE_REASONS:  # programming error, keep the row but say so
        message = f"{message} (unknown reason code {reason!r})"
        reason = "unreadable"
    return {"path": path, "size": size, "mtime_ns": mtime_ns, "reason": reason, "message": message}


class _Quarantine(Exception):
    """Internal: stop reading this file and quarantine it."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def classify_sop_class(sop_class_uid: str | None) -> str | None:
    """Return the catalog ``kind`` of a SOP class, or None when the pipeline does not use it.

    Parameters
    ----------
    sop_class_uid
        The SOP Class UID.

    Returns
    -------
    str or None
        ``'image'``, ``'seg'``, ``'rtstruct'`` or None (unsupported).
    """
    if not sop_class_uid:
        return None
    if sop_class_uid in SEG_SOP_CLASSES:
        return "seg"
    if sop_class_uid == RTSTRUCT_SOP_CLASS:
        return "rtstruct"
    if sop_class_uid in IMAGE_SOP_CLASSES:
        return "image"
    name = _uid_name(sop_class_uid)
    if "Image Storage" in name and not name.startswith("RT "):
        return "image"
    return None


@lru_cache(maxsize=512)
def _uid_name(uid: str) -> str:
    from pydicom.uid import UID

    try:
        return str(UID(uid).name)
    except Exception:  # noqa: BLE001 - a name is a nicety
        return uid


@lru_cache(maxsize=64)
def _decoder_problem(ts: str) -> str | None:
    """None when an installed pydicom decoder can read pixel data in ``ts``, else why not."""
    from pydicom.pixels import get_decoder

    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        return f"no pixel data decoder exists in pydicom for transfer syntax {_uid_name(ts)} ({ts})"
    except Exception as exc:  # noqa: BLE001
        return f"no pixel data decoder for transfer syntax {_uid_name(ts)} ({ts}): {exc}"
    if not decoder.is_available:
        missing = "; ".join(getattr(decoder, "missing_dependencies", []) or []) or "no plugin installed"
        return (
            f"transfer syntax {_uid_name(ts)} ({ts}) needs a pixel data plugin that is not installed "
            f"({missing})"
        )
    return None


# --------------------------------------------------------------------------------------------------
# Structural scanner
# --------------------------------------------------------------------------------------------------
class _ScanError(Exception):
    """The scanner met an encoding it does not handle; pydicom takes over."""


@dataclass
class _Pixel:
    tag: int
    offset: int | None  # file offset of the value (None: unknown, e.g. deflated)
    length: int | None  # None: encapsulated (undefined length)
    fragments: int = 0  # encapsulated only: fragments after the basic offset table


@dataclass
class _Scan:
    raw: dict[str, bytes]
    functional_groups: bool
    pixel: _Pixel | None
    little: bool
    implicit: bool


def _tag_str(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _elem_name(tag: int) -> str:
    if tag in _PIXEL_TAGS:
        return f"{_PIXEL_TAGS[tag]} element {_tag_str(tag)}"
    from pydicom.datadict import dictionary_description

    try:
        return f"{dictionary_description(tag)} element {_tag_str(tag)}"
    except KeyError:
        return f"element {_tag_str(tag)}"


def _describe(what: str | int | Callable[[], str]) -> str:
    if isinstance(what, int):
        return _elem_name(what)
    return what if isinstance(what, str) else what()


class _Reader:
    """Random access to a file through one buffered window (reads only what the scan touches)."""

    __slots__ = ("fp", "size", "buf", "base")

    def __init__(self, fp: Any, size: int, first: bytes) -> None:
        self.fp = fp
        self.size = size
        self.buf = first
        self.base = 0

    def get(self, off: int, n: int, what: str | int | Callable[[], str]) -> bytes:
        """Bytes ``[off, off + n)``; a truncation quarantine naming ``what`` (text or tag) past EOF."""
        if off + n > self.size:
            what = _describe(what)
            raise _Quarantine(
                "truncated",
                f"file is {self.size:,} bytes but its {what} needs {n:,} bytes from offset {off:,} "
                f"(ends at {off + n:,})",
            )
        b = off - self.base
        if b >= 0 and b + n <= len(self.buf):
            return self.buf[b : b + n]
        self.fp.seek(off)
        data = self.fp.read(max(n, _CHUNK))
        if len(data) < n:
            what = _describe(what)
            raise _Quarantine("truncated", f"file ends at {off + len(data):,} bytes inside its {what}")
        self.buf = data
        self.base = off
        return data[:n]


def _element(rd: _Reader, off: int, implicit: bool, little: bool) -> tuple[int, bytes | None, int, int]:
    """Parse the element header at ``off``: (tag, vr or None, length, value offset)."""
    s_tag_len, s_explicit, s_u32, _ = _STRUCT[little]
    hdr = rd.get(off, 8, "next element header")
    group, elem, length = s_tag_len.unpack(hdr)
    tag = (group << 16) | elem
    if implicit or group == 0xFFFE:
        return tag, None, length, off + 8
    _, _, vr, length16 = s_explicit.unpack(hdr)
    if vr in _LONG_VRS:
        (length,) = s_u32.unpack(rd.get(off + 8, 4, tag))
        return tag, vr, length, off + 12
    if vr[0] in _UPPER and vr[1] in _UPPER:
        return tag, vr, length16, off + 8
    raise _ScanError(f"invalid VR {vr!r} for {_tag_str(tag)} at offset {off}")


def _skip_sequence(rd: _Reader, off: int, implicit: bool, little: bool, owner: int, depth: int) -> int:
    """Skip an undefined-length sequence starting at ``off`` (first item); return the offset after it."""
    if depth > 64:
        raise _ScanError("sequences nested more than 64 deep")
    s_tag_len = _STRUCT[little][0]

    def what() -> str:
        return f"{_elem_name(owner)} (a sequence)"

    while True:
        group, elem, length = s_tag_len.unpack(rd.get(off, 8, what))
        tag = (group << 16) | elem
        off += 8
        if tag == _SEQ_DELIM:
            return off
        if tag != _ITEM:
            raise _ScanError(f"unexpected tag {_tag_str(tag)} inside sequence {_tag_str(owner)}")
        if length == _UNDEFINED:
            off = _skip_item(rd, off, implicit, little, owner, depth + 1)
        else:
            if off + length > rd.size:
                rd.get(off, length, lambda: f"{what()} item")  # raises truncated
            off += length


def _skip_item(rd: _Reader, off: int, implicit: bool, little: bool, owner: int, depth: int) -> int:
    """Skip the elements of an undefined-length item up to and including its delimiter."""
    while True:
        tag, vr, length, voff = _element(rd, off, implicit, little)
        if tag == _ITEM_DELIM:
            return voff
        if length == _UNDEFINED:
            off = _skip_sequence(rd, voff, implicit or vr == b"UN", little, owner, depth + 1)
        else:
            end = voff + length
            if end > rd.size:
                rd.get(voff, length, lambda tag=tag: f"{_elem_name(tag)} inside {_elem_name(owner)}")
            off = end


def _scan_fragments(rd: _Reader, off: int, little: bool, tag: int) -> tuple[int, int]:
    """Walk encapsulated pixel data items; return (offset after the delimiter, number of fragments)."""
    s_tag_len = _STRUCT[little][0]

    def what() -> str:
        return f"{_elem_name(tag)} (encapsulated: it ends before its sequence delimiter)"

    n_items = 0
    while True:
        group, elem, length = s_tag_len.unpack(rd.get(off, 8, what))
        item = (group << 16) | elem
        off += 8
        if item == _SEQ_DELIM:
            return off, max(n_items - 1, 0)  # the first item is the basic offset table
        if item != _ITEM or length == _UNDEFINED:
            raise _Quarantine(
                "unreadable", f"encapsulated {_elem_name(tag)} has an invalid item {_tag_str(item)}"
            )
        if off + length > rd.size:
            rd.get(off, length, lambda n_items=n_items: f"{_elem_name(tag)} fragment {n_items}")
        off += length
        n_items += 1


def _scan_dataset(rd: _Reader, off: int, implicit: bool, little: bool) -> _Scan:
    """Walk the top-level elements from ``off`` to the end of the file.

    The loop is the hot path of a crawl: element headers are unpacked straight from the read buffer and
    only wanted values are sliced out; :func:`_element` (bounds-checked, refills the buffer) handles the
    rest.
    """
    size = rd.size
    raw: dict[str, bytes] = {}
    fg = False
    pixel: _Pixel | None = None
    wanted = _WANTED
    pixel_tags = _PIXEL_TAGS
    functional_groups = _FUNCTIONAL_GROUPS
    long_vrs = _LONG_VRS
    short_vrs = _SHORT_VRS
    s_tag_len, s_explicit, s_u32, _ = _STRUCT[little]
    unpack_tag_len = s_tag_len.unpack_from
    unpack_explicit = s_explicit.unpack_from
    unpack_u32 = s_u32.unpack_from
    buf = rd.buf
    base = rd.base
    blen = len(buf)
    last = -1
    while off < size:
        b = off - base
        if b >= 0 and b + 12 <= blen:
            if implicit:
                group, elem, length = unpack_tag_len(buf, b)
                vr = None
                voff = off + 8
            else:
                group, elem, vr, length = unpack_explicit(buf, b)
                if vr in short_vrs:
                    voff = off + 8
                elif vr in long_vrs:
                    (length,) = unpack_u32(buf, b + 8)
                    voff = off + 12
                else:
                    tag, vr, length, voff = _element(rd, off, implicit, little)
                    group, elem = tag >> 16, tag & 0xFFFF
            tag = (group << 16) | elem
        else:
            if size - off < 8 and not any(rd.get(off, size - off, "trailing bytes")):
                break  # a few trailing NUL bytes of padding
            tag, vr, length, voff = _element(rd, off, implicit, little)
            buf = rd.buf
            base = rd.base
            blen = len(buf)
        if tag <= last or tag >> 16 == 0xFFFE:
            raise _ScanError(f"element {_tag_str(tag)} out of order at offset {off}")
        last = tag
        if length == _UNDEFINED:
            if tag in pixel_tags:
                off, n_frag = _scan_fragments(rd, voff, little, tag)
                pixel = _Pixel(tag, voff, None, n_frag)
            else:
                if tag in functional_groups:
                    fg = True
                off = _skip_sequence(rd, voff, implicit or vr == b"UN", little, tag, 0)
            buf = rd.buf
            base = rd.base
            blen = len(buf)
            continue
        end = voff + length
        if end > size:
            rd.get(voff, length, tag)  # raises the truncation quarantine
        if tag in wanted:
            vb = voff - base
            if vb >= 0 and vb + length <= blen:
                raw[wanted[tag][0]] = buf[vb : vb + length]
            else:
                raw[wanted[tag][0]] = rd.get(voff, length, tag)
                buf = rd.buf
                base = rd.base
                blen = len(buf)
        elif tag in pixel_tags:
            pixel = _Pixel(tag, voff, length)
        elif tag in functional_groups:
            fg = True
        off = end
    return _Scan(raw, fg, pixel, little, implicit)


def _scan_meta(rd: _Reader, off: int = 132) -> tuple[int, dict[str, str]]:
    """Parse the File Meta Information group (explicit VR little endian) starting at ``off``."""
    meta: dict[str, str] = {}
    while off + 8 <= rd.size:
        hdr = rd.get(off, 8, "file meta header")
        if hdr[0:2] != b"\x02\x00":
            break
        tag, vr, length, voff = _element(rd, off, False, True)
        if vr is None or length == _UNDEFINED:
            raise _ScanError("odd file meta encoding")
        value = rd.get(voff, length, tag)
        if tag == 0x00020010:
            meta["TransferSyntaxUID"] = _ui(value)
        elif tag == 0x00020002:
            meta["MediaStorageSOPClassUID"] = _ui(value)
        off = voff + length
    return off, meta


def _looks_implicit(rd: _Reader, off: int) -> bool:
    """True when the element at ``off`` has no valid explicit VR (a mislabelled implicit data set)."""
    if off + 8 > rd.size:
        return False
    vr = rd.get(off + 4, 2, "first element header")
    return not (vr[0] in _UPPER and vr[1] in _UPPER)


# --------------------------------------------------------------------------------------------------
# Value decoding (raw bytes from the scanner)
# --------------------------------------------------------------------------------------------------
def _ui(b: bytes) -> str | None:
    s = b.rstrip(b"\x00 ").lstrip().decode("ascii", "replace")
    return s or None


@lru_cache(maxsize=64)
def _encodings(charset: tuple[str, ...]) -> tuple[str, ...]:
    from pydicom.charset import convert_encodings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tuple(convert_encodings(list(charset)))


def _text(b: bytes, charset: tuple[str, ...] | None) -> str | None:
    if not b:
        return None
    if not charset or charset in (("ISO_IR 100",), ("ISO_IR 6",), ("",)):
        s = b.decode("latin-1")
    elif charset == ("ISO_IR 192",):
        s = b.decode("utf-8", "replace")
    else:
        from pydicom.charset import decode_bytes

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            s = decode_bytes(b, list(_encodings(charset)), {0x5C})
    s = s.strip(" \x00")
    return s or None


def _floats(s: str | None) -> list[float] | None:
    if not s:
        return None
    try:
        return [float(x) for x in s.split("\\")]
    except ValueError:
        return None


def _int(s: str | None) -> int | None:
    if not s:
        return None
    try:
        return int(s.split("\\")[0])
    except ValueError:
        try:
            f = float(s.split("\\")[0])
        except ValueError:
            return None
        return int(f) if f.is_integer() else None


def _decode_raw(scan: _Scan) -> dict[str, Any]:
    """Decode the scanner's raw bytes into Python values (same shapes as :func:`_values_from_ds`)."""
    raw = scan.raw
    charset: tuple[str, ...] | None = None
    if "SpecificCharacterSet" in raw:
        cs = raw["SpecificCharacterSet"].decode("ascii", "replace").strip(" \x00")
        charset = tuple(x.strip() for x in cs.split("\\")) if cs else None
    u16 = _STRUCT[scan.little][3]
    out: dict[str, Any] = {}
    for tag_kw, kind in _WANTED.values():
        b = raw.get(tag_kw)
        if b is None or tag_kw == "SpecificCharacterSet":
            out[tag_kw] = None
            continue
        if kind == "ui":
            out[tag_kw] = _ui(b)
        elif kind == "text":
            out[tag_kw] = _text(b, charset)
        elif kind == "ds":
            out[tag_kw] = _floats(_text(b, None))
        elif kind == "is":
            out[tag_kw] = _int(_text(b, None))
        elif kind == "us":
            out[tag_kw] = u16.unpack_from(b)[0] if len(b) >= 2 else None
    return out


# --------------------------------------------------------------------------------------------------
# Values from a pydicom Dataset (fallback and sequence-bearing objects)
# --------------------------------------------------------------------------------------------------
def _get(ds: Any, keyword: str) -> Any:
    """``ds.keyword`` converted leniently; None when absent, empty or invalid."""
    try:
        value = ds.get(keyword)
    except Exception:  # noqa: BLE001 - invalid values must not sink the whole file
        return None
    if value is None or value == "":
        return None
    return value


def _ds_text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = "\\".join(str(v) for v in value)
    s = str(value).strip(" \x00")
    return s or None


def _ds_floats(value: Any) -> list[float] | None:
    if value is None:
        return None
    try:
        if isinstance(value, (str, bytes)):
            return _floats(value.decode("latin-1") if isinstance(value, bytes) else value)
        if isinstance(value, (int, float)):
            return [float(value)]
        return [float(v) for v in value]
    except (TypeError, ValueError):
        return None


def _ds_int(value: Any) -> int | None:
    if value is None:
        return None
    try:
        if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
            value = value[0]
        if isinstance(value, bytes):
            return None
        return _int(str(value).strip()) if isinstance(value, str) else int(value)
    except (TypeError, ValueError, IndexError):
        return None


def _values_from_ds(ds: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kw, kind in _WANTED.values():
        v = _get(ds, kw)
        if kw == "SpecificCharacterSet":
            out[kw] = None
        elif kind == "ui":
            out[kw] = _ds_text(v)
        elif kind == "text":
            out[kw] = _ds_text(v)
        elif kind == "ds":
            out[kw] = _ds_floats(v)
        elif kind in ("is", "us"):
            out[kw] = _ds_int(v)
    return out


def _seq_item(ds: Any, keyword: str) -> Any:
    seq = _get(ds, keyword)
    if seq is None:
        return None
    try:
        return seq[0] if len(seq) else None
    except Exception:  # noqa: BLE001
        return None


def _functional(ds: Any, macro: str, attribute: str) -> Any:
    """Attribute from SharedFunctionalGroups, else the first PerFrameFunctionalGroups item."""
    for fg_kw in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        group = _seq_item(ds, fg_kw)
        if group is None:
            continue
        item = _seq_item(group, macro)
        if item is not None:
            v = _get(item, attribute)
            if v is not None:
                return v
    return None


def _multiframe_geometry(ds: Any, values: dict[str, Any]) -> list[list[float] | None] | None:
    """Fill orientation/spacing/thickness from functional groups; return the per-frame positions."""
    iop = _ds_floats(_functional(ds, "PlaneOrientationSequence", "ImageOrientationPatient"))
    if iop is not None:
        values["ImageOrientationPatient"] = iop
    spacing = _ds_floats(_functional(ds, "PixelMeasuresSequence", "PixelSpacing"))
    if spacing is not None:
        values["PixelSpacing"] = spacing
    thickness = _ds_floats(_functional(ds, "PixelMeasuresSequence", "SliceThickness"))
    if thickness is not None:
        values["SliceThickness"] = thickness
    per_frame = _get(ds, "PerFrameFunctionalGroupsSequence")
    if per_frame is None:
        return None
    positions: list[list[float] | None] = []
    for frame in per_frame:
        pos = None
        item = _seq_item(frame, "PlanePositionSequence")
        if item is not None:
            pos = _ds_floats(_get(item, "ImagePositionPatient"))
        if pos is None:  # some writers put the position in the shared group (one plane)
            shared = _seq_item(ds, "SharedFunctionalGroupsSequence")
            item = _seq_item(shared, "PlanePositionSequence") if shared is not None else None
            pos = _ds_floats(_get(item, "ImagePositionPatient")) if item is not None else None
        positions.append(pos if pos is not None and len(pos) == 3 else None)
    if not positions or all(p is None for p in positions):
        return None
    return positions


def _unique(uids: Iterable[Any]) -> list[str]:
    out: list[str] = []
    for u in uids:
        s = _ds_text(u)
        if s and s not in out:
            out.append(s)
    return out


def _referenced_series(ds: Any, kind: str) -> list[str]:
    if kind == "seg":
        return _unique(item.get("SeriesInstanceUID") for item in (_get(ds, "ReferencedSeriesSequence") or []))
    uids = []
    for ref_for in _get(ds, "ReferencedFrameOfReferenceSequence") or []:
        for study in _get(ref_for, "RTReferencedStudySequence") or []:
            for series in _get(study, "RTReferencedSeriesSequence") or []:
                uids.append(_get(series, "SeriesInstanceUID"))
    return _unique(uids)


def _rtstruct_frame_of_reference(ds: Any) -> str | None:
    for ref_for in _get(ds, "ReferencedFrameOfReferenceSequence") or []:
        uid = _ds_text(_get(ref_for, "FrameOfReferenceUID"))
        if uid:
            return uid
    for roi in _get(ds, "StructureSetROISequence") or []:
        uid = _ds_text(_get(roi, "ReferencedFrameOfReferenceUID"))
        if uid:
            return uid
    return None


# --------------------------------------------------------------------------------------------------
# Record assembly
# --------------------------------------------------------------------------------------------------
def _iso_date(s: str | None) -> str | None:
    if not s:
        return None
    digits = s.strip().replace(".", "").replace("-", "")
    if len(digits) != 8 or not digits.isdigit():
        return None
    try:
        return _dt.date(int(digits[:4]), int(digits[4:6]), int(digits[6:])).isoformat()
    except ValueError:
        return None


def _photometric(value: str | None) -> str | None:
    """PhotometricInterpretation upper-cased without padding (``'RGB'``, ``'MONOCHROME2'``), or None."""
    text = (value or "").strip(" \x00").upper()
    return text or None


def _vec(v: list[float] | None, n: int) -> list[float] | None:
    return v if v is not None and len(v) == n else None


def _missing(keyword: str, what: str) -> _Quarantine:
    name = _TAG_NAMES.get(keyword, keyword)
    tag = _TAG_TEXT.get(keyword, "")
    return _Quarantine("missing_tag", f"{what} has no {name} {tag}".rstrip())


def _check_pixels(values: dict[str, Any], pixel: _Pixel | None, ts: str | None, kind: str, cls: str) -> None:
    """Quarantine images/SEGs whose pixel data is missing, short or undecodable. Never decodes."""
    what = f"{cls} object" if kind == "image" else f"{kind.upper()} object"
    if pixel is None:
        raise _Quarantine("missing_tag", f"{what} has no Pixel Data (7FE0,0010)")
    for kw in ("Rows", "Columns"):
        if not values.get(kw):
            raise _missing(kw, what)
    ts = ts or _TS_IMPLICIT_LE
    if pixel.length is None:  # encapsulated
        if ts in _NATIVE_TS:
            raise _Quarantine(
                "unreadable", f"Pixel Data is encapsulated but the transfer syntax {_uid_name(ts)} is native"
            )
        frames = max(values.get("NumberOfFrames") or 1, 1)
        if pixel.fragments < 1:
            raise _Quarantine("truncated", "encapsulated Pixel Data (7FE0,0010) holds no fragments")
        if pixel.fragments < frames:
            raise _Quarantine(
                "truncated",
                f"encapsulated Pixel Data (7FE0,0010) holds {pixel.fragments} fragments for {frames} frames",
            )
        problem = _decoder_problem(ts)
        if problem:
            raise _Quarantine("undecodable_pixels", problem)
        return
    if ts not in _NATIVE_TS:
        problem = _decoder_problem(ts)
        if problem:
            raise _Quarantine("undecodable_pixels", problem)
        raise _Quarantine(
            "unreadable",
            f"Pixel Data (7FE0,0010) is not encapsulated but the transfer syntax {_uid_name(ts)} is compressed",
        )
    bits = values.get("BitsAllocated")
    if not bits:
        bits = {0x7FE00008: 32, 0x7FE00009: 64}.get(pixel.tag)
    if not bits:
        raise _missing("BitsAllocated", what)
    rows, cols = values["Rows"], values["Columns"]
    frames = max(values.get("NumberOfFrames") or 1, 1)
    spp = values.get("SamplesPerPixel") or 1
    if (values.get("PhotometricInterpretation") or "").upper() == "YBR_FULL_422":
        spp = 2  # 4:2:2 subsampled: two samples per pixel on average
    n_bits = rows * cols * frames * spp * bits
    expected = (n_bits + 7) // 8
    if pixel.length < expected:
        raise _Quarantine(
            "truncated",
            f"{_PIXEL_TAGS[pixel.tag]} {_tag_str(pixel.tag)} holds {pixel.length:,} bytes but "
            f"{rows}x{cols} pixels x {frames} frame(s) x {spp} sample(s) x {bits} bits need {expected:,}",
        )


def _build(
    path: str,
    size: int,
    mtime_ns: int,
    values: dict[str, Any],
    pixel: _Pixel | None,
    ts: str | None,
    meta_sop_class: str | None,
    secret: str | None,
    load_ds: Callable[[], Any] | None,
    ds: Any = None,
    functional_groups: bool = False,
) -> dict:
    """Classify the object, run the quarantine checks and assemble the catalog record."""
    # before anything quotes or stores them: UIDs and coded tags must match their VR
    _check_coded({**values, "TransferSyntaxUID": ts, "MediaStorageSOPClassUID": meta_sop_class})
    sop_class = values.get("SOPClassUID")
    if not sop_class:
        if meta_sop_class and classify_sop_class(meta_sop_class) is None:
            raise _Quarantine(
                "unsupported_sop_class",
                f"unsupported SOP class {_uid_name(meta_sop_class)} ({meta_sop_class}) "
                "in the file meta; the data set has no SOP Class UID",
            )
        raise _missing("SOPClassUID", "data set")
    kind = classify_sop_class(sop_class)
    cls = _uid_name(sop_class)
    if kind is None:
        raise _Quarantine(
            "unsupported_sop_class",
            f"unsupported SOP class {cls} ({sop_class}): only images, SEG and RTSTRUCT are used",
        )
    what = cls if cls != sop_class else f"{kind} object"
    for kw in ("SOPInstanceUID", "SeriesInstanceUID"):
        if not values.get(kw):
            raise _missing(kw, what)
    if kind in ("image", "seg"):
        _check_pixels(values, pixel, ts, kind, what)

    frame_positions = None
    referenced = None
    frame_of_reference = values.get("FrameOfReferenceUID")
    needs_ds = kind in ("seg", "rtstruct") or functional_groups
    if needs_ds and ds is None and load_ds is not None:
        ds = load_ds()
    if ds is not None and kind in ("image", "seg"):
        frame_positions = _multiframe_geometry(ds, values)
    if ds is not None and kind in ("seg", "rtstruct"):
        referenced = _referenced_series(ds, kind)
    elif kind in ("seg", "rtstruct"):
        referenced = []
    if kind == "rtstruct" and not frame_of_reference and ds is not None:
        frame_of_reference = _rtstruct_frame_of_reference(ds)
    _check_coded({"ReferencedSeriesInstanceUIDs": referenced or None, "FrameOfReferenceUID": frame_of_reference})

    if kind == "rtstruct":
        n_frames = 0
    else:
        n_frames = values.get("NumberOfFrames")
        n_frames = n_frames if n_frames and n_frames > 0 else 1
    image_position = _vec(values.get("ImagePositionPatient"), 3)
    if frame_positions:
        image_position = frame_positions[0]
    spacing = _vec(values.get("PixelSpacing"), 2)
    thickness = values.get("SliceThickness")
    record = {
        "path": path,
        "size": size,
        "mtime_ns": mtime_ns,
        "kind": kind,
        "sop_instance_uid": values.get("SOPInstanceUID"),
        "sop_class_uid": sop_class,
        "series_instance_uid": values.get("SeriesInstanceUID"),
        "study_instance_uid": values.get("StudyInstanceUID"),
        "frame_of_reference_uid": frame_of_reference,
        "modality": values.get("Modality"),
        "transfer_syntax_uid": ts,
        "patient_key": patient_key(values.get("PatientID"), secret),
        "study_date": _iso_date(values.get("StudyDate")),
        "series_number": values.get("SeriesNumber"),
        "instance_number": values.get("InstanceNumber"),
        "series_description": values.get("SeriesDescription"),
        "body_part": values.get("BodyPartExamined"),
        "rows": values.get("Rows") if kind != "rtstruct" else None,
        "columns": values.get("Columns") if kind != "rtstruct" else None,
        "number_of_frames": n_frames,
        "image_position": image_position if kind != "rtstruct" else None,
        "image_orientation": _vec(values.get("ImageOrientationPatient"), 6) if kind != "rtstruct" else None,
        "pixel_spacing": spacing if kind != "rtstruct" else None,
        "slice_thickness": thickness[0] if thickness and kind != "rtstruct" else None,
        "frame_positions": frame_positions,
        "referenced_series_uids": referenced,
        # SamplesPerPixel is type 1 for pixel objects; a missing one means 1, as _check_pixels reads it
        "samples_per_pixel": (values.get("SamplesPerPixel") or 1) if kind != "rtstruct" else None,
        "photometric_interpretation": _photometric(values.get("PhotometricInterpretation"))
        if kind != "rtstruct" else None,
    }
    return record  # same keys, same order as records.FILE_FIELDS (checked by the tests)


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------
def _dcmread(fp: Any, **kwargs: Any) -> Any:
    """pydicom's reader on the already-open (unbuffered) file, through a buffer of its own."""
    import pydicom

    fp.seek(0)
    if not isinstance(fp, io.RawIOBase):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pydicom.dcmread(fp, **kwargs)
    buffered = io.BufferedReader(fp, buffer_size=65536)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pydicom.dcmread(buffered, **kwargs)
    finally:
        buffered.detach()  # the caller's ``with open(...)`` closes the raw file


def _may_be_raw_dicom(first: bytes) -> bool:
    """Cheap pre-check for files without preamble: a raw data set starts with a group 0000-0008 tag."""
    if len(first) < 8:
        return False
    return int.from_bytes(first[:2], "little") in (0, 2, 4, 8) or int.from_bytes(first[:2], "big") in (
        0, 2, 4, 8,
    )  # fmt: skip


def _plausible(ds: Any) -> bool:
    """Is a dataset parsed from a file without preamble real DICOM (not text or another format)?"""
    from pydicom.datadict import DicomDictionary

    try:
        tags = list(ds.keys())
    except Exception:  # noqa: BLE001
        return False
    public = [t for t in tags if not (t >> 16) & 1]
    known = sum(1 for t in public if t in DicomDictionary or (t & 0xFFFF) == 0)
    return len(tags) >= 3 and known >= 3 and known * 2 >= len(tags)


def _pydicom_pixel(ds: Any) -> _Pixel | None:
    """Pixel data location from pydicom's (raw, possibly deferred) element."""
    for tag in (0x7FE00010, 0x7FE00008, 0x7FE00009):
        if tag not in ds:
            continue
        elem = ds.get_item(tag)
        length = getattr(elem, "length", None)
        if length is None:
            value = getattr(elem, "value", None)
            length = len(value) if isinstance(value, (bytes, bytearray)) else None
        undefined = length == _UNDEFINED or bool(getattr(ds, "_pixel_encapsulated", False))
        if undefined or length is None:
            return _Pixel(tag, None, None, fragments=1 << 30)  # pydicom read it to its delimiter
        return _Pixel(tag, getattr(elem, "value_tell", None), length)
    return None


def _read(path: str, size: int, mtime_ns: int, secret: str | None) -> dict:
    with open(path, "rb", buffering=0) as fp:
        real_size = os.fstat(fp.fileno()).st_size
        if real_size == 0:
            raise _Quarantine("empty_file", "file is empty (0 bytes)")
        first = fp.read(_CHUNK)
        rd = _Reader(fp, real_size, first)
        if first[128:132] == b"DICM":
            try:
                return _read_with_preamble(fp, rd, path, size, mtime_ns, secret)
            except _ScanError as exc:
                logger.debug("%s: scanner gave up (%s); reading with pydicom", path, exc)
                return _read_with_pydicom(fp, rd, path, size, mtime_ns, secret, preamble=True)
        if not _may_be_raw_dicom(first):
            raise _Quarantine(
                "not_dicom",
                "not a DICOM file: no 'DICM' preamble and it does not start like a DICOM data set",
            )
        return _read_with_pydicom(fp, rd, path, size, mtime_ns, secret, preamble=False)


def _read_with_preamble(fp: Any, rd: _Reader, path: str, size: int, mtime_ns: int, secret: str | None) -> dict:
    off, meta = _scan_meta(rd)
    ts = meta.get("TransferSyntaxUID")
    if ts is None or ts == _TS_DEFLATED:
        raise _ScanError(f"transfer syntax {ts!r} is not scanned")
    implicit = ts == _TS_IMPLICIT_LE
    little = ts != _TS_EXPLICIT_BE
    if not implicit and little and _looks_implicit(rd, off):
        implicit = True
    if off >= rd.size:
        raise _Quarantine("truncated", f"file ends ({rd.size:,} bytes) after its file meta information: no data set")
    scan = _scan_dataset(rd, off, implicit, little)
    values = _decode_raw(scan)

    def load() -> Any:
        return _dcmread(fp, stop_before_pixels=True, force=True)

    return _build(
        path, size, mtime_ns, values, scan.pixel, ts, meta.get("MediaStorageSOPClassUID"), secret, load,
        functional_groups=scan.functional_groups,
    )


def _read_with_pydicom(
    fp: Any, rd: _Reader, path: str, size: int, mtime_ns: int, secret: str | None, preamble: bool
) -> dict:
    from pydicom.errors import InvalidDicomError

    try:
        ds = _dcmread(fp, force=True, defer_size=4096)
    except InvalidDicomError as exc:
        raise _Quarantine("not_dicom", f"not a DICOM file: {error_text(exc)}") from exc
    except EOFError as exc:
        raise _Quarantine("truncated", f"file ends inside its header: {error_text(exc)}") from exc
    if not preamble and not _plausible(ds):
        raise _Quarantine(
            "not_dicom",
            "not a DICOM file: no 'DICM' preamble and the bytes do not parse as a DICOM data set",
        )
    if len(ds) == 0:
        raise _Quarantine("truncated", "file ends before its data set starts")
    file_meta = getattr(ds, "file_meta", None)
    ts = None
    meta_sop = None
    if file_meta is not None:
        ts = _ds_text(_get(file_meta, "TransferSyntaxUID"))
        meta_sop = _ds_text(_get(file_meta, "MediaStorageSOPClassUID"))
    implicit, little = getattr(ds, "original_encoding", (None, None))
    if implicit is None:
        implicit, little = ds.is_implicit_VR, ds.is_little_endian
    if ts is None:  # raw data set: name the syntax pydicom found
        ts = _TS_IMPLICIT_LE if implicit else (_TS_EXPLICIT_LE if little else _TS_EXPLICIT_BE)
    pixel = _pydicom_pixel(ds)
    if not preamble and ts != _TS_DEFLATED:
        # Structural check of the raw data set (truncation), same scanner as the fast path.
        try:
            start = _scan_meta(rd, 0)[0] if rd.get(0, 2, "first tag") == b"\x02\x00" else 0
            scan = _scan_dataset(rd, start, bool(implicit), bool(little))
            pixel = scan.pixel
        except _ScanError:
            pass
    elif pixel is not None and pixel.offset is not None and pixel.length is not None and ts != _TS_DEFLATED:
        if pixel.offset + pixel.length > rd.size:
            raise _Quarantine(
                "truncated",
                f"file is {rd.size:,} bytes but its {_elem_name(pixel.tag)} needs {pixel.length:,} bytes "
                f"from offset {pixel.offset:,} (ends at {pixel.offset + pixel.length:,})",
            )
    values = _values_from_ds(ds)
    return _build(path, size, mtime_ns, values, pixel, ts, meta_sop, secret, None, ds=ds, functional_groups=True)


def _os_error_message(path: str, exc: OSError) -> str:
    """A sentence for an error opening or reading ``path``."""
    if exc.errno == errno.ELOOP:
        return "symlink loop: the link resolves to itself (too many levels of symbolic links)"
    if isinstance(exc, FileNotFoundError):
        if os.path.islink(path):  # the target is a value read from the link: not quoted (it may name a patient)
            return "broken symlink: its target does not exist"
        return "file disappeared before it could be read"
    if isinstance(exc, IsADirectoryError):
        return "is a directory, not a file"
    if isinstance(exc, PermissionError):
        return f"permission denied: {exc.strerror or exc}"
    return f"cannot open or read the file: {type(exc).__name__}: {exc.strerror or exc}"


def read_file_record(
    path: str, size: int, mtime_ns: int, secret: str | None = None
) -> tuple[dict | None, dict | None]:
    """Read one file's header into a catalog record, or a quarantine record saying why not.

    Parameters
    ----------
    path
        Absolute path of the file (stored as given, not symlink-resolved).
    size, mtime_ns
        ``st_size`` and ``st_mtime_ns`` as the crawl saw them (stored in the record; used to detect
        changes on the next crawl).
    secret
        Pseudonymisation secret for the patient key (see :func:`~imaging_assets.dicom.pseudonym.
        pseudonym_secret`); the crawl resolves it once and passes it explicitly.

    Returns
    -------
    tuple
        ``(file_record, None)`` for a usable image, SEG or RTSTRUCT (keys of
        :data:`~imaging_assets.dicom.records.FILE_FIELDS`), otherwise ``(None, quarantine_record)``
        (keys of :data:`~imaging_assets.dicom.records.QUARANTINE_FIELDS`). Never raises.
    """
    path = str(path)
    if not os.path.isabs(path):
        path = os.path.abspath(path)
    try:
        if size == 0:
            raise _Quarantine("empty_file", "file is empty (0 bytes)")
        record = _read(path, size, mtime_ns, secret)
        return record, None
    except _Quarantine as q:
        return None, quarantine_record(path, size, mtime_ns, q.reason, q.message)
    except OSError as exc:
        return None, quarantine_record(path, size, mtime_ns, "unreadable", _os_error_message(path, exc))
    except Exception as exc:  # noqa: BLE001 - RecursionError, MemoryError, pydicom errors, bugs
        # the exception's text may quote a header value (pydicom's "invalid value 'SMITH^JOHN' for VR ...");
        # the stored message names the kind of error only, the text goes to the debug log
        logger.debug("unreadable %s", path, exc_info=True)
        return None, quarantine_record(path, size, mtime_ns, "unreadable",
                                       f"the header cannot be parsed ({type(exc).__name__}; details not stored, "
                                       "they may quote a value)")

