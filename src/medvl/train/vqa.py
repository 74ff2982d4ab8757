"""VQA training: the ``VQAObjective`` for the one trainer (``medvl.train.loop.fit``), and the model
built from the training questions (answer vocabulary, answer types, answer prior).

Every question image is read once, kept as float16 [0, 1] and augmented per step with the model's
preprocessor (each image once per batch, whatever number of questions name it). The loss is the
cross-entropy over the answer vocabulary (questions whose answer is not in it are left out of that
term) plus ``type_weight`` x the cross-entropy of the answer-type head (CLOSED / OPEN from the
question alone, used for routing).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..checks import check_numbers
from ..data.loaders.vqa import VQAItem, question_files, questions_digest
from ..data.loading import load_all
from ..errors import InputError
from ..eval.contamination import copy_training, data_sha256, file_entries, with_earlier
from ..models.config import TextConfig, merge_overrides, refuse_copied_overrides
from ..models.registry import get_config, load_init_model
from ..models.text import train_wordpiece
from ..models.vqa import (
    ANSWER_TYPES,
    VQAConfig,
    VQAModel,
    answer_prior,
    answer_types,
    answer_vocabulary,
    batch_pixels,
    check_image_counts,
    image_table,
    model_name,
    questions_cut,
    training_words,
)
from .loop import MODEL_DIR, TrainConfig, fit, param_groups, recorded_run, starting_weights, text_learning_rate

log = logging.getLogger(__name__)

QUESTION_ENCODERS = ("all-minilm-l6-v2", "dual", "bert")
IGNORE = -100
DEFAULT_IMAGE_MODEL = "cxr-small"  # the image tower without --init or --image-model
# tokens (special ones included) a random-init (bert) question tower reads: its longest training question's, within
# these bounds (the lower one keeps room for a test question a little longer than the training ones)
BERT_QUESTION_TOKENS = (48, 256)


NAMED_SETTINGS = {  # VQAConfig fields an option of VQAOptions sets: not to be given again as an override
    "max_images": "--max-images", "hidden_size": "--hidden-size", "fusion_layers": "--fusion-layers",
    "image_layers": "--image-layers", "route_by_type": "--route-by-type / --no-route-by-type",
    "image.image_size": "--image-size", "image.augment": "--augment / --no-augment",
}


@dataclass
class VQAOptions:
    """How the VQA model is built (the trainer's own settings are a ``TrainConfig``)."""

    init: Path | None = None  # a dual encoder folder whose image tower (and text tower, see below) start the model
    image_model: str | None = None  # without init: the registered config whose image tower is built at random
    # (None: cxr-small); not with init
    question_encoder: str = "all-minilm-l6-v2"  # all-minilm-l6-v2 (shipped, frozen) | dual (init's text tower) | bert
    image_size: int | None = None  # image side in pixels (None: the image config's own)
    hidden_size: int = 256  # fusion width
    fusion_layers: int = 2  # cross-attention blocks
    image_layers: int = 1  # self-attention layers over a question's image tokens (its films together)
    max_images: int = 2  # images per question
    min_answer_count: int = 1  # answers seen fewer times in training are left out of the vocabulary
    type_weight: float = 0.5  # weight of the answer-type loss
    image_lr_scale: float = 1.0  # image tower lr = lr x this (lower it for a pretrained tower)
    augment: bool = True  # random affine / contrast / noise on the training images
    route_by_type: bool = True  # answers among those seen with the predicted answer type
    overrides: dict[str, Any] = field(default_factory=dict)  # VQAConfig fields, nested as "image.no_max_pool"

    def validate(self) -> None:
        keys = _override_keys(self.overrides)
        if "image_tokens" in keys:
            raise InputError("--set image_tokens: the tokens per image are set from the image tower, not an option")
        named = next((key for key in keys if key in NAMED_SETTINGS), None)
        if named is not None:  # applied after the option, it would replace the option's value without a word
            raise InputError(f"--set {named}: set by {NAMED_SETTINGS[named]}; give it there")
        if self.question_encoder not in QUESTION_ENCODERS:
            raise InputError(f"question encoder must be one of {', '.join(QUESTION_ENCODERS)}, "
                             f"got {self.question_encoder!r}")
        if self.init is not None and self.image_model is not None:
            raise InputError("give --init or --image-model, not both (with --init the image tower is the dual "
                             "encoder's)")
        if self.question_encoder == "dual" and self.init is None:
            raise InputError("question encoder 'dual' needs --init (a dual encoder folder)")
        if self.init is not None:  # from_dual_encoder copies these sections whole: an override would go unused
            copied = {"image": "--init (the image tower is the dual encoder's)"}
            if self.question_encoder == "dual":
                copied["text"] = "--question-encoder dual (the question tower is the dual encoder's text tower)"
            refuse_copied_overrides(self.overrides, copied, ("image", "text"))
        check_numbers({
            "image_size": (self.image_size, {"minimum": 16, "maximum": 1024, "integer": True, "optional": True}),
            "hidden_size": (self.hidden_size, {"minimum": 8, "maximum": 4096, "integer": True}),
            "fusion_layers": (self.fusion_layers, {"minimum": 1, "maximum": 12, "integer": True}),
            "image_layers": (self.image_layers, {"minimum": 0, "maximum": 12, "integer": True}),
            "max_images": (self.max_images, {"minimum": 1, "maximum": 8, "integer": True}),
            "min_answer_count": (self.min_answer_count, {"minimum": 1, "integer": True}),
            "type_weight": (self.type_weight, {"minimum": 0}),
            "image_lr_scale": (self.image_lr_scale, {"minimum": 0, "maximum": 10}),
        })


def _override_keys(overrides: dict[str, Any]) -> list[str]:
    """The ``section.field`` keys of ``overrides`` (a dict under a section's name spelled out)."""
    keys = []
    for key, value in overrides.items():
        keys += [f"{key}.{name}" for name in value] if key in ("image", "text") and isinstance(value, dict) else [key]
    return keys


def build_vqa_model(items: Sequence[VQAItem], options: VQAOptions, question_length: int | None = None) -> VQAModel:
    """A fresh VQA model for ``items``: answer vocabulary, types and prior in its meta. ``question_length``: a
    random-init question tower's ``text.max_length`` as a resumed run started with it (None: sized to ``items``)."""
    options.validate()
    answers = answer_vocabulary(items, options.min_answer_count)
    if not answers:
        raise InputError(f"no answer is seen {options.min_answer_count} times or more in the training questions "
                         "(lower --min-answer-count)")
    config = VQAConfig(hidden_size=options.hidden_size, fusion_layers=options.fusion_layers,
                       fusion_heads=max(1, options.hidden_size // 64), max_images=options.max_images,
                       image_layers=options.image_layers,
                       route_by_type=options.route_by_type)
    if options.question_encoder == "bert":  # WordPiece fitted on the questions (VQAObjective.start)
        config.text = TextConfig(kind="bert", vocab_size=2000, hidden_size=128, num_layers=2, num_heads=2,
                                 intermediate_size=256)
    if options.init is not None:
        dual = load_init_model(options.init)
        if options.image_size and options.image_size != dual.config.image.image_size:
            raise InputError(f"--image-size {options.image_size} differs from the initial model's "
                             f"{dual.config.image.image_size}")
        config.image.augment = options.augment
        config = _question_length(_with_overrides(config, options.overrides), items, options, question_length)
        model = VQAModel.from_dual_encoder(dual, config, answers, question_tower=options.question_encoder == "dual")
        # the weights' digest: --resume compares it (a copy of the folder is the same start, other weights there not)
        model.meta["init"] = {"model": str(options.init), "question_tower": options.question_encoder == "dual",
                              "weights_sha256": (starting_weights(dual) or {}).get("weights_sha256")}
        copy_training(dual, model)
    else:
        image_model = options.image_model or DEFAULT_IMAGE_MODEL
        image = get_config(image_model).image
        image.augment = options.augment
        if options.image_size:
            image.image_size = options.image_size
        config.image = image
        model = VQAModel(_question_length(_with_overrides(config, options.overrides), items, options, question_length),
                         answers)
        model.meta["init"] = {"image_model": image_model}
    model.meta.update(answer_types=answer_types(items), prior=answer_prior(items),
                      question_types=sorted({item.question_type for item in items if item.question_type}))
    return model


def _with_overrides(config: VQAConfig, overrides: dict[str, Any]) -> VQAConfig:
    """``config`` with ``overrides`` merged in (``{"image.no_max_pool": True, "dropout": 0.2}``), validated."""
    return VQAConfig.from_dict(merge_overrides(config.to_dict(), overrides, ("image", "text")))


def _question_length(config: VQAConfig, items: Sequence[VQAItem], options: VQAOptions,
                     started: int | None = None) -> VQAConfig:
    """``config`` with a random-init (bert) question tower sized to the training questions: ``text.max_length``
    the longest one's tokens under the WordPiece the trainer fits on them, within ``BERT_QUESTION_TOKENS``
    (unless ``--set text.max_length`` gives it, or a resumed run ``started`` with another). Shipped and
    dual-encoder towers keep their own."""
    if options.question_encoder != "bert" or "text.max_length" in _override_keys(options.overrides):
        return config
    text = config.text
    if started is not None:  # a run started before towers were sized (48) goes on as it started
        text.max_length = started
        return config
    tokenizer = train_wordpiece([item.question for item in items], text.vocab_size, text.vocab_min_texts)
    longest = max(len(ids) for ids in tokenizer([item.question for item in items], verbose=False)["input_ids"])
    low, high = BERT_QUESTION_TOKENS
    text.max_length = min(high, max(low, longest))
    return config


class VQAObjective:
    """Answer cross-entropy plus the answer-type cross-entropy, for ``loop.fit``."""

    title = "VQA training"
    data_parallel = False  # losses run the whole batch: under torchrun every rank would train on all of it

    def __init__(self, model: VQAModel, items: Sequence[VQAItem], options: VQAOptions, source: str):
        self.model, self.items, self.options, self.source = model, list(items), options, source
        self.pixels = torch.empty(0)
        self.image_index = torch.empty(0, dtype=torch.long)
        self.answer_targets = torch.empty(0, dtype=torch.long)
        self.type_targets = torch.empty(0, dtype=torch.long)
        self.features: torch.Tensor | None = None  # image tokens of a frozen image tower, computed once
        self.frozen_images = options.image_lr_scale == 0
        init = model.meta.get("init") or {}  # the --init dual encoder's weights, as medvl train records its start
        self.start_weights = {"model": str(options.init.resolve()), "weights_sha256": init.get("weights_sha256")} \
            if options.init is not None else None

    def __len__(self) -> int:
        return len(self.items)

    def start(self, checkpoint: Path | None, show_progress: bool) -> None:
        if checkpoint is not None:
            self.model = VQAModel.from_pretrained(checkpoint)
            self.model.config.image.augment = self.options.augment
        elif self.model.config.text.kind == "bert" and not self.model.meta.get("init", {}).get("question_tower"):
            self.model.text_encoder.fit_tokenizer([item.question for item in self.items])
        if checkpoint is None:  # a checkpoint keeps the words it recorded
            self.model.question_words = training_words(self.model.text_encoder, [item.question for item in self.items])
        self._warn_cut_questions()
        # every training question's encoding stays cached (a frozen tower): each runs once, not once per epoch
        self.model.frozen_cache_size = max(self.model.frozen_cache_size, len({item.question for item in self.items}))
        images, self.image_index = image_table(self.items, self.model.config.max_images)
        self.pixels = load_all(self.model.preprocessor, images, show_progress)  # read once, float16 [0, 1]
        if self.frozen_images:
            self.features = self._frozen_features()
        vocabulary = {answer: i for i, answer in enumerate(self.model.answers)}
        self.answer_targets = torch.tensor([vocabulary.get(item.answer_normalized, IGNORE) for item in self.items])
        self.type_targets = torch.tensor([ANSWER_TYPES.index(item.answer_type) if item.answer_type in ANSWER_TYPES
                                          else IGNORE for item in self.items])

    def _warn_cut_questions(self) -> None:
        """Questions longer than the question tower reads are trained on cut (``medvl vqa`` refuses them)."""
        cut = questions_cut(self.model, [item.question for item in self.items])
        if cut:
            log.warning("%d of %d training questions are longer than the question encoder reads (%d tokens, special "
                        "ones included): they are trained on cut, and medvl vqa refuses them", cut, len(self.items),
                        self.model.config.text.max_length)

    def _frozen_features(self, chunk: int = 64) -> torch.Tensor:
        """A frozen image tower (``image_lr_scale`` 0) is a fixed function: every image's tokens once,
        without augmentation (and the tower's batch-norm statistics stay as they are)."""
        model = self.model
        model.image_encoder.requires_grad_(False)
        model.image_encoder.eval()
        with torch.no_grad():
            return torch.cat([model.image_features(model.preprocessor.normalize(self.pixels[i:i + chunk].float()))
                              for i in range(0, len(self.pixels), chunk)])

    def losses(self, indices: list[int], seed: int) -> dict[str, torch.Tensor]:
        model = self.model
        if self.features is not None:
            model.image_encoder.eval()
            features, image_index = batch_pixels(self.features, self.image_index[indices])
            out = model(torch.empty(0), image_index, [self.items[i].question for i in indices], features=features)
            return self._losses(out, indices)
        pixels, image_index = batch_pixels(self.pixels, self.image_index[indices])
        augmented = model.preprocessor.augment(pixels, seed)
        as_tensor = getattr(augmented, "as_tensor", None)  # a MONAI MetaTensor: its bookkeeping slows every layer
        pixels = model.preprocessor.normalize(as_tensor() if as_tensor is not None else augmented)
        out = model(pixels, image_index, [self.items[i].question for i in indices])
        return self._losses(out, indices)

    def _losses(self, out: dict[str, torch.Tensor], indices: list[int]) -> dict[str, torch.Tensor]:
        parts = {"answer": _cross_entropy(out["answer_logits"], self.answer_targets[indices]),
                 "type": _cross_entropy(out["type_logits"], self.type_targets[indices])}
        parts["loss"] = parts["answer"] + self.options.type_weight * parts["type"]
        return parts

    def param_groups(self, config: TrainConfig) -> list[dict[str, Any]]:
        return param_groups(self.model, config, {"text_encoder.": text_learning_rate(self.model, config),
                                                 "image_encoder.": config.lr * self.options.image_lr_scale})

    def log_extra(self) -> dict[str, float]:
        return {}

    def describe(self, resolved: bool = True) -> dict[str, Any]:
        """What ``loop.check_same_run`` compares on --resume: besides the model and its starting weights (``start``:
        the --init folder and the SHA-256 of its weights, None without --init), the data and its questions
        (``questions_sha256``; ``resolved``: over the image files' resolved paths), the VQA options
        (``image_lr_scale`` sets the optimizer's parameter groups, ``type_weight`` the loss) and the share of
        questions held out."""
        # image_model as runs have always recorded it: the name, cxr-small when none was given (with --init too)
        options = {**asdict(self.options), "init": str(self.options.init.resolve()) if self.options.init else None,
                   "image_model": self.options.image_model or DEFAULT_IMAGE_MODEL}
        return {"model": self.model.config.to_dict(), "start": self.start_weights, "data": self.source,
                "questions": len(self.items),
                "answers": len(self.model.answers), "questions_sha256": questions_digest(self.items, resolved),
                "vqa": options, "holdout": (self.model.meta.get("holdout") or {}).get("fraction", 0.0)}

    def finish(self, steps: int) -> None:
        in_vocabulary = int((self.answer_targets != IGNORE).sum())
        splits = sorted({item.split for item in self.items})
        run = {"steps": steps, "questions": len(self.items), "data": self.source,
               "answers_in_vocabulary": in_vocabulary, "data_sha256": data_sha256(self.source),
               "splits": splits, "files": file_entries(question_files(self.items), splits)}
        self.model.meta["training"] = with_earlier(run, self.model.meta.get("training"))  # the --init model's runs


def _frozen_without_augment(options: VQAOptions, started: dict[str, Any] | None = None) -> VQAOptions:
    """A frozen image tower (``image_lr_scale`` 0) reads each image once, unaugmented: ``augment`` (on by
    default) would do nothing, so it is recorded as off (model config and run settings), with a warning; a resumed
    run ``started`` (its recorded model config) with it recorded on keeps it so (it did nothing there either)."""
    if not (options.augment and options.image_lr_scale == 0):
        return options
    if (started or {}).get("image", {}).get("augment") is True:
        log.warning("--augment has no effect with --image-lr-scale 0 (the frozen image tower's tokens are computed "
                    "once, unaugmented); this run started before that was recorded and keeps it recorded as on")
        return options
    log.warning("--augment has no effect with --image-lr-scale 0 (the frozen image tower's tokens are computed "
                "once, unaugmented): training without augmentation, recorded as off")
    return replace(options, augment=False)


def _started_model(out_dir: Path) -> dict[str, Any] | None:
    """The model config a run in ``out_dir`` recorded when it started (``loop.recorded_run``), or None: settings
    chosen from the data since (a question tower's length, augment recorded off) follow the run as it started."""
    model = (recorded_run(out_dir) or {}).get("model")
    return model if isinstance(model, dict) else None


def _cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    if bool((targets == IGNORE).all()):
        return logits.sum() * 0.0  # keeps the graph: no target in this batch
    return F.cross_entropy(logits, targets, ignore_index=IGNORE)


def train_vqa(items: Sequence[VQAItem], out_dir: str | Path, config: TrainConfig, options: VQAOptions,
              source: str, resume: bool = False, show_progress: bool = True,
              holdout: dict[str, Any] | None = None) -> VQAModel:
    """Train a VQA model on ``items`` and save it to ``out_dir/model``; returns it.

    ``holdout`` (the held-out questions' split and qids) is kept in the model's meta so that
    ``medvl eval vqa --split heldout`` scores exactly them.
    """
    config.validate_numbers()
    options.validate()
    if len(items) < 2:
        raise InputError(f"{source}: need at least 2 training questions, got {len(items)}")
    check_image_counts(items, options.max_images, " (raise --max-images)")
    started = _started_model(Path(out_dir)) if resume else None
    options = _frozen_without_augment(options, started)
    torch.manual_seed(config.seed)
    length = (started or {}).get("text", {}).get("max_length")
    model = build_vqa_model(items, options, length if isinstance(length, int) else None)
    if holdout is not None:
        model.meta["holdout"] = holdout
    objective = VQAObjective(model, items, options, source)
    trained = fit(objective, config, out_dir, resume=resume, show_progress=show_progress)
    trained.name = model_name(Path(out_dir) / MODEL_DIR)  # as answers name it once it is loaded from there
    return trained
