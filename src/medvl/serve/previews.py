"""Images to look at: an upload's preview and an indexed case's thumbnail, as 8-bit PNG bytes.

The pictures are made by the library (``medvl.clinical.windowing.render_preview``: the middle
axial slice of a volume, the window, the size); this module only reads the file the way its kind
needs and encodes the PNG. Both are patient data: rendered on request, answered with
``Cache-Control: no-store``, never kept (a PNG or JPEG upload is decoded from memory; a DICOM or
NIfTI upload's file lives in the private folder of ``uploads.read_upload`` and is deleted before the
answer is sent; nothing is written for a thumbnail).

How each kind is shown (``window``: a CT preset name of ``WINDOW_PRESETS``, or ``None``):

- DICOM (every kind): with square pixels, as a NIfTI slice is, from its Pixel Spacing (else Imager Pixel Spacing,
  else Pixel Aspect Ratio);
- DICOM grayscale: the preset on the modality values (HU: a preset on a file of another stated modality,
  MR or PET, is refused, 422); without one, the file's own
  VOI (Window Center / Width or VOI LUT), else min-max. MONOCHROME1 is inverted (white = dense).
  Multi-frame: the middle frame, frames in stored order, for axial frames and for frames that are no volume (cine,
  several planes); frames stored in another plane (a sagittal or coronal enhanced MR / CT) as one volume: the middle
  axial slice of the RAS volume a 3D model reads (``multiframe_volume``), shown as a NIfTI's is;
- NIfTI: the middle axial slice of the RAS volume, anterior up and the patient's right on the
  viewer's left, with square pixels (a slice of 5 x 1 mm voxels stretched along the 5 mm, as a viewer
  shows it); the preset, or min-max. The header states no modality: the presets are offered
  (``X-Preview-Presets: ct``) when the slice holds HU as CT does (``windowing.holds_hu``: air, some value
  below -200), not for another (an MR); a preset asked for is applied either way (a CT cropped to soft
  tissue holds no air);
- PNG / JPEG and colour DICOM: as stored (16-bit grayscale min-max scaled); a preset is refused
  (422): these hold no HU.

The answer's headers say what was shown: ``X-Preview-Window`` (the preset, ``file`` or ``none``),
``X-Preview-Slice`` (``index/slices`` of a volume or multi-frame file) and ``X-Preview-Presets``
(``ct`` when the CT presets apply to the file, else ``none``: the page then offers none).

A heatmap of ``/v1/explain`` is an RGBA PNG (``heatmap_overlay``) of the preview's shape
(``overlay_shape``: the image's rows x columns brought within ``PREVIEW_SIDE`` as the preview is; a NIfTI
slice or DICOM of pixels that are not square is shown stretched, the overlay not: lay it over the picture's box), to
lay over the image as shown: the min-max normalised map in the jet colours, its opacity growing
with the value (no evidence: transparent).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..clinical.windowing import (
    BLANKS,
    DISPLAY_WINDOW,
    WINDOW_PRESETS,
    Window,
    holds_hu,
    one_slice_view,
    preset_key,
    radiological_view,
    render_preview,
)
from ..errors import InputError
from .settings import ServeSettings
from .uploads import DICOM, NIFTI, NIFTI_GZ, UploadRejected, read_pixels, read_upload, rejecting

PREVIEW_SIDE = 512  # longest side of an upload's preview, pixels
THUMBNAIL_SIDE = 128  # longest side of a case's thumbnail, pixels
OVERLAY_OPACITY = 0.65  # opacity of a heatmap overlay where the map is highest
NO_WINDOW = "none"  # what ``Picture.window`` says when pixels are shown as stored / min-max scaled


@dataclass
class Picture:
    """A rendered image (patient data: never logged) and how it was made."""

    image: np.ndarray  # HxW or HxWx3 uint8
    window: str  # the preset's name, "file" (the DICOM header's VOI) or NO_WINDOW
    slice_index: int | None = None  # the slice shown, for a volume
    slices: int | None = None  # the volume's number of slices
    presets: bool = False  # whether the CT presets apply (HU: CT or unstated DICOM, NIfTI holding air in HU)

    def __repr__(self) -> str:
        return f"Picture(shape={self.image.shape}, window={self.window!r}, slice={self.slice_index}/{self.slices})"

    def headers(self) -> dict[str, str]:
        """What the answer says about the picture: the window, and the slice shown of a volume."""
        headers = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff", "X-Preview-Window": self.window,
                   "X-Preview-Presets": "ct" if self.presets else "none"}
        if self.slices is not None:
            headers["X-Preview-Slice"] = f"{self.slice_index}/{self.slices}"
        return headers


def parse_window(name: str | None) -> Window | None:
    """A CT preset by name (``lung``, ``soft_tissue``, ...), ``None`` for none; numbers are refused."""
    if name is None or not name.strip(BLANKS):
        return None
    key = preset_key(name)  # as ``get_window`` reads preset names
    if key not in WINDOW_PRESETS:
        raise InputError(f"unknown window preset; choose from {', '.join(WINDOW_PRESETS)}")
    return WINDOW_PRESETS[key]


def preview_upload(data: bytes, settings: ServeSettings, window: Window | None) -> tuple[str, Picture]:
    """The upload's kind and its preview (checked, de-identified and deleted as for every route)."""
    return read_upload(data, settings, lambda path, kind: _picture(path, kind, window, PREVIEW_SIDE))


def thumbnail_file(path: Path) -> Picture:
    """The thumbnail of an indexed case's image file (a file of the service's data root)."""
    from ..data.images import image_suffix

    kind = NIFTI if image_suffix(path) in (".nii", ".nii.gz") else "file"
    return rejecting(_picture, path, kind, None, THUMBNAIL_SIDE)


def _picture(source: Path | bytes, kind: str, window: Window | None, side: int) -> Picture:
    """The preview of an upload (its bytes for a PNG or JPEG, else its file) or of an indexed file."""
    if isinstance(source, bytes) or kind not in (DICOM, NIFTI, NIFTI_GZ):
        if window is not None:
            raise UploadRejected(422, "window presets apply to CT values (DICOM or NIfTI), not to a PNG or JPEG")
        return Picture(render_preview(read_pixels(source), None, side), NO_WINDOW)
    if kind == DICOM:
        return _dicom_picture(source, window, side)
    from ..clinical.nifti import NiftiSlabs

    volume = NiftiSlabs(source)  # read slab by slab: only the middle slice is kept
    depth, rows, columns = (volume.shape[volume.ras_axes.index(ras_axis)] for ras_axis in (2, 1, 0))
    if depth > 1 and 1 in (rows, columns):
        # one coronal or sagittal slice: shown as the models read it (``read_image_2d``), not as an axial row
        from ..clinical.nifti import read_nifti

        ras_volume, (dz, dy, dx) = read_nifti(source)
        image = one_slice_view(ras_volume)
        assert image is not None  # one voxel thick along y or x
        spacing: tuple[float, ...] = (dz, dx if rows == 1 else dy)
        depth = 1
    else:
        plane, depth = volume.middle_slice()
        image, spacing = radiological_view(plane), volume.spacing  # rows and columns reversed: spacing unchanged
    # the header states no modality: the presets are offered for a slice holding air in HU, not an MR's values; one
    # asked for is applied all the same (a CT cropped to soft tissue holds no air: the caller knows what it sent)
    presets = holds_hu(image)
    return Picture(render_preview(image, window, side, spacing=spacing), window.name if window else NO_WINDOW,
                   depth // 2, depth, presets=presets)


def _dicom_picture(path: Path, window: Window | None, side: int) -> Picture:
    """A DICOM file through its reader: windowed there (the preset, else the file's VOI), so that
    MONOCHROME1 is inverted after the window as the standard says."""
    from ..clinical.dicom import FILE_WINDOW, axial_plane, multiframe_volume, read_dicom
    from ..clinical.readers import color_to_uint8
    from ..data.images import check_finite

    array, meta = read_dicom(path, window=window if window is not None else FILE_WINDOW)
    check_finite(path, array)
    frames = int(meta["frames"])
    modality = str(meta.get("modality") or "").upper()
    presets = not meta["color"] and modality in ("", "CT")
    if meta["color"]:
        if window is not None:
            raise UploadRejected(422, "window presets apply to grayscale CT values, not to a colour image")
        array, used = color_to_uint8(array, meta["bits_stored"]), NO_WINDOW
    else:
        if window is not None and not presets:
            raise UploadRejected(422, f"window presets are CT windows in HU; this DICOM's modality is {modality}, "
                                 "whose values hold no HU: choose no preset (the file's own window)")
        used = window.name if window is not None else (FILE_WINDOW if meta["window"] else NO_WINDOW)
    display = DISPLAY_WINDOW if meta["window"] and not meta["color"] else None  # values already in [0, 1]
    # square pixels, as for a NIfTI slice: the spacing in mm (Pixel / Imager Pixel Spacing), else the Pixel Aspect Ratio
    spacing = meta["pixel_spacing_mm"] or meta["pixel_aspect_ratio"]
    orientation = meta["image_orientation"]
    if frames > 1 and not meta["color"] and orientation and len(orientation) == 6 and not axial_plane(orientation):
        placed = multiframe_volume(path, array)  # sagittal / coronal frames: the volume's middle axial slice, as NIfTI
        if placed is not None:
            volume, (_, dy, dx) = placed
            frames, array, spacing = len(volume), radiological_view(volume)[len(volume) // 2], [dy, dx]
    picture = Picture(render_preview(array, display, side, spacing=spacing), used, presets=presets)
    if frames > 1:
        picture.slice_index, picture.slices = frames // 2, frames
    return picture


def png_bytes(image: np.ndarray) -> bytes:
    """An 8-bit grayscale or RGB PNG of ``image``."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="PNG")
    return buffer.getvalue()


def overlay_shape(shape: tuple[int, ...], max_side: int = PREVIEW_SIDE) -> tuple[int, int]:
    """(rows, columns) of an image's preview: its own within ``max_side``, else scaled down to it
    (the rounding of ``clinical.windowing.fit_within``, so an overlay fits the preview pixel for pixel)."""
    height, width = int(shape[0]), int(shape[1])
    if max(height, width) <= max_side:
        return height, width
    scale = max_side / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def heatmap_overlay(heatmap: np.ndarray) -> np.ndarray:
    """(rows, columns, 4) uint8 RGBA of a heatmap: jet colours of the min-max normalised map, the
    alpha channel ``OVERLAY_OPACITY`` x the value (a constant map is fully transparent)."""
    from matplotlib import colormaps

    from ..explain.grounding import normalise_map

    values = normalise_map(heatmap)
    rgba = colormaps["jet"](values)
    rgba[..., 3] = OVERLAY_OPACITY * values
    return np.round(rgba * 255).astype(np.uint8)
