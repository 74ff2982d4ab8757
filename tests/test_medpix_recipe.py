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


def _top_tuned_model(layers: int = 1):
    torch.manual_seed(0)
    return medvl.create_model("phantom-tiny", **{"text.freeze": True, "text.tune_top_layers": layers})


def test_top_layers_on_kept_lower_states_give_the_full_towers_features():
    """With dropout off, running only the top layer on the kept output of the fixed ones is the full
    forward pass, padded or not; the fixed layers run once per distinct text."""
    model = _top_tuned_model()
    model.train()
    for module in model.text_encoder.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    texts = [*TEXTS, "a much longer caption: coronal T2 weighted MRI of the knee with a meniscal tear."]
    trained = model.text_encoder(texts)
    assert len(model.text_encoder._frozen_features) == 3
    assert trained.requires_grad
    model.eval()
    assert torch.allclose(model.text_encoder(texts), trained, atol=1e-5)
    model.train()
    assert torch.allclose(model.text_encoder(texts[::-1]).flip(0), trained, atol=1e-5)  # another padding


def test_training_top_layers_changes_only_them(phantom_dir, tmp_path):
    dataset = medvl.load_dataset(phantom_dir).select("train")
    model = _top_tuned_model()
    top = f"encoder.layer.{len(model.text_encoder.model.encoder.layer) - 1}."
    before = {k: v.clone() for k, v in model.text_encoder.model.state_dict().items()}
    config = TrainConfig(epochs=1, batch_size=16, lr=3e-3, text_lr=3e-3, max_steps=3)
    trained = medvl.train(model, dataset, config, tmp_path / "run", show_progress=False)
    changed = {name for name, value in trained.text_encoder.model.state_dict().items()
               if not torch.equal(value, before[name])}
    assert changed and all(name.startswith(top) for name in changed)
    reloaded = medvl.DualEncoder.from_pretrained(tmp_path / "run" / "model")
    reloaded.eval()
    trained.eval()
    assert torch.allclose(reloaded.text_encoder(TEXTS), trained.text_encoder(TEXTS), atol=1e-6)


def test_tune_top_layers_is_checked():
    import pytest

    from medvl.errors import MedvlError

    with pytest.raises(MedvlError, match="text.freeze=true"):
        medvl.create_model("phantom-tiny", **{"text.tune_top_layers": 1})
    with pytest.raises(MedvlError, match="leave at least one fixed"):  # phantom-tiny's text tower: 2 layers
        medvl.create_model("phantom-tiny", **{"text.freeze": True, "text.tune_top_layers": 2})
    with pytest.raises(MedvlError, match=r"text.tune_top_layers must be <= 64, got 99"):  # a typo: the size limit
        medvl.create_model("phantom-tiny", **{"text.freeze": True, "text.tune_top_layers": 99})
