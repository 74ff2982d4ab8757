"""Training in-process on phantom data: the loss goes down, resume is exact, eval runs."""

import json

import pytest
import torch

import medvl
from medvl.data import captions_for
from medvl.errors import InputError
from medvl.train.loop import TrainConfig


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_tiny_model_loss_goes_down(phantom_dir, tmp_path):
    dataset = medvl.load_dataset(phantom_dir).select("train")
    model = medvl.create_model("phantom-tiny")
    config = TrainConfig(epochs=8, batch_size=32, lr=3e-3, log_every=1, seed=0)
    medvl.train(model, dataset, config, tmp_path / "run", captions=captions_for(dataset), show_progress=False)
    losses = [line["loss"] for line in _metrics(tmp_path / "run") if "loss" in line]
    assert len(losses) >= 16
    assert sum(losses[-4:]) / 4 < 0.8 * sum(losses[:4]) / 4
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    assert (tmp_path / "run" / "train_config.json").is_file()


def test_resume_after_interruption_matches_an_uninterrupted_run(phantom_dir, tmp_path):
    dataset = medvl.load_dataset(phantom_dir).select("train")
    config = TrainConfig(epochs=3, batch_size=16, lr=2e-3, seed=1, grad_accum=2)

    def run(out, on_epoch_end=None, resume=False):
        torch.manual_seed(0)
        return medvl.train(medvl.create_model("phantom-tiny"), dataset, config, out, show_progress=False,
                           on_epoch_end=on_epoch_end, resume=resume)

    straight = run(tmp_path / "a")

    def crash_in_second_epoch(model, epoch):
        if epoch == 2:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C before the epoch-2 checkpoint
        return {}

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", on_epoch_end=crash_in_second_epoch)
    assert not (tmp_path / "b" / "model").exists()
    resumed = run(tmp_path / "b", resume=True)
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name


def test_label_only_data_trains_from_captions_and_supervised_head(tiny_npz, tmp_path):
    dataset = medvl.load_dataset(tiny_npz, label_columns=["label"]).select("train")
    model = medvl.create_model("medmnist-small", **{"image.widths": [8, 16, 32, 64]})
    config = TrainConfig(epochs=1, batch_size=32, label_columns=["label"], supervised_weight=1.0)
    trained = medvl.train(model, dataset, config, tmp_path / "run", show_progress=False)
    assert trained.meta["heads"] == {"label": ["0", "1"]}
    reloaded = medvl.load_model(tmp_path / "run")
    assert set(reloaded.heads) == {"label"}


def test_records_without_text_need_label_columns(tiny_npz, tmp_path):
    dataset = medvl.load_dataset(tiny_npz).select("train")
    with pytest.raises(InputError, match="--label-column"):
        medvl.train(medvl.create_model("phantom-tiny"), dataset, TrainConfig(epochs=1), tmp_path / "x",
                    show_progress=False)
    assert not (tmp_path / "x").exists()


def test_evaluators_on_a_trained_tiny_model(phantom_dir, tmp_path):
    dataset = medvl.load_dataset(phantom_dir)
    train_set, test_set = dataset.select("train"), dataset.select("test")
    model = medvl.create_model("phantom-tiny")
    medvl.train(model, train_set, TrainConfig(epochs=2, batch_size=32), tmp_path / "run",
                captions=captions_for(dataset), show_progress=False)
    zs = medvl.zero_shot(model, test_set, "finding", captions=captions_for(dataset), show_progress=False)
    assert zs["n"] == len(test_set) and 0 <= zs["balanced_accuracy"] <= 1
    assert set(zs["per_class"]) == set(test_set.classes("finding"))
    rt = medvl.retrieval(model, test_set, show_progress=False)
    assert rt["n_images"] == len(test_set) and 0 <= rt["i2t_R@5"] <= 1
    assert rt["image_to_text"]["chance"]["R@1"] == pytest.approx(1 / rt["n_texts"])
    lp = medvl.linear_probe(model, train_set, test_set, "finding", few_shot=(1,), show_progress=False)
    assert 0 <= lp["auc"] <= 1 and "1" in lp["few_shot"]
