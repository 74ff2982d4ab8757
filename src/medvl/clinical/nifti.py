"""NIfTI input (``.nii``, ``.nii.gz``): a 3D volume in RAS orientation and its voxel spacing.

``read_nifti(path) -> (volume, spacing)``:

- ``volume``: ``DxHxW`` ``float32`` (scl_slope / scl_inter applied), reoriented to the closest
  canonical RAS+ orientation with nibabel: axis 0 runs inferior -> superior, axis 1 posterior ->
  anterior, axis 2 patient left -> right (that is, nibabel's ``(x, y, z)`` array transposed to
  ``(z, y, x)``);
- ``spacing``: ``(dz, dy, dx)`` in mm, in the same axis order.

A 4D file with one volume is squeezed; a 2D file becomes one slice; a time series, RGB or complex
data is refused. Decompression bombs are refused before decompressing: the header is read first
(348 bytes for NIfTI-1, 540 for NIfTI-2) and the declared voxel data (shape x bytes per voxel) is
checked against ``MAX_DECODED_BYTES``; then exactly the declared number of bytes is read from the
gzip stream, so trailing data is never decompressed. Every failure is a ``DataError`` naming the
file.
"""

from __future__ import annotations

import gzip
import io
import math
import struct
import zlib
from pathlib import Path

import numpy as np

from ..errors import DataError
from .readers import INSTALL_HINT

MAX_DECODED_BYTES = 1 << 30  # declared voxel data (and the float32 volume) above 1 GiB is refused
MAX_HEADER_EXTENSION_BYTES = 16 << 20  # vox_offset beyond the header: extensions, at most 16 MiB
_HEADER_SIZES = {348: 1, 540: 2}  # sizeof_hdr -> NIfTI version


def _require_nibabel(path: Path):
    try:
        import nibabel
    except ImportError:
        raise DataError(path, f"reading NIfTI needs nibabel: {INSTALL_HINT}") from None
    return nibabel


def _open(path: Path):
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def _read_exactly(stream, size: int, path: Path, what: str) -> bytes:
    try:
        data = stream.read(size)
    except (OSError, EOFError, zlib.error) as error:  # gzip.BadGzipFile is an OSError
        raise DataError(path, f"corrupt or truncated gzip stream while reading the {what} ({error})") from None
    if len(data) < size:
        raise DataError(path, f"truncated file: the {what} needs {size:,} bytes, found {len(data):,}")
    return data


def _parse_header(nib, path: Path, head: bytes):
    """The NIfTI header class instance, its version and the header size."""
    for byteorder in ("<", ">"):
        size = struct.unpack(f"{byteorder}i", head[:4])[0]
        if size in _HEADER_SIZES:
            break
    else:
        raise DataError(path, "not a NIfTI file: broken header (sizeof_hdr is neither 348 nor 540)")
    header_class = nib.Nifti1Header if _HEADER_SIZES[size] == 1 else nib.Nifti2Header
    return header_class, size


def _declared_layout(path: Path, header) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, byte offset of the voxel data) after checking them against the limits."""
    magic = bytes(header["magic"]).rstrip(b"\x00")
    if magic in (b"ni1", b"ni2"):
        raise DataError(path, "header of a .hdr/.img pair, not a single-file NIfTI: convert it to .nii")
    try:
        shape = tuple(int(n) for n in header.get_data_shape())
        dtype = header.get_data_dtype()
    except Exception as error:  # noqa: BLE001 - nibabel raises several kinds for a bad header
        raise DataError(path, f"broken NIfTI header ({type(error).__name__}: {error})") from None
    if not shape or any(n <= 0 for n in shape):
        raise DataError(path, f"broken NIfTI header: invalid dimensions {shape}")
    if dtype.kind not in "biuf" or dtype.fields is not None:
        raise DataError(path, f"unsupported NIfTI voxel type {dtype} (need integer or float grayscale)")
    voxels = math.prod(shape)
    declared = voxels * dtype.itemsize
    if declared > MAX_DECODED_BYTES or voxels * 4 > MAX_DECODED_BYTES:
        raise DataError(path, f"volume too large: header declares {'x'.join(map(str, shape))} voxels of {dtype} "
                              f"({declared:,} bytes; limit {MAX_DECODED_BYTES:,}), refused before decompressing")
    offset = int(header.get_data_offset())
    if offset < 0 or offset > MAX_HEADER_EXTENSION_BYTES:
        raise DataError(path, f"broken NIfTI header: voxel data offset {offset:,} bytes")
    return shape, dtype, offset


def _bounded_bytes(nib, path: Path):
    """Read header, then exactly the declared bytes (never more) from the (gzip) stream."""
    try:
        with _open(path) as stream:
            head = _read_exactly(stream, 4, path, "header")
            header_class, size = _parse_header(nib, path, head)
            head += _read_exactly(stream, size - 4, path, "header")
            try:
                header = header_class.from_fileobj(io.BytesIO(head), check=True)
            except Exception as error:  # noqa: BLE001 - HeaderDataError and friends
                raise DataError(path, f"broken NIfTI header ({type(error).__name__}: {error})") from None
            shape, dtype, offset = _declared_layout(path, header)
            total = max(offset, size) + math.prod(shape) * dtype.itemsize
            return header_class, head + _read_exactly(stream, total - size, path, "voxel data")
    except OSError as error:
        raise DataError(path, f"cannot read the file ({error})") from None


def _to_volume(path: Path, data: np.ndarray) -> np.ndarray:
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim == 2:
        data = data[..., None]
    if data.ndim != 3:
        raise DataError(path, f"expected a 3D volume, got shape {data.shape} (a time series or multi-channel "
                              "image: pass one volume)")
    return np.ascontiguousarray(data.transpose(2, 1, 0))


def read_nifti(path: str | Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Read a ``.nii`` / ``.nii.gz`` file into a RAS ``DxHxW`` float32 volume and its spacing (mm)."""
    path = Path(path)
    nib = _require_nibabel(path)
    if not path.is_file():
        raise DataError(path, "file not found" if not path.exists() else "is a folder, not a NIfTI file")
    header_class, raw = _bounded_bytes(nib, path)
    image_class = nib.Nifti1Image if header_class is nib.Nifti1Header else nib.Nifti2Image
    try:
        image = nib.as_closest_canonical(image_class.from_bytes(raw))
        data = image.get_fdata(dtype=np.float32)
        zooms = [float(z) for z in image.header.get_zooms()[:3]]
    except Exception as error:  # noqa: BLE001 - nibabel's header / affine errors
        raise DataError(path, f"cannot read the NIfTI image ({type(error).__name__}: {error})") from None
    zooms += [1.0] * (3 - len(zooms))
    if any(not np.isfinite(z) or z <= 0 for z in zooms):
        raise DataError(path, f"broken NIfTI header: voxel sizes {zooms} mm")
    return _to_volume(path, data), (zooms[2], zooms[1], zooms[0])
