"""The case index: one protocol, two backends (FAISS + SQLite folder, PostgreSQL + pgvector).

An index holds, per case, a normalised image embedding, the embedding of its report text (when
it has one), and the case itself (id, split, labels, metadata, report, pixel hash, and the image's
path relative to its dataset's root: none for DICOM, see ``medvl.index.cases``).
Scores are cosine similarities (inner products of normalised vectors), higher is closer.

``info`` (``index.json`` in a FAISS folder, a row of ``medvl_indexes`` in Postgres) records the
model that made the vectors (folder, config and weights hashes, embedding size), the filter
columns with their types, per vector set the ANN kind chosen and its measured recall@10, and of
the data only a SHA-256 of its path (``data.source_sha256``): never a data path.
Format 1 indexes (before paths were stored relative) open read-only, their paths never shown.
docs/index-contents.md lists everything an index stores.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import weakref
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, Self

import numpy as np

from ..checks import check_number
from ..errors import DataError, InputError, ModelError
from ..models.config import non_default
from ..models.dual import weights_state
from .ann import FLAT, KINDS
from .cases import FIXED_COLUMNS, Case
from .urls import redact

log = logging.getLogger(__name__)

IMAGES, TEXTS = "images", "texts"  # the two vector sets: image embeddings, report embeddings
TARGETS = (IMAGES, TEXTS)
# 2: image paths relative to the dataset root (none for DICOM), the data recorded by a hash of its path
INFO_FORMAT = 2
LEGACY_FORMAT = 1  # absolute image paths and the data's path: readable, never shown, not writable
MAX_K = 10_000


@dataclass
class Hit:
    """One search result: the case and its cosine similarity to the query."""

    id: str
    score: float
    split: str
    labels: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    text: str | None = field(default=None, repr=False)  # report: patient data, never logged
    image_path: str | None = None  # relative to the dataset root (``resolve_image``); None if not stored
    # the indexed image's pixel hash (``pixel_sha256``): what ``resolve_image`` checks a file found at
    # ``image_path`` against; not part of ``to_dict`` (search outputs list the case, not its hash)
    image_sha256: str | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        found = asdict(self)
        del found["image_sha256"]
        return found


class IndexBase:
    """What the backends share: ``info`` (the index's recorded description), context manager."""

    info: dict[str, Any]

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def dim(self) -> int:
        return int(self.info["embed_dim"])

    @property
    def columns(self) -> dict[str, str]:
        return {**FIXED_COLUMNS, **self.info["columns"]}


class Index(Protocol):
    """What every backend implements. Changes are staged until ``save()`` makes them visible at
    once (a folder swap, or one transaction); readers never see half an update."""

    info: dict[str, Any]
    location: str  # the folder, or the URL without its password, for messages

    @property
    def dim(self) -> int: ...

    @property
    def columns(self) -> dict[str, str]:
        """Filter columns usable in ``where``: name -> ``number`` | ``text``."""
        ...

    def __len__(self) -> int: ...

    def add(self, cases: Sequence[Case], vectors: np.ndarray, text_vectors: np.ndarray | None = None) -> None:
        """Add cases with their image embeddings (N, dim) and report embeddings (N, dim; rows of
        cases without text are ignored). A case id already present is an ``InputError``."""
        ...

    def search(self, vectors: np.ndarray, k: int = 10, where: str | None = None,
               target: str = IMAGES) -> list[list[Hit]]:
        """The ``k`` nearest cases of each query vector among image (or report) embeddings,
        optionally restricted by a ``where`` filter (see ``medvl.index.where``)."""
        ...

    def delete(self, ids: Sequence[str]) -> int:
        """Remove cases by id; returns how many were present."""
        ...

    def existing_ids(self, ids: Sequence[str]) -> set[str]: ...

    def stored_contents(self, ids: Sequence[str]) -> dict[str, tuple[str | None, str | None, str, str, str | None]]:
        """Id -> (pixel hash, report, labels and metadata as JSON with sorted keys, split) of the indexed cases among
        ``ids``: what tells a case added again apart from another case (or a corrected one) under the same id."""
        ...

    def find_images(self, hashes: Sequence[str]) -> dict[str, list[str]]:
        """Pixel hash -> the ids of every indexed case with that image (sorted; more than one when the index was
        built with duplicates allowed), for the hashes present."""
        ...

    def label_counts(self) -> list[tuple[dict[str, Any], int]]:
        """Each distinct labels object of the indexed cases with how many cases hold it: the index's label
        distribution, read from the case table (one grouped query, whatever the index's size)."""
        ...

    def case_labels(self, ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """Id -> labels of the indexed cases among ``ids``."""
        ...

    def case_ids(self, keys: Collection[str]) -> dict[str, list[str]]:
        """Case (``cases.case_key`` of an indexed image's metadata: its ``case_id`` or ``patient_id``) -> the sorted
        ids of its indexed images, for the ``keys`` the index holds. Reads every row's metadata (one pass): a case
        key need not be a filter column (an index keeps at most ``MAX_FILTER_COLUMNS`` of them)."""
        ...

    def save(self) -> None: ...

    def follow_rebuild(self) -> None:
        """Read the index again if another process changed it since (a rebuild, an edit), for a long-lived reader
        between searches; ``IndexRebuilt`` when another model built the new version, a ``DataError`` when it cannot
        be read (the version held is kept). A writable index holds the writers' lock: nothing to follow."""
        ...

    def close(self) -> None: ...

    def __enter__(self) -> Self: ...

    def __exit__(self, *exc: object) -> None:
        """Closes the index (without saving: unsaved changes are dropped)."""
        ...


def ids_by_hash(rows: Sequence[tuple[str, str]]) -> dict[str, list[str]]:
    """(pixel hash, id) rows as hash -> sorted ids (``Index.find_images``)."""
    found: dict[str, list[str]] = {}
    for digest, case_id in rows:
        found.setdefault(digest, []).append(case_id)
    return {digest: sorted(ids) for digest, ids in found.items()}


def is_url(target: str | Path) -> bool:
    """True for a PostgreSQL URL (a pgvector index), False for a folder (``medvl.index.backends``)."""
    return isinstance(target, str) and target.startswith(("postgresql://", "postgres://"))


def model_fingerprint(model, model_dir: str | Path | None = None) -> dict[str, Any]:
    """What identifies the vectors a model makes: config, weights and tokenizer hashes, embedding size."""
    config = json.dumps(non_default(model.config.to_dict(), type(model.config)().to_dict()), sort_keys=True).encode()
    return {"dir": str(Path(model_dir).resolve()) if model_dir else None, "name": model.config.name,
            "embed_dim": model.config.embed_dim, "config_sha256": hashlib.sha256(config).hexdigest(),
            "weights_sha256": weights_sha256(model), "tokenizer_sha256": tokenizer_sha256(model)}


# tokenizer -> (its size, digest): the vocabulary is hashed once per loaded tokenizer, not on each search
_TOKENIZER_SHA256: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def tokenizer_sha256(model) -> str | None:
    """SHA-256 of how a model's text tower turns a text into token ids: its tokenizer's vocabulary (token -> id) and,
    for a fast tokenizer, its normaliser, pre-tokeniser, model settings and post-processor (not its padding and
    truncation, which each call sets, side included: ``TextEncoder`` pads and cuts on the right); None for a model
    without a tokenizer. The weights do not cover it: a vocabulary edited in the model folder's ``text/`` (ids
    moved, lower-casing off) makes other vectors of a text."""
    encoder = getattr(model, "text_encoder", None)
    tokenizer = getattr(encoder if encoder is not None else model, "tokenizer", None)
    if tokenizer is None or not hasattr(tokenizer, "get_vocab"):
        return None
    try:
        cached = _TOKENIZER_SHA256.get(tokenizer)
    except TypeError:  # not weakly referable: hashed each time
        cached = None
    if cached is not None and cached[0] == len(tokenizer):
        return str(cached[1])
    state: dict[str, Any] = {"vocab": sorted(tokenizer.get_vocab().items())}
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        saved = json.loads(backend.to_str())
        state.update({key: saved.get(key) for key in ("normalizer", "pre_tokenizer", "post_processor")})
        state["model"] = {key: value for key, value in (saved.get("model") or {}).items()
                          if key not in ("vocab", "merges")}  # the vocabulary is above; merges follow from it
    digest = hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()
    try:
        _TOKENIZER_SHA256[tokenizer] = (len(tokenizer), digest)
    except TypeError:
        pass
    return digest


def vqa_fingerprint(model) -> dict[str, str | None]:
    """What tells a VQA model from another under the same folder name (``/v1/models``' ``vqa.fingerprint``), as
    ``model_fingerprint`` tells a dual encoder: the SHA-256 of its config, its weights and its tokenizer
    (``tokenizer_sha256``). A medvl VQA model's config is taken with its answer vocabulary and answer types (its
    answer head's rows); a transformers VLM's (``models.vlm.VisionLanguageModel``) is the model's config (its folder's
    path left out), its processor's image settings and its chat template. The weights are hashed once per loaded
    model (``weights_sha256``): a VLM's billions of them take a while, at the service's start."""
    processor = getattr(model, "processor", None)
    if processor is None:  # a medvl VQA model
        network = model
        config: dict[str, Any] = {"config": non_default(model.config.to_dict(), type(model.config)().to_dict()),
                                  "answers": model.meta.get("answers"), "answer_types": model.meta.get("answer_types")}
    else:
        network = model.model
        image_processor: Any = getattr(processor, "image_processor", None)
        config = {"model": {key: value for key, value in network.config.to_dict().items() if key != "_name_or_path"},
                  "image_processor": image_processor.to_dict() if image_processor is not None else None,
                  "chat_template": getattr(processor, "chat_template", None)}
    return {"config_sha256": hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest(),
            "weights_sha256": weights_sha256(network), "tokenizer_sha256": tokenizer_sha256(model)}


# model -> (weights' state, digest): hashing every weight on each search was most of a small query's time
_WEIGHTS_SHA256: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_WEIGHTS_LOCK = threading.Lock()


def weights_sha256(model) -> str:
    """SHA-256 of a model's weights (names and bytes, in name order), computed once per loaded model.

    The digest is kept with the weights' state: each tensor's storage address and version counter
    (which every in-place change bumps: an optimizer step, ``load_state_dict``, ``copy_``). It is
    recomputed only when that state changes, so a model trained further is hashed again.
    """
    key = weights_state(model)
    with _WEIGHTS_LOCK:
        cached = _WEIGHTS_SHA256.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]
    weights = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        weights.update(name.encode())
        weights.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    with _WEIGHTS_LOCK:
        _WEIGHTS_SHA256[model] = (key, weights.hexdigest())
    return weights.hexdigest()


def check_model(info: dict[str, Any], model, where: str) -> None:
    """ModelError unless ``model`` makes the same vectors as the model the index was built with."""
    built = info["model"]
    if model.config.embed_dim != info["embed_dim"]:
        raise ModelError(f"{where}: index holds {info['embed_dim']}-d vectors but the model embeds "
                         f"{model.config.embed_dim}-d; use the model the index was built with "
                         f"({built.get('dir') or built.get('name')})")
    what = fingerprint_differs(built, model)
    if what is not None:
        verb = "differ" if what == "weights" else "differs"  # config | weights | tokenizer
        raise ModelError(f"{where}: the model's {what} {verb} from the {what} the index was built with "
                         f"({built.get('dir') or built.get('name')}); rebuild the index or use that model")


def note_vector_counts(info: dict[str, Any], counts: dict[str, int]) -> None:
    """After an add or delete, set each vector set's ``n`` to the vectors it holds now (``counts``: target ->
    count). The build measured ``recall_at_10`` on the vectors it had: that figure stays, with the count it was
    measured on (``recall_measured_on``) and ``recall_stale`` true once an approximate index has changed since
    (``index add`` does not retrain an IVF-PQ index's quantizers, so its recall may have dropped well below)."""
    for target, count in counts.items():
        block = info.get(target)
        if isinstance(block, dict):
            block.setdefault("recall_measured_on", block["n"])
            block["n"] = int(count)
            block["recall_stale"] = block["kind"] != FLAT and block["n"] != block["recall_measured_on"]


def with_recall_status(info: dict[str, Any]) -> dict[str, Any]:
    """``info`` with ``recall_measured_on`` and ``recall_stale`` in each vector set, also for an index changed
    before they were recorded (its image vectors' ``n`` is then the build's, against ``n_cases`` now)."""
    described = json.loads(json.dumps(info))
    for target in (IMAGES, TEXTS):
        block = described.get(target)
        if isinstance(block, dict) and "recall_measured_on" not in block:
            now = described.get("n_cases", block["n"]) if target == IMAGES else block["n"]
            note_vector_counts(described, {target: now})
    return described


class IndexGone(DataError):
    """An index's data is missing from its store: a PostgreSQL ``medvl_indexes`` row without its table (dropped, or
    left out of a restore), or, for a reader opened before, the row too. A server-side condition: the service
    answers 503 with the reason (``status``); the CLI exits 2 with it."""

    status = 503


class IndexDamaged(DataError):
    """An index's case table cannot be read: a damaged SQLite file, a cell that is not UTF-8 text or not the JSON
    object it should hold, a missing column. The message names the file and the column, never a cell's content (a
    report, labels, an id: SQLite's own message quotes the cell). A server-side condition, as ``IndexGone``: the
    service answers 503 with the reason and ``/v1/health`` stops saying the index is ok; the CLI exits 2 with it."""

    status = 503


class IndexRebuilt(ModelError):
    """An index opened for search was rebuilt, by another process, with another model than the one it was opened
    with (a PostgreSQL table swapped under a running service): query vectors of the model checked at opening would
    be ranked against vectors of another. Reopening it with the model it was built with is the way on."""


def model_changed(opened: dict[str, Any], current: dict[str, Any], location: str) -> None:
    """``IndexRebuilt`` when the index info ``current`` records another model (embedding size, config or weights)
    than ``opened``, the info the index was opened (and its model checked) with."""
    keys = ("embed_dim", "config_sha256", "weights_sha256", "tokenizer_sha256")
    before, now = opened.get("model") or {}, current.get("model") or {}
    if opened.get("embed_dim") == current.get("embed_dim") and all(before.get(k) == now.get(k) for k in keys):
        return
    raise IndexRebuilt(f"{location}: the index was rebuilt with another model since it was opened "
                       f"({now.get('dir') or now.get('name')}); its vectors no longer match the model checked "
                       "against it: reopen it with the model it was built with")


def fingerprint_differs(fingerprint: dict[str, Any], model) -> str | None:
    """``config``, ``weights`` or ``tokenizer`` when ``model`` is not the model ``fingerprint`` (``model_fingerprint``)
    describes, else None: what an index, or a concept bottleneck, was made with. A fingerprint from before tokenizers
    were hashed (no ``tokenizer_sha256``) is compared on config and weights."""
    ours = model_fingerprint(model)
    if ours["config_sha256"] != fingerprint.get("config_sha256"):
        return "config"
    if ours["weights_sha256"] != fingerprint.get("weights_sha256"):
        return "weights"
    recorded = fingerprint.get("tokenizer_sha256")
    return "tokenizer" if recorded is not None and ours["tokenizer_sha256"] != recorded else None


def check_vectors(vectors: np.ndarray, dim: int, what: str = "query") -> np.ndarray:
    """A float32 (N, dim) C-contiguous copy, or InputError naming the expected shape."""
    array = np.asarray(vectors, dtype=np.float32)
    if array.ndim == 1:
        array = array[None]
    if array.ndim != 2 or array.shape[1] != dim:
        raise InputError(f"{what} vectors have shape {tuple(np.shape(vectors))}; this index expects (N, {dim})")
    if not np.isfinite(array).all():
        raise InputError(f"{what} vectors contain NaN or infinite values")
    return np.ascontiguousarray(array)


def check_target(target: str) -> None:
    if target not in TARGETS:
        raise InputError(f"unknown search target {target!r}; choose one of {', '.join(TARGETS)}")


def check_k(k: int) -> None:
    check_number("k", k, minimum=1, maximum=MAX_K, integer=True)


# how many cases past the cut ``in_id_order`` fetches at most to settle a tie there (a case indexed this many
# times over is cut by its search position, not its id)
TIE_EXTRA_MAX = 1024


def in_id_order(nearest: Callable[[int], list[list[Hit]]], k: int) -> list[list[Hit]]:
    """The ``k`` best hits of each query with equal scores in case-id order, whatever the backend, the ANN kind or
    ``k``: ``nearest(n)`` (a backend's search for its ``n`` nearest) is asked for more than ``k`` until no query's
    score at the cut is tied with the next one (so the cases of a tie that straddles the cut are the lowest ids,
    not those a heap happened to keep), at most ``TIE_EXTRA_MAX`` past ``k``."""
    wanted = k + 1
    while True:
        rows = nearest(wanted)
        tied = any(len(row) == wanted and row[k - 1].score == row[-1].score for row in rows)
        if not tied or wanted - k >= TIE_EXTRA_MAX:
            return [sorted(row, key=lambda hit: (-hit.score, hit.id))[:k] for row in rows]
        wanted = min(k + 2 * (wanted - k), k + TIE_EXTRA_MAX)


def check_neighbour_options(index: object, k: int | None) -> None:
    """InputError for ``k`` (nearest cases to list) without ``index`` (it would be ignored) or out of range; a
    command calls it before its slow work (``medvl explain``, ``medvl vqa``)."""
    if index is None and k is not None:
        raise InputError("--k (nearest cases to list) needs --index (the case index to search)")
    if k is not None:
        check_k(k)


def path_sha256(path: str | Path) -> str:
    """SHA-256 of a path made absolute: tells whether two indexes came from the same place without
    naming it (a guessed path can still be confirmed, so it is not a secret). The path's bytes are hashed: a
    name may hold bytes that are not UTF-8."""
    return hashlib.sha256(os.fsencode(os.path.abspath(path))).hexdigest()


def info_sha256(info: dict[str, Any]) -> str:
    """SHA-256 of an index's info (``index.json``, or a PostgreSQL index's ``medvl_indexes`` row) without the model
    folder's path: changes with a rebuild (its time, its files' digests, its size, the model's fingerprint) and an
    edit, never with where the index or the model lies, and names no path (``/v1/models``' index ``sha256``)."""
    model = {key: value for key, value in (info.get("model") or {}).items() if key != "dir"}
    kept = {**info, "model": model}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()


def shown_location(target: str | Path) -> str:
    """How the terminal names an index: a folder as given, a PostgreSQL URL without its password."""
    return redact(str(target)) if is_url(target) else str(target)


def describe_target(target: str | Path) -> str:
    """How outputs (``--json``) name an index, dataset or query file: a Postgres URL without its
    password, else the last path component only (the folders above may name a patient)."""
    if is_url(target):
        return redact(str(target))
    return Path(target).name


DAMAGED = "a damaged index: rebuild it with `medvl index build`"


def check_info_format(info: dict[str, Any], location: str, writable: bool, source: str | None = None
                      ) -> dict[str, Any]:
    """The info of a readable index; a format 1 index (absolute paths) loses its data path here,
    and opening it for writing is a DataError saying to rebuild it. A damaged info (a field missing or of
    the wrong type) is a DataError naming ``source`` (the info's file, default ``location``) and the field."""
    source = source or location
    try:
        check_number("embed_dim", info.get("embed_dim"), minimum=1, integer=True)
    except InputError as err:
        raise DataError(source, f"{err} ({DAMAGED})") from None
    columns = info.get("columns")
    if not isinstance(columns, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in columns.items()):
        raise DataError(source, f"columns must map each filter column to its type ({DAMAGED})")
    _check_model_block(info.get("model"), source)
    for target in TARGETS:
        _check_vector_set(info, target, source)
    if info.get("format") == INFO_FORMAT:
        return info
    if info.get("format") != LEGACY_FORMAT:
        raise DataError(location, f"index format {info.get('format')!r} is not one this medvl reads "
                                  f"({LEGACY_FORMAT} or {INFO_FORMAT})")
    if writable:
        raise DataError(location, "index built by an older medvl that stored full image paths; rebuild it with "
                                  "`medvl index build` before adding or deleting cases")
    log.warning("%s: index built by an older medvl stores full image paths (not shown); rebuild it", location)
    data = info.get("data")
    return {**info, "data": {"source_sha256": path_sha256(data)} if isinstance(data, str) else data}


def _check_model_block(model: Any, source: str) -> None:
    """DataError unless ``model`` is a model fingerprint (``model_fingerprint``): queries are checked against it."""
    if not isinstance(model, dict):
        got = "missing" if model is None else f"a {type(model).__name__}, not an object"
        raise DataError(source, f"model is {got}: it must describe the model the index was built with ({DAMAGED})")
    # the hashes may be missing (an index of synthetic vectors, benchmarks/retrieval.py): check_model refuses any model
    for key in ("dir", "name", "config_sha256", "weights_sha256"):
        if not isinstance(model.get(key), str | None):
            raise DataError(source, f"model.{key} must be a string, got {model.get(key)!r} ({DAMAGED})")


def _check_vector_set(info: dict[str, Any], target: str, source: str) -> None:
    """DataError unless ``info[target]`` describes a vector set (ANN kind, size, recall): every index has
    ``images`` (a build of no case is refused), ``texts`` when a case has a report."""
    block = info.get(target)
    if block is None and target == TEXTS:
        return
    if not isinstance(block, dict):
        got = "missing" if block is None else f"a {type(block).__name__}, not an object"
        vectors = "image" if target == IMAGES else "report"
        raise DataError(source, f"{target} is {got}: it must describe the index's {vectors} vectors ({DAMAGED})")
    if block.get("kind") not in KINDS:
        raise DataError(source, f"{target}.kind must be one of {', '.join(KINDS)}, got {block.get('kind')!r} "
                                f"({DAMAGED})")
    try:
        check_number(f"{target}.n", block.get("n"), minimum=0, integer=True)
        check_number(f"{target}.recall_at_10", block.get("recall_at_10"), minimum=0, maximum=1)
    except InputError as err:
        raise DataError(source, f"{err} ({DAMAGED})") from None
