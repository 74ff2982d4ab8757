"""Corruption robustness of zero-shot classification: metrics as images degrade, per kind and severity.

``corrupt`` scales an image to [0, 1] (uint8 / 255; any other dtype by its own min-max), applies one
corruption with MONAI transforms (Pillow for JPEG), clips to [0, 1] and maps back to the input's
dtype and range. Severities 1-5 set one parameter per kind (ImageNet-C's scheme; blur's sigma relative to
the image's shorter side):

===========  ==========================================  =====  =====  =====  =====  =====
kind         parameter                                   1      2      3      4      5
===========  ==========================================  =====  =====  =====  =====  =====
noise        Gaussian noise std, share of the range      0.04   0.08   0.12   0.18   0.26
blur         Gaussian sigma, share of the shorter side   0.005  0.01   0.015  0.02   0.03
contrast     contrast kept around the image mean         0.6    0.45   0.3    0.2    0.1
gamma        gamma applied to the min-max scaled image   1.25   1.5    2.0    2.5    3.0
jpeg         JPEG quality (8-bit, Pillow)                60     40     25     15     8
rotation     degrees (sign from the seed; corners 0)     5      10     15     20     30
crop         share of each side kept (centre), resized   0.95   0.9    0.85   0.8    0.7
===========  ==========================================  =====  =====  =====  =====  =====

Only ``noise`` and ``rotation`` draw random numbers, from ``seed``. An image with no intensity range
(constant, not uint8) is returned unchanged. JPEG works on 8 bits: a 16-bit or float image also
loses its fine intensity steps, which is part of that corruption.

``corruption_curves`` corrupts each image in the model's input space: the file is first brought to 8-bit
pixels at the model's input size that its preprocessor reads as it reads the file (``model_sized``: a medvl
model's intensity scaling, then its area resize; a transformers processor's resize, before its centre crop),
then corrupted, so a severity means the same damage at every native size. Corrupted at its native size, a
1024 px film's per-pixel noise and 8x8-block JPEG artefacts would be mostly averaged away by the model's
resize (noise at severity 5 would reach a 64 px model weaker than severity 1 on a 64 px film). The clean figures are
scored from the same resized images.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image

from ..data import captions_for
from ..data.captions import CaptionConfig
from ..data.record import Dataset
from ..embed import embed_images
from ..errors import InputError
from ..models.adapters import HFImagePreprocessor, rgb_uint8
from ..models.dual import DualEncoder
from ..models.preprocess import ImagePreprocessor, read_for
from ..progress import progress_bar
from .zero_shot import zero_shot

CORRUPTIONS = ("noise", "blur", "contrast", "gamma", "jpeg", "rotation", "crop")
SEVERITIES = (1, 2, 3, 4, 5)
# kind -> (parameter name, its value at severities 1..5); the table in the module docstring
PARAMETERS: dict[str, tuple[str, tuple[float, ...]]] = {
    "noise": ("std", (0.04, 0.08, 0.12, 0.18, 0.26)),
    "blur": ("sigma_share", (0.005, 0.01, 0.015, 0.02, 0.03)),
    "contrast": ("factor", (0.6, 0.45, 0.3, 0.2, 0.1)),
    "gamma": ("gamma", (1.25, 1.5, 2.0, 2.5, 3.0)),
    "jpeg": ("quality", (60, 40, 25, 15, 8)),
    "rotation": ("degrees", (5, 10, 15, 20, 30)),
    "crop": ("kept", (0.95, 0.9, 0.85, 0.8, 0.7)),
}
METRICS = {"auc": "macro_auc", "balanced_accuracy": "balanced_accuracy", "accuracy": "accuracy"}


def check_corruption(kind: str, severity: int) -> None:
    """InputError unless ``kind`` is one of ``CORRUPTIONS`` and ``severity`` a whole number 1-5."""
    if not isinstance(kind, str):  # a list or mapping (YAML [[noise]]) is no kind, and cannot be looked up
        raise InputError(f"corruption kinds must be names ({', '.join(CORRUPTIONS)}), got {kind!r}")
    if kind not in PARAMETERS:
        raise InputError(f"unknown corruption {kind!r}; known: {', '.join(CORRUPTIONS)}")
    if isinstance(severity, bool) or not isinstance(severity, int | np.integer) or not 1 <= severity <= 5:
        raise InputError(f"corruption severity must be a whole number from 1 to 5, got {severity!r}")


def check_corruptions(kinds: Sequence[str], severities: Sequence[int]) -> None:
    """``check_corruption`` of every kind at every severity, and InputError for a kind or severity given twice
    (it would be scored again: the same rows twice over)."""
    for kind in kinds:
        for severity in severities:
            check_corruption(kind, severity)
    for what, values in (("kind", list(kinds)), ("severity", list(severities))):
        repeated = [value for index, value in enumerate(values) if value in values[:index]]
        if repeated:
            raise InputError(f"corruption {what} {repeated[0]!r} is given twice; list each {what} once")


def corrupt(image: np.ndarray, kind: str, severity: int, seed: int = 0) -> np.ndarray:
    """``image`` (HxW, HxWx1 or HxWx3; any real dtype) corrupted by ``kind`` at ``severity`` 1-5.

    The result has the input's shape and dtype and stays inside its intensity range (0-255 for
    uint8, the input's own min-max otherwise); the same
    (image, kind, severity, seed) always gives the same result.
    """
    check_corruption(kind, severity)
    unit, low, high = _to_unit(image)
    if unit is None:
        return image.copy()
    value = PARAMETERS[kind][1][severity - 1]
    channels_first = np.ascontiguousarray(np.moveaxis(unit, -1, 0) if unit.ndim == 3 else unit[None])
    corrupted = _apply(kind, value, channels_first, seed)
    result = np.moveaxis(corrupted, 0, -1) if unit.ndim == 3 else corrupted[0]
    return _from_unit(np.clip(result, 0.0, 1.0), image.dtype, low, high)


def model_sized(model: DualEncoder, image: Any) -> np.ndarray:
    """``image`` (an array, else a file read as ``read_for`` reads it) brought to the size ``model`` takes, as
    8-bit pixels its preprocessor then reads unchanged: ``model.preprocessor.load`` of the result equals ``load`` of
    ``image`` up to 8-bit rounding (and a percentile scaling or colour constancy applied again to its own output).

    A medvl 2D model: the image as ``ImagePreprocessor.load`` scales it (windows, /255 or its own min-max; the
    model's channels) and resizes it to its input square, in 0-255. A transformers model: the 8-bit RGB image
    resized by its own processor but not centre-cropped, when that processor leaves the result unresized (a
    processor resizing the shortest edge above its crop would otherwise crop twice); else, and for any other
    model, the image as read."""
    array = read_for(model, image)
    preprocessor = getattr(model, "preprocessor", None)
    if isinstance(preprocessor, HFImagePreprocessor):
        return _processor_sized(preprocessor, array)
    if not isinstance(preprocessor, ImagePreprocessor) or preprocessor.config.spatial_dims != 2 \
            or array.ndim not in (2, 3):
        return array
    resized = preprocessor.resize(preprocessor.scaled(array)).clamp_(0.0, 1.0)
    pixels = np.rint(resized.numpy() * 255.0).astype(np.uint8)
    return pixels[0] if len(pixels) == 1 else np.ascontiguousarray(np.moveaxis(pixels, 0, -1))


def _processor_sized(preprocessor: HFImagePreprocessor, array: np.ndarray) -> np.ndarray:
    """``array`` as 8-bit RGB resized by the transformers processor without its centre crop, if the processor
    leaves that unchanged (so it crops it once); else the 8-bit RGB image at its own size."""
    rgb = rgb_uint8(array, "<array>")
    processor = preprocessor.image_processor
    no_crop = {"do_center_crop": False} if getattr(processor, "do_center_crop", False) else {}

    def resized(pixels: np.ndarray) -> np.ndarray:
        values = processor(images=[pixels], do_normalize=False, do_rescale=False, input_data_format="channels_last",
                           return_tensors="pt", **no_crop)["pixel_values"][0]
        return np.ascontiguousarray(values.permute(1, 2, 0).numpy())

    sized = np.clip(np.rint(resized(rgb)), 0, 255).astype(np.uint8)
    again = resized(sized)
    return sized if again.shape == sized.shape and np.array_equal(again, sized) else rgb


def _to_unit(image: np.ndarray) -> tuple[np.ndarray | None, float, float]:
    """float32 in [0, 1] and the (low, high) it was scaled from; None when there is no range."""
    if not isinstance(image, np.ndarray) or image.dtype.kind not in "uif":
        raise InputError(f"image must be a numpy array of numbers, got {type(image).__name__} "
                         f"{getattr(image, 'dtype', '')}")
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[-1] in (1, 3))) or min(image.shape[:2]) < 2:
        raise InputError(f"image must be HxW, HxWx1 or HxWx3 with sides >= 2, got shape {image.shape}")
    if image.dtype.kind == "f" and not np.isfinite(image).all():
        raise InputError("image contains NaN or infinite values")
    low, high = (0.0, 255.0) if image.dtype == np.uint8 else (float(image.min()), float(image.max()))
    if high <= low:
        return None, low, high
    return ((image.astype(np.float64) - low) / (high - low)).astype(np.float32), low, high


def _from_unit(unit: np.ndarray, dtype: np.dtype, low: float, high: float) -> np.ndarray:
    values = unit.astype(np.float64) * (high - low) + low
    if np.issubdtype(dtype, np.integer):
        values = np.rint(values)
    return np.clip(values, low, high).astype(dtype)


def _apply(kind: str, value: float, image: np.ndarray, seed: int) -> np.ndarray:
    """One corruption of a (C, H, W) float32 image in [0, 1] (may leave [0, 1]; clipped by the caller)."""
    from monai.utils import convert_to_numpy

    if kind == "jpeg":
        return _jpeg(image, int(value))
    transform = _transform(kind, value, min(image.shape[1:]), seed)
    return convert_to_numpy(transform(image), dtype=np.float32)


def _transform(kind: str, value: float, side: int, seed: int) -> Callable[..., Any]:
    """The MONAI transform of a corruption at parameter ``value`` (``side``: the image's shorter side)."""
    from monai.transforms import (
        AdjustContrast,
        GaussianSmooth,
        RandGaussianNoise,
        Rotate,
        ScaleIntensityFixedMean,
        Zoom,
    )

    if kind == "noise":
        noise = RandGaussianNoise(prob=1.0, mean=0.0, std=value, sample_std=False)
        noise.set_random_state(seed=seed % 2**32)
        return noise
    if kind == "blur":
        return GaussianSmooth(sigma=value * side)
    if kind == "contrast":
        return ScaleIntensityFixedMean(factor=value - 1.0, fixed_mean=True)
    if kind == "gamma":
        return AdjustContrast(gamma=value)
    if kind == "rotation":
        sign = 1.0 if np.random.default_rng(seed).random() < 0.5 else -1.0
        return Rotate(angle=sign * np.deg2rad(value), keep_size=True, mode="bilinear", padding_mode="zeros")
    # crop: zoom in on the centre by 1 / kept, cut back to the input size
    return Zoom(zoom=1.0 / value, keep_size=True, mode="bilinear", padding_mode="edge")


def _jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    pixels = np.rint(image * 255).astype(np.uint8)
    picture = Image.fromarray(pixels[0] if len(pixels) == 1 else np.moveaxis(pixels, 0, -1))
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=quality)
    decoded = np.asarray(Image.open(buffer)).astype(np.float32) / 255.0
    return decoded[None] if decoded.ndim == 2 else np.moveaxis(decoded, -1, 0)


def corruption_curves(model: DualEncoder, dataset: Dataset, label: str, kinds: Sequence[str] = CORRUPTIONS,
                      severities: Sequence[int] = SEVERITIES, captions: CaptionConfig | None = None,
                      classes: Sequence[str] | None = None, seed: int = 0, show_progress: bool = True) -> dict:
    """Zero-shot metrics of ``model`` on ``label`` on clean images and on each corruption and severity.

    Each image is read once, brought to the model's input size (``model_sized``) and corrupted there, in memory
    (record i with seed derived from (``seed``, i)), so a severity does the same damage at every native size.
    ``captions`` default to ``captions_for(dataset, model=model)``. Returns ``label``, ``classes``,
    ``n``, ``clean`` (``auc``, ``balanced_accuracy``, ``accuracy``), ``parameters`` (kind ->
    ``{name, values}`` at the severities run), ``curves`` (kind -> a list of ``{severity, auc,
    balanced_accuracy, accuracy}``) and ``summary``: ``metric`` (``auc``, or balanced accuracy when the
    AUC is undefined), ``relative_degradation`` (kind -> mean over severities of (clean - corrupted) /
    clean), ``mean_relative_degradation`` and ``worst_kind`` (the largest relative degradation).
    """
    check_corruptions(kinds, severities)
    if not kinds or not severities:
        raise InputError("corruption_curves needs at least one kind and one severity")
    if model.config.image.spatial_dims != 2:
        raise InputError("corruption curves are defined for 2D images; this model takes 3D volumes")
    labelled = dataset.with_labels([label])
    captions = captions or captions_for(dataset, model=model)
    # corrupted at the model's input size: at a film's native size, the resize would average noise and JPEG away
    images = [model_sized(model, r.image) for r in labelled]
    seeds = [int(np.random.SeedSequence([seed, i]).generate_state(1)[0]) for i in range(len(images))]

    def score(arrays: list[np.ndarray], class_names: Sequence[str] | None) -> dict:
        derived = labelled.subset([dataclasses.replace(r, images=[a]) for r, a in zip(labelled, arrays, strict=True)])
        embeddings = embed_images(model, derived, show_progress=False)
        return zero_shot(model, derived, label, captions, class_names, show_progress=False,
                         image_embeddings=embeddings)

    clean = score(images, classes)
    class_names = clean["classes"]
    curves: dict[str, list[dict]] = {kind: [] for kind in kinds}
    with progress_bar("Corruption curves", total=len(kinds) * len(severities), enabled=show_progress) as advance:
        for kind in kinds:
            for severity in severities:
                result = score([corrupt(im, kind, severity, s) for im, s in zip(images, seeds, strict=True)],
                               class_names)
                curves[kind].append({"severity": int(severity), **_metrics(result)})
                advance(1)
    return {"label": label, "classes": class_names, "n": clean["n"], "clean": _metrics(clean),
            "parameters": {kind: {"name": PARAMETERS[kind][0],
                                  "values": [PARAMETERS[kind][1][s - 1] for s in severities]} for kind in kinds},
            "curves": curves, "summary": _summary(_metrics(clean), curves)}


def _metrics(result: dict) -> dict:
    return {key: result[source] for key, source in METRICS.items()}


def _summary(clean: dict, curves: dict[str, list[dict]]) -> dict:
    metric = "auc" if clean["auc"] is not None else "balanced_accuracy"
    reference = clean[metric]
    degradation = {}
    for kind, points in curves.items():
        values = [p[metric] for p in points if p[metric] is not None]
        degradation[kind] = (float(np.mean([(reference - v) / reference for v in values]))
                             if values and reference else None)
    known = {kind: d for kind, d in degradation.items() if d is not None}
    return {"metric": metric, "relative_degradation": degradation,
            "mean_relative_degradation": float(np.mean(list(known.values()))) if known else None,
            "worst_kind": max(known, key=lambda kind: known[kind]) if known else None}
