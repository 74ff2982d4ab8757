"""Starting the real service for tests: a tiny model trained by ``medvl train``, an index built by
``medvl index build``, a tiny VQA model trained by ``medvl train vqa``, a concept bottleneck fitted by
``medvl explain --concept-data``, and a uvicorn server on a free 127.0.0.1 port (imported by the
service test modules)."""

from __future__ import annotations

import logging
import socket
import threading
import time
from pathlib import Path

import uvicorn

from cli_helpers import invoke
from medvl.serve.connections import server_config


def train_tiny_model(data: Path, out: Path) -> Path:
    """``medvl train`` of the tiny phantom model for one epoch; returns its model folder."""
    result, output = invoke("train", "--data", data, "--model", "phantom-tiny", "--out", out,
                            "--epochs", 1, "--batch-size", 32, "-q")
    assert result.exit_code == 0, output
    return out / "model"


def build_case_index(model_dir: Path, data: Path, out: Path, split: str = "train") -> Path:
    """``medvl index build`` of ``data``'s ``split`` with the model; returns the index folder."""
    result, output = invoke("index", "build", "--model", model_dir, "--data", data, "--out", out,
                            "--split", split, "-q")
    assert result.exit_code == 0, output
    return out


TINY_VQA = ["--image-model", "phantom-tiny", "--image-size", "32", "--question-encoder", "bert", "--hidden-size", "32",
            "--fusion-layers", "1", "--set", "text.hidden_size=32", "--set", "text.intermediate_size=64",
            "--set", "text.num_layers=1", "--batch-size", "32", "--quiet"]  # as tests/test_vqa.py trains it


def train_tiny_vqa_model(out: Path) -> Path:
    """``medvl train vqa`` of a tiny VQA model (2 steps) on a phantom VQA folder; returns its output folder
    (what ``medvl serve --vqa-model`` is given)."""
    from medvl.data.phantom import generate_phantom

    generate_phantom(out / "phantom", n=40, seed=5, size=32, vqa=True, vqa_per_case=4)
    result, output = invoke("train", "vqa", "--data", out / "phantom" / "vqa", "--out", out / "vqa-tiny",
                            "--epochs", 1, "--max-steps", 2, *TINY_VQA)
    assert result.exit_code == 0, output
    return out / "vqa-tiny"


def fit_concept_bottleneck(model_dir: Path, data: Path, image: Path, out: Path) -> Path:
    """``medvl explain IMAGE --concept-data DATA --concepts chest_xray --out OUT``: the bottleneck it saves."""
    result, output = invoke("explain", image, "--model", model_dir, "--concepts", "chest_xray",
                            "--concept-data", data, "--method", "patch_text", "--out", out)
    assert result.exit_code == 0, output
    return out / "bottleneck.json"


class Server:
    """A real uvicorn server in a thread on a free 127.0.0.1 port, configured as ``medvl serve`` configures it
    (``medvl.serve.connections.server_config``: the header deadline); ``url`` is its base address."""

    def __init__(self, app, **options):
        self.app = app
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}"
        self.server = uvicorn.Server(server_config(app, log_config=None, access_log=False, **options))
        # as medvl serve's setup_json_logging: uvicorn's access log (its lines quote the URL) stays off even when a
        # handler is attached to it, as pytest's caplog (9.2 and later) attaches one to every non-propagating logger
        logging.getLogger("uvicorn.access").disabled = True
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=20)
        self.socket.close()
