"""The same input through the CLI and the HTTP service gives the same answer or the same refusal: a tiny
phantom model (random init, saved by ``save_pretrained``) with an OOD guard fitted by ``medvl ood fit`` and a
case index, a tiny ViT, real pydicom-data DICOM files, and the service through FastAPI's TestClient."""

from __future__ import annotations

import json
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


@pytest.fixture(scope="module")
def vit(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("parity-vit") / "model"
    create_model("vit-tiny").save_pretrained(folder)
    return folder


def test_explain_defaults_to_the_methods_the_architecture_supports(vit, guarded, png, tmp_path):
    """``medvl explain`` on a ViT runs every method but Grad-CAM by default (gradcam asked for by name is still
    refused); on a CNN all four. /v1/explain's default is its own subset by the same rule."""
    from fastapi.testclient import TestClient

    from medvl.explain.heatmaps import METHODS, default_methods

    labels = "no_finding,nodule"
    for model, expected in ((vit, ["patch_text", "occlusion", "smoothgrad"]), (guarded, list(METHODS))):
        assert default_methods(load_model(model)) == expected
        out = tmp_path / model.parent.name
        result, output = invoke("explain", png, "--model", model, "--labels", labels, "--out", out)
        assert result.exit_code == 0, output
        [finding] = json.loads((out / "explanation.json").read_text())["findings"]
        assert list(finding["heatmaps"]) == expected
    result, output = invoke("explain", png, "--model", vit, "--labels", labels, "--method", "gradcam")
    assert result.exit_code == 2 and "Grad-CAM needs a convolutional image encoder (resnet, densenet), not vit" \
        in _flat(output), output
    with TestClient(create_app(vit, require_token=False)) as client:
        answer = client.post("/v1/explain", files={"image": ("x.png", png.read_bytes())}, data={"labels": labels})
        assert answer.status_code == 200 and answer.json()["methods"] == ["patch_text"], answer.text
        assert client.get("/v1/models").json()["models"][0]["explain"]["default_methods"] == ["patch_text"]


def test_search_reports_the_guards_verdict_as_the_cli_does(guarded, index_dir, http, tmp_path):
    """A CT slice (pydicom-data's CT_small.dcm) against a phantom model's guard: ``medvl search --json`` and
    /v1/search give the same ``query`` keys and values (the image named each its own way) and the same hits."""
    from pydicom.data import get_testdata_file

    ct = Path(get_testdata_file("CT_small.dcm"))
    result, output = invoke("search", "--index", index_dir, "--model", guarded, "--image", ct, "-k", 3,
                            "--json", tmp_path / "cli.json")
    assert result.exit_code == 0 and "the query image is out of distribution" in _flat(output), output
    cli = json.loads((tmp_path / "cli.json").read_text())
    answer = http.post("/v1/search", files={"image": ("x", ct.read_bytes())}, data={"k": "3"})
    assert answer.status_code == 200, answer.text
    served = answer.json()
    assert served["query"].keys() == cli["query"].keys()
    assert cli["query"]["out_of_distribution"] is served["query"]["out_of_distribution"] is True
    assert served["query"]["ood_score"] == pytest.approx(cli["query"]["ood_score"], abs=2e-3)
    assert served["query"]["ood_threshold"] == cli["query"]["ood_threshold"]
    assert served["query"]["input_flags"] == cli["query"]["input_flags"]
    assert served["query"]["image"] == {"kind": "dicom", "bytes": ct.stat().st_size}
    assert [hit["id"] for hit in served["hits"]] == [hit["id"] for hit in cli["hits"]]
    text = http.post("/v1/search", data={"text": "a nodule", "k": "3"}).json()
    assert text["query"] == {"text": "a nodule"}

