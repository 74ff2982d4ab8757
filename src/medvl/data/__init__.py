"""Data: the Record type, loaders chosen by path, caption templates, preprocessing."""

from __future__ import annotations

from pathlib import Path

from .captions import CaptionConfig as CaptionConfig
from .captions import load_captions as load_captions
from .loaders import load_dataset as load_dataset
from .record import Dataset as Dataset
from .record import Record as Record


def captions_for(dataset: Dataset, path: str | Path | None = None) -> CaptionConfig:
    """The caption config given by ``path``, else the dataset's own (sidecar), else defaults."""
    if path is not None:
        return load_captions(path)
    if dataset.captions:
        return CaptionConfig.from_dict(dataset.captions, source=dataset.source)
    return CaptionConfig()
