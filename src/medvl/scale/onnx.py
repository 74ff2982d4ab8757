"""ONNX export of a medvl model's towers, for the ``onnx`` / ``onnx-int8`` backends (``medvl.models.backends``).

``export_onnx(model_dir)`` writes ``model_dir/onnx/`` next to the model files:

    image.onnx        normalised pixels (N, C, *spatial) float32 -> pooled backbone features (N, F)
    text.onnx         input_ids, attention_mask (N, L) int64 -> pooled text features (N, F)
    image.int8.onnx   the same graphs after onnxruntime's dynamic int8 quantisation (``--no-int8``: absent)
    text.int8.onnx
    export.json       what was exported: files and the SHA-256 of each graph file, inputs, the SHA-256 of
                      model.safetensors and of config.json, the largest difference from eager torch measured at
                      export time (fp32 and int8), library versions

Only the towers are exported (tokenisation, projections, normalisation and supervised heads stay in
torch: they are small), so ``OnnxDualEncoder`` has the whole ``DualEncoder`` interface and the
same weights (index fingerprints match the torch model's). Batches are dynamic, except for
``slicepool`` volumes (one volume per run: the slice loop is Python). int8 quantises the MatMul /
Gemm weights only: onnxruntime's dynamic ConvInteger ran several times slower than fp32 convolutions
on the CPU we measured (docs/benchmarks.md), so a ResNet or DenseNet image tower is the same in int8 as
in fp32; the transformer towers (ViT, BERT) are quantised. Their activations are quantised on the fly
with one scale per input tensor (``DynamicQuantizeLinear``), so ``OnnxDualEncoder`` runs those graphs
one item at a time (``medvl.models.backends``).

An export is made explicitly (no cache on the fly): ``load_model(dir, backend="onnx")`` refuses a
model folder without one, or with one made from other weights or another config, or a graph file that is not
the one ``export.json`` records (copied from another export), naming the file.
"""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ModelError
from ..io import check_not_an_input, file_sha256, replace_dir, staged_for, staging_folder, write_errors_named
from ..models.backends import (
    EXPORT_DIR,
    EXPORT_FILE,
    EXPORT_FORMAT,
    config_digest,
    onnx_session,
    weights_digest,
)
from ..models.dual import CONFIG_FILE, WEIGHTS_FILE, DualEncoder

INT8_OPS = ["MatMul", "Gemm"]  # convolutions stay fp32 (see the module docstring)
EXPORT_CHECK_TEXTS = ["no acute cardiopulmonary abnormality", "small left pleural effusion with basal atelectasis"]


def model_folder(directory: str | Path) -> Path:
    """The folder holding the model files: ``directory`` or, for a ``train`` output, its ``model/``."""
    directory = Path(directory)
    if not (directory / CONFIG_FILE).is_file() and (directory / "model" / CONFIG_FILE).is_file():
        return directory / "model"
    return directory


# -- export --------------------------------------------------------------------------------------
class _TextTower(nn.Module):
    """The tensor-only part of a text encoder: token ids and mask -> pooled features."""

    def __init__(self, model: DualEncoder):
        super().__init__()
        self.text_encoder = model.text_encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.text_encoder.token_features(input_ids, attention_mask)


def export_onnx(model_dir: str | Path, out: str | Path | None = None, int8: bool = True) -> Path:
    """Export the towers of the medvl model at ``model_dir`` to ``<folder>/onnx/`` and return that.

    ``out`` (a new or empty folder outside the model's) receives a copy of the model files and the export, so it
    is a complete model folder for every backend: both are written into one staging sibling of ``out``
    renamed into place at the end, so an interrupted or failed export leaves nothing at ``out`` (the
    same command can be rerun). By default the export goes next to the model's own files (a previous
    export there is replaced once the new one is complete).
    """
    from ..models.registry import load_model

    source = model_folder(model_dir)
    loaded_from = _model_digests(source)  # before loading: the files the exported model is made from
    model = load_model(source)
    if type(model) is not DualEncoder:
        raise ModelError(f"{model_dir}: ONNX export takes medvl model folders (this is a "
                         f"{type(model).__name__}); load it with backend 'torch'")
    folder = source if out is None or Path(out).resolve() == source.resolve() else Path(out)
    if folder != source:
        check_not_an_input(folder, "--out", {"--model": model_dir})  # a copy inside the model it copies
        if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
            raise ModelError(f"{folder}: exists and is not an empty folder; choose a new --out")
        _export_with_copy(model, folder, int8)
    else:
        _export_beside(model, folder, int8, loaded_from)
    return folder / EXPORT_DIR


def _model_digests(folder: Path) -> dict[str, str]:
    """What ``export.json`` records of the model files in ``folder`` (``read_export`` checks them); empty when one
    cannot be read (loading the model then says why)."""
    try:
        return {"weights_sha256": weights_digest(folder), "config_sha256": config_digest(folder)}
    except OSError:
        return {}


def _export_beside(model: DualEncoder, folder: Path, int8: bool, loaded_from: dict[str, str] | None = None) -> None:
    """Write ``folder/onnx/`` (staged inside ``folder``, swapped in when complete) for the model saved in
    ``folder``. ``loaded_from``: the digests of the files ``model`` was loaded from, taken before loading; if the
    files differ from them once the graphs are made (replaced during the export), the export describes weights it
    does not hold, so it is refused (ModelError) and nothing is written."""
    with write_errors_named(folder / EXPORT_DIR):
        staging = staging_folder(folder, f".{EXPORT_DIR}.tmp-")
        try:
            description = _export_towers(model, staging, int8)
            digests = _check_unchanged(folder, loaded_from)
            description.update(digests)
            (staging / EXPORT_FILE).write_text(json.dumps(description, indent=2) + "\n")
            replace_dir(staging, folder / EXPORT_DIR)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise


def _check_unchanged(folder: Path, loaded_from: dict[str, str] | None) -> dict[str, str]:
    """The digests of the model files in ``folder``; ModelError naming the file if one differs from ``loaded_from``
    (``None``: not checked) or cannot be read."""
    digests = _model_digests(folder)
    expected = digests if loaded_from is None else loaded_from
    changed = [name for key, name in (("weights_sha256", WEIGHTS_FILE), ("config_sha256", CONFIG_FILE))
               if key not in digests or digests[key] != expected.get(key)]
    if changed:
        raise ModelError(f"{folder / changed[0]}: changed during the export (its graphs hold the model loaded "
                         f"before); nothing written: rerun medvl export onnx once the model folder is final")
    return digests


def _export_with_copy(model: DualEncoder, out: Path, int8: bool) -> None:
    """The model files and their export written into one staging sibling of ``out``, renamed to ``out`` only
    once both are complete; a failed write names ``out``, not the staging folder."""
    with write_errors_named(out):
        out.absolute().parent.mkdir(parents=True, exist_ok=True)
        with staged_for(out, out.absolute().parent, f".{out.absolute().name}.tmp-") as staging:
            model.save_pretrained(staging)
            _export_beside(model, staging, int8)
            replace_dir(staging, out)


def _export_towers(model: DualEncoder, folder: Path, int8: bool) -> dict[str, Any]:
    import onnxruntime

    model.eval()
    image, image_check = _export_image(model, folder / "image.onnx")
    text, text_check = _export_text(model, folder / "text.onnx")
    if int8:
        for tower, (feeds, expected) in ((image, image_check), (text, text_check)):
            tower["int8"] = _quantize(folder / tower["fp32"])
            tower["int8_max_abs_error"] = _max_error(folder / tower["int8"], feeds, expected)
    for tower in (image, text):  # what ties each graph file to this description (read_export's load checks it)
        for precision in ("fp32", "int8"):
            if tower.get(precision):
                tower[f"{precision}_sha256"] = file_sha256(folder / tower[precision])
    return {"format": EXPORT_FORMAT, "image": image, "text": text,
            "int8": {"method": "onnxruntime dynamic quantisation", "op_types": INT8_OPS, "weights": "QInt8"}
            if int8 else None,
            "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__}}


Check = tuple[dict[str, np.ndarray], torch.Tensor]  # the inputs a graph is run on and eager torch's output


def _export_image(model: DualEncoder, path: Path) -> tuple[dict[str, Any], Check]:
    config = model.config.image
    fixed_batch = 1 if config.arch == "slicepool" else None  # its slice loop would fix the batch size
    seeded = torch.Generator().manual_seed(0)
    pixels = torch.rand(fixed_batch or 2, config.in_channels, *config.volume_shape, generator=seeded)
    dynamic = None if fixed_batch else ({0: torch.export.Dim("batch", min=1, max=65536)},)
    _torch_export(model.image_encoder, (pixels,), path, ["pixels"], dynamic)
    with torch.no_grad():
        expected = model.image_encoder(pixels)
    feeds = {"pixels": pixels.numpy()}
    error = _max_error(path, feeds, expected)
    return {"fp32": path.name, "inputs": ["pixels"], "output": "features", "batch": fixed_batch,
            "shape": [config.in_channels, *config.volume_shape], "max_abs_error": error}, (feeds, expected)


def _export_text(model: DualEncoder, path: Path) -> tuple[dict[str, Any], Check]:
    tokens = model.text_encoder.tokenize(EXPORT_CHECK_TEXTS)
    inputs = (tokens["input_ids"], tokens["attention_mask"])
    batch = torch.export.Dim("batch", min=1, max=65536)
    length = torch.export.Dim("length", min=1, max=model.config.text.max_length)
    _torch_export(_TextTower(model).eval(), inputs, path, ["input_ids", "attention_mask"],
                  ({0: batch, 1: length}, {0: batch, 1: length}))
    with torch.no_grad():
        expected = model.text_encoder.token_features(*inputs)
    feeds = {"input_ids": inputs[0].numpy(), "attention_mask": inputs[1].numpy()}
    error = _max_error(path, feeds, expected)
    return {"fp32": path.name, "inputs": ["input_ids", "attention_mask"], "output": "features",
            "batch": None, "max_length": model.config.text.max_length, "max_abs_error": error}, (feeds, expected)


def _torch_export(module: nn.Module, inputs: tuple[torch.Tensor, ...], path: Path, names: list[str],
                  dynamic_shapes: Any) -> None:
    try:
        import onnxscript  # noqa: F401  (torch's dynamo exporter needs it)
    except ImportError:
        raise ModelError("ONNX export needs onnx, onnxscript and onnxruntime: pip install 'medvl[scale]'") from None
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    no_torchvision = _Dropping("torchvision is not installed")  # its detection ops, which no medvl model uses
    registration.addFilter(no_torchvision)
    try:
        with warnings.catch_warnings():
            # the exporter warns that two inputs share the batch / length axes, which they do on purpose, and
            # torch's own pytree code trips a deprecation warning of torch
            warnings.filterwarnings("ignore", message=".*shares the same shape constraints.*")
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
            program = torch.onnx.export(module, inputs, dynamo=True, dynamic_shapes=dynamic_shapes,
                                        input_names=names, output_names=["features"], verbose=False)
    finally:
        registration.removeFilter(no_torchvision)
    if program is None:
        raise ModelError(f"{path}: torch.onnx.export returned no program")
    program.save(str(path))


def _max_error(path: Path, feeds: dict[str, np.ndarray], expected: torch.Tensor) -> float:
    outputs = onnx_session(path).run(None, feeds)[0]
    return float(np.abs(outputs - expected.numpy()).max())


def _quantize(path: Path) -> str:
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = path.with_suffix(".pre.onnx")
    target = path.with_name(path.stem + ".int8.onnx")
    with _quiet_quantiser():
        quant_pre_process(str(path), str(prepared), skip_symbolic_shape=True)
        quantize_dynamic(str(prepared), str(target), op_types_to_quantize=INT8_OPS, weight_type=QuantType.QInt8)
    prepared.unlink()
    return target.name


class _Dropping(logging.Filter):
    """Drops the records whose message starts with ``prefix``."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


class _BelowWarningFrom(logging.Filter):
    """Drops records under WARNING logged from the modules in ``folder``."""

    def __init__(self, folder: Path):
        super().__init__()
        self.folder = str(folder)

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not record.pathname.startswith(self.folder)


@contextmanager
def _quiet_quantiser() -> Iterator[None]:
    """onnxruntime's quantiser logs a line per tensor on the root logger itself (``logging.info``), so no logger
    level of its own can quiet it: while it runs, the root logger drops its records under WARNING (a logger's
    filter sees only the records logged on that logger, so every other library's and medvl's pass)."""
    import onnxruntime.quantization

    quiet = _BelowWarningFrom(Path(onnxruntime.quantization.__file__).parent)
    root = logging.getLogger()
    root.addFilter(quiet)
    try:
        yield
    finally:
        root.removeFilter(quiet)
