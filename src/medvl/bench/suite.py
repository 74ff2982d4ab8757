"""Benchmark suites: many evaluations of several models as one reproducible run (``medvl bench run``).

A suite is a YAML file (the shipped ones are in ``medvl/bench/suites``)::

    name: phantom                      # what the suite is called in results and the report (default: the file name)
    seed: 0                            # seeds every sampled thing: bootstrap, shuffles, few-shot draws
    bootstrap: 1000                    # resamples behind every 95% interval
    datasets:
      phantom:                         # a name tasks refer to
        path: null                     # a dataset path (relative to the suite file, $VARS expanded);
                                       # --data phantom=DIR overrides it
        generate: {n: 600, size: 128}  # phantom only: when path is empty, generate it into OUT/data/NAME
                                       # (a rerun reuses it only if every generate setting is the same)
        split: test                    # the split every task scores
        train_split: train             # linear probe / few-shot / case-retrieval index / report baseline
        calibration_split: val         # temperature, abstention threshold, nothing reported on it
        label: finding                 # the default label column of the classification tasks
        subgroups: [sex, age, view]    # metadata columns scored per group
        group_column: case_id          # the bootstrap's resampling unit: a label / meta column holding a case or
                                       # patient id (whole cases drawn; subgroup sizes count cases); default:
                                       # case_id when the loader gives every record one (MedPix), else the image;
                                       # `image` draws images; a vqa dataset draws the questions' images
        kind: images                   # images (any medvl dataset) | vqa (a VQA question file)
        captions: prompts.yaml         # zero-shot prompts (a caption file, relative to the suite file)
    tasks:
      - {task: zero-shot, dataset: phantom}
      - {task: linear-probe, dataset: phantom, train_dataset: other}  # train split of another dataset
      - {task: few-shot, dataset: phantom, shots: [1, 4, 16]}
      - {task: linear-probe, dataset: isic, covariates: none}  # image only (default: the model's covariates,
                                                                # e.g. [age_approx, sex]; medvl.eval.covariates)
      - {task: case-retrieval, dataset: ct, knowledge: findings/}  # finding files on top of the built-in base
    checks: [sanity, calibration, subgroups, corruption, counterfactual, shortcut, ood]
    corruption: {kinds: [noise, blur], severities: [1, 3, 5], max_images: 200}
    counterfactual: {n: 60}

Tasks: ``zero-shot``, ``linear-probe``, ``few-shot``, ``retrieval``, ``case-retrieval`` (dual
encoders), ``vqa`` (VQA models) and ``report`` (report generators). A task may carry its own
``checks:`` list and ``label:``. The ``report`` and ``case-retrieval`` tasks read findings in reports
with the knowledge base: the built-in chest X-ray findings, a task's ``knowledge:`` folder of finding files
on top (relative to the suite file), or that folder alone with ``builtin_knowledge: false``. The
suite's checks apply to the tasks they make sense for (``CHECKS``); a check a task's own list names
that the task cannot take is an InputError, and so is a check of the suite's list that runs on none of its tasks.
Split, label, subgroup column and dataset names are text (``split: 2020`` is the split "2020", ``subgroups: [2020]``
the column "2020").

``load_suite`` parses and checks the file: an unknown key, task or check, a task naming a dataset
the suite does not define, a dataset path that does not exist, a missing split or label column, a
``train_split`` missing for a task fitted on it (``TRAINING_TASKS``), a name that is not text or a number
(a list, a mapping, true / false; ``split: null``), and
(``check_models``) a model that cannot do one of the tasks are ``InputError``s raised before any
work starts; so is a task whose ``train_split`` holds images of the split it scores
(``runner.check_fits_apart``; so is a calibration split holding them, or a linear probe's calibration split
holding its training images), and a split the suite reads that
holds no record of a model's kind (each model is scored on the records it takes: a DICOM folder's 2D images
for a 2D model, its 3D series for a 3D one, ``PreparedDataset.for_spatial_dims``). The checks that transform or mask
2D images (``TWO_D_CHECKS``: corruption, shortcut) are skipped, with the reason, for a model of 3D volumes
when the suite's list names them, and refused before any work when a task's own list does.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..checks import check_number
from ..errors import DataError, InputError, ModelError, one_line
from ..io import read_json

SUITES_DIR = Path(__file__).with_name("suites")

# task -> the kind of model that can do it
TASKS: dict[str, str] = {"zero-shot": "dual", "linear-probe": "dual", "few-shot": "dual", "retrieval": "dual",
                         "case-retrieval": "dual", "vqa": "vqa", "report": "report"}
# check -> the tasks it applies to
CHECKS: dict[str, tuple[str, ...]] = {
    "sanity": ("zero-shot", "linear-probe", "retrieval", "case-retrieval", "vqa", "report"),
    "calibration": ("zero-shot", "linear-probe"),
    "subgroups": ("zero-shot", "linear-probe"),
    "corruption": ("zero-shot",),
    "counterfactual": ("zero-shot",),
    "shortcut": ("zero-shot",),
    "ood": ("zero-shot",),
}
# check -> why it cannot run on a model that takes 3D volumes (it transforms or masks 2D images): skipped, with this
# reason, when the suite's list names it; refused when a task's own list does
TWO_D_CHECKS: dict[str, str] = {
    "corruption": "corruption curves are defined for 2D images; this model takes 3D volumes",
    "shortcut": "masking a region is defined for 2D images; this model takes 3D volumes",
}
TRAINING_TASKS = ("linear-probe", "few-shot", "case-retrieval", "report")  # fitted on a dataset's train_split
DATASET_KINDS = ("images", "vqa")
KNOWLEDGE_TASKS = ("report", "case-retrieval")  # tasks whose figures read findings in reports with a knowledge base
MODEL_KINDS = {"dual": "a dual encoder (medvl train, or a transformers CLIP / SigLIP folder)",
               "vqa": "a VQA model (medvl train vqa)", "report": "a report generator (medvl train report)"}


@dataclass
class DatasetSpec:
    """One dataset of a suite; see the module docstring for each field."""

    name: str
    path: str | None = None
    generate: dict[str, Any] | None = None  # phantom generator arguments (n, seed, size, kind, vqa, shortcut, ...)
    split: str = "test"
    train_split: str | None = "train"
    calibration_split: str | None = "val"
    label: str | None = None
    subgroups: list[str] = field(default_factory=list)
    kind: str = "images"
    captions: str | None = None  # a caption YAML for zero-shot prompts (default: the dataset's or model's)
    # the bootstrap's resampling unit (``medvl.eval.bootstrap`` groups): a label or meta column naming each record's
    # case or patient; None: ``DEFAULT_GROUP_COLUMN`` when every record has one, else the image ("image")
    group_column: str | None = None


IMAGE_UNIT = "image"  # group_column value: each image (record) its own resampling unit
DEFAULT_GROUP_COLUMN = "case_id"  # a loader's case id (MedPix): the unit when a suite names none


@dataclass
class TaskSpec:
    """One task of a suite, scored for every model on one dataset."""

    task: str
    dataset: str
    label: str | None = None  # the label column (default: the dataset's ``label``)
    checks: list[str] | None = None  # None: the suite's checks
    shots: list[int] = field(default_factory=lambda: [1, 4, 16])  # few-shot: images per class
    repeats: int = 5  # few-shot draws per k
    k: int = 5  # case-retrieval: neighbours scored
    train_dataset: str | None = None  # where the train split comes from (default: the task's dataset)
    covariates: list[str] | str | None = None  # linear-probe: metadata columns fused (None: the model's; "none")
    knowledge: str | None = None  # report / case-retrieval: a folder of finding files read on top of the built-in base
    builtin_knowledge: bool = True  # False: the folder's findings alone

    @property
    def key(self) -> str:
        """``task@dataset[:label]``, and `` (fitted on NAME)`` when the training split is another dataset's."""
        fitted = self.train_dataset if self.train_dataset not in (None, self.dataset) else None
        return (f"{self.task}@{self.dataset}" + (f":{self.label}" if self.label else "")
                + (f" (fitted on {fitted})" if fitted else ""))


@dataclass
class SuiteSpec:
    """A parsed suite file."""

    name: str
    datasets: dict[str, DatasetSpec]
    tasks: list[TaskSpec]
    checks: list[str] = field(default_factory=list)
    seed: int = 0
    bootstrap: int = 1000
    corruption: dict[str, Any] = field(default_factory=dict)  # kinds, severities, max_images
    counterfactual: dict[str, Any] = field(default_factory=dict)  # n (phantom pairs), size
    source: str = ""  # the suite file

    def task_checks(self, task: TaskSpec) -> list[str]:
        """The checks that run on ``task``: its own list or the suite's, kept to those that apply."""
        chosen = self.checks if task.checks is None else task.checks
        return [check for check in chosen if task.task in CHECKS[check]]

    def model_checks(self, task: TaskSpec, spatial_dims: int) -> tuple[list[str], dict[str, str]]:
        """``task_checks`` for a model whose images have ``spatial_dims`` dimensions: the checks that run, and
        those skipped with the reason (``TWO_D_CHECKS`` for a 3D model)."""
        checks = self.task_checks(task)
        skipped = {check: TWO_D_CHECKS[check] for check in checks if spatial_dims == 3 and check in TWO_D_CHECKS}
        return [check for check in checks if check not in skipped], skipped

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def shipped_suites() -> list[str]:
    """Names of the suites shipped with medvl (``medvl bench run NAME`` takes one)."""
    return sorted(path.stem for path in SUITES_DIR.glob("*.yaml"))


def suite_path(name_or_path: str | Path) -> Path:
    """A suite file: the path given, else the shipped suite of that name."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    if path.suffix == "" and (SUITES_DIR / f"{path.name}.yaml").is_file():
        return SUITES_DIR / f"{path.name}.yaml"
    raise InputError(f"{name_or_path}: suite file not found (shipped suites: {', '.join(shipped_suites())})")


def load_suite(name_or_path: str | Path, data: dict[str, str] | None = None,
               splits: dict[str, str] | None = None) -> SuiteSpec:
    """Parse and check a suite file; ``data`` / ``splits`` override datasets' paths / scored splits by name."""
    import yaml

    path = suite_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: not valid UTF-8 (byte offset {err.start}); save it as UTF-8") from None
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = " ".join(str(err.problem or err.context or "syntax error").split())
        raise InputError(f"{path}: not valid YAML{where}: {problem}") from None
    except (OSError, yaml.YAMLError) as err:
        raise InputError(f"{path}: not a readable suite file ({one_line(err)})") from None
    if not isinstance(raw, dict):
        raise InputError(f"{path}: a suite file is a mapping with datasets and tasks")
    suite = _parse(raw, path)
    _apply_overrides(suite, data or {}, splits or {}, path)
    _check(suite)
    return suite


def _parse(raw: dict[str, Any], path: Path) -> SuiteSpec:
    _known_keys(raw, {"name", "seed", "bootstrap", "datasets", "tasks", "checks", "corruption", "counterfactual"},
                f"{path}")
    datasets_raw = raw.get("datasets")
    if not isinstance(datasets_raw, dict) or not datasets_raw:
        raise InputError(f"{path}: 'datasets' must map dataset names to their settings")
    datasets = {str(name): _dataset(str(name), spec or {}, path) for name, spec in datasets_raw.items()}
    tasks_raw = raw.get("tasks")
    if not isinstance(tasks_raw, list) or not tasks_raw:
        raise InputError(f"{path}: 'tasks' must be a non-empty list")
    tasks = [_task(spec, i, path) for i, spec in enumerate(tasks_raw)]
    checks = _checks(raw.get("checks") or [], f"{path}: checks")
    corruption, counterfactual = raw.get("corruption") or {}, raw.get("counterfactual") or {}
    _known_keys(corruption, {"kinds", "severities", "max_images"}, f"{path}: corruption")
    _known_keys(counterfactual, {"n", "size"}, f"{path}: counterfactual")
    name = _names(raw, ("name",), f"{path}").get("name")  # optional; a list or mapping is refused, not run
    return SuiteSpec(name=name or path.stem, datasets=datasets, tasks=tasks, checks=checks,
                     seed=raw.get("seed", 0), bootstrap=raw.get("bootstrap", 1000), corruption=dict(corruption),
                     counterfactual=dict(counterfactual), source=str(path))


def _known_keys(raw: Any, allowed: set[str], where: str) -> None:
    if not isinstance(raw, dict):
        raise InputError(f"{where}: expected a mapping, got {type(raw).__name__}")
    unknown = sorted(set(map(str, raw)) - allowed)
    if unknown:
        raise InputError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(allowed))})")


def _names(raw: dict[str, Any], keys: tuple[str, ...], where: str) -> dict[str, Any]:
    """``raw`` with the values of ``keys`` as text: YAML reads ``split: 2020`` as a number, which is a split name
    here; a list, a mapping or true / false is an InputError naming the key."""
    named = dict(raw)
    for key in keys:
        value = named.get(key)
        if isinstance(value, bool) or not isinstance(value, str | int | float | type(None)):
            raise InputError(f"{where}: {key} must be a name, got {value!r}")
        if isinstance(value, int | float):
            named[key] = str(value)
    return named


def _resolved(value: str, path: Path) -> str:
    """A file path of the suite: ``$VARS`` and ``~`` expanded, relative to the suite file's folder."""
    given = Path(os.path.expandvars(value)).expanduser()
    return str(given if given.is_absolute() else (path.parent / given))


def _dataset(name: str, raw: dict[str, Any], path: Path) -> DatasetSpec:
    allowed = {f.name for f in dataclasses.fields(DatasetSpec)} - {"name"}
    where = f"{path}: dataset {name!r}"
    _known_keys(raw, allowed, where)
    spec = DatasetSpec(name=name, **_names(raw, ("path", "split", "train_split", "calibration_split", "label",
                                                  "kind", "captions", "group_column"), where))
    if spec.kind == "vqa" and spec.group_column not in (None, IMAGE_UNIT):
        raise InputError(f"{where}: group_column of a vqa dataset must be {IMAGE_UNIT!r} (its questions are "
                         f"resampled by image), got {spec.group_column!r}")
    if spec.split is None:  # the split every task scores (train and calibration splits may be none)
        raise InputError(f"{where}: split must be a name, got None")
    if spec.kind not in DATASET_KINDS:
        raise InputError(f"{path}: dataset {name!r}: kind must be one of {', '.join(DATASET_KINDS)}, got {spec.kind!r}")
    if spec.path is not None:
        spec.path = _resolved(spec.path, path)
    if spec.captions is not None:  # like path: relative to the suite file, not to where the command runs
        spec.captions = _resolved(spec.captions, path)
    if spec.generate is not None:
        _known_keys(spec.generate, {"n", "seed", "size", "kind", "vqa", "extra_finding_prob", "shortcut"},
                    f"{path}: dataset {name!r}: generate")
    if not isinstance(spec.subgroups, list):
        raise InputError(f"{path}: dataset {name!r}: subgroups must be a list of column names")
    for column in spec.subgroups:  # as text, like the other names: YAML reads [2020] as a number
        if isinstance(column, bool) or not isinstance(column, str | int | float):
            raise InputError(f"{where}: subgroups must be a list of column names, got {column!r} in it")
    spec.subgroups = [str(column) for column in spec.subgroups]
    return spec


def _task(raw: Any, index: int, path: Path) -> TaskSpec:
    where = f"{path}: task {index + 1}"
    if not isinstance(raw, dict) or "task" not in raw or "dataset" not in raw:
        raise InputError(f"{where}: each task needs 'task' and 'dataset', got {raw!r}")
    allowed = {f.name for f in dataclasses.fields(TaskSpec)}
    _known_keys(raw, allowed, where)
    spec = TaskSpec(**_names(raw, ("task", "dataset", "label", "train_dataset", "knowledge"), where))
    if spec.task not in TASKS:
        raise InputError(f"{where}: unknown task {spec.task!r} (tasks: {', '.join(TASKS)})")
    reads_findings = spec.task in KNOWLEDGE_TASKS
    if not reads_findings and ("knowledge" in raw or "builtin_knowledge" in raw):
        raise InputError(f"{where}: knowledge and builtin_knowledge apply to {' and '.join(KNOWLEDGE_TASKS)} tasks "
                         f"(the ones that read findings in reports), not to {spec.task}")
    if not isinstance(spec.builtin_knowledge, bool):
        raise InputError(f"{where}: builtin_knowledge must be true or false, got {spec.builtin_knowledge!r}")
    if spec.knowledge is not None:  # like a dataset's path: relative to the suite file
        spec.knowledge = _resolved(spec.knowledge, path)
    if reads_findings and spec.knowledge is None and not spec.builtin_knowledge:
        raise InputError(f"{where}: builtin_knowledge: false needs a knowledge folder")
    if spec.checks is not None:
        spec.checks = _checks(spec.checks, f"{where}: checks")
    if not isinstance(spec.shots, list) or not spec.shots:
        raise InputError(f"{where}: shots must be a non-empty list of images per class")
    for shots in spec.shots:
        check_number(f"{where}: shots", shots, minimum=1, integer=True)
    check_number(f"{where}: repeats", spec.repeats, minimum=1, maximum=100, integer=True)
    check_number(f"{where}: k", spec.k, minimum=1, maximum=1000, integer=True)
    if spec.covariates is not None:
        from ..eval.covariates import parse_columns

        if not isinstance(spec.covariates, (str, list)) or not all(isinstance(c, str) for c in spec.covariates):
            raise InputError(f"{where}: covariates must be a list of column names or 'none', got {spec.covariates!r}")
        try:
            spec.covariates = parse_columns(spec.covariates)
        except InputError as error:
            raise InputError(f"{where}: {error}") from None
    return spec


def _checks(raw: Any, where: str) -> list[str]:
    if not isinstance(raw, list):
        raise InputError(f"{where}: expected a list of checks, got {raw!r}")
    for check in raw:  # a list or mapping in the list cannot be looked up (unhashable): say so, naming it
        if not isinstance(check, str):
            raise InputError(f"{where}: expected check names, got {check!r}")
    unknown = [str(check) for check in raw if check not in CHECKS]
    if unknown:
        raise InputError(f"{where}: unknown check(s) {', '.join(unknown)} (checks: {', '.join(CHECKS)})")
    return list(dict.fromkeys(raw))


def _apply_overrides(suite: SuiteSpec, data: dict[str, str], splits: dict[str, str], path: Path) -> None:
    for option, given in (("--data", data), ("--split", splits)):
        unknown = sorted(set(given) - set(suite.datasets))
        if unknown:
            raise InputError(f"{option} {', '.join(unknown)}: no such dataset in {path} "
                             f"(datasets: {', '.join(suite.datasets)})")
    for name, value in data.items():
        suite.datasets[name].path = str(Path(value).expanduser())
    for name, value in splits.items():
        suite.datasets[name].split = value


def _check(suite: SuiteSpec) -> None:
    where = suite.source
    check_number(f"{where}: seed", suite.seed, minimum=0, integer=True)
    check_number(f"{where}: bootstrap", suite.bootstrap, minimum=100, maximum=100_000, integer=True)
    _check_settings(suite)
    keys = [task.key for task in suite.tasks]
    repeated = sorted({key for key in keys if keys.count(key) > 1})
    if repeated:
        raise InputError(f"{where}: task(s) {', '.join(repeated)} given twice (a task is its name, dataset, "
                         "label and training dataset; give the second another label or merge their checks)")
    for task in suite.tasks:
        if task.dataset not in suite.datasets:
            raise InputError(f"{where}: task {task.task} names dataset {task.dataset!r}, which the suite does not "
                             f"define (datasets: {', '.join(suite.datasets)})")
        dataset = suite.datasets[task.dataset]
        wants_vqa = task.task == "vqa"
        if wants_vqa != (dataset.kind == "vqa"):
            raise InputError(f"{where}: task {task.task} on dataset {task.dataset!r} of kind {dataset.kind}: "
                             + ("vqa needs a dataset of kind vqa (a question file)" if wants_vqa
                                else f"{task.task} needs an image dataset (kind images)"))
        inapplicable = [check for check in task.checks or [] if task.task not in CHECKS[check]]
        if inapplicable:
            raise InputError(f"{where}: task {task.key} lists check(s) a {task.task} task cannot take: "
                             + "; ".join(f"{check} applies to {', '.join(CHECKS[check])}" for check in inapplicable))
        if task.train_dataset is not None and task.train_dataset not in suite.datasets:
            raise InputError(f"{where}: task {task.task} takes its training split from dataset "
                             f"{task.train_dataset!r}, which the suite does not define")
        if task.task in ("zero-shot", "linear-probe", "few-shot") and not (task.label or dataset.label):
            raise InputError(f"{where}: task {task.task} on {task.dataset!r} needs a label column "
                             "(the task's or the dataset's 'label')")
        source = suite.datasets.get(task.train_dataset or task.dataset)
        if task.task in TRAINING_TASKS and source is not None and not source.train_split:
            raise InputError(f"{where}: dataset {source.name!r} has no train_split for task {task.key} (it is "
                             "fitted on that split); set the dataset's train_split")
    _check_suite_checks(suite)
    for task in suite.tasks:
        if task.task in KNOWLEDGE_TASKS and (task.knowledge is not None or not task.builtin_knowledge):
            try:
                task_knowledge(task)
            except (InputError, DataError) as error:
                raise InputError(f"{where}: task {task.key}: {error}") from None
    for dataset in suite.datasets.values():
        if dataset.path is None and dataset.generate is None:
            raise InputError(f"{where}: dataset {dataset.name!r} has no path: give --data {dataset.name}=PATH")
        if dataset.captions is not None and not Path(dataset.captions).is_file():
            raise InputError(f"{dataset.captions}: caption file of dataset {dataset.name!r} of {where} not found "
                             "(a path relative to the suite file, $VARS expanded)")
        _check_dataset_files(dataset, where)
        if dataset.path is not None and not Path(dataset.path).exists():
            unset = sorted(set(re.findall(r"\$\{?(\w+)", dataset.path)))
            hint = f"set {', '.join(unset)} or " if unset else ""
            raise InputError(f"{dataset.path}: dataset {dataset.name!r} of {where} not found "
                             f"({hint}give its location with --data {dataset.name}=PATH)")


def _check_suite_checks(suite: SuiteSpec) -> None:
    """InputError naming each check of the suite's list that runs on none of its tasks (it applies to none of them,
    or those it applies to give their own ``checks:`` list): else a run would report no flag of a check never run."""
    unused = [check for check in suite.checks if not any(check in suite.task_checks(task) for task in suite.tasks)]
    if unused:
        taking = [task.key for task in suite.tasks if task.checks is None]
        raise InputError(f"{suite.source}: the suite's check(s) {', '.join(unused)} run on none of its tasks ("
                         + "; ".join(f"{check} applies to {', '.join(CHECKS[check])}" for check in unused)
                         + f"; the tasks taking the suite's checks: {', '.join(taking) or 'none'}); remove them or "
                         "add a task they apply to")


def _check_dataset_files(dataset: DatasetSpec, where: str) -> None:
    """A dataset's caption file parsed and its generate settings checked now, not when its first cell runs
    (InputError naming the suite and the dataset)."""
    from ..data.captions import load_captions
    from ..data.phantom.generate import check_phantom_settings

    try:
        if dataset.captions is not None:
            load_captions(dataset.captions)
        if dataset.generate is not None:
            try:
                check_phantom_settings(**generate_settings(dataset))
            except InputError as error:
                raise InputError(f"generate: {error}") from None
    except (InputError, DataError) as error:
        raise InputError(f"{where}: dataset {dataset.name!r}: {error}") from None


def generate_settings(dataset: DatasetSpec) -> dict[str, Any]:
    """The ``generate_phantom`` settings of a dataset the suite generates: its ``generate`` block over the
    defaults (600 cases, seed 0)."""
    return {"n": 600, "seed": 0, **(dataset.generate or {})}


def task_knowledge(task: TaskSpec):
    """The knowledge base a report or case-retrieval task reads findings with (the task's folder on top of the
    built-in base, or alone with ``builtin_knowledge: false``)."""
    from ..rag import load_knowledge

    return load_knowledge(task.knowledge, builtin=task.builtin_knowledge)


def _check_settings(suite: SuiteSpec) -> None:
    """The corruption and counterfactual settings, checked before any work (InputError)."""
    from ..eval.robustness import CORRUPTIONS, check_corruptions

    where = suite.source
    kinds, severities = suite.corruption.get("kinds", CORRUPTIONS), suite.corruption.get("severities", [1])
    if not isinstance(kinds, list | tuple) or not isinstance(severities, list | tuple) or not kinds or not severities:
        raise InputError(f"{where}: corruption kinds and severities must be non-empty lists")
    try:
        check_corruptions(kinds, severities)
    except InputError as error:
        raise InputError(f"{where}: {error}") from None
    check_number(f"{where}: corruption max_images", suite.corruption.get("max_images", 200), minimum=2, integer=True)
    check_number(f"{where}: counterfactual n", suite.counterfactual.get("n", 10), minimum=1, maximum=1000,
                 integer=True)
    check_number(f"{where}: counterfactual size", suite.counterfactual.get("size", 128), minimum=32, maximum=1024,
                 integer=True)


def _model_config(directory: str | Path) -> dict[str, Any]:
    """A model folder's config.json (nothing loaded); ModelError when there is none or it is unreadable."""
    from ..models.registry import model_directory

    config = model_directory(directory) / "config.json"
    if not config.is_file():
        raise ModelError(f"{directory}: not a model folder (no config.json)")
    try:
        raw = read_json(config)
    except (OSError, ValueError) as err:
        raise ModelError(f"{config}: unreadable model config ({err.__class__.__name__})") from None
    if not isinstance(raw, dict):
        raise ModelError(f"{config}: a model config is a JSON object")
    return raw


def model_capabilities(directory: str | Path) -> tuple[str, set[str]]:
    """What a model folder is, from its config.json alone (nothing loaded): a description and the
    kinds of task it takes (``dual``, ``vqa``, ``report``; a transformers VLM takes both of the last)."""
    from ..models.vlm import SUPPORTED_TYPES

    raw = _model_config(directory)
    kind, model_type = raw.get("kind"), raw.get("model_type")
    if kind == "vqa":
        return MODEL_KINDS["vqa"], {"vqa"}
    if kind == "report-generator":
        return MODEL_KINDS["report"], {"report"}
    if model_type in SUPPORTED_TYPES:
        return f"a transformers {model_type} vision-language model", {"vqa", "report"}
    if model_type in (None, "clip", "siglip"):
        return MODEL_KINDS["dual"], {"dual"}
    raise ModelError(f"{directory}: model_type {model_type!r} is not one medvl can benchmark")


def check_models(suite: SuiteSpec, models: list[str | Path]) -> None:
    """InputError naming the model and the task when a model cannot do a task of the suite."""
    from ..models.registry import check_distinct_models, model_spatial_dims

    if not models:
        raise InputError("give at least one --model")
    for model in models:
        if not Path(model).is_dir():
            raise InputError(f"{model}: model folder not found")
        description, kinds = model_capabilities(model)
        for task in suite.tasks:
            needed = TASKS[task.task]
            if needed not in kinds:
                raise InputError(f"{model}: is {description}, which cannot do task {task.task} of "
                                 f"{suite.source} (it needs {MODEL_KINDS[needed]})")
            two_d = [check for check in task.checks or [] if check in TWO_D_CHECKS]
            if two_d and model_spatial_dims(model) == 3:
                raise InputError(f"{model}: takes 3D volumes, and task {task.key} of {suite.source} lists check(s) "
                                 f"{', '.join(two_d)}, defined for 2D images (in the suite's checks they are skipped "
                                 "for 3D models)")
    # the same folder only: two runs of one seeded recipe are byte-identical, and may be compared on purpose
    check_distinct_models(models, "a suite scores each model once", copies=False)
