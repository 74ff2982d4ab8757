"""DICOM series and enhanced multi-frame files read into values and geometry, checked against an
independent computation: pydicom's own LUT functions frame by frame, and nibabel's canonical RAS
reorientation of a NIfTI written from the same voxels with the affine the DICOM headers describe.
Series are written here from known arrays (Image Position / Orientation (Patient) set by hand)."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
nib = pytest.importorskip("nibabel")

from pydicom.data import get_testdata_file  # noqa: E402
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid  # noqa: E402

from medvl.clinical.dicom import load_volume, read_dicom, read_dicom_series  # noqa: E402
from medvl.errors import DataError  # noqa: E402

SPACING = (2.5, 0.8, 0.7)  # slice, row (between rows), column (between columns), mm
ORIGIN = (-100.0, -120.0, -50.0)  # LPS mm, centre of the first voxel of the first slice


def write_series(folder: Path, volume: np.ndarray, row=(1, 0, 0), col=(0, 1, 0), spacing=SPACING,
                 origin=ORIGIN, extra: Callable[[Dataset, int], None] | None = None) -> list[Path]:
    """One single-frame CT file per slice of ``volume`` (D x H x W stored values, int16); slice k at
    ``origin + k * spacing[0] * (row x col)``. Files are named in reverse position order."""
    folder.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    row_dir, col_dir = np.asarray(row, float), np.asarray(col, float)
    normal = np.cross(row_dir, col_dir)
    paths = []
    for k in range(volume.shape[0]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta, ds.preamble = meta, b"\0" * 128
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", 1, k + 1
        ds.ImageOrientationPatient = [float(v) for v in (*row_dir, *col_dir)]
        ds.ImagePositionPatient = [float(v) for v in np.asarray(origin) + k * spacing[0] * normal]
        ds.PixelSpacing, ds.SliceThickness = [spacing[1], spacing[2]], spacing[0]
        ds.Rows, ds.Columns = volume.shape[1:]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = 1, 0
        if extra is not None:
            extra(ds, k)
        ds.PixelData = volume[k].astype("<i2").tobytes()
        path = folder / f"slice_{volume.shape[0] - k:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def marked_volume(shape=(6, 8, 10)) -> np.ndarray:
    """Distinct values everywhere, so that any flip or transposition shows."""
    return np.arange(int(np.prod(shape)), dtype=np.int16).reshape(shape)


# ------------------------------------------------------------------- truncated files (F6, M1, M2)


def test_a_series_with_a_truncated_slice_is_refused_naming_the_file(tmp_path):
    paths = write_series(tmp_path / "ct", marked_volume())
    cut = paths[3]
    data = cut.read_bytes()
    cut.write_bytes(data[: data.find(b"\x28\x00\x10\x00US")])  # cut at an element boundary, before Rows
    with pytest.raises(DataError, match="truncated DICOM file: a CT Image Storage object without Rows") as error:
        read_dicom_series(tmp_path / "ct")
    assert str(cut) in str(error.value)
    with pytest.raises(DataError, match="truncated"):
        load_volume(tmp_path / "ct")
    data = paths[0].read_bytes()
    paths[0].write_bytes(data[: data.find(b"\xe0\x7f\x10\x00")])  # cut before the pixel data
    cut.write_bytes(data)
    with pytest.raises(DataError, match="without pixel data") as error:
        read_dicom_series(tmp_path / "ct")
    assert str(paths[0]) in str(error.value)


def test_a_file_cut_after_its_meta_is_truncated_not_an_object_without_image(tmp_path):
    cut = tmp_path / "t.dcm"
    cut.write_bytes(Path(get_testdata_file("CT_small.dcm")).read_bytes()[:300])
    with pytest.raises(DataError, match="truncated DICOM file: nothing after the file meta"):
        read_dicom(cut)
    from medvl.clinical.summary import series_summaries

    with pytest.raises(DataError, match="truncated") as error:
        series_summaries(cut)
    assert str(cut) in str(error.value)


def test_dicom_info_on_truncated_files_and_dicomdir_exits_2(tmp_path):
    import typer
    from typer.testing import CliRunner

    from medvl.cli.clinical import deid_command, inspect_command

    app = typer.Typer()
    app.command("dicom-info")(inspect_command)
    app.command("deid")(deid_command)
    run = CliRunner().invoke
    cut = tmp_path / "t.dcm"
    cut.write_bytes(Path(get_testdata_file("CT_small.dcm")).read_bytes()[:300])
    result = run(app, ["dicom-info", str(cut)])
    assert result.exit_code == 2 and "truncated DICOM file" in result.output, result.output
    dicomdir = Path(get_testdata_file("DICOMDIR"))
    result = run(app, ["dicom-info", str(dicomdir)])
    assert result.exit_code == 2 and "a DICOMDIR (media directory)" in result.output, result.output
    assert "1 series" not in result.output
    series = tmp_path / "series"
    write_series(series, marked_volume((3, 4, 4)))
    (series / "slice_002.dcm").write_bytes((series / "slice_002.dcm").read_bytes()[:400])
    result = run(app, ["dicom-info", str(series)])
    assert result.exit_code == 2 and "slice_002.dcm" in result.output and "truncated" in result.output


def test_a_file_cut_inside_its_pixel_data_is_truncated_for_dicom_info_and_series_too(tmp_path):
    """A header read stops before the pixels, yet a file ending before the pixel data it declares is refused
    as reading it whole refuses it (predict, deid, the service), naming the file: never listed as a normal
    series."""
    import typer
    from typer.testing import CliRunner

    from medvl.cli.clinical import inspect_command
    from medvl.clinical.summary import series_summaries

    whole = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    cut = tmp_path / "d" / "cut.dcm"
    cut.parent.mkdir()
    cut.write_bytes(whole[:19603])  # 13,303 of the 32,768 pixel data bytes
    problem = "truncated DICOM file: element (7FE0,0010) has 13,303 of its 32,768 bytes"
    for read in (read_dicom, series_summaries):
        with pytest.raises(DataError, match=re.escape(problem)) as error:
            read(cut)
        assert str(cut) in str(error.value)
    with pytest.raises(DataError, match=re.escape(problem)):
        read_dicom_series(cut.parent)
    app = typer.Typer()
    app.command("dicom-info")(inspect_command)
    for target in (cut, cut.parent):
        result = CliRunner().invoke(app, [str(target)])
        assert result.exit_code == 2 and problem in result.output and "1 series" not in result.output, result.output


def test_files_holding_the_same_instance_are_named_in_a_warning(tmp_path, caplog):
    paths = write_series(tmp_path / "ct", marked_volume((3, 4, 4)))
    shutil.copy(paths[0], tmp_path / "ct" / "copy.dcm")
    [series] = read_dicom_series(tmp_path / "ct")
    assert len(series.files) == 4
    assert "1 file(s) hold the same instance (SOP Instance UID) as another file of their series" in caplog.text
    assert f"copy.dcm and {paths[0].name}" in caplog.text
    caplog.clear()
    (tmp_path / "ct" / "copy.dcm").unlink()
    read_dicom_series(tmp_path / "ct")
    assert "same instance" not in caplog.text


def test_objects_without_image_are_still_skipped(tmp_path):
    write_series(tmp_path / "ct", marked_volume((3, 4, 4)))
    for name in ("rtplan.dcm", "test-SR.dcm"):
        shutil.copy(get_testdata_file(name), tmp_path / "ct" / name)
    [series] = read_dicom_series(tmp_path / "ct")
    assert len(series.files) == 3


# ------------------------------------------------------------- enhanced multi-frame: per frame (F1)


def reference_window(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2.1 LINEAR, written out, output scaled to [0, 1]."""
    low, high = center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2
    return np.where(x <= low, 0.0, np.where(x > high, 1.0, (x - (center - 0.5)) / (width - 1) + 0.5))


def per_frame_ct(tmp_path: Path, rescales=((1, -1024), (2, 0)), windows=((40, 400), (-600, 1500))) -> Path:
    """eCT_Supplemental (2 frames) with its Pixel Value Transformation and Frame VOI LUT moved from the
    shared functional groups to each frame's own, with different values per frame."""
    ds = pydicom.dcmread(get_testdata_file("eCT_Supplemental.dcm"))
    shared = ds.SharedFunctionalGroupsSequence[0]
    for keyword in ("PixelValueTransformationSequence", "FrameVOILUTSequence"):
        if keyword in shared:
            delattr(shared, keyword)
    for group, (slope, intercept), (center, width) in zip(ds.PerFrameFunctionalGroupsSequence, rescales, windows,
                                                           strict=True):
        transformation, voi = Dataset(), Dataset()
        transformation.RescaleSlope, transformation.RescaleIntercept = slope, intercept
        transformation.RescaleType = "HU"
        voi.WindowCenter, voi.WindowWidth = center, width
        group.PixelValueTransformationSequence, group.FrameVOILUTSequence = [transformation], [voi]
    (tmp_path / "ect").mkdir()
    path = tmp_path / "ect" / "per_frame.dcm"
    ds.save_as(path)
    return path


def frame_reference(path: Path) -> list[np.ndarray]:
    """Each frame through pydicom's apply_modality_lut with that frame's own rescale copied to the top level."""
    ds = pydicom.dcmread(path)
    frames = []
    for index, group in enumerate(ds.PerFrameFunctionalGroupsSequence):
        single = Dataset()
        item = group.PixelValueTransformationSequence[0]
        single.RescaleSlope, single.RescaleIntercept = item.RescaleSlope, item.RescaleIntercept
        frames.append(pydicom.pixels.apply_modality_lut(ds.pixel_array[index], single).astype(np.float64))
    return frames


def test_enhanced_multiframe_rescale_and_window_per_frame(tmp_path):
    path = per_frame_ct(tmp_path)
    reference = frame_reference(path)
    values, meta = read_dicom(path)
    for frame, expected in enumerate(reference):
        np.testing.assert_array_equal(values[frame], expected)
    assert meta["rescale"] == {"slope": [1.0, 2.0], "intercept": [-1024.0, 0.0]}
    shown, meta = read_dicom(path, window="file")
    for frame, ((center, width), expected) in enumerate(zip(((40, 400), (-600, 1500)), reference, strict=True)):
        np.testing.assert_allclose(shown[frame], reference_window(expected, center, width), atol=1e-6)
    assert [(w["center"], w["width"]) for w in meta["window"]["frames"]] == [(40, 400), (-600, 1500)]
    volume, _ = load_volume(path.parent)  # the 3D path stacks the same per-frame values
    assert sorted(v.sum(dtype=np.float64) for v in volume) == sorted(v.sum() for v in reference)


def test_enhanced_multiframe_with_one_shared_rescale_is_unchanged(tmp_path):
    path = per_frame_ct(tmp_path, rescales=((1, -1024), (1, -1024)), windows=((40, 400), (40, 400)))
    values, meta = read_dicom(path)
    assert meta["rescale"] == {"slope": 1.0, "intercept": -1024.0}
    np.testing.assert_array_equal(values, np.stack(frame_reference(path)))
    _, meta = read_dicom(path, window="file")
    assert (meta["window"]["center"], meta["window"]["width"]) == (40, 400)


# ----------------------------------------------------------------- MONOCHROME1 series (F9)


def test_monochrome1_series_is_inverted_over_the_series_not_per_slice(tmp_path):
    stored = np.zeros((3, 4, 4), np.int16)
    stored[:, 0, 0] = (50, 25, 50)  # modality value 40 on every slice (slopes 1, 2, 1; intercept -10)
    stored[:, 3, 3] = (100, 1000, 400)  # every slice has its own maximum
    slopes = (1.0, 2.0, 1.0)

    def monochrome1(ds: Dataset, k: int) -> None:
        ds.PhotometricInterpretation, ds.RescaleSlope, ds.RescaleIntercept = "MONOCHROME1", slopes[k], -10

    # rows toward the patient's right, columns toward anterior: stored as RAS, so no reorientation applies
    paths = write_series(tmp_path / "m1", stored, row=(-1, 0, 0), col=(0, -1, 0), extra=monochrome1)
    modality = np.stack([pydicom.pixels.apply_modality_lut(ds.pixel_array, ds)
                         for ds in (pydicom.dcmread(path) for path in paths)]).astype(np.float64)
    volume, _ = load_volume(tmp_path / "m1")
    np.testing.assert_allclose(volume, modality.min() + modality.max() - modality)  # one inversion for the volume
    assert len(set(volume[:, 0, 0].tolist())) == 1  # one modality value, one value on every slice
    shown, _ = load_volume(tmp_path / "m1", window=(500, 1000))  # windowed: 1 - v, already consistent
    assert shown.min() >= 0 and shown.max() <= 1
    single, meta = read_dicom(paths[1])  # a single image keeps its own min / max
    assert meta["inverted"] and single[0, 0] == modality[1].min() + modality[1].max() - modality[1, 0, 0]


def test_a_series_with_a_slice_without_window_is_read_as_modality_values_with_the_file_window(tmp_path, caplog):
    """Review finding: ``load_volume(..., window="file")`` windowed the slices that store a window into [0, 1] and
    left the one without a window in HU, mixing display and modality values in one volume; the frames of one file
    follow the rule: every slice windowed through its own VOI, or none."""
    from medvl.clinical.windowing import apply_window

    stored = marked_volume((4, 6, 6)) * 10 - 500

    def windowed(skip: int | None):
        def extra(ds: Dataset, k: int) -> None:
            if k != skip:
                ds.WindowCenter, ds.WindowWidth = 40 + 10 * k, 400
        return extra

    write_series(tmp_path / "some", stored, extra=windowed(skip=2))
    values, _ = load_volume(tmp_path / "some")
    shown, _ = load_volume(tmp_path / "some", window="file")
    np.testing.assert_array_equal(shown, values)  # modality values on every slice
    assert "1 of 4 slice(s) store no window" in caplog.text
    write_series(tmp_path / "all", stored, extra=windowed(skip=None))
    values, _ = load_volume(tmp_path / "all")
    shown, _ = load_volume(tmp_path / "all", window="file")
    assert 0 <= shown.min() and shown.max() <= 1
    for k in range(len(stored)):  # each slice through its own window, as each frame of one file is
        np.testing.assert_allclose(shown[k], apply_window(values[k], (40 + 10 * k, 400)), atol=1e-6)


# ------------------------------------------------------------- one orientation: RAS, as NIfTI (F2)


def lps_affine(row, col, spacing=SPACING, origin=ORIGIN) -> np.ndarray:
    """The voxel (i = column, j = row, k = slice) -> patient LPS mm affine that write_series's headers describe."""
    row, col = np.asarray(row, float), np.asarray(col, float)
    affine = np.eye(4)
    affine[:3, 0], affine[:3, 1], affine[:3, 2] = row * spacing[2], col * spacing[1], np.cross(row, col) * spacing[0]
    affine[:3, 3] = origin
    return affine


def nibabel_reference(volume: np.ndarray, row, col) -> tuple[np.ndarray, tuple[float, ...]]:
    """The same stored voxels as a NIfTI image (RAS affine = diag(-1, -1, 1) @ LPS), through nibabel's
    as_closest_canonical, as DxHxW: what read_nifti would give for the same patient."""
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps_affine(row, col)
    image = nib.as_closest_canonical(nib.Nifti1Image(volume.transpose(2, 1, 0).astype(np.float32), affine))
    zooms = image.header.get_zooms()
    return np.asarray(image.dataobj).transpose(2, 1, 0), (float(zooms[2]), float(zooms[1]), float(zooms[0]))


def rotation_z(degrees: float) -> np.ndarray:
    angle = np.radians(degrees)
    return np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])


ORIENTATIONS = {
    "axial": ((1, 0, 0), (0, 1, 0)),  # the usual CT: rows anterior -> posterior, columns right -> left
    "axial-feet-first": ((-1, 0, 0), (0, 1, 0)),
    "axial-transposed": ((0, 1, 0), (1, 0, 0)),
    "sagittal": ((0, 1, 0), (0, 0, -1)),
    "coronal": ((1, 0, 0), (0, 0, -1)),
    "coronal-flipped": ((-1, 0, 0), (0, 0, 1)),
    "oblique-20": (tuple(rotation_z(20) @ [1, 0, 0]), tuple(rotation_z(20) @ [0, 1, 0])),
    "oblique-sagittal": ((0, np.cos(0.3), np.sin(0.3)), (0, np.sin(0.3), -np.cos(0.3))),
}


@pytest.mark.parametrize("plane", list(ORIENTATIONS))
def test_a_dicom_series_is_read_in_ras_as_nibabel_reads_the_same_voxels(tmp_path, plane):
    row, col = ORIENTATIONS[plane]
    stored = marked_volume()
    write_series(tmp_path / plane, stored, row=row, col=col)
    volume, spacing = load_volume(tmp_path / plane)
    expected, expected_spacing = nibabel_reference(stored, row, col)
    np.testing.assert_array_equal(volume, expected)
    assert spacing == pytest.approx(expected_spacing, abs=1e-6)


def test_an_enhanced_multiframe_volume_is_read_in_ras(tmp_path):
    path = Path(get_testdata_file("eCT_Supplemental.dcm"))
    ds = pydicom.dcmread(path)
    (tmp_path / "ect").mkdir()
    shutil.copy(path, tmp_path / "ect" / "ect.dcm")
    volume, spacing = load_volume(tmp_path / "ect")
    groups = ds.PerFrameFunctionalGroupsSequence
    orientation = ds.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient
    row, col = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
    along = [float(np.dot(g.PlanePositionSequence[0].ImagePositionPatient, np.cross(row, col))) for g in groups]
    stored = read_dicom(path)[0][np.argsort(along)]
    pixel = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
    affine = np.eye(4)
    affine[:3, 0], affine[:3, 1] = row * float(pixel[1]), col * float(pixel[0])
    affine[:3, 2] = np.cross(row, col) * float(np.diff(sorted(along))[0])
    image = nib.as_closest_canonical(nib.Nifti1Image(stored.transpose(2, 1, 0), np.diag([-1, -1, 1, 1]) @ affine))
    np.testing.assert_array_equal(volume, np.asarray(image.dataobj).transpose(2, 1, 0))
    assert spacing == pytest.approx(tuple(float(z) for z in image.header.get_zooms()[::-1]), abs=1e-5)
    # the file on its own (read_image: what a 3D model, the service and the preview read) is the same volume;
    # it came in stored frame order, rows and columns mirrored against the NIfTI of the same voxels
    from medvl.data.images import read_image

    np.testing.assert_array_equal(read_image(tmp_path / "ect" / "ect.dcm", modality_values=True), volume)


def test_an_enhanced_multiframe_file_with_frames_in_different_planes_is_not_a_volume(tmp_path, caplog):
    """Review finding: only frame 1's orientation was read, so an enhanced file whose frames lie in different planes
    (a localizer: here frame 1 axial, frame 2 coronal) was stacked as a 2-slice volume by load_volume, read_image and
    the dataset loader, where a series of files with the same mix is refused."""
    from medvl.data.images import read_image
    from medvl.data.loaders.dicom import load_dicom_folder

    ds = pydicom.dcmread(get_testdata_file("eCT_Supplemental.dcm"))
    del ds.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence
    for group, orientation in zip(ds.PerFrameFunctionalGroupsSequence, ([-1, 0, 0, 0, 1, 0], [1, 0, 0, 0, 0, -1]),
                                  strict=True):
        plane = Dataset()
        plane.ImageOrientationPatient = orientation
        group.PlaneOrientationSequence = [plane]
    ds.PerFrameFunctionalGroupsSequence[1].PlanePositionSequence[0].ImagePositionPatient = [-150, 0, 100]
    (tmp_path / "mixed").mkdir()
    path = tmp_path / "mixed" / "localizer.dcm"
    ds.save_as(path)
    with pytest.raises(DataError, match="frames in different orientations.*not one volume"):
        load_volume(tmp_path / "mixed")
    np.testing.assert_array_equal(read_image(path, modality_values=True), read_dicom(path)[0])  # frames as stored
    shutil.copy(get_testdata_file("CT_small.dcm"), tmp_path / "mixed" / "image.dcm")
    records = load_dicom_folder(tmp_path / "mixed")
    assert [record.meta["kind"] for record in records] == ["image"]
    assert "skipped 1 multi-frame files that are not a volume" in caplog.text


def test_an_enhanced_multiframe_file_of_several_positions_over_time_points_is_refused_as_4d(tmp_path, caplog):
    """Review finding: eCT_Supplemental's 2 frames (z -159 and -149) repeated at a second time point (4 frames) were
    read by read_image / read_dicom_image as a 4-slice volume jumping back and forth in z, with no word, while
    load_volume refused the same file naming only its folder. Both now refuse it naming the file; the frames of a
    cine (every frame at one position) are still read as stored. The folder loader skips both, counted (it listed
    the cine as a volume record, which every read then refused: 'not a volume', unreadable in medvl audit)."""
    import copy

    from medvl.clinical.readers import read_dicom_image
    from medvl.data.images import read_image
    from medvl.data.loaders.dicom import load_dicom_folder

    ds = pydicom.dcmread(get_testdata_file("eCT_Supplemental.dcm"))
    frames, groups = ds.pixel_array, ds.PerFrameFunctionalGroupsSequence
    ds.NumberOfFrames = 4
    ds.PerFrameFunctionalGroupsSequence = [copy.deepcopy(groups[index]) for index in (0, 1, 0, 1)]
    ds.PixelData = np.concatenate([frames, frames + 100]).astype(frames.dtype).tobytes()
    (tmp_path / "dynamic").mkdir()
    path = tmp_path / "dynamic" / "ect_4d.dcm"
    ds.save_as(path)
    refusal = rf"^{re.escape(str(path))}: frames at 2 positions repeated over 2 time points: a 4D file.*split it"
    for read in (read_dicom_image, lambda file: read_image(file, modality_values=True),
                 lambda file: load_volume(file.parent)):
        with pytest.raises(DataError, match=refusal):
            read(path)
    shutil.copy(get_testdata_file("CT_small.dcm"), tmp_path / "dynamic" / "image.dcm")
    assert [record.meta["kind"] for record in load_dicom_folder(tmp_path / "dynamic")] == ["image"]
    assert "skipped 1 multi-frame files that are not a volume" in caplog.text
    (tmp_path / "dynamic" / "image.dcm").unlink()
    for group in ds.PerFrameFunctionalGroupsSequence:  # a cine: all 4 frames at z -159, read as stored
        group.PlanePositionSequence = copy.deepcopy(groups[0].PlanePositionSequence)
    ds.save_as(path)
    np.testing.assert_array_equal(read_image(path, modality_values=True), read_dicom(path)[0])
    assert read_dicom_image(path).shape == (4, *frames.shape[1:])
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: all 4 frames at one position"):
        load_volume(tmp_path / "dynamic")
    caplog.clear()
    shutil.copy(get_testdata_file("CT_small.dcm"), tmp_path / "dynamic" / "image.dcm")
    assert [record.meta["kind"] for record in load_dicom_folder(tmp_path / "dynamic")] == ["image"]
    assert "skipped 1 multi-frame files that are not a volume (cine, time series" in caplog.text


def test_the_mni_template_written_as_an_axial_dicom_series_reads_back_as_read_nifti_reads_it(tmp_path):
    nilearn = pytest.importorskip("nilearn")
    template = Path(nilearn.__file__).parent / "datasets" / "data" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    if not template.is_file():
        pytest.skip("nilearn's bundled MNI152 template not found")
    from medvl.clinical.nifti import read_nifti

    image = nib.load(template)
    voxels = np.rint(np.asarray(image.dataobj, dtype=np.float64)[::4, ::4, ::4]).astype(np.int16)  # (i, j, k)
    affine = image.affine.copy()
    affine[:3, :3] *= 4
    small = tmp_path / "mni.nii.gz"
    nib.save(nib.Nifti1Image(voxels, affine), small)
    ras, ras_spacing = read_nifti(small)
    # the same patient as a standard axial DICOM series: LPS, rows anterior -> posterior, columns right -> left
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    assert np.allclose(lps[:3, :3], np.diag([-4.0, -4.0, 4.0]))  # RAS-aligned: i runs to the right, j to the front
    stored = ras[:, ::-1, ::-1]  # slice k, row = posterior index reversed, column = right -> left
    first = lps @ [ras.shape[2] - 1, ras.shape[1] - 1, 0, 1]  # the voxel at row 0, column 0 of slice 0
    write_series(tmp_path / "mni", stored, row=(1, 0, 0), col=(0, 1, 0), spacing=(4.0, 4.0, 4.0),
                 origin=tuple(first[:3]))
    volume, spacing = load_volume(tmp_path / "mni")
    np.testing.assert_array_equal(volume, ras)
    assert spacing == pytest.approx(ras_spacing)


def test_a_3d_model_sees_a_dicom_series_as_the_nifti_of_the_same_patient(tmp_path):
    from medvl.data.loaders.dicom import load_dicom_folder
    from medvl.models.config import ImageConfig
    from medvl.models.volumes import load_volume as model_volume

    stored = np.zeros((6, 8, 10), np.int16)
    stored[1, 2, 3] = 1000  # one bright voxel: near the patient's right, anterior, second slice from the feet
    row, col = ORIENTATIONS["axial"]
    write_series(tmp_path / "ct", stored, row=row, col=col)
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps_affine(row, col)
    nib.save(nib.Nifti1Image(stored.transpose(2, 1, 0), affine), tmp_path / "same.nii.gz")
    config = ImageConfig(spatial_dims=3, image_size=10, depth=6, augment=False)
    [record] = list(load_dicom_folder(tmp_path / "ct"))
    from_dicom = model_volume(record.images[0], config)
    from_nifti = model_volume(tmp_path / "same.nii.gz", config)
    assert float((from_dicom - from_nifti).abs().max()) < 1e-6


def test_predict_takes_a_dicom_series_folder_as_a_3d_model_takes_the_same_nifti(tmp_path):
    """README: the same commands take DICOM series; medvl predict (and search) refused a series folder ('is a
    folder, not an image file'). A folder holding one series is now stacked as a dataset's series is: the same
    answer as the NIfTI of the same patient. One slice of it is a 2D image, and the error says to pass the folder."""
    from cli_helpers import invoke
    from medvl.models.registry import create_model

    stored = np.random.default_rng(0).normal(0, 300, (6, 8, 10)).astype(np.int16)
    row, col = ORIENTATIONS["axial"]
    slices = write_series(tmp_path / "ct", stored, row=row, col=col)
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps_affine(row, col)
    nib.save(nib.Nifti1Image(stored.transpose(2, 1, 0), affine), tmp_path / "same.nii.gz")
    create_model("ct3d-tiny").save_pretrained(tmp_path / "model")
    labels = ("--model", tmp_path / "model", "--labels", "no_finding,kidney_cyst")
    result, output = invoke("predict", tmp_path / "ct", tmp_path / "same.nii.gz", *labels,
                            "--json", tmp_path / "p.json")
    assert result.exit_code == 0, output
    series, nifti = json.loads((tmp_path / "p.json").read_text())["predictions"]
    assert series["image"] == "ct"  # the series' folder by its name, as every --json names files
    assert series["probabilities"] == pytest.approx(nifti["probabilities"], abs=1e-6)
    result, output = invoke("predict", slices[0], *labels)
    assert result.exit_code == 2 and "a 2D image (8, 10)" in output and "its folder" in " ".join(output.split())


# ----------------------------------------------------------- the model's windows win (F8)


def test_a_2d_model_with_hu_windows_applies_them_not_the_headers_window(tmp_path):
    from medvl.data.images import read_image
    from medvl.models.config import ImageConfig
    from medvl.models.preprocess import ImagePreprocessor

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.WindowCenter, ds.WindowWidth = 40, 400  # a soft-tissue window stored by the scanner
    path = tmp_path / "ct_window.dcm"
    ds.save_as(path)
    hu = pydicom.pixels.apply_modality_lut(ds.pixel_array, ds).astype(np.float64)  # pydicom, independently
    windows = [(-600, 1500), (400, 1800)]
    config = ImageConfig(spatial_dims=2, in_channels=2, image_size=128, window=[v for w in windows for v in w],
                         augment=False)
    tensor = ImagePreprocessor(config).load(path).numpy()
    for channel, (center, width) in zip(tensor, windows, strict=True):  # LINEAR_EXACT, as ImageConfig documents
        np.testing.assert_allclose(channel, np.clip((hu - (center - width / 2)) / width, 0, 1), atol=1e-6)
    assert read_image(path).dtype == np.uint8  # without model windows: the header's window, as before
    plain = ImagePreprocessor(ImageConfig(spatial_dims=2, image_size=128, augment=False)).load(path).numpy()
    np.testing.assert_allclose(plain[0], np.round(reference_window(hu, 40, 400) * 255) / 255, atol=1e-6)


def test_the_service_and_the_evaluations_read_a_dicom_upload_as_a_windowed_model_is_fed_it(tmp_path):
    """The service decoded an upload with the header's window before the model's own windows could apply, and
    so did the report, robustness, shortcut and case-retrieval evaluations (``read_for``): the same DICOM gave
    the service another embedding than the library."""
    pytest.importorskip("fastapi")
    import torch
    from starlette.testclient import TestClient

    import medvl
    from medvl.models.preprocess import read_for
    from medvl.serve import ServeSettings, create_app

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.WindowCenter, ds.WindowWidth = 40, 400
    path = tmp_path / "ct_window.dcm"
    ds.save_as(path)
    torch.manual_seed(0)
    model = medvl.create_model("phantom-tiny", **{"image.window": [-600, 1500, 400, 1800], "image.in_channels": 2})
    model.save_pretrained(tmp_path / "model")
    hu = pydicom.pixels.apply_modality_lut(ds.pixel_array, ds).astype(np.float64)
    np.testing.assert_allclose(read_for(model, path), hu)  # HU, not the header's uint8 window
    # beside it a VQA model without windows: /v1/vqa reads the upload as that model reads files (medvl vqa),
    # the header's window applied; it read it with the dual encoder's rule (modality values)
    from medvl.api import answer_pixels
    from medvl.models.vqa import load_vqa_model
    from serve_helpers import train_tiny_vqa_model

    vqa_dir = train_tiny_vqa_model(tmp_path / "vqa")
    question = "Is there a nodule?"
    app = create_app(tmp_path / "model", settings=ServeSettings(vqa_model=vqa_dir), require_token=False)
    with TestClient(app) as http:
        answer = http.post("/v1/embed", files={"image": ("x.dcm", path.read_bytes())})
        asked = http.post("/v1/vqa", files={"image": ("x.dcm", path.read_bytes())}, data={"question": question})
    assert answer.status_code == 200, answer.text
    loaded = medvl.load_model(tmp_path / "model")
    expected = loaded.encode_images(loaded.preprocessor.load(path)[None])[0].numpy()
    np.testing.assert_allclose(answer.json()["embedding"], expected, atol=1e-5)
    assert asked.status_code == 200, asked.text
    vqa = load_vqa_model(vqa_dir)
    assert not vqa.preprocessor.config.windows
    reference = answer_pixels(vqa, [read_for(vqa, path)], question)
    assert asked.json()["probability"] == pytest.approx(reference["probability"], abs=1e-6)
    assert asked.json()["answer"] == reference["answer"]


# ---------------------------------------------------------------- a folder of DICOM files as a dataset


def two_images(folder: Path) -> list[str]:
    """pydicom's CT_small.dcm and MR_small.dcm copied into ``folder``: two 2D records; their SOP Instance UIDs."""
    folder.mkdir(parents=True, exist_ok=True)
    uids = []
    for name in ("CT_small.dcm", "MR_small.dcm"):
        shutil.copy(get_testdata_file(name), folder / name)
        uids.append(str(pydicom.dcmread(folder / name).SOPInstanceUID))
    return uids


@pytest.mark.parametrize(("rows", "problem"), [
    (["{0},train", "{1},normal,test"], r"line 2: 2 cells but the header has 3 columns \(a cell is missing"),
    (["{0},effusion,train", "{1},normal,test,oops"], "line 3: 4 cells but the header has 3 columns"),
    (['{0},"effusion,train', "{1},normal,test"], r"line 2: a quoted cell \(\"\) is never closed"),
])
def test_a_labels_csv_row_that_would_shift_its_cells_is_refused(tmp_path, rows, problem):
    from medvl.data.loaders import load_dataset

    uids = two_images(tmp_path / "dcm")
    text = "SOPInstanceUID,finding,split\n" + "\n".join(row.format(*uids) for row in rows) + "\n"
    (tmp_path / "dcm" / "labels.csv").write_text(text)
    with pytest.raises(DataError, match=rf"labels\.csv.*{problem}"):
        load_dataset(tmp_path / "dcm")
    (tmp_path / "dcm" / "labels.csv").write_text(f"SOPInstanceUID,finding,Finding\n{uids[0]},a,b\n")
    with pytest.raises(DataError, match=r"labels\.csv.*duplicate column 'Finding'"):
        load_dataset(tmp_path / "dcm")
    (tmp_path / "dcm" / "labels.csv").write_text(f"SOPInstanceUID,finding,split\n{uids[0]},effusion,train\n"
                                                 f"{uids[1]},,test\n")
    ct, mr = sorted(load_dataset(tmp_path / "dcm"), key=lambda r: r.meta["modality"])
    assert (ct.labels, ct.split, mr.labels, mr.split) == ({"finding": "effusion"}, "train", {}, "test")
    (tmp_path / "dcm" / "labels.csv").write_text(f"SOPInstanceUID,finding,nodule\n{uids[0]},NaN,1.0\n"
                                                 f"{uids[1]},effusion,0.0\n")  # read as a manifest's cells are
    ct, mr = sorted(load_dataset(tmp_path / "dcm"), key=lambda r: r.meta["modality"])
    assert (ct.labels, mr.labels) == ({"nodule": "1"}, {"finding": "effusion", "nodule": "0"})


def test_identifier_columns_of_a_labels_csv_never_become_labels(tmp_path, caplog):
    from medvl.clinical.formats import uid_hash
    from medvl.data.loaders import load_dataset

    folder = tmp_path / "dcm"
    sop, _ = two_images(folder)
    study = str(pydicom.dcmread(folder / "CT_small.dcm").StudyInstanceUID)
    (folder / "labels.csv").write_text("id,SOPInstanceUID,StudyInstanceUID,PatientID,StudyDate,finding\n"
                                       f"img-{uid_hash(sop)},{sop},{study},MRN-1,20040119,normal\n")
    with caplog.at_level("WARNING"):
        dataset = load_dataset(folder)
    assert dataset.label_names == dataset.default_labels == ["finding"]
    [ct] = [r for r in dataset if r.labels]
    assert ct.labels == {"finding": "normal"}
    assert "ignoring identifier column(s) SOPInstanceUID, StudyInstanceUID, PatientID, StudyDate" in caplog.text
    (folder / "labels.csv").write_text(f"id,finding,source\nimg-{uid_hash(sop)},normal,{study}\n")
    with pytest.raises(DataError, match=r"labels\.csv.*line 2: column 'source' holds a DICOM UID of its record"):
        load_dataset(folder)


def test_a_series_missing_a_slice_is_refused_not_stacked_with_the_gap_closed(tmp_path):
    from medvl.data.loaders import load_dataset

    paths = write_series(tmp_path / "ct", marked_volume((5, 4, 4)), spacing=(10.0, 0.8, 0.7), origin=(0, 0, 0))
    paths[2].unlink()  # the slice at 20 mm: 0, 10, 30, 40 mm are left
    gap = r"none lies between 10 and 30 mm along the slice normal \(a 20 mm gap: about 1 slice\(s\) missing\)"
    with pytest.raises(DataError, match=rf"series 1 \(CT, 4 file\(s\).*{gap}"):
        load_volume(tmp_path / "ct")
    with pytest.raises(DataError, match=rf"series 1 .* record vol-[0-9a-f]{{16}}: slices are 10 mm apart, .*{gap}"):
        load_dataset(tmp_path / "ct")
    volume, spacing = load_volume(write_series(tmp_path / "whole", marked_volume((4, 4, 4)))[0].parent)
    assert volume.shape == (4, 4, 4) and spacing[0] == pytest.approx(SPACING[0])


def test_missing_slices_are_found_when_they_make_half_the_gaps(tmp_path, caplog):
    """Review finding: the step was the median gap, so a 1 mm series missing the slices at 5, 7, 9 and 11 mm (half
    its gaps 2 mm) was stacked at 1.5 mm with only an uneven-spacing warning, and so was a 3-slice series missing its
    middle one; gaps of whole multiples of the smallest one are missing slices however many there are."""
    from medvl.data.loaders import load_dataset

    def at(positions: list[float]) -> Callable[[Dataset, int], None]:
        def place(ds: Dataset, k: int) -> None:
            ds.ImagePositionPatient = [ORIGIN[0], ORIGIN[1], positions[k]]
        return place

    positions = [0.0, 1, 2, 3, 4, 6, 8, 10, 12]
    write_series(tmp_path / "holes", marked_volume((9, 4, 4)), extra=at(positions))
    gap = (r"slices are 1 mm apart, but none lies between 4 and 6 mm along the slice normal \(a 2 mm gap: about 1 "
           r"slice\(s\) missing; 4 such gaps in all\)")
    with pytest.raises(DataError, match=rf"series 1 \(CT, 9 file\(s\).*{gap}"):
        load_volume(tmp_path / "holes")
    with pytest.raises(DataError, match=rf"record vol-[0-9a-f]{{16}}: {gap}"):
        load_dataset(tmp_path / "holes")
    # a series whose interval changes part-way (1 then 2 mm) reads the same: refused, the message saying both
    write_series(tmp_path / "mixed", marked_volume((6, 4, 4)), extra=at([0.0, 1, 2, 3, 5, 7]))
    with pytest.raises(DataError, match=r"slice\(s\) missing.*slice interval changes part-way"):
        load_volume(tmp_path / "mixed")
    write_series(tmp_path / "hole3", marked_volume((3, 4, 4)), extra=at([0.0, 2.0, 3.0]))
    with pytest.raises(DataError, match=r"none lies between 0 and 2 mm .*a 2 mm gap: about 1 slice"):
        load_volume(tmp_path / "hole3")
    # uneven steps that are no whole multiple of the smallest (1 and 1.5 mm) are stacked at the median, as before
    write_series(tmp_path / "uneven", marked_volume((5, 4, 4)), extra=at([0.0, 1, 2.5, 3.5, 5]))
    caplog.set_level("WARNING", logger="medvl.clinical.dicom")
    assert load_volume(tmp_path / "uneven")[1][0] == pytest.approx(1.25)
    assert "uneven slice spacing (1 to 1.5 mm)" in caplog.text
    # one odd narrow gap (0.01 mm among 1 mm steps) is no step the others are multiples of: not ~100 slices missing
    write_series(tmp_path / "narrow", marked_volume((5, 4, 4)), extra=at([0.0, 1, 2, 2.01, 3.01]))
    assert load_volume(tmp_path / "narrow")[1][0] == pytest.approx(1.0)


def test_slices_or_frames_of_different_pixel_spacing_are_not_stacked_as_one_volume(tmp_path):
    """Review finding: only the orientation and the matrix size were compared, so slices of one 4 x 4 matrix but
    another field of view (pixel spacing) were stacked at the first slice's spacing, by load_volume, the dataset
    loader (a volume record) and dicom-info (one spacing shown); an enhanced file's per-frame spacing likewise."""
    from cli_helpers import invoke
    from medvl.clinical.summary import series_summaries
    from medvl.data.images import read_image
    from medvl.data.loaders import load_dataset

    def wider(ds: Dataset, k: int) -> None:
        if k >= 3:
            ds.PixelSpacing = [0.5, 0.5]

    paths = write_series(tmp_path / "ct", marked_volume((5, 4, 4)), extra=wider)
    with pytest.raises(DataError, match=r"slice_002\.dcm: series 1 \(CT, 5 file\(s\).*\): slice 4 of 5 has pixel "
                                        r"spacing 0\.5 x 0\.5 mm, the others 0\.8 x 0\.7 mm: .*not one volume"):
        load_volume(tmp_path / "ct")
    assert sorted(record.meta["kind"] for record in load_dataset(tmp_path / "ct")) == ["image"] * len(paths)
    [row] = series_summaries(tmp_path / "ct")
    assert row["pixel_spacing_mm"] is None and sorted(row["pixel_spacings_mm"]) == [[0.5, 0.5], [0.8, 0.7]]
    result, output = invoke("dicom-info", tmp_path / "ct", "--json", tmp_path / "info.json")
    assert result.exit_code == 0 and "mixed:" in output  # the table shows both, not one
    assert json.loads((tmp_path / "info.json").read_text())["series"] == [row]
    ds = pydicom.dcmread(get_testdata_file("eCT_Supplemental.dcm"))
    measures = Dataset()
    measures.PixelSpacing, measures.SliceThickness = [0.8, 0.8], 10
    ds.PerFrameFunctionalGroupsSequence[1].PixelMeasuresSequence = [measures]
    (tmp_path / "ect").mkdir()
    ds.save_as(tmp_path / "ect" / "ect.dcm")
    for read in (load_volume, lambda folder: read_image(folder / "ect.dcm", modality_values=True)):
        with pytest.raises(DataError, match=r"ect\.dcm: frames: frame 2 of 2 has pixel spacing 0\.8 x 0\.8 mm, the "
                                            r"others 0\.3887 x 0\.3887 mm"):
            read(tmp_path / "ect")
    [row] = series_summaries(tmp_path / "ect" / "ect.dcm")
    assert row["pixel_spacing_mm"] is None and row["pixel_spacings_mm"] == [[0.388672, 0.388672], [0.8, 0.8]]
    shutil.copy(get_testdata_file("CT_small.dcm"), tmp_path / "ect" / "image.dcm")
    assert [record.meta["kind"] for record in load_dataset(tmp_path / "ect")] == ["image"]  # the file skipped
    volume, spacing = load_volume(write_series(tmp_path / "whole", marked_volume((4, 4, 4)))[0].parent)
    assert spacing[1:] == pytest.approx(SPACING[1:])  # one spacing: stacked as before


def test_a_slice_off_the_stacks_line_is_refused_and_a_gantry_tilt_is_named_in_a_warning(tmp_path, caplog):
    """Review finding: only the positions' projections on the slice normal were used, so a slice of another field
    of view (65 mm off in-plane) was stacked as if it lined up, and a gantry-tilted CT (each slice's origin 1 mm
    further along y per 2.5 mm slice) was stacked with no word, by load_volume and the dataset loader."""
    from medvl.data.loaders import load_dataset

    def shifted(ds: Dataset, k: int) -> None:
        if k == 2:
            ds.ImagePositionPatient = [ORIGIN[0] + 60.0, ORIGIN[1] - 25.0, ORIGIN[2] + 2 * SPACING[0]]

    write_series(tmp_path / "shifted", marked_volume((5, 4, 4)), extra=shifted)
    off = r"slice 3 of 5 \(counted along the slice normal\) lies 65 mm in-plane off the line .* another field of view"
    with pytest.raises(DataError, match=rf"series 1 \(CT, 5 file\(s\).*\): {off}"):
        load_volume(tmp_path / "shifted")
    with pytest.raises(DataError, match=rf"series 1 .* record vol-[0-9a-f]{{16}}: {off}"):
        load_dataset(tmp_path / "shifted")

    def tilted(ds: Dataset, k: int) -> None:
        ds.ImagePositionPatient = [ORIGIN[0], ORIGIN[1] + 1.0 * k, ORIGIN[2] + SPACING[0] * k]

    stored = marked_volume((5, 4, 4))
    write_series(tmp_path / "tilted", stored, extra=tilted)
    write_series(tmp_path / "straight", stored)
    caplog.set_level("WARNING", logger="medvl.clinical.dicom")
    volume, spacing = load_volume(tmp_path / "tilted")
    assert "a gantry tilt of 21.8 degrees" in caplog.text  # atan(1 / 2.5)
    assert spacing == pytest.approx(SPACING)  # the distance along the normal, not between the slices' centres
    np.testing.assert_array_equal(volume, load_volume(tmp_path / "straight")[0])  # stacked as acquired
    assert [record.meta["kind"] for record in load_dataset(tmp_path / "tilted")] == ["volume"]
    caplog.clear()

    def jittered(ds: Dataset, k: int) -> None:  # positions rounded by the writer: well within half a pixel
        x, y, z = ORIGIN
        ds.ImagePositionPatient = [x + 0.1 * (k % 2), y - 0.1 * (k % 3 == 1), z + SPACING[0] * k]

    load_volume(write_series(tmp_path / "jittered", stored, extra=jittered)[0].parent)
    assert "tilt" not in caplog.text


def _set_geometry(position: tuple | None = None, orientation: tuple | None = None, slice_index: int = 2):
    """An ``extra`` for ``write_series``: one slice's Image Position (Patient), every slice's Orientation, as text
    (DS values: "nan" and "inf" are what a writer puts there)."""
    def extra(ds: Dataset, k: int) -> None:
        if position is not None and k == slice_index:
            ds.ImagePositionPatient = [str(v) for v in position]
        if orientation is not None:
            ds.ImageOrientationPatient = [str(v) for v in orientation]
    return extra


@pytest.mark.filterwarnings("ignore:Invalid value for VR DS")  # pydicom's, on writing the "nan" / "inf" here
@pytest.mark.parametrize(("geometry", "problem"), [
    ({"position": (0, 0, "nan")}, r"Image Position \(Patient\) 0\\0\\nan is not finite"),
    ({"position": (0, 0, "inf")}, r"Image Position \(Patient\) 0\\0\\inf is not finite"),  # was an OverflowError
    ({"orientation": (1, 0, 0, 0, 1, "nan")}, r"Image Orientation \(Patient\) .*nan is not finite"),
    # stacked with every gap 100 times too large: a 200 mm slice spacing for slices 2 mm apart
    ({"orientation": (10, 0, 0, 0, 10, 0)}, r"Image Orientation \(Patient\) 10\\0\\0\\0\\10\\0"
     r": its row and column direction cosines have lengths 10 and 10; DICOM requires unit vectors"),
    ({"orientation": (0, 0, 0, 0, 0, 0)}, r"Image Orientation \(Patient\) [0\\]+"
     r": its row and column direction cosines have lengths 0 and 0; DICOM requires unit vectors"),
    ({"orientation": (1, 0, 0, 1, 0, 0)}, r"Image Orientation \(Patient\) 1\\0\\0\\1\\0\\0"
     r": its row and column directions are 0 degrees apart; DICOM requires them orthogonal"),
])
def test_a_slice_geometry_dicom_does_not_allow_is_refused_naming_the_file(tmp_path, geometry, problem):
    from medvl.data.loaders import load_dataset

    paths = write_series(tmp_path / "ct", marked_volume((4, 4, 4)), spacing=(2.0, 0.8, 0.7), origin=(0, 0, 0),
                         extra=_set_geometry(**geometry))
    named = re.escape(str(paths[2])) if "position" in geometry else r".*/slice_00\d\.dcm"
    with pytest.raises(DataError, match=rf"^{named}: {problem}"):
        load_volume(tmp_path / "ct")
    with pytest.raises(DataError, match=rf"^{named}: {problem}"):
        load_dataset(tmp_path / "ct")


def test_direction_cosines_rounded_by_the_writer_are_normalised(tmp_path):
    """Within rounding of unit length (0.9995) the orientation is normalised: the slice spacing along the normal
    stays the distance between the slices, not 0.999 of it."""
    paths = write_series(tmp_path / "ct", marked_volume((4, 4, 4)), spacing=(2.0, 0.8, 0.7), origin=(0, 0, 0),
                         extra=_set_geometry(orientation=(0.9995, 0, 0, 0, 0.9995, 0)))
    volume, spacing = load_volume(paths[0].parent)
    assert volume.shape == (4, 4, 4) and spacing == pytest.approx((2.0, 0.8, 0.7), abs=1e-9)


def test_an_enhanced_multiframe_file_with_unnormalised_direction_cosines_is_refused(tmp_path):
    ds = pydicom.dcmread(get_testdata_file("eCT_Supplemental.dcm"))
    plane = ds.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0]
    plane.ImageOrientationPatient = [str(10 * float(v)) for v in plane.ImageOrientationPatient]
    (tmp_path / "ect").mkdir()
    ds.save_as(tmp_path / "ect" / "ect.dcm")
    with pytest.raises(DataError, match=r"ect.dcm: frame 1: Image Orientation .* lengths 10 and 10; DICOM requires"):
        load_volume(tmp_path / "ect")


def test_hidden_files_such_as_macos_appledouble_files_are_skipped(tmp_path):
    from cli_helpers import invoke
    from medvl.clinical.deid import deidentify
    from medvl.data.loaders import load_dataset

    folder = tmp_path / "mac"
    two_images(folder)
    (folder / "MR_small.dcm").unlink()
    apple_double = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + bytes(64)  # not DICOM
    (folder / "._CT_small.dcm").write_bytes(apple_double)
    (folder / ".trash").mkdir()
    (folder / ".trash" / "old.dcm").write_bytes(apple_double)
    [series] = read_dicom_series(folder)
    assert series.files == [folder / "CT_small.dcm"]
    assert [r.meta["modality"] for r in load_dataset(folder)] == ["CT"]
    result, output = invoke("dicom-info", folder)
    assert result.exit_code == 0, output
    report = deidentify(folder, tmp_path / "out", seed=1)
    assert report["files_written"] == 1 and report["skipped"] == {"hidden file (name starting with '.')": 2}


def mixed_pull(folder: Path) -> Path:
    """A folder as a PACS pull often is: a 4-slice CT series (one 3D record) next to two 2D images
    (pydicom's CT_small and MR_small), with a report for each record in ``labels.csv``."""
    from medvl.data.loaders import load_dataset

    write_series(folder / "ct", marked_volume((4, 8, 10)))
    two_images(folder / "images")
    rows = [f"{record.id},{record.meta['kind']} of the chest" for record in load_dataset(folder)]
    (folder / "labels.csv").write_text("id,text\n" + "\n".join(rows) + "\n")
    return folder


def test_each_model_takes_the_records_of_its_kind_from_a_folder_of_images_and_series(tmp_path, caplog):
    """A 2D model indexes and trains on the folder's 2D images, a 3D model indexes its series; the records
    of the other kind are left out with a warning counting them, and a folder with none of the model's kind
    is a clear error."""
    import torch

    from medvl.api import evaluate_retrieval, train_from_path
    from medvl.data.loaders import load_dataset
    from medvl.errors import InputError
    from medvl.index import build_index
    from medvl.models.registry import create_model

    folder = mixed_pull(tmp_path / "pulled")
    dataset = load_dataset(folder)
    assert sorted(record.meta["kind"] for record in dataset) == ["image", "image", "volume"]
    torch.manual_seed(0)
    flat, deep = create_model("phantom-tiny"), create_model("ct3d-tiny")
    with caplog.at_level("WARNING"):
        flat_info = build_index(flat, dataset, tmp_path / "flat", show_progress=False)
    assert "left out 1 3D volume(s), which a 2D model cannot take" in caplog.text
    assert "2 record(s) remain" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        deep_info = build_index(deep, dataset, tmp_path / "deep", show_progress=False)
    assert "left out 2 2D image(s), which a 3D model cannot take" in caplog.text
    assert (flat_info["data"]["n_records"], deep_info["data"]["n_records"]) == (2, 1)
    trained = train_from_path(folder, tmp_path / "run", "phantom-tiny", epochs=1, batch_size=2, show_progress=False)
    assert trained.meta["training"]["records"] == 2
    result = evaluate_retrieval(tmp_path / "run", folder, split="all", show_progress=False)
    assert result["n_records"] == 2
    with pytest.raises(InputError, match=r"no record fits a 3D model, which takes 3D volumes.*2 2D image\(s\)"):
        build_index(deep, load_dataset(folder / "images"), tmp_path / "none", show_progress=False)


def labelled_pull(folder: Path) -> Path:
    """A PACS pull of both kinds with splits, a label and a report per record: 4 CT series (3D records) next to
    6 one-file 2D images, all pixels distinct; the last two of each kind in ``test``, the others in ``train``;
    ``finding`` alternates yes / no within each kind."""
    from medvl.data.loaders import load_dataset

    for number in range(4):
        write_series(folder / f"ct{number}", marked_volume((4, 8, 10)) + 500 * number)
    for number in range(6):  # one slice is no series: a 2D image
        write_series(folder / f"image{number}", marked_volume((1, 8, 10)) * (number + 2))
    rows, seen = [], {"image": 0, "volume": 0}
    for record in load_dataset(folder):
        kind = record.meta["kind"]
        order = seen[kind] = seen[kind] + 1
        split = "train" if order <= {"image": 4, "volume": 2}[kind] else "test"
        finding = "yes" if order % 2 else "no"
        rows.append(f"{record.id},{split},{finding},{kind} {'with' if order % 2 else 'without'} effusion")
    (folder / "labels.csv").write_text("id,split,finding,text\n" + "\n".join(rows) + "\n")
    return folder


def test_case_retrieval_scores_the_queries_of_the_models_kind_from_a_folder_of_both(tmp_path, caplog):
    """Case retrieval (``medvl eval case-retrieval``) of a folder holding 2D images and 3D series: a 2D model's
    queries are the images, a 3D model's the series; the others are left out with a counted warning."""
    import torch

    from medvl.data.loaders import load_dataset
    from medvl.eval.case_retrieval import case_retrieval
    from medvl.index import build_index, open_index
    from medvl.models.registry import create_model

    folder = labelled_pull(tmp_path / "pulled")
    dataset = load_dataset(folder)
    torch.manual_seed(0)
    for name, dims, queries, other in (("phantom-tiny", 2, 6, "4 3D volume(s)"), ("ct3d-tiny", 3, 4, "6 2D image(s)")):
        model = create_model(name)
        build_index(model, dataset, tmp_path / name, show_progress=False)
        caplog.clear()
        with open_index(tmp_path / name) as index, caplog.at_level("WARNING"):
            result = case_retrieval(index, model, dataset, k=1, label_columns=["finding"], show_progress=False)
        assert (result["n_queries"], result["n_index"], result["n_skipped"]) == (queries, queries, 0)
        assert f"left out {other}, which a {dims}D model cannot take" in caplog.text


def test_bench_run_gives_each_model_the_records_of_its_kind_from_a_folder_of_both(tmp_path, caplog):
    """``medvl bench run`` on a folder holding 2D images and 3D series scores a 2D and a 3D model side by side,
    each on the records of its kind (the others left out with a counted warning); a split the suite reads that
    holds none of a model's kind is refused before any work."""
    import json

    import torch
    import yaml

    from medvl.bench.runner import run_suite_file
    from medvl.errors import InputError
    from medvl.models.registry import create_model

    folder = labelled_pull(tmp_path / "pulled")
    torch.manual_seed(0)
    for name in ("phantom-tiny", "ct3d-tiny"):
        create_model(name).save_pretrained(tmp_path / name)
    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump({
        "name": "pull", "bootstrap": 100, "checks": [],
        "datasets": {"pull": {"path": str(folder), "split": "test", "train_split": "train", "label": "finding"}},
        "tasks": [{"task": "linear-probe", "dataset": "pull"}, {"task": "case-retrieval", "dataset": "pull", "k": 1}]}))
    models = [tmp_path / "phantom-tiny", tmp_path / "ct3d-tiny"]
    with caplog.at_level("WARNING"):
        results = run_suite_file(suite, models, tmp_path / "run", show_progress=False)
    assert "left out 4 3D volume(s), which a 2D model cannot take" in caplog.text
    assert "left out 6 2D image(s), which a 3D model cannot take" in caplog.text
    scored = {(row["model"], row["task"]) for row in results["rows"]}
    assert scored == {(model, task) for model in ("phantom-tiny", "ct3d-tiny")
                      for task in ("linear-probe", "case-retrieval")}
    cells = [json.loads(path.read_text()) for path in (tmp_path / "run" / "cells").glob("*.json")]
    assert len(cells) == 4
    lines = (folder / "labels.csv").read_text().splitlines()  # every series in train: none left to score
    (folder / "labels.csv").write_text("\n".join(line.replace(",test,", ",train,") if line.startswith("vol-")
                                                 else line for line in lines) + "\n")
    with pytest.raises(InputError, match=r"dataset 'pull' has no record a 3D model can take in split 'test'"):
        run_suite_file(suite, models, tmp_path / "again", show_progress=False)
    assert not (tmp_path / "again").exists()


def test_a_concept_bottleneck_is_fitted_on_the_records_of_the_models_kind_from_a_folder_of_both(tmp_path, caplog):
    """The concept data of ``medvl explain --concept-data`` may be a folder holding 2D images and 3D series: the
    bottleneck is fitted on the records the model takes, the others left out with a counted warning."""
    import torch

    from medvl.data.loaders import load_dataset
    from medvl.explain.concepts import compare_with_probe, fit_bottleneck, load_concepts
    from medvl.models.registry import create_model

    dataset = load_dataset(labelled_pull(tmp_path / "pulled"))
    bank = load_concepts("chest_xray")
    torch.manual_seed(0)
    for name, dims, other in (("phantom-tiny", 2, "2 3D volume(s)"), ("ct3d-tiny", 3, "4 2D image(s)")):
        model = create_model(name)  # the train split: 4 images, 2 series
        caplog.clear()
        with caplog.at_level("WARNING"):
            fitted = fit_bottleneck(model, dataset.select("train"), "finding", bank)
        assert fitted.classes == ["no", "yes"]
        assert f"left out {other}, which a {dims}D model cannot take" in caplog.text
        compared = compare_with_probe(model, dataset.select("train"), dataset.select("test"), "finding", bank)
        assert (compared["n_train"], compared["n_test"]) == ((4, 2) if dims == 2 else (2, 2))


def test_a_report_generator_trains_and_is_scored_on_the_records_of_its_kind_from_a_folder_of_both(tmp_path, caplog):
    """``medvl train report`` and ``medvl eval report`` on a folder holding 2D images and 3D series: a generator
    with a 2D image tower takes the images, one with a 3D tower the series; the others are left out with a
    counted warning."""
    import torch

    from cli_helpers import invoke
    from medvl.data.loaders import load_dataset
    from medvl.train.loop import TrainConfig
    from medvl.train.report import train_report_generator

    folder = labelled_pull(tmp_path / "pulled")
    train = load_dataset(folder).select("train")  # 4 images, 2 series
    tiny = {"decoder.hidden_size": 32, "decoder.num_heads": 2, "decoder.num_layers": 1,
            "decoder.intermediate_size": 64, "decoder.max_length": 16, "decoder.vocab_size": 200}
    torch.manual_seed(0)
    for image_model, dims, records, other in (("phantom-tiny", 2, 4, "2 3D volume(s)"),
                                              ("ct3d-tiny", 3, 2, "4 2D image(s)")):
        caplog.clear()
        with caplog.at_level("WARNING"):
            generator = train_report_generator(train, tmp_path / image_model, TrainConfig(epochs=1, batch_size=2),
                                               image_model=image_model, overrides=tiny, show_progress=False)
        assert generator.meta["training"]["records"] == records
        assert f"left out {other}, which a {dims}D model cannot take" in caplog.text
    result, output = invoke("eval", "report", "--model", tmp_path / "ct3d-tiny", "--data", folder, "--split", "test",
                            "--beam-size", 1, "-q")
    assert result.exit_code == 0, output
    assert "2 test reports" in output and "nearest of 2 training reports" in output


def test_cross_validation_folds_the_records_of_the_models_kind_from_a_folder_of_both(tmp_path, caplog):
    """``medvl bench cv`` on a folder holding 2D images and 3D series draws its folds from the records the model
    takes; the others are left out with a counted warning."""
    from medvl.bench.cv import cross_validate

    folder = labelled_pull(tmp_path / "pulled")
    with caplog.at_level("WARNING"):
        result = cross_validate(folder, "finding", "phantom-tiny", folds=2, epochs=1, batch_size=2,
                                show_progress=False)
    assert result["n"] == 6 and sorted(len(fold["test_ids"]) for fold in result["folds"]) == [3, 3]
    assert all(record.startswith("img-") for fold in result["folds"] for record in fold["test_ids"])
    assert "left out 4 3D volume(s), which a 2D model cannot take" in caplog.text


@pytest.mark.parametrize(("rows", "problem"), [
    (["{0},test,a", "{1},all,b"], "1 of 2 rows have the split 'all' (first: line 3) beside other splits"),
    (["{0},test,a", "{1},,b"], "line 3: empty 'split' cell"),
])
def test_a_labels_csv_split_follows_the_manifest_rules(tmp_path, rows, problem):
    """'all' beside other splits, or an empty split cell, loaded as the split 'all' beside 'test': --split all then
    took the test records in, and those records could never be selected alone. A manifest refuses the same table."""
    from medvl.data.loaders import load_dataset

    uids = two_images(tmp_path / "dcm")
    (tmp_path / "dcm" / "labels.csv").write_text("SOPInstanceUID,split,finding\n"
                                                 + "\n".join(row.format(*uids) for row in rows) + "\n")
    with pytest.raises(DataError, match=re.escape(problem)):
        load_dataset(tmp_path / "dcm")
    (tmp_path / "dcm" / "labels.csv").write_text(f"SOPInstanceUID,split,finding\n{uids[0]},all,a\n{uids[1]},,b\n")
    assert load_dataset(tmp_path / "dcm").splits == ["all"]  # no row names another split
    (tmp_path / "dcm" / "labels.csv").write_text(f"SOPInstanceUID,split,finding\n{uids[0]},test,a\n")
    assert load_dataset(tmp_path / "dcm").splits == ["test", "all"]  # a record without a row: unlabelled, in 'all'


def test_pydicoms_complaints_stay_out_of_a_fresh_processs_log(tmp_path):
    """pydicom's first import inside medvl's quiet context set its logger back to WARNING, so `medvl dicom-info` in a
    fresh process logged 'Invalid value for VR UI: ...' with the header's value (pydicom's bad_sequence.dcm)."""
    import subprocess
    import sys

    shutil.copy(get_testdata_file("bad_sequence.dcm"), tmp_path / "bad_sequence.dcm")
    done = subprocess.run([sys.executable, "-m", "medvl", "dicom-info", str(tmp_path)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Invalid value" not in done.stdout + done.stderr, done.stderr
