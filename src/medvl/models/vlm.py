"""Local transformers image-text-to-text models (LLaVA, Gemma 3 / MedGemma layouts) as medvl
answerers and report writers (inference only, offline).

A folder written by transformers' ``save_pretrained`` (the model and its processor) holds
``config.json`` (``model_type`` one of ``SUPPORTED_TYPES``), the weights (``model.safetensors``,
sharded or ``pytorch_model.bin``), the processor config (``processor_config.json`` or
``preprocessor_config.json``: image size, mean / std, the image token) and the tokenizer.
``VisionLanguageModel.from_pretrained(folder)`` loads it with ``AutoModelForImageTextToText`` and
``AutoProcessor`` (the processor's PIL backend: no torchvision), in float32 on the CPU (4 bytes a
parameter: a 4B model needs 16 GB); nothing is downloaded. A folder that misses one of them, or of
another ``model_type``, is a ``ModelError`` naming the folder and what is missing. (Qwen2-VL folders
are not supported: their processor needs torchvision, for its video processor.)

Prompts: the processor's chat template when the folder has one (one user turn: the images, then
the instruction; the assistant's turn opened), else LLaVA-1.5's conversation format
``"USER: <image>\\n{instruction} ASSISTANT:"`` with one image token per image. An answer follows
its prompt after a space, unless the prompt ends in white space (a new line in Gemma's template).
VQA instructions are ``"{question}\\n" + SHORT_ANSWER`` (LLaVA-1.5's short-answer prompt); reports
are asked for with ``REPORT_INSTRUCTION``.

Images are brought to what such models were trained on, 8-bit RGB, as for the CLIP / SigLIP
adapters (``adapters.rgb_uint8``: 16-bit and DICOM values min-max scaled, grayscale repeated); the
folder's processor then resizes and normalises them. Each answer carries ``input_flags``, per image the
``blank`` and ``streaked`` checks of that 8-bit image (``medvl.data.audit.input_flags``), as medvl's own
models' answers do: an answer about an image without content means nothing.

Answers: greedy decoding of at most ``max_new_tokens`` tokens, whatever the folder's generation config
says: medvl decodes with a clean transformers ``GenerationConfig`` carrying only the folder's special token
ids (``GENERATION_TOKEN_IDS``: its end tokens, padding and start), so a folder's sampling settings, penalties
(repetition, n-gram, length), token biases or suppressions and other decoding strategies (contrastive search,
group beam search, assisted decoding...) are left out: an answer is the model's own most likely words. The
text is normalised as VQA answers are (``normalize_answer``). Given candidates (a closed question), the
answer is the candidate of highest summed log-likelihood: the sum over the candidate's tokens (no end token,
no length normalisation) of ``log p(token | images, prompt, earlier candidate tokens)`` from the model's own
logits; the answer's probability is the softmax over the candidates of those sums. A generated "yes" / "no"
(punctuation and case aside: "Yes!", ``yes_or_no``) is scored as the closed question {yes, no} the
same way, so it comes with its alternative. An open answer's probability is the product of its generated
tokens' probabilities, the end token's included when generation stopped on it (the probability of the answer
as ended, not of its words followed by anything). Generation stops on the folder's end tokens
(``eos_token_id``, one or a list), which are never in the text, even an ordinary word. An open answer
without a word (the model ended at once, or said only punctuation) is ``""`` marked ``no_answer``, with the
probability of ending so: a model that says nothing has not answered, whatever its confidence.

Reports (``write_report``): the same decoding, greedy or beam search (``beam_size``), at most
``max_new_tokens`` new tokens, end and special tokens dropped.

Images per prompt (``SUPPORTED_TYPES``): LLaVA-1.5 was trained on one image per conversation, so
medvl gives it one; Gemma 3 was trained on interleaved images and takes the two of a two-image
question (earlier film first). More images are an ``InputError``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..checks import check_number
from ..data.images import read_image_2d
from ..data.loaders.vqa import answer_tokens, normalize_answer
from ..data.record import ImageSource
from ..errors import InputError, ModelError
from ..io import read_json
from .adapters import TOKENIZER_FILES, WEIGHT_FILES, load_transformers_model, rgb_uint8
from .dual import CONFIG_FILE

KIND = "vlm"
SUPPORTED_TYPES = {"llava": 1, "gemma3": 2}  # config.json model_type -> most images per prompt
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")
SHORT_ANSWER = "Answer the question using a single word or phrase."
REPORT_INSTRUCTION = "Write the radiology report for this image: findings, then impression."
ANSWER_TOKENS = 32  # default cap on the tokens of a VQA answer
REPORT_TOKENS = 128  # default cap on the tokens of a report
MAX_NEW_TOKENS = 1024  # the largest cap accepted
YES_NO = ("yes", "no")
GENERATION_TOKEN_IDS = ("eos_token_id", "pad_token_id", "bos_token_id", "decoder_start_token_id")  # kept of a folder's


def yes_or_no(text: str) -> str | None:
    """"yes" or "no" when a free answer is that word, punctuation, case and articles aside ("Yes!", "no."),
    else None."""
    words = answer_tokens(text)
    return words[0] if len(words) == 1 and words[0] in YES_NO else None


@dataclass
class VLMConfig:
    """What medvl needs to know about a transformers VLM folder (the folder's own files are the authority)."""

    name: str  # the folder's name
    model_type: str  # config.json model_type: llava | gemma3
    architecture: str  # config.json architectures[0], e.g. LlavaForConditionalGeneration
    max_images: int  # images per prompt (SUPPORTED_TYPES)
    chat_template: bool  # prompts from the processor's chat template (else LLaVA-1.5's format)


def transformers_config(directory: Path) -> dict[str, Any] | None:
    """A folder's config.json when it is a transformers config (a JSON object with a ``model_type``);
    None for a medvl folder (whose config.json has none) or no readable config.json."""
    try:
        config = read_json(directory / CONFIG_FILE)
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) and "model_type" in config else None


def is_transformers_folder(directory: str | Path) -> bool:
    return transformers_config(Path(directory)) is not None


class VisionLanguageModel:
    """A transformers image-text-to-text model and its processor (see the module docstring)."""

    def __init__(self, model: Any, processor: Any, config: VLMConfig, directory: Path):
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.config = config
        self.directory = directory
        self.meta: dict[str, Any] = {"kind": KIND, "name": config.name, "source": {
            "format": "transformers", "dir": str(directory), "model_type": config.model_type,
            "architecture": config.architecture}}

    @property
    def name(self) -> str:
        """How answers name the model (their ``model``): its folder's name, as a medvl VQA model's."""
        return self.config.name

    @property
    def max_images(self) -> int:
        return self.config.max_images

    # -- prompts and inputs ------------------------------------------------------------------------
    def prompt(self, instruction: str, image_count: int) -> str:
        """The text of the user's turn with ``image_count`` images, up to where the answer starts."""
        if self.config.chat_template:
            content: list[dict[str, str]] = [{"type": "image"} for _ in range(image_count)]
            messages = [{"role": "user", "content": [*content, {"type": "text", "text": instruction}]}]
            text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            bos = self.tokenizer.bos_token
            if bos and text.startswith(bos) and self._tokenizer_adds_bos():  # not twice
                text = text[len(bos):]
            return str(text)
        image = self.processor.image_token
        return f"USER: {image * image_count}\n{instruction} ASSISTANT:"

    def _tokenizer_adds_bos(self) -> bool:
        ids = self.tokenizer("x")["input_ids"]
        return bool(ids) and ids[0] == self.tokenizer.bos_token_id

    @staticmethod
    def answer_separator(prompt: str) -> str:
        """What comes between a prompt and its answer: nothing after a new line or space (Gemma's template),
        else a space (LLaVA's "ASSISTANT:"), as the model's own answer begins."""
        return "" if not prompt or prompt[-1].isspace() else " "

    def _inputs(self, images: Sequence[np.ndarray], text: str) -> dict[str, torch.Tensor]:
        from PIL import Image

        pictures = [Image.fromarray(image) for image in images]
        try:
            batch = self.processor(images=pictures, text=[text], return_tensors="pt")
        except (ValueError, TypeError) as err:
            raise InputError(f"{self.directory}: the model's processor cannot take these "
                             f"{len(images)} image(s) ({str(err)[:200]})") from None
        return dict(batch)

    def read_images(self, images: Sequence[ImageSource | str]) -> list[np.ndarray]:
        """(H, W, 3) uint8 arrays of image files or arrays, checked against ``max_images``."""
        if not images:
            raise InputError("give at least one image")
        if len(images) > self.max_images:
            raise InputError(f"{len(images)} images given; {self.config.name} ({self.config.model_type}) takes at "
                             f"most {self.max_images} per question")
        arrays = []
        for image in images:
            source: Any = image if not isinstance(image, np.ndarray) else "<array>"
            array = image if isinstance(image, np.ndarray) else read_image_2d(image)
            arrays.append(rgb_uint8(array, source))
        return arrays

    @staticmethod
    def input_flags(arrays: Sequence[np.ndarray]) -> list[dict[str, str]]:
        """Per image (``read_images``' 8-bit RGB output), ``blank`` / ``streaked`` as the model is given it
        (``medvl.data.audit.input_flags``): flag -> reason, {} for an image with content."""
        from ..data.audit import input_flags

        return [input_flags(np.moveaxis(np.asarray(array, dtype=np.float32), -1, 0) / 255.0) for array in arrays]

    # -- scoring and generation ----------------------------------------------------------------------
    @torch.no_grad()
    def candidate_log_likelihoods(self, images: Sequence[np.ndarray], instruction: str,
                                  candidates: Sequence[str]) -> list[float]:
        """Summed log-likelihood of each candidate answer's tokens after the prompt (module docstring)."""
        prompt = self.prompt(instruction, len(images))
        prompt_ids = self._inputs(images, prompt)["input_ids"][0]
        scores = []
        for candidate in candidates:
            inputs, start = self._with_answer(images, prompt, prompt_ids, candidate)
            logits = self.model(**inputs).logits[0, start - 1:-1].float()
            targets = inputs["input_ids"][0, start:]
            scores.append(float(F.log_softmax(logits, dim=-1).gather(1, targets[:, None]).sum()))
        return scores

    def _with_answer(self, images: Sequence[np.ndarray], prompt: str, prompt_ids: torch.Tensor,
                     answer: str) -> tuple[dict[str, torch.Tensor], int]:
        """The inputs of prompt + answer and where the answer's tokens start. The two are tokenised
        together; if that changes the prompt's tokens (a merge across the boundary), the answer's
        own tokens are appended to the prompt's instead."""
        start = len(prompt_ids)
        separator = self.answer_separator(prompt)
        inputs = self._inputs(images, prompt + separator + answer)
        ids = inputs["input_ids"][0]
        if len(ids) <= start or not torch.equal(ids[:start], prompt_ids):
            answer_ids = self.tokenizer(separator + answer, add_special_tokens=False,
                                        return_tensors="pt")["input_ids"][0]
            inputs = self._inputs(images, prompt)
            for name, values in inputs.items():  # per-token inputs: the answer's ids, mask 1, token types 0
                if name != "input_ids" and tuple(values.shape) == (1, start):
                    inputs[name] = F.pad(values, (0, len(answer_ids)), value=int(name == "attention_mask"))
            inputs["input_ids"] = torch.cat([prompt_ids, answer_ids])[None]
            ids = inputs["input_ids"][0]
        if len(ids) <= start:
            raise InputError(f"candidate answer {answer!r} has no tokens")
        return inputs, start

    @torch.no_grad()
    def generate(self, images: Sequence[np.ndarray], instruction: str, max_new_tokens: int,
                 beam_size: int = 1) -> tuple[str, float]:
        """The model's continuation of the prompt up to its end token (the end token and special tokens dropped,
        stripped) and, for greedy decoding, its summed log-likelihood, the end token's included (NaN under beam
        search)."""
        check_number("max_new_tokens", max_new_tokens, minimum=1, maximum=MAX_NEW_TOKENS, integer=True)
        check_number("beam_size", beam_size, minimum=1, maximum=16, integer=True)
        inputs = self._inputs(images, self.prompt(instruction, len(images)))
        output = self.model.generate(**inputs, generation_config=self._generation_config(max_new_tokens, beam_size))
        new_ids = output.sequences[0, inputs["input_ids"].shape[1]:].tolist()
        ends = self._end_tokens()
        words = next((new_ids[:position] for position, token in enumerate(new_ids) if token in ends), new_ids)
        log_likelihood = float("nan")
        if beam_size == 1:
            log_likelihood = self._generated_log_likelihood(new_ids, output.logits, ends)
        return self.tokenizer.decode(words, skip_special_tokens=True).strip(), log_likelihood

    def _end_tokens(self) -> set[int]:
        """The ids generation stops on (the folder's ``eos_token_id``, one or a list): special or ordinary words."""
        eos = self.model.generation_config.eos_token_id
        return set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()

    @staticmethod
    def _generated_log_likelihood(new_ids: Sequence[int], logits: Sequence[torch.Tensor], ends: set[int]) -> float:
        """Summed log-probability of the generated tokens up to and including the end token, when generation
        stopped on one (the probability of the answer as ended, not of its words followed by anything)."""
        total = 0.0
        for token, step in zip(new_ids, logits, strict=False):
            total += float(F.log_softmax(step[0].float(), dim=-1)[token])
            if token in ends:
                break
        return total

    def _generation_config(self, max_new_tokens: int, beam_size: int) -> Any:
        """medvl's decoding: greedy or ``beam_size`` beams, at most ``max_new_tokens``, the folder's token ids."""
        config = copy.deepcopy(self.model.generation_config)  # token ids only (decoding_config)
        config.update(do_sample=False, num_beams=beam_size, max_new_tokens=max_new_tokens,
                      return_dict_in_generate=True, output_logits=beam_size == 1)
        return config

    # -- what the evaluators call --------------------------------------------------------------------
    def answer(self, images: Sequence[ImageSource | str | np.ndarray], question: str,
               candidates: Sequence[str] | None = None, max_new_tokens: int = ANSWER_TOKENS) -> dict[str, Any]:
        """The answer to ``question`` about ``images`` in the shape of medvl's VQA model: ``answer``,
        ``probability``, ``alternative`` (+ ``alternative_probability``), ``answer_type`` (CLOSED
        when chosen among candidates, else OPEN), ``no_answer`` (True for a generated answer without a word: the
        model ended at once, or said only punctuation or an article; ``probability`` is then that of ending so)
        and ``input_flags`` (per image, ``input_flags``).
        ``images``: files or arrays (read_images' output too)."""
        arrays = self.read_images(images)
        checks = {"input_flags": self.input_flags(arrays)}
        instruction = f"{question}\n{SHORT_ANSWER}"
        if not candidates or len(candidates) < 2:
            text, log_likelihood = self.generate(arrays, instruction, max_new_tokens)
            answer = normalize_answer(text)
            if yes_or_no(answer) is None:
                return {"answer": answer, "probability": float(np.exp(log_likelihood)), "alternative": None,
                        "alternative_probability": None, "answer_type": "OPEN",
                        "no_answer": not answer_tokens(answer), **checks}
            candidates = YES_NO
        scores = torch.tensor(self.candidate_log_likelihoods(arrays, instruction, candidates))
        probabilities = scores.softmax(0)
        order = probabilities.argsort(descending=True).tolist()
        return {"answer": normalize_answer(candidates[order[0]]), "probability": float(probabilities[order[0]]),
                "alternative": normalize_answer(candidates[order[1]]),
                "alternative_probability": float(probabilities[order[1]]), "answer_type": "CLOSED",
                "no_answer": False, **checks}

    def write_report(self, image: ImageSource | np.ndarray, max_new_tokens: int = REPORT_TOKENS,
                     beam_size: int = 1, content: list[dict[str, str]] | None = None) -> str:
        """A report for one image (``REPORT_INSTRUCTION``), greedy or with ``beam_size`` beams. ``content``, a
        list, gets the image's ``input_flags``."""
        arrays = self.read_images([image])
        if content is not None:
            content.extend(self.input_flags(arrays))
        return self.generate(arrays, REPORT_INSTRUCTION, max_new_tokens, beam_size)[0]

    @torch.no_grad()
    def image_embeddings(self, images: Sequence[ImageSource | np.ndarray]) -> torch.Tensor:
        """L2-normalised mean of each image's projected tokens (what the language model reads), (N, D)."""
        rows = []
        for image in images:
            inputs = self._inputs(self.read_images([image]), self.prompt("", 1))
            names = ("pixel_values", "image_grid_thw", "image_sizes")
            features = self.model.get_image_features(**{k: v for k, v in inputs.items() if k in names})
            tokens = features if isinstance(features, torch.Tensor) else features.pooler_output
            if isinstance(tokens, list | tuple):
                tokens = torch.cat([t.reshape(-1, t.shape[-1]) for t in tokens])
            rows.append(tokens.reshape(-1, tokens.shape[-1]).float().mean(0))
        return F.normalize(torch.stack(rows), dim=-1)

    # -- loading -------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, directory: str | Path) -> VisionLanguageModel:
        """Load and check a transformers VLM folder; ``ModelError`` naming the folder and what is
        missing or unsupported otherwise."""
        directory = Path(directory)
        if not directory.is_dir():
            raise ModelError(f"{directory}: model folder not found")
        config = transformers_config(directory)
        if config is None:
            raise ModelError(f"{directory}: no transformers config.json (a JSON object with a model_type)")
        model_type = str(config["model_type"])
        if model_type not in SUPPORTED_TYPES:
            raise ModelError(f"{directory}: config.json model_type {model_type!r} is not a supported "
                             f"vision-language model (medvl runs transformers {', '.join(SUPPORTED_TYPES)} folders)")
        _require_files(directory)
        processor = _load_processor(directory)
        model = _load_model(directory, model_type)
        # generate() fills what a config it is given leaves unset from model.generation_config: keep nothing else there
        model.generation_config = decoding_config(model.generation_config, processor.tokenizer)
        architectures = config.get("architectures") or [type(model).__name__]
        described = VLMConfig(name=directory.resolve().name, model_type=model_type, architecture=str(architectures[0]),
                              max_images=SUPPORTED_TYPES[model_type],
                              chat_template=bool(getattr(processor, "chat_template", None)))
        return cls(model, processor, described, directory)


def decoding_config(folder_config: Any, tokenizer: Any) -> Any:
    """A clean ``GenerationConfig`` with only the folder's ``GENERATION_TOKEN_IDS`` (padding, when the folder
    names none, the tokenizer's pad token, else its end token): no decoding setting of the folder's."""
    from transformers import GenerationConfig

    token_ids = {name: getattr(folder_config, name, None) for name in GENERATION_TOKEN_IDS}
    if token_ids["pad_token_id"] is None:
        token_ids["pad_token_id"] = (tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                                     else tokenizer.eos_token_id)
    return GenerationConfig(**{name: value for name, value in token_ids.items() if value is not None})


def _require_files(directory: Path) -> None:
    if not any((directory / name).is_file() for name in WEIGHT_FILES):
        raise ModelError(f"{directory}: no weights (expected one of {', '.join(WEIGHT_FILES)})")
    if not any((directory / name).is_file() for name in PROCESSOR_FILES):
        raise ModelError(f"{directory}: no processor config (expected one of {', '.join(PROCESSOR_FILES)}: "
                         "image size, mean and std, the image token)")
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise ModelError(f"{directory}: no tokenizer (expected one of {', '.join(TOKENIZER_FILES)})")


def _load_processor(directory: Path) -> Any:
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(directory, local_files_only=True, backend="pil")
    except Exception as err:  # a missing sentencepiece, a broken tokenizer.json, an unknown processor class...
        raise ModelError(f"{directory}: cannot load the processor ({err.__class__.__name__}: "
                         f"{str(err)[:200]})") from None
    if getattr(processor, "tokenizer", None) is None or getattr(processor, "image_processor", None) is None:
        raise ModelError(f"{directory}: the processor ({type(processor).__name__}) has no tokenizer and image "
                         "processor pair; save the model's processor (e.g. LlavaProcessor) with save_pretrained")
    if not getattr(processor, "image_token", None):
        raise ModelError(f"{directory}: the processor names no image token")
    return processor


def _load_model(directory: Path, model_type: str) -> Any:
    from transformers import AutoModelForImageTextToText

    return load_transformers_model(AutoModelForImageTextToText, directory, model_type).eval()
