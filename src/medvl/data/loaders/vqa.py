"""Medical VQA loader: VQA-RAD and SLAKE style JSON (one object per question).

A question file is a JSON array of objects. Both key sets are read (first key found wins):

=================  ===========================  =================================
field              VQA-RAD                      SLAKE
=================  ===========================  =================================
image file name    ``image_name``               ``img_name`` (e.g. ``xmlab1/source.jpg``)
question           ``question``                 ``question``
answer             ``answer``                   ``answer``
answer type        ``answer_type``              ``answer_type``
question id        ``qid``                      ``qid``
question type      ``question_type``            ``content_type``
organ / location   ``image_organ``              ``location``
modality           -                            ``modality``
language           -                            ``q_lang`` (``en`` / ``zh``)
=================  ===========================  =================================

Multi-image questions (an extension, written by the phantom's VQA generator: "which image shows X",
progression between two films): ``image_names``, a JSON array of file names in order (earlier film
first); ``image_name``, when also given, is its first. ``VQAItem.images`` holds every image in order
(one for ordinary questions) and ``VQAItem.image`` the first; records get all of them in
``Record.images`` (and their names in meta ``image_names``).

Answer choices (an extension, written by the phantom): ``options``, a JSON array of the answers a question
offers (``["<0.45", "0.45-0.50", ">0.50"]``), kept normalised in ``VQAItem.options`` (order kept, repeats
dropped): a transformers VLM chooses a closed question's answer among them (``eval.vqa.closed_candidates``).
Given, it must be a non-empty array of texts (or numbers) holding the answer, else a ``DataError`` naming the
file and the item. VQA-RAD and SLAKE have none. Other keys are ignored (the phantom adds ``patient``,
``template``).

``question``, ``answer`` and an image name (or ``image_names``) are required: a missing one is a
``DataError`` naming the file, the item and the key. Without ``qid`` the item's index in the file is its id. Files must
be UTF-8 JSON; anything else is a ``DataError`` naming the file.

Answers: ``answer`` is kept as written (numbers become their JSON text, ``2`` -> ``"2"``);
``answer_normalized`` is lower case with whitespace collapsed and trailing ``.`` removed, for exact
match scoring. ``answer_type`` is upper-cased and stripped (VQA-RAD has ``"CLOSED "`` twice):
``CLOSED`` (yes/no or a choice) or ``OPEN``; another value (``yes/no``, ``number``) is a ``DataError`` naming
the file, the item and the value. An answer that normalises to nothing (``"."``) is refused as an empty one is.

Images: ``<folder>/<name>``, else ``<folder>/images/<name>`` (VQA-RAD) or ``<folder>/imgs/<name>``
(SLAKE), for every image of a question. A missing image file is a ``DataError`` naming the
question id and the path, so a broken copy is noticed; ``skip_missing_images=True`` instead skips
those questions and logs how many.
An image name resolving (symbolic links followed) outside the question file's folder
(``../../etc/passwd``, an absolute path elsewhere) is refused before any image is read: one
``DataError`` naming the file, the count and the first item number, unless
``allow_outside_root=True`` (see ``medvl.data.loaders.roots``).

Splits: the file name, minus a ``set`` suffix (``trainset.json`` -> ``train``, SLAKE's
``validate.json`` -> ``validate``). A folder loads every ``*.json`` file that looks like a question
file (``QUESTION_KEYS`` and an image key near the start), each as one split; other JSON files
(VQA-RAD's ``answer_all_list.json``) are left alone.

Records (``load_vqa_dataset``): one per question; ``id`` = ``qid``; ``images`` = [image path]
(every image of a multi-image question); ``text`` = the question; labels ``answer_type``
(``CLOSED`` / ``OPEN``); meta ``qid``, ``answer``, ``answer_normalized``, ``question_type``, ``organ``,
``modality``, ``language``, ``image_name`` (as the file writes it, folders included: SLAKE's
``xmlab3/source.jpg``) (each when present). ``load_vqa`` returns typed ``VQAItem`` s for VQA training and evaluation.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from PIL import Image

from ...errors import DataError
from ..images import image_suffix, pixel_sha256, read_image
from ..record import Dataset, Record, records_digest
from .manifest import check_reserved_split_name, decode_utf8, parse_json, repeated_key
from .roots import check_inside_root, is_file, is_inside

log = logging.getLogger(__name__)

IMAGE_KEYS = ("image_name", "img_name")
IMAGE_LIST_KEY = "image_names"  # multi-image questions (see the module docstring)
OPTIONS_KEY = "options"  # a question's answer choices (see the module docstring)
QUESTION_KEYS = ("question", "answer")
OPTIONAL_KEYS = {  # VQAItem field -> keys, first found wins
    "question_type": ("question_type", "content_type"),
    "organ": ("image_organ", "location"),
    "modality": ("modality",),
    "language": ("q_lang",),
}
IMAGE_FOLDERS = ("", "images", "imgs")
ANSWER_TYPE_COLUMN = "answer_type"
ANSWER_TYPES = ("CLOSED", "OPEN")  # the answer types a question file may give (any case, stripped)
SNIFF_BYTES = 65_536

_SPACES = re.compile(r"\s+")
# what token F1 reads as a space: punctuation, but not a sign that changes what an answer says ('<6 mm' is not
# '>6 mm'; '-10', '+2', '5%', '<=' are kept), a '.' or ',' between digits, or a minus sign before a number
_PUNCTUATION = re.compile(r"[^\w\s.,<>=+%\u2264\u2265-]|_|(?<!\d)[.,]|[.,](?!\d)|-(?!\d)|(?<=\w)-")
ARTICLES = frozenset({"a", "an", "the"})


@dataclass(frozen=True)
class VQAItem:
    """One question about one image."""

    qid: str
    image: Path
    question: str  # patient-adjacent free text: never logged
    answer: str  # as written
    answer_normalized: str  # lower case, whitespace collapsed, trailing "." dropped
    answer_type: str | None  # CLOSED or OPEN (upper case), None if the file has no answer type
    split: str
    question_type: str | None = None  # VQA-RAD: PRES, POS, ABN, SIZE...; SLAKE: content_type
    organ: str | None = None  # VQA-RAD: HEAD, CHEST, ABD; SLAKE: location (Lung, Brain...)
    modality: str | None = None  # SLAKE only: CT, MRI, X-Ray
    language: str | None = None  # SLAKE only: en, zh
    images: tuple[Path, ...] = ()  # every image in order (earlier film first); (image,) for one image
    names: tuple[str, ...] = ()  # the images' names as the question file writes them (SLAKE: xmlab3/source.jpg)
    file: Path | None = None  # the question file it was read from (None: a question asked directly)
    options: tuple[str, ...] = ()  # the answer choices the file lists (normalised, file order); () when none


def normalize_answer(answer: str) -> str:
    """The form answers are compared in: lower case, whitespace collapsed, trailing '.' dropped."""
    return _SPACES.sub(" ", answer).strip().lower().rstrip(".").strip()


def answer_tokens(answer: str) -> list[str]:
    """The words answers are compared by in token F1 (SQuAD style): lower case, punctuation replaced by a space
    (so 'ring-enhancing' reads as 'ring enhancing', as VQA's evaluation splits in-word punctuation; a decimal
    point or comma between digits kept: '0.45'; signs that change an answer's meaning kept: '<0.45' is not
    '>0.45', nor '-10' '10'), the articles a / an / the dropped, whitespace collapsed."""
    return [word for word in _PUNCTUATION.sub(" ", answer.lower()).split() if word not in ARTICLES]


def split_name(path: Path) -> str:
    """The split a question file holds: its stem minus a ``set`` suffix (``trainset`` -> ``train``)."""
    stem = path.stem
    return stem[:-3] if stem.lower().endswith("set") and len(stem) > 3 else stem


def looks_like_vqa_file(path: Path) -> bool:
    """True when the start of a ``.json`` file names the question keys and an image key."""
    if not path.is_file() or path.suffix.lower() != ".json":
        return False
    with path.open("rb") as handle:
        head = handle.read(SNIFF_BYTES).decode("utf-8", errors="replace")
    image_keys = (*IMAGE_KEYS, IMAGE_LIST_KEY)
    return all(f'"{key}"' in head for key in QUESTION_KEYS) and any(f'"{key}"' in head for key in image_keys)


def vqa_files(folder: Path) -> list[Path]:
    """The question files of a folder, sorted by name."""
    return sorted(path for path in folder.glob("*.json") if looks_like_vqa_file(path))


# ---------------------------------------------------------------- reading one file


def _read_items(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise DataError(path, "VQA question file not found")
    try:
        data = parse_json(decode_utf8(path, path.read_bytes()))
    except json.JSONDecodeError as error:
        raise DataError(path, f"not valid JSON (line {error.lineno}, column {error.colno}: {error.msg})") from None
    except RecursionError:
        raise DataError(path, "JSON nested too deeply") from None
    if not isinstance(data, list) or not data:
        raise DataError(path, f"expected a non-empty JSON array of question objects, got "
                              f"{'an empty array' if data == [] else type(data).__name__}")
    for index, item in enumerate(data):
        if not isinstance(item, dict):
            raise DataError(path, f"item {index}: expected a JSON object, got {type(item).__name__}")
        if (key := repeated_key(path, item, where=f"item {index}: ")) is not None:
            qid = _text(item.get("qid")) or "?"
            raise DataError(path, f"item {index} (qid {qid}): key {key!r} is given twice")
    return data


def _text(value: Any) -> str:
    if value is None:
        return ""
    return value.strip() if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _first(item: dict[str, Any], keys: tuple[str, ...]) -> str | None:
    return next((text for key in keys if (text := _text(item.get(key)))), None)


def _required(path: Path, index: int, item: dict[str, Any], keys: tuple[str, ...]) -> str:
    nested = next((key for key in keys if isinstance(item.get(key), dict | list)), None)
    if nested is not None:  # it would be read as its JSON text: '{"text": "q"}' scored as a question
        qid = _text(item.get("qid")) or "?"
        raise DataError(path, f"item {index} (qid {qid}): {nested!r} must be text, got a JSON "
                              f"{'object' if isinstance(item[nested], dict) else 'array'}")
    value = _first(item, keys)
    if value is None:
        qid = _text(item.get("qid")) or "?"
        raise DataError(path, f"item {index} (qid {qid}): missing or empty {' / '.join(repr(k) for k in keys)}")
    return value


def _resolve_image(folder: Path, name: str) -> Path | None:
    candidates = [folder / sub / name for sub in IMAGE_FOLDERS]
    return next((path for path in candidates if is_file(path)), None)


def _image_names(path: Path, index: int, raw: dict[str, Any]) -> list[str]:
    """The item's image names: ``image_names`` when given (a non-empty array of names), else the one name."""
    names = raw.get(IMAGE_LIST_KEY)
    if names is None:
        return [_required(path, index, raw, IMAGE_KEYS)]
    if not isinstance(names, list) or not names or not all(isinstance(name, str) and name.strip() for name in names):
        qid = _text(raw.get("qid")) or "?"
        raise DataError(path, f"item {index} (qid {qid}): {IMAGE_LIST_KEY!r} must be a non-empty array of "
                              "file names")
    return [name.strip() for name in names]


def _options(path: Path, index: int, raw: dict[str, Any], answer: str) -> tuple[str, ...]:
    """The item's answer choices, normalised, repeats dropped (``()`` without ``options``); they must hold the
    answer: a closed question scored among choices that leave it out could never be answered right."""
    options = raw.get(OPTIONS_KEY)
    if options is None:
        return ()
    qid = _text(raw.get("qid")) or "?"
    if not isinstance(options, list) or not options or not all(
            isinstance(option, str | int | float) and normalize_answer(_text(option)) for option in options):
        raise DataError(path, f"item {index} (qid {qid}): {OPTIONS_KEY!r} must be a non-empty array of answers "
                              "(texts or numbers)")
    choices = tuple(dict.fromkeys(normalize_answer(_text(option)) for option in options))
    if normalize_answer(answer) not in choices:
        raise DataError(path, f"item {index} (qid {qid}): the answer is not one of its {len(choices)} "
                              f"{OPTIONS_KEY!r}")
    return choices


def _item(path: Path, index: int, raw: dict[str, Any], split: str) -> tuple[VQAItem, str | None]:
    """(item, the name of its first image that exists nowhere, or None); an image's path is its first candidate
    when none exists."""
    image_names = _image_names(path, index, raw)
    answer = _required(path, index, raw, ("answer",))
    found = [_resolve_image(path.parent, name) for name in image_names]
    images = tuple(image or path.parent / IMAGE_FOLDERS[1] / name
                   for image, name in zip(found, image_names, strict=True))
    answer_type = _first(raw, (ANSWER_TYPE_COLUMN,))
    qid = _text(raw.get("qid")) or str(index)
    if answer_type is not None and answer_type.upper() not in ANSWER_TYPES:
        raise DataError(path, f"item {index} (qid {qid}): {ANSWER_TYPE_COLUMN!r} is {answer_type!r}; expected "
                              f"{' or '.join(ANSWER_TYPES)} (any case), or no answer type")
    if not normalize_answer(answer):
        raise DataError(path, f"item {index} (qid {qid}): 'answer' {answer!r} is empty once normalised (lower case, "
                              "whitespace collapsed, trailing '.' dropped)")
    item = VQAItem(
        qid=qid,
        image=images[0],
        question=_required(path, index, raw, ("question",)),
        answer=answer,
        answer_normalized=normalize_answer(answer),
        answer_type=answer_type.upper() if answer_type else None,
        split=split,
        **{name: _first(raw, keys) for name, keys in OPTIONAL_KEYS.items()},
        images=images,
        names=tuple(image_names),
        file=path,
        options=_options(path, index, raw, answer),
    )
    return item, next((name for image, name in zip(found, image_names, strict=True) if image is None), None)


def _outermost(item: VQAItem, root: Path) -> Path:
    """The item's first image outside ``root``, else its first image (one entry per question)."""
    resolved_root = root.resolve()
    return next((image for image in item.images if not is_inside(image, resolved_root)), item.image)


def read_vqa_file(path: str | Path, skip_missing_images: bool = False,
                  allow_outside_root: bool = False) -> list[VQAItem]:
    """The questions of one file (see the module docstring for keys, images and errors)."""
    path = Path(path)
    split = split_name(path)
    parsed = [_item(path, index, raw, split) for index, raw in enumerate(_read_items(path))]
    check_inside_root(path, path.parent, [(f"item {index}", _outermost(item, path.parent)) for index, (item, _)
                                          in enumerate(parsed)], allow_outside_root, what="questions")
    items, missing = [], []
    for position, (item, absent) in enumerate(parsed, 1):
        if absent is None:
            items.append(item)
        elif skip_missing_images:
            missing.append(position)
        else:  # the name as the file writes it, and where it was looked for
            raise DataError(path, f"question {item.qid}: image file {absent!r} not found (looked in "
                                  f"{', '.join(str(path.parent / sub) for sub in IMAGE_FOLDERS)})")
    if missing:
        log.warning("%s: skipped %d of %d questions whose image file is missing (first: question %d of the file)",
                    path, len(missing), len(missing) + len(items), missing[0])
    return items


# ---------------------------------------------------------------- the public loaders


def check_split_files(path: Path, files: Sequence[Path]) -> None:
    """One question file per split, and no split ``all`` beside others (``manifest.check_reserved_split_name``):
    ``train.json`` and ``trainset.json`` both hold split ``train``, and would be merged without a word."""
    sources: dict[str, str] = {}
    for file in files:
        split = split_name(file)
        if split in sources:
            raise DataError(path, f"{sources[split]} and {file.name} both hold split {split!r}; keep one question "
                                  "file per split (merge them, or rename one)")
        sources[split] = file.name
    check_reserved_split_name(path, sources)


def load_vqa(path: str | Path, skip_missing_images: bool = False, allow_outside_root: bool = False) -> list[VQAItem]:
    """Every question of a VQA JSON file, or of every question file in a folder (in name order)."""
    path = Path(path)
    if not path.exists():
        raise DataError(path, "VQA path not found")
    files = vqa_files(path) if path.is_dir() else [path]
    if not files:
        raise DataError(path, f"no VQA question files (*.json with keys {', '.join(QUESTION_KEYS)} and "
                              f"{' or '.join(IMAGE_KEYS)})")
    check_split_files(path, files)
    items = [item for file in files for item in read_vqa_file(file, skip_missing_images, allow_outside_root)]
    seen: set[tuple[str, str]] = set()
    for item in items:
        if (item.split, item.qid) in seen:
            raise DataError(item.file or path, f"duplicate qid {item.qid!r} in split {item.split!r}")
        seen.add((item.split, item.qid))
    if not items:
        raise DataError(path, "no questions left (every image file is missing)")
    return items


def _record(item: VQAItem, record_id: str) -> Record:
    meta = {key: value for key, value in asdict(item).items()
            if key in ("qid", "answer", "answer_normalized", "question_type", "organ", "modality", "language")
            and value is not None}
    names = list(item.names) or [image.name for image in item.images or (item.image,)]
    meta["image_name"] = names[0]
    if len(names) > 1:
        meta["image_names"] = names
    labels = {ANSWER_TYPE_COLUMN: item.answer_type} if item.answer_type else {}
    return Record(id=record_id, images=list(item.images or (item.image,)), text=item.question, labels=labels, meta=meta,
                  split=item.split)


def questions_digest(items: Sequence[VQAItem], resolved: bool = False) -> str:
    """SHA-256 over each question's split, id, text, answer, types and images (``records_digest``: an image file's
    path, size and modification time; ``resolved``: the file's resolved path): identifies the questions a resumed
    VQA training run continues."""
    return records_digest([_record(item, f"{item.split}/{item.qid}") for item in items], resolved)


def question_files(items: Sequence[VQAItem]) -> list[tuple[Path, str]]:
    """The question files ``items`` were read from, each with the split it holds, in first-seen order (what
    ``Dataset.files`` and a model's ``training`` block record of VQA data)."""
    return list(dict.fromkeys((item.file, item.split) for item in items if item.file is not None))


def load_vqa_dataset(path: str | Path, skip_missing_images: bool = False,
                     allow_outside_root: bool = False) -> Dataset:
    """The questions as a ``Dataset`` of records (one per question, see the module docstring)."""
    items = load_vqa(path, skip_missing_images, allow_outside_root)
    qids = [item.qid for item in items]
    unique = len(set(qids)) == len(qids)  # else the split prefixes the id, e.g. "test/12"
    records = [_record(item, item.qid if unique else f"{item.split}/{item.qid}") for item in items]
    return Dataset(records, source=str(path), label_names=[ANSWER_TYPE_COLUMN], default_labels=[ANSWER_TYPE_COLUMN],
                   files=question_files(items))


# ---------------------------------------------------------------- images shared with other datasets

SOURCE_IMAGE_ID = re.compile(r"synpic\d+", re.IGNORECASE)  # MedPix's image id, kept in VQA-RAD's file names


def _without_image_suffix(name: str) -> str:
    """A file name less its image suffix (``.png``, ``.nii.gz``: ``image_suffix``), whole when it has none: dots
    before the suffix are part of the name (DICOM UIDs such as ``1.2.840.113619.2.55.1000.png``, ``case.1.png``)."""
    suffix = image_suffix(name)
    return name[:len(name) - len(suffix)] if suffix else name


def source_image_id(name: str | Path) -> str:
    """The id of the source image a file name stands for: its MedPix ``synpic`` id when it holds one
    (``MPX1307_synpic20064.jpg`` and ``synpic20064.jpg`` are the same image), else the name in lower case
    without its image suffix (``_without_image_suffix``), keeping the folders a relative name writes (SLAKE's
    ``xmlab3/source.jpg`` -> ``xmlab3/source``: every SLAKE image is a ``source.jpg``, told apart by its folder)
    below a leading ``images/`` or ``imgs/`` (the image folders a question file's names are relative to); an
    absolute path gives its file name alone, less the suffix."""
    path = PurePosixPath(str(name).replace("\\", "/"))
    found = SOURCE_IMAGE_ID.search(_without_image_suffix(path.name))
    if found:
        return found.group(0).lower()
    parts = [path.name] if path.is_absolute() else list(path.parts)
    if ".." in parts:
        parts = parts[len(parts) - parts[::-1].index(".."):]
    while len(parts) > 1 and parts[0].lower() in IMAGE_FOLDERS:
        parts = parts[1:]
    return "/".join([*parts[:-1], _without_image_suffix(parts[-1])]).lower()


def _path_ids(path: str | Path) -> set[str]:
    """Every id an image file's path can match a question's name by: its ``synpic`` id, else each tail of the
    path (``xmlab3/source`` and ``source`` for ``.../imgs/xmlab3/source.jpg``), in ``source_image_id``'s form."""
    found = SOURCE_IMAGE_ID.search(_without_image_suffix(Path(str(path)).name))
    if found:
        return {found.group(0).lower()}
    parts = PurePosixPath(Path(str(path)).as_posix()).parts
    return {source_image_id("/".join(parts[start:])) for start in range(len(parts)) if parts[start] != "/"}


def question_image_ids(path: str | Path) -> set[str]:
    """``source_image_id`` of every image a question file (or each question file of a folder) names,
    from the JSON alone: the image files need not be present."""
    path = Path(path)
    files = vqa_files(path) if path.is_dir() else [path]
    if not files:
        raise DataError(path, "no VQA question file (.json with question, answer and image keys) in this folder")
    return {source_image_id(name) for file in files for index, raw in enumerate(_read_items(file))
            for name in _image_names(file, index, raw)}


def leave_out_images(dataset: Dataset, question_files: Sequence[str | Path]) -> tuple[Dataset, int]:
    """``dataset`` without the records whose image is one the question files ask about, and how many were
    left out: pretraining must not see the images a VQA benchmark scores (MedPix 2.0 and VQA-RAD share source
    images). An image is asked about when its MedPix ``synpic`` id is a question's, or, for a name without
    one, when its path ends with the question's image name (``source_image_id``: a SLAKE question about
    ``xmlab3/source.jpg`` leaves out ``.../xmlab3/source.jpg``, not every ``source.jpg``), or when its decoded
    pixels (as a model reads their channels, ``pixel_sha256``: an RGB export of a grey film is its copy) are those of
    a question's image file found in the question file's folder (a copy under another name:
    ``medvl phantom --vqa`` writes its films so; only training images of the same size are decoded). A question
    file none of whose images is found in ``dataset`` is warned about (the wrong file, or other images)."""
    files = [Path(path) for path in question_files]
    asked = {file: question_image_ids(file) for file in files}
    pixels = {file: _question_pixels(file) for file in files}
    sizes = {size for digests in pixels.values() for size in digests}
    digests: dict[Path, str | None] = {}  # a training image's pixel digest, when its size is a question image's
    found: set[Path] = set()
    kept = []
    for record in dataset:
        images = [Path(image) for image in record.images if isinstance(image, str | Path)]
        ids = set().union(*(_path_ids(image) for image in images))
        matched = {file for file in files if ids & asked[file]}
        for image in images if sizes else []:
            size = _image_size(image)
            if size in sizes:
                if image not in digests:
                    digests[image] = _pixel_digest(image)
                matched |= {file for file in files if digests[image] in pixels[file].get(size, set())}
        found |= matched
        if not matched:
            kept.append(record)
    for file in files:
        if file not in found:
            log.warning("none of the %d images %s asks about were found in the training data (by name or pixels): "
                        "check the file", len(asked[file]), file)
    return dataset.subset(kept), len(dataset) - len(kept)


def _question_pixels(path: Path) -> dict[tuple[int, ...] | None, set[str]]:
    """The pixel digests of the images a question file (or each question file of a folder) names that are found in
    its folder, by image size (``_image_size``); images missing or outside the folder are matched by name only."""
    files = vqa_files(path) if path.is_dir() else [path]
    found: dict[tuple[int, ...] | None, set[str]] = {}
    for file in files:
        root = file.parent.resolve()
        names = {name for index, raw in enumerate(_read_items(file)) for name in _image_names(file, index, raw)}
        for name in sorted(names):
            image = _resolve_image(file.parent, name)
            if image is not None and is_inside(image, root) and (digest := _pixel_digest(image)) is not None:
                found.setdefault(_image_size(image), set()).add(digest)
    return found


def _image_size(path: Path) -> tuple[int, ...] | None:
    """Width and height (sorted: an EXIF rotation swaps them) from the header of a file PIL reads, without decoding
    it; None for another kind of file (DICOM, NIfTI, NumPy) or one PIL cannot open."""
    try:
        with Image.open(path) as image:
            return tuple(sorted(image.size))
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def _pixel_digest(path: Path) -> str | None:
    """SHA-256 of an image file's decoded pixels as a model reads their channels (``pixel_sha256``: a grey picture
    saved as RGB of three equal channels is the grey picture), None if it cannot be read (training reads it again and
    names it)."""
    try:
        return pixel_sha256(read_image(path))
    except DataError:
        return None
