"""The report generator: an image encoder and a small transformer decoder that writes the report.

The image encoder's unpooled tokens (``ImageEncoder.tokens``, (N, T, F)) are projected to the
decoder's width, given a learned position per token, and form the memory the decoder attends to by
cross-attention (a transformers ``BertLMHeadModel`` with ``is_decoder`` and ``add_cross_attention``,
random init, with a WordPiece vocabulary learnt from the training reports: ``train_wordpiece``).

Retrieval augmentation (MMed-RAG style): with ``decoder.context_k`` > 0 the reports of the k
nearest indexed cases are tokenised (``context_length`` tokens each), embedded with the decoder's
own word embeddings plus a position and a per-report embedding, and appended to the memory, so the
decoder can attend to (and copy from) them. Which cases were given is the caller's record to keep
(``medvl.rag.context``).

Reports are written lower case (the tokenizer lower-cases), between ``[CLS]`` (start) and ``[SEP]``
(end). Decoding is greedy (``beam_size=1``) or beam search with length-normalised scores.

Folder layout (``save_pretrained``): ``config.json`` (``ReportGeneratorConfig``, with
``"kind": "report-generator"``), ``model.safetensors``, ``meta.json`` (training summary, the dual
encoder the image tower was initialised from) and ``tokenizer/``. Report text is patient data:
nothing here logs it.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import check_number
from ..errors import InputError, MedvlError, ModelError, one_line
from ..io import give_output_mode, read_json
from .config import (
    MAX_HEADS,
    MAX_LAYERS,
    MAX_VOCAB_SIZE,
    MAX_WIDTH,
    MIN_WORD_TEXTS,
    ImageConfig,
    build_dataclass,
    merge_overrides,
)
from .dual import non_finite_tensors, read_meta, save_model_dir
from .image import ImageEncoder
from .preprocess import ImagePreprocessor
from .vlm import VisionLanguageModel, is_transformers_folder

KIND = "report-generator"
CONFIG_FILE, WEIGHTS_FILE, META_FILE, TOKENIZER_DIR = "config.json", "model.safetensors", "meta.json", "tokenizer"
BOS, EOS, PAD = "[CLS]", "[SEP]", "[PAD]"
_SPACE_BEFORE, _SPACE_AFTER = re.compile(r"\s+([.,:;?!%)])"), re.compile(r"([(])\s+")
_DECIMAL = re.compile(r"(\d)\.\s(\d)")  # "0. 61" -> "0.61" (the pre-tokenizer splits numbers at the point)


@dataclass
class DecoderConfig:
    vocab_size: int = 2000  # WordPiece vocabulary learnt from the training reports (special tokens, characters, words)
    vocab_min_texts: int = MIN_WORD_TEXTS  # distinct training reports a word must occur in to enter the vocabulary;
    # rarer words (names, record numbers, dates among them) are read and written a character at a time
    hidden_size: int = 128  # decoder width (also the width image tokens are projected to)
    num_layers: int = 2  # decoder blocks (self-attention, cross-attention, feed-forward)
    num_heads: int = 4  # attention heads
    intermediate_size: int = 256  # feed-forward width
    max_length: int = 128  # report tokens including start and end; longer reports are truncated in training;
    # decoding writes at most max_length - 1 tokens after the start token
    dropout: float = 0.1  # dropout in the decoder (attention and hidden states)
    context_k: int = 0  # retrieved reports given as extra context (0 = the image alone)
    context_length: int = 64  # tokens kept of each retrieved report

    def validate(self) -> None:
        maxima = {"vocab_size": MAX_VOCAB_SIZE, "vocab_min_texts": None, "hidden_size": MAX_WIDTH,
                  "num_layers": MAX_LAYERS, "num_heads": MAX_HEADS, "intermediate_size": MAX_WIDTH}
        for name, maximum in maxima.items():
            check_number(f"decoder.{name}", getattr(self, name), minimum=1, maximum=maximum, integer=True)
        check_number("decoder.max_length", self.max_length, minimum=4, maximum=1024, integer=True)
        check_number("decoder.context_k", self.context_k, minimum=0, maximum=20, integer=True)
        check_number("decoder.context_length", self.context_length, minimum=4, maximum=512, integer=True)
        check_number("decoder.dropout", self.dropout, minimum=0, maximum=0.9)
        if self.hidden_size % self.num_heads:
            raise InputError(f"decoder.hidden_size {self.hidden_size} must be a multiple of decoder.num_heads "
                             f"{self.num_heads}")


@dataclass
class ReportGeneratorConfig:
    name: str = "report-generator"
    kind: str = KIND  # marks a report generator folder (a dual encoder's config has no kind)
    image: ImageConfig = field(default_factory=ImageConfig)  # the image tower (as a dual encoder's)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ReportGeneratorConfig:
        data = dict(data)
        image = build_dataclass(ImageConfig, data.pop("image", {}), "image")
        decoder = build_dataclass(DecoderConfig, data.pop("decoder", {}), "decoder")
        config = build_dataclass(cls, data, "report generator")
        config.image, config.decoder = image, decoder
        config.validate()
        return config

    def merged(self, overrides: dict[str, Any]) -> ReportGeneratorConfig:
        """A copy with ``section.field`` overrides (``decoder.hidden_size``, ``image.image_size``)."""
        return ReportGeneratorConfig.from_dict(merge_overrides(self.to_dict(), overrides, ("image", "decoder")))

    def validate(self) -> None:
        if self.kind != KIND:
            raise InputError(f"report generator config kind must be {KIND!r}, got {self.kind!r}")
        self.image.validate()
        self.decoder.validate()


class ReportGenerator(nn.Module):
    """Image encoder -> projected image tokens (+ retrieved report tokens) -> cross-attending decoder."""

    def __init__(self, config: ReportGeneratorConfig, tokenizer=None):
        super().__init__()
        from transformers import BertConfig, BertLMHeadModel
        from transformers.utils import logging as hf_logging

        from .text import train_wordpiece

        hf_logging.disable_progress_bar()
        self.config = config
        dec = config.decoder
        if tokenizer is None:  # a fresh vocabulary (from_pretrained and training hand theirs over)
            tokenizer = train_wordpiece([], dec.vocab_size, dec.vocab_min_texts)
        self.tokenizer = tokenizer
        self.image_encoder = ImageEncoder(config.image)
        self.preprocessor = ImagePreprocessor(config.image)
        self.image_projection = nn.Linear(self.image_encoder.num_features, dec.hidden_size)
        self.image_position = nn.Parameter(torch.zeros(self._image_token_count(), dec.hidden_size))
        self.context_position = nn.Parameter(torch.zeros(dec.context_length, dec.hidden_size))
        self.context_slot = nn.Parameter(torch.zeros(max(dec.context_k, 1), dec.hidden_size))
        self.memory_norm = nn.LayerNorm(dec.hidden_size)
        self.decoder = BertLMHeadModel(BertConfig(
            vocab_size=len(self.tokenizer), hidden_size=dec.hidden_size, num_hidden_layers=dec.num_layers,
            num_attention_heads=dec.num_heads, intermediate_size=dec.intermediate_size,
            max_position_embeddings=dec.max_length, hidden_dropout_prob=dec.dropout,
            attention_probs_dropout_prob=dec.dropout, is_decoder=True, add_cross_attention=True,
            pad_token_id=self.token_id(PAD)))
        nn.init.normal_(self.image_position, std=0.02)
        nn.init.normal_(self.context_position, std=0.02)
        nn.init.normal_(self.context_slot, std=0.02)
        self.meta: dict[str, Any] = {}  # training summary, the dual encoder the image tower came from

    def _image_token_count(self) -> int:
        """Image tokens per image: one blank image through the encoder in eval mode. In training mode
        batch norm refuses a batch of one whose last feature map is 1 pixel / voxel (``ct3d-tiny``, a 2D
        ResNet at 32 px) and would fold the blank image into its running statistics."""
        shape = (1, self.config.image.in_channels, *self.config.image.volume_shape)
        training = self.image_encoder.training
        self.image_encoder.eval()
        try:
            with torch.no_grad():
                return int(self.image_encoder.tokens(torch.zeros(shape)).shape[1])
        finally:
            self.image_encoder.train(training)

    def token_id(self, token: str) -> int:
        return int(self.tokenizer.convert_tokens_to_ids(token))

    # -- inputs ----------------------------------------------------------------------------------
    def tokenize_reports(self, reports: Sequence[str]) -> dict[str, torch.Tensor]:
        """``[CLS] report [SEP]`` token ids and mask, truncated to ``max_length``."""
        return self.tokenizer(list(reports), padding=True, truncation=True, max_length=self.config.decoder.max_length,
                              return_tensors="pt", return_token_type_ids=False)

    def tokenize_contexts(self, contexts: Sequence[Sequence[str]]) -> dict[str, torch.Tensor] | None:
        """(N, k, context_length) ids and mask of each image's retrieved reports (missing ones masked out)."""
        k, length = self.config.decoder.context_k, self.config.decoder.context_length
        if k == 0:
            return None
        flat = [(list(texts) + [""] * k)[:k] for texts in contexts]
        batch = self.tokenizer([t for texts in flat for t in texts], padding="max_length", truncation=True,
                               max_length=length, return_tensors="pt", return_token_type_ids=False)
        empty = torch.tensor([not t for texts in flat for t in texts])
        batch["attention_mask"][empty] = 0
        return {key: value.view(len(flat), k, length) for key, value in batch.items()}

    # -- forward passes --------------------------------------------------------------------------
    def memory(self, pixels: torch.Tensor, context: dict[str, torch.Tensor] | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """What the decoder cross-attends to: (N, M, hidden) states and their (N, M) mask."""
        tokens = self.image_projection(self.image_encoder.tokens(pixels)) + self.image_position
        mask = torch.ones(tokens.shape[:2], dtype=torch.long)
        if self.config.decoder.context_k > 0:
            if context is None:
                raise InputError(f"this report generator was trained with the reports of "
                                 f"{self.config.decoder.context_k} retrieved cases as context: pass an index")
            ids, context_mask = context["input_ids"], context["attention_mask"]
            words = self.decoder.get_input_embeddings()(ids)  # (N, k, L, hidden)
            words = words + self.context_position[None, None] + self.context_slot[None, :, None]
            tokens = torch.cat([tokens, words.flatten(1, 2)], dim=1)
            mask = torch.cat([mask, context_mask.flatten(1).long()], dim=1)
        return self.memory_norm(tokens), mask

    def loss(self, pixels: torch.Tensor, reports: dict[str, torch.Tensor],
             context: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Mean next-token cross-entropy of the reports (padding left out), teacher forced."""
        memory, memory_mask = self.memory(pixels, context)
        ids, mask = reports["input_ids"], reports["attention_mask"]
        logits = self.decoder(input_ids=ids, attention_mask=mask, encoder_hidden_states=memory,
                              encoder_attention_mask=memory_mask).logits
        targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=-100)

    # -- decoding --------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, pixels: torch.Tensor, context: dict[str, torch.Tensor] | None = None, beam_size: int = 1,
                 max_length: int | None = None, length_penalty: float = 1.0) -> list[str]:
        """Reports for a normalised pixel batch: greedy (``beam_size=1``) or beam search, each at most
        ``max_length`` tokens of report text (default and largest: ``max_report_tokens``), as a transformers
        VLM's ``max_new_tokens``: the start token is not counted, a report that ends earlier is shorter."""
        check_number("beam_size", beam_size, minimum=1, maximum=32, integer=True)
        limit = 1 + self.check_max_length(max_length)  # the sequence decoded: the start token, then the report
        self.eval()
        memory, memory_mask = self.memory(pixels, context)
        if beam_size == 1:
            sequences = self._greedy(memory, memory_mask, limit)
        else:
            sequences = self._beam(memory, memory_mask, limit, beam_size, length_penalty)
        return [self.decode(ids) for ids in sequences]

    @property
    def max_report_tokens(self) -> int:
        """The most tokens of report text one decoding writes: ``decoder.max_length`` less the start token
        (the decoder has ``decoder.max_length`` positions)."""
        return self.config.decoder.max_length - 1

    def check_max_length(self, max_length: int | None) -> int:
        """Tokens of report text to write at most: ``max_length`` checked (1 to ``max_report_tokens``; 0 is
        refused, not read as "not given"), or ``max_report_tokens`` when None."""
        if max_length is None:
            return self.max_report_tokens
        check_number("max_length", max_length, minimum=1, integer=True)
        if max_length > self.max_report_tokens:
            raise InputError(f"max_length {max_length} is more than this report generator writes: at most "
                             f"{self.max_report_tokens} tokens of report text (its decoder.max_length "
                             f"{self.config.decoder.max_length}, less the start token)")
        return max_length

    def decode(self, ids: Sequence[int]) -> str:
        """Token ids as text, with WordPiece's spaces around punctuation removed ("ratio 0.61.", "findings:")."""
        text = str(self.tokenizer.decode(list(ids), skip_special_tokens=True)).strip()
        text = _SPACE_BEFORE.sub(r"\1", _SPACE_AFTER.sub(r"\1", text))
        return _DECIMAL.sub(r"\1.\2", text)

    def _step(self, last: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor, cache: Any
              ) -> tuple[torch.Tensor, Any]:
        """Log-probabilities of the next token given the cached past and the last tokens (N, 1)."""
        out = self.decoder(input_ids=last, encoder_hidden_states=memory, encoder_attention_mask=memory_mask,
                           use_cache=True, **{_CACHE_ARGUMENT: cache})
        log_probs = out.logits[:, -1].float().log_softmax(-1)
        log_probs[:, self.token_id(PAD)] = float("-inf")
        if cache is None:  # the first token of a report: a "##" piece would continue no word ("##) nodule ...")
            log_probs[:, self._continuation_ids] = float("-inf")
        return log_probs, getattr(out, "cache", None) or getattr(out, "past_key_values", None)

    @functools.cached_property
    def _continuation_ids(self) -> torch.Tensor:
        """The ids of the vocabulary's WordPiece continuation pieces ("##s"): never a report's first token, as
        the tokenizer writes one only after a piece of the same word."""
        return torch.tensor(sorted(i for token, i in self.tokenizer.get_vocab().items() if token.startswith("##")),
                            dtype=torch.long)

    def _greedy(self, memory: torch.Tensor, memory_mask: torch.Tensor, limit: int) -> list[list[int]]:
        bos, eos = self.token_id(BOS), self.token_id(EOS)
        ids = torch.full((len(memory), 1), bos)
        done = torch.zeros(len(memory), dtype=torch.bool)
        cache = None
        while ids.shape[1] < limit and not bool(done.all()):
            log_probs, cache = self._step(ids[:, -1:], memory, memory_mask, cache)
            chosen = log_probs.argmax(-1).masked_fill(done, eos)
            ids = torch.cat([ids, chosen[:, None]], dim=1)
            done |= chosen == eos
        return [_until(row.tolist()[1:], eos) for row in ids]

    def _beam(self, memory: torch.Tensor, memory_mask: torch.Tensor, limit: int, beams: int,
              length_penalty: float) -> list[list[int]]:
        """Beam search, all images at once: each keeps ``beams`` open hypotheses; finished ones are
        ranked by log-probability / length ** length_penalty; an image stops when it has ``beams``
        finished hypotheses and none open scores better, or at the length limit."""
        bos, eos = self.token_id(BOS), self.token_id(EOS)
        count = len(memory)
        memory, memory_mask = memory.repeat_interleave(beams, 0), memory_mask.repeat_interleave(beams, 0)
        scores = torch.full((count, beams), float("-inf"))
        scores[:, 0] = 0.0  # the first step expands one hypothesis per image
        ids = torch.full((count * beams, 1), bos)
        finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(count)]
        done = [False] * count
        cache = None
        while ids.shape[1] < limit and not all(done):
            log_probs, cache = self._step(ids[:, -1:], memory, memory_mask, cache)
            vocab = log_probs.shape[1]
            total = (scores.view(-1, 1) + log_probs).view(count, beams * vocab)
            top = total.topk(2 * beams, dim=1)
            rows, tokens, new_scores = [], [], torch.empty(count, beams)
            for image in range(count):
                kept = self._beam_candidates(image, top, vocab, beams, ids, eos, finished[image], done[image],
                                             length_penalty)
                new_scores[image] = torch.tensor([score for score, _, _ in kept])
                rows += [image * beams + beam for _, beam, _ in kept]
                tokens += [token for _, _, token in kept]
                done[image] = done[image] or _beam_done(finished[image], kept, beams, ids.shape[1], length_penalty)
            index = torch.tensor(rows)
            cache.reorder_cache(index)
            ids = torch.cat([ids[index], torch.tensor(tokens)[:, None]], dim=1)
            scores = new_scores
        for image in range(count):
            if not done[image]:  # stopped by the length limit: the open hypotheses compete too
                for beam in range(beams):
                    score = float(scores[image, beam])
                    if score > float("-inf"):
                        tokens_ = ids[image * beams + beam].tolist()[1:]
                        finished[image].append((score / max(1, len(tokens_)) ** length_penalty, tokens_))
        return [max(f, key=lambda item: item[0])[1] if f else [] for f in finished]

    @staticmethod
    def _beam_candidates(image: int, top, vocab: int, beams: int, ids: torch.Tensor, eos: int,
                         finished: list[tuple[float, list[int]]], done: bool,
                         length_penalty: float) -> list[tuple[float, int, int]]:
        """The next open hypotheses of one image as (score, beam, token), ``beams`` of them; hypotheses
        ending in EOS go to ``finished``. A finished image keeps placeholder beams scored -inf."""
        if done:
            return [(float("-inf"), 0, eos)] * beams
        kept: list[tuple[float, int, int]] = []
        for score, flat in zip(top.values[image].tolist(), top.indices[image].tolist(), strict=True):
            beam, token = divmod(flat, vocab)
            if score == float("-inf"):
                continue
            if token == eos:
                tokens = ids[image * beams + beam].tolist()[1:]
                finished.append((score / max(1, len(tokens) + 1) ** length_penalty, tokens))
            elif len(kept) < beams:
                kept.append((score, beam, token))
        return kept + [(float("-inf"), 0, eos)] * (beams - len(kept))

    # -- persistence -----------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> Path:
        """Write config.json, model.safetensors, meta.json and tokenizer/ atomically; refuses NaN weights."""
        from safetensors.torch import save_model

        def write(staging: Path) -> None:
            save_model(self, str(staging / WEIGHTS_FILE))  # handles the tied output / input embeddings
            give_output_mode(staging / WEIGHTS_FILE)  # safetensors writes 0600: another account could not load it
            self.tokenizer.save_pretrained(staging / TOKENIZER_DIR)

        return save_model_dir(directory, dict(self.state_dict()), self.config.to_dict(), self.meta, write)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> ReportGenerator:
        """Load a saved generator (or the final model of a training folder: ``DIR/model``)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file, load_model

        directory = _model_folder(Path(directory))
        try:
            config = ReportGeneratorConfig.from_dict(read_json(directory / CONFIG_FILE))
            meta = read_meta(directory)
            tokenizer = _read_tokenizer(directory)
            bad = non_finite_tensors(load_file(str(directory / WEIGHTS_FILE)))
            if bad:
                raise ModelError(f"{directory}: {len(bad)} weight tensor(s) hold NaN or infinity (first: {bad[0]}); "
                                 "the model is unusable: retrain it")
            model = cls(config, tokenizer=tokenizer)
            load_model(model, str(directory / WEIGHTS_FILE))
        except ModelError:
            raise
        except (ValueError, OSError, SafetensorError, MedvlError, RuntimeError) as err:
            raise ModelError(f"{directory}: cannot read the report generator ({err.__class__.__name__}: "
                             f"{str(err)[:200]})") from None
        model.meta = meta
        model.eval()
        return model


def _read_tokenizer(directory: Path) -> Any:
    """The tokenizer saved in ``directory/tokenizer/``; ModelError naming it when its files cannot be read."""
    from transformers import PreTrainedTokenizerFast

    try:
        return PreTrainedTokenizerFast.from_pretrained(str(directory / TOKENIZER_DIR))
    except Exception as err:  # tokenizers raises a bare Exception for a mistyped tokenizer.json, transformers a
        # TypeError or KeyError for a mistyped tokenizer_config.json or added token, as for the dual encoder's text/
        raise ModelError(f"{directory}: cannot read the report generator's tokenizer in {TOKENIZER_DIR}/ "
                         f"({one_line(err)})") from None


def load_report_generator(directory: str | Path) -> ReportGenerator | VisionLanguageModel:
    """A saved report generator (or a training folder's ``model/``); a local transformers
    vision-language model folder (``models.vlm``) loads as a ``VisionLanguageModel``."""
    if is_transformers_folder(directory):
        return VisionLanguageModel.from_pretrained(directory)
    return ReportGenerator.from_pretrained(directory)


def context_k(model: ReportGenerator | VisionLanguageModel) -> int:
    """Retrieved reports the generator takes as context (0 for a transformers VLM: the image alone)."""
    return model.config.decoder.context_k if isinstance(model, ReportGenerator) else 0


def _model_folder(directory: Path) -> Path:
    """``directory`` or its ``model/`` subfolder, checked to hold a report generator (ModelError if not)."""
    if not (directory / CONFIG_FILE).is_file() and (directory / "model" / CONFIG_FILE).is_file():
        directory = directory / "model"
    if not directory.is_dir():
        raise ModelError(f"{directory}: model folder not found")
    config_path = directory / CONFIG_FILE
    try:
        kind = read_json(config_path).get("kind") if config_path.is_file() else None
    except (ValueError, OSError, AttributeError):
        kind = None
    if kind != KIND:
        raise ModelError(f"{directory}: not a report generator (its config.json does not say kind "
                         f"{KIND!r}; train one with medvl train report)")
    for name in (WEIGHTS_FILE, TOKENIZER_DIR):
        if not (directory / name).exists():
            raise ModelError(f"{directory}: not a complete report generator folder (missing {name})")
    return directory


def _beam_done(finished: list[tuple[float, list[int]]], kept: list[tuple[float, int, int]], beams: int,
               length: int, length_penalty: float) -> bool:
    """Enough hypotheses finished and none of the open ones scores better (at its current length)."""
    if len(finished) < beams:
        return False
    best = max(score for score, _ in finished)
    return all(score / length ** length_penalty <= best for score, _, _ in kept)


def _cache_argument() -> str:
    """The decoder's keyword for its key/value cache (``cache`` in transformers 5, ``past_key_values`` before)."""
    import inspect

    from transformers import BertLMHeadModel

    return "cache" if "cache" in inspect.signature(BertLMHeadModel.forward).parameters else "past_key_values"


def _until(ids: list[int], eos: int) -> list[int]:
    return ids[:ids.index(eos)] if eos in ids else ids


_CACHE_ARGUMENT = _cache_argument()
