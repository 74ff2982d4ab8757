"""The self-supervised term of training (SLIP-style SimCLR): the second view's random crops (also the
``image.augment_crop`` augmentation), the NT-Xent loss, and a run that learns from it."""

import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as F

import medvl
from medvl.models.config import ImageConfig
from medvl.models.losses import nt_xent_loss
from medvl.models.preprocess import ImagePreprocessor, random_resized_crop
from medvl.train.loop import TrainConfig, _phased_warmup_cosine


def _ramp(count: int, size: int = 64, axis: int = -1, dims: int = 2) -> torch.Tensor:
    """A batch whose value is the position along ``axis`` (pixel centres, 0..1 exclusive)."""
    positions = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    shape = [1] * dims
    shape[axis] = size
    return positions.reshape(shape).expand(*([size] * dims)).expand(count, 1, *([size] * dims)).clone()


def _span(batch: torch.Tensor, axis: int) -> torch.Tensor:
    """Per image: the share of the source ramp one crop covers along ``axis`` (last minus first value,
    scaled back to the centres' spacing)."""
    size = batch.shape[axis]
    first, last = batch.select(axis, 0).flatten(1).mean(1), batch.select(axis, size - 1).flatten(1).mean(1)
    return (last - first) * size / (size - 1)


def test_crops_cover_at_least_the_minimum_area_inside_the_image():
    min_area = 0.25
    crops = random_resized_crop(_ramp(300, axis=-1), min_area, seed=3)
    across = _span(crops, -1)
    down = _span(random_resized_crop(_ramp(300, axis=-2), min_area, seed=3), -2)  # the same boxes, other axis
    area = across * down
    assert area.min() > min_area - 0.02 and area.max() <= 1.0 + 1e-4
    ratio = across / down
    assert ratio.min() > 0.75 - 0.02 and ratio.max() < 4 / 3 + 0.02  # aspect ratio within [3/4, 4/3]
    assert crops.min() >= 0.0 and crops.max() <= 1.0  # inside the image: no values from beyond its border
    assert area.std() > 0.1 and crops[:, 0, 0, 0].std() > 0.05  # sizes and positions vary over the batch
    assert torch.equal(crops, random_resized_crop(_ramp(300, axis=-1), min_area, seed=3))  # seeded
    assert not torch.equal(crops, random_resized_crop(_ramp(300, axis=-1), min_area, seed=4))


def test_augment_crop_zooms_in_while_training_and_never_when_scoring():
    """``image.augment_crop``: the training augmentation ends with a random resized crop, seeded; without it
    the same augmentation keeps the whole ramp in view; loading for scoring is the same either way."""
    ramp = _ramp(200)
    cropping = ImagePreprocessor(ImageConfig(image_size=64, in_channels=1, augment_crop=0.3))
    plain = ImagePreprocessor(ImageConfig(image_size=64, in_channels=1))
    cropped, whole = _span(cropping.augment(ramp, seed=5), -1), _span(plain.augment(ramp, seed=5), -1)
    assert whole.min() > 0.85  # the affine jitter alone zooms in by 10 % at most
    assert cropped.median() < 0.85 and cropped.min() > math.sqrt(0.3 * 0.75) - 0.1  # within the smallest box
    assert (cropped < whole - 0.05).float().mean() > 0.5
    assert torch.equal(cropping.augment(ramp, seed=5), cropping.augment(ramp, seed=5))
    image = (torch.rand(40, 52, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8).numpy()
    assert torch.equal(cropping.load(image), plain.load(image))
    for value in (-0.1, 0.01, 1.5):
        with pytest.raises(medvl.InputError, match="augment_crop"):
            ImageConfig(augment_crop=value).validate()
    ImageConfig(augment_crop=0.35).validate()


def test_full_area_is_the_image_and_volumes_get_cubes():
    batch = torch.rand(4, 3, 32, 32)
    assert torch.equal(random_resized_crop(batch, 1.0, seed=0), batch)
    volumes = random_resized_crop(_ramp(50, size=16, axis=-3, dims=3), 0.3, seed=1)
    assert volumes.shape == (50, 1, 16, 16, 16)
    depth = _span(volumes, -3)
    assert depth.min() > 0.3 ** (1 / 3) - 0.02 and depth.max() <= 1 + 1e-4  # a cube's side is the area's cube root
    with pytest.raises(ValueError, match="min_area"):
        random_resized_crop(batch, 0.0, seed=0)
    with pytest.raises(ValueError, match="takes"):
        random_resized_crop(torch.rand(4, 32, 32), 0.5, seed=0)


def test_nt_xent_matches_its_definition():
    generator = torch.Generator().manual_seed(0)
    first, second = torch.randn(6, 8, generator=generator), torch.randn(6, 8, generator=generator)
    temperature = 0.2
    views = F.normalize(torch.cat([first, second]), dim=-1)
    total = 0.0
    for anchor in range(12):
        positive = (anchor + 6) % 12
        others = [j for j in range(12) if j != anchor]
        logits = torch.stack([views[anchor] @ views[j] / temperature for j in others])
        total += -(logits[others.index(positive)] - torch.logsumexp(logits, 0))
    assert math.isclose(float(nt_xent_loss(first, second, temperature)), float(total) / 12, rel_tol=1e-5)
    # matching views score better than views of other images
    assert nt_xent_loss(first, first + 0.01 * second, 0.1) < nt_xent_loss(first, second, 0.1)
    with pytest.raises(ValueError, match="two views"):
        nt_xent_loss(first, second[:5], 0.1)


def test_self_supervised_loss_falls_and_the_projection_is_not_saved(tiny_npz, tmp_path):
    """Images alone (no image-text loss, no head): the two-view loss falls as the image tower learns what
    stays the same under crops and augmentation; the saved model has no trace of the projection."""
    dataset = medvl.load_dataset(tiny_npz, label_columns=["label"]).select("train")
    model = medvl.create_model("medmnist-small", **{"image.widths": [8, 16, 32, 64]})
    config = TrainConfig(epochs=6, batch_size=40, lr=3e-3, log_every=1, label_columns=["label"],
                         contrastive_weight=0.0, self_supervised_weight=1.0)
    before = {name: value.clone() for name, value in model.text_encoder.state_dict().items()}
    medvl.train(model, dataset, config, tmp_path / "run", show_progress=False)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [line["self_supervised"] for line in lines if "self_supervised" in line]
    assert len(losses) == 36
    assert sum(losses[-6:]) / 6 < 0.85 * sum(losses[:6]) / 6
    assert "contrastive" not in lines[0] and "ce_label" not in lines[0]
    for name, value in model.text_encoder.state_dict().items():  # no image-text loss: the text tower stays
        assert torch.equal(value, before[name]), name
    saved = json.loads((tmp_path / "run" / "model" / "meta.json").read_text())
    assert "view_projection" not in saved and model.view_projection is None


def test_nothing_to_train_names_all_three_weights():
    with pytest.raises(medvl.errors.InputError, match="self_supervised_weight are all 0"):
        TrainConfig(contrastive_weight=0.0).validate_numbers()
    with pytest.raises(medvl.errors.InputError, match="self_supervised_crop"):
        TrainConfig(self_supervised_crop=0.0).validate_numbers()


def test_a_self_supervised_phase_comes_first_and_touches_only_the_image_side(tiny_npz, tmp_path):
    """``self_supervised_epochs``: the two-view loss alone (no text, no label) before the main losses; stopped
    at the end of that phase, the text tower and the head are as initialised, the image tower is not."""
    dataset = medvl.load_dataset(tiny_npz, label_columns=["label"]).select("train")

    def run(out, **options):
        torch.manual_seed(0)
        model = medvl.create_model("medmnist-small", **{"image.widths": [8, 16, 32, 64]})
        model.add_head("label", ["0", "1"])
        before = {name: value.clone() for name, value in model.state_dict().items()}
        config = TrainConfig(epochs=1, batch_size=40, lr=3e-3, log_every=1, label_columns=["label"],
                             supervised_weight=1.0, self_supervised_epochs=2, **options)
        medvl.train(model, dataset, config, out, show_progress=False)
        lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
        return model, before, lines

    model, before, lines = run(tmp_path / "phase", max_steps=12)  # 240 records, batch 40: 6 steps per epoch
    assert len(lines) == 12 and all(set(line) >= {"self_supervised", "loss"} for line in lines)
    assert not any("contrastive" in line or "ce_label" in line for line in lines)
    after = model.state_dict()
    for name, value in before.items():
        if name.startswith(("text_encoder.", "heads.", "text_projection.", "image_projection.", "logit_scale")):
            assert torch.equal(after[name], value), name  # the phase reads image features only
    changed = [name for name, value in before.items()
               if name.startswith("image_encoder.") and not torch.equal(after[name], value)]
    assert len(changed) > 10

    model, _, lines = run(tmp_path / "both")  # the whole run: the phase, then one epoch of the main losses
    assert len(lines) == 18
    assert all("self_supervised" in line and "ce_label" not in line for line in lines[:12])
    assert all("contrastive" in line and "ce_label" in line and "self_supervised" not in line for line in lines[12:])
    assert model.view_projection is None  # dropped at the end, as with the joint term


def test_each_phase_has_its_own_warmup_and_cosine():
    first, second = 20, 40
    factors = [_phased_warmup_cosine(step, first, second, 0.1) for step in range(first + second)]
    assert factors[0] == pytest.approx(0.5) and factors[1] == pytest.approx(1.0)  # 2 warmup steps in the first
    assert factors[first - 1] < 0.01  # the first phase decays to ~0 ...
    assert factors[first] == pytest.approx(0.25) and factors[first + 3] == pytest.approx(1.0)  # ... then warms up
    assert factors[-1] < 0.01
    assert all(b <= a + 1e-12 for a, b in itertools.pairwise(factors[first + 3:]))  # cosine: never rises
    plain = [_phased_warmup_cosine(step, 0, second, 0.1) for step in range(second)]
    assert plain == factors[first:]  # no phase: the schedule of a plain run
