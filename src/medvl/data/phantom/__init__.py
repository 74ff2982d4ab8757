"""Procedural phantoms: the project's built-in, fully offline data sets.

Two kinds: chest radiographs (``cxr2d``, the default) and thoraco-abdominal CT volumes
(``ct3d``: ``ct3d.render_case``, ``generate_phantom(..., kind="ct3d")``, NIfTI files in HU).

``render_case(seed, index)`` draws one frontal chest radiograph with known findings, masks,
boxes, a radiology-style report and patient metadata; ``generate_phantom(out_dir, n)`` writes a
data set of them (PNG images, masks, ``manifest.csv``, ``dataset.json``). Same seed, same bytes.

``render_case(seed, index, visit=Visit(...))`` draws another film of the same patient (a later
film, grown, resolved, moved or mirrored findings, more nodules; ``number=0``: a counterfactual
twin of the same image, see ``medvl.eval.counterfactual``); ``generate_phantom(..., vqa=True)``
adds ``vqa/``: questions with exact answers from the ground truth, balanced per type (see ``vqa``).
``generate_phantom(..., shortcut=0.95)`` writes a shortcut variant: a corner marker on abnormal
cases that leaks the label (manifest column ``shortcut_marker``, box in ``shortcut_spec(folder)``),
for testing shortcut detectors (``medvl.eval.shortcut``). ``positioning=S`` (0-1, default off) varies
the patient's placement in the field of view (shift, scale, slight rotation), boxes and masks moving
with the pixels, so a centre prior is no longer right by construction (``cxr2d``, "Positioning").

Radiological convention: the patient's right is on the image left. See ``cxr2d`` for the
clinical conventions (zones, sizes, cardiothoracic ratio, AP views) and ``generate`` for the
manifest columns.
"""

from . import ct3d as ct3d
from . import vqa as vqa
from .ct3d import CTCase as CTCase
from .ct3d_reports import CT3D_CAPTIONS as CT3D_CAPTIONS
from .cxr2d import FINDINGS as FINDINGS
from .cxr2d import PhantomCase as PhantomCase
from .cxr2d import Visit as Visit
from .cxr2d import render_case as render_case
from .generate import CT_MANIFEST_COLUMNS as CT_MANIFEST_COLUMNS
from .generate import LABEL_COLUMNS as LABEL_COLUMNS
from .generate import MANIFEST_COLUMNS as MANIFEST_COLUMNS
from .generate import generate_phantom as generate_phantom
from .generate import shortcut_spec as shortcut_spec
from .reports import PHANTOM_CAPTIONS as PHANTOM_CAPTIONS

__all__ = [
    "CT3D_CAPTIONS",
    "CT_MANIFEST_COLUMNS",
    "CTCase",
    "FINDINGS",
    "LABEL_COLUMNS",
    "MANIFEST_COLUMNS",
    "PHANTOM_CAPTIONS",
    "PhantomCase",
    "Visit",
    "generate_phantom",
    "shortcut_spec",
    "ct3d",
    "render_case",
    "vqa",
]
