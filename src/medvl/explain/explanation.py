"""One image explained: the predicted findings, a heatmap per method as a PNG overlay, the concepts
of a concept bottleneck that push towards each finding (and the strongest against it) and the
nearest cases of an index (the image's own indexed copies left out, and named: ``left_out_copies``).

Findings are the zero-shot classes of one label column (``--labels``, default every class the
model's captions describe, of the concept bottleneck's label column when they describe it; labels follow
``predict``'s rule); the ``top`` most probable are explained.
Overlay files are named ``<image stem>_<finding>_<method>.png``; ``explanation.json`` holds everything else.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checks import check_number
from ..data import captions_for
from ..data.audit import input_flags
from ..embed import class_embeddings
from ..errors import DataError, InputError
from ..eval.zero_shot import scaled_similarities
from ..index.base import check_neighbour_options
from ..index.build import hashed_image
from ..io import check_output_file, json_ready, read_json, write_errors_named, write_json
from ..models.ood import embed_checked, ood_comparison
from ..predict import check_label_count, checked_label_column, class_prompts, prompt_warnings
from .concepts import ConceptBottleneck
from .grounding import normalise_map, peak
from .heatmaps import check_heatmap_model, check_methods, default_methods, heatmaps, resize_map

EXPLANATION_FILE = "explanation.json"
BOTTLENECK_FILE = "bottleneck.json"  # the concept bottleneck an explanation used, saved beside it on request
DEFAULT_NEIGHBOURS = 5  # nearest cases listed with an index


def finding_classes(model, labels: Sequence[str] | None = None, label_column: str | None = None,
                    captions=None, bottleneck=None) -> tuple[str, list[str], list[list[str]]]:
    """The label column, its classes to explain and each class's prompts: ``predict``'s rule
    (``predict.class_prompts``), so that any prediction can be explained. Without ``labels``, every class
    of ``label_column`` (default: the concept ``bottleneck``'s label column when the captions describe it, else
    the first column they describe; the model's own captions unless ``captions`` is given). A class the captions do
    not describe gets the bare class name in the templates as its prompts, with a warning; a label column they do
    not describe is refused (InputError)."""
    label_column, classes = _classes(model, labels, label_column, captions, bottleneck)
    column, prompts = class_prompts(model, classes, label_column, captions)
    return column, classes, prompts


def _classes(model, labels: Sequence[str] | None, label_column: str | None, captions,
             bottleneck=None) -> tuple[str | None, list[str]]:
    """``finding_classes``'s label column (as given, or the bottleneck's that the default takes its classes from)
    and classes, checked, without their prompts (nor the warning about bare ones)."""
    requested = [name.strip() for name in labels or [] if name.strip()]
    config = captions_for(None, captions, model)
    label_column = checked_label_column(label_column)  # refused blank, as predict refuses it
    if label_column is not None:
        config.check_column(label_column)
    if labels is None:  # labels given but all blank are refused below, as predict refuses them
        if label_column is None and bottleneck is not None and bottleneck.label_column in config.classes:
            label_column = bottleneck.label_column  # the findings it has concepts for, as the captions describe them
        requested = list(config.classes.get(label_column or next(iter(config.classes), ""), {}))
    classes = check_label_count(requested) if labels is not None else list(dict.fromkeys(requested))
    if len(classes) < 2:
        raise InputError(f"need at least 2 distinct labels to explain a prediction, got {classes}: name them "
                         "(labels a,b,...)")
    check_bottleneck_classes(classes, bottleneck, defaulted=labels is None)
    return label_column, classes


def explained_classes(model, labels: Sequence[str] | None = None, label_column: str | None = None,
                      captions=None, bottleneck=None) -> list[str]:
    """The classes an explanation chooses among (``finding_classes``'s, without their prompts), checked before
    any image is read: at least 2, a known ``label_column``, and with ``bottleneck`` only classes it predicts."""
    return _classes(model, labels, label_column, captions, bottleneck)[1]


def check_bottleneck_classes(classes: Sequence[str], bottleneck=None, defaulted: bool = False) -> None:
    """InputError naming the classes a concept bottleneck does not predict: their findings would have no concepts,
    without a word. ``defaulted``: ``classes`` are the captions' (no labels were given), which the message says."""
    unknown = [name for name in classes if bottleneck is not None and name not in bottleneck.classes]
    if unknown:
        why = (f" (the classes the model's captions describe; the bottleneck was fitted on label column "
               f"{bottleneck.label_column!r}: name the labels to explain)" if defaulted else "")
        raise InputError(f"the concept bottleneck does not predict {', '.join(unknown)}; it knows "
                         f"{', '.join(bottleneck.classes)}{why}")


def overlay_paths(out: Path, image: str | Path, classes: Sequence[str], methods: Sequence[str]) -> list[Path]:
    """Every overlay file an explanation of ``image`` may write (checked before any work)."""
    stem = Path(image).stem
    return [out / f"{stem}_{_safe(name)}_{method}.png" for name in classes for method in methods]


def explain_image(model, image: str | Path, labels: Sequence[str] | None = None, label_column: str | None = None,
                  captions=None, methods: Sequence[str] | None = None, top: int = 1, out: str | Path | None = None,
                  overwrite: bool = False, bottleneck=None, index=None, k: int | None = None,
                  save_bottleneck: bool = False) -> dict[str, Any]:
    """Explain the ``top`` most probable findings of one image file (see the module docstring):
    ``explain_pixels`` on the decoded image, maps at the image's size. ``methods``: default the methods of
    ``heatmaps.EXPLAIN_METHODS`` the model's encoder supports (``heatmaps.default_methods``: no Grad-CAM on a ViT;
    no smoothgrad unless asked for, it fails the model-randomisation check).

    ``bottleneck``: a fitted ``concepts.ConceptBottleneck`` (its classes must be these);
    ``index``: an open ``medvl.index`` index built with this model, whose ``k`` nearest cases are listed (default
    5; ``k`` without ``index`` is an InputError, as it would be ignored). With ``out``, overlays and
    ``explanation.json`` are written there (existing files refused unless ``overwrite``, which also removes the
    overlays the replaced ``explanation.json`` listed and this run does not rewrite): the overlays into a
    staging folder inside ``out`` first, moved into place with ``explanation.json`` once all are written, so an
    interrupted or failed run leaves none of its files (the same command can be rerun). With ``save_bottleneck``,
    ``bottleneck`` is then saved as ``out/bottleneck.json`` (``medvl explain --concept-data``); otherwise
    ``overwrite`` also removes a ``bottleneck.json`` there that is not this run's ``bottleneck``, so the folder
    never offers another run's bottleneck as this explanation's."""
    check_heatmap_model(model)
    methods = check_methods(default_methods(model) if methods is None else methods)
    if bottleneck is not None:  # first: fitted with another model, its classes are no guide to this one's
        bottleneck.check_model(model)
    # checked before any work (with ``bottleneck``, only classes it predicts); the bare prompts are warned once, below
    classes = explained_classes(model, labels, label_column, captions, bottleneck)
    if isinstance(top, bool) or not isinstance(top, int) or not 1 <= top <= len(classes):
        raise InputError(f"top must be between 1 and {len(classes)} (the number of labels), got {top!r}")
    check_neighbour_options(index, k)  # the CLI calls it too, before a bottleneck is fitted
    if index is not None:  # before any file is written
        from ..index.base import check_model

        k = DEFAULT_NEIGHBOURS if k is None else k
        check_model(index.info, model, index.location)
    out = Path(out) if out is not None else None
    saved = out / BOTTLENECK_FILE if out is not None and save_bottleneck and bottleneck is not None else None
    if out is not None:
        for path in [out / EXPLANATION_FILE, *overlay_paths(out, image, classes, methods), *([saved] if saved else [])]:
            check_output_file(path, overwrite, "--out")
    # as the model reads it (HU for a DICOM when it has windows), with the pixel hash an index records for it
    digests, read = hashed_image(model.preprocessor, image)
    array = read if isinstance(read, np.ndarray) else model.preprocessor.read(image)
    explained, embedding = explain_pixels(model, array, labels, label_column, captions, methods, top, bottleneck,
                                          source=image)
    warning = unreliable_note(explained)  # stamped on every overlay: a figure is forwarded without the console line
    with _staged_overlays(out) as staging:
        for entry in explained["findings"]:
            for method, block in entry["heatmaps"].items():
                heatmap = block.pop("map")
                if out is not None and staging is not None:
                    name = overlay_paths(out, image, [entry["finding"]], [method])[0].name
                    title = f"{entry['finding']} ({method}, p={entry['probability']:.2f})"
                    with write_errors_named(out / name):
                        (staging / name).write_bytes(overlay_png(array, heatmap, title, warning))
                    block["file"] = name
        # the model by its config name, as /v1/explain names it (never its path: the folders above may name a patient)
        result: dict[str, Any] = {"model": model.config.name, "image": Path(image).name, **explained}
        if index is not None:  # the image's own indexed copies left out, and named
            result["neighbours"], result["left_out_copies"] = nearest_cases(index, model, embedding,
                                                                            k or DEFAULT_NEIGHBOURS, digests)
        if out is not None and staging is not None:
            earlier = _listed_overlays(out) if overwrite else set()
            _publish(staging, out, result)
            for name in earlier - _overlay_files(result):  # the replaced explanation's own overlays, only
                (out / name).unlink(missing_ok=True)
            if saved is not None:  # only once the explanation it serves was written
                bottleneck.save(saved)
            elif overwrite and _other_bottleneck(out / BOTTLENECK_FILE, bottleneck):
                (out / BOTTLENECK_FILE).unlink()
    return result


def _other_bottleneck(path: Path, bottleneck) -> bool:
    """Whether ``path`` is a file that does not hold ``bottleneck`` (any file when it is None): an earlier run's,
    which a reader of the folder would take for this explanation's. The one this run read (``--bottleneck
    OUT/bottleneck.json``) holds it and is kept: the file is compared as it is read (``ConceptBottleneck.read``),
    not as text, so one from before fingerprints were kept (no ``model``) or with a key a user added is kept too."""
    if not path.is_file():
        return False
    if bottleneck is None:
        return True
    try:
        found = ConceptBottleneck.read(path)
    except (OSError, DataError):
        return True
    return json_ready(found.to_dict()) != json_ready(bottleneck.to_dict())


@contextmanager
def _staged_overlays(out: Path | None) -> Iterator[Path | None]:
    """A staging folder inside ``out`` for the overlays (None without ``out``), removed at the end whatever
    happens."""
    if out is None:
        yield None
        return
    with write_errors_named(out):
        out.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".explain.tmp-", dir=out))
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _listed_overlays(out: Path) -> set[str]:
    """The overlay files ``out/explanation.json`` lists (none when it is missing or unreadable): an explanation
    replaced with ``overwrite`` takes them with it, so no heatmap of another run is left beside the new one."""
    try:
        return _overlay_files(read_json(out / EXPLANATION_FILE))
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return set()


def _overlay_files(explanation: dict[str, Any]) -> set[str]:
    """The overlay file names an explanation lists (plain PNG names in its folder; anything else is not one)."""
    blocks = [block for entry in explanation["findings"] for block in entry["heatmaps"].values()]
    names = {block.get("file") for block in blocks if isinstance(block, dict)}
    return {name for name in names if isinstance(name, str) and name.endswith(".png") and Path(name).name == name}


def _publish(staging: Path, out: Path, result: dict[str, Any]) -> None:
    """Move the staged overlays into ``out``, then write ``explanation.json``; if that fails, the overlays moved
    so far are removed again."""
    moved: list[Path] = []
    try:
        for overlay in sorted(staging.iterdir()):
            with write_errors_named(out / overlay.name):
                os.replace(overlay, out / overlay.name)
            moved.append(out / overlay.name)
        write_json(out / EXPLANATION_FILE, result)
    except BaseException:
        for path in moved:
            path.unlink(missing_ok=True)
        raise


def explain_pixels(model, image: np.ndarray, labels: Sequence[str] | None = None, label_column: str | None = None,
                   captions=None, methods: Sequence[str] = ("patch_text",), top: int = 1, bottleneck=None,
                   map_shape: Sequence[int] | None = None, concepts_top: int = 5, against_top: int = 2,
                   source: str | Path | None = None) -> tuple[dict[str, Any], torch.Tensor]:
    """The ``top`` most probable findings of decoded pixels (a file read by ``explain_image``, or an
    upload the service holds in memory) among ``labels``, with, per finding, each heatmap method's map
    (an ``(rows, columns)`` float32 array at ``map_shape``, default the image's own, under ``"map"``)
    and its ``"peak"`` ([row, column] on that grid; None for a constant map), and with ``bottleneck``
    (a fitted ``ConceptBottleneck``), for each finding it predicts, the ``concepts_top`` concepts that
    push towards it (``"concepts"``, positive contributions only: maybe fewer, or none) and the
    ``against_top`` that push against it most (``"concepts_against"``, negative contributions).

    Returns the explanation (``label_column``: the column whose descriptions the prompts use, None when none
    describes every class; ``warnings``: what the caller should be told, e.g. that the prompts are the bare class
    names; ``probabilities``, ``map_shape``: [rows, columns] of the grid every
    map and peak is on, ``findings``, ``input_flags``: whether the image is blank or streaked as the model sees
    it, ``medvl.data.audit.input_flags``; and, when the model has an OOD guard, ``ood_score`` /
    ``out_of_distribution`` / ``ood_threshold``: an explanation of an image unlike the training images is
    unreliable) and the image
    embedding, (1, D), for a nearest-case search. The model is only read (one forward pass, and one
    backward pass per gradient method), so a copy of a served model may run it beside the batcher."""
    check_heatmap_model(model)
    methods = check_methods(methods)
    column, classes, prompts = finding_classes(model, labels, label_column, captions, bottleneck)
    check_number("top", top, minimum=1, maximum=len(classes), integer=True)
    shape = tuple(int(side) for side in (map_shape or image.shape[:2]))
    pixels = model.preprocessor.load(image, source=source)[None]  # source: the file an error names
    with torch.no_grad():
        texts = class_embeddings(model, prompts)
        embedding, [ood] = embed_checked(model, pixels)  # the guard's flag (if any) from the same pass
        probabilities = scaled_similarities(model, embedding, texts).softmax(-1)[0].numpy()
    findings = []
    for target in [int(i) for i in np.argsort(-probabilities, kind="stable")[:top]]:
        maps = {m: resize_map(h[0], shape) for m, h in heatmaps(model, pixels, texts, target, methods).items()}
        entry: dict[str, Any] = {"finding": classes[target], "probability": float(probabilities[target]),
                                 "heatmaps": {m: {"peak": _peak(h), "map": h} for m, h in maps.items()}}
        if bottleneck is not None:
            entry["concepts"] = bottleneck.contributions(embedding, classes[target], top=concepts_top)
            entry["concepts_against"] = bottleneck.contributions(embedding, classes[target], top=against_top,
                                                                 direction="against")
        findings.append(entry)
    return {"label_column": column or None,
            "probabilities": dict(zip(classes, map(float, probabilities), strict=True)),
            "map_shape": list(shape), "findings": findings, "input_flags": input_flags(pixels[0].numpy()),
            "warnings": prompt_warnings(model, classes, column, captions), **ood}, embedding


def nearest_cases(index, model, embedding: torch.Tensor, k: int,
                  digests: Sequence[str] = ()) -> tuple[list[dict[str, Any]], list[str]]:
    """The ``k`` indexed cases closest to the image (id, score, split, labels: no report text) less the indexed
    copies of the image itself, and those copies' ids: the cases whose pixel hash is one of ``digests``
    (``medvl.index.build.hashed_image`` of the image; ``index.search.search_without_copies``)."""
    from ..index.base import check_k, check_model
    from ..index.search import search_without_copies

    check_k(k)
    check_model(index.info, model, index.location)
    hits, copies = search_without_copies(index, embedding.numpy(), k, digests)
    return [{"id": hit.id, "score": float(hit.score), "split": hit.split, "labels": hit.labels} for hit in hits], copies


def unreliable_note(explained: dict[str, Any]) -> str | None:
    """What makes an explanation (``explain_pixels``'s) unreliable, one short line each, as ``medvl explain`` prints
    it: an image blank or streaked as the model sees it (``input_flags``: no content to explain), one the OOD guard
    flags (with its score and threshold: unlike the training images); None when neither."""
    notes = []
    if explained.get("input_flags"):
        notes.append(f"{' and '.join(explained['input_flags']).upper()} AS THE MODEL SEES IT")
    if explained.get("out_of_distribution"):
        notes.append(f"OUT OF DISTRIBUTION ({ood_comparison(explained)})")
    return "\n".join(notes) or None


def overlay_png(image: np.ndarray, heatmap: np.ndarray, title: str, warning: str | None = None) -> bytes:
    """The image in grey with the min-max normalised heatmap over it (jet, half transparent) and
    its peak (``grounding.peak``) marked, as PNG bytes. ``warning`` (``unreliable_note``) goes above the title, which
    then prints in red; the whole title is also the PNG's ``Title`` text."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    grey = image.astype(np.float64).mean(axis=-1) if image.ndim == 3 else image.astype(np.float64)
    figure = Figure(figsize=(4.2, 4.0), dpi=100)
    axes = figure.add_subplot()
    axes.imshow(grey, cmap="gray")
    shown = axes.imshow(normalise_map(heatmap), cmap="jet", alpha=0.45, vmin=0.0, vmax=1.0)
    where = peak(heatmap)
    if where is not None:
        row, col = where
        axes.plot([col], [row], marker="+", color="white", markersize=14, markeredgewidth=2)
    title = f"{warning}\n{title}" if warning else title
    axes.set_title(title, fontsize=9, color="red" if warning else "black")
    axes.set_axis_off()
    figure.colorbar(shown, ax=axes, fraction=0.046, pad=0.04)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight", metadata={"Title": title})
    return buffer.getvalue()


def _peak(heatmap: np.ndarray) -> list[int] | None:
    """[row, column] of the centre of the map's maximal region (``grounding.peak``); None for a constant map
    (Grad-CAM with no positive evidence)."""
    where = peak(heatmap)
    return None if where is None else list(where)


def _safe(name: str) -> str:
    """A class name as a file-name part: the name itself when it is one, else its letters kept and a short hash
    of the whole name added, so that two findings never share a file ("pleural effusion" and
    "pleural_effusion", or names in another script)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "class"
    return safe if safe == name else f"{safe}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"
