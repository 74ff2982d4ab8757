"""Commands used as a careless or hostile user would: existing outputs, symlinks, devices, bad
numbers, a full disk, a diverging run. Each must end with exit 2, one line naming the problem, no
traceback, nothing written and existing files untouched.

The loaders' hostile inputs (truncated, bombs, paths outside the root...) are in
``test_hostile_inputs.py``; DICOM de-identification in ``test_deid_corpus.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import medvl
from cli_helpers import invoke
from medvl.data import captions_for
from medvl.errors import ModelError, TrainingError
from medvl.train.loop import TrainConfig

SENTINEL = b'{"precious": "do not touch"}\n'


@pytest.fixture(scope="module")
def trained(phantom_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hostile") / "run"
    result, output = invoke("train", "--data", phantom_dir, "--model", "phantom-tiny", "--out", out,
                            "--epochs", 1, "--batch-size", 32, "-q")
    assert result.exit_code == 0, output
    return out


def _assert_clean_refusal(result, output: str, *needles: str) -> None:
    assert result.exit_code == 2, output
    assert "Traceback" not in output
    for needle in needles:
        assert needle in output, output


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -- 4. output files: refused unless --overwrite, and never anything but a regular file ----------------

def _json_commands(trained: Path, phantom_dir: Path, image: Path) -> dict[str, list]:
    """Every command with a ``--json`` output, with arguments that would otherwise succeed."""
    model = trained / "model"
    return {
        "eval zero-shot": ["eval", "zero-shot", "--model", model, "--data", phantom_dir, "-q"],
        "eval retrieval": ["eval", "retrieval", "--model", model, "--data", phantom_dir, "-q"],
        "eval linear-probe": ["eval", "linear-probe", "--model", model, "--train-data", phantom_dir,
                              "--test-data", phantom_dir, "--few-shot", "1", "-q"],
        "predict": ["predict", image, "--model", model, "--labels", "no finding,cardiomegaly"],
        "bench cv": ["bench", "cv", "--data", phantom_dir, "-l", "finding", "--model", "phantom-tiny",
                     "--folds", 2, "--epochs", 1, "-q"],
        "bench medmnist": ["bench", "medmnist", "--train-data", phantom_dir / "missing.npz",
                           "--test-data", phantom_dir / "missing.npz", "-q"],
        # the output check comes first, so these need no real index, DICOM or server
        "index build": ["index", "build", "--model", model, "--data", phantom_dir, "--out", phantom_dir / "idx", "-q"],
        "index add": ["index", "add", "--index", phantom_dir / "idx", "--data", phantom_dir, "-q"],
        "index info": ["index", "info", "--index", phantom_dir / "idx"],
        "search": ["search", "--index", phantom_dir / "idx", "--image", image],
        "report draft": ["report", "draft", "--index", phantom_dir / "idx", image],
        "eval case-retrieval": ["eval", "case-retrieval", "--index", phantom_dir / "idx", "--data", phantom_dir],
        "dicom-info": ["dicom-info", phantom_dir],
        "deid --report": ["deid", phantom_dir / "images", phantom_dir / "deid-out"],
        "audit": ["audit", "--data", phantom_dir, "-q"],
    }


@pytest.fixture(scope="module")
def commands(trained, phantom_dir):
    return _json_commands(trained, phantom_dir, next((phantom_dir / "images").glob("*.png")))


OUTPUT_COMMANDS = ["eval zero-shot", "eval retrieval", "eval linear-probe", "predict", "bench cv", "bench medmnist",
                   "index build", "index add", "index info", "search", "report draft", "eval case-retrieval",
                   "dicom-info", "deid --report", "audit"]


@pytest.mark.parametrize("name", OUTPUT_COMMANDS)
def test_existing_output_file_is_refused_before_any_work(commands, name, phantom_dir, tmp_path):
    target = tmp_path / "result.json"
    target.write_bytes(SENTINEL)
    option = "--report" if name.startswith("deid") else "--json"
    before = _files(phantom_dir)
    result, output = invoke(*commands[name], option, target)
    _assert_clean_refusal(result, output, "result.json", "--overwrite")
    assert target.read_bytes() == SENTINEL
    assert _files(phantom_dir) == before  # no index, no de-identified folder: nothing was started


@pytest.mark.parametrize("name", OUTPUT_COMMANDS)
def test_an_output_where_no_file_can_be_written_is_refused_before_any_work(commands, name, phantom_dir):
    """Only the existence and kind of the output were checked first: the command did all its work, printed it and
    then failed to write in /proc (or a read-only mount). The nearest existing folder is now tried first."""
    option = "--report" if name.startswith("deid") else "--json"
    before = _files(phantom_dir)
    for target in ("/proc/medvl-result.json", "/proc/no/such/folder/result.json"):
        result, output = invoke(*commands[name], option, target)
        line = f"error: {target}: cannot write: No such file or directory"
        _assert_clean_refusal(result, output, line)
        assert set(output.strip().splitlines()) == {line}, output  # nothing loaded or printed before it
    assert _files(phantom_dir) == before


@pytest.mark.parametrize("name", [name for name in OUTPUT_COMMANDS if not name.startswith("deid")])
def test_a_json_path_ending_with_a_slash_is_a_folder_and_refused(commands, name, tmp_path):
    """``--json newdir/`` wrote a file named ``newdir``: Path drops the slash."""
    result, output = invoke(*commands[name], "--json", f"{tmp_path / 'newdir'}/")
    _assert_clean_refusal(result, output, "--json names a folder (it ends with a slash)")
    assert not (tmp_path / "newdir").exists()


@pytest.mark.parametrize("name", [name for name in OUTPUT_COMMANDS if not name.startswith("deid")])
def test_an_empty_json_path_is_said_to_be_empty(commands, name):
    """``--json ''`` was refused as '.', a folder: the message named a path the user never gave."""
    result, output = invoke(*commands[name], "--json", "")
    _assert_clean_refusal(result, output, "error: --json: empty path; give a file path")
    assert "error: .:" not in output


@pytest.mark.parametrize("name", OUTPUT_COMMANDS)
def test_a_symlinked_output_is_never_followed(commands, name, tmp_path):
    precious = tmp_path / "precious.json"
    precious.write_bytes(SENTINEL)
    (tmp_path / "link.json").symlink_to(precious)
    option = "--report" if name.startswith("deid") else "--json"
    result, output = invoke(*commands[name], option, tmp_path / "link.json", "--overwrite")
    _assert_clean_refusal(result, output, "link.json", "symbolic link")
    assert precious.read_bytes() == SENTINEL and (tmp_path / "link.json").is_symlink()


def test_json_onto_a_model_config_is_refused(trained, phantom_dir, tmp_path):
    """The report that started this: --json m1/model/config.json destroyed the model's config."""
    config = trained / "model" / "config.json"
    before = config.read_bytes()
    result, output = invoke("eval", "zero-shot", "--model", trained, "--data", phantom_dir, "-q", "--json", config)
    _assert_clean_refusal(result, output, "config.json")
    assert config.read_bytes() == before


@pytest.mark.parametrize("kind", ["symlink", "dangling symlink", "fifo", "folder"])
def test_only_regular_files_are_ever_replaced(commands, kind, tmp_path):
    precious = tmp_path / "precious.json"
    precious.write_bytes(SENTINEL)
    target = tmp_path / "out.json"
    if kind == "symlink":
        target.symlink_to(precious)
    elif kind == "dangling symlink":
        target.symlink_to(tmp_path / "nowhere.json")
    elif kind == "fifo":
        os.mkfifo(target)
    else:
        target.mkdir()
    result, output = invoke(*commands["eval retrieval"], "--json", target, "--overwrite")
    _assert_clean_refusal(result, output, "out.json")
    assert precious.read_bytes() == SENTINEL
    assert not (tmp_path / "nowhere.json").exists()
    assert target.is_symlink() == kind.endswith("symlink")


def test_overwrite_replaces_a_regular_file_atomically(commands, tmp_path):
    target = tmp_path / "result.json"
    target.write_bytes(SENTINEL)
    result, output = invoke(*commands["eval retrieval"], "--json", target, "--overwrite")
    assert result.exit_code == 0, output
    assert "image_to_text" in json.loads(target.read_text())
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]  # no temporary file left


# -- 9. numeric options: one range check, at the CLI and the API -------------------------------------

TRAIN = ["train", "--model", "phantom-tiny", "--epochs", 1, "-q"]


@pytest.mark.parametrize("args, needle", [
    (["--max-steps", -1], "--max-steps must be"),
    (["--max-steps", 0], "--max-steps must be"),
    (["--epochs", 0], "--epochs must be"),
    (["--epochs", 10**20], "--epochs must be <= 10000"),  # it trained "forever" at a learning rate of about 1e-19
    (["--lr", "nan"], "lr"),
    (["--lr", "inf"], "lr"),
    (["--lr", 0], "lr"),
    (["--lr", -0.1], "lr"),
    (["--lr", 1e6], "lr"),
    (["--batch-size", 1], "--batch-size must be"),
    (["--grad-accum", 0], "--grad-accum must be"),
    (["--supervised-weight", -1], "--supervised-weight must be"),
    (["--supervised-weight", "nan"], "--supervised-weight must be"),
    (["--label-smoothing", 1], "--label-smoothing must be"),
    (["--label-smoothing", -0.1], "--label-smoothing must be"),
    (["--mixup", -0.5, "--supervised-weight", 1, "--label-column", "finding"], "--mixup must be"),
    (["--train-set", "mixup=11"], "mixup must be <= 10"),
    (["--mixup", 0.4], "mixup 0.4 has no effect"),  # no supervised head: nothing to mix
    (["--mixup", 0.4, "--train-set", "mixup=0.2"], "mixup is given twice: --mixup 0.4 and --train-set mixup=0.2"),
    (["--self-supervised-weight", -1], "--self-supervised-weight must be"),
    (["--self-supervised-weight", "nan"], "--self-supervised-weight must be"),
    (["--train-set", "self_supervised_epochs=-1"], "self_supervised_epochs"),
    (["--train-set", "self_supervised_epochs=1.5"], "self_supervised_epochs"),
    (["--train-set", "warmup_fraction=2"], "warmup_fraction"),
    (["--train-set", "self_supervised_epoch=2"], "unknown train config keys: ['self_supervised_epoch']"),
    (["--train-set", "epochs=3"], "epochs is given twice: --epochs 1 and --train-set epochs=3"),
    (["--train-set", "epochs"], "--train-set expects key=value"),
    (["--text-encoder", ""], "--text-encoder: empty name"),
    (["--train-set", "lr=nan"], "lr must be a finite number, got nan"),  # not "train.lr must be float, got str"
    (["--train-set", "lr=-INF"], "lr must be a finite number, got -inf"),
    (["--train-set", "lr=0.01", "--train-set", "lr=0.02"], "--train-set: lr is given twice (lr=0.01 and lr=0.02)"),
    (["--set", "embed_dim=32", "--set", "embed_dim=64"],
     "--set: embed_dim is given twice (embed_dim=32 and embed_dim=64)"),
    (["--label-column", "finding", "--train-set", 'label_columns=["view"]'],
     "label_columns is given twice: --label-column ['finding'] and --train-set label_columns=['view']"),
    (["--set", "loss=siglip", "--loss", "clip"], "loss is given twice: --loss 'clip' and --set loss='siglip'"),
    (["--set", "text.kind=pretrained", "--text-encoder", "bert"],
     "text.kind is given twice: --text-encoder 'bert' sets it to 'bert', --set text.kind='pretrained'"),
    (["--train-set", 'batch_group=""'], "batch_group: empty column name; leave it out for none"),
    (["--train-set", 'meta_text=" "'], "meta_text: empty column name; leave it out for none"),
    (["--checkpoint-every", -5], "--checkpoint-every must be"),
    (["--seed", -1], "seed"),
    (["--set", "image.image_size=100000"], "image.image_size"),
    (["--set", "image.image_size=2"], "image.image_size"),
    (["--set", "init_temperature=0"], "init_temperature"),
    (["--set", "embed_dim=-4"], "embed_dim"),
    (["--set", "text.max_length=0"], "text.max_length"),
])
def test_train_refuses_out_of_range_numbers_and_writes_nothing(phantom_dir, tmp_path, args, needle):
    out = tmp_path / "run"
    result, output = invoke(*TRAIN, "--data", phantom_dir, "--out", out, *args)
    _assert_clean_refusal(result, output, needle)
    assert not out.exists()


@pytest.mark.parametrize("args, needle", [
    (["phantom", "{out}", "--n", 0], "n must be"),
    (["phantom", "{out}", "--n", 10, "--size", 100000], "size must be"),
    (["phantom", "{out}", "--n", 10, "--extra-finding-prob", 1.5], "--extra-finding-prob must be"),
    (["phantom", "{out}", "--n", 10, "--extra-finding-prob", "nan"], "--extra-finding-prob must be"),
    (["phantom", "{out}", "--n", 10, "--seed", -1], "error: --seed must be >= 0, got -1\n"),  # no internal index
    (["demo", "--out", "{out}", "--n", 5, "-q"], "n must be"),
    (["demo", "--out", "{out}", "--epochs", 0, "-q"], "epochs"),
    (["demo", "--out", "{out}", "--image-size", 5, "-q"], "--image-size must be"),
    (["demo", "--out", "{out}", "--image-size", 12, "--model", "vit-tiny", "-q"], "patch_size"),
    (["bench", "cv", "--data", "{data}", "-l", "finding", "--folds", 1, "-q"], "folds"),
    (["bench", "cv", "--data", "{data}", "-l", "finding", "--model", "phantom-tiny", "--folds", 2, "--epochs", 1,
      "--group-column", "", "-q"], "--group-column: empty column name"),
    (["bench", "cv", "--data", "{data}", "-l", "finding", "--lr", "nan", "-q"], "lr"),
    (["bench", "cv", "--data", "{data}", "-l", "finding", "--epochs", -3, "-q"], "epochs"),
    (["bench", "cv", "--data", "{data}", "-l", "finding", "--label-smoothing", 0.95, "-q"],
     "--label-smoothing must be"),
    (["bench", "cv", "--data", "{data}", "-l", "finding", "--self-supervised-weight", -0.5, "-q"],
     "--self-supervised-weight must be"),
    (["bench", "cv", "--data", "{data}", "-l", "finding", "--train-set", "self_supervised_epochs=-2", "-q"],
     "self_supervised_epochs"),
    (["bench", "cv", "--data", "{data}", "-l", "finding", "--train-set", "seed=3", "-q"],
     "--train-set seed=...: this command sets seed itself"),
    (["bench", "cv", "--data", "{data}", "-l", "finding", "--lr", 0.01, "--train-set", "lr=0.02", "-q"],
     "lr is given twice"),
    (["bench", "cv", "--data", "{data}", "-l", "finding", "--model", "phantom-tiny", "--folds", 2, "--epochs", 1,
      "--set", "embed_dim=32", "--set", "embed_dim=32", "-q"],
     "--set: embed_dim is given twice"),
    (["bench", "medmnist", "--train-data", "{data}", "--test-data", "{data}", "--train-set",
      "label_columns=[\"x\"]", "-q"], "this command sets label_columns itself"),
])
def test_other_commands_refuse_out_of_range_numbers(phantom_dir, tmp_path, args, needle):
    out = tmp_path / "out"
    filled = [str(a).format(out=out, data=phantom_dir) for a in args]
    result, output = invoke(*filled)
    _assert_clean_refusal(result, output, needle)
    assert not out.exists()


@pytest.mark.parametrize("args, needle", [
    (["predict", "{image}", "--labels", "cardiomegaly,nodule", "--label-column", ""],
     "label column: empty column name"),
    (["predict", "{image}", "--labels", "cardiomegaly,nodule", "--label-column", " "],
     "label column: empty column name"),
    (["explain", "{image}", "--method", "patch_text", "--labels", "cardiomegaly,nodule", "--label-column", ""],
     "label column: empty column name"),
    (["explain", "{image}", "--method", "patch_text", "--labels", ""], "need at least 2 distinct labels"),
    (["explain", "{image}", "--method", "patch_text", "--labels", " , "], "need at least 2 distinct labels"),
])
def test_an_empty_name_is_refused_not_taken_for_the_default(trained, phantom_dir, args, needle):
    image = phantom_dir / "images" / "phantom_00001.png"
    result, output = invoke(*[str(a).format(image=image) for a in args], "--model", trained / "model")
    _assert_clean_refusal(result, output, needle)


def test_a_file_given_for_a_model_folder_is_said_to_be_a_file(trained, phantom_dir):
    """It said "not a medvl model directory (missing config.json)" of the config.json itself."""
    config = trained / "model" / "config.json"
    for args in (["eval", "zero-shot", "--model", config, "--data", phantom_dir, "-q"],
                 ["predict", phantom_dir / "images" / "phantom_00001.png", "--model", config, "--labels", "a,b"]):
        result, output = invoke(*args)
        _assert_clean_refusal(result, output, f"{config}: is a file, not a model folder")


def test_linear_probe_refuses_a_zero_shot_count(trained, phantom_dir, tmp_path):
    result, output = invoke("eval", "linear-probe", "--model", trained, "--train-data", phantom_dir,
                            "--test-data", phantom_dir, "--few-shot", "0,4", "--json", tmp_path / "r.json")
    _assert_clean_refusal(result, output, "few-shot k must be >= 1")
    assert not (tmp_path / "r.json").exists()


def test_the_api_applies_the_same_checks(phantom_dir, tmp_path):
    dataset = medvl.load_dataset(phantom_dir).select("train")
    for bad in ({"max_steps": -1}, {"lr": float("nan")}, {"epochs": 2.5}, {"warmup_fraction": 2.0}):
        with pytest.raises(medvl.errors.InputError, match=next(iter(bad))):
            medvl.train(medvl.create_model("phantom-tiny"), dataset, TrainConfig(**bad), tmp_path / "api")
    with pytest.raises(medvl.errors.InputError, match="init_temperature"):
        medvl.create_model("phantom-tiny", init_temperature=float("inf"))
    assert not (tmp_path / "api").exists()


# -- 8. garbage that reported success: NaN weights, diverging runs -----------------------------------

def test_a_diverging_run_stops_with_a_clear_error_and_saves_no_model(phantom_dir, tmp_path):
    """A normalisation that overflows float32 makes the first loss NaN: stop before the optimizer steps."""
    out = tmp_path / "run"
    result, output = invoke(*TRAIN, "--data", phantom_dir, "--out", out, "--set", "image.intensity_mean=1e38")
    _assert_clean_refusal(result, output, "training stopped at step 1", "nan", "--lr")
    assert not out.exists()  # no checkpoint to resume from: nothing left to block the corrected command
    result, output = invoke(*TRAIN, "--data", phantom_dir, "--out", out)
    assert result.exit_code == 0 and (out / "model").is_dir(), output


def test_divergence_keeps_the_last_good_checkpoint(phantom_dir, tmp_path):
    dataset = medvl.load_dataset(phantom_dir).select("train")
    out = tmp_path / "run"

    def blow_up_in_epoch_two(model, epoch):
        if epoch == 2:  # as if the weights overflowed during the second epoch
            with torch.no_grad():
                model.image_projection.weight[0, 0] = float("nan")
        return {}

    config = TrainConfig(epochs=3, batch_size=32, seed=0)
    with pytest.raises(TrainingError, match="last good checkpoint \\(step 3\\)"):
        medvl.train(medvl.create_model("phantom-tiny"), dataset, config, out, captions=captions_for(dataset),
                    show_progress=False, on_epoch_end=blow_up_in_epoch_two)
    assert not (out / "model").exists()
    kept = medvl.load_model(out / "checkpoint" / "model")  # loads: every weight finite
    assert all(torch.isfinite(t).all() for t in kept.state_dict().values())
    assert torch.load(out / "checkpoint" / "state.pt", weights_only=True)["step"] == 3


def test_save_pretrained_refuses_non_finite_weights(tmp_path):
    model = medvl.create_model("phantom-tiny")
    with torch.no_grad():
        model.text_projection.weight[1, 2] = float("inf")
    with pytest.raises(ModelError, match="NaN or infinity"):
        model.save_pretrained(tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def nan_model(trained, tmp_path) -> Path:
    """A copy of the trained model whose weights were NaN-poisoned on disk (as --lr nan used to save)."""
    import shutil

    copy = tmp_path / "nan-model"
    shutil.copytree(trained / "model", copy)
    weights = load_file(copy / "model.safetensors")
    name = next(k for k, v in weights.items() if v.is_floating_point() and v.ndim == 2)
    weights[name] = torch.full_like(weights[name], float("nan"))
    save_file(weights, copy / "model.safetensors")
    return copy


def test_predict_and_eval_refuse_a_model_with_non_finite_weights(nan_model, phantom_dir, tmp_path):
    image = next((phantom_dir / "images").glob("*.png"))
    result, output = invoke("predict", image, "--model", nan_model, "--labels", "no finding,cardiomegaly",
                            "--json", tmp_path / "p.json")
    _assert_clean_refusal(result, output, "NaN or infinity", "nan-model")
    result, output = invoke("eval", "zero-shot", "--model", nan_model, "--data", phantom_dir, "-q",
                            "--json", tmp_path / "z.json")
    _assert_clean_refusal(result, output, "NaN or infinity")
    assert list(tmp_path.glob("*.json")) == []
    with pytest.raises(ModelError, match="retrain"):
        medvl.load_model(nan_model)


# -- 7. a full disk: one line naming the path, exit 2, staged output removed --------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A real, tiny file system (tmpfs) that fills up: needs root (as in CI) to mount."""
    mount = tmp_path / "disk"
    mount.mkdir()

    def make(size: str) -> Path:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs to fill up ({done.stderr.strip() or 'not root'})")
        return mount

    yield make
    subprocess.run(["umount", str(mount)], capture_output=True)


def test_train_on_a_full_disk_says_where_and_removes_its_output(phantom_dir, small_disk):
    disk = small_disk("400k")  # room for train_config.json and metrics, not for a 0.9 MB model
    out = disk / "run"
    result, output = invoke(*TRAIN, "--data", phantom_dir, "--out", out)
    _assert_clean_refusal(result, output, str(out), "No space left on device")
    assert len([line for line in result.stderr.splitlines() if line.startswith("error:")]) == 1
    assert list(disk.iterdir()) == []  # no run folder, no staging folder, no temporary file


def test_phantom_on_a_full_disk_says_where_and_leaves_nothing(small_disk):
    disk = small_disk("64k")
    out = disk / "phantom"
    result, output = invoke("phantom", out, "--n", 40, "--size", 64, "-q")
    _assert_clean_refusal(result, output, str(out), "No space left on device")
    assert "Errno" not in output
    assert list(disk.iterdir()) == []


def test_json_output_on_a_full_disk_leaves_no_partial_file(commands, small_disk):
    disk = small_disk("8k")
    with pytest.raises(OSError), (disk / "fill.bin").open("wb") as handle:
        handle.write(b"\0" * 65536)  # fill the disk up
    result, output = invoke(*commands["eval retrieval"], "--json", disk / "r.json")
    _assert_clean_refusal(result, output, "r.json", "No space left on device")
    assert [p.name for p in disk.iterdir()] == ["fill.bin"]


# -- 5. files outside the dataset folder: every command that loads a dataset refuses them ---------------

def _outside_manifest(phantom_dir: Path, folder: Path) -> Path:
    """A manifest whose rows name the phantom's images from another folder (as a copied manifest would)."""
    folder.mkdir()
    rows = [f"{phantom_dir / 'images' / f'phantom_{i:05d}.png'},report {i},{'ab'[i % 2]}" for i in range(6)]
    (folder / "manifest.csv").write_text("image,text,finding\n" + "\n".join(rows) + "\n")
    return folder / "manifest.csv"


@pytest.mark.parametrize("name", ["train", "eval zero-shot", "eval retrieval", "eval linear-probe", "bench cv",
                                  "index build", "index add", "eval case-retrieval", "audit"])
def test_dataset_commands_refuse_files_outside_the_manifest_folder(trained, phantom_dir, tmp_path, name):
    manifest = _outside_manifest(phantom_dir, tmp_path / "elsewhere")
    model, out = trained / "model", tmp_path / "out"
    args = {
        "train": ["train", "--data", manifest, "--model", "phantom-tiny", "--out", out, "--epochs", 1, "-q"],
        "eval zero-shot": ["eval", "zero-shot", "--model", model, "--data", manifest, "--split", "all", "-q"],
        "eval retrieval": ["eval", "retrieval", "--model", model, "--data", manifest, "--split", "all", "-q"],
        "eval linear-probe": ["eval", "linear-probe", "--model", model, "--train-data", manifest,
                              "--test-data", manifest, "--train-split", "all", "--test-split", "all", "-q"],
        "bench cv": ["bench", "cv", "--data", manifest, "-l", "finding", "--model", "phantom-tiny", "--folds", 2, "-q"],
        "index build": ["index", "build", "--model", model, "--data", manifest, "--out", out, "-q"],
        "index add": ["index", "add", "--index", out, "--data", manifest, "-q"],
        "eval case-retrieval": ["eval", "case-retrieval", "--index", out, "--data", manifest, "--split", "all"],
        "audit": ["audit", "--data", manifest, "-q"],
    }[name]
    result, output = invoke(*args)
    _assert_clean_refusal(result, output, "6 of 6 rows name a file outside", "--allow-outside-root")
    assert not out.exists()


def test_allow_outside_root_opts_in(trained, phantom_dir, tmp_path):
    manifest = _outside_manifest(phantom_dir, tmp_path / "elsewhere")
    out = tmp_path / "idx"
    result, output = invoke("index", "build", "--model", trained / "model", "--data", manifest, "--out", out,
                            "--allow-outside-root", "-q")
    assert result.exit_code == 0, output
    assert str(phantom_dir).encode() not in (out / "cases.sqlite").read_bytes()  # no path outside the root is kept


# -- 10. an output is never one of the command's inputs, nor two options the same file ------------------

@pytest.fixture(scope="module")
def built_index(trained, phantom_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("inputs") / "cases.idx"
    result, output = invoke("index", "build", "--model", trained / "model", "--data", phantom_dir, "--out", out, "-q")
    assert result.exit_code == 0, output
    return out


def _input_targets(trained: Path, phantom_dir: Path, index: Path) -> dict[str, tuple[list, Path]]:
    """Commands whose output option names one of their own inputs, with the file it would destroy."""
    model, image = trained / "model", next((phantom_dir / "images").glob("*.png"))
    zero_shot = ["eval", "zero-shot", "--model", model, "-q"]
    return {
        "model config": ([*zero_shot, "--data", phantom_dir, "--json", model / "config.json"], model / "config.json"),
        "manifest file": ([*zero_shot, "--data", phantom_dir / "manifest.csv", "--json", phantom_dir / "manifest.csv"],
                          phantom_dir / "manifest.csv"),
        "file in the data folder": ([*zero_shot, "--data", phantom_dir, "--json", phantom_dir / "dataset.json"],
                                    phantom_dir / "dataset.json"),
        "index.json": (["search", "--index", index, "--text", "effusion", "--json", index / "index.json"],
                       index / "index.json"),
        "input image": (["predict", image, "--model", model, "--labels", "a,b", "--json", image], image),
        "run folder as --model": (["eval", "zero-shot", "--model", trained, "-q", "--data", phantom_dir, "--json",
                                   trained / "train_config.json"], trained / "train_config.json"),
        "index build into its --out": (["index", "build", "--model", model, "--data", phantom_dir, "--out", index,
                                        "--json", index / "index.json"], index / "index.json"),
        "image of a manifest": ([*zero_shot, "--data", phantom_dir / "manifest.csv", "--json", image], image),
        "audit: image of a manifest": (["audit", "--data", phantom_dir / "manifest.csv", "--json", image, "-q"], image),
    }


@pytest.mark.parametrize("case", ["model config", "manifest file", "file in the data folder", "index.json",
                                  "input image", "run folder as --model", "index build into its --out",
                                  "image of a manifest", "audit: image of a manifest"])
def test_an_output_that_is_an_input_is_refused_even_with_overwrite(trained, phantom_dir, built_index, case):
    """--json r/model/config.json --overwrite replaced the model's config (and the same for a manifest, an index,
    and an image a manifest names: only the manifest file itself was protected, not its folder's data)."""
    args, precious = _input_targets(trained, phantom_dir, built_index)[case]
    before = precious.read_bytes()
    result, output = invoke(*args, "--overwrite")
    _assert_clean_refusal(result, output, "--json", "give a", str(precious))
    assert precious.read_bytes() == before


def test_an_output_reached_through_a_symlinked_folder_is_still_an_input(trained, phantom_dir, tmp_path):
    (tmp_path / "alias").symlink_to(trained / "model")
    config = trained / "model" / "config.json"
    before = config.read_bytes()
    result, output = invoke("eval", "zero-shot", "--model", trained / "model", "--data", phantom_dir, "-q",
                            "--json", tmp_path / "alias" / "config.json", "--overwrite")
    _assert_clean_refusal(result, output, "lies inside")
    assert config.read_bytes() == before


def test_a_new_results_file_beside_the_data_is_fine_but_not_one_a_loader_would_read(trained, phantom_dir, tmp_path):
    """Run from inside a dataset folder (``--data .``), a results JSON lands beside the data; a new table or
    image there would be read back as data, and is refused."""
    data = tmp_path / "data"
    shutil.copytree(phantom_dir, data)
    zero_shot = ["eval", "zero-shot", "--model", trained / "model", "--data", data, "--split", "test", "-q"]
    result, output = invoke(*zero_shot, "--json", data / "results.json")
    assert result.exit_code == 0 and (data / "results.json").is_file(), output
    result, output = invoke(*zero_shot, "--json", data / "results.json", "--overwrite")  # a rerun replaces it
    assert result.exit_code == 0, output
    run = tmp_path / "run"  # the same beside a training run's own files
    shutil.copytree(trained, run)
    for _ in range(2):
        result, output = invoke("eval", "zero-shot", "--model", run, "--data", data, "--split", "test", "-q",
                                "--json", run / "zs.json", "--overwrite")
        assert result.exit_code == 0, output
    for name in ("extra.csv", "images/new.png"):
        result, output = invoke(*zero_shot, "--json", data / name)
        _assert_clean_refusal(result, output, "lies inside", str(data))
        assert not (data / name).exists()


def test_two_outputs_naming_the_same_file_are_refused_before_any_work(trained, phantom_dir, tmp_path):
    image = next((phantom_dir / "images").glob("*.png"))
    same = tmp_path / "same.png"
    result, output = invoke("vqa", image, "--model", trained / "model", "--question", "is there an effusion?",
                            "--heatmap", same, "--json", same, "--overwrite")
    _assert_clean_refusal(result, output, "--json and --heatmap name the same file")
    assert not same.exists()
    out = tmp_path / "dout"
    result, output = invoke("deid", phantom_dir / "images", out, "--report", out / "deid-report.json")
    _assert_clean_refusal(result, output, "--report lies inside", "OUT")
    assert not out.exists()  # nothing de-identified


@pytest.mark.parametrize("args", [["phantom", "{out}", "--n", 8, "-q"],
                                  ["index", "build", "--model", "{model}", "--data", "{data}", "--out", "{out}"],
                                  ["deid", "{images}", "{out}"]])
def test_a_folder_output_under_a_file_says_so(trained, phantom_dir, tmp_path, args):
    afile = tmp_path / "afile.txt"
    afile.write_bytes(SENTINEL)
    values = {"out": afile / "sub", "model": trained / "model", "data": phantom_dir, "images": phantom_dir / "images"}
    result, output = invoke(*[str(a).format(**values) for a in args])
    _assert_clean_refusal(result, output, f"{afile / 'sub'}", "path runs through a file, not a folder")
    assert afile.read_bytes() == SENTINEL


def test_an_unreadable_meta_json_is_named(trained, phantom_dir, tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(trained / "model", model)
    (model / "meta.json").write_text("")
    result, output = invoke("predict", next((phantom_dir / "images").glob("*.png")), "--model", model,
                            "--labels", "a,b")
    _assert_clean_refusal(result, output, "cannot read model files (meta.json: JSONDecodeError")
