"""RGB preprocessing for dermoscopy: Shades of Gray colour constancy, colour jitter, rotations by
multiples of 90 degrees; on real ISIC images (read in place) and small exact arrays."""

import numpy as np
import pytest
import torch

from medvl.errors import InputError
from medvl.models.config import ImageConfig
from medvl.models.preprocess import ImagePreprocessor, color_jitter, shades_of_gray


@pytest.fixture(scope="module")
def isic_image(shared_data) -> np.ndarray:
    """One 250x250 ISIC dermoscopy JPEG as uint8 RGB."""
    from medvl.data.images import read_image

    return read_image(sorted((shared_data / "isic-dermoscopy" / "images").glob("*.jpg"))[0])


def rgb_config(**fields) -> ImageConfig:
    config = ImageConfig(in_channels=3, image_size=32, **fields)
    config.validate()
    return config


def test_shades_of_gray_makes_the_illuminant_grey_and_keeps_grey_images():
    grey = torch.full((3, 4, 4), 0.4)
    assert torch.allclose(shades_of_gray(grey, 6), grey)
    tinted = grey * torch.tensor([1.2, 1.0, 0.6]).view(3, 1, 1)  # a warm cast
    corrected = shades_of_gray(tinted, 6)
    means = corrected.mean(dim=(1, 2))
    assert torch.allclose(means, means.mean().expand(3), atol=1e-5)  # the cast is gone
    assert torch.allclose(shades_of_gray(tinted, 1), corrected, atol=1e-5)  # flat image: every p agrees


def test_shades_of_gray_uses_the_minkowski_p_mean():
    image = torch.zeros(3, 1, 4)
    image[0] = torch.tensor([0.1, 0.1, 0.1, 0.9])  # red: one bright pixel
    image[1:] = 0.3
    red_estimate = {p: float(((image[0] ** p).mean()) ** (1 / p)) for p in (1, 6)}
    for p in (1, 6):
        illuminant = torch.tensor([red_estimate[p], 0.3, 0.3])
        expected = image / (illuminant / illuminant.norm() * 3**0.5).view(3, 1, 1)
        assert torch.allclose(shades_of_gray(image, p), expected.clamp(0, 1), atol=1e-6)
    assert red_estimate[6] > red_estimate[1]  # a higher p weighs the bright pixels more


def test_color_constancy_is_applied_at_load_of_a_real_image(isic_image):
    plain = ImagePreprocessor(rgb_config()).load(isic_image)
    corrected = ImagePreprocessor(rgb_config(color_constancy=6.0)).load(isic_image)
    assert corrected.shape == plain.shape == (3, 32, 32)
    assert 0 <= corrected.min() and corrected.max() <= 1
    full = torch.from_numpy(isic_image).permute(2, 0, 1).float() / 255  # the estimate is on the full image
    expected = torch.as_tensor(ImagePreprocessor(rgb_config()).resize(shades_of_gray(full, 6.0))).clamp(0, 1)
    assert torch.allclose(corrected, expected, atol=1e-5)
    assert not torch.allclose(corrected, plain, atol=1e-3)


def test_color_jitter_identity_and_each_factor(isic_image):
    image = ImagePreprocessor(rgb_config()).load(isic_image)
    assert torch.allclose(color_jitter(image, 1, 1, 1, 0.0), image, atol=1e-6)
    assert torch.allclose(color_jitter(image, 1, 1, 1, 1.0), image, atol=1e-5)  # a full turn of hue
    assert torch.allclose(color_jitter(image, 0.5, 1, 1, 0.0), image * 0.5, atol=1e-6)
    grey = color_jitter(image, 1, 1, 0, 0.0)  # saturation 0: every channel is the luminance
    assert torch.allclose(grey[0], grey[1], atol=1e-6) and torch.allclose(grey[1], grey[2], atol=1e-6)
    flat = color_jitter(image, 1, 0, 1, 0.0)  # contrast 0: the mean luminance everywhere
    assert float(flat.std()) < 1e-6
    shifted = color_jitter(image, 1, 1, 1, 0.25)
    luminance = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)
    inside = (image > 0.1).all(0) & (image < 0.9).all(0) & (shifted > 0).all(0) & (shifted < 1).all(0)
    assert torch.allclose((shifted * luminance).sum(0)[inside], (image * luminance).sum(0)[inside], atol=1e-4)
    assert not torch.allclose(shifted, image, atol=1e-2)  # the hue moved, the luminance did not


def test_rot90_augmentation_gives_rotated_and_flipped_copies():
    config = rgb_config(augment_rot90=True)
    preprocessor = ImagePreprocessor(config)
    image = torch.arange(3 * 32 * 32, dtype=torch.float32).view(1, 3, 32, 32) / (3 * 32 * 32)
    batch = image.repeat(64, 1, 1, 1)
    preprocessor._augment.transforms = preprocessor._augment.transforms[:2]  # only rot90 + vertical flip
    out = torch.as_tensor(preprocessor.augment(batch, seed=3))
    orientations = [torch.rot90(image[0], k, dims=(1, 2)) for k in range(4)]
    orientations += [o.flip(1) for o in orientations]
    seen = {next(i for i, o in enumerate(orientations) if torch.equal(item, o)) for item in out}
    assert seen == set(range(8))  # every item is one of the 8 orientations, and all of them occur
    assert torch.equal(out, torch.as_tensor(preprocessor.augment(batch, seed=3)))  # reproducible


def test_full_rgb_augmentation_runs_seeded_on_a_real_image(isic_image):
    preprocessor = ImagePreprocessor(rgb_config(augment_flip=True, augment_rot90=True, augment_color=0.3,
                                                color_constancy=6.0))
    batch = preprocessor.load_many([isic_image] * 4)
    first, again = preprocessor.augment(batch, seed=7), preprocessor.augment(batch, seed=7)
    assert first.shape == batch.shape and torch.equal(first, again)
    assert not torch.equal(first, preprocessor.augment(batch, seed=8))
    assert torch.isfinite(torch.as_tensor(first)).all()


def test_defaults_leave_the_augmentation_unchanged():
    steps = [type(t).__name__ for t in ImagePreprocessor(rgb_config(augment_flip=True))._augment.transforms]
    assert steps == ["RandAffine", "RandAdjustContrast", "RandGaussianNoise", "RandFlip"]


@pytest.mark.parametrize("fields", [{"color_constancy": 6.0, "in_channels": 1}, {"augment_color": 0.95},
                                    {"color_constancy": -1.0}, {"augment_rot90": True, "spatial_dims": 3}])
def test_bad_colour_settings_are_refused(fields):
    config = ImageConfig(**{"in_channels": 3, **fields})
    with pytest.raises(InputError):
        config.validate()
