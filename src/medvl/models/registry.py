"""One registry of named model configs (JSON files in ``configs/``) and the factories."""

from __future__ import annotations

import copy
import json
import random
from collections.abc import Sequence
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from ..checks import check_number
from ..errors import InputError, ModelError
from ..io import read_json
from .adapters import HFDualEncoder, transformers_model_type
from .backends import load_backend, resolve_backend
from .config import ModelConfig, Recipe, merge_overrides
from .dual import CONFIG_FILE, WEIGHTS_FILE, DualEncoder, refuse_a_file


@cache
def _registry() -> dict[str, dict[str, Any]]:
    """Name -> the architecture part of its JSON (``_doc`` and the ``recipe`` block set apart)."""
    configs = {}
    for entry in resources.files(__package__).joinpath("configs").iterdir():
        if entry.name.endswith(".json"):
            data = json.loads(entry.read_text())
            data.pop("_doc", None)
            data.pop("recipe", None)
            configs[entry.name[: -len(".json")]] = data
    return configs


@cache
def _recipes() -> dict[str, Recipe]:
    recipes = {}
    for name in _registry():
        entry = resources.files(__package__).joinpath("configs", f"{name}.json")
        recipes[name] = Recipe.from_dict(json.loads(entry.read_text()).get("recipe", {}))
    return recipes


def list_models() -> list[str]:
    """Names of the registered model configs."""
    return sorted(_registry())


def describe_model(name: str) -> str:
    entry = resources.files(__package__).joinpath("configs", f"{name}.json")
    return json.loads(entry.read_text()).get("_doc", "")


def model_summaries() -> list[dict[str, str]]:
    """One row per registered model: name, image input and text tower as its recipe trains them (the recipe's
    model overrides applied), embedding size, training recipe, description."""
    rows = []
    for name in list_models():
        config = get_config(name, **get_recipe(name).model)  # what medvl train --model NAME trains
        image = config.image
        shape = f"{image.image_size}px" if image.spatial_dims == 2 else "x".join(map(str, image.volume_shape))
        rows.append({"name": name, "image": f"{image.arch} {shape} x{image.in_channels}",
                     "text": config.text.path or f"bert {config.text.hidden_size}x{config.text.num_layers}",
                     "dim": str(config.embed_dim), "recipe": recipe_summary(name), "about": describe_model(name)})
    return rows


def get_recipe(name: str) -> Recipe:
    """The training recipe of a registered config (an empty ``Recipe`` when it has none)."""
    if name not in _registry():
        raise ModelError(f"unknown model {name!r}; registered: {', '.join(list_models())}")
    return copy.deepcopy(_recipes()[name])


def recipe_summary(name: str) -> str:
    """One line: the recipe's settings (``medvl models``); "defaults" for a config without one."""
    recipe = get_recipe(name)
    parts = [f"{key}={_short(value)}" for key, value in {**recipe.train, **recipe.model}.items()]
    if recipe.captions:
        parts.append(f"captions={recipe.captions}")
    return " ".join(parts) or "defaults"


def _short(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def get_config(name: str, **overrides: Any) -> ModelConfig:
    """The architecture of a registered config (its recipe's model overrides not applied), merged with
    ``overrides``."""
    if name not in _registry():
        raise ModelError(f"unknown model {name!r}; registered: {', '.join(list_models())}")
    config = ModelConfig.from_dict({**_registry()[name], "name": name})
    return config.merged(overrides) if overrides else config


def check_overrides(name: str, overrides: dict[str, Any]) -> None:
    """Refuse ``overrides`` of a registered config as ``create_model`` would (unknown keys, wrong types, null, values
    out of range), without building anything or warning of inert settings (``create_model`` does)."""
    ModelConfig.from_dict(merge_overrides(get_config(name).to_dict(), dict(overrides), ("image", "text")))


def create_model(name: str, *, seed: int | None = None, **overrides: Any) -> DualEncoder:
    """Build a registered model at random init (the text tower may load pretrained weights).

    Overrides merge into the config: ``create_model("cxr-small", embed_dim=64, loss="siglip",
    **{"image.image_size": 96})``. ``seed`` seeds torch's and Python's random generators first, as ``medvl train
    --seed`` does, so the init is reproducible (``train`` seeds only what it draws itself: data order, augmentation,
    heads); None draws the init from their current state.
    """
    config = get_config(name, **overrides)  # a bad name or override is refused before the generators are touched
    if seed is not None:
        seed_everything(seed)
    model = DualEncoder(config)
    model.origin = {"model": name, "init": "random", "seed": seed}
    return model


# the largest seed: the trainer derives seed * 1_000_003 + batch index (medvl.train.loop._Run._forward), which stays
# inside int64 (torch's seeds) for any batch index below 4e17; a larger seed passed every check, then crashed at the
# first step with an overflow
MAX_SEED = 2**43 - 1


def seed_everything(seed: int) -> None:
    """Seed torch and Python before building a model, so its random init is reproducible."""
    check_number("seed", seed, minimum=0, maximum=MAX_SEED, integer=True)
    random.seed(seed)
    torch.manual_seed(seed)


def load_model(directory: str | Path, backend: str = "torch", load_guard: bool = True) -> DualEncoder:
    """Load a model written by ``save_pretrained``, the final model of a ``train`` output dir, or a
    local transformers CLIP / SigLIP folder (``medvl.models.adapters``: inference only).

    ``backend`` other than ``torch`` (eager fp32) runs the towers another way, for inference:
    channels-last, bf16 autocast or an ONNX export; ``auto`` picks channels-last for a medvl model and
    eager torch for a transformers one (``medvl.models.backends``). ``load_guard=False`` leaves a medvl
    model's OOD guard unread (``DualEncoder.from_pretrained``)."""
    directory = model_directory(directory)
    backend = resolve_backend(directory, backend)
    if backend != "torch":
        return load_backend(directory, backend, load_guard=load_guard)
    if transformers_model_type(directory) is not None:
        return HFDualEncoder.from_pretrained(directory)
    return DualEncoder.from_pretrained(directory, load_guard=load_guard)


def model_directory(directory: str | Path) -> Path:
    """The folder holding the model files: ``directory``, or its ``model/`` (a ``train`` output folder). A file
    (its ``config.json``, say) is a ModelError saying so: "not a model folder (missing config.json)" would mislead."""
    directory = Path(directory)
    refuse_a_file(directory)
    if not (directory / CONFIG_FILE).is_file() and (directory / "model" / CONFIG_FILE).is_file():
        return directory / "model"
    return directory


def check_distinct_models(paths: Sequence[str | Path], why: str, copies: bool = True) -> None:
    """InputError when two of ``paths`` are one model: the same folder however spelled (a training run folder and
    its ``model/``, a trailing slash, a link), or, with ``copies``, folders with the same ``config.json`` and
    ``model.safetensors`` bytes. ``why`` ends the message (an ensemble's members must differ; a suite scores each
    model once)."""
    from ..io import file_sha256

    seen: dict[object, str | Path] = {}
    for path in paths:
        folder = model_directory(path).resolve()
        if folder in seen:
            raise InputError(f"the same model folder is given twice ({seen[folder]} and {path}): {why}")
        seen[folder] = path
        files = [folder / CONFIG_FILE, folder / WEIGHTS_FILE]
        if copies and all(f.is_file() for f in files):
            content = tuple(file_sha256(f) for f in files)
            if content in seen:
                raise InputError(f"{seen[content]} and {path} hold the same model (identical {CONFIG_FILE} and "
                                 f"{WEIGHTS_FILE}): {why}")
            seen[content] = path


def is_model_dir(value: str | Path) -> bool:
    path = Path(value)
    return (path / CONFIG_FILE).is_file() or (path / "model" / CONFIG_FILE).is_file()


def model_spatial_dims(name_or_dir: str | Path, **overrides: Any) -> int:
    """2 for a model of images, 3 for one of volumes, from its config alone (nothing built or loaded): a
    saved model folder's ``config.json`` (a transformers folder's: 2), or a registered name's config merged
    with ``overrides``."""
    if is_model_dir(name_or_dir):
        path = model_directory(name_or_dir) / CONFIG_FILE
        try:
            raw = read_json(path)
        except (OSError, ValueError):
            raise ModelError(f"{path}: cannot read the model config (not JSON)") from None
        image = raw.get("image") if isinstance(raw, dict) else None
        dims = image.get("spatial_dims", 2) if isinstance(image, dict) else 2
        if dims not in (2, 3) or isinstance(dims, bool):
            raise ModelError(f"{path}: image.spatial_dims must be 2 or 3, got {dims!r}")
        return int(dims)
    if isinstance(name_or_dir, Path) or "/" in str(name_or_dir):
        raise ModelError(f"{name_or_dir}: not a medvl model directory (no {CONFIG_FILE})")
    return get_config(str(name_or_dir), **overrides).image.spatial_dims


def resolve_model(name_or_dir: str | Path, *, seed: int | None = None, **overrides: Any) -> DualEncoder:
    """A model to train: a saved model directory (overrides not allowed) or a registered name (its init seeded with
    ``seed``, see ``create_model``).

    A transformers CLIP / SigLIP folder is refused: adapters are inference-only for now (``load_model``
    opens one for eval, index, search, predict and report drafts).
    """
    if is_model_dir(name_or_dir):
        if transformers_model_type(name_or_dir) is not None:
            raise ModelError(f"{name_or_dir}: a transformers {transformers_model_type(name_or_dir)} folder is "
                             "inference-only in medvl for now (eval, index, search, predict, report draft); "
                             "it cannot be trained")
        check_no_overrides(name_or_dir, overrides)
        return load_model(name_or_dir)
    if isinstance(name_or_dir, Path) or "/" in str(name_or_dir):
        raise ModelError(f"{name_or_dir}: not a medvl model directory (no {CONFIG_FILE})")
    return create_model(str(name_or_dir), seed=seed, **overrides)


def load_init_model(directory: str | Path) -> DualEncoder:
    """The medvl dual encoder ``--init`` names (``train vqa``, ``train report``: its image tower, architecture and
    weights, is copied into a medvl model). A transformers folder (a CLIP / SigLIP adapter, a VLM) is refused as
    ``resolve_model`` refuses it for training: its towers are not medvl's and cannot be copied."""
    model_type = transformers_model_type(model_directory(directory))
    if model_type is not None:
        raise InputError(f"{directory}: --init takes a medvl dual encoder folder (this is a transformers "
                         f"{model_type} folder)")
    return load_model(directory)


TEXT_ENCODER_KEYS = ("text.kind", "text.path")  # the overrides --text-encoder gives (api.parse_overrides)


def check_no_overrides(directory: str | Path, overrides: dict[str, Any]) -> None:
    """ModelError when config ``overrides`` are given for a saved model folder: it keeps the config it was saved
    with. The message names what was given: the text encoder choice (``--text-encoder``) or the keys (``--set``)."""
    if not overrides:
        return
    if any(key in overrides for key in TEXT_ENCODER_KEYS):
        raise ModelError(f"{directory}: --text-encoder (text.kind, text.path) applies to registered names, not to a "
                         "saved model: it keeps its own text tower")
    raise ModelError(f"{directory}: config overrides ({', '.join(sorted(overrides))}; --set) apply to registered "
                     "names, not to a saved model: it keeps the config it was saved with")
