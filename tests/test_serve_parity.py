"""The same input through the CLI and the HTTP service gives the same answer or the same refusal: a tiny
phantom model (random init, saved by ``save_pretrained``) with an OOD guard fitted by ``medvl ood fit`` and a
case index, a tiny ViT, real pydicom-data DICOM files, and the service through FastAPI's TestClient."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

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
    torch.manual_seed(0)  # the same weights whichever tests ran before: the guard's verdicts below depend on them
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
    # two labels the model's tokenizer reads alike: one embedding, its probability split between two classes
    result, output = invoke("predict", png, "--model", guarded, "--labels", "nodule,Nodule,no_finding")
    answer = http.post("/v1/zero-shot", files={"image": ("x.png", png.read_bytes())},
                       data={"labels": "nodule,Nodule,no_finding"})
    assert result.exit_code == 2 and answer.status_code == 422, (output, answer.text)
    detail = answer.json()["detail"]
    assert "labels 'nodule' and 'Nodule' read as the same text to the model" in detail, detail
    assert f"error: {detail}" in _flat(output), (output, detail)


def test_too_many_labels_are_refused_alike_and_the_limit_is_documented(guarded, http, png):
    """One limit on the label set (``predict.MAX_LABELS``), in the library: ``medvl predict`` answered 65 labels that
    /v1/zero-shot refused, and neither --help nor /openapi.json said there was a limit."""
    from medvl.predict import MAX_LABELS

    labels = ",".join(f"class{n}" for n in range(MAX_LABELS + 1))
    for command, route in (("predict", "/v1/zero-shot"), ("explain", "/v1/explain")):
        result, output = invoke(command, png, "--model", guarded, "--labels", labels)
        answer = http.post(route, files={"image": ("x.png", png.read_bytes())}, data={"labels": labels})
        assert result.exit_code == 2 and answer.status_code == 422, (output, answer.text)
        detail = answer.json()["detail"]
        assert detail == f"at most {MAX_LABELS} labels, got {MAX_LABELS + 1}" and f"error: {detail}" in _flat(output)
        assert "class7" not in output  # one line, the labels not echoed
        result, output = invoke(command, "--help")
        assert f"2 to {MAX_LABELS} distinct" in _flat(output), output
    result, output = invoke("predict", png, "--model", guarded, "--labels", labels.rsplit(",", 1)[0])
    assert result.exit_code == 0, output  # 64 are answered
    document = http.get("/openapi.json").json()
    for path in ("/v1/zero-shot", "/v1/explain"):
        reference = document["paths"][path]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]["$ref"]
        field = document["components"]["schemas"][reference.rsplit("/", 1)[1]]["properties"]["labels"]
        assert field["x-max-labels"] == MAX_LABELS and f"2 to {MAX_LABELS} distinct" in field["description"]


@pytest.fixture(scope="module")
def vit(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("parity-vit") / "model"
    create_model("vit-tiny").save_pretrained(folder)
    return folder


def test_explain_defaults_to_the_methods_the_architecture_supports(vit, guarded, png, tmp_path):
    """``medvl explain`` on a ViT runs patch_text and occlusion by default (gradcam asked for by name is still
    refused); on a CNN Grad-CAM too; smoothgrad only by name on either (it fails the model-randomisation check).
    /v1/explain's default is its own subset by the same rule."""
    from fastapi.testclient import TestClient

    from medvl.explain.heatmaps import default_methods

    labels = "no_finding,nodule"
    for model, expected in ((vit, ["patch_text", "occlusion"]), (guarded, ["patch_text", "gradcam", "occlusion"])):
        assert default_methods(load_model(model)) == expected
        out = tmp_path / model.parent.name
        result, output = invoke("explain", png, "--model", model, "--labels", labels, "--out", out)
        assert result.exit_code == 0, output
        [finding] = json.loads((out / "explanation.json").read_text())["findings"]
        assert list(finding["heatmaps"]) == expected
        from medvl.explain.explanation import explain_image  # the library's own default is the same

        [finding] = explain_image(load_model(model), png, labels=labels.split(","))["findings"]
        assert list(finding["heatmaps"]) == expected
    result, output = invoke("explain", png, "--model", vit, "--labels", labels, "--method", "gradcam")
    assert result.exit_code == 2 and "Grad-CAM needs a convolutional image encoder (resnet, densenet), not vit" \
        in _flat(output), output
    with TestClient(create_app(vit, require_token=False)) as client:
        answer = client.post("/v1/explain", files={"image": ("x.png", png.read_bytes())}, data={"labels": labels})
        assert answer.status_code == 200 and answer.json()["methods"] == ["patch_text"], answer.text
        explained = json.loads((tmp_path / vit.parent.name / "explanation.json").read_text())
        assert explained["model"] == answer.json()["model"] == load_model(vit).config.name  # never the path
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


def test_a_blank_where_is_no_filter_in_the_cli_the_service_and_the_library(guarded, index_dir, http, tmp_path):
    """``--where "   "`` was refused by the CLI ("expected a column name") while the service, which reads a blank form
    field as absent, searched unfiltered; ``--where ""`` was no filter in both. A blank filter is now no filter
    everywhere: the same hits as no --where, and ``where`` null in the JSON, as the service answers."""
    from medvl.index import open_index, search_index

    with open_index(index_dir) as index:
        model = load_model(guarded)
        unfiltered = [hit.id for hit in search_index(index, model, text="a nodule", k=5)]
        for blank in ("   ", "\t", ""):
            assert [hit.id for hit in search_index(index, model, text="a nodule", k=5, where=blank)] == unfiltered
    for blank in ("   ", ""):
        result, output = invoke("search", "--index", index_dir, "--model", guarded, "--text", "a nodule", "-k", 5,
                                "--where", blank, "--json", tmp_path / "cli.json", "--overwrite")
        assert result.exit_code == 0, output
        cli = json.loads((tmp_path / "cli.json").read_text())
        served = http.post("/v1/search", data={"text": "a nodule", "k": "5", "where": blank}).json()
        assert cli["where"] is served["where"] is None
        assert [hit["id"] for hit in cli["hits"]] == [hit["id"] for hit in served["hits"]] == unfiltered


WITHOUT_STUDY_SERIES = ("JPEGLSNearLossless_08.dcm", "JPEGLSNearLossless_16.dcm", "SC_rgb_jls_lossy_line.dcm",
                        "SC_rgb_jls_lossy_sample.dcm")  # pydicom-data: whole files without Study / Series UIDs


@pytest.mark.parametrize("name", WITHOUT_STUDY_SERIES)
def test_a_whole_dicom_without_study_or_series_uid_is_answered_by_both_layers(name, guarded, http, tmp_path):
    """Such a file is read by ``medvl predict`` and, de-identified on arrival, by the service, with the same
    answer; ``medvl deid`` writes it with new Study / Series UIDs and says so in its report."""
    import pydicom
    from pydicom.data import get_testdata_file

    source = Path(get_testdata_file(name))
    original = pydicom.dcmread(source)
    assert "StudyInstanceUID" not in original and "SeriesInstanceUID" not in original
    labels = "no_finding,nodule"
    result, output = invoke("predict", source, "--model", guarded, "--labels", labels, "--json", tmp_path / "p.json")
    assert result.exit_code == 0, output
    [cli] = json.loads((tmp_path / "p.json").read_text())["predictions"]
    answer = http.post("/v1/zero-shot", files={"image": ("x", source.read_bytes())}, data={"labels": labels})
    assert answer.status_code == 200, answer.text
    served = answer.json()
    assert served["prediction"] == cli["prediction"]
    assert served["probabilities"] == pytest.approx(cli["probabilities"], abs=1e-5)
    assert served["out_of_distribution"] == cli["out_of_distribution"]
    assert served["input_flags"] == cli["input_flags"]
    result, output = invoke("deid", source, tmp_path / "out.dcm", "--report", tmp_path / "report.json")
    assert result.exit_code == 0, output
    written = pydicom.dcmread(tmp_path / "out.dcm")
    assert written.StudyInstanceUID and written.SeriesInstanceUID
    assert written.StudyInstanceUID != written.SeriesInstanceUID
    assert written.SOPInstanceUID != original.SOPInstanceUID
    [entry] = json.loads((tmp_path / "report.json").read_text())["files"]
    assert {"no StudyInstanceUID in the input: a new one was given",
            "no SeriesInstanceUID in the input: a new one was given"} <= set(entry["warnings"])


def test_a_dicom_cut_before_its_uids_is_still_truncated_and_a_whole_one_without_its_instance_uid_is_not(http,
                                                                                                       tmp_path):
    """The truncation checks stay: CT_small.dcm cut before its Study UID is refused as truncated by
    ``medvl deid`` and the service alike; a whole file without its SOP Instance UID is refused, not called
    truncated."""
    import pydicom
    from pydicom.data import get_testdata_file

    ct = Path(get_testdata_file("CT_small.dcm"))
    ds = pydicom.dcmread(ct)
    end = ds["StudyInstanceUID"].file_tell - 8  # its value's offset, less its 8-byte element header
    assert ct.read_bytes()[end:end + 4] == b"\x20\x00\x0d\x00"
    cut = ct.read_bytes()[:end]  # the file ends just before (0020,000D), between two elements
    del ds.SOPInstanceUID
    ds.save_as(tmp_path / "no-instance.dcm")
    whole_without_instance = (tmp_path / "no-instance.dcm").read_bytes()
    for data, reason in ((cut, "incomplete DICOM file: no StudyInstanceUID, SeriesInstanceUID (truncated"),
                         (whole_without_instance, "not a complete DICOM object: no SOPInstanceUID")):
        (tmp_path / "in.dcm").write_bytes(data)
        result, output = invoke("deid", tmp_path / "in.dcm", tmp_path / "out.dcm")
        assert result.exit_code == 2 and reason in _flat(output), output
        answer = http.post("/v1/embed", files={"image": ("x", data)})
        assert answer.status_code == 422 and reason in answer.json()["detail"], answer.text
    assert "(truncated" not in _flat(output) and "truncated DICOM" not in _flat(output)


# --- a 3D model: NIfTI volumes through the CLI and the service ------------------------------------------------


@pytest.fixture(scope="module")
def ct3d(tmp_path_factory) -> Path:
    """A ct3d-tiny model at random init (the answers are compared, not scored)."""
    import torch

    folder = tmp_path_factory.mktemp("parity-ct3d") / "model"
    torch.manual_seed(0)
    create_model("ct3d-tiny").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def ct3d_http(ct3d):
    from fastapi.testclient import TestClient

    with TestClient(create_app(ct3d, require_token=False)) as client:
        yield client


def test_damaged_nifti_files_are_refused_by_the_cli_and_the_service_alike(ct3d, ct3d_http, tmp_path):
    """A zero affine (a traceback and a 500 before) and a corrupt gzip stream (predicted by the CLI before):
    exit 2 and 422, with the same reason."""
    from hostile_files import corrupt_gzip_nifti, zero_affine_nifti

    for path, reason in ((zero_affine_nifti(tmp_path / "zero.nii"), "its affine (sform / qform) is singular"),
                         (corrupt_gzip_nifti(tmp_path / "corrupt.nii.gz"),
                          "corrupt or truncated gzip stream after the voxel data")):
        result, output = invoke("predict", path, "--model", ct3d, "--labels", "no_finding,kidney_cyst")
        assert result.exit_code == 2 and f"{path.name}:" in output and reason in _flat(output), output
        for route, fields in (("/v1/zero-shot", {"labels": "no_finding,kidney_cyst"}), ("/v1/preview", {})):
            answer = ct3d_http.post(route, files={"image": (path.name, path.read_bytes())}, data=fields)
            assert answer.status_code == 422 and reason in answer.json()["detail"], (route, answer.text)


def test_a_5d_file_of_one_volume_is_taken_by_the_cli_and_the_service_alike(ct3d, ct3d_http, tmp_path):
    """X x Y x Z x 1 x 1: the CLI predicted it, the service refused it (422 'expected a 3D volume'); both read it now
    and give the answer of the same volume stored as 3D."""
    import nibabel
    import numpy as np

    volume = (np.random.default_rng(4).normal(0, 300, (20, 18, 16))).astype(np.int16)
    nibabel.save(nibabel.Nifti1Image(volume[..., None, None], np.diag([2.0, 2.0, 3.0, 1.0])), tmp_path / "v5d.nii.gz")
    nibabel.save(nibabel.Nifti1Image(volume, np.diag([2.0, 2.0, 3.0, 1.0])), tmp_path / "v3d.nii.gz")
    result, output = invoke("predict", tmp_path / "v5d.nii.gz", tmp_path / "v3d.nii.gz", "--model", ct3d,
                            "--labels", "no_finding,kidney_cyst", "--json", tmp_path / "p.json")
    assert result.exit_code == 0, output
    five, three = json.loads((tmp_path / "p.json").read_text())["predictions"]
    assert five["probabilities"] == three["probabilities"]
    answer = ct3d_http.post("/v1/zero-shot", files={"image": ("v5d.nii.gz", (tmp_path / "v5d.nii.gz").read_bytes())},
                            data={"labels": "no_finding,kidney_cyst"})
    assert answer.status_code == 200, answer.text
    assert answer.json()["probabilities"] == pytest.approx(five["probabilities"], abs=1e-5)


def test_a_sagittal_file_and_its_axial_copy_get_one_answer_from_the_cli_and_the_service(ct3d, ct3d_http, tmp_path):
    """A NIfTI file is streamed in its stored planes (by the CLI, and by the service from the upload's file), a
    RAS array in axial planes; with each axis resized on its own both build the same model input, so a sagittally
    stored file, its axial copy (identical read_nifti arrays) and their uploads get the same probabilities (they
    differed in the third decimal). 1e-5 allows for float rounding: the axes are resized in another order."""
    import nibabel
    import numpy as np

    from medvl.clinical.nifti import read_nifti, write_nifti

    rng = np.random.default_rng(0)
    stored = (np.indices((40, 50, 30)).sum(0) * 10 - 500 + rng.normal(0, 50, (40, 50, 30))).astype(np.int16)
    affine = np.zeros((4, 4))
    affine[1, 0], affine[2, 1], affine[0, 2], affine[3, 3] = 2.0, 3.0, -1.5, 1.0  # voxel axes i, j, k: y, z, -x
    sagittal, axial = tmp_path / "sag.nii.gz", tmp_path / "axial.nii.gz"
    nibabel.save(nibabel.Nifti1Image(stored, affine), sagittal)
    write_nifti(axial, *read_nifti(sagittal))
    labels = "no_finding,kidney_cyst,liver_lesion"
    result, output = invoke("predict", sagittal, axial, "--model", ct3d, "--labels", labels,
                            "--json", tmp_path / "p.json")
    assert result.exit_code == 0, output
    answers = [p["probabilities"] for p in json.loads((tmp_path / "p.json").read_text())["predictions"]]
    for path in (sagittal, axial):
        answer = ct3d_http.post("/v1/zero-shot", files={"image": (path.name, path.read_bytes())},
                                data={"labels": labels})
        assert answer.status_code == 200, answer.text
        answers.append(answer.json()["probabilities"])
    for other in answers[1:]:
        assert other == pytest.approx(answers[0], abs=1e-5), answers


def test_a_nifti_upload_is_streamed_slab_by_slab_as_the_cli_reads_the_file(ct3d, ct3d_http, tmp_path):
    """The service decoded a NIfTI upload whole (read_nifti: the raw bytes, nibabel's float32 array and a RAS copy:
    2 GB for a 0.5 MB upload of 254 M voxels, where the CLI streams the file in 0.7 GB). It now gives the upload's
    file to the model's own loader, as medvl predict does: the memory it allocates while answering (numpy's, traced)
    stays a few slabs, under half of the volume as float32 (163 MiB before for this 80 MiB volume), and the answer
    is the CLI's."""
    import tracemalloc

    import nibabel
    import numpy as np

    stored = (np.indices((256, 256, 320), dtype=np.int16).sum(0) % 700 - 300).astype(np.int16)
    path = tmp_path / "large.nii.gz"
    nibabel.save(nibabel.Nifti1Image(stored, np.diag([0.8, 0.8, 1.0, 1.0])), path)
    labels = "no_finding,kidney_cyst"
    data = path.read_bytes()
    tracemalloc.start()
    try:
        answer = ct3d_http.post("/v1/zero-shot", files={"image": (path.name, data)}, data={"labels": labels})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert answer.status_code == 200, answer.text
    volume_bytes = stored.size * 4  # as float32
    assert peak < volume_bytes / 2, f"{peak / 2**20:.1f} MiB allocated for a {volume_bytes / 2**20:.0f} MiB volume"
    result, output = invoke("predict", path, "--model", ct3d, "--labels", labels, "--json", tmp_path / "p.json")
    assert result.exit_code == 0, output
    [cli] = json.loads((tmp_path / "p.json").read_text())["predictions"]
    assert answer.json()["probabilities"] == pytest.approx(cli["probabilities"], abs=1e-6)


def test_a_3d_model_advertises_no_explain_methods_and_explain_refuses_it_as_the_cli_does(ct3d, ct3d_http, tmp_path):
    """/v1/models listed four heatmap methods (two by default) for a 3D model that /v1/explain always refused after
    decoding the upload and a forward pass. Now: no methods, the reason given, and /v1/explain refuses at once with
    the CLI's words (exit 2 / 422)."""
    import numpy as np

    from medvl.clinical.nifti import write_nifti
    from medvl.explain.heatmaps import default_methods

    reason = "heatmaps are for 2D images; this model's image encoder is a 3D resnet"
    assert default_methods(load_model(ct3d)) == []
    explain = ct3d_http.get("/v1/models").json()["models"][0]["explain"]
    assert explain["methods"] == [] and explain["default_methods"] == [] and explain["unavailable"] == reason
    volume = write_nifti(tmp_path / "v.nii.gz", np.zeros((8, 16, 16), np.int16), (2.0, 1.0, 1.0))
    result, output = invoke("explain", volume, "--model", ct3d, "--labels", "no_finding,kidney_cyst",
                            "--out", tmp_path / "out")
    assert result.exit_code == 2 and reason in _flat(output) and not (tmp_path / "out").exists(), output
    for data in (volume.read_bytes(), b"not an image"):  # refused before the upload is decoded
        answer = ct3d_http.post("/v1/explain", files={"image": ("v.nii.gz", data)},
                                data={"labels": "no_finding,kidney_cyst"})
        assert answer.status_code == 422 and answer.json()["detail"] == reason, answer.text


def test_a_2d_model_still_advertises_its_explain_methods(http):
    explain = http.get("/v1/models").json()["models"][0]["explain"]
    assert explain["methods"] == ["patch_text", "gradcam", "occlusion", "smoothgrad"]
    assert explain["default_methods"] == ["patch_text", "gradcam"] and explain["unavailable"] is None


def test_predict_json_carries_the_label_column_and_warnings_the_service_answers_with(data, png, tmp_path):
    """``medvl predict --json`` used to hold the predictions only: which label column's descriptions were used
    and the warning that some classes were answered from their bare names were left to the log. It now carries
    ``label_column`` and ``warnings`` as /v1/zero-shot does, for a described and a partly undescribed set."""
    from fastapi.testclient import TestClient

    net = create_model("phantom-tiny")
    net.meta["captions"] = load_dataset(data).captions  # as training stores the captions it used
    net.save_pretrained(tmp_path / "model")
    with TestClient(create_app(tmp_path / "model", require_token=False)) as http:
        _compare_label_columns(tmp_path / "model", http, png, tmp_path)


def _compare_label_columns(model, http, png, tmp_path):
    for n, labels in enumerate(("no_finding,cardiomegaly", "no_finding,unicorn")):
        out = tmp_path / f"p{n}.json"
        result, output = invoke("predict", png, "--model", model, "--labels", labels, "--json", out)
        assert result.exit_code == 0, output
        cli = json.loads(out.read_text())
        answer = http.post("/v1/zero-shot", files={"image": ("x.png", png.read_bytes())}, data={"labels": labels})
        assert answer.status_code == 200, answer.text
        served = answer.json()
        assert (cli["label_column"], cli["warnings"]) == (served["label_column"], served["warnings"])
        assert cli["model"] == served["model"] == "phantom-tiny"  # the config's name, not the folder's
        assert cli["predictions"][0]["probabilities"] == pytest.approx(served["probabilities"], abs=1e-5)
        if n == 0:
            assert cli["label_column"] == "finding" and cli["warnings"] == []
        else:
            assert cli["label_column"] is None and len(cli["warnings"]) == 1
            assert "bare class names" in cli["warnings"][0] and "unicorn" not in cli["warnings"][0]
