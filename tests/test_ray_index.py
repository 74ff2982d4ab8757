"""``medvl index build --ray``: a local Ray with 2 workers builds the same index as one process.

Real Ray (local, 2 worker actors), real phantom images with planted duplicate images, real FAISS
indexes compared case by case: ids, order, duplicates skipped, image and report vectors (through
searches), and a build interrupted after its first batch that resumes on Ray.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import time

import numpy as np
import pytest
import torch

from cli_helpers import invoke
from medvl import create_model, load_dataset, load_model
from medvl.errors import InputError
from medvl.index import build_index, open_index
from medvl.index.base import IMAGES, TEXTS

ray = pytest.importorskip("ray", reason="Ray Data is in the [scale] extra")
# imported here, not first inside a CliRunner call: its import makes the log handler of Ray Data, which keeps the
# sys.stderr of that moment (a CliRunner's, closed after its call: later records became 'Logging error' tracebacks)
pytest.importorskip("ray.data")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def data_with_duplicates(phantom_dir, tmp_path_factory):
    """The 96-case phantom plus 3 cases whose images are byte copies of earlier ones under new names."""
    folder = tmp_path_factory.mktemp("raydata") / "data"
    shutil.copytree(phantom_dir, folder)
    manifest = folder / "manifest.csv"
    with manifest.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    for source in (rows[5], rows[40], rows[41]):
        copy = dict(source, image=source["image"].replace(".png", "_copy.png"))
        shutil.copyfile(folder / source["image"], folder / copy["image"])
        rows.insert(60, copy)
    with manifest.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("raymodel") / "model"
    create_model("phantom-tiny").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def single(model_dir, data_with_duplicates, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "idx"
    info = build_index(load_model(model_dir), load_dataset(data_with_duplicates), out, model_dir=model_dir,
                       batch_size=16, show_progress=False)
    return out, info


def _same_index(a, b) -> None:
    first, second = open_index(a), open_index(b)
    try:
        assert len(first) == len(second)
        rng = np.random.default_rng(0)
        queries = rng.standard_normal((6, 64)).astype(np.float32)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        for target in (IMAGES, TEXTS):
            for hits_a, hits_b in zip(first.search(queries, k=len(first), target=target),
                                      second.search(queries, k=len(second), target=target), strict=True):
                assert [h.id for h in hits_a] == [h.id for h in hits_b]
                assert np.allclose([h.score for h in hits_a], [h.score for h in hits_b], atol=1e-5)
    finally:
        first.close()
        second.close()


def test_ray_build_matches_the_single_process_build(local_ray, single, model_dir, data_with_duplicates, tmp_path):
    out = tmp_path / "idx"
    result, output = invoke("index", "build", "--model", model_dir, "--data", data_with_duplicates, "--out", out,
                            "--batch-size", 16, "--ray", "--ray-workers", 2, "--json", tmp_path / "info.json",
                            "--quiet")
    assert result.exit_code == 0, output
    info = json.loads((tmp_path / "info.json").read_text())
    assert info["duplicates"] == single[1]["duplicates"] and len(info["duplicates"]) == 3
    assert info["images"]["n"] == single[1]["images"]["n"] == 96
    _same_index(single[0], out)


def test_an_interrupted_ray_build_resumes(local_ray, single, model_dir, data_with_duplicates, tmp_path):
    from medvl.scale.ray_jobs import RayEmbedder

    class Interrupted(Exception):
        pass

    embedder = RayEmbedder(model_dir, workers=2)
    appended: list[int] = []

    def two_batches_then_crash(dataset, records, batch_size, fingerprint):
        for number, batch in enumerate(embedder(dataset, records, batch_size, fingerprint)):
            if number == 2:
                raise Interrupted
            appended.append(len(batch[0]))
            yield batch

    out, model, dataset = tmp_path / "idx", load_model(model_dir), load_dataset(data_with_duplicates)
    with pytest.raises(Interrupted):
        build_index(model, dataset, out, model_dir=model_dir, batch_size=16, show_progress=False,
                    embedder=two_batches_then_crash)
    assert not out.exists()  # the previous index (none) stays; the staged build is kept for the rerun
    info = build_index(model, dataset, out, model_dir=model_dir, batch_size=16, show_progress=False,
                       embedder=embedder)
    assert len(appended) == 2 and info["resumed"] == sum(appended) < 99  # batches as Ray's blocks came
    assert info["duplicates"] == single[1]["duplicates"]
    _same_index(single[0], out)


@pytest.fixture(scope="module")
def vit_int8_dir(tmp_path_factory):
    """vit-tiny, exported to ONNX: its int8 towers quantise activations (a scale per input tensor)."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from medvl.scale import export_onnx

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("raymodel-int8") / "model"
    create_model("vit-tiny").save_pretrained(folder)
    export_onnx(folder)
    return folder


def test_ray_int8_build_matches_the_single_process_build(local_ray, vit_int8_dir, data_with_duplicates, tmp_path):
    """Ray embeds every record of a batch, a local build only those whose image is new: with int8 towers that
    run one item at a time the batches' make-up does not reach the vectors, so the indexes are the same."""
    local = tmp_path / "local"
    build_index(load_model(vit_int8_dir, backend="onnx-int8"), load_dataset(data_with_duplicates), local,
                model_dir=vit_int8_dir, batch_size=16, show_progress=False)
    result, output = invoke("index", "build", "--model", vit_int8_dir, "--data", data_with_duplicates, "--out",
                            tmp_path / "ray", "--batch-size", 16, "--backend", "onnx-int8", "--ray", "--ray-workers", 2,
                            "--quiet")
    assert result.exit_code == 0, output
    assert json.loads((tmp_path / "ray" / "index.json").read_text())["encoder_backend"] == "onnx-int8"
    _same_index(local, tmp_path / "ray")


def _error_lines(output: str) -> set[str]:
    return {line for line in output.splitlines() if line.startswith("error:")}  # output holds stderr twice


def test_a_corrupt_image_on_a_ray_worker_is_the_usual_one_line_error(local_ray, model_dir, data_with_duplicates,
                                                                      tmp_path):
    data = tmp_path / "data"
    shutil.copytree(data_with_duplicates, data)
    corrupt = sorted((data / "images").glob("*.png"))[20]
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    lines = {}
    for how in ("local", "ray"):
        result, output = invoke("index", "build", "--model", model_dir, "--data", data, "--out", tmp_path / how,
                                "--batch-size", 16, *(["--ray"] if how == "ray" else []), "--quiet")
        assert result.exit_code == 2 and "Traceback" not in output, output
        lines[how] = _error_lines(output)
    assert lines["ray"] == lines["local"] and len(lines["ray"]) == 1
    assert f"{corrupt}: not a recognised image file" in lines["ray"].pop()


def test_a_ray_worker_that_dies_ends_the_build_in_one_line_and_the_rerun_resumes(local_ray, single, model_dir,
                                                                                   data_with_duplicates, tmp_path):
    """A worker process killed (as the kernel kills one for memory: SIGKILL, here while it loads the model) ends the
    build with medvl's one line, exit 2, not Ray Data's 150-line internal-error dump and exit 1; the rerun builds
    the same index."""
    import signal
    import threading

    import psutil

    stop = threading.Event()
    killed: list[int] = []

    def kill_map_workers() -> None:  # every actor of the build, as soon as Ray starts it
        while not stop.is_set():
            for process in psutil.process_iter(["pid", "cmdline"]):
                if "MapWorker" in " ".join(process.info["cmdline"] or []) and process.pid not in killed:
                    killed.append(process.pid)
                    os.kill(process.pid, signal.SIGKILL)
            time.sleep(0.02)

    killer = threading.Thread(target=kill_map_workers, daemon=True)
    killer.start()
    try:
        result, output = invoke("index", "build", "--model", model_dir, "--data", data_with_duplicates, "--out",
                                tmp_path / "idx", "--batch-size", 16, "--ray", "--quiet")
    finally:
        stop.set()
        killer.join()
    assert killed and result.exit_code == 2 and "Traceback" not in output, output
    assert _error_lines(output) == {"error: the index build on Ray stopped: a Ray worker died while embedding "
                                    "(ActorDiedError: killed for lack of memory, or a crash in a decoder?) after 0 of "
                                    "its 99 records, which are kept: rerun the same command to resume (with fewer "
                                    "--ray-workers or a smaller --batch-size if memory ran out)"}
    assert "Ray Data or Ray Core internal code" not in output  # Ray Data's ERROR lines: its session log only
    result, output = invoke("index", "build", "--model", model_dir, "--data", data_with_duplicates, "--out",
                            tmp_path / "idx", "--batch-size", 16, "--ray", "--quiet")
    assert result.exit_code == 0, output
    _same_index(single[0], tmp_path / "idx")


def test_relative_paths_reach_workers_running_in_another_folder(local_ray, single, model_dir, data_with_duplicates,
                                                                tmp_path, monkeypatch):
    """A cluster's workers run in the folder its head was started from, not the driver's: here the module's Ray,
    started before the driver moves to another folder. Relative --model and --data (and so the records' image
    paths) are made absolute by the driver before they are shipped (they were read in the workers' folder: a
    Ray traceback, or a false 'file not found')."""
    shutil.copytree(model_dir, tmp_path / "model")
    shutil.copytree(data_with_duplicates, tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    result, output = invoke("index", "build", "--model", "model", "--data", "data", "--out", "idx", "--batch-size", 16,
                            "--ray", "--ray-workers", 2, "--quiet")
    assert result.exit_code == 0, output
    _same_index(single[0], tmp_path / "idx")


def test_a_model_a_worker_cannot_load_is_the_usual_one_line_error(local_ray, model_dir, data_with_duplicates,
                                                                   tmp_path):
    """A worker that cannot load the model (a folder changed or gone since the driver loaded it, or not shared
    with its node) gives the driver medvl's own error, not Ray's ActorDiedError with the worker's traceback."""
    from medvl.errors import ModelError
    from medvl.scale.ray_jobs import RayEmbedder

    gone = tmp_path / "gone"
    with pytest.raises(ModelError, match=f"^{gone}: not a medvl model directory"):
        build_index(load_model(model_dir), load_dataset(data_with_duplicates), tmp_path / "idx", model_dir=model_dir,
                    batch_size=16, show_progress=False, embedder=RayEmbedder(gone, workers=1))
    assert not (tmp_path / "idx").exists()


def test_ray_workers_refuse_a_model_folder_changed_since_the_build_loaded_it(local_ray, model_dir,
                                                                            data_with_duplicates, tmp_path):
    """The index records the fingerprint of the model the driver loaded; the workers load the folder again, later.
    Weights replaced in between (a retrain or a deployment copied into the folder) are refused, not embedded under
    the old model's fingerprint (an index the old model would accept, holding the new model's vectors)."""
    from medvl.errors import ModelError
    from medvl.scale.ray_jobs import RayEmbedder

    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    loaded = load_model(folder)
    torch.manual_seed(1)
    create_model("phantom-tiny").save_pretrained(tmp_path / "other")
    shutil.copyfile(tmp_path / "other" / "model.safetensors", folder / "model.safetensors")
    with pytest.raises(ModelError, match="its weights differ.*changed since the build started"):
        build_index(loaded, load_dataset(data_with_duplicates), tmp_path / "idx", model_dir=folder, batch_size=16,
                    show_progress=False, embedder=RayEmbedder(folder, workers=1))
    assert not (tmp_path / "idx").exists()


def test_an_unreachable_ray_cluster_is_refused_before_any_work(model_dir, data_with_duplicates, tmp_path):
    with socket.socket() as probe:  # a port nobody listens on: bound, then closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):
        started = time.monotonic()
        result, output = invoke("index", "build", "--model", model_dir, "--data", data_with_duplicates, "--out",
                                tmp_path / "idx", "--ray", "--address", address, "--quiet")
        assert result.exit_code == 2 and "Traceback" not in output, output
        assert _error_lines(output) == {f"error: cannot reach the Ray cluster at {address}: Connection refused"}
        assert time.monotonic() - started < 30  # Ray's own retries kept it waiting for more than 5 minutes
    assert not list(tmp_path.iterdir())  # no staged build, no lock file


def test_ray_address_in_the_environment_is_the_cluster_to_join(local_ray, single, model_dir, data_with_duplicates,
                                                               tmp_path, monkeypatch):
    """Ray's own RAY_ADDRESS names the cluster when --address is not given (ray.init reads it: it refused the
    num_cpus of a local Ray, 'error: --address None: ...'): here the module's Ray, joined by a build in another
    process; a closed port is refused like an --address, naming the variable; --address local ignores it."""
    import subprocess
    import sys

    address = ray.get_runtime_context().gcs_address
    command = [sys.executable, "-m", "medvl", "index", "build", "--model", str(model_dir), "--data",
               str(data_with_duplicates), "--out", str(tmp_path / "idx"), "--batch-size", "16", "--ray", "--quiet"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env={**os.environ,
                                                                                    "RAY_ADDRESS": address})
    assert done.returncode == 0, done.stderr
    assert f"joining the Ray cluster at {address}, which RAY_ADDRESS names" in " ".join(done.stderr.split())
    _same_index(single[0], tmp_path / "idx")

    with socket.socket() as probe:  # a port nobody listens on: bound, then closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    result, output = invoke("index", "build", "--model", model_dir, "--data", data_with_duplicates, "--out",
                            tmp_path / "idx2", "--ray", "--quiet")
    assert result.exit_code == 2 and "Traceback" not in output, output
    assert _error_lines(output) == {f"error: cannot reach the Ray cluster at 127.0.0.1:{port} (RAY_ADDRESS): "
                                    f"Connection refused"}
    from medvl.scale.ray_jobs import RayEmbedder

    assert RayEmbedder(model_dir, address="local").address == "local"  # no TCP check of RAY_ADDRESS
    assert not (tmp_path / "idx2").exists()


def test_a_dashboard_address_is_refused_naming_the_address_to_give(model_dir, data_with_duplicates, tmp_path,
                                                                   monkeypatch):
    """RAY_ADDRESS set to the dashboard's http:// address (for ray job submit) is named as such, not 'cannot reach the
    Ray cluster at http://127.0.0.1:8265: Name or service not known' (its host taken as 'http://127.0.0.1')."""
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    result, output = invoke("index", "build", "--model", model_dir, "--data", data_with_duplicates, "--out",
                            tmp_path / "idx", "--ray")
    assert result.exit_code == 2 and _error_lines(output) == {
        "error: RAY_ADDRESS http://127.0.0.1:8265 is an HTTP address (the Ray dashboard's, for ray job submit): give "
        "the cluster's ray://host:10001 (Ray Client) or host:port (its GCS, e.g. host:6379) address"}, output
    assert not (tmp_path / "idx").exists()


def test_ray_options_are_checked_before_any_work(model_dir, data_with_duplicates, tmp_path):
    result, output = invoke("index", "build", "--model", model_dir, "--data", data_with_duplicates, "--out",
                            tmp_path / "idx", "--ray", "--ray-workers", 0)
    assert result.exit_code == 2 and "--ray-workers" in output
    result, output = invoke("index", "build", "--model", model_dir, "--data", data_with_duplicates, "--out",
                            tmp_path / "idx", "--address", "auto")
    assert result.exit_code == 2 and "needs --ray" in output
    result, output = invoke("index", "build", "--model", model_dir, "--data", data_with_duplicates, "--out",
                            tmp_path / "idx", "--ray-workers", 3)  # not silently a build in this process
    assert result.exit_code == 2 and "error: --ray-workers sets the embedding workers on Ray: it needs --ray" in output
    assert not (tmp_path / "idx").exists()


def test_a_quiet_ray_build_prints_no_ray_data_ray_core_or_faiss_chatter(model_dir, data_with_duplicates, tmp_path):
    import subprocess
    import sys

    command = [sys.executable, "-m", "medvl", "index", "build", "--model", str(model_dir), "--data",
               str(data_with_duplicates), "--out", str(tmp_path / "idx"), "--ray", "--ray-workers", "1", "--quiet"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    # Ray's error-level line on every run about restarting actors whose arguments are in the object store (Ray Data
    # always puts its map function there), and its notice that the local Ray uses token authentication
    # and Ray Data 2.60's deprecation warning of the remote arg that sets max_restarts (pyproject bounds Ray below 2.64)
    for chatter in ("Execution plan", "execution finished", "Progress bars disabled", "Loading faiss", "core_worker",
                    "max_restarts", "Token authentication", "RayDeprecationWarning", "ray_remote_args"):
        assert chatter not in done.stderr, chatter
    assert "images: flat index of 96 vectors" in done.stderr  # medvl's own lines stay


def test_ray_workers_on_a_local_ray_follow_the_cores(model_dir, data_with_duplicates, tmp_path, monkeypatch):
    """A local Ray's actors each take a core of this machine: more --ray-workers than the cores this process may
    use are refused before any work (as --workers is), and the default of 2 becomes 1 on one core; a cluster's
    workers run on its nodes, so a cluster address is not limited by this machine's cores."""
    import os

    from medvl.scale.ray_jobs import DEFAULT_WORKERS, RayEmbedder

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cores = len(os.sched_getaffinity(0))
    result, output = invoke("index", "build", "--model", model_dir, "--data", data_with_duplicates, "--out",
                            tmp_path / "idx", "--ray", "--ray-workers", str(cores + 1), "--quiet")
    assert result.exit_code == 2 and "Traceback" not in output, output
    assert _error_lines(output) == {f"error: --ray-workers must be <= {cores}, the CPU cores this process may use, "
                                    f"for a local Ray (a cluster's workers run on its nodes: --address), got "
                                    f"{cores + 1}"}
    assert not (tmp_path / "idx").exists()
    assert RayEmbedder(model_dir).workers == min(DEFAULT_WORKERS, cores)
    assert RayEmbedder(model_dir, workers=cores, address="local").workers == cores
    allowed = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(allowed)})  # this process on one core
    try:
        assert RayEmbedder(model_dir).workers == 1
        with pytest.raises(InputError, match="--ray-workers must be <= 1"):
            RayEmbedder(model_dir, workers=2, address="local")
    finally:
        os.sched_setaffinity(0, allowed)


_SIGTERM_AFTER_RAY_INIT = """
import os, signal, sys, time
import ray
from medvl.scale.ray_jobs import _init_ray

received = []
def ours(signum, frame):
    received.append(signum)

signal.signal(signal.SIGTERM, ours)
_init_ray(ray, "local", 1)
try:
    print("handler kept:", signal.getsignal(signal.SIGTERM) is ours, flush=True)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.5)
    print("received:", received, flush=True)
finally:
    ray.shutdown()
"""


def test_a_local_ray_keeps_the_sigterm_handler_in_place_before_it(tmp_path):
    """ray.init put its own SIGTERM handling in place of medvl's: SIGTERM during `index build --ray` (docker stop, a
    scheduler's preemption) dumped a C stack and aborted (exit 134) instead of `terminated`, exit 143."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _SIGTERM_AFTER_RAY_INIT], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "handler kept: True" in done.stdout and "received: [15]" in done.stdout, done.stdout + done.stderr[-2000:]
    assert "SIGTERM received" not in done.stderr
