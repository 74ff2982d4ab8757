"""The clinical readers that ``medvl.data.images.read_image`` uses, kept light to import.

``pydicom`` and ``nibabel`` (the ``[clinical]`` extra) are imported only when a DICOM or NIfTI
file is read, so ``import medvl`` works without them. What ``read_image`` returns for them:

- DICOM grayscale with a window in its header (Window Center/Width or a VOI LUT): ``HxW`` ``uint8``
  display values, the file's first window applied and MONOCHROME1 inverted (white = dense), like
  an exported PNG; without a window: ``HxW`` ``float32`` modality values (HU for CT, MONOCHROME1
  inverted), which ``ImagePreprocessor`` min-max scales. ``read_image(path, modality_values=True)``
  (what a model with its own ``window`` pairs reads, ``ImagePreprocessor.read``) always gives the
  modality values (``read_dicom_values``): the model's windows win over the header's;
- DICOM colour (RGB, YBR, palette): ``HxWx3`` ``uint8``;
- DICOM multi-frame: the same per frame, stacked on a first axis (``frames x H x W[x3]``), which a
  2D model refuses with a clear error; an enhanced CT / MR whose frames are placed in space (orientation
  and a position per frame, every frame in one plane orientation) as the RAS volume ``read_nifti`` gives for
  the same voxels (``multiframe_to_ras``);
- NIfTI: a ``DxHxW`` ``float32`` volume in RAS orientation (for ``spatial_dims=3`` models).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from .dicom import FILE_WINDOW, multiframe_to_ras, read_dicom
from .formats import DICOM_SUFFIXES, NIFTI_SUFFIXES
from .nifti import read_nifti


def read_dicom_image(path: Path) -> np.ndarray:
    """``read_image``'s DICOM reader (conventions in the module docstring)."""
    array, meta = read_dicom(path, window=FILE_WINDOW)
    if meta["color"]:
        return color_to_uint8(array, meta["bits_stored"])
    array = multiframe_to_ras(path, array) if array.ndim == 3 else array
    if meta["window"] is not None:
        return np.round(array * 255.0).astype(np.uint8)
    return array


def read_dicom_values(path: Path) -> np.ndarray:
    """A DICOM file as modality values, whatever window its header holds: grayscale ``HxW`` (or
    ``frames x H x W``) ``float32`` (HU for CT, MONOCHROME1 inverted), colour as ``read_dicom_image``.
    For a model with its own windows (``ImageConfig.window``, in modality units), which must win over
    the window the technologist stored."""
    array, meta = read_dicom(path)
    if meta["color"]:
        return color_to_uint8(array, meta["bits_stored"])
    return multiframe_to_ras(path, array) if array.ndim == 3 else array


def read_nifti_image(path: Path) -> np.ndarray:
    """``read_image``'s NIfTI reader: the ``DxHxW`` float32 RAS volume."""
    return read_nifti(path)[0]


def color_to_uint8(array: np.ndarray, bits_stored: int) -> np.ndarray:
    """Colour pixels of ``bits_stored`` bits per sample as ``uint8``."""
    if array.dtype == np.uint8:
        return array
    top = float(2 ** max(int(bits_stored), 1) - 1)
    return np.round(np.clip(array.astype(np.float64) / top, 0.0, 1.0) * 255.0).astype(np.uint8)


def register_clinical_readers(register: Callable[[Iterable[str], Callable[[Path], np.ndarray]], None]) -> None:
    """Add the DICOM and NIfTI readers through ``medvl.data.images.register_reader``."""
    register(DICOM_SUFFIXES, read_dicom_image)
    register(NIFTI_SUFFIXES, read_nifti_image)
