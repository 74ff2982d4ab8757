"""Embedding a dataset's images and texts with a model, batched, with a progress bar."""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Sequence

import torch

from .data.audit import input_flags
from .data.loading import image_sources, pixel_batches
from .data.record import Dataset
from .errors import InputError
from .models.dual import DualEncoder, weights_state
from .models.text import count_read_cut
from .progress import progress_bar


def embed_images(model: DualEncoder, dataset: Dataset, batch_size: int = 64,
                 features: bool = False, show_progress: bool = True, workers: int | None = None,
                 content: list[dict[str, str]] | None = None) -> torch.Tensor:
    """Normalised embeddings (or backbone features) of every record's first image, in order; the
    images are read by ``workers`` processes ahead of the model (``medvl.data.loading``; None: auto).
    ``content``, a list, gets each image's ``input_flags`` (blank or streaked as the model sees it)."""
    chunks = []
    images = [record.image for record in dataset.records]
    with progress_bar("Embedding images", total=len(dataset), enabled=show_progress) as advance:
        for pixels in pixel_batches(model.preprocessor, images, batch_size, workers, image_sources(dataset)):
            if content is not None:
                content.extend(input_flags(image.numpy()) for image in pixels)
            chunks.append(model.encode_images(pixels, batch_size=batch_size, features=features))
            advance(len(pixels))
    dim = model.image_encoder.num_features if features else model.config.embed_dim
    return torch.cat(chunks) if chunks else torch.empty(0, dim)


def check_text_read_whole(model, text: str, name: str = "the query text") -> None:
    """InputError when ``text`` has more tokens than the model's text tower reads (``text_read_length``, the rule
    VQA questions and concept phrases follow): the rest would be cut unread, and two texts differing only there
    would be one query. The message names ``name`` and the counts, never the text (patient data)."""
    read_length = getattr(model, "text_read_length", None)
    if read_length is None:
        return
    length, limit = read_length(text)
    if length > limit:
        raise InputError(f"{name} is {length} tokens long; the model's text encoder reads {limit} tokens at most (a "
                         "word is one token or more): the rest would be cut unread; shorten it")


def texts_read_cut(model, texts: Sequence[str]) -> tuple[int, int]:
    """How many of ``texts`` have more tokens than the model's text tower reads (``text_read_length``: they are
    embedded cut, the rest unread), and the most it reads; (0, 0) for a model that cannot tell."""
    read_length = getattr(model, "text_read_length", None)
    return (0, 0) if read_length is None else count_read_cut(read_length, texts)


MAX_CLASS_SETS = 64  # prompt sets kept per model (least recently used dropped): a service's users choose labels

# model -> (its weights' state, {prompts: class embeddings}, most recently used last): an evaluation with its
# checks scores the same classes many times (zero-shot, calibration, sanity, each corruption), a service
# the same label sets for every request; each time the prompts' text forward passes
_CLASS_EMBEDDINGS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_CLASS_LOCK = threading.Lock()


def class_embeddings(model: DualEncoder, prompts: list[list[str]]) -> torch.Tensor:
    """One normalised embedding per class: the mean of its prompt-ensemble embeddings.

    Outside training, the result is kept per model and prompts (``MAX_CLASS_SETS`` per model) until a
    weight of the model changes (``models.dual.weights_state``). Safe to call from several threads."""
    if model.training and torch.is_grad_enabled():
        return _class_embeddings(model, prompts)
    kept = cached_class_embeddings(model, prompts)
    if kept is not None:
        return kept
    state, key = weights_state(model), _prompts_key(prompts)
    embeddings = _class_embeddings(model, prompts)
    with _CLASS_LOCK:
        try:
            cached = _CLASS_EMBEDDINGS.get(model)
        except TypeError:  # an object that cannot be weakly referenced: no cache
            return embeddings
        if cached is None or cached[0] != state:
            cached = (state, OrderedDict[tuple[tuple[str, ...], ...], torch.Tensor]())
            _CLASS_EMBEDDINGS[model] = cached
        cached[1][key] = embeddings
        while len(cached[1]) > MAX_CLASS_SETS:
            cached[1].popitem(last=False)
    return embeddings.clone()


def cached_class_embeddings(model: DualEncoder, prompts: list[list[str]]) -> torch.Tensor | None:
    """``class_embeddings`` if it is kept for these prompts and the model's current weights, else None;
    never runs the model (a service answers from it without waiting for the model's thread)."""
    state, key = weights_state(model), _prompts_key(prompts)
    with _CLASS_LOCK:
        try:
            cached = _CLASS_EMBEDDINGS.get(model)
        except TypeError:
            return None
        if cached is None or cached[0] != state or key not in cached[1]:
            return None
        cached[1].move_to_end(key)
        return cached[1][key].clone()


def _prompts_key(prompts: list[list[str]]) -> tuple[tuple[str, ...], ...]:
    return tuple(tuple(class_prompts) for class_prompts in prompts)


def _class_embeddings(model: DualEncoder, prompts: list[list[str]]) -> torch.Tensor:
    rows = [model.encode_texts(class_prompts).mean(0) for class_prompts in prompts]
    return torch.nn.functional.normalize(torch.stack(rows), dim=-1)
