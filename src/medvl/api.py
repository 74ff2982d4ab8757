"""Path-level entry points: what a CLI command or an HTTP route does, as one library call.

Each function takes paths and plain values, applies medvl's one policy for defaults (which split,
which label column, which captions, which output-folder rules) and calls the library. The CLI
(``medvl.cli``) and the service parse arguments and call exactly one of these; nothing here prints.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .checks import check_number
from .data import CaptionConfig, Dataset, captions_for, load_dataset
from .data.loaders import check_label_columns
from .data.record import ALL_SPLITS
from .errors import InputError
from .eval.contamination import copies_in_fit, scored_records, trained_on_scored
from .models.dual import DualEncoder

PathLike = str | Path


def load_split(path: PathLike, split: str | None = None, label_columns: Sequence[str] | None = None,
               allow_outside_root: bool = False, model: PathLike | None = None,
               split_option: str = "--split") -> Dataset:
    """The records of one split of the dataset at ``path``; ``split=None`` means ``train`` when the
    dataset has one, every record (``all``) when it has no split column; a dataset whose splits include no
    ``train`` (``Train`` / ``Val`` / ``Test``, say) is an InputError naming ``split_option``: every record would
    include its test split.
    ``label_columns``: the records of the split with a value in each (``labelled_split``; those without are counted
    in the log, of that split only); the split is chosen among every record's splits, labelled or not.
    ``model`` (a saved model folder): only the records it can take (``Dataset.for_spatial_dims``: a DICOM
    folder's 2D images for a 2D model, its 3D series for a 3D one; the others left out with a warning), and an
    InputError naming the dataset when its records have no image (``Dataset.require_images``)."""
    columns = check_label_columns(label_columns)
    dataset = load_dataset(path, allow_outside_root=allow_outside_root)
    for column in columns:  # an unknown column fails before the split is looked at
        dataset.require_label(column)
    if split is None:
        if "train" not in dataset.splits and dataset.splits not in ([], ["all"]):
            raise InputError(f"{dataset.source}: no split 'train' (splits: {', '.join(dataset.splits)}); pass "
                             f"{split_option} NAME (or {split_option} all to use every record, held-out splits "
                             "included)")
        split = "train" if "train" in dataset.splits else "all"
    selected = labelled_split(dataset.select(split), split, columns) if columns else dataset.select(split)
    if model is None:
        return selected
    selected.require_images()  # a text-only dataset, named by its file, before the model is read
    if not selected.kinds():  # no kind to choose by: the model is read only when one is needed
        return selected
    from .models.registry import model_spatial_dims

    return selected.for_spatial_dims(model_spatial_dims(model))


def labelled_split(selected: Dataset, split: str, label_columns: list[str]) -> Dataset:
    """The records of one split (``selected``) with a value in each of ``label_columns`` (``Dataset.with_labels``);
    InputError naming the split and the columns when the split has records but none has one (a held-out split not
    yet annotated), rather than an empty dataset."""
    labelled = selected.with_labels(label_columns)
    if len(labelled) == 0 and len(selected) > 0:
        where = f"split {split!r} has" if split != ALL_SPLITS else "it has"
        named = (f"label column {label_columns[0]!r}" if len(label_columns) == 1 else
                 f"each of the label columns {', '.join(map(repr, label_columns))}")
        raise InputError(f"{selected.source}: {where} {len(selected)} records, none with a value in {named}")
    return labelled


def audit_from_path(data: PathLike, split: str = "all", label: str | None = None, workers: int | None = None,
                    allow_outside_root: bool = False, show_progress: bool = True, against: PathLike | None = None,
                    against_split: str = "all", near_distance: int = 0) -> dict[str, Any]:
    """``medvl.data.audit.audit_dataset`` of one split (default: every record, so that duplicates
    across splits show as leaks) of the dataset at ``data``; ``label``: counts per class; ``against``: the
    images of that dataset's ``against_split`` that copy this one's (``against`` in the result; its missing image
    files are an error);
    ``near_distance``: difference-hash bits (0-16) near duplicates may differ by."""
    from .data.audit import audit_dataset

    check_number("near_distance", near_distance, minimum=0, maximum=16, integer=True)
    if against is None and against_split != ALL_SPLITS:
        raise InputError(f"against_split {against_split!r} is a split of the dataset to compare with, and none is "
                         "given", parameter="against_split")
    # a manifest row whose image file is missing is listed as unreadable, as a damaged file is, not a refusal
    dataset = load_dataset(data, allow_outside_root=allow_outside_root, keep_missing_images=True).select(split)
    other = load_split(against, against_split, allow_outside_root=allow_outside_root) if against is not None else None
    result = audit_dataset(dataset, label=label, workers=workers, show_progress=show_progress, against=other,
                           near_distance=near_distance)
    if "against" in result:
        result["against"].update(data=str(against), split=against_split)
    return result


def pick_label(dataset: Dataset, labels: Sequence[str] | None, task: str, option: str = "--label-column") -> str:
    """The one label column a task needs: the one given, else the dataset's default. A dataset with several
    default label columns (a multi-label ``.npz``, a DICOM folder's ``labels.csv``) is an InputError naming
    them: scoring the first one alone would leave the others out without a word. ``option``: the one that
    names the column, in the messages."""
    chosen = list(labels or dataset.default_labels)
    if not chosen:
        raise InputError(f"{dataset.source}: {task} needs a label column ({option}); "
                         f"available: {', '.join(dataset.label_names) or 'none'}")
    if len(chosen) > 1 and labels:
        raise InputError(f"{task} takes one label column, got {', '.join(labels)}")
    if len(chosen) > 1:
        raise InputError(f"{dataset.source}: the dataset has {len(chosen)} default label columns "
                         f"({', '.join(chosen)}) and {task} takes one: pass {option}")
    dataset.require_label(chosen[0])
    return chosen[0]


def fit_bottleneck_from_path(model: DualEncoder, data: PathLike, concepts: str, label: str | None = None,
                             split: str | None = None, captions: CaptionConfig | None = None,
                             allow_outside_root: bool = False):
    """The concept bottleneck of ``model`` fitted on one split of the dataset at ``data`` (``load_split``: its
    train split by default, every record when it has no split column, refused when its splits include no
    ``train``) and one label column (``pick_label``: the one given, else the dataset's default; an identifier
    column is refused by ``fit_bottleneck``); ``concepts``: a shipped bank's name or a file of phrases."""
    from .explain.concepts import fit_bottleneck, load_concepts

    bank = load_concepts(concepts)
    dataset = load_split(data, split, allow_outside_root=allow_outside_root, split_option="--concept-split")
    column = pick_label(dataset, [label] if label else None, "the concept bottleneck", option="--concept-label")
    return fit_bottleneck(model, dataset, column, bank, captions)


NON_FINITE = ("nan", "inf", "infinity")  # a --set / --train-set value spelt so is a number, not a string


def parse_key_values(pairs: Sequence[str], option: str) -> dict[str, Any]:
    """``key=value`` pairs of a repeatable option as a dict (values parsed as JSON, else kept as strings; ``nan``
    and ``inf`` in any case are numbers, as JSON's ``NaN`` and ``Infinity`` are, so the range check names them).
    A key given twice is an InputError (the later value would silently replace the earlier)."""
    values: dict[str, Any] = {}
    given: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise InputError(f"{option} expects key=value, got {pair!r}")
        if key in given:
            raise InputError(f"{option}: {key} is given twice ({given[key]} and {pair})")
        given[key] = pair
        try:
            values[key] = json.loads(value)
        except json.JSONDecodeError:
            values[key] = float(value) if value.strip().lower().lstrip("+-") in NON_FINITE else value
    return values


def parse_overrides(pairs: Sequence[str], text_encoder: str | None = None) -> dict[str, Any]:
    """``key=value`` model config overrides (``--set``), plus the text encoder choice: ``bert`` (random
    init) or a pretrained name / local folder."""
    overrides = parse_key_values(pairs, "--set")
    if text_encoder is not None and not text_encoder.strip():  # not "the recipe's encoder"
        raise InputError("--text-encoder: empty name (bert, a shipped encoder's name or a local folder; leave the "
                         "option out for the recipe's)")
    chosen: dict[str, Any] = {}
    if text_encoder == "bert":
        chosen = {"text.kind": "bert", "text.path": None}
    elif text_encoder:
        chosen = {"text.kind": "pretrained", "text.path": text_encoder}
    for key, value in chosen.items():  # the later value would silently replace the earlier
        if key in overrides and overrides[key] != value:
            raise InputError(f"{key} is given twice: --text-encoder {text_encoder!r} sets it to {value!r}, "
                             f"--set {key}={overrides[key]!r}; give one of them")
    return {**overrides, **chosen}


def train_options(named: dict[str, Any], pairs: Sequence[str]) -> dict[str, Any]:
    """A command's ``TrainConfig`` options: its named options (None = not given) and its ``--train-set
    key=value`` pairs, which reach every ``TrainConfig`` field (``medvl models --recipe NAME`` lists them;
    an unknown field or a wrong type is refused when the recipe resolves). A field given both ways with
    two values is an InputError."""
    from .train.recipes import merge_train_options

    return merge_train_options(named, parse_key_values(pairs, "--train-set"))


def train_from_path(data: PathLike, out: PathLike, model: str = "cxr-small", *,
                    split: str | None = None, label_columns: Sequence[str] | None = None,
                    captions: PathLike | CaptionConfig | None = None, overrides: dict[str, Any] | None = None,
                    resume: bool = False, allow_outside_root: bool = False, show_progress: bool = True,
                    data_parallel: bool = False, **train_options: Any) -> DualEncoder:
    """Train ``model`` (a registered name or a saved model folder) on the dataset at ``data`` and save
    it to ``out/model``, with the named config's recipe (``medvl.train.recipes``) as the defaults.

    ``train_options`` are ``TrainConfig`` fields; None (or absent) means the recipe's value.
    ``label_columns`` (also records without them are left out), ``captions`` and ``overrides`` (model
    config, merged over the recipe's) replace the recipe's. The resolved settings are saved in
    ``out/train_config.json``. Numbers and the output folder are checked before any data is read.
    ``data_parallel``: run under torchrun, the caller keeping what follows training to rank 0 (``medvl train``);
    without it a run there is refused (``medvl.train.loop.fit``)."""
    from .train.loop import check_out_dir
    from .train.recipes import resolve_recipe, train_recipe

    if isinstance(label_columns, str):  # --train-set label_columns="finding": one column, not its letters
        label_columns = [label_columns]
    settings = resolve_recipe(model, model_overrides=overrides, captions=captions,
                              label_columns=list(label_columns) if label_columns else None, **train_options)
    check_out_dir(Path(out), resume)
    dataset = load_split(data, split, label_columns, allow_outside_root)
    return train_recipe(settings, dataset, out, resume=resume, show_progress=show_progress,
                        data_parallel=data_parallel)


def evaluate_zero_shot(model: PathLike, data: PathLike, split: str = "test", label_columns: Sequence[str] | None = None,
                       captions: PathLike | None = None, allow_outside_root: bool = False,
                       show_progress: bool = True, calibration_split: str | None = None,
                       backend: str = "torch") -> dict:
    """``eval.zero_shot`` on a saved model (run on ``backend``, see ``load_model``) and a dataset path;
    the result names what was scored.

    ``calibration_split`` fits a softmax temperature on that split's zero-shot logits and adds a
    ``calibration`` block for ``split`` (ECE, Brier summed over the classes, NLL before/after, reliability,
    risk-coverage)."""
    from .data.audit import content_summary
    from .eval import zero_shot
    from .eval.ood import embed_checked
    from .eval.zero_shot import label_classes, zero_shot_calibration, zero_shot_classes
    from .models.registry import load_model

    if calibration_split is not None and calibration_split == split:
        raise InputError(f"--calibration-split {calibration_split!r} is the evaluated split: "
                         "fit the temperature on a different split than the one you report")
    whole = load_split(data, "all", allow_outside_root=allow_outside_root, model=model)
    dataset = whole.select(split)
    column = pick_label(dataset, label_columns, "zero-shot")
    # scored among the label's classes over every split (a class the split lacks is still a possible answer);
    # bad labels and splits are refused before any image is embedded
    classes = zero_shot_classes(dataset, column, label_classes(whole, column))
    fit_set, copies = None, None
    if calibration_split is not None:
        fit_set = whole.select(calibration_split)
        shared = dataset.shared_images(fit_set)
        if shared:  # e.g. 'all': the temperature would be fitted on the scored images too
            raise InputError(f"--calibration-split {calibration_split!r} holds {shared} images of the evaluated "
                             f"split {split!r}: fit the temperature on a different split than the one you report")
        zero_shot_classes(fit_set, column, classes)
        copies = copies_in_fit(fit_set, dataset, f"the calibration split {calibration_split!r}")
    net = load_model(model, backend=backend)
    content: list[dict[str, str]] = []
    embeddings, ood_block = embed_checked(net, dataset, show_progress, content)  # + what the guard and checks flag
    result = zero_shot(net, dataset, column, captions=captions_for(dataset, captions, net), classes=classes,
                       show_progress=show_progress, image_embeddings=embeddings,
                       keep_logits=calibration_split is not None)
    if fit_set is not None:
        block = zero_shot_calibration(net, fit_set, column, captions_for(fit_set, captions, net), result["classes"],
                                      np.array(result.pop("logits")), np.array(result.pop("y_true")), show_progress,
                                      fit_name=f"the calibration split {calibration_split!r}")
        result["calibration"] = {"split": calibration_split, **block,
                                 **({"copies_in_fit": copies} if copies is not None else {})}
    if ood_block is not None:
        result["ood"] = ood_block
    # the scored images only: a record without the label was embedded with the split but is not scored
    scored = [flags for flags, record in zip(content, dataset, strict=True) if column in record.labels]
    empty = content_summary(scored, "scored images")
    if empty is not None:
        result["input_content"] = empty
    seen = trained_on_scored(net, scored_records(dataset, "zero-shot", column))
    if seen is not None:
        result["trained_on_scored"] = seen
    return {**result, "label": column, "model": str(model), "backend": net.meta.get("backend", "torch"),
            "data": str(data), "split": split}


def _refuse_without(needed: str, given: dict[str, object]) -> None:
    """InputError for the first option of ``given`` (name -> value, None = not given) that has a value: it acts only
    with ``needed``, which is absent, so it would be ignored."""
    for option, value in given.items():
        if value is not None:
            raise InputError(f"{option} needs {needed}")


def fit_ood_from_path(model: PathLike, data: PathLike, split: str = "train", calibration_split: str = "val",
                      quantile: float = 0.99, check_data: PathLike | None = None, check_split: str | None = None,
                      allow_outside_root: bool = False, show_progress: bool = True, overwrite: bool = False) -> dict:
    """Fit the OOD guard of the saved model at ``model`` on ``split``, its threshold the ``quantile`` of
    ``calibration_split``'s scores, and save it into the model folder (``ood.safetensors``; a guard
    already there is replaced only with ``overwrite``); with ``check_data``, also how much of its
    ``check_split`` (None = 'all', every record: another distribution, or a test split; given without
    ``check_data`` an InputError, as it would be ignored) is flagged. Checked records
    that are images the guard is fitted or calibrated on are refused; byte-for-byte copies of them are counted
    (``check.copies_in_fit``)."""
    from .eval.ood import check_quantile, fit_ood, ood_summary
    from .models.ood import OOD_FILE
    from .models.registry import load_model, model_directory

    if check_data is None:
        _refuse_without("--check-data (the dataset it is a split of)", {"--check-split": check_split})
    check_split = "all" if check_split is None else check_split
    if calibration_split == split:
        raise InputError(f"--calibration-split {calibration_split!r} is the fitted split: calibrate the "
                         "threshold on images the guard was not fitted on")
    check_quantile(quantile)
    if (model_directory(model) / OOD_FILE).exists() and not overwrite:
        raise InputError(f"{model_directory(model) / OOD_FILE}: the model has an OOD guard already "
                         "(--overwrite replaces it)")
    net = load_model(model, load_guard=False)  # the guard is replaced: one that cannot be read must not stop that
    if not isinstance(net, DualEncoder):
        raise InputError(f"{model}: an OOD guard is saved into medvl models only, not a {type(net).__name__}")
    fit_set = load_split(data, split, allow_outside_root=allow_outside_root, model=model)
    calibration_set = load_split(data, calibration_split, allow_outside_root=allow_outside_root, model=model)
    shared = fit_set.shared_images(calibration_set)
    if shared:  # e.g. 'all': images the guard was fitted on would set its threshold
        raise InputError(f"--calibration-split {calibration_split!r} holds {shared} images of the fitted split "
                         f"{split!r}: calibrate the threshold on images the guard was not fitted on")
    copies = copies_in_fit(fit_set, calibration_set, f"the fitted split {split!r}", "calibration images")
    # read before anything is fitted or saved: a bad --check-data must not leave a guard in the model
    checked, check_copies = None, None
    if check_data is not None:
        checked = load_split(check_data, check_split, allow_outside_root=allow_outside_root, model=model)
        fitted = fit_set.subset(fit_set.records + calibration_set.records)
        fitted_name = f"the images the guard is fitted or calibrated on (splits {split!r}, {calibration_split!r})"
        shared = fitted.shared_images(checked)
        if shared:  # e.g. the training data with the default 'all': the fitted images would pass as a check
            raise InputError(f"--check-data {check_data} --check-split {check_split}: {shared} of its {len(checked)} "
                             f"records are {fitted_name}; check other images (another dataset, or --check-split "
                             "test)")
        check_copies = copies_in_fit(fitted, checked, fitted_name, "checked images")
    net.ood = fit_ood(net, fit_set, calibration_set, quantile=quantile, show_progress=show_progress)
    result: dict[str, Any] = {"model": str(model), "data": str(data), "split": split,
                              "calibration_split": calibration_split, "threshold": round(net.ood.threshold, 4),
                              **net.ood.info, **({"copies_in_fit": copies} if copies is not None else {})}
    if checked is not None:
        result["check"] = {"data": str(check_data), "split": check_split,
                           **ood_summary(net, checked, show_progress=show_progress),
                           **({"copies_in_fit": check_copies} if check_copies is not None else {})}
    # last, so a failure above leaves the model as it was; only the guard file is written (atomically): the
    # weights did not change, and the folder's other files (an ONNX export, a model card) stay as they are
    net.ood.save(model_directory(model))
    return result


def evaluate_retrieval(model: PathLike | Sequence[PathLike], data: PathLike, split: str = "test",
                       allow_outside_root: bool = False, show_progress: bool = True, backend: str = "torch",
                       bridge_data: PathLike | None = None, bridge_split: str | None = None,
                       bridge_k: int | None = None, bridge_weight: float | None = None) -> dict:
    """``eval.retrieval`` (image->text and text->image recall) on a saved model (run on ``backend``) and
    a dataset path. ``bridge_data`` (its ``bridge_split``, None = 'train') is the bank of a ``CaptionBridge`` for
    image->text (``bridge_k`` None = 10, ``bridge_weight`` None = 1.0): other images than the scored ones, e.g.
    the training split; a bridge setting without ``bridge_data`` is an InputError (it would be ignored). A list of
    several model folders is scored as an ensemble (``eval.retrieval``: standardised scores averaged), each member
    with its own bridge; ``model`` in the result is then the list."""
    from .data.audit import content_summary
    from .eval import retrieval
    from .eval.retrieval import CaptionBridge
    from .models.registry import check_distinct_models, load_model

    if bridge_data is None:
        _refuse_without("--bridge-data (the bank whose captions vote)",
                        {"--bridge-split": bridge_split, "--bridge-k": bridge_k, "--bridge-weight": bridge_weight})
    bridge_split = "train" if bridge_split is None else bridge_split
    bridge_k = 10 if bridge_k is None else bridge_k
    bridge_weight = 1.0 if bridge_weight is None else bridge_weight
    paths = [model] if isinstance(model, (str, Path)) else list(model)
    check_distinct_models(paths, "an ensemble's members must differ")
    if bridge_data is not None and Path(bridge_data).resolve() == Path(data).resolve() and bridge_split == split:
        raise InputError(f"--bridge-data {bridge_data} --bridge-split {bridge_split} is the scored split: the "
                         "bridge's bank must hold other images (e.g. the training split)")
    dataset = load_split(data, split, allow_outside_root=allow_outside_root, model=paths[0])
    bank, copies = None, None
    if bridge_data is not None:
        bank = load_split(bridge_data, bridge_split, allow_outside_root=allow_outside_root, model=paths[0])
        shared = dataset.shared_images(bank)
        if shared:  # e.g. --bridge-split all: the scored images would vote for their own captions
            raise InputError(f"--bridge-data {bridge_data} --bridge-split {bridge_split}: {shared} of its records "
                             f"are images of the scored split {split!r}; the bridge's bank must hold other images "
                             "(e.g. the training split)")
        copies = copies_in_fit(bank, dataset, f"the bridge's bank (--bridge-split {bridge_split!r})")
    members = [load_model(p, backend=backend) for p in paths]
    bridges = None
    if bank is not None:
        bridges = [CaptionBridge.from_dataset(member, bank, bridge_k, bridge_weight, show_progress=show_progress)
                   for member in members]
    content: list[dict[str, str]] = []
    result = retrieval(members, dataset, show_progress=show_progress, bridge=bridges, content=content)
    empty = content_summary(content, "scored images")
    if empty is not None:
        result["input_content"] = empty
    scored = scored_records(dataset, "retrieval")
    seen = [block for member in members if (block := trained_on_scored(member, scored)) is not None]
    if seen:
        result["trained_on_scored"] = max(seen, key=lambda block: block["records"])
    if copies is not None:
        result["copies_in_fit"] = copies
    return {**result, "model": [str(p) for p in paths] if len(paths) > 1 else str(paths[0]),
            "backend": members[0].meta.get("backend", "torch"), "data": str(data),
            "split": split,
            **({"bridge_data": str(bridge_data), "bridge_split": bridge_split} if bridges is not None else {})}


def evaluate_linear_probe(model: PathLike, train_data: PathLike, test_data: PathLike, train_split: str = "train",
                          test_split: str = "test", label_columns: Sequence[str] | None = None,
                          few_shot: Sequence[int] = (1, 4, 16),
                          allow_outside_root: bool = False, show_progress: bool = True,
                          covariates: Sequence[str] | None = None) -> dict:
    """``eval.linear_probe`` fitted on one dataset path and scored on another; ``covariates`` (metadata columns
    fused with the probe) None = the ones the model was trained to use (its recipe's, saved in its meta). The
    result names what was fitted and scored (``model``, ``train_data``, ``train_split``, ``test_data``,
    ``test_split``, as given)."""
    from .eval import linear_probe
    from .models.registry import load_model

    for k in few_shot:
        check_number("few-shot k", k, minimum=1, integer=True)
    train_set = load_split(train_data, train_split, allow_outside_root=allow_outside_root, model=model)
    test_set = load_split(test_data, test_split, allow_outside_root=allow_outside_root, model=model)
    shared = train_set.shared_images(test_set)
    if shared:  # e.g. --train-split all over the test split: the probe would be scored on images it was fitted on
        raise InputError(f"--train-data {train_data} --train-split {train_split} holds {shared} of the {len(test_set)} "
                         f"scored images (--test-split {test_split}); fit the probe on other images than it is "
                         "scored on")
    copies = copies_in_fit(train_set, test_set, f"the probe's training split {train_split!r}")
    column = pick_label(train_set, label_columns, "linear-probe")
    loaded = load_model(model)
    if covariates is None:  # the model's own: those the training data has no value of are left out, with a warning
        from .eval.covariates import model_covariates

        covariates = model_covariates(loaded, train_set.records, str(train_set.source))
    result = linear_probe(loaded, train_set, test_set, column, few_shot=list(few_shot),
                          show_progress=show_progress, covariates=list(covariates))
    scored = scored_records(test_set, "linear-probe", column)
    seen = trained_on_scored(loaded, scored, "scored (test) records")
    if seen is not None:  # the probe's features come from a model that learned these images
        result["trained_on_scored"] = seen
    if copies is not None:
        result["copies_in_fit"] = copies
    return {**result, "label": column, "model": str(model), "train_data": str(train_data),
            "train_split": train_split, "test_data": str(test_data), "test_split": test_split}


def evaluate_vqa_from_path(model: PathLike, data: PathLike, split: str | None = None,
                           allow_outside_root: bool = False, show_progress: bool = True) -> dict[str, Any]:
    """``eval.vqa.evaluate_vqa`` of a saved VQA model (or a local transformers VLM folder) on the questions at
    ``data``: ``split`` (None: ``test`` when the data has it, else every question; ``heldout``: the questions
    the model held out); the result names the model and data as given, as every evaluator's does."""
    from .data.loaders.vqa import load_vqa
    from .eval.vqa import evaluate_vqa
    from .models.vqa import load_vqa_model, scored_split, select_questions

    net = load_vqa_model(model)
    questions = load_vqa(data, allow_outside_root=allow_outside_root)
    items = select_questions(questions, split, str(data), "test", holdout=net.meta.get("holdout"))
    result = evaluate_vqa(net, items, str(data), show_progress=show_progress, pool=questions)
    return {**result, "model": str(model), "data": str(data), "split": scored_split(questions, split, "test")}


def answer_pixels(model, images: Sequence[np.ndarray], question: str) -> dict[str, Any]:
    """``eval.vqa.answer_with_rationale`` for decoded images (uploads held in memory, earlier film
    first): ``model`` (the model's name, as ``answer_with_rationale`` gives it), the answer, its probability,
    the top alternative, the answer type and, from a medvl VQA model, one attention heatmap per image (``grid``
    weights on the image encoder's token grid ``shape``, and its ``peak``), ``input_flags`` (per image: blank
    or streaked as the model sees it) and ``unknown_words``; a transformers VLM gives no heatmaps."""
    import torch

    from .data.audit import input_flags
    from .eval.vqa import _answer_batch, _peak, check_question, unknown_words
    from .models.vlm import VisionLanguageModel

    question = check_question(question, model=model)
    if isinstance(model, VisionLanguageModel):
        return {"model": model.name, **model.answer(list(images), question), "heatmaps": []}
    limit = model.config.max_images
    if not images or len(images) > limit:
        raise InputError(f"{len(images)} images given; the model takes 1 to {limit} per question")
    model.eval()
    pixels = model.preprocessor.load_many(list(images))
    image_index = torch.tensor([list(range(len(images))) + [-1] * (limit - len(images))])
    with torch.no_grad():
        row = _answer_batch(model, pixels, image_index, [question])[0]
    grid = model.image_encoder.token_grid(torch.zeros(1, model.config.image.in_channels,
                                                      *model.config.image.volume_shape))
    per_image = row.pop("attention").view(limit, -1)[:len(images)]
    row["heatmaps"] = [{"grid": [round(v, 4) for v in weights.tolist()], "shape": list(grid),
                        "peak": _peak(weights, grid)} for weights in per_image]
    row["input_flags"] = [input_flags(image.numpy()) for image in pixels]
    row["unknown_words"] = unknown_words(model, question)
    return {"model": model.name, **row}
