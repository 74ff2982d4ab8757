"""Training in-process on phantom data: the loss goes down, resume is exact, eval runs."""

import csv
import hashlib
import json
import math
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

import medvl
from cli_helpers import PLANTED_WORDS, invoke, planted_phantom
from medvl.data import captions_for
from medvl.errors import DataError, InputError, TrainingError, WriteError
from medvl.eval.contamination import data_sha256
from medvl.train.loop import TrainConfig


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def small_phantom(tmp_path_factory) -> Path:
    """60 phantom cases at 48 px, with VQA questions (``vqa/``): the output-folder tests of every trainer."""
    from medvl.data.phantom import generate_phantom

    folder = tmp_path_factory.mktemp("small") / "data"
    generate_phantom(folder, n=60, seed=4, size=48, vqa=True, vqa_per_case=2)
    return folder


NAN = ["--set", "image.intensity_mean=1e38"]  # overflows the normalisation: the first loss is NaN
TINY_TRAIN = {  # each trainer at its smallest; DATA stands for the data folder
    "train": ["train", "--data", "DATA", "--model", "phantom-tiny", "--epochs", 1, "--batch-size", 16,
              "--set", "image.image_size=48", "-q"],
    "vqa": ["train", "vqa", "--data", "DATA/vqa", "--image-model", "phantom-tiny", "--image-size", 48,
            "--question-encoder", "bert", "--hidden-size", 32, "--fusion-layers", 1, "--set", "text.hidden_size=32",
            "--set", "text.intermediate_size=64", "--set", "text.num_layers=1", "--batch-size", 16, "--epochs", 1,
            "-q"],
    "report": ["train", "report", "--data", "DATA", "--image-model", "phantom-tiny", "--set", "image.image_size=48",
               "--set", "decoder.hidden_size=32", "--set", "decoder.num_heads=2", "--set", "decoder.num_layers=1",
               "--set", "decoder.intermediate_size=64", "--set", "decoder.vocab_size=400", "--batch-size", 16,
               "--epochs", 1, "-q"],
}


def _tiny_train(command: str, data: Path, *extra) -> list:
    return [str(data) + arg[4:] if isinstance(arg, str) and arg.startswith("DATA") else arg
            for arg in TINY_TRAIN[command]] + list(extra)


def _tree(folder: Path) -> dict[str, bytes | None]:
    return {str(path.relative_to(folder)): path.read_bytes() if path.is_file() else None
            for path in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("command", sorted(TINY_TRAIN))
def test_resume_into_a_folder_that_holds_no_run_is_refused_and_touches_nothing(small_phantom, tmp_path, command):
    """``--data victim --out victim --resume`` once trained into the data set and, when the run failed, emptied it."""
    victim = tmp_path / "victim"
    shutil.copytree(small_phantom, victim)
    before = _tree(victim)
    result, output = invoke(*_tiny_train(command, victim), "--out", victim, "--resume")
    assert result.exit_code == 2, output
    assert f"{victim}: --resume continues a training run, and this folder is not empty and holds no run" in \
        " ".join(output.split())
    assert "Traceback" not in output
    assert _tree(victim) == before


@pytest.mark.parametrize("command", sorted(TINY_TRAIN))
def test_a_failed_fresh_start_under_resume_removes_only_what_it_wrote(small_phantom, tmp_path, command):
    """A run folder left with its settings file only (a run stopped before its first checkpoint) and files of the
    user's: ``--resume`` starts fresh, the loss becomes NaN, and only the entries the run created go."""
    out = tmp_path / "runs"
    (out / "other_run").mkdir(parents=True)
    (out / "other_run" / "weights.bin").write_bytes(b"\x00" * 10)
    (out / "notes.txt").write_text("notes")
    (out / "train_config.json").write_text("{}")
    result, output = invoke(*_tiny_train(command, small_phantom, *NAN), "--out", out, "--resume")
    assert result.exit_code == 2 and "training stopped at step 1" in output, output
    assert sorted(path.name for path in out.iterdir()) == ["notes.txt", "other_run", "train_config.json"]
    assert (out / "notes.txt").read_text() == "notes"
    assert (out / "other_run" / "weights.bin").read_bytes() == b"\x00" * 10


def test_tiny_model_loss_goes_down(phantom_dir, tmp_path):
    dataset = medvl.load_dataset(phantom_dir).select("train")
    model = medvl.create_model("phantom-tiny")
    config = TrainConfig(epochs=8, batch_size=32, lr=3e-3, log_every=1, seed=0)
    medvl.train(model, dataset, config, tmp_path / "run", captions=captions_for(dataset), show_progress=False)
    lines = [line for line in _metrics(tmp_path / "run") if "loss" in line]
    losses = [line["loss"] for line in lines]
    assert len(losses) >= 16
    # each epoch's last step trains the short remainder batch, and its line says so (plots leave it out)
    per_epoch = -(-len(dataset) // 32)
    assert len(dataset) % 32 and [line["full_batch"] for line in lines] == [
        line["step"] % per_epoch != 0 for line in lines]
    assert sum(losses[-4:]) / 4 < 0.8 * sum(losses[:4]) / 4
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    assert (tmp_path / "run" / "train_config.json").is_file()


def test_a_data_folder_whose_name_is_not_utf8_trains_and_is_known_as_training_data(phantom_dir, tmp_path):
    """A file name may hold any bytes (a Latin-1 ``\xe9``): the run's data digest and the model's ``training``
    block hash the name's bytes, and scoring the training split is flagged as such."""
    data = Path(os.fsdecode(bytes(tmp_path) + b"/ph_\xe9"))
    shutil.copytree(phantom_dir, data)
    result, output = invoke("train", "--data", data, "--model", "phantom-tiny", "--out", tmp_path / "run",
                            "--max-steps", 1, "--batch-size", 8, "-q")
    assert result.exit_code == 0, output
    training = json.loads((tmp_path / "run" / "model" / "meta.json").read_text())["training"]
    source = Path(medvl.load_dataset(data).source).resolve()  # the folder's manifest
    assert training["data_sha256"] == data_sha256(source) == hashlib.sha256(os.fsencode(source)).hexdigest()
    result, output = invoke("eval", "zero-shot", "--model", tmp_path / "run" / "model", "--data", data,
                            "--split", "train", "--json", tmp_path / "zero_shot.json", "-q")
    assert result.exit_code == 0, output
    n_train = len(medvl.load_dataset(phantom_dir).select("train"))
    flagged = json.loads((tmp_path / "zero_shot.json").read_text())["trained_on_scored"]
    assert flagged["records"] == flagged["of"] == n_train and flagged["splits"] == ["train"]


def test_a_model_trained_from_a_trained_one_keeps_every_run_it_learned_from(small_phantom, tmp_path):
    """Fine-tuned twice (train split, then val, then test) the model still flags its first run's train split as
    training data; a report generator and a VQA model started from it (``--init``) keep its runs too."""
    from medvl.data.loaders.vqa import load_vqa
    from medvl.eval.contamination import trained_on_scored, training_blocks
    from medvl.models.vqa import select_questions
    from medvl.train.report import train_report_generator
    from medvl.train.vqa import VQAOptions, train_vqa

    data = medvl.load_dataset(small_phantom)
    config = TrainConfig(epochs=1, batch_size=16, max_steps=1)
    model = medvl.create_model("phantom-tiny", **{"image.image_size": 48})
    for split in ("train", "val", "test"):
        medvl.train(model, data.select(split), config, tmp_path / split, show_progress=False)
        model = medvl.load_model(tmp_path / split / "model")
    n_train = len(data.select("train"))
    assert trained_on_scored(model, data.select("train")) == {
        "records": n_train, "of": n_train, "splits": ["train"], "records_trained": n_train}
    assert [block["splits"] for block in training_blocks(model.meta["training"])] == [["test"], ["val"], ["train"]]

    generator = train_report_generator(data.select("test"), tmp_path / "report", config, init=tmp_path / "test" /
                                       "model", overrides={"decoder.hidden_size": 32, "decoder.num_heads": 2,
                                                           "decoder.num_layers": 1, "decoder.intermediate_size": 64,
                                                           "decoder.vocab_size": 400}, show_progress=False)
    assert trained_on_scored(generator, data.select("train"))["splits"] == ["train"]
    items = select_questions(load_vqa(small_phantom / "vqa"), "test", "data", "test")
    options = VQAOptions(init=tmp_path / "test" / "model", question_encoder="bert", hidden_size=32, fusion_layers=1,
                         overrides={"text.hidden_size": 32, "text.num_layers": 1, "text.intermediate_size": 64})
    vqa = train_vqa(items, tmp_path / "vqa", config, options, "data", show_progress=False)
    assert training_blocks(vqa.meta["training"])[1:] == training_blocks(model.meta["training"])


@pytest.mark.parametrize("batch_group, self_supervised, self_supervised_epochs",
                         [(None, 0.0, 0), ("sex", 0.0, 0), (None, 1.0, 0), (None, 0.0, 2)])
def test_resume_after_interruption_matches_an_uninterrupted_run(phantom_dir, tmp_path, batch_group, self_supervised,
                                                                self_supervised_epochs):
    """Also with a self-supervised phase: the run stops at the end of its last epoch, before the checkpoint, and
    the resumed run redoes that epoch and crosses into the main phase with its own schedule."""
    dataset = medvl.load_dataset(phantom_dir).select("train")
    config = TrainConfig(epochs=3, batch_size=16, lr=2e-3, seed=1, grad_accum=2, batch_group=batch_group,
                         batch_group_share=1.0, self_supervised_weight=self_supervised,
                         self_supervised_epochs=self_supervised_epochs, log_every=1)

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
    if self_supervised or self_supervised_epochs:  # the checkpoint keeps the view projection: the resumed run
        # continues it
        checkpoint = json.loads((tmp_path / "b" / "checkpoint" / "model" / "meta.json").read_text())
        assert checkpoint["view_projection"] == 128
    resumed = run(tmp_path / "b", resume=True)
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name

    def steps(folder):
        return [line["step"] for line in map(json.loads, (folder / "metrics.jsonl").open()) if "lr" in line]

    assert steps(tmp_path / "b") == steps(tmp_path / "a")  # the steps after the checkpoint logged once
    saved = medvl.load_model(tmp_path / "b")  # the final model never carries the training-only projection
    assert "view_projection" not in saved.meta
    assert not any(name.startswith("view_projection.") for name in saved.state_dict())


def _train_small(dataset, out, config, **kwargs):
    """phantom-tiny at 48 px from the same seeded init each time."""
    torch.manual_seed(0)
    return medvl.train(medvl.create_model("phantom-tiny", **{"image.image_size": 48}), dataset, config, out,
                       show_progress=False, **kwargs)


def _checkpoint_steps(out: Path) -> tuple[int, int]:
    """The step the checkpoint's model records and the step of its state file."""
    meta = json.loads((out / "checkpoint" / "model" / "meta.json").read_text())
    return meta["checkpoint_step"], torch.load(out / "checkpoint" / "state.pt", weights_only=True)["step"]


def test_a_pretrained_text_towers_learning_rate_is_recorded_and_logged_and_an_older_run_folder_resumes(
        small_phantom, tmp_path):
    """A pretrained text tower trains at lr / 20 unless text_lr is set: train_config.json said only ``text_lr:
    null`` and metrics.jsonl the image tower's lr. Now ``text_lr_used`` and a logged ``text_lr`` say it; a run
    folder written before (neither) still resumes, to the weights of the uninterrupted run."""
    dataset = medvl.load_dataset(small_phantom).select("train")
    minilm = {"image.image_size": 48, "text.kind": "pretrained", "text.path": "all-minilm-l6-v2",
              "text.freeze": True, "text.tune_top_layers": 1}
    medvl.train(medvl.create_model("phantom-tiny", seed=0, **minilm), dataset,
                TrainConfig(epochs=1, batch_size=16, lr=2e-3, max_steps=1), tmp_path / "minilm", show_progress=False)
    settings = json.loads((tmp_path / "minilm" / "train_config.json").read_text())
    assert settings["train"]["text_lr"] is None and settings["text_lr_used"] == 2e-3 / 20
    assert [(line["lr"], line["text_lr"]) for line in _metrics(tmp_path / "minilm")] == [(2e-3, 2e-3 / 20)]

    config = TrainConfig(epochs=2, batch_size=16, lr=2e-3, text_lr=5e-4, seed=1, log_every=1)  # a bert tower

    def run(out, on_epoch_end=None, resume=False):
        return medvl.train(medvl.create_model("phantom-tiny", seed=0, **{"image.image_size": 48}), dataset, config,
                           out, show_progress=False, on_epoch_end=on_epoch_end, resume=resume)

    straight = run(tmp_path / "a").state_dict()
    assert json.loads((tmp_path / "a" / "train_config.json").read_text())["text_lr_used"] == 5e-4
    assert all(line["text_lr"] == pytest.approx(line["lr"] / 4) for line in _metrics(tmp_path / "a"))

    def crash_in_second_epoch(model, epoch):
        if epoch == 2:
            raise KeyboardInterrupt  # before the epoch-2 checkpoint
        return {}

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", on_epoch_end=crash_in_second_epoch)
    older = tmp_path / "b" / "train_config.json"  # as the code before text_lr_used wrote it
    older.write_text(json.dumps({k: v for k, v in json.loads(older.read_text()).items() if k != "text_lr_used"}))
    lines = [{k: v for k, v in line.items() if k != "text_lr"} for line in _metrics(tmp_path / "b")]
    (tmp_path / "b" / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    resumed = run(tmp_path / "b", resume=True).state_dict()
    for name, value in straight.items():
        assert torch.equal(value, resumed[name]), name
    assert json.loads(older.read_text())["text_lr_used"] == 5e-4


def test_a_weight_average_is_the_saved_model_and_a_resumed_run_continues_it(small_phantom, tmp_path):
    """ema_decay: the saved model is the exponential moving average of the weights, d = min(decay, (1 + n) / (10 +
    n)) at the n-th step; a checkpoint keeps the average, so a resumed run saves the model of an unbroken one."""
    dataset = medvl.load_dataset(small_phantom).select("train")
    config = TrainConfig(epochs=4, batch_size=len(dataset), lr=5e-3, seed=2, ema_decay=0.5)  # one step an epoch
    raw: dict[int, dict[str, torch.Tensor]] = {}

    def keep(model, epoch):
        raw[epoch] = {name: value.detach().clone() for name, value in model.state_dict().items()}
        return {}

    straight = _train_small(dataset, tmp_path / "a", config, on_epoch_end=keep).state_dict()
    trained = [name for name, param in medvl.load_model(tmp_path / "a").named_parameters() if param.requires_grad]
    assert not all(torch.equal(straight[name], raw[4][name]) for name in trained)  # not the last step's weights

    def crash(model, epoch):
        if epoch == 4:
            raise KeyboardInterrupt  # before the epoch-4 checkpoint
        return keep(model, epoch)

    with pytest.raises(KeyboardInterrupt):
        _train_small(dataset, tmp_path / "b", config, on_epoch_end=crash)
    state = torch.load(tmp_path / "b" / "checkpoint" / "state.pt", weights_only=True)["ema"]
    assert state["updates"] == 3
    resumed = _train_small(dataset, tmp_path / "b", config, resume=True, on_epoch_end=keep).state_dict()
    decay = min(0.5, (1 + 4) / (10 + 4))
    for name, value in resumed.items():
        assert torch.allclose(value, straight[name], atol=1e-6), name
        if name in state["average"]:
            expected = decay * state["average"][name] + (1 - decay) * raw[4][name]
            assert torch.allclose(value, expected, atol=1e-6), name
        else:  # an integer buffer (BatchNorm's batch count): the last step's
            assert torch.equal(value, raw[4][name]), name
    assert set(trained) <= set(state["average"])
    plain = TrainConfig(epochs=2, batch_size=len(dataset), lr=5e-3, seed=2)  # a run from before ema_decay existed
    with pytest.raises(KeyboardInterrupt):
        _train_small(dataset, tmp_path / "c", plain, on_epoch_end=lambda model, epoch: crash(model, epoch + 2))
    settings = json.loads((tmp_path / "c" / "train_config.json").read_text())
    del settings["train"]["ema_decay"]
    (tmp_path / "c" / "train_config.json").write_text(json.dumps(settings))
    _train_small(dataset, tmp_path / "c", plain, resume=True)  # resumed as the same run, not refused
    with pytest.raises(InputError, match="ema_decay 0.0 -> 0.5"):
        _train_small(dataset, tmp_path / "c", TrainConfig(epochs=2, batch_size=len(dataset), lr=5e-3, seed=2,
                                                         ema_decay=0.5), resume=True)


def test_resume_refuses_a_checkpoint_whose_model_and_state_are_of_different_steps(small_phantom, tmp_path):
    """A newer checkpoint model beside an older state file (two checkpoints' files put together) would resume
    silently from the older optimizer state and step and train steps twice."""
    dataset = medvl.load_dataset(small_phantom).select("train")
    config = TrainConfig(epochs=2, batch_size=16, lr=2e-3, seed=1)
    out, older = tmp_path / "run", tmp_path / "older-state.pt"

    def keep_the_first_state(model, epoch):
        if epoch == 2:  # called before the epoch-2 checkpoint replaces the epoch-1 one
            shutil.copy(out / "checkpoint" / "state.pt", older)
        return {}

    _train_small(dataset, out, config, on_epoch_end=keep_the_first_state)
    last, first = _checkpoint_steps(out)[0], torch.load(older, weights_only=True)["step"]
    assert _checkpoint_steps(out) == (last, last) and 0 < first < last
    assert "checkpoint_step" not in json.loads((out / "model" / "meta.json").read_text())  # the checkpoint's only
    shutil.copy(older, out / "checkpoint" / "state.pt")
    before = _tree(out)
    with pytest.raises(DataError, match=f"checkpoint: its model is of step {last} and its state.pt of step {first}: "
                                        "they were not saved together"):
        _train_small(dataset, out, config, resume=True)
    assert _tree(out) == before


def test_resume_refuses_a_checkpoint_of_another_model_and_names_what_differs(small_phantom, tmp_path):
    """A checkpoint folder copied from another run (another embedding width, another loss) was trained on without a
    word, and the run's train_config.json rewritten to describe it."""
    dataset = medvl.load_dataset(small_phantom).select("train")
    dataset = dataset.subset(dataset.records[:16])
    config = TrainConfig(epochs=1, batch_size=8, lr=2e-3, seed=1)  # each run ends with its checkpoint

    def run(out, **overrides):
        model = medvl.create_model("phantom-tiny", seed=0, **{"image.image_size": 48, **overrides})
        return medvl.train(model, dataset, config, out, show_progress=False, resume=True)

    out = tmp_path / "run"
    run(out)
    shutil.copytree(out / "checkpoint", tmp_path / "own")
    run(tmp_path / "narrow", embed_dim=32)
    shutil.copytree(tmp_path / "own", tmp_path / "siglip")  # a SigLIP run's checkpoint: its loss (weights alike)
    settings = tmp_path / "siglip" / "model" / "config.json"
    settings.write_text(json.dumps({**json.loads(settings.read_text()), "loss": "siglip"}))
    for other, difference in [(tmp_path / "narrow" / "checkpoint", "embed_dim 32 (the run's: 64)"),
                              (tmp_path / "siglip", "loss 'siglip' (the run's: 'clip')")]:
        shutil.rmtree(out / "checkpoint")
        shutil.copytree(other, out / "checkpoint")
        before = _tree(out)
        with pytest.raises(DataError, match=re.escape(f"{out / 'checkpoint'}: its model is not this run's: "
                                                      f"{difference}")):
            run(out)
        assert _tree(out) == before  # train_config.json not rewritten, nothing trained
    shutil.rmtree(out / "checkpoint")
    shutil.copytree(tmp_path / "own", out / "checkpoint")
    run(out)  # its own checkpoint resumes (at its last step: nothing left to train)


def test_a_checkpoint_write_failing_halfway_keeps_the_previous_checkpoint_whole(small_phantom, tmp_path,
                                                                               monkeypatch):
    """The disk fills up after the checkpoint's model is written, at its state file: the previous checkpoint is
    kept as it was (model and state of one step), and resuming then matches an uninterrupted run exactly."""
    from medvl.train import loop

    dataset = medvl.load_dataset(small_phantom).select("train")
    config = TrainConfig(epochs=3, batch_size=16, lr=2e-3, seed=1, log_every=1)
    straight = _train_small(dataset, tmp_path / "a", config)

    def interrupt_in_second_epoch(model, epoch):
        if epoch == 2:
            raise KeyboardInterrupt
        return {}

    out = tmp_path / "b"
    with pytest.raises(KeyboardInterrupt):
        _train_small(dataset, out, config, on_epoch_end=interrupt_in_second_epoch)
    kept = _tree(out / "checkpoint")
    write = loop.atomic_write_bytes

    def full_disk_at_the_state_file(path, data):
        if Path(path).name == "state.pt":
            raise WriteError(path, "cannot write: No space left on device")
        return write(path, data)

    monkeypatch.setattr(loop, "atomic_write_bytes", full_disk_at_the_state_file)
    with pytest.raises(WriteError, match=f"{out / 'checkpoint' / 'state.pt'}: cannot write: No space left"):
        _train_small(dataset, out, config, resume=True)
    monkeypatch.undo()
    assert _tree(out / "checkpoint") == kept  # not the newer model beside the older state
    assert _checkpoint_steps(out)[0] == _checkpoint_steps(out)[1]
    assert sorted(path.name for path in out.iterdir()) == ["checkpoint", "metrics.jsonl", "train_config.json"]
    resumed = _train_small(dataset, out, config, resume=True)
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_two_python_api_runs_with_a_seeded_create_model_give_the_same_weights(small_phantom, tmp_path):
    """``TrainConfig.seed`` cannot seed the init of a model built before ``train`` is called, and ``create_model``
    took no seed: two identical runs in one process (the README's example) started from other weights."""
    dataset = medvl.load_dataset(small_phantom).select("train")
    config = TrainConfig(epochs=1, batch_size=16, seed=5, max_steps=1)
    weights = []
    for run in ("a", "b"):
        torch.rand(7)  # the global generator moved on, as anything before in a notebook or a sweep moves it
        model = medvl.create_model("phantom-tiny", seed=config.seed, **{"image.image_size": 48})
        weights.append(medvl.train(model, dataset, config, tmp_path / run, show_progress=False).state_dict())
    for name, value in weights[0].items():
        assert torch.equal(value, weights[1][name]), name
    with pytest.raises(InputError, match="seed"):
        medvl.create_model("phantom-tiny", seed=-1)


@pytest.mark.parametrize("command", sorted(TINY_TRAIN))
def test_a_seed_past_what_the_trainer_derives_from_it_is_refused_before_any_data_is_read(tmp_path, command):
    """A large --seed passed every check, then the trainer's derived seed (seed * 1_000_003 + batch index)
    overflowed torch's at the first step: a traceback after the data was read (2**64: in create_model)."""
    from medvl.models.registry import MAX_SEED

    missing = tmp_path / "no-data"  # never read: the seed is refused first
    for seed in (MAX_SEED + 1, 20_000_000_000_000, 2**64):
        result, output = invoke(*_tiny_train(command, missing), "--seed", seed, "--out", tmp_path / "out")
        assert result.exit_code == 2, output
        assert f"seed must be <= {MAX_SEED}, got {seed}" in " ".join(output.split()), output
        assert "Traceback" not in output and not (tmp_path / "out").exists()
    with pytest.raises(InputError, match=f"seed must be <= {MAX_SEED}"):
        medvl.create_model("phantom-tiny", seed=2**64)


def test_the_largest_seed_trains(small_phantom, tmp_path):
    from medvl.models.registry import MAX_SEED

    dataset = medvl.load_dataset(small_phantom).select("train")
    config = TrainConfig(epochs=1, batch_size=8, seed=MAX_SEED, max_steps=2, mixup=0.4, supervised_weight=1.0,
                         label_columns=["cardiomegaly"], self_supervised_weight=0.5)
    model = medvl.create_model("phantom-tiny", seed=config.seed, **{"image.image_size": 48})
    medvl.train(model, dataset, config, tmp_path / "run", show_progress=False)
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()


def test_the_python_api_and_the_cli_give_the_same_weights_with_a_supervised_head(small_phantom, tmp_path):
    """The CLI added a head right after the seeded init, the API after fit re-seeded torch (and sorted its classes
    as strings, not by value): the same seed gave two models as soon as a head was trained."""
    from safetensors.torch import load_file

    result, output = invoke(*_tiny_train("train", small_phantom), "--seed", 3, "--max-steps", 2, "--workers", 0,
                            "--label-column", "age", "--supervised-weight", 1, "--out", tmp_path / "cli")
    assert result.exit_code == 0, output
    config = TrainConfig(epochs=1, batch_size=16, seed=3, max_steps=2, workers=0, label_columns=["age"],
                         supervised_weight=1.0)
    dataset = medvl.load_dataset(small_phantom).select("train")
    torch.rand(7)  # the generator moved on before: create_model's seed decides
    model = medvl.create_model("phantom-tiny", seed=config.seed, **{"image.image_size": 48})
    medvl.train(model, dataset, config, tmp_path / "api", show_progress=False)
    cli, api = (load_file(tmp_path / run / "model" / "model.safetensors") for run in ("cli", "api"))
    assert cli.keys() == api.keys() and any(name.startswith("heads.age") for name in cli)
    for name, value in cli.items():
        assert torch.equal(value, api[name]), name
    heads = [json.loads((tmp_path / run / "model" / "meta.json").read_text())["heads"] for run in ("cli", "api")]
    assert heads[0] == heads[1]
    assert heads[0]["age"] == sorted(heads[0]["age"], key=int)  # by value


def test_class_names_that_are_digits_but_not_numbers_train_a_head(small_phantom, tmp_path):
    """"²" and "①" are digits to str.isdigit but int() cannot read them: sorting a head's classes ended
    ``medvl train --supervised-weight`` in a traceback. Numbers sort by value, such names as text."""
    from medvl.eval.head import class_order

    data = tmp_path / "graded"
    shutil.copytree(small_phantom, data)
    grades = ["10", "2", "²", "①"]
    with (data / "manifest.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    with (data / "manifest.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[*rows[0], "grade"])
        writer.writeheader()
        writer.writerows({**row, "grade": grades[i % len(grades)]} for i, row in enumerate(rows))
    result, output = invoke(*_tiny_train("train", data), "--max-steps", 1, "--workers", 0, "--label-column", "grade",
                            "--supervised-weight", 1, "--out", tmp_path / "run")
    assert result.exit_code == 0, output
    assert "Traceback" not in output
    heads = json.loads((tmp_path / "run" / "model" / "meta.json").read_text())["heads"]
    assert heads["grade"] == ["2", "10", "²", "①"] == sorted(grades, key=class_order)


def test_resume_of_a_run_without_a_checkpoint_checks_its_settings_and_restarts_its_metrics(small_phantom, tmp_path):
    """A run stopped by max_steps within an epoch has a model but no checkpoint: --resume under other settings
    started fresh and replaced its model and appended to its metrics; with the same settings it starts fresh and
    logs each step once."""
    dataset = medvl.load_dataset(small_phantom).select("train")
    config = TrainConfig(epochs=2, batch_size=16, lr=2e-3, seed=1, max_steps=2, log_every=1)
    out = tmp_path / "run"
    _train_small(dataset, out, config)
    assert not (out / "checkpoint").exists()
    before = _tree(out)
    other = TrainConfig(epochs=3, batch_size=16, lr=1e-2, seed=1, log_every=1)
    with pytest.raises(InputError, match="this command changes epochs 2 -> 3, lr 0.002 -> 0.01, max_steps 2 -> None"):
        _train_small(dataset, out, other, resume=True)
    assert _tree(out) == before
    _train_small(dataset, out, config, resume=True)
    assert [line["step"] for line in _metrics(out)] == [1, 2]
    assert _tree(out) == before  # seeded: the fresh start is the same run


DAMAGED_SETTINGS = {  # (damage, what the message says)
    "cut short": (b'{"train": {"epochs": 1', "damaged run settings (JSONDecodeError"),
    "not a run's": (b'[1, 2]', "damaged run settings (not a medvl run's settings"),
    "missing": (None, "missing: the run folder holds checkpoint/ but not the settings"),
}


def test_resume_with_damaged_or_missing_run_settings_is_refused_not_continued_unchecked(small_phantom, tmp_path):
    """A train_config.json cut short, not a run's, or deleted beside a checkpoint switched every --resume check off:
    the checkpoint went on silently with other epochs and data, and the run's settings and its model's training
    record were rewritten. Also: an intact checkpoint of a run with another --lr is not called damaged."""
    dataset = medvl.load_dataset(small_phantom).select("train")
    config = TrainConfig(epochs=1, batch_size=16, lr=2e-3, seed=1)  # ends with its checkpoint
    run = tmp_path / "run"
    _train_small(dataset, run, config)
    other = TrainConfig(epochs=2, batch_size=16, lr=2e-3, seed=1)
    for damage, (content, reason) in DAMAGED_SETTINGS.items():
        out = tmp_path / damage.replace(" ", "-").replace("'", "")
        shutil.copytree(run, out)
        if content is None:
            (out / "train_config.json").unlink()
        else:
            (out / "train_config.json").write_bytes(content)
        before = _tree(out)
        with pytest.raises(DataError, match=re.escape(f"{out / 'train_config.json'}: {reason}")):
            _train_small(dataset.subset(dataset.records[:20]), out, other, resume=True)
        assert _tree(out) == before, damage
    faster = tmp_path / "faster"  # the same run with another --lr; its checkpoint put in place of the run's
    _train_small(dataset, faster, TrainConfig(epochs=1, batch_size=16, lr=5e-3, seed=1))
    shutil.rmtree(run / "checkpoint")
    shutil.copytree(faster / "checkpoint", run / "checkpoint")
    with pytest.raises(DataError, match="the checkpoint was trained with other settings than this run's "
                                        r"\(optimizer group 0: initial_lr 0.005, this run's is 0.002\)") as caught:
        _train_small(dataset, run, config, resume=True)
    assert "damaged" not in caught.value.problem


def test_a_run_removes_the_staging_folders_an_interrupted_write_left_unless_another_run_holds_the_folder(
        small_phantom, tmp_path):
    """A SIGKILL while a checkpoint was written left its .checkpoint.tmp-* folder in the run folder for good: no
    later run removed it. A run removes them when it starts, but never while another live run holds the folder
    (its staging folders may be being written)."""
    import fcntl

    dataset = medvl.load_dataset(small_phantom).select("train")
    config = TrainConfig(epochs=1, batch_size=16, seed=1)
    out = tmp_path / "run"
    _train_small(dataset, out, config)
    stale = [".checkpoint.tmp-7m8cfbx0", ".model.tmp-62eembpp", ".checkpoint.old-4242-abcd1234",
             ".train_config.json.x1y2_3z4.tmp"]
    for name in stale[:3]:
        (out / name / ".model.tmp-q" if "checkpoint" in name else out / name).mkdir(parents=True)
        (out / name / "state.pt").write_bytes(b"\x00" * 100)
    (out / stale[3]).write_text("{")
    (out / "notes.txt").write_text("mine")
    (out / ".hidden").mkdir()
    # a user's own backups beside the run's entries, named like them but not by medvl's staging: they stay
    mine = [".model.backup-before-retrain", ".metrics.jsonl.bak", ".train_config.json.orig", ".checkpoint.tmp-x"]
    (out / mine[0]).mkdir()
    for name in mine[1:]:
        (out / name).write_text("mine")
    handle = os.open(out, os.O_RDONLY)  # another live run holds the folder: nothing of it is touched
    try:
        fcntl.flock(handle, fcntl.LOCK_SH)
        _train_small(dataset, out, config, resume=True)
    finally:
        os.close(handle)
    assert all((out / name).exists() for name in stale)
    _train_small(dataset, out, config, resume=True)
    assert sorted(path.name for path in out.iterdir()) == sorted([".hidden", "checkpoint", "metrics.jsonl", "model",
                                                                  "notes.txt", "train_config.json", *mine])


def test_resume_with_another_starting_model_is_refused(small_phantom, tmp_path):
    """A run from trained weights stopped within an epoch (no checkpoint) was resumed with a registered name of the
    same config: accepted, and its model replaced by one trained from a random init. The starting weights are
    recorded (a folder's by their digest, so a copy of it is the same start); a run folder written before resumes."""
    args = ["--epochs", 2, "--batch-size", 16, "--max-steps", 1, "-q"]
    result, output = invoke(*_tiny_train("train", small_phantom, "--out", tmp_path / "a", "--max-steps", 1))
    assert result.exit_code == 0, output
    assert json.loads((tmp_path / "a" / "train_config.json").read_text())["start"] == {
        "model": "phantom-tiny", "init": "random", "seed": 0}
    out = tmp_path / "b"
    result, output = invoke("train", "--data", small_phantom, "--model", tmp_path / "a", "--out", out, *args)
    assert result.exit_code == 0, output
    assert not (out / "checkpoint").exists()
    before = _tree(out)
    result, output = invoke("train", "--data", small_phantom, "--model", "phantom-tiny", "--set",
                            "image.image_size=48", "--out", out, *args, "--resume")
    assert result.exit_code == 2, output
    assert (f"this command changes the starting model '{tmp_path / 'a' / 'model'}' (weights sha256 "
            in " ".join(output.split())) and "-> 'phantom-tiny' (random init, seed 0)." in " ".join(output.split())
    assert _tree(out) == before
    shutil.copytree(tmp_path / "a", tmp_path / "a-copy")
    result, output = invoke("train", "--data", small_phantom, "--model", tmp_path / "a-copy", "--out", out, *args,
                            "--resume")
    assert result.exit_code == 0, output
    settings = json.loads((out / "train_config.json").read_text())
    del settings["start"]  # as medvl wrote it before it recorded the start
    (out / "train_config.json").write_text(json.dumps(settings))
    result, output = invoke("train", "--data", small_phantom, "--model", tmp_path / "a", "--out", out, *args,
                            "--resume")
    assert result.exit_code == 0, output


def test_resume_with_another_caption_set_is_refused(small_phantom, tmp_path):
    """The caption set made the label captions of the steps before the checkpoint and fitted its tokenizer: the
    rest of the run trained on another one, which the model's meta then claimed for the whole run."""
    from medvl.data.captions import CaptionConfig

    dataset = medvl.load_dataset(small_phantom).select("train")
    config = TrainConfig(epochs=2, batch_size=16, lr=2e-3, seed=1, text_source="captions", label_columns=["finding"])
    out = tmp_path / "run"

    def interrupt(model, epoch):
        if epoch == 2:
            raise KeyboardInterrupt
        return {}

    with pytest.raises(KeyboardInterrupt):
        _train_small(dataset, out, config, captions=captions_for(dataset), on_epoch_end=interrupt)
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["captions"] == captions_for(dataset).to_dict()
    before = _tree(out)
    other = CaptionConfig(templates=["zzz {} zzz."], classes={"finding": {"nodule": ["qqq spot"]}})
    with pytest.raises(InputError, match=r"this command changes the caption set \(captions\)\. Resume"):
        _train_small(dataset, out, config, captions=other, resume=True)
    assert _tree(out) == before
    _train_small(dataset, out, config, captions=captions_for(dataset), resume=True)
    assert json.loads((out / "model" / "meta.json").read_text())["captions"] == saved["captions"]


DAMAGED_STATES = {"cut short": lambda path: path.write_bytes(path.read_bytes()[:100]),
                  "empty": lambda path: path.write_bytes(b""),
                  "another object": lambda path: torch.save({"step": 3}, path)}


def test_resume_from_a_damaged_state_file_is_a_clear_error(small_phantom, tmp_path):
    run = tmp_path / "run"
    result, output = invoke(*_tiny_train("train", small_phantom), "--out", run)
    assert result.exit_code == 0, output
    for damage, write in DAMAGED_STATES.items():
        out = tmp_path / damage.replace(" ", "-")
        shutil.copytree(run, out)
        write(out / "checkpoint" / "state.pt")
        result, output = invoke(*_tiny_train("train", small_phantom), "--out", out, "--resume")
        assert result.exit_code == 2, (damage, output)
        assert "Traceback" not in output
        assert f"{out / 'checkpoint' / 'state.pt'}: damaged checkpoint state" in " ".join(output.split()), damage
        assert f"delete {out / 'checkpoint'} to start fresh" in " ".join(output.split()), damage


def _edit_state(edit):
    """A damage of a state file: ``edit`` changes its loaded dict in place."""
    def write(path):
        state = torch.load(path, weights_only=True)
        edit(state)
        torch.save(state, path)
    return write


def _first_moments(state):
    return next(iter(state["optimizer"]["state"].values()))


STRUCTURED_DAMAGE = {  # (damage, what the message says)
    "no parameter groups": (lambda s: s["optimizer"].update(param_groups=[]), "optimizer or scheduler: ValueError"),
    "optimizer a list": (lambda s: s.update(optimizer=[1, 2]), "optimizer or scheduler: TypeError"),
    "optimizer without state": (lambda s: s["optimizer"].pop("state"), "optimizer or scheduler: KeyError"),
    "moments of another shape": (lambda s: _first_moments(s).update(exp_avg=torch.zeros(3)),
                                 "exp_avg of shape (3,) for a parameter of shape"),
    "lr a string": (lambda s: s["optimizer"]["param_groups"][0].update(lr="fast"), "optimizer group 0: lr 'fast'"),
    "betas of one value": (lambda s: s["optimizer"]["param_groups"][0].update(betas=(0.9,)),
                           "optimizer group 0: betas (0.9,), this run's is (0.9, 0.999)"),
    "emptied moments": (lambda s: s["optimizer"].update(state={}),
                        "its optimizer state has gone through 0 steps, the checkpoint 2"),
    "scheduler an int": (lambda s: s.update(scheduler=3), "optimizer or scheduler: AttributeError"),
    "scheduler with an optimizer": (lambda s: s["scheduler"].update(optimizer=None),
                                    "scheduler: not this run's learning-rate schedule"),
    "scheduler at another step": (lambda s: s["scheduler"].update(last_epoch=1), "scheduler at step 1, the checkpoint"),
    "batch index of another step": (lambda s: s.update(batch_index=1), "batch_index 1 is not step 2's (2)"),
    "negative batch index": (lambda s: s.update(batch_index=-5), "batch_index -5 is not step 2's (2)"),
}


def test_resume_from_a_checkpoint_state_with_damaged_values_is_a_clear_error(small_phantom, tmp_path):
    """Optimizer and scheduler states went to torch unchecked: its tracebacks (at once, or at the first step), or
    training on silently from reset Adam moments or from the batches of another step."""
    dataset = medvl.load_dataset(small_phantom).select("train")
    dataset = dataset.subset(dataset.records[:16])
    config = TrainConfig(epochs=2, batch_size=8, lr=2e-3, seed=1)  # 2 steps an epoch

    def interrupt(model, epoch):
        if epoch == 2:
            raise KeyboardInterrupt
        return {}

    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        _train_small(dataset, run, config, on_epoch_end=interrupt)  # its checkpoint at step 2
    for damage, (edit, reason) in STRUCTURED_DAMAGE.items():
        out = tmp_path / damage.replace(" ", "-")
        shutil.copytree(run, out)
        _edit_state(edit)(out / "checkpoint" / "state.pt")
        before = _tree(out)
        with pytest.raises(DataError, match=re.escape(f"{out / 'checkpoint' / 'state.pt'}: damaged checkpoint state"
                                                      )) as caught:
            _train_small(dataset, out, config, resume=True)
        assert reason in str(caught.value), (damage, str(caught.value))
        assert f"delete {out / 'checkpoint'} to start fresh" in str(caught.value)
        assert _tree(out) == before, damage
    _train_small(dataset, run, config, resume=True)  # undamaged, it resumes


def test_run_files_not_utf8_or_nested_too_deeply_are_named_not_a_traceback(tmp_path):
    """metrics.jsonl with a byte that is not UTF-8 raised UnicodeDecodeError on --resume, and a JSON line (or a
    train_config.json / model config.json) nested 100,000 deep RecursionError."""
    from medvl.errors import ModelError
    from medvl.train.loop import _drop_metrics_after, recorded_run

    metrics, deep = tmp_path / "metrics.jsonl", b"[" * 100_000
    for bad in (b'{"step": 1, "note": "\xff\xfe"}', deep):
        metrics.write_bytes(b'{"step": 1}\n' + bad + b'\n{"step": 3}\n')
        with pytest.raises(DataError, match=re.escape(f"{metrics}: line 2: not a metrics line")):
            _drop_metrics_after(metrics, 2)
    metrics.write_bytes(b'{"step": 1}\n{"step": 2}\n{"step": 3, "note": "\xc3')  # cut within a character
    _drop_metrics_after(metrics, 2)
    assert metrics.read_bytes() == b'{"step": 1}\n{"step": 2}\n'
    (tmp_path / "train_config.json").write_bytes(deep)
    assert recorded_run(tmp_path) is None  # unreadable: the checkpoint alone decides, as for a damaged file
    model = tmp_path / "model"
    medvl.create_model("phantom-tiny").save_pretrained(model)
    for name in ("config.json", "meta.json"):
        saved = (model / name).read_bytes()
        (model / name).write_bytes(deep)
        with pytest.raises(ModelError, match=re.escape(f"{model}: cannot read model files ({name}: ValueError: JSON "
                                                       "nested too deeply")):
            medvl.load_model(model)
        (model / name).write_bytes(saved)


def test_a_diverging_run_whose_checkpoint_state_was_damaged_still_says_why_it_stopped(small_phantom, tmp_path):
    dataset = medvl.load_dataset(small_phantom).select("train")
    out = tmp_path / "run"

    def damage_then_diverge(model, epoch):
        if epoch == 2:
            DAMAGED_STATES["cut short"](out / "checkpoint" / "state.pt")
            with torch.no_grad():
                model.image_projection.weight[0, 0] = float("nan")
        return {}

    with pytest.raises(TrainingError, match="the last checkpoint cannot be resumed .*state.pt: damaged checkpoint "
                                            "state"):
        _train_small(dataset, out, TrainConfig(epochs=3, batch_size=16), on_epoch_end=damage_then_diverge)


def test_a_learning_rate_that_runs_the_temperature_away_stops_the_run(small_phantom, tmp_path):
    """lr 10 (accepted) drove the learned temperature to 3.6e19: every logit 0, the loss finite at ln(batch), and
    the run saved a constant model with exit 0. It now stops as a NaN loss does; no checkpoint, nothing left."""
    dataset = medvl.load_dataset(small_phantom).select("train")
    out = tmp_path / "run"
    with pytest.raises(TrainingError, match=r"run: training stopped at step 1: the temperature of the image-text "
                                            r"logits became .* \(above 100\): every image scores every text alike.*"
                                            r"--lr 10\); lower --lr; no checkpoint was written"):
        _train_small(dataset, out, TrainConfig(epochs=2, batch_size=16, lr=10.0, seed=1))
    assert not out.exists()


def test_a_learning_rate_that_flattens_the_logits_below_the_temperature_limit_stops_the_run(small_phantom, tmp_path):
    """lr 1 collapsed phantom-tiny's text tower (every report embedded alike) while the temperature stayed under 100:
    the loss sat at its chance value and the run saved a model that scores every text alike, exit 0. Logits
    this flat for 20 steps in a row now stop it; the checkpoint is kept but not called good (it may be collapsed)."""
    dataset = medvl.load_dataset(small_phantom).select("train")
    out = tmp_path / "run"
    with pytest.raises(TrainingError, match=r"run: training stopped at step \d+: the logits of each image lay within "
                                            r"0.05 of each other in each of the last 20 batches .* --lr 1\); lower "
                                            r"--lr; the last checkpoint \(step \d+\) is kept"):
        _train_small(dataset, out, TrainConfig(epochs=40, batch_size=16, lr=1.0, seed=0))
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["temperature"] < 100 and not (out / "model").exists()
    # the same data at the default learning rate trains as before: its logits never come near that flat
    trained = _train_small(dataset, tmp_path / "fine", TrainConfig(epochs=12, batch_size=16, seed=0))
    assert trained.meta["training"]["steps"] == 12 * math.ceil(len(dataset) / 16) > 20


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
    # a k-shot figure does not depend on the other k asked for, nor on their order (one stream was shared)
    both = medvl.linear_probe(model, train_set, test_set, "finding", few_shot=(4, 1), show_progress=False)
    assert both["few_shot"]["1"] == lp["few_shot"]["1"]
    # no labelled record to score: one line naming the data, before any image is read
    unlabelled = test_set.select(test_set.splits[0])
    for record in unlabelled.records:
        record.labels.pop("finding", None)
    with pytest.raises(InputError, match="no scored records with label 'finding'"):
        medvl.linear_probe(model, train_set, unlabelled, "finding", few_shot=(1,), show_progress=False)


def test_meta_text_is_drawn_with_its_share_and_pairs_a_cases_images(shared_data):
    """MedPix records carry their case's diagnosis; as a further training text, the images of one case
    share it and count as positives of each other."""
    import random

    from medvl.data import load_dataset
    from medvl.data.captions import CaptionConfig
    from medvl.train.loop import _PairedTexts

    dataset = load_dataset(shared_data / "medpix-2.0").select("dev")
    config = TrainConfig(text_source="text", meta_text="case_diagnosis", meta_text_share=1.0)
    paired = _PairedTexts(dataset, config, CaptionConfig())
    indices = list(range(40))
    texts, ids = paired.batch(indices, random.Random(0))
    records = [dataset.records[i] for i in indices]
    with_case = [k for k, r in enumerate(records) if r.meta.get("case_diagnosis")]
    assert len(with_case) > 30
    for k in with_case:
        assert texts[k] == records[k].meta["case_diagnosis"]
    same_case = [(a, b) for a in with_case for b in with_case if a < b
                 and records[a].meta["case_id"] == records[b].meta["case_id"]]
    assert same_case and all(ids[a] == ids[b] for a, b in same_case)
    assert all(records[k].meta["case_diagnosis"] in paired.corpus() for k in with_case)
    never = _PairedTexts(dataset, TrainConfig(text_source="text", meta_text="case_diagnosis", meta_text_share=0.0),
                         CaptionConfig())
    assert never.batch(indices, random.Random(0))[0] == [r.text for r in records]
    half = _PairedTexts(dataset, TrainConfig(text_source="text", meta_text="case_diagnosis", meta_text_share=0.5),
                        CaptionConfig())
    drawn = [t == dataset.records[index].meta["case_diagnosis"] for seed in range(5)
             for index, t in zip(with_case, half.batch(with_case, random.Random(seed))[0], strict=True)]
    assert 0.35 < sum(drawn) / len(drawn) < 0.65
    with pytest.raises(InputError, match="no record has a 'diagnosis' text"):
        _PairedTexts(dataset, TrainConfig(text_source="text", meta_text="diagnosis"), CaptionConfig())
    with pytest.raises(InputError, match="meta_text_share"):
        TrainConfig(meta_text_share=1.5).validate_numbers()


def test_grouped_order_gives_single_group_batches_with_its_share():
    from medvl.train.loop import grouped_order

    keys = ["a"] * 40 + ["b"] * 25 + ["c"] * 7 + [None] * 5  # full batches of 8: a 5, b 3, c none
    size = 8

    def batches(share, seed):
        order = grouped_order(keys, size, share, seed)
        assert sorted(order) == list(range(len(keys)))  # every index once
        cut = [order[i:i + size] for i in range(0, len(order), size)]
        assert all(len(batch) == size for batch in cut[:-1]) and len(cut[-1]) == len(keys) % size
        return cut

    def pure(cut):
        return sum(len({keys[i] for i in batch}) == 1 and keys[batch[0]] is not None for batch in cut)

    every = batches(1.0, 0)
    assert pure(every) >= 8  # every full batch of a and b, and a mixed one only by chance
    assert sum(len(b) == size and {keys[i] for i in b} == {"a"} for b in every) >= 5
    assert batches(1.0, 0) == every and batches(1.0, 1) != every  # seeded
    assert pure(batches(0.0, 0)) <= 1  # share 0: mixed batches as from a plain permutation
    drawn = [pure(batches(0.5, seed)) for seed in range(40)]
    assert 3 < sum(drawn) / len(drawn) < 5.5  # about half of the 8
    assert grouped_order([None] * 10, 4, 1.0, 3) != list(range(10))  # no keys: a shuffle


def test_batch_group_is_checked_against_the_data(phantom_dir, tmp_path):
    dataset = medvl.load_dataset(phantom_dir).select("train")
    config = TrainConfig(epochs=1, batch_size=16, batch_group="ward")
    with pytest.raises(InputError, match="batch_group: group column 'ward' is in no record's labels or meta; "
                                         "columns present: .*finding"):
        medvl.train(medvl.create_model("phantom-tiny"), dataset, config, tmp_path / "run", show_progress=False)
    assert not (tmp_path / "run").exists()
    with pytest.raises(InputError, match="batch_group_share"):
        TrainConfig(batch_group_share=-0.1).validate_numbers()


def test_label_smoothing_keeps_the_head_from_certainty(tiny_npz, tmp_path):
    """Targets of 1 - s + s / K: a smoothed head settles near that probability, a plain one goes past it."""
    dataset = medvl.load_dataset(tiny_npz, label_columns=["label"]).select("train")

    def confidence(smoothing: float) -> float:
        model = medvl.create_model("medmnist-small", **{"image.widths": [8, 16, 32, 64], "image.augment": False})
        config = TrainConfig(epochs=8, batch_size=40, lr=3e-3, label_columns=["label"], supervised_weight=1.0,
                             contrastive_weight=0.0, label_smoothing=smoothing)
        medvl.train(model, dataset, config, tmp_path / f"s{smoothing}", show_progress=False)
        pixels = model.preprocessor.load_many([r.image for r in dataset])
        with torch.no_grad():
            probabilities = model.head_probabilities("label", model.encode_images(pixels, features=True))
        return float(probabilities.max(dim=1).values.mean())

    plain, smoothed = confidence(0.0), confidence(0.6)
    assert smoothed < 0.8 < plain  # the smoothed target of the true class is 1 - 0.6 + 0.3 = 0.7


def _mixup_config(**settings) -> TrainConfig:
    """One epoch of 42 phantom records (batches of 16, 16 and 10) with a supervised head on ``finding``."""
    return TrainConfig(epochs=1, batch_size=16, lr=5e-3, seed=2, label_columns=["finding"], supervised_weight=1.0,
                       log_every=1, **settings)


def test_mixup_off_is_the_run_without_it_and_on_is_a_seeded_other_run(small_phantom, tmp_path, monkeypatch):
    """mixup 0 trains bit for bit the run without the field (no extra draw, no extra forward); mixup > 0 trains
    other weights, the same ones again from the same seed, with one more image-tower forward per batch."""
    from medvl.models.dual import DualEncoder

    dataset = medvl.load_dataset(small_phantom).select("train")
    forwards = {"count": 0}
    image_features = DualEncoder.image_features

    def counted(self, pixels):
        forwards["count"] += 1
        return image_features(self, pixels)

    monkeypatch.setattr(DualEncoder, "image_features", counted)

    def weights(name: str, config: TrainConfig) -> tuple[dict[str, torch.Tensor], int]:
        forwards["count"] = 0
        trained = _train_small(dataset, tmp_path / name, config).state_dict()
        return trained, forwards["count"]

    (plain, plain_forwards), (off, off_forwards) = weights("plain", _mixup_config()), weights("off", _mixup_config(
        mixup=0.0))
    assert plain.keys() == off.keys() and all(torch.equal(plain[name], off[name]) for name in plain)
    (mixed, mixed_forwards), (again, _) = weights("on", _mixup_config(mixup=0.4)), weights("again", _mixup_config(
        mixup=0.4))
    assert all(torch.equal(mixed[name], again[name]) for name in mixed)
    assert not torch.equal(mixed["heads.finding.weight"], plain["heads.finding.weight"])
    assert not all(torch.equal(mixed[name], plain[name]) for name in plain if name.startswith("image_encoder."))
    assert plain_forwards == off_forwards == 3 and mixed_forwards == 6  # 3 batches: one extra forward each
    logged = [line for line in _metrics(tmp_path / "on") if "loss" in line]
    assert len(logged) == 3 and all(math.isfinite(line["ce_finding"]) for line in logged)
    assert json.loads((tmp_path / "on" / "train_config.json").read_text())["train"]["mixup"] == 0.4


@pytest.mark.parametrize("value", [-0.1, 10.5, float("nan"), float("inf")])
def test_mixup_out_of_range_is_refused_naming_it(value):
    with pytest.raises(InputError, match="mixup must be"):
        TrainConfig(mixup=value).validate_numbers()


def test_mixup_without_a_supervised_head_is_refused_before_training(small_phantom, tmp_path):
    """mixup blends the heads' images and targets: with supervised_weight 0 it would change nothing, and a
    candidate run would be the baseline under another name."""
    with pytest.raises(InputError, match="mixup 0.4 has no effect: .* supervised_weight is 0"):
        TrainConfig(mixup=0.4, label_columns=["finding"]).validate()
    dataset = medvl.load_dataset(small_phantom).select("train")
    with pytest.raises(InputError, match="mixup 0.4 has no effect"):
        _train_small(dataset, tmp_path / "run", TrainConfig(epochs=1, batch_size=16, mixup=0.4))
    assert not (tmp_path / "run").exists()
    _mixup_config(mixup=0.4).validate()  # with a head: accepted


def test_a_resumed_run_compares_mixup(small_phantom, tmp_path):
    """Another mixup is another run (refused on --resume); a run folder from before the field existed trained
    without mixup, and resumes as the same run."""
    dataset = medvl.load_dataset(small_phantom).select("train")
    _train_small(dataset, tmp_path / "run", _mixup_config(max_steps=2))
    with pytest.raises(InputError, match=r"this command changes mixup 0\.0 -> 0\.4"):
        _train_small(dataset, tmp_path / "run", _mixup_config(max_steps=2, mixup=0.4), resume=True)
    settings = json.loads((tmp_path / "run" / "train_config.json").read_text())
    del settings["train"]["mixup"]
    (tmp_path / "run" / "train_config.json").write_text(json.dumps(settings))
    _train_small(dataset, tmp_path / "run", _mixup_config(max_steps=2), resume=True)  # the same run: not refused
    _train_small(dataset, tmp_path / "on", _mixup_config(max_steps=2, mixup=0.4))
    with pytest.raises(InputError, match=r"this command changes mixup 0\.4 -> 0\.3"):
        _train_small(dataset, tmp_path / "on", _mixup_config(max_steps=2, mixup=0.3), resume=True)


def test_a_last_batch_of_one_record_is_skipped_not_fatal(phantom_dir, tmp_path):
    """Batch norm cannot train on a single record: with N = k x batch + 1 the lone record is left for that epoch
    (another one each epoch) instead of stopping the run."""
    dataset = medvl.load_dataset(phantom_dir).select("train")
    batch_size = len(dataset) - 1  # one full batch, then one record
    config = TrainConfig(epochs=3, batch_size=batch_size, lr=2e-3, log_every=1)
    model = medvl.create_model("phantom-tiny")
    assert any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.image_encoder.modules())
    medvl.train(model, dataset, config, tmp_path / "run", show_progress=False)
    steps = [line["step"] for line in _metrics(tmp_path / "run") if "loss" in line]
    assert steps == [1, 2, 3]  # one step per epoch: the full batch


def test_a_setting_whose_switch_is_off_is_warned_once_as_having_no_effect(caplog):
    with caplog.at_level("WARNING"):
        for _ in range(3):  # as every fold of a CV run validates its settings
            TrainConfig(label_smoothing=0.137, batch_group_share=0.61, self_supervised_crop=0.4).validate()
    text = " ".join(caplog.text.split())
    assert text.count("label_smoothing=0.137 has no effect: it smooths the supervised heads' targets") == 1
    assert text.count("batch_group_share=0.61 has no effect") == 1
    assert text.count("self_supervised_crop=0.4 has no effect: it tunes the self-supervised loss, which is off") == 1
    caplog.clear()
    with caplog.at_level("WARNING"):  # values not warned yet, with their switches on; defaults with them off
        TrainConfig(label_smoothing=0.138, supervised_weight=1.0, label_columns=["finding"], batch_group="finding",
                    batch_group_share=0.62, self_supervised_epochs=2, self_supervised_crop=0.41).validate()
        TrainConfig().validate()
    assert "no effect" not in caplog.text


def test_epoch_batch_sizes_keep_a_short_last_batch_unless_a_process_would_get_one_record():
    from medvl.train.loop import epoch_batch_sizes

    assert epoch_batch_sizes(358, 32) == epoch_batch_sizes(358, 32, 2) == [32] * 11 + [6]
    assert epoch_batch_sizes(67, 16) == [16] * 4 + [3] and epoch_batch_sizes(67, 16, 2) == [16] * 4
    assert epoch_batch_sizes(65, 16) == [16] * 4  # a last batch of one record: skipped on one process too
    assert epoch_batch_sizes(64, 16, 2) == [16] * 4


@pytest.mark.slow
def test_train_throughput_benchmark_counts_the_samples_trained(tmp_path):
    """The train split of 60 phantom images holds 42 records: batches of 32 and 10, so steps 3 to 30 train on 588
    samples (14 epochs), where counting full batches gave 896 (samples/s overstated by half).
    The rate is checked against the unrounded time the script measured, not against a time of its own: the
    two runs' wall times are what they are on a shared machine."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "train_throughput.py"
    command = [sys.executable, str(script), "--model", "phantom-tiny", "--n", "60", "--image-size", "64",
               "--batch-size", "32", "--steps", "2,30", "--procs", "1", "--json", str(tmp_path / "out.json")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    row = json.loads((tmp_path / "out.json").read_text())["rows"][0]
    assert (row["train_records"], row["samples"]) == (42, 588)
    assert row["elapsed_s"] > 0 and row["samples_per_s"] == round(588 / row["elapsed_s"], 1)
    assert "42 training records" in done.stdout


def _throughput_script():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "train_throughput.py"
    spec = importlib.util.spec_from_file_location("train_throughput", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return path, module


def test_train_throughput_benchmark_flags_a_speed_up_no_machine_gives():
    """A loaded machine slowed the 2-thread single process 30x: 2 processes then read 13x faster than 1 on the
    same 2 cores. More than N times faster on N processes is flagged, with the load averages."""
    _, script = _throughput_script()
    rows = [{"processes": 1, "samples_per_s": 3.9}, {"processes": 2, "samples_per_s": 52.0}]
    summary = script.summarise(rows, 2, (6.1, 7.0, 7.5), (8.9, 7.2, 7.6))
    assert summary["load_average"] == [6.1, 7.0, 7.5] and summary["load_average_after"] == [8.9, 7.2, 7.6]
    assert [row["credible"] for row in rows] == [True, False] and rows[1]["vs_first"] == 13.33
    assert summary["warnings"] == ["2 processes 13.3x faster than 1 on the same 2 cores (at most 2x is possible): "
                                   "the machine was busy (load average 6.1 before, 8.9 after); not a valid "
                                   "measurement"]
    quiet = [{"processes": 1, "samples_per_s": 117.1}, {"processes": 2, "samples_per_s": 102.0}]  # docs' figures
    assert script.summarise(quiet, 2, (0.9, 1.0, 1.1), (1.2, 1.0, 1.1))["warnings"] == []


def test_train_throughput_benchmark_removes_its_folder_when_a_run_fails(tmp_path):
    """A failed medvl run (a model name that does not exist) ends the script: its temporary folder, with the
    phantom data, goes too."""
    import os
    import subprocess
    import sys

    path, _ = _throughput_script()
    env = dict(os.environ, TMPDIR=str(tmp_path))
    done = subprocess.run([sys.executable, str(path), "--model", "nosuch", "--n", "20", "--steps", "1,2"],
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode != 0
    assert list(tmp_path.glob("medvl-train-throughput-*")) == []


def test_a_trained_model_folder_keeps_no_word_of_a_single_report(phantom_dir, tmp_path):
    data = planted_phantom(phantom_dir, tmp_path / "data")
    result, output = invoke("train", "--data", data, "--model", "phantom-tiny", "--out", tmp_path / "run",
                            "--max-steps", "1", "-q")
    assert result.exit_code == 0, output
    vocab = json.loads((tmp_path / "run" / "model" / "text" / "tokenizer.json").read_text())["model"]["vocab"]
    assert [word for word in PLANTED_WORDS if word in vocab] == []
    assert {"effusion", "pneumothorax", "cardiomegaly"} <= set(vocab)  # words of many reports stay whole


def test_continuing_from_a_saved_model_on_other_data_keeps_its_vocabulary(small_phantom, tmp_path):
    """The text tower's embeddings were learnt with the saved vocabulary's ids: continuing from the folder on a corpus
    of other words (a learning rate of about 0: weights unchanged) reads every text as before."""
    words = "zebra giraffe lantern orbit quartz velvet harbor meadow cobalt tundra".split()
    other = _edited_phantom(small_phantom, tmp_path / "other", lambda i, row: row.update(
        text=" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(12))))
    result, output = invoke(*_tiny_train("train", small_phantom, "--out", tmp_path / "a"))
    assert result.exit_code == 0, output
    result, output = invoke("train", "--data", other, "--model", tmp_path / "a" / "model", "--out", tmp_path / "b",
                            "--epochs", "1", "--batch-size", "16", "--lr", "1e-12", "-q")
    assert result.exit_code == 0, output
    first, second = medvl.load_model(tmp_path / "a"), medvl.load_model(tmp_path / "b")
    texts = ["cardiomegaly with pleural effusion", "no acute abnormality", "zebra giraffe lantern"]
    assert second.text_tokens(texts) == first.text_tokens(texts)
    assert torch.allclose(second.encode_texts(texts), first.encode_texts(texts), atol=1e-6)
    assert ((tmp_path / "b" / "model" / "text" / "tokenizer.json").read_bytes()
            == (tmp_path / "a" / "model" / "text" / "tokenizer.json").read_bytes())


def test_continuing_from_a_model_saved_before_any_training_learns_its_vocabulary(small_phantom, tmp_path):
    """Its embeddings are random and its vocabulary the bootstrap one: the first training learns the corpus's."""
    medvl.create_model("phantom-tiny", **{"image.image_size": 48}).save_pretrained(tmp_path / "fresh")
    result, output = invoke("train", "--data", small_phantom, "--model", tmp_path / "fresh", "--out", tmp_path / "run",
                            "--max-steps", "1", "--batch-size", "16", "-q")
    assert result.exit_code == 0, output
    vocab = json.loads((tmp_path / "run" / "model" / "text" / "tokenizer.json").read_text())["model"]["vocab"]
    assert {"effusion", "cardiomegaly"} <= set(vocab)


def _edited_phantom(source: Path, folder: Path, edit) -> Path:
    """A copy of the phantom data (images copied, its dataset.json kept) with ``edit(i, row)`` applied to the i-th
    training row of its manifest."""
    import csv

    shutil.copytree(source, folder)
    with (folder / "manifest.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    for i, row in enumerate(r for r in rows if r["split"] == "train"):
        edit(i, row)
    with (folder / "manifest.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return folder


def test_records_whose_caption_would_name_no_label_are_left_out_whatever_names_the_columns(small_phantom, tmp_path,
                                                                                            caplog):
    """A record with none of the run's label columns would train on a bare template ("findings: .") as a positive
    of every other such record; one with some of them keeps its caption from those."""
    from medvl.api import train_from_path

    def blank(i, row):
        row["finding"] = "" if i % 4 in (0, 1) else row["finding"]
        row["view"] = "" if i % 4 == 0 else row["view"]

    data = _edited_phantom(small_phantom, tmp_path / "data", blank)
    records = len(medvl.load_dataset(data).select("train"))
    no_finding = len(range(0, records, 4)) + len(range(1, records, 4))
    with caplog.at_level("INFO"):  # the columns named by dataset.json (or a recipe), not by --label-column
        trained = train_from_path(data, tmp_path / "a", "phantom-tiny", text_source="captions", max_steps=1,
                                  show_progress=False)
    assert trained.meta["training"]["records"] == records - no_finding
    assert f"left out {no_finding} of {records} training records with none of the label columns finding" in \
        " ".join(caplog.text.split())
    config = TrainConfig(epochs=1, text_source="captions", label_columns=["finding", "view"])
    trained = medvl.train(medvl.create_model("phantom-tiny"), medvl.load_dataset(data).select("train"), config,
                          tmp_path / "b", show_progress=False)
    assert trained.meta["training"]["records"] == records - len(range(0, records, 4))  # only those with neither


@pytest.mark.parametrize("columns, message", [
    (["nope"], r"\['nope'\] are not label columns here \(available: finding"),
    ("finding", "label_columns must be a list of column names, got 'finding'"),
    (None, "label_columns must be a list of column names, got None"),
    (["finding", "finding"], "label column.s. finding given more than once"),
])
def test_the_python_api_refuses_label_columns_the_data_or_a_list_cannot_have(small_phantom, tmp_path, columns,
                                                                              message):
    dataset = medvl.load_dataset(small_phantom).select("train")
    config = TrainConfig(epochs=1, text_source="captions", label_columns=columns)
    with pytest.raises(InputError, match=message):
        medvl.train(medvl.create_model("phantom-tiny"), dataset, config, tmp_path / "run", show_progress=False)
    assert not (tmp_path / "run").exists()


def test_a_repeated_label_column_is_refused_by_the_cli(small_phantom, tmp_path):
    result, output = invoke("train", "--data", small_phantom, "--model", "phantom-tiny", "--out", tmp_path / "run",
                            "--epochs", 1, "-l", "finding", "-l", "finding", "--text-source", "captions", "-q")
    assert result.exit_code == 2, output
    assert "label column(s) finding given more than once" in " ".join(output.split())
    assert not (tmp_path / "run").exists()


def test_supervised_heads_through_the_python_api_leave_out_records_without_the_label(small_phantom, tmp_path):
    data = _edited_phantom(small_phantom, tmp_path / "data",
                           lambda i, row: row.update(finding="" if i % 3 == 0 else row["finding"]))
    dataset = medvl.load_dataset(data).select("train")
    config = TrainConfig(epochs=1, supervised_weight=1.0, label_columns=["finding"])
    trained = medvl.train(medvl.create_model("phantom-tiny"), dataset, config, tmp_path / "run", show_progress=False)
    assert trained.meta["training"]["records"] == len(dataset) - len(range(0, len(dataset), 3))


def test_text_source_auto_says_and_records_that_a_record_without_text_turns_every_record_to_captions(
        small_phantom, tmp_path, caplog):
    data = _edited_phantom(small_phantom, tmp_path / "data", lambda i, row: row.update(text="" if i == 0 else
                                                                                         row["text"]))
    dataset = medvl.load_dataset(data).select("train")
    with caplog.at_level("WARNING"):
        trained = medvl.train(medvl.create_model("phantom-tiny"), dataset,
                              TrainConfig(epochs=1, label_columns=["finding"]), tmp_path / "run", show_progress=False)
    assert f"text_source auto: 1 of {len(dataset)} training records have no report text, so every record trains " \
           f"on captions made from its labels and the {len(dataset) - 1} reports are not used" in \
           " ".join(caplog.text.split())
    assert medvl.load_model(tmp_path / "run").meta["training"]["text_source"] == "captions"
    reports = medvl.train(medvl.create_model("phantom-tiny"), medvl.load_dataset(small_phantom).select("train"),
                          TrainConfig(epochs=1, label_columns=["finding"]), tmp_path / "text", show_progress=False)
    assert trained.meta["training"]["text_source"] == "captions" and reports.meta["training"]["text_source"] == "text"


def test_captions_without_label_columns_ask_for_label_columns_not_for_text(small_phantom, tmp_path):
    dataset = medvl.load_dataset(small_phantom).select("train")  # every record has its report
    with pytest.raises(InputError, match=r"text_source captions makes captions from labels and needs label "
                                         r"columns \(--label-column\)"):
        medvl.train(medvl.create_model("phantom-tiny"), dataset, TrainConfig(epochs=1, text_source="captions"),
                    tmp_path / "run", show_progress=False)


def test_a_label_of_one_class_is_warned_as_teaching_the_head_and_the_captions_nothing(small_phantom, tmp_path,
                                                                                      caplog):
    data = _edited_phantom(small_phantom, tmp_path / "data", lambda i, row: row.update(finding="nodule"))
    dataset = medvl.load_dataset(data).select("train")
    config = TrainConfig(epochs=1, text_source="captions", label_columns=["finding"], supervised_weight=1.0)
    with caplog.at_level("WARNING"):
        medvl.train(medvl.create_model("phantom-tiny"), dataset, config, tmp_path / "run", show_progress=False)
    text = " ".join(caplog.text.split())
    assert f"label 'finding' has one class in the {len(dataset)} training records: its supervised head" in text
    assert "same class in label column(s) finding: their captions are positives of one another" in text


def test_a_label_of_one_class_beside_another_caption_column_is_warned(small_phantom, tmp_path, caplog):
    data = _edited_phantom(small_phantom, tmp_path / "data", lambda i, row: row.update(finding="nodule"))
    dataset = medvl.load_dataset(data).select("train")
    assert len(dataset.classes("sex")) == 2
    config = TrainConfig(epochs=1, text_source="captions", label_columns=["finding", "sex"])
    with caplog.at_level("WARNING"):
        medvl.train(medvl.create_model("phantom-tiny"), dataset, config, tmp_path / "run", show_progress=False)
    text = " ".join(caplog.text.split())
    assert f"label 'finding' has one class in the {len(dataset)} training records: every caption names it" in text
    assert "label 'sex'" not in text


@pytest.mark.parametrize("template", ["a chest x-ray ({view}) with {}.", "a {0} x-ray with {}",
                                      "a chest x-ray with {}. }", "a chest x-ray with {:d}.", "{} and {}"])
def test_a_caption_template_with_another_brace_is_refused_when_read(small_phantom, tmp_path, template):
    """Only the count of '{}' was checked: a named field or a lone brace crashed training and zero-shot with a
    traceback after the template was saved in the model, and '{{}}' left the description out of every caption."""
    from medvl.data.captions import load_captions
    from medvl.errors import ModelError

    captions = tmp_path / "captions.json"
    captions.write_text(json.dumps({"templates": [template]}))
    message = f"template {template!r} may hold only one '{{}}' (the class description) and no other braces"
    with pytest.raises(InputError, match=re.escape(f"{captions}: {message}")):
        load_captions(captions)
    result, output = invoke("train", "--data", small_phantom, "--out", tmp_path / "run", "--model", "phantom-tiny",
                            "--epochs", 1, "--set", "image.image_size=48", "--captions", captions, "-q")
    assert result.exit_code == 2 and message in " ".join(output.split()) and "Traceback" not in output
    assert not (tmp_path / "run").exists()
    model = tmp_path / "model"  # a model folder saved with such a template is refused in one line
    medvl.create_model("phantom-tiny").save_pretrained(model)
    meta = json.loads((model / "meta.json").read_text())
    (model / "meta.json").write_text(json.dumps({**meta, "captions": {"templates": [template]}}))
    with pytest.raises(ModelError, match=re.escape(message)):
        medvl.load_model(model)


@pytest.mark.parametrize(("captions_yaml", "message"), [
    ('classes:\n  finding:\n    cardiomegaly: []\n    nodule: "  "\n',
     "class 'nodule' of label column 'finding' has a blank description; write what it shows, or give [] to "
     "describe it by its name"),
    ('classes:\n  finding:\n    nodule: ["a nodule", ""]\n',
     "class 'nodule' of label column 'finding' has a blank description"),
    ("templates: []\n", "templates must be a non-empty list of strings with one '{}' each (leave templates out "
     "for the default ones)"),
    ('templates: ["a chest x-ray."]\n',
     "template 'a chest x-ray.' holds no '{}' for the class description (every class would get the same prompt)"),
    ('templates: ["a chest x-ray with {{}}."]\n', "template 'a chest x-ray with {{}}.' holds no '{}'"),
], ids=["blank", "blank-in-list", "no-templates", "no-braces", "literal-braces"])
def test_captions_that_would_give_prompts_without_a_description_are_refused(small_phantom, tmp_path, captions_yaml,
                                                                           message):
    """A blank description scored its class with prompts such as 'an image showing .' (and counted it as
    described), `templates: []` became the default templates without a word, and a template without '{}' was
    refused as one that "may hold only one '{}'"."""
    from medvl.data.captions import load_captions

    captions = tmp_path / "captions.yaml"
    captions.write_text(captions_yaml)
    with pytest.raises(InputError, match=re.escape(f"{captions}: {message}")):
        load_captions(captions)
    model = tmp_path / "model"
    medvl.create_model("phantom-tiny").save_pretrained(model)
    result, output = invoke("eval", "zero-shot", "--model", model, "--data", small_phantom, "--captions", captions,
                            "-q", "--json", tmp_path / "zs.json")
    assert result.exit_code == 2 and message in " ".join(output.split()) and "Traceback" not in output
    assert not (tmp_path / "zs.json").exists()


def test_yaml_class_names_are_read_as_written_and_training_warns_of_undescribed_classes(small_phantom, tmp_path,
                                                                                      caplog):
    """YAML 1.1 made booleans of `yes`/`no` (stored as 'True'/'False'), None of `null`, and one key of `1` and `1.0`:
    a yes/no label column trained on the bare words without a warning. The keys are kept as written, a repeated
    key is refused, and training warns (as zero-shot does) when the captions leave its classes undescribed."""
    import csv as csv_module

    from medvl.data.captions import load_captions

    captions = tmp_path / "captions.yaml"
    captions.write_text('templates: ["a chest x-ray with {}."]\nclasses:\n  effusion:\n'
                        '    yes: ["a pleural effusion"]\n    no: ["no pleural effusion"]\n'
                        '  grade:\n    1: mild\n    1.0: grade one\n    null: none\n')
    config = load_captions(captions)
    assert config.classes == {"effusion": {"yes": ["a pleural effusion"], "no": ["no pleural effusion"]},
                              "grade": {"1": ["mild"], "1.0": ["grade one"], "null": ["none"]}}
    repeated = tmp_path / "repeated.yaml"
    repeated.write_text('classes:\n  effusion:\n    yes: a\n    "yes": b\n')
    with pytest.raises(DataError, match=r"repeated.yaml: key 'yes' is given twice \(line 4\)"):
        load_captions(repeated)
    repeated_json = tmp_path / "repeated.json"  # json kept the last value without a word
    repeated_json.write_text('{"classes": {"effusion": {"yes": "a", "no": "b", "yes": "c"}}}')
    with pytest.raises(DataError, match=r"repeated.json: key 'yes' is given twice"):
        load_captions(repeated_json)
    rows = list(csv_module.DictReader((small_phantom / "manifest.csv").open()))
    table = tmp_path / "yes_no.csv"
    with table.open("w", newline="") as handle:
        writer = csv_module.writer(handle)
        writer.writerow(["image", "split", "effusion"])
        writer.writerows([str(small_phantom / row["image"]), row["split"],
                          "yes" if "1" in (row["effusion_left"], row["effusion_right"]) else "no"] for row in rows)
    result, output = invoke("train", "--data", table, "--out", tmp_path / "run", "--model", "phantom-tiny",
                            "--epochs", 1, "--batch-size", 16, "--set", "image.image_size=48", "-l", "effusion",
                            "--captions", captions, "--allow-outside-root", "-q")
    assert result.exit_code == 0, output
    meta = json.loads((tmp_path / "run" / "model" / "meta.json").read_text())
    assert meta["captions"]["classes"]["effusion"] == {"yes": ["a pleural effusion"], "no": ["no pleural effusion"]}
    assert "describe" not in caplog.text
    other = tmp_path / "other.yaml"
    other.write_text('classes:\n  effusion:\n    present: ["a pleural effusion"]\n')
    result, output = invoke("train", "--data", table, "--out", tmp_path / "run2", "--model", "phantom-tiny",
                            "--epochs", 1, "--batch-size", 16, "--set", "image.image_size=48", "-l", "effusion",
                            "--captions", other, "--allow-outside-root", "-q")
    assert result.exit_code == 0, output
    assert ("the captions describe 2 of the 2 classes of label column 'effusion' not at all: their training "
            "captions are the bare class names") in " ".join((output + caplog.text).split())


def _alias_bomb(levels: int) -> str:
    """YAML of ``levels`` anchors, each a list of ten aliases of the one before: 10 ** levels strings once expanded,
    in a few hundred bytes ("billion laughs")."""
    lines = ["l0: &l0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


CAPTIONS = {"templates": ["a chest x-ray showing {}."], "classes": {"finding": {"normal": ["a normal chest"]}}}


@pytest.mark.parametrize(("name", "content", "message"), [
    ("deep.json", json.dumps(CAPTIONS)[:-1] + ', "x": ' + "[" * 600 + "]" * 600 + "}",
     "nested too deeply (more than 100 levels of arrays and objects)"),
    ("deep.yaml", "templates: " + "[" * 600 + "]" * 600 + "\n",
     "nested too deeply (more than 100 levels of arrays and objects)"),
    ("itself.yaml", "a: &a [*a]\n", "line 1: YAML aliases (*name) are not accepted in a caption config"),
    ("laughs.yaml", _alias_bomb(6), "line 2: YAML aliases (*name) are not accepted in a caption config"),
], ids=["json-600-deep", "yaml-600-deep", "yaml-anchor-in-itself", "yaml-billion-laughs"])
def test_caption_configs_nested_deeply_or_holding_yaml_aliases_are_refused_in_one_line(small_phantom, tmp_path,
                                                                                      name, content, message):
    """JSON nested 500 to 1,000 deep (json reads it; the recursive walk for repeated keys then ran out of stack) and
    an anchor used within itself ended in a RecursionError traceback, and nested aliases were walked expanded: a
    511-byte file kept a command busy for about 17 minutes."""
    from medvl.data.captions import load_captions

    captions = tmp_path / name
    captions.write_text(content)
    with pytest.raises(DataError, match=re.escape(f"{captions}: {message}")):
        load_captions(captions)
    model = tmp_path / "model"
    medvl.create_model("phantom-tiny").save_pretrained(model)
    result, output = invoke("eval", "zero-shot", "--model", model, "--data", small_phantom, "--captions", captions,
                            "-q", "--json", tmp_path / "zs.json")
    assert result.exit_code == 2 and message in " ".join(output.split()) and "Traceback" not in output, output
    assert not (tmp_path / "zs.json").exists()


def test_the_repeated_key_walk_reads_shared_values_once_and_refuses_a_value_holding_itself(tmp_path):
    """The walk behind every JSON / YAML side file (caption configs, JSONL rows, question files, dataset.json)
    recursed two Python frames a level, without a check for a value holding itself, and walked a value held in n
    places n times: 10 ** 9 visits for the aliases of a 511-byte YAML file."""
    import yaml

    from medvl.data.loaders.manifest import MAX_NESTING, parse_json, repeated_key

    source = tmp_path / "side.yaml"
    assert repeated_key(source, yaml.safe_load(_alias_bomb(9))) is None  # 9 distinct lists, walked once each
    with pytest.raises(DataError, match=re.escape(f"{source}: an array or object holds itself")):
        repeated_key(source, yaml.safe_load("a: &a [*a]\n"))
    deepest = '{"a": ' + "[" * (MAX_NESTING - 2) + '{"k": 1, "k": 2}' + "]" * (MAX_NESTING - 2) + "}"
    assert repeated_key(source, parse_json(deepest)) == "k"  # 100 levels (an object, 98 arrays, an object) are read
    with pytest.raises(DataError, match=re.escape(f"{source}: line 7: nested too deeply (more than 100 levels")):
        repeated_key(source, parse_json("[" + deepest + "]"), where="line 7: ")
    shared = parse_json('{"ok": 1}')
    assert repeated_key(source, [shared, shared, parse_json('[{"x": 1, "x": 1}]')]) == "x"


def test_a_caption_config_reads_alike_with_or_without_a_utf8_bom(tmp_path):
    """JSON with a BOM (Windows editors write one) was refused as 'Unexpected UTF-8 BOM' while YAML with one, and
    every manifest, was read."""
    import yaml

    from medvl.data.captions import load_captions

    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps(CAPTIONS))
    expected = load_captions(plain)
    for name, text in (("bom.json", json.dumps(CAPTIONS)), ("bom.yaml", yaml.safe_dump(CAPTIONS))):
        (path := tmp_path / name).write_bytes(b"\xef\xbb\xbf" + text.encode())
        assert load_captions(path) == expected
    (latin := tmp_path / "latin.json").write_bytes(json.dumps(CAPTIONS).replace("normal", "n\xe9").encode("latin-1"))
    with pytest.raises(DataError, match=re.escape(f"{latin}: not valid UTF-8 (byte offset ")):
        load_captions(latin)


def test_the_python_api_applies_leave_out_skip_flagged_and_covariates_as_the_cli_does(small_phantom, tmp_path):
    """``medvl.train`` once trained on the images a VQA question file asked to keep out and on the images the audit
    flags, while its train_config.json said both were applied, and saved covariates its own evaluation refuses."""
    import numpy as np
    from PIL import Image

    data = tmp_path / "data"
    shutil.copytree(small_phantom, data)
    dataset = medvl.load_dataset(data).select("train")
    for record in dataset.records[:3]:  # blank images: the audit flags them
        Image.fromarray(np.full((48, 48), 128, np.uint8)).save(record.image)
    questions = tmp_path / "q.json"
    questions.write_text(json.dumps([{"qid": i, "image_name": Path(record.image).name, "question": "a nodule?",
                                      "answer": "no", "answer_type": "CLOSED"}
                                     for i, record in enumerate(dataset.records[5:10])]))
    config = TrainConfig(epochs=1, batch_size=16, leave_out_images_of=[str(questions)], skip_flagged=True)
    trained = _train_small(dataset, tmp_path / "run", config)
    assert trained.meta["training"]["records"] == len(dataset) - 5 - 3
    saved = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert saved["records"] == len(dataset) - 8
    assert saved["train"]["leave_out_images_of"] == [str(questions)] and saved["train"]["skip_flagged"] is True
    for covariates, message in ((["finding"], "'finding' is the label column; it cannot also be a covariate"),
                                (["nope"], "no record has a value for covariate column 'nope'")):
        config = TrainConfig(epochs=1, covariates=covariates, supervised_weight=1, label_columns=["finding"])
        with pytest.raises(InputError, match=message):
            _train_small(dataset, tmp_path / "cov", config)
        assert not (tmp_path / "cov").exists()


def test_the_python_api_trains_the_datasets_own_captions_or_a_caption_file_it_is_given(small_phantom, tmp_path):
    """``medvl.train`` trained generic templates ("{}.") where ``medvl train`` trained the captions of the data's
    dataset.json, and a caption file's path was an AttributeError."""
    dataset = medvl.load_dataset(small_phantom).select("train")
    config = TrainConfig(epochs=1, batch_size=16, text_source="captions", label_columns=["finding"])
    trained = _train_small(dataset, tmp_path / "own", config)
    own = json.loads((small_phantom / "dataset.json").read_text())["captions"]
    assert trained.meta["captions"]["templates"] == own["templates"]
    assert trained.meta["captions"]["classes"]["finding"] == own["classes"]["finding"]
    captions = tmp_path / "captions.yaml"
    captions.write_text('templates: ["a film with {}."]\n')
    trained = _train_small(dataset, tmp_path / "file", config, captions=captions)
    assert trained.meta["captions"]["templates"] == ["a film with {}."]


def test_resume_accepts_the_same_data_named_another_way_or_from_another_folder(small_phantom, tmp_path, monkeypatch):
    """The records' digest hashed each image path as spelt (``ph/images/x.png``), and the stored data path was
    resolved against the current folder: the same data given by its absolute path, or from another folder, was
    refused as changed. A run folder written before (digest over the paths as spelt, data path as given) still
    resumes as it was started, and another spelling then says why it cannot."""
    from medvl.data.record import records_digest

    shutil.copytree(small_phantom, tmp_path / "ph")
    monkeypatch.chdir(tmp_path)
    args = ["train", "--model", "phantom-tiny", "--set", "image.image_size=48", "--epochs", 2, "--batch-size", 16,
            "--max-steps", 2, "-q"]
    result, output = invoke(*args, "--data", "ph", "--out", "run")
    assert result.exit_code == 0, output
    assert json.loads(Path("run/train_config.json").read_text())["data"] == str(tmp_path / "ph" / "manifest.csv")
    result, output = invoke(*args, "--data", tmp_path / "ph", "--out", "run", "--resume")
    assert result.exit_code == 0, output
    monkeypatch.chdir(tmp_path / "ph")
    result, output = invoke(*args, "--data", ".", "--out", "../run", "--resume")
    assert result.exit_code == 0, output
    # a run folder as medvl wrote it before: data as given, the digest over the image paths as the loader spelt them
    monkeypatch.chdir(tmp_path)
    settings = json.loads(Path("run/train_config.json").read_text())
    del settings["digest_paths"]
    settings["data"] = "ph/manifest.csv"
    settings["records_sha256"] = records_digest(medvl.load_dataset("ph").select("train").records)
    Path("run/train_config.json").write_text(json.dumps(settings))
    result, output = invoke(*args, "--data", "ph", "--out", "run", "--resume")
    assert result.exit_code == 0, output
    Path("run/train_config.json").write_text(json.dumps(settings))
    result, output = invoke(*args, "--data", tmp_path / "ph", "--out", "run", "--resume")
    assert result.exit_code == 2, output
    assert ("a run folder written before medvl compared data by its resolved paths resumes only with --data "
            "'ph/manifest.csv' given from the folder the run was started in") in " ".join(output.split())


def test_resume_accepts_the_same_leave_out_question_file_named_another_way(small_phantom, tmp_path, monkeypatch):
    """--leave-out-images-of was recorded and compared as the string given (``ph/vqa/test.json``), while --data was
    resolved: the same file by its absolute path was refused. A run folder that recorded the string as given still
    resumes from the folder it was started in."""
    shutil.copytree(small_phantom, tmp_path / "ph")
    monkeypatch.chdir(tmp_path)
    args = ["train", "--data", "ph", "--model", "phantom-tiny", "--set", "image.image_size=48", "--epochs", 2,
            "--batch-size", 16, "--max-steps", 1, "-q"]
    result, output = invoke(*args, "--out", "run", "--leave-out-images-of", "ph/vqa/test.json")
    assert result.exit_code == 0, output
    settings = json.loads(Path("run/train_config.json").read_text())
    assert settings["train"]["leave_out_images_of"] == [str(tmp_path / "ph" / "vqa" / "test.json")]
    result, output = invoke(*args, "--out", "run", "--leave-out-images-of", tmp_path / "ph" / "vqa" / "test.json",
                            "--resume")
    assert result.exit_code == 0, output
    settings["train"]["leave_out_images_of"] = ["ph/vqa/test.json"]  # as medvl wrote it before
    Path("run/train_config.json").write_text(json.dumps(settings))
    result, output = invoke(*args, "--out", "run", "--leave-out-images-of", "ph/vqa/test.json", "--resume")
    assert result.exit_code == 0, output
    result, output = invoke(*args, "--out", "run", "--leave-out-images-of", "ph/vqa/val.json", "--resume")
    assert result.exit_code == 2, output
    assert "this command changes leave_out_images_of" in " ".join(output.split())


def test_contrastive_fine_tuning_of_a_model_with_a_head_needs_no_labels_for_it(small_phantom, tmp_path, caplog):
    """With supervised_weight 0 the head of a saved model is not trained, yet every record needed its label, a
    class the head did not know was refused, and its cross-entropy was logged. Now no target is built: the data
    trains whatever that column holds, with a warning that the head is not trained."""
    dataset = medvl.load_dataset(small_phantom).select("train")
    supervised = _train_small(dataset, tmp_path / "sup", TrainConfig(epochs=1, batch_size=16, supervised_weight=1,
                                                                      label_columns=["finding"]))
    assert list(supervised.heads) == ["finding"]
    data = _edited_phantom(small_phantom, tmp_path / "data", lambda i, row: row.update(
        finding=("atelectasis" if i % 5 == 0 else "" if i % 5 == 1 else row["finding"])))
    edited = medvl.load_dataset(data).select("train")
    with caplog.at_level("WARNING"):
        trained = medvl.train(medvl.load_model(tmp_path / "sup"), edited, TrainConfig(epochs=1, batch_size=16,
                                                                                        log_every=1),
                              tmp_path / "run", show_progress=False)
    assert trained.meta["training"]["records"] == len(edited)
    assert "the model's supervised head(s) finding are not trained (supervised_weight is 0)" in caplog.text
    assert not any(key.startswith("ce_") for line in _metrics(tmp_path / "run") for key in line)


def test_a_model_starting_at_the_highest_temperature_trains(small_phantom, tmp_path):
    """init_temperature 100 is allowed, but a first step moving the temperature a hair above 100 stopped the run as
    run away, advising a lower --lr."""
    result, output = invoke("train", "--data", small_phantom, "--model", "phantom-tiny", "--out", tmp_path / "run",
                            "--epochs", 1, "--batch-size", 16, "--seed", 1, "--set", "init_temperature=100",
                            "--train-set", "log_every=1", "-q")
    assert result.exit_code == 0, output
    assert max(line["temperature"] for line in _metrics(tmp_path / "run")) > 100


def test_each_metrics_line_gives_the_learning_rate_its_step_trained_with(small_phantom, tmp_path):
    """The lr of a metrics line was the next step's: the last line read 0.0, and the self-supervised phase's last
    line the main phase's peak."""
    from medvl.train.loop import _phased_warmup_cosine

    dataset = medvl.load_dataset(small_phantom).select("train")
    config = TrainConfig(epochs=1, batch_size=16, log_every=1, self_supervised_epochs=1, lr=1e-3)
    _train_small(dataset, tmp_path / "run", config)
    lines = [line for line in _metrics(tmp_path / "run") if "loss" in line]
    per_epoch = math.ceil(len(dataset) / 16)
    assert len(lines) == 2 * per_epoch and lines[-1]["lr"] > 0
    for line in lines:  # step N (1-based) trained with the factor of the schedule's step N - 1
        factor = _phased_warmup_cosine(line["step"] - 1, per_epoch, per_epoch, config.warmup_fraction)
        assert line["lr"] == pytest.approx(config.lr * factor)


def test_an_interrupted_fresh_start_of_a_run_folder_puts_its_metrics_back(small_phantom, tmp_path, monkeypatch):
    """A run stopped by max_steps within an epoch has no checkpoint: --resume trains it afresh and starts its
    metrics over. Interrupted before its first checkpoint, that attempt left the old model beside its own partial
    metrics; the run's metrics are now put back."""
    from medvl.train.loop import ContrastiveObjective

    dataset = medvl.load_dataset(small_phantom).select("train")
    config = TrainConfig(epochs=1, batch_size=8, max_steps=4, log_every=1)
    out = tmp_path / "run"
    _train_small(dataset, out, config)
    assert not (out / "checkpoint").exists()
    before = _tree(out)
    losses = ContrastiveObjective.losses
    calls = []

    def interrupted_at_the_third_batch(self, indices, seed):
        calls.append(seed)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return losses(self, indices, seed)

    monkeypatch.setattr(ContrastiveObjective, "losses", interrupted_at_the_third_batch)
    with pytest.raises(KeyboardInterrupt):
        _train_small(dataset, out, config, resume=True)
    assert len(calls) == 3
    assert _tree(out) == before


def test_max_steps_within_the_self_supervised_phase_is_warned(small_phantom, tmp_path, caplog):
    """A run stopped within its self-supervised phase saved an image-text model whose text tower never trained,
    without a word."""
    dataset = medvl.load_dataset(small_phantom).select("train")
    per_epoch = math.ceil(len(dataset) / 16)
    with caplog.at_level("WARNING"):
        _train_small(dataset, tmp_path / "run", TrainConfig(epochs=1, batch_size=16, self_supervised_epochs=2,
                                                            max_steps=2))
    assert (f"max_steps 2 ends within the {2 * per_epoch} self-supervised steps (self_supervised_epochs 2): the "
            "image-text loss (and any supervised head) never trains") in caplog.text


def test_an_epochs_short_accumulation_group_is_the_mean_of_its_batches(phantom_dir, tmp_path):
    """With one batch per epoch and --grad-accum 2, every optimizer step accumulates that one batch: its loss is
    that batch's (as with --grad-accum 1), not half of it."""
    dataset = medvl.load_dataset(phantom_dir).select("train")
    dataset = dataset.subset(dataset.records[:16])

    def run(grad_accum, out):
        torch.manual_seed(0)
        model = medvl.create_model("phantom-tiny")
        gradients = []  # the gradient reaching the temperature at each backward pass
        model.logit_scale.register_hook(lambda grad: gradients.append(float(grad)))
        config = TrainConfig(epochs=2, batch_size=16, lr=2e-3, seed=1, grad_accum=grad_accum, workers=0)
        return medvl.train(model, dataset, config, out, show_progress=False), gradients

    single, single_gradients = run(1, tmp_path / "a")
    accumulated, accumulated_gradients = run(2, tmp_path / "b")
    assert len(accumulated_gradients) == 2 and accumulated_gradients == single_gradients
    for (name, a), (_, b) in zip(single.state_dict().items(), accumulated.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_captions_and_prompts_of_binary_finding_columns_name_the_findings(small_phantom):
    """A multi-label set (one 0/1 column per finding) trained from labels had the captions "1, 0." / "findings: 0,
    1." and the zero-shot prompts "an image showing 1." / "... 0.": no caption named a finding. A binary column is
    now described by its name (a record with none positive: "no finding"); other columns are as before."""
    import random

    from medvl.data import load_dataset
    from medvl.data.captions import CaptionConfig, binary_finding
    from medvl.train.loop import _PairedTexts

    dataset = load_dataset(small_phantom).select("train")
    columns = ["nodule", "effusion_left", "view"]
    paired = _PairedTexts(dataset, TrainConfig(text_source="captions", label_columns=columns), CaptionConfig())
    assert paired.binary == ["nodule", "effusion_left"]
    texts, _ = paired.batch(list(range(len(dataset))), random.Random(0))
    for record, text in zip(dataset, texts, strict=True):
        named = [c.replace("_", " ") for c in ("nodule", "effusion_left") if record.labels[c] == "1"]
        assert all(name in text for name in named) and record.labels["view"] in text
        assert not re.search(r"\b[01]\b", text)  # never the bare digits
        if not named:
            assert "no finding" in text
    assert "nodule" in " ".join(paired.prompts())  # the tokenizer learns the findings' words
    config = CaptionConfig()
    assert config.caption({"nodule": "0", "effusion_left": "0"}, columns, random.Random(0),
                          paired.binary) in [t.format("no finding") for t in config.templates]
    assert config.prompts("nodule", "1", binary=binary_finding("nodule", ["0", "1"]))[1] == "an image showing nodule."
    assert config.prompts("nodule", "0", binary=True)[1] == "an image showing no nodule."
    # a column named for an absence: its 0 is the finding, never "no no finding"
    assert [config.prompts("no_finding", name, binary=True)[1] for name in ("1", "0")] == \
        ["an image showing no finding.", "an image showing finding."]
    assert config.warn_undescribed("nodule", ["0", "1"]) == []
    # an ordinary column keeps its class names, so does MedMNIST's 'label' of class indices
    assert config.caption({"view": "PA"}, ["view"], random.Random(0), paired.binary) in \
        [t.format("PA") for t in config.templates]
    assert not binary_finding("label", ["0", "1"]) and not binary_finding("grade", ["0", "1", "2"])
