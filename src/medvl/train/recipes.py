"""Training recipes: the one place where ``medvl train --model NAME`` and the benchmark scripts get
their settings, so a user and a benchmark cannot drift apart.

A registered config may carry a ``recipe`` block (``medvl.models.config.Recipe``): the ``TrainConfig``
values, model overrides and caption set it was measured with (docs/benchmarks.md). Settings resolve
in three layers, later winning:

1. ``TrainConfig``'s defaults;
2. the recipe of the registered name (``medvl models --recipe NAME`` prints it);
3. options given explicitly (a value of ``None`` means "the recipe's").

A saved model folder passed as the model has no recipe: it trains with ``TrainConfig``'s defaults
(plus the options given) and keeps the config it was saved with (a frozen text tower, an image
size), since continuing from trained weights is another job than the recipe's training from scratch.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ..checks import check_number
from ..data import CAPTION_SOURCES, caption_sources
from ..data.captions import CaptionConfig
from ..data.record import Dataset
from ..errors import InputError, ModelError
from ..models.config import Recipe, build_dataclass
from ..models.dual import DualEncoder, saved_captions
from ..models.registry import (
    check_no_overrides,
    check_overrides,
    get_recipe,
    is_model_dir,
    list_models,
    resolve_model,
)
from .loop import TrainConfig, add_heads, prepare_run, run_covariates, seed_everything, train_prepared

log = logging.getLogger(__name__)

CaptionSource = str | Path | CaptionConfig | None
# Decision thresholds of a binary benchmark, each picked on held-out data (medvl.bench.medmnist)
# TrainConfig fields a labelled benchmark (medvl bench cv / medmnist) sets itself: its own seed option, a head on
# its label with weight 1, label captions as texts
BENCHMARK_FIXED = ("seed", "text_source", "label_columns", "supervised_weight")
OPERATING_POINTS = ("max_accuracy", "max_accuracy_at_prior", "max_balanced_accuracy")


@dataclass
class RecipeSettings:
    """Everything a training run takes from its recipe and options, resolved."""

    model: str  # a registered name or a saved model folder
    train: TrainConfig  # the resolved training config (``label_columns`` [] = the dataset's own)
    model_overrides: dict[str, Any] = field(default_factory=dict)  # merged into a registered config
    captions: CaptionSource = None  # caption file or config; None = the dataset's own, else a saved model's, else
    # generic (``captions_for``)
    ensemble: int = 1  # benchmark: members trained with seeds seed .. seed + ensemble - 1, averaged
    test_time_views: list[list[float]] = field(default_factory=list)  # benchmark: [shift_x, shift_y, scale]
    # test-time views averaged with the plain image (``Recipe.test_time_views``)
    operating_point: str = "max_accuracy"  # benchmark: the binary threshold behind the headline accuracy
    covariates_given: bool = False  # ``train.covariates`` was given as an option (strict), not the recipe's

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: what a benchmark writes next to its results."""
        captions: Any = self.captions
        if isinstance(captions, CaptionConfig):
            captions = captions.to_dict()
        elif captions is not None:
            captions = str(captions)
        return {"model": self.model, "train": dataclasses.asdict(self.train),
                "model_overrides": dict(self.model_overrides), "captions": captions, "ensemble": self.ensemble,
                "test_time_views": [list(view) for view in self.test_time_views],
                "operating_point": self.operating_point}


def recipe_of(model: str | Path) -> Recipe:
    """The recipe of a registered name; an empty one for a saved model folder (ModelError for a path that is
    not one)."""
    if is_model_dir(model):
        return Recipe()
    if isinstance(model, Path) or "/" in str(model) or Path(str(model)).exists():
        raise ModelError(f"{model}: not a model folder (no config.json) and not a registered model name "
                         f"({', '.join(list_models())})")
    if str(model) not in list_models():
        raise ModelError(f"unknown model {model!r}; registered: {', '.join(list_models())}")
    return get_recipe(str(model))


def caption_set(name: str) -> Path:
    """The path of a caption set shipped with medvl (``medvl/models/configs/captions/NAME.yaml``)."""
    path = Path(str(resources.files("medvl.models").joinpath("configs", "captions", f"{name}.yaml")))
    if not path.is_file():
        raise ModelError(f"unknown caption set {name!r} (no {path.name} among medvl's caption sets)")
    return path


def resolve_recipe(model: str | Path, *, model_overrides: dict[str, Any] | None = None,
                   captions: CaptionSource = None, ensemble: int | None = None,
                   test_time_views: list[list[float]] | None = None, operating_point: str | None = None,
                   **train_options: Any) -> RecipeSettings:
    """The settings of a run of ``model``: its recipe, then every option that is not None.

    ``train_options`` are ``TrainConfig`` fields (unknown names and wrong types are an ``InputError``);
    ``model_overrides`` merge over the recipe's (``--set``); ``captions`` replaces the recipe's set;
    ``ensemble``, ``test_time_views`` and ``operating_point`` replace the recipe's benchmark settings.
    """
    recipe = recipe_of(model)
    if is_model_dir(model):  # refused before any data is read
        check_no_overrides(model, model_overrides or {})
    given = {key: value for key, value in train_options.items() if value is not None}
    if "recipe" in given:  # it records where the defaults came from: set here, from the model, so a value given
        # would be dropped without a word
        raise InputError(f"recipe={given['recipe']!r}: the recipe is the model's, not a training option "
                         "(--model NAME trains NAME's recipe; `medvl models --recipe NAME` prints it)")
    given.update(_loss_override(model_overrides or {}, given, recipe))
    _check_recipe_lock(model, recipe, model_overrides or {})
    config = build_dataclass(TrainConfig, {**recipe.train, **given}, "train")
    config.recipe = str(model) if recipe != Recipe() else None
    config.validate_numbers()
    if captions is None and recipe.captions:
        captions = caption_set(recipe.captions)
    settings = RecipeSettings(
        model=str(model), train=config, model_overrides={**recipe.model, **(model_overrides or {})},
        captions=captions, ensemble=recipe.ensemble if ensemble is None else ensemble,
        test_time_views=[list(map(float, view)) for view in
                         (recipe.test_time_views if test_time_views is None else test_time_views)],
        operating_point=operating_point or recipe.operating_point, covariates_given="covariates" in given)
    check_benchmark_settings(settings)
    if not is_model_dir(model):  # a bad --set value (a wrong type, null, a size past its limit): before any data
        check_overrides(str(model), settings.model_overrides)
    return settings


def _loss_override(model_overrides: dict[str, Any], given: dict[str, Any], recipe: Recipe) -> dict[str, Any]:
    """The loss a model override (``--set loss=...``) asks for, as the training option it is: the training option
    replaces the model config's loss, so a recipe's ``loss`` would silently undo the override, and a ``--loss``
    with another value is given twice (an InputError)."""
    if "loss" not in model_overrides:
        return {}
    wanted = model_overrides["loss"]
    if given.get("loss") is not None and given["loss"] != wanted:
        raise InputError(f"loss is given twice: --loss {given['loss']!r} and --set loss={wanted!r}; give one of them")
    return {"loss": wanted} if recipe.train.get("loss") not in (None, wanted) else {}


def _check_recipe_lock(model: str | Path, recipe: Recipe, model_overrides: dict[str, Any]) -> None:
    """A recipe's locked text tower (``text.freeze``, medpix-small's LiT: set for its pretrained encoder) that the
    options replace with a random-init BERT (``--text-encoder bert``) would never train: its text features stay
    random. An InputError, unless the options lock it themselves (``--set text.freeze=true``: on purpose)."""
    nested = model_overrides.get("text")
    text: dict[str, Any] = nested if isinstance(nested, dict) else {}  # {"text": {...}} from the Python API
    kind = model_overrides.get("text.kind", text.get("kind"))
    freeze_given = "text.freeze" in model_overrides or "freeze" in text
    if kind == "bert" and recipe.model.get("text.freeze") and not freeze_given:
        raise InputError(f"{model}'s recipe locks its text tower (text.freeze=true, for its pretrained encoder), and "
                         "text.kind=bert (--text-encoder bert) makes it a random-init BERT that would never train: "
                         "add --set text.freeze=false to train it, or give a pretrained --text-encoder")


NAMED_FLAGS = {"label_columns": "--label-column"}  # a TrainConfig field whose option is not --<field>


def merge_train_options(named: dict[str, Any], given: dict[str, Any], fixed: Sequence[str] = ()) -> dict[str, Any]:
    """``TrainConfig`` options from a command's named options (None = not given) and from ``given``
    (``--train-set key=value``); a field set both ways with two values, or a ``fixed`` field the command
    sets itself, is an InputError."""
    merged = dict(given)
    for key in fixed:
        if key in given:
            raise InputError(f"--train-set {key}=...: this command sets {key} itself")
    for key, value in named.items():
        if value is None:
            continue
        if key in given and given[key] != value:
            flag = NAMED_FLAGS.get(key, f"--{key.replace('_', '-')}")
            raise InputError(f"{key} is given twice: {flag} {value!r} and --train-set {key}={given[key]!r}")
        merged[key] = value
    return merged


def check_benchmark_settings(settings: RecipeSettings) -> None:
    """An ensemble of at least one member, [shift_x, shift_y, scale] views with shifts under half the
    side and a scale in (0.5, 2), a known operating point."""
    check_number("ensemble", settings.ensemble, minimum=1, maximum=20, integer=True)
    for view in settings.test_time_views:
        if len(view) != 3 or max(abs(view[0]), abs(view[1])) >= 0.5 or not 0.5 < view[2] < 2:
            raise InputError(f"a test-time view is [shift_x, shift_y, scale] with shifts in (-0.5, 0.5) of the "
                             f"image side and scale in (0.5, 2), got {view}")
    if settings.operating_point not in OPERATING_POINTS:
        raise InputError(f"operating point must be one of {', '.join(OPERATING_POINTS)}, "
                         f"got {settings.operating_point!r}")


def label_columns_for(dataset: Dataset, settings: RecipeSettings) -> list[str]:
    """The label columns of the run: the settings' (option or recipe), else the dataset's defaults."""
    columns = list(settings.train.label_columns or dataset.default_labels)
    missing = [c for c in columns if c not in dataset.label_names]
    if missing:
        origin = f"the {settings.train.recipe} recipe trains" if settings.train.recipe else "training was asked"
        raise InputError(f"{dataset.source}: {origin} with label columns {columns}, but {missing} are not "
                         f"label columns here (available: {', '.join(dataset.label_names) or 'none'}); "
                         "pass --label-column")
    return columns


def train_recipe(settings: RecipeSettings, dataset: Dataset, out: str | Path, *, resume: bool = False,
                 show_progress: bool = True,
                 on_epoch_end: Callable[[DualEncoder, int], dict[str, float]] | None = None,
                 data_parallel: bool = False) -> DualEncoder:
    """Train with resolved settings: label columns, seeded init, heads, captions, ``train``. ``data_parallel``: the
    caller keeps what follows training to rank 0 under torchrun (``medvl train``); without it such a run is refused
    (``loop.fit``), as a benchmark that trains and then scores would score and write on every rank.

    The records and settings go through ``loop.prepare_run``, as for ``medvl.train`` (records the model cannot
    take, those ``leave_out_images_of`` / ``skip_flagged`` leave out, with a supervised head those missing one of
    the label columns; the recipe's covariates the data lacks, or that are a label column, left out with a
    warning). The heads are added right after (``loop.add_heads``, as ``medvl.train`` adds them) to the model built
    from the seed, so the run is the same whether a benchmark, ``medvl train`` or ``medvl.train`` starts it.
    """
    config = dataclasses.replace(settings.train, label_columns=label_columns_for(dataset, settings))
    seed_everything(config.seed)  # the random init of the model is part of the run (and a saved model's new heads)
    model = resolve_model(settings.model, seed=config.seed, **settings.model_overrides)
    prepared = prepare_run(model, dataset, config, settings.captions, show_progress=show_progress,
                           recipe_covariates=not settings.covariates_given)
    add_heads(model, prepared.dataset, prepared.config)
    return train_prepared(model, prepared, out, resume=resume, show_progress=show_progress, on_epoch_end=on_epoch_end,
                          data_parallel=data_parallel)


def covariates_for(dataset: Dataset, settings: RecipeSettings, labels: Sequence[str] = ()) -> list[str]:
    """The covariate columns of a run on ``dataset`` whose label columns are ``labels`` (``loop.run_covariates``):
    columns given as an option must have a value in some record; the recipe's own columns that no record has, or
    that are one of ``labels``, are left out with a warning. Either way the kept columns are checked before any
    training."""
    recipe = None if settings.covariates_given else (settings.train.recipe or "model")
    return run_covariates(dataset, settings.train.covariates, labels, recipe=recipe)


def recipe_report(name: str) -> dict[str, Any]:
    """What ``medvl models --recipe NAME`` prints: where the recipe comes from and every resolved
    setting of ``medvl train --model NAME`` with no other option."""
    settings = resolve_recipe(name)
    recipe = recipe_of(name)
    return {"model": name, "about": recipe.about or "no recipe: TrainConfig's defaults",
            "train": dataclasses.asdict(settings.train), "model_overrides": settings.model_overrides,
            "captions": recipe.captions or _caption_fallbacks(name),
            "benchmark": {"ensemble": settings.ensemble, "test_time_views": settings.test_time_views,
                          "operating_point": settings.operating_point}}


def _caption_fallbacks(model: str) -> str:
    """``captions_for``'s order for a run of ``model`` without a caption set, the data not known yet: the
    dataset's own, else (a saved model folder trained with captions) the model's, else generic templates."""
    trained_with = is_model_dir(model) and saved_captions(model) is not None
    return ", else ".join(CAPTION_SOURCES[source] for source in caption_sources(None, None, trained_with))
