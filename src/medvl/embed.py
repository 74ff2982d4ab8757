"""Embedding a dataset's images and texts with a model, batched, with a progress bar."""

from __future__ import annotations

import weakref

import torch

from .data.record import Dataset
from .models.dual import DualEncoder
from .progress import progress_bar


def embed_images(model: DualEncoder, dataset: Dataset, batch_size: int = 64,
                 features: bool = False, show_progress: bool = True) -> torch.Tensor:
    """Normalised embeddings (or backbone features) of every record's first image, in order."""
    chunks = []
    with progress_bar("Embedding images", total=len(dataset), enabled=show_progress) as advance:
        for start in range(0, len(dataset), batch_size):
            records = dataset.records[start:start + batch_size]
            pixels = model.preprocessor.load_many([r.image for r in records])
            chunks.append(model.encode_images(pixels, batch_size=batch_size, features=features))
            advance(len(records))
    dim = model.image_encoder.num_features if features else model.config.embed_dim
    return torch.cat(chunks) if chunks else torch.empty(0, dim)


# model -> (its weights' state, {prompts: class embeddings}): an evaluation with its checks scores the
# same classes many times (zero-shot, calibration, sanity, each corruption), each time encoding the prompts
_CLASS_EMBEDDINGS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def class_embeddings(model: DualEncoder, prompts: list[list[str]]) -> torch.Tensor:
    """One normalised embedding per class: the mean of its prompt-ensemble embeddings.

    Outside training, the result is kept per model and prompts until a weight of the model changes
    (every in-place change bumps a tensor's version counter: an optimizer step, ``load_state_dict``)."""
    if model.training and torch.is_grad_enabled():
        return _class_embeddings(model, prompts)
    parameters = model.parameters() if isinstance(model, torch.nn.Module) else ()
    state = tuple((p.data_ptr(), p._version) for p in parameters)
    key = tuple(tuple(class_prompts) for class_prompts in prompts)
    try:
        cached = _CLASS_EMBEDDINGS.get(model)
    except TypeError:  # an object that cannot be weakly referenced: no cache
        return _class_embeddings(model, prompts)
    if cached is None or cached[0] != state:
        cached = (state, dict[tuple[tuple[str, ...], ...], torch.Tensor]())
        _CLASS_EMBEDDINGS[model] = cached
    if key not in cached[1]:
        cached[1][key] = _class_embeddings(model, prompts)
    return cached[1][key].clone()


def _class_embeddings(model: DualEncoder, prompts: list[list[str]]) -> torch.Tensor:
    rows = [model.encode_texts(class_prompts).mean(0) for class_prompts in prompts]
    return torch.nn.functional.normalize(torch.stack(rows), dim=-1)
