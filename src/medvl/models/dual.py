"""The dual encoder (ConVIRT / CLIP / SigLIP): image and text towers in one embedding space."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..checks import check_number
from ..data.captions import CaptionConfig
from ..errors import InputError, MedvlError, ModelError, one_line
from ..io import give_output_mode, read_json, replace_dir, staging_folder, write_errors_named
from .config import ModelConfig, json_type
from .image import ImageEncoder, ImageTowerError
from .losses import clip_loss, siglip_loss
from .ood import OODGuard, matching_guard
from .preprocess import ImagePreprocessor, orientations
from .text import VOCABULARY_FILES, TextEncoder

log = logging.getLogger(__name__)

CONFIG_FILE, WEIGHTS_FILE, META_FILE, TEXT_DIR = "config.json", "model.safetensors", "meta.json", "text"
# config.json "kind" of medvl's other model folders, and what takes them
OTHER_KINDS = {"vqa": "a VQA model (medvl train vqa)", "report-generator": "a report generator (medvl train report)"}
OTHER_KIND_COMMANDS = {"vqa": "use it with medvl vqa or medvl eval vqa",
                       "report-generator": "use it with medvl report generate or medvl eval report"}
CHECKPOINT_STEP = "checkpoint_step"  # in the meta.json of a training checkpoint's model: the step it holds
VIEW_PROJECTION_DIM = 128  # output width of the self-supervised projection (SimCLR's)


class DualEncoder(nn.Module):
    """Image encoder + text encoder + linear projections + learnable temperature (and bias).

    ``encode_images`` / ``encode_texts`` return L2-normalised embeddings (N, embed_dim).
    ``heads`` holds optional supervised classification heads on image features, one per label
    column, with their class names in ``meta["heads"]``.
    """

    def __init__(self, config: ModelConfig, text_source_dir: Path | None = None):
        super().__init__()
        self.config = config
        self.image_encoder = ImageEncoder(config.image)
        self.text_encoder = TextEncoder(config.text, source_dir=text_source_dir)
        self.image_projection = nn.Linear(self.image_encoder.num_features, config.embed_dim, bias=False)
        self.text_projection = nn.Linear(self.text_encoder.num_features, config.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(config.init_logit_scale))
        self.logit_bias = nn.Parameter(torch.tensor(float(config.init_logit_bias)))  # -10 (JSON's integer) too
        self.heads = nn.ModuleDict()
        self.preprocessor = ImagePreprocessor(config.image)
        self.meta: dict[str, Any] = {"heads": {}}  # labels, training summary; kept apart from config
        self.ood: OODGuard | None = None  # statistics of the training embeddings (models.ood), if fitted
        self.view_projection: nn.Module | None = None  # self-supervised training only (add_view_projection)
        # where the weights came from, for a training run to record as its start: {"model": NAME, "init": "random",
        # "seed": ...} (create_model) or {"model": resolved folder} (from_pretrained); None: built otherwise
        self.origin: dict[str, Any] | None = None

    # -- forward passes with gradients (training) ------------------------------------------------
    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features of a normalised pixel batch (N, C, ...)."""
        return self.image_encoder(pixels)

    def embed_image_features(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_projection(features), dim=-1)

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        return F.normalize(self.text_projection(self.text_encoder(texts)), dim=-1)

    def contrastive_loss(self, image_emb: torch.Tensor, text_emb: torch.Tensor,
                         pair_ids: torch.Tensor | None = None) -> torch.Tensor:
        scale = self.logit_scale.clamp(max=4.6052).exp()  # temperature >= 0.01, as CLIP
        if self.config.loss == "siglip":
            return siglip_loss(image_emb, text_emb, scale, self.logit_bias, pair_ids)
        return clip_loss(image_emb, text_emb, scale, pair_ids)

    def add_head(self, column: str, classes: Sequence[str]) -> None:
        """Attach a supervised linear head for one label column."""
        self.heads[column] = nn.Linear(self.image_encoder.num_features, len(classes))
        self.meta["heads"][column] = list(classes)

    def add_view_projection(self, dim: int = VIEW_PROJECTION_DIM) -> None:
        """Attach the MLP that maps image features to the space of the self-supervised (SimCLR) loss between
        two views of an image (``TrainConfig.self_supervised_weight`` and ``self_supervised_epochs``). It exists
        only while training: a checkpoint keeps it (``meta["view_projection"]``) so a resumed run continues
        it; ``drop_view_projection`` removes it before the final save."""
        width = self.image_encoder.num_features
        self.view_projection = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, dim))
        self.meta["view_projection"] = dim

    def drop_view_projection(self) -> None:
        if self.view_projection is not None:
            del self.view_projection  # unregisters the module: the module tree is a fresh model's again
            self.view_projection = None
        self.meta.pop("view_projection", None)

    # -- inference (no gradients, batched) -------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, images: Sequence[Path | str | np.ndarray] | torch.Tensor,
                      batch_size: int = 64, features: bool = False) -> torch.Tensor:
        """Normalised image embeddings; ``images`` are files, arrays, or a [0, 1] pixel tensor
        from ``preprocessor.load_many``. ``features=True`` returns backbone features instead."""
        self.eval()
        outputs = []
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            pixels = chunk if isinstance(chunk, torch.Tensor) else self.preprocessor.load_many(chunk)
            feats = self.oriented_features(self.preprocessor.normalize(pixels))
            outputs.append(feats if features else self.embed_image_features(feats))
        return torch.cat(outputs) if outputs else torch.empty(0, self.config.embed_dim)

    def oriented_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """``image_features`` averaged over ``config.image.test_time_orientations`` orientations of a
        normalised batch (one forward pass per orientation; 1 = ``image_features`` itself)."""
        views = orientations(pixels, self.config.image.test_time_orientations)
        if len(views) == 1:
            return self.image_features(views[0])
        return torch.stack([self.image_features(view) for view in views]).mean(0)

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 128) -> torch.Tensor:
        self.eval()
        chunks = [self.embed_texts(texts[i:i + batch_size]) for i in range(0, len(texts), batch_size)]
        return torch.cat(chunks) if chunks else torch.empty(0, self.config.embed_dim)

    def text_tokens(self, texts: Sequence[str]) -> list[tuple[int, ...]]:
        """What the text tower reads of each text: its token ids after the tokenizer's normalisation and
        truncation. Two texts with the same tokens get the same embedding; evaluators use it to tell texts
        that differ only in what the tower ignores (letter case, spacing, words past its length) from
        texts that the tower reads differently."""
        return [tuple(ids) for ids in self.text_encoder.token_ids(texts)]

    def text_read_length(self, text: str) -> tuple[int, int]:
        """The tokens of ``text`` and the most the text tower reads of a text, special tokens left out of both
        (``TextEncoder.read_length``): a text with more tokens than it reads is read cut."""
        return self.text_encoder.read_length(text)

    @torch.no_grad()
    def head_probabilities(self, column: str, features: torch.Tensor) -> torch.Tensor:
        """Class probabilities of a supervised head from backbone features."""
        if column not in self.heads:
            raise ModelError(f"model has no supervised head for {column!r}; "
                             f"heads: {', '.join(self.heads) or 'none'}")
        self.eval()
        return self.heads[column](features).softmax(-1)

    # -- persistence -----------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> Path:
        """Write config.json, model.safetensors, meta.json and text/ (tokenizer) atomically.

        Refuses weights holding NaN or infinity (a diverged run must not leave a model that
        answers ``nan``); a failed write (full disk) names ``directory`` and leaves it as it was.
        """
        from safetensors.torch import save_file

        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}

        def write(staging: Path) -> None:
            save_file(state, str(staging / WEIGHTS_FILE))
            give_output_mode(staging / WEIGHTS_FILE)  # safetensors writes 0600
            self.text_encoder.save(staging / TEXT_DIR)
            if self.ood is not None:
                self.ood.save(staging)

        return save_model_dir(directory, state, self.config.to_dict(), self.meta, write)

    @classmethod
    def from_pretrained(cls, directory: str | Path, load_guard: bool = True) -> DualEncoder:
        """The model saved in ``directory``, with its OOD guard (``ood.safetensors``) when the guard was fitted on
        these image-tower weights (``models.ood.matching_guard``: else ignored, with a warning);
        ``load_guard=False`` leaves the guard unread, for ``medvl ood fit --overwrite``, which replaces a guard that
        may be damaged."""
        from safetensors.torch import load_file

        directory = Path(directory)
        refuse_a_file(directory)
        if not (directory / CONFIG_FILE).exists():
            raise ModelError(f"{directory}: not a medvl model directory (missing {CONFIG_FILE})")
        try:  # read first: a damaged config.json is named as such, not as a folder missing its other files
            raw = read_json(directory / CONFIG_FILE)  # nested too deeply: a ValueError too
        except (ValueError, OSError) as err:
            raise ModelError(f"{directory}: cannot read model files ({CONFIG_FILE}: {err.__class__.__name__}: "
                             f"{err})") from None
        kind = str(raw.get("kind")) if isinstance(raw, dict) else ""
        if kind in OTHER_KINDS:
            raise ModelError(f"{directory}: is {OTHER_KINDS[kind]}, not a dual encoder; {OTHER_KIND_COMMANDS[kind]}")
        for name in (WEIGHTS_FILE, TEXT_DIR):
            if not (directory / name).exists():
                raise ModelError(f"{directory}: not a medvl model directory (missing {name})")
        from safetensors import SafetensorError

        reading = CONFIG_FILE  # the file the message names
        try:
            missing = [section for section in ("image", "text") if isinstance(raw, dict) and section not in raw]
            if missing:  # every save writes both: a section's defaults could change what the towers compute
                raise InputError(f"no {' or '.join(missing)} section (a saved model's config holds every section)")
            config = ModelConfig.from_dict(raw)
            reading = META_FILE
            meta = read_meta(directory)
            reading = WEIGHTS_FILE
            state = load_file(str(directory / WEIGHTS_FILE))
        except ModelError:
            raise
        except (ValueError, OSError, SafetensorError, MedvlError) as err:
            raise ModelError(f"{directory}: cannot read model files ({reading}: {err.__class__.__name__}: "
                             f"{err})") from None
        bad = non_finite_tensors(state)
        if bad:
            raise ModelError(f"{directory}: {len(bad)} weight tensor(s) hold NaN or infinity (first: {bad[0]}); "
                             "the model is unusable (its training diverged): retrain it")
        text = directory / TEXT_DIR
        if not (text / "config.json").is_file():
            raise ModelError(f"{directory}: {TEXT_DIR}/config.json is missing (the text tower's architecture)")
        if not any((text / name).is_file() for name in VOCABULARY_FILES):
            # transformers would build a tokenizer of its special tokens alone: every word [UNK], every text the same
            raise ModelError(f"{directory}: {TEXT_DIR}/ holds no tokenizer vocabulary (expected one of "
                             f"{', '.join(VOCABULARY_FILES)})")
        try:
            model = cls(config, text_source_dir=text)
        except ImageTowerError as err:  # built before the text tower: not the text tower's fault
            raise ModelError(f"{directory}: cannot read model files ({CONFIG_FILE}: {err})") from None
        except MedvlError as err:  # a setting of config.json the saved tower cannot take (text.max_length)
            raise ModelError(f"{directory}: {CONFIG_FILE} does not fit the text tower in {TEXT_DIR}/ ({err})") from None
        except Exception as err:  # a damaged tokenizer or text config: transformers and huggingface_hub raise their own
            # exception types (a mistyped field of text/config.json: StrictDataclassFieldValidationError)
            raise ModelError(f"{directory}: cannot read the text tower in {TEXT_DIR}/ ({one_line(err)})") from None
        check_tokenizer_fits(model.text_encoder, directory)
        for column, classes in meta.get("heads", {}).items():
            model.add_head(column, classes)
        if meta.get("view_projection"):  # a checkpoint of a self-supervised run
            model.add_view_projection(int(meta["view_projection"]))
        model.meta = {**meta, "heads": meta.get("heads", {})}
        # a model saved before any training (create_model, save_pretrained) holds the bootstrap vocabulary and
        # random embeddings: its first training learns the vocabulary, as a fresh model's does
        model.text_encoder.vocabulary_fixed = "training" in meta or CHECKPOINT_STEP in meta
        described = [name for name in state if name.startswith(("heads.", "view_projection."))]
        if described and not (directory / META_FILE).exists():  # the weights are whole: the file naming them is gone
            raise ModelError(f"{directory}: {META_FILE} is missing, and {WEIGHTS_FILE} holds parts only it describes "
                             f"({len(described)} tensor(s), first: {described[0]}: a supervised head's classes or a "
                             "view projection); restore it from the model's folder or checkpoint")
        load_weights(model, state, directory)
        model.ood = matching_guard(OODGuard.load(directory), model, directory) if load_guard else None
        model.origin = {"model": str(directory.resolve())}
        model.eval()
        return model


def saved_captions(directory: str | Path) -> dict[str, Any] | None:
    """The caption set a saved model folder was trained with (``meta["captions"]``, which ``captions_for`` takes
    from the loaded model), read without loading its weights; None when it keeps none. ModelError naming the file
    when its meta.json cannot be read."""
    directory = Path(directory)
    try:
        captions = read_meta(directory).get("captions")
    except (ValueError, OSError, MedvlError) as err:
        raise ModelError(f"{directory}: cannot read model files ({META_FILE}: {err.__class__.__name__}: {err})") \
            from None
    return captions or None


def read_meta(directory: Path, required: bool = False) -> dict[str, Any]:
    """``directory/meta.json`` as a dict ({} when absent and not ``required``); ModelError naming the file when it
    is not a JSON object, or when its ``heads`` (column -> class names), ``view_projection`` (a width) or
    ``captions`` (a caption config) are malformed. A file that is not JSON raises ``ValueError`` for the caller
    to name."""
    path = directory / META_FILE
    if not path.exists() and not required:
        return {}
    meta = read_json(path)
    problem = None
    if not isinstance(meta, dict):
        problem = f"not a JSON object, got {json_type(meta)}"
    elif not isinstance(meta.get("heads", {}), dict) or not all(
            isinstance(classes, list) and classes and all(isinstance(name, str) for name in classes)
            for classes in meta.get("heads", {}).values()):
        problem = "heads must map each label column to its list of class names"
    elif meta.get("view_projection") not in (None, False):
        try:
            check_number("view_projection", meta["view_projection"], minimum=1, integer=True)
        except InputError as err:
            problem = str(err)
    if problem is None and "captions" in meta:
        try:
            CaptionConfig.from_dict(meta["captions"], source="captions")
        except InputError as err:
            problem = str(err)
    if problem:
        raise ModelError(f"{directory}: cannot read model files ({META_FILE}: {problem})")
    return meta


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], directory: Path) -> None:
    """``model.load_state_dict(state)``, or one ModelError line naming model.safetensors and the first missing,
    unexpected or wrongly shaped tensor (torch's own message spans lines and every tensor)."""
    expected = model.state_dict()
    missing = [name for name in expected if name not in state]
    unexpected = [name for name in state if name not in expected]
    shapes = [f"{name} is {tuple(state[name].shape)}, the config makes {tuple(tensor.shape)}"
              for name, tensor in expected.items() if name in state and state[name].shape != tensor.shape]
    problems = [f"{len(found)} {what} tensor(s) (first: {found[0]})"
                for what, found in (("missing", missing), ("unexpected", unexpected), ("wrongly shaped", shapes))
                if found]
    if problems:
        raise ModelError(f"{directory}: {WEIGHTS_FILE} does not match the architecture of {CONFIG_FILE} and "
                         f"{TEXT_DIR}/{CONFIG_FILE}: {'; '.join(problems)}")
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ModelError(f"{directory}: {WEIGHTS_FILE} does not match the config "
                         f"({' '.join(str(err).split())[:300]})") from None


def save_model_dir(directory: str | Path, state: dict[str, torch.Tensor], config: dict[str, Any],
                   meta: dict[str, Any], write: Callable[[Path], None]) -> Path:
    """The one way every medvl model kind writes its folder: non-finite weights refused, then
    config.json, meta.json and what ``write(staging)`` adds (weights, tokenizer...) written into a
    staging folder that replaces ``directory`` only when complete; a failed write (full disk) names
    ``directory`` and leaves it as it was."""
    directory = Path(directory)
    bad = non_finite_tensors(state)
    if bad:
        raise ModelError(f"{directory}: not saved, {len(bad)} weight tensor(s) hold NaN or infinity "
                         f"(first: {bad[0]}); the training diverged")
    with write_errors_named(directory):
        directory.parent.mkdir(parents=True, exist_ok=True)
        staging = staging_folder(directory.parent, f".{directory.name}.tmp-")
        try:
            (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2))
            (staging / META_FILE).write_text(json.dumps(meta, indent=2))
            write(staging)
            replace_dir(staging, directory)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return directory


def weights_state(model: Any) -> tuple:
    """Each weight and buffer's name, storage address and version counter, in name order (every in-place
    change bumps a tensor's version: an optimizer step, ``load_state_dict``, ``copy_``): equal exactly
    while the model's weights are unchanged. Empty for a model that is not a torch module."""
    if not isinstance(model, torch.nn.Module):
        return ()
    return tuple((name, tensor.data_ptr(), tensor._version) for name, tensor in sorted(model.state_dict().items()))


def non_finite_tensors(state: dict[str, torch.Tensor]) -> list[str]:
    """Names of floating-point tensors holding NaN or infinity."""
    return [name for name, tensor in state.items()
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]


def refuse_a_file(directory: Path) -> None:
    """ModelError when a model folder's path names a file (its ``config.json``, say): "not a model folder
    (missing config.json)" would mislead."""
    if directory.is_file():
        raise ModelError(f"{directory}: is a file, not a model folder (give the folder that holds {CONFIG_FILE})")


def check_tokenizer_fits(text_encoder: TextEncoder, directory: Path) -> None:
    """ModelError naming ``directory`` when the tokenizer its ``text/`` holds cannot feed the loaded text tower
    (``TextEncoder.tokenizer_problem``: token ids past the embeddings, no padding token, a tokenizer that fails): a
    dual encoder's and a VQA model's load check it before any text is encoded."""
    problem = text_encoder.tokenizer_problem()
    if problem is not None:
        raise ModelError(f"{directory}: the tokenizer in {TEXT_DIR}/ does not fit the text tower ({problem}); "
                         f"{TEXT_DIR}/tokenizer.json was changed or is another model's")
