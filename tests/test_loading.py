"""Reading images in worker processes (``medvl.data.loading``): same pixels, same index, errors and
worker deaths reported, bounded read-ahead, nothing left running."""

from __future__ import annotations

import multiprocessing
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pydicom.data import get_testdata_file

from medvl import DataError, InputError, create_model, load_dataset
from medvl.data import loading
from medvl.data.loading import map_ahead, pixel_batches, resolve_workers
from medvl.embed import embed_images
from medvl.index import build_index, open_index


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("phantom-tiny")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list:
    """Real files of several kinds: 8- and 16-bit PNG, JPEG, a CT DICOM, and an in-memory array."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    files: list = []
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (40 + i, 50), dtype=np.uint8)).save(folder / f"g{i}.png")
        Image.fromarray(rng.integers(0, 65536, (30, 30), dtype=np.uint16)).save(folder / f"d{i}.png")
        Image.fromarray(rng.integers(0, 256, (33, 47, 3), dtype=np.uint8)).save(folder / f"c{i}.jpg", quality=90)
        files += [folder / f"g{i}.png", folder / f"d{i}.png", folder / f"c{i}.jpg"]
    shutil.copy(get_testdata_file("CT_small.dcm"), folder / "ct.dcm")
    return [*files, folder / "ct.dcm", rng.integers(0, 256, (64, 64), dtype=np.uint8)]


def test_workers_give_the_same_pixels_in_order(model, images):
    in_process = torch.cat(list(pixel_batches(model.preprocessor, images, 4, workers=0)))
    threads = torch.get_num_threads()
    with_workers = []
    for pixels in pixel_batches(model.preprocessor, images, 4, workers=1):
        with_workers.append(pixels)  # meanwhile the model's torch keeps the cores the worker leaves
        assert torch.get_num_threads() == max(1, min(threads, len(os.sched_getaffinity(0)) - 1))
    assert torch.get_num_threads() == threads  # restored
    with_workers = torch.cat(with_workers)
    assert with_workers.shape == (len(images), 1, 64, 64)
    assert torch.equal(in_process, with_workers)  # bit-identical, order kept
    assert torch.equal(in_process[3], model.preprocessor.load(images[3]))
    assert not multiprocessing.active_children()  # the pool is shut down


def test_a_corrupt_file_read_by_a_worker_names_the_file(model, images, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(Image.open(images[0]).tobytes()[:100])  # not a PNG
    for workers in (0, 1):
        with pytest.raises(DataError, match="broken.png") as caught:
            list(pixel_batches(model.preprocessor, [*images[:6], bad, *images[6:]], 2, workers=workers))
        assert caught.value.path == str(bad)
    assert not multiprocessing.active_children()


def _die_on_seven(_context, item: list[int]) -> list[int]:
    if 7 in item:
        os._exit(3)  # a worker killed (out of memory, signal): no exception to send back
    return item


def test_a_dead_worker_is_a_clear_error():
    with pytest.raises(DataError, match="died while reading the batch starting at 6"):
        list(map_ahead(_die_on_seven, [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]], workers=1))
    assert not multiprocessing.active_children()


def _square(offset: int, item: int) -> int:
    return item * item + offset


def test_read_ahead_is_bounded_and_an_early_stop_ends_the_workers():
    drawn: list[int] = []

    def source():
        for item in range(100):
            drawn.append(item)
            yield item

    results = map_ahead(_square, source(), workers=2, context=1)
    for consumed in range(1, 6):
        assert next(results) == (consumed - 1) ** 2 + 1
        assert len(drawn) <= consumed + 2 * 2  # at most 2 x workers items in flight
    results.close()  # the consumer stops early
    assert len(drawn) < 12 and not multiprocessing.active_children()


def test_auto_workers_and_bad_counts():
    assert resolve_workers(None, loading.AUTO_MIN_IMAGES - 1) == 0
    cores = len(os.sched_getaffinity(0))
    expected = 0 if cores < loading.AUTO_MIN_CORES else min(loading.MAX_AUTO_WORKERS, cores // 4)
    assert resolve_workers(None, loading.AUTO_MIN_IMAGES) == expected
    assert resolve_workers(cores, 1) == cores
    for bad in (-1, 1.5, cores + 1):
        with pytest.raises(InputError, match="workers"):
            resolve_workers(bad, 10)  # type: ignore[arg-type]


def test_index_and_embeddings_are_the_same_with_workers(model, phantom_dir: Path, tmp_path):
    data = load_dataset(phantom_dir).select("test")
    assert torch.allclose(embed_images(model, data, batch_size=8, show_progress=False, workers=0),
                          embed_images(model, data, batch_size=8, show_progress=False, workers=2), atol=1e-6)
    build_index(model, data, tmp_path / "a", batch_size=5, show_progress=False, workers=0)
    build_index(model, data, tmp_path / "b", batch_size=5, show_progress=False, workers=2)
    queries = torch.nn.functional.normalize(torch.randn(4, model.config.embed_dim), dim=-1).numpy()
    with open_index(tmp_path / "a") as first, open_index(tmp_path / "b") as second:
        assert len(first) == len(second) == len(data)
        for hits_a, hits_b in zip(first.search(queries, k=len(data)), second.search(queries, k=len(data)),
                                  strict=True):
            # the same cases; scores equal to float rounding (the model runs on fewer threads beside workers)
            assert [h.id for h in hits_a] == [h.id for h in hits_b]
            assert np.allclose([h.score for h in hits_a], [h.score for h in hits_b], atol=1e-6)


def test_a_bad_worker_count_is_refused_before_any_work(phantom_dir: Path, tmp_path):
    from cli_helpers import invoke

    for command in (["index", "build", "--model", tmp_path / "missing-model", "--out", tmp_path / "idx"],
                    ["train", "--model", "phantom-tiny", "--out", tmp_path / "run"]):
        result, output = invoke(*command, "--data", phantom_dir, "--workers", "-1")
        assert result.exit_code == 2 and "workers must be >= 0" in output
        assert not (tmp_path / "idx").exists() and not (tmp_path / "run").exists()


def test_more_workers_than_cores_are_refused_by_every_command_before_any_work(phantom_dir: Path, tmp_path):
    """Each reader is a process on a core of its own: --workers had no upper bound, and 1000 on 2 cores forked a
    process per batch (an audit 350 times slower). One check (``check_workers``) refuses more than the cores this
    process may use, in every command that takes the option."""
    from cli_helpers import invoke

    cores = len(os.sched_getaffinity(0))
    index = tmp_path / "idx"
    for command in (["index", "build", "--model", tmp_path / "missing-model", "--out", index, "--data", phantom_dir],
                    ["index", "add", "--index", index, "--data", phantom_dir],
                    ["train", "--model", "phantom-tiny", "--out", tmp_path / "run", "--data", phantom_dir],
                    ["audit", "--data", phantom_dir, "--json", tmp_path / "audit.json"]):
        result, output = invoke(*command, "--workers", cores + 1)
        assert result.exit_code == 2, (command, output)
        assert f"--workers must be <= {cores}, the CPU cores this process may use, got {cores + 1}" in output, output
        assert not any(tmp_path.iterdir())
