"""Embedding a dataset's images and texts with a model, batched, with a progress bar."""

from __future__ import annotations

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


def class_embeddings(model: DualEncoder, prompts: list[list[str]]) -> torch.Tensor:
    """One normalised embedding per class: the mean of its prompt-ensemble embeddings."""
    rows = [model.encode_texts(class_prompts).mean(0) for class_prompts in prompts]
    return torch.nn.functional.normalize(torch.stack(rows), dim=-1)
