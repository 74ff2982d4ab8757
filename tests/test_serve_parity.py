"""The same input through the CLI and the HTTP service gives the same answer or the same refusal: a tiny
phantom model (random init, saved by ``save_pretrained``) with an OOD guard fitted by ``medvl ood fit`` and a
case index, a tiny ViT, real pydicom-data DICOM files, and the service through FastAPI's TestClient."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from cli_helpers import invoke  # noqa: E402
from medvl.data import load_dataset  # noqa: E402
from medvl.index import build_index  # noqa: E402
from medvl.models.registry import create_model, load_model  # noqa: E402
from medvl.serve import create_app  # noqa: E402


def _flat(text: str) -> str:
    """Console output with its line wrapping undone."""
    return " ".join(text.split())


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from medvl.data.phantom import generate_phantom

    folder = tmp_path_factory.mktemp("parity") / "data"
    generate_phantom(folder, n=120, seed=3, size=64, progress=False)
    return folder


@pytest.fixture(scope="module")
def guarded(data, tmp_path_factory) -> Path:
    """A phantom-tiny model (random init: the answers are compared, not scored) with an OOD guard."""
    folder = tmp_path_factory.mktemp("parity-model") / "model"
    create_model("phantom-tiny").save_pretrained(folder)
    result, output = invoke("ood", "fit", "--model", folder, "--data", data, "-q")
    assert result.exit_code == 0, output
    return folder


@pytest.fixture(scope="module")
def index_dir(guarded, data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("parity-index") / "cases.idx"
    build_index(load_model(guarded), load_dataset(data).select("train"), out, model_dir=guarded, show_progress=False)
    return out


@pytest.fixture(scope="module")
def http(guarded, index_dir):
    from fastapi.testclient import TestClient

    with TestClient(create_app(guarded, index=index_dir, require_token=False)) as client:
        yield client


@pytest.fixture(scope="module")
def png(data) -> Path:
    return load_dataset(data).select("test")[0].image


def test_too_few_labels_are_refused_in_the_same_words(guarded, http, png):
    """The CLI and the service refuse a label set of fewer than 2 distinct names with the library's message."""
    for command, route, labels in (("predict", "/v1/zero-shot", "a"), ("predict", "/v1/zero-shot", "a, a,"),
                                   ("explain", "/v1/explain", "no_finding")):
        result, output = invoke(command, png, "--model", guarded, "--labels", labels)
        answer = http.post(route, files={"image": ("x.png", png.read_bytes())}, data={"labels": labels})
        assert result.exit_code == 2 and answer.status_code == 422, (output, answer.text)
        detail = answer.json()["detail"]
        assert "need at least 2 distinct labels" in detail and f"error: {detail}" in _flat(output), (output, detail)
