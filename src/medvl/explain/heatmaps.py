"""Where in the image the evidence for a finding lies: four heatmap methods.

Every method explains one class among a set of class text embeddings (the zero-shot classes):

* ``patch_text``: every image token (one per cell of the encoder's last feature map, see
  ``ImageEncoder.tokens``) is projected with the dual encoder's ``image_projection``, normalised
  and compared by cosine with the class's text embedding minus the mean of all the classes'
  embeddings (``contrast=True``, the default: what the classes share, e.g. "a chest x-ray", then
  cancels, as in the zero-shot softmax). The mean of the projected tokens is the image embedding
  before normalisation, so the map is a spatial decomposition of the zero-shot score.
* ``gradcam``: Grad-CAM (Selvaraju et al. 2017, ``captum.attr.LayerGradCam``) of the class's
  zero-shot logit (scaled cosine of image and class embeddings) at the encoder's last
  convolutional stage (ResNet ``layer4``, DenseNet ``features``), ReLU applied.
* ``occlusion``: a window slides over the input and is hidden, by default under the image's global
  mean intensity (a flat grey patch, ``fill="mean"``; ``fill="ring"``, the mean of the band around
  the window, and ``fill="blur"``, the blurred image, stand in for its local background instead, and
  are chosen through ``settings``: ``medvl explain`` and the service use the default);
  the map is the drop of the class's zero-shot log-probability (log-softmax over the classes, so
  a drop means the class loses ground to the others), averaged over the windows covering each
  pixel. Model-agnostic, pixel resolution; costs one forward pass per window position. A grey patch
  on a dark border or air is an edit unlike any training image: peaks at the image's edges may be
  that, not evidence.
* ``smoothgrad``: SmoothGrad of the same log-probability: the absolute input gradient averaged
  over noisy copies of the image, Gaussian-smoothed. Model-agnostic, pixel resolution; costs
  one forward and backward pass per noisy copy. It fails the model-randomisation check
  (``explain.sanity``): its map changes little when the image tower's weights are random and
  little from one finding to another (it shows the image's edges more than the model's
  evidence), so ``medvl explain`` runs it only when asked for by name (``EXPLAIN_METHODS``).

``gradcam``, ``occlusion`` and ``smoothgrad`` can explain a supervised head instead of the zero-shot
classes: with the setting ``head="finding"`` they explain the model's linear head for that label
column (trained with ``--supervised-weight``; its class names in ``model.meta["heads"]``), Grad-CAM
its logit, occlusion and SmoothGrad its log-softmax over the head's classes, and ``target`` indexes
the head's classes (``target_index`` finds a class by name either way). The class embeddings are
then not used. ``patch_text`` is a text-direction map and has no head form.

The first two work on the encoder's token grid and are upsampled bilinearly to the model's input
size; the last two are computed at the input size. Window, stride, noise and smoothing are given
as fractions of the image side so they mean the same at any input size; ``settings`` passes them
per method. ``resize_map`` brings a map to an image's own size (the preprocessor resizes the
whole image to the model's square input without cropping, so the mapping is a plain resize).
Higher = more evidence for the class; values are not comparable between methods
(``grounding.normalise_map``). 2D images only.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError, ModelError

METHODS = ("patch_text", "gradcam", "occlusion", "smoothgrad")
# medvl explain's methods when none are asked for: smoothgrad fails the model-randomisation check (its maps of a
# model whose image tower is re-initialised correlate 0.62-0.67 with the trained model's on the demo model,
# ``explain.sanity``, docs/benchmarks.md "Heatmap sanity checks"), so it runs only when asked for by name
EXPLAIN_METHODS = ("patch_text", "gradcam", "occlusion")
CONVOLUTIONAL = ("resnet", "densenet")  # image encoders Grad-CAM explains (at their last convolutional stage)
FILLS = ("ring", "blur", "mean")


def heatmap_refusal(image) -> str | None:
    """Why no heatmap can be drawn for an image encoder of this ``ImageConfig`` (a volume model's, a slice-pooling
    one's), or None when they can: the one rule of ``check_heatmap_model``, ``default_methods`` and the service's
    ``/v1/models``."""
    if image.spatial_dims != 2 or image.arch == "slicepool":
        return f"heatmaps are for 2D images; this model's image encoder is a {image.spatial_dims}D {image.arch}"
    return None


def check_heatmap_model(model) -> None:
    """Refuse models whose image tokens cannot be laid on a 2D grid (volumes, adapters)."""
    encoder = getattr(model, "image_encoder", None)
    if encoder is None or not hasattr(encoder, "tokens") or not hasattr(model, "image_projection"):
        raise ModelError(f"heatmaps need a medvl dual encoder with image tokens, got a {type(model).__name__}")
    refusal = heatmap_refusal(encoder.config)
    if refusal:
        raise ModelError(refusal)


def check_methods(methods: Sequence[str]) -> list[str]:
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise InputError(f"heatmap methods must be among {', '.join(METHODS)}, got {list(methods)}")
    return list(dict.fromkeys(methods))


def default_methods(model, among: Sequence[str] = EXPLAIN_METHODS) -> list[str]:
    """The methods of ``among`` (in its order) that run when none are asked for: each one the model's image
    encoder supports, i.e. all but ``gradcam`` on an encoder that is not convolutional (a ViT: Grad-CAM of its
    tokens is not defined here; asked for by name it is refused), and none for a model that takes no heatmap
    (``heatmap_refusal``: 3D and slice-pooling encoders). ``medvl explain`` runs every method this leaves of
    ``EXPLAIN_METHODS`` (``smoothgrad`` only by name: it fails the model-randomisation check); the service its
    own cheaper set."""
    image = model.config.image
    if heatmap_refusal(image):
        return []
    return [method for method in among if method != "gradcam" or image.arch in CONVOLUTIONAL]


def check_settings(methods: Sequence[str], settings: Mapping[str, Mapping[str, Any]] | None) -> None:
    """Settings may only be given for chosen methods, and only as keywords their function takes."""
    for method, options in (settings or {}).items():
        if method not in methods:
            raise InputError(f"settings given for {method!r}, which is not among the methods {list(methods)}")
        known = list(inspect.signature(_MAKERS[method]).parameters)[4:]  # after model, pixels, texts, target
        unknown = [name for name in options if name not in known]
        if unknown:
            raise InputError(f"unknown {method} setting {unknown[0]!r}; known: {', '.join(known) or 'none'}")


def patch_text_map(model, pixels: torch.Tensor, class_embeddings: torch.Tensor, target: int,
                   contrast: bool = True) -> torch.Tensor:
    """(N, H, W) cosine of each image token with class ``target``'s text direction, upsampled.

    ``pixels``: (N, C, H, W) in [0, 1] from ``model.preprocessor.load_many``; ``class_embeddings``:
    (K, D) normalised text embeddings, one per class."""
    check_heatmap_model(model)
    _check_target(class_embeddings, target)
    direction = class_embeddings[target]
    if contrast and len(class_embeddings) > 1:
        direction = direction - class_embeddings.mean(0)
    with torch.no_grad():
        normalised = model.preprocessor.normalize(pixels)
        tokens = model.image_encoder.tokens(normalised)
        projected = F.normalize(model.image_projection(tokens), dim=-1)
        scores = projected @ direction
        grid = model.image_encoder.token_grid(normalised)
    return _upsample(scores.view(len(pixels), *grid), pixels.shape[2:])


def gradcam_map(model, pixels: torch.Tensor, class_embeddings: torch.Tensor, target: int,
                head: str | None = None) -> torch.Tensor:
    """(N, H, W) Grad-CAM of class ``target``'s zero-shot logit at the last convolutional stage
    (with ``head``: of the supervised head's logit for its class ``target``)."""
    from captum.attr import LayerGradCam

    check_heatmap_model(model)
    _check_explained(model, class_embeddings, target, head)
    layer = _last_conv_stage(model.image_encoder)
    model.eval()
    with torch.enable_grad():
        normalised = model.preprocessor.normalize(pixels).requires_grad_(True)
        cam = LayerGradCam(_logits(model, class_embeddings, head), layer).attribute(
            normalised, target=target, relu_attributions=True)
    return _upsample(cam.detach()[:, 0], pixels.shape[2:])


def occlusion_map(model, pixels: torch.Tensor, class_embeddings: torch.Tensor, target: int,
                  window: float = 0.1875, stride: float = 0.0625, fill: str = "mean", smooth: float = 0.5,
                  batch_size: int = 256, head: str | None = None) -> torch.Tensor:
    """(N, H, W) drop of class ``target``'s zero-shot log-probability when a window is hidden.

    ``window`` and ``stride`` are fractions of the input side (rounded to whole pixels, at least 1);
    windows start every ``stride`` pixels and the last one touches the far edge, so every pixel is
    covered. A pixel's value is the mean drop over the windows covering it, then Gaussian-smoothed
    with sigma ``smooth`` x stride (0: no smoothing) so the peak falls between window centres.
    ``fill``: what hides a window (see ``_fills``). The model runs on ``batch_size`` occluded images
    at a time. The defaults (18 px windows every 6 px at 96 px, 196 forward passes per image, the
    image mean as fill) were chosen on the phantom's val split over 12 px windows and over the
    ``ring`` and ``blur`` fills (docs/benchmarks.md, "Explanations and grounding"). ``head``: explain
    that supervised head's class ``target`` (its log-softmax) instead (see the module docstring)."""
    check_heatmap_model(model)
    _check_explained(model, class_embeddings, target, head)
    size = pixels.shape[2:]
    side, step = _occlusion_pixels(window, stride, size)
    if fill not in FILLS:
        raise InputError(f"occlusion fill must be one of {', '.join(FILLS)}, got {fill!r}")
    if not smooth >= 0 or isinstance(batch_size, bool) or batch_size < 1:
        raise InputError(f"occlusion smooth must be >= 0 and batch_size >= 1, got {smooth!r}, {batch_size!r}")
    starts = [(y, x) for y in _starts(size[0], side, step) for x in _starts(size[1], side, step)]
    scorer = _log_probability(model, class_embeddings, target, head)
    maps = []
    with torch.no_grad():
        for image, background in zip(pixels, _fills(pixels, side, fill), strict=True):
            drops = scorer(image[None]) - _occluded_scores(scorer, image, background, starts, side, batch_size)
            maps.append(_spread(drops, starts, side, size))
    return _gaussian_blur(torch.stack(maps), smooth * step)


def smoothgrad_map(model, pixels: torch.Tensor, class_embeddings: torch.Tensor, target: int,
                   samples: int = 16, noise: float = 0.075, smooth: float = 0.02, seed: int = 0,
                   batch_size: int = 64, head: str | None = None) -> torch.Tensor:
    """(N, H, W) SmoothGrad (Smilkov et al. 2017): the mean absolute gradient of class ``target``'s
    zero-shot log-probability with respect to the input pixels over ``samples`` noisy copies
    (Gaussian noise, sigma ``noise`` on the [0, 1] pixel scale, drawn for each image from a generator
    seeded with ``seed``: an image's map is the same alone as anywhere in any batch), summed over
    channels, then Gaussian-smoothed with sigma ``smooth`` x the shorter side. ``batch_size`` noisy
    copies go through the model at a time. The defaults were chosen on the phantom's val split (noise
    0.05-0.2, smoothing 0-0.04, 16 or 32 samples). ``head``: explain that supervised head's class
    ``target`` (its log-softmax) instead."""
    check_heatmap_model(model)
    _check_explained(model, class_embeddings, target, head)
    if isinstance(samples, bool) or samples < 1 or not noise >= 0 or not 0 <= smooth <= 1 or batch_size < 1:
        raise InputError(f"smoothgrad needs samples >= 1, noise >= 0, smooth in [0, 1] and batch_size >= 1, got "
                         f"samples={samples!r}, noise={noise!r}, smooth={smooth!r}, batch_size={batch_size!r}")
    scorer = _log_probability(model, class_embeddings, target, head)
    noisy = torch.cat([image + noise * _noise((samples, *image.shape), seed) for image in pixels.detach()])
    gradients = []
    with torch.enable_grad():
        for first in range(0, len(noisy), batch_size):
            batch = noisy[first:first + batch_size].requires_grad_(True)
            gradients.append(torch.autograd.grad(scorer(batch).sum(), batch)[0].abs().sum(1))
    maps = torch.cat(gradients).view(len(pixels), samples, *pixels.shape[2:]).mean(1)
    return _gaussian_blur(maps, smooth * min(pixels.shape[2:]))


def _noise(shape: Sequence[int], seed: int) -> torch.Tensor:
    """Standard normal noise from a generator of its own seeded with ``seed``: one image's noise, whatever other
    images share its call (one generator for the batch made each image's noise depend on its position in it)."""
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed))


_MAKERS: dict[str, Callable[..., torch.Tensor]] = {
    "patch_text": patch_text_map, "gradcam": gradcam_map, "occlusion": occlusion_map, "smoothgrad": smoothgrad_map}


def heatmaps(model, pixels: torch.Tensor, class_embeddings: torch.Tensor, target: int,
             methods: Sequence[str] = METHODS, settings: Mapping[str, Mapping[str, Any]] | None = None,
             ) -> dict[str, np.ndarray]:
    """Each method's (N, H, W) float32 map for class ``target``, on the model's input grid.

    ``settings``: keyword arguments per method, e.g. ``{"occlusion": {"window": 0.25}}``."""
    methods = check_methods(methods)
    check_settings(methods, settings)
    return {m: _MAKERS[m](model, pixels, class_embeddings, target, **(settings or {}).get(m, {}))
            .numpy().astype(np.float32) for m in methods}


def resize_map(heatmap: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """A (H, W) map resized bilinearly to an image's (rows, columns)."""
    tensor = torch.as_tensor(np.asarray(heatmap, dtype=np.float32))[None]
    return _upsample(tensor, tuple(shape[:2]))[0].numpy()


def _upsample(maps: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    if tuple(maps.shape[1:]) == tuple(size):
        return maps.float()
    return F.interpolate(maps[:, None].float(), size=tuple(size), mode="bilinear", align_corners=False)[:, 0]


def _last_conv_stage(encoder) -> torch.nn.Module:
    """The module whose output the image tokens are made of (convolutional encoders only)."""
    arch = encoder.config.arch
    if arch == "resnet":
        return encoder.backbone.get_submodule("layer4")
    if arch == "densenet":
        return encoder.backbone.get_submodule("features")
    raise ModelError(f"Grad-CAM needs a convolutional image encoder ({', '.join(CONVOLUTIONAL)}), not {arch}; "
                     "use the patch_text, occlusion or smoothgrad method")


def target_index(model, classes: Sequence[str], name: str, head: str | None = None) -> int:
    """The ``target`` that explains class ``name``: its index among ``classes`` (the zero-shot
    classes, in the order of the class embeddings) or, with ``head``, among that supervised head's
    classes (``model.meta["heads"][head]``, the order the head was trained with)."""
    if head is None:
        known = list(classes)
    else:
        _check_head(model, head)
        known = list(model.meta["heads"][head])
    if name not in known:
        where = f"the supervised head {head!r}" if head is not None else "the classes"
        raise InputError(f"class {name!r} is not among {where}: {', '.join(known)}")
    return known.index(name)


def _logits(model, class_embeddings: torch.Tensor, head: str | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """Normalised pixels -> (N, K) logits: the zero-shot classes' (scaled cosine of image and class
    embeddings) or, with ``head``, the supervised head's on the pooled backbone features."""
    if head is not None:
        linear = model.heads[head]
        return lambda normalised: linear(model.image_encoder(normalised))
    scale = model.logit_scale.detach().clamp(max=4.6052).exp()
    texts = class_embeddings.detach()
    return lambda normalised: scale * model.embed_image_features(model.image_encoder(normalised)) @ texts.t()


def _log_probability(model, class_embeddings: torch.Tensor, target: int,
                     head: str | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """Pixels (N, C, H, W) in [0, 1] -> (N,) log-softmax of class ``target`` over the classes'
    zero-shot logits, or the supervised ``head``'s (a drop = the class loses ground against the
    others, not just in scale)."""
    logits = _logits(model, class_embeddings, head)
    model.eval()

    def score(batch: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(logits(model.preprocessor.normalize(batch)), dim=-1)[:, target]
    return score


def _occlusion_pixels(window: float, stride: float, size: Sequence[int]) -> tuple[int, int]:
    """Window side and stride in pixels from fractions of the shorter side."""
    if not (0 < window <= 1 and 0 < stride <= 1):
        raise InputError(f"occlusion window and stride are fractions of the image side in (0, 1], "
                         f"got window={window!r}, stride={stride!r}")
    shorter = min(size)
    return max(1, round(window * shorter)), max(1, round(stride * shorter))


def _starts(length: int, side: int, step: int) -> list[int]:
    """Window starts every ``step`` pixels, plus one flush with the far edge."""
    starts = list(range(0, max(length - side, 0) + 1, step))
    return starts if starts[-1] == max(length - side, 0) else [*starts, length - side]


def _fills(pixels: torch.Tensor, side: int, fill: str) -> torch.Tensor:
    """What hides each window: the image's global mean (``mean``, the default), or a stand-in for its local
    background (``ring``, ``blur``).

    * ``ring``: the mean of the band ``side // 2`` wide around the window (its own surroundings: a
      nodule is replaced by the lung around it, not by a global grey). Returned as (N, C, H', W'):
      the value for the window whose top-left pixel is (y, x) sits at (y, x);
    * ``blur``: the image Gaussian-blurred with sigma ``side / 2`` (small structures vanish, the
      large-scale anatomy stays), (N, C, H, W);
    * ``mean``: the image's mean intensity (the classic grey patch), (N, C, H, W)."""
    if fill == "mean":
        return pixels.mean(dim=(2, 3), keepdim=True).expand_as(pixels)
    if fill == "blur":
        return _gaussian_blur(pixels.flatten(0, 1), side / 2).view_as(pixels)
    band = max(1, side // 2)

    def sums(values: torch.Tensor, pad: int, kernel: int) -> torch.Tensor:
        return F.avg_pool2d(F.pad(values, (pad,) * 4), kernel, stride=1, divisor_override=1)

    outer = sums(pixels, band, side + 2 * band)  # window plus band, zeros outside the image
    count = sums(torch.ones_like(pixels[:1]), band, side + 2 * band)
    ring = (outer - sums(pixels, 0, side)) / (count - side * side).clamp(min=1)
    return ring


def _occluded_scores(scorer, image: torch.Tensor, background: torch.Tensor, starts: list[tuple[int, int]],
                     side: int, batch_size: int) -> torch.Tensor:
    """The score of ``image`` (C, H, W) with each window hidden, ``batch_size`` copies at a time."""
    per_start = background.shape != image.shape  # ring: one value per window
    scores = []
    for first in range(0, len(starts), batch_size):
        chunk = starts[first:first + batch_size]
        batch = image.repeat(len(chunk), 1, 1, 1)
        for copy, (y, x) in zip(batch, chunk, strict=True):
            copy[:, y:y + side, x:x + side] = (background[:, y, x, None, None] if per_start
                                               else background[:, y:y + side, x:x + side])
        scores.append(scorer(batch))
    return torch.cat(scores)


def _spread(drops: torch.Tensor, starts: list[tuple[int, int]], side: int, size: Sequence[int]) -> torch.Tensor:
    """(H, W) mean of the drops of the windows covering each pixel."""
    total, count = torch.zeros(tuple(size)), torch.zeros(tuple(size))
    for drop, (y, x) in zip(drops.tolist(), starts, strict=True):
        total[y:y + side, x:x + side] += drop
        count[y:y + side, x:x + side] += 1
    return total / count.clamp(min=1)


def _gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """(N, H, W) maps blurred with an isotropic Gaussian (edges replicated); sigma <= 0: unchanged."""
    if sigma <= 0:
        return maps
    radius = max(1, int(3 * sigma + 0.5))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    padded = F.pad(maps[:, None].float(), (radius,) * 4, mode="replicate")
    rows = F.conv2d(padded, kernel.view(1, 1, -1, 1))
    return F.conv2d(rows, kernel.view(1, 1, 1, -1))[:, 0]


def _check_head(model, head: str) -> None:
    if head not in getattr(model, "heads", {}) or head not in model.meta.get("heads", {}):
        raise ModelError(f"model has no supervised head for {head!r}; heads: {', '.join(model.heads) or 'none'} "
                         "(train with --supervised-weight and --label-column)")


def _check_explained(model, class_embeddings: torch.Tensor, target: int, head: str | None) -> None:
    """``target`` must index the class embeddings, or the classes of supervised ``head``."""
    if head is None:
        _check_target(class_embeddings, target)
        return
    _check_head(model, head)
    count = len(model.meta["heads"][head])
    if isinstance(target, bool) or not 0 <= target < count:
        raise InputError(f"target class {target} is not among the {count} classes of the supervised head {head!r}")


def _check_target(class_embeddings: torch.Tensor, target: int) -> None:
    if class_embeddings.ndim != 2 or not 0 <= target < len(class_embeddings):
        raise InputError(f"target class {target} is not among the {len(class_embeddings)} class embeddings")
