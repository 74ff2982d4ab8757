"""Where in the image a finding's text matches: patch-text similarity and Grad-CAM heatmaps.

Both methods explain one class among a set of class text embeddings (the zero-shot classes):

* ``patch_text``: every image token (one per cell of the encoder's last feature map, see
  ``ImageEncoder.tokens``) is projected with the dual encoder's ``image_projection``, normalised
  and compared by cosine with the class's text embedding minus the mean of all the classes'
  embeddings (``contrast=True``, the default: what the classes share, e.g. "a chest x-ray", then
  cancels, as in the zero-shot softmax). The mean of the projected tokens is the image embedding
  before normalisation, so the map is a spatial decomposition of the zero-shot score.
* ``gradcam``: Grad-CAM (Selvaraju et al. 2017, ``captum.attr.LayerGradCam``) of the class's
  zero-shot logit (scaled cosine of image and class embeddings) at the encoder's last
  convolutional stage (ResNet ``layer4``, DenseNet ``features``), ReLU applied.

Maps are computed on the model's input grid, upsampled bilinearly to the model's input size,
and ``resize_map`` brings them to an image's own size (the preprocessor resizes the whole image
to the model's square input without cropping, so the mapping is a plain resize). Higher = more
evidence for the class; values are not comparable between methods (``grounding.normalise_map``).
2D images only.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError, ModelError

METHODS = ("patch_text", "gradcam")


def check_heatmap_model(model) -> None:
    """Refuse models whose image tokens cannot be laid on a 2D grid (volumes, adapters)."""
    encoder = getattr(model, "image_encoder", None)
    if encoder is None or not hasattr(encoder, "tokens") or not hasattr(model, "image_projection"):
        raise ModelError(f"heatmaps need a medvl dual encoder with image tokens, got a {type(model).__name__}")
    if encoder.config.spatial_dims != 2 or encoder.config.arch == "slicepool":
        raise ModelError(f"heatmaps are for 2D images; this model's image encoder is a "
                         f"{encoder.config.spatial_dims}D {encoder.config.arch}")


def check_methods(methods: Sequence[str]) -> list[str]:
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise InputError(f"heatmap methods must be among {', '.join(METHODS)}, got {list(methods)}")
    return list(dict.fromkeys(methods))


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


def gradcam_map(model, pixels: torch.Tensor, class_embeddings: torch.Tensor, target: int) -> torch.Tensor:
    """(N, H, W) Grad-CAM of class ``target``'s zero-shot logit at the last convolutional stage."""
    from captum.attr import LayerGradCam

    check_heatmap_model(model)
    _check_target(class_embeddings, target)
    layer = _last_conv_stage(model.image_encoder)
    scale = model.logit_scale.detach().clamp(max=4.6052).exp()
    texts = class_embeddings.detach()

    def logits(normalised: torch.Tensor) -> torch.Tensor:
        image_embeddings = model.embed_image_features(model.image_encoder(normalised))
        return scale * image_embeddings @ texts.t()

    model.eval()
    with torch.enable_grad():
        normalised = model.preprocessor.normalize(pixels).requires_grad_(True)
        cam = LayerGradCam(logits, layer).attribute(normalised, target=target, relu_attributions=True)
    return _upsample(cam.detach()[:, 0], pixels.shape[2:])


def heatmaps(model, pixels: torch.Tensor, class_embeddings: torch.Tensor, target: int,
             methods: Sequence[str] = METHODS) -> dict[str, np.ndarray]:
    """Each method's (N, H, W) float32 map for class ``target``, on the model's input grid."""
    makers = {"patch_text": patch_text_map, "gradcam": gradcam_map}
    return {m: makers[m](model, pixels, class_embeddings, target).numpy().astype(np.float32)
            for m in check_methods(methods)}


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
    raise ModelError(f"Grad-CAM needs a convolutional image encoder (resnet, densenet), not {arch}; "
                     "use the patch_text method")


def _check_target(class_embeddings: torch.Tensor, target: int) -> None:
    if class_embeddings.ndim != 2 or not 0 <= target < len(class_embeddings):
        raise InputError(f"target class {target} is not among the {len(class_embeddings)} class embeddings")
