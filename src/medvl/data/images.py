"""Read one 2D image file into a numpy array.

Array conventions (what every reader returns):

- grayscale: ``HxW``; ``uint8`` for 8-bit files, ``uint16`` for 16-bit files (X-ray PNG/TIFF keep
  their full range, no rescaling), ``int32`` / ``float32`` for 32-bit integer / float files;
- colour: ``HxWx3`` ``uint8`` RGB. RGBA, LA, palette (P), CMYK and other colour modes are
  converted (alpha is dropped, not composited);
- ``.npy`` arrays are returned as stored (``HxW`` or ``HxWx3``; ``HxWx1`` is squeezed);
- a PNG / JPEG / TIFF with an EXIF Orientation tag is turned upright, as a viewer shows it;
- a multi-frame TIFF is read as its first frame, with a warning; an animated PNG (APNG) is a ``DataError``: a
  browser or viewer shows its animation, which need not hold the default image a decoder reads;
- a 16-bit grayscale PNG with an alpha channel is read as 8-bit ``HxW``, with a warning (Pillow decodes
  it to 8 bits); so is a 16-bit colour (RGB / RGBA) PNG, as 8-bit ``HxWx3`` (the high byte of each sample), with a
  warning, and one whose values all lie below 256 (black at 8 bits, its data in the low bytes) is a ``DataError``
  rather than a black image.

Readers are chosen by file suffix through ``IMAGE_READERS``; more are added with
``register_reader``. The clinical readers are registered here: ``.dcm`` / ``.dicom`` (and files
with no known suffix that carry the DICOM ``DICM`` marker, sniffed only after the suffix lookup
fails) and ``.nii`` / ``.nii.gz``; their conventions (display-windowed DICOM, 3D NIfTI volumes) are
in ``medvl.clinical.readers``, and pydicom / nibabel are imported only when such a file is read.
Every failure is a ``DataError(path, problem)``; pixel data is never logged. Float pixels must
be finite: an image holding NaN or infinite values (a ``.npy``, a 32-bit float TIFF, a float DICOM
or NIfTI) is a ``DataError`` with their count, since one NaN pixel turns a batch's loss and every
metric into NaN.
"""

from __future__ import annotations

import hashlib
import io
import logging
import tokenize
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..clinical.dicom import frame_count
from ..clinical.formats import DICOM_SUFFIXES, NIFTI_SUFFIXES, has_dicom_preamble
from ..clinical.readers import read_dicom_values, register_clinical_readers
from ..clinical.windowing import one_slice_view
from ..errors import DataError
from .record import LoadableImage

log = logging.getLogger(__name__)

MAX_PIXELS = 100_000_000  # images above this (W*H) are refused as likely decompression bombs

ImageReader = Callable[[Path], np.ndarray]

_GRAY_MODES = {"L", "LA", "1", "La"}  # 8-bit grayscale, with or without alpha / 1-bit
_KEEP_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I", "F"}  # 16/32-bit grayscale kept as is
# Pillow decodes a 16-bit colour PNG to 8 bits with these raw modes: the high byte of each (big-endian) sample; the
# raw mode paired with each (meant for little-endian data) keeps the low byte instead
COLOUR_16_LOW_BYTE = {"RGB;16B": "RGB;16L", "RGBA;16B": "RGBA;16L"}


def _too_large(width: int, height: int) -> str | None:
    if width * height > MAX_PIXELS:
        return f"image too large: {width} x {height} pixels (limit {MAX_PIXELS:,} pixels)"
    return None


def _pil_to_array(img: Image.Image) -> np.ndarray:
    """Convert a loaded PIL image to HxW (grayscale) or HxWx3 (RGB)."""
    mode = img.mode
    if mode in _KEEP_MODES:
        array = np.asarray(img)
        return array.astype(array.dtype.newbyteorder("="))  # a writable native-order copy
    if mode in _GRAY_MODES:
        return np.array(img.convert("L"))
    if mode != "RGB":
        img = img.convert("RGB")
    return np.array(img)


def read_pil(path: Path) -> np.ndarray:
    """Read PNG / JPEG / BMP / TIFF with Pillow, forcing a full decode (truncated files fail)."""
    return _read_pil(path, path)


def read_image_bytes(data: bytes, name: str) -> np.ndarray:
    """Decode an image file's bytes held in memory (PNG, JPEG, ... as ``read_pil``), nothing written to
    disk; the same array conventions and checks as ``read_image``, errors naming ``name``."""
    if not data:
        raise DataError(name, "empty file (0 bytes)")
    return check_finite(name, _read_pil(io.BytesIO(data), name))


def _read_pil(source: Path | BinaryIO, name: str | Path) -> np.ndarray:
    """``source`` (a path or a binary stream) decoded by Pillow; ``DataError`` naming ``name``."""
    try:
        # Our own limit (MAX_PIXELS) is checked below with the exact size, so Pillow's lower
        # warning threshold is muted here only; its hard error still applies.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                problem = _too_large(*img.size)
                if problem:
                    raise DataError(name, problem)
                with _damaged_frame(name):  # n_frames parses every frame
                    frames = getattr(img, "n_frames", 1)  # multi-frame formats only (TIFF, GIF...)
                if frames > 1 and img.format == "PNG":
                    # a browser shows the animation, which need not hold the default image Pillow decodes: the
                    # reading page would show one picture and the model read another
                    raise DataError(name, f"an animated PNG of {frames} frames: send one image (a PNG without "
                                          "animation)")
                if frames > 1:
                    # not named: a dataset's image paths can carry patient or study ids
                    log.warning("an image of %d frames (a multi-frame TIFF or GIF): reading the first only", frames)
                rawmode = str(getattr(getattr(img, "png", None), "im_rawmode", ""))
                gray_alpha_16 = rawmode.startswith("LA;16")
                with _damaged_frame(name):
                    img.load()
                # upright as every viewer shows it (the reading page's browser too): a camera or phone JPEG
                # stores its pixels sideways with an EXIF Orientation tag
                upright = ImageOps.exif_transpose(img)
                if gray_alpha_16:  # Pillow decodes 16-bit grey + alpha as 8-bit RGBA: grey it stays
                    log.warning("a 16-bit grayscale PNG with an alpha channel: read at 8 bits (the decoder keeps "
                                "16 bits only without alpha); save it without alpha to keep its full range")
                    return np.array(upright.convert("L"))
                if rawmode in COLOUR_16_LOW_BYTE:
                    return _colour_16_high_bytes(source, name, rawmode, _pil_to_array(upright))
                return _pil_to_array(upright)
    except Image.DecompressionBombError:
        pillow_limit = 2 * (Image.MAX_IMAGE_PIXELS or 0)
        raise DataError(name, f"image too large: over {pillow_limit:,} pixels "
                              f"(limit {MAX_PIXELS:,} pixels)") from None
    except UnidentifiedImageError:
        raise DataError(name, "not a recognised image file (corrupt or wrong format)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise DataError(name, f"corrupt or truncated image ({error})") from None


@contextmanager
def _damaged_frame(name: str | Path) -> Iterator[None]:
    """Pillow's errors for a damaged frame beyond the OSError / ValueError / EOFError of other damage, as a
    ``DataError``: a TIFF frame (IFD) without its dimensions raises TypeError ("Missing dimensions"), a GIF frame
    cut off IndexError. Only around Pillow's parsing and decoding, so that a TypeError of medvl's own is no
    "corrupt image"."""
    try:
        yield
    except (TypeError, IndexError) as error:
        raise DataError(name, f"corrupt or truncated image ({type(error).__name__}: {error})") from None


def _colour_16_high_bytes(source: Path | BinaryIO, name: str | Path, rawmode: str, high: np.ndarray) -> np.ndarray:
    """``high``, a 16-bit RGB / RGBA PNG as Pillow decodes it (8 bits: the high byte of each sample), with a warning;
    a ``DataError`` when it is black but the file's low bytes are not (values all below 256, e.g. 8-bit data or a
    12-bit export scaled down written in 16-bit samples): training would see a black image, the audit a blank one."""
    log.warning("a 16-bit colour PNG: read at 8 bits (the decoder keeps 16 bits for grayscale only); save it at 8 "
                "bits per channel, or as 16-bit grayscale, to control how it is scaled")
    if high.any():
        return high
    if not isinstance(source, Path):
        source.seek(0)
    with Image.open(source) as again:  # decoded again, keeping the low byte of each sample this time
        again.tile = [tile._replace(args=COLOUR_16_LOW_BYTE[rawmode]) for tile in again.tile]
        again.load()
        if np.asarray(again).any():
            raise DataError(name, "a 16-bit colour PNG whose values all lie below 256 (of 65,535): read at 8 bits "
                                  "per channel it is black; save it at 8 bits per channel (or scale it to the 16-bit "
                                  "range)")
    return high


def read_npy(path: Path) -> np.ndarray:
    """Read a ``.npy`` array (no pickles) holding HxW, HxWx1 or HxWx3 pixels."""
    try:
        mapped = np.load(path, mmap_mode="r", allow_pickle=False)  # header only, size check first
    # TokenError, SyntaxError: numpy tokenizes a header literal_eval refused (unbalanced brackets fail there)
    except (OSError, ValueError, EOFError, tokenize.TokenError, SyntaxError) as error:
        raise DataError(path, f"not a readable .npy array ({error})") from None
    if not isinstance(mapped, np.ndarray) or mapped.dtype.kind not in "biuf":
        raise DataError(path, f"expected a numeric array, got dtype {mapped.dtype}")
    shape = mapped.shape
    if mapped.ndim == 3 and shape[2] == 1:
        mapped = mapped[:, :, 0]
    elif not (mapped.ndim == 2 or (mapped.ndim == 3 and shape[2] == 3)):
        raise DataError(path, f"expected an HxW or HxWx3 array, got shape {shape}")
    problem = _too_large(shape[1], shape[0])
    if problem:
        raise DataError(path, problem)
    if mapped.dtype == np.bool_:
        return mapped.astype(np.uint8) * 255
    return np.array(mapped)


IMAGE_READERS: dict[str, ImageReader] = {
    ".png": read_pil,
    ".jpg": read_pil,
    ".jpeg": read_pil,
    ".bmp": read_pil,
    ".tif": read_pil,
    ".tiff": read_pil,
    ".npy": read_npy,
}


def register_reader(suffixes: Iterable[str], reader: ImageReader) -> None:
    """Use ``reader`` for files ending in any of ``suffixes`` (e.g. ``.dcm``, ``.nii.gz``)."""
    for suffix in suffixes:
        IMAGE_READERS[suffix.lower()] = reader


register_clinical_readers(register_reader)


def image_suffix(path: str | Path) -> str:
    """The registered suffix a path ends with (``.nii.gz`` before ``.gz``), lower case, or ''."""
    name = Path(path).name.lower()
    matches = [suffix for suffix in IMAGE_READERS if name.endswith(suffix)]
    return max(matches, key=len, default="")


def is_image_file(path: str | Path) -> bool:
    """True if the path's suffix has a registered reader (the file is not opened)."""
    return image_suffix(path) != ""


def check_finite(path: object, pixels: np.ndarray) -> np.ndarray:
    """``pixels`` unchanged, or ``DataError`` when a float image holds NaN or infinite values."""
    if pixels.dtype.kind in "fc":
        bad = pixels.size - int(np.count_nonzero(np.isfinite(pixels)))
        if bad:
            raise DataError(str(path), f"{bad:,} pixel values are NaN or infinite")
    return pixels


def read_image(path: str | Path | LoadableImage, modality_values: bool = False) -> np.ndarray:
    """Read a 2D image file into an ``HxW`` (grayscale) or ``HxWx3`` (RGB) array.

    ``modality_values``: a grayscale DICOM file as its modality values (HU for CT) even when its
    header holds a window (by default that window is applied, giving ``uint8``), for a model that
    applies its own windows; other files are read the same either way.

    Raises ``DataError`` naming the file if it is missing, empty, of an unsupported type,
    corrupt or truncated, or larger than ``MAX_PIXELS``. An image that is not one file (an object
    with a ``load()`` method, such as a DICOM series read as one volume,
    ``medvl.data.loaders.dicom.DicomVolume``) is read by its own ``load()``.
    """
    if isinstance(path, LoadableImage):
        return check_finite(path, path.load())
    path = Path(path)
    if not path.exists():
        raise DataError(path, "file not found")
    if path.is_dir():
        raise DataError(path, "is a folder, not an image file")
    suffix = image_suffix(path)
    if not suffix and has_dicom_preamble(path):
        suffix = ".dcm"  # extension-less or UID-named DICOM files
    if not suffix:
        raise DataError(
            path,
            f"unsupported file type {path.suffix or '(no suffix)'!r}; "
            f"supported: {', '.join(sorted(IMAGE_READERS))}",
        )
    if path.stat().st_size == 0:
        raise DataError(path, "empty file (0 bytes)")
    reader = read_dicom_values if modality_values and suffix in DICOM_SUFFIXES else IMAGE_READERS[suffix]
    return check_finite(path, reader(path))


def read_image_2d(path: str | Path | LoadableImage, modality_values: bool = False) -> np.ndarray:
    """``read_image`` for a 2D model. A NIfTI file is a volume (``DxHxW``, RAS): a file one voxel thick along an
    axis (one axial, coronal or sagittal slice) comes back as that ``HxW`` slice in its plane's reading
    orientation (``one_slice_view``: an axial one as the reading page shows it, anterior at the top and the
    patient's right on the viewer's left); a volume of several slices along every axis is a ``DataError``, never
    read as a colour image because its last axis happens to be 3 or 4 voxels wide. A multi-frame DICOM
    (``frames x H x W[x3]``) is a ``DataError`` too: grey frames 3 or 4 columns wide would pass for one colour
    image (its header's Number of Frames tells them from one, not the shape)."""
    array = read_image(path, modality_values=modality_values)
    if isinstance(path, LoadableImage):
        return array
    suffix = image_suffix(path)
    if suffix in DICOM_SUFFIXES or (not suffix and has_dicom_preamble(path)):
        return _one_dicom_frame(Path(path), array)
    if suffix not in NIFTI_SUFFIXES:
        return array
    plane = one_slice_view(array)
    if plane is None:
        raise DataError(path, f"a NIfTI volume of {array.shape[0]} slices (shape {array.shape}): a 2D model reads "
                              "one image; use a 3D model (spatial_dims=3) or a file one voxel thick along an axis "
                              "(one axial, coronal or sagittal slice)")
    return np.ascontiguousarray(plane)


def _one_dicom_frame(path: Path, array: np.ndarray) -> np.ndarray:
    """A DICOM file's ``HxW[x3]`` image, or ``DataError`` for a multi-frame one (``read_image_2d``); the header is
    read again only for an array that could be either (``HxWx3`` colour, or grey frames)."""
    frames = array.shape[0] if array.ndim == 4 else frame_count(path) if array.ndim == 3 else 1
    if frames > 1:
        raise DataError(path, f"a multi-frame DICOM of {frames} frames (shape {array.shape}): a 2D model reads one "
                              "image; use a 3D model (spatial_dims=3) or a file of one frame")
    return array


def pixel_sha256(pixels: np.ndarray, spatial_dims: int = 2) -> str:
    """Hash of the decoded image as the model reads its channels (dtype, shape, pixels of ``model_channels``): equal
    for the same picture saved twice under different names or compressions, or a grey picture saved as RGB; different
    after any change of a pixel. ``spatial_dims``: the model's (3: a volume, hashed as it is)."""
    return array_sha256(model_channels(pixels, spatial_dims))


def array_sha256(pixels: np.ndarray) -> str:
    """Hash of an array as it is: its dtype, shape and values."""
    digest = hashlib.sha256(f"{pixels.dtype.str}{pixels.shape}".encode())
    digest.update(np.ascontiguousarray(pixels).tobytes())
    return digest.hexdigest()


def model_channels(pixels: np.ndarray, spatial_dims: int = 2) -> np.ndarray:
    """A 2D image as a model's channel conversion sees it (``ImagePreprocessor``: grey is repeated into RGB, alpha
    dropped, RGB averaged into grey): a colour image (``HxWx3``, or ``HxWx4`` with alpha) whose three colour channels
    are equal is its one grey channel (``HxW``), so that a grey X-ray re-saved as RGB, as many viewers and PACS
    exports write it, is the picture it was; any other array (a volume, ``spatial_dims`` 3) as it is."""
    if spatial_dims != 2 or pixels.ndim != 3 or pixels.shape[-1] not in (3, 4):
        return pixels
    grey = pixels[..., 0]
    if np.array_equal(pixels[..., 1], grey) and np.array_equal(pixels[..., 2], grey):
        return grey
    return pixels
