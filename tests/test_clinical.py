"""Clinical formats on real files: pydicom's test files, pydicom-data (``data_store``) and nilearn's
bundled MNI152 template (all shipped inside the packages, nothing downloaded); bad inputs written
here. Every bad input must give a DataError naming the file, and nothing written."""

from __future__ import annotations

import gzip
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
nib = pytest.importorskip("nibabel")
pytest.importorskip("dicognito")
data_store = pytest.importorskip("data_store")

from pydicom.data import get_testdata_file  # noqa: E402

from hostile_files import jpeg_dicom_with_inserted_bytes  # noqa: E402
from medvl.clinical.deid import deidentify  # noqa: E402
from medvl.clinical.dicom import load_volume, read_dicom, read_dicom_series  # noqa: E402
from medvl.clinical.nifti import read_nifti  # noqa: E402
from medvl.clinical.windowing import WINDOW_PRESETS, Window, apply_window, get_window  # noqa: E402
from medvl.data.images import read_image  # noqa: E402
from medvl.errors import DataError, InputError  # noqa: E402

TEST_FILES = Path(get_testdata_file("CT_small.dcm")).parent
DICOMDIR_TESTS = TEST_FILES / "dicomdirtests"
STORE = Path(data_store.__file__).parent / "data"


def dicom(name: str) -> Path:
    return TEST_FILES / name


def reference_window(x, center, width):
    """DICOM PS3.3 C.11.2.1.2.1 LINEAR, written out case by case."""
    low, high = center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2
    return np.where(x <= low, 0.0, np.where(x > high, 1.0, (x - (center - 0.5)) / (width - 1) + 0.5))


def modality_reference(path: Path) -> np.ndarray:
    ds = pydicom.dcmread(path)
    return pydicom.pixels.apply_modality_lut(ds.pixel_array, ds).astype(np.float64)


def assert_names_file(error: pytest.ExceptionInfo, path: Path) -> None:
    assert str(path) in str(error.value), str(error.value)


# ------------------------------------------------------------------------------- windowing


def test_presets_hold_the_documented_values():
    expected = {"lung": (-600, 1500), "mediastinum": (50, 350), "bone": (400, 1800), "brain": (40, 80)}
    for name, (center, width) in expected.items():
        assert (WINDOW_PRESETS[name].center, WINDOW_PRESETS[name].width) == (center, width)
    assert get_window("Soft-Tissue") is WINDOW_PRESETS["soft_tissue"]


def test_window_matches_the_dicom_formula():
    hu = np.linspace(-2000, 2000, 4001)
    for window in WINDOW_PRESETS.values():
        np.testing.assert_allclose(apply_window(hu, window), reference_window(hu, window.center, window.width),
                                   atol=1e-6)
    lung = apply_window(np.array([-1351.0, -600.0, 150.0]), "lung")
    assert lung[0] == 0.0 and abs(lung[1] - 0.5) < 1e-3 and lung[2] == 1.0
    np.testing.assert_allclose(apply_window(np.array([0.0, 39.0, 40.0]), (40, 1)), [0, 0, 1])  # threshold
    assert apply_window(np.array([40.0]), Window(40, 80, function="SIGMOID"))[0] == pytest.approx(0.5)


def test_bad_windows_are_refused():
    with pytest.raises(InputError, match="unknown window preset"):
        get_window("liverish")
    with pytest.raises(InputError, match="width"):
        Window(40, 0)
    with pytest.raises(InputError, match="center, width"):
        get_window((1, 2, 3))


def test_a_sigmoid_window_narrower_than_1_is_applied_not_dropped(tmp_path):
    """Review finding: PS3.3 C.11.2.1.3 asks only width > 0 of SIGMOID, but widths below 1 were refused as for
    LINEAR, so a header's SIGMOID window of width 0.5 was silently ignored and the file read as modality values."""
    assert Window(0.2, 0.5, function="SIGMOID").width == 0.5
    for width, function in ((0.0, "SIGMOID"), (-1.0, "SIGMOID"), (0.5, "LINEAR")):
        with pytest.raises(InputError, match="width"):
            Window(0.2, width, function=function)
    ds = pydicom.dcmread(dicom("CT_small.dcm"))
    ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = 40, 0.5, "SIGMOID"
    path = tmp_path / "sigmoid.dcm"
    ds.save_as(path)
    values = modality_reference(path)
    shown, meta = read_dicom(path, window="file")
    assert (meta["window"]["width"], meta["window"]["function"]) == (0.5, "SIGMOID")
    with np.errstate(over="ignore"):  # the standard's formula as written: exp overflows far below the centre
        expected = 1.0 / (1.0 + np.exp(-4.0 * (values.astype(np.float64) - 40.0) / 0.5))
    np.testing.assert_allclose(shown, expected, atol=1e-6)
    assert apply_window(np.array([-1e6, 40.0, 1e6]), Window(40, 0.5, function="SIGMOID")).tolist() == [0, 0.5, 1]


# --------------------------------------------------------------------------------- DICOM 2D


def test_ct_rescale_gives_hounsfield_units():
    values, meta = read_dicom(dicom("CT_small.dcm"))
    assert values.dtype == np.float32 and values.shape == (128, 128)
    assert meta["rescale"] == {"slope": 1.0, "intercept": -1024.0}
    np.testing.assert_array_equal(values, modality_reference(dicom("CT_small.dcm")))
    assert meta["modality"] == "CT" and meta["pixel_spacing_mm"] == pytest.approx([0.661468, 0.661468])
    lung, meta = read_dicom(dicom("CT_small.dcm"), window="lung")
    np.testing.assert_allclose(lung, reference_window(values.astype(np.float64), -600, 1500), atol=1e-6)
    assert meta["window"]["name"] == "lung"


def test_monochrome1_is_inverted_after_rescale():
    path = DICOMDIR_TESTS / "77654033" / "CR1" / "6154"
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "MONOCHROME1" and float(ds.RescaleSlope) != 1.0
    reference = modality_reference(path)
    values, meta = read_dicom(path)
    assert meta["inverted"] and meta["rescale"]["slope"] == pytest.approx(float(ds.RescaleSlope))
    np.testing.assert_allclose(values, reference.min() + reference.max() - reference, rtol=1e-5)
    shown, meta = read_dicom(path, window="file")
    center, width = float(ds.WindowCenter), float(ds.WindowWidth)
    np.testing.assert_allclose(shown, 1.0 - reference_window(reference, center, width), atol=1e-5)
    assert meta["window"]["center"] == center


def _padded_ct(path: Path, photometric: str = "MONOCHROME2", us_value: bool = False) -> tuple[Path, np.ndarray]:
    """CT_small (signed, Rescale Intercept -1024, Pixel Padding Value -2000 in its header) with the area outside a
    60-pixel-radius field of view padded as scanners write it: -2000, and a ring of -1995 that only a Pixel Padding
    Range Limit of -1990 makes padding. Returns the file and the mask of the padded area."""
    ds = pydicom.dcmread(dicom("CT_small.dcm"))
    rows, columns = np.mgrid[:128, :128]
    radius = np.hypot(rows - 63.5, columns - 63.5)
    pixels = ds.pixel_array.copy()
    pixels[radius > 60] = -2000
    pixels[(radius > 60) & (radius < 62)] = -1995
    ds.PixelData = pixels.astype(np.int16).tobytes()
    ds.add_new("PixelPaddingRangeLimit", "SS", -1990)
    ds.PhotometricInterpretation = photometric
    if us_value:  # the same values written as US, in two's complement
        for keyword in ("PixelPaddingValue", "PixelPaddingRangeLimit"):
            ds.add_new(keyword, "US", int(ds[keyword].value) + (1 << 16))
    ds.save_as(path)
    return path, radius > 60


@pytest.mark.parametrize("photometric, us_value", [("MONOCHROME2", False), ("MONOCHROME2", True),
                                                   ("MONOCHROME1", False)])
def test_pixel_padding_neither_stretches_min_max_scaling_nor_shows_as_a_value_of_its_own(tmp_path, photometric,
                                                                                          us_value):
    """Review finding: Pixel Padding Value (0028,0120) was ignored, so a CT's padding outside its field of view (-3024
    HU) took part in min-max scaling: the preview of the anatomy used 122 grey levels instead of 237. Padding now takes
    the image's darkest displayed value; an image without padding pixels (CT_small states a padding value none of its
    pixels holds) is read exactly as before (test_ct_rescale_gives_hounsfield_units)."""
    from medvl.clinical.windowing import render_preview

    path, padded = _padded_ct(tmp_path / "padded.dcm", photometric, us_value)
    inside = modality_reference(dicom("CT_small.dcm"))[~padded]
    values, _ = read_dicom(path)
    if photometric == "MONOCHROME1":  # inverted over the image's own range: the padding's too
        inside = inside.min() + inside.max() - inside
    np.testing.assert_array_equal(values[~padded], inside)
    assert (values[padded] == inside.min()).all()
    np.testing.assert_array_equal(read_image(path), values)
    preview = render_preview(values)
    assert preview[~padded].min() == 0 and preview[~padded].max() == 255 and (preview[padded] == 0).all()
    lung, _ = read_dicom(path, window="lung")  # through a window, padding is as dark as the darkest anatomy
    assert (lung[padded] == lung[~padded].min()).all()


def test_a_scanner_s_padding_outside_the_field_of_view_reads_as_air_not_as_minus_3024_hu():
    """pydicom-data's 693_UNCR.dcm, a real CT: 55,772 pixels hold its Pixel Padding Value (-2000, -3024 HU), which set
    the image's minimum; they now read as its darkest anatomy, air at -1024 HU, and the anatomy is unchanged."""
    path = STORE / "693_UNCR.dcm"
    reference = modality_reference(path)
    values, _ = read_dicom(path)
    padded = reference == -3024
    assert padded.sum() == 55772 and reference[~padded].min() == -1024
    np.testing.assert_array_equal(values[~padded], reference[~padded])
    assert values.min() == -1024 and (values[padded] == -1024).all()


def test_file_window_and_voi_lut():
    shown, meta = read_dicom(dicom("MR_small.dcm"), window="file")
    ds = pydicom.dcmread(dicom("MR_small.dcm"))
    assert meta["window"]["center"] == float(ds.WindowCenter)
    np.testing.assert_allclose(shown, reference_window(modality_reference(dicom("MR_small.dcm")),
                                                       float(ds.WindowCenter), float(ds.WindowWidth)), atol=1e-5)
    lut, meta = read_dicom(STORE / "vlut_04.dcm", window="file")
    assert meta["window"]["function"] == "VOI LUT" and 0.0 <= lut.min() < lut.max() <= 1.0


def test_colour_multiframe_and_compressed_files():
    rgb, meta = read_dicom(STORE / "SC_rgb.dcm")
    assert rgb.shape == (100, 100, 3) and rgb.dtype == np.uint8 and meta["color"]
    for name in (STORE / "SC_ybr_full_uncompressed.dcm", dicom("SC_ybr_full_422_uncompressed.dcm")):
        ybr, _ = read_dicom(name)  # the same picture stored as YBR (4:2:2: chroma at half width)
        difference = np.abs(ybr.astype(int) - rgb.astype(int))  # YBR -> RGB rounding only
        assert difference.mean() < 1.5 and difference.max() <= 16
    palette, meta = read_dicom(dicom("examples_palette.dcm"))
    assert palette.shape == (350, 800, 3) and meta["photometric"] == "PALETTE COLOR"
    frames, meta = read_dicom(STORE / "emri_small.dcm")
    assert frames.shape == (10, 64, 64) and meta["frames"] == 10
    for lossless in ("emri_small_RLE.dcm", "emri_small_jpeg_2k_lossless.dcm", "emri_small_jpeg_ls_lossless.dcm",
                     "emri_small_big_endian.dcm"):
        np.testing.assert_array_equal(read_dicom(STORE / lossless)[0], frames)


def test_meta_holds_no_patient_data():
    ds = pydicom.dcmread(dicom("CT_small.dcm"))
    _, meta = read_dicom(dicom("CT_small.dcm"))
    # UIDs are kept (they group series) and may embed a creation timestamp: de-identify to remap them
    text = json.dumps({key: value for key, value in meta.items() if not key.endswith("_uid")})
    for secret in (str(ds.PatientName), ds.PatientID, ds.StudyDate, ds.get("PatientBirthDate") or "x" * 9):
        assert secret not in text
    assert meta["study_uid"] == ds.StudyInstanceUID and meta["series_uid"] == ds.SeriesInstanceUID


def test_a_pixel_spacing_of_zero_is_no_spacing(tmp_path):
    """pydicom-data's RG1_UNCI.dcm (a CR) holds Pixel Spacing 0\\0, which PS3.3 does not allow (> 0): it is read
    as no spacing, in the metadata, dicom-info's rows and the dataset records, never as 0 mm."""
    from medvl.clinical.summary import series_summaries
    from medvl.data import load_dataset

    folder = tmp_path / "cr"
    folder.mkdir()
    shutil.copy(STORE / "RG1_UNCI.dcm", folder / "cr.dcm")
    assert [float(v) for v in pydicom.dcmread(folder / "cr.dcm", stop_before_pixels=True).PixelSpacing] == [0, 0]
    [row] = series_summaries(folder)
    assert row["pixel_spacing_mm"] is None
    assert series_summaries(folder / "cr.dcm")[0]["pixel_spacing_mm"] is None
    [record] = load_dataset(folder)
    assert record.meta.get("row_spacing_mm") is None and record.meta.get("column_spacing_mm") is None
    ds = pydicom.dcmread(dicom("CT_small.dcm"))
    for spacing, expected in (([0, 0], None), ([-0.5, 0.5], None), ([0.5, 0], None), ([0.5, 0.25], [0.5, 0.25])):
        ds.PixelSpacing = spacing
        ds.save_as(tmp_path / "ct.dcm")
        meta = read_dicom(tmp_path / "ct.dcm")[1]
        assert meta["pixel_spacing_mm"] == expected, spacing
        assert meta["pixel_spacing_source"] == (None if expected is None else "PixelSpacing")


def test_a_body_part_someone_typed_a_name_into_is_left_out_of_the_metadata(tmp_path):
    ds = pydicom.dcmread(dicom("CT_small.dcm"))
    for typed, kept in (("CHEST", "CHEST"), ("KRUMPLEHORN", None), ("OBRIEN MAEVE", None)):
        ds.BodyPartExamined = typed
        ds.save_as(tmp_path / "a.dcm")
        assert read_dicom(tmp_path / "a.dcm")[1]["body_part"] == kept, typed


def test_read_image_gives_preprocessor_ready_arrays(tmp_path):
    from medvl.models.config import ImageConfig
    from medvl.models.preprocess import ImagePreprocessor

    assert read_image(dicom("MR_small.dcm")).dtype == np.uint8  # its header window applied
    assert read_image(dicom("CT_small.dcm")).dtype == np.float32  # no window in the header: HU
    extensionless = tmp_path / "IM0001"
    shutil.copy(dicom("MR_small.dcm"), extensionless)
    np.testing.assert_array_equal(read_image(extensionless), read_image(dicom("MR_small.dcm")))
    preprocessor = ImagePreprocessor(ImageConfig(image_size=32, augment=False))
    for path in (dicom("CT_small.dcm"), extensionless, STORE / "SC_rgb.dcm"):
        tensor = preprocessor.load(path)
        assert tuple(tensor.shape) == (1, 32, 32) and 0.0 <= float(tensor.min()) <= float(tensor.max()) <= 1.0
    not_dicom = tmp_path / "notes"
    not_dicom.write_bytes(b"x" * 200)
    with pytest.raises(DataError, match="unsupported file type"):
        read_image(not_dicom)


# ------------------------------------------------------------------------------ bad DICOMs


def test_truncated_dicom(tmp_path):
    with pytest.raises(DataError, match="truncated") as error:
        read_dicom(dicom("MR_truncated.dcm"))
    assert_names_file(error, dicom("MR_truncated.dcm"))
    cut = tmp_path / "cut.dcm"
    data = dicom("CT_small.dcm").read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="truncated") as error:
        read_dicom(cut)
    assert_names_file(error, cut)
    with pytest.raises(DataError, match="truncated"):
        read_dicom(STORE / "emri_small_jpeg_2k_lossless_too_short.dcm")


def test_dicom_without_pixel_data():
    for name in ("rtplan.dcm", "test-SR.dcm", "dicomdirtests/DICOMDIR"):
        with pytest.raises(DataError, match="no pixel data") as error:
            read_dicom(dicom(name))
        assert_names_file(error, dicom(name))


def test_missing_decoder_names_the_extra(monkeypatch):
    import pydicom.pixels

    class Unavailable:
        is_available = False
        missing_dependencies = ["pylibjpeg-openjpeg - requires numpy and pylibjpeg-openjpeg"]

    monkeypatch.setattr(pydicom.pixels, "get_decoder", lambda uid: Unavailable())
    with pytest.raises(DataError, match=r"medvl\[clinical\]") as error:
        read_dicom(dicom("JPEG2000.dcm"))
    assert "JPEG 2000" in str(error.value)
    assert_names_file(error, dicom("JPEG2000.dcm"))


def test_unknown_transfer_syntax(tmp_path):
    ds = pydicom.dcmread(dicom("CT_small.dcm"))
    ds.file_meta.TransferSyntaxUID = "1.2.3.4.5"
    odd = tmp_path / "odd.dcm"
    ds.save_as(odd)
    with pytest.raises(DataError, match="unsupported transfer syntax") as error:
        read_dicom(odd)
    assert_names_file(error, odd)


def test_not_dicom_files_are_named(tmp_path):
    with pytest.raises(DataError, match="gzip-compressed"):
        read_dicom(dicom("zipMR.gz"))
    fake = tmp_path / "fake.dcm"
    fake.write_text("hello")
    with pytest.raises(DataError, match="not a DICOM file") as error:
        read_dicom(fake)
    assert_names_file(error, fake)



def test_a_corrupt_jpeg_stream_is_a_data_error_not_an_abort(tmp_path):
    """pydicom tried python-gdcm first for JPEG, and GDCM threw a C++ exception nothing caught on some corrupt
    streams: the whole process aborted (SIGABRT; medvl predict exit 134, medvl serve gone after one upload).
    GDCM is no longer tried where another decoder is installed: a stream no decoder can read is a DataError
    naming the file, and one with an extraneous byte the decoders skip is read as the intact file."""
    broken = jpeg_dicom_with_inserted_bytes(tmp_path / "broken.dcm", b"\0\0", 108)
    with pytest.raises(DataError, match=r"could not decode the JPEG Baseline \(Process 1\) pixel data") as error:
        read_image(broken)
    assert_names_file(error, broken)
    extra_byte = jpeg_dicom_with_inserted_bytes(tmp_path / "extra-byte.dcm", b"\0", 0)
    np.testing.assert_array_equal(read_dicom(extra_byte)[0], read_dicom(dicom("SC_rgb_jpeg.dcm"))[0])


@pytest.mark.filterwarnings("ignore:Expected explicit VR")  # SC_rgb_jpeg.dcm says explicit, is implicit
@pytest.mark.parametrize("name", ["SC_rgb_jpeg.dcm", "SC_rgb_jpeg_lossy_gdcm.dcm", "SC_jpeg_no_color_transform.dcm",
                                  "SC_rgb_dcmtk_+eb+cy+n1.dcm", "JPEG2000.dcm", "JPEGLSNearLossless_16.dcm"])
def test_compressed_pixels_are_decoded_without_gdcm_to_the_values_gdcm_gives(name):
    """Lossy colour JPEG decodes differently from one decoder to the next (pylibjpeg's libjpeg by up to 5 levels):
    Pillow, tried first, gives GDCM's values bit for bit, as read_dicom gave them when GDCM decoded them."""
    from pydicom.pixels import pixel_array

    from medvl.clinical.dicom import decoding_plugins, transfer_syntax

    pytest.importorskip("gdcm")
    ds = pydicom.dcmread(dicom(name))
    assert "gdcm" not in decoding_plugins(transfer_syntax(ds))
    np.testing.assert_array_equal(read_dicom(dicom(name))[0], pixel_array(ds, decoding_plugin="gdcm"))


def unknown_vr(name: str, element: bytes, target: Path) -> Path:
    """A copy of pydicom's test file ``name`` with the explicit VR of ``element`` (its tag and VR bytes, the first
    occurrence) written over as 'ES', a VR DICOM does not have: two bytes changed."""
    data = bytearray(dicom(name).read_bytes())
    at = data.find(element)
    assert at > 128
    data[at + 4:at + 6] = b"ES"
    target.write_bytes(bytes(data))
    return target


# in the data set (Bits Allocated), in the file meta (Implementation Class UID), in a sequence item (Other Patient
# IDs Sequence's Type of Patient ID), on an encapsulated file's Pixel Data (which the element check passed over, and
# reading its length as a short VR's leaves it empty: pydicom converted it when a later check listed the elements)
UNKNOWN_VRS = [("MR_small.dcm", b"\x28\x00\x00\x01US", "(0028,0100)"),
               ("MR_small.dcm", b"\x02\x00\x12\x00UI", "(0002,0012)"),
               ("CT_small.dcm", b"\x10\x00\x22\x00CS", "(0010,1002)"),
               ("JPEG2000.dcm", b"\xe0\x7f\x10\x00OB", "(7FE0,0010)")]


def assert_refused_by_every_reader(cli, bad: Path, reason: str, tmp_path: Path) -> None:
    """read_dicom, read_image, deidentify, dicom-info and deid each refuse ``bad`` with ``reason``, naming the file
    (exit 2 at the CLI), and write nothing beside it."""
    for read in (read_dicom, read_image, lambda path: deidentify(path, tmp_path / "out.dcm")):
        with pytest.raises(DataError) as error:
            read(bad)
        assert reason in str(error.value)
        assert_names_file(error, bad)
    for command in (("dicom-info", bad), ("deid", bad, tmp_path / "out.dcm")):
        result = cli(*command)
        assert result.exit_code == 2 and reason in " ".join(result.output.split()), result.output
    assert sorted(path.name for path in tmp_path.iterdir()) == ["bad.dcm"]  # nothing written


@pytest.mark.parametrize("name, element, tag", UNKNOWN_VRS,
                         ids=["data-set", "file-meta", "sequence-item", "encapsulated-pixel-data"])
def test_an_unknown_value_representation_is_a_corrupt_file_to_every_reader(cli, tmp_path, name, element, tag):
    """pydicom converts an element when it is first read and raises NotImplementedError for a VR it does not know:
    reading the pixels, de-identifying and dicom-info gave a traceback (exit 1; the service a 500), wherever the
    element happened to be read first. Every one refuses the file, naming it and the element."""
    bad = unknown_vr(name, element, tmp_path / "bad.dcm")
    reason = f"truncated or corrupt DICOM file (unknown value representation in {tag})"
    assert_refused_by_every_reader(cli, bad, reason, tmp_path)


def test_a_private_element_whose_length_does_not_fit_its_dictionary_vr_is_read_not_refused(cli, tmp_path):
    """Elscint / Philips CT files store the private "Pitch" (01F1,1026) as text where pydicom's private dictionary
    says FD: the element check made such a real scanner file corrupt to dicom-info, predict and index build,
    which read it before (no reader of medvl reads private elements), and de-identification refused it. It is
    read, and de-identified without its private elements; a public element whose length does not fit its VR is
    still refused."""
    import pydicom
    from pydicom.uid import ImplicitVRLittleEndian

    ds = pydicom.dcmread(dicom("CT_small.dcm"))
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds.add_new(0x01F10010, "LO", "ELSCINT1")
    ds.add_new(0x01F11099, "UN", b"0.264 ")  # a placeholder tag, renamed in the bytes below
    ds.save_as(tmp_path / "written.dcm", implicit_vr=True, little_endian=True)
    data = (tmp_path / "written.dcm").read_bytes()
    assert data.count(bytes.fromhex("F1019910")) == 1
    elscint = tmp_path / "elscint.dcm"
    elscint.write_bytes(data.replace(bytes.fromhex("F1019910"), bytes.fromhex("F1012610")))
    pixels, _ = read_dicom(elscint)
    np.testing.assert_array_equal(pixels, read_dicom(dicom("CT_small.dcm"))[0])
    assert cli("dicom-info", elscint).exit_code == 0
    deidentify(elscint, tmp_path / "clean.dcm")  # refused before: it removes private elements anyway
    clean = pydicom.dcmread(tmp_path / "clean.dcm")
    assert clean.PatientIdentityRemoved == "YES" and not [e for e in clean if e.tag.is_private]
    public = bytearray(data)  # Rows (0028,0010), US: its 2-byte value declared 3 bytes long
    at = public.find(bytes.fromhex("28001000") + (2).to_bytes(4, "little"))
    assert at > 128
    public[at + 4:at + 8] = (3).to_bytes(4, "little")
    public[at + 8:at + 8] = b"\0"
    (tmp_path / "rows.dcm").write_bytes(bytes(public))
    with pytest.raises(DataError, match=r"the length of element \(0028,0010\) does not fit its VR"):
        read_dicom(tmp_path / "rows.dcm")


def test_the_element_check_without_converting_agrees_with_converting():
    """``check_elements`` skips converting an element whose explicit VR converts any bytes of a fitting length (most
    of a header read's time went into converting). For every VR pydicom knows, lengths 0 to 24, random and digit
    bytes, a public and a private tag, both byte orders: an element passed unconverted converts without error (a
    private one: or with only a length error, which is tolerated)."""
    import random

    import pydicom
    from pydicom.dataelem import RawDataElement, convert_raw_data_element
    from pydicom.dataset import Dataset
    from pydicom.errors import BytesLengthException
    from pydicom.values import converters

    from medvl.clinical.dicom import _fits_unconverted, quiet_pydicom

    generator, dataset, passed, failed = random.Random(0), Dataset(), 0, 0
    for vr in sorted(converters):
        for length in range(25):
            for value in (bytes(generator.randrange(256) for _ in range(length)), b"9" * length, b"1e999 "[:length]):
                for tag, little in ((0x00280010, True), (0x00091010, False), (0x00200013, True), (0x00181000, False)):
                    private = bool(tag >> 16 & 1)
                    element = RawDataElement(pydicom.tag.Tag(tag), vr, len(value), value, 0, False, little)
                    try:
                        with quiet_pydicom():
                            converted = convert_raw_data_element(element, encoding=["iso8859"], ds=dataset)
                            if converted.VR == "SQ":
                                for item in converted.value:
                                    item.walk(lambda _dataset, _element: None)
                        error = None
                    except Exception as raised:  # noqa: BLE001 -- any failure is what the check must not miss
                        error = raised
                    if _fits_unconverted(element, private):
                        passed += 1
                        assert error is None or private and isinstance(error, BytesLengthException), (vr, value, tag)
                    else:
                        failed += error is not None
    assert passed > 9_000 and failed > 1_000  # both ways are exercised (9,213 and 1,566)


def test_a_public_number_that_does_not_fit_its_vr_or_overflows_is_refused(tmp_path):
    """In an explicit VR file, Rows (US) three bytes long is refused without being converted; an Instance Number
    (IS) of "1e999" overflowed pydicom's conversion (OverflowError: a traceback from dicom-info, predict)."""
    data = dicom("CT_small.dcm").read_bytes()
    at = data.find(b"\x28\x00\x10\x00US\x02\x00")
    assert at > 128
    (tmp_path / "rows.dcm").write_bytes(data[:at + 6] + b"\x03\x00" + data[at + 8:at + 10] + b"\0" + data[at + 10:])
    with pytest.raises(DataError, match=r"the length of element \(0028,0010\) does not fit its VR") as error:
        read_dicom(tmp_path / "rows.dcm")
    assert_names_file(error, tmp_path / "rows.dcm")
    at = data.find(b"\x20\x00\x13\x00IS\x02\x00")
    assert at > 128
    number = tmp_path / "series" / "number.dcm"
    number.parent.mkdir()
    number.write_bytes(data[:at + 6] + b"\x06\x00" + b"1e999 " + data[at + 10:])
    for read in (read_dicom, lambda path: read_dicom_series(path.parent)):
        with pytest.raises(DataError, match=r"OverflowError in element \(0020,0013\)") as error:
            read(number)
        assert_names_file(error, number)


def test_a_deflated_file_whose_stream_is_corrupt_is_refused_by_every_reader(cli, tmp_path):
    """A Deflated Explicit VR Little Endian file (the data set after the file meta is one deflate stream) with one
    byte of that stream flipped: pydicom's zlib.error is no subclass of the errors the parser catches, so
    predict, dicom-info and deid gave a traceback (exit 1). Every reader refuses the file, naming it."""
    data = bytearray(dicom("image_dfl.dcm").read_bytes())
    meta_end = 144 + int.from_bytes(data[140:144], "little")  # preamble, DICM, File Meta Information Group Length
    data[meta_end + 40] ^= 0xFF
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(bytes(data))
    reason = "truncated or corrupt DICOM file (the deflated data set does not inflate"
    assert_refused_by_every_reader(cli, bad, reason, tmp_path)


def with_header(target: Path, raw: dict[int, bytes] | None = None, **values) -> Path:
    """MR_small (it has a Window Center / Width, no rescale) with ``values`` set and ``raw`` DS values written as
    they are (bytes pydicom would refuse to write from a number: ``abc``, ``1e309``)."""
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    ds = pydicom.dcmread(dicom("MR_small.dcm"))
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    for tag, value in (raw or {}).items():
        ds._dict[Tag(tag)] = RawDataElement(Tag(tag), "DS", len(value), value, 0, False, True)
    target.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(target)
    return target


SLOPE, INTERCEPT = 0x00281053, 0x00281052
BROKEN_PIXEL_TRANSFORMS = [
    ({SLOPE: b"abc "}, {}, "Rescale Slope 'abc' is not a number"),
    ({SLOPE: b"1e309 "}, {}, "Rescale Slope '1e309' is not a finite number"),
    ({INTERCEPT: b"-1e309"}, {}, "Rescale Intercept '-1e309' is not a finite number"),
    ({SLOPE: b"1e39"}, {}, "Rescale Slope '1e39' is beyond the float32 range"),
    ({SLOPE: b"1e37"}, {}, "take the stored values beyond the float32 range"),
    ({SLOPE: b"0 "}, {}, "Rescale Slope is 0: every pixel would read as the Rescale Intercept (a blank image)"),
    ({}, {"PhotometricInterpretation": "PALETTE COLOR"},
     "PALETTE COLOR without its palette lookup tables (no Red Palette Color Lookup Table Descriptor)"),
]


@pytest.mark.parametrize("raw, values, reason", BROKEN_PIXEL_TRANSFORMS,
                         ids=["slope-abc", "slope-inf", "intercept-inf", "slope-float32", "overflow", "slope-0",
                              "palette"])
def test_a_rescale_that_is_not_a_finite_number_or_a_palette_without_tables_is_refused(tmp_path, raw, values, reason):
    """A Rescale Slope 'abc' (float() raised ValueError) and PALETTE COLOR without its lookup tables (pydicom's
    apply_color_lut raised) gave tracebacks from predict, explain and index build and a 500 from the service; an
    infinite slope was refused only without a window: with the file's window the image was answered as a blank
    grey. Every reader refuses the file, naming it and the element, window or not."""
    bad = with_header(tmp_path / "series" / "bad.dcm", raw, **values)
    position = [float(v) for v in pydicom.dcmread(bad).ImagePositionPatient]
    with_header(tmp_path / "series" / "next.dcm", raw, **values, SOPInstanceUID="1.2.826.0.1.3680043.8.498.5",
                ImagePositionPatient=[position[0], position[1], position[2] + 5])  # a second slice: a volume
    readers = (read_dicom, lambda path: read_dicom(path, window="file"), read_image,
               lambda path: read_image(path, modality_values=True), lambda path: load_volume(path.parent))
    for read in readers:
        with pytest.raises(DataError) as error:
            read(bad)
        assert reason in str(error.value)
        assert "bad.dcm" in str(error.value) or "next.dcm" in str(error.value)


def test_a_palette_with_its_tables_and_a_finite_rescale_are_read(tmp_path):
    """The checks above refuse no real file: pydicom's palette colour file, and a slope and intercept as text."""
    rgb, meta = read_dicom(STORE / "OT-PAL-8-face.dcm")
    assert rgb.shape == (480, 640, 3) and meta["color"]
    array, meta = read_dicom(with_header(tmp_path / "ok.dcm", {SLOPE: b"0.5 ", INTERCEPT: b"-100"}))
    assert meta["rescale"] == {"slope": 0.5, "intercept": -100.0} and np.isfinite(array).all()


# ------------------------------------------------------------------------------ DICOM 3D


def copy_series(target: Path, *folders: Path) -> Path:
    """Copy series files under new names whose alphabetical order is the reverse of the original."""
    target.mkdir(parents=True, exist_ok=True)
    files = sorted(f for folder in folders for f in folder.iterdir() if f.is_file())
    for index, file in enumerate(files):
        shutil.copy(file, target / f"z{len(files) - index:03d}.dcm")
    return target


def test_series_becomes_a_volume_sorted_by_position(tmp_path):
    folder = copy_series(tmp_path / "ct", DICOMDIR_TESTS / "98892001" / "CT5N")
    [series] = read_dicom_series(folder)
    assert series.modality == "CT" and len(series.files) == 5
    volume, spacing = load_volume(series)
    headers = sorted((pydicom.dcmread(f) for f in folder.iterdir()),
                     key=lambda ds: float(np.dot(ds.ImagePositionPatient, np.cross(
                         np.array(ds.ImageOrientationPatient[:3], float),
                         np.array(ds.ImageOrientationPatient[3:], float)))))
    expected = np.stack([pydicom.pixels.apply_modality_lut(ds.pixel_array, ds) for ds in headers])
    assert volume.shape == (5, 16, 16) and volume.dtype == np.float32
    # axial LPS (rows anterior -> posterior, columns right -> left) to RAS, as read_nifti: rows and columns reversed
    assert list(headers[0].ImageOrientationPatient) == [1, 0, 0, 0, 1, 0]
    np.testing.assert_array_equal(volume, expected[:, ::-1, ::-1])
    assert spacing == pytest.approx((2.5, 0.488281, 0.488281))
    np.testing.assert_array_equal(load_volume(folder)[0], volume)  # a folder with one series


def test_enhanced_multiframe_volume(tmp_path):
    shutil.copy(STORE / "eCT_Supplemental.dcm", tmp_path / "ect.dcm")
    volume, spacing = load_volume(tmp_path)
    assert volume.shape == (2, 512, 512) and spacing == pytest.approx((10.0, 0.388672, 0.388672))


def test_mixed_series_in_one_folder(tmp_path):
    folder = copy_series(tmp_path / "mixed", DICOMDIR_TESTS / "98892001" / "CT5N", DICOMDIR_TESTS / "77654033" / "CT2")
    assert len(read_dicom_series(folder)) == 2
    with pytest.raises(DataError, match="holds 2 series") as error:
        load_volume(folder)
    assert_names_file(error, folder)
    [mr700] = [s for s in read_dicom_series(DICOMDIR_TESTS / "98892003") if s.series_number == 700]
    with pytest.raises(DataError, match="orientation differs"):
        load_volume(mr700)


# ----------------------------------------------------------------------------------- NIfTI


def mni_template() -> Path:
    nilearn = pytest.importorskip("nilearn")
    path = Path(nilearn.__file__).parent / "datasets" / "data" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    if not path.is_file():
        pytest.skip("nilearn's bundled MNI152 template not found")
    return path


def test_mni152_template_loads_in_ras():
    volume, spacing = read_nifti(mni_template())
    image = nib.load(mni_template())
    assert nib.aff2axcodes(image.affine) == ("R", "A", "S")
    assert volume.shape == tuple(reversed(image.shape)) and spacing == (1.0, 1.0, 1.0)
    np.testing.assert_array_equal(volume, np.asarray(image.dataobj, dtype=np.float32).transpose(2, 1, 0))


def test_nifti_is_reoriented_to_ras_with_spacing(tmp_path):
    data = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    affine = np.diag([-1.5, -2.0, 3.0, 1.0])  # L-P-S storage, anisotropic voxels
    path = tmp_path / "lps.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), path)
    volume, spacing = read_nifti(path)
    assert spacing == (3.0, 2.0, 1.5)
    np.testing.assert_array_equal(volume, data[::-1, ::-1, :].transpose(2, 1, 0).astype(np.float32))
    np.testing.assert_array_equal(read_image(path), volume)  # registered for read_image too


@pytest.mark.parametrize("unit, mm_per_unit", [("mm", 1.0), ("unknown", 1.0), ("meter", 1000.0), ("micron", 0.001)])
def test_nifti_spacing_is_converted_to_mm_from_the_header_unit(cli, tmp_path, unit, mm_per_unit):
    """Review finding: the voxel sizes were taken as mm whatever unit ``xyzt_units`` named, so 1 x 1 x 2.5 mm voxels
    written in microns read as 1000 x 1000 x 2500 mm (read_nifti, NiftiSlabs, dicom-info)."""
    from medvl.clinical.nifti import NiftiSlabs

    data = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    image = nib.Nifti1Image(data, np.diag([1.0 / mm_per_unit, 1.0 / mm_per_unit, 2.5 / mm_per_unit, 1.0]))
    image.header.set_xyzt_units(unit, "sec")
    path = tmp_path / f"{unit}.nii.gz"
    nib.save(image, path)
    volume, spacing = read_nifti(path)
    assert spacing == pytest.approx((2.5, 1.0, 1.0), rel=1e-6)
    assert NiftiSlabs(path).spacing == pytest.approx(spacing, rel=1e-6)
    np.testing.assert_array_equal(volume, data.transpose(2, 1, 0).astype(np.float32))
    result = cli("dicom-info", path, "--json", tmp_path / "info.json")
    assert result.exit_code == 0, result.output
    spacing_shown = json.loads((tmp_path / "info.json").read_text())["series"][0]["pixel_spacing_mm"]
    assert spacing_shown == pytest.approx([2.5, 1.0, 1.0], rel=1e-6)


def test_nifti_spacing_is_the_sform_s_when_the_sform_orients_the_volume(cli, tmp_path):
    """Review finding: the volume was oriented by the sform but its spacing taken from pixdim (the qform's scale), so a
    file whose sform was rewritten to 2 x 3 x 4 mm voxels, pixdim left at 1 mm, read as 1 x 1 x 1 mm (read_nifti,
    NiftiSlabs, dicom-info), where nibabel's voxel_sizes(affine) and MONAI give 2 x 3 x 4 mm."""
    from medvl.clinical.nifti import NiftiSlabs

    data = np.arange(6 * 7 * 8, dtype=np.int16).reshape(6, 7, 8)
    image = nib.Nifti1Image(data, np.diag([2.0, 3.0, 4.0, 1.0]))
    image.set_sform(np.diag([2.0, 3.0, 4.0, 1.0]), code=1)
    image.set_qform(np.eye(4), code=1)
    image.header.set_zooms((1.0, 1.0, 1.0))
    path = tmp_path / "rewritten_sform.nii"
    nib.save(image, path)
    assert tuple(nib.load(path).header.get_zooms()) == (1.0, 1.0, 1.0)
    volume, spacing = read_nifti(path)
    assert spacing == (4.0, 3.0, 2.0)
    assert NiftiSlabs(path).spacing == spacing
    np.testing.assert_array_equal(volume, data.transpose(2, 1, 0).astype(np.float32))
    result = cli("dicom-info", path, "--json", tmp_path / "info.json")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "info.json").read_text())["series"][0]["pixel_spacing_mm"] == [4.0, 3.0, 2.0]


def test_nifti_spatial_unit_that_is_no_length_is_refused(cli, tmp_path):
    from medvl.clinical.nifti import NiftiSlabs

    image = nib.Nifti1Image(np.zeros((4, 5, 6), np.int16), np.diag([1.0, 1.0, 2.5, 1.0]))
    image.header["xyzt_units"] = 5  # the spatial bits name no unit (0 unknown, 1 meter, 2 mm, 3 micron)
    path = tmp_path / "odd.nii"
    nib.save(image, path)
    for reader in (read_nifti, NiftiSlabs):
        with pytest.raises(DataError, match="not a length unit") as error:
            reader(path)
        assert_names_file(error, path)
    result = cli("dicom-info", path)
    assert result.exit_code == 2 and "not a length unit" in result.output


def nifti_header(shape, dtype=np.int16) -> bytes:
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header["vox_offset"] = 352
    return header.binaryblock + b"\x00" * 4


def test_broken_nifti_header(tmp_path):
    path = tmp_path / "broken.nii"
    path.write_bytes(b"\x07" * 400)
    with pytest.raises(DataError, match="broken header") as error:
        read_nifti(path)
    assert_names_file(error, path)
    short = tmp_path / "short.nii"
    short.write_bytes(nifti_header((8, 8, 8)) + b"\x00" * 100)
    with pytest.raises(DataError, match="truncated"):
        read_nifti(short)


def test_zip_bomb_disguised_as_nifti(tmp_path):
    huge = tmp_path / "huge.nii.gz"  # the header declares 64 GiB of voxels: refused before decompressing
    huge.write_bytes(gzip.compress(nifti_header((4096, 4096, 2048)) + b"\x00" * 1024))
    with pytest.raises(DataError, match="refused before decompressing") as error:
        read_nifti(huge)
    assert_names_file(error, huge)
    zeros = tmp_path / "zeros.nii.gz"  # no header at all, just a long run of zeros
    zeros.write_bytes(gzip.compress(b"\x00" * (8 << 20), compresslevel=1))
    with pytest.raises(DataError, match="broken header"):
        read_nifti(zeros)
    padded = tmp_path / "padded.nii.gz"  # a small volume followed by 32 MiB of zeros: never decompressed
    padded.write_bytes(gzip.compress(nifti_header((4, 4, 4)) + b"\x01" * 128 + b"\x00" * (32 << 20), compresslevel=1))
    started = time.perf_counter()
    volume, _ = read_nifti(padded)
    assert volume.shape == (4, 4, 4) and time.perf_counter() - started < 0.5


# ------------------------------------------------------------------------- de-identification


def identifiers(paths) -> set[bytes]:
    """PatientName (whole and parts of 3+ characters), PatientID and every date of the inputs."""
    found: set[str] = set()
    for path in paths:
        try:
            ds = pydicom.dcmread(path)
        except Exception:  # noqa: BLE001 - not DICOM
            continue
        name = str(ds.get("PatientName") or "")
        found |= {name} | {part for part in name.replace("=", "^").split("^") if len(part) >= 3}
        found.add(str(ds.get("PatientID") or ""))
        found.update(str(element.value)[:8] for element in ds.iterall()
                     if element.VR in ("DA", "DT") and element.value)
    return {value.encode() for value in found if len(value) >= 3}


@pytest.fixture(scope="module")
def deid_input(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("deid") / "in"
    shutil.copytree(DICOMDIR_TESTS / "77654033", folder / "77654033")
    shutil.copytree(DICOMDIR_TESTS / "98892001", folder / "98892001")
    for name in ("CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "examples_overlay.dcm", "test-SR.dcm"):
        shutil.copy(dicom(name), folder / name)
    shutil.copy(STORE / "emri_small.dcm", folder / "emri_small.dcm")
    (folder / "README.txt").write_text("not DICOM")
    return folder


@pytest.fixture(scope="module")
def deidentified(deid_input, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("deid-out") / "out"
    return out, deidentify(deid_input, out, seed=7)


def test_deid_leaves_no_identifier_in_any_output_byte(deid_input, deidentified):
    out, report = deidentified
    secrets = identifiers(p for p in deid_input.rglob("*") if p.is_file())
    assert len(secrets) > 10  # names, IDs and dates were there to find
    outputs = [p for p in out.rglob("*") if p.is_file()]
    assert len(outputs) == report["files_written"] + 1  # + deid-report.json
    leaks = [(p.name, s) for p in outputs for s in secrets if s in p.read_bytes()]
    assert leaks == []


def test_deid_report_private_tags_and_pixels(deid_input, deidentified):
    out, report = deidentified
    assert report["files_written"] == 20 and report["skipped"] == {"not DICOM": 1}
    assert json.loads((out / "deid-report.json").read_text()) == report
    assert {"PatientName", "PatientID", "StudyInstanceUID", "StudyDate"} <= set(report["totals"]["replaced"])
    assert report["totals"]["private_tags_removed"] > 0 and "ContentSequence" in report["totals"]["removed"]
    by_uid = {}
    for path in out.rglob("*.dcm"):
        ds = pydicom.dcmread(path)
        assert not any(element.tag.is_private for element in ds.iterall())
        assert ds.PatientIdentityRemoved == "YES" and ds.preamble == b"\x00" * 128
        by_uid[ds.SOPInstanceUID] = ds
    assert report["totals"]["files_with_burned_in_risk"] == 1  # JPEG2000.dcm, a secondary capture: flagged
    original = pydicom.dcmread(dicom("CT_small.dcm"))
    [ct] = [ds for ds in by_uid.values() if ds.get("Rows") == 128 and ds.Modality == "CT"]
    np.testing.assert_array_equal(ct.pixel_array, original.pixel_array)
    assert ct.StudyInstanceUID != original.StudyInstanceUID


def test_deid_uids_consistent_within_a_run(deid_input, deidentified, tmp_path):
    out, _ = deidentified
    [series] = [s for s in read_dicom_series(out) if s.modality == "CT" and len(s.files) == 5]
    volume, spacing = load_volume(series)  # the de-identified series still stacks
    original, original_spacing = load_volume(deid_input / "98892001" / "CT5N")
    np.testing.assert_array_equal(volume, original)
    assert spacing == original_spacing
    again = deidentify(deid_input / "CT_small.dcm", tmp_path / "again.dcm", seed=7)
    assert again["files_written"] == 1
    same_seed = pydicom.dcmread(tmp_path / "again.dcm").SOPInstanceUID
    assert same_seed in {pydicom.dcmread(p).SOPInstanceUID for p in out.rglob("*.dcm")}
    deidentify(deid_input / "CT_small.dcm", tmp_path / "other.dcm", seed=8)
    assert pydicom.dcmread(tmp_path / "other.dcm").SOPInstanceUID != same_seed


def test_deid_bad_input_writes_nothing(deid_input, tmp_path):
    broken = tmp_path / "in"
    shutil.copytree(deid_input / "98892001", broken)
    data = dicom("CT_small.dcm").read_bytes()
    (broken / "cut.dcm").write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    with pytest.raises(DataError, match="truncated") as error:
        deidentify(broken, out)
    assert_names_file(error, broken / "cut.dcm")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]  # no output, no staging left
    with pytest.raises(DataError, match="not a DICOM file"):
        deidentify(dicom("zipMR.gz"), tmp_path / "x.dcm")
    assert not (tmp_path / "x.dcm").exists()
    with pytest.raises(InputError, match="already exists"):
        deidentify(dicom("CT_small.dcm"), broken / "cut.dcm")
    with pytest.raises(InputError, match="inside the input"):
        deidentify(broken, broken / "out")


# ------------------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def cli():
    import typer
    from typer.testing import CliRunner

    from medvl.cli.clinical import deid_command, inspect_command

    app = typer.Typer()
    app.command("deid")(deid_command)
    app.command("dicom-info")(inspect_command)
    runner = CliRunner()
    return lambda *args: runner.invoke(app, [str(a) for a in args])


def test_cli_deid_and_dicom_info(cli, tmp_path):
    source = copy_series(tmp_path / "in", DICOMDIR_TESTS / "98892001" / "CT5N")
    result = cli("deid", source, tmp_path / "out", "--seed", 3, "--report", tmp_path / "report.json")
    assert result.exit_code == 0, result.output
    assert "de-identified 5 file(s)" in result.output and (tmp_path / "report.json").is_file()
    result = cli("dicom-info", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "CT" in result.output and "0.488" in result.output
    ds = pydicom.dcmread(next(source.iterdir()))
    assert str(ds.PatientName) not in result.output and ds.PatientID not in result.output


def test_cli_bad_input_exits_2(cli, tmp_path):
    result = cli("deid", dicom("rtplan_truncated.dcm").parent / "missing.dcm", tmp_path / "out.dcm")
    assert result.exit_code == 2 and "input not found" in result.output
    result = cli("dicom-info", dicom("rtplan.dcm").parent / "README.txt")
    assert result.exit_code == 2 and "not a DICOM file" in result.output


def test_a_malformed_value_read_outside_quiet_pydicom_is_never_logged_or_warned(tmp_path):
    """Review finding: the service's size check of a DICOM upload reads Rows / Columns / Number of Frames outside
    quiet_pydicom, and pydicom logged and warned the malformed value it could not convert (``Invalid value for VR IS:
    'SMITH2'``) into the service's log; quiet_pydicom's own switches are process-wide, so concurrent requests could
    undo them too. From the import of medvl.clinical.dicom pydicom's records and warnings quote nothing."""
    import subprocess
    import sys

    import pydicom

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.add_new(0x00280008, "IS", "1")
    path = tmp_path / "frames.dcm"
    ds.save_as(path)
    raw = path.read_bytes()
    at = raw.index(b"\x28\x00\x08\x00IS\x02\x001 ")
    path.write_bytes(raw[:at + 6] + b"\x06\x00SMITH2" + raw[at + 10:])  # Number of Frames: a name, not a number
    script = (
        "import logging, sys\n"
        "from pathlib import Path\n"
        "logging.basicConfig(level=logging.DEBUG)\n"
        "from medvl.serve.settings import ServeSettings\n"
        "from medvl.serve.uploads import UploadRejected, _check_dicom_size\n"
        "try:\n"
        "    _check_dicom_size(Path(sys.argv[1]), ServeSettings())\n"
        "except UploadRejected as error:\n"
        "    print(error.status, error.detail if hasattr(error, 'detail') else error)\n")
    done = subprocess.run([sys.executable, "-W", "default", "-c", script, str(path)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "422" in done.stdout and "Number of Frames is not a whole number" in done.stdout
    assert "SMITH2" not in done.stdout + done.stderr
