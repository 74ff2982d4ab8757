"""Similar-case search: embed a query image or text with the index's model and look it up.

Directions: image -> images (similar cases), text -> images (cases matching a description),
image -> texts (reports of similar cases), text -> texts.

A hit's ``image_path`` is relative to the root of the dataset the case was indexed from (None for
DICOM); ``resolve_image(hit, data_root)`` finds the file under a data root the user gives, and checks that
it still holds the indexed image.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.images import image_suffix, read_image
from ..embed import check_text_read_whole
from ..errors import DataError, InputError
from .base import IMAGES, MAX_K, Hit, Index, check_k, check_model, check_target
from .build import nifti_sha256
from .cases import case_key, pixel_sha256s, public_image_path


def index_model(index: Index, model_dir: str | Path | None = None, backend: str = "torch",
                option: str | None = None):
    """The model to embed queries for ``index``: ``model_dir`` when given, else the model folder the
    index was built with (``index.json``'s ``model.dir``), run on ``backend`` (see ``load_model``);
    ``check_model`` then makes sure it matches. A recorded folder that is no longer there (moved, deleted) is a
    ModelError saying it is the index's, and that ``option`` (the caller's way to give ``model_dir``, e.g.
    ``--model``) gives its new place, or without one to put it back."""
    from ..errors import ModelError
    from ..models.registry import load_model

    if model_dir:
        return load_model(model_dir, backend=backend)
    folder = index.info["model"].get("dir")
    if not folder:
        raise ModelError(f"{index.location}: the index does not name its model folder; pass --model")
    if not Path(folder).is_dir():
        how = f"pass its new place with {option} (Python: model_dir=)" if option else "put it back where it was"
        raise ModelError(f"{index.location} was built with the model at {folder}, which is gone (moved or deleted); "
                         f"{how}")
    return load_model(folder, backend=backend)


def check_one_query(image: object, text: str | None) -> None:
    """InputError unless exactly one of an image and a text is given."""
    if (image is None) == (text is None):
        raise InputError("give exactly one query: an image or a text")


def embed_query(model, image: str | Path | np.ndarray | torch.Tensor | None = None,
                text: str | None = None) -> np.ndarray:
    """The (1, D) embedding of one query image (a file, an array, or the model's own preprocessing of one:
    ``model.preprocessor.load``'s (C, *spatial) tensor, for a caller that checked it) or one text; a text longer
    than the model's text tower reads is an InputError (``check_text_read_whole``)."""
    check_one_query(image, text)
    if text is not None:
        if not text.strip():
            raise InputError("the query text is empty")
        check_text_read_whole(model, text)  # cut, two queries differing past the cut would get the same hits
        return model.encode_texts([text]).numpy()
    if image is None:
        raise InputError("give exactly one query: an image or a text")
    if isinstance(image, torch.Tensor):
        return model.encode_images(image[None]).numpy()
    return model.encode_images(model.preprocessor.load(image)[None]).numpy()  # an error names the file


def search_index(index: Index, model, image: str | Path | np.ndarray | torch.Tensor | None = None,
                 text: str | None = None, k: int = 10, where: str | None = None, target: str = IMAGES,
                 verify_model: bool = True) -> list[Hit]:
    """The ``k`` cases closest to the query among ``target`` (``images`` or ``texts``) vectors.

    The model must be the one the index was built with (same embedding size, config and weights),
    else ``ModelError``; ``where`` filters cases first (see ``medvl.index.where``). ``verify_model=False``
    skips that check, for a caller that made it once for a model whose weights do not change (a service
    checks at start: reading the model's fingerprint costs a third of a millisecond per query).
    """
    check_k(k)
    check_target(target)
    if verify_model:
        check_model(index.info, model, index.location)
    return index.search(embed_query(model, image, text), k=k, where=where, target=target)[0]


def search_without_copies(index: Index, vector: np.ndarray, k: int, digests: Sequence[str], where: str | None = None,
                          exclude: Iterable[str] = ()) -> tuple[list[Hit], list[str]]:
    """The ``k`` cases nearest to one query image's (1, D) ``vector`` (among those ``where`` allows) less the indexed
    copies of the image itself and the ids ``exclude`` names, and the ids of those copies: the cases whose pixel hash
    is one of ``digests``, those an index may record for the query (``build.hashed_image``: of the image as the model
    reads its channels, so a grey film re-saved as RGB is a copy, and an older index's; empty: none left out). Nearest
    cases shown as evidence about an image (``medvl explain``, ``medvl vqa``, the neighbours ``medvl report draft``
    drafts from) must not be the image: similarity 1.000 is circular, and it takes one of the ``k`` places."""
    check_k(k)
    found = index.find_images([digest for digest in digests if digest]) if digests else {}
    copies = sorted({case_id for ids in found.values() for case_id in ids})
    dropped = set(exclude) | set(copies)
    hits = index.search(vector, k=min(k + len(dropped), MAX_K), where=where)[0]
    return [hit for hit in hits if hit.id not in dropped][:k], copies


SEARCH_MARGIN = 32  # images searched beyond k at first, so that k usually remain after the exclusions


def hit_case(hit: Hit) -> str:
    """The case an indexed image belongs to, for counting a query's neighbours by case: its metadata's case or patient
    (``cases.case_key``: MedPix's ``case_id``) when it has one, else the image itself. Not its report text: templated
    reports ("No acute cardiopulmonary abnormality.") are shared by many patients (925 of IU X-ray's 3,927 reports
    repeat another's), and counting them once outvoted six normal patients with four abnormal ones. The drafts'
    privacy rules count identical report texts once instead (``rag.draft.report_key``)."""
    return case_of(hit.id, hit.meta)


def case_of(image_id: str, meta: dict[str, Any]) -> str:
    """``hit_case`` of an indexed image given by its id and metadata."""
    key = case_key(meta)
    return f"case:{key}" if key is not None else f"id:{image_id}"


def own_cases(index: Index, ids: Sequence[str]) -> set[str]:
    """The cases (``hit_case``) of the indexed images ``ids``."""
    stored = index.stored_contents(list(ids)) if ids else {}
    return {case_of(image_id, json.loads(contents[3])) for image_id, contents in stored.items()}


def search_other_cases(index: Index, vector: np.ndarray, k: int, digests: Sequence[str], where: str | None = None,
                       exclude: Iterable[str] = ()) -> tuple[list[Hit], list[str], list[str]]:
    """The images of the ``k`` nearest cases (``hit_case``) to one query image, nearest first, up to the nearest image
    of the k-th case (a case's other images nearer than that are among them), less the query's indexed copies, the
    ids ``exclude`` names (``search_without_copies``) and every other image of a copy's case (``own_cases``: its case
    id); with the ids of the copies and of the other images of their case left out.
    Searched deeper until k cases are found or every case ``where`` allows was: a case's many images (MedPix's up to
    15) would otherwise take the places of other cases."""
    check_k(k)
    found = index.find_images([digest for digest in digests if digest]) if digests else {}
    copies = sorted({case_id for ids in found.values() for case_id in ids})
    dropped, own = set(exclude) | set(copies), own_cases(index, copies)
    total = min(len(index), MAX_K)
    depth = min(total, k + len(dropped) + SEARCH_MARGIN)
    while True:
        hits = index.search(vector, k=max(depth, 1), where=where)[0]
        siblings = [hit.id for hit in hits if hit.id not in dropped and hit_case(hit) in own]
        kept = [hit for hit in hits if hit.id not in dropped and hit.id not in siblings]
        nearest = first_cases(kept, k)
        if len({hit_case(hit) for hit in nearest}) >= k or len(hits) < depth or depth >= total:
            return nearest, copies, sorted(siblings)
        depth = min(total, 2 * depth)


def first_cases(hits: list[Hit], k: int) -> list[Hit]:
    """``hits`` (nearest first) up to the first image of the k-th case (``hit_case``)."""
    seen: set[str] = set()
    for position, hit in enumerate(hits):
        seen.add(hit_case(hit))
        if len(seen) == k:
            return hits[:position + 1]
    return hits


def shown_columns(index: Index, names: list[str]) -> list[str]:
    """The metadata columns ``names`` (as given to ``--show``) under the names the index knows them by: its filter
    columns (any case, as ``where`` reads them) or its label columns; InputError naming the columns for any other
    (a typo would show a column of blanks, as if no case had a value)."""
    known = {name.lower(): name for name in [*index.info.get("label_columns", []), *index.columns]}
    unknown = [name for name in names if name.lower() not in known]
    if unknown:
        raise InputError(f"unknown column {unknown[0]!r} to show (columns: {', '.join(sorted(known.values()))})")
    return [known[name.lower()] for name in names]


def hit_value(hit: Hit, column: str) -> Any:
    """A hit's value of a shown column (``shown_columns``): its metadata or label of that name, in any case;
    the id and split for those; None when the case has none."""
    if column in ("id", "split"):
        return getattr(hit, column)
    for values in (hit.meta, hit.labels):
        found = next((value for key, value in values.items() if str(key).lower() == column.lower()), None)
        if found is not None:
            return found
    return None


class ImageChanged(DataError):
    """The file at a case's stored image path is not the image that was indexed (its pixel hash differs): the
    case was replaced (``medvl index add --replace``) from another folder that has its own file at that path, or
    the file was overwritten since. Showing it as the case's image would show another patient's."""


def resolve_image(hit: Hit, data_root: str | Path) -> Path | None:
    """The image file of a hit under ``data_root`` (the folder of the dataset it was indexed from),
    or None when the index stores no path for it (DICOM, arrays). A stored path that would leave
    ``data_root`` (absolute, ``..``, a symlink out) is an InputError; a missing file a DataError; a file whose
    pixels are not the indexed image's (``hit.image_sha256``; unreadable counts as not) an ``ImageChanged``.
    A hit that carries no pixel hash (one made by hand) is not checked."""
    relative = public_image_path(hit.image_path)
    if hit.image_path is None:
        return None
    root = Path(data_root).resolve()
    if relative is None or not (root / relative).resolve().is_relative_to(root):
        raise InputError(f"case {hit.id!r}: its stored image path leaves the data root; refusing it")
    path = root / relative
    if not path.is_file():
        raise DataError(path, f"image of case {hit.id!r} not found under the data root {data_root}")
    if hit.image_sha256 is not None and hit.image_sha256 not in file_pixel_sha256s(path):
        raise ImageChanged(path, f"not the indexed image of case {hit.id!r} (the file under the data root holds "
                                 "other pixels: replaced from another folder, or overwritten since indexing)")
    return path


# (real path, device, inode, size, mtime in ns) -> pixel hashes, none for a file that cannot be read: a file is
# decoded once while it stays as it is, so thumbnails and repeated searches stay fast
_FILE_HASHES: OrderedDict[tuple, tuple[str, ...]] = OrderedDict()
_FILE_HASHES_LOCK = threading.Lock()
MAX_CACHED_HASHES = 65_536


def file_pixel_sha256s(path: str | Path) -> tuple[str, ...]:
    """The pixel hashes an index may record for the image file ``path`` (``pixel_sha256s`` of its decoded pixels:
    this code's, then an older index's where it differs; a NIfTI volume's ``nifti_sha256``), none when it cannot be
    read. Cached per file and its size and modification time, so a file rewritten since is decoded again."""
    real = Path(path).resolve()
    status = real.stat()
    key = (str(real), status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns)
    with _FILE_HASHES_LOCK:
        if key in _FILE_HASHES:
            _FILE_HASHES.move_to_end(key)
            return _FILE_HASHES[key]
    digests = _decoded_sha256s(real)
    with _FILE_HASHES_LOCK:
        _FILE_HASHES[key] = digests
        while len(_FILE_HASHES) > MAX_CACHED_HASHES:
            _FILE_HASHES.popitem(last=False)
    return digests


def _decoded_sha256s(path: Path) -> tuple[str, ...]:
    """``file_pixel_sha256s`` uncached: the file read as ``medvl.index.build`` read it when indexing (a stored path
    is never a DICOM file's, so no model's reading of DICOM values matters)."""
    try:
        if image_suffix(path) in (".nii", ".nii.gz"):
            return (nifti_sha256(path),)
        return pixel_sha256s(read_image(path))
    except DataError:
        return ()
