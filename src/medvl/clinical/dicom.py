"""DICOM input: one file to pixels and safe metadata; a folder to series; a series to a 3D volume.

``read_dicom(path, window=None)`` returns ``(array, meta)``:

- grayscale: ``HxW`` ``float32`` modality values: stored values through Rescale Slope/Intercept or
  the Modality LUT (Hounsfield units for CT). With ``window`` (a preset name from
  ``medvl.clinical.windowing``, ``(center, width)`` or ``"file"`` for the header's own VOI LUT /
  first Window Center/Width) the values are mapped to display intensities in ``[0, 1]``.
  Pixels holding the Pixel Padding Value (or within the Pixel Padding Range Limit: a CT's area outside its field
  of view, not image data) take the image's darkest displayed value, so they never stretch min-max scaling.
  MONOCHROME1 images (where the lowest value is displayed white) are inverted so that, as in
  MONOCHROME2, higher means brighter: ``1 - v`` when windowed, ``min + max - v`` otherwise (the
  image's own min / max; a series stacked by ``load_volume`` uses the whole series' min / max, so
  one stored value gives one value on every slice);
- colour: ``HxWx3`` RGB in the stored bit depth (YBR converted to RGB, palette colour expanded);
- multi-frame: ``frames x H x W`` (``frames x H x W x 3`` for colour). An enhanced multi-frame file's
  Rescale Slope/Intercept and window are taken frame by frame (the frame's own Per-Frame Functional
  Group, else the shared one), so frames stored with different rescales get their own.

``meta`` holds acquisition facts only (modality, SOP class, transfer syntax, photometric
interpretation, pixel spacing in mm, slice thickness, study / series / instance UIDs, series and
instance numbers, image position and orientation, rescale, the window used, view position,
laterality, body part). It never holds patient names, IDs, birth data, dates or times, or free
text: build it with ``safe_meta`` only.

``read_dicom_series(folder)`` groups the DICOM files under a folder into ``DicomSeries`` (one per
study + series UID); ``load_volume(series)`` stacks a CT/MR series into a ``DxHxW`` ``float32``
volume, slices sorted by Image Position (Patient) projected on the slice normal (the cross product
of the Image Orientation row and column directions), then reoriented from DICOM's patient axes
(LPS) to the closest canonical RAS orientation, the layout ``read_nifti`` gives a NIfTI file: axis
0 inferior -> superior, axis 1 posterior -> anterior, axis 2 the patient's left -> right, whatever
the acquisition plane (``to_ras``; an axial series stored the usual way, rows anterior -> posterior
and columns right -> left, has its rows and columns reversed). The spacing in mm is along those
axes, from the positions (slice step) and Pixel Spacing. A model trained on NIfTI volumes and one
given DICOM series of the same patients see them the same way round.

Every failure is a ``DataError`` naming the file: not DICOM, truncated or corrupt (any element pydicom cannot
convert, checked when the file is parsed: ``check_elements``), no pixel data
(a structured report, RT plan, DICOMDIR...), a compressed transfer syntax whose decoder is not
installed (with the extra to install), an image size element holding several values (``_check_one_value``),
pixel data over ``MAX_DECODED_BYTES``, a Rescale Slope /
Intercept that is not a finite number (``_rescale_number``) and PALETTE COLOR without its lookup tables
(``_check_palette``).
"""

from __future__ import annotations

import logging
import math
import struct
import warnings
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from ..errors import DataError
from .formats import DICOM_SUFFIXES, INSTALL_HINT, has_dicom_preamble
from .windowing import Window, WindowSpec, apply_window, get_window

log = logging.getLogger(__name__)
T = TypeVar("T")

FILE_WINDOW = "file"  # use the window or VOI LUT stored in the DICOM header
MAX_DECODED_BYTES = 1 << 30  # decoded pixel data above this (1 GiB) is refused before decoding
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)  # the same, as tags
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"  # DICOMDIR
# Implicit / Explicit VR Little Endian, Explicit VR Big Endian, Deflated: pixel data not encapsulated
DEFLATED = "1.2.840.10008.1.2.1.99"
UNDEFINED_LENGTH = 0xFFFFFFFF
SAME_ORIENTATION_ATOL = 1e-3  # direction cosines this close: slices share one plane orientation
# Image Orientation (Patient)'s row and column direction cosines are unit vectors at right angles (PS3.3
# C.7.6.2.1.1: each one's dot product with itself unity, theirs zero); within this (lengths, cosine of the angle
# between them: values rounded by the writer) they are normalised, beyond it refused
UNIT_ORIENTATION_TOL = 1e-3
# pixel spacings this close (relative): one pixel grid (writers round the DS values differently)
SAME_SPACING_RTOL = 1e-3
MIN_SLICE_GAP_MM = 1e-4  # slices closer than this along the normal share a position
MISSING_SLICE_STEPS = 1.5  # a gap this many slice steps (the median gap) wide or wider: a slice is missing there
# a gap within this share of the smallest gap of 2, 3, ... smallest gaps: slices are missing there, however many such
# gaps there are (half the gaps missing would make the median gap a wrong step for every slice)
WHOLE_STEPS_RTOL = 0.1
WHOLE_STEP_MIN_SHARE = 0.25  # the smallest gap is a step the others may be whole multiples of only from a quarter of
# the median gap (missing every other slice makes the median 1.5 to 2 steps)
# a slice centre more than this many pixels (of the finer Pixel Spacing) off the line the others' centres follow: a
# slice of another field of view or table position, not one volume (``off_axis_slice``)
OFF_AXIS_PIXELS = 0.5
# type 1 in every composite object (Modality is left out: some secondary captures lack it)
REQUIRED_KEYWORDS = ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
# of those, the ones de-identification gives a whole object that lacks them (it replaces every UID anyway)
GIVEN_UID_KEYWORDS = ("StudyInstanceUID", "SeriesInstanceUID")
NATIVE_SYNTAXES = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99")
# (zlib.error: a Deflated Explicit VR Little Endian file whose deflate stream is corrupt)
_READ_ERRORS = (EOFError, OSError, ValueError, KeyError, IndexError, TypeError, AttributeError,
                NotImplementedError, RuntimeError, struct.error, OverflowError, zlib.error)
# value representations of fixed-size binary numbers and their sizes: a value whose length is not a multiple fails
# to convert (pydicom's BytesLengthException); the other VRs pydicom knows convert any bytes (``check_elements``)
_FIXED_SIZES = {"FD": 8, "FL": 4, "SL": 4, "SS": 2, "SV": 8, "UL": 4, "US": 2, "UV": 8}
# converted in full by ``check_elements``: a sequence's items are parsed, an IS value can overflow, UN may be read
# as the dictionary's VR; (implicit VR elements, whose VR is None, are too)
_CONVERTED_VRS = frozenset({"SQ", "IS", "UN"})
# pydicom decoder plugins that raise a Python error on corrupt data, in the order tried (``decoding_plugins``).
# Pillow first: its libjpeg-turbo gives the values GDCM gave, bit for bit, on every pydicom / pydicom-data test
# file, where pylibjpeg's libjpeg differs by up to 5 levels on lossy colour JPEG. python-gdcm is left out on
# purpose: it can abort the process on corrupt data
DECODER_ORDER = ("pillow", "pylibjpeg", "pydicom", "pyjpegls")
_PLUGINS_FAILED = "Unable to decode as exceptions were raised by all available plugins:"  # pydicom's message
# the image size elements, each one value (VM 1): checked before decoding (``_check_size``)
_SIZE_KEYWORDS = ("Rows", "Columns", "NumberOfFrames", "SamplesPerPixel", "BitsAllocated", "BitsStored")


# ------------------------------------------------------------------------------------ reading


def _require_pydicom(path: Path):
    try:
        import pydicom
    except ImportError:
        raise DataError(path, f"reading DICOM needs pydicom: {INSTALL_HINT}") from None
    return pydicom


def _drop_value_quoting(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.CRITICAL


def _keep_pydicom_quiet() -> None:
    """For good, from the import of this module: pydicom's log records below CRITICAL and the warnings raised in its
    modules are dropped (``quiet_pydicom`` still collects the latter for its callers). pydicom complains about a
    malformed element by quoting its value (``Invalid value for VR IS: 'SMITH2'``: patient data) wherever a value is
    converted, also outside ``quiet_pydicom`` (the service's size check of an upload reads Rows / Number of Frames),
    and ``quiet_pydicom``'s own switches (the logger's level, ``warnings.catch_warnings``) are process-wide, not
    per thread: under concurrent requests one thread's exit could restore the defaults while another converts."""
    pydicom_log = logging.getLogger("pydicom")
    if _drop_value_quoting not in pydicom_log.filters:
        pydicom_log.addFilter(_drop_value_quoting)
    warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")


_keep_pydicom_quiet()


@contextmanager
def quiet_pydicom(path: str | Path | None = None) -> Iterator[list[str]]:
    """Keep pydicom's complaints about malformed elements out of warnings and logs (they may quote
    element values, i.e. patient data) and yield their texts, for callers that act on them.

    pydicom both warns and logs (logger ``pydicom``) and converts values lazily, so every public
    function here runs under this, not only the parsing."""
    import pydicom.config  # noqa: F401 -- imported first: its import sets the logger's level (to WARNING)

    texts: list[str] = []
    pydicom_log = logging.getLogger("pydicom")
    level = pydicom_log.level
    pydicom_log.setLevel(logging.CRITICAL)  # decoder failures come back as DataError instead
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield texts
            texts.extend(str(w.message) for w in caught)
    finally:
        pydicom_log.setLevel(level)
    if texts:
        log.debug("%s: %d pydicom warning(s) (not shown: they may quote values)", path, len(texts))


def _not_dicom_reason(head: bytes) -> str:
    if head.startswith(b"\x1f\x8b"):
        return "not a DICOM file: gzip-compressed (decompress it first)"
    return "not a DICOM file (no 'DICM' marker at byte 128 and no DICOM header at the start)"


def looks_like_raw_dataset(head: bytes) -> bool:
    """A DICOM dataset written without preamble / file meta starts with group 0x0002 or 0x0008."""
    return head[:2] in (b"\x02\x00", b"\x08\x00", b"\x00\x02", b"\x00\x08")


def read_dataset(path: str | Path, header_only: bool = False):
    """Parse a DICOM file with pydicom (``header_only``: stop before the pixel data)."""
    return _parse(Path(path), header_only)[0]


def read_header(path: str | Path) -> tuple[Any, bool]:
    """The header of a DICOM file (parsed up to its pixel data, not reading it) and whether a pixel
    data element follows it (the file was not cut before its pixels)."""
    return _parse(Path(path), header_only=True)


def _parse(path: Path, header_only: bool) -> tuple[Any, bool]:
    pydicom = _require_pydicom(path)
    if not path.is_file():
        raise DataError(path, "file not found" if not path.exists() else "is a folder, not a DICOM file")
    with open(path, "rb") as stream:
        head = stream.read(132)
    if not head:
        raise DataError(path, "empty file (0 bytes)")
    has_marker = len(head) == 132 and head[128:] == b"DICM"
    if not has_marker and not looks_like_raw_dataset(head):
        raise DataError(path, _not_dicom_reason(head))
    # pixel data's tag, value offset, length and VR, where parsing stopped
    reached: list[tuple[int, int, int, str | None]] = []

    def at_pixels(tag, vr, length) -> bool:
        if header_only and tag in PIXEL_TAGS:
            reached.append((int(tag), source.tell(), length, vr))  # pydicom calls this with the file at the value
            return True
        return False

    try:
        with quiet_pydicom(path) as warned, open(path, "rb") as source:
            ds = pydicom.filereader.read_partial(source, at_pixels, force=not has_marker)
    except pydicom.errors.InvalidDicomError as error:
        raise DataError(path, f"not a readable DICOM file ({_short(error)})") from None
    except pydicom.errors.BytesLengthException:  # its message quotes the element's bytes
        raise DataError(path, "truncated or corrupt DICOM file (an element's length does not fit its VR)") from None
    except zlib.error as error:  # a Deflated transfer syntax's data set is inflated as a whole when parsed
        raise DataError(path, f"truncated or corrupt DICOM file (the deflated data set does not inflate: "
                              f"{_short(error)})") from None
    except _READ_ERRORS as error:
        raise DataError(path, f"truncated or corrupt DICOM file ({type(error).__name__}: {_short(error)})") from None
    if any("end of file" in text.lower() for text in warned):
        raise DataError(path, "truncated DICOM file: the file ends inside an element")
    with quiet_pydicom(path):  # converting the values warns of malformed ones, quoting them
        check_elements(path, ds)
    check_value_lengths(path, ds)
    if not header_only:
        _check_native_length(path, ds)
    elif reached:
        _check_pixels_in_file(path, ds, *reached[0])
    return ds, bool(reached) or any(keyword in ds for keyword in PIXEL_KEYWORDS)


def _check_pixels_in_file(path: Path, ds, tag: int, offset: int, length: int, vr: str | None) -> None:
    """Refuse a file that ends before the pixel data it declares, or whose pixel data has a VR pydicom does not
    know, without reading the pixels (a header read stops at them): what ``check_value_lengths`` and
    ``check_elements`` find when the whole file is read. Encapsulated pixel data (no declared length) is checked
    when decoded."""
    check_pixel_vr(path, tag, vr)
    if length == UNDEFINED_LENGTH or transfer_syntax(ds) == DEFLATED:  # deflated: offsets are in the inflated stream
        return
    present = max(0, path.stat().st_size - offset)
    if present < length:
        raise DataError(path, f"truncated DICOM file: element ({tag >> 16:04X},{tag & 0xFFFF:04X}) has {present:,} of "
                              f"its {length:,} bytes")


def check_value_lengths(path: str | Path, ds) -> None:
    """Refuse a data set whose top-level values are shorter than their declared lengths: pydicom
    reads a value cut by the end of the file without complaint (``rtplan_truncated.dcm``)."""
    from pydicom.dataelem import RawDataElement

    for key in list(ds.keys()):
        element = ds.get_item(key, keep_deferred=True)  # elements() would convert an empty value, which can fail
        if (isinstance(element, RawDataElement) and element.value is not None and element.length != UNDEFINED_LENGTH
                and len(element.value) < element.length):
            raise DataError(path, f"truncated DICOM file: element ({element.tag.group:04X},{element.tag.element:04X}) "
                                  f"has {len(element.value):,} of its {element.length:,} bytes")


def check_elements(path: str | Path, ds) -> None:
    """Refuse a data set (or its file meta) holding an element that pydicom cannot convert: an unknown
    value representation (``NotImplementedError``), a length that does not fit its VR, a sequence item that
    cannot be parsed. pydicom converts each element on its first access, so without this such an element
    fails wherever it is read first (a header check, de-identification, the pixel decoder). The elements
    are checked apart and dropped: the data set keeps its raw elements (``check_file_end`` reads them).
    The error's own message is not quoted (it may quote the value).

    An element whose explicit VR converts any bytes of a fitting length (``_FIXED_SIZES``) is checked without
    converting it, which would take most of a header read's time; the rest (``_CONVERTED_VRS``, implicit VR) are
    converted. tests/test_clinical.py checks that the two ways give the same answer."""
    from pydicom.dataelem import RawDataElement

    for dataset in (getattr(ds, "file_meta", None), ds):
        if dataset is None:
            continue
        # the character set first (pydicom converts Specific Character Set on the way): the others are decoded in it
        encoding = _convertible(path, 0x00080005, _character_set, dataset)
        for key in list(dataset.keys()):
            element, tag = dataset.get_item(key, keep_deferred=True), int(key)  # elements() converts an empty value
            if isinstance(element, RawDataElement) and tag in PIXEL_TAGS:
                check_pixel_vr(path, tag, element.VR)  # not converted: that would copy the pixels
            elif isinstance(element, RawDataElement):
                private = bool(tag >> 16 & 1)
                if _fits_unconverted(element, private):
                    continue
                convert = _convert_private if private else _convert
                _convertible(path, tag, convert, element, None if tag == 0x00080005 else encoding, dataset)


def check_pixel_vr(path: str | Path, tag: int, vr: str | None) -> None:
    """Refuse pixel data whose explicit VR pydicom does not know (every later read of it would fail), without
    converting it; ``None``: implicit VR."""
    from pydicom.values import converters

    if vr is not None and vr not in converters:
        raise DataError(path, f"truncated or corrupt DICOM file (unknown value representation in {_tag(tag)})")


def _fits_unconverted(element, private: bool) -> bool:
    """Whether ``element`` (raw) is known to convert, without converting it; False also when only converting tells
    (``check_elements`` then converts it, and reports a failure)."""
    from pydicom.values import converters

    vr = element.VR
    if vr is None or vr in _CONVERTED_VRS or vr not in converters or element.value is None:
        return False
    size = _FIXED_SIZES.get(vr)
    return size is None or private or len(element.value) % size == 0


def _character_set(dataset):
    return getattr(dataset, "original_character_set", None) or dataset._character_set


def _convert(element, encoding, dataset) -> None:
    from pydicom.dataelem import convert_raw_data_element

    converted = convert_raw_data_element(element, encoding=encoding, ds=dataset)
    if converted.VR == "SQ":
        for item in converted.value:
            item.walk(lambda _dataset, _element: None)  # converts the items' elements, nested too


def _convert_private(element, encoding, dataset) -> None:
    """``_convert`` for a private element, whose value's length may not fit the VR pydicom's private dictionary
    gives it (a vendor writing text where the dictionary says a number: Elscint / Philips CT's (01F1,1026)
    "Pitch"): no reader of medvl reads private elements, and de-identification removes them; so that mismatch
    does not make the file corrupt (an unknown VR still does)."""
    from pydicom.errors import BytesLengthException

    try:
        _convert(element, encoding, dataset)
    except BytesLengthException:
        pass


def drop_unconvertible_private(ds) -> int:
    """Delete the data set's private elements whose value does not fit the VR pydicom's private dictionary gives
    them (``_convert_private``), which every later full read (``check_complete``, de-identification) would trip
    on; how many went. For de-identification, which removes every private element anyway."""
    from pydicom.dataelem import RawDataElement
    from pydicom.errors import BytesLengthException

    dropped = 0
    for key in list(ds.keys()):
        element, tag = ds.get_item(key, keep_deferred=True), int(key)
        if tag >> 16 & 1 and isinstance(element, RawDataElement):
            try:
                _convert(element, None, ds)
            except BytesLengthException:
                del ds[key]
                dropped += 1
    return dropped


def _convertible(path: str | Path, tag: int, convert: Callable[..., T], *args) -> T:
    """``convert(*args)``, its failure a ``DataError`` naming the file and the element ``tag`` (not quoting pydicom's
    message: it may quote the value)."""
    from pydicom.errors import BytesLengthException

    try:
        return convert(*args)
    except BytesLengthException:
        raise DataError(path, f"truncated or corrupt DICOM file (the length of element {_tag(tag)} does not fit "
                              "its VR)") from None
    except NotImplementedError:
        raise DataError(path, f"truncated or corrupt DICOM file (unknown value representation in "
                              f"{_tag(tag)})") from None
    except _READ_ERRORS as error:
        raise DataError(path, f"truncated or corrupt DICOM file ({type(error).__name__} in element "
                              f"{_tag(tag)})") from None


def _tag(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def check_file_end(path: Path, ds) -> None:
    """Refuse 1 to 7 bytes left after the last element, or a last delimiter cut short: the file was
    cut inside an element header, which pydicom takes for the end of the data set. (Strict: a file
    with a few bytes of junk after its data set is refused too; de-identification uses this, the
    readers do not.)"""
    from pydicom.dataelem import RawDataElement

    elements = list(ds.elements())
    last = elements[-1] if elements else None
    deflated = transfer_syntax(ds) == DEFLATED  # offsets are in the inflated stream
    if not isinstance(last, RawDataElement) or last.value is None or deflated:
        return
    # an undefined-length value (encapsulated pixel data) ends with an 8-byte sequence delimiter
    end = last.value_tell + (len(last.value) + 8 if last.length == UNDEFINED_LENGTH else last.length)
    left = path.stat().st_size - end
    if left < 0 or 0 < left < 8:
        raise DataError(path, "truncated DICOM file: the file ends inside an element header or delimiter")


def check_complete(path: str | Path, ds) -> None:
    """Refuse a parsed data set that a truncated or corrupt file left incomplete, before it is
    rewritten (de-identification would otherwise write a valid-looking file missing its end):

    - a value shorter than its declared length;
    - an element or sequence item that cannot be parsed (every value is parsed here, not lazily);
    - no SOP Class UID (in the data set or the file meta), SOP Instance UID, Study or Series
      Instance UID, which every composite object has (type 1): the file was cut early, when nothing
      follows the missing element's tag (elements are stored in tag order), else the object is not a
      complete one (said so, not called truncated; ``give_missing_uids`` gives a whole object the
      Study and Series UIDs it lacks before de-identification checks it);
    - an image storage object (or one with Rows and Columns) without pixel data: the file was cut
      before its pixels.

    A non-image object (an RT plan, a structured report) cut exactly between two elements still
    passes: nothing in it says what is missing.
    """
    from pydicom.errors import BytesLengthException

    check_value_lengths(path, ds)
    try:
        ds.walk(lambda dataset, element: None)
    except (*_READ_ERRORS, BytesLengthException) as error:
        raise DataError(path, f"truncated or corrupt DICOM file ({type(error).__name__} inside an element or "
                              "sequence)") from None
    meta = getattr(ds, "file_meta", None)
    sop_class = ds.get("SOPClassUID") or (meta.get("MediaStorageSOPClassUID") if meta is not None else None)
    missing = [keyword for keyword in REQUIRED_KEYWORDS if not ds.get(keyword)] + ([] if sop_class else ["SOPClassUID"])
    if any(not _continues_past(ds, keyword) for keyword in missing):
        raise DataError(path, f"incomplete DICOM file: no {', '.join(missing)} (truncated, or not a complete "
                              "DICOM object)")
    if missing:
        raise DataError(path, f"not a complete DICOM object: no {', '.join(missing)}, which every composite "
                              "object has (the file is not truncated)")
    if _declares_image(ds, str(sop_class)) and not any(keyword in ds for keyword in PIXEL_KEYWORDS):
        raise DataError(path, "truncated DICOM file: an image object without pixel data")


def _continues_past(ds, keyword: str) -> bool:
    """Whether the data set holds an element after ``keyword``'s tag: then a missing ``keyword`` was never
    in the file (elements are stored in tag order), rather than lost where the file was cut."""
    from pydicom.datadict import tag_for_keyword

    tag = tag_for_keyword(keyword)
    return tag is not None and any(element_tag > tag for element_tag in ds.keys())


def give_missing_uids(ds) -> list[str]:
    """Give a whole object that lacks its Study or Series Instance UID (``GIVEN_UID_KEYWORDS``) a new one, in
    place, before de-identification replaces every UID; returns the keywords given. The new UID derives from
    the SOP Instance UID (the same file gets the same one; nothing links it to other files). A UID missing
    because the file was cut (nothing follows its tag) is left missing, for ``check_complete`` to refuse."""
    from pydicom.uid import generate_uid

    given = [keyword for keyword in GIVEN_UID_KEYWORDS if not ds.get(keyword) and _continues_past(ds, keyword)]
    instance = str(ds.get("SOPInstanceUID") or "")
    for keyword in given:
        setattr(ds, keyword, generate_uid(entropy_srcs=[instance, keyword] if instance else None))
    return given


def check_image_header(path: str | Path, ds, has_pixels: bool) -> None:
    """Refuse a header that a truncated file left: nothing after the file meta, or an image object
    (an image storage SOP class, or Rows and Columns) cut before its Rows / Columns or its pixel data.
    ``has_pixels``: whether a pixel data element follows the header (``read_header``)."""
    if len(ds) == 0:
        raise DataError(path, "truncated DICOM file: nothing after the file meta information")
    meta = getattr(ds, "file_meta", None)
    sop_class = ds.get("SOPClassUID") or (meta.get("MediaStorageSOPClassUID") if meta is not None else None)
    if object_kind(ds).startswith("DICOMDIR") or not _declares_image(ds, str(sop_class or "")):
        return
    kind = object_kind(ds)
    if not ds.get("Rows") or not ds.get("Columns"):
        raise DataError(path, f"truncated DICOM file: a {kind} object without Rows / Columns")
    if not has_pixels:
        raise DataError(path, f"truncated DICOM file: a {kind} object without pixel data")


def _declares_image(ds, sop_class: str) -> bool:
    from pydicom.uid import UID

    return (bool(sop_class) and "Image Storage" in UID(sop_class).name) or ("Rows" in ds and "Columns" in ds)


def _check_native_length(path: Path, ds) -> None:
    """Uncompressed pixel data shorter than Rows x Columns x frames x samples needs: truncated
    (pydicom reads a short final element without complaint)."""
    syntax = transfer_syntax(ds)
    if "PixelData" not in ds or syntax not in NATIVE_SYNTAXES or not ds.get("Rows"):
        return
    try:
        bits = int(ds.BitsAllocated)
        samples = int(ds.get("SamplesPerPixel") or 1)
        if str(ds.get("PhotometricInterpretation", "")).upper() == "YBR_FULL_422":
            samples = 2  # chroma stored at half horizontal resolution: Y Y Cb Cr per two pixels
        pixels = int(ds.Rows) * int(ds.Columns) * _frame_count(ds) * samples
    except (AttributeError, TypeError, ValueError):
        return  # malformed image attributes are reported when decoding
    expected = math.ceil(pixels * bits / 8)
    found = len(ds.PixelData or b"")
    if found < expected:
        raise DataError(path, f"truncated DICOM file: pixel data has {found:,} of the {expected:,} bytes "
                              "the header declares")


def _short(error: BaseException | str, limit: int = 160) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def object_kind(ds) -> str:
    """A readable name for what a DICOM object is (SOP class name, or DICOMDIR)."""
    meta = getattr(ds, "file_meta", None)
    storage = str(meta.get("MediaStorageSOPClassUID", "")) if meta is not None else ""
    if storage == MEDIA_STORAGE_DIRECTORY or "DirectoryRecordSequence" in ds:
        return "DICOMDIR (media directory)"
    sop_class = ds.get("SOPClassUID") or storage
    if sop_class:
        from pydicom.uid import UID

        name = UID(str(sop_class)).name
        return name if name != str(sop_class) else f"SOP class {sop_class}"
    modality = ds.get("Modality")
    return f"{modality} object" if modality else "DICOM object"


def transfer_syntax(ds):
    """The dataset's transfer syntax UID, inferred from its encoding when the file meta lacks one."""
    from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    if meta is not None and meta.get("TransferSyntaxUID"):
        return UID(str(meta.TransferSyntaxUID))
    implicit, little = getattr(ds, "original_encoding", (None, None))
    if implicit is None:
        return None
    if implicit:
        return ImplicitVRLittleEndian
    return ExplicitVRLittleEndian if little else ExplicitVRBigEndian


def _check_decodable(path: Path, ds, syntax) -> None:
    from pydicom.pixels import get_decoder

    if syntax is None:
        raise DataError(path, "no transfer syntax in the file meta and none can be inferred")
    if "PixelData" not in ds:
        return  # float pixel data is always native
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise DataError(path, f"unsupported transfer syntax {syntax.name} ({syntax}): no DICOM decoder "
                              "implements it") from None
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "a decoder plugin"
        raise DataError(path, f"compressed transfer syntax {syntax.name} ({syntax}) needs a decoder that is not "
                              f"installed ({missing}): {INSTALL_HINT} (pylibjpeg, pylibjpeg-libjpeg, "
                              "pylibjpeg-openjpeg, python-gdcm)")


def _check_size(path: Path, ds) -> None:
    for keyword in _SIZE_KEYWORDS:
        _check_one_value(path, ds, keyword)
    rows, columns = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    if rows <= 0 or columns <= 0:
        raise DataError(path, f"pixel data without a valid image size (Rows x Columns = {rows} x {columns})")
    frames = _frame_count(ds)
    samples = int(ds.get("SamplesPerPixel") or 1)
    bits = int(ds.get("BitsAllocated") or 16)
    decoded = rows * columns * frames * samples * max(1, math.ceil(bits / 8))
    if decoded > MAX_DECODED_BYTES:
        raise DataError(path, f"pixel data too large: {frames} frame(s) of {rows} x {columns} x {samples} at "
                              f"{bits} bits = {decoded:,} bytes decoded (limit {MAX_DECODED_BYTES:,})")


def _check_one_value(path: Path, ds, keyword: str) -> None:
    """Refuse an element of value multiplicity 1 holding several values (a US element 4 bytes long reads as two
    numbers), naming it; its values are not quoted."""
    from pydicom.datadict import dictionary_description
    from pydicom.multival import MultiValue

    value = ds.get(keyword)
    if isinstance(value, MultiValue | list | tuple):
        raise DataError(path, f"{dictionary_description(keyword)} must be one value, got {len(value)}")


def frame_count(path: str | Path) -> int:
    """The frames a DICOM file's header declares (Number of Frames; 1 without one), as ``read_dicom`` stacks them;
    the pixels are not read."""
    return _frame_count(read_dataset(path, header_only=True))


def _frame_count(ds) -> int:
    try:
        return max(1, int(ds.get("NumberOfFrames") or 1))
    except (TypeError, ValueError):
        return 1


def decoding_plugins(syntax) -> list[str]:
    """The pydicom decoder plugins ``read_dicom`` tries for a transfer syntax, in order (``[""]``: pydicom's
    own choice, for native pixel data, which no plugin decodes).

    python-gdcm comes last and only when no other installed plugin decodes the syntax: on some corrupt JPEG
    streams it throws a C++ exception that nothing catches and the whole process aborts (SIGABRT), where
    Pillow and pylibjpeg (libjpeg, openjpeg) raise a Python error. With ``medvl[clinical]`` installed, every
    compressed syntax GDCM decodes is decoded by Pillow or pylibjpeg instead, so GDCM is never used."""
    from pydicom.pixels import get_decoder

    available = get_decoder(syntax).available_plugins
    ranked = [name for name in DECODER_ORDER if name in available]
    ranked += sorted(name for name in available if name not in DECODER_ORDER and name != "gdcm")
    return ranked or [name for name in available if name == "gdcm"] or [""]


def _decode(path: Path, ds, syntax) -> np.ndarray:
    from pydicom.pixels import pixel_array

    if getattr(ds, "file_meta", None) is None or not ds.file_meta.get("TransferSyntaxUID"):
        from pydicom.dataset import FileMetaDataset

        ds.file_meta = getattr(ds, "file_meta", None) or FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = syntax
    errors: list[Exception] = []
    for plugin in decoding_plugins(syntax):
        try:
            with quiet_pydicom(path):
                pixels = pixel_array(ds, decoding_plugin=plugin)  # YBR is converted to RGB here
        except _READ_ERRORS as error:
            errors.append(error)  # the next plugin may decode what this one cannot (e.g. 12-bit JPEG Extended)
            continue
        return pixels if pixels.dtype.isnative else pixels.astype(pixels.dtype.newbyteorder("="))
    raise _decode_error(path, syntax, errors)


def _decode_error(path: Path, syntax, errors: list[Exception]) -> DataError:
    """One DataError for the failures of every plugin tried, in order (the same failure once)."""
    error = errors[0]
    text = _short(error)
    if "length" in text.lower() or "expected" in text.lower() or isinstance(error, EOFError):
        return DataError(path, f"pixel data truncated or corrupt ({text})")
    reasons = dict.fromkeys(_decode_reason(failure) for failure in errors)
    return DataError(path, f"could not decode the {syntax.name} pixel data ({'; '.join(reasons)})")


def _decode_reason(error: Exception) -> str:
    text = " ".join(str(error).split())
    if isinstance(error, RuntimeError) and text.startswith(_PLUGINS_FAILED):
        return _short(text.removeprefix(_PLUGINS_FAILED))  # "<plugin>: <its error>"
    return f"{type(error).__name__}: {_short(error)}"


# ------------------------------------------------------------------------ enhanced multi-frame


def functional_value(ds, sequence: str, keyword: str, frame: int = 0) -> Any:
    """``keyword`` from an enhanced multi-frame file's functional groups: the frame's own item of
    ``sequence`` first, then the shared one; ``None`` if neither has it."""
    for groups_keyword in ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence"):
        groups = ds.get(groups_keyword)
        if not groups:
            continue
        index = frame if groups_keyword.startswith("PerFrame") and frame < len(groups) else 0
        items = groups[index].get(sequence)
        if items and keyword in items[0]:
            return items[0].get(keyword)
    return None


def header_value(ds, keyword: str, sequence: str, frame: int = 0) -> Any:
    """A top-level attribute, else its functional-group value (enhanced multi-frame)."""
    value = ds.get(keyword)
    if value is not None and value != "":
        return value
    return functional_value(ds, sequence, keyword, frame)


# --------------------------------------------------------------------------- pixel processing


def _modality_values(path: Path, ds, pixels: np.ndarray) -> tuple[np.ndarray, dict | None]:
    """Stored values -> modality values (float32): Modality LUT, else Rescale Slope/Intercept, the
    latter frame by frame for an enhanced multi-frame file (each frame's own Pixel Value
    Transformation, else the shared one). ``rescale`` meta: ``{"slope", "intercept"}`` numbers, or
    lists with one value per frame when the frames differ. A slope or intercept that is not a finite
    number, or that takes stored values beyond the float32 range, is a ``DataError``: a window would map
    such values to one grey, a blank image nobody asked for."""
    from pydicom.pixels import apply_modality_lut

    if "ModalityLUTSequence" in ds:
        return apply_modality_lut(pixels, ds).astype(np.float32), {"modality_lut": True}
    values = pixels.astype(np.float32)
    rescales = [_rescale(path, ds, frame) for frame in range(_frames_in(ds, pixels))]
    if all(rescale is None for rescale in rescales):
        return values, None
    pairs = [rescale or (1.0, 0.0) for rescale in rescales]
    if len(set(pairs)) == 1:
        _rescale_in_place(values, *pairs[0])
        meta: dict[str, Any] = {"slope": pairs[0][0], "intercept": pairs[0][1]}
    else:
        for frame, (slope, intercept) in enumerate(pairs):
            _rescale_in_place(values[frame], slope, intercept)
        meta = {"slope": [slope for slope, _ in pairs], "intercept": [intercept for _, intercept in pairs]}
    if pixels.dtype.kind in "iu" and not np.isfinite(values).all():  # stored integers are finite: the rescale
        raise DataError(path, f"Rescale Slope {meta['slope']} and Intercept {meta['intercept']} take the stored "
                              "values beyond the float32 range")
    return values, meta


def _frames_in(ds, pixels: np.ndarray) -> int:
    """How many frames the (grayscale) pixels hold along their first axis: 1 for a single frame."""
    return pixels.shape[0] if _frame_count(ds) > 1 and pixels.ndim == 3 else 1


def _rescale(path: Path, ds, frame: int) -> tuple[float, float] | None:
    """(slope, intercept) of one frame, ``None`` when the header has neither; a value that is not a finite
    number, or a slope of 0, is a ``DataError`` naming the element."""
    slope = header_value(ds, "RescaleSlope", "PixelValueTransformationSequence", frame)
    intercept = header_value(ds, "RescaleIntercept", "PixelValueTransformationSequence", frame)
    if slope is None and intercept is None:
        return None
    number = _rescale_number(path, slope, "Rescale Slope") if slope is not None else 1.0
    if number == 0:  # every stored value would be the intercept: a blank image, whatever the pixels hold
        raise DataError(path, "Rescale Slope is 0: every pixel would read as the Rescale Intercept (a blank image)")
    return number, _rescale_number(path, intercept, "Rescale Intercept") if intercept is not None else 0.0


def _rescale_number(path: Path, value: Any, name: str) -> float:
    """``value`` (a DS) as a float; not a number, several numbers or not finite (``1e309``): ``DataError``."""
    text = " ".join(str(value).split())
    shown = repr(text if len(text) <= 40 else text[:37] + "...")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise DataError(path, f"{name} {shown} is not a number") from None
    if not math.isfinite(number):
        raise DataError(path, f"{name} {shown} is not a finite number")
    if abs(number) > np.finfo(np.float32).max:
        raise DataError(path, f"{name} {shown} is beyond the float32 range")
    return number


def _rescale_in_place(values: np.ndarray, slope: float, intercept: float) -> None:
    if slope != 1.0:
        values *= np.float32(slope)
    if intercept != 0.0:
        values += np.float32(intercept)


def file_window(ds, frame: int = 0) -> Window | str | None:
    """The header's own VOI for one frame: ``"lut"`` for a VOI LUT Sequence, else the first Window
    Center / Width (top level, else the frame's own Frame VOI LUT, else the shared one of an enhanced
    multi-frame file), else ``None``."""
    if "VOILUTSequence" in ds and ds.VOILUTSequence:
        return "lut"
    center = header_value(ds, "WindowCenter", "FrameVOILUTSequence", frame)
    width = header_value(ds, "WindowWidth", "FrameVOILUTSequence", frame)
    if center is None or width is None or center == "" or width == "":
        return None
    function = str(header_value(ds, "VOILUTFunction", "FrameVOILUTSequence", frame) or "LINEAR").upper()
    first = [_first(center), _first(width)]
    try:
        return Window(float(first[0]), float(first[1]), function=function, name=FILE_WINDOW)
    except Exception:  # noqa: BLE001 - a malformed window in the header is ignored, not fatal
        log.debug("ignoring an invalid window in the header")
        return None


def _file_windows(ds, frames: int) -> list[Window] | str | None:
    """``file_window`` of every frame: ``"lut"``, one window per frame, or ``None`` when a frame has
    none (windowing only some frames would mix display values with modality values)."""
    windows = [file_window(ds, frame) for frame in range(frames)]
    if windows[0] == "lut":
        return "lut"
    if any(not isinstance(window, Window) for window in windows):
        return None
    return [window for window in windows if isinstance(window, Window)]


def _first(value):
    """The first of a multi-valued element (several windows are common), or the value itself."""
    if isinstance(value, str | bytes):
        return value
    try:
        return value[0]
    except (TypeError, IndexError, KeyError):
        return value


def _voi_lut(ds, values: np.ndarray) -> np.ndarray:
    """Apply the header's first VOI LUT to modality values; output in [0, 1]."""
    from pydicom.pixels import apply_voi_lut

    item = ds.VOILUTSequence[0]
    bits = int(item.LUTDescriptor[2]) or 16
    mapped = apply_voi_lut(np.rint(values).astype(np.int64), ds, index=0, prefer_lut=True)
    return np.clip(mapped.astype(np.float32) / float(2**bits - 1), 0.0, 1.0)


def _grayscale(path: Path, ds, pixels: np.ndarray, window: WindowSpec | None,
               own_range: bool = True) -> tuple[np.ndarray, dict]:
    """Modality values, windowed if asked, MONOCHROME1 inverted: ``1 - v`` when windowed, else
    ``min + max - v`` over this image's values, or not at all with ``own_range=False`` (a series is
    inverted over its whole range by ``_stack_series``, so that one stored value stays one value)."""
    values, rescale = _modality_values(path, ds, pixels)
    inverted = str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1"
    _fill_padding(ds, pixels, values, inverted)
    display, window_meta = _display(ds, values, window)
    if inverted and window_meta:
        display = 1.0 - display
    elif inverted and own_range:
        display = float(display.min()) + float(display.max()) - display
    return display.astype(np.float32, copy=False), {"rescale": rescale, "window": window_meta,
                                                    "inverted": inverted}


def _padding_mask(ds, pixels: np.ndarray) -> np.ndarray | None:
    """The pixels whose stored value is the Pixel Padding Value (0028,0120), or lies between it and the Pixel Padding
    Range Limit (0028,0121) inclusive: not image data (PS3.3 C.7.5.1.1.2; a CT's area outside its circular field of
    view). ``None`` when the header states no padding, no pixel is padding or every pixel is. A value written as US
    for signed pixels (two's complement in Bits Allocated) is read as the signed value it stands for."""
    value = _int(ds.get("PixelPaddingValue"))
    if value is None or pixels.dtype.kind not in "iu":
        return None
    limit = _int(ds.get("PixelPaddingRangeLimit"))
    if limit is None:
        limit = value
    if _int(ds.get("PixelRepresentation")) == 1:
        bits = _int(ds.get("BitsAllocated")) or 16
        value, limit = (number - (1 << bits) if number >= 1 << (bits - 1) else number for number in (value, limit))
    low, high = sorted((value, limit))
    mask = (pixels >= low) & (pixels <= high)
    return mask if mask.any() and not mask.all() else None


def _fill_padding(ds, pixels: np.ndarray, values: np.ndarray, inverted: bool) -> None:
    """Give padding pixels (``_padding_mask``) the image's darkest displayed value, in place: the lowest modality value
    of its other pixels (the highest for MONOCHROME1, which inversion makes the lowest). So padding, -3024 HU on one
    scanner, -1024 on another, none after a crop, neither stretches min-max scaling nor looks like a value of its own
    through a window; an image without padding is untouched."""
    mask = _padding_mask(ds, pixels)
    if mask is None:
        return
    image = values[~mask]
    values[mask] = image.max() if inverted else image.min()


def _display(ds, values: np.ndarray, window: WindowSpec | None) -> tuple[np.ndarray, dict | None]:
    """Modality values through the chosen window (the file's own: frame by frame) and its meta."""
    if not (isinstance(window, str) and window == FILE_WINDOW):
        chosen = get_window(window) if window is not None else None
        return (apply_window(values, chosen), chosen.as_dict()) if chosen is not None else (values, None)
    windows = _file_windows(ds, _frames_in(ds, values))
    if isinstance(windows, str):  # "lut"
        return _voi_lut(ds, values), {"name": FILE_WINDOW, "function": "VOI LUT"}
    if not windows:
        return values, None
    if len(set(windows)) == 1:
        return apply_window(values, windows[0]), windows[0].as_dict()
    display = np.stack([apply_window(frame, own) for frame, own in zip(values, windows, strict=True)])
    return display, {"name": FILE_WINDOW, "function": "per frame", "frames": [own.as_dict() for own in windows]}


PALETTE_COLORS = ("Red", "Green", "Blue")


def _color(path: Path, ds, pixels: np.ndarray) -> tuple[np.ndarray, int]:
    """RGB pixels and their bits per sample (palette colour expanded through its LUT). PALETTE COLOR
    without its lookup tables (a descriptor, or the data, plain or segmented, of a colour), or with tables
    pydicom cannot apply, is a ``DataError`` naming the file and the element."""
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        _check_palette(path, ds)
        try:
            rgb = apply_color_lut(pixels, ds)
        except (ValueError, TypeError, KeyError, AttributeError, IndexError) as error:
            raise DataError(path, f"PALETTE COLOR: its palette lookup tables cannot be applied "
                                  f"({_short(error)})") from None
        descriptor = ds.get("RedPaletteColorLookupTableDescriptor") or [0, 0, 16]
        return rgb, int(descriptor[2]) or 16
    return pixels, int(ds.get("BitsStored") or ds.get("BitsAllocated") or 8)


def _check_palette(path: Path, ds) -> None:
    """Each colour's Palette Color Lookup Table Descriptor and its data (plain or segmented) are there."""
    for color in PALETTE_COLORS:
        descriptor = f"{color}PaletteColorLookupTableDescriptor"
        if not ds.get(descriptor):
            raise DataError(path, f"PALETTE COLOR without its palette lookup tables (no {color} Palette Color "
                                  "Lookup Table Descriptor)")
        if not ds.get(f"{color}PaletteColorLookupTableData") and \
                not ds.get(f"Segmented{color}PaletteColorLookupTableData"):
            raise DataError(path, f"PALETTE COLOR without its palette lookup tables (no {color} Palette Color "
                                  "Lookup Table Data)")


# ----------------------------------------------------------------------------------- metadata

_SAFE_TEXT = {
    "modality": "Modality",
    "photometric": "PhotometricInterpretation",
    "body_part": "BodyPartExamined",
    "view_position": "ViewPosition",
    "laterality": "ImageLaterality",
    "study_uid": "StudyInstanceUID",
    "series_uid": "SeriesInstanceUID",
    "sop_uid": "SOPInstanceUID",
}


def _floats(value) -> list[float] | None:
    if value is None or value == "":
        return None
    try:
        return [float(v) for v in (value if hasattr(value, "__iter__") and not isinstance(value, str) else [value])]
    except (TypeError, ValueError):
        return None


def _int(value) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _spacing_pair(value) -> list[float] | None:
    """Two spacings in mm, both positive and finite (Pixel Spacing's rule, PS3.3 C.7.6.2.1.1), else None:
    a ``0\\0`` some writers leave in place of an unknown spacing is no spacing."""
    spacing = _floats(value)
    if not spacing or len(spacing) != 2 or not all(math.isfinite(v) and v > 0 for v in spacing):
        return None
    return spacing


def pixel_spacing(ds, frame: int = 0) -> tuple[list[float] | None, str | None]:
    """(row spacing, column spacing) in mm and the attribute it came from, or (None, None); a spacing
    of zero, below zero or not finite counts as none. An enhanced multi-frame file's is ``frame``'s own
    Pixel Measures, else the shared one.

    Pixel Spacing is in the patient; Imager Pixel Spacing (projection radiography) is at the
    detector, magnified relative to the patient by the source-to-detector geometry."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        spacing = _spacing_pair(ds.get(keyword))
        if spacing:
            return spacing, keyword
    spacing = _spacing_pair(functional_value(ds, "PixelMeasuresSequence", "PixelSpacing", frame))
    if spacing:
        return spacing, "PixelSpacing"
    return None, None


def frame_pixel_spacings(ds, frames: int) -> list[list[float] | None]:
    """Each frame's pixel spacing in mm (``pixel_spacing``): an enhanced multi-frame file states one per frame, in
    its per-frame functional groups (a frame beyond them, or a file without them, has the first frame's: one value
    for such a file, never one per declared frame of a header not yet checked against its pixel data)."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    return [pixel_spacing(ds, frame)[0] for frame in range(max(1, min(frames, len(per_frame))))]


def same_spacing(spacing: Sequence[float], other: Sequence[float]) -> bool:
    """True if two pixel spacings describe one pixel grid (within ``SAME_SPACING_RTOL``)."""
    return bool(np.allclose(spacing, other, rtol=SAME_SPACING_RTOL, atol=0.0))


def distinct_spacings(spacings: Iterable[Sequence[float] | None]) -> list[list[float]]:
    """The different pixel spacings among ``spacings`` (``same_spacing``), first seen first; no spacing is left
    out. More than one: the slices or frames are not one pixel grid (different fields of view on one matrix)."""
    kept: list[list[float]] = []
    for spacing in spacings:
        if spacing and not any(same_spacing(spacing, seen) for seen in kept):
            kept.append(list(spacing))
    return kept


def spacing_text(spacing: Sequence[float]) -> str:
    return " x ".join(f"{value:.4g}" for value in spacing)


def one_pixel_spacing(paths: Sequence[Path], spacings: Sequence[Sequence[float] | None], what: str,
                      unit: str = "slice") -> list[float] | None:
    """The pixel spacing the slices (``unit``; or frames) of one volume share, None if none states one. Two
    different ones (``same_spacing``) are a ``DataError`` naming the file (``paths``: each slice's), ``what``, the
    slice and both spacings: stacked, one of them would be shown (and given to a model) at the other's scale."""
    found = distinct_spacings(spacings)
    if len(found) > 1:
        index = next(n for n, spacing in enumerate(spacings) if spacing and not same_spacing(spacing, found[0]))
        raise DataError(paths[index], f"{what}: {unit} {index + 1} of {len(spacings)} has pixel spacing "
                                      f"{spacing_text(found[1])} mm, the others {spacing_text(found[0])} mm: "
                                      "different fields of view on one matrix, not one volume; split it first")
    return found[0] if found else None


def safe_meta(ds, syntax=None) -> dict[str, Any]:
    """Acquisition facts from a header, from an allow-list: no patient identifiers, no dates. Body Part
    Examined, a code string a person can type anything into, is kept only when plain by the Clean
    Descriptors rule (``descriptors.is_plain``), else None."""
    from .descriptors import is_plain

    meta: dict[str, Any] = {key: str(ds.get(keyword)) if ds.get(keyword) not in (None, "") else None
                            for key, keyword in _SAFE_TEXT.items()}
    if meta["body_part"] is not None and not is_plain(meta["body_part"], "CS"):
        meta["body_part"] = None
    syntax = syntax if syntax is not None else transfer_syntax(ds)
    spacing, spacing_source = pixel_spacing(ds)
    meta.update({
        "sop_class": object_kind(ds),
        "transfer_syntax": syntax.name if syntax is not None else None,
        "rows": _int(ds.get("Rows")),
        "columns": _int(ds.get("Columns")),
        "frames": _frame_count(ds),
        "samples_per_pixel": _int(ds.get("SamplesPerPixel")) or 1,
        "bits_stored": _int(ds.get("BitsStored")),
        "pixel_spacing_mm": spacing,
        "pixel_spacing_source": spacing_source,
        # (vertical, horizontal) ratio of a pixel's sides, for a file without a spacing in mm (ultrasound, secondary
        # capture): Pixel Aspect Ratio, PS3.3 C.7.6.3.1.7; None when absent or not two positive numbers
        "pixel_aspect_ratio": _spacing_pair(ds.get("PixelAspectRatio")),
        "slice_thickness_mm": _first_float(header_value(ds, "SliceThickness", "PixelMeasuresSequence")),
        "series_number": _int(ds.get("SeriesNumber")),
        "instance_number": _int(ds.get("InstanceNumber")),
        "image_position": _floats(header_value(ds, "ImagePositionPatient", "PlanePositionSequence")),
        "image_orientation": _floats(header_value(ds, "ImageOrientationPatient", "PlaneOrientationSequence")),
    })
    return meta


def _first_float(value) -> float | None:
    values = _floats(value)
    return values[0] if values else None


# ------------------------------------------------------------------------------- public: files


def read_dicom(path: str | Path, window: WindowSpec | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Read one DICOM file's pixels and safe metadata (conventions in the module docstring).

    ``window``: ``None`` (modality values), ``"file"`` (the header's VOI LUT or first window;
    modality values if it has none), a preset name (``lung``, ``mediastinum``, ``bone``, ``brain``,
    ...) or ``(center, width)`` in modality units. Colour images ignore it.
    """
    path = Path(path)
    with quiet_pydicom(path):
        return _read_dicom(path, window)


def _read_dicom(path: Path, window: WindowSpec | None,
                own_range: bool = True) -> tuple[np.ndarray, dict[str, Any]]:
    ds = read_dataset(path)
    has_pixels = any(keyword in ds for keyword in PIXEL_KEYWORDS)
    check_image_header(path, ds, has_pixels)
    if not has_pixels:
        raise DataError(path, f"no pixel data (the file is a {object_kind(ds)}, which carries no image)")
    syntax = transfer_syntax(ds)
    _check_decodable(path, ds, syntax)
    _check_size(path, ds)
    pixels = _decode(path, ds, syntax)
    meta = safe_meta(ds, syntax)
    frames, samples = meta["frames"], meta["samples_per_pixel"]
    expected = (meta["rows"], meta["columns"]) if frames == 1 else (frames, meta["rows"], meta["columns"])
    if pixels.shape[: len(expected)] != expected:
        raise DataError(path, f"decoded pixels have shape {pixels.shape}, header says {expected}")
    meta["color"] = samples == 3 or str(ds.get("PhotometricInterpretation", "")).upper() == "PALETTE COLOR"
    if meta["color"]:
        array, meta["bits_stored"] = _color(path, ds, pixels)
        meta.update(rescale=None, window=None, inverted=False, photometric_out="RGB")
    else:
        array, processing = _grayscale(path, ds, pixels, window, own_range)
        meta.update(processing, photometric_out="MONOCHROME2")
    return array, meta


# ------------------------------------------------------------------------------ public: series


@dataclass
class DicomSeries:
    """The image files of one series: same Study Instance UID and Series Instance UID."""

    study_uid: str
    series_uid: str
    modality: str | None
    series_number: int | None
    files: list[Path] = field(default_factory=list)  # sorted by Instance Number, then name
    rows: int | None = None
    columns: int | None = None
    frames: int = 0  # frames over all files
    pixel_spacing_mm: list[float] | None = None  # the first file's (its first frame's)
    # every different pixel spacing of its files and frames (``distinct_spacings``): more than one, not one volume
    pixel_spacings_mm: list[list[float]] = field(default_factory=list)

    def describe(self) -> str:
        return (f"series {self.series_number if self.series_number is not None else '?'} "
                f"({self.modality or '?'}, {len(self.files)} file(s), {self.frames} frame(s))")


def is_dicom_candidate(path: Path) -> bool:
    """A ``.dcm`` / ``.dicom`` file, or any other file with the DICM marker (sniffed)."""
    return path.name.lower().endswith(DICOM_SUFFIXES) or has_dicom_preamble(path)


def is_hidden(path: Path, folder: Path) -> bool:
    """True for a file under ``folder`` whose name, or the name of a folder between them, starts with ``.``:
    macOS ``._*`` AppleDouble files (metadata, not DICOM, left by copying or zipping on a Mac), ``.DS_Store``,
    version control and staging folders."""
    return any(part.startswith(".") for part in path.relative_to(folder).parts)


def read_dicom_series(folder: str | Path) -> list[DicomSeries]:
    """Group the DICOM image files under ``folder`` (recursively) into series.

    Files that are not DICOM are skipped; so are hidden files and folders (``is_hidden``: a macOS
    ``._CT.dcm`` is not DICOM), and DICOM objects without an image (DICOMDIR, structured
    reports, RT plans), each counted in a log line; a DICOM file that cannot be parsed is an error,
    and so is a truncated one: nothing after the file meta, or an image object (image storage SOP
    class) cut before its Rows / Columns or its pixel data (``check_image_header``), or inside
    uncompressed pixel data (the file shorter than the element declares), so that a series missing
    a slice is never stacked as if it were whole. Files holding the same instance (SOP Instance UID)
    as another file of their series are kept, and named in a warning.
    Series come sorted by study UID, series number and series UID.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(folder, "not a folder" if folder.exists() else "folder not found")
    groups: dict[tuple[str, str], DicomSeries] = {}
    order: dict[Path, tuple] = {}
    instances: dict[tuple[str, str, str], list[Path]] = {}  # (study, series, SOP Instance UID) -> its files
    skipped = hidden = 0
    with quiet_pydicom(folder):
        for path in sorted(p for p in folder.rglob("*") if p.is_file() and is_dicom_candidate(p)):
            if is_hidden(path, folder):
                hidden += 1
            else:
                skipped += _add_to_series(groups, order, path, instances)
    if skipped or hidden:
        log.info("%s: skipped %d DICOM object(s) without an image and %d hidden file(s) (names starting with '.', "
                 "such as macOS ._ files)", folder, skipped, hidden)
    if not groups:
        raise DataError(folder, "no DICOM image files found")
    _warn_duplicates(folder, [paths for paths in instances.values() if len(paths) > 1])
    for series in groups.values():
        series.files.sort(key=order.__getitem__)
    return sorted(groups.values(), key=lambda s: (s.study_uid, s.series_number or 0, s.series_uid))


def _warn_duplicates(folder: Path, repeated: list[list[Path]]) -> None:
    """Say which files hold an instance another file of the series holds too (a copy: counted twice,
    and a volume of them has two slices at one position)."""
    if repeated:
        first = repeated[0]
        log.warning("%s: %d file(s) hold the same instance (SOP Instance UID) as another file of their series, "
                    "e.g. %s (copies?): they count twice in a series", folder, sum(len(p) - 1 for p in repeated),
                    " and ".join(str(p.relative_to(folder)) for p in first))


def _add_to_series(groups: dict[tuple[str, str], DicomSeries], order: dict[Path, tuple], path: Path,
                   instances: dict[tuple[str, str, str], list[Path]]) -> int:
    """File one DICOM file under its series (and under its instance, in ``instances``); 1 if it was
    skipped (no image), else 0."""
    ds, has_pixels = read_header(path)
    if object_kind(ds).startswith("DICOMDIR"):
        return 1
    check_image_header(path, ds, has_pixels)
    if not ds.get("Rows") or not has_pixels:
        return 1
    key = (str(ds.get("StudyInstanceUID") or ""), str(ds.get("SeriesInstanceUID") or ""))
    series = groups.get(key)
    if series is None:
        series = groups[key] = DicomSeries(key[0], key[1], ds.get("Modality") or None, _int(ds.get("SeriesNumber")),
                                           rows=_int(ds.get("Rows")), columns=_int(ds.get("Columns")),
                                           pixel_spacing_mm=pixel_spacing(ds)[0])
    series.files.append(path)
    series.frames += _frame_count(ds)
    series.pixel_spacings_mm = distinct_spacings([*series.pixel_spacings_mm,
                                                  *frame_pixel_spacings(ds, _frame_count(ds))])
    instances.setdefault((*key, str(ds.get("SOPInstanceUID") or path)), []).append(path)
    order[path] = (_int(ds.get("InstanceNumber")) or 0, path.name)
    return 0


# ----------------------------------------------------------------------------- volume geometry


def plane_geometry(ds) -> tuple[np.ndarray | None, np.ndarray | None]:
    """A single-frame slice's Image Position (Patient) (3 values, mm: the centre of its first
    voxel) and Image Orientation (Patient) (6 values: row and column direction cosines), each
    ``None`` when missing or malformed."""
    position = _floats(ds.get("ImagePositionPatient"))
    orientation = _floats(ds.get("ImageOrientationPatient"))
    return (np.asarray(position) if position and len(position) == 3 else None,
            np.asarray(orientation) if orientation and len(orientation) == 6 else None)


def same_plane(orientation: np.ndarray, other: np.ndarray) -> bool:
    """True if two Image Orientation (Patient) values describe the same plane orientation."""
    return bool(np.allclose(orientation, other, atol=SAME_ORIENTATION_ATOL))


def slice_stack(orientation: np.ndarray,
                positions: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray, float | None]:
    """How slices of one plane orientation stack into a volume (every volume medvl reads from
    DICOM is ordered here).

    ``orientation``: the slices' Image Orientation (Patient); ``positions``: each slice's Image
    Position (Patient), mm. Returns the slice indices sorted by position along the plane's normal
    (the cross product of the row and column directions; ties keep their order), the gaps between
    neighbours in that order (mm), and their median, the slice spacing: ``None`` when there are
    fewer than two slices or two share a position (duplicates, or mixed acquisitions: not one volume).
    """
    normal = np.cross(orientation[:3], orientation[3:])
    along = np.array([float(np.dot(position, normal)) for position in positions])
    order = np.argsort(along, kind="stable")
    gaps = np.diff(along[order])
    distinct = len(gaps) > 0 and not np.any(gaps < MIN_SLICE_GAP_MM)
    return order, gaps, float(np.median(gaps)) if distinct else None


def position_counts(orientation: np.ndarray, positions: Sequence[np.ndarray]) -> list[int]:
    """How many slices (frames) sit at each distinct position along the slice normal, in stack order (``slice_stack``):
    all 1 for a volume, a single count for one slice over time (a cine), counts above 1 at several positions for a
    4D (dynamic) acquisition or duplicates."""
    order, gaps, _ = slice_stack(orientation, positions)
    return [len(part) for part in np.split(order, np.flatnonzero(gaps >= MIN_SLICE_GAP_MM) + 1)]


def repeated_frames(counts: Sequence[int]) -> str:
    """Why a multi-frame file whose frames repeat positions (``position_counts``) is not one volume, in words."""
    if len(counts) == 1:
        return f"all {counts[0]} frames at one position (one slice over time, a cine): not a volume"
    if len(set(counts)) == 1:
        return (f"frames at {len(counts)} positions repeated over {counts[0]} time points: a 4D file, not one "
                "volume; split it into one volume per time point")
    return (f"{sum(counts)} frames at {len(counts)} positions, some repeated (up to {max(counts)} at one position: "
            "time points or duplicates): not one volume; split it")


def missing_slices(orientation: np.ndarray, positions: Sequence[np.ndarray],
                   stack: tuple[np.ndarray, np.ndarray, float | None] | None = None) -> str | None:
    """Where a stack of slices (``slice_stack``'s input) has a hole, in words, or None: a gap between neighbours
    of ``MISSING_SLICE_STEPS`` slice steps (the median gap) or more, or about a whole number, 2 or more, of the
    smallest gap (within ``WHOLE_STEPS_RTOL`` of it: found even when such gaps are half of them or more, and the
    median with them). Stacked as it is, the volume would close the gap (the slices beyond it a step or more out of
    place), so such a series is not a volume. Gaps of other uneven widths are not holes (``_volume_order`` warns).
    ``stack``: ``slice_stack``'s result for these slices, when the caller has it already."""
    order, gaps, spacing = stack if stack is not None else slice_stack(orientation, positions)
    if spacing is None:
        return None
    steps = gaps / gaps.min()
    whole = (np.round(steps) >= 2) & (np.abs(steps - np.round(steps)) <= WHOLE_STEPS_RTOL)
    if gaps.min() < WHOLE_STEP_MIN_SHARE * spacing:  # one odd narrow gap (0.01 mm in 1 mm steps) is no step the
        whole[:] = False  # others are multiples of: they would all read as holes of ~100 slices
    wide = np.flatnonzero((gaps >= MISSING_SLICE_STEPS * spacing) | whole)
    if not len(wide):
        return None
    if whole.any():  # the smallest gap is the step the others are whole multiples of
        spacing = float(gaps.min())
    normal = np.cross(orientation[:3], orientation[3:])
    along = [float(np.dot(positions[index], normal)) for index in order]
    first = int(wide[0])
    missing = max(1, round(gaps[first] / spacing) - 1)
    more = f"; {len(wide)} such gaps in all" if len(wide) > 1 else ""
    return (f"slices are {spacing:.3g} mm apart, but none lies between {along[first]:.6g} and "
            f"{along[first + 1]:.6g} mm along the slice normal (a {gaps[first]:.3g} mm gap: about {missing} "
            f"slice(s) missing{more}); stacked as it is, the volume would close the gap. Restore the missing "
            "file(s); a series whose slice interval changes part-way (2.5 then 5 mm) is no regular volume either: "
            "split it where the interval changes")


def slice_line(orientation: np.ndarray, positions: Sequence[np.ndarray],
               order: np.ndarray) -> tuple[float, np.ndarray, float]:
    """How the centres of stacked slices (``slice_stack``'s ``order``; slices at distinct positions) line up: the
    angle in degrees between the line they follow and the slice normal (0: straight along it; a CT gantry tilt
    shifts each slice's origin in-plane by one step per slice), each slice's distance in mm from that line (in
    stack order), and how far in-plane (mm) the line drifts from the first slice to the last. The drift per mm along
    the normal is the median of neighbours' (per in-plane axis), so that one slice off the line does not tilt it."""
    row, col = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
    stacked = np.array([positions[index] for index in order], dtype=float)
    along = stacked @ np.cross(row, col)
    in_plane = stacked @ np.column_stack([row, col])  # (slices, 2): along the rows' and the columns' directions
    drift = np.median(np.diff(in_plane, axis=0) / np.diff(along)[:, None], axis=0)
    offsets = in_plane - along[:, None] * drift
    distance = np.linalg.norm(offsets - np.median(offsets, axis=0), axis=1)
    slope = float(np.linalg.norm(drift))
    return math.degrees(math.atan(slope)), distance, slope * float(along[-1] - along[0])


def off_axis_slice(orientation: np.ndarray, positions: Sequence[np.ndarray], order: np.ndarray,
                   pixel_mm: float, line: tuple[float, np.ndarray, float] | None = None) -> str | None:
    """Where a stack of slices (at distinct positions, ``slice_stack``'s ``order``) has a slice whose centre lies
    more than ``OFF_AXIS_PIXELS`` pixels (``pixel_mm``: the finer pixel spacing) off the line the others follow
    (``slice_line``), in words, or None: a slice of another field of view or table position, which stacked would
    not line up with the rest. The line may be tilted (a gantry tilt: ``_volume_order`` warns of it). ``line``:
    ``slice_line``'s result for these slices, when the caller has it already."""
    if len(order) < 3:  # two centres always make a line
        return None
    _, distance, _ = line if line is not None else slice_line(orientation, positions, order)
    worst = int(np.argmax(distance))
    tolerance = OFF_AXIS_PIXELS * pixel_mm
    if distance[worst] <= tolerance:
        return None
    return (f"slice {worst + 1} of {len(order)} (counted along the slice normal) lies {distance[worst]:.3g} mm "
            f"in-plane off the line through the other slices' centres (more than half a pixel, {tolerance:.3g} mm): "
            "a slice of another field of view or table position; not one volume, split it first")


def volume_hole(orientation: np.ndarray, positions: Sequence[np.ndarray],
                stack: tuple[np.ndarray, np.ndarray, float | None], pixel_mm: float,
                line: tuple[float, np.ndarray, float] | None = None) -> str | None:
    """Why slices at distinct positions (``slice_stack``'s ``stack`` of them) are not one volume, in words, or None:
    a missing slice (``missing_slices``) or a slice off the line the others follow (``off_axis_slice``; ``pixel_mm``
    and ``line`` as there)."""
    return missing_slices(orientation, positions, stack) or off_axis_slice(orientation, positions, stack[0], pixel_mm,
                                                                           line)


def _slice_geometry(path: Path, ds) -> tuple[np.ndarray, np.ndarray]:
    position, orientation = plane_geometry(ds)
    if position is None or orientation is None:
        raise DataError(path, "no Image Position / Orientation (Patient): cannot place the slice in a volume")
    return placed(path, position, orientation)


def placed(path: str | Path, position: np.ndarray, orientation: np.ndarray,
           what: str = "") -> tuple[np.ndarray, np.ndarray]:
    """A slice's (or ``what``: a frame's) Image Position (Patient) and its Image Orientation (Patient) normalised,
    checked before they place it in a volume: both finite, the row and column direction cosines unit vectors at
    right angles as DICOM requires (PS3.3 C.7.6.2.1.1), within ``UNIT_ORIENTATION_TOL`` (rounding). A DataError
    naming the file otherwise: vectors of length 10 made every slice gap, and the slice spacing, 100 times too
    large; an infinite position ended in an OverflowError."""
    prefix = f"{what}: " if what else ""
    for name, values in (("Position", position), ("Orientation", orientation)):
        if not np.all(np.isfinite(values)):
            raise DataError(path, f"{prefix}Image {name} (Patient) {_numbers_text(values)} is not finite: cannot "
                                  "place the slice in a volume")
    row, col = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
    lengths = float(np.linalg.norm(row)), float(np.linalg.norm(col))
    if max(abs(length - 1.0) for length in lengths) > UNIT_ORIENTATION_TOL:
        raise DataError(path, f"{prefix}Image Orientation (Patient) {_numbers_text(orientation)}: its row and column "
                              f"direction cosines have lengths {lengths[0]:.4g} and {lengths[1]:.4g}; DICOM requires "
                              "unit vectors (PS3.3 C.7.6.2.1.1): cannot place the slice in a volume")
    row, col = row / lengths[0], col / lengths[1]
    cosine = float(np.dot(row, col))
    if abs(cosine) > UNIT_ORIENTATION_TOL:
        raise DataError(path, f"{prefix}Image Orientation (Patient) {_numbers_text(orientation)}: its row and column "
                              f"directions are {math.degrees(math.acos(max(-1.0, min(1.0, cosine)))):.4g} degrees "
                              "apart; DICOM requires them orthogonal (PS3.3 C.7.6.2.1.1): cannot place the slice in "
                              "a volume")
    return np.asarray(position, float), np.concatenate([row, col])


def _numbers_text(values: Sequence[float] | np.ndarray) -> str:
    return "\\".join(f"{value:.6g}" for value in values)  # DICOM's multi-value separator


def _volume_order(first: Path, orientation: np.ndarray, positions: Sequence[np.ndarray],
                  what: str = "the series", pixel_mm: float = 1.0,
                  multiframe: bool = False) -> tuple[np.ndarray, float]:
    """``slice_stack`` for a volume being loaded: shared positions, a missing slice (``missing_slices``) and a slice
    off the line the others follow (``off_axis_slice``; ``pixel_mm``: the finer pixel spacing) are a DataError
    naming ``what`` (``multiframe``: the frames of the one file ``first``, named itself, not its folder); other
    uneven gaps and a gantry tilt (the slices' centres on a line slanted from the normal by more than half a pixel
    over the stack) a warning. A tilted stack is stacked as acquired (not resampled: sheared against the patient's
    axes, as a viewer shows the slices); the spacing is the distance along the normal."""
    order, gaps, spacing = stack = slice_stack(orientation, positions)
    if spacing is None and multiframe:
        raise DataError(first, repeated_frames(position_counts(orientation, positions)))
    if spacing is None:
        raise DataError(first.parent, "two slices share one position: the series mixes acquisitions "
                                      "(or holds duplicates); split it first")
    line = slice_line(orientation, positions, order)  # once: the off-line check and the tilt warning read it
    hole = volume_hole(orientation, positions, stack, pixel_mm, line)
    if hole is not None:
        raise DataError(first, hole) if multiframe else DataError(first.parent, f"{what}: {hole}")
    tilt, _, drift = line
    if drift > OFF_AXIS_PIXELS * pixel_mm:
        log.warning("%s: %s: the slices' centres drift %.3g mm in-plane over the stack, a gantry tilt of %.3g "
                    "degrees: stacked as acquired, not resampled (sheared against the patient's axes); the slice "
                    "spacing is the distance along the slice normal", first.parent, what, drift, tilt)
    if np.max(np.abs(gaps - spacing)) > 0.01 * spacing + 1e-3:
        log.warning("%s: uneven slice spacing (%.3g to %.3g mm); using the median %.3g mm",
                    first.parent, gaps.min(), gaps.max(), spacing)
    return order, spacing


LPS_TO_RAS = np.array([-1.0, -1.0, 1.0])  # DICOM patient axes (L, P, S) -> NIfTI's (R, A, S)


def ras_orientation(orientation: np.ndarray) -> list[tuple[int, bool]]:
    """For each voxel axis of a stacked volume (column ``i``, row ``j``, slice ``k``: the Image
    Orientation (Patient) row direction, column direction and their cross product), the RAS axis
    (0 = x, 1 = y, 2 = z) it is closest to and whether it runs against it: nibabel's
    ``io_orientation`` (each voxel axis in turn takes its largest remaining component)."""
    row, col = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
    directions = np.column_stack([row, col, np.cross(row, col)]) * LPS_TO_RAS[:, None]
    remaining = directions.copy()
    axes = []
    for voxel_axis in range(3):
        ras_axis = int(np.argmax(np.abs(remaining[:, voxel_axis])))
        axes.append((ras_axis, bool(directions[ras_axis, voxel_axis] < 0)))
        remaining[ras_axis, :] = 0.0
    return axes


def to_ras(volume: np.ndarray, orientation: np.ndarray,
           spacing: tuple[float, float, float]) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A ``(slice, row, column)`` volume stacked along the normal (``slice_stack``'s order) and its
    spacing, brought to ``read_nifti``'s layout: the closest canonical RAS orientation, ``DxHxW`` =
    ``(z, y, x)`` (axis 0 inferior -> superior, 1 posterior -> anterior, 2 the patient's left ->
    right), as nibabel's ``as_closest_canonical`` does to the same voxels and affine."""
    axes = ras_orientation(orientation)
    array_axis = {0: 2, 1: 1, 2: 0}  # voxel axis i, j, k -> array axis of (slice, row, column)
    voxel_spacing = {0: spacing[2], 1: spacing[1], 2: spacing[0]}
    for voxel_axis, (_, flipped) in enumerate(axes):
        if flipped:
            volume = np.flip(volume, axis=array_axis[voxel_axis])
    voxel_of = {ras_axis: voxel_axis for voxel_axis, (ras_axis, _) in enumerate(axes)}
    order = [array_axis[voxel_of[ras_axis]] for ras_axis in (2, 1, 0)]
    ras_spacing = tuple(voxel_spacing[voxel_of[ras_axis]] for ras_axis in (2, 1, 0))
    return np.ascontiguousarray(volume.transpose(order)), ras_spacing  # type: ignore[return-value]


def _series_from(source: DicomSeries | str | Path) -> DicomSeries:
    if isinstance(source, DicomSeries):
        return source
    found = read_dicom_series(source)
    if len(found) != 1:
        listing = "; ".join(s.describe() for s in found[:6]) + ("; ..." if len(found) > 6 else "")
        raise DataError(source, f"holds {len(found)} series ({listing}); a volume is one series: pick one "
                                "from read_dicom_series")
    return found[0]


def load_volume(series: DicomSeries | str | Path,
                window: WindowSpec | None = None) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Stack one series into a ``DxHxW`` ``float32`` volume in RAS (as ``read_nifti``: axis 0
    inferior -> superior, axis 1 posterior -> anterior, axis 2 the patient's left -> right) and its
    spacing in mm along those axes. ``series`` is a ``DicomSeries`` or a folder holding exactly one
    series; ``window`` as in ``read_dicom`` (default: modality values, HU for CT); ``"file"`` windows each slice
    (or frame) through its own stored VOI when every one has one, else none (modality values throughout)."""
    series = _series_from(series)
    with quiet_pydicom(series.files[0].parent):
        return _stack_series(series, window)


def _stack_series(series: DicomSeries, window: WindowSpec | None) -> tuple[np.ndarray, tuple[float, float, float]]:
    if len(series.files) == 1:
        return _volume_from_multiframe(series.files[0], window)
    headers = [(path, read_dataset(path, header_only=True)) for path in series.files]
    geometry = [_slice_geometry(path, ds) for path, ds in headers]
    orientation = geometry[0][1]
    for (path, _), (_, other) in zip(headers, geometry, strict=True):
        if not same_plane(other, orientation):
            raise DataError(path, "slice orientation differs from the rest of the series: cannot stack")
    row_spacing = one_pixel_spacing(series.files, [pixel_spacing(ds)[0] for _, ds in headers], series.describe())
    if not row_spacing:
        raise DataError(series.files[0], "no Pixel Spacing in the series headers")
    ranking, dz = _volume_order(series.files[0], orientation, [position for position, _ in geometry],
                                series.describe(), min(row_spacing))
    window = _series_window(series, [ds for _, ds in headers], window)
    slices: list[np.ndarray] = []
    to_invert: list[int] = []  # MONOCHROME1 slices read without a window: inverted over the series below
    for index in ranking:
        path = headers[index][0]
        array, meta = _read_dicom(path, window, own_range=False)
        if array.ndim != 2 or meta["color"]:
            raise DataError(path, f"expected a single-frame grayscale slice, got shape {array.shape}")
        if slices and array.shape != slices[0].shape:
            raise DataError(path, f"slice shape {array.shape} differs from {slices[0].shape} in the series")
        if meta["inverted"] and meta["window"] is None:
            to_invert.append(len(slices))
        slices.append(array)
    volume = np.stack(slices).astype(np.float32, copy=False)
    if to_invert:  # one offset for the whole series: min + max - v over its MONOCHROME1 slices
        low, high = float(volume[to_invert].min()), float(volume[to_invert].max())
        volume[to_invert] = low + high - volume[to_invert]
    return to_ras(volume, orientation, (dz, row_spacing[0], row_spacing[1]))


def _series_window(series: DicomSeries, headers: Sequence[Any], window: WindowSpec | None) -> WindowSpec | None:
    """The window to read every slice of a series with: ``"file"`` (each slice through its own VOI) only when every
    slice has one (``file_window``), the rule for the frames of one file (``_file_windows``); else the whole series
    is read as modality values (logged), never display values on some slices and modality values on others."""
    if not (isinstance(window, str) and window == FILE_WINDOW):
        return window
    missing = sum(1 for ds in headers if file_window(ds) is None)
    if missing:
        log.warning("%s, %s: %d of %d slice(s) store no window: the series is read as modality values, none "
                    "windowed", series.files[0].parent, series.describe(), missing, len(headers))
        return None
    return window


def multiframe_to_ras(path: Path, frames: np.ndarray) -> np.ndarray:
    """The grayscale ``frames x H x W`` array ``read_dicom`` gave for a multi-frame file, as a RAS volume
    (``to_ras``) when its frames are placed in space (an enhanced CT / MR: an orientation and a position per
    frame), so that a 3D model reads it as it reads the NIfTI or the series of the same voxels; else (cine,
    ultrasound clips: no positions; frames in several planes, a localizer: ``one_plane``) as stored."""
    placed = multiframe_volume(path, frames)
    return frames if placed is None else placed[0]


def multiframe_volume(path: Path, frames: np.ndarray) -> tuple[np.ndarray, tuple[float, float, float]] | None:
    """``multiframe_to_ras``'s RAS volume of a multi-frame file's frames and its spacing in mm, or None when the
    frames are not placed in space as one volume (they are then read as stored). Frames at several positions some of
    which repeat (a 4D file: 2 positions x 2 time points) are a DataError, as in ``load_volume``."""
    ds = read_dataset(path, header_only=True)
    count = _frame_count(ds)
    placement = frame_placement(ds, count)
    if count < 2 or frames.ndim != 3 or len(frames) != count or placement is None or not one_plane(placement[0]):
        return None
    orientation, positions = _placed_frames(path, *placement)
    if len(position_counts(orientation, positions)) == 1:  # every frame at one position (cine): no volume to place
        return None
    spacing = one_pixel_spacing([path] * count, frame_pixel_spacings(ds, count), "frames", "frame") or [1.0, 1.0]
    ranking, dz = _volume_order(path, orientation, positions, path.name, min(spacing), multiframe=True)
    return to_ras(frames[ranking], orientation, (dz, spacing[0], spacing[1]))


def axial_plane(orientation: Sequence[float]) -> bool:
    """Whether an Image Orientation (Patient)'s slices are axial: their normal closest to the patient's
    inferior -> superior axis (``ras_orientation``), so that a RAS volume's slices are the stored ones."""
    return ras_orientation(np.asarray(orientation, float))[2][0] == 2


def frame_placement(ds, frames: int) -> tuple[list[np.ndarray], list[np.ndarray]] | None:
    """Each frame's Image Orientation and Image Position (Patient) in a multi-frame header, from the top level or
    the functional groups (the frame's own, else the shared one); None when any is missing or malformed."""
    orientations = [_floats(header_value(ds, "ImageOrientationPatient", "PlaneOrientationSequence", frame))
                    for frame in range(frames)]
    positions = [_floats(header_value(ds, "ImagePositionPatient", "PlanePositionSequence", frame))
                 for frame in range(frames)]
    if any(not o or len(o) != 6 for o in orientations) or any(not p or len(p) != 3 for p in positions):
        return None
    return [np.asarray(o) for o in orientations], [np.asarray(p) for p in positions]


def _placed_frames(path: Path, orientations: Sequence[np.ndarray],
                   positions: Sequence[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
    """The frames' shared orientation (the first frame's, normalised) and their positions, each frame's checked
    by ``placed``."""
    checked = [placed(path, position, orientation, f"frame {n + 1}")
               for n, (position, orientation) in enumerate(zip(positions, orientations, strict=True))]
    return checked[0][1], [position for position, _ in checked]


def one_plane(orientations: Sequence[np.ndarray]) -> bool:
    """Whether every Image Orientation (Patient) is the first one's plane (``same_plane``): slices or frames in
    several planes (a multi-plane localizer) are not one volume."""
    return all(same_plane(orientation, orientations[0]) for orientation in orientations)


def _volume_from_multiframe(path: Path, window: WindowSpec | None) -> tuple[np.ndarray, tuple[float, float, float]]:
    """An enhanced (multi-frame) CT/MR file: frames sorted by their Plane Position (Patient)."""
    ds = read_dataset(path, header_only=True)
    frames = _frame_count(ds)
    if frames < 2:
        raise DataError(path, "a single 2D image, not a volume (a volume needs several slices)")
    placement = frame_placement(ds, frames)
    if placement is None:
        raise DataError(path, "multi-frame file without per-frame Image Position / Orientation: cannot place "
                              "its frames in a volume")
    orientations, positions = placement
    if not one_plane(orientations):
        other = next(n for n, orientation in enumerate(orientations) if not same_plane(orientation, orientations[0]))
        raise DataError(path, f"frames in different orientations (frame {other + 1}'s plane differs from frame 1's, "
                              "as in a multi-plane localizer): not one volume, cannot stack")
    orientation, positions = _placed_frames(path, orientations, positions)
    spacing = one_pixel_spacing([path] * frames, frame_pixel_spacings(ds, frames), "frames", "frame")
    if not spacing:
        raise DataError(path, "no Pixel Spacing in the header")
    ranking, dz = _volume_order(path, orientation, positions, path.name, min(spacing), multiframe=True)
    array, meta = read_dicom(path, window=window)
    if meta["color"] or array.ndim != 3:
        raise DataError(path, f"expected grayscale frames, got shape {array.shape}")
    return to_ras(array[ranking], orientation, (dz, spacing[0], spacing[1]))
