"""3D vision-language: the CT phantom, volume preprocessing, 3D encoders and the CLI on volumes."""

from __future__ import annotations

import csv
import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import medvl
from cli_helpers import invoke
from hostile_files import corrupt_gzip_nifti, patched_nifti, zero_affine_nifti
from medvl.clinical.nifti import NiftiSlabs, read_nifti, write_nifti
from medvl.data.phantom import CT3D_CAPTIONS, CT_MANIFEST_COLUMNS, generate_phantom
from medvl.data.phantom.ct3d import FINDINGS, render_case
from medvl.errors import DataError, InputError
from medvl.models import volumes
from medvl.models.config import ImageConfig
from medvl.models.registry import get_config

KEYWORDS = {
    "liver_lesion": ("lesion", "hypodens", "hypoattenuat", "low-attenuation"),
    "kidney_cyst": ("cyst",),
    "lung_nodule": ("nodul",),
    "pleural_effusion": ("effusion", "pleural fluid"),
}
NEGATION = re.compile(r"\b(no|not|without)\b", re.IGNORECASE)
WINDOWS = [-600, 1500, 40, 400]


def _sentences(report: str) -> list[str]:
    body = report.replace("FINDINGS:", " ").replace("IMPRESSION:", " ")
    return [s.strip() for s in re.split(r"(?<=\.)\s+", body) if s.strip()]


@pytest.fixture(scope="module")
def cases() -> list:
    return [render_case(0, i, 40) for i in range(30)]


@pytest.fixture(scope="module")
def ct_dir(tmp_path_factory) -> Path:
    """A small CT phantom (40 volumes of 32^3) shared by the CLI tests."""
    folder = tmp_path_factory.mktemp("ct3d") / "data"
    generate_phantom(folder, n=40, seed=1, size=32, kind="ct3d", splits={"train": 0.7, "test": 0.3})
    return folder


@pytest.fixture(scope="module")
def ct_model(ct_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ct3d-run") / "run"
    result, output = invoke("train", "--data", ct_dir, "--out", out, "--model", "ct3d-tiny", "--epochs", 2,
                            "--batch-size", 8, "--quiet")
    assert result.exit_code == 0, output
    return out


# --- the phantom ---------------------------------------------------------------------------------


def test_same_seed_same_case_and_other_seeds_differ():
    first, again = render_case(4, 7, 32), render_case(4, 7, 32)
    assert first.volume.dtype == np.int16 and first.volume.shape == (32, 32, 32)
    assert first.volume.tobytes() == again.volume.tobytes()
    assert first.report == again.report and first.findings == again.findings and first.meta == again.meta
    assert all(np.array_equal(first.masks[k], again.masks[k]) for k in first.masks)
    assert render_case(5, 7, 32).volume.tobytes() != first.volume.tobytes()
    assert render_case(4, 8, 32).volume.tobytes() != first.volume.tobytes()


def test_same_case_at_two_sizes_is_the_same_patient():
    for index in range(5):
        small, big = render_case(2, index, 24), render_case(2, index, 48)
        assert small.report == big.report and small.meta == big.meta
        for f_small, f_big in zip(small.findings, big.findings, strict=True):
            assert {k: v for k, v in f_small.items() if k != "box"} == {k: v for k, v in f_big.items() if k != "box"}
            if f_small["box"] is not None:
                assert np.allclose(np.array(f_big["box"]), 2 * np.array(f_small["box"]), atol=4)


def test_classes_are_balanced_and_tissues_have_ct_values(cases):
    counts = {name: sum(c.finding == name for c in cases) for name in FINDINGS}
    assert counts == dict.fromkeys(FINDINGS, 6)  # one of each per block of five indices
    for case in cases:
        volume = case.volume
        assert volume.min() <= -950  # air around the body
        assert np.median(volume[case.anatomy["lungs"]]) < -700
        assert 30 < np.median(volume[case.anatomy["liver"]]) < 140
        assert np.median(volume[case.anatomy["spine"]]) > 150
        assert case.spacing == pytest.approx((300 / 40, 380 / 40, 380 / 40))


def test_masks_boxes_and_places_of_findings(cases):
    for case in cases:
        if case.finding == "no_finding":
            assert not case.masks and case.findings[0]["box"] is None
            continue
        finding = case.findings[0]
        mask = case.masks[finding["name"]]
        z0, y0, x0, z1, y1, x1 = finding["box"]
        assert mask.sum() > 0 and mask[z0:z1, y0:y1, x0:x1].sum() == mask.sum()
        assert mask[z0].any() and mask[z1 - 1].any() and mask[:, y0].any() and mask[:, :, x1 - 1].any()
        inside = np.median(case.volume[mask])
        if finding["name"] == "liver_lesion":
            assert (mask & case.anatomy["liver"]).sum() >= 0.5 * mask.sum()
            assert inside < np.median(case.volume[case.anatomy["liver"] & ~mask])  # hypodense
        if finding["name"] == "kidney_cyst":
            assert (mask & case.anatomy["kidneys"]).any()
            assert finding["side"] in finding["location"]
        if finding["name"] == "lung_nodule":  # denser than the lung around it, if only by partial volume
            assert (mask & case.anatomy["lungs"]).any()
            if not finding["subtle"]:  # a subtle one may be a fraction of a 9.5 mm voxel at this size
                assert case.volume[mask].max() > np.median(case.volume[case.anatomy["lungs"]]) + 300
        if finding["name"] == "pleural_effusion":
            assert inside > -300  # fluid where the lung was air
        if finding["side"] is not None:  # axis 2 runs from the patient's left to right (RAS)
            centre_x = np.nonzero(mask)[2].mean()
            assert (centre_x > 20) == (finding["side"] == "right"), (finding, centre_x)


def test_reports_mention_present_findings_and_only_negate_absent_ones(cases):
    for case in cases + [render_case(3, i, 24, extra_finding_prob=1.0) for i in range(15)]:
        present = {f["name"] for f in case.findings}
        sentences = _sentences(case.report)
        assert case.report.startswith("FINDINGS: ") and " IMPRESSION: " in case.report
        for name, words in KEYWORDS.items():
            mentions = [s for s in sentences if any(w in s.lower() for w in words)]
            if name in present:
                assert any(not NEGATION.search(s) for s in mentions), (name, case.report)
            else:
                assert all(NEGATION.search(s) for s in mentions), (name, case.report)
        if case.finding == "no_finding":
            assert len(case.findings) == 1


def test_generated_folder_reads_back_as_nifti_and_loads_as_a_dataset(tmp_path):
    manifest = generate_phantom(tmp_path / "a", n=6, seed=2, size=24, kind="ct3d")
    again = generate_phantom(tmp_path / "b", n=6, seed=2, size=24, kind="ct3d")
    assert manifest.read_bytes() == again.read_bytes()
    root = manifest.parent
    assert (root / "images/ct_00003.nii.gz").read_bytes() == (again.parent / "images/ct_00003.nii.gz").read_bytes()
    with manifest.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == list(CT_MANIFEST_COLUMNS)
    description = json.loads((root / "dataset.json").read_text())
    assert description["label_columns"] == ["finding"] and description["captions"] == CT3D_CAPTIONS
    assert description["generator"]["kind"] == "ct3d"
    case = render_case(2, 3, 24)
    volume, spacing = read_nifti(root / rows[3]["image"])
    assert np.array_equal(volume, case.volume) and spacing == pytest.approx(case.spacing)
    for name, mask in case.masks.items():
        assert np.array_equal(read_nifti(root / f"masks/ct_00003_{name}.nii.gz")[0] > 0, mask)
        assert json.loads(rows[3]["boxes"])[name] == case.findings[0]["box"]
    dataset = medvl.load_dataset(root)
    assert len(dataset) == 6 and dataset.default_labels == ["finding"] and dataset[3].id == "ct_00003"
    with pytest.raises(InputError, match="phantom kind"):
        generate_phantom(tmp_path / "c", n=2, kind="mri")
    with pytest.raises(InputError, match="size must be 16-256"):
        generate_phantom(tmp_path / "c", n=2, size=8, kind="ct3d")


# --- volume preprocessing -------------------------------------------------------------------------


def _windowed_block_mean(volume: np.ndarray, window: tuple[float, float], factor: int) -> np.ndarray:
    center, width = window
    unit = np.clip((volume.astype(np.float32) - (center - width / 2)) / width, 0, 1)
    d, h, w = (n // factor for n in unit.shape)
    return unit.reshape(d, factor, h, factor, w, factor).mean(axis=(1, 3, 5))


def test_streamed_nifti_matches_the_whole_volume_in_any_orientation(tmp_path, monkeypatch):
    import nibabel

    case = render_case(0, 2, 32)
    write_nifti(tmp_path / "ras.nii.gz", case.volume, case.spacing)
    # the same volume stored as (y reversed, z, x reversed) with a matching affine: read_nifti's
    # canonical RAS array is unchanged, and so must the streamed one be
    stored = case.volume.transpose(2, 1, 0).transpose(1, 2, 0)[::-1, :, ::-1].copy()
    affine = np.zeros((4, 4))
    affine[1, 0], affine[2, 1], affine[0, 2], affine[3, 3] = -case.spacing[1], case.spacing[0], -case.spacing[2], 1
    nibabel.save(nibabel.Nifti1Image(stored, affine), tmp_path / "oblique.nii.gz")
    assert np.array_equal(read_nifti(tmp_path / "oblique.nii.gz")[0], case.volume)
    assert NiftiSlabs(tmp_path / "oblique.nii.gz").ras_axes == (1, 2, 0)
    config = ImageConfig(spatial_dims=3, image_size=16, in_channels=2, window=WINDOWS)
    monkeypatch.setattr(volumes, "SLAB_VOXELS", 32 * 32 * 3)  # many small slabs
    expected = np.stack([_windowed_block_mean(case.volume, w, 2) for w in config.windows])
    for name in ("ras.nii.gz", "oblique.nii.gz"):
        loaded = volumes.load_volume(tmp_path / name, config)
        assert loaded.shape == (2, 16, 16, 16)
        assert np.abs(loaded.numpy() - expected).max() < 1e-5
    in_memory = volumes.load_volume(case.volume, config)
    assert torch.allclose(in_memory, volumes.load_volume(tmp_path / "ras.nii.gz", config), atol=1e-6)


def _sagittal_and_axial_copies(folder: Path) -> tuple[Path, Path]:
    """The same noisy 40 x 50 x 30 volume stored sagittally (voxel axes i, j, k along y, z, -x) and, through
    read_nifti and write_nifti, axially: identical read_nifti arrays."""
    import nibabel

    rng = np.random.default_rng(0)
    stored = (np.indices((40, 50, 30)).sum(0) * 10 - 500 + rng.normal(0, 50, (40, 50, 30))).astype(np.int16)
    affine = np.zeros((4, 4))
    affine[1, 0], affine[2, 1], affine[0, 2], affine[3, 3] = 2.0, 3.0, -1.5, 1.0
    nibabel.save(nibabel.Nifti1Image(stored, affine), folder / "sag.nii.gz")
    write_nifti(folder / "axial.nii.gz", *read_nifti(folder / "sag.nii.gz"))
    assert np.array_equal(read_nifti(folder / "sag.nii.gz")[0], read_nifti(folder / "axial.nii.gz")[0])
    return folder / "sag.nii.gz", folder / "axial.nii.gz"


def test_one_volume_gives_one_model_input_whatever_its_storage_order(tmp_path):
    """Each axis is resized on its own (area when it shrinks, linear when it grows), so the streamed path (in-plane
    = the file's voxel axes) and the in-memory path (in-plane = RAS y, x) agree. The mode was chosen per plane: a
    plane with one axis shrinking and one growing was interpolated on both, and a sagittal file differed from its
    axial copy and from its read_nifti array by up to 0.16."""
    sagittal, axial = _sagittal_and_axial_copies(tmp_path)
    config = get_config("ct3d-tiny").image  # 32^3: RAS (z 50, y 40, x 30) shrinks z and y, grows x
    in_memory = volumes.load_volume(read_nifti(sagittal)[0], config)
    for path in (sagittal, axial):
        assert (volumes.load_volume(path, config) - in_memory).abs().max() < 1e-6
    # area averaging on a shrinking axis whatever the other axis of its plane does: rows 6 -> 4 average the
    # windows [0, 2), [1, 3), [3, 5), [4, 6) while columns 2 -> 4 grow (column 0 stays the first column)
    config = ImageConfig(spatial_dims=3, image_size=4, depth=2)
    volume = np.random.default_rng(1).random((2, 6, 2)).astype(np.float32)
    scaled = (volume - volume.min()) / (volume.max() - volume.min())
    loaded = volumes.load_volume(volume, config)[0].numpy()
    expected = [scaled[0, start:start + 2, 0].mean() for start in (0, 1, 3, 4)]
    np.testing.assert_allclose(loaded[0, :, 0], expected, atol=1e-6)


def test_depth_resize_min_max_and_channel_conversion():
    volume = np.random.default_rng(0).normal(size=(20, 24, 24)).astype(np.float32)
    config = ImageConfig(spatial_dims=3, image_size=12, depth=40, in_channels=3)
    loaded = volumes.load_volume(volume, config)
    assert loaded.shape == (3, 40, 12, 12) and loaded.min() >= 0 and loaded.max() <= 1
    assert torch.equal(loaded[0], loaded[2])
    eight_bit = volumes.load_volume(np.full((8, 8, 8), 255, np.uint8), ImageConfig(spatial_dims=3, image_size=8))
    assert torch.allclose(eight_bit, torch.ones(1, 8, 8, 8))


def _wide_range_box(size: int) -> np.ndarray:
    """A finite float32 volume spanning -3e38 .. 3e38, more than float32 holds: a box of 3e38 in -3e38."""
    volume = np.full((size, size, size), -3e38, np.float32)
    volume[size // 4:size - size // 4, size // 4:size - size // 4, size // 4:size - size // 4] = 3e38
    return volume


def test_a_volume_spanning_more_than_float32_holds_is_scaled_without_overflow(tmp_path):
    """Without windows a volume is min-max scaled after resizing: (volume - min) / (max - min) overflowed for a
    finite volume from -3e38 to 3e38, so every voxel was NaN and predict, the service and index build answered or
    stored NaN. It is now the volume's box, as for the same volume at a smaller scale; a volume whose values
    overflow when averaged (shrunk) is refused, naming the file, never given to the model as NaN."""
    config = ImageConfig(spatial_dims=3, image_size=32)
    wide = _wide_range_box(20)
    path = write_nifti(tmp_path / "wide_range.nii.gz", wide, (2.0, 2.0, 2.0))
    expected = volumes.load_volume((wide > 0).astype(np.float32), config)
    for image in (wide, path):
        loaded = volumes.load_volume(image, config)
        assert torch.isfinite(loaded).all() and (loaded - expected).abs().max() < 1e-6
    shrunk = write_nifti(tmp_path / "shrunk.nii.gz", _wide_range_box(64), (1.0, 1.0, 1.0))
    with pytest.raises(DataError, match=r"shrunk\.nii\.gz: voxel values too large to resample"):
        volumes.load_volume(shrunk, config)


def test_cli_predicts_a_volume_spanning_more_than_float32_holds(tmp_path):
    """A model without windows: predict printed 'nan' probabilities and wrote null ones with exit 0."""
    model = medvl.create_model("ct3d-tiny", **{"image.window": [], "image.in_channels": 1})
    model.save_pretrained(tmp_path / "model")
    path = write_nifti(tmp_path / "wide_range.nii.gz", _wide_range_box(20), (2.0, 2.0, 2.0))
    result, output = invoke("predict", path, "--model", tmp_path / "model", "--labels", "no_finding,kidney_cyst",
                            "--json", tmp_path / "p.json")
    assert result.exit_code == 0 and "nan" not in output, output
    probabilities = json.loads((tmp_path / "p.json").read_text())["predictions"][0]["probabilities"]
    assert all(isinstance(p, float) and 0 <= p <= 1 for p in probabilities.values()), probabilities


def test_a_multiframe_dicom_reaches_a_3d_model_as_its_nifti_copy_does_with_or_without_windows(tmp_path):
    """An enhanced multi-frame CT reached a 3D model without windows as its stored display window (uint8 / 255),
    while a DICOM series or NIfTI of the same acquisition came as HU, min-max scaled: inputs up to 0.85 apart.
    Every DICOM reaches a 3D model as modality values now, so the file and its NIfTI copy give one model input."""
    from medvl.data.images import read_image
    from medvl.models.preprocess import reads_modality_values

    path = Path(pytest.importorskip("pydicom.data").get_testdata_file("eCT_Supplemental.dcm"))
    copy = write_nifti(tmp_path / "ect.nii.gz", read_image(path, modality_values=True).astype(np.float32),
                       (1.0, 1.0, 1.0))
    for overrides in ({"image.window": [], "image.in_channels": 1}, {}):
        model = medvl.create_model("ct3d-tiny", **overrides)
        from_dicom, from_nifti = model.preprocessor.load(path), model.preprocessor.load(copy)
        assert from_dicom.shape == from_nifti.shape and torch.allclose(from_dicom, from_nifti, atol=1e-6), overrides
        assert reads_modality_values(model)  # as the service reads a DICOM upload


def test_bad_inputs_to_a_3d_model_name_the_file(tmp_path):
    png = tmp_path / "slice.png"
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(png)
    model = medvl.create_model("ct3d-tiny")
    with pytest.raises(DataError, match=r"slice\.png.*2D image file.*3D volumes"):
        model.encode_images([png])
    flat = tmp_path / "flat.nii.gz"
    write_nifti(flat, np.zeros((1, 16, 16), np.int16), (1.0, 1.0, 1.0))
    with pytest.raises(DataError, match=r"flat\.nii\.gz.*single slice"):
        model.encode_images([flat])
    with pytest.raises(DataError, match="2D RGB image"):
        model.encode_images([np.zeros((32, 32, 3), np.uint8)])
    with pytest.raises(DataError, match="NaN"):
        model.encode_images([np.full((8, 8, 8), np.nan, np.float32)])
    with pytest.raises(InputError, match=r"takes \(N, C, D, H, W\)"):
        model.encode_images(torch.zeros(1, 2, 32, 32))


@pytest.mark.parametrize("slab_voxels", [7, 4 << 20], ids=["slice-by-slice", "one-slab"])
def test_the_streamed_middle_slice_is_the_whole_volumes_in_every_orientation(tmp_path, slab_voxels):
    """``NiftiSlabs.middle_slice`` (what a NIfTI preview shows, read slab by slab) is ``read_nifti``'s
    ``volume[depth // 2]`` and the same spacing, for each of the 48 axis orders and flips of the voxel array, with
    scaling, on files of an odd and an even depth."""
    import itertools

    import nibabel

    generator = np.random.default_rng(0)
    for shape in ((5, 6, 7), (4, 3, 6)):
        data = generator.integers(-500, 500, size=shape).astype(np.int16)
        zooms = (0.7, 1.3, 2.5)
        for order in itertools.permutations(range(3)):
            for signs in itertools.product((1, -1), repeat=3):
                affine = np.zeros((4, 4))
                affine[3, 3] = 1
                for voxel_axis, (ras, sign) in enumerate(zip(order, signs, strict=True)):
                    affine[ras, voxel_axis] = sign * zooms[voxel_axis]
                image = nibabel.Nifti1Image(data, affine)
                image.header.set_slope_inter(0.5, -3.0)
                path = tmp_path / f"v{shape[0]}{''.join(map(str, order))}{''.join('+-'[s < 0] for s in signs)}.nii"
                nibabel.save(image, path)
                volume, spacing = read_nifti(path)
                slices = NiftiSlabs(path)
                plane, depth = slices.middle_slice(slab_voxels)
                assert depth == volume.shape[0] and slices.spacing == pytest.approx(spacing), path.name
                np.testing.assert_array_equal(plane, volume[depth // 2], err_msg=path.name)


def test_a_nifti_file_without_an_orientation_is_refused_by_both_readers(tmp_path):
    """A zero (singular) affine: read_nifti refused it, the streamed reader crashed on NaN axes (ValueError)."""
    path = zero_affine_nifti(tmp_path / "zero.nii")
    with pytest.raises(DataError, match=r"zero\.nii.*affine.*singular") as whole:
        read_nifti(path)
    with pytest.raises(DataError) as streamed:
        NiftiSlabs(path)
    assert str(streamed.value) == str(whole.value)
    with pytest.raises(DataError, match="singular"):
        medvl.create_model("ct3d-tiny").encode_images([path])


NAN = float("nan")
# header faults nibabel raises on when it scales (get_slope_inter) or computes the affine (get_best_affine)
UNREADABLE_HEADERS = {
    "nan_inter.nii": ([("<ff", 112, (1.0, NAN))],  # scl_slope 1, scl_inter NaN
                      r"cannot read the NIfTI image \(HeaderDataError: Valid slope but invalid intercept nan\)"),
    "bad_quaternion.nii": ([("<hh", 252, (1, 0)), ("<fff", 256, (1.0, 1.0, 0.0))],  # qform only, b^2 + c^2 > 1
                           r"cannot read the NIfTI image \(ValueError: w2 should be positive"),
}


def _refused_alike(path: Path, match: str) -> str:
    """The one message both NIfTI readers and a 3D model refuse ``path`` with (it names the file)."""
    with pytest.raises(DataError, match=rf"{re.escape(path.name)}: {match}") as whole:
        read_nifti(path)
    with pytest.raises(DataError) as streamed:
        NiftiSlabs(path)
    assert str(streamed.value) == str(whole.value)
    with pytest.raises(DataError) as encoded:  # predict, train, eval and index build read a volume this way
        medvl.create_model("ct3d-tiny").encode_images([path])
    assert str(encoded.value) == str(whole.value)
    return str(whole.value)


@pytest.mark.parametrize("name", UNREADABLE_HEADERS)
def test_a_nifti_header_nibabel_cannot_scale_or_orient_is_refused_alike_by_both_readers(name, tmp_path):
    """A NaN scl_inter beside a valid slope, or an impossible qform quaternion: read_nifti refused the file, the
    streamed reader (3D models, the service's size check) crashed with nibabel's HeaderDataError / ValueError."""
    fields, match = UNREADABLE_HEADERS[name]
    _refused_alike(patched_nifti(tmp_path / name, *fields), match)


def test_a_nifti_voxel_size_that_is_not_a_positive_number_is_refused_by_both_readers(tmp_path):
    """A NaN pixdim: read_nifti refused the file, the streamed reader never read the voxel sizes and a 3D model
    predicted it."""
    _refused_alike(patched_nifti(tmp_path / "pixdim_nan.nii", ("<f", 80, (NAN,))),
                   r"broken NIfTI header: voxel sizes \[nan, 2\.0, 3\.0\] mm")


def _big_float64_nifti(path: Path) -> Path:
    import nibabel

    nibabel.save(nibabel.Nifti1Image(np.full((4, 5, 6), 1e39), np.diag([2.0, 2.0, 3.0, 1.0])), path)
    return path


BEYOND_FLOAT32 = {  # finite stored voxels whose float32 values are not
    "slope.nii": (lambda path: patched_nifti(path, ("<ff", 112, (1e37, 0.0))),  # int16 -100..170 x 1e37
                  r"scl_slope 1e\+37 / scl_inter 0 take the stored values beyond the float32 range$"),
    "slope.nii.gz": (lambda path: patched_nifti(path, ("<ff", 112, (-1e37, 5.0))),
                     r"scl_slope -1e\+37 / scl_inter 5 take the stored values beyond the float32 range$"),
    "float64.nii": (_big_float64_nifti, r"stored float64 values beyond the float32 range$"),
}


@pytest.mark.parametrize("name", BEYOND_FLOAT32)
def test_a_nifti_whose_values_are_beyond_float32_is_refused_naming_the_cause_without_a_numpy_warning(name, tmp_path):
    """Review finding: an int16 file with scl_slope 1e35 (finite voxels, scaled beyond float32) was refused as 'volume
    contains NaN or infinite values', after a RuntimeWarning (overflow in cast / multiply) from nibabel or nifti.py on
    stderr; DICOM names its Rescale Slope in the same case."""
    make, match = BEYOND_FLOAT32[name]
    path = make(tmp_path / name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(DataError, match=rf"{re.escape(path.name)}: {match}") as whole:
            read_nifti(path)
        with pytest.raises(DataError) as streamed:
            list(NiftiSlabs(path).slabs())
        with pytest.raises(DataError) as encoded:
            medvl.create_model("ct3d-tiny").encode_images([path])
    assert str(whole.value) == str(streamed.value) == str(encoded.value)
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)], [str(w.message) for w in caught]


@pytest.mark.parametrize("name", ["offset0.nii", "offset0.nii.gz"])
def test_a_nifti_voxel_offset_of_zero_is_refused_by_both_readers(name, tmp_path):
    """vox_offset 0 in a single-file NIfTI: nibabel (read_nifti, the service) read the header's bytes as voxels and
    the streamed reader read from byte 348, 4 bytes early; both took the file without a word."""
    _refused_alike(patched_nifti(tmp_path / name, ("<f", 108, (0.0,))),
                   "broken NIfTI header: voxel data offset 0; a single-file NIfTI stores its voxels from byte 352")
    volume, _ = read_nifti(patched_nifti(tmp_path / "offset352.nii", ("<f", 108, (352.0,))))
    assert volume.min() == -100 and volume.max() == 170  # from the stated offset: the voxels exactly


@pytest.mark.parametrize("name, offset", [("offset_nan.nii", NAN), ("offset_inf.nii.gz", float("inf"))])
def test_a_nifti_voxel_offset_that_is_not_a_finite_number_is_refused_by_both_readers(name, offset, tmp_path):
    """vox_offset NaN or infinite: nibabel's int() of it raised ValueError / OverflowError, a traceback from
    predict and from both readers."""
    _refused_alike(patched_nifti(tmp_path / name, ("<f", 108, (offset,))),
                   rf"broken NIfTI header: voxel data offset {offset}$")


def test_a_corrupt_gzip_stream_is_refused_when_streamed_as_when_read_whole(tmp_path):
    path = corrupt_gzip_nifti(tmp_path / "corrupt.nii.gz")
    with pytest.raises(DataError, match=r"corrupt\.nii\.gz.*CRC"):
        read_nifti(path)
    with pytest.raises(DataError, match=r"corrupt\.nii\.gz.*corrupt or truncated gzip stream after the voxel data"):
        list(NiftiSlabs(path).slabs())
    with pytest.raises(DataError, match="CRC"):
        medvl.create_model("ct3d-tiny").encode_images([path])


def test_trailing_singleton_dimensions_are_squeezed_by_both_readers(tmp_path):
    """One rule: dimensions of size 1 after the third are dropped (a 5D 40x50x30x1x1 file is one volume), as the
    streamed reader did; read_nifti refused such a file."""
    import nibabel

    volume = np.arange(12 * 10 * 8, dtype=np.int16).reshape(12, 10, 8)
    nibabel.save(nibabel.Nifti1Image(volume[..., None, None], np.diag([2.0, 2.0, 3.0, 1.0])), tmp_path / "v5d.nii.gz")
    nibabel.save(nibabel.Nifti1Image(volume, np.diag([2.0, 2.0, 3.0, 1.0])), tmp_path / "v3d.nii.gz")
    array, spacing = read_nifti(tmp_path / "v5d.nii.gz")
    assert np.array_equal(array, read_nifti(tmp_path / "v3d.nii.gz")[0]) and spacing == (3.0, 2.0, 2.0)
    assert NiftiSlabs(tmp_path / "v5d.nii.gz").shape == (12, 10, 8)
    nibabel.save(nibabel.Nifti1Image(np.zeros((12, 10, 8, 1, 2), np.int16), np.eye(4)), tmp_path / "vec.nii.gz")
    for read in (read_nifti, NiftiSlabs):
        with pytest.raises(DataError, match=r"vec\.nii\.gz.*expected a 3D volume, got shape \(12, 10, 8, 1, 2\)"):
            read(tmp_path / "vec.nii.gz")


def test_a_npy_file_is_a_2d_image_to_a_3d_model_whatever_its_dtype(tmp_path):
    """A .npy file holds a 2D image (HxW or HxWx3, read_npy): a float or 16-bit colour one was taken as a volume of
    H slices 3 voxels wide and got a prediction, while the 8-bit one was refused. Every .npy is refused by a 3D
    model, naming the file, when loaded and when read for hashing (index build) alike; a volume is given as NIfTI."""
    rng = np.random.default_rng(0)
    arrays = {"rgb_float.npy": (rng.random((64, 64, 3)) * 255).astype(np.float32),
              "rgb_u16.npy": (rng.random((64, 64, 3)) * 4000).astype(np.uint16),
              "rgb_u8.npy": (rng.random((64, 64, 3)) * 255).astype(np.uint8),
              "gray.npy": rng.random((64, 64)).astype(np.float32),
              "vol.npy": rng.random((30, 50, 40)).astype(np.float32)}
    model = medvl.create_model("ct3d-tiny")
    for name, array in arrays.items():
        np.save(tmp_path / name, array)
        for load in (lambda path: model.encode_images([path]), model.preprocessor.read):
            with pytest.raises(DataError, match=rf"{re.escape(name)}: a \.npy file.*2D image.*NIfTI"):
                load(tmp_path / name)


def test_an_rgb_array_is_a_2d_image_to_a_3d_model_whatever_its_dtype(tmp_path):
    """An (N, H, W, 3) .npz holds RGB images (the npz loader's layout): a float one was trained on by a 3D model as
    volumes of H slices 3 voxels wide, and a float HxWx3 array was loaded as a volume, while the 8-bit ones were
    refused. Every dtype is refused now; an (N, D, H, W) .npz of volumes is still taken."""
    rng = np.random.default_rng(0)
    model = medvl.create_model("ct3d-tiny")
    for dtype in (np.float32, np.uint16, np.uint8):
        with pytest.raises(DataError, match=r"<array>: a 2D RGB image \(28, 28, 3\)"):
            volumes.load_volume((rng.random((28, 28, 3)) * 200).astype(dtype), model.config.image)
    images = rng.random((6, 28, 28, 3)).astype(np.float32)
    np.savez(tmp_path / "rgb.npz", train_images=images, train_labels=rng.integers(0, 2, (6, 1)))
    result, output = invoke("train", "--data", tmp_path / "rgb.npz", "--out", tmp_path / "run", "--model", "ct3d-tiny",
                            "--epochs", 1, "--quiet")
    assert result.exit_code == 2 and "Traceback" not in output, output
    assert "rgb.npz (record train_0): a 2D RGB image (28, 28, 3)" in " ".join(output.split()), output
    assert not (tmp_path / "run").exists()
    np.savez(tmp_path / "vol.npz", train_images=rng.random((2, 8, 28, 28)).astype(np.float32),
             train_labels=rng.integers(0, 2, (2, 1)))
    assert model.encode_images([record.image for record in medvl.load_dataset(tmp_path / "vol.npz")]).shape == (2, 64)


def test_config_checks_for_volumes():
    with pytest.raises(InputError, match="window"):
        get_config("ct3d-tiny", **{"image.window": [40]})
    with pytest.raises(InputError, match="in_channels must be 2"):
        get_config("ct3d-tiny", **{"image.in_channels": 1})
    with pytest.raises(InputError, match="slicepool needs spatial_dims 3"):
        get_config("phantom-tiny", **{"image.arch": "slicepool"})
    with pytest.raises(InputError, match="multiples of image.patch_size"):
        get_config("ct3d-vit-tiny", **{"image.image_size": 36})


# --- encoders ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, overrides", [
    ("ct3d-tiny", {}),
    ("ct3d-vit-tiny", {"image.depth": 16}),
    ("ct3d-slicepool", {"image.image_size": 32, "image.depth": 12, "image.slice_batch": 5}),
    ("ct3d-slicepool", {"image.image_size": 32, "image.depth": 8, "image.slice_pool": "mean",
                        "image.slice_arch": "vit", "image.patch_size": 16, "image.hidden_size": 32,
                        "image.num_layers": 1, "image.num_heads": 2}),
])
def test_3d_encoders_forward_and_round_trip(name, overrides, tmp_path):
    torch.manual_seed(0)
    model = medvl.create_model(name, **overrides)
    image = model.config.image
    volume = render_case(0, 1, 24).volume
    embeddings = model.encode_images([volume, volume[::-1].copy()])
    assert embeddings.shape == (2, model.config.embed_dim) and torch.isfinite(embeddings).all()
    pixels = torch.rand(3, image.in_channels, *image.volume_shape)
    assert model.encode_images(pixels).shape == (3, model.config.embed_dim)
    model.save_pretrained(tmp_path / "model")
    loaded = medvl.load_model(tmp_path / "model")
    assert loaded.config.image == image
    assert torch.equal(loaded.encode_images(pixels), model.encode_images(pixels))


def test_slicepool_encodes_slices_in_bounded_batches():
    model = medvl.create_model("ct3d-slicepool", **{"image.image_size": 16, "image.depth": 10,
                                                     "image.slice_batch": 4})
    seen = []
    hook = model.image_encoder.backbone.slice_encoder.register_forward_hook(
        lambda module, args, output: seen.append(args[0].shape[0]))
    model.encode_images(torch.rand(2, 2, 10, 16, 16))
    hook.remove()
    assert seen == [4, 4, 4, 4, 4] and sum(seen) == 20  # at inference; training takes the batch at once


def test_volume_augmentation_is_seeded_and_keeps_shape():
    preprocessor = medvl.create_model("ct3d-tiny").preprocessor
    batch = torch.rand(4, 2, 32, 32, 32)
    first, again = preprocessor.augment(batch, 7), preprocessor.augment(batch, 7)
    assert first.shape == batch.shape and torch.equal(first, again)
    assert not torch.equal(first, preprocessor.augment(batch, 8))


# --- commands on volumes -----------------------------------------------------------------------


def test_cli_phantom_ct3d(tmp_path):
    result, output = invoke("phantom", tmp_path / "ct", "--kind", "ct3d", "--n", 5, "--size", 20, "--quiet")
    assert result.exit_code == 0, output
    assert sorted(p.name for p in (tmp_path / "ct/images").iterdir())[0] == "ct_00000.nii.gz"
    result, output = invoke("phantom", tmp_path / "bad", "--kind", "pet")
    assert result.exit_code == 2 and "phantom kind" in output


def test_cli_train_zero_shot_retrieval_predict_and_index_on_volumes(ct_dir, ct_model, tmp_path):
    result, output = invoke("eval", "zero-shot", "--model", ct_model, "--data", ct_dir, "--quiet",
                            "--json", tmp_path / "zs.json")
    assert result.exit_code == 0, output
    zero_shot = json.loads((tmp_path / "zs.json").read_text())
    assert zero_shot["n"] == 12 and zero_shot["classes"] == sorted(FINDINGS)
    result, output = invoke("eval", "retrieval", "--model", ct_model, "--data", ct_dir, "--quiet")
    assert result.exit_code == 0 and "image_to_text R@1" in output, output
    volume = ct_dir / "images/ct_00000.nii.gz"
    result, output = invoke("predict", volume, "--model", ct_model, "--labels", "no_finding,liver_lesion,kidney_cyst")
    assert result.exit_code == 0 and "ct_00000.nii.gz" in output, output
    result, output = invoke("index", "build", "--model", ct_model, "--data", ct_dir, "--out", tmp_path / "idx",
                            "--quiet")
    assert result.exit_code == 0, output


def test_cli_refuses_a_2d_image_for_a_3d_model(ct_model, tmp_path):
    png = tmp_path / "xray.png"
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(png)
    result, output = invoke("predict", png, "--model", ct_model, "--labels", "no_finding,lung_nodule")
    assert result.exit_code == 2
    assert "xray.png" in output and "3D volumes" in output and "Traceback" not in output
    np.save(tmp_path / "colour.npy", np.random.default_rng(0).random((64, 64, 3)).astype(np.float32))
    result, output = invoke("predict", tmp_path / "colour.npy", "--model", ct_model,
                            "--labels", "no_finding,lung_nodule")
    assert result.exit_code == 2 and "colour.npy: a .npy file" in " ".join(output.split()), output


def test_cli_refuses_damaged_nifti_files_with_one_line(ct_dir, ct_model, tmp_path):
    """predict and index build exit 2 naming the file (a zero affine, a NaN scl_inter or an impossible quaternion
    crashed with a traceback, as did a NaN voxel offset; a corrupt gzip stream, a NaN voxel size or a voxel offset
    of 0 was predicted and indexed without a word)."""
    import shutil

    damaged = {"zero.nii": (zero_affine_nifti(tmp_path / "zero.nii"), "singular"),
               "corrupt.nii.gz": (corrupt_gzip_nifti(tmp_path / "corrupt.nii.gz"), "CRC"),
               "pixdim_nan.nii": (patched_nifti(tmp_path / "pixdim_nan.nii", ("<f", 80, (NAN,))), "voxel sizes"),
               "offset0.nii": (patched_nifti(tmp_path / "offset0.nii", ("<f", 108, (0.0,))), "voxel data offset 0"),
               "offset_nan.nii": (patched_nifti(tmp_path / "offset_nan.nii", ("<f", 108, (NAN,))),
                                  "voxel data offset nan"),
               **{name: (patched_nifti(tmp_path / name, *fields), "cannot read the NIfTI image")
                  for name, (fields, _) in UNREADABLE_HEADERS.items()}}
    for name, (path, problem) in damaged.items():
        result, output = invoke("predict", path, "--model", ct_model, "--labels", "no_finding,kidney_cyst")
        assert result.exit_code == 2 and f"{name}:" in output and "Traceback" not in output, output
        assert problem in output, output
    data = tmp_path / "data"
    shutil.copytree(ct_dir, data)
    shutil.copyfile(damaged["corrupt.nii.gz"][0], data / "images/ct_00002.nii.gz")
    result, output = invoke("index", "build", "--model", ct_model, "--data", data, "--out", tmp_path / "idx",
                            "--quiet")
    assert result.exit_code == 2 and "ct_00002.nii.gz" in output and "CRC" in output, output
    assert not (tmp_path / "idx").exists()


def test_a_draft_for_an_indexed_volume_leaves_out_its_own_case_in_the_cli_and_the_service(ct_dir, ct_model,
                                                                                            tmp_path):
    """A 2D image's indexed copies were left out of its draft's neighbours, a volume's never (no hash was taken of
    a volume query): a draft for an indexed CT cited its own report. The volume is hashed as the index hashed it
    (a NIfTI slab by slab), by the CLI, the API and the service alike."""
    from fastapi.testclient import TestClient

    from medvl.serve import create_app

    result, output = invoke("index", "build", "--model", ct_model, "--data", ct_dir, "--out", tmp_path / "idx",
                            "--quiet")
    assert result.exit_code == 0, output
    volume = ct_dir / "images/ct_00005.nii.gz"
    case = next(r.id for r in medvl.load_dataset(ct_dir) if Path(r.image).name == volume.name)
    result, output = invoke("report", "draft", volume, "--index", tmp_path / "idx", "--model", ct_model,
                            "--json", tmp_path / "draft.json")
    assert result.exit_code == 0, output
    draft = json.loads((tmp_path / "draft.json").read_text())
    assert draft["settings"]["left_out_copies"] == [case]
    assert case not in {n["id"] for n in draft["neighbours"]}
    with TestClient(create_app(ct_model, index=tmp_path / "idx", require_token=False)) as http:
        answer = http.post("/v1/report/draft", files={"image": ("ct.nii.gz", volume.read_bytes())})
    assert answer.status_code == 200, answer.text
    assert answer.json()["settings"]["left_out_copies"] == [case]
    assert answer.json()["neighbours"] == draft["neighbours"]


def test_index_hashes_nifti_volumes_streamed_and_finds_a_recompressed_copy(ct_dir, ct_model, tmp_path):
    import gzip
    import shutil

    from medvl.index.build import nifti_sha256

    data = tmp_path / "data"
    shutil.copytree(ct_dir, data)
    original = data / "images/ct_00003.nii.gz"
    with gzip.open(original, "rb") as source, open(data / "images/copy.nii", "wb") as target:
        shutil.copyfileobj(source, target)  # the same volume, uncompressed, under another name
    with open(data / "manifest.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    row = next(r for r in rows if r["image"] == "images/ct_00003.nii.gz")
    rows.append({**row, "id": "copy", "image": "images/copy.nii"})
    with open(data / "manifest.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    assert nifti_sha256(original) == nifti_sha256(data / "images/copy.nii")
    assert nifti_sha256(original) != nifti_sha256(data / "images/ct_00004.nii.gz")

    result, output = invoke("index", "build", "--model", ct_model, "--data", data, "--out", tmp_path / "idx",
                            "--json", tmp_path / "build.json", "--quiet")
    assert result.exit_code == 0, output
    built = json.loads((tmp_path / "build.json").read_text())
    assert built["duplicates"] == [{"id": "copy", "duplicate_of": row["id"]}]
    # embedded from the path (streamed) = embedded from the whole decoded volume
    model = medvl.load_model(ct_model)
    from medvl.index import open_index

    index = open_index(tmp_path / "idx")
    hits = index.search(model.encode_images([read_nifti(original)[0]]).numpy(), k=1)
    assert hits[0][0].id == row["id"] and hits[0][0].score > 0.999
