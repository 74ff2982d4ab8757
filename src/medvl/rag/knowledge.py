"""A knowledge base of finding definitions: one small text file per finding, editable by users.

Each file (``*.md``) starts with YAML front matter and may go on with free notes::

    ---
    name: pleural_effusion            # identifier: lower case, digits, underscores
    title: Pleural effusion           # display name (default: the name with spaces), 200 characters at most
    kind: finding                     # finding | normal (the one "no finding" entry)
    synonyms:                         # phrases the report labeller looks for; "..." stands for up
      - pleural effusion              #   to 5 words, e.g. "cardiac silhouette ... enlarged"
      - blunting of the ... costophrenic angle
    exclude: [pericardial effusion]   # phrases whose words are not a mention of this finding
    signs:                            # synonyms that are an indirect sign of it: where the sentence names the
      - blunting of the ... costophrenic angle  # finding too, what it says of it caps the sign ("..., which may
                                      #   represent a small effusion": possible; "... without effusion": absent)
    labels: [effusion_left, effusion_right]   # label columns / values that mean this finding
    normal_compatible: false          # true: a positive does not make the study abnormal (devices)
    definition: Fluid in the pleural space.
    appearance: Blunting of the costophrenic angle, a meniscus.
    scope: [chest]                    # body regions the definition is written for (default: any region)
    ---
    Free notes (kept as ``notes``).

``load_knowledge()`` reads the shipped folder (``medvl/rag/knowledge``); ``load_knowledge(folder)``
adds a user's folder on top, where a file with the same ``name`` replaces the shipped entry (keeping
its ``kind``: a ``no_finding`` without ``kind: normal`` is refused);
``builtin=False`` uses the user's files alone. The finding vocabulary of the report labeller is the
knowledge base's, so a new file is a new finding.

``scope`` names the body regions an entry's title and definition are written for: every shipped entry is a chest
X-ray finding (``scope: [chest]``; "Lung mass: a pulmonary opacity larger than 3 cm"). A case's region is read from
its labels or metadata (``REGION_FIELDS``: ``body_part``, ``location_category``, ...) and compared by ``region_key``
(lower case, a few synonyms folded: "Thorax" and DICOM's "CHEST" are ``chest``, "Brain" is ``head``), so a draft for
cases of the head does not attach a lung definition to the "mass" their reports state (``KnowledgeBase.in_scope``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..checks import check_number
from ..embed import check_text_read_whole, class_embeddings
from ..errors import DataError, InputError

log = logging.getLogger(__name__)
BUILTIN_DIR = Path(__file__).with_name("knowledge")
FINDING, NORMAL = "finding", "normal"
# report-like sentences around each phrase: closer to what a report-trained text tower has seen
# (on the phantom benchmark model, image -> entry top-1 0.38 vs 0.33 with the bare phrases)
PROMPT_TEMPLATES = ("{}.", "there is {}.", "findings: {}.", "impression: {}.")
_KEYS = {"name", "title", "kind", "synonyms", "exclude", "signs", "labels", "normal_compatible", "definition",
         "appearance", "scope"}
# label or metadata fields that name a case's body region, first found wins: the DICOM loader's Body Part Examined,
# MedPix's location_category, and the plain names a user's table may use
REGION_FIELDS = ("body_part", "location_category", "body_region", "region", "anatomy")
# region names folded into one (after label_key): what a DICOM header, MedPix and a user call the same region
_REGION_SYNONYMS = {"thorax": "chest", "thoracic": "chest", "lung": "chest", "lungs": "chest", "cxr": "chest",
                    "chest_pulmonary": "chest", "brain": "head", "skull": "head", "abdominal": "abdomen"}
MAX_TITLE_CHARS = 200  # a display name, shown whole in drafts and answers
_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}\Z")
_FRONT = re.compile(r"\A---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(?:\r?\n|\Z)(.*)\Z", re.S)


@dataclass
class Finding:
    """One knowledge-base entry: a finding, its phrases and its definition."""

    name: str  # identifier, e.g. "pleural_effusion"
    title: str  # display name, e.g. "Pleural effusion"
    synonyms: list[str]  # phrases (lower case) the labeller matches; "..." = a gap of up to 5 words
    definition: str = ""
    appearance: str = ""  # typical radiographic appearance
    exclude: list[str] = field(default_factory=list)  # phrases that are not a mention (pericardial effusion)
    # synonyms that are an indirect sign of the finding ("blunting of the ... costophrenic angle"): where the sentence
    # names the finding too, what it says of it caps the sign; "opacity may represent infiltrate" states an opacity
    signs: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)  # label columns / values meaning this finding
    kind: str = FINDING  # "finding", or "normal" for the no-finding entry
    normal_compatible: bool = False  # a positive leaves the study normal (support devices)
    scope: list[str] = field(default_factory=list)  # body regions (region_key) it is written for; empty: any
    notes: str = ""  # free text after the front matter
    path: str | None = None  # the file it was read from

    def card(self) -> dict[str, Any]:
        """What a report or an answer shows of the entry; ``source`` is the file's name only (the
        folders above a user's knowledge files are no business of a drafted report)."""
        return {"name": self.name, "title": self.title, "definition": self.definition,
                "appearance": self.appearance, "source": Path(self.path).name if self.path else None}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def label_key(value: Any) -> str:
    """A label name or value in comparable form: lower case, spaces and hyphens as underscores."""
    return re.sub(r"[\s\-]+", "_", str(value).strip().lower())


def region_key(value: Any) -> str:
    """A body region in comparable form: ``label_key`` with a few synonyms folded ("Thorax", "LUNG" -> "chest";
    "Brain" -> "head"), commas dropped ("Chest, Pulmonary" -> "chest_pulmonary" -> "chest")."""
    key = label_key(str(value).replace(",", " "))
    return _REGION_SYNONYMS.get(key, key)


MIXED_REGIONS = ""  # cases naming several body regions, none for most of them: no region-scoped entry applies


def case_region(*fields: dict[str, Any]) -> str | None:
    """The body region a case's labels or metadata name (the first of ``REGION_FIELDS`` with a value, looked for in
    each mapping in turn), as ``region_key``; None when none does."""
    for name in REGION_FIELDS:
        for values in fields:
            value = values.get(name)
            if value is not None and str(value).strip():
                return region_key(value)
    return None


class KnowledgeBase:
    """Findings by name, with lookup of label names / values and retrieval by embedding."""

    def __init__(self, findings: Iterable[Finding], sources: Sequence[str] = ()):
        self.findings = {f.name: f for f in findings}
        self.sources = list(sources)
        normals = [f for f in self.findings.values() if f.kind == NORMAL]
        if len(normals) > 1:  # named by the last file read (a user's, on top of the shipped one), the others listed
            others = ", ".join(f"{f.name} ({f.path})" if f.path else f.name for f in normals[:-1])
            raise DataError(normals[-1].path, f"a second 'normal' entry ({normals[-1].name}); the knowledge base "
                                              f"already has {others}, and at most one is allowed")
        self.normal = normals[0].name if normals else None  # the no-finding entry's name
        self._aliases: dict[str, str] = {}
        for finding in self.findings.values():
            for alias in (finding.name, finding.title, *finding.labels):
                self._aliases.setdefault(label_key(alias), finding.name)
        self._vectors: dict[int, tuple[Any, np.ndarray]] = {}
        self._sha256: str | None = None  # sha256(), once asked

    def __len__(self) -> int:
        return len(self.findings)

    def __iter__(self):
        return iter(self.findings.values())

    def __contains__(self, name: object) -> bool:
        return name in self.findings

    def __getitem__(self, name: str) -> Finding:
        return self.findings[name]

    @property
    def names(self) -> list[str]:
        return list(self.findings)

    @property
    def abnormal(self) -> list[str]:
        """Findings that make a study abnormal (not the normal entry, not devices)."""
        return [f.name for f in self.findings.values() if f.kind == FINDING and not f.normal_compatible]

    def sha256(self) -> str:
        """SHA-256 of the entries as read, in order (every field of each, its file named by its name only): what
        ``/v1/models`` tells a knowledge base edited, added to or swapped between two starts of a service by.
        Computed once: the entries do not change after loading, and the page asks ``/v1/models`` on every read."""
        if self._sha256 is None:
            entries = [{**finding.to_dict(), "path": Path(finding.path).name if finding.path else None}
                       for finding in self]
            self._sha256 = hashlib.sha256(json.dumps(entries, sort_keys=True).encode()).hexdigest()
        return self._sha256

    def resolve(self, label: Any) -> str | None:
        """The finding a label column or value names (by name, title or ``labels``), else None."""
        return self._aliases.get(label_key(label))

    def cards(self, names: Iterable[str]) -> list[dict[str, Any]]:
        return [self.findings[n].card() for n in names if n in self.findings]

    def in_scope(self, name: str, region: str | None) -> bool:
        """Whether entry ``name`` is written for ``region`` (a ``region_key``, or ``MIXED_REGIONS`` for cases
        naming several without a majority): True for an entry without ``scope`` and for an unknown region (None),
        as the knowledge base has always been used; False for a scoped entry and mixed regions."""
        scope = self.findings[name].scope
        return region is None or not scope or region in scope

    def retrieve(self, model, query: np.ndarray | str, k: int = 3,
                 region: str | None = None) -> list[tuple[Finding, float]]:
        """The ``k`` entries whose phrases are closest to ``query`` (a text, or an image or text
        embedding of ``model``) by cosine similarity of the model's text embeddings; with a ``region``, among the
        entries written for it (``in_scope``) only.

        An entry is embedded as the mean over its title and synonyms, each in ``PROMPT_TEMPLATES``
        (a prompt ensemble). A query text longer than the model's text tower reads is refused (an InputError:
        ``medvl.embed.check_text_read_whole``)."""
        check_number("k", k, minimum=1, integer=True)
        vectors = self._embeddings(model)
        if isinstance(query, str):
            if not query.strip():
                raise InputError("the knowledge query text is empty")
            check_text_read_whole(model, query, "the knowledge query text")
            query = model.encode_texts([query]).numpy()
        query = np.asarray(query, dtype=np.float32).reshape(-1)
        if query.shape[0] != vectors.shape[1]:
            raise InputError(f"query vector has {query.shape[0]} values; the model embeds {vectors.shape[1]}")
        scores = vectors @ query
        findings = list(self.findings.values())
        order = [i for i in np.argsort(-scores, kind="stable") if self.in_scope(findings[i].name, region)][:k]
        return [(findings[i], float(scores[i])) for i in order]

    def check_model(self, model) -> None:
        """DataError when a title or synonym is longer than ``model``'s text encoder reads (``_check_read_whole``):
        what the first retrieval by embedding would raise, found without embedding anything (``medvl serve`` asks
        at start, so that a user's file is refused there, not at each draft)."""
        self._check_read_whole(model, self._phrases())

    def _phrases(self) -> list[list[str]]:
        """Each entry's title and first 12 synonyms, as the prompts embed them."""
        return [[" ".join(p.replace("...", " ").split()) for p in (f.title.lower(), *f.synonyms[:12])]
                for f in self.findings.values()]

    def _embeddings(self, model) -> np.ndarray:
        cached = self._vectors.get(id(model))
        if cached is not None and cached[0] is model:
            return cached[1]
        phrases = self._phrases()
        self._check_read_whole(model, phrases)
        prompts = [[t.format(p) for p in entry for t in PROMPT_TEMPLATES] for entry in phrases]
        vectors = class_embeddings(model, prompts).numpy() if prompts else np.empty((0, model.config.embed_dim))
        self._vectors[id(model)] = (model, vectors)
        return vectors

    def _check_read_whole(self, model, phrases: list[list[str]]) -> None:
        """DataError naming the file, the entry and the phrase's place (``title``, ``synonym 3``), never its text, when
        a phrase alone has more tokens than the model's text tower reads (``text_read_length``): read cut, entries
        differing only past the cut would get one vector. A phrase cut only in the longer ``PROMPT_TEMPLATES``
        (its last word or stop: the shipped entries in a tower reading 46 tokens) is logged, counted."""
        read_length = getattr(model, "text_read_length", None)
        if read_length is None:
            return
        cut: list[str] = []
        for finding, entry in zip(self.findings.values(), phrases, strict=True):
            for number, phrase in enumerate(entry):
                lengths = [read_length(template.format(phrase)) for template in PROMPT_TEMPLATES]
                (shortest, limit), longest = min(lengths), max(length for length, _ in lengths)
                where = f"entry {finding.name!r}: " + ("the title" if number == 0 else f"synonym {number}")
                if shortest > limit:
                    raise DataError(finding.path, f"{where} is {shortest} tokens long as a prompt; the model's text "
                                                  f"encoder reads {limit} tokens at most (a word is one token or "
                                                  "more): the rest would be cut unread, and entries differing only "
                                                  "there would be one; shorten it")
                if longest > limit:
                    cut.append(f"{Path(finding.path).name} {where}" if finding.path else where)
        if cut:
            log.warning("%d knowledge-base phrase(s) are longer than the model's text encoder reads in some of their "
                        "prompts (%s): those prompts leave their end out", len(cut), "; ".join(cut[:3]))


def load_knowledge(folder: str | Path | None = None, builtin: bool = True) -> KnowledgeBase:
    """The shipped knowledge base, with a user's ``folder`` of ``*.md`` files on top (same
    ``name`` replaces); ``builtin=False`` keeps the user's files alone."""
    folders = ([BUILTIN_DIR] if builtin else []) + ([Path(folder)] if folder is not None else [])
    if not folders:
        raise InputError("no knowledge base: pass a folder or keep the built-in one")
    findings: dict[str, Finding] = {}
    for path in folders:
        read = read_folder(path)
        if not read and path != BUILTIN_DIR:  # a wrong folder would add nothing without a word
            raise DataError(path, "no finding files (*.md with YAML front matter) in this knowledge folder")
        for finding in read:
            replaced = findings.get(finding.name)
            if replaced is not None and replaced.kind != finding.kind:  # e.g. no_finding without kind: normal
                shipped = Path(str(replaced.path)).name
                raise DataError(finding.path, f"replaces the entry {finding.name!r} of kind {replaced.kind} "
                                              f"({shipped}) with kind {finding.kind}; write 'kind: {replaced.kind}' "
                                              "to keep what the entry means (the normal entry is what makes a study "
                                              "normal)")
            findings[finding.name] = finding
    if not findings:
        raise DataError(folders[-1], "no finding files (*.md with YAML front matter) in the knowledge base")
    return KnowledgeBase(findings.values(), [str(p) for p in folders])


def read_folder(folder: Path) -> list[Finding]:
    if not folder.is_dir():
        raise DataError(folder, "knowledge folder not found (expected a folder of *.md finding files)")
    findings: dict[str, Finding] = {}
    for path in sorted(folder.glob("*.md")):
        finding = read_finding(path)
        if finding.name in findings:
            raise DataError(path, f"finding {finding.name!r} is also defined in {findings[finding.name].path}")
        findings[finding.name] = finding
    return list(findings.values())


def read_finding(path: str | Path) -> Finding:
    """One finding file; DataError naming the file and the problem if it is malformed."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(path, "not UTF-8 text") from None
    match = _FRONT.match(text.lstrip("\ufeff"))
    if not match:
        raise DataError(path, "missing YAML front matter (a first line '---', the fields, then '---')")
    data = _parse_yaml(path, match.group(1))
    return _finding_from(path, data, match.group(2).strip())


def _parse_yaml(path: Path, text: str) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.load(text, Loader=_unique_key_loader())  # a SafeLoader refusing repeated keys
    except _RepeatedField as err:
        raise DataError(path, f"field {err.name!r} is given twice in the front matter (line {err.line}); "
                              "YAML would keep the last one without a word") from None
    except yaml.YAMLError as err:
        raise DataError(path, f"front matter is not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise DataError(path, "front matter must be a mapping of fields (name, synonyms, definition, ...)")
    unknown = sorted(set(map(str, data)) - _KEYS)
    if unknown:
        raise DataError(path, f"unknown fields {unknown}; expected {', '.join(sorted(_KEYS))}")
    return data


class _RepeatedField(Exception):
    def __init__(self, name: str, line: int):
        super().__init__(name)
        self.name, self.line = name, line


def _unique_key_loader():
    """A ``yaml.SafeLoader`` that raises ``_RepeatedField`` for a key given twice in one mapping (``safe_load``
    keeps the last: "synonyms: [a]" then "synonyms: [b]" would drop the first list)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen: set[str] = set()
            for key_node, _ in node.value:
                key = str(self.construct_object(key_node, deep=deep))
                if key in seen:
                    raise _RepeatedField(key, key_node.start_mark.line + 1)
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader


def _finding_from(path: Path, data: dict[str, Any], notes: str) -> Finding:
    name = data.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise DataError(path, f"'name' must be lower case letters, digits and underscores, got {name!r}")
    kind = data.get("kind", FINDING)
    if kind not in (FINDING, NORMAL):
        raise DataError(path, f"'kind' must be {FINDING} or {NORMAL}, got {kind!r}")
    synonyms = _strings(path, data, "synonyms")
    if not synonyms:
        raise DataError(path, "'synonyms' must list at least one phrase")
    exclude = [s.lower().strip() for s in _strings(path, data, "exclude")]
    for phrase in synonyms + exclude:
        if re.search(r"[^\W_]", phrase) and not re.search(r"[a-z0-9]", phrase.lower()):
            raise DataError(path, f"phrase {phrase!r} has no Latin letters or digits: only English (Latin-script) "
                                  "phrases are supported, as the labeller's negation and uncertainty cues are English")
        if not re.search(r"[a-z0-9]", phrase.lower()) or phrase.strip().startswith("...") \
                or phrase.strip().endswith("..."):
            raise DataError(path, f"phrase {phrase!r} must have words, with '...' only between words")
    signs = [s.lower().strip() for s in _strings(path, data, "signs")]
    for phrase in signs:
        if phrase not in [s.lower().strip() for s in synonyms]:
            raise DataError(path, f"'signs' phrase {phrase!r} is not one of the 'synonyms'")
    compatible = data.get("normal_compatible", False)
    if not isinstance(compatible, bool):
        raise DataError(path, f"'normal_compatible' must be true or false, got {compatible!r}")
    title = _text(path, data, "title")
    if len(title) > MAX_TITLE_CHARS:
        raise DataError(path, f"'title' is {len(title):,} characters long; at most {MAX_TITLE_CHARS} (a display name: "
                              "'definition', 'appearance' and the notes hold the rest)")
    return Finding(name=name, title=title or name.replace("_", " ").capitalize(),
                   synonyms=[s.lower().strip() for s in synonyms], definition=_text(path, data, "definition"),
                   appearance=_text(path, data, "appearance"), exclude=exclude, signs=signs,
                   labels=_strings(path, data, "labels"), kind=kind, normal_compatible=compatible,
                   scope=[region_key(r) for r in _strings(path, data, "scope")], notes=notes, path=str(path))


def _strings(path: Path, data: dict[str, Any], key: str) -> list[str]:
    value = data.get(key) or []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str | int | float) for v in value):
        raise DataError(path, f"'{key}' must be a list of phrases")
    return [str(v) for v in value if str(v).strip()]


def _text(path: Path, data: dict[str, Any], key: str) -> str:
    value = data.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(path, f"'{key}' must be text, got {type(value).__name__}")
    return " ".join(value.split())
