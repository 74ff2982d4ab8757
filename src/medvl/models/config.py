"""Model configs: plain dataclasses, serialised to JSON, one field comment each."""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import Any

from ..checks import check_number
from ..errors import InputError

MAX_IMAGE_SIDE = 4096  # pixels (or voxels) a side after resizing; larger inputs are a mistake on a CPU
# Upper limits of the size settings, far above any model medvl trains (BERT-large: 24 layers, 16 heads, 1,024 wide
# with a 4,096 feed-forward; ViT-H: 32 layers; DenseNet-264's largest block: 64 layers), so a typo (an extra zero
# or three in --set text.num_layers=100000) is an InputError naming the key, not a build that eats the memory
MAX_LAYERS = 64  # transformer layers of a tower; blocks of a ResNet stage or a DenseNet block
MAX_WIDTH = 8192  # channels, hidden, feed-forward and embedding sizes; DenseNet growth rate
MAX_HEADS = 64  # attention heads
MAX_TEXT_TOKENS = 8192  # text.max_length
MAX_VOCAB_SIZE = 1_000_000  # WordPiece vocabulary entries
# the image fields each architecture reads (``models.image``); the others do nothing for it
ARCH_FIELDS = {"resnet": frozenset({"layers", "widths", "stem_kernel", "stem_stride", "no_max_pool"}),
               "vit": frozenset({"patch_size", "hidden_size", "num_layers", "num_heads"}),
               "densenet": frozenset({"widths", "growth_rate", "block_config"})}  # widths[0]: its stem width
SLICEPOOL_FIELDS = frozenset({"slice_arch", "slice_pool", "slice_batch"})
BERT_FIELDS = frozenset({"vocab_size", "vocab_min_texts", "hidden_size", "num_layers", "num_heads",
                         "intermediate_size"})
# A whole word enters a WordPiece vocabulary learnt from training texts only when at least this many distinct
# texts hold it (document frequency): a name, record number or date written in a report or two is spelled
# from single characters instead, so the shipped tokenizer does not list it (``models.text.train_wordpiece``).
MIN_WORD_TEXTS = 5

log = logging.getLogger(__name__)


@dataclass
class ImageConfig:
    arch: str = "resnet"  # resnet | vit | densenet (MONAI networks) | slicepool (3D: a 2D slice_arch per slice)
    spatial_dims: int = 2  # 2 for images, 3 for volumes (D x H x W, RAS: axis 0 inferior -> superior)
    in_channels: int = 1  # 1 = grayscale (X-ray, CT, MR), 3 = RGB (dermoscopy, photos); or one per window
    image_size: int = 128  # input side in pixels after resizing (square; in-plane side of a volume)
    depth: int = 0  # 3D: slices after resizing along axis 0 (0 = image_size, a cube)
    window: list[float] = field(default_factory=list)  # [center, width, ...] in modality units (HU for
    # CT): each pair is one input channel, clipped to the window and scaled to [0, 1] (e.g. [40, 400]
    # soft tissue, [-600, 1500] lung; presets in medvl.clinical.windowing; a DICOM file is read as HU for
    # them, its header window ignored); [] = per-image min-max.
    # 8-bit images are display values already and are scaled by 1/255 instead
    layers: list[int] = field(default_factory=lambda: [1, 1, 1, 1])  # resnet blocks per stage
    widths: list[int] = field(default_factory=lambda: [32, 64, 128, 256])  # resnet stage widths
    stem_kernel: int = 7  # first conv kernel; 3 with stem_stride 1 suits tiny (28 px) images
    stem_stride: int = 2  # first conv stride
    no_max_pool: bool = False  # skip the stem max-pool (small images)
    patch_size: int = 16  # vit patch side
    hidden_size: int = 256  # vit width
    num_layers: int = 4  # vit depth; densenet: ignored
    num_heads: int = 4  # vit heads
    growth_rate: int = 16  # densenet growth rate
    block_config: list[int] = field(default_factory=lambda: [2, 2, 2, 2])  # densenet blocks
    intensity_mean: float = 0.5  # normalisation after scaling intensities to [0, 1]
    intensity_std: float = 0.25
    augment: bool = True  # random affine / contrast / noise during training
    augment_flip: bool = False  # horizontal flips; off for chest X-ray (laterality matters)
    augment_rot90: bool = False  # rotations by 0/90/180/270 degrees and vertical flips (with augment_flip:
    # all 8 orientations of the square); only for images with no orientation (dermoscopy, histology)
    augment_color: float = 0.0  # RGB colour jitter strength s in [0, 0.9]: brightness, contrast and
    # saturation factors in [1 - s, 1 + s], hue rotated by up to s / 4 of a turn; 0 = off; 3 channels only
    augment_crop: float = 0.0  # random resized crop while training (2D and 3D): each image cropped to a box of a
    # share of its area drawn from [this value, 1] (aspect 3/4-4/3 in 2D, cubes in 3D) and resized back to
    # image_size, after the other augmentation; e.g. 0.35; 0 = off. Scoring always sees the whole image
    test_time_orientations: int = 1  # inference only (2D): backbone features averaged over this many
    # orientations of the image: 1 = as given, 2 = + its horizontal mirror, 4 = the four 90-degree rotations,
    # 8 = all eight (rotations x mirror); for images with no orientation (dermoscopy, histology); costs as
    # many forward passes (every backend). Training and heatmaps see one orientation
    color_constancy: float = 0.0  # Shades of Gray colour constancy at load (RGB images): each channel
    # divided by its Minkowski p-mean (the illuminant estimate, p = this value; 6 is usual for
    # dermoscopy), rescaled so a grey image is unchanged; 0 = off
    percentile_scaling: float = 0.0  # 2D images, at load: per image, the p-th and (100 - p)-th intensity
    # percentiles (all channels together) map to 0 and 1, clipped; undoes any exposure / contrast change that
    # is a linear map of the intensities; 0 = off (uint8 / 255, other dtypes min-max)
    slice_arch: str = "resnet"  # slicepool: the 2D encoder of each axial slice (resnet | vit | densenet),
    # built from the fields above with spatial_dims 2
    slice_pool: str = "attention"  # slicepool: attention (gated, learned) | mean pooling across slices
    slice_batch: int = 64  # slicepool: slices encoded at once (bounds inference memory)

    def inert_fields(self) -> dict[str, str]:
        """Fields this config's architecture does not read, each with the reason (for a warning when one is set)."""
        arch = self.slice_arch if self.arch == "slicepool" else self.arch
        inert = {name: f"a {' / '.join(a for a, names in ARCH_FIELDS.items() if name in names)} setting, and "
                       f"the image tower is a {arch}{' per slice' if self.arch == 'slicepool' else ''}"
                 for name in set().union(*ARCH_FIELDS.values()) - ARCH_FIELDS.get(arch, frozenset())}
        if self.arch != "slicepool":
            inert.update(dict.fromkeys(SLICEPOOL_FIELDS, f"a slicepool setting, and image.arch is {self.arch}"))
        return inert

    @property
    def windows(self) -> list[tuple[float, float]]:
        """The (center, width) pairs of ``window``."""
        return [(float(self.window[i]), float(self.window[i + 1])) for i in range(0, len(self.window) - 1, 2)]

    @property
    def volume_shape(self) -> tuple[int, ...]:
        """The spatial input shape: (H, W) or (D, H, W)."""
        side = (self.image_size,) * 2
        return side if self.spatial_dims == 2 else (self.depth or self.image_size, *side)

    def validate(self) -> None:
        if self.arch not in ("resnet", "vit", "densenet", "slicepool"):
            raise InputError(f"image.arch must be resnet, vit, densenet or slicepool, got {self.arch!r}")
        if self.spatial_dims not in (2, 3):
            raise InputError(f"image.spatial_dims must be 2 or 3, got {self.spatial_dims}")
        flat_arch = self.slice_arch in ("resnet", "vit", "densenet")
        if self.arch == "slicepool" and (self.spatial_dims != 3 or not flat_arch):
            raise InputError(f"image.arch slicepool needs spatial_dims 3 and slice_arch resnet, vit or densenet, "
                             f"got spatial_dims {self.spatial_dims}, slice_arch {self.slice_arch!r}")
        if self.slice_pool not in ("attention", "mean") or self.slice_batch < 1:
            raise InputError(f"image.slice_pool must be attention or mean and slice_batch >= 1, "
                             f"got {self.slice_pool!r}, {self.slice_batch}")
        check_number("image.image_size", self.image_size, minimum=8, maximum=MAX_IMAGE_SIDE, integer=True)
        check_number("image.depth", self.depth, minimum=0, maximum=MAX_IMAGE_SIDE, integer=True)
        check_number("image.patch_size", self.patch_size, minimum=1, integer=True)
        check_number("image.intensity_std", self.intensity_std, minimum=0, exclusive_minimum=True)
        check_number("image.intensity_mean", self.intensity_mean)
        maxima = {"hidden_size": MAX_WIDTH, "num_layers": MAX_LAYERS, "num_heads": MAX_HEADS, "growth_rate": MAX_WIDTH,
                  "stem_kernel": self.image_size, "stem_stride": self.image_size}
        for name, maximum in maxima.items():
            check_number(f"image.{name}", getattr(self, name), minimum=1, maximum=maximum, integer=True)
        vit = self.arch == "vit" or (self.arch == "slicepool" and self.slice_arch == "vit")
        if vit:  # a ViT field: a ResNet or DenseNet of any allowed side ignores it
            check_number("image.patch_size", self.patch_size, minimum=1, maximum=self.image_size, integer=True)
        sides = self.volume_shape if self.arch == "vit" else (self.image_size,)
        if vit and any(side % self.patch_size for side in sides):
            raise InputError(f"image sides {sides} must be multiples of image.patch_size {self.patch_size} for a vit")
        if vit and self.hidden_size % self.num_heads:  # each attention head takes an equal share of the width
            raise InputError(f"image.hidden_size {self.hidden_size} must be a multiple of image.num_heads "
                             f"{self.num_heads} for a vit")
        check_number("image.color_constancy", self.color_constancy, minimum=0, maximum=20)
        check_number("image.augment_color", self.augment_color, minimum=0, maximum=0.9)
        check_number("image.percentile_scaling", self.percentile_scaling, minimum=0, maximum=25)
        check_number("image.augment_crop", self.augment_crop, minimum=0, maximum=1)
        if 0 < self.augment_crop < 0.05:
            raise InputError(f"image.augment_crop is the smallest share of the image a crop keeps: 0 (off) or "
                             f"0.05-1, got {self.augment_crop}")
        if self.percentile_scaling and self.spatial_dims != 2:
            raise InputError("image.percentile_scaling is for 2D images (spatial_dims 2)")
        if (self.color_constancy or self.augment_color) and self.in_channels != 3:
            raise InputError(f"image.color_constancy and image.augment_color need RGB (in_channels 3), "
                             f"got in_channels {self.in_channels}")
        if self.augment_rot90 and self.spatial_dims != 2:
            raise InputError("image.augment_rot90 is for 2D images (spatial_dims 2)")
        if self.test_time_orientations not in (1, 2, 4, 8) or isinstance(self.test_time_orientations, bool):
            raise InputError(f"image.test_time_orientations must be 1, 2, 4 or 8, got {self.test_time_orientations!r}")
        if self.test_time_orientations != 1 and self.spatial_dims != 2:
            raise InputError("image.test_time_orientations is for 2D images (spatial_dims 2)")
        self._validate_lists()
        self._validate_window()

    def _validate_lists(self) -> None:
        """The list fields the architecture reads: a ResNet takes 4 stages (``layers``, ``widths``), a DenseNet
        one or more blocks (``block_config``) and its stem width (``widths[0]``); every entry a positive integer."""
        arch = self.slice_arch if self.arch == "slicepool" else self.arch
        lengths: dict[str, dict[str, int | None]] = {"resnet": {"layers": 4, "widths": 4},
                                                     "densenet": {"widths": None, "block_config": None}}
        for name, length in lengths.get(arch, {}).items():
            values = getattr(self, name)
            if (len(values) != length if length else not values) or any(value < 1 for value in values):
                count = f"{length}" if length else "one or more"
                raise InputError(f"image.{name} must be a list of {count} positive integers for a {arch}, "
                                 f"got {values}")
            maximum = MAX_WIDTH if name == "widths" else MAX_LAYERS
            if max(values) > maximum:
                raise InputError(f"image.{name} entries must be <= {maximum} for a {arch}, got {max(values)}")

    def _validate_window(self) -> None:
        numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in self.window)
        if not numbers or len(self.window) % 2 or any(width <= 0 for _, width in self.windows):
            raise InputError(f"image.window must be [center, width, ...] pairs with widths > 0, got {self.window}")
        count = len(self.windows)
        if count > 1 and self.in_channels != count:
            raise InputError(f"image.window gives {count} channels (one per window); "
                             f"image.in_channels must be {count}, got {self.in_channels}")
        if count <= 1 and self.in_channels not in (1, 3):
            raise InputError(f"image.in_channels must be 1 or 3, got {self.in_channels}")


@dataclass
class TextConfig:
    kind: str = "bert"  # bert: random-init BERT + WordPiece trained on the corpus; pretrained: HF dir
    path: str | None = None  # pretrained: a local HF directory, or "all-minilm-l6-v2" (shipped)
    vocab_size: int = 4000  # bert: WordPiece vocabulary size
    vocab_min_texts: int = MIN_WORD_TEXTS  # bert: distinct training texts a word (or a character outside the
    # base alphabet) must occur in to enter the vocabulary; rarer ones are spelled from characters (or [UNK])
    hidden_size: int = 128  # bert: width
    num_layers: int = 2  # bert: depth
    num_heads: int = 2  # bert: attention heads
    intermediate_size: int = 256  # bert: feed-forward width
    max_length: int = 128  # tokens per text, longer texts are truncated
    pooling: str = "mean"  # mean | cls
    freeze: bool = False  # lock the text tower (LiT): weights fixed, no dropout, features cached while training
    tune_top_layers: int = 0  # with freeze: the top N transformer layers still train; the layers below stay
    # fixed and their output is computed once per text while training (a partly unfrozen tower at LiT's cost)

    def validate_sizes(self) -> None:
        """Every size a whole number from 1 to its limit (a pretrained tower ignores them: checked all the same)."""
        maxima = {"vocab_size": MAX_VOCAB_SIZE, "vocab_min_texts": None, "hidden_size": MAX_WIDTH,
                  "num_layers": MAX_LAYERS, "num_heads": MAX_HEADS, "intermediate_size": MAX_WIDTH,
                  "max_length": MAX_TEXT_TOKENS}
        for name, maximum in maxima.items():
            check_number(f"text.{name}", getattr(self, name), minimum=1, maximum=maximum, integer=True)
        check_number("text.tune_top_layers", self.tune_top_layers, minimum=0, maximum=MAX_LAYERS, integer=True)

    def validate_heads(self) -> None:
        """A random-init BERT splits its width equally between its attention heads."""
        if self.kind == "bert" and self.hidden_size % self.num_heads:
            raise InputError(f"text.hidden_size {self.hidden_size} must be a multiple of text.num_heads "
                             f"{self.num_heads}")


@dataclass
class ModelConfig:
    name: str = "custom"
    embed_dim: int = 128  # shared image-text embedding size
    loss: str = "clip"  # clip (InfoNCE, softmax) | siglip (pairwise sigmoid)
    init_temperature: float = 0.07  # logit_scale starts at 1 / temperature
    init_logit_bias: float = -10.0  # siglip bias start
    image: ImageConfig = field(default_factory=ImageConfig)
    text: TextConfig = field(default_factory=TextConfig)

    @property
    def init_logit_scale(self) -> float:
        return math.log(1.0 / self.init_temperature)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        data = dict(data)
        image = _build(ImageConfig, data.pop("image", {}), "image")
        text = _build(TextConfig, data.pop("text", {}), "text")
        config = _build(cls, data, "model")
        config.image, config.text = image, text
        config.validate()
        return config

    def merged(self, overrides: dict[str, Any]) -> ModelConfig:
        """A copy with overrides; nested keys as ``image.image_size`` or ``{"image": {...}}``. An override of a
        field the result's architecture does not read (``image.patch_size`` for a ResNet, ``text.vocab_size``
        for a pretrained tower) is warned: it would change nothing."""
        config = ModelConfig.from_dict(merge_overrides(self.to_dict(), overrides, ("image", "text")))
        inert = {f"image.{name}": why for name, why in config.image.inert_fields().items()}
        if config.text.kind == "pretrained":
            inert.update({f"text.{name}": "a setting of the random-init BERT, and the text tower is pretrained (its "
                                           "own size applies)" for name in BERT_FIELDS})
        for key in _flat_keys(overrides, ("image", "text")):
            if key in inert:
                log.warning("model setting %s has no effect: it is %s", key, inert[key])
        return config

    def validate(self) -> None:
        if self.loss not in ("clip", "siglip"):
            raise InputError(f"loss must be clip or siglip, got {self.loss!r}")
        check_number("embed_dim", self.embed_dim, minimum=1, maximum=MAX_WIDTH, integer=True)
        # the trainer clamps the learned temperature at >= 0.01; a start outside [0.001, 100] is a typo
        check_number("init_temperature", self.init_temperature, minimum=0.001, maximum=100)
        check_number("init_logit_bias", self.init_logit_bias, minimum=-100, maximum=100)
        self.image.validate()
        self.text.validate_sizes()
        if self.text.kind not in ("bert", "pretrained"):
            raise InputError(f"text.kind must be bert or pretrained, got {self.text.kind!r}")
        self.text.validate_heads()
        if self.text.kind == "pretrained" and not self.text.path:
            raise InputError("text.kind 'pretrained' needs text.path (a local HF dir or all-minilm-l6-v2)")
        if self.text.pooling not in ("mean", "cls"):
            raise InputError(f"text.pooling must be mean or cls, got {self.text.pooling!r}")
        if self.text.tune_top_layers and not self.text.freeze:
            raise InputError("text.tune_top_layers is for a locked tower (text.freeze=true): an unlocked tower "
                             "trains every layer already")


@dataclass
class Recipe:
    """How a named config is trained: the defaults of ``medvl train --model NAME`` (and of the benchmark
    scripts), each overridden by the matching command-line option. Kept apart from the architecture
    (the ``recipe`` block of a config JSON); a config without one trains with ``TrainConfig``'s defaults.
    """

    about: str = ""  # where the recipe comes from (the docs/benchmarks.md section that measured it)
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields: epochs, batch_size, lr,
    # loss, text_source, label_columns ([] = the dataset's own), supervised_weight, contrastive_weight, ...
    model: dict[str, Any] = field(default_factory=dict)  # model config overrides used for training, as
    # ``--set`` takes them (``{"text.freeze": true}``: a locked text tower; ``{"image.image_size": 64}``);
    # they are saved with the trained model's config
    captions: str | None = None  # a caption set shipped in configs/captions/NAME.yaml (label captions
    # and zero-shot prompts); None = the dataset's own, else generic templates
    ensemble: int = 1  # classifier benchmarks: members trained with their own seeds (``medvl bench
    # medmnist``: seed, seed + 1, ...; ``medvl bench cv``: per fold, ``medvl.bench.cv.MEMBER_SEED_STRIDE``
    # apart) whose class probabilities are averaged; ``medvl train`` trains the first (seed)
    test_time_views: list[list[float]] = field(default_factory=list)  # benchmark test-time augmentation:
    # [shift_x, shift_y, scale] views (shifts as fractions of the image side, scale about the centre,
    # border padding) averaged with the plain image; [] = the plain image only. No flips (laterality)
    operating_point: str = "max_accuracy"  # binary benchmarks' decision threshold, chosen on held-out
    # data: max_accuracy (its own class mix) | max_balanced_accuracy (any class mix) |
    # max_accuracy_at_prior (re-weighted to --target-prior positives)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
        return _build(cls, data, "recipe")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def merge_overrides(data: dict[str, Any], overrides: dict[str, Any], sections: tuple[str, ...]) -> dict[str, Any]:
    """``data`` (a config's ``to_dict()``) with ``overrides`` merged in: ``section.field`` keys (and a
    dict under a section's name) go into that section, other keys replace top-level values. Unknown
    keys are left for ``from_dict`` to refuse, naming them."""
    for key, value in overrides.items():
        head, _, tail = key.partition(".")
        if tail and head in sections:
            data[head][tail] = value
        elif not tail and isinstance(value, dict) and head in sections:
            data[head].update(value)
        else:
            data[key] = value
    return data


def refuse_copied_overrides(overrides: dict[str, Any], copied: dict[str, str], sections: tuple[str, ...]) -> None:
    """An override of a section whose tower is copied from another model (``copied``: the section and why, e.g.
    ``{"image": "--init (the image tower is the dual encoder's)"}``) is an InputError: the copy's own section
    replaces it, and the run would record a setting it never used."""
    for key in _flat_keys(overrides, sections):
        section = key.partition(".")[0]
        if section in copied:
            raise InputError(f"--set {key}: {section}.* overrides do not apply with {copied[section]}")


def _flat_keys(overrides: dict[str, Any], sections: tuple[str, ...]) -> list[str]:
    """The ``section.field`` keys of ``overrides`` (a dict under a section's name spelled out)."""
    keys = []
    for key, value in overrides.items():
        if key in sections and isinstance(value, dict):
            keys += [f"{key}.{name}" for name in value]
        else:
            keys.append(key)
    return keys


def non_default(values: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """The entries that differ from the defaults, recursively: a config field added to medvl later
    (with a default that keeps the old behaviour) leaves the fingerprint of an existing model as it was."""
    kept = {}
    for key, value in values.items():
        default = defaults.get(key)
        if isinstance(value, dict) and isinstance(default, dict):
            value = non_default(value, default)
            if value:
                kept[key] = value
        elif key not in defaults or value != default:
            kept[key] = value
    return kept


def build_dataclass(cls, data: dict[str, Any], section: str):
    """``cls(**data)`` with unknown keys and wrongly typed values refused (an ``InputError`` naming them)."""
    return _build(cls, data, section)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _build(cls, data: dict[str, Any], section: str):
    if not isinstance(data, dict):
        raise InputError(f"the {section} config must be an object of settings, got {json_type(data)}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise InputError(f"unknown {section} config keys: {sorted(unknown)}; known: {sorted(names)}")
    instance = cls(**data)
    for f in dataclasses.fields(cls):
        value = getattr(instance, f.name)
        default = _default(f)
        if value is None and default is not None and "None" not in str(f.type):  # only an optional field takes null
            raise InputError(f"{section}.{f.name} must be {type(default).__name__}, got null")
        if default is not None and value is not None and not _same_type(default, value):
            raise InputError(
                f"{section}.{f.name} must be {type(default).__name__}, got {type(value).__name__}"
            )
        element = LIST_ELEMENTS.get(str(f.type))
        if element is not None and isinstance(value, list) and not all(map(element[0], value)):
            raise InputError(f"{section}.{f.name} must be a list of {element[1]}, got {value!r}")
    return instance


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# a list field's annotation -> the check of each of its entries and how a message names them (``image.window``,
# a list of numbers, is checked with its pairing by ``ImageConfig``)
LIST_ELEMENTS = {"list[int]": (_is_int, "whole numbers")}


def json_type(value: Any) -> str:
    """How JSON spells the type of a parsed value (for messages about a hand-edited file)."""
    names = {dict: "an object", list: "a list", str: "a string", bool: "true or false", type(None): "null"}
    return names.get(type(value), "a number")


def _same_type(default: Any, value: Any) -> bool:
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) and isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, int | float)
    if isinstance(default, ImageConfig | TextConfig):
        return True
    return isinstance(value, type(default))
