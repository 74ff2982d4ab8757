"""The preprocessor's resize is MONAI's ``Resize(mode="area")`` without the metadata tracking: the
same pixels, bit for bit, for any size in or out, and the caller's array is never written to."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from monai.transforms import Resize

from medvl.data.images import read_image
from medvl.models.config import ImageConfig
from medvl.models.preprocess import ImagePreprocessor


def monai_resized(tensor: torch.Tensor, size: int) -> torch.Tensor:
    return torch.as_tensor(Resize(spatial_size=(size, size), mode="area")(tensor)).float()


@settings(max_examples=60, deadline=None)
@given(channels=st.sampled_from([1, 3]), height=st.integers(1, 300), width=st.integers(1, 300),
       size=st.integers(8, 160), dtype=st.sampled_from([torch.float32, torch.float64, torch.uint8]))
def test_resize_is_monais_area_resize(channels, height, width, size, dtype):
    generator = torch.Generator().manual_seed(height * 1000 + width)
    tensor = (torch.rand(channels, height, width, generator=generator) * 255).to(dtype)
    ours = ImagePreprocessor(ImageConfig(image_size=size, in_channels=channels)).resize(tensor)
    assert ours.dtype == torch.float32 and ours.shape == (channels, size, size)
    assert torch.equal(ours, monai_resized(tensor, size))


def test_a_same_size_image_is_copied_not_shared():
    values = np.random.default_rng(0).random((1, 32, 32)).astype(np.float32) * 2 - 0.5  # outside [0, 1]
    tensor = torch.from_numpy(values)
    out = ImagePreprocessor(ImageConfig(image_size=32, in_channels=1)).resize(tensor)
    out.clamp_(0.0, 1.0)
    assert values.min() < 0 and values.max() > 1  # the caller's array is as it was
    assert torch.equal(ImagePreprocessor(ImageConfig(image_size=32, in_channels=1)).resize(tensor), tensor)


@pytest.mark.parametrize("size", [64, 97, 224])
def test_real_images_load_as_through_monai(size, shared_data):
    from pydicom.data import get_testdata_file

    files = [Path(get_testdata_file("CT_small.dcm")), Path(get_testdata_file("MR_small.dcm"))]
    isic = sorted((shared_data / "isic-dermoscopy" / "images").glob("*.jpg"))[-1]
    for path in [*files, isic]:
        for channels in (1, 3):
            preprocessor = ImagePreprocessor(ImageConfig(image_size=size, in_channels=channels))
            array = read_image(path)
            scaled = preprocessor._intensities(array, path)
            expected = monai_resized(scaled, size).clamp_(0.0, 1.0)
            assert torch.equal(preprocessor.load(path), expected), (path.name, channels)


def test_percentile_scaling_undoes_a_change_of_exposure_on_a_real_x_ray(shared_data):
    image = np.load(shared_data / "pneumoniamnist" / "pneumoniamnist.npz")["val_images"][3]
    darker = (image.astype(np.float64) * 0.5 + 20).round().astype(np.uint8)  # a linear exposure change
    plain = ImagePreprocessor(ImageConfig(image_size=28, in_channels=1))
    scaled = ImagePreprocessor(ImageConfig(image_size=28, in_channels=1, percentile_scaling=1.0))
    assert (plain.load(image) - plain.load(darker)).abs().mean() > 0.1
    assert (scaled.load(image) - scaled.load(darker)).abs().max() < 0.02  # only the rounding of `darker` is left
    loaded = scaled.load(image)
    values = np.sort(image.ravel().astype(np.float64))
    low, high = np.percentile(values, [1, 99])
    inside = (values > low) & (values < high)
    assert loaded.min() == 0 and loaded.max() == 1
    assert (loaded.flatten() > 0).float().mean() >= 0.98 and inside.mean() >= 0.97  # 1 % each side clipped


def test_percentile_scaling_leaves_a_flat_image_alone_and_is_refused_for_volumes():
    from medvl.errors import InputError
    from medvl.models.preprocess import percentile_scale

    flat = torch.full((1, 8, 8), 0.4)
    assert torch.equal(percentile_scale(flat, 1.0), flat)
    for fields in ({"percentile_scaling": 1.0, "spatial_dims": 3}, {"percentile_scaling": 30.0},
                   {"percentile_scaling": -1.0}):
        with pytest.raises(InputError, match="percentile_scaling"):
            ImageConfig(**fields).validate()


@pytest.mark.parametrize("shape", [(3, 24, 20), (4, 24, 20), (24, 20, 3), (24, 20, 6)])
def test_a_nifti_volume_is_refused_by_a_2d_model_never_read_as_colour(tmp_path, shape):
    """A volume 3 or 4 voxels wide along x has a last axis of 3 or 4 once in RAS (D, H, W): it was read as a colour
    image of D x H by a 2D model."""
    import nibabel

    from medvl.errors import DataError

    path = tmp_path / "v.nii.gz"
    nibabel.save(nibabel.Nifti1Image(np.random.default_rng(0).random(shape, dtype=np.float32), np.eye(4)), path)
    preprocessor = ImagePreprocessor(ImageConfig(image_size=16))
    for read in (preprocessor.read, preprocessor.load):
        with pytest.raises(DataError, match=r"v\.nii\.gz: a NIfTI volume of \d+ slices.*2D model reads one image"):
            read(path)


@pytest.mark.parametrize("frames, rows, columns", [(64, 64, 3), (32, 64, 4), (3, 64, 64)])
def test_a_multiframe_dicom_is_refused_by_a_2d_model_never_read_as_colour(tmp_path, frames, rows, columns):
    """A grey multi-frame DICOM (frames x rows x columns, Samples per Pixel 1) 3 or 4 columns wide was read by a 2D
    model as one colour image of frames x rows; refused as a NIfTI volume is, with or without the model's windows
    (modality values); a single-frame colour DICOM is still one image."""
    pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    from hostile_files import grey_multiframe_dicom
    from medvl.data.images import read_image_2d
    from medvl.errors import DataError

    path = grey_multiframe_dicom(tmp_path / "mf.dcm", frames, rows, columns)
    assert read_image(path).shape == (frames, rows, columns)
    windowed = ImageConfig(image_size=16, in_channels=3, window=[-600, 1500, 50, 350, 400, 1800])  # modality values
    for config in (ImageConfig(image_size=16), windowed):
        preprocessor = ImagePreprocessor(config)
        for read in (preprocessor.read, preprocessor.load):
            with pytest.raises(DataError, match=rf"mf\.dcm: a multi-frame DICOM of {frames} frames .*a 2D model reads "
                                                "one image"):
                read(path)
    assert read_image_2d(get_testdata_file("SC_rgb.dcm")).shape == (100, 100, 3)
    assert read_image_2d(get_testdata_file("CT_small.dcm")).shape == (128, 128)


@pytest.mark.parametrize("shape", [(12, 10), (12, 10, 1)])
def test_a_one_slice_nifti_is_a_2d_image_shown_anterior_up_patient_right_on_the_left(tmp_path, shape):
    """x runs to the patient's right and y to anterior (identity affine, RAS): the viewer's top row is the most
    anterior (largest y), its left column the patient's right (largest x), as the reading page's preview shows it."""
    import nibabel

    data = np.arange(120, dtype=np.float32).reshape(12, 10)  # data[x, y]
    path = tmp_path / "slice.nii"
    nibabel.save(nibabel.Nifti1Image(data.reshape(shape), np.eye(4)), path)
    pixels = ImagePreprocessor(ImageConfig(image_size=16)).read(path)
    assert pixels.shape == (10, 12)
    for row in range(10):
        for column in range(12):
            assert pixels[row, column] == data[11 - column, 9 - row]
    assert ImagePreprocessor(ImageConfig(image_size=16)).load(path).shape == (1, 16, 16)


@pytest.mark.parametrize("plane", ["sagittal", "coronal"])
def test_a_one_slice_sagittal_or_coronal_nifti_is_a_2d_image_superior_up(tmp_path, plane):
    """A one-slice sagittal (1 x Y x Z voxels) or coronal (X x 1 x Z) file was refused as "a NIfTI volume of 12
    slices ... use a file holding one slice". Identity affine (RAS): the top row is the most superior (largest z);
    the left column the most anterior (largest y) for a sagittal slice, the patient's right (largest x) for a
    coronal one."""
    import nibabel

    data = np.arange(120, dtype=np.float32).reshape(10, 12)  # data[y or x, z]
    path = tmp_path / f"{plane}.nii.gz"
    shape = (1, 10, 12) if plane == "sagittal" else (10, 1, 12)
    nibabel.save(nibabel.Nifti1Image(data.reshape(shape), np.eye(4)), path)
    preprocessor = ImagePreprocessor(ImageConfig(image_size=16))
    pixels = preprocessor.read(path)
    assert pixels.shape == (12, 10)
    for row in range(12):
        for column in range(10):
            assert pixels[row, column] == data[9 - column, 11 - row]
    assert preprocessor.load(path).shape == (1, 16, 16)


def test_min_max_scaling_of_values_spanning_more_than_float32_holds():
    """A finite float32 image from -3e38 to 3e38: (x - min) / (max - min) overflowed, so every pixel was NaN and the
    model answered NaN; it is now the image's box, as for the same image at a smaller scale."""
    wide = np.full((40, 40), -3e38, np.float32)
    wide[10:30, 10:30] = 3e38
    preprocessor = ImagePreprocessor(ImageConfig(image_size=32))
    loaded = preprocessor.load(wide)
    assert torch.isfinite(loaded).all()
    assert torch.equal(loaded, preprocessor.load((wide > 0).astype(np.float32)))
