"""Data: the Record type, loaders chosen by path, caption templates, preprocessing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .captions import CaptionConfig as CaptionConfig
from .captions import load_captions as load_captions
from .loaders import load_dataset as load_dataset
from .record import Dataset as Dataset
from .record import Record as Record

CAPTION_SOURCES = {  # the steps of captions_for's order, as reported (``medvl models --recipe``)
    "file": "the caption file given",
    "dataset": "the dataset's own",
    "model": "the model's (the caption set it was trained with)",
    "generic": "generic templates",
}


def caption_sources(path: object = None, dataset_captions: bool | None = False,
                    model_captions: bool = False) -> list[str]:
    """The sources ``captions_for`` may take its captions from, first to last (keys of ``CAPTION_SOURCES``): a
    caption file or config given, the dataset's own, the model's, generic templates. The list ends at the first
    source known to hold captions, so with every input known it is the one source used; ``dataset_captions``
    None: the dataset is not known yet (its own captions, if any, come first)."""
    steps = [("file", path is not None), ("dataset", dataset_captions), ("model", model_captions), ("generic", True)]
    sources = []
    for source, present in steps:
        if present is not False:
            sources.append(source)
        if present:
            break
    return sources


def captions_for(dataset: Dataset | None = None, path: str | Path | CaptionConfig | None = None,
                 model: Any = None) -> CaptionConfig:
    """The caption config to use, the one rule for every command (CLI, service, recipes).

    In order (``caption_sources``): ``path`` (a caption YAML/JSON file, or a ready ``CaptionConfig``); the
    dataset's own (its ``dataset.json`` sidecar); the captions ``model`` was trained with (``model.meta["captions"]``,
    so zero-shot prompts match training); else the generic templates.
    """
    if isinstance(path, CaptionConfig):
        return path
    own = getattr(model, "meta", {}).get("captions") if model is not None else None
    source = caption_sources(path, bool(dataset is not None and dataset.captions), bool(own))[0]
    if source == "file" and path is not None:
        return load_captions(path)
    if source == "dataset" and dataset is not None and dataset.captions:
        return CaptionConfig.from_dict(dataset.captions, source=dataset.source)
    if source == "model" and own:
        return CaptionConfig.from_dict(own)
    return CaptionConfig()
