"""Image preprocessing with MONAI transforms: raw arrays -> model-ready tensors.

Convention: intensities are scaled to [0, 1] (uint8 / 255; other integer and float images through
the model's ``window`` pairs, one channel each, e.g. HU for CT, else by their own min-max; a model
with ``window`` pairs reads DICOM files as HU, never through the window stored in their header),
channels converted to the model's (grayscale = mean of RGB; RGB = gray repeated), resized to a
square of ``image_size`` with anti-aliasing, then normalised with the model's mean/std. Volumes
(``spatial_dims=3``) go through ``medvl.models.volumes.load_volume``: windowed and resized slab by
slab to ``(depth, image_size, image_size)``, so memory stays bounded for large CTs. Training
augmentation: small affine jitter, contrast and noise; flips only when the config allows
(laterality matters on chest X-rays); for RGB images with no orientation (dermoscopy) the config
may add rotations by multiples of 90 degrees with vertical flips (``augment_rot90``) and colour
jitter (``augment_color``); any config may add random resized crops (``augment_crop``).
``color_constancy`` applies Shades of Gray colour constancy at load, and ``percentile_scaling``
stretches each image between two of its own intensity percentiles, so training and scoring see the
same corrected colours and exposures; at inference the model may average its features over
``test_time_orientations`` orientations (``orientations``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..data.images import read_image_2d
from ..data.record import ImageSource, LoadableImage
from ..errors import DataError
from .config import ImageConfig
from .volumes import load_volume, read_volume, unit_range

CROP_SEED = 104_729  # offset of the random resized crop's seed from the batch's augmentation seed


class ImagePreprocessor:
    """Turns image files or arrays into tensors shaped for one model's image encoder."""

    def __init__(self, config: ImageConfig):
        self.config = config
        self._augment = None
        if config.augment:
            self._augment = _VolumeAugment(config) if config.spatial_dims == 3 else _build_augment(config)

    def load(self, image: ImageSource | str, source: str | Path | None = None) -> torch.Tensor:
        """Read (if a path) and bring one image to (C, *spatial) float in [0, 1], resized. ``source``: what an
        error names for an array (the file it was read from; default ``<array>``)."""
        if self.config.spatial_dims == 3:
            return load_volume(image, self.config, source)
        named = image if not isinstance(image, np.ndarray) else (source or "<array>")
        tensor = self.resize(self.scaled(image, source))
        if not bool(torch.isfinite(tensor).all()):  # a model input, and so an embedding, is never NaN
            raise DataError(str(named), "pixel values too large to scale (they overflow float32)")
        return tensor.clamp_(0.0, 1.0)

    def scaled(self, image: ImageSource | str, source: str | Path | None = None) -> torch.Tensor:
        """A 2D image as ``load`` has it before resizing: (C, H, W) at its own size, intensities scaled (windows,
        /255 or min-max), channels converted, percentile scaling and colour constancy applied."""
        named = image if not isinstance(image, np.ndarray) else (source or "<array>")
        array = self.read(image) if not isinstance(image, np.ndarray) else image
        tensor = self._intensities(array, named)
        if self.config.percentile_scaling:
            tensor = percentile_scale(tensor, self.config.percentile_scaling)
        if self.config.color_constancy and tensor.shape[0] == 3:
            tensor = shades_of_gray(tensor.float(), self.config.color_constancy)
        return tensor

    def read(self, image: str | Path | LoadableImage) -> np.ndarray:
        """The pixels this model is fed from an image file: ``read_image``, except that a model with
        ``window`` pairs reads a DICOM file as modality values (HU), so that its own windows are applied,
        not the one stored in the file's header; a 3D model reads DICOM as modality values whatever its windows
        and refuses a file of a 2D image (``read_volume``); a
        2D model reads a NIfTI file of one slice as that slice and refuses a volume (``read_image_2d``). Read
        with this before ``load`` when the pixels are also needed (hashing, checks)."""
        if self.config.spatial_dims == 3:
            return read_volume(image, self.config)  # a 2D image file (PNG, .npy) refused, as load refuses it
        return read_image_2d(image, modality_values=bool(self.config.windows))

    def resize(self, tensor: torch.Tensor) -> torch.Tensor:
        """A (C, H, W) image as float32 at ``image_size``, a new tensor: area interpolation, the same call
        MONAI's ``Resize(mode="area")`` makes, without its metadata tracking (most of a small image's
        preprocessing time, which a service pays per request)."""
        size = tuple(self.config.volume_shape)
        if tuple(tensor.shape[1:]) == size:
            return tensor.to(torch.float32, copy=True)
        return F.interpolate(tensor.to(torch.float32)[None], size=size, mode="area")[0]

    def load_many(self, images: Sequence[ImageSource | str],
                  sources: Sequence[str | None] | None = None) -> torch.Tensor:
        """``load`` of each image, stacked; ``sources``: what an error names for each array image."""
        named = sources if sources is not None else [None] * len(images)
        return torch.stack([self.load(image, source=source) for image, source in zip(images, named, strict=True)])

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        return (batch - self.config.intensity_mean) / self.config.intensity_std

    def augment(self, batch: torch.Tensor, seed: int) -> torch.Tensor:
        """Random training augmentation of a (N, C, ...) batch, reproducible from ``seed``."""
        if self._augment is None:
            return batch
        if isinstance(self._augment, _VolumeAugment):
            batch = self._augment(batch, seed)
        else:
            self._augment.set_random_state(seed=seed % (2**32))
            batch = torch.stack([torch.as_tensor(self._augment(item)) for item in batch])
        if 0 < self.config.augment_crop < 1:
            batch = random_resized_crop(batch, self.config.augment_crop, seed + CROP_SEED)
        return batch

    def intensity_scaling(self, array: np.ndarray) -> str:
        """How ``load`` brings an array of this dtype and shape to [0, 1], in words. The same pixel values read
        another way reach the model as other inputs: uint8 0..255 are divided by 255, the same values as float32
        are stretched between each image's own minimum and maximum."""
        if array.dtype == np.uint8:
            return "divided by 255"
        if self.config.windows and (self.config.spatial_dims == 3 or array.ndim == self.config.spatial_dims):
            return "clipped to the model's windows"
        return "stretched between each image's own minimum and maximum"

    def _intensities(self, array: np.ndarray, source) -> torch.Tensor:
        """(C, *spatial) in [0, 1]: one channel per window for modality values, else scaled and converted."""
        windows = self.config.windows
        if windows and array.dtype != np.uint8 and array.ndim == self.config.spatial_dims:
            values = _scale_unit(array, source, scale=False)
            tensor = torch.from_numpy(np.stack([np.clip((values - (center - width / 2.0)) / width, 0.0, 1.0)
                                                for center, width in windows]))
            if len(windows) == 1 and self.config.in_channels != 1:
                tensor = tensor.repeat(self.config.in_channels, *([1] * array.ndim))
            return tensor
        return self._to_channels(_scale_unit(array, source), source)

    def _to_channels(self, array: np.ndarray, source) -> torch.Tensor:
        dims, channels = self.config.spatial_dims, self.config.in_channels
        if array.ndim == dims:
            tensor = torch.from_numpy(array)[None]
        elif array.ndim == dims + 1 and array.shape[-1] in (3, 4):
            tensor = torch.from_numpy(np.ascontiguousarray(np.moveaxis(array[..., :3], -1, 0)))
        else:
            raise DataError(source, f"image shape {array.shape} does not fit a {dims}D model "
                            f"(expected {dims}D grayscale or {dims}D x 3 RGB)")
        if tensor.shape[0] == 3 and channels != 3:
            tensor = tensor.mean(0, keepdim=True)
        if tensor.shape[0] == 1 and channels != 1:
            tensor = tensor.repeat(channels, *([1] * dims))
        return tensor


def random_resized_crop(batch: torch.Tensor, min_area: float, seed: int) -> torch.Tensor:
    """Each image of a (N, C, *spatial) batch (2D or 3D) cropped to a random box and resized back: the box
    covers a share of the image drawn uniformly from [``min_area``, 1], with an aspect ratio
    log-uniform in [3/4, 4/3] (2D; cubes in 3D) and a random position inside the image (SimCLR's view
    augmentation, done for the whole batch with one ``grid_sample``). ``min_area`` 1 returns a copy."""
    count, dims = len(batch), batch.dim() - 2
    if dims not in (2, 3):
        raise ValueError(f"random_resized_crop takes (N, C, H, W) or (N, C, D, H, W), got {tuple(batch.shape)}")
    if not 0 < min_area <= 1:
        raise ValueError(f"min_area must be in (0, 1], got {min_area}")
    if min_area == 1:
        return batch.clone()
    generator = torch.Generator().manual_seed(seed % (2**63))
    area = min_area + (1 - min_area) * torch.rand(count, generator=generator)
    ratio = torch.exp((torch.rand(count, generator=generator) * 2 - 1) * np.log(4 / 3)) if dims == 2 \
        else torch.ones(count)
    side = area ** (1 / dims)  # the box's side per axis, as a share of the image's (x first)
    sides = [side * ratio.sqrt(), side / ratio.sqrt()] if dims == 2 else [side] * 3
    theta = torch.zeros(count, dims, dims + 1)
    for axis, scale in enumerate(sides):
        scale = scale.clamp(max=1.0)
        theta[:, axis, axis] = scale
        theta[:, axis, dims] = (torch.rand(count, generator=generator) * 2 - 1) * (1 - scale)
    return affine_warp(batch, theta)


def affine_warp(batch: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """A (N, C, *spatial) batch resampled through ``affine_grid`` matrices ``theta`` (N, dims, dims + 1; output
    to input positions in [-1, 1] grid units): bilinear, border padding, ``align_corners=False``."""
    grid = F.affine_grid(theta.to(batch.dtype), list(batch.shape), align_corners=False)
    return F.grid_sample(batch, grid, mode="bilinear", padding_mode="border", align_corners=False)


def percentile_scale(tensor: torch.Tensor, percent: float) -> torch.Tensor:
    """``tensor`` with its ``percent``-th and (100 - ``percent``)-th percentiles (over every value) mapped
    to 0 and 1, clipped; an image whose two percentiles coincide is returned unchanged."""
    values = tensor.float()
    low, high = (float(v) for v in np.percentile(values.numpy(), [percent, 100 - percent]))
    if high <= low:
        return values
    return ((values - low) / (high - low)).clamp_(0.0, 1.0)


def _scale_unit(array: np.ndarray, source, scale: bool = True) -> np.ndarray:
    """[0, 1] by /255 (uint8) or min-max; ``scale=False``: checked float32 values, unscaled."""
    if array.size == 0:
        raise DataError(source, "image has no pixels")
    if array.dtype == np.uint8 and scale:
        return array.astype(np.float32) / 255.0
    array = array.astype(np.float32)
    if not np.isfinite(array).all():
        raise DataError(source, "image contains NaN or infinite values")
    if not scale:
        return array
    low, high = float(array.min()), float(array.max())
    return unit_range(array, low, high) if high > low else np.zeros_like(array)


def _build_augment(config: ImageConfig):
    from monai.transforms import (
        Compose,
        RandAdjustContrast,
        RandAffine,
        RandFlip,
        RandGaussianNoise,
        RandRotate90,
    )

    dims = config.spatial_dims
    steps: list = []
    if config.augment_color and config.in_channels == 3:
        steps.append(rand_color_jitter(config.augment_color))
    if config.augment_rot90:
        steps += [RandRotate90(prob=0.75, max_k=3, spatial_axes=(0, 1)), RandFlip(prob=0.5, spatial_axis=0)]
    steps += [
        RandAffine(prob=0.8, rotate_range=(0.12,) * (1 if dims == 2 else 3),
                   scale_range=(0.1,) * dims, translate_range=(config.image_size * 0.06,) * dims,
                   padding_mode="border"),
        RandAdjustContrast(prob=0.5, gamma=(0.7, 1.4)),
        RandGaussianNoise(prob=0.3, std=0.02),
    ]
    if config.augment_flip:
        steps.append(RandFlip(prob=0.5, spatial_axis=dims - 1))
    return Compose(steps)


def orientations(batch: torch.Tensor, count: int) -> list[torch.Tensor]:
    """``count`` orientations of a (N, C, H, W) batch, the batch itself first: 1; 2 = + the horizontal
    mirror; 4 = rotations by 0, 90, 180 and 270 degrees; 8 = those four and their mirrors (the square's
    symmetry group, each element once)."""
    if count not in (1, 2, 4, 8):
        raise ValueError(f"orientations: count must be 1, 2, 4 or 8, got {count}")
    if count == 1:
        return [batch]
    if batch.ndim != 4:
        raise ValueError(f"orientations: a (N, C, H, W) batch is needed, got shape {tuple(batch.shape)}")
    if count == 2:
        return [batch, batch.flip(-1)]
    rotations = [batch if quarter == 0 else torch.rot90(batch, quarter, dims=(-2, -1)) for quarter in range(4)]
    return rotations if count == 4 else rotations + [view.flip(-1) for view in rotations]


def shades_of_gray(image: torch.Tensor, power: float = 6.0) -> torch.Tensor:
    """Shades of Gray colour constancy (Finlayson & Trezzi 2004) of a (3, H, W) image in [0, 1].

    The illuminant of each channel is its Minkowski ``power``-mean (p = 1: grey world; large p:
    max-RGB); each channel is divided by its share of the unit-length illuminant times sqrt(3), so
    an image whose illuminant is already grey is unchanged. Values are clipped to [0, 1].
    """
    illuminant = image.clamp(min=0).pow(power).mean(dim=tuple(range(1, image.ndim))).pow(1.0 / power)
    unit = illuminant / illuminant.norm().clamp(min=1e-8)
    gains = 1.0 / (unit * 3**0.5).clamp(min=1e-3)
    return (image * gains.view(-1, *([1] * (image.ndim - 1)))).clamp(0.0, 1.0)


def color_jitter(image: torch.Tensor, brightness: float, contrast: float, saturation: float,
                 hue: float) -> torch.Tensor:
    """A (3, H, W) RGB image in [0, 1] with brightness, contrast and saturation scaled by the factors
    (1 = unchanged) and the hue rotated by ``hue`` turns (chroma rotated in YIQ space); clipped to [0, 1]."""
    out = image * brightness
    mean = _luminance(out).mean()
    out = (out - mean) * contrast + mean
    gray = _luminance(out)
    out = (out - gray) * saturation + gray
    if hue:
        out = torch.einsum("ij,jhw->ihw", _hue_rotation(hue).to(out.dtype), out)
    return out.clamp(0.0, 1.0)


_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
                           dtype=torch.float64)


def _luminance(image: torch.Tensor) -> torch.Tensor:
    weights = _RGB_TO_YIQ[0].to(image.dtype).view(3, 1, 1)
    return (image * weights).sum(0, keepdim=True)


def _hue_rotation(turns: float) -> torch.Tensor:
    """The RGB -> RGB matrix rotating chroma (I, Q) by ``turns`` of a full turn; luminance kept."""
    angle = torch.tensor(2 * np.pi * turns, dtype=torch.float64)
    rotation = torch.eye(3, dtype=torch.float64)
    rotation[1:, 1:] = torch.stack([torch.stack([angle.cos(), -angle.sin()]),
                                    torch.stack([angle.sin(), angle.cos()])])
    return torch.linalg.inv(_RGB_TO_YIQ) @ rotation @ _RGB_TO_YIQ


def rand_color_jitter(strength: float, prob: float = 0.8):
    """A MONAI random transform of one (3, H, W) RGB image in [0, 1]: with probability ``prob``,
    brightness, contrast and saturation factors drawn from [1 - strength, 1 + strength] and the hue
    rotated by up to strength / 4 of a turn (``color_jitter``). A ``RandomizableTransform``, so
    ``Compose.set_random_state`` seeds it like MONAI's own transforms."""
    from monai.transforms import RandomizableTransform

    class RandColorJitter(RandomizableTransform):
        def __call__(self, image) -> torch.Tensor:
            self.randomize(None)
            brightness, contrast, saturation = (float(f) for f in self.R.uniform(1 - strength, 1 + strength, 3))
            hue = float(self.R.uniform(-strength / 4, strength / 4))
            tensor = torch.as_tensor(image)
            if not self._do_transform:
                return tensor
            return color_jitter(tensor, brightness, contrast, saturation, hue)

    return RandColorJitter(prob)


class _VolumeAugment:
    """The 2D recipe for volumes, batched in torch (per-volume MONAI transforms cost a tenth of a
    second or more per 64^3 volume on a CPU): random affine with probability 0.8 (rotation up to
    0.12 rad about each axis, scale +-10 %, shift +-6 % per axis, border padding), gamma contrast
    0.7-1.4 with probability 0.5, Gaussian noise (std up to 0.02) with probability 0.3, and a
    left-right flip with probability 0.5 only if ``augment_flip``. Reproducible from the seed."""

    def __init__(self, config: ImageConfig):
        self.flip = config.augment_flip
        self._base_grids: dict[tuple[int, ...], torch.Tensor] = {}

    def __call__(self, batch: torch.Tensor, seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed % (2**63))
        count = len(batch)
        draws = torch.rand(count, 14, generator=generator)  # every random number of a volume, in a fixed order
        theta = _affine_matrices(draws[:, :9], apply=draws[:, 9] < 0.8)
        grid = torch.matmul(self._base_grid(tuple(batch.shape[2:])), theta.transpose(1, 2))  # = F.affine_grid
        out = F.grid_sample(batch, grid.view(count, *batch.shape[2:], 3), mode="bilinear", padding_mode="border",
                            align_corners=False)
        contrast = torch.nonzero(draws[:, 11] < 0.5).flatten()
        if len(contrast):
            chosen = out[contrast]
            dims = tuple(range(1, out.ndim))
            low, high = chosen.amin(dim=dims, keepdim=True), chosen.amax(dim=dims, keepdim=True)
            gamma = (0.7 + 0.7 * draws[contrast, 10]).view(-1, *([1] * (out.ndim - 1)))
            out[contrast] = ((chosen - low) / (high - low + 1e-7)).clamp(min=0.0) ** gamma * (high - low) + low
        noisy = torch.nonzero(draws[:, 13] < 0.3).flatten()
        if len(noisy):
            std = (0.02 * draws[noisy, 12]).view(-1, *([1] * (out.ndim - 1)))
            out[noisy] += torch.randn((len(noisy), *out.shape[1:]), generator=generator) * std
        if self.flip:
            flips = torch.nonzero(torch.rand(count, generator=generator) < 0.5).flatten()
            out[flips] = out[flips].flip(-1)
        return out

    def _base_grid(self, shape: tuple[int, ...]) -> torch.Tensor:
        """(1, D*H*W, 4) voxel centres in [-1, 1] grid units (x, y, z, 1), as affine_grid(align_corners=False)."""
        if shape not in self._base_grids:
            axes = [(torch.arange(n) * 2 + 1) / n - 1 for n in shape]
            z, y, x = torch.meshgrid(*axes, indexing="ij")
            self._base_grids[shape] = torch.stack([x, y, z, torch.ones_like(x)], -1).view(1, -1, 4)
        return self._base_grids[shape]


def _affine_matrices(draws: torch.Tensor, apply: torch.Tensor) -> torch.Tensor:
    """(N, 3, 4) affine_grid matrices from uniform draws: 3 angles, 3 scales, 3 shifts per volume."""
    angles = (draws[:, 0:3] * 2 - 1) * 0.12
    scales = 1 + (draws[:, 3:6] * 2 - 1) * 0.1
    shifts = (draws[:, 6:9] * 2 - 1) * 0.12  # 6 % of the side, in [-1, 1] grid units
    cos, sin = angles.cos(), angles.sin()
    one, zero = torch.ones(len(draws)), torch.zeros(len(draws))
    rot_x = torch.stack([one, zero, zero, zero, cos[:, 0], -sin[:, 0], zero, sin[:, 0], cos[:, 0]], 1)
    rot_y = torch.stack([cos[:, 1], zero, sin[:, 1], zero, one, zero, -sin[:, 1], zero, cos[:, 1]], 1)
    rot_z = torch.stack([cos[:, 2], -sin[:, 2], zero, sin[:, 2], cos[:, 2], zero, zero, zero, one], 1)
    rotation = rot_z.view(-1, 3, 3) @ rot_y.view(-1, 3, 3) @ rot_x.view(-1, 3, 3)
    matrix = rotation / scales[:, None, :]
    theta = torch.cat([matrix, shifts[:, :, None]], dim=2)
    identity = torch.eye(3, 4).expand_as(theta)
    return torch.where(apply.view(-1, 1, 1), theta, identity)


def reads_modality_values(model: Any) -> bool:
    """Whether ``model`` is fed a DICOM file as modality values (HU): it has a medvl preprocessor with its own
    ``window`` pairs, or takes 3D volumes (``ImagePreprocessor.read``, ``volumes.read_volume``)."""
    preprocessor = getattr(model, "preprocessor", None)
    return isinstance(preprocessor, ImagePreprocessor) and (bool(preprocessor.config.windows)
                                                            or preprocessor.config.spatial_dims == 3)


def read_for(model: Any, image: Any) -> np.ndarray:
    """``image`` (an array as it is, else a file) read as ``model`` is fed it (``ImagePreprocessor.read``: a model
    with HU windows reads DICOM as modality values); a model without a medvl preprocessor (a 2D transformers
    model) reads as ``read_image_2d``."""
    if isinstance(image, np.ndarray):
        return image
    preprocessor = getattr(model, "preprocessor", None)
    return preprocessor.read(image) if isinstance(preprocessor, ImagePreprocessor) else read_image_2d(image)
