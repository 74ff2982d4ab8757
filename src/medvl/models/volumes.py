"""Volumes for 3D models: read, window and resize slab by slab, so memory stays bounded.

``load_volume(image, config)`` returns a ``(C, D, H, W)`` float32 tensor in [0, 1] of the model's
``config.volume_shape`` (RAS: axis 0 inferior -> superior, axis 1 posterior -> anterior, axis 2
the patient's left -> right, as ``medvl.clinical.nifti.read_nifti``; a DICOM series is brought to
the same orientation by ``medvl.clinical.dicom.load_volume``; an array is taken as RAS already).
Intensities:

- ``config.window`` pairs (HU for CT) give one channel each: values clipped to
  ``[center - width / 2, center + width / 2]`` and scaled to [0, 1] (DICOM LINEAR_EXACT), before
  any resampling so that bone or air never bleed into soft tissue;
- without a window, the resampled volume is min-max scaled (as 2D images are; ``unit_range``, which does not
  overflow when the values span more than float32 holds); a volume whose values overflow float32 when averaged
  (near +-3e38) is refused, so a model input is never NaN;
- 8-bit volumes (a ``uint8`` array, e.g. a colour multi-frame DICOM's frames) are divided by 255.

Every DICOM file and series reaches a 3D model as modality values (HU for CT), whether or not the model has
windows: an enhanced multi-frame file, the same acquisition as a series of slices and as NIfTI give one
model input (never the file's stored display window, which only a multi-frame file carries).

Resizing: each axis on its own (``_resize_axis``), area averaging when it shrinks (anti-aliased),
linear interpolation when it grows. The two are separable, so the order the axes are resized in does
not matter (up to float rounding): a NIfTI file stored sagittally, its axial copy and its
``read_nifti`` array give the same model input (the CLI and the service both stream a file: the service
gives an upload's private temporary file to the model's loader).

Memory: a NIfTI file is streamed from disk ``SLAB_VOXELS`` voxels at a time (its third voxel axis
is stored slowest); each slab is windowed and resized in-plane (its two stored axes) before the
next is read, and only the in-plane-resized stack is kept, so a 512 x 512 x 300 CT never exists in
memory as a whole (see docs/benchmarks.md for the peak RSS). Arrays and DICOM series are already in
memory as read; they are processed the same slab-wise way (axial slabs), which keeps the extra memory
to a slab. Files of 2D images (PNG, JPEG, ``.npy``: an HxW or HxWx3 image) are refused (``read_volume``), and so
is an array whose last axis is 3 or 4 (an HxWx3 colour image, whatever its dtype, e.g. from an ``.npz``).
The stack is finally resized along the remaining axis and, for NIfTI, brought to RAS like ``read_nifti`` does.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from ..data.images import image_suffix, read_image
from ..data.record import ImageSource, LoadableImage
from ..errors import DataError
from .config import ImageConfig

SLAB_VOXELS = 2 << 20  # voxels read and resampled at a time (8 MiB as float32)
_FLAT_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
Values = TypeVar("Values", np.ndarray, torch.Tensor)


def load_volume(image: ImageSource | str, config: ImageConfig, name: str | Path | None = None) -> torch.Tensor:
    """One volume (path, array or loadable object) as model-ready ``(C, D, H, W)`` in [0, 1]; ``name``: what an
    error names for an array (default ``<array>``)."""
    if isinstance(image, str | Path) and image_suffix(image) in (".nii", ".nii.gz"):
        return _nifti_volume(Path(image), config)
    source = (name or "<array>") if isinstance(image, np.ndarray) else image
    array = image if isinstance(image, np.ndarray) else read_volume(image, config)
    return _array_volume(_as_volume(array, source, config), source, config)


def read_volume(image: str | Path | LoadableImage, config: ImageConfig) -> np.ndarray:
    """The voxels a 3D model reads from a file (``read_image``; DICOM as modality values, as a DICOM series and
    NIfTI always are, so that without windows too one acquisition is min-max scaled from the same values in every
    format), after refusing the files that hold 2D images: PNG / JPEG / TIFF / BMP and ``.npy`` (``read_npy``
    reads one HxW or HxWx3 image, whatever its dtype; a volume on disk is NIfTI or a DICOM series). A folder is
    a DICOM series, stacked by ``medvl.clinical.dicom.load_volume`` as a dataset's series is (RAS, modality
    values): it must hold exactly one series."""
    if isinstance(image, str | Path) and Path(image).is_dir():
        from ..clinical.dicom import load_volume as stack_series

        return stack_series(image)[0]
    if isinstance(image, str | Path):
        suffix = image_suffix(image)
        if suffix in _FLAT_SUFFIXES:
            raise DataError(image, f"a 2D image file ({suffix}); this {config.arch} model takes 3D volumes "
                                   "(NIfTI .nii/.nii.gz, a DICOM series or a DxHxW array)")
        if suffix == ".npy":
            raise DataError(image, f"a .npy file holds a 2D image (HxW or HxWx3); this {config.arch} model takes 3D "
                                   "volumes: save one as NIfTI (medvl.clinical.nifti.write_nifti), or pass a DxHxW "
                                   "array")
    return read_image(image, modality_values=True)


def _as_volume(array: np.ndarray, source, config: ImageConfig) -> np.ndarray:
    """A DxHxW grayscale volume (an RGB volume DxHxWx3 is averaged to gray), or DataError. A last axis of 3 or 4 is
    colour whatever the dtype, as ``read_npy`` and the ``.npz`` loader read it: an HxWx3 array is a 2D RGB image,
    never a volume 3 voxels wide."""
    if array.ndim == 4 and array.shape[-1] in (3, 4):
        array = array[..., :3].mean(axis=-1, dtype=np.float32)
        if config.windows:
            raise DataError(source, "an RGB volume has no modality values to window; drop image.window")
    elif array.ndim == 3 and array.shape[-1] in (3, 4):
        raise DataError(source, f"a 2D RGB image {array.shape}; this {config.arch} model takes 3D volumes")
    if array.ndim == 2:
        raise DataError(source, f"a 2D image {array.shape}; this {config.arch} model takes 3D volumes: NIfTI, a "
                                "DICOM series (its folder: one slice of it is a 2D image) or a DxHxW array")
    if array.ndim != 3:
        raise DataError(source, f"image shape {array.shape} does not fit a 3D model (expected a DxHxW volume)")
    if min(array.shape) < 2:
        raise DataError(source, f"volume shape {array.shape} has a single slice; a 3D model needs a volume")
    if array.size == 0:
        raise DataError(source, "image has no voxels")
    return array


class _SlabResampler:
    """Collects slabs (k, j, i), each windowed and resized in-plane, then resizes along k."""

    def __init__(self, config: ImageConfig, target: tuple[int, int, int], eight_bit: bool):
        self.config, self.target, self.eight_bit = config, target, eight_bit
        self.parts: list[torch.Tensor] = []
        self.low, self.high = np.inf, -np.inf

    def add(self, slab: np.ndarray, source) -> None:
        if slab.dtype != np.uint8 and not np.isfinite(slab).all():
            raise DataError(source, "image contains NaN or infinite values")
        channels = torch.from_numpy(self._intensities(slab))  # (C, k, j, i)
        # the stored last axis first: it is contiguous (no copy to move it), and the second resize sees less
        self.parts.append(_resize_axis(_resize_axis(channels, 3, self.target[2]), 2, self.target[1]))

    def _intensities(self, slab: np.ndarray) -> np.ndarray:
        if self.eight_bit:
            return (slab.astype(np.float32) / 255.0)[None]
        values = slab.astype(np.float32, copy=False)
        if not self.config.windows:
            self.low, self.high = min(self.low, float(values.min())), max(self.high, float(values.max()))
            return values[None]
        channels = np.empty((len(self.config.windows), *values.shape), np.float32)
        for channel, (center, width) in zip(channels, self.config.windows, strict=True):
            np.subtract(values, center - width / 2.0, out=channel)  # in place: one slab-sized buffer a window
            channel /= width
            np.clip(channel, 0.0, 1.0, out=channel)
        return channels

    def finish(self, source) -> torch.Tensor:
        """The (C, D, H, W) volume in voxel order (k, j, i), values in [0, 1]; DataError naming ``source`` if a value
        is not finite (voxels near float32's limits that overflowed while resized)."""
        volume = _resize_axis(torch.cat(self.parts, dim=1), 1, self.target[0])
        if not self.eight_bit and not self.config.windows:
            volume = _min_max(volume, self.low, self.high)
        if not bool(torch.isfinite(volume).all()):
            raise DataError(source, "voxel values too large to resample (they overflow float32 when averaged); "
                                    "rescale the volume")
        return volume.clamp_(0.0, 1.0)


def _min_max(values: torch.Tensor, low: float, high: float) -> torch.Tensor:
    return unit_range(values, low, high) if high > low else torch.zeros_like(values)


def unit_range(values: Values, low: float, high: float) -> Values:
    """``(values - low) / (high - low)`` (``high > low``) for float32 arrays or tensors, without overflow: the span
    of finite float32 values can exceed float32's range (-3e38 .. 3e38 spans 6e38), which made every value NaN.
    Halved first, which is exact, so the result is the same wherever the plain formula does not overflow."""
    return (values * 0.5 - low * 0.5) / ((high - low) * 0.5)


def _resize_axis(values: torch.Tensor, axis: int, size: int) -> torch.Tensor:
    """``values`` (float32) resized along ``axis`` alone to ``size``: area averaging when the axis shrinks
    (anti-aliased), linear interpolation (``align_corners=False``) when it grows, unchanged when it keeps its
    length. Both are separable, so resizing one axis after another gives the same volume in any order: a file
    resized in its stored planes and its RAS array resized in axial planes reach the model alike."""
    length = values.shape[axis]
    if length == size:
        return values
    moved = values.movedim(axis, -1)
    lines = moved.reshape(-1, 1, length)
    if size < length:
        resized = F.interpolate(lines, size=size, mode="area")
    else:
        resized = F.interpolate(lines, size=size, mode="linear", align_corners=False)
    return resized.reshape(*moved.shape[:-1], size).movedim(-1, axis)


def _finish_channels(volume: torch.Tensor, config: ImageConfig) -> torch.Tensor:
    if volume.shape[0] == 1 and config.in_channels == 3:
        volume = volume.repeat(3, 1, 1, 1)
    return volume.contiguous()


def _array_volume(array: np.ndarray, source, config: ImageConfig) -> torch.Tensor:
    """A DxHxW array (already RAS) through the same slab-wise path."""
    depth, rows, cols = array.shape
    target_depth, target_rows, target_cols = config.volume_shape
    resampler = _SlabResampler(config, (target_depth, target_rows, target_cols), array.dtype == np.uint8)
    step = max(1, SLAB_VOXELS // (rows * cols))
    _feed(resampler, (array[start:start + step] for start in range(0, depth, step)), source)
    return _finish_channels(resampler.finish(source), config)


def _feed(resampler: _SlabResampler, slabs: Iterable[np.ndarray], source) -> None:
    for slab in slabs:
        resampler.add(slab, source)


def _nifti_volume(path: Path, config: ImageConfig) -> torch.Tensor:
    """Stream a NIfTI file slab by slab; the result is in RAS order like ``read_nifti``."""
    from ..clinical.nifti import NiftiSlabs

    volume = NiftiSlabs(path)
    ni, nj, nk = volume.shape
    if min(volume.shape) < 2:
        raise DataError(path, f"volume shape {(nk, nj, ni)} has a single slice; a 3D model needs a volume")
    depth, side = config.volume_shape[0], config.image_size
    size_of = [depth if volume.ras_axes[axis] == 2 else side for axis in range(3)]  # per voxel axis i, j, k
    target = (size_of[2], size_of[1], size_of[0])
    resampler = _SlabResampler(config, target, eight_bit=False)  # NIfTI holds modality values
    _feed(resampler, volume.slabs(SLAB_VOXELS), path)
    return _finish_channels(_to_ras(resampler.finish(path), volume.ras_axes, volume.ras_flips), config)


def _to_ras(volume: torch.Tensor, ras_axes: tuple[int, ...], ras_flips: tuple[bool, ...]) -> torch.Tensor:
    """(C, k, j, i) in voxel order -> (C, z, y, x) RAS, as nibabel's ``as_closest_canonical``."""
    by_voxel_axis = volume.permute(0, 3, 2, 1)  # (C, i, j, k)
    flips = [1 + axis for axis in range(3) if ras_flips[axis]]
    if flips:
        by_voxel_axis = by_voxel_axis.flip(flips)
    order = [ras_axes.index(ras) for ras in range(3)]  # the voxel axis that becomes x, y, z
    ras = by_voxel_axis.permute(0, *(1 + axis for axis in order))  # (C, x, y, z)
    return ras.permute(0, 3, 2, 1)
