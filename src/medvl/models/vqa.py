"""The VQA model: an image encoder's patch tokens, a question encoder, cross-attention fusion and an
answer classifier over the training answers (closed answers and the frequent open ones).

Shape of the network (one forward pass, ``N`` questions, up to ``K = max_images`` images each)::

    images (N, K, C, H, W) -> ImageEncoder.tokens -> (N, K*T, F) -> linear -> + grid cell + film number
      -> ``image_layers`` x self-attention over the K*T tokens of a question's films together
    question -> TextEncoder tokens (N, L, D) -> linear -> question tokens, pooled question (N, d)
    fusion: ``fusion_layers`` x [question tokens attend to the image tokens, feed-forward] -> pooled (N, d)
    film summaries: the pooled fused question attends to each film's tokens apart -> (N, K, d)
    pooled fused (N, d) ++ pooled question (N, d) ++ film summaries in film order (N, K*d) -> MLP -> (N, A)
    pooled question (N, d) -> answer-type head (CLOSED / OPEN)

Where a token is and which film it comes from: every image token gets a learned embedding of its
cell on the image encoder's token grid (the same for every film) and one of its film's number
(first, second). The self-attention layers over all of a question's tokens let a token compare
itself with the other film (a finding grown, resolved or unchanged) before the question reads
them. The answer head then reads each film's summary in its own slot: an answer pooled over both
films' tokens at once is blind to film order until the attention has learnt to single out the
finding *and* the film embedding has grown, and such a model stayed at chance on two-image
questions (docs/benchmarks.md, VQA; tests/test_vqa_films.py). Single-image questions pad the second
film out of every attention and get a learned "no film" summary in its slot.

Question-type routing (HiCA-VQA style, ``route_by_type``): the answer-type head reads only the
question; at inference the answer is chosen among the answers seen with the predicted type in
training (yes/no questions get yes/no answers). The attention of the last fusion layer over the
image tokens (averaged over heads and question tokens) is the answer's heatmap, laid out on the
image encoder's ``token_grid``.

Persistence as ``DualEncoder``: ``config.json`` (``VQAConfig``), ``model.safetensors``, ``meta.json``
(answer vocabulary, answer types, the training answer prior keyed by a hash of the question, the
training summary) and ``text/`` (the question tokenizer), written atomically.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import random
from collections import Counter, OrderedDict, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import check_number
from ..data.loaders.vqa import ANSWER_TYPES, VQAItem
from ..errors import DataError, InputError, MedvlError, ModelError
from ..io import give_output_mode, read_json
from .config import MAX_HEADS, MAX_LAYERS, MAX_WIDTH, ImageConfig, TextConfig, build_dataclass
from .dual import (
    CONFIG_FILE,
    META_FILE,
    OTHER_KIND_COMMANDS,
    OTHER_KINDS,
    TEXT_DIR,
    WEIGHTS_FILE,
    DualEncoder,
    check_tokenizer_fits,
    load_weights,
    non_finite_tensors,
    read_meta,
    save_model_dir,
)
from .image import ImageEncoder
from .preprocess import ImagePreprocessor
from .text import TextEncoder, count_read_cut
from .vlm import VisionLanguageModel, is_transformers_folder

log = logging.getLogger(__name__)

MODEL_KIND = "vqa"
# the training questions' words, by key (``training_words``): what ``VQAModel.unknown_words`` counts a question's by
QUESTION_WORDS_FILE = "question_words.json"
_warned_without_words: set[str] = set()  # model folders without QUESTION_WORDS_FILE already said so of
FROZEN_QUESTION_CACHE = 1024  # question encodings a frozen question tower keeps (least recently used dropped)


@dataclass
class VQAConfig:
    kind: str = MODEL_KIND  # marks a VQA model folder (a dual encoder's config has no "kind")
    image: ImageConfig = field(default_factory=ImageConfig)  # the image tower (and its preprocessing)
    text: TextConfig = field(default_factory=lambda: TextConfig(kind="pretrained", path="all-minilm-l6-v2",
                                                                max_length=48, freeze=True))  # question tower
    hidden_size: int = 256  # width of the fusion layers
    fusion_layers: int = 2  # cross-attention blocks (question tokens attend to image tokens)
    fusion_heads: int = 4  # attention heads per block
    dropout: float = 0.1  # in the fusion blocks and the answer head
    max_images: int = 2  # images per question (two-image questions: earlier film first)
    image_layers: int = 1  # self-attention layers over a question's image tokens (all its films together)
    route_by_type: bool = True  # choose answers among those seen with the predicted answer type
    image_tokens: int = 0  # tokens per image: set from the image tower when the model is built (not an option)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VQAConfig:
        data = dict(data)
        image = build_dataclass(ImageConfig, data.pop("image", {}), "image")
        text = build_dataclass(TextConfig, data.pop("text", {}), "text")
        config = build_dataclass(cls, data, "vqa")
        config.image, config.text = image, text
        config.validate()
        return config

    def validate(self) -> None:
        if self.kind != MODEL_KIND:
            raise InputError(f"a VQA config has kind {MODEL_KIND!r}, got {self.kind!r}")
        self.image.validate()
        if self.image.spatial_dims != 2:
            raise InputError("the VQA model takes 2D images (image.spatial_dims 2)")
        maxima = {"hidden_size": MAX_WIDTH, "fusion_layers": MAX_LAYERS, "fusion_heads": MAX_HEADS, "max_images": None}
        for name, maximum in maxima.items():
            check_number(name, getattr(self, name), minimum=1, maximum=maximum, integer=True)
        check_number("image_layers", self.image_layers, minimum=0, maximum=12, integer=True)
        check_number("dropout", self.dropout, minimum=0, maximum=0.9)
        if self.hidden_size % self.fusion_heads:
            raise InputError(f"hidden_size {self.hidden_size} must be a multiple of fusion_heads {self.fusion_heads}")
        if self.text.kind not in ("bert", "pretrained"):
            raise InputError(f"text.kind must be bert or pretrained, got {self.text.kind!r}")
        self.text.validate_sizes()
        self.text.validate_heads()


def question_key(question: str) -> str:
    """The key of a question in the saved answer prior: a hash of its normalised text (no text is stored)."""
    normalized = " ".join(question.lower().split()).rstrip("?. ")
    return hashlib.sha256(normalized.encode("utf-8")).hexdigest()[:16]


def _text_hash(text: str) -> str:
    """The key of a question's encoding in a frozen tower's cache: a hash of its exact text."""
    return hashlib.sha256(text.encode("utf-8", errors="surrogatepass")).hexdigest()


class FusionBlock(nn.Module):
    """Pre-norm cross-attention (queries: question tokens; keys/values: image tokens) then feed-forward."""

    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.norm_query, self.norm_image, self.norm_ff = nn.LayerNorm(width), nn.LayerNorm(width), nn.LayerNorm(width)
        self.attention = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.feed_forward = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Dropout(dropout),
                                          nn.Linear(2 * width, width))
        self.dropout = nn.Dropout(dropout)

    def forward(self, queries: torch.Tensor, image: torch.Tensor,
                image_padding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keys = self.norm_image(image)
        attended, weights = self.attention(self.norm_query(queries), keys, keys, key_padding_mask=image_padding,
                                           need_weights=True, average_attn_weights=True)
        queries = queries + self.dropout(attended)
        return queries + self.dropout(self.feed_forward(self.norm_ff(queries))), weights


class VQAModel(nn.Module):
    """Image tokens + question tokens -> cross-attention fusion -> answer logits (see the module docstring).

    ``meta["answers"]`` is the answer vocabulary (normalised answers, the classifier's rows);
    ``meta["answer_types"]`` maps each answer to the answer types it was seen with.
    """

    def __init__(self, config: VQAConfig, answers: Sequence[str], text_source_dir: Path | None = None):
        super().__init__()
        if not answers:
            raise InputError("a VQA model needs at least one answer")
        self.config = config
        self.image_encoder = ImageEncoder(config.image)
        self.text_encoder = TextEncoder(config.text, source_dir=text_source_dir)
        self.preprocessor = ImagePreprocessor(config.image)
        tokens = self._count_image_tokens()  # the image tower's, whatever a config says
        if config.image_tokens and config.image_tokens != tokens:
            raise InputError(f"image_tokens {config.image_tokens} differs from the {tokens} token(s) per image the "
                             "image tower gives (it is set from the image tower, not an option)")
        config.image_tokens = tokens
        width = config.hidden_size
        self.image_projection = nn.Sequential(nn.Linear(self.image_encoder.num_features, width), nn.LayerNorm(width))
        self.question_projection = nn.Sequential(nn.Linear(self.text_encoder.num_features, width), nn.LayerNorm(width))
        self.image_position = nn.Parameter(torch.randn(config.image_tokens, width) * 0.02)
        self.image_number = nn.Parameter(torch.randn(config.max_images, width) * 0.02)
        self.image_layers = nn.ModuleList([
            nn.TransformerEncoderLayer(width, config.fusion_heads, 2 * width, config.dropout, activation="gelu",
                                       batch_first=True, norm_first=True)
            for _ in range(config.image_layers)])
        self.fusion = nn.ModuleList([FusionBlock(width, config.fusion_heads, config.dropout)
                                     for _ in range(config.fusion_layers)])
        self.film_norm = nn.LayerNorm(width)
        self.film_readout = nn.MultiheadAttention(width, config.fusion_heads, dropout=config.dropout, batch_first=True)
        self.no_film = nn.Parameter(torch.zeros(width))  # the summary of a film slot a question does not use
        head_in = (2 + config.max_images) * width
        self.answer_head = nn.Sequential(nn.LayerNorm(head_in), nn.Linear(head_in, 2 * width), nn.GELU(),
                                         nn.Dropout(config.dropout), nn.Linear(2 * width, len(answers)))
        self.type_head = nn.Linear(width, len(ANSWER_TYPES))
        self.meta: dict[str, Any] = {"kind": MODEL_KIND, "answers": list(answers), "answer_types": {}}
        # how answers name the model (their "model"): its folder's (``model_name``) once saved or loaded
        self.name = MODEL_KIND
        # a frozen question tower's output per question, keyed by a hash of the text (no question text is kept),
        # at most frozen_cache_size of them: a long-running service asked ever new questions must not grow
        self._frozen_questions: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.frozen_cache_size = FROZEN_QUESTION_CACHE
        # its training questions' words by key (``training_words``, saved as QUESTION_WORDS_FILE); None for a model
        # saved before medvl recorded them: ``unknown_words`` then counts the question encoder's unknown tokens only
        self.question_words: frozenset[str] | None = None

    @property
    def answers(self) -> list[str]:
        return self.meta["answers"]

    def unknown_words(self, question: str) -> int:
        """How many words of ``question`` (``TextEncoder.words``: normalised as the question encoder reads them) are
        not among its training questions' words (``question_words``): a word-piece tokenizer spells a term it never
        saw from known pieces, which the model was never trained to read as that term. A model without them counts
        the words (or pieces) its question encoder reads as its unknown token."""
        if self.question_words is None:
            return self.text_encoder.word_tokens(question)[1]
        return sum(word_key(word) not in self.question_words for word in self.text_encoder.words(question))

    def _count_image_tokens(self) -> int:
        was_training = self.image_encoder.training
        self.image_encoder.eval()  # no batch-norm statistics from the probe
        with torch.no_grad():
            probe = torch.zeros(1, self.config.image.in_channels, *self.config.image.volume_shape)
            count = self.image_encoder.tokens(probe).shape[1]
        self.image_encoder.train(was_training)
        return count

    # -- the forward pass ------------------------------------------------------------------------
    def question_states(self, questions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Question token states (N, L, D) and their mask (N, L); a frozen tower runs once per question while
        its encoding stays among the ``frozen_cache_size`` most recently used."""
        if not self.config.text.freeze:
            return self._encode_questions(questions)
        keys = [_text_hash(question) for question in questions]
        cache = self._frozen_questions
        rows = {key: cache[key] for key in dict.fromkeys(keys) if key in cache}
        missing = list(dict.fromkeys(q for q, key in zip(questions, keys, strict=True) if key not in rows))
        if missing:
            was_training = self.text_encoder.training
            self.text_encoder.eval()
            with torch.no_grad():
                states, mask = self._encode_questions(missing)
            self.text_encoder.train(was_training)
            for index, question in enumerate(missing):
                length = int(mask[index].sum())
                rows[_text_hash(question)] = (states[index, :length], mask[index, :length])
        for key, row in rows.items():
            cache[key] = row
            cache.move_to_end(key)
        while len(cache) > self.frozen_cache_size:
            cache.popitem(last=False)
        picked = [rows[key] for key in keys]
        length = max(len(m) for _, m in picked)
        states = torch.stack([F.pad(s, (0, 0, 0, length - len(s))) for s, _ in picked])
        return states, torch.stack([F.pad(m, (0, length - len(m))) for _, m in picked])

    def _encode_questions(self, questions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.text_encoder.tokenize(questions)
        hidden = self.text_encoder.model(input_ids=batch["input_ids"],
                                         attention_mask=batch["attention_mask"]).last_hidden_state
        return hidden, batch["attention_mask"]

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Unprojected image tokens (U, T, F) of normalised ``pixels`` (U, C, H, W)."""
        return self.image_encoder.tokens(pixels)

    def image_tokens(self, features: torch.Tensor, image_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens (N, K*T, d) and padding mask (N, K*T) of ``image_features`` (U, T, F); ``image_index``
        (N, K) picks each question's images from them (-1 = no image). Each token carries its grid cell
        and its film's number, then attends to every token of the question's films (``image_layers``)."""
        tokens = self.image_projection(features) + self.image_position  # (U, T, d)
        count, slots = image_index.shape
        picked = tokens[image_index.clamp(min=0)] + self.image_number[:slots, None, :]  # (N, K, T, d)
        padding = (image_index < 0)[:, :, None].expand(-1, -1, tokens.shape[1]).reshape(count, -1)
        joint = picked.reshape(count, -1, tokens.shape[-1])
        for layer in self.image_layers:
            joint = layer(joint, src_key_padding_mask=padding)
        return joint, padding

    def forward(self, pixels: torch.Tensor, image_index: torch.Tensor, questions: Sequence[str],
                features: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``answer_logits`` (N, A), ``type_logits`` (N, 2) and ``attention`` (N, K*T) of the last block;
        ``features``: the images' ``image_features`` when already computed (a frozen image tower)."""
        states, mask = self.question_states(questions)
        queries = self.question_projection(states)
        keep = mask.unsqueeze(-1).to(queries.dtype)
        question = (queries * keep).sum(1) / keep.sum(1).clamp(min=1.0)
        if features is None:
            features = self.image_features(pixels)
        image, padding = self.image_tokens(features, image_index)
        weights = torch.zeros(0)
        for block in self.fusion:
            queries, weights = block(queries, image, padding)
        fused = (queries * keep).sum(1) / keep.sum(1).clamp(min=1.0)
        attention = (weights * keep).sum(1) / keep.sum(1).clamp(min=1.0)  # (N, K*T), over question tokens
        films = self.film_summaries(fused, image, padding)
        return {"answer_logits": self.answer_head(torch.cat([fused, question, films], dim=-1)),
                "type_logits": self.type_head(question), "attention": attention}

    def film_summaries(self, fused: torch.Tensor, image: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        """One summary per film slot, in film order, concatenated (N, max_images * d): the fused question
        attends to each film's tokens apart (a softmax per film), so the answer head sees what the first
        film and what the second film show side by side instead of one average over both."""
        count, width, per_film = len(fused), fused.shape[-1], self.config.image_tokens
        slots = image.shape[1] // per_film
        tokens = self.film_norm(image).reshape(count * slots, per_film, width)
        missing = padding.reshape(count * slots, per_film)[:, 0]
        mask = padding.reshape(count * slots, per_film) & ~missing[:, None]  # an absent film: attend, then replace
        query = fused.repeat_interleave(slots, dim=0)[:, None, :]
        pooled, _ = self.film_readout(query, tokens, tokens, key_padding_mask=mask, need_weights=False)
        pooled = torch.where(missing[:, None], self.no_film, pooled[:, 0]).reshape(count, slots, width)
        unused = self.no_film.expand(count, self.config.max_images - slots, width)
        return torch.cat([pooled, unused], dim=1).reshape(count, -1)

    def route(self, answer_logits: torch.Tensor, type_logits: torch.Tensor) -> torch.Tensor:
        """Answer logits with answers never seen with the predicted answer type removed (-inf)."""
        if not self.config.route_by_type or not self.meta["answer_types"]:
            return answer_logits
        allowed = torch.tensor([[kind in self.meta["answer_types"].get(answer, ANSWER_TYPES) for answer in self.answers]
                                for kind in ANSWER_TYPES])  # (2, A)
        keep = allowed[type_logits.argmax(-1)]
        keep[~keep.any(-1)] = True
        return answer_logits.masked_fill(~keep, float("-inf"))

    # -- building from a dual encoder ------------------------------------------------------------
    @classmethod
    def from_dual_encoder(cls, dual: DualEncoder, config: VQAConfig, answers: Sequence[str],
                          question_tower: bool) -> VQAModel:
        """A VQA model whose image tower (and, with ``question_tower``, question tower) are ``dual``'s, config
        sections included (``VQAOptions.validate`` refuses overrides of them)."""
        image = dataclasses.replace(dual.config.image, augment=config.image.augment)
        text = dataclasses.replace(dual.config.text) if question_tower else config.text
        config = dataclasses.replace(config, image=image, text=text, image_tokens=0)
        model = cls(config, answers)
        model.image_encoder.load_state_dict(dual.image_encoder.state_dict())
        if question_tower:
            model.text_encoder = dual.text_encoder
        return model

    # -- persistence -----------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> Path:
        """config.json, model.safetensors, meta.json and text/ written atomically (non-finite weights refused)."""
        from safetensors.torch import save_file

        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}

        def write(staging: Path) -> None:
            save_file(state, str(staging / WEIGHTS_FILE))
            give_output_mode(staging / WEIGHTS_FILE)  # safetensors writes 0600
            self.text_encoder.save(staging / TEXT_DIR)
            if self.question_words is not None:  # in the staging folder: renamed into place with the rest
                (staging / QUESTION_WORDS_FILE).write_text(json.dumps(sorted(self.question_words)))

        return save_model_dir(directory, state, self.config.to_dict(), self.meta, write)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> VQAModel:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        directory = Path(directory)
        if not (directory / CONFIG_FILE).exists():
            raise ModelError(f"{directory}: not a medvl VQA model directory (missing {CONFIG_FILE})")
        reading = CONFIG_FILE  # the file the message names
        try:  # read first: another kind of model is named as such, not as a folder missing a VQA model's files
            raw = read_json(directory / CONFIG_FILE)
            _check_kind(directory, raw)
            for name in (WEIGHTS_FILE, META_FILE, TEXT_DIR):
                if not (directory / name).exists():
                    raise ModelError(f"{directory}: not a medvl VQA model directory (missing {name})")
            config = VQAConfig.from_dict(raw)
            reading = META_FILE
            meta = read_meta(directory, required=True)
            reading = WEIGHTS_FILE
            state = load_file(str(directory / WEIGHTS_FILE))
        except ModelError:
            raise
        except (ValueError, OSError, SafetensorError, MedvlError) as err:
            raise ModelError(f"{directory}: cannot read model files ({reading}: {err.__class__.__name__}: "
                             f"{err})") from None
        bad = non_finite_tensors(state)
        if bad:
            raise ModelError(f"{directory}: {len(bad)} weight tensor(s) hold NaN or infinity (first: {bad[0]})")
        if not isinstance(meta.get("answers"), list) or not meta["answers"]:
            raise ModelError(f"{directory}: meta.json has no answer vocabulary")
        _check_answer_types(directory, meta.get("answer_types"), meta["answers"])
        try:
            model = cls(config, meta["answers"], text_source_dir=directory / TEXT_DIR)
        except InputError as err:
            raise ModelError(f"{directory}: config.json: {err}") from None
        check_tokenizer_fits(model.text_encoder, directory)
        model.meta = meta
        model.question_words = _read_question_words(directory)
        model.name = model_name(directory)
        load_weights(model, state, directory)
        model.eval()
        return model


def training_words(encoder: TextEncoder, questions: Sequence[str]) -> frozenset[str]:
    """The words of ``questions`` (``TextEncoder.words``), each by its key (``word_key``): what a model records of its
    training questions (``QUESTION_WORDS_FILE``). Every word counts, however rare (a term the model was trained on in
    one templated question is no unknown word), so none is kept in clear: the folder lists no name or number of a
    question, as the answer prior keeps questions by a hash (``question_key``)."""
    return frozenset(word_key(word) for question in set(questions) for word in encoder.words(question))


def word_key(word: str) -> str:
    """How ``QUESTION_WORDS_FILE`` holds a word: the first 16 hex digits of its SHA-256."""
    return hashlib.sha256(word.encode("utf-8", errors="surrogatepass")).hexdigest()[:16]


def _read_question_words(directory: Path) -> frozenset[str] | None:
    """The training questions' words a model folder records (``QUESTION_WORDS_FILE``), or None (said once per
    folder) for one saved before medvl recorded them; ModelError for a file that is not a JSON list of strings."""
    path = directory / QUESTION_WORDS_FILE
    if not path.is_file():
        if str(directory.resolve()) not in _warned_without_words:
            _warned_without_words.add(str(directory.resolve()))
            log.warning("%s: no %s (trained by an earlier medvl): unknown_words counts only the words its question "
                        "encoder reads as unknown tokens, not the terms it spells from known pieces; retrain it "
                        "(medvl train vqa) to count every word its training questions lack", directory,
                        QUESTION_WORDS_FILE)
        return None
    try:
        words = read_json(path)
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ModelError(f"{path}: cannot read it ({err.__class__.__name__}: {err})") from None
    if not isinstance(words, list) or not all(isinstance(word, str) for word in words):
        raise ModelError(f"{path}: must be a JSON list of word keys (the training questions' words), got "
                         f"{type(words).__name__}")
    return frozenset(words)


def _check_answer_types(directory: Path, answer_types: Any, answers: list[Any]) -> None:
    """ModelError unless meta.json's ``answer_types`` maps answers of the vocabulary ``answers`` to non-empty lists
    of answer types as ``answer_types`` writes them (``CLOSED`` / ``OPEN``), which ``route`` reads on every question
    (missing, or another shape, it crashed the first question instead of the load; a misspelt ``open``, an empty
    list or an answer the model does not have silently changed which answers a question may get)."""
    def is_type_list(kinds: Any) -> bool:
        return isinstance(kinds, list) and bool(kinds) and all(kind in ANSWER_TYPES for kind in kinds)

    if not isinstance(answer_types, dict) or not all(map(is_type_list, answer_types.values())) \
            or not all(answer in answers for answer in answer_types):  # (a list: its items may be of any type)
        found = "none" if answer_types is None else "a mapping of other values" if isinstance(answer_types, dict) \
            else type(answer_types).__name__
        raise ModelError(f"{directory}: meta.json: answer_types must map each answer to its types "
                         f"({' / '.join(ANSWER_TYPES)}), got {found}")


def _check_kind(directory: Path, raw: Any) -> None:
    """ModelError naming the kind of model ``directory`` holds when its config.json is not a VQA model's."""
    kind = raw.get("kind") if isinstance(raw, dict) else None
    if kind == MODEL_KIND:
        return
    if isinstance(kind, str) and kind in OTHER_KINDS:
        raise ModelError(f"{directory}: is {OTHER_KINDS[kind]}, not a VQA model; {OTHER_KIND_COMMANDS[kind]}")
    if kind is None and isinstance(raw, dict) and "image" in raw and "text" in raw:
        raise ModelError(f"{directory}: is a dual encoder (medvl train), not a VQA model; train a VQA model from it "
                         f"with medvl train vqa --init {directory}")
    raise ModelError(f"{directory}: not a VQA model (config.json kind {kind!r}; train one with medvl train vqa)")


def load_vqa_model(directory: str | Path) -> VQAModel | VisionLanguageModel:
    """A saved VQA model: its folder, or a ``medvl train vqa`` output folder (its ``model/``); a local
    transformers vision-language model folder (``models.vlm``) loads as a ``VisionLanguageModel``."""
    directory = Path(directory)
    if is_transformers_folder(directory):
        return VisionLanguageModel.from_pretrained(directory)
    directory = _model_folder(directory)
    if not directory.is_dir():
        raise ModelError(f"{directory}: model folder not found")
    return VQAModel.from_pretrained(directory)


def saved_holdout(directory: str | Path) -> dict[str, Any] | None:
    """The held-out questions a saved VQA model keeps in its meta.json (``meta["holdout"]``), read without
    loading its weights; None for a model that holds none out (a transformers model holds none)."""
    directory = Path(directory)
    if is_transformers_folder(directory):
        return None
    directory = _model_folder(directory)
    try:
        holdout = read_meta(directory, required=True).get("holdout")
    except (ValueError, OSError, MedvlError) as err:
        raise ModelError(f"{directory}: cannot read model files ({META_FILE}: {err.__class__.__name__}: {err})") \
            from None
    return holdout if isinstance(holdout, dict) else None


def model_name(directory: str | Path) -> str:
    """How answers name the VQA model saved in ``directory`` (``model`` of ``medvl vqa --json`` and ``/v1/vqa``, as
    a dual encoder's answers give its config's name; a VQA config has none): the folder's own name, or for a ``medvl
    train vqa`` output folder's ``model/`` (a name that tells nothing) the output folder's; never a path, as the
    folders above may name a patient. A transformers VLM is named by its folder's name too (``VLMConfig.name``)."""
    resolved = Path(directory).resolve()
    return resolved.parent.name if resolved.name == "model" and resolved.parent.name else resolved.name


def _model_folder(directory: Path) -> Path:
    """A medvl VQA model's folder: ``directory``, or a ``medvl train vqa`` output folder's ``model/``."""
    if not (directory / CONFIG_FILE).is_file() and (directory / "model" / CONFIG_FILE).is_file():
        return directory / "model"
    return directory


# ---------------------------------------------------------------- training questions -> model metadata


def answer_vocabulary(items: Sequence[VQAItem], min_count: int = 1) -> list[str]:
    """Normalised training answers seen at least ``min_count`` times, most frequent first (ties by name)."""
    counts = Counter(item.answer_normalized for item in items)
    return [answer for answer, count in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if count >= min_count]


def answer_types(items: Sequence[VQAItem]) -> dict[str, list[str]]:
    """Each normalised answer -> the answer types it was seen with (for routing)."""
    seen: dict[str, set[str]] = defaultdict(set)
    for item in items:
        if item.answer_type in ANSWER_TYPES:
            seen[item.answer_normalized].add(item.answer_type)
    return {answer: sorted(kinds) for answer, kinds in sorted(seen.items())}


def answer_prior(items: Sequence[VQAItem]) -> dict[str, Any]:
    """The question-only baseline: the most frequent training answer per question (keyed by a hash of the
    normalised question), else per (question type, answer type), else overall; ties by name."""
    def majority(groups: dict[str, Counter[str]]) -> dict[str, str]:
        return {key: min(counter.items(), key=lambda kv: (-kv[1], kv[0]))[0] for key, counter in groups.items()}

    by_question: dict[str, Counter[str]] = defaultdict(Counter)
    by_type: dict[str, Counter[str]] = defaultdict(Counter)
    for item in items:
        by_question[question_key(item.question)][item.answer_normalized] += 1
        by_type[prior_type_key(item)][item.answer_normalized] += 1
    overall = Counter(item.answer_normalized for item in items)
    return {"by_question": majority(by_question), "by_type": majority(by_type),
            "overall": majority({"": overall})[""]}


def prior_type_key(item: VQAItem) -> str:
    return f"{item.question_type or ''}|{item.answer_type or ''}"


def prior_answer(prior: dict[str, Any], item: VQAItem) -> str:
    """The question-only answer to ``item`` from a saved ``answer_prior``."""
    return (prior["by_question"].get(question_key(item.question))
            or prior["by_type"].get(prior_type_key(item)) or prior["overall"])


def check_image_counts(items: Sequence[VQAItem], max_images: int, hint: str = "", model: str = "the model") -> None:
    """InputError naming the question file and the first question with more than ``max_images`` images
    (``hint``: what to do about it, e.g. the training option that sets the limit; ``model``: how to name it)."""
    for item in items:
        count = len(item.images or (item.image,))
        if count > max_images:
            where = f"{item.file}: " if item.file is not None else ""
            raise InputError(f"{where}question {item.qid} has {count} images; {model} takes at most {max_images}"
                             f"{hint}")


def questions_cut(model: VQAModel, questions: Sequence[str]) -> int:
    """How many of ``questions`` are longer than the model's question encoder reads (``text.max_length`` tokens,
    special ones included): the encoder reads them cut (``medvl vqa`` refuses such a question)."""
    return count_read_cut(model.text_encoder.read_length, questions)[0]  # the one rule


def questions_unread(model: VQAModel, questions: Sequence[str]) -> int:
    """How many of ``questions`` have no word the model's question encoder knows (only unknown tokens and
    punctuation, ``TextEncoder.known_word_tokens``; each distinct question read once): ``medvl vqa`` refuses such a
    question."""
    known = {question: model.text_encoder.known_word_tokens(question) for question in set(questions)}
    return sum(not known[question] for question in questions)


def image_table(items: Sequence[VQAItem], max_images: int) -> tuple[list[Path], torch.Tensor]:
    """Distinct image files and, per question, the indices of its images ((N, max_images), -1 = none)."""
    check_image_counts(items, max_images)
    index: dict[Path, int] = {}
    rows = []
    for item in items:
        images = item.images or (item.image,)
        row = [index.setdefault(image, len(index)) for image in images]
        rows.append(row + [-1] * (max_images - len(row)))
    return list(index), torch.tensor(rows, dtype=torch.long).view(len(items), max_images)


def holdout_split(items: Sequence[VQAItem], fraction: float, seed: int) -> tuple[list[VQAItem], list[VQAItem]]:
    """(kept, held out): a seeded ``fraction`` of the questions held out (questions, not images). The same
    question about the same image(s) asked more than once (VQA-RAD repeats many) is held out or kept as one, so no
    held-out question is a copy of a training one; the share held out is then ``fraction`` give or take one such
    group. InputError when two questions of one split share an id: the held-out ones could not be named."""
    check_number("holdout", fraction, minimum=0, maximum=0.9)
    ids = Counter((item.split, item.qid) for item in items)
    repeated = [key for key, count in ids.items() if count > 1]
    if fraction and repeated:
        raise InputError(f"question id {repeated[0][1]!r} of split {repeated[0][0]!r} is given to {ids[repeated[0]]} "
                         "questions: --holdout names the questions it holds out by split and id")
    count = round(fraction * len(items))
    groups: dict[tuple[tuple[str, ...], str], list[int]] = {}
    for i, item in enumerate(items):
        images = tuple(str(path) for path in (item.images or (item.image,)))
        groups.setdefault((images, question_key(item.question)), []).append(i)
    order = list(groups.values())
    random.Random(seed).shuffle(order)
    held: set[int] = set()
    for members in order:
        if len(held) >= count:
            break
        held.update(members)
    return ([item for i, item in enumerate(items) if i not in held],
            [item for i, item in enumerate(items) if i in held])


def holdout_meta(held: Sequence[VQAItem], fraction: float, seed: int) -> dict[str, Any] | None:
    """What a model records of the questions it held out (``meta["holdout"]``): each by split, id and
    ``held_question_digest``, so that scoring can tell the same questions from others given the same ids."""
    if not held:
        return None
    return {"fraction": fraction, "seed": seed,
            "questions": [[item.split, item.qid, held_question_digest(item)] for item in held]}


def held_question_digest(item: VQAItem) -> str:
    """A hash of what a question is: its text, answer and answer type as written and its images' names as the
    question file writes them (no text is stored; a copy of the data in another folder gives the same hash)."""
    names = item.names or tuple(image.name for image in item.images or (item.image,))
    content = json.dumps([item.question, item.answer, item.answer_type, list(names)], ensure_ascii=False)
    return hashlib.sha256(content.encode("utf-8")).hexdigest()[:16]


def held_out_ids(holdout: dict[str, Any]) -> set[tuple[str, str]]:
    """The (split, id) of each question a model held out; a model saved before ids were kept by split records
    one ``split`` and its ``qids``."""
    if "questions" in holdout:
        return {(str(entry[0]), str(entry[1])) for entry in holdout["questions"]}
    return {(str(holdout.get("split")), str(qid)) for qid in holdout.get("qids") or ()}


def held_out_digests(holdout: dict[str, Any]) -> dict[tuple[str, str], str]:
    """(split, id) -> ``held_question_digest`` of each held-out question; empty for a model saved before the
    digests were kept."""
    return {(str(entry[0]), str(entry[1])): str(entry[2]) for entry in holdout.get("questions") or ()
            if len(entry) > 2}


def batch_pixels(pixels: torch.Tensor, image_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct images (or image features) of a batch, as float32, and the batch's image indices into them."""
    used = image_index[image_index >= 0].unique()
    remap = torch.full((len(pixels),), -1, dtype=torch.long)
    remap[used] = torch.arange(len(used))
    local = torch.where(image_index >= 0, remap[image_index.clamp(min=0)], image_index)
    return pixels[used].float(), local


HELDOUT = "heldout"  # the split name of the questions a model held out from its training (meta["holdout"])


def scored_split(items: Sequence[VQAItem], split: str | None, default: str | None) -> str:
    """The split ``select_questions`` takes: ``split``, else ``default`` when the data has it, else ``all``."""
    if split is not None:
        return split
    return default if default is not None and any(item.split == default for item in items) else "all"


def select_questions(items: Sequence[VQAItem], split: str | None, source: str, default: str | None,
                     holdout: dict[str, Any] | None = None) -> list[VQAItem]:
    """The questions of ``split``: ``None`` takes ``default`` when the data has that split, else every
    question (a single file is one split); ``all`` every question; ``heldout`` the questions a model
    held out from its training (``holdout``: its meta, ``held_questions``), or the data's own split
    ``heldout`` when the model holds none out (both at once is refused: the name would mean either)."""
    splits = sorted({item.split for item in items})
    split = scored_split(items, split, default)
    if split == HELDOUT and HELDOUT in splits and holdout:
        file = next(item.file for item in items if item.split == HELDOUT)
        raise DataError(file or source, f"holds a split {HELDOUT!r} and the model holds questions out of its "
                                        f"training: --split {HELDOUT} would name either; rename the file")
    if split == HELDOUT and HELDOUT not in splits:
        return held_questions(items, holdout, source)
    if split == "all":
        return list(items)
    if split not in splits:
        raise DataError(source, f"no split {split!r}; splits: {', '.join(splits)} (or all)")
    return [item for item in items if item.split == split]


def training_questions(items: Sequence[VQAItem], split: str | None, source: str) -> list[VQAItem]:
    """The questions of ``split`` to train on (``select_questions``, default ``train``); ``heldout`` names the
    questions a trained model held out, not a split to train on, unless the data has a split of that name."""
    if split == HELDOUT and not any(item.split == HELDOUT for item in items):
        raise InputError(f"--split {HELDOUT} names the questions a trained model held out; it is for medvl eval vqa "
                         "(hold questions out of training with --holdout)")
    return select_questions(items, split, source, "train")


def held_questions(items: Sequence[VQAItem], holdout: dict[str, Any] | None, source: str) -> list[VQAItem]:
    """The questions a model held out (``holdout``: its meta), found by split and id and checked against the
    digest the model keeps of each: a DataError when any differs (the file was edited or regenerated since
    training, and the ids now name other questions). A model saved without digests is scored with a warning."""
    if not holdout:
        raise InputError(f"--split {HELDOUT}: the model holds out no questions (train it with --holdout)")
    held = held_out_ids(holdout)
    chosen = [item for item in items if (item.split, item.qid) in held]
    if len(chosen) != len(held) or len({(item.split, item.qid) for item in chosen}) != len(chosen):
        raise DataError(source, f"holds {len(chosen)} questions matching the {len(held)} the model held out "
                                "(by split and id); score it on the file it was trained on")
    digests = held_out_digests(holdout)
    if len(digests) < len(held):
        log.warning("%s: the model keeps no digest of its held-out questions (saved by an older medvl): cannot "
                    "check that the %d questions under its held-out ids are the ones it held out", source, len(held))
        return chosen
    changed = [item for item in chosen if digests.get((item.split, item.qid)) != held_question_digest(item)]
    if changed:
        raise DataError(changed[0].file or source,
                        f"{len(changed)} of the {len(chosen)} questions under the ids the model held out are not the "
                        f"questions it held out (question, answer, answer type or images changed since training; "
                        f"first: question {changed[0].qid} of split {changed[0].split!r}); score the questions it "
                        "was trained on")
    return chosen
