"""Uploaded images: sniffed by content, size-limited, DICOM de-identified, decoded, then deleted.

Every upload is patient data. The service never uses the client's file name (no path from it, no
log of it): the type comes from the bytes (``sniff``). PNG and JPEG are decoded from memory and never
written to disk; a DICOM or NIfTI file is written under a private temporary folder (mode 0700) with a
fixed name only because their readers take paths, and the folder is deleted before the request is
answered. A DICOM upload is de-identified
(``medvl.clinical.deid``, the PS3.15 basic profile) and the original bytes deleted before its
header or pixels are read for anything else.

Limits, each checked before the pixels are decoded (decompression bombs are refused from their
declared size): bytes (``max_upload_bytes``), 2D pixels (``max_pixels``: PNG / JPEG header, DICOM
Rows x Columns, the largest plane of a NIfTI file, one slice or a volume) and volume voxels (``max_voxels``:
NIfTI header through ``NiftiSlabs``, the reader's own guard, and DICOM frames x Rows x Columns).
Refusals are ``UploadRejected`` with the HTTP status: 413 (too large), 415 (not PNG, JPEG, DICOM
or NIfTI), 422 (recognised but unreadable: truncated, corrupt, no pixel data).

For a 3D model, a DICOM or NIfTI upload's file is read by the model's own loader, the call ``medvl predict``
makes for a file (``ImagePreprocessor.load``, ``medvl.models.volumes.load_volume``): a NIfTI volume is streamed
from the private folder slab by slab and never held whole, so the service's memory per request is the CLI's.
"""

from __future__ import annotations

import gzip
import io
import logging
import os
import shutil
import struct
import tempfile
import warnings
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
from PIL import Image

from ..errors import DataError, InputError, MedvlError
from .settings import ServeSettings

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)
T = TypeVar("T")

PNG, JPEG, DICOM, NIFTI, NIFTI_GZ = "png", "jpeg", "dicom", "nifti", "nifti-gz"
SUFFIXES = {PNG: ".png", JPEG: ".jpg", DICOM: ".dcm", NIFTI: ".nii", NIFTI_GZ: ".nii.gz"}
ACCEPTED = "PNG, JPEG, DICOM (Part 10, or a data set without the preamble) or NIfTI (.nii / .nii.gz)"
_NIFTI_MAGIC = {348: (344, b"n+1\x00"), 540: (4, b"n+2\x00")}  # sizeof_hdr -> (offset, magic) of single files


class UploadRejected(InputError):
    """An upload the service refuses; ``status`` is the HTTP status that says why (413, 415, 422)."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status


@dataclass
class Upload:
    """A decoded upload: what kind it was, its size, and its pixels, or the model's input read straight from its
    file (a 3D model's, ``decode_upload``'s ``load``); patient data: never logged."""

    kind: str
    n_bytes: int
    pixels: np.ndarray | None  # None when the file was read into ``model_input`` instead
    model_input: torch.Tensor | None = None  # (C, D, H, W) as the model takes it
    digests: tuple[str, ...] = ()  # the pixel hashes an index may hold ``model_input``'s file under, when asked for

    def __repr__(self) -> str:
        shape = self.pixels.shape if self.pixels is not None else getattr(self.model_input, "shape", None)
        return f"Upload(kind={self.kind!r}, n_bytes={self.n_bytes}, shape={tuple(shape or ())})"

    def decoded(self) -> np.ndarray:
        """The pixels, for the routes that take 2D images (refused with the model's 3D volumes before decoding)."""
        if self.pixels is None:
            raise UploadRejected(422, "this route takes 2D images; the upload was read as a 3D model's volume")
        return self.pixels


def sniff(data: bytes) -> str:
    """The upload's kind from its first bytes, or ``UploadRejected`` (415)."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return PNG
    if data.startswith(b"\xff\xd8\xff"):
        return JPEG
    if len(data) >= 132 and data[128:132] == b"DICM":
        return DICOM
    if _is_bare_dataset(data):
        return DICOM
    if _is_nifti_header(data):
        return NIFTI
    if data.startswith(b"\x1f\x8b") and _is_nifti_header(_gunzip_head(data, 544)):
        return NIFTI_GZ
    raise UploadRejected(415, f"unsupported file type; send {ACCEPTED}")


def _is_bare_dataset(data: bytes) -> bool:
    """A DICOM data set written without the 128-byte preamble, ``DICM`` and file meta, which ``medvl predict``,
    ``deid`` and ``pacs pull`` read (and Orthanc stores as it came): it starts with group 0x0002 or 0x0008
    (``medvl.clinical.dicom.looks_like_raw_dataset``) and pydicom parses its header, SOP Class UID included.
    Parsing, not the first bytes alone, tells it from other files starting with those bytes."""
    import pydicom

    from ..clinical.dicom import looks_like_raw_dataset, quiet_pydicom

    if not looks_like_raw_dataset(data[:4]):
        return False
    try:
        with quiet_pydicom("upload"):  # its complaints quote values: patient data
            header = pydicom.dcmread(io.BytesIO(data), force=True, stop_before_pixels=True)
    except Exception:  # noqa: BLE001 - pydicom raises many types for bytes that are not a data set
        return False
    return "SOPClassUID" in header  # every stored instance has one; bytes read as elements by chance do not


def _is_nifti_header(head: bytes) -> bool:
    """A single-file NIfTI-1 or NIfTI-2 header: sizeof_hdr (either byte order) and its magic."""
    if len(head) < 4:
        return False
    for byteorder in ("<", ">"):
        size = struct.unpack(f"{byteorder}i", head[:4])[0]
        if size in _NIFTI_MAGIC:
            offset, magic = _NIFTI_MAGIC[size]
            return head[offset:offset + 4] == magic
    return False


def _gunzip_head(data: bytes, size: int) -> bytes:
    """At most ``size`` decompressed bytes of a gzip stream (never more: no bomb is expanded)."""
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(data)) as stream:
            return stream.read(size)
    except (OSError, EOFError, zlib.error):
        return b""


def too_large_text(max_upload_bytes: int, files: int = 1) -> str:
    """The one wording of a refused upload, whether the whole request (the middleware, which also allows the form
    around the files) or the file itself is over the limit: the configured limit, per file when a route takes
    several."""
    per = " per image" if files > 1 else ""
    return (f"upload too large: over {max_upload_bytes:,} bytes ({max_upload_bytes / 2**20:.4g} MiB){per}, "
            "the service's limit (medvl serve --max-upload-mb)")


def check_byte_size(n_bytes: int, settings: ServeSettings) -> None:
    """413 above ``max_upload_bytes``, 422 for an empty file."""
    if n_bytes > settings.max_upload_bytes:
        raise UploadRejected(413, too_large_text(settings.max_upload_bytes))
    if n_bytes == 0:
        raise UploadRejected(422, "empty upload (0 bytes)")


@contextmanager
def private_folder() -> Iterator[Path]:
    """A temporary folder only this process's user can read (0700), deleted on exit whatever happens."""
    folder = Path(tempfile.mkdtemp(prefix="medvl-upload-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def decode_upload(data: bytes, settings: ServeSettings, modality_values: bool = False, spatial_dims: int = 2,
                  load: Callable[..., torch.Tensor] | None = None,
                  hashed: Callable[[Path], tuple[tuple[str, ...], Any]] | None = None) -> Upload:
    """Check, de-identify (DICOM) and decode one uploaded file; nothing of it is left on disk after.
    ``modality_values``: a DICOM as modality values (HU), for a model that applies its own windows;
    ``spatial_dims``: the model's (2: a NIfTI upload must hold one slice, ``read_image_2d``);
    ``load``: a 3D model's loader (``ImagePreprocessor.load``), given a DICOM or NIfTI upload's file as the CLI
    gives it a file (a NIfTI volume streamed slab by slab): the upload then holds ``model_input``, no pixels, and
    with ``hashed`` (``medvl.index.build.hashed_image`` of the model's preprocessor) the file's pixel hashes as an
    index records them, so that a draft leaves out the indexed copies of the upload; the file is read once for both
    (a NIfTI is streamed twice, as the index build streams it), as ``draft_report`` reads a file."""

    def read(source: Path | bytes, kind: str) -> tuple[np.ndarray | None, torch.Tensor | None, tuple[str, ...]]:
        if load is None or not isinstance(source, Path):
            return read_pixels(source, modality_values, spatial_dims), None, ()
        if hashed is None:
            return None, load(source), ()
        digests, image = hashed(source)  # a NIfTI's path, else the pixels read: given to the loader as they are
        return None, load(image, source), digests

    kind, (pixels, model_input, digests) = read_upload(data, settings, read)
    return Upload(kind, len(data), pixels, model_input, digests)


def read_upload(data: bytes, settings: ServeSettings, read: Callable[[Path | bytes, str], T]) -> tuple[str, T]:
    """The upload's kind and what ``read(source, kind)`` makes of it, after the checks every route
    shares: size, sniffing, DICOM de-identification, declared pixels / voxels. ``source`` is the bytes
    themselves for a PNG or JPEG (decoded from memory, never written), else the (de-identified) file in
    the private folder, deleted when ``read`` returns; ``read``'s ``MedvlError`` is a 422."""
    check_byte_size(len(data), settings)
    kind = sniff(data)
    if kind in (PNG, JPEG):
        width, height = _image_size(io.BytesIO(data), settings)
        _check_pixels(width * height, f"{width} x {height}", settings)
        return kind, rejecting(read, data, kind)
    with private_folder() as folder:
        path = folder / f"upload{SUFFIXES[kind]}"
        _write_private(path, data)
        if kind == DICOM:
            path = _deidentified(path)
        _check_declared_size(path, kind, settings)
        return kind, rejecting(read, path, kind)


def _write_private(path: Path, data: bytes) -> None:
    handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(handle, "wb") as stream:
        stream.write(data)


def _deidentified(raw: Path) -> Path:
    """The de-identified copy of an uploaded DICOM; the original is deleted first thing after. An upload whose
    identifiers the final scan still finds is refused (422), in the words of a request, not of a file run."""
    from ..clinical.deid import IdentifierSurvived, deidentify

    clean = raw.with_name("deidentified.dcm")
    try:
        deidentify(raw, clean)
    except IdentifierSurvived as error:
        raise UploadRejected(422, f"this DICOM upload was refused: after de-identification {error.what} still "
                                  f"appears in {error.where}") from None
    finally:
        raw.unlink(missing_ok=True)
    return clean


def _check_declared_size(path: Path, kind: str, settings: ServeSettings) -> None:
    if kind == DICOM:
        _check_dicom_size(path, settings)
    else:
        from ..clinical.nifti import TOO_LARGE, NiftiSlabs

        try:
            shape = NiftiSlabs(path).shape  # header only, with the reader's own 1 GiB guard
        except DataError as error:
            if error.problem.startswith(TOO_LARGE):  # too large, as for the service's own voxel limit
                raise UploadRejected(413, error.problem) from None
            raise
        plane = max(((shape[0], shape[1]), (shape[1], shape[2]), (shape[0], shape[2])), key=lambda p: p[0] * p[1])
        _check_pixels(plane[0] * plane[1], f"{plane[0]} x {plane[1]}", settings)  # a slice shown, whatever its axis
        _check_voxels(int(np.prod(shape)), " x ".join(map(str, shape)), settings)


def _image_size(stream: io.BytesIO, settings: ServeSettings) -> tuple[int, int]:
    """Width and height from the PNG / JPEG header; the pixels are not decoded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(stream) as image:
                return image.size
    except Image.DecompressionBombError:
        raise UploadRejected(413, f"image too large: its header declares over {2 * (Image.MAX_IMAGE_PIXELS or 0):,} "
                                  f"pixels (limit {settings.max_pixels:,})") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise UploadRejected(422, f"corrupt image header ({type(error).__name__})") from None


def _check_dicom_size(path: Path, settings: ServeSettings) -> None:
    from ..clinical.dicom import read_dataset

    ds = read_dataset(path, header_only=True)
    try:
        rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
        frames = int(str(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):  # the values themselves are not quoted: they came with the upload
        raise UploadRejected(422, "DICOM upload: Rows, Columns or Number of Frames is not a whole number") from None
    _check_pixels(rows * columns, f"{columns} x {rows}", settings)
    _check_voxels(frames * rows * columns, f"{frames} frames of {columns} x {rows}", settings)


def _check_pixels(pixels: int, shape: str, settings: ServeSettings) -> None:
    if pixels > settings.max_pixels:
        raise UploadRejected(413, f"image too large: {shape} pixels (limit {settings.max_pixels:,})")


def _check_voxels(voxels: int, shape: str, settings: ServeSettings) -> None:
    if voxels > settings.max_voxels:
        raise UploadRejected(413, f"volume too large: {shape} voxels (limit {settings.max_voxels:,})")


def read_pixels(source: Path | bytes, modality_values: bool = False, spatial_dims: int = 3) -> np.ndarray:
    """The decoded pixels of an upload (a PNG or JPEG's bytes, else its file), as a model of ``spatial_dims``
    reads them (``modality_values``: see ``read_image``; 2: ``read_image_2d``, a NIfTI of one slice as that
    slice and a volume refused; 3: a NIfTI volume as it is)."""
    from ..data.images import read_image, read_image_2d, read_image_bytes

    if isinstance(source, bytes):
        return read_image_bytes(source, "upload")
    reader = read_image_2d if spatial_dims == 2 else read_image
    return reader(source, modality_values=modality_values)


def rejecting(read: Callable[..., T], *args) -> T:
    """``read(*args)``; a reader's failure becomes a 422 with its reason (never the temp path)."""
    try:
        return read(*args)
    except UploadRejected:
        raise
    except DataError as error:
        raise UploadRejected(422, error.problem) from None
    except MedvlError as error:
        raise UploadRejected(422, str(error)) from None
