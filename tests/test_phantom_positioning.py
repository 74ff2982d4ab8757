"""Patient positioning in the chest X-ray phantom (``render_case(positioning=S)``, ``medvl phantom --positioning``)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from cli_helpers import invoke
from medvl.data.phantom import Visit, generate_phantom, render_case
from medvl.data.phantom.cxr2d import FIELD_LIMIT, primary_finding
from medvl.errors import InputError

SEED = 5

# sha256 of the pixels (uint8, row-major) of cases 0-2 of seed 3 at 128 px, as written by
# `medvl phantom --n 36 --size 128 --seed 3` before the positioning option existed: the default
# output must not change.
GOLDEN_PIXELS = {
    0: "48d891e766e5585bd5d8ee6ff9c9892e5e9902422fb9f2e108721bf5f274e2f1",
    1: "7630babef2c189d8b53e978fc10fea514ad4dea24eb1f4e596ea1a59e38059a5",
    2: "d8700379c9c90fffcb4d9dfa1b1c1d8867c9622ee7abb482fd62c90ed47b59ae",
}


def _pixel_sha(image: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()


def _changed_most(case, name: str, size: int, positioning: float) -> tuple[int, int]:
    """(row, column) where removing finding ``name`` from the same film changes the pixels most."""
    twin = render_case(SEED, case, size, positioning=positioning, visit=Visit(number=0, absent=(name,)))
    original = render_case(SEED, case, size, positioning=positioning)
    change = np.abs(original.image.astype(float) - twin.image.astype(float))
    change = ndimage.gaussian_filter(change, 1.0)  # one noisy pixel does not make the peak
    row, col = np.unravel_index(int(change.argmax()), change.shape)
    return int(row), int(col)


def _in_box(point: tuple[int, int], box: list[int], grow: int = 3) -> bool:
    row, col = point
    x0, y0, x1, y1 = box
    return x0 - grow <= col < x1 + grow and y0 - grow <= row < y1 + grow


def test_default_is_unchanged_and_zero_means_off():
    for index, digest in GOLDEN_PIXELS.items():
        assert _pixel_sha(render_case(3, index, 128).image) == digest
    for index in range(6):
        plain, off = render_case(SEED, index, 64), render_case(SEED, index, 64, positioning=0.0)
        assert np.array_equal(plain.image, off.image)
        assert plain.findings == off.findings and plain.report == off.report
        assert all(np.array_equal(plain.masks[k], off.masks[k]) for k in plain.masks)


def test_generated_default_files_are_byte_identical_and_positioning_is_recorded(tmp_path):
    generate_phantom(tmp_path / "plain", n=8, seed=SEED, size=48)
    generate_phantom(tmp_path / "off", n=8, seed=SEED, size=48, positioning=0.0)
    generate_phantom(tmp_path / "placed", n=8, seed=SEED, size=48, positioning=0.5)
    for path in sorted(p.relative_to(tmp_path / "plain") for p in (tmp_path / "plain").rglob("*") if p.is_file()):
        assert (tmp_path / "plain" / path).read_bytes() == (tmp_path / "off" / path).read_bytes(), path
    assert "positioning" not in json.loads((tmp_path / "plain" / "dataset.json").read_text())["generator"]
    assert json.loads((tmp_path / "placed" / "dataset.json").read_text())["generator"]["positioning"] == 0.5
    plain = np.asarray(Image.open(tmp_path / "plain" / "images" / "phantom_00000.png"))
    placed = np.asarray(Image.open(tmp_path / "placed" / "images" / "phantom_00000.png"))
    assert not np.array_equal(plain, placed)


def test_positioning_is_deterministic_and_moves_the_patient():
    moved = 0
    for index in range(12):
        first = render_case(SEED, index, 64, positioning=1.0)
        again = render_case(SEED, index, 64, positioning=1.0)
        assert np.array_equal(first.image, again.image) and first.findings == again.findings
        plain = render_case(SEED, index, 64)
        assert first.report == plain.report and first.meta == plain.meta  # the same patient and findings
        lung_shift = np.abs(np.argwhere(first.anatomy["lungs"]).mean(0) - np.argwhere(plain.anatomy["lungs"]).mean(0))
        moved += bool(lung_shift.max() > 2)
    assert moved >= 8


def test_a_twin_keeps_the_positioning_of_its_film():
    for index in range(6):
        film = render_case(SEED, index, 64, positioning=1.0)
        twin = render_case(SEED, index, 64, positioning=1.0, visit=Visit(number=0))
        assert np.array_equal(film.image, twin.image)
        later = render_case(SEED, index, 64, positioning=1.0, visit=Visit(number=1))
        assert not np.array_equal(film.image, later.image)


def test_boxes_and_masks_follow_the_finding_pixels():
    """Removing a finding from the same film changes the pixels most inside its box (grown by 3 px),
    with and without positioning; the unpositioned box misses the positioned finding on many cases."""
    missed_by_old_box = checked = 0
    for index in range(48):
        placed = render_case(SEED, index, 96, positioning=1.0)
        finding = placed.findings[0]
        if finding["box"] is None:
            continue
        checked += 1
        peak = _changed_most(index, finding["name"], 96, 1.0)
        assert _in_box(peak, finding["box"]), (index, finding["name"], finding["box"], peak)
        mask = placed.masks[finding["name"]]
        rows, cols = np.nonzero(mask)
        assert finding["box"] == [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]
        plain = render_case(SEED, index, 96).findings[0]
        assert _in_box(_changed_most(index, finding["name"], 96, 0.0), plain["box"])
        missed_by_old_box += not _in_box(peak, plain["box"])
    assert checked >= 35 and missed_by_old_box >= checked // 4


def test_thorax_stays_whole_in_the_field():
    margin = 64 * (1 - FIELD_LIMIT) / 2 - 1  # pixels outside FIELD_LIMIT, less rounding
    for index in range(60):
        case = render_case(SEED, index, 64, positioning=1.0)
        rows, cols = np.nonzero(case.anatomy["lungs"] | case.anatomy["heart"])
        assert min(rows.min(), cols.min()) >= margin and max(rows.max(), cols.max()) < 64 - margin
        for finding in case.findings:
            if finding["box"] is not None:
                x0, y0, x1, y1 = finding["box"]
                assert 0 < x0 < x1 < 64 and 0 < y0 < y1 < 64


def test_image_centre_is_no_longer_always_in_the_heart_box():
    """Without positioning the centre pixel lies in every cardiomegaly box (a centre prior wins by
    construction); with positioning 1 only on some."""
    hearts = [i for i in range(240) if primary_finding(SEED, i) == "cardiomegaly"][:30]

    def centre_inside(positioning: float) -> float:
        boxes = [render_case(SEED, i, 64, positioning=positioning).findings[0]["box"] for i in hearts]
        return float(np.mean([x0 <= 32 < x1 and y0 <= 32 < y1 for x0, y0, x1, y1 in boxes]))

    assert centre_inside(0.0) == 1.0
    assert 0.2 <= centre_inside(1.0) <= 0.8


@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan"), "0.5"])
def test_bad_positioning_is_refused(value):
    with pytest.raises(InputError, match="positioning"):
        render_case(SEED, 0, 64, positioning=value)


def test_positioning_needs_chest_radiographs_without_vqa(tmp_path):
    with pytest.raises(InputError, match="cxr2d"):
        generate_phantom(tmp_path / "ct", n=2, size=32, kind="ct3d", positioning=0.5)
    with pytest.raises(InputError, match="VQA"):
        generate_phantom(tmp_path / "vqa", n=6, size=32, vqa=True, positioning=0.5)
    assert not (tmp_path / "ct").exists() and not (tmp_path / "vqa").exists()


def test_cli_positioning(tmp_path):
    result, output = invoke("phantom", tmp_path / "bad", "--n", "4", "--size", "32", "--positioning", "2", "-q")
    assert result.exit_code == 2 and "positioning" in output and not (tmp_path / "bad").exists()
    result, output = invoke("phantom", tmp_path / "ok", "--n", "4", "--size", "32", "--positioning", "0.5", "-q")
    assert result.exit_code == 0, output
    assert "positioning 0.5" in output
    assert json.loads((tmp_path / "ok" / "dataset.json").read_text())["generator"]["positioning"] == 0.5
