"""One image explained for the service: ``explain_pixels``, ``medvl explain``'s computation on decoded pixels.

``medvl.explain.explanation.explain_image`` reads its image from a file and writes overlay figures;
the service holds an upload's pixels in memory only and answers each heatmap as an array, to be
laid over the image shown. This belongs beside ``explain_image`` in ``medvl.explain.explanation``
(which could then be a wrapper of it); it lives here until then, as ``medvl.api`` may not import
``medvl.explain`` (tests/test_layers.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..checks import check_number
from ..embed import class_embeddings
from ..eval.zero_shot import scaled_similarities
from ..explain.explanation import finding_classes
from ..explain.grounding import peak
from ..explain.heatmaps import check_heatmap_model, check_methods, heatmaps, resize_map


def explain_pixels(model, image: np.ndarray, labels: Sequence[str] | None = None, label_column: str | None = None,
                   captions=None, methods: Sequence[str] = ("patch_text",), top: int = 1, bottleneck=None,
                   map_shape: Sequence[int] | None = None,
                   concepts_top: int = 5) -> tuple[dict[str, Any], torch.Tensor]:
    """``explain.explanation.explain_image`` for decoded pixels (an upload held in memory, never a file):
    the ``top`` most probable findings among ``labels`` with, per finding, each heatmap method's map
    (an ``(rows, columns)`` float32 array at ``map_shape``, default the image's own, under ``"map"``)
    and its ``"peak"`` ([row, column] on that grid; None for a constant map), and with ``bottleneck``
    (a fitted ``ConceptBottleneck``) the ``concepts_top`` concepts of each finding it predicts.

    Returns the explanation (``label_column``, ``probabilities``, ``findings``) and the image
    embedding, (1, D), for a nearest-case search. The model is only read (one forward pass, and one
    backward pass per gradient method), so a copy of the service's model may run it beside the batcher."""
    check_heatmap_model(model)
    methods = check_methods(methods)
    column, classes, prompts = finding_classes(model, labels, label_column, captions)
    check_number("top", top, minimum=1, maximum=len(classes), integer=True)
    shape = tuple(int(side) for side in (map_shape or image.shape[:2]))
    pixels = model.preprocessor.load(image)[None]
    with torch.no_grad():
        texts = class_embeddings(model, prompts)
        embedding = model.encode_images(pixels)
        probabilities = scaled_similarities(model, embedding, texts).softmax(-1)[0].numpy()
    findings = []
    for target in [int(i) for i in np.argsort(-probabilities, kind="stable")[:top]]:
        maps = {m: resize_map(h[0], shape) for m, h in heatmaps(model, pixels, texts, target, methods).items()}
        entry: dict[str, Any] = {"finding": classes[target], "probability": float(probabilities[target]), "heatmaps": {
            m: {"peak": list(peak(h)) if float(np.ptp(h)) > 0 else None, "map": h} for m, h in maps.items()}}
        if bottleneck is not None and classes[target] in bottleneck.classes:
            entry["concepts"] = bottleneck.contributions(embedding, classes[target], top=concepts_top)
        findings.append(entry)
    return {"label_column": column, "probabilities": dict(zip(classes, map(float, probabilities), strict=True)),
            "findings": findings}, embedding

