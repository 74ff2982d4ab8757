"""Counterfactual pairs (MediConfusion style): two images that differ in one finding, answered both.

A model that reads the finding answers both images of a pair correctly; a model that relies on
something else (a burned-in marker, the patient's habitus, the scanner) gives both images the same
answer, so it fails the pair even when its single-image accuracy looks good.

* **Phantom pairs** (``phantom_counterfactual_pairs``): image ``a`` is a phantom case as drawn
  (one finding, ``extra_finding_prob`` 0); image ``b`` is the same film of the same patient
  (``Visit(number=0)``: same anatomy, pose, exposure and noise) with the finding changed:

  - ``absent``: the finding removed (the answer changes: ``no_finding``);
  - ``moved``: a nodule or consolidation one zone lower on the same side;
  - ``resized``: the finding's extent times ``resize`` (``Visit.grow``; default 1.5);
  - ``other_side``: an effusion, pneumothorax, nodule or consolidation on the patient's other side.

  Cardiomegaly has only ``absent`` and ``resized``; effusion and pneumothorax have no ``moved``.
  A variation that does not apply to a finding is skipped. Images are in memory (uint8 arrays).
* **Real data** (``nearest_neighbour_pairs``): each image paired with its nearest neighbour (cosine) among
  the images with a different label; unordered duplicates (mutual neighbours) are kept once. The neighbours
  are chosen in the space of the vectors given: ``pixel_vectors`` (the images' appearance, the same for every
  model; ``bench run`` uses it), else the evaluated model's own image embeddings, whose pairs are degenerate
  (see ``pixel_vectors``). Either way they are harder than a random pair, so their accuracy is not comparable
  to a random pair's.

**Answers** (``pair_accuracy``): each image's answer is the model's predicted class for ``label``:
by default the model's supervised head for ``label`` when it has one (``method`` "head"), else zero-shot
with the prompt ensembles of ``captions`` (default: the captions the model was trained with, saved in its
``meta``; ``method`` "zero_shot"). Passing ``method`` chooses one of the two (``bench run`` checks a
zero-shot cell with ``method="zero_shot"``, so a model with a head is judged on the classifier the cell
scored). For a binary column (``no_finding``, ``nodule``: "0"/"1") this is
the "finding present?" answer; for ``finding`` it is the class among the phantom's six. An image is
correct when its answer is its own label; a pair is correct when both are.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..checks import check_number
from ..data.captions import CaptionConfig, binary_finding
from ..data.images import read_image
from ..data.phantom.cxr2d import ABNORMAL, LATERAL, MOVABLE, Visit, primary_finding, render_case
from ..data.phantom.generate import LABEL_COLUMNS, case_labels
from ..data.record import Dataset, ImageSource
from ..embed import embed_images
from ..errors import InputError
from ..models.dual import DualEncoder
from .zero_shot import zero_shot_logits

log = logging.getLogger(__name__)

VARIATIONS = ("absent", "moved", "resized", "other_side")
NEAREST_NEIGHBOUR = "nearest_neighbour"
# First patient index of twins no phantom a model was trained on holds: case i of a seed is the same film whatever
# the phantom's n, so twins from index n of a small phantom can be training films of a larger one of that seed.
UNSEEN_PATIENTS = 1_000_000_000
# the labels phantom twins carry (``CounterfactualPair.labels_a`` / ``labels_b``): a twin varies the finding, so
# another column of the phantom (view, sex, age, a zone or side) is neither labelled nor changed by a pair
TWIN_LABELS = ("finding", *LABEL_COLUMNS)
RESIZE_FACTOR = 1.5  # Visit.grow of the "resized" twin: larger, so the finding stays visible at 64 px
_APPLIES = {"absent": ABNORMAL, "resized": ABNORMAL, "moved": MOVABLE, "other_side": LATERAL}


@dataclass
class CounterfactualPair:
    """Two images whose answers are known: a case and its counterfactual twin (or nearest neighbour)."""

    image_a: ImageSource  # phantom: the case as drawn, uint8 (size, size); real data: the record's image
    image_b: ImageSource  # phantom: the same film with the finding changed; real data: the neighbour's image
    labels_a: dict[str, str]  # Record-style labels: "finding" and the binary manifest columns as "0"/"1"
    labels_b: dict[str, str]
    variation: str  # absent | moved | resized | other_side | nearest_neighbour
    finding: str  # the finding the pair is about (nearest neighbour: image a's class of the label)
    id_a: str
    id_b: str
    meta: dict[str, Any] = field(default_factory=dict)  # phantom: seed, index, finding a / b; nn: similarity


def phantom_counterfactual_pairs(seed: int, n: int, size: int = 128, findings: Sequence[str] | None = None,
                                 variations: Sequence[str] = VARIATIONS, start: int = 0,
                                 resize: float = RESIZE_FACTOR) -> list[CounterfactualPair]:
    """Counterfactual pairs of ``n`` phantom patients per finding (see the module docstring).

    Patients are the first ``n`` cases from index ``start`` whose finding is the one asked for
    (``start`` past a training set's size gives patients the model has not seen; ``UNSEEN_PATIENTS``, past any
    phantom of the seed that can be generated in practice, whatever the training set was). Each patient
    gives one pair per variation that applies to its finding. Same arguments, same pixels.
    """
    check_number("n", n, minimum=1, integer=True)
    check_number("start", start, minimum=0, integer=True)
    check_number("resize", resize, minimum=0.5, maximum=2.0)
    findings = tuple(ABNORMAL if findings is None else findings)
    _check_names("findings", findings, ABNORMAL)
    _check_names("variations", tuple(variations), VARIATIONS)
    pairs = []
    for finding in findings:
        for index in _patients(seed, finding, int(n), int(start)):
            case = render_case(seed, index, size)
            for variation in variations:
                if finding in _APPLIES[variation]:
                    pairs.append(_phantom_pair(case, seed, index, size, finding, variation, resize))
    log.info("rendered %d counterfactual pairs (%d patients per finding, %d px, seed %d)", len(pairs), n, size, seed)
    return pairs


def _check_names(option: str, names: tuple[str, ...], allowed: tuple[str, ...]) -> None:
    unknown = [name for name in names if name not in allowed]
    if unknown or not names:
        raise InputError(f"{option} must be a non-empty list among {', '.join(allowed)}, got {list(names)!r}")


def _patients(seed: int, finding: str, n: int, start: int) -> list[int]:
    """The first ``n`` case indices from ``start`` whose primary finding is ``finding``."""
    indices: list[int] = []
    index = start
    while len(indices) < n:  # every block of six indices holds each finding once
        if primary_finding(seed, index) == finding:
            indices.append(index)
        index += 1
    return indices


def _visit(finding: str, variation: str, resize: float) -> Visit:
    if variation == "absent":
        return Visit(number=0, absent=(finding,))
    if variation == "moved":
        return Visit(number=0, moved=(finding,))
    if variation == "resized":
        return Visit(number=0, grow=resize)
    return Visit(number=0, other_side=(finding,))


def _phantom_pair(case, seed: int, index: int, size: int, finding: str, variation: str,
                  resize: float) -> CounterfactualPair:
    twin = render_case(seed, index, size, visit=_visit(finding, variation, resize))
    case_id = f"phantom-{seed}-{index:05d}"
    return CounterfactualPair(
        image_a=case.image, image_b=twin.image, labels_a=_labels(case), labels_b=_labels(twin),
        variation=variation, finding=finding, id_a=case_id, id_b=f"{case_id}-{variation}",
        meta={"seed": seed, "index": index, "size": size, "finding_a": _where(case, finding),
              "finding_b": _where(twin, finding)},
    )


def _labels(case) -> dict[str, str]:
    return {"finding": case.finding, **{name: str(value) for name, value in case_labels(case).items()}}


def _where(case, finding: str) -> dict[str, Any] | None:
    """Side, zone, size, box and mask area (pixels) of ``finding`` in a case (None when absent)."""
    entry = next((f for f in case.findings if f["name"] == finding), None)
    if entry is None:
        return None
    return {**{key: entry[key] for key in ("side", "zone", "size_mm", "severity", "box")},
            "pixels": int(case.masks[finding].sum())}


# ---------------------------------------------------------------------------------------------
# Answers.


def predict_probabilities(model: DualEncoder, images: Sequence[ImageSource], label: str,
                          captions: CaptionConfig | None = None, classes: Sequence[str] | None = None,
                          batch_size: int = 64, method: str | None = None) -> tuple[np.ndarray, list[str], str]:
    """(N, K) class probabilities of ``images`` for ``label``, the K class names and the method.

    ``method`` None: the model's head for ``label`` when it has one ("head": its own classes), else
    zero-shot ("zero_shot") among ``classes`` (default: the classes ``captions`` describes for
    ``label``) with the prompt ensembles of ``captions`` (default: the model's training captions).
    ``method`` "head" or "zero_shot" answers that way (InputError for "head" without a head for ``label``).
    """
    if use_head(model, label, method):
        head_classes = list(model.meta["heads"][label])
        if not images:
            return np.zeros((0, len(head_classes))), head_classes, "head"
        features = _encode(model, images, batch_size, features=True)
        return model.head_probabilities(label, features).numpy(), head_classes, "head"
    captions = captions or model_captions(model)
    class_names = list(classes) if classes else list(captions.classes.get(label, {}))
    if len(class_names) < 2:
        raise InputError(f"zero-shot answers for {label!r} need at least 2 classes: pass classes, or captions "
                         f"describing the classes of {label!r} (the model has no head for it)")
    prompts = [captions.prompts(label, name, binary_finding(label, class_names)) for name in class_names]
    if not images:
        return np.zeros((0, len(class_names))), class_names, "zero_shot"
    embeddings = _encode(model, images, batch_size)
    return zero_shot_logits(model, embeddings, prompts).softmax(-1).numpy(), class_names, "zero_shot"


def use_head(model: DualEncoder, label: str, method: str | None) -> bool:
    """Whether answers for ``label`` come from the model's head (``method``: None, "head" or "zero_shot")."""
    if method not in (None, "head", "zero_shot"):
        raise InputError(f"method must be 'head' or 'zero_shot', got {method!r}")
    if method == "head" and label not in model.heads:
        raise InputError(f"the model has no head for {label!r} (heads: {', '.join(model.heads) or 'none'})")
    return label in model.heads if method is None else method == "head"


def _encode(model: DualEncoder, images: Sequence[ImageSource], batch_size: int, features: bool = False) -> torch.Tensor:
    """Embeddings (or backbone features) of files, arrays or loadable images, read a batch at a time."""
    chunks = [model.encode_images(model.preprocessor.load_many(images[start:start + batch_size]),
                                  batch_size=batch_size, features=features)
              for start in range(0, len(images), batch_size)]
    return torch.cat(chunks)


def model_captions(model: DualEncoder) -> CaptionConfig:
    """The caption config the model was trained with (saved in its meta), else the default one."""
    saved = model.meta.get("captions")
    return CaptionConfig.from_dict(saved, source="model captions") if isinstance(saved, dict) else CaptionConfig()


def class_indices(labels: Sequence[dict[str, Any]], label: str, classes: Sequence[str], what: str) -> np.ndarray:
    """Index into ``classes`` of each labels dict's value of ``label``; InputError for a missing or unknown one."""
    index = {name: i for i, name in enumerate(classes)}
    missing = sum(label not in item for item in labels)
    if missing:
        raise InputError(f"{what}: {missing} images have no {label!r} label")
    unknown = sorted({str(item[label]) for item in labels} - set(index))
    if unknown:
        raise InputError(f"{what}: classes {unknown} of {label!r} are not among the model's answers {list(classes)}")
    return np.array([index[str(item[label])] for item in labels], dtype=int)


def pair_accuracy(model: DualEncoder, pairs: Sequence[CounterfactualPair], label: str = "finding",
                  captions: CaptionConfig | None = None, classes: Sequence[str] | None = None,
                  batch_size: int = 64, keep_pairs: bool = False, method: str | None = None) -> dict[str, Any]:
    """Single-image and pair accuracy of the model's answers for ``label`` on counterfactual pairs.

    ``method``: None (the head for ``label`` if the model has one, else zero-shot), "head" or "zero_shot".
    Returns ``label``, ``method`` ("head" or "zero_shot", see the module docstring), ``classes``,
    ``n_pairs``, ``single_accuracy`` (over the 2 x n_pairs images), ``pair_accuracy`` (both images
    right), ``per_variation`` and ``per_finding`` (each ``{n_pairs, single_accuracy, pair_accuracy}``);
    ``keep_pairs`` adds ``pairs``: per pair ``id_a``, ``id_b``, ``variation``, ``finding``,
    ``class_a``, ``class_b``, ``answer_a``, ``answer_b``.
    """
    if not pairs:
        raise InputError("pair_accuracy needs at least one pair")
    if not classes and not use_head(model, label, method):
        described = model_captions(model) if captions is None else captions
        if not described.classes.get(label):
            classes = sorted({str(p.labels_a.get(label)) for p in pairs} | {str(p.labels_b.get(label)) for p in pairs})
    images = [image for pair in pairs for image in (pair.image_a, pair.image_b)]
    probabilities, class_names, method = predict_probabilities(model, images, label, captions, classes, batch_size,
                                                               method)
    truth = class_indices([lab for p in pairs for lab in (p.labels_a, p.labels_b)], label, class_names, "pairs")
    right = (probabilities.argmax(1) == truth).reshape(-1, 2)
    result: dict[str, Any] = {"label": label, "method": method, "classes": class_names,
                              **_accuracies(right), "per_variation": {}, "per_finding": {}}
    for key, group in (("per_variation", "variation"), ("per_finding", "finding")):
        for name in dict.fromkeys(getattr(p, group) for p in pairs):
            rows = np.array([getattr(p, group) == name for p in pairs])
            result[key][name] = _accuracies(right[rows])
    if keep_pairs:
        answers = probabilities.argmax(1).reshape(-1, 2)
        result["pairs"] = [
            {"id_a": p.id_a, "id_b": p.id_b, "variation": p.variation, "finding": p.finding,
             "class_a": str(p.labels_a[label]), "class_b": str(p.labels_b[label]),
             "answer_a": class_names[int(a)], "answer_b": class_names[int(b)]}
            for p, (a, b) in zip(pairs, answers, strict=True)
        ]
    return result


def _accuracies(right: np.ndarray) -> dict[str, Any]:
    """``right``: (n_pairs, 2) booleans, image a and b answered correctly."""
    return {"n_pairs": int(len(right)), "single_accuracy": float(right.mean()),
            "pair_accuracy": float(right.all(axis=1).mean())}


# ---------------------------------------------------------------------------------------------
# Real data.


def nearest_neighbour_pairs(model: DualEncoder, dataset: Dataset, label: str, k: int = 1, batch_size: int = 64,
                            show_progress: bool = False,
                            embeddings: torch.Tensor | None = None) -> list[CounterfactualPair]:
    """Each record paired with its ``k`` nearest neighbours (cosine of ``embeddings``, by default the model's
    image embeddings) among the records whose ``label`` differs; each unordered pair once, in record order.

    ``embeddings``: normalised vectors of ``dataset``'s records (rows aligned with its records) to choose the
    neighbours in: ``pixel_vectors(dataset)`` for model-independent pairs (what ``bench run`` passes), or the
    model's embeddings when already computed; records without ``label`` are skipped with their rows.
    """
    check_number("k", k, minimum=1, integer=True)
    if embeddings is not None and len(embeddings) != len(dataset):
        raise InputError(f"{len(embeddings)} embeddings for {len(dataset)} records")
    labelled = [i for i, r in enumerate(dataset) if label in r.labels] if label in dataset.label_names else []
    dataset = dataset.with_labels([label])
    values = np.array([str(r.labels[label]) for r in dataset], dtype=object)
    if len(set(values)) < 2:
        raise InputError(f"{dataset.source}: nearest-neighbour pairs need at least 2 classes of {label!r}, "
                         f"got {sorted(set(values))}")
    if embeddings is None:
        embeddings = embed_images(model, dataset, batch_size=batch_size, show_progress=show_progress)
    else:
        embeddings = embeddings[labelled]
    pairs: list[CounterfactualPair] = []
    seen: set[tuple[int, int]] = set()
    for start in range(0, len(dataset), batch_size):
        rows = range(start, min(start + batch_size, len(dataset)))
        similarity = embeddings[start:rows.stop] @ embeddings.t()
        same = torch.from_numpy(values[start:rows.stop, None] == values[None, :])
        similarity = similarity.masked_fill(same, float("-inf"))
        top = similarity.topk(min(int(k), len(dataset)), dim=1)
        for row, scores, neighbours in zip(rows, top.values.tolist(), top.indices.tolist(), strict=True):
            for score, neighbour in zip(scores, neighbours, strict=True):
                key = (min(row, neighbour), max(row, neighbour))
                if score == float("-inf") or key in seen:
                    continue
                seen.add(key)
                pairs.append(_neighbour_pair(dataset, row, neighbour, label, score))
    log.info("%s: %d nearest-neighbour pairs with different %s", dataset.source, len(pairs), label)
    return pairs


def pixel_vectors(dataset: Dataset, side: int = 32) -> torch.Tensor:
    """Model-independent vectors for choosing neighbour pairs: each record's first image in grey (the
    channel mean; a volume's middle slice), resized to ``side`` x ``side`` (area averaging),
    standardised and L2-normalised, so cosine similarity compares the images' appearance.

    Pairs chosen with the evaluated model's own embedding are degenerate: the nearest image with the
    other label of a correctly answered image is mostly one the model gets wrong, so pair accuracy
    falls to about 0 whatever the model (0.002 on PneumoniaMNIST val for a model with balanced
    accuracy 0.97). Pixel-space neighbours are as hard for every model (MediConfusion chooses its pairs
    in an embedding space that is not the evaluated model's, for the same reason)."""
    from PIL import Image

    check_number("side", side, minimum=4, maximum=256, integer=True)
    rows = []
    for record in dataset:
        source = record.image
        array = np.asarray(source if isinstance(source, np.ndarray) else read_image(source), dtype=np.float32)
        if array.ndim == 3 and array.shape[-1] not in (1, 3, 4):  # a volume (D, H, W): its middle slice
            array = array[array.shape[0] // 2]
        grey = array.mean(-1) if array.ndim == 3 else array
        small = np.asarray(Image.fromarray(grey).resize((side, side), Image.Resampling.BOX), dtype=np.float32)
        small = (small - small.mean()) / (small.std() + 1e-6)
        rows.append(small.reshape(-1))
    vectors = torch.from_numpy(np.stack(rows)) if rows else torch.empty(0, side * side)
    return torch.nn.functional.normalize(vectors, dim=-1)


def _neighbour_pair(dataset: Dataset, row: int, neighbour: int, label: str, similarity: float) -> CounterfactualPair:
    a, b = dataset[row], dataset[neighbour]
    return CounterfactualPair(
        image_a=a.image, image_b=b.image, labels_a={k: str(v) for k, v in a.labels.items()},
        labels_b={k: str(v) for k, v in b.labels.items()}, variation=NEAREST_NEIGHBOUR,
        finding=str(a.labels[label]), id_a=a.id, id_b=b.id, meta={"similarity": float(similarity)},
    )
