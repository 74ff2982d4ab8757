"""Out-of-distribution guard: how unlike the training images an input is.

A saved model may carry ``ood.safetensors``: the mean and the (Ledoit-Wolf shrunk) precision matrix
of its training images' backbone features (pooled, before the projection, L2-normalised), and a
threshold. An input's score is its Mahalanobis distance to the training features (Lee et al.
2018). The backbone features separate new kinds of images far better than the projected
embeddings, which are trained to keep only what the reports say (docs/benchmarks.md). Above the
threshold the input is flagged *out of distribution*: the model was not trained on anything like
it and its answer should not be trusted (a phantom-trained model shown a real chest X-ray, a CT
shown to a dermoscopy model). The threshold is the split-conformal quantile q (default 0.99) of the
scores of n calibration images the guard was not fitted on: the ceil((n + 1) q)-th smallest, so a new
in-distribution input is flagged with probability at most 1 - q (1%), in expectation over the draw of the
calibration images; with fewer than q / (1 - q) of them (99) the threshold is their highest score and the
share is 1 / (n + 1) (``info["expected_flagged_share"]``). ``medvl.eval.ood.fit_ood`` fits a guard;
``medvl ood fit`` saves it into a model.

The guard holds the SHA-256 of the image-tower weights it was fitted on (``info["image_tower_sha256"]``) and of
the image settings of the model's config (``info["image_config_sha256"]``: preprocessing and
``test_time_orientations`` shape the scored features as much as the weights do): a model loads a guard only when
both match (``matching_guard``), and training never carries a guard into the trained model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelError
from ..io import atomic_write_bytes, file_sha256, loads_json
from .config import ImageConfig, non_default

log = logging.getLogger(__name__)

OOD_FILE = "ood.safetensors"
_warned_unchecked: set[str] = set()  # guard files without a weights or image-settings fingerprint already warned about


@dataclass
class OODGuard:
    mean: torch.Tensor  # (F,) mean normalised training feature
    precision: torch.Tensor  # (D, D) inverse of the shrunk covariance
    threshold: float  # scores above this are out of distribution
    info: dict[str, Any]  # quantile, split sizes, flagged and expected flagged share, image_tower_sha256 (the
    # weights it was fitted on), image_config_sha256 (the image settings it was fitted with), fit_data /
    # calibration_data (data path hash and split names); eval.ood.fit_ood
    file_sha256: str | None = None  # SHA-256 of the guard file it was read from (load); None for one not read

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        """Mahalanobis distance of each image's (N, F) backbone features, normalised here, to the training
        images' (``DualEncoder.encode_images(..., features=True)``)."""
        if features.shape[-1] != self.mean.shape[0]:
            raise ModelError(f"OOD guard expects {self.mean.shape[0]}-d image features, got {features.shape[-1]}-d")
        centred = torch.nn.functional.normalize(features.float(), dim=-1) - self.mean
        return ((centred @ self.precision) * centred).sum(-1).clamp(min=0).sqrt()

    def check(self, features: torch.Tensor) -> list[dict[str, Any]]:
        """Per image: ``ood_score``, ``out_of_distribution`` (score above the threshold) and the threshold."""
        return [self.flag(float(score)) for score in self.scores(features)]

    def flag(self, score: float) -> dict[str, Any]:
        """``check``'s answer for one image's score."""
        return {"ood_score": round(score, 4), "out_of_distribution": bool(score > self.threshold),
                "ood_threshold": round(self.threshold, 4)}

    def save(self, directory: Path) -> None:
        """Write ``directory/ood.safetensors`` atomically (a temporary sibling renamed over it): the folder's
        other files are never touched, and an interrupted or failed write leaves the previous guard, if any."""
        from safetensors.torch import save

        if not torch.isfinite(self.precision).all() or not self.precision.abs().max() > 0:
            raise ModelError(f"{directory}: not saved, the OOD guard's precision matrix is zero or not finite")
        metadata = {"threshold": repr(float(self.threshold)), "info": json.dumps(self.info)}
        data = save({"mean": self.mean.contiguous(), "precision": self.precision.contiguous()}, metadata=metadata)
        atomic_write_bytes(Path(directory) / OOD_FILE, data)

    @classmethod
    def load(cls, directory: Path) -> OODGuard | None:
        """The guard saved in ``directory``, or None if the model has none."""
        from safetensors import SafetensorError, safe_open

        path = Path(directory) / OOD_FILE
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                mean, precision = handle.get_tensor("mean"), handle.get_tensor("precision")
            threshold, info = float(metadata["threshold"]), loads_json(metadata["info"])
            digest = file_sha256(path)  # what /v1/models tells a guard refitted into the same folder by
        except (SafetensorError, OSError, KeyError, ValueError) as err:
            raise ModelError(f"{path}: cannot read the OOD guard ({err.__class__.__name__}: {err}); "
                             f"{recovery(path)}") from None
        problem = _stored_problem(mean, precision, threshold, info)
        if problem:  # a NaN threshold or mean flags no image (the guard silently off), -inf every image
            raise ModelError(f"{path}: the OOD guard is malformed ({problem}); {recovery(path)}")
        return cls(mean=mean.float(), precision=precision.float(), threshold=threshold, info=info,
                   file_sha256=digest)


def _stored_problem(mean: torch.Tensor, precision: torch.Tensor, threshold: float, info: Any) -> str | None:
    """What is wrong with a guard file's stored values, or None. Floating tensors of any width are used as float32
    (a guard converted with numpy holds float64); integer or boolean ones are not features' statistics."""
    if not mean.is_floating_point() or not precision.is_floating_point():
        dtypes = (str(tensor.dtype).removeprefix("torch.") for tensor in (mean, precision))
        return "the mean and precision matrix must be floating point, not {} and {}".format(*dtypes)
    if mean.dim() != 1 or not len(mean):
        return f"the mean must be a non-empty vector, not of shape {tuple(mean.shape)}"
    if precision.shape != (len(mean), len(mean)):
        return f"the precision matrix must be {len(mean)} x {len(mean)}, not of shape {tuple(precision.shape)}"
    if not torch.isfinite(mean.float()).all() or not torch.isfinite(precision.float()).all():
        return "the mean and precision matrix must be finite"
    if mean.float().norm() > 1 + 1e-3:  # the mean of L2-normalised features lies in the unit ball
        return "the mean must be the mean of normalised features: its norm is above 1"
    if not precision.abs().max() > 0:  # a zero precision scores every image 0: it never flags
        return "the precision matrix is zero"
    if not math.isfinite(threshold) or threshold < 0:  # scores are distances: a negative threshold flags every image
        return f"the threshold must be a finite number, 0 or more, not {threshold}"
    if not isinstance(info, dict):
        return "its info must be a JSON object"
    for key, kind in (("image_tower_sha256", str), ("image_config_sha256", str), ("fit_data", dict),
                      ("calibration_data", dict)):
        if info.get(key) is not None and not isinstance(info[key], kind):
            return f"info[{key!r}] must be a {'string' if kind is str else 'JSON object'}"
    return None


def embed_checked(model: Any, pixels: torch.Tensor) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """The normalised embeddings of a (N, C, *spatial) pixel batch (``preprocessor.load``'s) and each image's OOD
    flag (``OODGuard.flag``: score, ``out_of_distribution``, threshold; {} when the model has no guard), from one
    pass of the image tower."""
    guard = getattr(model, "ood", None)
    with torch.no_grad():
        if guard is None:
            return model.encode_images(pixels), [{} for _ in range(len(pixels))]
        features = model.encode_images(pixels, features=True)
        return model.embed_image_features(features), guard.check(features)


def ood_comparison(flag: dict[str, Any]) -> str:
    """``OOD score S > T`` for a flagged image's ``flag`` answer (``OODGuard.flag``), both numbers with the fewest
    decimals (one to the four it keeps) that print the score above the threshold: with three significant figures
    10.7971 and 10.7507 both read 10.8. A score above the threshold by less than its rounding is said so."""
    score, threshold = float(flag["ood_score"]), float(flag["ood_threshold"])
    for decimals in range(1, 5):
        shown, limit = f"{score:.{decimals}f}", f"{threshold:.{decimals}f}"
        if shown != limit:
            return f"OOD score {shown} > {limit}"
    return f"OOD score {score:.4f}, above the threshold {threshold:.4f} by less than 0.0001"


def recovery(path: Path) -> str:
    """How to recover a model whose guard file ``path`` cannot be used: the model works without it."""
    return (f"delete {path} (the model then runs without a guard) or fit a new one with "
            f"`medvl ood fit --model {path.parent} --data DATA --overwrite`")


def image_tower_sha256(model: Any) -> str:
    """SHA-256 of the weights the guard's features come from: every tensor of ``model.image_encoder`` (its name,
    dtype, shape and bytes), in name order. Saved as ``info["image_tower_sha256"]`` when a guard is fitted."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.image_encoder.state_dict().items()):
        values = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{values.dtype}:{tuple(values.shape)};".encode())
        digest.update(values.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# image settings that leave the features of a given image unchanged: training-time augmentation, and how many
# slices a slicepool model encodes at once (memory only); left out of ``image_config_sha256``
TRAINING_ONLY = ("augment", "augment_flip", "augment_rot90", "augment_color", "augment_crop", "slice_batch")


def image_config_sha256(model: Any) -> str:
    """SHA-256 of ``model.config.image``, the entries that differ from the defaults (as ``index.base``'s model
    fingerprint hashes the whole config), but for ``TRAINING_ONLY``: its preprocessing (size, window, intensity
    scaling) and ``test_time_orientations`` (features averaged over that many turns) shape the features the guard
    scores; augmentation does not (an edit of it keeps the guard). Saved
    as ``info["image_config_sha256"]`` when a guard is fitted."""
    image = non_default(dataclasses.asdict(model.config.image), dataclasses.asdict(ImageConfig()))
    for name in TRAINING_ONLY:  # the augmentation and the slice batch change no feature the guard scores
        image.pop(name, None)
    return hashlib.sha256(json.dumps(image, sort_keys=True).encode()).hexdigest()


def matching_guard(guard: OODGuard | None, model: Any, directory: Path) -> OODGuard | None:
    """``guard`` (read from ``directory``) if it was fitted on ``model``'s image-tower weights and with its image
    settings, else None with a warning: a guard fitted on other weights (the model trained since, or the file copied
    from another model) scores features it never saw, and would flag all or nothing; one fitted with other image
    settings (``config.json``'s ``image.test_time_orientations`` edited since) scores features its threshold was
    not calibrated on. A guard that records no fingerprint of either (fitted by a medvl before it recorded one)
    cannot be checked on that: it is used, with one warning per file and process."""
    if guard is None:
        return None
    path = Path(directory) / OOD_FILE
    fitted, settings = guard.info.get("image_tower_sha256"), guard.info.get("image_config_sha256")
    if fitted is not None and fitted != image_tower_sha256(model):
        log.warning("%s: the OOD guard was fitted on other image-tower weights than this model's (trained since, or "
                    "the file copied from another model): ignored, the model runs without a guard; fit a new one with "
                    "`medvl ood fit --model %s --data DATA --overwrite`", path, path.parent)
        return None
    if settings is not None and settings != image_config_sha256(model):
        log.warning("%s: the OOD guard was fitted with other image settings than this model's config.json (its "
                    "image section edited since, e.g. image.test_time_orientations): its threshold was calibrated on "
                    "other features, so it is ignored, the model runs without a guard; fit a new one with "
                    "`medvl ood fit --model %s --data DATA --overwrite`", path, path.parent)
        return None
    unchecked = [what for what, digest in (("the weights it was fitted on", fitted),
                                           ("the image settings it was fitted with", settings)) if digest is None]
    if unchecked and str(path.resolve()) not in _warned_unchecked:
        _warned_unchecked.add(str(path.resolve()))
        log.warning("%s: the OOD guard records no fingerprint of %s (an earlier medvl fitted it), so it cannot be "
                    "checked against the model: if the model was trained or its config.json's image section edited "
                    "since, its scores mean nothing; `medvl ood fit --model %s --data DATA --overwrite` refits it and "
                    "records one", path, " or of ".join(unchecked), path.parent)
    return guard
