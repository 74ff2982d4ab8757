"""Similar-case search: embed a query image or text with the index's model and look it up.

Directions: image -> images (similar cases), text -> images (cases matching a description),
image -> texts (reports of similar cases), text -> texts.

A hit's ``image_path`` is relative to the root of the dataset the case was indexed from (None for
DICOM); ``resolve_image(hit, data_root)`` finds the file under a data root the user gives.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import DataError, InputError
from .base import IMAGES, Hit, Index, check_k, check_model, check_target
from .cases import public_image_path


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
    ``model.preprocessor.load``'s (C, *spatial) tensor, for a caller that checked it) or one text."""
    check_one_query(image, text)
    if text is not None:
        if not text.strip():
            raise InputError("the query text is empty")
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


def resolve_image(hit: Hit, data_root: str | Path) -> Path | None:
    """The image file of a hit under ``data_root`` (the folder of the dataset it was indexed from),
    or None when the index stores no path for it (DICOM, arrays). A stored path that would leave
    ``data_root`` (absolute, ``..``, a symlink out) is an InputError; a missing file a DataError."""
    relative = public_image_path(hit.image_path)
    if hit.image_path is None:
        return None
    root = Path(data_root).resolve()
    if relative is None or not (root / relative).resolve().is_relative_to(root):
        raise InputError(f"case {hit.id!r}: its stored image path leaves the data root; refusing it")
    path = root / relative
    if not path.is_file():
        raise DataError(path, f"image of case {hit.id!r} not found under the data root {data_root}")
    return path
