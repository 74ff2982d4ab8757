"""Concept bottlenecks (LaBo / KnoBo style): findings predicted from named concepts only.

A **concept bank** is a text file of short phrases, one a line (``#`` starts a comment line),
editable by users like the knowledge base of ``medvl.rag``. Two ship in ``medvl/explain/concepts``:
``chest_xray`` and ``dermoscopy`` (ABCD rule and 7-point checklist features); ``load_concepts``
takes one of these names or a file path.

**Concept scores** are the cosine similarities of an image embedding with each concept's text
embedding (the mean over the caption templates the model was trained with, each filled with the
phrase). A **bottleneck** standardises the scores over the training images and fits an L1
(sparse) multinomial logistic regression on them alone (regularisation C chosen by 3-fold
cross-validation); a finding's explanation is its top concepts by contribution = weight x
standardised score, those that push towards the finding (contribution > 0) apart from those
that push against it. ``compare_with_probe`` puts its accuracy beside a linear probe fitted on the
image embeddings the scores come from.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data import captions_for
from ..embed import class_embeddings, embed_images
from ..errors import DataError, InputError
from ..eval.linear_probe import fit_and_score
from ..eval.metrics import classification_metrics
from ..eval.subgroups import check_group_column
from ..io import write_json

log = logging.getLogger(__name__)

BUILTIN_DIR = Path(__file__).with_name("concepts")
C_GRID = (0.01, 0.03, 0.1, 0.3, 1.0)


@dataclass
class ConceptBank:
    """Named concept phrases and where they came from."""

    name: str  # the file's stem, e.g. "chest_xray"
    concepts: list[str]  # phrases as written, in file order, without duplicates (compared without regard to case;
    # phrases a model reads as the same tokens, e.g. differing by accents, are refused by concept_prompts)
    source: str  # the file read
    lines: list[int] | None = None  # the file's line of each concept (None: a bank made in code)


def builtin_banks() -> list[str]:
    return sorted(path.stem for path in BUILTIN_DIR.glob("*.txt"))


def load_concepts(bank: str | Path) -> ConceptBank:
    """A shipped bank by name (``builtin_banks()``) or a user's text file by path."""
    path = Path(bank)
    if not path.suffix and str(bank) in builtin_banks():
        path = BUILTIN_DIR / f"{bank}.txt"
    if not path.is_file():
        raise DataError(path, f"concept file not found (give a text file or one of {', '.join(builtin_banks())})")
    phrases = concept_lines(path)
    return ConceptBank(path.stem, list(phrases), str(path), list(phrases.values()))


def read_concepts(path: str | Path) -> list[str]:
    """The phrases of a concept file as written (runs of white space made one space); DataError naming it
    when unreadable, empty or repeating a phrase (compared without regard to case)."""
    return list(concept_lines(path))


def concept_lines(path: str | Path) -> dict[str, int]:
    """``read_concepts``'s phrases, in file order, each with its line in the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(path, "not UTF-8 text") from None
    lines: dict[str, int] = {}  # phrase, lower-cased -> its line
    concepts: dict[str, int] = {}
    for number, line in enumerate(text.lstrip("\ufeff").splitlines(), 1):
        phrase = " ".join(line.split())
        if not phrase or phrase.startswith("#"):
            continue
        if phrase.lower() in lines:
            raise DataError(path, f"line {number} repeats the concept of line {lines[phrase.lower()]}")
        lines[phrase.lower()] = number
        concepts[phrase] = number
    if not concepts:
        raise DataError(path, "empty concept bank: no concept phrases (one a line; # starts a comment)")
    return concepts


def concept_embeddings(model, bank: ConceptBank, captions=None) -> torch.Tensor:
    """(M, D) normalised text embedding of each concept, over the model's caption templates."""
    return class_embeddings(model, concept_prompts(model, bank, captions))


def concept_prompts(model, bank: ConceptBank, captions=None) -> list[list[str]]:
    """Each concept in each of the model's caption templates; DataError naming the bank's file and line of a
    concept that, in a template, has more tokens than the model's text tower reads (``text_read_length``, a
    transformers CLIP / SigLIP tower's too): it would be read cut, and two phrases differing only past the cut would
    be one concept credited twice; and of one whose prompts are the same tokens as an earlier concept's
    (``_check_concepts_read_apart``)."""
    templates = captions_for(None, captions, model).templates
    prompts = [[t.format(c) for t in templates] for c in bank.concepts]
    read_length = getattr(model, "text_read_length", None)
    if read_length is None:
        return prompts
    for number, filled in enumerate(prompts):
        length, limit = max(read_length(prompt) for prompt in filled)
        if length > limit:
            raise DataError(bank.source, f"{_where(bank, number)}: the concept phrase is {length} tokens long in the "
                                         f"model's caption templates; its text encoder reads {limit} tokens at most "
                                         "(a word is one token or more): the rest would be cut unread, and phrases "
                                         "differing only there would be one concept; shorten it")
    _check_concepts_read_apart(model, bank, prompts)
    return prompts


def _check_concepts_read_apart(model, bank: ConceptBank, prompts: list[list[str]]) -> None:
    """DataError naming the bank's file and both lines when two concepts' prompts are the same token ids to the
    model's text tower (``text_tokens``): phrases differing only in what its tokenizer drops (accents to a BERT
    WordPiece one: "enlärged heart", "enlarged heart") get one vector, which the bottleneck would credit as two
    pieces of evidence and split its weight between. The file's own check compares the text, ignoring case only."""
    seen: dict[tuple, int] = {}
    for number, filled in enumerate(prompts):
        tokens = tuple(model.text_tokens(filled))
        if tokens in seen:
            raise DataError(bank.source, f"{_where(bank, number)} reads as the same tokens as "
                                         f"{_where(bank, seen[tokens])} to the model's text encoder (its tokenizer "
                                         "drops what tells the phrases apart, e.g. accents): keep one of them")
        seen[tokens] = number


def _where(bank: ConceptBank, number: int) -> str:
    """Where a bank's concept ``number`` (from 0) is: its line in the bank's file, else its place in the bank."""
    return f"line {bank.lines[number]}" if bank.lines else f"concept {number + 1}"


@dataclass
class ConceptBottleneck:
    """A sparse linear model from standardised concept scores to findings (see the module docstring)."""

    concepts: list[str]
    classes: list[str]
    label_column: str
    concept_vectors: np.ndarray  # (M, D) concept text embeddings of the model it was fitted with
    mean: np.ndarray  # (M,) training mean of the concept scores
    scale: np.ndarray  # (M,) training standard deviation (1 where constant)
    weights: np.ndarray  # (K, M); binary models hold +-w/2 so that the softmax is the logistic
    intercepts: np.ndarray  # (K,)
    c: float  # the chosen inverse regularisation strength
    model: dict[str, Any] | None = None  # the model it was fitted with (``index.base.model_fingerprint``)
    source: str | None = field(default=None, compare=False, repr=False)  # the file it was read from, for messages

    def check_model(self, model) -> None:
        """ModelError unless ``model`` is the one the bottleneck was fitted with: its concept scores are that
        model's similarities, standardised over that model's training scores (a file from before fingerprints
        were kept is checked by embedding size only: ``load`` warns, as a model does of such an OOD guard)."""
        from ..errors import ModelError
        from ..index.base import fingerprint_differs

        where = f"{self.source}: " if self.source is not None else ""
        if self.concept_vectors.shape[1] != model.config.embed_dim:
            raise ModelError(f"{where}the concept bottleneck's concept vectors have {self.concept_vectors.shape[1]} "
                             f"dimensions, the model embeds in {model.config.embed_dim}; fit it with this model")
        what = fingerprint_differs(self.model, model) if self.model is not None else None
        if self.model is not None and what is not None:  # config | weights | tokenizer, as the index's check says
            raise ModelError(f"{where}the concept bottleneck was fitted with another model ({self.model.get('name')}, "
                             f"other {what}): its concept scores mean nothing for this one; fit it with this model")

    def standardised_scores(self, image_embeddings: np.ndarray | torch.Tensor) -> np.ndarray:
        scores = np.asarray(image_embeddings, dtype=np.float64) @ self.concept_vectors.T
        return (scores - self.mean) / self.scale

    def probabilities(self, image_embeddings: np.ndarray | torch.Tensor) -> np.ndarray:
        logits = self.standardised_scores(image_embeddings) @ self.weights.T + self.intercepts
        logits -= logits.max(axis=1, keepdims=True)
        exp = np.exp(logits)
        return exp / exp.sum(axis=1, keepdims=True)

    def contributions(self, image_embedding: np.ndarray | torch.Tensor, finding: str, top: int = 5,
                      direction: str = "for") -> list[dict]:
        """The ``top`` concepts pushing one image towards ``finding`` (``direction="for"``: positive
        contributions only, largest first) or away from it (``"against"``: negative ones only, most
        negative first), each with its weight, standardised score and contribution = weight x score.
        Fewer than ``top``, or none, when fewer concepts push that way."""
        if finding not in self.classes:
            raise InputError(f"the concept bottleneck does not predict {finding!r}; it knows {', '.join(self.classes)}")
        if direction not in ("for", "against"):
            raise InputError(f"direction must be 'for' or 'against', got {direction!r}")
        row = self.classes.index(finding)
        scores = self.standardised_scores(np.asarray(image_embedding).reshape(1, -1))[0]
        parts = self.weights[row] * scores
        towards = parts if direction == "for" else -parts
        order = [int(i) for i in np.argsort(-towards, kind="stable") if towards[i] > 0][:top]
        return [{"concept": self.concepts[i], "weight": float(self.weights[row, i]),
                 "score": float(scores[i]), "contribution": float(parts[i])} for i in order]

    @property
    def nonzero(self) -> int:
        """Concepts with a non-zero weight for at least one class."""
        return int(np.count_nonzero(np.abs(self.weights).sum(axis=0)))

    def warn_if_prior_only(self, source: str | Path) -> None:
        """A warning when no concept has a weight (L1 at the chosen C kept none): the bottleneck's predictions
        are then the class prior (its intercepts) and no concept explains any finding."""
        if self.nonzero == 0:
            log.warning("%s: the concept bottleneck uses no concept (every weight is 0 at C=%g): its predictions are "
                        "the class prior, and it names no concept for or against any finding", source, self.c)

    def to_dict(self) -> dict[str, Any]:
        return {"concepts": self.concepts, "classes": self.classes, "label_column": self.label_column,
                "concept_vectors": self.concept_vectors.tolist(), "mean": self.mean.tolist(),
                "scale": self.scale.tolist(), "weights": self.weights.tolist(),
                "intercepts": self.intercepts.tolist(), "c": self.c, "model": self.model}

    def save(self, path: str | Path) -> Path:
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> ConceptBottleneck:
        """The bottleneck a file holds (``read``), with a warning when it keeps no concept or records no model."""
        bottleneck = cls.read(path)
        bottleneck.warn_if_prior_only(path)
        if bottleneck.model is None:
            log.warning("%s: the concept bottleneck records no fingerprint of the model it was fitted with (an earlier "
                        "medvl fitted it), so it cannot be checked against the model, only its embedding size: if it "
                        "was fitted with another model, its concept scores mean nothing; fit it again "
                        "(`medvl explain --concept-data`) to record one", path)
        return bottleneck

    @classmethod
    def read(cls, path: str | Path) -> ConceptBottleneck:
        """The bottleneck a file holds, as ``load`` uses it (keys it does not use are ignored; a file without
        ``model``, or with ``"model": null``, predates fingerprints: ``load`` warns that it cannot be checked),
        without a word; DataError naming the file when it is not one, or its ``model`` is not a fingerprint."""
        from ..data.loaders.manifest import decode_utf8, parse_json, repeated_key

        path = Path(path)
        if not path.is_file():
            raise DataError(path, "concept bottleneck file not found")
        try:
            data = parse_json(decode_utf8(path, path.read_bytes()))  # a BOM accepted, as in every JSON medvl reads
            if (key := repeated_key(path, data)) is not None:
                raise DataError(path, f"not a concept bottleneck file (the key {key!r} is given twice)")
            arrays: dict[str, Any] = {k: np.asarray(data[k], dtype=np.float64)
                                      for k in ("concept_vectors", "mean", "scale", "weights", "intercepts")}
            model = data.get("model")
            if model is not None and (damage := fingerprint_problem(model)) is not None:
                raise DataError(path, f"not a concept bottleneck file ({damage})")
            bottleneck = cls(concepts=data["concepts"], classes=data["classes"],  # checked by problem()
                             label_column=str(data["label_column"]), c=float(data["c"]),
                             model=dict(model) if model is not None else None, **arrays)
        except (ValueError, KeyError, TypeError) as err:
            raise DataError(path, f"not a concept bottleneck file ({type(err).__name__})") from None
        except RecursionError:
            raise DataError(path, "not a concept bottleneck file (JSON nested too deeply)") from None
        problem = bottleneck.problem()
        if problem is not None:
            raise DataError(path, f"not a concept bottleneck file ({problem})")
        bottleneck.source = str(path)
        return bottleneck

    def problem(self) -> str | None:
        """What makes this bottleneck unusable, or None: M concepts and K classes (distinct names, M >= 1,
        K >= 2) need concept vectors (M, D), mean and scale (M,), weights (K, M) and intercepts (K,), all
        finite, scale and c above 0, and contributions and logits that stay finite numbers for any image."""
        for key, names, least in (("concepts", self.concepts, 1), ("classes", self.classes, 2)):
            if not isinstance(names, list) or not all(isinstance(name, str) and name for name in names):
                return f"{key} is not a list of names"
            if len(set(names)) != len(names) or len(names) < least:
                return f"{key} must be at least {least} distinct names, got {len(names)}"
        concepts, classes = len(self.concepts), len(self.classes)
        dims = self.concept_vectors.shape[-1] if self.concept_vectors.ndim == 2 else 0
        expected = (("concept vectors are", self.concept_vectors, (concepts, max(dims, 1))),
                    ("mean is", self.mean, (concepts,)), ("scale is", self.scale, (concepts,)),
                    ("weights are", self.weights, (classes, concepts)), ("intercepts are", self.intercepts, (classes,)))
        for name, values, shape in expected:
            if values.shape != shape:
                wanted = "x".join(map(str, shape)) if values is not self.concept_vectors else f"{concepts}xD"
                return (f"{name} {'x'.join(map(str, values.shape)) or 'one number'}, expected {wanted} for "
                        f"{concepts} concepts and {classes} classes")
            if not np.isfinite(values).all():
                return f"{name} not all finite numbers"
        if not (self.scale > 0).all():
            return "scale holds values that are not above 0"
        with np.errstate(over="ignore", invalid="ignore"):  # the largest |standardised score| of any image (its
            # embedding is normalised: |cosine| <= the concept vector's norm), then of a logit and of two apart
            reach = (np.linalg.norm(self.concept_vectors, axis=1) + np.abs(self.mean)) / self.scale
            logits = 2 * (np.abs(self.weights) @ reach + np.abs(self.intercepts))
        if not np.isfinite(logits).all():
            return "its weights times the concept scores an image can have overflow: they are not a fitted model's"
        if not (np.isfinite(self.c) and self.c > 0):
            return f"c is {self.c}, expected a number above 0"
        return None


def fingerprint_problem(model: Any) -> str | None:
    """What makes a bottleneck file's ``model`` not a model fingerprint (``index.base.model_fingerprint``), or None:
    a damaged one would pass for a file from before fingerprints, and the check against the model be skipped."""
    if not isinstance(model, dict):
        return "model is not an object: it must describe the model the bottleneck was fitted with"
    for key, required in (("config_sha256", True), ("weights_sha256", True), ("tokenizer_sha256", False),
                          ("name", False)):
        if not isinstance(model.get(key), str) and (required or model.get(key) is not None):
            return f"model.{key} is not a string: the model the bottleneck was fitted with cannot be checked"
    return None


def fit_bottleneck(model, dataset, label: str, bank: ConceptBank, captions=None, seed: int = 0,
                   image_embeddings: torch.Tensor | None = None, show_progress: bool = False) -> ConceptBottleneck:
    """Fit a bottleneck on ``dataset``'s images and ``label`` classes (every record the model can take and with a
    value in ``label`` is used: a DICOM folder's 3D series are left out for a 2D model, its 2D images for a 3D one,
    with a warning, ``Dataset.for_spatial_dims``; records with an empty ``label`` are left out before any image is
    embedded, counted in one INFO line, ``labelled_records``); a warning when it keeps no concept
    (``ConceptBottleneck.warn_if_prior_only``).
    A ``label`` column of identifiers (an image or patient id: values mostly in one record, the subgroups' rule
    ``check_group_column``) is an InputError: one class per image is no class.
    ``image_embeddings``: those of the records the model takes that have a ``label`` value, in order."""
    from sklearn.model_selection import GridSearchCV

    dataset = labelled_records(dataset.for_spatial_dims(model.config.image.spatial_dims), label)
    check_group_column(dataset, label, role="label")
    classes, y = _targets(dataset, label)
    vectors = concept_embeddings(model, bank, captions).numpy().astype(np.float64)  # a phrase too long: before images
    if image_embeddings is None:
        image_embeddings = embed_images(model, dataset, show_progress=show_progress)
    if len(image_embeddings) != len(y):
        raise InputError(f"{dataset.source}: {len(image_embeddings)} image embeddings given for {len(y)} records "
                         f"with a {label!r} value")
    scores = image_embeddings.numpy().astype(np.float64) @ vectors.T
    mean, scale = scores.mean(0), scores.std(0)
    scale[scale == 0] = 1.0
    linear = l1_logistic_regression(seed)
    standardised = (scores - mean) / scale
    folds = min(3, int(np.bincount(y).min()))
    if folds >= 2:
        search = GridSearchCV(linear, {"C": list(C_GRID)}, cv=folds, scoring="neg_log_loss").fit(standardised, y)
        linear, c = search.best_estimator_, float(search.best_params_["C"])
    else:
        c = 0.1
        linear.set_params(C=c).fit(standardised, y)
    weights, intercepts = _all_classes(linear, len(classes))
    from ..index.base import model_fingerprint

    fingerprint = {key: value for key, value in model_fingerprint(model).items() if key != "dir"}
    fitted = ConceptBottleneck(bank.concepts, classes, label, vectors, mean, scale, weights, intercepts, c, fingerprint)
    fitted.warn_if_prior_only(dataset.source)
    return fitted


def l1_logistic_regression(seed: int = 0, **options: Any):
    """scikit-learn's L1 (lasso) logistic regression, saga solver, on every version pyproject allows (>= 1.4).

    From 1.8 ``l1_ratio=1.0`` alone is pure L1 (and ``penalty`` is deprecated); before 1.8 the penalty
    is ``penalty`` (default "l2") and ``l1_ratio`` is ignored unless it is "elasticnet", so a model built
    the 1.8 way there would silently be a dense L2 regression."""
    import sklearn
    from sklearn.linear_model import LogisticRegression

    major, minor = (int(part) for part in re.findall(r"\d+", sklearn.__version__)[:2])
    penalty = {"l1_ratio": 1.0} if (major, minor) >= (1, 8) else {"penalty": "l1"}
    return LogisticRegression(**penalty, solver="saga", max_iter=5000, random_state=seed, **options)


def compare_with_probe(model, train_data, test_data, label: str, bank: ConceptBank, captions=None,
                       seed: int = 0, show_progress: bool = False) -> dict[str, Any]:
    """Accuracy of a concept bottleneck and of a linear probe on the same image embeddings (of the records the
    model can take, ``Dataset.for_spatial_dims``, with a ``label`` value: ``labelled_records``)."""
    started = time.perf_counter()
    spatial_dims = model.config.image.spatial_dims
    train_data = labelled_records(train_data.for_spatial_dims(spatial_dims), label)
    test_data = labelled_records(test_data.for_spatial_dims(spatial_dims), label)
    classes, y_train = _targets(train_data, label)
    test_classes, y_test = _targets(test_data, label, classes)
    concept_prompts(model, bank, captions)  # a phrase too long is refused before the images are embedded
    train_embeddings = embed_images(model, train_data, show_progress=show_progress)
    test_embeddings = embed_images(model, test_data, show_progress=show_progress)
    bottleneck = fit_bottleneck(model, train_data, label, bank, captions, seed, train_embeddings)
    cbm = classification_metrics(y_test, bottleneck.probabilities(test_embeddings), classes)
    probe = fit_and_score(train_embeddings.numpy(), y_train, test_embeddings.numpy(), y_test, classes, cv=True)
    keys = ("accuracy", "balanced_accuracy", "macro_auc")
    return {"label": label, "classes": classes, "bank": bank.name, "concepts": len(bank.concepts),
            "nonzero_concepts": bottleneck.nonzero, "c": bottleneck.c, "n_train": len(y_train), "n_test": len(y_test),
            "bottleneck": {k: cbm[k] for k in keys}, "probe": {k: probe[k] for k in keys},
            "seconds": round(time.perf_counter() - started, 2)}


def labelled_records(dataset, label: str):
    """The records of ``dataset`` with a value in ``label`` (``Dataset.with_labels``: those left out are counted in
    one INFO line, never named), before any image is embedded, so that the embeddings and the classes are of the same
    records; InputError when no record has one."""
    labelled = dataset.with_labels([label])
    if len(labelled) == 0 and len(dataset) > 0:
        raise InputError(f"{dataset.source}: none of its {len(dataset)} records has a value in label column "
                         f"{label!r}: a concept bottleneck needs labelled records")
    return labelled


def _targets(dataset, label: str, classes: Sequence[str] | None = None) -> tuple[list[str], np.ndarray]:
    dataset = dataset.with_labels([label])
    values = [str(r.labels[label]) for r in dataset]
    known = list(classes) if classes is not None else sorted(set(values))
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise InputError(f"{dataset.source}: classes {unknown} of {label!r} are not among the training classes {known}")
    if len(known) < 2:
        raise InputError(f"{dataset.source}: label {label!r} needs at least 2 classes, got {known}")
    return known, np.array([known.index(v) for v in values])


def _all_classes(linear, count: int) -> tuple[np.ndarray, np.ndarray]:
    """(K, M) weights and (K,) intercepts over every class (binary: +-half of the one vector)."""
    coef, intercept = np.asarray(linear.coef_, dtype=np.float64), np.asarray(linear.intercept_, dtype=np.float64)
    if coef.shape[0] == 1:
        return np.vstack([-coef / 2, coef / 2]), np.array([-intercept[0] / 2, intercept[0] / 2])
    weights, intercepts = np.zeros((count, coef.shape[1])), np.zeros(count)
    weights[linear.classes_], intercepts[linear.classes_] = coef, intercept
    return weights, intercepts
