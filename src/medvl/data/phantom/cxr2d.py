"""Procedural frontal chest radiographs with known findings (the project's built-in data set).

Each case is drawn from its own random stream seeded by ``(seed, index)``, so case ``i`` is the
same whatever the number of cases generated, and the same ``(seed, index, size)`` always gives
byte-identical pixels, masks and report (its split, drawn over all cases by ``generate.assign_splits``, is not:
it changes with the number of cases).

Conventions
-----------
* **Radiological orientation**: the image is viewed as if facing the patient, so the patient's
  *right* is on the image *left* (small column numbers) and the patient's *left* is on the image
  *right*. Every ``side`` and every zone name ("right upper zone") is the patient's side.
* **Pixels**: ``uint8``, brighter = more attenuating (bone and fluid white, air black), as on a
  printed film. All geometry is defined in a normalised frame and scales with ``size``.
* **Boxes**: ``[x0, y0, x1, y1]`` in pixels, ``x`` = column, ``y`` = row, end-exclusive, so
  ``mask[y0:y1, x0:x1]`` holds the whole mask.
* **Zones**: each lung is cut into thirds between its apex and the top of its diaphragm dome:
  upper, middle and lower zone.
* **Sizes**: nodule ``size_mm`` is a nominal diameter from 3 to 15 mm. Nodules are drawn about
  2-5x larger than they would be on a real 35 x 43 cm film (rendered diameter in pixels =
  ``size * scale * (size_mm + 4) / 190`` with the patient scale 0.9-1.04, i.e. about 4.7-12.8 px
  at 128 px), so that the smallest stay visible at 64 px. Below that a 3-4 mm nodule can be
  smaller than a pixel: it is then drawn into the one pixel nearest its centre (its mask and box),
  with its density scaled by the share of the pixel it covers, so every labelled nodule is in the
  pixels at every size.
* **Cardiothoracic ratio** (``meta["ctr"]``): widest cardiac width over widest internal thoracic
  width, as drawn. Normal PA hearts have 0.41-0.48, cardiomegaly 0.54-0.66 (subtle: 0.51-0.54).
  AP films (25 % of cases, "portable" look: higher clavicles, higher domes, more blur and noise)
  magnify the heart by 7 %; the ``cardiomegaly`` label is decided on the PA-equivalent ratio, so
  a normal AP heart may measure up to ~0.51 without being labelled.
* **Labels**: by default every case has exactly one finding. The primary finding cycles through
  the six classes in a seeded random order within each block of six consecutive indices, so the
  classes are balanced (1/6 each) in every run of six cases. ``extra_finding_prob`` adds a second,
  different abnormal finding to abnormal cases (never to ``no_finding``). When effusion and
  pneumothorax occur together they are on opposite sides.
* About 20 % of abnormal findings are drawn ``subtle`` (small or faint, but still visible).
* **Visits** (``render_case(..., visit=Visit(...))``): another film of the same patient for
  longitudinal and counting questions. Anatomy, findings and their positions come from the case's
  own streams; a visit ``number`` >= 1 is a film taken another day (its own pose, exposure and
  noise), ``grow`` scales the findings, ``absent`` removes some, ``nodules`` adds nodules,
  ``moved`` puts a nodule or consolidation in another zone and ``other_side`` puts a finding on
  the patient's other side. ``number=0`` keeps the case's own film: a counterfactual twin of the
  image (``medvl.eval.counterfactual``). ``visit=None`` leaves the case exactly as it always was.
* **Positioning** (``render_case(..., positioning=S)``, ``S`` in [0, 1], default 0 = off): the
  patient's placement in the field of view varies as on real films (off-centre patients, a wider
  collimation, a slightly turned patient). On top of the usual pose (shift +-2 % of the side,
  rotation +-4 degrees, scale 0.9-1.04) the patient is rotated by up to +-``8 S`` degrees more,
  shrunk by up to ``25 S`` % and shifted by ``S`` times a uniform draw over the room that keeps the
  lung fields and the heart inside the central 97 % of the field (the thorax is never cut off, so
  every finding stays whole in the image). Anatomy, findings, masks and boxes are drawn through the
  same pixel-to-patient mapping, so they move together with the pixels. The draw has its own
  stream seeded by ``(seed, index)`` (a visit ``number`` >= 1 adds its number; ``number=0`` keeps
  the case's positioning) and the room is measured on the case's own anatomy, so ``positioning=0``
  leaves every case byte-identical to a phantom without the option.
* **Shortcut marker** (``burn_marker``, ``generate_phantom(shortcut=P)``): a saturated white
  square (side 8 % of the image, 3 % from the edges) in the top-right image corner, which is air
  at every pose; ``marker_box(size)`` gives its box.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from scipy import ndimage

from ...checks import check_number
from ...errors import InputError
from .reports import write_report

FINDINGS: tuple[str, ...] = (
    "no_finding",
    "cardiomegaly",
    "pleural_effusion",
    "nodule",
    "consolidation",
    "pneumothorax",
)
ABNORMAL = FINDINGS[1:]
SIDE_SIGN = {"right": -1.0, "left": 1.0}  # patient's right lies on the image left (x < 0)
ZONE_LEVELS = ("upper", "middle", "lower")
SUBTLE_PROB = 0.2
AP_PROB = 0.25
AP_HEART_MAGNIFICATION = 1.07
MIN_SIZE, MAX_SIZE = 32, 2048  # image side in pixels; larger phantoms only exhaust memory
REFERENCE_SIZE = 128  # pixel-valued parameters (blur, line widths) are given at this size
_CAGE_CENTER_Y = 0.25  # anatomical height at which the rib cage is widest

# independent random streams of a case, each seeded by (seed, index, stream)
_STREAM_IMAGE, _STREAM_REPORT, _STREAM_CLASS, _STREAM_NOISE, _STREAM_MOTTLE = 0, 1, 2, 3, 4
_STREAM_VISIT, _STREAM_NODULES = 5, 6  # another film of the patient; its extra nodules
_STREAM_POSITION = 9  # patient positioning (render_case(positioning=S)); 7 and 8 are generate.py's
POSITIONING_ROTATION = 8.0  # degrees of extra in-plane rotation either way at positioning 1
POSITIONING_SHRINK = 0.25  # the patient's scale shrinks by up to this fraction at positioning 1
FIELD_LIMIT = 0.97  # lung fields and heart stay within this fraction of the half-side (image spans -1..1)
MAX_NODULES = 4  # nodules a visit may show (one per zone at most: they never overlap)
GROW_RANGE = (0.5, 2.0)  # allowed Visit.grow
LATERAL = ("pleural_effusion", "pneumothorax", "nodule", "consolidation")  # findings with a side
MOVABLE = ("nodule", "consolidation")  # findings with a free position in the lung (Visit.moved)
OTHER_SIDE = {"right": "left", "left": "right"}

# Shortcut marker (generate_phantom(shortcut=P)): a saturated white square burned into an image
# corner, outside the body at every pose, like a lead marker or a burned-in annotation.
MARKER_CORNERS = ("top_left", "top_right", "bottom_left", "bottom_right")  # image corners, as displayed
MARKER_CORNER = "top_right"  # the patient's left shoulder side: air at every pose
MARKER_SIDE, MARKER_MARGIN = 0.08, 0.03  # square side and gap to the image edges, fractions of the image side
MARKER_VALUE = 255


@dataclass
class PhantomCase:
    """One generated chest radiograph with its ground truth.

    Each entry of ``findings`` (the primary finding first) is a dict with ``name`` (one of
    FINDINGS), ``side`` ("left"/"right", the patient's, or None), ``zone`` (e.g. "right upper
    zone", or None), ``size_mm`` (nodules only, else None), ``severity`` ("small", "moderate",
    "large" for effusion and pneumothorax, "mild", "moderate", "marked" for cardiomegaly, else
    None), ``detail`` ("blunting", "apical", "air bronchograms" or None), ``box`` ([x0, y0, x1,
    y1], end-exclusive pixels; None for no_finding) and ``subtle`` (bool).
    """

    image: np.ndarray  # uint8 (size, size); brighter = denser; patient's right on the image left
    findings: list[dict[str, Any]]  # see above; exactly one unless extra_finding_prob > 0
    masks: dict[str, np.ndarray]  # finding name -> bool (size, size); none for no_finding
    report: str  # one line: "FINDINGS: ... IMPRESSION: ..."
    meta: dict[str, Any] = field(default_factory=dict)  # age (18-90), sex (M/F), view (PA/AP), ctr
    anatomy: dict[str, np.ndarray] = field(default_factory=dict)  # "lungs" (normal lung fields,
    # before any finding), "heart" (cardiac silhouette as drawn): bool (size, size)

    @property
    def finding(self) -> str:
        """The primary finding (one of ``FINDINGS``)."""
        return self.findings[0]["name"]


@dataclass(frozen=True)
class Visit:
    """Another film of the same patient, for longitudinal, comparison and counting questions.

    The patient (anatomy, findings, their sides and positions) is the case's; a visit changes only:

    * ``number``: 0 is the case's own film (same pose, exposure and noise: a counterfactual of the
      same image); >= 1 a film taken another day, with its own pose, exposure and noise.
    * ``grow``: factor (0.5-2) on the extent of every finding present: nodule diameter + 4 mm
      (rounded to whole mm), effusion height (at most 0.75 of the normalised frame), pneumothorax
      depth (at most 0.45), consolidation spread; the cardiothoracic ratio by a third of it
      (1.5 -> x 1.167, at most 0.8). Centres stay where they were on the first film.
    * ``growing``: the findings ``grow`` applies to (default: every finding present). A growing
      heart narrows the lung fields, so a question about another finding grows that one only.
    * ``absent``: findings not on this film (resolved, or not yet present); a resolved
      cardiomegaly gets a normal ratio (0.41-0.48, PA). Nothing left is ``no_finding``.
    * ``nodules``: total number of nodules (1-4; more than 1 needs a case with a nodule). Extra
      nodules come from their own stream (non-subtle, 6-15 mm), each in a zone of its own and
      apart from the others; each has its own ``findings`` entry named "nodule" (the first
      is the case's), and ``masks["nodule"]`` is their union.
    * ``moved``: findings (nodule, consolidation) placed one zone lower on the same side (upper ->
      middle -> lower -> upper), from the case's own candidate points, clear of the other findings
      (falls back to another zone, as on the first film, when the lung has no room there).
    * ``other_side``: findings (pleural_effusion, pneumothorax, nodule, consolidation) put on the
      patient's other side, a nodule or consolidation at the same zone level (one zone lower with
      ``moved``). An effusion and a pneumothorax of the same case are on opposite sides: flip
      both or neither. Other findings stay where they were on the first film.

    With ``number=0`` these are counterfactuals of the case's own image (same pose, exposure and
    noise; the pixels change only where a finding was added, removed, moved or resized, and a
    little around it from the film blur). Same arguments, same pixels.
    """

    number: int = 1
    grow: float = 1.0
    absent: tuple[str, ...] = ()
    nodules: int = 1
    growing: tuple[str, ...] = ()
    moved: tuple[str, ...] = ()
    other_side: tuple[str, ...] = ()


# ---------------------------------------------------------------------------------------------
# Random parameters. Everything random except pixel noise is drawn here, in a fixed order and
# independently of ``size``, so the same case rendered at 64 and 128 px is the same patient.


@dataclass(frozen=True)
class _Pose:
    angle: float  # radians, in-plane rotation
    shift_x: float  # normalised image units (image spans -1..1)
    shift_y: float
    scale: float  # patient size / distance to the detector
    aspect: float  # thorax width relative to height


@dataclass(frozen=True)
class _Acquisition:
    contrast: float  # slope of the film's characteristic curve
    exposure: float  # attenuation that comes out mid-grey
    gamma: float
    brightness: float
    blur_px: float  # at REFERENCE_SIZE
    noise: float  # standard deviation of quantum noise, grey units (0..1)
    grid: float  # amplitude of anti-scatter grid lines (0 = none)
    grid_period_px: float


@dataclass(frozen=True)
class _Anatomy:
    half_width: float  # W: half the internal rib-cage width at its widest
    apex_y: float  # top of the lung apices
    dome_top: tuple[float, float]  # top of the (right, left) diaphragm domes
    ctr: float  # cardiothoracic ratio as drawn (AP magnification applied)
    pa_ctr: float  # PA-equivalent ratio: the one the cardiomegaly label is decided on
    heart_tilt: float  # radians; long axis runs down towards the patient's left
    knob: float  # aortic knob bulge
    body_margin: float  # soft tissue outside the rib cage (habitus)
    soft: float  # soft-tissue attenuation
    breast: float  # breast shadow strength (0 for male patients)
    bone: float  # bone attenuation (falls with age)
    bubble: tuple[float, float, float] | None  # gastric air bubble (x, y, radius)
    vessel_field: np.ndarray  # (angle, distance) random field whose zero crossings are vessels
    rib_spacing: float
    rib_phase: float
    clavicle_y: float
    clavicle_rise: float


def _uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(rng.uniform(low, high))


def _sample_pose(rng: np.random.Generator) -> _Pose:
    return _Pose(
        angle=math.radians(_uniform(rng, -4.0, 4.0)),
        shift_x=_uniform(rng, -0.04, 0.04),
        shift_y=_uniform(rng, -0.04, 0.04),
        scale=_uniform(rng, 0.9, 1.04),
        aspect=_uniform(rng, 0.94, 1.06),
    )


def _sample_acquisition(rng: np.random.Generator, view: str) -> _Acquisition:
    portable = view == "AP"
    return _Acquisition(
        contrast=_uniform(rng, 6.0, 8.5),
        exposure=_uniform(rng, 0.28, 0.34),
        gamma=_uniform(rng, 0.85, 1.15),
        brightness=_uniform(rng, -0.04, 0.04),
        blur_px=_uniform(rng, 0.4, 0.9) + (0.3 if portable else 0.0),
        noise=_uniform(rng, 0.008, 0.025) + (0.01 if portable else 0.0),
        grid=_uniform(rng, 0.01, 0.025) * (rng.uniform() < 0.3),
        grid_period_px=_uniform(rng, 2.2, 3.2),
    )


def _sample_anatomy(rng: np.random.Generator, meta: dict[str, Any], ctr: float) -> _Anatomy:
    ap = meta["view"] == "AP"
    age = meta["age"]
    dome_right = _uniform(rng, 0.30, 0.40) - (0.05 if ap else 0.0)
    has_bubble = rng.uniform() < 0.7
    bubble = (_uniform(rng, 0.28, 0.48), _uniform(rng, 0.08, 0.14), _uniform(rng, 0.05, 0.08))
    return _Anatomy(
        half_width=_uniform(rng, 0.66, 0.76),
        apex_y=_uniform(rng, -0.76, -0.68),
        dome_top=(dome_right, dome_right + _uniform(rng, 0.02, 0.07)),
        ctr=ctr * (AP_HEART_MAGNIFICATION if ap else 1.0),
        pa_ctr=ctr,
        heart_tilt=math.radians(_uniform(rng, 20.0, 32.0)),
        knob=_uniform(rng, 0.03, 0.06) + 0.0006 * (age - 18),
        body_margin=_uniform(rng, 0.1, 0.22),
        soft=_uniform(rng, 0.45, 0.55),
        breast=_uniform(rng, 0.04, 0.1) * (meta["sex"] == "F"),
        bone=_uniform(rng, 0.85, 1.1) - 0.003 * (age - 18),
        bubble=bubble if has_bubble else None,
        vessel_field=rng.standard_normal((48, 6)).astype(np.float32),
        rib_spacing=_uniform(rng, 0.118, 0.135),
        rib_phase=_uniform(rng, -0.03, 0.03),
        clavicle_y=_uniform(rng, -0.58, -0.5) - (0.1 if ap else 0.0),
        clavicle_rise=_uniform(rng, 0.06, 0.12) * (0.4 if ap else 1.0),
    )


# ---------------------------------------------------------------------------------------------
# Geometry in the anatomical frame: x from patient's right (-) to left (+), y from top (-) to
# bottom (+), the image spanning about -1..1 on both axes. All functions are vectorised.


@dataclass(frozen=True)
class _Frame:
    """The pixel grid in anatomical coordinates, and the normal anatomy's masks on it."""

    x: np.ndarray  # float32 (size, size), anatomical x of each pixel centre
    y: np.ndarray
    size: int
    pixel: float  # one pixel in anatomical units
    lung: np.ndarray  # bool, lung fields (heart and mediastinum excluded)
    lung_depth: np.ndarray  # 0..1, relative air thickness (thin at the lung edges)
    heart: np.ndarray  # bool, cardiac silhouette above the diaphragm


def _frame(size: int, pose: _Pose, anat: _Anatomy) -> _Frame:
    coords = ((np.arange(size) + 0.5) * (2.0 / size) - 1.0).astype(np.float32)
    xn = coords[None, :] - pose.shift_x
    yn = coords[:, None] - pose.shift_y
    cos, sin = math.cos(pose.angle), math.sin(pose.angle)
    x = ((cos * xn + sin * yn) / (pose.scale * pose.aspect)).astype(np.float32)
    y = ((-sin * xn + cos * yn) / pose.scale).astype(np.float32)
    margin = _lung_margin(anat, x, y)
    in_chest = (y < _dome(anat, x) + 0.02) & (y > anat.apex_y)
    return _Frame(
        x=x,
        y=y,
        size=size,
        pixel=2.0 / (size * pose.scale),
        lung=margin > 0,
        lung_depth=np.clip(margin / 0.12, 0, 1) ** 0.5,
        heart=(_heart_radius(anat, x, y) < 1.0) & in_chest,
    )


def _lateral_limit(anat: _Anatomy, y: np.ndarray) -> np.ndarray:
    """Half-width of the rib cage at height y (round apices, near-vertical lower walls)."""
    height = _CAGE_CENTER_Y - anat.apex_y
    rel = np.clip(np.abs(y - _CAGE_CENTER_Y) / height, 0.0, 1.0)
    return anat.half_width * (1.0 - rel**2.4) ** 0.5


def _dome(anat: _Anatomy, x: np.ndarray | np.floating) -> np.ndarray:
    """Height of the diaphragm under x: a parabola per side, lowest at the costophrenic angle."""
    top = np.where(x < 0, np.float32(anat.dome_top[0]), np.float32(anat.dome_top[1]))
    peak = 0.47 * anat.half_width
    return top + (0.78 / anat.half_width**2) * (np.abs(x) - peak) ** 2


def _mediastinum(anat: _Anatomy, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Half-width of the mediastinum on the side of x (aortic knob on the patient's left)."""
    right = 0.085 + 0.03 * np.clip((y + 0.3) / 0.6, 0, 1)
    left = 0.09 + anat.knob * np.exp(-(((y + 0.32) / 0.09) ** 2))
    left = left + 0.035 * np.exp(-(((y + 0.1) / 0.08) ** 2))  # pulmonary trunk
    return np.where(x < 0, right, left)


def _heart_shape(anat: _Anatomy) -> tuple[float, float, float, float]:
    """Centre (x, y) and semi-axes (a, b) of the heart ellipse for the drawn ratio."""
    half_extent = anat.ctr * anat.half_width
    cos, sin = math.cos(anat.heart_tilt), math.sin(anat.heart_tilt)
    a = half_extent / math.sqrt(cos**2 + (0.78 * sin) ** 2)
    b = 0.78 * a
    vertical_extent = math.sqrt((a * sin) ** 2 + (b * cos) ** 2)
    center_x = half_extent / 3.0 + 0.02
    center_y = anat.dome_top[1] + 0.1 - vertical_extent
    return center_x, center_y, a, b


def _heart_radius(anat: _Anatomy, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Elliptical radius of the heart (< 1 inside)."""
    cx, cy, a, b = _heart_shape(anat)
    cos, sin = math.cos(anat.heart_tilt), math.sin(anat.heart_tilt)
    u = (x - cx) * cos + (y - cy) * sin
    v = -(x - cx) * sin + (y - cy) * cos
    return np.sqrt((u / a) ** 2 + (v / b) ** 2)


def _zone_bounds(anat: _Anatomy, side: str, level: str) -> tuple[float, float]:
    """Heights of the top and bottom of a zone: thirds from the apex to the dome's top."""
    top = anat.apex_y
    base = anat.dome_top[0 if side == "right" else 1]
    third = (base - top) / 3.0
    i = ZONE_LEVELS.index(level)
    low = top + i * third
    high = top + (i + 1) * third if level != "lower" else 10.0
    return low, high


def _zone_of(anat: _Anatomy, x: float, y: float) -> str:
    """Zone name ("right upper zone") of a point in a lung."""
    side = "right" if x < 0 else "left"
    level = next((lv for lv in reversed(ZONE_LEVELS) if y >= _zone_bounds(anat, side, lv)[0]),
                 ZONE_LEVELS[0])
    return f"{side} {level} zone"


def _lung_margin(anat: _Anatomy, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """About the distance inside the nearest lung edge (> 0 inside a lung field)."""
    lateral = _lateral_limit(anat, y) - np.abs(x)
    dome = _dome(anat, x) - y
    medial = np.abs(x) - _mediastinum(anat, x, y)
    heart_gap = (_heart_radius(anat, x, y) - 1.0) * 0.3
    apex = y - anat.apex_y
    return np.minimum(np.minimum(np.minimum(lateral, dome), np.minimum(medial, heart_gap)), apex)


# ---------------------------------------------------------------------------------------------
# Normal anatomy: an attenuation map (arbitrary units: 0 for air, ~0.5 through the mediastinum).


def _smoothstep(edge0: float, edge1: float | np.ndarray, value: np.ndarray) -> np.ndarray:
    t = np.clip((value - edge0) / (edge1 - edge0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _body(anat: _Anatomy, frame: _Frame) -> np.ndarray:
    """Relative soft-tissue thickness (elliptic cross-section): neck, shoulders, trunk."""
    x, y = frame.x, frame.y
    trunk = anat.half_width + anat.body_margin
    shoulder = _smoothstep(-1.02, -0.78, y)
    half = 0.3 + (trunk + 0.06 - 0.3) * shoulder - 0.06 * _smoothstep(0.2, 1.0, y)
    inside = np.clip(1.0 - (x / half) ** 2, 0.0, 1.0)
    edge = _smoothstep(0.0, 4.0 * frame.pixel / half, inside)
    return edge * (0.2 + 0.8 * np.sqrt(inside))


def _ribs(anat: _Anatomy, frame: _Frame) -> np.ndarray:
    """Posterior ribs arching down laterally, fainter anterior ribs sloping down medially."""
    x, y = frame.x, frame.y
    ax = np.abs(x)
    cage = _lateral_limit(anat, y) + 0.05 - ax
    inside = _smoothstep(0.0, 0.04, cage) * _smoothstep(0.04, 0.08, ax)
    below = np.clip((y - _dome(anat, x)) / 0.15, 0.0, 1.0)
    inside = inside * (1.0 - 0.7 * below)
    u = y - (-0.15 * ax + 0.85 * ax**2) - anat.apex_y - anat.rib_phase + 0.03
    phase = u / (anat.rib_spacing * (1.0 + 0.25 * np.clip(u, 0, None)))
    frac = phase - np.floor(phase)
    shaft = _smoothstep(0.0, 0.12, frac) * _smoothstep(0.55, 0.43, frac)
    cortex = np.exp(-(((frac - 0.05) / 0.05) ** 2)) + np.exp(-(((frac - 0.5) / 0.05) ** 2))
    posterior = (shaft + 0.5 * cortex) * (phase > 0) * (phase < 10.0)
    v = y - 0.5 * (anat.half_width - ax) - anat.apex_y - 0.02
    phase_a = v / (anat.rib_spacing * 1.3)
    frac_a = phase_a - np.floor(phase_a)
    anterior = _smoothstep(0.0, 0.15, frac_a) * _smoothstep(0.6, 0.45, frac_a)
    anterior = anterior * (phase_a > 1.0) * (phase_a < 6.0) * _smoothstep(0.25, 0.5, ax)
    return inside * (0.045 * posterior + 0.02 * anterior)


def _on_box(frame: _Frame, keep: np.ndarray, part) -> np.ndarray:
    """``part(x, y)`` evaluated on the bounding box of ``keep`` only, zero elsewhere (speed)."""
    out = np.zeros_like(frame.x)
    rows = np.flatnonzero(keep.any(axis=1))
    cols = np.flatnonzero(keep.any(axis=0))
    if rows.size:
        box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
        out[box] = part(frame.x[box], frame.y[box])
    return out


def _clavicles(anat: _Anatomy, frame: _Frame) -> np.ndarray:
    """S-shaped clavicles from the sternal notch out and up over the lung apices."""
    top, bottom = anat.clavicle_y - anat.clavicle_rise - 0.12, anat.clavicle_y + 0.12
    keep = (frame.y > top) & (frame.y < bottom) & (np.abs(frame.x) < 0.8)
    return _on_box(frame, keep, lambda x, y: _clavicle_profile(anat, x, y))


def _clavicle_profile(anat: _Anatomy, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    t = (np.abs(x) - 0.06) / (0.62 * anat.half_width / 0.7)
    bend = 0.035 * np.sin(1.5 * np.pi * np.clip(t, 0, 1))
    center = anat.clavicle_y - anat.clavicle_rise * t + bend
    across = (y - center) / (0.038 + 0.015 * np.clip(1 - 2 * t, 0, 1))
    band = np.clip(1.0 - across**2, 0.0, 1.0) ** 0.5
    edges = np.exp(-(((np.abs(across) - 0.85) / 0.2) ** 2)) * (np.abs(across) < 1.2)
    ends = _smoothstep(-0.04, 0.03, t) * _smoothstep(1.06, 0.96, t)
    return (0.12 * band + 0.05 * edges) * ends


def _spine(anat: _Anatomy, frame: _Frame) -> np.ndarray:
    """Vertebral column: bodies with darker disc spaces and paired pedicles."""
    return _on_box(frame, np.abs(frame.x) < 0.075, lambda x, y: _spine_profile(anat, x, y))


def _spine_profile(anat: _Anatomy, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    column = np.clip(1.0 - (x / 0.07) ** 2, 0.0, 1.0) ** 0.5
    level = (y - anat.apex_y) / (anat.rib_spacing * 0.95)
    discs = 0.85 + 0.15 * np.cos(2 * np.pi * level)
    pedicles = np.exp(-(((np.abs(x) - 0.045) / 0.014) ** 2) - (((level % 1.0) - 0.5) / 0.18) ** 2)
    return 0.045 * column * discs + 0.03 * pedicles


def _markings(anat: _Anatomy, frame: _Frame) -> np.ndarray:
    """Pulmonary vessels radiating from each hilum, tapering and branching towards the periphery.

    Vessels are the zero crossings of a random field that varies fast with the angle around the
    hilum and slowly with the distance from it, so the lines run outwards, wander, split and end.
    """
    return _on_box(frame, frame.lung, lambda x, y: _vessels(anat.vessel_field, x, y))


def _vessels(vessel_field: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    hilum_x = np.where(x < 0, np.float32(-0.19), np.float32(0.21))
    dx, dy = x - hilum_x, y - 0.02
    r = np.sqrt(dx**2 + dy**2)
    n_theta, n_r = vessel_field.shape
    along = (np.arctan2(dy, dx) / (2 * np.pi) % 1.0) * n_theta
    out = np.clip(r / 0.9, 0, 1) * (n_r - 1)
    i0, j0 = np.floor(along).astype(np.intp), np.minimum(np.floor(out).astype(np.intp), n_r - 2)
    ft, fr = along - i0, out - j0
    i0, i1 = i0 % n_theta, (i0 + 1) % n_theta
    field_ = ((vessel_field[i0, j0] * (1 - ft) + vessel_field[i1, j0] * ft) * (1 - fr)
              + (vessel_field[i0, j0 + 1] * (1 - ft) + vessel_field[i1, j0 + 1] * ft) * fr)
    width = 0.5 * np.exp(-r / 0.35) + 0.04
    vessels = np.exp(-((field_ / width) ** 2) - r / 0.45)
    hilum = np.exp(-((r / 0.1) ** 2))
    return 0.1 * vessels + 0.06 * hilum


def _gastric_bubble(anat: _Anatomy, frame: _Frame) -> np.ndarray:
    """Air in the stomach fundus under the left dome (on the image right)."""
    if anat.bubble is None:
        return np.zeros_like(frame.x)
    bx, by, br = anat.bubble
    cy = anat.dome_top[1] + by
    inside = ((frame.x - bx) / br) ** 2 + ((frame.y - cy) / (0.6 * br)) ** 2
    return np.clip(1.0 - inside, 0, 1) ** 0.3 * (frame.y < cy + 0.2 * br)


def _breasts(anat: _Anatomy, frame: _Frame) -> np.ndarray:
    """Extra soft tissue over the lower zones of female patients."""
    if anat.breast == 0.0:
        return np.zeros_like(frame.x)
    out = np.zeros_like(frame.x)
    for sign in (-1.0, 1.0):
        cx, cy = sign * 0.62 * anat.half_width, anat.dome_top[0] - 0.02
        r = np.sqrt(((frame.x - cx) / 0.36) ** 2 + ((frame.y - cy) / 0.28) ** 2)
        out += np.clip(1.0 - r**2, 0, 1) ** 0.5 * _smoothstep(cy - 0.35, cy - 0.2, frame.y)
    return anat.breast * out


# ---------------------------------------------------------------------------------------------
# Findings. Each returns its mask; effects go into the shared _Layers.


@dataclass
class _Layers:
    """Per-pixel modifiers that findings apply before the final composition."""

    air: np.ndarray  # lung air thickness (0..1); fluid and collapse reduce it
    markings: np.ndarray  # multiplier of vessel markings
    extra: np.ndarray  # added attenuation (nodules, pleural line)
    free_air: np.ndarray  # fraction of tissue replaced by pleural air (pneumothorax)


def _meniscus(anat: _Anatomy, params: dict, x: np.ndarray) -> np.ndarray:
    """Upper edge of the fluid: higher laterally (the meniscus), lower medially."""
    lateral_fraction = np.clip((np.abs(x) - 0.1) / (anat.half_width - 0.1), 0, 1)
    angle_y = _dome(anat, np.array(anat.half_width, dtype=np.float32))
    return angle_y - params["height"] * (0.45 + 0.55 * lateral_fraction**2)


def _effusion_region(anat: _Anatomy, params: dict, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return ((x * SIDE_SIGN[params["side"]]) > 0) & (y > _meniscus(anat, params, x) + 0.012)


def _effusion(anat: _Anatomy, frame: _Frame, layers: _Layers, params: dict) -> np.ndarray:
    """Fluid filling the costophrenic angle and base of one hemithorax, hiding the dome."""
    x, y = frame.x, frame.y
    on_side = (x * SIDE_SIGN[params["side"]]) > 0
    meniscus = _meniscus(anat, params, x)
    fluid = _smoothstep(-0.01, 0.07, y - meniscus) * on_side
    # fluid layering behind the lung veils the hemithorax above the meniscus, more when large
    veil = _smoothstep(-0.35, 0.0, y - meniscus) * on_side * min(params["height"], 0.5)
    layers.air *= (1.0 - params["density"] * fluid) * (1.0 - 0.5 * veil)
    layers.markings *= 1.0 - fluid
    return frame.lung & _effusion_region(anat, params, x, y)


def _collapsed_lung(anat: _Anatomy, params: dict, x: np.ndarray, y: np.ndarray):
    """Elliptic radius ``q`` of the collapsed lung's edge (> 1 outside it) and its taper."""
    low = params["lower_y"]
    taper = np.clip((low - y) / (low - anat.apex_y), 0, 1) ** 0.7
    inner_w = anat.half_width - params["depth"] * taper
    height = _CAGE_CENTER_Y - (anat.apex_y + params["depth"] * 0.9)
    q = np.sqrt((np.abs(x) / inner_w) ** 2 + (np.minimum(y - _CAGE_CENTER_Y, 0) / height) ** 2)
    return q, taper


def _pneumothorax_region(anat: _Anatomy, params: dict, x: np.ndarray,
                         y: np.ndarray) -> np.ndarray:
    q, _ = _collapsed_lung(anat, params, x, y)
    return ((x * SIDE_SIGN[params["side"]]) > 0) & (q > 1.0) & (y < params["lower_y"])


def _pneumothorax(anat: _Anatomy, frame: _Frame, layers: _Layers, params: dict) -> np.ndarray:
    """Air between the chest wall and a collapsed lung whose edge is the visceral pleural line."""
    x, y = frame.x, frame.y
    on_side = (x * SIDE_SIGN[params["side"]]) > 0
    q, taper = _collapsed_lung(anat, params, x, y)
    mask = frame.lung & _pneumothorax_region(anat, params, x, y)
    line = np.exp(-((((q - 1.0) * anat.half_width) / (0.7 * frame.pixel)) ** 2))
    line = line * frame.lung * on_side * (y < params["lower_y"] - 0.02) * (taper > 0.05)
    layers.markings *= np.where(mask, 0.0, 1.0)
    layers.free_air = np.maximum(layers.free_air, mask * params["free_air"])
    collapsed = frame.lung & on_side & ~mask
    layers.air = np.where(collapsed, layers.air * (1.0 - 0.6 * params["depth"]), layers.air)
    layers.extra += params["line"] * line
    return mask


def _nodule(anat: _Anatomy, frame: _Frame, layers: _Layers, params: dict) -> np.ndarray:
    """A dense ellipse, brightest at its centre.

    A nodule smaller than a pixel (a 3-4 mm one at 32-40 px) can fall between pixel centres;
    it is then drawn into the pixel nearest its centre (the one its mask holds), with its
    density scaled by the share of that pixel it covers, so every labelled nodule shows."""
    cx, cy, radius = params["x"], params["y"], params["radius"]
    stretch = params["stretch"]
    dx, dy = (frame.x - cx) / (radius * stretch), (frame.y - cy) * stretch / radius
    r = np.sqrt(dx**2 + dy**2)
    inside = r < 1.0
    if not inside.any():
        inside = _at_least_one_pixel(inside, frame, (cx, cy))
        covered = min(1.0, math.pi * radius**2 / frame.pixel**2)
        layers.extra += params["density"] * covered * inside
        return inside
    blob = np.sqrt(np.clip(1.0 - r**2, 0.0, 1.0))
    layers.extra += params["density"] * (0.35 + 0.65 * blob) * inside
    return inside


def _lobules(params: dict, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Smooth cluster of Gaussian lobules: the consolidation's extent before mottling."""
    field_ = np.zeros(np.shape(x), dtype=np.float32)
    for bx, by, br in params["blobs"]:
        field_ += np.exp(-((x - bx) ** 2 + (y - by) ** 2) / br**2)
    return field_


def _consolidation(anat: _Anatomy, frame: _Frame, layers: _Layers, params: dict) -> np.ndarray:
    """Patchy airspace opacity: lobules clipped to the lung, maybe with air bronchograms."""
    field_ = _lobules(params, frame.x, frame.y)
    patch = _smoothstep(0.1, 1.1, field_ * (1.0 + 0.3 * params["mottle"]))
    patch = patch * frame.lung
    if params["bronchograms"]:  # air-filled bronchi: thin dark lines running out from the hilum
        dx, dy = frame.x - SIDE_SIGN[params["side"]] * 0.2, frame.y
        r = np.sqrt(dx**2 + dy**2)
        phase = 9.0 * np.arctan2(dy, dx) + params["bronchus_phase"]
        across = r * np.abs((phase + np.pi) % (2 * np.pi) - np.pi) / 9.0
        tubes = np.exp(-((across / max(0.012, 0.8 * frame.pixel)) ** 2))
        patch = patch * (1.0 - 0.45 * tubes * _smoothstep(0.6, 1.0, patch))
    layers.air *= 1.0 - params["density"] * patch
    layers.markings *= 1.0 - patch
    layers.extra += 0.08 * params["density"] * patch  # also dense where the lung is thin
    return patch > 0.5


_RENDERERS = {
    "pleural_effusion": _effusion,
    "pneumothorax": _pneumothorax,
    "nodule": _nodule,
    "consolidation": _consolidation,
}
_RENDER_ORDER = ("pleural_effusion", "pneumothorax", "consolidation", "nodule")


# ---------------------------------------------------------------------------------------------
# Finding parameters.


def _choose_findings(seed: int, index: int, rng: np.random.Generator,
                     extra_prob: float) -> list[str]:
    """Primary finding from a seeded shuffle of each block of six indices, maybe one more."""
    block = np.random.default_rng([seed, index // len(FINDINGS), _STREAM_CLASS])
    order = block.permutation(len(FINDINGS))
    primary = FINDINGS[int(order[index % len(FINDINGS)])]
    extra_draw = rng.uniform()
    extra_pick = rng.uniform()
    if primary == "no_finding" or extra_draw >= extra_prob:
        return [primary]
    others = [name for name in ABNORMAL if name != primary]
    return [primary, others[int(extra_pick * len(others))]]


def _finding_params(rng: np.random.Generator, anat: _Anatomy, subtle: dict[str, bool],
                    names: list[str]) -> dict[str, dict]:
    """Parameters of every finding kind, used or not: a fixed number of draws per case."""
    sides = {name: ("right", "left")[int(rng.integers(2))] for name in ABNORMAL}
    if "pleural_effusion" in names and "pneumothorax" in names:
        sides["pneumothorax"] = "left" if sides["pleural_effusion"] == "right" else "right"
    params = {
        "pleural_effusion": _effusion_params(rng, subtle["pleural_effusion"]),
        "pneumothorax": _pneumothorax_params(rng, anat, subtle["pneumothorax"]),
        "nodule": _nodule_params(rng, subtle["nodule"]),
        "consolidation": _consolidation_params(rng, subtle["consolidation"]),
        "cardiomegaly": {},
    }
    for name in ABNORMAL:
        params[name].update(side=sides[name], subtle=subtle[name])
    return params


def _pick(subtle: bool, subtle_value: float, normal_value: float) -> float:
    return subtle_value if subtle else normal_value


def _effusion_params(rng: np.random.Generator, subtle: bool) -> dict[str, Any]:
    height = _pick(subtle, _uniform(rng, 0.13, 0.17), _uniform(rng, 0.22, 0.6))
    density = _pick(subtle, _uniform(rng, 0.65, 0.8), _uniform(rng, 0.85, 1.0))
    return {"height": height, "density": density}


def _pneumothorax_params(rng: np.random.Generator, anat: _Anatomy, subtle: bool) -> dict[str, Any]:
    extent = _uniform(rng, 0.0, 1.0)
    depth = _pick(subtle, _uniform(rng, 0.08, 0.11), 0.12 + 0.2 * extent)
    lower = anat.apex_y + _pick(subtle, 0.5, 0.6 + 0.8 * extent)
    line = _pick(subtle, _uniform(rng, 0.1, 0.13), _uniform(rng, 0.13, 0.2))
    free_air = _pick(subtle, _uniform(rng, 0.74, 0.8), _uniform(rng, 0.78, 0.86))
    return {"depth": depth, "lower_y": lower, "free_air": free_air, "line": line}


def _nodule_params(rng: np.random.Generator, subtle: bool) -> dict[str, Any]:
    size_mm = float(_pick(subtle, int(rng.integers(3, 7)), int(rng.integers(6, 16))))
    return {
        "level": ZONE_LEVELS[int(rng.integers(3))],
        "size_mm": size_mm,
        "radius": (size_mm + 4.0) / 190.0,
        "stretch": _uniform(rng, 0.85, 1.15),
        "density": _pick(subtle, _uniform(rng, 0.14, 0.18), _uniform(rng, 0.2, 0.32)),
        "candidates": rng.uniform(size=(48, 2)),
    }


def _consolidation_params(rng: np.random.Generator, subtle: bool) -> dict[str, Any]:
    return {
        "level": ZONE_LEVELS[int(rng.integers(3))],
        "spread": _pick(subtle, _uniform(rng, 0.09, 0.11), _uniform(rng, 0.12, 0.19)),
        "offsets": rng.uniform(-1.0, 1.0, size=(8, 3)),
        "density": _pick(subtle, _uniform(rng, 0.3, 0.4), _uniform(rng, 0.45, 0.7)),
        "bronchograms": bool(rng.uniform() < 0.5),
        "bronchus_phase": _uniform(rng, 0.0, 2 * math.pi),
        "candidates": rng.uniform(size=(48, 2)),
    }


def _sample_ctr(rng: np.random.Generator, cardiomegaly: bool, subtle: bool) -> float:
    """PA-equivalent cardiothoracic ratio (three draws whatever the case)."""
    normal, mild, enlarged = rng.uniform(size=3)
    if not cardiomegaly:
        return 0.41 + 0.07 * float(normal)
    return 0.51 + 0.03 * float(mild) if subtle else 0.54 + 0.12 * float(enlarged)


def _free_lung(anat: _Anatomy, drawn: dict[str, dict], x: np.ndarray,
               y: np.ndarray) -> np.ndarray:
    """Points inside a lung field and outside the findings drawn so far (analytic, any size)."""
    free = _lung_margin(anat, x, y) > 0
    if "pleural_effusion" in drawn:
        free &= ~_effusion_region(anat, drawn["pleural_effusion"], x, y)
    if "pneumothorax" in drawn:
        free &= ~_pneumothorax_region(anat, drawn["pneumothorax"], x, y)
    if "consolidation" in drawn:
        free &= _lobules(drawn["consolidation"], x, y) < 0.2
    return free


def _place(anat: _Anatomy, drawn: dict[str, dict], params: dict,
           radius: float) -> tuple[float, float]:
    """Centre of a disc of ``radius`` lying in free lung, preferably in the requested zone.

    Candidates are the case's pre-drawn uniform points mapped into the zone, so the result does
    not depend on the image size. Falls back to other zones, then to a smaller disc.
    """
    side, sign = params["side"], SIDE_SIGN[params["side"]]
    u, v = params["candidates"][:, 0], params["candidates"][:, 1]
    ring = np.linspace(0, 2 * np.pi, 16, endpoint=False)
    levels = (params["level"],) + tuple(lv for lv in ZONE_LEVELS if lv != params["level"])
    for scale in (1.15, 0.8, 0.5):
        for level in levels:
            low, high = _zone_bounds(anat, side, level)
            high = min(high, anat.dome_top[0 if side == "right" else 1] + 0.2)
            cx = (sign * (0.08 + u * (anat.half_width - 0.08))).astype(np.float32)
            cy = (low + v * (high - low)).astype(np.float32)
            rx = cx[:, None] + scale * radius * np.cos(ring)[None, :]
            ry = cy[:, None] + scale * radius * np.sin(ring)[None, :]
            ok = _free_lung(anat, drawn, cx, cy) & _free_lung(anat, drawn, rx, ry).all(axis=1)
            if ok.any():
                k = int(np.argmax(ok))
                return float(cx[k]), float(cy[k])
    low, high = _zone_bounds(anat, side, params["level"])
    return sign * 0.5 * anat.half_width, (low + min(high, 0.3)) / 2  # zone centre, last resort


def _draw_findings(names: list[str], params: dict[str, dict], anat: _Anatomy, frame: _Frame,
                   mottle_rng: np.random.Generator) -> tuple[list[dict], dict[str, np.ndarray],
                                                            _Layers]:
    """Apply the case's findings to fresh layers; return their records and masks."""
    shape = frame.x.shape
    ones, zeros = np.ones(shape, np.float32), np.zeros(shape, np.float32)
    layers = _Layers(air=ones, markings=ones.copy(), extra=zeros, free_air=zeros.copy())
    masks: dict[str, np.ndarray] = {}
    if "cardiomegaly" in names:
        masks["cardiomegaly"] = _at_least_one_pixel(frame.heart.copy(), frame, _heart_shape(anat))
    drawn: dict[str, dict] = {}
    for name in _RENDER_ORDER:
        if name not in names:
            continue
        finding = params[name]
        if name in ("nodule", "consolidation") and "x" not in finding:  # a visit locates beforehand
            _locate(name, finding, anat, drawn)
        if name == "consolidation":
            mottle = ndimage.gaussian_filter(mottle_rng.standard_normal(shape, np.float32),
                                             frame.size / 45)
            finding["mottle"] = mottle / (mottle.std() + 1e-9)
        mask = _RENDERERS[name](anat, frame, layers, finding)
        masks[name] = _at_least_one_pixel(mask, frame, _anchor(name, finding, anat))
        drawn[name] = finding
    records = [_record(name, params.get(name, {}), anat, masks) for name in names]
    for extra in params.get("extra_nodules", ()):
        mask = _at_least_one_pixel(_nodule(anat, frame, layers, extra), frame, (extra["x"], extra["y"]))
        records.append(_record("nodule", extra, anat, {"nodule": mask}))
        masks["nodule"] = masks["nodule"] | mask
    return records, {name: masks[name] for name in names if name in masks}, layers


def _anchor(name: str, params: dict, anat: _Anatomy) -> tuple[float, float]:
    """A point that belongs to the finding whatever the image size."""
    sign = SIDE_SIGN[params["side"]]
    if name == "pleural_effusion":
        x = sign * 0.85 * anat.half_width
        return x, float(_dome(anat, np.float32(x))) - 0.02
    if name == "pneumothorax":
        return sign * 0.5 * anat.half_width, anat.apex_y + 0.04
    return params["x"], params["y"]


def _at_least_one_pixel(mask: np.ndarray, frame: _Frame, anchor: tuple[float, ...]) -> np.ndarray:
    """A finding always has a non-empty mask: at tiny sizes, the pixel nearest its anchor."""
    if not mask.any():
        distance = (frame.x - anchor[0]) ** 2 + (frame.y - anchor[1]) ** 2
        mask.flat[int(np.argmin(distance))] = True
    return mask


def _locate(name: str, params: dict, anat: _Anatomy, drawn: dict[str, dict]) -> None:
    radius = params["radius"] if name == "nodule" else params["spread"]
    params["x"], params["y"] = _place(anat, drawn, params, radius)
    params["zone"] = _zone_of(anat, params["x"], params["y"])
    if name == "consolidation":
        _set_blobs(params)


def _set_blobs(params: dict) -> None:
    """The consolidation's lobules around its centre, scaled by its spread."""
    params["blobs"] = [
        (params["x"] + 0.8 * params["spread"] * dx, params["y"] + 0.8 * params["spread"] * dy,
         params["spread"] * (0.55 + 0.35 * abs(dr)))
        for dx, dy, dr in params["offsets"]
    ]


def _severity(name: str, params: dict, anat: _Anatomy) -> str | None:
    if name == "cardiomegaly":
        return "mild" if anat.pa_ctr < 0.58 else "moderate" if anat.pa_ctr < 0.62 else "marked"
    if name == "pleural_effusion":
        height = params["height"]
        return "small" if height < 0.28 else "moderate" if height < 0.44 else "large"
    if name == "pneumothorax":
        depth = params["depth"]
        return "small" if depth < 0.18 else "moderate" if depth < 0.26 else "large"
    return None


def _detail(name: str, params: dict, anat: _Anatomy) -> str | None:
    if name == "consolidation" and params["bronchograms"]:
        return "air bronchograms"
    if name == "pleural_effusion" and params["height"] < 0.18:
        return "blunting"
    if name == "pneumothorax" and params["lower_y"] < anat.apex_y + 0.75:
        return "apical"
    return None


def _record(name: str, params: dict, anat: _Anatomy, masks: dict[str, np.ndarray]) -> dict:
    """The public description of one finding (see PhantomCase.findings)."""
    if name == "no_finding":
        return {"name": name, "side": None, "zone": None, "size_mm": None, "severity": None,
                "detail": None, "box": None, "subtle": False}
    lateral = name in ("pleural_effusion", "pneumothorax", "nodule", "consolidation")
    return {
        "name": name,
        "side": params["side"] if lateral else None,
        "zone": params.get("zone"),
        "size_mm": params.get("size_mm"),
        "severity": _severity(name, params, anat),
        "detail": _detail(name, params, anat),
        "box": _box(masks[name]),
        "subtle": bool(params["subtle"]),
    }


# ---------------------------------------------------------------------------------------------
# Composition.


def _anatomy_attenuation(anat: _Anatomy, frame: _Frame, layers: _Layers) -> np.ndarray:
    """Total attenuation: soft tissue minus lung air, plus vessels, bones and findings."""
    body = _body(anat, frame)
    air = np.maximum(0.72 * frame.lung_depth * frame.lung * layers.air, layers.free_air)
    attenuation = anat.soft * body * (1.0 - air) + anat.soft * _breasts(anat, frame)
    attenuation += 0.02 * frame.heart
    attenuation += _markings(anat, frame) * frame.lung * layers.markings
    ribs = _ribs(anat, frame) * (0.5 + 0.5 * frame.lung_depth)
    bones = ribs + _clavicles(anat, frame) + _spine(anat, frame)
    attenuation += anat.bone * bones * (body > 0.05)
    trachea = np.clip(1 - (frame.x / 0.035) ** 2, 0, 1) ** 0.5 * _smoothstep(-0.12, -0.3, frame.y)
    attenuation -= 0.1 * trachea * _smoothstep(-1.1, -0.9, frame.y)
    attenuation -= 0.2 * anat.soft * _gastric_bubble(anat, frame)
    return attenuation + layers.extra


def _expose(attenuation: np.ndarray, acq: _Acquisition, frame: _Frame,
            noise_rng: np.random.Generator) -> np.ndarray:
    """Film response (saturating exposure curve, gamma), blur, quantum noise and grid lines."""
    scale = frame.size / REFERENCE_SIZE
    film = 1.0 / (1.0 + np.exp(-acq.contrast * (attenuation - acq.exposure)))
    fog = 1.0 / (1.0 + math.exp(acq.contrast * acq.exposure))
    grey = np.clip((film - fog) / (1.0 - fog), 0.0, 1.0) ** acq.gamma + acq.brightness
    grey = ndimage.gaussian_filter(grey, acq.blur_px * scale, mode="nearest")
    mottle = ndimage.gaussian_filter(noise_rng.standard_normal(grey.shape, np.float32), scale)
    grey += acq.noise * (noise_rng.standard_normal(grey.shape, np.float32) + 2.0 * mottle)
    if acq.grid:
        columns = np.arange(frame.size) / (acq.grid_period_px * max(scale, 1.0))
        grey += acq.grid * np.sin(2 * np.pi * columns)[None, :]
    return np.clip(np.rint(grey * 255.0), 0, 255).astype(np.uint8)


def _box(mask: np.ndarray) -> list[int]:
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return [int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1]


def check_case_args(seed: int, index: int, size: int, extra_finding_prob: float,
                    size_range: tuple[int, int | None] = (MIN_SIZE, MAX_SIZE), unit: str = "pixels") -> None:
    """Raise InputError unless the arguments of ``render_case`` are usable (shared by the 2D and
    3D phantoms; ``size_range`` is the allowed image side, ``None`` for no upper bound)."""
    for name, value in (("seed", seed), ("index", index), ("size", size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise InputError(f"{name} must be an integer, got {value!r}", parameter=name)
    for name, value in (("seed", seed), ("index", index)):  # each named alone: index is the library's, not an option
        if value < 0:
            raise InputError(f"{name} must be >= 0, got {value}", parameter=name)
    low, high = size_range
    if size < low or (high is not None and size > high):
        bounds = f">= {low}" if high is None else f"{low}-{high}"
        raise InputError(f"size must be {bounds} {unit}, got {size}", parameter="size")
    if not 0.0 <= float(extra_finding_prob) <= 1.0:
        raise InputError(f"extra_finding_prob must be in [0, 1], got {extra_finding_prob}",
                         parameter="extra_finding_prob")


def _sample_meta(rng: np.random.Generator) -> dict[str, Any]:
    age = int(rng.integers(18, 91))
    sex = "F" if rng.uniform() < 0.5 else "M"
    view = "AP" if rng.uniform() < AP_PROB else "PA"
    return {"age": age, "sex": sex, "view": view}


def render_case(seed: int, index: int, size: int = 128, extra_finding_prob: float = 0.0,
                visit: Visit | None = None, positioning: float = 0.0) -> PhantomCase:
    """Draw case ``index`` of the phantom data set ``seed`` as a ``size`` x ``size`` radiograph.

    ``extra_finding_prob`` is the probability that an abnormal case gets a second, different
    finding (for multi-label use). ``visit`` draws another film of the same patient instead (see
    ``Visit``). ``positioning`` (0-1) varies the patient's placement in the field of view (see the
    module docstring; 0 leaves the case as it always was). Raises InputError for a size below 32, a
    negative seed or index, a probability or positioning outside [0, 1], or a bad visit.
    """
    check_case_args(seed, index, size, extra_finding_prob)
    check_number("positioning", positioning, minimum=0, maximum=1)
    _check_visit(visit)
    seed, index, size = int(seed), int(index), int(size)
    rng = np.random.default_rng([seed, index, _STREAM_IMAGE])
    names = _choose_findings(seed, index, rng, float(extra_finding_prob))
    meta = _sample_meta(rng)
    pose, acq = _sample_pose(rng), _sample_acquisition(rng, meta["view"])
    subtle = {name: bool(rng.uniform() < SUBTLE_PROB) for name in ABNORMAL}
    ctr = _sample_ctr(rng, "cardiomegaly" in names, subtle["cardiomegaly"])
    anat = _sample_anatomy(rng, meta, ctr)
    params = _finding_params(rng, anat, subtle, names)
    noise_key, position_key, patient = [seed, index, _STREAM_NOISE], [seed, index, _STREAM_POSITION], anat
    if visit is not None:
        names, anat = _visit_findings(visit, (seed, index), names, params, anat)
        if visit.number > 0:
            film_rng = np.random.default_rng([seed, index, _STREAM_VISIT, visit.number])
            pose, acq = _sample_pose(film_rng), _sample_acquisition(film_rng, meta["view"])
            noise_key.append(visit.number)
            position_key.append(visit.number)
    if positioning > 0:
        pose = _position(pose, patient, float(positioning), np.random.default_rng(position_key))
    frame = _frame(size, pose, anat)
    mottle_rng = np.random.default_rng([seed, index, _STREAM_MOTTLE])
    findings, masks, layers = _draw_findings(names, params, anat, frame, mottle_rng)
    noise_rng = np.random.default_rng(noise_key)
    image = _expose(_anatomy_attenuation(anat, frame, layers), acq, frame, noise_rng)
    meta = {**meta, "ctr": round(anat.ctr, 3)}
    report = write_report(findings, meta, np.random.default_rng([seed, index, _STREAM_REPORT]))
    anatomy = {"lungs": frame.lung, "heart": frame.heart}
    return PhantomCase(image=image, findings=findings, masks=masks, report=report, meta=meta,
                       anatomy=anatomy)


# ---------------------------------------------------------------------------------------------
# Positioning: the patient's placement in the field of view.


def _position(pose: _Pose, anat: _Anatomy, positioning: float, rng: np.random.Generator) -> _Pose:
    """The pose turned, shrunk and shifted by ``positioning`` (0-1) within the room the thorax leaves.

    Four draws in a fixed order (rotation, shrink, shift x, shift y). Each shift moves from the pose's
    own shift towards a uniform draw over the shifts that keep the lung fields and heart inside
    ``FIELD_LIMIT``, by the fraction ``positioning``, so it stays inside that room."""
    angle = pose.angle + math.radians(positioning * _uniform(rng, -POSITIONING_ROTATION, POSITIONING_ROTATION))
    scale = pose.scale * (1.0 - positioning * _uniform(rng, 0.0, POSITIONING_SHRINK))
    draws = (_uniform(rng, 0.0, 1.0), _uniform(rng, 0.0, 1.0))
    turned = replace(pose, angle=angle, scale=scale, shift_x=0.0, shift_y=0.0)
    shifts = []
    for coords, own, draw in zip(_thorax_in_image(turned, anat), (pose.shift_x, pose.shift_y), draws, strict=True):
        low, high = -FIELD_LIMIT - float(coords.min()), FIELD_LIMIT - float(coords.max())
        if low > high:  # no room at all (never at the drawn poses): centre the thorax
            shifts.append((low + high) / 2)
            continue
        own = min(max(own, low), high)
        shifts.append(own + positioning * (low + draw * (high - low) - own))
    return replace(turned, shift_x=shifts[0], shift_y=shifts[1])


def _thorax_in_image(pose: _Pose, anat: _Anatomy, step: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """Image coordinates (x, y; -1..1) of the lung fields and the heart under ``pose``, sampled on an
    anatomical grid of ``step`` (the inverse of ``_frame``'s pixel-to-patient mapping)."""
    grid = np.arange(-1.2, 1.2, step, dtype=np.float32)
    x, y = grid[None, :], grid[:, None]
    in_chest = (y < _dome(anat, x) + 0.02) & (y > anat.apex_y)
    inside = (_lung_margin(anat, x, y) > 0) | ((_heart_radius(anat, x, y) < 1.0) & in_chest)
    rows, cols = np.nonzero(inside)
    u = grid[cols] * pose.scale * pose.aspect
    v = grid[rows] * pose.scale
    cos, sin = math.cos(pose.angle), math.sin(pose.angle)
    return cos * u - sin * v + pose.shift_x, sin * u + cos * v + pose.shift_y


# ---------------------------------------------------------------------------------------------
# Visits: other films of the same patient.


def _check_visit(visit: Visit | None) -> None:
    if visit is None:
        return
    if not isinstance(visit, Visit):
        raise InputError(f"visit must be a Visit, got {type(visit).__name__}")
    check_number("visit.number", visit.number, minimum=0, integer=True)
    check_number("visit.grow", visit.grow, minimum=GROW_RANGE[0], maximum=GROW_RANGE[1])
    check_number("visit.nodules", visit.nodules, minimum=1, maximum=MAX_NODULES, integer=True)
    allowed = (("absent", visit.absent, ABNORMAL), ("growing", visit.growing, ABNORMAL),
               ("moved", visit.moved, MOVABLE), ("other_side", visit.other_side, LATERAL))
    for option, names, choices in allowed:
        unknown = [name for name in names if name not in choices]
        if unknown or isinstance(names, str):
            raise InputError(f"visit.{option} must be a tuple of findings among {', '.join(choices)}, "
                             f"got {names!r}")
    if visit.nodules > 1 and "nodule" in visit.absent:
        raise InputError("a visit cannot both add nodules and remove the nodule")
    contradictory = sorted(set(visit.absent) & (set(visit.moved) | set(visit.other_side)))
    if contradictory:
        raise InputError(f"visit: {', '.join(contradictory)} cannot be both absent and moved or on the other side")


def _visit_findings(visit: Visit, key: tuple[int, int], names: list[str], params: dict[str, Any],
                    anat: _Anatomy) -> tuple[list[str], _Anatomy]:
    """Locate the findings as on the first film, then move them, add nodules, grow and remove as the
    visit says."""
    drawn: dict[str, dict] = {}
    for name in _RENDER_ORDER:
        if name in names:
            if name in MOVABLE:
                _locate(name, params[name], anat, drawn)
            drawn[name] = params[name]
    _check_sides(visit, names)
    for name in _RENDER_ORDER:  # drawn holds the same dicts: a finding placed later avoids the moved one
        if name in names and (name in visit.moved or name in visit.other_side):
            _relocate(name, params[name], visit, anat, {k: v for k, v in drawn.items() if k != name})
    if visit.nodules > 1:
        if "nodule" not in names:
            raise InputError(f"visit.nodules={visit.nodules} needs a case with a nodule (this one: {', '.join(names)})")
        params["extra_nodules"] = _extra_nodules(visit.nodules - 1, key, params["nodule"], anat, drawn)
    growing = [name for name in names if not visit.growing or name in visit.growing]
    anat = _grow(visit.grow, growing, params, anat)
    if "cardiomegaly" in visit.absent and "cardiomegaly" in names:
        normal = 0.41 + 0.07 * float(np.random.default_rng([*key, _STREAM_VISIT]).uniform())
        anat = replace(anat, pa_ctr=normal, ctr=anat.ctr * normal / anat.pa_ctr)
    kept = [name for name in names if name not in visit.absent]
    return kept or ["no_finding"], anat


def _check_sides(visit: Visit, names: list[str]) -> None:
    """An effusion and a pneumothorax of one case are on opposite sides: they change side together."""
    pair = ("pleural_effusion", "pneumothorax")
    if all(name in names for name in pair) and sum(name in visit.other_side for name in pair) == 1:
        raise InputError("visit.other_side: this case's pleural effusion and pneumothorax are on opposite "
                         "sides; put both or neither on the other side")


def _relocate(name: str, finding: dict, visit: Visit, anat: _Anatomy, others: dict[str, dict]) -> None:
    """Put one finding on the other side and / or one zone lower (see ``Visit.moved``)."""
    if name in visit.other_side:
        finding["side"] = OTHER_SIDE[finding["side"]]
    if name not in MOVABLE:
        return  # an effusion or a pneumothorax is drawn from its side alone
    level = finding["zone"].split()[1]  # where it landed on the first film
    if name in visit.moved:
        level = ZONE_LEVELS[(ZONE_LEVELS.index(level) + 1) % len(ZONE_LEVELS)]
    finding["level"] = level
    _locate(name, finding, anat, others)


def primary_finding(seed: int, index: int) -> str:
    """The primary finding of case ``index`` of data set ``seed``, without rendering it."""
    check_case_args(seed, index, MIN_SIZE, 0.0)
    block = np.random.default_rng([int(seed), int(index) // len(FINDINGS), _STREAM_CLASS])
    return FINDINGS[int(block.permutation(len(FINDINGS))[int(index) % len(FINDINGS)])]


def marker_box(size: int, corner: str = MARKER_CORNER) -> list[int]:
    """Box ``[x0, y0, x1, y1]`` (end-exclusive pixels) of the shortcut marker on a ``size`` px image."""
    if corner not in MARKER_CORNERS:
        raise InputError(f"marker corner must be one of {', '.join(MARKER_CORNERS)}, got {corner!r}")
    side = max(3, round(MARKER_SIDE * size))
    margin = max(1, round(MARKER_MARGIN * size))
    x0 = margin if corner.endswith("left") else size - margin - side
    y0 = margin if corner.startswith("top") else size - margin - side
    return [x0, y0, x0 + side, y0 + side]


def burn_marker(image: np.ndarray, corner: str = MARKER_CORNER) -> np.ndarray:
    """A copy of a square ``uint8`` radiograph with the shortcut marker burned into ``corner``."""
    if image.ndim != 2 or image.shape[0] != image.shape[1]:
        raise InputError(f"burn_marker needs a square 2D image, got shape {image.shape}")
    x0, y0, x1, y1 = marker_box(image.shape[0], corner)
    marked = image.copy()
    marked[y0:y1, x0:x1] = MARKER_VALUE
    return marked


def _grow(factor: float, names: list[str], params: dict[str, dict], anat: _Anatomy) -> _Anatomy:
    """Scale the extent of the findings ``names`` by ``factor`` (see ``Visit.grow``)."""
    if factor == 1.0:
        return anat
    if "nodule" in names:
        for nodule in (params["nodule"], *params.get("extra_nodules", ())):
            nodule["size_mm"] = float(max(1, round((nodule["size_mm"] + 4.0) * factor - 4.0)))
            nodule["radius"] = (nodule["size_mm"] + 4.0) / 190.0
    if "pleural_effusion" in names:
        params["pleural_effusion"]["height"] = min(0.75, params["pleural_effusion"]["height"] * factor)
    if "pneumothorax" in names:
        params["pneumothorax"]["depth"] = min(0.45, params["pneumothorax"]["depth"] * factor)
    if "consolidation" in names:
        params["consolidation"]["spread"] *= factor
        _set_blobs(params["consolidation"])
    if "cardiomegaly" not in names:
        return anat
    pa_ctr = min(0.8, anat.pa_ctr * (1.0 + (factor - 1.0) / 3.0))
    return replace(anat, pa_ctr=pa_ctr, ctr=anat.ctr * pa_ctr / anat.pa_ctr)


def _extra_nodules(count: int, key: tuple[int, int], first: dict, anat: _Anatomy,
                   drawn: dict[str, dict]) -> list[dict]:
    """``count`` more nodules, each in a zone no other nodule holds and clear of the others."""
    rng = np.random.default_rng([*key, _STREAM_NODULES])
    zones = [(side, level) for side in SIDE_SIGN for level in ZONE_LEVELS]
    placed = [first]
    for _ in range(count):
        nodule = {**_nodule_params(rng, subtle=False), "subtle": False}
        order = rng.permutation(len(zones))  # drawn whatever happens next: fixed draws per nodule
        taken = {other["zone"] for other in placed}
        for side, level in (zones[int(k)] for k in order):
            nodule.update(side=side, level=level)
            x, y = _place(anat, drawn, nodule, nodule["radius"])
            zone = _zone_of(anat, x, y)
            if zone not in taken and all(_apart(x, y, nodule, other) for other in placed):
                break
        else:
            raise InputError(f"no room for {count + 1} nodules in case {key[1]}")
        nodule.update(x=x, y=y, zone=zone)
        placed.append(nodule)
    return placed[1:]


def _apart(x: float, y: float, nodule: dict, other: dict) -> bool:
    """True when two nodules (drawn up to 1.15 x their radius across) are clearly separate."""
    gap = 1.15 * (nodule["radius"] + other["radius"]) + 0.04
    return math.hypot(x - other["x"], y - other["y"]) > gap
