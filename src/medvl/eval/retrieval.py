"""Image<->text retrieval: Recall@K and median rank over a dataset's own image-report pairs."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..data.record import Dataset
from ..embed import embed_images
from ..errors import InputError
from ..models.dual import DualEncoder
from .metrics import recall_at_k, retrieval_ranks


def retrieval(model: DualEncoder, dataset: Dataset, ks: Sequence[int] = (1, 5, 10),
              show_progress: bool = True, image_embeddings: torch.Tensor | None = None,
              keep_ranks: bool = False) -> dict:
    """Image->text and text->image retrieval among all texts / images of the dataset.

    Identical texts (several images of one case sharing a caption) are merged into one gallery
    entry; an image's query counts as a hit at the rank of its own text, and a text's query at the
    best rank of any of its images. ``image_embeddings`` (aligned with ``dataset``) skips embedding.
    ``keep_ranks`` adds each query's 1-based rank (``ranks``) to each direction's block.
    """
    with_text = [i for i, r in enumerate(dataset) if r.text]
    records = [dataset[i] for i in with_text]
    if len(records) < 2:
        raise InputError(f"{dataset.source}: retrieval needs at least 2 records with text, got {len(records)}")
    texts = list(dict.fromkeys(r.text for r in records))
    text_index = {text: i for i, text in enumerate(texts)}
    image_to_text = [[text_index[r.text]] for r in records]
    text_to_images: list[list[int]] = [[] for _ in texts]
    for i, record in enumerate(records):
        text_to_images[text_index[record.text]].append(i)
    subset = dataset.subset(records)
    if image_embeddings is not None:
        if len(image_embeddings) != len(dataset):
            raise InputError(f"{len(image_embeddings)} embeddings for {len(dataset)} records")
        image_emb = image_embeddings[with_text].numpy()
    else:
        image_emb = embed_images(model, subset, show_progress=show_progress).numpy()
    text_emb = model.encode_texts(texts).numpy()
    similarity = image_emb @ text_emb.T
    i2t = retrieval_ranks(similarity, image_to_text)
    t2i = retrieval_ranks(similarity.T, text_to_images)
    result: dict = {"n_images": len(records), "n_texts": len(texts)}
    for name, ranks, gallery in (("image_to_text", i2t, len(texts)), ("text_to_image", t2i, len(records))):
        result[name] = {**recall_at_k(ranks, ks), "median_rank": float(np.median(ranks)),
                        "mean_rank": float(ranks.mean()),
                        "chance": {f"R@{k}": _chance_recall(k, gallery, name, text_to_images) for k in ks}}
        if keep_ranks:
            result[name]["ranks"] = ranks.tolist()
    for direction, short in (("image_to_text", "i2t"), ("text_to_image", "t2i")):
        for k in ks:
            result[f"{short}_R@{k}"] = result[direction][f"R@{k}"]
    return result


def _chance_recall(k: int, gallery: int, direction: str, text_to_images: list[list[int]]) -> float:
    """Expected Recall@K of a random ranking (one relevant item, or several for text->image)."""
    if direction == "image_to_text":
        return min(1.0, k / gallery)
    from math import comb

    misses = [comb(gallery - len(imgs), k) / comb(gallery, k) if gallery - len(imgs) >= k else 0.0
              for imgs in text_to_images]
    return float(1 - np.mean(misses))
