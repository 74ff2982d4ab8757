"""Image quality audit of a dataset: files that cannot be read, images with no content, images whose
content is smeared along one axis, and duplicate images (within a split, or leaking across splits).

A model cannot learn from an image whose lesion was lost in a broken conversion, and a duplicate
across train and test inflates every test figure; both happen in public collections (about one in
six of the shared ISIC dermoscopy images has every row identical). Per image, on the decoded array
(grayscale: the channel mean, of each frame for a multi-frame colour DICOM; volumes and multi-frame images: the
whole array for the content checks, no axis check; a NIfTI file one voxel thick: the 2D image a 2D model reads,
``read_image_2d``'s slice in reading orientation):

- ``unreadable``: the reader raised ``DataError`` (missing, empty, corrupt, too large); the reason is kept;
- ``blank``: fewer than ``BLANK_LEVELS`` grey levels between the 0.5th and 99.5th percentiles, on a 0-255
  scale: that of 8-bit images; for a wider integer image (16-bit PNG / TIFF, DICOM) its bit depth, the bits its
  values need (at least 8; ``full_scale``): 65,535 for a 16-bit picture, 4,095 for a 12-bit detector's, so that a
  dark or failed exposure holding a few counts of noise is blank as the same picture at 8 bits is; for a float
  image (no scale of its own) its own range: nothing to see;
- ``streaked``: the mean absolute difference between neighbouring pixels along one axis is below
  ``STREAK_RATIO`` of that along the other, or below ``STREAK_NOISE`` grey levels (compression noise) and
  below ``STREAK_NOISE_RATIO`` of that along the other: rows (or columns) repeat, e.g. a single line of
  pixels stretched over the image; and so for an image so thin (a single line of pixels, 1 x 2000, or 2 x 2000) that
  a model's resize to its square input repeats its rows: checked squashed to that square (``_squashed``), as
  ``input_flags`` checks the model's input;
- ``duplicate``: the same decoded pixels as another record (``pixel_sha256``: SHA-256 of the array as a model
  reads its channels, ``model_channels``, as the case index hashes it: a grey picture saved as RGB, or RGBA with an
  opaque alpha, of three equal channels, as many viewers and PACS exports write it, is that grey picture, so a
  blank or streaked one and its copy are found too); ``near_duplicate``:
  the same 64-bit difference hash (a 9x8 grayscale thumbnail's horizontal gradient signs) without being
  identical, confirmed on the pixels: 95 % of the pixels of the two images' 32x32 grayscale thumbnails differ
  by under ``NEAR_LEVELS`` grey levels once their brightness and contrast are evened out (``picture_distance``),
  i.e. a re-encoding, resize or re-windowed export of the same picture (blank and
  streaked images are left out of near-duplicate groups: their hashes carry too few bits). The hash alone
  is not enough: radiographs of one kind share its gradient layout, and it pairs different patients. A group
  that spans splits is a leak, and so is one file used by records of several splits (kind ``file``). Records
  sharing a file are not duplicates.

Nothing here reads text or logs pixels; ids and file names are reported, as every other command does.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..clinical.formats import NIFTI_SUFFIXES
from ..clinical.windowing import one_slice_view
from ..errors import DataError, InputError
from .images import image_suffix, pixel_sha256, read_image
from .loading import batched, map_ahead, resolve_workers
from .record import Dataset, ImageSource, LoadableImage

log = logging.getLogger(__name__)

FLAGS = ("unreadable", "blank", "streaked", "duplicate", "near_duplicate")
CONTENT_FLAGS = ("unreadable", "blank", "streaked")  # the image itself carries no usable content
BLANK_LEVELS = 2.0  # grey levels (of 255) between the 0.5th and 99.5th percentile below which an image is blank
STREAK_RATIO = 0.25  # along-axis / across-axis neighbour difference below which one axis is a streak; the
# lowest ratio among the shared MedPix, VQA-RAD, Figure1 and PneumoniaMNIST images is 0.37, while the ISIC
# images smeared along one axis reach 0.34 (JPEG noise: a perfect streak is 0)
STREAK_NOISE = 0.5  # grey levels: rows differing by less on average repeat up to compression noise ...
STREAK_NOISE_RATIO = 0.5  # ... when the other axis varies at least twice as much. The 109 smeared ISIC files
# reach 0.40 grey levels; among the shared images with a ratio under 0.6 and not smeared the least is 0.66
NEAR_LEVELS = 12.0  # grey levels (of 255): 95th percentile of the absolute difference of two 32x32 thumbnails,
# brightness and contrast evened out (``picture_distance``), under which a hash match is a copy. Copies (resized to
# 0.8 and JPEG 75, or JPEG 50) of 128 px phantom and of MedPix images reach 8, the same image in MedPix and VQA-RAD
# 3, copies of 60 MedPix images brightened by 10 % 11.3, re-windowed as 0.8 v + 30 or exported at 16 bits 0.9; a
# window that clips ((v - 20) x 1.2) reaches 14.2 (56 of 60 found) and a gamma of 0.8 13.4 (54 of 60). Pairs within one
# bit of hash and of different patients reach down to 14.6 on a 2,400-case 128 px phantom (18 before brightness and
# contrast were evened out), 20 on a 1,000-case 64 px one and 17.6 on the shared PneumoniaMNIST (within 2 bits). A
# copy of an image under about 100 px resized by another 10-20 % can differ by more (up to 17 on the 64 px phantom)
# and is then not found
MAX_GAIN = 2.0  # contrast ratio of two thumbnails that the pixel check evens out (a re-windowed copy: 1.1-1.5); a
# flat thumbnail is never scaled up to match a detailed one
MODEL_SIDE = 128  # px: the largest square a thin image is checked at as a model reads it (``_squashed``): the largest
# and default ``ImageConfig.image_size`` of the registered models. A 2 x 2000 image is streaked there as at 64 px
# (``input_flags``), while the shared images, whose shorter sides reach 96 px, are not
THUMBNAIL = 32  # side of the thumbnail the near-duplicate pixel check compares
BATCH = 32  # images per worker task


def image_checks(array: np.ndarray, spatial_dims: int = 2) -> dict[str, Any]:
    """The content checks of one decoded image: ``flags`` (subset of ``blank``, ``streaked``),
    ``detail`` (a short reason per flag), ``sha256`` of the pixels as a model reads their channels (``pixel_sha256``;
    ``spatial_dims`` 3: a volume, hashed as it is), ``dhash`` (16 hex digits) and ``thumbnail`` (``thumbnail``'s
    32x32 grey levels, for the near-duplicate pixel check)."""
    gray = _gray(array)
    eight_bit = array.dtype == np.uint8
    detail = content_checks(gray, eight_bit=eight_bit, scale=full_scale(array))
    return {"flags": list(detail), "detail": detail, "sha256": pixel_sha256(array, spatial_dims),
            "dhash": difference_hash(gray), "thumbnail": thumbnail(gray, eight_bit=eight_bit)}


def input_flags(pixels: np.ndarray) -> dict[str, str]:
    """The ``blank`` and ``streaked`` checks of one image as a model sees it: a preprocessor's output, (C, H, W)
    or (C, D, H, W) in [0, 1] (channels averaged; levels counted on the 0-255 scale, as for an 8-bit file).
    Flag -> reason; {} when the image has content. On the shared MedPix, PneumoniaMNIST and Figure 1 images
    at 64-224 px it flags none; on ISIC it flags the streaked files ``medvl audit`` flags (at 64 px 4 of
    400 more, 1 fewer)."""
    gray = np.asarray(pixels, dtype=np.float32).mean(0)
    return content_checks(np.clip(gray * 255.0, 0.0, 255.0), eight_bit=True)


def warn_without_content(flags: Sequence[dict[str, str]], what: str) -> None:
    """One warning when any input is blank or streaked as the model sees it (``input_flags`` of each; counts
    only: never names or content)."""
    flagged = sum(bool(flag) for flag in flags)
    if flagged:
        log.warning("%d of %d %s are blank or streaked as the model sees them (input_flags): an answer on them "
                    "means nothing", flagged, len(flags), what)


def content_summary(flags: Sequence[dict[str, str]], what: str, warn: bool = True) -> dict[str, Any] | None:
    """The ``input_content`` block of an evaluation: how many of its images (``input_flags`` of each) hold no
    content as the model sees them, per flag; None (and no warning) when none does. ``warn_without_content``
    says it once (``warn=False``: the caller already did)."""
    flagged = sum(bool(flag) for flag in flags)
    if not flagged:
        return None
    if warn:
        warn_without_content(flags, what)
    counts = Counter(name for flag in flags for name in flag)
    return {"records": flagged, "of": len(flags), "flags": {name: counts[name] for name in ("blank", "streaked")}}


def full_scale(array: np.ndarray) -> float | None:
    """The span of values that the blank check reads as 0-255 (``BLANK_LEVELS``): 255 for 8-bit images; for a wider
    integer image ``2**bits - 1`` for the bits its values need (a sign bit included; at least 8), so a 16-bit picture
    is judged on 65,535 and a 12-bit detector's in a 16-bit file on 4,095, never on its own min-max, which makes a
    frame of noise full-contrast; None for a float or empty image (no scale but its own range)."""
    if array.dtype == np.uint8:
        return 255.0
    if array.dtype.kind not in "iu" or not array.size:
        return None
    low, high = int(array.min()), int(array.max())
    bits = max(high, -low - 1).bit_length() + (low < 0)
    return float(2 ** max(8, bits) - 1)


def content_checks(gray: np.ndarray, eight_bit: bool, scale: float | None = None) -> dict[str, str]:
    """``blank`` and ``streaked`` (see the module docstring) of a grayscale image or volume: flag -> reason.
    ``scale``: the values read as 0-255 for the blank check (``full_scale``); None: 0-255 for ``eight_bit``, else
    the image's own range."""
    units = _grey_levels(gray, eight_bit=eight_bit)
    detail = {}
    absolute = units if scale is None else gray.astype(np.float64) * (255.0 / scale)
    low, high = np.percentile(absolute, [0.5, 99.5]) if absolute.size else (0.0, 0.0)
    if high - low < BLANK_LEVELS:
        on = "" if scale in (None, 255.0) else f" (of 255, on the {int(scale).bit_length()}-bit scale)"
        detail["blank"] = f"{high - low:.1f} grey levels{on} between the 0.5th and 99.5th percentiles"
    elif units.ndim == 2:
        streak = _repeating_axis(units) if min(units.shape) > 1 else None
        squashed = _squashed(units) if streak is None else None
        if streak is not None:
            which, weak, strong = streak
            detail["streaked"] = (f"neighbouring {which} differ by {weak:.2f} grey levels on average against "
                                  f"{strong:.2f} across them: the {which} repeat")
        elif squashed is not None and (streak := _repeating_axis(squashed)) is not None:
            which = streak[0]
            count = units.shape[0] if which == "rows" else units.shape[1]
            across = units.shape[1] if which == "rows" else units.shape[0]
            detail["streaked"] = (f"{count} {which[:-1] if count == 1 else which} of {across} pixels: squashed to a "
                                  f"square as a model reads it ({len(squashed)} px), each repeats about "
                                  f"{len(squashed) / count:.0f} times: the {which} repeat")
    return detail


def _repeating_axis(units: np.ndarray) -> tuple[str, float, float] | None:
    """``rows`` or ``columns`` with the mean absolute difference between neighbours along and across them, when
    they repeat (``STREAK_RATIO``, ``STREAK_NOISE``) in a 2D image of at least 2 x 2 pixels; else None."""
    along_columns = float(np.abs(np.diff(units, axis=0)).mean())  # row to row
    along_rows = float(np.abs(np.diff(units, axis=1)).mean())  # column to column
    weak, strong = sorted((along_columns, along_rows))
    if weak < STREAK_RATIO * strong or (weak < STREAK_NOISE and weak < STREAK_NOISE_RATIO * strong):
        return ("rows" if along_columns < along_rows else "columns"), weak, strong
    return None


def _squashed(units: np.ndarray) -> np.ndarray | None:
    """A 2D image so thin that a model's resize to its square input repeats its rows (or columns) more than the
    other axis's: squashed to a square as that resize does (area interpolation), at its longer side and at most
    ``MODEL_SIDE``, where the rows of an image one pixel thin are all one; None for an image whose shorter side is
    not below that side (the resize repeats both axes alike, or neither)."""
    side = min(max(units.shape), MODEL_SIDE)
    if min(units.shape) >= side:
        return None
    return _area_resize(_area_resize(units, side, axis=0), side, axis=1)


def _area_resize(values: np.ndarray, size: int, axis: int) -> np.ndarray:
    """``values`` resized to ``size`` along ``axis`` as torch's area interpolation does (``ImagePreprocessor.resize``:
    adaptive average pooling; output ``i`` is the mean of inputs ``floor(i n / size)`` to ``ceil((i + 1) n / size)``),
    so that the check sees the rows a model's input holds."""
    length = values.shape[axis]
    starts = np.arange(size) * length // size
    ends = -(-(np.arange(1, size + 1) * length) // size)
    totals = np.concatenate([np.zeros_like(np.take(values, [0], axis=axis)), np.cumsum(values, axis=axis)], axis=axis)
    counts = (ends - starts).reshape([-1 if i == axis else 1 for i in range(values.ndim)])
    return (np.take(totals, ends, axis=axis) - np.take(totals, starts, axis=axis)) / counts


def difference_hash(gray: np.ndarray) -> str:
    """64-bit difference hash of a grayscale image (Krawetz's dHash) as 16 hex digits: the signs of
    the horizontal gradient of a 9x8 area-averaged thumbnail; a volume (or the frames of a multi-frame
    image) is hashed by its mean slice."""
    from PIL import Image

    plane = gray.reshape(-1, *gray.shape[-2:]).mean(axis=0) if gray.ndim > 2 else gray
    plane = plane.astype(np.float32)
    thumbnail = np.asarray(Image.fromarray(plane, mode="F").resize((9, 8), Image.Resampling.BOX))
    bits = (thumbnail[:, 1:] > thumbnail[:, :-1]).flatten()
    return f"{int(''.join('1' if b else '0' for b in bits), 2):016x}"


def thumbnail(gray: np.ndarray, eight_bit: bool) -> np.ndarray:
    """A grayscale image (a volume: its mean slice) as a 32x32 area-averaged thumbnail of uint8 grey levels (on
    the 0-255 scale of 8-bit images, else of the image's own range)."""
    from PIL import Image

    plane = gray.reshape(-1, *gray.shape[-2:]).mean(axis=0) if gray.ndim > 2 else gray
    levels = _grey_levels(plane, eight_bit=eight_bit).astype(np.float32)
    small = Image.fromarray(levels, mode="F").resize((THUMBNAIL, THUMBNAIL), Image.Resampling.BOX)
    return np.clip(np.rint(np.asarray(small)), 0, 255).astype(np.uint8)


def same_picture(first: np.ndarray, second: np.ndarray) -> bool:
    """Whether 95 % of the pixels of two ``thumbnail``s differ by under ``NEAR_LEVELS`` grey levels, brightness and
    contrast evened out (``picture_distance``)."""
    return bool(picture_distance(first, second[None])[0] < NEAR_LEVELS)


def picture_distance(thumbnail: np.ndarray, others: np.ndarray) -> np.ndarray:
    """The 95th percentile of the absolute difference, in grey levels, between a ``thumbnail`` and each of
    ``others`` (N thumbnails) with brightness and contrast evened out: each is centred on its mean, and the two
    are scaled to the geometric mean of their standard deviations (their ratio capped at ``MAX_GAIN``). A copy
    brightened, given another contrast or window, or exported at another bit depth is then the same picture; raw
    grey levels part it from its original (a 10 % brighter copy differs by up to 22 levels)."""
    first = thumbnail.reshape(-1).astype(np.float64)
    rest = others.reshape(len(others), -1).astype(np.float64)
    first, rest = first - first.mean(), rest - rest.mean(axis=1, keepdims=True)
    spread, spreads = first.std(), rest.std(axis=1)
    ratio = np.divide(spreads, spread, out=np.full(len(rest), MAX_GAIN), where=spread > 0)
    gain = np.sqrt(np.clip(ratio, 1 / MAX_GAIN, MAX_GAIN))[:, None]
    return np.percentile(np.abs(first * gain - rest / gain), 95, axis=1)


AGAINST = "against:"  # prefix of the ids and splits of ``against`` records in ``audit_dataset``'s overlap groups


def audit_dataset(dataset: Dataset, label: str | None = None, workers: int | None = None,
                  show_progress: bool = True, against: Dataset | None = None,
                  near_distance: int = 0) -> dict[str, Any]:
    """Check every image of every record (see the module doc; a record with several images, such as a VQA
    question on two films, gets the flags of all of them). Each distinct file is read once; records that share
    a file (the questions of one VQA image) share its flags and are not duplicates of each other. Returns ``n``
    (records), ``files`` (distinct images), ``flagged`` (records with any flag),
    ``counts`` (records per flag), ``by_class`` (with ``label``: per class, its records and its records
    with a content flag), ``records`` (one dict per flagged record: ``id``, ``split``, ``flags``,
    ``detail``, the label value), ``duplicate_groups`` (``kind`` exact, near, or ``file`` for one file
    used in several splits; ``ids``, ``splits``, ``leak`` when the group spans splits), ``leaks`` (the
    groups spanning splits), ``seconds``. Images are read by ``workers`` processes
    (``medvl.data.loading``; None: auto).

    ``against`` (another dataset, e.g. a test set kept apart, or a public set a model was pretrained on) is
    read too, and its images that are exact or near duplicates of this dataset's, or the same files, are
    reported under ``against``: ``source``, ``n`` (its records with an image), ``overlap_groups`` (as
    ``duplicate_groups``; its ids and splits prefixed ``against:``) and ``records`` (how many of each side's
    records are in them). Everything else stays about this dataset's records; one of them that matches an
    image of ``against`` is flagged ``duplicate`` or ``near_duplicate`` with the ``against:`` id named.

    ``near_distance`` > 0 also links difference hashes that many bits apart (of 64) as near duplicates: a
    re-encoded, resized or re-windowed copy often moves a bit or two. Of the 18 images MedPix 2.0 (train and
    dev) and VQA-RAD's training questions share (by MedPix id), 0 pairs 6, 1 pairs 14 and 3 pairs 16, while
    pairing 0, 1 and 1 other images of the two sets (an adjacent slice of one study; the hash alone paired 0, 2 and
    7: look-alikes, which the pixel check leaves out)."""
    from ..progress import progress_bar

    if label is not None and label not in dataset.label_names:
        raise InputError(f"{dataset.source}: unknown label column {label!r}; "
                         f"available: {', '.join(dataset.label_names) or 'none'}")
    started = time.perf_counter()
    records = [r for r in dataset.records if r.images]
    if not records:
        raise InputError(f"{dataset.source}: no record has an image to audit")
    others = []
    if against is not None:
        others = [r for r in against.records if r.images]
        if not others:
            raise InputError(f"{against.source}: no record has an image to compare against")
    files: dict[Any, list] = {}  # one entry per distinct image, with the records that use it
    sources: list[ImageSource] = []  # the image of each entry
    for record in records + others:
        for image in record.images:  # every film of a multi-image record (a VQA question on two films)
            users = files.get(_file_key(image))
            if users is None:
                users = files[_file_key(image)] = []
                sources.append(image)
            if not any(user is record for user in users):
                users.append(record)
    checks: list[dict[str, Any]] = []
    with progress_bar("Auditing images", total=len(sources), enabled=show_progress) as advance:
        for checked in map_ahead(_check_batch, batched(sources, BATCH), resolve_workers(workers, len(sources))):
            checks.extend(checked)
            advance(len(checked))
    # which records are this dataset's is kept apart from their ids and splits, which may be anything
    # (an id or split that starts with 'against:' is still this dataset's)
    theirs = {id(r) for r in others}
    for check, users in zip(checks, files.values(), strict=True):
        mine = [r for r in users if id(r) not in theirs]
        check.update(ids=[r.id for r in mine], splits=sorted({str(r.split) for r in mine}),
                     against=[r for r in users if id(r) in theirs])
    # this dataset's own groups, from its own records' view of each file (flags and details are shared with the
    # file's check); then, with ``against``, the groups of all files that hold files of both datasets
    groups = _file_groups([c for c in checks if c["ids"]], near_distance)
    cross = []
    if against is not None:
        both = [{**c, "ids": c["ids"] + [AGAINST + r.id for r in c["against"]],
                 "splits": sorted(set(c["splits"]) | {AGAINST + str(r.split) for r in c["against"]}),
                 "origin": [False] * len(c["ids"]) + [True] * len(c["against"])} for c in checks]
        cross = [g for g in _file_groups(both, near_distance) if len(set(g["origin"])) == 2]
    check_of = dict(zip(files, checks, strict=True))
    results = []
    for record in records:
        result = _record_result(record, [check_of[_file_key(image)] for image in record.images])
        if label is not None:
            result["label"] = record.labels.get(label)
        results.append(result)
    summary = [r for r in results if r["flags"]]
    counts = Counter(flag for r in results for flag in r["flags"])
    by_class: dict[str, dict[str, int]] = {}
    if label is not None:
        for r in results:
            value = r.get("label")
            entry = by_class.setdefault("(no value)" if value in (None, "") else str(value),
                                        {"records": 0, "content_flagged": 0})
            entry["records"] += 1
            entry["content_flagged"] += any(flag in CONTENT_FLAGS for flag in r["flags"])
    overlap = None
    if against is not None:
        in_cross = {(theirs, i) for g in cross for theirs, i in zip(g.pop("origin"), g["ids"], strict=True)}
        overlap = {"source": str(against.source), "n": len(others), "overlap_groups": cross,
                   "records": {"data": sum(not theirs for theirs, _ in in_cross),
                               "against": sum(theirs for theirs, _ in in_cross)}}
    own_files = sum(bool(c["ids"]) for c in checks)
    return {"n": len(results), "files": own_files, "flagged": len(summary),
            "counts": {flag: counts.get(flag, 0) for flag in FLAGS}, "by_class": dict(sorted(by_class.items())),
            "label": label, "records": summary, "duplicate_groups": groups,
            "leaks": [g for g in groups if g["leak"]],
            "thresholds": {"blank_levels": BLANK_LEVELS, "streak_ratio": STREAK_RATIO, "streak_noise": STREAK_NOISE,
                           "streak_noise_ratio": STREAK_NOISE_RATIO, "near_levels": NEAR_LEVELS, "max_gain": MAX_GAIN,
                           "near_distance": near_distance},
            "source": str(dataset.source), **({"against": overlap} if overlap is not None else {}),
            "seconds": round(time.perf_counter() - started, 2)}


def _record_result(record: Any, checks: list[dict[str, Any]]) -> dict[str, Any]:
    """A record's audit entry: the flags of all its images; a detail from an image other than the first is
    prefixed with that image's place (``image 2: ...``)."""
    flags: list[str] = []
    detail: dict[str, str] = {}
    for place, check in enumerate(checks, start=1):
        for flag in check["flags"]:
            reason = check["detail"][flag] if place == 1 else f"image {place}: {check['detail'][flag]}"
            if flag not in flags:
                flags.append(flag)
                detail[flag] = reason
            elif reason not in detail[flag]:
                detail[flag] += f"; {reason}"
    return {"id": record.id, "split": record.split, "flags": flags, "detail": detail}


def flagged_ids(audit: dict[str, Any], flags: Sequence[str] = CONTENT_FLAGS) -> set[str]:
    """Ids of the audited records with any of ``flags`` (default: the content flags)."""
    unknown = sorted(set(flags) - set(FLAGS))
    if unknown:
        raise InputError(f"unknown audit flags {unknown}; flags: {', '.join(FLAGS)}")
    return {r["id"] for r in audit["records"] if set(r["flags"]) & set(flags)}


def _check_batch(_context: Any, images: Sequence[ImageSource]) -> list[dict[str, Any]]:
    out = []
    for image in images:
        try:
            out.append(image_checks(*_as_read(image)))
        except DataError as err:
            out.append({"flags": ["unreadable"], "detail": {"unreadable": str(err)}, "sha256": None, "dhash": None,
                        "thumbnail": None})
    return out


def _as_read(image: ImageSource) -> tuple[np.ndarray, int]:
    """The array the audit checks of one image, and its spatial dims (``image_checks``): a NIfTI file one voxel thick
    along an axis as the 2D image a 2D model reads (``one_slice_view``, as ``read_image_2d`` turns it: its plane in
    reading orientation), so it gets the row / column check and the hashes of that picture; a volume of several
    slices (NIfTI, a DICOM series) as it is (3); any other image as read."""
    if isinstance(image, np.ndarray):
        return image, 2
    array = read_image(image)
    if isinstance(image, LoadableImage):
        return array, 3
    if image_suffix(image) not in NIFTI_SUFFIXES:
        return array, 2
    plane = one_slice_view(array)
    return (array, 3) if plane is None else (np.ascontiguousarray(plane), 2)


def _file_groups(checks: list[dict[str, Any]], near_distance: int) -> list[dict[str, Any]]:
    """``_duplicate_groups``, and a ``file`` group for each file used by records of several splits."""
    return _duplicate_groups(checks, near_distance) + [
        {"kind": "file", "ids": c["ids"], "splits": c["splits"], "leak": True, **_origin([c])}
        for c in checks if len(c["splits"]) > 1]


def _origin(checks: list[dict[str, Any]]) -> dict[str, list[bool]]:
    """``origin`` (per id: is it an ``against`` record's) of a group of ``checks`` that carry it, else nothing."""
    return {"origin": [o for c in checks for o in c["origin"]]} if "origin" in checks[0] else {}


def _duplicate_groups(checks: list[dict[str, Any]], near_distance: int = 0) -> list[dict[str, Any]]:
    """Groups of files with identical pixels, then groups with one difference hash but different pixels whose
    thumbnails are the same picture (``same_picture``; files of one hash linked through such pairs form a group)
    (``near_distance`` > 0: pairs of files whose hashes are at most that many bits apart and the same picture,
    each pair its own group: look-alikes would chain into one group otherwise); each file carries ``ids`` and
    ``splits`` of the records using it."""
    groups = []
    for kind, key in (("exact", "sha256"), ("near", "dhash")):
        members: dict[Any, list[dict[str, Any]]] = defaultdict(list)  # a key -> its files
        # a blank or streaked image's hash has at most 8 informative bits: it would match its kind
        eligible = [c for c in checks
                    if c[key] is not None and (kind == "exact" or not set(c["flags"]) & set(CONTENT_FLAGS))]
        if kind == "near" and near_distance > 0:
            for pair in _close_pairs([int(c[key], 16) for c in eligible], near_distance):
                if same_picture(eligible[pair[0]]["thumbnail"], eligible[pair[1]]["thumbnail"]):
                    members[pair] = [eligible[i] for i in pair]
        elif kind == "near":
            by_hash: dict[str, list[dict[str, Any]]] = defaultdict(list)
            for c in eligible:
                by_hash[c[key]].append(c)
            for value, same_hash in by_hash.items():
                for number, linked in enumerate(_same_pictures(same_hash)):
                    members[(value, number)] = linked
        else:
            for c in eligible:
                members[c[key]].append(c)
        for same in members.values():
            if len(same) < 2 or (kind == "near" and len({c["sha256"] for c in same}) < 2):
                continue  # one picture (alone, or already an exact group)
            flag = "duplicate" if kind == "exact" else "near_duplicate"
            for c in same:
                if flag not in c["flags"]:
                    c["flags"].append(flag)
                others = [i for o in same if o is not c for i in o["ids"]]
                listed = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
                how = ("same pixels" if kind == "exact" else "same difference hash and thumbnail" if not near_distance
                       else f"difference hash within {near_distance} bits and same thumbnail")
                c["detail"][flag] = f"{how} as {listed}"
            splits = sorted({split for c in same for split in c["splits"]})
            groups.append({"kind": kind, "ids": [i for c in same for i in c["ids"]], "splits": splits,
                           "leak": len(splits) > 1, **_origin(same)})
    return groups


def _same_pictures(checks: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """The files of one difference hash in groups linked by ``same_picture`` pairs (groups of one left out)."""
    parent = list(range(len(checks)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    thumbnails = np.stack([c["thumbnail"] for c in checks]).reshape(len(checks), -1)
    for i in range(len(checks) - 1):  # one row of pairs at a time: a hash bucket can hold thousands of files
        rest = np.array([j for j in range(i + 1, len(checks)) if root(j) != root(i)], dtype=int)
        if not len(rest):
            continue
        close = picture_distance(thumbnails[i], thumbnails[rest]) < NEAR_LEVELS  # same_picture
        for j in rest[close]:
            parent[root(int(j))] = root(i)
    linked: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for i, check in enumerate(checks):
        linked[root(i)].append(check)
    return [group for group in linked.values() if len(group) > 1]


_BITS = np.array([bin(value).count("1") for value in range(256)], dtype=np.uint8)  # set bits of each byte


def _close_pairs(hashes: list[int], distance: int) -> list[tuple[int, int]]:
    """Index pairs (i < j) of 64-bit hashes at most ``distance`` bits apart."""
    values = np.array(hashes, dtype=np.uint64)
    pairs = []
    for i in range(len(hashes) - 1):
        apart = _BITS[(values[i + 1:] ^ values[i]).view(np.uint8)].reshape(-1, 8).sum(1)
        pairs += [(i, i + 1 + int(j)) for j in np.nonzero(apart <= distance)[0]]
    return pairs


def _file_key(image: ImageSource) -> Any:
    """Records naming the same file share one check; arrays and loadable objects are their own."""
    return ("path", str(Path(image).resolve())) if isinstance(image, str | Path) else ("object", id(image))


def _gray(array: np.ndarray) -> np.ndarray:
    """The channel mean of a colour image, or of each frame of a multi-frame colour image (F, H, W, 3|4), as
    float32. A wider float array whose values float32 cannot hold (above 1e30, or all below 1e-30 in size:
    they would become inf or 0) is first stretched to 0-255 in its own precision; every check is unchanged by
    that (they stretch non-8-bit images from their own min-max)."""
    if _beyond_float32(array):
        top = float(np.abs(array[np.isfinite(array)]).max())
        scaled = array.astype(np.float64) / top  # within -1..1: no overflow below
        low, high = float(np.nanmin(scaled)), float(np.nanmax(scaled))
        array = (scaled - low) * (255.0 / (high - low)) if high > low else np.zeros_like(scaled)
    if array.ndim in (3, 4) and array.shape[-1] in (3, 4):
        return array[..., :3].astype(np.float32).mean(-1)
    return array.astype(np.float32, copy=False)


def _beyond_float32(array: np.ndarray) -> bool:
    """A float array wider than float32 whose largest finite value in size is above 1e30 or, not 0, below 1e-30."""
    if array.dtype.kind != "f" or array.dtype.itemsize <= 4 or not array.size:
        return False
    finite = np.abs(array[np.isfinite(array)])
    top = float(finite.max()) if finite.size else 0.0
    return top > 1e30 or 0.0 < top < 1e-30


def _grey_levels(gray: np.ndarray, eight_bit: bool) -> np.ndarray:
    """Values on a 0-255 scale: 8-bit images as they are, others stretched from their own min-max."""
    values = gray.astype(np.float64)
    if eight_bit or values.size == 0:
        return values
    low, span = float(values.min()), float(np.ptp(values))
    return (values - low) * (255.0 / span) if span > 0 else np.zeros_like(values)
