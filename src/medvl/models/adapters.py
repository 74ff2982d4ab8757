"""Local transformers CLIP / SigLIP folders as medvl dual encoders (inference only).

A folder written by transformers' ``save_pretrained`` (PubMedCLIP, MedSigLIP and the like) holds
``config.json`` (``model_type`` "clip" or "siglip"), the weights (``model.safetensors``, sharded or
``pytorch_model.bin``), ``preprocessor_config.json`` and a tokenizer (any tokenizer
``AutoTokenizer`` loads from the folder). ``load_model(folder)`` returns an ``HFDualEncoder``: the
same interface as ``DualEncoder`` (``encode_images`` for files, arrays or a [0, 1] pixel tensor,
``encode_texts``, both L2-normalised; ``logit_scale``; ``preprocessor``; ``meta``; ``config``), so
eval, index, search, predict and report drafts run on it unchanged. Nothing is downloaded.

Preprocessing is read from ``preprocessor_config.json`` and checked against the model: the image
the processor makes (``crop_size`` when it centre-crops, else ``size``) must be the square
``vision_config.image_size``; ``image_mean`` / ``image_std`` must be written there, three finite
numbers each (std > 0); ``rescale_factor`` a positive finite number and the sizes whole numbers.
Images are brought to what such models were trained on, 8-bit RGB: 8-bit images as they are, other
images (16-bit, DICOM values) scaled by their own min-max to [0, 255];
grayscale repeated to three channels, an alpha channel dropped. The folder's own image processor
(its PIL backend) then resizes and crops; ``preprocessor.normalize`` rescales and applies the
mean/std, so the pixels equal the transformers processor's for the same 8-bit RGB image.

Texts: CLIP pads to the longest text with an attention mask and truncates at
``text_config.max_position_embeddings``; SigLIP pads every text to that length and passes no
attention mask, as the model was trained (its text embedding is the last position's). Both pad and
truncate on the right, whatever ``padding_side`` / ``truncation_side`` the folder's tokenizer saved:
left padding would move CLIP's positions and pooled token with the batch's longest text.

Zero-shot: CLIP's ``logit_scale`` is its learned log temperature; SigLIP's ``logit_scale`` and
``logit_bias`` give sigmoid scores ``sigmoid(exp(scale) * cos + bias)``. medvl's zero-shot takes a
softmax over the classes of ``exp(scale) * cos``; the bias shifts every class alike, so the softmax
ranks classes as SigLIP's sigmoid scores do (the probabilities differ: they sum to one).

Training an adapted model is not supported yet: ``save_pretrained`` and ``add_head`` raise
``ModelError``, and ``medvl train`` refuses such a folder.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.images import read_image_2d
from ..data.record import ImageSource
from ..errors import DataError, ModelError, one_line
from ..io import read_json
from .config import ImageConfig, ModelConfig, TextConfig
from .dual import CONFIG_FILE, DualEncoder, non_finite_tensors
from .image import ImageEncoder
from .preprocess import ImagePreprocessor, _scale_unit
from .text import TOKENIZER_LOCK

log = logging.getLogger(__name__)

SUPPORTED_TYPES = ("clip", "siglip")  # config.json model_type values medvl adapts
PROCESSOR_FILE = "preprocessor_config.json"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "spiece.model",
                   "tokenizer.model")
# buffers (not learned weights) that older checkpoints carry and newer transformers no longer keep
HARMLESS_UNUSED = ("position_ids", "num_batches_tracked", "inv_freq")
# tokenized at load: words and characters no small vocabulary holds, so that the unknown token is needed
TOKENIZER_PROBE = "medvl tokenizer check: qzxjv 3.5 mm, Ø ± µ ⍰."
UNHASHED_KEYS = ("transformers_version", "dtype", "torch_dtype")  # vary with the saving library, not the model


def transformers_model_type(directory: str | Path) -> str | None:
    """The ``model_type`` of a transformers folder's config.json; None for a medvl folder (whose
    config.json has none) or a config.json that is not a JSON object."""
    try:
        config = read_json(Path(directory) / CONFIG_FILE)
    except (OSError, ValueError):
        return None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    return str(model_type) if model_type is not None else None


@dataclass
class HFModelConfig(ModelConfig):
    """A transformers folder described for medvl: ``image`` / ``text`` summarise the towers (for
    listings and the service); the folder's own files are the authority and are kept whole."""

    model_type: str = ""  # clip | siglip: the folder's config.json model_type
    architecture: dict[str, Any] = field(default_factory=dict)  # config.json (minus UNHASHED_KEYS, _private keys)
    processor: dict[str, Any] = field(default_factory=dict)  # preprocessor_config.json, as checked


@dataclass(frozen=True)
class ProcessorSettings:
    """What ``preprocessor_config.json`` says the model takes, checked against ``vision_config``."""

    image_size: int  # the square side the processor's output has (the model's image_size)
    input_scale: float  # [0, 1] pixels x input_scale = the processor's rescaled values (1 for 1/255)
    mean: tuple[float, ...] | None  # per-channel mean after rescaling; None: the processor does not normalise
    std: tuple[float, ...] | None


class HFImagePreprocessor(ImagePreprocessor):
    """``ImagePreprocessor``'s interface over a transformers image processor: ``load`` gives
    (3, size, size) in [0, 1], ``normalize`` what the model takes. No training augmentation."""

    def __init__(self, image_processor: Any, settings: ProcessorSettings, config: ImageConfig):
        self.config = config
        self.settings = settings
        self.image_processor = image_processor
        self._augment = None
        self._mean = torch.tensor(settings.mean).view(-1, 1, 1) if settings.mean else None
        self._std = torch.tensor(settings.std).view(-1, 1, 1) if settings.std else None

    def load(self, image: ImageSource | str, source: str | Path | None = None) -> torch.Tensor:
        named: Any = image if not isinstance(image, np.ndarray) else (source or "<array>")
        array = image if isinstance(image, np.ndarray) else read_image_2d(image)
        rgb = rgb_uint8(array, named)
        try:
            pixels = self.image_processor(images=[rgb], do_normalize=False, do_rescale=True, rescale_factor=1 / 255,
                                          input_data_format="channels_last", return_tensors="pt")["pixel_values"][0]
        except (ValueError, TypeError) as err:
            raise DataError(named, f"the model's image processor cannot take this image ({err})") from None
        side = self.settings.image_size
        if tuple(pixels.shape) != (3, side, side):
            raise DataError(named, f"image is {rgb.shape[0]}x{rgb.shape[1]} and the model's processor does not "
                                    f"resize it (do_resize false); the model takes {side}x{side}")
        return pixels.float()

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        pixels = batch * self.settings.input_scale if self.settings.input_scale != 1.0 else batch
        if self._mean is None or self._std is None:
            return pixels
        return (pixels - self._mean) / self._std

    def augment(self, batch: torch.Tensor, seed: int) -> torch.Tensor:
        return batch


def rgb_uint8(array: np.ndarray, source: Any) -> np.ndarray:
    """(H, W, 3) uint8: 8-bit values kept, others min-max scaled; gray repeated, alpha dropped."""
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4))):
        raise DataError(source, f"image shape {array.shape} does not fit a 2D RGB model "
                                "(expected H x W grayscale or H x W x 3 RGB)")
    if array.dtype != np.uint8:
        array = np.round(_scale_unit(array, source) * 255.0).astype(np.uint8)
    if array.ndim == 2:
        return np.repeat(array[..., None], 3, axis=-1)
    return np.ascontiguousarray(array[..., :3])


class HFImageEncoder(ImageEncoder):
    """``ImageEncoder``'s interface over the transformers model: ``forward`` gives its own image
    embeddings before normalisation (``get_image_features``), ``num_features`` their size."""

    def __init__(self, model: Any, config: ImageConfig, num_features: int):
        nn.Module.__init__(self)  # not ImageEncoder.__init__: no MONAI backbone
        self.config = config
        self.num_features = num_features
        self._model = (model,)  # in a tuple: its weights are registered once, under HFDualEncoder.model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return _pooled(self._model[0].get_image_features(pixel_values=images))


class HFDualEncoder(DualEncoder):
    """A transformers ``CLIPModel`` / ``SiglipModel`` with medvl's dual-encoder interface.

    ``image_features`` are the model's own image embeddings before normalisation
    (``get_image_features``), which ``encode_images(features=True)`` and linear probes use.
    """

    def __init__(self, model: Any, tokenizer: Any, preprocessor: HFImagePreprocessor, config: HFModelConfig,
                 directory: Path):
        nn.Module.__init__(self)  # not DualEncoder.__init__: the towers are the transformers model's
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.model_type = config.model_type  # clip | siglip
        self.directory = directory
        self.preprocessor = preprocessor
        self.image_encoder = HFImageEncoder(model, config.image, config.embed_dim)
        self.logit_scale = model.logit_scale
        if self.model_type == "siglip":
            self.logit_bias = model.logit_bias
        else:
            self.register_buffer("logit_bias", torch.zeros(()), persistent=False)  # CLIP has none
        self.heads = nn.ModuleDict()
        self.meta = {"heads": {}, "name": config.name, "source": {"format": "transformers", "dir": str(directory),
                                                                  "model_type": self.model_type}}
        self.max_length = int(model.config.text_config.max_position_embeddings)

    def embed_image_features(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(features, dim=-1)

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        siglip = self.model_type == "siglip"
        with TOKENIZER_LOCK:  # not at once with text_tokens from another thread ("Already borrowed")
            tokens = self.tokenizer(list(texts), padding="max_length" if siglip else True, truncation=True,
                                    max_length=self.max_length, return_tensors="pt")
        inputs = {"input_ids": tokens["input_ids"]}
        if not siglip and "attention_mask" in tokens:
            inputs["attention_mask"] = tokens["attention_mask"]
        return F.normalize(_pooled(self.model.get_text_features(**inputs)), dim=-1)

    def text_tokens(self, texts: Sequence[str]) -> list[tuple[int, ...]]:
        """The token ids ``embed_texts`` feeds the text tower, without padding."""
        with TOKENIZER_LOCK:
            ids = self.tokenizer(list(texts), truncation=True, max_length=self.max_length)["input_ids"]
        return [tuple(row) for row in ids]

    def text_read_length(self, text: str) -> tuple[int, int]:
        """The tokens of ``text`` and the most the text tower reads of a text (its position embeddings), special
        tokens left out of both, as ``DualEncoder.text_read_length`` counts them."""
        with TOKENIZER_LOCK:
            special = self.tokenizer.num_special_tokens_to_add()
            length = len(self.tokenizer(text, truncation=False, verbose=False)["input_ids"])
        return length - special, self.max_length - special

    def add_head(self, column: str, classes: Sequence[str]) -> None:
        raise ModelError(f"{self.directory}: a transformers {self.model_type} folder is "
                         "inference-only in medvl for now (no supervised heads)")

    def save_pretrained(self, directory: str | Path) -> Path:
        raise ModelError(f"{self.directory}: a transformers {self.model_type} folder is "
                         "inference-only in medvl for now; use the folder itself")

    @classmethod
    def from_pretrained(cls, directory: str | Path, load_guard: bool = True) -> HFDualEncoder:
        """Load and check a transformers CLIP / SigLIP folder; ``ModelError`` naming the folder and
        what is missing or inconsistent otherwise. (``load_guard``: the ``DualEncoder`` signature; a transformers
        folder carries no OOD guard.)"""
        directory = Path(directory)
        model_type = transformers_model_type(directory)
        if model_type not in SUPPORTED_TYPES:
            raise ModelError(f"{directory}: config.json model_type {model_type!r} is not supported "
                             f"(medvl adapts transformers {' and '.join(SUPPORTED_TYPES)} folders)")
        _require_files(directory)
        hf_model = _load_weights(directory, model_type)
        architecture = json.loads((directory / CONFIG_FILE).read_text())
        processor = _read_json(directory / PROCESSOR_FILE)
        image_processor = _load_image_processor(directory)
        settings = processor_settings(directory, processor, image_processor, hf_model.config.vision_config.image_size)
        tokenizer = _load_tokenizer(directory, hf_model.config.text_config)
        config = _describe(directory, model_type, hf_model.config, architecture, processor)
        preprocessor = HFImagePreprocessor(image_processor, settings, config.image)
        hf_model.eval()
        return cls(hf_model, tokenizer, preprocessor, config, directory)


def _pooled(output: Any) -> torch.Tensor:
    """The embedding tensor of a ``get_*_features`` result (an output object in transformers 5)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _require_files(directory: Path) -> None:
    if not any((directory / name).is_file() for name in WEIGHT_FILES):
        raise ModelError(f"{directory}: no weights (expected one of {', '.join(WEIGHT_FILES)})")
    if not (directory / PROCESSOR_FILE).is_file():
        raise ModelError(f"{directory}: no processor config ({PROCESSOR_FILE}: image size, mean and std)")
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise ModelError(f"{directory}: no tokenizer (expected one of {', '.join(TOKENIZER_FILES)})")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = read_json(path)
    except (OSError, ValueError) as err:
        raise ModelError(f"{path}: cannot read ({err.__class__.__name__}: {err})") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path}: expected a JSON object")
    return data


def _load_weights(directory: Path, model_type: str) -> Any:
    from transformers import CLIPModel, SiglipModel

    return load_transformers_model(CLIPModel if model_type == "clip" else SiglipModel, directory, model_type)


def load_transformers_model(model_class: Any, directory: Path, model_type: str) -> Any:
    """``model_class.from_pretrained(directory)`` in float32 from local files only, checked: every tensor
    of the config present and finite, and no weight the config has no place for (a checkpoint of another
    depth or width: the network built would not be the one trained; buffers older checkpoints carry, such as
    ``position_ids``, aside); any failure a ``ModelError`` naming the folder."""
    try:
        with _without_loading_bar():
            loaded: Any = model_class.from_pretrained(directory, local_files_only=True, dtype=torch.float32,
                                                      output_loading_info=True)
        model, info = loaded
    except Exception as err:  # transformers raises OSError, ValueError, RuntimeError, SafetensorError...
        raise ModelError(f"{directory}: cannot load the {model_type} model ({err.__class__.__name__}: "
                         f"{str(err)[:200]})") from None
    missing = info.get("missing_keys") or []
    if missing:
        raise ModelError(f"{directory}: the weights lack {len(missing)} tensor(s) of the {model_type} config "
                         f"(first: {sorted(missing)[0]})")
    unused = sorted(key for key in info.get("unexpected_keys") or [] if not key.endswith(HARMLESS_UNUSED))
    if unused:
        raise ModelError(f"{directory}: the weights hold {len(unused)} tensor(s) the {model_type} config has no "
                         f"place for (first: {unused[0]}); config.json does not describe these weights")
    bad = non_finite_tensors(model.state_dict())
    if bad:
        raise ModelError(f"{directory}: {len(bad)} weight tensor(s) hold NaN or infinity (first: {bad[0]})")
    return model


@contextmanager
def _without_loading_bar() -> Iterator[None]:
    """transformers' per-tensor loading bar off while a folder loads (medvl has its own progress
    bars), then back as it was."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def processor_settings(directory: Path, written: dict[str, Any], image_processor: Any,
                       image_size: int) -> ProcessorSettings:
    """Check the folder's image processor (``written``: its preprocessor_config.json; settings it
    leaves out take the processor class's defaults) against ``vision_config.image_size``."""
    where = directory / PROCESSOR_FILE
    if "size" not in written:
        raise ModelError(f"{where}: no size (the side the images are resized to)")
    _check_sizes(image_processor, where)
    if getattr(image_processor, "do_center_crop", False):
        height, width = _side(image_processor.crop_size, "crop_size", where)
    elif image_processor.do_resize:
        height, width = _side(image_processor.size, "size", where)
    else:
        height = width = image_size  # no resizing: each image is checked when it is loaded
    if (height, width) != (image_size, image_size):
        raise ModelError(f"{where}: the processor makes {height}x{width} images but the model's "
                         f"vision_config.image_size is {image_size}")
    mean = std = None
    if image_processor.do_normalize:
        mean, std = (_channels(written.get(key), key, where) for key in ("image_mean", "image_std"))
        if min(std) <= 0:
            raise ModelError(f"{where}: image_std must be > 0, got {list(std)}")
    factor = image_processor.rescale_factor
    if image_processor.do_rescale and not (_finite(factor) and factor > 0):
        raise ModelError(f"{where}: rescale_factor must be a positive finite number (1/255 for 8-bit images), "
                         f"got {factor!r}")
    scale = float(factor) * 255.0 if image_processor.do_rescale else 255.0
    return ProcessorSettings(image_size=image_size, input_scale=1.0 if abs(scale - 1.0) < 1e-9 else scale,
                             mean=mean, std=std)


def _check_sizes(image_processor: Any, where: Path) -> None:
    """Every number of the size entries the processor uses a whole number >= 1: an Infinity or 40.5 there loads
    and fails (OverflowError, TypeError) at the first image."""
    for key, used in (("size", image_processor.do_resize), ("crop_size", getattr(image_processor, "do_center_crop",
                                                                                  False))):
        size = getattr(image_processor, key, None)
        if not used or size is None:
            continue
        entries = dict(size) if hasattr(size, "get") else {"": size}  # a dict or SizeDict, or a bare number
        for name, value in entries.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ModelError(f"{where}: {key}{'.' + name if name else ''} must be a whole number >= 1, "
                                 f"got {value!r}")


def _side(size: Any, key: str, where: Path) -> tuple[int, int]:
    """(height, width) of a size entry; a shortest_edge alone leaves the shape to the image."""
    if isinstance(size, int):
        return size, size
    height, width = (size.get(key) if hasattr(size, "get") else None for key in ("height", "width"))
    if isinstance(height, int) and isinstance(width, int):
        return height, width
    raise ModelError(f"{where}: {key} {size!r} does not fix a square input (expected height and width; "
                     "shortest_edge needs do_center_crop with a crop_size)")


def _channels(values: Any, key: str, where: Path) -> tuple[float, ...]:
    """Three finite numbers: a NaN or an infinity (which json reads from bare ``NaN`` / ``Infinity``) would make
    every pixel, and so every embedding and score, NaN."""
    if not (isinstance(values, list) and len(values) == 3 and all(_finite(value) for value in values)):
        raise ModelError(f"{where}: {key} must be 3 finite numbers (R, G, B), got {values!r}")
    return tuple(float(v) for v in values)


def _finite(value: Any) -> bool:
    """A finite int or float (not a bool, a string or a container)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # a whole number past float's range
        return False


def _load_tokenizer(directory: Path, text_config: Any) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except Exception as err:  # a missing sentencepiece, a broken tokenizer.json...
        raise ModelError(f"{directory}: cannot load the tokenizer ({err.__class__.__name__}: "
                         f"{str(err)[:200]})") from None
    if tokenizer.pad_token is None:
        raise ModelError(f"{directory}: the tokenizer has no padding token")
    _right_sided(tokenizer)
    _check_tokenizer_runs(directory, tokenizer, text_config)
    eos = getattr(text_config, "eos_token_id", None)
    # CLIP pools the first end-of-text token, unless eos_token_id is 2 (older configs: the largest id)
    if text_config.model_type == "clip_text_model" and eos not in (None, 2) and tokenizer.eos_token_id != eos:
        raise ModelError(f"{directory}: the tokenizer's end-of-text id {tokenizer.eos_token_id} differs from "
                         f"text_config.eos_token_id {eos}")
    return tokenizer


def _check_tokenizer_runs(directory: Path, tokenizer: Any, text_config: Any) -> None:
    """Tokenize a probe text at load, padded as ``embed_texts`` pads, and check every id it gives and the padding
    id against ``text_config.vocab_size``. Tokenizer files can load and fail only at the first text: a
    tokenizer.json post-processor naming a token it does not define (a Rust panic, pyo3's ``PanicException``,
    which is no ``Exception``), a WordLevel vocabulary without its unknown token; a padding token outside the
    vocabulary is added past the model's embedding table (an IndexError in the text tower)."""
    siglip = text_config.model_type == "siglip_text_model"
    try:
        ids = tokenizer([TOKENIZER_PROBE], padding="max_length" if siglip else True, truncation=True,
                        max_length=int(text_config.max_position_embeddings))["input_ids"][0]
    except BaseException as err:
        if not (isinstance(err, Exception) or type(err).__name__ == "PanicException"):
            raise  # KeyboardInterrupt, SystemExit
        raise ModelError(f"{directory}: the tokenizer loads but cannot tokenize a text ({one_line(err)})") from None
    vocab_size = int(text_config.vocab_size)
    if not 0 <= tokenizer.pad_token_id < vocab_size:
        raise ModelError(f"{directory}: the tokenizer's padding token {tokenizer.pad_token!r} has id "
                         f"{tokenizer.pad_token_id}, outside the model's vocabulary (text_config.vocab_size "
                         f"{vocab_size}); the folder's tokenizer does not fit its model")
    outside = [token for token in ids if not 0 <= token < vocab_size]
    if outside:
        raise ModelError(f"{directory}: the tokenizer gives token id {outside[0]}, outside the model's vocabulary "
                         f"(text_config.vocab_size {vocab_size}); the folder's tokenizer does not fit its model")


def _right_sided(tokenizer: Any) -> None:
    """Pad and truncate on the right, whatever side the folder saved: CLIP counts positions from 0 and pools the
    first end-of-text token (in real folders the padding token too), SigLIP pools the last position; both were
    trained with the text first and the padding after it. A folder saved with ``padding_side: left`` made a CLIP
    text's vector depend on the other texts of its batch (zero-shot prompts, the service's micro-batches)."""
    for side in ("padding_side", "truncation_side"):
        if getattr(tokenizer, side, "right") != "right":
            log.info("the tokenizer's %s %r is not what the text tower was trained with: using 'right'", side,
                     getattr(tokenizer, side))
            setattr(tokenizer, side, "right")


def _load_image_processor(directory: Path) -> Any:
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(directory, backend="pil", local_files_only=True)
    except Exception as err:
        raise ModelError(f"{directory}: cannot load the image processor ({err.__class__.__name__}: "
                         f"{str(err)[:200]})") from None


def _describe(directory: Path, model_type: str, hf_config: Any, architecture: dict[str, Any],
              processor: dict[str, Any]) -> HFModelConfig:
    vision, text = hf_config.vision_config, hf_config.text_config
    if model_type == "clip":
        embed_dim = int(hf_config.projection_dim)
    else:
        embed_dim = int(vision.hidden_size)
        text_dim = int(getattr(text, "projection_size", None) or text.hidden_size)
        if text_dim != embed_dim:
            raise ModelError(f"{directory}: image embeddings are {embed_dim}-d but text embeddings {text_dim}-d")
    image = ImageConfig(arch="vit", in_channels=3, image_size=int(vision.image_size), patch_size=int(vision.patch_size),
                        hidden_size=int(vision.hidden_size), num_layers=int(vision.num_hidden_layers),
                        num_heads=int(vision.num_attention_heads), augment=False)
    text_summary = TextConfig(kind="pretrained", vocab_size=int(text.vocab_size), hidden_size=int(text.hidden_size),
                              num_layers=int(text.num_hidden_layers), num_heads=int(text.num_attention_heads),
                              intermediate_size=int(text.intermediate_size),
                              max_length=int(text.max_position_embeddings))
    return HFModelConfig(name=directory.resolve().name, embed_dim=embed_dim,
                         loss="siglip" if model_type == "siglip" else "clip", image=image, text=text_summary,
                         model_type=model_type, architecture=_hashed(architecture), processor=_hashed(processor))


def _hashed(values: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in values.items() if key not in UNHASHED_KEYS and not key.startswith("_")}
