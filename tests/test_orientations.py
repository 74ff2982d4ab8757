"""Test-time orientations (``image.test_time_orientations``): features averaged over rotations and
mirrors make a model's embeddings and head scores invariant to them, on a real ISIC image."""

import numpy as np
import pytest
import torch

from medvl.errors import InputError
from medvl.models.config import ImageConfig
from medvl.models.dual import DualEncoder
from medvl.models.preprocess import orientations
from medvl.models.registry import create_model


@pytest.fixture(scope="module")
def isic_pixels(shared_data) -> torch.Tensor:
    """Two real dermoscopy images, colour-corrected and resized as derm-small reads them: (2, 3, 32, 32).
    From the end of the archive: the first files are streaked (every row the same, so a vertical flip
    changes nothing) and would hide a missing mirror."""
    images = sorted((shared_data / "isic-dermoscopy" / "images").glob("*.jpg"))[-2:]
    return tiny_derm(1).preprocessor.load_many(images)


def tiny_derm(count: int, seed: int = 0) -> DualEncoder:
    torch.manual_seed(seed)
    model = create_model("derm-small", **{"image.image_size": 32, "image.widths": [8, 16, 16, 16],
                                          "image.color_constancy": 6.0, "image.test_time_orientations": count})
    model.add_head("diagnosis", ["melanoma", "nevus"])
    return model.eval()


def test_orientations_are_the_square_symmetries_each_once():
    batch = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).view(2, 3, 5, 5)
    assert orientations(batch, 1)[0] is batch
    mirror = orientations(batch, 2)
    assert torch.equal(mirror[1], batch.flip(-1))
    eight = orientations(batch, 8)
    assert len({view.numpy().tobytes() for view in eight}) == 8  # all distinct for an asymmetric image
    assert torch.equal(eight[0], batch) and torch.equal(eight[1], torch.rot90(batch, 1, dims=(-2, -1)))
    # a group: rotating or mirroring the input only reorders the views
    for moved in (torch.rot90(batch, 1, dims=(-2, -1)), batch.flip(-2)):
        assert {v.numpy().tobytes() for v in orientations(moved, 8)} == {v.numpy().tobytes() for v in eight}
    four = {v.numpy().tobytes() for v in orientations(batch, 4)}
    assert {v.numpy().tobytes() for v in orientations(torch.rot90(batch, 3, dims=(-2, -1)), 4)} == four
    with pytest.raises(ValueError):
        orientations(batch, 3)
    with pytest.raises(ValueError):
        orientations(batch[0], 8)


def test_eight_orientations_make_embeddings_and_head_invariant(isic_pixels):
    moved = [torch.rot90(isic_pixels, 1, dims=(-2, -1)), isic_pixels.flip(-1), isic_pixels.flip(-2).transpose(-1, -2)]
    single, averaged = tiny_derm(1), tiny_derm(8)  # the same weights (same seed)
    for name, tensor in averaged.state_dict().items():
        assert torch.equal(tensor, single.state_dict()[name])
    reference = averaged.encode_images(isic_pixels)
    reference_head = averaged.head_probabilities("diagnosis", averaged.encode_images(isic_pixels, features=True))
    for view in moved:
        assert torch.allclose(averaged.encode_images(view), reference, atol=1e-5)
        scores = averaged.head_probabilities("diagnosis", averaged.encode_images(view, features=True))
        assert torch.allclose(scores, reference_head, atol=1e-5)
        # one orientation: a random-init ResNet is not invariant, so the test above can fail
        assert not torch.allclose(single.encode_images(view), single.encode_images(isic_pixels), atol=1e-3)
    # the average is the mean of the eight single-orientation features, projected once
    features = torch.stack([single.encode_images(view, features=True) for view in orientations(isic_pixels, 8)])
    assert torch.allclose(averaged.encode_images(isic_pixels, features=True), features.mean(0), atol=1e-5)


def test_four_orientations_are_invariant_to_rotation_only(isic_pixels):
    model = tiny_derm(4)
    reference = model.encode_images(isic_pixels)
    assert torch.allclose(model.encode_images(torch.rot90(isic_pixels, 2, dims=(-2, -1))), reference, atol=1e-5)
    assert not torch.allclose(model.encode_images(isic_pixels.flip(-1)), reference, atol=1e-3)


def test_files_are_read_once_and_training_sees_one_orientation(shared_data, tmp_path):
    images = sorted((shared_data / "isic-dermoscopy" / "images").glob("*.jpg"))[-2:]
    model = tiny_derm(8)
    from_files = model.encode_images(images)
    assert torch.allclose(from_files, model.encode_images(model.preprocessor.load_many(images)), atol=1e-6)
    # training calls image_features directly: one orientation, unchanged by the setting
    pixels = model.preprocessor.normalize(model.preprocessor.load_many(images))
    assert torch.allclose(model.image_features(pixels), tiny_derm(1).image_features(pixels), atol=1e-6)
    model.save_pretrained(tmp_path / "m")
    loaded = DualEncoder.from_pretrained(tmp_path / "m")
    assert loaded.config.image.test_time_orientations == 8
    assert np.allclose(loaded.encode_images(images).numpy(), from_files.numpy(), atol=1e-6)


@pytest.mark.parametrize("fields", [{"test_time_orientations": 3}, {"test_time_orientations": True},
                                    {"test_time_orientations": 8, "spatial_dims": 3}])
def test_bad_orientation_settings_are_refused(fields):
    with pytest.raises(InputError, match="test_time_orientations"):
        ImageConfig(**fields).validate()
