"""Data: the Record type, loaders chosen by path, caption templates, preprocessing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .captions import CaptionConfig as CaptionConfig
from .captions import load_captions as load_captions
from .loaders import load_dataset as load_dataset
from .record import Dataset as Dataset
from .record import Record as Record


def captions_for(dataset: Dataset | None = None, path: str | Path | CaptionConfig | None = None,
                 model: Any = None) -> CaptionConfig:
    """The caption config to use, the one rule for every command (CLI, service, recipes).

    In order: ``path`` (a caption YAML/JSON file, or a ready ``CaptionConfig``); the dataset's own
    (its ``dataset.json`` sidecar); the captions ``model`` was trained with (``model.meta["captions"]``,
    so zero-shot prompts match training); else the generic templates.
    """
    if isinstance(path, CaptionConfig):
        return path
    if path is not None:
        return load_captions(path)
    if dataset is not None and dataset.captions:
        return CaptionConfig.from_dict(dataset.captions, source=dataset.source)
    own = getattr(model, "meta", {}).get("captions") if model is not None else None
    if own:
        return CaptionConfig.from_dict(own)
    return CaptionConfig()
