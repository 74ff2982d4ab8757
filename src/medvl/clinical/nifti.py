"""NIfTI input (``.nii``, ``.nii.gz``): a 3D volume in RAS orientation and its voxel spacing.

``read_nifti(path) -> (volume, spacing)``:

- ``volume``: ``DxHxW`` ``float32`` (scl_slope / scl_inter applied), reoriented to the closest
  canonical RAS+ orientation with nibabel: axis 0 runs inferior -> superior, axis 1 posterior ->
  anterior, axis 2 patient left -> right (that is, nibabel's ``(x, y, z)`` array transposed to
  ``(z, y, x)``);
- ``spacing``: ``(dz, dy, dx)`` in mm, in the same axis order: the voxel sizes of the affine the volume is oriented
  by (nibabel's best affine: the sform when its code is set, else the qform, else pixdim; its column lengths, which
  are pixdim unless a tool rewrote the sform alone), in the spatial unit the header's ``xyzt_units`` names (metres and
  microns converted to mm; no unit, code 0, taken as mm, as nibabel and most tools take it; a code that is no length
  unit refused).

Dimensions of size 1 after the third are dropped (a 4D file with one volume, a 5D ``X x Y x Z x 1 x 1``);
a 2D file becomes one slice; a time series, vector, RGB or complex data is refused, so are NaN or
infinite voxels and values beyond the float32 range (a scl_slope / scl_inter that takes them there is named),
a singular affine (no orientation) or one nibabel cannot compute, a scl_inter it cannot apply, voxel sizes that
are not positive numbers, a vox_offset that is not a finite number and voxel data said to start inside the header
(vox_offset 0: nibabel would read the header as voxels). Decompression bombs are refused before decompressing:
the header is read first (348 bytes for NIfTI-1, 540 for NIfTI-2) and the declared voxel data (shape x bytes per
voxel) is checked against ``MAX_DECODED_BYTES``; then exactly the declared number of bytes is read from the gzip
stream (and one more, so that a gzip file ending there has its length and CRC checked), so trailing data is never
decompressed.
Every failure is a ``DataError`` naming the file.
"""

from __future__ import annotations

import gzip
import io
import math
import struct
import zlib
from pathlib import Path
from typing import NamedTuple, NoReturn

import numpy as np

from ..errors import DataError
from .formats import INSTALL_HINT

MAX_DECODED_BYTES = 1 << 30  # declared voxel data (and the float32 volume) above 1 GiB is refused
MAX_HEADER_EXTENSION_BYTES = 16 << 20  # vox_offset beyond the header: extensions, at most 16 MiB
_HEADER_SIZES = {348: 1, 540: 2}  # sizeof_hdr -> NIfTI version
# xyzt_units' spatial code (its low 3 bits) -> mm per unit: 0 unknown (taken as mm), 1 meter, 2 mm, 3 micron
_MM_PER_SPATIAL_UNIT = {0: 1.0, 1: 1000.0, 2: 1.0, 3: 0.001}


TOO_LARGE = "volume too large"  # how a volume over MAX_DECODED_BYTES is refused (the service answers 413)

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


def _check_stream_end(stream, path: Path) -> None:
    """Read one byte past the voxel data: at the end of a gzip file this checks its length and CRC
    (a cut or corrupted file fails here); trailing data beyond that one byte is never decompressed."""
    try:
        stream.read(1)
    except (OSError, EOFError, zlib.error) as error:
        raise DataError(path, f"corrupt or truncated gzip stream after the voxel data ({error})") from None


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
    decoded = voxels * max(dtype.itemsize, 4)  # read as float32 at least
    if decoded > MAX_DECODED_BYTES:
        raise DataError(path, f"{TOO_LARGE}: header declares {'x'.join(map(str, shape))} voxels of {dtype}, "
                              f"{decoded:,} bytes once decoded (as float32 at least; limit {MAX_DECODED_BYTES:,}), "
                              "refused before decompressing")
    declared = float(header["vox_offset"])  # a float in NIfTI-1: nibabel's int() of NaN / infinity raises
    if not math.isfinite(declared):
        raise DataError(path, f"broken NIfTI header: voxel data offset {declared}")
    offset = int(header.get_data_offset())
    if offset < header.single_vox_offset:  # nibabel reads an offset of 0 from byte 0: the header as voxels
        raise DataError(path, f"broken NIfTI header: voxel data offset {offset:,}; a single-file NIfTI stores its "
                              f"voxels from byte {header.single_vox_offset} or later")
    if offset > MAX_HEADER_EXTENSION_BYTES:
        raise DataError(path, f"broken NIfTI header: voxel data offset {offset:,} bytes")
    return shape, dtype, offset


def _bounded_bytes(nib, path: Path):
    """The checked header and the file's bytes: the header, then exactly the declared bytes (never more) from the
    (gzip) stream."""
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
            total = offset + math.prod(shape) * dtype.itemsize  # offset: past the header (_declared_layout)
            raw = head + _read_exactly(stream, total - size, path, "voxel data")
            _check_stream_end(stream, path)
            return header, raw
    except OSError as error:
        raise DataError(path, f"cannot read the file ({error})") from None


def _to_volume(path: Path, data: np.ndarray) -> np.ndarray:
    """The (i, j, k) voxel array as ``DxHxW`` (k, j, i), its shape made 3D by ``_volume_shape``."""
    return np.ascontiguousarray(data.reshape(_volume_shape(path, data.shape)).transpose(2, 1, 0))


def _ras_orientation(nib, path: Path, affine: np.ndarray) -> tuple[tuple[int, ...], tuple[bool, ...]]:
    """Per voxel axis (i, j, k): the RAS axis it becomes in the closest canonical orientation (nibabel's
    ``io_orientation``, as ``as_closest_canonical`` uses) and whether it is reversed. A singular affine (all
    zeros, or two voxel axes along one direction) leaves an axis without a direction: ``DataError``."""
    try:
        orientation = nib.orientations.io_orientation(affine)
    except Exception as error:  # noqa: BLE001 - a non-finite affine fails nibabel's SVD
        raise DataError(path, f"cannot read the NIfTI image: its affine cannot be oriented ({type(error).__name__}: "
                              f"{error})") from None
    if np.isnan(orientation).any():
        raise DataError(path, "cannot read the NIfTI image: its affine (sform / qform) is singular, so a voxel axis "
                              "has no direction in space")
    return (tuple(int(axis) for axis in orientation[:, 0]), tuple(bool(flip < 0) for flip in orientation[:, 1]))


class _Geometry(NamedTuple):
    """What both readers take from a header beyond the voxel layout."""

    slope: float  # scl_slope, 1 when the file does not scale
    inter: float  # scl_inter, 0 when the file does not scale
    ras_axes: tuple[int, ...]  # per voxel axis (i, j, k): the RAS axis it becomes (``_ras_orientation``)
    ras_flips: tuple[bool, ...]  # per voxel axis: whether it is reversed
    zooms: tuple[float, float, float]  # per voxel axis (i, j, k): the voxel size, mm, of the affine used
    mm_per_unit: float  # the header's spatial unit (xyzt_units) in mm: the voxel sizes times this are mm


def _mm_per_unit(path: Path, header) -> float:
    """The size in mm of the spatial unit the header's ``xyzt_units`` names (``_MM_PER_SPATIAL_UNIT``); a code that
    is no length unit (4 to 7) is a ``DataError``."""
    code = int(header["xyzt_units"]) & 0x07  # the high bits are the time unit
    if code not in _MM_PER_SPATIAL_UNIT:
        raise DataError(path, f"broken NIfTI header: xyzt_units names spatial unit code {code}, not a length unit "
                              "(0 unknown, 1 meter, 2 mm, 3 micron)")
    return _MM_PER_SPATIAL_UNIT[code]


def _geometry(nib, path: Path, header) -> _Geometry:
    """The scaling and orientation of a header, and its voxel sizes, checked the same way for both readers, so that they
    refuse the same files in the same words: a scl_inter that nibabel cannot use (NaN or infinite beside a valid
    slope), an affine it cannot compute (an impossible qform quaternion) or orient (singular), voxel sizes
    that are not finite and positive, and a spatial unit that is not a length (``_mm_per_unit``). The voxel sizes
    come back in mm, whatever unit the header states them in."""
    try:
        slope, inter = header.get_slope_inter()
        affine = header.get_best_affine()
        zooms = [float(z) for z in header.get_zooms()[:3]]
    except Exception as error:  # noqa: BLE001 - nibabel's header / affine errors
        raise DataError(path, f"cannot read the NIfTI image ({type(error).__name__}: {error})") from None
    zooms += [1.0] * (3 - len(zooms))  # a 2D file: one slice
    ras_axes, ras_flips = _ras_orientation(nib, path, affine)
    mm_per_unit = _mm_per_unit(path, header)
    zooms = [z * mm_per_unit for z in zooms]
    if any(not np.isfinite(z) or z <= 0 for z in zooms):
        raise DataError(path, f"broken NIfTI header: voxel sizes {zooms} mm")
    sizes = _affine_voxel_sizes(affine, zooms, mm_per_unit)
    return _Geometry(1.0 if slope is None else float(slope), 0.0 if inter is None else float(inter),
                     ras_axes, ras_flips, sizes, mm_per_unit)


def _affine_voxel_sizes(affine: np.ndarray, pixdim_mm: list[float], mm_per_unit: float) -> tuple[float, float, float]:
    """Per voxel axis (i, j, k): the voxel size in mm of the affine the volume is oriented by (its column lengths, as
    nibabel's ``voxel_sizes`` and MONAI's ``affine_to_spacing`` take it). When the sform is used and was rewritten
    without pixdim (after a registration, say), pixdim is the qform's scale, not the geometry the volume is oriented
    by; where the two agree (to float32 rounding of a rotated affine) pixdim's exact value is kept."""
    lengths = np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0)) * mm_per_unit
    sizes = [z if math.isclose(z, length, rel_tol=1e-4) else float(length) for z, length in zip(pixdim_mm, lengths,
                                                                                                     strict=True)]
    return sizes[0], sizes[1], sizes[2]


def read_nifti(path: str | Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Read a ``.nii`` / ``.nii.gz`` file into a RAS ``DxHxW`` float32 volume and its spacing (mm, whatever spatial
    unit the header's ``xyzt_units`` names)."""
    path = Path(path)
    nib = _require_nibabel(path)
    if not path.is_file():
        raise DataError(path, "file not found" if not path.exists() else "is a folder, not a NIfTI file")
    header, raw = _bounded_bytes(nib, path)
    geometry = _geometry(nib, path, header)  # the streamed reader's checks, in the same words
    image_class = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
    try:
        stored = image_class.from_bytes(raw)
        with np.errstate(over="ignore", invalid="ignore"):  # values beyond float32: _check_finite names the cause
            data = nib.as_closest_canonical(stored).get_fdata(dtype=np.float32)
    except Exception as error:  # noqa: BLE001 - nibabel's header / affine errors
        raise DataError(path, f"cannot read the NIfTI image ({type(error).__name__}: {error})") from None
    if not np.isfinite(data).all():
        _refuse_not_finite(path, np.asanyarray(stored.dataobj.get_unscaled()), geometry)
    return _to_volume(path, data), _ras_spacing(geometry)


def _refuse_not_finite(path: Path, stored: np.ndarray, geometry: _Geometry) -> NoReturn:
    """The ``DataError`` for a volume whose float32 values are not all finite, naming the cause: NaN or infinite
    stored voxels, a scl_slope / scl_inter that takes finite stored values beyond the float32 range, or stored
    (float64) values beyond it."""
    if stored.dtype.kind == "f" and not np.isfinite(stored).all():
        raise DataError(path, "volume contains NaN or infinite values")
    if geometry.slope != 1.0 or geometry.inter != 0.0:
        raise DataError(path, f"scl_slope {geometry.slope:g} / scl_inter {geometry.inter:g} take the stored values "
                              "beyond the float32 range")
    raise DataError(path, f"stored {stored.dtype} values beyond the float32 range")


def _ras_spacing(geometry: _Geometry) -> tuple[float, float, float]:
    """``(dz, dy, dx)`` in mm: the voxel sizes of the voxel axes that become RAS z, y and x."""
    dz, dy, dx = (geometry.zooms[geometry.ras_axes.index(ras)] for ras in (2, 1, 0))
    return dz, dy, dx


class NiftiSlabs:
    """A NIfTI volume read slab by slab, for bounded memory on large volumes.

    The header is read and checked on construction (the same limits as ``read_nifti``); ``slabs``
    then streams the voxel data along the third voxel axis (NIfTI stores it slowest, so a slab is
    contiguous bytes), ``max_voxels`` at a time, as float32 arrays ``(k, j, i)`` with scl_slope /
    scl_inter applied; after the last slab one more byte is read, so a gzip file's length and CRC are
    checked as ``read_nifti`` checks them. ``ras_axes[n]`` and ``ras_flips[n]`` say which RAS axis (0 = x,
    1 = y, 2 = z) voxel axis ``n`` becomes in ``read_nifti``'s canonical orientation, and whether it is reversed.
    The same files are refused, in the same words, as by ``read_nifti``.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        nib = _require_nibabel(self.path)
        if not self.path.is_file():
            raise DataError(self.path, "file not found" if not self.path.exists() else "is a folder, not a NIfTI file")
        try:
            with _open(self.path) as stream:
                head = _read_exactly(stream, 4, self.path, "header")
                header_class, self._header_size = _parse_header(nib, self.path, head)
                head += _read_exactly(stream, self._header_size - 4, self.path, "header")
        except OSError as error:
            raise DataError(self.path, f"cannot read the file ({error})") from None
        try:
            header = header_class.from_fileobj(io.BytesIO(head), check=True)
        except Exception as error:  # noqa: BLE001 - HeaderDataError and friends
            raise DataError(self.path, f"broken NIfTI header ({type(error).__name__}: {error})") from None
        shape, self.dtype, self._offset = _declared_layout(self.path, header)
        self.shape = _volume_shape(self.path, shape)  # (i, j, k)
        self._geometry = geometry = _geometry(nib, self.path, header)
        self._slope, self._inter = geometry.slope, geometry.inter
        self.ras_axes, self.ras_flips = geometry.ras_axes, geometry.ras_flips
        self.spacing = _ras_spacing(geometry)  # (dz, dy, dx) in mm, as ``read_nifti`` gives it

    def slabs(self, max_voxels: int = 4 << 20):
        """Yield float32 ``(k, j, i)`` slabs of consecutive third-axis slices, in file order."""
        ni, nj, nk = self.shape
        per_slab = max(1, max_voxels // (ni * nj))
        slice_bytes = ni * nj * self.dtype.itemsize
        try:
            with _open(self.path) as stream:
                _read_exactly(stream, self._offset, self.path, "header")
                for start in range(0, nk, per_slab):
                    count = min(per_slab, nk - start)
                    raw = _read_exactly(stream, count * slice_bytes, self.path, "voxel data")
                    stored = np.frombuffer(raw, dtype=self.dtype).reshape(count, nj, ni)
                    with np.errstate(over="ignore", invalid="ignore"):  # beyond float32: _refuse_not_finite says so
                        slab = stored.astype(np.float32)
                        if self._slope != 1.0 or self._inter != 0.0:
                            slab = slab * np.float32(self._slope) + np.float32(self._inter)
                    if not np.isfinite(slab).all():
                        _refuse_not_finite(self.path, stored, self._geometry)
                    yield slab
                _check_stream_end(stream, self.path)  # a gzip file's CRC and length, as read_nifti checks them
        except OSError as error:
            raise DataError(self.path, f"cannot read the file ({error})") from None


    def middle_slice(self, max_voxels: int = 1 << 20) -> tuple[np.ndarray, int]:
        """``read_nifti``'s middle axial slice, ``volume[depth // 2]`` of its RAS ``DxHxW`` volume (float32
        ``HxW``), and ``depth``, read slab by slab: the whole file is read and checked as ``slabs`` does, but
        only the slice is kept, so a preview of a large volume costs a slab's memory, not the volume's."""
        ni, nj, nk = self.shape
        axis = self.ras_axes.index(2)  # the voxel axis (i, j, k) that becomes z
        depth = self.shape[axis]
        index = depth - 1 - depth // 2 if self.ras_flips[axis] else depth // 2
        parts, start = [], 0
        for slab in self.slabs(max_voxels):  # (k, j, i)
            if axis == 2:
                if start <= index < start + len(slab):
                    parts.append(slab[index - start].copy())
            else:
                parts.append(slab[:, index, :].copy() if axis == 1 else slab[:, :, index].copy())
            start += len(slab)
        plane = parts[0] if axis == 2 else np.concatenate(parts)  # over the two other voxel axes, higher one first
        kept = [n for n in (2, 1, 0) if n != axis]
        for dim, n in enumerate(kept):
            if self.ras_flips[n]:
                plane = np.flip(plane, dim)
        if self.ras_axes[kept[0]] == 0:  # rows are x: RAS rows are y
            plane = plane.T
        return np.ascontiguousarray(plane), depth


def _volume_shape(path: Path, shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(i, j, k) of a file's voxel dimensions, the one rule of both readers: dimensions of size 1 after the
    third are dropped (a 4D file with one volume, a 5D ``X x Y x Z x 1 x 1``), a 2D file is one slice; any
    other dimension after the third (a time series, a vector or multi-channel image) is refused."""
    dims = list(shape)
    while len(dims) > 3 and dims[-1] == 1:
        dims.pop()
    if len(dims) > 3:
        raise DataError(path, f"expected a 3D volume, got shape {tuple(shape)} (a time series or multi-channel "
                              "image: pass one volume)")
    return tuple(dims + [1] * (3 - len(dims)))  # type: ignore[return-value]


def write_nifti(path: str | Path, volume: np.ndarray, spacing: tuple[float, float, float]) -> Path:
    """Write a RAS ``DxHxW`` volume (``read_nifti``'s layout) with its ``(dz, dy, dx)`` spacing in mm.

    The affine is axis-aligned RAS+, so ``read_nifti`` returns ``volume`` unchanged. ``.nii.gz``
    paths are gzip-compressed (level 1, no timestamp: same array, same bytes); the write is atomic.
    """
    from ..io import atomic_write_bytes

    path = Path(path)
    nib = _require_nibabel(path)
    if volume.ndim != 3:
        raise DataError(path, f"write_nifti expects a DxHxW volume, got shape {volume.shape}")
    dz, dy, dx = (float(s) for s in spacing)
    affine = np.diag([dx, dy, dz, 1.0])
    affine[:3, 3] = -0.5 * (np.array(volume.shape[::-1]) - 1) * np.array([dx, dy, dz])  # centre at 0 mm
    image = nib.Nifti1Image(np.ascontiguousarray(volume.transpose(2, 1, 0)), affine)
    image.header.set_xyzt_units("mm")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    data = image.to_bytes()
    if path.name.lower().endswith(".gz"):
        data = gzip.compress(data, compresslevel=1, mtime=0)
    return atomic_write_bytes(path, data)
