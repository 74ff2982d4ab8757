"""Byte-for-byte copies of fitted images among the scored ones: counted, warned and reported, not refused (unless
they are most of a ``bench medmnist`` scored split: a copy of its training file)."""

import shutil

import numpy as np
import pytest

from medvl.bench.medmnist import benchmark_data
from medvl.data import load_dataset
from medvl.data.record import Dataset, Record
from medvl.errors import InputError


def test_copies_are_found_under_other_paths_and_only_those(phantom_dir, tmp_path):
    data = load_dataset(phantom_dir)
    train, test = data.select("train"), data.select("test")
    assert train.copied_images(test) == 0  # apart: the phantom draws each film once
    copy = tmp_path / "copy"
    shutil.copytree(phantom_dir, copy)
    copied_test = load_dataset(copy).select("test")
    assert test.copied_images(copied_test) == len(test)  # every scored image is a copy under another folder
    assert copied_test.copied_images(train) == 0
    assert test.copied_images(test) == 0  # the same files are shared_images, not copies
    assert test.shared_images(test) == len(test)
    # one image under a new name in another dataset; a file of the same size but other bytes is no copy
    original = test[0].image
    renamed = tmp_path / "renamed.png"
    shutil.copyfile(original, renamed)
    same_size = tmp_path / "same_size.png"
    body = bytearray(original.read_bytes())
    body[-20] ^= 0xFF
    same_size.write_bytes(bytes(body))
    other = Dataset([Record("a", [renamed]), Record("b", [same_size]), Record("c", [tmp_path / "missing.png"])], "x")
    assert test.copied_images(other) == 1
    assert other.copied_images(test) == 1


def test_array_copies_need_the_same_values_dtype_and_shape():
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 255, (8, 8), dtype=np.uint8) for _ in range(3)]
    fit = Dataset([Record(str(i), [a]) for i, a in enumerate(arrays)], "fit")
    scored = Dataset([Record("same", [arrays[1].copy()]), Record("float", [arrays[1].astype(np.float32)]),
                      Record("transposed", [arrays[2].T.copy()]), Record("flat", [arrays[0].reshape(64)]),
                      Record("new", [rng.integers(0, 255, (8, 8), dtype=np.uint8)])], "scored")
    assert fit.copied_images(scored) == 1


def test_the_real_pneumoniamnist_val_holds_copies_of_train_images(shared_data, tmp_path):
    data = benchmark_data(shared_data / "pneumoniamnist" / "pneumoniamnist.npz",
                          shared_data / "pneumoniamnist" / "pneumoniamnist.npz", "val", seed=0)
    assert data.copies_in_fit == {"records": 8, "of": 524, "fit": "the training split (pneumoniamnist.npz:train)"}


def test_a_copied_npz_scored_on_its_train_split_is_refused(tiny_npz, tmp_path, caplog):
    copy = tmp_path / "copy.npz"
    shutil.copyfile(tiny_npz, copy)  # the same path is refused; a copy is too, by its images (it was only warned)
    with pytest.raises(InputError, match="240 of 240 scored images are byte-for-byte copies"):
        benchmark_data(tiny_npz, copy, "train", seed=0)
    assert "240 of 240 scored images are byte-for-byte copies" in caplog.text
