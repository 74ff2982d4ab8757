"""The MedPix recipe's frozen (LiT-style) text tower: deterministic, cached while training, trainable around."""

import torch

import medvl
from medvl.train.loop import TrainConfig

TEXTS = ["axial CT of the head.", "sagittal MRI of the lumbar spine.", "axial CT of the head."]


def _frozen_model():
    torch.manual_seed(0)
    return medvl.create_model("phantom-tiny", **{"text.freeze": True})


def test_frozen_text_tower_in_training_mode_is_deterministic_and_matches_eval():
    model = _frozen_model()
    model.train()
    first, second = model.text_encoder(TEXTS), model.text_encoder(TEXTS)
    assert torch.equal(first, second)  # no dropout on a frozen tower
    assert torch.equal(first[0], first[2])
    assert len(model.text_encoder._frozen_features) == 2  # one forward pass per distinct text
    model.eval()
    assert torch.allclose(model.text_encoder(TEXTS), first, atol=1e-5)


def test_frozen_text_tower_cache_is_dropped_when_weights_are_loaded():
    model, other = _frozen_model(), medvl.create_model("phantom-tiny", **{"text.freeze": True})
    model.train()
    before = model.text_encoder(TEXTS)
    model.load_state_dict(other.state_dict())
    assert not model.text_encoder._frozen_features
    assert not torch.allclose(model.text_encoder(TEXTS), before)


def test_training_with_a_frozen_text_tower_leaves_it_unchanged(phantom_dir, tmp_path):
    dataset = medvl.load_dataset(phantom_dir).select("train")
    model = _frozen_model()
    text_before = {k: v.clone() for k, v in model.text_encoder.state_dict().items()}
    projection_before = model.text_projection.weight.clone()
    config = TrainConfig(epochs=1, batch_size=16, lr=3e-3, max_steps=3)
    trained = medvl.train(model, dataset, config, tmp_path / "run", show_progress=False)
    for name, value in trained.text_encoder.state_dict().items():
        assert torch.equal(value, text_before[name]), name
    assert not torch.equal(trained.text_projection.weight, projection_before)
