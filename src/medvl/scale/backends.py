"""Inference backends: how a loaded model runs its towers on a CPU.

=======================  ===========================================================================
``torch``                eager PyTorch, fp32 (the default; the only one that trains)
``torch-channels-last``  eager fp32 with channels-last (NHWC / NDHWC) activations and weights
``torch-bf16``           eager with bfloat16 autocast of the towers (CPUs with AVX512-BF16 / AMX)
``onnx``                 onnxruntime, fp32 graphs from ``medvl export onnx`` (``medvl.scale.onnx``)
``onnx-int8``            onnxruntime, dynamically quantised int8 graphs from the same export
=======================  ===========================================================================

Every backend returns a ``DualEncoder`` (same interface, same weights; projections, heads and the
temperature stay fp32 torch), so evaluators, indexes, search and predict never special-case one.
Which one is fastest depends on the model and the CPU: see docs/benchmarks.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import InputError, ModelError
from ..models.adapters import transformers_model_type
from ..models.dual import DualEncoder
from .onnx import OnnxDualEncoder, model_folder

BACKENDS = ("torch", "torch-channels-last", "torch-bf16", "onnx", "onnx-int8")


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise InputError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    return backend


def load_backend(directory: str | Path, backend: str) -> DualEncoder:
    """The medvl model at ``directory`` on ``backend`` (see the module docstring)."""
    check_backend(backend)
    folder = model_folder(directory)
    if transformers_model_type(folder) is not None:
        raise ModelError(f"{directory}: backend {backend!r} takes medvl model folders, this is a transformers "
                         f"{transformers_model_type(folder)} folder (use backend 'torch')")
    if backend.startswith("onnx"):
        return OnnxDualEncoder.from_export(folder, "int8" if backend == "onnx-int8" else "fp32")
    model = EagerDualEncoder.from_pretrained(folder)
    if not isinstance(model, EagerDualEncoder):
        raise ModelError(f"{folder}: not a medvl model folder")
    model.configure(channels_last=backend == "torch-channels-last", bf16=backend == "torch-bf16")
    model.meta = {**model.meta, "backend": backend}
    return model


class EagerDualEncoder(DualEncoder):
    """A ``DualEncoder`` whose towers run channels-last and / or under bfloat16 autocast.

    Features leave the towers as fp32, so projections and heads see the same dtype as with ``torch``.
    """

    channels_last = False
    bf16 = False

    def configure(self, channels_last: bool = False, bf16: bool = False) -> None:
        self.channels_last, self.bf16 = channels_last, bf16
        if channels_last and self.config.image.spatial_dims in (2, 3) and self.config.image.arch != "slicepool":
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
