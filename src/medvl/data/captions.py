"""Caption templates: turn class labels into text (UniMed-CLIP style) and build zero-shot prompts.

A caption config is a dict (from YAML/JSON)::

    templates: ["a chest x-ray showing {}.", "radiograph with {}."]   # {} = a class description (its only brace)
    classes:                                                          # per label column
      finding:
        cardiomegaly: ["cardiomegaly", "an enlarged cardiac silhouette"]
        no_finding: ["no acute abnormality"]

A class without descriptions (``[]``) is described by its own name with underscores as spaces, except in a binary
finding column (classes ``0`` / ``1`` only: one column per finding of a multi-label set; not a column named
``label``, which holds class indices), whose ``1`` is described
by the column's name (``pleural_effusion``: "pleural effusion") and ``0`` by "no " and that name (a name that
starts with "no ", ``no_finding``, by the rest of it: "finding"); a caption names
the findings a record has (its binary columns at 1), and "no finding" when it has none. A blank
description, an empty template list and a template without ``{}`` are refused (prompts that say nothing).
YAML keys are read as written: ``yes``, ``no``, ``on``, ``off``, ``null``, ``1`` and ``1.0`` are class names
(YAML 1.1 would make booleans, None and numbers of them, and ``1`` and ``1.0`` one key); a key given twice is
refused, and so is a YAML alias (``*name``: nested ones are a "billion laughs" bomb). The file is UTF-8, a BOM
accepted (JSON as YAML).
"""

from __future__ import annotations

import json
import logging
import random
import string
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DataError, InputError
from .loaders.manifest import MAX_NESTING, decode_utf8, parse_json, repeated_key

log = logging.getLogger(__name__)

DEFAULT_TEMPLATES = ["{}.", "an image showing {}.", "a medical image of {}.", "findings: {}."]
NO_FINDING = "no finding"  # the caption description of a record whose binary finding columns are all 0


CLASS_INDEX_COLUMNS = ("label",)  # a 0/1 column named so holds class indices (a MedMNIST .npz), it names no finding


def binary_finding(column: str, class_names: Sequence[Any]) -> bool:
    """Whether ``column`` is a binary finding column, described by its name: its classes are ``0`` / ``1`` only
    (one column per finding of a multi-label set) and its name is a finding's, not ``label`` (class indices)."""
    names = {str(name) for name in class_names}
    return bool(column) and column.lower() not in CLASS_INDEX_COLUMNS and bool(names) and names <= {"0", "1"}


@dataclass
class CaptionConfig:
    """Templates and per-class descriptions for one or more label columns."""

    templates: list[str] = field(default_factory=lambda: list(DEFAULT_TEMPLATES))
    classes: dict[str, dict[str, list[str]]] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "captions") -> CaptionConfig:
        if not isinstance(data, dict):
            raise InputError(f"{source}: expected a mapping with templates and classes, got {type(data).__name__}")
        unknown = set(data) - {"templates", "classes"}
        if unknown:
            raise InputError(f"{source}: unknown keys {sorted(unknown)}; expected templates, classes")
        templates = DEFAULT_TEMPLATES if data.get("templates") is None else data["templates"]
        if not isinstance(templates, list) or not templates:
            raise InputError(f"{source}: templates must be a non-empty list of strings with one '{{}}' each "
                             "(leave templates out for the default ones)")
        given = data.get("classes") or {}
        if not isinstance(given, dict) or not all(
                isinstance(per_class, dict | None) and all(
                    isinstance(desc, str) or (isinstance(desc, list) and all(isinstance(d, str) for d in desc))
                    for desc in (per_class or {}).values())
                for per_class in given.values()):
            raise InputError(f"{source}: classes must map each label column to its classes, and each class to a "
                             "description or a list of descriptions")
        for template in templates:
            if (problem := _template_problem(template)) is not None:
                raise InputError(f"{source}: template {template!r} {problem}")
        classes = {
            str(column): {str(name): _as_list(desc) for name, desc in (per_class or {}).items()}
            for column, per_class in given.items()
        }
        for column, per_class in classes.items():
            for name, descriptions in per_class.items():
                if not all(description.strip() for description in descriptions):  # prompts that say nothing
                    raise InputError(f"{source}: class {name!r} of label column {column!r} has a blank description; "
                                     "write what it shows, or give [] to describe it by its name")
        return cls(templates=list(templates), classes=classes)

    def check_column(self, column: str) -> None:
        """Refuse a label column these captions do not describe when they describe any (a misspelt
        column would otherwise fall back to the bare class names without a word)."""
        if self.classes and column not in self.classes:
            raise InputError(f"unknown label column {column!r}; the captions describe {', '.join(self.classes)}")

    def warn_undescribed(self, column: str, class_names: Sequence[str], what: str = "prompts") -> list[str]:
        """The ``class_names`` whose prompts get no description from these captions (every one when ``column``
        is "": no label column describes them all), when the captions describe any class at all (plain
        templates describe none, by design), with one warning counting them (``undescribed_warning``): their
        prompts are the bare class names, which a model trained on these captions may never have read.
        ``what``: the texts the warning names (training passes "training captions")."""
        bare = self._undescribed(column, class_names)
        warning = self._warning(column, class_names, bare, what)
        if warning:
            hint = "a caption file with their descriptions: --captions" if column else "--label-column picks a column"
            log.warning("%s (%s)", warning, hint)
        return bare

    def undescribed_warning(self, column: str, class_names: Sequence[str]) -> str | None:
        """The warning ``warn_undescribed`` logs (counts only, no class name), for a caller to pass on (the
        service's answers carry it), or None when every class is described."""
        return self._warning(column, class_names, self._undescribed(column, class_names))

    def _warning(self, column: str, class_names: Sequence[str], bare: list[str],
                 what: str = "prompts") -> str | None:
        if bare and column:
            return (f"the captions describe {len(bare)} of the {len(class_names)} classes of label column "
                    f"{column!r} not at all: their {what} are the bare class names in the templates")
        if bare:
            nowhere = sum(not any(name in described for described in self.classes.values()) for name in class_names)
            return (f"no label column of the captions describes all {len(class_names)} classes asked for "
                    f"({nowhere} of them none does): the prompts are the bare class names in the templates")
        return None

    def _undescribed(self, column: str, class_names: Sequence[str]) -> list[str]:
        if binary_finding(column, class_names):  # described by the column's name (``descriptions``)
            return []
        return [name for name in class_names if not self.classes.get(column, {}).get(name)] if self.classes else []

    def descriptions(self, column: str, class_name: str, binary: bool = False) -> list[str]:
        """The class's descriptions, else its name; ``binary`` (a binary finding column):
        ``1`` is the column's name ("nodule"), ``0`` "no nodule", never the bare digit (``binary_finding``)."""
        described = self.classes.get(column, {}).get(class_name)
        if described:
            return described
        if binary and column:
            finding = column.replace("_", " ")
            # a column named for an absence (no_finding) is negated by dropping its "no ", not by another one
            absent = finding[3:] if finding.lower().startswith("no ") and len(finding) > 3 else f"no {finding}"
            return [finding if class_name == "1" else absent]
        return [class_name.replace("_", " ")]

    def prompts(self, column: str, class_name: str, binary: bool = False) -> list[str]:
        """Every template filled with every description: the zero-shot prompt ensemble (``binary``: see
        ``descriptions``)."""
        return [t.format(d) for d in self.descriptions(column, class_name, binary) for t in self.templates]

    def caption(self, labels: dict[str, Any], columns: Sequence[str], rng: random.Random,
                binary: Collection[str] = ()) -> str:
        """One random caption for a record's labels (a training text for label-only data). ``binary``: the binary
        finding columns among ``columns``, named when 1 and left out when 0 (unless the captions describe their 0);
        a record whose binary columns name no finding says "no finding"."""
        parts = [rng.choice(self.descriptions(c, str(labels[c]), c in binary)) for c in columns
                 if c in labels and not self._absent_finding(c, str(labels[c]), binary)]
        findings = [c for c in columns if c in binary and c in labels]
        if findings and all(self._absent_finding(c, str(labels[c]), binary) for c in findings):
            parts.append(NO_FINDING)
        return rng.choice(self.templates).format(", ".join(parts))

    def _absent_finding(self, column: str, value: str, binary: Collection[str]) -> bool:
        """A binary column at 0 that the captions do not describe: left out of a caption, which names findings."""
        return column in binary and value == "0" and not self.classes.get(column, {}).get(value)

    def to_dict(self) -> dict[str, Any]:
        return {"templates": self.templates, "classes": self.classes}


def _template_problem(template: Any) -> str | None:
    """What is wrong with ``template`` (None when nothing is): its only replacement field must be one bare ``{}``
    (``str.format`` fills it with a class description). A named or numbered field, a format spec, or a lone
    brace would fail at training or zero-shot time, and a template without ``{}`` (``{{}}`` is a literal brace
    pair) would leave the description out: every class would get the same prompt."""
    if not isinstance(template, str):
        return "is not a string; each template is a string with one '{}' (the class description)"
    try:
        fields = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(template)
                  if name is not None]
    except ValueError:  # a lone '{' or '}'
        fields = None
    if fields == [("", "", None)]:
        return None
    if fields == []:
        return "holds no '{}' for the class description (every class would get the same prompt)"
    return ("may hold only one '{}' (the class description) and no other braces; "
            "write a literal brace as '{{' or '}}'")


def _as_list(value: Any) -> list[str]:
    return [value] if isinstance(value, str) else [str(v) for v in value]


def _yaml_loader(path: Path) -> type:
    """A safe YAML loader whose mapping keys are strings as written (see the module doc), refusing a repeated key
    and any alias (``*name``): a caption config needs none, and aliases of aliases expand a file of a few hundred
    bytes into a billion strings ("billion laughs"), or, one within its own anchor, into a value holding itself."""
    import yaml

    class KeysAsWritten(yaml.SafeLoader):
        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.AliasEvent):  # a shared node: nothing needs one, and nested ones make bombs
                line = self.peek_event().start_mark.line + 1
                raise DataError(path, f"line {line}: YAML aliases (*name) are not accepted in a caption config; "
                                      "write the value out")
            return super().compose_node(parent, index)

        def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
            mapping: dict[Any, Any] = {}
            for key_node, value_node in node.value:
                key = key_node.value if isinstance(key_node, yaml.ScalarNode) else self.construct_object(key_node)
                if key in mapping:
                    raise DataError(path, f"key {key!r} is given twice (line {key_node.start_mark.line + 1})")
                mapping[key] = self.construct_object(value_node, deep=deep)
            return mapping

    KeysAsWritten.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, KeysAsWritten.construct_mapping)
    return KeysAsWritten


def _parse_problem(err: Exception) -> str:
    """`` at line L, column C: PROBLEM`` of a YAML or JSON parse error (one line; the parser's quoted snippet
    left out), else ``: ErrorType``."""
    if isinstance(err, json.JSONDecodeError):
        return f" at line {err.lineno}, column {err.colno}: {err.msg}"
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    if mark is None:
        return f": {err.__class__.__name__}"
    problem = getattr(err, "problem", None) or getattr(err, "context", None) or err.__class__.__name__
    return f" at line {mark.line + 1}, column {mark.column + 1}: {' '.join(str(problem).split())}"


def load_captions(path: str | Path) -> CaptionConfig:
    """Read a caption config from a .json, .yaml or .yml file (YAML keys as written: see the module doc)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "caption config not found")
    text = decode_utf8(path, path.read_bytes())  # a BOM accepted (Windows editors write one), as in manifests
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.load(text, Loader=_yaml_loader(path))  # a SafeLoader subclass
        else:
            data = parse_json(text)
    except DataError:
        raise
    except RecursionError:  # json's parser stops at about 1,000 levels, yaml's at fewer
        raise DataError(path, f"nested too deeply (more than {MAX_NESTING} levels of arrays and objects)") from None
    except Exception as err:  # yaml and json raise different types
        raise DataError(path, f"cannot parse caption config{_parse_problem(err)}") from None
    # json keeps the last value silently (the YAML loader refuses it too); nested too deeply is refused here
    if (key := repeated_key(path, data)) is not None:
        raise DataError(path, f"key {key!r} is given twice")
    if not isinstance(data, dict):
        raise DataError(path, "caption config must be a mapping with 'templates' and 'classes'")
    return CaptionConfig.from_dict(data, source=str(path))
