"""Inference backends: how a loaded model runs its towers on a CPU.

=======================  ===========================================================================
``auto``                 ``torch-channels-last`` for a medvl model folder, ``torch`` for a transformers
                         folder (which takes no other): the fastest path that needs nothing made first
                         (``medvl serve``'s default)
``torch``                eager PyTorch, fp32 (the default elsewhere; the only one that trains)
``torch-channels-last``  eager fp32 with channels-last (NHWC / NDHWC) activations and weights
``torch-bf16``           eager with bfloat16 autocast of the towers (CPUs with AVX512-BF16 / AMX)
``onnx``                 onnxruntime, the fp32 graphs of ``medvl export onnx`` (``medvl.scale.onnx``)
``onnx-int8``            onnxruntime, the dynamically quantised int8 graphs of the same export, run one
                         image / text at a time (see ``OnnxDualEncoder``)
=======================  ===========================================================================

Every backend returns a ``DualEncoder`` (same interface, same weights; projections, heads and the
temperature stay fp32 torch), so evaluators, indexes, search and predict never special-case one.
Which one is fastest depends on the model and the CPU: see docs/benchmarks.md.

An ONNX export lives in ``<model folder>/onnx/`` (written by ``medvl.scale.export_onnx``):
``image.onnx`` (normalised pixels (N, C, *spatial) float32 -> pooled backbone features (N, F)),
``text.onnx`` (``input_ids``, ``attention_mask`` (N, L) int64 -> pooled text features (N, F)), their
``*.int8.onnx`` versions and ``export.json`` (files and the SHA-256 of each, inputs, the SHA-256 of
``model.safetensors``, the largest difference from eager torch measured at export). It is made explicitly,
never on the fly: a model folder without one, or with one made from other weights, or a graph file whose
SHA-256 is not the one ``export.json`` records (a graph copied from another export), is refused, naming the
file. An export made before graph digests were recorded loads without that check; its image graph's input
shape is still checked against the model's config.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError, ModelError
from ..io import file_sha256, read_json
from .adapters import transformers_model_type
from .dual import CONFIG_FILE, WEIGHTS_FILE, DualEncoder
from .image import _check_input

TOWER_INPUTS = {"image": ["pixels"], "text": ["input_ids", "attention_mask"]}  # what each exported graph takes
BACKENDS = ("auto", "torch", "torch-channels-last", "torch-bf16", "onnx", "onnx-int8")
EXPORT_DIR, EXPORT_FILE, EXPORT_FORMAT = "onnx", "export.json", "medvl-onnx/1"


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise InputError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    return backend


def resolve_backend(folder: str | Path, backend: str) -> str:
    """``backend``, or for ``auto`` the backend it stands for with the model in ``folder`` (its model files).

    ``auto`` is channels-last for a medvl model folder: on this project's CPU benchmarks it ran every
    registered config 1.1-3.6x faster than eager fp32, at the same embeddings (smallest cosine 1.00000;
    docs/benchmarks.md "Encoding throughput"), and it needs no export. A transformers folder runs eager.
    """
    check_backend(backend)
    if backend != "auto":
        return backend
    return "torch" if transformers_model_type(Path(folder)) is not None else "torch-channels-last"


def load_backend(folder: Path, backend: str, load_guard: bool = True) -> DualEncoder:
    """The medvl model in ``folder`` (its model files, not a train run folder) on ``backend`` (not ``auto``:
    ``medvl.load_model`` resolves it); ``load_guard``: as for ``DualEncoder.from_pretrained``."""
    if check_backend(backend) == "auto":
        raise ModelError("backend 'auto' is resolved by load_model (models.backends.resolve_backend) first")
    if transformers_model_type(folder) is not None:
        raise ModelError(f"{folder}: backend {backend!r} takes medvl model folders, this is a transformers "
                         f"{transformers_model_type(folder)} folder (use backend 'torch')")
    if backend.startswith("onnx"):
        return OnnxDualEncoder.from_export(folder, "int8" if backend == "onnx-int8" else "fp32", load_guard)
    model = EagerDualEncoder.from_pretrained(folder, load_guard=load_guard)
    if not isinstance(model, EagerDualEncoder):
        raise ModelError(f"{folder}: not a medvl model folder")
    model.configure(channels_last=backend == "torch-channels-last", bf16=backend == "torch-bf16")
    model.meta = {**model.meta, "backend": backend}
    return model


class EagerDualEncoder(DualEncoder):
    """A ``DualEncoder`` whose towers run channels-last or under bfloat16 autocast.

    Features leave the towers as fp32, so projections and heads see the same dtype as with ``torch``.
    """

    channels_last = False
    bf16 = False

    def configure(self, channels_last: bool = False, bf16: bool = False) -> None:
        self.channels_last, self.bf16 = channels_last, bf16
        if channels_last and self.config.image.arch != "slicepool":  # slicepool's convolutions are 2D on 5D input
            memory_format = self._memory_format(2 + self.config.image.spatial_dims)
            self.image_encoder.to(memory_format=memory_format)  # type: ignore[call-overload]  # (stubs lack it)

    @staticmethod
    def _memory_format(ndim: int) -> torch.memory_format:
        return torch.channels_last if ndim == 4 else torch.channels_last_3d

    def _autocast(self) -> torch.autocast:
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16)

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.channels_last and pixels.ndim in (4, 5):
            pixels = pixels.contiguous(memory_format=self._memory_format(pixels.ndim))
        with self._autocast():
            return super().image_features(pixels).float()

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        with self._autocast():
            features = self.text_encoder(texts).float()
        return F.normalize(self.text_projection(features), dim=-1)


# -- ONNX Runtime ---------------------------------------------------------------------------------
def weights_digest(folder: Path) -> str:
    """SHA-256 of ``model.safetensors``: which weights an export was made from."""
    return file_sha256(folder / WEIGHTS_FILE)


def config_digest(folder: Path) -> str:
    """SHA-256 of ``config.json``: which architecture settings an export baked into its graphs (input size,
    pooling, ...)."""
    return file_sha256(folder / CONFIG_FILE)


def onnx_session(path: Path) -> Any:
    """An onnxruntime CPU session with torch's thread budget; ModelError naming ``path`` if it cannot load."""
    try:
        import onnxruntime
    except ImportError:
        raise ModelError("the ONNX backends need onnxruntime: pip install 'medvl[scale]'") from None
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.log_severity_level = 3  # errors only: no per-session optimisation notices
    try:
        return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own exception types for unreadable graphs
        raise ModelError(f"{path}: onnxruntime cannot load it ({str(err)[:200]})") from None


def read_export(folder: Path) -> dict[str, Any]:
    """``folder/onnx/export.json``, checked against the model's weights; ModelError naming the file."""
    path = folder / EXPORT_DIR / EXPORT_FILE
    if not path.is_file():
        raise ModelError(f"{path}: no ONNX export for this model; run: medvl export onnx --model {folder}")
    try:
        description = read_json(path)
    except (OSError, ValueError) as err:
        raise ModelError(f"{path}: unreadable ONNX export description ({err})") from None
    if not isinstance(description, dict) or description.get("format") != EXPORT_FORMAT:
        raise ModelError(f"{path}: not a medvl ONNX export description (format {EXPORT_FORMAT!r} expected)")
    for tower, inputs in TOWER_INPUTS.items():
        _check_tower_entry(path, tower, description.get(tower), inputs)
    if description.get("weights_sha256") != weights_digest(folder):
        raise ModelError(f"{path}: the export was made from other weights than {folder / WEIGHTS_FILE}; "
                         f"re-run: medvl export onnx --model {folder}")
    if description.get("config_sha256") != config_digest(folder):  # absent: an export from before configs counted
        raise ModelError(f"{path}: the export was made from another {folder / CONFIG_FILE} (its graphs bake in "
                         f"the input size, pooling and layers); re-run: medvl export onnx --model {folder}")
    return description


def _check_tower_entry(path: Path, tower: str, entry: Any, inputs: list[str]) -> None:
    """ModelError naming ``path`` unless ``entry`` describes a tower as ``medvl.scale.onnx`` writes it: its
    graph files' names, the inputs medvl feeds it, a batch of null or 1."""
    if not isinstance(entry, dict):
        problem = "is not an object"
    elif not isinstance(entry.get("fp32"), str) or not isinstance(entry.get("int8"), str | None):
        problem = "must name its graph files (fp32, int8)"
    elif entry.get("inputs") != inputs:
        problem = f"must take the inputs {inputs}, got {entry.get('inputs')!r}"
    elif entry.get("batch") not in (None, 1):
        problem = f"has batch {entry.get('batch')!r} (null or 1 expected)"
    else:
        return
    raise ModelError(f"{path}: the {tower} tower entry {problem}; re-run medvl export onnx")


class OnnxDualEncoder(DualEncoder):
    """A ``DualEncoder`` whose image and text towers run in onnxruntime (inference only).

    The torch model is loaded too (projections, heads, temperature, tokenizer and preprocessing come
    from it, and its weights identify the model to indexes); only the towers' forward passes change.
    ``slicepool`` volumes run one at a time (their export has a fixed batch of one).

    An int8 tower whose graph quantises activations (``DynamicQuantizeLinear``: the transformer towers)
    runs one image or text at a time, each text unpadded: that operator takes one scale and zero point
    over its whole input tensor, so in a batch an item's vector would depend on the other items (and a
    text on the padding its batch-mates impose), and an image embedded alone (a query) would not get
    the vector it was indexed with. ResNet / DenseNet int8 image towers quantise nothing (their
    convolutions stay fp32) and run batched.
    """

    sessions: dict[str, Any]
    export: dict[str, Any]
    per_item: dict[str, bool]  # tower -> run one item at a time

    @classmethod
    def from_export(cls, folder: Path, precision: str = "fp32", load_guard: bool = True) -> OnnxDualEncoder:
        if not (folder / CONFIG_FILE).is_file():
            raise ModelError(f"{folder}: not a medvl model directory (missing {CONFIG_FILE})")
        # first: a folder of another kind is named as such, not as unexported
        model = cls.from_pretrained(folder, load_guard=load_guard)
        if not isinstance(model, OnnxDualEncoder):
            raise ModelError(f"{folder}: not a medvl model folder")
        model.export = description = read_export(folder)
        files = {tower: _tower_file(folder, description, tower, precision) for tower in ("image", "text")}
        model.sessions = {tower: onnx_session(path) for tower, path in files.items()}
        for tower, session in model.sessions.items():
            taken = [graph_input.name for graph_input in session.get_inputs()]
            if sorted(taken) != sorted(TOWER_INPUTS[tower]):
                raise ModelError(f"{files[tower]}: the graph takes {taken}, not the {tower} tower's inputs "
                                 f"{TOWER_INPUTS[tower]} ({folder / EXPORT_DIR / EXPORT_FILE} names it for the "
                                 f"{tower} tower); re-run: medvl export onnx --model {folder}")
        _check_image_graph_shape(model, model.sessions["image"], files["image"], folder)
        model.per_item = {tower: description[tower].get("batch") == 1
                          or (precision == "int8" and _quantises_activations(path)) for tower, path in files.items()}
        model.meta = {**model.meta, "backend": "onnx" if precision == "fp32" else f"onnx-{precision}"}
        return model

    def train(self, mode: bool = True) -> OnnxDualEncoder:
        if mode:
            raise ModelError("a model on an ONNX backend is for inference only; train the torch model")
        return super().train(False)

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        _check_input(self.config.image, pixels)  # the same refusal as the torch tower's
        _check_export_shape(self.sessions["image"], pixels)
        feeds = np.ascontiguousarray(pixels.detach().numpy(), dtype=np.float32)
        session = self.sessions["image"]
        if self.per_item["image"]:
            rows = [session.run(None, {"pixels": feeds[i:i + 1]})[0] for i in range(len(feeds))]
            return torch.from_numpy(np.concatenate(rows)) if rows else torch.empty(0, self.image_encoder.num_features)
        return torch.from_numpy(session.run(None, {"pixels": feeds})[0])

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        groups = [[text] for text in texts] if self.per_item["text"] and texts else [list(texts)]
        features = torch.cat([self._text_features(group) for group in groups])
        return F.normalize(self.text_projection(features), dim=-1)

    def _text_features(self, texts: Sequence[str]) -> torch.Tensor:
        tokens = self.text_encoder.tokenize(texts)
        feeds = {name: tokens[name].numpy().astype(np.int64) for name in ("input_ids", "attention_mask")}
        return torch.from_numpy(self.sessions["text"].run(None, feeds)[0])


def _check_export_shape(session: Any, pixels: torch.Tensor) -> None:
    """InputError unless ``pixels`` have the shape the image graph takes but for the batch: an export fixes the
    spatial shape (the model's input), where a torch ResNet / DenseNet tower pools any size (its features then
    differ from those of the same image at the model's size, so resizing here would not match it either)."""
    taken = session.get_inputs()[0].shape[1:]
    if any(isinstance(size, int) and size != got for size, got in zip(taken, pixels.shape[1:], strict=True)):
        raise InputError(f"the ONNX export of this model takes pixels shaped (N, {', '.join(map(str, taken))}), got "
                         f"{tuple(pixels.shape)}: resize them to the model's input first (model.preprocessor does)")


def _quantises_activations(path: Path) -> bool:
    """True if the graph at ``path`` quantises activations on the fly (``DynamicQuantizeLinear``: one scale
    per input tensor, so per batch); True as well when ``onnx`` is missing to read it (the safe answer)."""
    try:
        import onnx
    except ImportError:
        return True
    graph = onnx.load(str(path), load_external_data=False).graph
    return any(node.op_type == "DynamicQuantizeLinear" for node in graph.node)


def _check_image_graph_shape(model: DualEncoder, session: Any, path: Path, folder: Path) -> None:
    """ModelError naming ``path`` unless the image graph takes the model's input, (N, C, *spatial) of its config,
    and gives its tower's feature width: a graph of another architecture (a 3D tower in a 2D model's folder) fails
    here, not inside onnxruntime at the first image."""
    config = model.config.image
    expected = [config.in_channels, *config.volume_shape]
    taken = list(session.get_inputs()[0].shape)
    width = session.get_outputs()[0].shape[-1] if session.get_outputs()[0].shape else None
    fixed = len(taken) == 1 + len(expected) and all(not isinstance(size, int) or size == want
                                                    for size, want in zip(taken[1:], expected, strict=True))
    if not fixed or (isinstance(width, int) and width != model.image_encoder.num_features):
        raise ModelError(f"{path}: the graph takes pixels of shape {taken} and gives {width} features, not this "
                         f"model's (N, {', '.join(map(str, expected))}) -> {model.image_encoder.num_features} (a graph "
                         f"of another model?); re-run: medvl export onnx --model {folder}")


def _tower_file(folder: Path, description: dict[str, Any], tower: str, precision: str) -> Path:
    """The graph file of ``tower`` at ``precision``; ModelError naming it if it is missing or is not the file
    ``export.json`` records (its SHA-256; an export from before digests were recorded is not checked)."""
    export_file = folder / EXPORT_DIR / EXPORT_FILE
    entry = description.get(tower) or {}
    name = entry.get(precision)
    if not name:
        raise ModelError(f"{export_file}: the export has no {precision} {tower} tower"
                         + ("; re-export without --no-int8" if precision == "int8" else ""))
    path = folder / EXPORT_DIR / Path(name).name
    if not path.is_file():
        raise ModelError(f"{path}: missing ({export_file} names it); re-run: medvl export onnx --model {folder}")
    recorded = entry.get(f"{precision}_sha256")
    if recorded is not None and recorded != file_sha256(path):
        raise ModelError(f"{path}: not the {precision} {tower} graph {export_file} records (its SHA-256 differs: "
                         f"a graph of another export?); re-run: medvl export onnx --model {folder}")
    return path
