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
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import InputError


@dataclass(frozen=True)
class Window:
    """A VOI window in modality units (HU for CT)."""

    center: float  # window centre (level), modality units
    width: float  # window width, modality units; at least 1
    function: str = "LINEAR"  # DICOM VOI LUT Function: LINEAR, LINEAR_EXACT or SIGMOID
    name: str = ""  # preset name, "file" (from the DICOM header) or "" (given as numbers)

    def __post_init__(self):
        if not np.isfinite(self.center) or not np.isfinite(self.width):
            raise InputError(f"window centre/width must be finite numbers, got {self.center}/{self.width}")
        minimum = 0.0 if self.function == "LINEAR_EXACT" else 1.0
        if self.width < minimum or (self.function == "LINEAR_EXACT" and self.width == 0):
            raise InputError(f"window width must be >= 1 (> 0 for LINEAR_EXACT), got {self.width}")
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


def get_window(spec: WindowSpec) -> Window:
    """A ``Window`` from a preset name (``"lung"``), a ``Window`` or a ``(center, width)`` pair."""
    if isinstance(spec, Window):
        return spec
    if isinstance(spec, str):
        key = spec.strip().lower().replace("-", "_").replace(" ", "_")
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
        out = 1.0 / (1.0 + np.exp(-4.0 * (x - c) / w))
    elif window.function == "LINEAR_EXACT":
        out = (x - c) / w + 0.5
    elif w == 1:
        out = (x > c - 0.5).astype(np.float64)
    else:
        out = (x - (c - 0.5)) / (w - 1) + 0.5
    return np.clip(out, 0.0, 1.0).astype(np.float32)
