"""Write a phantom data set to disk: images, masks, manifest and description.

Two kinds: ``cxr2d`` (chest radiographs, PNG; the default) and ``ct3d`` (thoraco-abdominal CT
volumes, NIfTI; see the end of this docstring). Layout of ``out_dir`` for ``cxr2d``::

    images/phantom_00000.png                    8-bit grayscale radiograph
    masks/phantom_00000_<finding>.png           0/255 mask, one per finding present
    manifest.csv                                one row per image (columns: MANIFEST_COLUMNS)
    dataset.json                                name, manifest, label columns, captions, generator

Manifest columns: ``image`` (path relative to ``out_dir``), ``text`` (the report), ``split``,
``finding`` (primary finding, one of FINDINGS), binary 0/1 columns ``no_finding, cardiomegaly,
effusion_left, effusion_right, nodule, consolidation, pneumothorax``, then ``age, sex, view,
nodule_zone, consolidation_zone, pneumothorax_side`` (empty when not applicable) and ``boxes``
(JSON ``{finding: [x0, y0, x1, y1]}``, end-exclusive pixels; empty for ``no_finding``).
Sides and zones are the patient's (the patient's left is on the image right).

``ct3d`` writes ``images/ct_00000.nii.gz`` (int16 HU, RAS, voxel spacing in the header; see
``ct3d``), ``masks/ct_00000_<finding>.nii.gz`` (uint8 0/1) and a manifest with the columns
``CT_MANIFEST_COLUMNS``: ``id``, ``image``, ``text``, ``split``, ``finding``, binary 0/1 columns
``no_finding, liver_lesion, kidney_cyst, lung_nodule, pleural_effusion``, then ``age, sex, phase,
liver_lesion_location, kidney_cyst_side, lung_nodule_location, effusion_side`` (empty when not
applicable) and ``boxes`` (JSON ``{finding: [z0, y0, x0, z1, y1, x1]}``, end-exclusive voxels).

``shortcut=P`` (cxr2d only) makes a shortcut variant: each abnormal case carries the marker
(``cxr2d.burn_marker``: a white square in the top-right image corner) with probability ``P`` and
each normal case (``no_finding``) with probability ``1 - P``, in every split, so the marker leaks
the normal / abnormal label (``P`` = 0.5: no leak; 0: the reverse leak). The draw has its own
stream seeded by ``(seed, index)``; images, masks, reports and splits are otherwise those of the
clean data set. The manifest gains a last column ``shortcut_marker`` (0/1) and ``dataset.json``'s
``generator.shortcut`` records ``probability``, ``corner``, ``box`` ([x0, y0, x1, y1],
end-exclusive pixels) and ``value``, so a check can mask the marker (``shortcut_spec``).
Without ``shortcut`` nothing changes.

``positioning=S`` (cxr2d only, S in [0, 1]; default 0 = off) varies the patient's placement in the
field of view (shift, smaller scale, slight rotation; ``cxr2d``, "Positioning"), with masks and boxes
drawn through the same mapping as the pixels; ``dataset.json``'s ``generator.positioning`` records S.
Without it (or with 0) every file is byte-identical to a phantom generated before the option existed.

``vqa=True`` (cxr2d only) adds ``vqa/``: balanced questions with exact answers, one JSON file
per split, and the films they name (see ``vqa``).

The data set is written to a hidden sibling folder and renamed into place at the end, so
``out_dir`` either holds a complete data set or does not exist.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import shutil
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ...checks import check_number
from ...errors import DataError, InputError
from ...io import read_json, replace_dir, staging_folder, write_errors_named
from ..record import ALL_SPLITS
from . import ct3d
from .ct3d_reports import CT3D_CAPTIONS
from .cxr2d import MARKER_CORNER, MARKER_VALUE, PhantomCase, burn_marker, check_case_args, marker_box, render_case
from .reports import PHANTOM_CAPTIONS
from .vqa import DEFAULT_PER_CASE, PatientTruth, check_vqa_args, write_phantom_vqa

log = logging.getLogger(__name__)

DATASET_NAME = "phantom-cxr"
DEFAULT_SPLITS = {"train": 0.7, "val": 0.1, "test": 0.2}
LABEL_COLUMNS = ("no_finding", "cardiomegaly", "effusion_left", "effusion_right", "nodule",
                 "consolidation", "pneumothorax")
MANIFEST_COLUMNS = ("image", "text", "split", "finding", *LABEL_COLUMNS, "age", "sex", "view",
                    "nodule_zone", "consolidation_zone", "pneumothorax_side", "boxes")
_SPLIT_STREAM = 7  # the split shuffle is seeded by (seed, _SPLIT_STREAM)
_SHORTCUT_STREAM = 8  # the marker draw of case i is seeded by (seed, i, _SHORTCUT_STREAM)
SHORTCUT_COLUMN = "shortcut_marker"  # manifest column of a shortcut variant: 1 = marker burned in
KINDS = ("cxr2d", "ct3d")
DEFAULT_SIZES = {"cxr2d": 128, "ct3d": 64}
MAX_CASES = 1_000_000  # cases one phantom may hold: a count past C's long (10**20) was an OverflowError traceback
CT_DATASET_NAME = "phantom-ct"
CT_LABEL_COLUMNS = ct3d.FINDINGS
CT_MANIFEST_COLUMNS = ("id", "image", "text", "split", "finding", *CT_LABEL_COLUMNS, "age", "sex", "phase",
                       "liver_lesion_location", "kidney_cyst_side", "lung_nodule_location", "effusion_side", "boxes")


def case_labels(case: PhantomCase) -> dict[str, int]:
    """The binary label columns of a case (effusion split by the patient's side)."""
    by_name = {f["name"]: f for f in case.findings}
    effusion_side = by_name.get("pleural_effusion", {}).get("side")
    labels = {name: int(name in by_name) for name in LABEL_COLUMNS}
    labels["effusion_left"] = int(effusion_side == "left")
    labels["effusion_right"] = int(effusion_side == "right")
    return labels


def manifest_row(case: PhantomCase, image_path: str, split: str) -> dict[str, Any]:
    """One manifest row for a case whose image is stored at ``image_path``."""
    by_name = {f["name"]: f for f in case.findings}
    boxes = {f["name"]: f["box"] for f in case.findings if f["box"] is not None}
    return {
        "image": image_path,
        "text": case.report,
        "split": split,
        "finding": case.finding,
        **case_labels(case),
        "age": case.meta["age"],
        "sex": case.meta["sex"],
        "view": case.meta["view"],
        "nodule_zone": by_name.get("nodule", {}).get("zone") or "",
        "consolidation_zone": by_name.get("consolidation", {}).get("zone") or "",
        "pneumothorax_side": by_name.get("pneumothorax", {}).get("side") or "",
        "boxes": json.dumps(boxes, separators=(",", ":")) if boxes else "",
    }


def assign_splits(n: int, seed: int, splits: dict[str, float]) -> list[str]:
    """Split name of each of ``n`` cases: shuffle by seed, then cut in the order given (so a case's split depends on
    ``n``, unlike its pixels: kept so, as every documented phantom figure rests on these splits).

    Counts are the fractions times ``n`` rounded so that they add up to ``n`` (largest
    remainders first).
    """
    fractions = np.array(list(splits.values()), dtype=float)
    exact = fractions * n
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts), kind="stable")[: n - counts.sum()]:
        counts[i] += 1
    names = np.repeat(np.array(list(splits), dtype=object), counts)
    order = np.random.default_rng([seed, _SPLIT_STREAM]).permutation(n)
    assigned = np.empty(n, dtype=object)
    assigned[order] = names
    return [str(name) for name in assigned]


def _check_splits(splits: dict[str, float] | None) -> dict[str, float]:
    """The split fractions, refused unless each is a finite number >= 0, they sum to 1, and each name is one the
    manifest loader reads back as given: not empty, no surrounding spaces, ``all`` only alone."""
    splits = dict(DEFAULT_SPLITS if splits is None else splits)
    if not splits:
        raise InputError("splits must name at least one split, e.g. {'train': 0.8, 'test': 0.2}")
    for name in splits:
        if not isinstance(name, str) or not name.strip() or name != name.strip():
            raise InputError(f"split name {name!r} must be a non-empty string without surrounding spaces "
                             "(the manifest loader strips them)")
    if ALL_SPLITS in splits and len(splits) > 1:
        raise InputError(f"split name {ALL_SPLITS!r} is reserved for every record (--split all); beside other "
                         "splits its cases could not be selected alone: rename it")
    if any(not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 for v in splits.values()):
        raise InputError(f"split fractions must be finite numbers >= 0, got {splits}")
    total = sum(splits.values())
    if abs(total - 1.0) > 1e-6:
        raise InputError(f"split fractions must sum to 1, got {total:.6g} from {splits}")
    return {str(name): float(value) for name, value in splits.items()}


def ct_manifest_row(case: ct3d.CTCase, case_id: str, image_path: str, split: str) -> dict[str, Any]:
    """One manifest row of a CT phantom case whose volume is stored at ``image_path``."""
    by_name = {f["name"]: f for f in case.findings}
    boxes = {f["name"]: f["box"] for f in case.findings if f["box"] is not None}
    return {
        "id": case_id, "image": image_path, "text": case.report, "split": split, "finding": case.finding,
        **{name: int(name in by_name) for name in CT_LABEL_COLUMNS},
        "age": case.meta["age"], "sex": case.meta["sex"], "phase": case.meta["phase"],
        "liver_lesion_location": by_name.get("liver_lesion", {}).get("location") or "",
        "kidney_cyst_side": by_name.get("kidney_cyst", {}).get("side") or "",
        "lung_nodule_location": by_name.get("lung_nodule", {}).get("location") or "",
        "effusion_side": by_name.get("pleural_effusion", {}).get("side") or "",
        "boxes": json.dumps(boxes, separators=(",", ":")) if boxes else "",
    }


def has_shortcut_marker(seed: int, index: int, abnormal: bool, probability: float) -> bool:
    """Whether case ``index`` of a shortcut variant carries the marker (see the module docstring)."""
    draw = float(np.random.default_rng([int(seed), int(index), _SHORTCUT_STREAM]).uniform())
    return (draw < probability) == abnormal


def phantom_description(path: str | Path) -> dict[str, Any] | None:
    """The ``dataset.json`` of a generated phantom, given its folder or its manifest file (the sidecar beside a
    manifest, when it names that manifest or none: the one ``load_dataset`` reads for it); None for data without
    one."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    sidecar = folder / "dataset.json"
    if not sidecar.is_file():
        return None
    try:
        description = read_json(sidecar)
    except (OSError, ValueError):
        raise DataError(sidecar, "not a valid UTF-8 JSON description") from None
    if not isinstance(description, dict):
        return None
    named = description.get("manifest")
    if not path.is_dir() and isinstance(named, str) and (folder / named).resolve() != path.resolve():
        return None  # the sidecar describes another manifest of the folder
    return description


def shortcut_spec(folder: str | Path) -> dict[str, Any] | None:
    """The shortcut marker of a generated phantom (``probability``, ``corner``, ``box``, ``value``) from the
    ``dataset.json`` of its folder or manifest file (``phantom_description``); None for a data set without one."""
    description = phantom_description(folder)
    generator = description.get("generator") if description is not None else None
    spec = generator.get("shortcut") if isinstance(generator, dict) else None
    return spec if isinstance(spec, dict) else None


def _check_positioning(positioning: float, kind: str, vqa: bool) -> None:
    check_number("positioning", positioning, minimum=0, maximum=1)
    if positioning and kind != "cxr2d":
        raise InputError(f"patient positioning is for chest radiographs (kind cxr2d), not {kind}")
    if positioning and vqa:
        raise InputError("patient positioning is not applied to the VQA films; generate the VQA set without it")


def _check_shortcut(shortcut: float | None, kind: str, vqa: bool) -> None:
    if shortcut is None:
        return
    check_number("shortcut", shortcut, minimum=0, maximum=1)
    if kind != "cxr2d":
        raise InputError(f"shortcut markers are for chest radiographs (kind cxr2d), not {kind}")
    if vqa:
        raise InputError("shortcut markers are for image classification data; generate the VQA set without them")


def check_phantom_params(n: int, seed: int, size: int, extra_finding_prob: float = 0.0, kind: str = "cxr2d") -> None:
    """Raise InputError unless ``generate_phantom`` accepts these numbers (callers that write elsewhere first
    check them before touching anything)."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise InputError(f"n must be an integer >= 1, got {n!r}", parameter="n")
    check_number("n", n, minimum=1, maximum=MAX_CASES, integer=True)
    (ct3d.check_case_args if kind == "ct3d" else check_case_args)(seed, 0, size, extra_finding_prob)


def _check_target(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir}: exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise InputError(f"{out_dir}: directory exists and is not empty "
                             "(--overwrite / overwrite=True replaces it; or choose a new folder)")
        if Path.cwd().resolve().is_relative_to(out_dir.resolve()):
            raise InputError(f"{out_dir}: is or holds the current folder; replacing it would delete the folder this "
                             "command runs in: choose another folder, or run from outside it")


def _progress(total: int, enabled: bool, what: str = "phantom radiographs"):
    """The project's rich progress bar when enabled; a no-op ``advance`` otherwise."""
    if not enabled:
        return nullcontext(lambda n=1: None)
    from ...progress import progress_bar

    return progress_bar(what, total)


@contextmanager
def _staging_dir(out_dir: Path) -> Iterator[Path]:
    """A temporary sibling of ``out_dir``, removed unless it was renamed into place."""
    out_dir = out_dir.absolute()  # "." is a folder whose sibling is in its parent, not in itself
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_folder(out_dir.parent, f".{out_dir.name}.tmp-")
    try:
        yield staging
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _write_case(case: PhantomCase, name: str, root: Path) -> str:
    image_path = f"images/{name}.png"
    Image.fromarray(case.image).save(root / image_path)
    for finding, mask in case.masks.items():
        mask_image = Image.fromarray(mask.astype(np.uint8) * 255)
        mask_image.save(root / "masks" / f"{name}_{finding}.png")
    return image_path


def _write_ct_case(case: ct3d.CTCase, name: str, root: Path) -> str:
    from ...clinical.nifti import write_nifti

    image_path = f"images/{name}.nii.gz"
    write_nifti(root / image_path, case.volume, case.spacing)
    for finding, mask in case.masks.items():
        write_nifti(root / "masks" / f"{name}_{finding}.nii.gz", mask.astype(np.uint8), case.spacing)
    return image_path


def _write_description(root: Path, seed: int, n: int, size: int, extra_finding_prob: float,
                       kind: str = "cxr2d", vqa_per_case: int | None = None, shortcut: float | None = None,
                       positioning: float = 0.0) -> None:
    generator: dict[str, Any] = {"seed": seed, "n": n, "size": size, "extra_finding_prob": extra_finding_prob}
    if positioning:
        generator["positioning"] = positioning
    if vqa_per_case is not None:
        generator["vqa_per_case"] = vqa_per_case
    if shortcut is not None:
        generator["shortcut"] = {"probability": shortcut, "marks": "abnormal (no_finding = 0)",
                                 "corner": MARKER_CORNER, "box": marker_box(size), "value": MARKER_VALUE}
    if kind == "ct3d":
        generator = {"kind": kind, **generator, "fov_mm": list(ct3d.FOV_MM),
                     "spacing_mm": [fov / size for fov in ct3d.FOV_MM]}
    description = {
        "name": CT_DATASET_NAME if kind == "ct3d" else DATASET_NAME,
        "manifest": "manifest.csv",
        "label_columns": ["finding"],
        "captions": CT3D_CAPTIONS if kind == "ct3d" else PHANTOM_CAPTIONS,
        "generator": generator,
    }
    text = json.dumps(description, indent=2) + "\n"
    (root / "dataset.json").write_text(text, encoding="utf-8")


def check_phantom_settings(n: int = 1000, seed: int = 0, size: int | None = None,
                           splits: dict[str, float] | None = None, extra_finding_prob: float = 0.0,
                           kind: str = "cxr2d", vqa: bool = False, vqa_per_case: int = DEFAULT_PER_CASE,
                           shortcut: float | None = None, positioning: float = 0.0) -> dict[str, float]:
    """InputError unless ``generate_phantom`` accepts these settings (checked before anything is written; a
    benchmark suite's ``generate`` block is checked with it when the suite is read); returns the split
    fractions."""
    if kind not in KINDS:
        raise InputError(f"phantom kind must be one of {', '.join(KINDS)}, got {kind!r}")
    check_vqa_args(vqa_per_case)
    if not isinstance(vqa, bool):
        raise InputError(f"vqa must be true or false, got {vqa!r}")
    if vqa and kind != "cxr2d":
        raise InputError(f"phantom VQA is for chest radiographs (kind cxr2d), not {kind}")
    _check_shortcut(shortcut, kind, vqa)
    _check_positioning(positioning, kind, vqa)
    split_fractions = _check_splits(splits)
    check_phantom_params(n, seed, DEFAULT_SIZES[kind] if size is None else size, extra_finding_prob, kind)
    return split_fractions


def generate_phantom(out_dir: str | Path, n: int = 1000, seed: int = 0, size: int | None = None,
                     splits: dict[str, float] | None = None, extra_finding_prob: float = 0.0,
                     progress: bool = False, overwrite: bool = False, kind: str = "cxr2d", vqa: bool = False,
                     vqa_per_case: int = DEFAULT_PER_CASE, shortcut: float | None = None,
                     positioning: float = 0.0) -> Path:
    """Generate ``n`` phantom cases into ``out_dir``; return the manifest path.

    ``kind`` "cxr2d": case ``i`` is ``cxr2d.render_case(seed, i, size, extra_finding_prob)``, a
    chest radiograph named ``phantom_{i:05d}`` (``size`` default 128 px); "ct3d": ``ct3d.render_case``,
    a CT volume named ``ct_{i:05d}`` (``size`` default 64 voxels a side). ``splits`` maps split
    names to fractions summing to 1 (default train/val/test 0.7/0.1/0.2). A case's pixels and report do not
    depend on ``n``, but its split does (``assign_splits`` shuffles all ``n`` cases): phantoms of one seed and
    different ``n`` hold the same patients in different splits, so train and score on one ``n``
    (``medvl audit --against`` shows the overlap; the contamination check does not). An existing non-empty
    ``out_dir`` is an error unless ``overwrite`` is true, in which case it is replaced as a whole
    once the new data set is complete (never when it is or holds the current folder: an ``InputError``); an
    existing empty ``out_dir`` (``.`` included) is kept and filled. ``vqa`` (cxr2d only) also writes ``vqa/``: about
    ``vqa_per_case`` balanced questions per patient, split by patient like the images (``vqa``).
    ``shortcut`` (a probability in [0, 1], cxr2d only) writes the shortcut variant described in
    the module docstring: a corner marker that leaks the normal / abnormal label. ``positioning``
    (0-1, cxr2d only) varies the patient's placement in the field of view (module docstring).
    """
    split_fractions = check_phantom_settings(n=n, seed=seed, size=size, splits=splits,
                                             extra_finding_prob=extra_finding_prob, kind=kind, vqa=vqa,
                                             vqa_per_case=vqa_per_case, shortcut=shortcut, positioning=positioning)
    shortcut = None if shortcut is None else float(shortcut)
    out_dir = Path(out_dir)
    size = DEFAULT_SIZES[kind] if size is None else size
    _check_target(out_dir, overwrite)
    split_of = assign_splits(int(n), int(seed), split_fractions)
    what = "phantom CT volumes" if kind == "ct3d" else "phantom radiographs"
    log.info("generating %d %s (%d %s, seed %d) into %s", n, what, size,
             "voxels a side" if kind == "ct3d" else "px", seed, out_dir)
    with write_errors_named(out_dir), _staging_dir(out_dir) as staging:
        (staging / "images").mkdir()
        (staging / "masks").mkdir()
        with (staging / "manifest.csv").open("w", newline="", encoding="utf-8") as handle:
            columns = CT_MANIFEST_COLUMNS if kind == "ct3d" else MANIFEST_COLUMNS
            writer = csv.DictWriter(handle, fieldnames=columns if shortcut is None else (*columns, SHORTCUT_COLUMN))
            writer.writeheader()
            truths: list[PatientTruth] = []
            with _progress(int(n), progress, what) as advance:
                for index in range(int(n)):
                    row, truth = _write_one(kind, seed, index, size, extra_finding_prob, staging, split_of[index],
                                            shortcut, float(positioning))
                    writer.writerow(row)
                    truths += [truth] if vqa and truth is not None else []
                    advance(1)
        if vqa:
            write_phantom_vqa(staging, truths, int(seed), int(size), float(extra_finding_prob), int(vqa_per_case),
                              progress)
        _write_description(staging, int(seed), int(n), int(size), float(extra_finding_prob), kind,
                           int(vqa_per_case) if vqa else None, shortcut, float(positioning))
        replace_dir(staging, out_dir)
    log.info("wrote %d %s to %s", n, what, out_dir)
    return out_dir / "manifest.csv"


def _write_one(kind: str, seed: int, index: int, size: int, extra_finding_prob: float, root: Path,
               split: str, shortcut: float | None = None,
               positioning: float = 0.0) -> tuple[dict[str, Any], PatientTruth | None]:
    """Render case ``index``, write its files under ``root``; its manifest row and (cxr2d) ground truth."""
    if kind == "ct3d":
        name = f"ct_{index:05d}"
        ct_case = ct3d.render_case(seed, index, size, extra_finding_prob)
        return ct_manifest_row(ct_case, name, _write_ct_case(ct_case, name, root), split), None
    case = (render_case(seed, index, size, extra_finding_prob, positioning=positioning) if positioning
            else render_case(seed, index, size, extra_finding_prob))  # the default call as it always was
    truth = PatientTruth(index, split, case.findings, case.meta)
    marked = shortcut is not None and has_shortcut_marker(seed, index, case.finding != "no_finding", shortcut)
    if marked:
        case = dataclasses.replace(case, image=burn_marker(case.image))
    row = manifest_row(case, _write_case(case, f"phantom_{index:05d}", root), split)
    if shortcut is not None:
        row[SHORTCUT_COLUMN] = int(marked)
    return row, truth


def iter_cases(n: int, seed: int = 0, size: int = 128, extra_finding_prob: float = 0.0,
               positioning: float = 0.0) -> Iterator[PhantomCase]:
    """Cases ``0..n-1`` in memory, without writing anything."""
    for index in range(n):
        yield render_case(seed, index, size, extra_finding_prob, positioning=positioning)

