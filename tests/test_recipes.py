"""Named configs carry their training recipes: medvl train, medvl models and the benchmark scripts
resolve the same settings."""

import dataclasses
import importlib.util
import inspect
import json
from pathlib import Path

import pytest

import medvl
from cli_helpers import invoke
from medvl.bench.cv import cv_settings
from medvl.bench.medmnist import medmnist_settings, task_captions
from medvl.data import load_captions
from medvl.errors import InputError
from medvl.models.config import Recipe, build_dataclass
from medvl.models.registry import get_config, get_recipe
from medvl.train.loop import TrainConfig
from medvl.train.recipes import caption_set, resolve_recipe

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
TUNED = {"medpix-small", "derm-small", "medmnist-small", "ct3d-small", "cxr-small"}


def _benchmark(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", medvl.list_models())
def test_every_recipe_resolves_to_a_valid_training_setup(name):
    settings = resolve_recipe(name)
    settings.train.validate_numbers()
    get_config(name, **settings.model_overrides)  # the overrides fit the architecture
    if settings.captions is not None:
        assert load_captions(settings.captions).classes
    assert (settings.train.recipe == name) == (name in TUNED)
    if name not in TUNED:
        assert settings.train == TrainConfig() and not settings.model_overrides
    if name != "medmnist-small":  # only the MedMNIST benchmark scores test-time views and thresholds
        assert (settings.test_time_views, settings.operating_point) == ([], "max_accuracy")
    if name not in ("medmnist-small", "derm-small"):  # and only the classifier benchmarks ensembles
        assert settings.ensemble == 1


def test_the_medpix_recipe_is_the_documented_one():
    settings = resolve_recipe("medpix-small")
    assert settings.model_overrides == {"text.freeze": True}
    train = settings.train
    assert (train.epochs, train.batch_size, train.lr, train.loss, train.text_source) == (20, 64, 1e-3, "clip", "both")
    assert train.label_columns == ["modality", "plane", "location_category"]
    assert settings.captions == caption_set("medpix")


def test_options_replace_the_recipe_and_none_keeps_it():
    settings = resolve_recipe("medpix-small", epochs=3, lr=None, model_overrides={"embed_dim": 64})
    assert settings.train.epochs == 3 and settings.train.lr == 1e-3 and settings.train.text_source == "both"
    assert settings.model_overrides == {"text.freeze": True, "embed_dim": 64}
    assert resolve_recipe("derm-small", captions="mine.yaml").captions == "mine.yaml"


def test_a_loss_set_on_the_model_is_not_undone_by_the_recipes_training_loss():
    """medpix-small's recipe trains with loss clip: ``--set loss=siglip`` was replaced by it without a word, and
    ``--set loss=siglip --loss clip`` trained clip."""
    assert resolve_recipe("medpix-small", model_overrides={"loss": "siglip"}).train.loss == "siglip"
    assert resolve_recipe("medpix-small", model_overrides={"loss": "clip"}, loss="clip").train.loss == "clip"
    with pytest.raises(InputError, match="loss is given twice: --loss 'clip' and --set loss='siglip'"):
        resolve_recipe("phantom-tiny", model_overrides={"loss": "siglip"}, loss="clip")


def test_a_recipes_locked_text_tower_replaced_by_a_random_init_bert_is_refused(phantom_dir, tmp_path):
    """medpix-small locks its pretrained text tower; ``--text-encoder bert`` kept the lock, so the random BERT never
    trained. Refused with the way out; a lock the options give themselves, or a pretrained encoder, is kept."""
    from medvl.api import parse_overrides

    with pytest.raises(InputError, match=r"medpix-small's recipe locks its text tower .* add --set text.freeze=false"):
        resolve_recipe("medpix-small", model_overrides=parse_overrides([], "bert"))
    with pytest.raises(InputError, match="random-init BERT that would never train"):
        resolve_recipe("medpix-small", model_overrides={"text": {"kind": "bert", "path": None}})
    assert resolve_recipe("medpix-small", model_overrides=parse_overrides(["text.freeze=false"], "bert")
                          ).model_overrides["text.freeze"] is False
    assert resolve_recipe("medpix-small", model_overrides=parse_overrides(["text.freeze=true"], "bert")
                          ).model_overrides["text.freeze"] is True
    assert resolve_recipe("medpix-small", model_overrides=parse_overrides([], "all-minilm-l6-v2")
                          ).model_overrides["text.freeze"] is True
    result, output = invoke("train", "--data", phantom_dir, "--out", tmp_path / "run", "--model", "medpix-small",
                            "--text-encoder", "bert", "--label-column", "finding", "--max-steps", 1, "-q")
    assert result.exit_code == 2 and "add --set text.freeze=false to train it" in " ".join(output.split()), output
    assert "Traceback" not in output and not (tmp_path / "run").exists()


def test_unknown_and_mistyped_recipe_settings_are_refused():
    with pytest.raises(InputError, match="epoch"):
        resolve_recipe("medpix-small", epoch=3)
    with pytest.raises(InputError, match="epochs must be int"):
        build_dataclass(TrainConfig, {"epochs": "20"}, "train")
    with pytest.raises(InputError, match="unknown recipe config keys"):
        Recipe.from_dict({"trian": {}})
    with pytest.raises(InputError, match="recipe.train must be dict"):
        Recipe.from_dict({"train": [1]})
    with pytest.raises(InputError, match="epochs"):
        resolve_recipe("medpix-small", epochs=0)


def test_a_saved_model_folder_trains_with_plain_defaults(tmp_path):
    medvl.create_model("phantom-tiny", **{"text.freeze": True}).save_pretrained(tmp_path / "saved")
    settings = resolve_recipe(tmp_path / "saved")
    assert settings.train == TrainConfig() and settings.model_overrides == {} and settings.captions is None


def test_recipes_are_copies():
    get_recipe("medpix-small").train["epochs"] = 1
    assert resolve_recipe("medpix-small").train.epochs == 20


# ---------------------------------------------------------------- benchmarks and CLI: one setting


def test_medpix_benchmark_trains_the_recipe():
    medpix = _benchmark("medpix")
    assert medpix.settings_for(medpix.make_parser().parse_args([])) == resolve_recipe("medpix-small")
    assert medpix.settings_for(medpix.make_parser().parse_args(["--epochs", "15"])).train.epochs == 15
    extra = medpix.settings_for(medpix.make_parser().parse_args(["--train-set", "self_supervised_epochs=5"]))
    assert extra == resolve_recipe("medpix-small", self_supervised_epochs=5)


@pytest.mark.parametrize("splits", [["--train-split", "dev", "--test-split", "dev"], ["--train-split", "all"],
                                    ["--test-split", "all"]])
def test_the_medpix_benchmark_refuses_to_score_its_training_split(splits, tmp_path, capsys):
    """It trained on dev and scored dev without a word, the caption bridge voting with the scored captions
    (R@5 0.350 against 0.066 plain); --hold-out is the way to score cases of the training split."""
    medpix = _benchmark("medpix")
    with pytest.raises(SystemExit) as refused:
        medpix.main([*splits, "--out", str(tmp_path / "out")])
    assert refused.value.code == 2 and "overlaps --train-split" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_train_set_reaches_every_train_config_field_and_refuses_two_values():
    from medvl.api import train_options

    options = train_options({"epochs": 3, "lr": None}, ["self_supervised_epochs=4", "text_lr=0.0001",
                                                        "meta_text=case_diagnosis", "lr=0.002", "epochs=3"])
    assert options == {"epochs": 3, "lr": 0.002, "self_supervised_epochs": 4, "text_lr": 1e-4,
                       "meta_text": "case_diagnosis"}  # JSON values, else strings; the same value twice is fine
    settings = resolve_recipe("derm-small", **options)
    assert (settings.train.self_supervised_epochs, settings.train.epochs, settings.train.batch_size) == (4, 3, 32)
    with pytest.raises(InputError, match="lr is given twice"):
        train_options({"lr": 0.01}, ["lr=0.02"])
    with pytest.raises(InputError, match="self_supervised_epochs must be int"):
        resolve_recipe("derm-small", **train_options({}, ["self_supervised_epochs=\"4\""]))
    # the recipe comes from the model: a recipe given as a setting was dropped without a word
    with pytest.raises(InputError, match="recipe='cxr-small': the recipe is the model's, not a training option"):
        resolve_recipe("phantom-tiny", **train_options({}, ["recipe=cxr-small"]))


def test_volume3d_benchmark_trains_the_recipe():
    volume3d = _benchmark("volume3d")
    options = volume3d.run_options(volume3d.make_parser().parse_args([]))
    assert volume3d.settings_for(options) == resolve_recipe("ct3d-small")


def test_the_derm_recipe_is_the_documented_one():
    settings = resolve_recipe("derm-small")
    assert settings.model_overrides == {"image.image_size": 64, "image.color_constancy": 6.0,
                                        "image.augment_rot90": True, "image.augment_color": 0.2}
    train = settings.train
    assert (train.epochs, train.batch_size, train.lr, train.supervised_weight, train.contrastive_weight,
            train.self_supervised_weight) == (40, 32, 1e-3, 1.0, 0.5, 0.3)
    assert settings.captions == caption_set("isic")
    assert settings.ensemble == 3  # bench cv: three models per fold (docs/benchmarks.md, ISIC)
    assert train.covariates == ["age_approx", "sex"]  # fused with the head and the probe (docs/benchmarks.md)
    image = get_config("derm-small", **settings.model_overrides).image
    assert (image.augment_flip, image.augment_rot90, image.in_channels) == (True, True, 3)


def test_isic_benchmark_and_bench_cv_train_the_recipe():
    isic = _benchmark("isic")
    assert (isic.MODEL, isic.LABEL) == ("derm-small", "diagnosis")
    assert cv_settings(isic.MODEL, isic.LABEL, seed=0) == resolve_recipe("derm-small")
    assert cv_settings("derm-small", "diagnosis", epochs=5).train.epochs == 5
    settings = cv_settings("derm-small", "diagnosis", train_options={"self_supervised_epochs": 40})
    assert settings == resolve_recipe("derm-small", self_supervised_epochs=40)
    with pytest.raises(InputError, match="sets supervised_weight itself"):
        cv_settings("derm-small", "diagnosis", train_options={"supervised_weight": 0.5})


def test_medmnist_benchmark_trains_the_recipe_with_its_captions(tmp_path):
    assert medmnist_settings() == resolve_recipe("medmnist-small")
    assert medmnist_settings(train_options={"weight_decay": 0.1}) == resolve_recipe("medmnist-small", weight_decay=0.1)
    medmnist = _benchmark("medmnist")
    command = medmnist.command_for(medmnist.make_parser().parse_args([]), tmp_path / "r.json")
    recipe_options = {"--epochs", "--ensemble", "--tta", "--no-tta", "--operating-point", "--model"}
    assert not recipe_options & set(command)  # the script runs the recipe as `medvl bench medmnist` does
    extra = medmnist.command_for(medmnist.make_parser().parse_args(["--train-set", "lr=0.003"]), tmp_path / "r.json")
    assert extra[extra.index("--train-set") + 1] == "lr=0.003"
    assert command[command.index("--target-prior") + 1] == "0.625"
    recipe_captions = load_captions(resolve_recipe("medmnist-small").captions)
    assert task_captions(Path("pneumoniamnist.npz"), ["0", "1"]) == recipe_captions
    assert task_captions(Path("breastmnist.npz"), ["0", "1"]) != recipe_captions


def test_demo_defaults_are_the_cxr_recipe():
    from medvl.demo import run_demo

    defaults = inspect.signature(run_demo).parameters
    settings = resolve_recipe("cxr-small")
    assert defaults["epochs"].default == settings.train.epochs
    assert defaults["image_size"].default == settings.model_overrides["image.image_size"]


def test_plain_cli_train_runs_the_recipe_and_saves_it(tiny_npz, tmp_path):
    out = tmp_path / "run"
    result, output = invoke("train", "--data", tiny_npz, "--model", "medmnist-small", "--out", out,
                            "--max-steps", 2, "-q")
    assert result.exit_code == 0, output
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["train"] == dataclasses.asdict(resolve_recipe("medmnist-small", max_steps=2).train)
    model = medvl.load_model(out)
    assert list(model.heads) == ["label"]  # the recipe's supervised head
    assert model.meta["captions"] == load_captions(caption_set("pneumoniamnist")).to_dict()


def test_cli_options_override_the_recipe(tiny_npz, tmp_path):
    out = tmp_path / "run"
    result, output = invoke("train", "--data", tiny_npz, "--model", "medmnist-small", "--out", out,
                            "--max-steps", 1, "--lr", 0.01, "--supervised-weight", 0, "--set", "embed_dim=32", "-q")
    assert result.exit_code == 0, output
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["train"]["lr"] == 0.01 and saved["train"]["supervised_weight"] == 0
    assert saved["train"]["batch_size"] == 128 and saved["model"]["embed_dim"] == 32
    assert not medvl.load_model(out).heads


def test_recipe_label_columns_missing_from_the_data_are_named(phantom_dir, tmp_path):
    result, output = invoke("train", "--data", phantom_dir, "--model", "medpix-small", "--out", tmp_path / "x", "-q")
    assert result.exit_code == 2
    assert "medpix-small recipe" in output and "--label-column" in output
    assert not (tmp_path / "x").exists()


def test_models_command_shows_the_recipes():
    result, output = invoke("models")
    assert result.exit_code == 0 and "recipe" in output and "defaults" in output
    result, output = invoke("models", "--recipe", "medpix-small")
    assert result.exit_code == 0, output
    shown = json.loads(output)
    assert shown["train"]["epochs"] == 20 and shown["model_overrides"] == {"text.freeze": True}
    assert shown["captions"] == "medpix"
    result, output = invoke("models", "--recipe", "medmnist-small")
    benchmark = json.loads(output)["benchmark"]
    recipe = get_recipe("medmnist-small")
    assert benchmark == {"ensemble": recipe.ensemble, "test_time_views": recipe.test_time_views,
                         "operating_point": recipe.operating_point}
    result, output = invoke("models", "--recipe", "no-such-model")
    assert result.exit_code == 2 and "no-such-model" in output


def test_the_recipe_of_a_saved_model_folder_names_the_captions_a_run_of_it_takes(phantom_dir, tmp_path):
    """A run of a saved model folder on data without a dataset.json takes the captions the model was trained with
    (``captions_for``), and ``medvl models --recipe FOLDER`` said "the dataset's own, else generic templates"."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(phantom_dir, data)
    (data / "dataset.json").unlink()
    lines = (data / "manifest.csv").read_text().splitlines(keepends=True)
    (data / "manifest.csv").write_text("".join(lines[:17]))  # 16 records
    model = medvl.create_model("phantom-tiny", seed=0, **{"image.image_size": 32})
    model.save_pretrained(tmp_path / "plain")
    trained_with = {"templates": ["a film showing {}."], "classes": {}}
    model.meta["captions"] = trained_with
    model.save_pretrained(tmp_path / "captioned")
    shown = {}
    for name in ("phantom-tiny", "plain", "captioned"):
        result, output = invoke("models", "--recipe", name if name == "phantom-tiny" else tmp_path / name)
        assert result.exit_code == 0, output
        shown[name] = json.loads(output)["captions"]
    assert shown["phantom-tiny"] == shown["plain"] == "the dataset's own, else generic templates"
    assert shown["captioned"] == "the dataset's own, else the model's (the caption set it was trained with)"
    result, output = invoke("train", "--data", data, "--model", tmp_path / "captioned", "--out", tmp_path / "run",
                            "--epochs", 1, "--batch-size", 8, "--max-steps", 1, "--workers", 0, "-q")
    assert result.exit_code == 0, output
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["captions"]["templates"] == \
        trained_with["templates"]


def test_benchmark_scripts_answer_bad_input_in_one_line(tmp_path):
    """They ended in a Python traceback (exit 1), --repeats 0 in an unexplained IndexError."""
    import subprocess
    import sys

    cases = (("medpix", ["--test-split", "nosuch", "--out", str(tmp_path / "m")], "no split 'nosuch'"),
             ("medpix", ["--hold-out", "1.0", "--out", str(tmp_path / "h")], "--hold-out is a share"),
             ("isic", ["--repeats", "0"], "--repeats must be at least 1"))
    for script, args, said in cases:
        done = subprocess.run([sys.executable, str(BENCHMARKS / f"{script}.py"), *args], capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 2 and said in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert not (tmp_path / "m").exists() and not (tmp_path / "h").exists()


MISSING = "/nonexistent-medvl-data"


@pytest.mark.parametrize("script, args, said", [
    ("labeller_iu", ["--data", MISSING], f"error: {MISSING}: dataset path not found"),
    ("ood", ["--model", MISSING, "--data", MISSING], f"error: {MISSING}: "),
    ("data_loading", ["--data", MISSING], f"error: {MISSING}: dataset path not found"),
    ("heatmap_sanity", ["--model", MISSING, "--data", MISSING], f"error: {MISSING}: "),
    ("retrieval", ["--vectors", f"{MISSING}.npy", "--no-folder"], f"error: {MISSING}.npy: --vectors is not a readable"),
    ("vqa", ["--only", "rad", "--medpix", MISSING, "--data", MISSING], f"error: {MISSING}: dataset path not found"),
    ("scaling_curve", ["--sizes", "10,abc"], "--sizes takes film counts separated by commas"),
])
def test_benchmark_scripts_answer_a_missing_path_in_one_line(script, args, said, tmp_path):
    """They ended in a Python traceback (exit 1) on a missing data path or model, vqa.py in a CalledProcessError after
    the child's one-line error, scaling_curve.py in a ValueError on --sizes; now one line and exit 2, as medpix.py."""
    import subprocess
    import sys

    extra = ["--out", str(tmp_path / "out")] if script == "vqa" else []
    done = subprocess.run([sys.executable, str(BENCHMARKS / f"{script}.py"), *args, *extra], capture_output=True,
                          text=True, timeout=300)
    # one line of error (argparse's usage lines before it for a malformed option, as for medpix.py's)
    errors = [line for line in done.stderr.splitlines() if line.strip() and not line.startswith(("usage:", " "))]
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert len(errors) == 1 and said in errors[0], done.stderr


@pytest.mark.parametrize("options, message", [
    (["--text-encoder", "all-minilm-l6-v2"], "--text-encoder (text.kind, text.path) applies to registered names, not "
                                             "to a saved model: it keeps its own text tower"),
    (["--text-encoder", "bert"], "--text-encoder (text.kind, text.path) applies to registered names"),
    (["--set", "embed_dim=32"], "config overrides (embed_dim; --set) apply to registered names, not to a saved model"),
])
def test_a_saved_model_refuses_model_options_naming_the_option_given(options, message, phantom_dir, tmp_path):
    """--text-encoder with a saved folder spoke of "config overrides", which no option of the command had said."""
    medvl.create_model("phantom-tiny").save_pretrained(tmp_path / "saved")
    result, output = invoke("train", "--data", phantom_dir, "--model", tmp_path / "saved", "--out", tmp_path / "run",
                            "--epochs", 1, *options)
    assert result.exit_code == 2 and "Traceback" not in output, output
    assert f"error: {tmp_path / 'saved'}: {message}" in output, output
    assert not (tmp_path / "run").exists()
