"""Training the report generator (``medvl.models.decoder``) with the one trainer (``loop.fit``).

``train_report_generator(dataset, out, config)`` builds the generator (its image tower at random
init from a registered config's image architecture, or copied from a trained dual encoder with
``init``), learns the WordPiece vocabulary from the training reports, optionally retrieves each
record's context (the reports of the ``context_k`` nearest other cases of an index,
``medvl.rag.context``), and runs ``ReportObjective``: teacher-forced next-token cross-entropy of
each record's report given its (augmented) image and context.

Records without a report are left out (their number is logged). Report text is patient data:
nothing here logs it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from monai.data import MetaTensor

from ..data.loading import image_sources, load_all
from ..data.record import Dataset, records_digest
from ..errors import InputError
from ..eval.contamination import copy_training, training_data, with_earlier
from ..models.config import refuse_copied_overrides
from ..models.decoder import ReportGenerator, ReportGeneratorConfig
from ..models.text import train_wordpiece
from .loop import TrainConfig, check_out_dir, fit, param_groups, seed_everything, starting_weights

log = logging.getLogger(__name__)

DEFAULT_IMAGE_MODEL = "cxr-small"


def train_report_generator(dataset: Dataset, out: str | Path, config: TrainConfig, *,
                           image_model: str | None = None, init: str | Path | None = None,
                           overrides: dict[str, Any] | None = None, index=None, context_k: int = 0,
                           resume: bool = False, show_progress: bool = True) -> ReportGenerator:
    """Train a report generator on ``dataset``'s image-report pairs; saved to ``out/model``.

    ``image_model`` names a registered config whose image architecture is used at random init (default
    cxr-small); ``init`` is a trained dual encoder folder whose image tower (architecture and weights) is copied
    instead (giving both is an InputError). ``overrides`` are ``decoder.*`` / ``image.*`` config fields. With
    ``context_k`` > 0, ``index`` (an open ``medvl.index`` index) gives each record the reports of its nearest
    cases; ``index`` without ``context_k`` is an InputError (it would not be used).
    """
    config.validate_numbers()
    check_out_dir(Path(out), resume)
    check_generator_options(image_model, init, index, context_k)
    seed_everything(config.seed)
    settings, dual = generator_config(image_model, init, overrides, context_k)
    dataset = dataset.for_spatial_dims(settings.image.spatial_dims)  # a DICOM folder's other kind left out
    with_text = dataset.subset([r for r in dataset if r.text and r.text.strip()])
    if len(with_text) < len(dataset):
        log.info("%s: left out %d records without a report", dataset.source, len(dataset) - len(with_text))
    if len(with_text) < 2:
        raise InputError(f"{dataset.source}: need at least 2 records with a report, got {len(with_text)}")
    model = _generator(settings, [r.text or "" for r in with_text], dual, init)
    contexts = None
    if context_k:
        from ..index import index_model
        from ..rag.context import retrieve_for_records

        found = retrieve_for_records(index, index_model(index), with_text.records, context_k, show_progress)
        contexts = [item.texts for item in found]
        model.meta["retrieval"] = retrieval_settings(index, context_k, contexts)
    objective = ReportObjective(model, with_text, contexts)
    return fit(objective, config, out, resume=resume, show_progress=show_progress)


def retrieval_settings(index, context_k: int, contexts: list[list[str]]) -> dict[str, Any]:
    """What identifies the contexts a generator trains on (``meta.retrieval``, compared on --resume): ``context_k``,
    the index's model (its name and the SHA-256 of its weights, from the index's info) and a SHA-256 of the
    retrieved reports themselves (another index, or one whose cases changed since, gives other contexts; report text
    is patient data: only its digest is kept)."""
    built = index.info["model"]
    digest = hashlib.sha256(json.dumps(contexts, ensure_ascii=False).encode("utf-8")).hexdigest()
    return {"context_k": context_k, "index_model": built.get("name"),
            "index_weights_sha256": built.get("weights_sha256"), "contexts_sha256": digest}


def check_generator_options(image_model: str | None = None, init: str | Path | None = None, index=None,
                            context_k: int = 0) -> None:
    """InputError for options of ``train_report_generator`` that need another or exclude one (callers check them
    before reading any data): each would otherwise be ignored without a word."""
    if context_k and index is None:
        raise InputError("--context-k needs --index (the cases whose reports are given as context)")
    if index is not None and not context_k:
        raise InputError("--index needs --context-k (how many nearest cases' reports to give as context); "
                         "without it the generator is trained on the image alone")
    if init is not None and image_model is not None:
        raise InputError("give --init or --image-model, not both (with --init the image tower is the dual encoder's)")


def build_generator(reports: list[str], image_model: str | None = None, init: str | Path | None = None,
                    overrides: dict[str, Any] | None = None, context_k: int = 0) -> ReportGenerator:
    """A generator at random init with a vocabulary learnt from ``reports`` (see ``train_report_generator``)."""
    config, dual = generator_config(image_model, init, overrides, context_k)
    return _generator(config, reports, dual, init)


def generator_config(image_model: str | None = None, init: str | Path | None = None,
                     overrides: dict[str, Any] | None = None,
                     context_k: int = 0) -> tuple[ReportGeneratorConfig, Any]:
    """The generator's config (see ``train_report_generator``) and the dual encoder loaded from ``init``
    (None without), whose image tower the generator copies."""
    from ..models.registry import get_config, load_init_model

    dual = None
    check_generator_options(image_model, init)
    if init is not None:
        dual = load_init_model(init)
        image = dual.config.image
    else:
        image = get_config(image_model or DEFAULT_IMAGE_MODEL).image
    settings = dict(overrides or {})
    if context_k:
        settings["decoder.context_k"] = context_k
    base = ReportGeneratorConfig(image=image)
    if init is not None:
        refuse_copied_overrides(settings, {"image": "--init (the image tower is the dual encoder's)"},
                                ("image", "decoder"))
    return base.merged(settings), dual


def _generator(config: ReportGeneratorConfig, reports: list[str], dual: Any,
               init: str | Path | None) -> ReportGenerator:
    model = ReportGenerator(config, tokenizer=train_wordpiece(reports, config.decoder.vocab_size,
                                                               config.decoder.vocab_min_texts))
    if dual is not None:
        model.image_encoder.load_state_dict(dual.image_encoder.state_dict())
        # the weights' digest: eval report's nearest-report baseline checks the folder still holds this model
        model.meta["init"] = {"dir": str(Path(init).resolve()) if init else None, "name": dual.config.name,
                              "weights_sha256": (starting_weights(dual) or {}).get("weights_sha256")}
        copy_training(dual, model)
    return model


class ReportObjective:
    """Next-token cross-entropy of each record's report given its image (and retrieved context)."""

    title = "report-generator training"
    data_parallel = False  # losses run the whole batch: under torchrun every rank would train on all of it

    def __init__(self, model: ReportGenerator, dataset: Dataset, contexts: list[list[str]] | None = None):
        self.model, self.dataset, self.contexts = model, dataset, contexts
        self.pixels = torch.empty(0)
        self.reports: dict[str, torch.Tensor] = {}
        self.context_tokens: dict[str, torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.dataset)

    def start(self, checkpoint: Path | None, show_progress: bool) -> None:
        if checkpoint is not None:
            meta = self.model.meta
            self.model = ReportGenerator.from_pretrained(checkpoint)
            self.model.meta = {**meta, **self.model.meta}
        self.pixels = load_all(self.model.preprocessor, [r.image for r in self.dataset], show_progress,
                               sources=image_sources(self.dataset))
        self.reports = dict(self.model.tokenize_reports([r.text or "" for r in self.dataset]))
        if self.contexts is not None:
            self.context_tokens = self.model.tokenize_contexts(self.contexts)

    def losses(self, indices: list[int], seed: int) -> dict[str, torch.Tensor]:
        model = self.model
        pixels = model.preprocessor.augment(self.pixels[indices].float(), seed)
        if isinstance(pixels, MetaTensor):  # MONAI's tensor subclass would wrap every op of the step (~7x slower)
            pixels = pixels.as_tensor()
        pixels = model.preprocessor.normalize(pixels)
        length = int(self.reports["attention_mask"][indices].sum(1).max())
        reports = {key: value[indices, :length] for key, value in self.reports.items()}
        context = None
        if self.context_tokens is not None:
            context = {key: value[indices] for key, value in self.context_tokens.items()}
        return {"loss": model.loss(pixels, reports, context)}

    def param_groups(self, config: TrainConfig) -> list[dict[str, Any]]:
        return param_groups(self.model, config)

    def log_extra(self) -> dict[str, float]:
        return {}

    def describe(self, resolved: bool = True) -> dict[str, Any]:
        """What ``loop.check_same_run`` compares on --resume (``resolved``: the records' digest over the image
        files' resolved paths)."""
        return {"model": self.model.config.to_dict(), "data": self.dataset.source, "records": len(self.dataset),
                "records_sha256": records_digest(self.dataset.records, resolved),
                "init": self.model.meta.get("init"), "retrieval": self.model.meta.get("retrieval")}

    def finish(self, steps: int) -> None:
        run = {"steps": steps, "records": len(self.dataset), "data": self.dataset.source,
               "vocabulary": len(self.model.tokenizer), **training_data(self.dataset)}
        self.model.meta["training"] = with_earlier(run, self.model.meta.get("training"))  # the --init model's runs
