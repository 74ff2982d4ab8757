"""Procedural thoraco-abdominal CT volumes with known findings (the 3D phantom).

Each case is drawn from its own random streams seeded by ``(seed, index)``: case ``i`` is the same
whatever the number of cases generated, and the same ``(seed, index, size)`` always gives
identical voxels, masks and report. Everything random except voxel noise is drawn in millimetres,
independently of ``size``, so a case rendered at 32 and at 96 voxels is the same patient.

Conventions
-----------
* **Axes**: volumes are ``(D, H, W)`` = ``(z, y, x)`` in RAS+ order, the order
  ``medvl.clinical.nifti.read_nifti`` returns: axis 0 runs inferior -> superior, axis 1 posterior
  -> anterior, axis 2 the patient's left -> right. A ``side`` ("left" / "right") is always the
  patient's. Files are written with an axis-aligned RAS affine, so reading one gives back the
  array exactly.
* **Values**: Hounsfield units (HU) as ``int16``: air -1000, fat about -100, water 0, fluid 0-20,
  unenhanced soft tissue 35-60, contrast-enhanced organs 100-180, bone 200-600, aerated lung
  about -860.
* **Field of view**: 380 x 380 mm in-plane and 300 mm cranio-caudal whatever the size, from the
  lower chest (heart, lung bases) to the lower poles of the kidneys; voxel spacing is
  ``FOV_MM / size`` (about 5.9 x 5.9 x 4.7 mm at 64 voxels).
* **Phase**: 80 % portal venous (``meta["phase"] == "portal venous"``: liver ~105 HU, kidneys
  ~170 HU, aorta ~170 HU) and 20 % non-contrast (liver ~58 HU, kidneys ~35 HU), where liver
  lesions and renal cysts have less contrast.
* **Findings** (one primary per case, balanced in each block of five consecutive indices like the
  chest radiograph phantom; ``extra_finding_prob`` adds a second, different abnormal one):
  ``liver_lesion`` (hypodense lesion, 20-45 mm, subtle 14-20 mm and closer to the liver's HU),
  ``kidney_cyst`` (simple fluid cyst 0-12 HU, 20-45 mm, subtle 14-20 mm, often exophytic),
  ``lung_nodule`` (solid, 12-28 mm, subtle 9-12 mm), ``pleural_effusion`` (dependent fluid 8-18 HU,
  small 12-22 / moderate 25-40 / large 45-70 mm thick; subtle 10-14 mm). About 20 % of abnormal
  findings are subtle. An effusion and a nodule of one case are on opposite sides.
* **Sizes**: ``size_mm`` is the lesion's drawn diameter (the effusion's maximal thickness). The
  ranges sit at the large end of what is seen clinically, so that findings stay a few voxels wide
  at 64 voxels (5.9 mm); at 32 voxels the smallest show only by partial volume.
* **Boxes**: ``[z0, y0, x0, z1, y1, x1]`` voxel indices, end-exclusive, so
  ``mask[z0:z1, y0:y1, x0:x1]`` holds the whole mask. Masks are the voxels at least half filled
  by the finding (at least one voxel).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from .ct3d_reports import write_ct_report
from .cxr2d import check_case_args as _check_args

FINDINGS: tuple[str, ...] = ("no_finding", "liver_lesion", "kidney_cyst", "lung_nodule", "pleural_effusion")
ABNORMAL = FINDINGS[1:]
FOV_MM = (300.0, 380.0, 380.0)  # (z, y, x) field of view in mm, whatever the size
MIN_SIZE, MAX_SIZE = 16, 256
SUBTLE_PROB = 0.2
CONTRAST_PROB = 0.8  # share of portal venous cases; the rest are non-contrast
PHASES = ("portal venous", "non-contrast")
HU_RANGE = (-1024, 3071)  # int16 values are clipped to the usual CT range

# independent random streams of a case, each seeded by (seed, index, stream)
_STREAM_CASE, _STREAM_REPORT, _STREAM_CLASS, _STREAM_NOISE = 10, 11, 12, 13


@dataclass
class CTCase:
    """One generated CT volume with its ground truth.

    Each entry of ``findings`` (the primary finding first) is a dict with ``name`` (one of
    FINDINGS), ``side`` ("left" / "right", the patient's, or None), ``location`` (e.g. "right
    hepatic lobe", "upper pole of the left kidney", "right lower lobe"; None for no_finding),
    ``size_mm`` (diameter; effusion: maximal thickness), ``hu`` (the finding's attenuation),
    ``severity`` ("small" / "moderate" / "large" for effusions, else None), ``box`` (see module
    docstring; None for no_finding) and ``subtle`` (bool).
    """

    volume: np.ndarray  # int16 (D, H, W) HU, RAS axes (see module docstring)
    spacing: tuple[float, float, float]  # (dz, dy, dx) voxel size in mm
    findings: list[dict[str, Any]]
    masks: dict[str, np.ndarray]  # finding name -> bool (D, H, W); none for no_finding
    report: str  # one line: "FINDINGS: ... IMPRESSION: ..."
    meta: dict[str, Any] = field(default_factory=dict)  # age (18-90), sex (M/F), phase
    anatomy: dict[str, np.ndarray] = field(default_factory=dict)  # bool (D, H, W) organ masks:
    # lungs (aerated lung before findings), liver, spleen, kidneys, spine

    @property
    def finding(self) -> str:
        """The primary finding (one of ``FINDINGS``)."""
        return self.findings[0]["name"]


# ---------------------------------------------------------------------------------------------
# Random parameters, all in mm and independent of the grid size.


@dataclass(frozen=True)
class _Pose:
    angle: float  # radians, rotation about the cranio-caudal axis
    shift: tuple[float, float, float]  # (z, y, x) mm, body centre relative to the FOV centre


@dataclass(frozen=True)
class _Ellipsoid:
    center: tuple[float, float, float]  # (x, y, z) mm in the body frame
    axes: tuple[float, float, float]  # semi-axes (x, y, z) mm
    angle: float = 0.0  # in-plane rotation, radians

    def margin(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """About the distance inside the surface in mm (> 0 inside), broadcast over x, y, z."""
        cos, sin = math.cos(self.angle), math.sin(self.angle)
        dx, dy = x - self.center[0], y - self.center[1]
        u = (cos * dx + sin * dy) / self.axes[0]
        v = (-sin * dx + cos * dy) / self.axes[1]
        w = (z - self.center[2]) / self.axes[2]
        return (1.0 - np.sqrt(u * u + v * v + w * w)) * min(self.axes)

    @property
    def radius(self) -> float:
        return max(self.axes[0], self.axes[1])


@dataclass(frozen=True)
class _Segment:
    start: tuple[float, float, float]  # (x, y, z) mm
    end: tuple[float, float, float]
    radius: float  # mm


@dataclass(frozen=True)
class _Body:
    """One patient's anatomy, in mm in the body frame (x to the patient's right, y anterior, z up)."""

    rx: float  # body semi-axes
    ry: float
    cy: float  # body centre y
    fat: float  # subcutaneous fat thickness
    wall: float  # muscle wall thickness
    dome: tuple[float, float]  # top of the (right, left) diaphragm dome, z
    spine_y: float  # vertebral body centre y
    disc_period: float  # vertebra + disc height
    disc_phase: float
    rib_period: float
    rib_phase: float
    heart: _Ellipsoid
    liver: tuple[_Ellipsoid, _Ellipsoid]  # right and left lobe
    spleen: _Ellipsoid
    stomach: _Ellipsoid
    stomach_air: float  # air above this y inside the stomach (anterior, the patient is supine)
    kidneys: dict[str, _Ellipsoid]  # "right" / "left"
    bowel: tuple[tuple[_Segment, float], ...]  # loops (tubes with a wall) and the HU of their content
    lung_vessels: tuple[_Segment, ...]
    liver_vessels: tuple[_Segment, ...]
    hu: dict[str, float]  # attenuation of each tissue for this patient and phase
    noise: float  # HU standard deviation of the image noise

    @property
    def cavity(self) -> tuple[float, float]:
        """Semi-axes of the body cavity inside the fat and muscle wall."""
        inset = self.fat + self.wall
        return self.rx - inset, self.ry - inset

    @property
    def aorta(self) -> tuple[float, float, float]:
        return (-20.0, self.spine_y + 28.0, 12.0)  # x, y, radius

    @property
    def ivc(self) -> tuple[float, float, float]:
        return (22.0, self.spine_y + 32.0, 11.0)


def _uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(rng.uniform(low, high))


def _tissue_hu(rng: np.random.Generator, contrast: bool) -> dict[str, float]:
    jitter = lambda spread: _uniform(rng, -spread, spread)  # noqa: E731 - a local shorthand
    enhanced = {"liver": 105.0, "spleen": 115.0, "kidney": 170.0, "aorta": 170.0, "ivc": 130.0,
                "heart": 150.0, "vessel_lung": 90.0, "vessel_liver": 165.0, "bowel_wall": 95.0}
    plain = {"liver": 58.0, "spleen": 48.0, "kidney": 35.0, "aorta": 42.0, "ivc": 40.0,
             "heart": 42.0, "vessel_lung": 40.0, "vessel_liver": 38.0, "bowel_wall": 40.0}
    hu = {name: value + jitter(8.0) for name, value in (enhanced if contrast else plain).items()}
    hu.update(fat=-100.0 + jitter(10.0), visceral_fat=-90.0 + jitter(10.0), muscle=45.0 + jitter(8.0),
              lung=-860.0 + jitter(25.0), bone=230.0 + jitter(40.0), cortex=600.0 + jitter(80.0),
              disc=90.0 + jitter(10.0), rib=480.0 + jitter(60.0), csf=15.0 + jitter(5.0),
              fluid=20.0 + jitter(6.0), sinus_fat=-70.0 + jitter(10.0))
    return hu


def _xyz(values: Iterable[float]) -> tuple[float, float, float]:
    x, y, z = (float(v) for v in values)
    return x, y, z


def _segments(rng: np.random.Generator, start: tuple[float, float, float], count: int,
              spread: tuple[float, float, float], radius: tuple[float, float]) -> tuple[_Segment, ...]:
    segments = []
    for _ in range(count):
        end = _xyz(s + _uniform(rng, -d, d) for s, d in zip(start, spread, strict=True))
        segments.append(_Segment(start, end, _uniform(rng, *radius)))
    return tuple(segments)


def _sample_body(rng: np.random.Generator, meta: dict[str, Any]) -> _Body:
    female = meta["sex"] == "F"
    rx, ry = _uniform(rng, 135.0, 168.0), _uniform(rng, 95.0, 122.0)
    cy = _uniform(rng, -10.0, 5.0)
    fat = _uniform(rng, 8.0, 28.0) + (6.0 if female else 0.0)
    wall = _uniform(rng, 8.0, 13.0)
    dome_right = _uniform(rng, 35.0, 65.0)
    dome_left = dome_right - _uniform(rng, 5.0, 20.0)
    spine_y = cy - ry + fat + wall + 62.0
    size = _uniform(rng, 0.9, 1.12)
    contrast = meta["phase"] == PHASES[0]
    kidney_left_z = dome_left - _uniform(rng, 105.0, 125.0)
    kidney_right_z = kidney_left_z - _uniform(rng, 8.0, 22.0)
    kidneys = {
        side: _Ellipsoid((sign * _uniform(rng, 62.0, 74.0), spine_y + _uniform(rng, 2.0, 14.0), z),
                         (_uniform(rng, 24.0, 30.0), _uniform(rng, 27.0, 33.0), _uniform(rng, 47.0, 57.0)),
                         sign * math.radians(_uniform(rng, 20.0, 40.0)))
        for side, sign, z in (("right", 1.0, kidney_right_z), ("left", -1.0, kidney_left_z))
    }
    bowel = []
    for _ in range(int(rng.integers(6, 10))):
        center = np.array([_uniform(rng, -90.0, 90.0), _uniform(rng, cy + 5.0, cy + ry - fat - wall - 25.0),
                           _uniform(rng, -150.0, dome_left - 110.0)])
        angle, tilt, half = _uniform(rng, 0.0, math.pi), _uniform(rng, -0.6, 0.6), _uniform(rng, 20.0, 45.0)
        direction = np.array([math.cos(angle) * math.cos(tilt), math.sin(angle) * math.cos(tilt), math.sin(tilt)])
        content = rng.uniform()  # gas, positive oral contrast or fluid
        hu = -1000.0 if content < 0.4 else _uniform(rng, 200.0, 300.0) if content < 0.8 else _uniform(rng, 10.0, 30.0)
        segment = _Segment(_xyz(center - half * direction), _xyz(center + half * direction), _uniform(rng, 10.0, 15.0))
        bowel.append((segment, hu))
    hilum_z = dome_right + 70.0
    lung_vessels = (_segments(rng, (45.0, cy + 5.0, hilum_z), 6, (60.0, 50.0, 60.0), (1.5, 2.5))
                    + _segments(rng, (-45.0, cy + 5.0, hilum_z), 6, (60.0, 50.0, 60.0), (1.5, 2.5)))
    porta = (30.0, cy + 5.0, dome_right - 65.0)
    return _Body(
        rx=rx, ry=ry, cy=cy, fat=fat, wall=wall, dome=(dome_right, dome_left), spine_y=spine_y,
        disc_period=_uniform(rng, 27.0, 33.0), disc_phase=_uniform(rng, 0.0, 1.0),
        rib_period=_uniform(rng, 36.0, 44.0), rib_phase=_uniform(rng, 0.0, 1.0),
        heart=_Ellipsoid((-25.0 + _uniform(rng, -8.0, 8.0), cy + 38.0, dome_left + 48.0),
                         (60.0 * size, 48.0 * size, 48.0), math.radians(_uniform(rng, 20.0, 40.0))),
        liver=(_Ellipsoid((75.0 * size, cy + 5.0, dome_right - 55.0), (85.0 * size, 78.0 * size, 75.0 * size)),
               _Ellipsoid((5.0, cy + 45.0, dome_right - 35.0), (55.0 * size, 35.0, 35.0 * size))),
        spleen=_Ellipsoid((-82.0, spine_y + 18.0, dome_left - 45.0),
                          (_uniform(rng, 26.0, 34.0), _uniform(rng, 45.0, 58.0), _uniform(rng, 42.0, 55.0)),
                          math.radians(-40.0)),
        stomach=_Ellipsoid((-45.0, cy + 45.0, dome_left - 40.0), (40.0, 33.0, 38.0)),
        stomach_air=cy + 45.0 + _uniform(rng, 5.0, 25.0),
        kidneys=kidneys,
        bowel=tuple(bowel),
        lung_vessels=lung_vessels,
        liver_vessels=_segments(rng, porta, 5, (55.0, 45.0, 45.0), (3.0, 5.0)),
        hu=_tissue_hu(rng, contrast),
        noise=_uniform(rng, 8.0, 16.0) + (4.0 if not contrast else 0.0),
    )


def _sample_pose(rng: np.random.Generator) -> _Pose:
    return _Pose(angle=math.radians(_uniform(rng, -4.0, 4.0)),
                 shift=(_uniform(rng, -12.0, 12.0), _uniform(rng, -8.0, 8.0), _uniform(rng, -10.0, 10.0)))


def _sample_meta(rng: np.random.Generator) -> dict[str, Any]:
    age = int(rng.integers(18, 91))
    sex = "F" if rng.uniform() < 0.5 else "M"
    phase = PHASES[0] if rng.uniform() < CONTRAST_PROB else PHASES[1]
    return {"age": age, "sex": sex, "phase": phase}


# ---------------------------------------------------------------------------------------------
# Geometry: the analytic shapes, evaluated on any broadcastable x, y, z arrays (mm, body frame).


def _ellipse_margin(x, y, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    return (1.0 - np.sqrt(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2)) * min(rx, ry)


def _circle_margin(x, y, cx: float, cy: float, r: float) -> np.ndarray:
    return r - np.sqrt((x - cx) ** 2 + (y - cy) ** 2)


def _dome(body: _Body, x, y) -> np.ndarray:
    """Height of the diaphragm under (x, y): highest mid-clavicular, lowest in the posterior recess."""
    top = np.where(x > 0, np.float32(body.dome[0]), np.float32(body.dome[1]))
    posterior = np.clip((body.cy - y) / body.ry, 0.0, 1.0)
    return top - 20.0 * ((np.abs(x) - 60.0) / 70.0) ** 2 - 45.0 * posterior**2


def _lung_margin(body: _Body, x, y, z) -> np.ndarray:
    """About the distance inside the aerated lungs (> 0 inside): cavity, mediastinum, heart, dome."""
    cavity_x, cavity_y = body.cavity
    ax, ay, ar = body.aorta
    margin = _ellipse_margin(x, y, 0.0, body.cy, cavity_x - 3.0, cavity_y - 3.0)
    margin = np.minimum(margin, np.abs(x) - 30.0)
    margin = np.minimum(margin, -_circle_margin(x, y, ax, ay, ar + 3.0))
    margin = np.minimum(margin, -_circle_margin(x, y, 0.0, body.spine_y, 24.0))
    margin = np.minimum(margin, z - _dome(body, x, y))
    return np.minimum(margin, -body.heart.margin(x, y, z) - 3.0)


def _liver_margin(body: _Body, x, y, z) -> np.ndarray:
    cavity_x, cavity_y = body.cavity
    lobes = np.maximum(body.liver[0].margin(x, y, z), body.liver[1].margin(x, y, z))
    lobes = np.minimum(lobes, _dome(body, x, y) - 4.0 - z)
    return np.minimum(lobes, _ellipse_margin(x, y, 0.0, body.cy, cavity_x - 2.0, cavity_y - 2.0))


def _under_dome(body: _Body, shape: _Ellipsoid, x, y, z) -> np.ndarray:
    return np.minimum(shape.margin(x, y, z), _dome(body, x, y) - 4.0 - z)


def _effusion_back(body: _Body, x) -> np.ndarray:
    """The y of the posterior inner chest wall at x."""
    cavity_x, cavity_y = body.cavity
    return body.cy - cavity_y * np.sqrt(np.clip(1.0 - (x / cavity_x) ** 2, 0.0, 1.0))


def _effusion_margin(body: _Body, params: dict[str, Any], x, y, z) -> np.ndarray:
    """Dependent fluid in one pleural space: thickest at the base, tapering upwards (meniscus)."""
    sign = 1.0 if params["side"] == "right" else -1.0
    base = body.dome[0 if sign > 0 else 1] - 30.0
    thickness = params["thickness"] * np.clip(1.0 - (z - base) / 170.0, 0.2, 1.0)
    fluid = thickness - (y - _effusion_back(body, x))
    space = np.minimum(_lung_margin(body, x, y, z) + 3.0, sign * x - 30.0)
    return np.minimum(space, fluid)


# ---------------------------------------------------------------------------------------------
# The voxel grid and painting.


@dataclass(frozen=True)
class _Grid:
    """Body-frame coordinates (mm) of the voxel centres of a (D, H, W) grid."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]  # (dz, dy, dx) mm
    pose: _Pose
    x: np.ndarray  # (H, W) float32
    y: np.ndarray  # (H, W)
    z: np.ndarray  # (D,)

    @property
    def voxel(self) -> float:
        """Mean voxel side (mm): the width of the partial-volume edge."""
        return float(np.mean(self.spacing))

    def box(self, center: tuple[float, float, float], radius: float, radius_z: float) -> tuple[slice, ...]:
        """Grid slices that hold a shape of in-plane ``radius`` and half-height ``radius_z`` at ``center``."""
        cos, sin = math.cos(self.pose.angle), math.sin(self.pose.angle)
        x, y, z = center
        gx = cos * x - sin * y + self.pose.shift[2]
        gy = sin * x + cos * y + self.pose.shift[1]
        gz = z + self.pose.shift[0]
        slices = []
        for value, half, axis in ((gz, radius_z, 0), (gy, radius, 1), (gx, radius, 2)):
            index = (value + FOV_MM[axis] / 2.0) / self.spacing[axis] - 0.5
            reach = half / self.spacing[axis] + 2.0
            low = int(np.clip(math.floor(index - reach), 0, self.shape[axis]))
            high = int(np.clip(math.ceil(index + reach) + 1, 0, self.shape[axis]))
            slices.append(slice(low, high))
        return tuple(slices)

    def coords(self, box: tuple[slice, ...] = (slice(None),) * 3):
        """Broadcastable (x, y, z) of the voxels in ``box``: (h, w), (h, w), (d, 1, 1)."""
        return self.x[box[1], box[2]], self.y[box[1], box[2]], self.z[box[0]][:, None, None]


def _grid(size: int, pose: _Pose) -> _Grid:
    shape = (size, size, size)
    spacing = tuple(fov / size for fov in FOV_MM)
    centers = [((np.arange(n) + 0.5) * s - fov / 2.0).astype(np.float32)
               for n, s, fov in zip(shape, spacing, FOV_MM, strict=True)]
    gz, gy, gx = centers
    cos, sin = math.cos(pose.angle), math.sin(pose.angle)
    dx, dy = gx[None, :] - pose.shift[2], gy[:, None] - pose.shift[1]
    x = (cos * dx + sin * dy).astype(np.float32)
    y = (-sin * dx + cos * dy).astype(np.float32)
    return _Grid(shape, spacing, pose, x, y, (gz - pose.shift[0]).astype(np.float32))  # type: ignore[arg-type]


def _soft(margin: np.ndarray, voxel: float) -> np.ndarray:
    """Partial-volume occupancy from a margin in mm: 0 outside, 1 inside, a one-voxel ramp."""
    return np.clip(0.5 + margin / voxel, 0.0, 1.0).astype(np.float32)


def _paint(volume: np.ndarray, occupancy: np.ndarray, hu, box: tuple[slice, ...] = (slice(None),) * 3) -> None:
    region = volume[box]
    region += occupancy * (hu - region)


def _paint_shape(volume: np.ndarray, grid: _Grid, shape: _Ellipsoid, hu: float, margin_fn=None) -> np.ndarray:
    """Paint an ellipsoid (or ``margin_fn(x, y, z)`` within its box); returns the full-size occupancy."""
    box = grid.box(shape.center, shape.radius, shape.axes[2])
    x, y, z = grid.coords(box)
    margin = shape.margin(x, y, z) if margin_fn is None else margin_fn(x, y, z)
    occupancy = _soft(np.broadcast_to(margin, (z.shape[0], *x.shape)), grid.voxel)
    _paint(volume, occupancy, hu, box)
    full = np.zeros(volume.shape, np.float32)
    full[box] = occupancy
    return full


def _segment_margin(segment: _Segment, x, y, z) -> np.ndarray:
    start, end = np.array(segment.start, np.float32), np.array(segment.end, np.float32)
    direction = end - start
    length2 = float(direction @ direction) or 1.0
    t = np.clip(((x - start[0]) * direction[0] + (y - start[1]) * direction[1]
                 + (z - start[2]) * direction[2]) / length2, 0.0, 1.0)
    distance = np.sqrt((x - start[0] - t * direction[0]) ** 2 + (y - start[1] - t * direction[1]) ** 2
                       + (z - start[2] - t * direction[2]) ** 2)
    return segment.radius - distance


def _paint_segments(volume: np.ndarray, grid: _Grid, segments, hu: float, within: np.ndarray | None = None) -> None:
    """Tubes (vessels, bowel) drawn only where ``within`` (an occupancy, if given) allows."""
    for segment in segments:
        center = tuple((a + b) / 2.0 for a, b in zip(segment.start, segment.end, strict=True))
        half = 0.5 * math.dist(segment.start, segment.end) + segment.radius
        box = grid.box(center, half, half)
        x, y, z = grid.coords(box)
        occupancy = _soft(_segment_margin(segment, x, y, z), grid.voxel)
        if within is not None:
            occupancy = occupancy * within[box]
        _paint(volume, occupancy, hu, box)


# ---------------------------------------------------------------------------------------------
# Normal anatomy.


def _paint_wall(volume: np.ndarray, grid: _Grid, body: _Body) -> None:
    """Body outline, subcutaneous fat, muscle wall, visceral fat, paraspinal muscles."""
    hu, voxel, x, y = body.hu, grid.voxel, grid.x, grid.y
    cavity_x, cavity_y = body.cavity
    volume[:] = -1000.0
    _paint(volume, _soft(_ellipse_margin(x, y, 0.0, body.cy, body.rx, body.ry), voxel), hu["fat"])
    inner_x, inner_y = body.rx - body.fat, body.ry - body.fat
    _paint(volume, _soft(_ellipse_margin(x, y, 0.0, body.cy, inner_x, inner_y), voxel), hu["muscle"])
    _paint(volume, _soft(_ellipse_margin(x, y, 0.0, body.cy, cavity_x, cavity_y), voxel), hu["visceral_fat"])
    for sign in (1.0, -1.0):
        muscle = _ellipse_margin(x, y, sign * 38.0, body.spine_y - 35.0, 26.0, 22.0)
        _paint(volume, _soft(muscle, voxel), hu["muscle"])


def _paint_spine(volume: np.ndarray, grid: _Grid, body: _Body) -> np.ndarray:
    """Vertebral bodies with discs, cortex, canal and posterior elements; returns the bone mask."""
    hu, voxel, x, y = body.hu, grid.voxel, grid.x, grid.y
    disc = ((grid.z / body.disc_period + body.disc_phase) % 1.0) < 0.22
    level_hu = np.where(disc, hu["disc"], hu["bone"]).astype(np.float32)[:, None, None]
    vertebra = _soft(_circle_margin(x, y, 0.0, body.spine_y, 17.0), voxel)
    _paint(volume, vertebra[None], level_hu)
    cortex = _soft(np.minimum(_circle_margin(x, y, 0.0, body.spine_y, 17.0),
                              -_circle_margin(x, y, 0.0, body.spine_y, 13.5)), voxel)
    _paint(volume, cortex[None] * ~disc[:, None, None], hu["cortex"])
    posterior = _soft(_ellipse_margin(x, y, 0.0, body.spine_y - 44.0, 18.0, 10.0), voxel)
    _paint(volume, posterior, hu["cortex"] * 0.7)
    _paint(volume, _soft(_circle_margin(x, y, 0.0, body.spine_y - 26.0, 8.0), voxel), hu["csf"])
    return np.broadcast_to(((vertebra > 0.5) | (posterior > 0.5))[None], volume.shape).copy()


def _paint_ribs(volume: np.ndarray, grid: _Grid, body: _Body) -> None:
    """Oblique ribs in a ring at the inner chest wall, descending anteriorly; absent at the front."""
    cavity_x, cavity_y = body.cavity
    ring = np.minimum(_ellipse_margin(grid.x, grid.y, 0.0, body.cy, cavity_x + 9.0, cavity_y + 9.0),
                      -_ellipse_margin(grid.x, grid.y, 0.0, body.cy, cavity_x, cavity_y))
    rows, cols = np.nonzero(ring > -grid.voxel)
    if rows.size == 0:
        return
    x, y = grid.x[rows, cols], grid.y[rows, cols]
    around = np.arctan2(x, -(y - body.cy))  # 0 at the back, +-pi at the front
    descent = 35.0 * (1.0 - np.cos(around))
    z = grid.z[:, None]
    phase = (z + descent[None]) / body.rib_period + body.rib_phase
    band = np.clip((np.cos(2 * np.pi * phase) - 0.55) * 4.0, 0.0, 1.0)
    present = (np.abs(around) < math.radians(150.0))[None] & (z > -100.0 + 0.5 * descent[None])
    occupancy = band * present * _soft(ring[rows, cols], grid.voxel)[None]
    region = volume[:, rows, cols]
    volume[:, rows, cols] = region + occupancy * (body.hu["rib"] - region)


def _paint_thorax(volume: np.ndarray, grid: _Grid, body: _Body) -> np.ndarray:
    """Great vessels, heart, lungs with vessels; returns the lung occupancy."""
    hu, voxel = body.hu, grid.voxel
    for name, (cx, cy, r) in (("aorta", body.aorta), ("ivc", body.ivc)):
        _paint(volume, _soft(_circle_margin(grid.x, grid.y, cx, cy, r), voxel), hu[name])
    heart = body.heart
    _paint_shape(volume, grid, heart, hu["heart"],
                 lambda x, y, z: np.minimum(heart.margin(x, y, z), z - _dome(body, x, y)))
    x, y, z = grid.coords()
    lungs = _soft(_lung_margin(body, x, y, z), voxel)
    _paint(volume, lungs, hu["lung"])
    _paint_segments(volume, grid, body.lung_vessels, hu["vessel_lung"], lungs)
    return lungs


def _paint_abdomen(volume: np.ndarray, grid: _Grid, body: _Body) -> dict[str, np.ndarray]:
    """Bowel, stomach, spleen, liver with vessels, kidneys; returns organ occupancies."""
    hu = body.hu
    for loop, content in body.bowel:
        _paint_segments(volume, grid, [loop], hu["bowel_wall"])
        _paint_segments(volume, grid, [_Segment(loop.start, loop.end, loop.radius - 3.0)], content)
    stomach = body.stomach
    _paint_shape(volume, grid, stomach, hu["fluid"], lambda x, y, z: _under_dome(body, stomach, x, y, z))
    _paint_shape(volume, grid, stomach, -1000.0, lambda x, y, z: np.minimum(
        _under_dome(body, stomach, x, y, z) - 3.0, y - body.stomach_air))
    organs = {"spleen": _paint_shape(volume, grid, body.spleen, hu["spleen"],
                                     lambda x, y, z: _under_dome(body, body.spleen, x, y, z))}
    liver_box = _Ellipsoid((40.0, body.cy + 20.0, body.dome[0] - 50.0), (150.0, 120.0, 110.0))
    organs["liver"] = _paint_shape(volume, grid, liver_box, hu["liver"],
                                   lambda x, y, z: _liver_margin(body, x, y, z))
    _paint_segments(volume, grid, body.liver_vessels, hu["vessel_liver"], organs["liver"])
    _paint(volume, _soft(_circle_margin(grid.x, grid.y, *body.ivc), grid.voxel), hu["ivc"])
    kidneys = np.zeros(volume.shape, np.float32)
    for side, kidney in body.kidneys.items():
        kidneys = np.maximum(kidneys, _paint_shape(volume, grid, kidney, hu["kidney"]))
        medial = -1.0 if side == "right" else 1.0
        sinus = _Ellipsoid((kidney.center[0] + medial * 12.0, kidney.center[1] + 4.0, kidney.center[2]),
                           (6.0, 8.0, kidney.axes[2] * 0.4), kidney.angle)
        _paint_shape(volume, grid, sinus, hu["sinus_fat"])
    organs["kidneys"] = kidneys
    return organs


# ---------------------------------------------------------------------------------------------
# Findings: parameters drawn in a fixed order for every case (used or not), then drawn.


def _choose_findings(seed: int, index: int, rng: np.random.Generator, extra_prob: float) -> list[str]:
    """Primary finding from a seeded shuffle of each block of five indices, maybe one more."""
    block = np.random.default_rng([seed, index // len(FINDINGS), _STREAM_CLASS])
    primary = FINDINGS[int(block.permutation(len(FINDINGS))[index % len(FINDINGS)])]
    extra_draw, extra_pick = rng.uniform(), rng.uniform()
    if primary == "no_finding" or extra_draw >= extra_prob:
        return [primary]
    others = [name for name in ABNORMAL if name != primary]
    return [primary, others[int(extra_pick * len(others))]]


def _sample_in(rng: np.random.Generator, margin_fn, low, high, need: float, tries: int = 400):
    """A random point (x, y, z) with ``margin_fn`` >= ``need``; the deepest candidate otherwise."""
    points = rng.uniform(low, high, size=(tries, 3)).astype(np.float32)
    margins = margin_fn(points[:, 0], points[:, 1], points[:, 2])
    ok = np.flatnonzero(margins >= need)
    pick = int(ok[0]) if ok.size else int(np.argmax(margins))
    return tuple(float(v) for v in points[pick]), float(margins[pick])


def _fov_z(pose: _Pose, margin: float) -> tuple[float, float]:
    """The body-frame z range inside the field of view, ``margin`` mm from its ends."""
    half = FOV_MM[0] / 2.0 - margin
    return -half - pose.shift[0], half - pose.shift[0]


def _finding_params(rng: np.random.Generator, body: _Body, pose: _Pose, names: list[str],
                    contrast: bool) -> dict[str, dict[str, Any]]:
    subtle = {name: bool(rng.uniform() < SUBTLE_PROB) for name in ABNORMAL}
    sides = {name: ("right", "left")[int(rng.integers(2))] for name in ABNORMAL}
    if "pleural_effusion" in names and "lung_nodule" in names:
        sides["lung_nodule"] = "left" if sides["pleural_effusion"] == "right" else "right"
    params = {
        "liver_lesion": _liver_lesion_params(rng, body, pose, subtle["liver_lesion"], contrast),
        "kidney_cyst": _cyst_params(rng, body, sides["kidney_cyst"], subtle["kidney_cyst"]),
        "lung_nodule": _nodule_params(rng, body, pose, sides["lung_nodule"], subtle["lung_nodule"]),
        "pleural_effusion": _effusion_params(rng, sides["pleural_effusion"], subtle["pleural_effusion"]),
    }
    for name in ABNORMAL:
        params[name]["subtle"] = subtle[name]
    return params


def _liver_lesion_params(rng, body: _Body, pose: _Pose, subtle: bool, contrast: bool) -> dict[str, Any]:
    diameter = _uniform(rng, 14.0, 20.0) if subtle else _uniform(rng, 20.0, 45.0)
    liver = body.hu["liver"]
    drop = _uniform(rng, 30.0, 40.0) if subtle else _uniform(rng, 60.0, 100.0)
    hu = liver - (drop if contrast else drop * 0.55)
    low_z, high_z = _fov_z(pose, diameter / 2 + 5.0)
    center, _ = _sample_in(rng, lambda x, y, z: _liver_margin(body, x, y, z),
                           (-50.0, body.cy - 80.0, max(low_z, body.dome[0] - 140.0)),
                           (170.0, body.cy + 90.0, min(high_z, body.dome[0])), diameter / 2 + 6.0)
    lobe = "right hepatic lobe" if center[0] > 15.0 else "left hepatic lobe"
    return {"center": center, "diameter": diameter, "hu": hu, "location": lobe,
            "stretch": tuple(_uniform(rng, 0.85, 1.15) for _ in range(3))}


def _cyst_params(rng, body: _Body, side: str, subtle: bool) -> dict[str, Any]:
    diameter = _uniform(rng, 14.0, 20.0) if subtle else _uniform(rng, 20.0, 45.0)
    kidney = body.kidneys[side]
    direction = rng.standard_normal(3)
    direction /= np.linalg.norm(direction) or 1.0
    depth = _uniform(rng, 0.3, 0.7)
    cos, sin = math.cos(kidney.angle), math.sin(kidney.angle)
    u, v, w = (direction * depth * np.array(kidney.axes)).tolist()
    center = (kidney.center[0] + cos * u - sin * v, kidney.center[1] + sin * u + cos * v, kidney.center[2] + w)
    third = kidney.axes[2] / 3.0
    pole = "upper pole" if w > third else "lower pole" if w < -third else "interpolar region"
    return {"center": center, "diameter": diameter, "hu": _uniform(rng, 0.0, 12.0), "side": side,
            "location": f"{pole} of the {side} kidney"}


def _nodule_params(rng, body: _Body, pose: _Pose, side: str, subtle: bool) -> dict[str, Any]:
    diameter = _uniform(rng, 9.0, 12.0) if subtle else _uniform(rng, 12.0, 28.0)
    sign = 1.0 if side == "right" else -1.0
    low_z, high_z = _fov_z(pose, diameter / 2 + 4.0)
    cavity_x, cavity_y = body.cavity
    low = (min(sign * 30.0, sign * cavity_x), body.cy - cavity_y, max(low_z, min(body.dome) - 70.0))
    high = (max(sign * 30.0, sign * cavity_x), body.cy + cavity_y, high_z)
    center, _ = _sample_in(rng, lambda x, y, z: _lung_margin(body, x, y, z), low, high, diameter / 2 + 4.0)
    anterior = center[1] > body.cy + 5.0
    if center[2] > max(body.dome) + 90.0:
        lobe = f"{side} upper lobe"
    elif anterior:
        lobe = "right middle lobe" if side == "right" else "lingula"
    else:
        lobe = f"{side} lower lobe"
    return {"center": center, "diameter": diameter, "hu": _uniform(rng, 25.0, 55.0), "side": side,
            "location": lobe}


def _effusion_params(rng, side: str, subtle: bool) -> dict[str, Any]:
    severity = ("small", "moderate", "large")[int(rng.integers(3))]
    ranges = {"small": (12.0, 22.0), "moderate": (25.0, 40.0), "large": (45.0, 70.0)}
    thickness = _uniform(rng, 10.0, 14.0) if subtle else _uniform(rng, *ranges[severity])
    severity = "small" if subtle else severity
    return {"side": side, "thickness": thickness, "severity": severity, "hu": _uniform(rng, 8.0, 18.0),
            "location": f"{side} pleural space"}


def _draw_finding(volume: np.ndarray, grid: _Grid, body: _Body, name: str,
                  params: dict[str, Any], lungs: np.ndarray) -> np.ndarray:
    """Paint one finding; returns its occupancy (full size)."""
    if name == "pleural_effusion":
        x, y, z = grid.coords()
        occupancy = _soft(_effusion_margin(body, params, x, y, z), grid.voxel)
        _paint(volume, occupancy, params["hu"])
        return occupancy
    radius = params["diameter"] / 2.0
    stretch = params.get("stretch", (1.0, 1.0, 1.0))
    shape = _Ellipsoid(params["center"], tuple(radius * s for s in stretch))
    if name == "lung_nodule":
        return _paint_shape(volume, grid, shape, params["hu"],
                            lambda x, y, z: np.minimum(shape.margin(x, y, z), _lung_margin(body, x, y, z) + 2.0))
    return _paint_shape(volume, grid, shape, params["hu"])


def _mask(occupancy: np.ndarray) -> np.ndarray:
    mask = occupancy >= 0.5
    if not mask.any():
        mask.flat[int(np.argmax(occupancy))] = True
    return mask


def _box(mask: np.ndarray) -> list[int]:
    bounds = [np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
    return [int(b[0]) for b in bounds] + [int(b[-1]) + 1 for b in bounds]


def _record(name: str, params: dict[str, Any], mask: np.ndarray | None) -> dict[str, Any]:
    """The public description of one finding (see CTCase.findings)."""
    if name == "no_finding" or mask is None:
        return {"name": name, "side": None, "location": None, "size_mm": None, "hu": None,
                "severity": None, "box": None, "subtle": False}
    size = params["thickness"] if name == "pleural_effusion" else params["diameter"]
    return {"name": name, "side": params.get("side"), "location": params["location"],
            "size_mm": round(float(size), 1), "hu": round(float(params["hu"]), 1),
            "severity": params.get("severity"), "box": _box(mask), "subtle": bool(params["subtle"])}


# ---------------------------------------------------------------------------------------------
# The case.


def check_case_args(seed: int, index: int, size: int, extra_finding_prob: float) -> None:
    """Raise InputError unless the arguments of ``render_case`` are usable."""
    _check_args(seed, index, size, extra_finding_prob, size_range=(MIN_SIZE, MAX_SIZE), unit="voxels for a CT phantom")


def _acquire(volume: np.ndarray, grid: _Grid, body: _Body, rng: np.random.Generator) -> np.ndarray:
    """Scanner blur and correlated noise, then int16 HU."""
    sigma = [1.2 / s for s in grid.spacing]  # about a 1.2 mm point spread, in voxels
    volume = ndimage.gaussian_filter(volume, sigma, mode="nearest")
    noise = rng.standard_normal(volume.shape, dtype=np.float32)
    noise = ndimage.gaussian_filter(noise, 0.6, mode="wrap") * 1.9  # keeps about unit variance
    volume += body.noise * noise
    return np.clip(np.rint(volume), *HU_RANGE).astype(np.int16)


def render_case(seed: int, index: int, size: int = 64, extra_finding_prob: float = 0.0) -> CTCase:
    """Draw case ``index`` of the CT phantom ``seed`` as a ``size``-voxel cube (see module docstring)."""
    check_case_args(seed, index, size, extra_finding_prob)
    seed, index, size = int(seed), int(index), int(size)
    rng = np.random.default_rng([seed, index, _STREAM_CASE])
    names = _choose_findings(seed, index, rng, float(extra_finding_prob))
    meta = _sample_meta(rng)
    pose, body = _sample_pose(rng), _sample_body(rng, meta)
    params = _finding_params(rng, body, pose, names, meta["phase"] == PHASES[0])
    grid = _grid(size, pose)
    volume = np.empty(grid.shape, np.float32)
    _paint_wall(volume, grid, body)
    spine = _paint_spine(volume, grid, body)
    _paint_ribs(volume, grid, body)
    lungs = _paint_thorax(volume, grid, body)
    organs = _paint_abdomen(volume, grid, body)
    findings, masks = [], {}
    for name in names:
        mask = None
        if name != "no_finding":
            mask = masks[name] = _mask(_draw_finding(volume, grid, body, name, params[name], lungs))
        findings.append(_record(name, params.get(name, {}), mask))
    volume = _acquire(volume, grid, body, np.random.default_rng([seed, index, _STREAM_NOISE]))
    report = write_ct_report(findings, meta, np.random.default_rng([seed, index, _STREAM_REPORT]))
    anatomy = {"lungs": lungs >= 0.5, "liver": organs["liver"] >= 0.5, "spleen": organs["spleen"] >= 0.5,
               "kidneys": organs["kidneys"] >= 0.5, "spine": spine}
    return CTCase(volume=volume, spacing=grid.spacing, findings=findings, masks=masks, report=report,
                  meta=meta, anatomy=anatomy)
