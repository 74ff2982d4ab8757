"""Image preprocessing with MONAI transforms: raw arrays -> model-ready tensors.

Convention: intensities are scaled to [0, 1] (uint8 / 255; other integer and float images by their
own min-max), channels converted to the model's (grayscale = mean of RGB; RGB = gray repeated),
resized to a square (cube for 3D) of ``image_size`` with anti-aliasing, then normalised with the
model's mean/std. Training augmentation: small affine jitter, contrast and noise; flips only when
the config allows (laterality matters on chest X-rays).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from ..models.config import ImageConfig
from .images import read_image


class ImagePreprocessor:
    """Turns image files or arrays into tensors shaped for one model's image encoder."""

    def __init__(self, config: ImageConfig):
        from monai.transforms import Resize

        self.config = config
        size = (config.image_size,) * config.spatial_dims
        self.resize = Resize(spatial_size=size, mode="area" if config.spatial_dims == 2 else "trilinear")
        self._augment = _build_augment(config) if config.augment else None

    def load(self, image: Path | str | np.ndarray) -> torch.Tensor:
        """Read (if a path) and bring one image to (C, *spatial) float in [0, 1], resized."""
        source = image if not isinstance(image, np.ndarray) else "<array>"
        array = read_image(image) if not isinstance(image, np.ndarray) else image
        tensor = self._to_channels(_scale_unit(array, source), source)
        return self.resize(tensor).as_tensor().float().clamp_(0.0, 1.0)

    def load_many(self, images: Sequence[Path | str | np.ndarray]) -> torch.Tensor:
        return torch.stack([self.load(image) for image in images])

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        return (batch - self.config.intensity_mean) / self.config.intensity_std

    def augment(self, batch: torch.Tensor, seed: int) -> torch.Tensor:
        """Random training augmentation of a (N, C, ...) batch, reproducible from ``seed``."""
        if self._augment is None:
            return batch
        self._augment.set_random_state(seed=seed % (2**32))
        return torch.stack([torch.as_tensor(self._augment(item)) for item in batch])

    def _to_channels(self, array: np.ndarray, source) -> torch.Tensor:
        dims, channels = self.config.spatial_dims, self.config.in_channels
        if array.ndim == dims:
            tensor = torch.from_numpy(array)[None]
        elif array.ndim == dims + 1 and array.shape[-1] in (3, 4):
            tensor = torch.from_numpy(np.ascontiguousarray(np.moveaxis(array[..., :3], -1, 0)))
        else:
            raise DataError(source, f"image shape {array.shape} does not fit a {dims}D model "
                            f"(expected {dims}D grayscale or {dims}D x 3 RGB)")
        if tensor.shape[0] == 3 and channels == 1:
            tensor = tensor.mean(0, keepdim=True)
        elif tensor.shape[0] == 1 and channels == 3:
            tensor = tensor.repeat(3, *([1] * dims))
        return tensor


def _scale_unit(array: np.ndarray, source) -> np.ndarray:
    if array.size == 0:
        raise DataError(source, "image has no pixels")
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    array = array.astype(np.float32)
    if not np.isfinite(array).all():
        raise DataError(source, "image contains NaN or infinite values")
    low, high = float(array.min()), float(array.max())
    return (array - low) / (high - low) if high > low else np.zeros_like(array)


def _build_augment(config: ImageConfig):
    from monai.transforms import (
        Compose,
        RandAdjustContrast,
        RandAffine,
        RandFlip,
        RandGaussianNoise,
    )

    dims = config.spatial_dims
    steps = [
        RandAffine(prob=0.8, rotate_range=(0.12,) * (1 if dims == 2 else 3),
                   scale_range=(0.1,) * dims, translate_range=(config.image_size * 0.06,) * dims,
                   padding_mode="border"),
        RandAdjustContrast(prob=0.5, gamma=(0.7, 1.4)),
        RandGaussianNoise(prob=0.3, std=0.02),
    ]
    if config.augment_flip:
        steps.append(RandFlip(prob=0.5, spatial_axis=dims - 1))
    return Compose(steps)
