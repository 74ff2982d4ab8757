"""Display windows (VOI) for grayscale images: named CT presets and the DICOM window functions.

A window maps modality values (after rescale slope/intercept: Hounsfield units (HU) for CT) to
display intensities in ``[0, 1]``: values below ``center - width / 2`` become 0 (black), values
above ``center + width / 2`` become 1 (white), linearly in between (DICOM PS3.3 C.11.2.1.2).

Named presets, in HU, for CT (centre / width, the values commonly taught in radiology, e.g.
Radiopaedia's "windowing (CT)"):

=============  ======  =====  ==============================================
name           centre  width  shows
=============  ======  =====  ==============================================
lung           -600    1500   lung parenchyma, airways, pneumothorax
mediastinum    50      350    heart, vessels, lymph nodes
soft_tissue    50      400    abdomen / neck soft tissue
bone           400     1800   cortical and trabecular bone
brain          40      80     grey / white matter
subdural       80      200    thin extra-axial blood against the skull
=============  ======  =====  ==============================================

``render_preview(array, window=None, max_side=512, spacing=None)`` makes the 8-bit picture shown of an image
or a volume (its middle slice along axis 0, windowed or min-max scaled, given square pixels when ``spacing``
says its pixels are not, shrunk to ``max_side``): the service's previews and case thumbnails.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..errors import InputError


@dataclass(frozen=True)
class Window:
    """A VOI window in modality units (HU for CT)."""

    center: float  # window centre (level), modality units
    width: float  # window width, modality units; at least 1 for LINEAR, above 0 for LINEAR_EXACT and SIGMOID
    function: str = "LINEAR"  # DICOM VOI LUT Function: LINEAR, LINEAR_EXACT or SIGMOID
    name: str = ""  # preset name, "file" (from the DICOM header) or "" (given as numbers)

    def __post_init__(self):
        if not np.isfinite(self.center) or not np.isfinite(self.width):
            raise InputError(f"window centre/width must be finite numbers, got {self.center}/{self.width}")
        # PS3.3 C.11.2.1.2 / C.11.2.1.3: LINEAR needs a width of 1 or more, LINEAR_EXACT and SIGMOID any above 0
        too_narrow = self.width < 1 if self.function == "LINEAR" else self.width <= 0
        if too_narrow:
            raise InputError(f"window width must be >= 1 (> 0 for LINEAR_EXACT and SIGMOID), got {self.width}")
        if self.function not in VOI_FUNCTIONS:
            raise InputError(f"unknown VOI LUT function {self.function!r}; expected one of {', '.join(VOI_FUNCTIONS)}")

    def as_dict(self) -> dict:
        return {"center": self.center, "width": self.width, "function": self.function, "name": self.name}


VOI_FUNCTIONS = ("LINEAR", "LINEAR_EXACT", "SIGMOID")

WINDOW_PRESETS: dict[str, Window] = {
    "lung": Window(-600, 1500, name="lung"),
    "mediastinum": Window(50, 350, name="mediastinum"),
    "soft_tissue": Window(50, 400, name="soft_tissue"),
    "bone": Window(400, 1800, name="bone"),
    "brain": Window(40, 80, name="brain"),
    "subdural": Window(80, 200, name="subdural"),
}

WindowSpec = str | Window | Sequence[float]


# the blanks dropped around a preset name: ASCII's, the ones a JSON Schema pattern's (ECMAScript's) ``\s`` and
# Python's ``str.strip()`` agree on (they differ elsewhere, e.g. on U+FEFF and the controls U+001C-U+001F)
BLANKS = " \t\n\r\f\v"


def preset_key(name: str) -> str:
    """How a preset name is read: any case, '-' or a space for '_', ASCII blanks around dropped (``Soft Tissue``)."""
    return name.strip(BLANKS).lower().replace("-", "_").replace(" ", "_")


def preset_pattern(blank: bool = False) -> str:
    """A regular expression (ECMAScript's, as a JSON Schema ``pattern``) matching the names ``preset_key`` reads as a
    preset (with ``blank``, a blank name too: an API's "no preset"): what an API declares it takes, where a lower-case
    enum would refuse ``LUNG``."""
    def spelled(name: str) -> str:
        return "".join("[_ -]" if letter == "_" else f"[{letter.upper()}{letter}]" for letter in name)

    names = "|".join(spelled(name) for name in WINDOW_PRESETS)
    blanks = "[ \\t\\n\\r\\f\\v]*"
    return rf"^{blanks}({names}){'?' if blank else ''}{blanks}$"


def get_window(spec: WindowSpec) -> Window:
    """A ``Window`` from a preset name (``"lung"``), a ``Window`` or a ``(center, width)`` pair."""
    if isinstance(spec, Window):
        return spec
    if isinstance(spec, str):
        key = preset_key(spec)
        if key not in WINDOW_PRESETS:
            raise InputError(f"unknown window preset {spec!r}; choose from {', '.join(WINDOW_PRESETS)} "
                             "or give (center, width)")
        return WINDOW_PRESETS[key]
    values = list(spec)
    if len(values) != 2:
        raise InputError(f"a window is (center, width), got {values!r}")
    return Window(float(values[0]), float(values[1]))


def apply_window(values: np.ndarray, window: WindowSpec) -> np.ndarray:
    """Map modality values to display intensities in ``[0, 1]`` (float32) through ``window``.

    Follows DICOM PS3.3 C.11.2.1.2: LINEAR uses ``center - 0.5`` and ``width - 1`` (so a window
    of width 1 is a threshold), LINEAR_EXACT the plain centre and width, SIGMOID a logistic curve.
    """
    window = get_window(window)
    x = np.asarray(values, dtype=np.float64)
    c, w = window.center, window.width
    if window.function == "SIGMOID":
        out = 0.5 * (1.0 + np.tanh(2.0 * (x - c) / w))  # = 1 / (1 + exp(-4 (x - c) / w)), without overflowing exp
    elif window.function == "LINEAR_EXACT":
        out = (x - c) / w + 0.5
    elif w == 1:
        out = (x > c - 0.5).astype(np.float64)
    else:
        out = (x - (c - 0.5)) / (w - 1) + 0.5
    return np.clip(out, 0.0, 1.0).astype(np.float32)


# ------------------------------------------------------------------------------- display images

# Values that are already display intensities in [0, 1] (a DICOM file windowed by its reader):
# LINEAR_EXACT with centre 0.5 and width 1 maps [0, 1] onto itself.
DISPLAY_WINDOW = Window(0.5, 1.0, function="LINEAR_EXACT", name="display")


# A NIfTI header states no modality. A CT image in HU holds air (about -1000 HU) around the body or in the lungs,
# or padding below it; an MR's signal values, or values rescaled to [0, 1], never go below this: the CT presets
# would only turn them white.
HU_AIR_BELOW = -200.0


def holds_hu(image: np.ndarray) -> bool:
    """Whether ``image`` (modality values) looks like CT in HU, the unit of the presets: some finite value below
    ``HU_AIR_BELOW`` (air, or padding)."""
    values = np.asarray(image)
    finite = values[np.isfinite(values)]
    return bool(finite.size) and float(finite.min()) < HU_AIR_BELOW


def middle_slice(volume: np.ndarray) -> np.ndarray:
    """The slice at index ``D // 2`` along axis 0 of a ``DxHxW`` volume (axial slices for CT read by
    ``read_nifti`` or stacked by ``load_volume``, frames of a multi-frame DICOM); a 2D image as it is."""
    return volume[volume.shape[0] // 2] if _is_volume(volume) else volume


def radiological_view(ras_volume: np.ndarray) -> np.ndarray:
    """A RAS ``DxHxW`` volume (``read_nifti``'s layout: axis 1 posterior -> anterior, axis 2 the
    patient's left -> right) as axial images are read: anterior at the top, the patient's right on
    the viewer's left (rows and columns reversed; a view, nothing copied)."""
    return ras_volume[..., ::-1, ::-1]


def one_slice_view(ras_volume: np.ndarray) -> np.ndarray | None:
    """The one slice of a RAS ``DxHxW`` volume one voxel thick along an axis, as slices are read (``HxW``), or
    None for a volume of several slices along every axis. Each plane's two axes come reversed from RAS order:
    an axial slice (D of 1) as ``radiological_view`` shows it, anterior at the top and the patient's right on
    the viewer's left; a coronal one (H of 1) superior at the top, the patient's right on the viewer's left; a
    sagittal one (W of 1) superior at the top, anterior on the viewer's left. Axial first, then coronal, when
    the volume is one voxel thick along several axes."""
    for axis, size in enumerate(ras_volume.shape[:3]):
        if size == 1:
            return np.take(ras_volume, 0, axis=axis)[::-1, ::-1]
    return None


def to_uint8(image: np.ndarray, window: WindowSpec | None = None) -> np.ndarray:
    """Display values 0-255 of one 2D image (``HxW``, or ``HxWx3`` colour kept as it is).

    ``window``: a preset name, ``Window`` or ``(center, width)`` applied to modality values (HU for
    CT) by ``apply_window``; ``None``: ``uint8`` pixels as they are, any other type min-max scaled
    over the image (a constant image is black). Rounded to the nearest integer."""
    if image.ndim == 3:
        if window is not None:
            raise InputError("a window applies to grayscale values, not to a colour image")
        return np.asarray(image, dtype=np.uint8)
    if window is not None:
        return np.round(apply_window(image, window) * 255.0).astype(np.uint8)
    if image.dtype == np.uint8:
        return image
    values = np.asarray(image, dtype=np.float64)
    low, high = float(values.min()), float(values.max())
    scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
    return np.round(scaled * 255.0).astype(np.uint8)


def fit_within(image: np.ndarray, max_side: int) -> np.ndarray:
    """``image`` (``uint8`` ``HxW[x3]``) shrunk by area averaging so that its longest side is at most
    ``max_side`` pixels, aspect ratio kept; never enlarged."""
    height, width = image.shape[:2]
    if max(height, width) <= max_side:
        return image
    scale = max_side / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize(size, Image.Resampling.BOX))


def square_pixels(image: np.ndarray, spacing: Sequence[float], max_side: int) -> np.ndarray:
    """``image`` (``uint8`` ``HxW[x3]``) with square pixels, as a viewer shows it: ``spacing`` is its
    (row, column) pixel size in mm; the coarser axis is stretched to the finer one's pixel size (linear
    interpolation), then the whole shrunk to fit ``max_side`` if it must be. Square (or unusable) spacing:
    ``fit_within`` alone."""
    rows_mm, columns_mm = (float(value) for value in spacing)
    if not (np.isfinite(rows_mm) and np.isfinite(columns_mm) and rows_mm > 0 and columns_mm > 0) \
            or np.isclose(rows_mm, columns_mm, rtol=1e-3):
        return fit_within(image, max_side)
    finest = min(rows_mm, columns_mm)
    height, width = image.shape[0] * rows_mm / finest, image.shape[1] * columns_mm / finest
    scale = min(1.0, max_side / max(height, width))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize(size, Image.Resampling.BILINEAR))


def render_preview(array: np.ndarray, window: WindowSpec | None = None, max_side: int = 512,
                   spacing: Sequence[float] | None = None) -> np.ndarray:
    """The 8-bit image to show for a decoded image or volume: ``HxW`` or ``HxWx3`` ``uint8``.

    ``array``: a 2D image (``HxW``, or ``HxWx3`` ``uint8`` colour) or a volume (``DxHxW``, or
    ``DxHxWx3`` colour frames), of which the middle slice along axis 0 is shown (``middle_slice``);
    ``window`` as in ``to_uint8``; ``spacing``: the pixel size in mm, (row, column) of the slice shown (a
    volume's ``(dz, dy, dx)`` from ``read_nifti`` may be given whole: its last two are used), so that a slice
    of pixels longer one way than the other is shown with square pixels (``square_pixels``); the longest side
    is brought down to ``max_side`` (``fit_within``).
    """
    if max_side < 1:
        raise InputError(f"max_side must be >= 1, got {max_side}")
    image = middle_slice(np.asarray(array))
    if image.ndim not in (2, 3) or image.size == 0:
        raise InputError(f"cannot show an array of shape {np.shape(array)}: expected HxW, HxWx3 or a DxHxW volume")
    if spacing is not None:
        return square_pixels(to_uint8(image, window), tuple(spacing)[-2:], max_side)
    return fit_within(to_uint8(image, window), max_side)


def _is_volume(array: np.ndarray) -> bool:
    """``DxHxW`` (or ``DxHxWx3`` colour frames), not ``HxWx3`` colour."""
    return array.ndim == 4 or (array.ndim == 3 and not (array.shape[-1] == 3 and array.dtype == np.uint8))
