"""The out-of-distribution guard: a phantom-trained model flags real chest X-rays and CTs, not new phantoms.

Real images: the Figure 1 COVID chest X-rays and MedPix 2.0 CT/MR images from the shared data; a tiny
model trained by ``medvl train`` on the phantom; the guard fitted by ``medvl ood fit`` on the train split
and calibrated on val. Predictions, eval zero-shot and the service then carry the OOD score and flag.
"""

from __future__ import annotations

import json
import re
import shutil
import time

import numpy as np
import pytest
import torch

import medvl
from cli_helpers import invoke, with_copied_films
from medvl.api import load_split
from medvl.errors import ModelError
from medvl.models.ood import OOD_FILE, OODGuard
from medvl.models.registry import load_model
from medvl.predict import predict

LABELS = "no_finding,cardiomegaly,nodule"


@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory):
    """400 phantom cases: enough train images for the guard's covariance and val images for its threshold."""
    from medvl.data.phantom import generate_phantom

    folder = tmp_path_factory.mktemp("ood-phantom") / "data"
    generate_phantom(folder, n=400, seed=5, size=64, progress=False)
    return folder


@pytest.fixture(scope="module")
def guarded(phantom_dir, shared_data, tmp_path_factory):
    """A phantom model with a guard; the fit's JSON (checked on Figure 1)."""
    out = tmp_path_factory.mktemp("ood") / "run"
    result, output = invoke("train", "--data", phantom_dir, "--model", "phantom-tiny", "--out", out,
                            "--epochs", 2, "--batch-size", 32, "-q")
    assert result.exit_code == 0, output
    report = out / "ood.json"
    result, output = invoke("ood", "fit", "--model", out, "--data", phantom_dir, "--check-data",
                            shared_data / "figure1-covid-cxr", "--json", report, "-q")
    assert result.exit_code == 0, output
    return out / "model", json.loads(report.read_text())


def test_real_images_are_flagged_and_new_phantoms_are_not(guarded, phantom_dir, shared_data):
    model_dir, fit = guarded
    assert (model_dir / OOD_FILE).is_file()
    assert fit["calibration_flagged_share"] <= 0.05 and fit["fit_images"] > 250
    # real chest X-rays (Figure 1) vs a phantom model: 87% with this tiny model, whose threshold is the highest of
    # the 40 val scores (the split-conformal threshold of a calibration split smaller than 99)
    assert fit["check"]["flagged_share"] >= 0.8
    net = load_model(model_dir)
    assert net.ood is not None and net.ood.threshold == pytest.approx(fit["threshold"], abs=1e-3)
    from medvl.eval.ood import ood_summary

    medpix = load_split(shared_data / "medpix-2.0", "dev")[:60]
    assert ood_summary(net, medpix, show_progress=False)["flagged_share"] >= 0.9  # CT / MR
    held_out = ood_summary(net, load_split(phantom_dir, "test"), show_progress=False)
    assert held_out["flagged_share"] <= 0.1  # unseen phantoms (60 images: a loose bound on the ~1% expected)


def test_predict_and_eval_report_the_flag(guarded, phantom_dir, shared_data, tmp_path, caplog):
    model_dir, _ = guarded
    xray = sorted((shared_data / "figure1-covid-cxr" / "images").iterdir())[0]
    phantom = load_split(phantom_dir, "test")[0].image
    with caplog.at_level("WARNING"):
        results = predict(model_dir, [phantom, xray], LABELS.split(","))
    assert [r["out_of_distribution"] for r in results] == [False, True]
    assert results[1]["ood_score"] > results[1]["ood_threshold"] > results[0]["ood_score"]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("1 of 2 images" in w for w in warnings) and not any(xray.name in w for w in warnings)
    result, output = invoke("predict", phantom, xray, "--model", model_dir, "--labels", LABELS)
    assert result.exit_code == 0 and output.count("out of distribution") == 1, output
    result, output = invoke("eval", "zero-shot", "--model", model_dir, "--data", phantom_dir, "--split", "test",
                            "--json", tmp_path / "zs.json", "-q")
    assert result.exit_code == 0, output
    block = json.loads((tmp_path / "zs.json").read_text())["ood"]
    assert block["n"] == len(load_split(phantom_dir, "test")) and block["flagged_share"] <= 0.1


def test_the_service_reports_the_flag(guarded, phantom_dir, shared_data):
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    from medvl.serve import ServeSettings, create_app
    from medvl.serve.auth import token_digest
    from serve_helpers import Server

    model_dir, _ = guarded
    token = "ood-test-token-0123456789"
    app = create_app(model_dir, settings=ServeSettings(), token_digests=[token_digest(token)])
    xray = sorted((shared_data / "figure1-covid-cxr" / "images").iterdir())[0]
    phantom = load_split(phantom_dir, "test")[0].image
    with Server(app) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        answers = [client.post("/v1/zero-shot", headers={"Authorization": f"Bearer {token}"},
                               files={"image": (path.name, path.read_bytes())}, data={"labels": LABELS}).json()
                   for path in (phantom, xray)]
    assert [a["out_of_distribution"] for a in answers] == [False, True], answers
    library = predict(model_dir, [phantom, xray], LABELS.split(","))  # the same scores as the library's
    assert [a["ood_score"] for a in answers] == pytest.approx([p["ood_score"] for p in library], abs=2e-3)


def test_guard_round_trip_and_bad_input(guarded, phantom_dir, tmp_path):
    model_dir, _ = guarded
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    guard = OODGuard.load(copy)
    assert guard is not None
    features = torch.randn(4, guard.mean.shape[0])
    assert torch.allclose(guard.scores(features), load_model(copy).ood.scores(features))
    centred = torch.nn.functional.normalize(features, dim=-1)[0] - guard.mean  # the plain formula
    assert guard.scores(features)[0].item() == pytest.approx(float(np.sqrt(centred @ guard.precision @ centred)),
                                                             rel=1e-4)
    with pytest.raises(ModelError, match="64-d|-d image features"):
        guard.scores(torch.randn(2, guard.mean.shape[0] + 1))
    (copy / OOD_FILE).write_bytes(b"not a safetensors file")
    with pytest.raises(ModelError, match=OOD_FILE):
        load_model(copy)
    result, output = invoke("ood", "fit", "--model", model_dir, "--data", phantom_dir, "--calibration-split", "train")
    assert result.exit_code == 2 and "calibrate" in output
    result, output = invoke("ood", "fit", "--model", model_dir, "--data", phantom_dir, "--quantile", "1.5")
    assert result.exit_code == 2 and "quantile" in output
    before = (model_dir / OOD_FILE).read_bytes()
    result, output = invoke("ood", "fit", "--model", model_dir, "--data", phantom_dir)
    assert result.exit_code == 2 and "--overwrite" in output and (model_dir / OOD_FILE).read_bytes() == before
    result, output = invoke("ood", "fit", "--model", model_dir, "--data", phantom_dir, "--calibration-split", "all",
                            "--overwrite")  # every split: the fitted training images would set the threshold
    assert result.exit_code == 2 and "holds" in output and "images of the fitted split 'train'" in \
        " ".join(output.split()) and (model_dir / OOD_FILE).read_bytes() == before


def test_search_reports_the_query_flag(guarded, phantom_dir, shared_data, tmp_path):
    model_dir, _ = guarded
    result, output = invoke("index", "build", "--model", model_dir, "--data", phantom_dir, "--split", "val",
                            "--out", tmp_path / "idx", "-q")
    assert result.exit_code == 0, output
    xray = sorted((shared_data / "figure1-covid-cxr" / "images").iterdir())[0]
    phantom = load_split(phantom_dir, "test")[0].image
    flags = []
    for number, image in enumerate((phantom, xray)):
        out = tmp_path / f"hits{number}.json"
        result, output = invoke("search", "--index", tmp_path / "idx", "--image", image, "-k", 3, "--json", out)
        assert result.exit_code == 0, output
        flags.append(json.loads(out.read_text())["query"]["out_of_distribution"])
    assert flags == [False, True]


def test_calibration_films_that_copy_fitted_films_are_reported(guarded, phantom_dir, tmp_path):
    """Three val rows show renamed copies of train films: the guard's own training images would pull its threshold
    down; not the same files, so not refused, but counted."""
    data, _ = with_copied_films(phantom_dir, tmp_path / "data", "train", "val", 3)
    model = tmp_path / "model"
    shutil.copytree(guarded[0], model)
    result, output = invoke("ood", "fit", "--model", model, "--data", data, "--overwrite", "--json",
                            tmp_path / "ood.json", "-q")
    assert result.exit_code == 0, output
    n_val = len(medvl.load_dataset(data).select("val"))
    assert json.loads((tmp_path / "ood.json").read_text())["copies_in_fit"] == {
        "records": 3, "of": n_val, "fit": "the fitted split 'train'"}
    assert f"3 of {n_val} calibration images are byte-for-byte copies" in " ".join(output.split())


def test_a_bad_check_split_leaves_the_model_without_a_guard(guarded, phantom_dir, tmp_path):
    """--check-data / --check-split are read before the guard is fitted and saved: a typo there leaves the
    model as it was (no guard that predict would then use), so the corrected rerun needs no --overwrite."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(guarded[0], model)
    (model / OOD_FILE).unlink()
    result, output = invoke("ood", "fit", "--model", model, "--data", phantom_dir, "--check-data", phantom_dir,
                            "--check-split", "tset", "-q")
    assert result.exit_code == 2 and "tset" in output, output
    assert not (model / OOD_FILE).exists()
    result, output = invoke("ood", "fit", "--model", model, "--data", phantom_dir, "--check-data", phantom_dir,
                            "--check-split", "test", "-q")
    assert result.exit_code == 0 and (model / OOD_FILE).is_file(), output


def test_a_check_split_without_check_data_is_refused(guarded, phantom_dir, tmp_path):
    """--check-split names a split of --check-data: alone it was ignored (the guard saved, no check block), even a
    split that does not exist."""
    model = tmp_path / "model"
    shutil.copytree(guarded[0], model)
    (model / OOD_FILE).unlink()
    result, output = invoke("ood", "fit", "--model", model, "--data", phantom_dir, "--check-split", "nosuch",
                            "--json", tmp_path / "fit.json", "-q")
    assert result.exit_code == 2 and "--check-split needs --check-data" in output, output
    assert not (model / OOD_FILE).exists() and not (tmp_path / "fit.json").exists()


def test_fit_writes_only_the_guard_and_keeps_a_symlinked_model_folder(guarded, phantom_dir, tmp_path):
    """``ood fit`` adds one file: an ONNX export, a model card and the weights stay as they were, and a deployment
    link (``current -> v3``) keeps pointing at ``v3``, which receives the guard."""
    version = tmp_path / "v3"
    shutil.copytree(guarded[0], version)
    (version / OOD_FILE).unlink()
    (version / "onnx").mkdir()
    (version / "onnx" / "export.json").write_text('{"format": 1}')
    (version / "MODEL_CARD.md").write_text("model card")
    weights = (version / "model.safetensors").read_bytes()
    current = tmp_path / "current"
    current.symlink_to("v3", target_is_directory=True)
    result, output = invoke("ood", "fit", "--model", current, "--data", phantom_dir, "-q")
    assert result.exit_code == 0, output
    assert current.is_symlink() and current.readlink().name == "v3"
    assert (version / OOD_FILE).is_file() and load_model(current).ood is not None
    assert (version / "onnx" / "export.json").read_text() == '{"format": 1}'
    assert (version / "MODEL_CARD.md").read_text() == "model card"
    assert (version / "model.safetensors").read_bytes() == weights
    assert sorted(p.name for p in tmp_path.iterdir()) == ["current", "v3"]  # no renamed-away copy left
    assert not [p.name for p in version.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_a_damaged_guard_says_how_to_recover_and_overwrite_replaces_it(guarded, phantom_dir, tmp_path):
    """A guard file cut short (an interrupted copy, a full disk) stops every command on the model: the error says
    how to recover, and ``medvl ood fit --overwrite``, which replaces the guard, does not read it first."""
    model = tmp_path / "model"
    shutil.copytree(guarded[0], model)
    (model / OOD_FILE).write_bytes((model / OOD_FILE).read_bytes()[:500])
    phantom = load_split(phantom_dir, "test")[0].image
    result, output = invoke("predict", phantom, "--model", model, "--labels", LABELS)
    message = " ".join(output.split())
    assert result.exit_code == 2 and "cannot read the OOD guard" in message, output
    assert f"delete {model / OOD_FILE}" in message and "medvl ood fit" in message and "--overwrite" in message
    result, output = invoke("ood", "fit", "--model", model, "--data", phantom_dir, "--overwrite", "-q")
    assert result.exit_code == 0, output
    assert load_model(model).ood is not None


def test_the_threshold_is_the_split_conformal_order_statistic(guarded, phantom_dir, caplog):
    """The threshold is the ceil((n + 1) q)-th smallest calibration score, so a new in-distribution image is flagged
    with probability at most 1 - q; a calibration split too small for that gets its highest score, a warning and
    the share actually expected (1 / (n + 1)) in the guard's info."""
    from medvl.embed import embed_images
    from medvl.eval.ood import fit_ood

    net = load_model(guarded[0])
    train, val = load_split(phantom_dir, "train"), load_split(phantom_dir, "val")
    assert len(val) < 99 <= len(train)
    with caplog.at_level("WARNING"):
        small = fit_ood(net, train, val, show_progress=False)
    val_scores = small.scores(embed_images(net, val, features=True, show_progress=False)).numpy()
    assert small.threshold == pytest.approx(float(val_scores.max()), abs=1e-6)
    assert small.info["expected_flagged_share"] == round(1 / (len(val) + 1), 4)
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert f"{len(val)} calibration images are fewer than the 99 the 0.99 quantile needs" in warning
    assert f"(1 in {len(val) + 1}), not 1.0%" in warning
    caplog.clear()
    with caplog.at_level("WARNING"):
        large = fit_ood(net, val, train, show_progress=False)  # fitted on val, calibrated on the larger train split
    assert not [r for r in caplog.records if "calibration images are fewer" in r.getMessage()]
    train_scores = np.sort(large.scores(embed_images(net, train, features=True, show_progress=False)).numpy())
    rank = int(np.ceil((len(train) + 1) * 0.99))
    assert large.threshold == pytest.approx(float(train_scores[rank - 1]), abs=1e-6)
    assert large.info["expected_flagged_share"] == round((len(train) + 1 - rank) / (len(train) + 1), 4) <= 0.01


def _films_and_blanks(phantom_dir, folder, films: dict[str, int], blanks: dict[str, int]):
    """A manifest dataset at ``folder``: per split, that many phantom films (copied) and uniform grey images."""
    from PIL import Image

    from cli_helpers import write_manifest

    (folder / "images").mkdir(parents=True)
    sources = [record.image for record in load_split(phantom_dir, "train")]
    rows = []
    for split, count in films.items():
        for _ in range(count):
            source = sources[len(rows)]
            shutil.copyfile(source, folder / "images" / f"film{len(rows)}.png")
            rows.append([f"images/film{len(rows)}.png", split, "no_finding"])
    for split, count in blanks.items():
        for _ in range(count):
            Image.fromarray(np.full((64, 64), 100, np.uint8)).save(folder / "images" / f"grey{len(rows)}.png")
            rows.append([f"images/grey{len(rows)}.png", split, "no_finding"])
    return write_manifest(folder / "manifest.csv", ["image", "split", "finding"], rows).parent


def test_a_fit_on_identical_features_or_scores_is_refused(guarded, phantom_dir, tmp_path):
    """Uniform images have one feature vector: its covariance is zero, and so would be the precision (every score
    0, nothing ever flagged). Such a fit split, or a calibration split whose scores do not spread, is refused with
    the split named, and no guard is saved."""
    model = tmp_path / "model"
    shutil.copytree(guarded[0], model)
    (model / OOD_FILE).unlink()
    grey = _films_and_blanks(phantom_dir, tmp_path / "grey", {}, {"train": 25, "val": 12})
    result, output = invoke("ood", "fit", "--model", model, "--data", grey, "-q")
    message = " ".join(output.split())
    assert result.exit_code == 2 and "error: " in message, output
    assert "25 images of the fitted split 'train' have (near) identical features" in message
    assert not (model / OOD_FILE).exists()
    mixed = _films_and_blanks(phantom_dir, tmp_path / "mixed", {"train": 30}, {"val": 12})
    result, output = invoke("ood", "fit", "--model", model, "--data", mixed, "-q")
    message = " ".join(output.split())
    assert result.exit_code == 2 and "12 images of the calibration split 'val' all score" in message, output
    assert not (model / OOD_FILE).exists()


def test_a_zero_precision_is_never_saved_and_refused_at_load(tmp_path):
    """A guard whose precision is zero scores every image 0 and flags none (what an earlier fit on identical images
    saved): not written, and refused with the way out when found in a model folder."""
    from safetensors.torch import save_file

    zero = OODGuard(mean=torch.zeros(8), precision=torch.zeros(8, 8), threshold=0.0, info={})
    with pytest.raises(ModelError, match="precision matrix is zero"):
        zero.save(tmp_path)
    assert not (tmp_path / OOD_FILE).exists()
    save_file({"mean": zero.mean, "precision": zero.precision}, str(tmp_path / OOD_FILE),
              metadata={"threshold": "0.0", "info": "{}"})
    with pytest.raises(ModelError, match=r"malformed \(the precision matrix is zero\); delete .* or fit a new"):
        OODGuard.load(tmp_path)


def _guard_copy(model_dir, folder, mean=None, precision=None, threshold=None, info=None):
    """A copy of the model ``model_dir`` in ``folder`` whose guard file holds the given values in place of its own
    (``threshold`` and ``info`` as stored: text)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    shutil.copytree(model_dir, folder)
    with safe_open(str(folder / OOD_FILE), framework="pt") as handle:
        metadata = handle.metadata()
        stored = {"mean": handle.get_tensor("mean"), "precision": handle.get_tensor("precision")}
    stored = {"mean": stored["mean"] if mean is None else mean(stored["mean"]),
              "precision": stored["precision"] if precision is None else precision(stored["precision"])}
    metadata = {"threshold": metadata["threshold"] if threshold is None else threshold,
                "info": metadata["info"] if info is None else info}
    save_file({name: tensor.contiguous() for name, tensor in stored.items()}, str(folder / OOD_FILE),
              metadata=metadata)
    return folder


def _with(tensor, position, value):
    changed = tensor.clone()
    changed[position] = value
    return changed


def test_a_guard_with_a_non_finite_threshold_or_mean_is_refused_naming_the_file(guarded, phantom_dir, tmp_path):
    """A NaN threshold or a NaN in the mean makes no score exceed the threshold: the guard would be silently off,
    every image in distribution; -inf (or any negative threshold) flags every image. Refused at load, naming the
    file and the way out, as a non-finite precision is: exit 2 at the CLI, and the service does not start."""
    model_dir, _ = guarded
    phantom = load_split(phantom_dir, "test")[0].image
    cases = {"threshold-nan": {"threshold": "nan"}, "threshold-neginf": {"threshold": "-inf"},
             "threshold-inf": {"threshold": "inf"}, "threshold-negative": {"threshold": "-1.5"},
             "mean-nan": {"mean": lambda mean: _with(mean, 0, float("nan"))},
             "mean-inf": {"mean": lambda mean: _with(mean, 3, float("inf"))},
             "mean-huge": {"mean": lambda mean: mean * 1e30}}  # finite, but scores overflow to inf
    for name, change in cases.items():
        model = _guard_copy(model_dir, tmp_path / name, **change)
        with pytest.raises(ModelError, match=re.escape(str(model / OOD_FILE)) + ": the OOD guard is malformed"):
            load_model(model)
        result, output = invoke("predict", phantom, "--model", model, "--labels", LABELS)
        message = " ".join(output.split())
        assert result.exit_code == 2 and f"{model / OOD_FILE}: the OOD guard is malformed" in message, (name, output)
        assert "medvl ood fit" in message and "Traceback" not in output
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from medvl.serve import create_app

    with TestClient(create_app(tmp_path / "threshold-nan", token_digests=[], require_token=False,
                               load_in_background=True)) as http:  # as `medvl serve` loads it
        while (health := http.get("/v1/health").json())["status"] == "loading":
            time.sleep(0.05)
        assert health["status"] == "failed", health
        answer = http.post("/v1/zero-shot", files={"image": (phantom.name, phantom.read_bytes())},
                           data={"labels": LABELS})
        assert answer.status_code == 503, answer.text


def test_a_guard_of_another_dtype_or_shape_or_info_is_converted_or_refused_at_load(guarded, phantom_dir, tmp_path):
    """A guard written in float64 (refitted or converted with numpy) is read as float32 and scores as the original;
    integer tensors, a mean that is not a vector and an info that is not a JSON object are refused at load, naming
    the file: they loaded, then every image crashed (a traceback, HTTP 500 while the health said ok)."""
    model_dir, _ = guarded
    phantom = load_split(phantom_dir, "test")[0].image
    wide = _guard_copy(model_dir, tmp_path / "float64", mean=torch.Tensor.double, precision=torch.Tensor.double)
    features = torch.randn(3, load_model(model_dir).ood.mean.shape[0])
    assert torch.allclose(load_model(wide).ood.scores(features), load_model(model_dir).ood.scores(features))
    result, output = invoke("predict", phantom, "--model", wide, "--labels", LABELS, "--json", tmp_path / "p.json")
    assert result.exit_code == 0, output
    assert json.loads((tmp_path / "p.json").read_text())["predictions"][0]["out_of_distribution"] is False
    cases = {"precision-int": ({"precision": lambda precision: (precision * 100).long()}, "floating point"),
             "mean-bool": ({"mean": lambda mean: mean > 0}, "floating point"),
             "mean-2d": ({"mean": lambda mean: mean.reshape(-1, 1)}, "a non-empty vector"),
             "mean-0d": ({"mean": lambda mean: mean[0].clone()}, "a non-empty vector"),
             "info-null": ({"info": "null"}, "info must be a JSON object"),
             "info-list": ({"info": "[]"}, "info must be a JSON object"),
             "info-sha-number": ({"info": '{"image_tower_sha256": 5}'}, "must be a string")}
    for name, (change, problem) in cases.items():
        model = _guard_copy(model_dir, tmp_path / name, **change)
        result, output = invoke("predict", phantom, "--model", model, "--labels", LABELS)
        message = " ".join(output.split())
        assert result.exit_code == 2 and f"{model / OOD_FILE}: the OOD guard is malformed" in message, (name, output)
        assert problem in message and "Traceback" not in output, (name, output)


def test_training_from_a_guarded_model_drops_its_guard_and_a_guard_of_other_weights_is_ignored(guarded, phantom_dir,
                                                                                               tmp_path, caplog):
    """The guard describes the features of the weights it was fitted on. Training from a guarded model folder does
    not carry it into the trained model (a warning says to fit one again); a guard whose weights fingerprint is not
    the model's (copied into another model) is ignored with a warning, never used; a guard that records no
    fingerprint (fitted before medvl recorded one) is used, with one warning."""
    model_dir, fit = guarded
    old = tmp_path / "old"
    shutil.copytree(model_dir, old)
    guard = OODGuard.load(old)
    assert fit["image_tower_sha256"] == guard.info.pop("image_tower_sha256")
    guard.save(old)
    with caplog.at_level("WARNING"):  # before any command: the CLI sets up its own logging
        first, second = load_model(old), load_model(old)
    assert first.ood is not None and second.ood is not None
    assert len([r for r in caplog.records if "records no fingerprint of the weights" in r.getMessage()]) == 1
    result, output = invoke("train", "--data", phantom_dir, "--split", "val", "--model", model_dir,
                            "--out", tmp_path / "ft", "--epochs", 1, "--batch-size", 16, "-q")
    message = " ".join(output.split())
    assert result.exit_code == 0, output
    assert "OOD guard is not carried into the trained model" in message and "medvl ood fit --model" in message
    tuned = tmp_path / "ft" / "model"
    assert not (tuned / OOD_FILE).exists() and load_model(tuned).ood is None
    shutil.copyfile(model_dir / OOD_FILE, tuned / OOD_FILE)  # the base model's guard next to other weights
    assert load_model(tuned).ood is None
    phantom = load_split(phantom_dir, "test")[0].image
    result, output = invoke("predict", phantom, "--model", tuned, "--labels", LABELS, "--json", tmp_path / "p.json")
    message = " ".join(output.split())
    assert result.exit_code == 0, output
    assert "fitted on other image-tower weights than this model's" in message and "ignored" in message
    assert "ood_score" not in json.loads((tmp_path / "p.json").read_text())["predictions"][0]


def test_a_guard_fitted_with_other_image_settings_is_ignored(guarded, phantom_dir, tmp_path, caplog):
    """The guard's scores depend on config.json's image section as well as the weights: features averaged over 8
    orientations (README: `image.test_time_orientations` may be set in a saved model's config.json) are not the
    ones its threshold was calibrated on. A guard fitted with other image settings is ignored with a warning; one
    that records no fingerprint of them (fitted before medvl recorded one) is used, with one warning; an edit of the
    training-time augmentation keeps the guard."""
    model_dir, fit = guarded
    assert fit["image_config_sha256"] == OODGuard.load(model_dir).info["image_config_sha256"]
    turned, unchecked, augmented = tmp_path / "turned", tmp_path / "unchecked", tmp_path / "augmented"
    for folder, edit in ((turned, "test_time_orientations"), (unchecked, "test_time_orientations"),
                         (augmented, "augment_flip")):
        shutil.copytree(model_dir, folder)
        config = json.loads((folder / "config.json").read_text())
        config["image"][edit] = 8 if edit == "test_time_orientations" else True
        config["image"]["slice_batch"] = 3  # how many slices a volume model encodes at once: memory only
        (folder / "config.json").write_text(json.dumps(config))
    guard = OODGuard.load(unchecked)
    guard.info.pop("image_config_sha256")
    guard.save(unchecked)
    with caplog.at_level("WARNING"):  # before any command: the CLI sets up its own logging
        assert load_model(turned).ood is None
        assert load_model(unchecked).ood is not None and load_model(unchecked).ood is not None
        assert load_model(augmented).ood is not None  # training-time augmentation changes no feature it scores
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    ignored = [w for w in warnings if "fitted with other image settings than this model's config.json" in w]
    assert len(ignored) == 1 and "ignored" in ignored[0] and str(turned) in ignored[0], warnings
    said = [w for w in warnings if "records no fingerprint" in w]
    assert len(said) == 1 and "the image settings it was fitted with" in said[0] and str(unchecked) in said[0]
    phantom = load_split(phantom_dir, "test")[0].image
    result, output = invoke("predict", phantom, "--model", turned, "--labels", LABELS, "--json", tmp_path / "p.json")
    assert result.exit_code == 0 and "other image settings" in " ".join(output.split()), output
    assert "ood_score" not in json.loads((tmp_path / "p.json").read_text())["predictions"][0]


def test_scoring_the_guards_own_splits_is_said(guarded, phantom_dir, tmp_path):
    """The guard records the data (its path's hash) and the splits it was fitted and calibrated on; eval zero-shot on
    one of them says so in its ood block and a warning, as a model's own training split is reported."""
    model_dir, fit = guarded
    assert fit["fit_data"]["splits"] == ["train"] and fit["calibration_data"]["splits"] == ["val"]
    assert fit["fit_data"]["data_sha256"] == fit["calibration_data"]["data_sha256"]
    blocks = {}
    for split in ("val", "test"):
        result, output = invoke("eval", "zero-shot", "--model", model_dir, "--data", phantom_dir, "--split", split,
                                "--json", tmp_path / f"{split}.json", "-q")
        assert result.exit_code == 0, output
        blocks[split] = json.loads((tmp_path / f"{split}.json").read_text())["ood"]
        if split == "val":
            assert "scored records come from split(s) val of the data the OOD guard was fitted or calibrated on" \
                in " ".join(output.split())
    n_val = len(load_split(phantom_dir, "val"))
    assert blocks["val"]["fitted_on_scored"] == {"records": n_val, "of": n_val, "fit_splits": [],
                                                 "calibration_splits": ["val"]}
    assert "fitted_on_scored" not in blocks["test"]


def test_check_data_is_every_record_by_default_and_never_the_fitted_images(guarded, phantom_dir, tmp_path):
    """--check-split defaults to every record, as its help says, and the JSON names the split checked; checking the
    images the guard is fitted or calibrated on (the training data itself) is refused, copies of them are counted."""
    model = tmp_path / "model"
    shutil.copytree(guarded[0], model)
    (model / OOD_FILE).unlink()
    result, output = invoke("ood", "fit", "--model", model, "--data", phantom_dir, "--check-data", phantom_dir, "-q")
    message = " ".join(output.split())
    assert result.exit_code == 2, output
    n_fitted = len(load_split(phantom_dir, "train")) + len(load_split(phantom_dir, "val"))
    assert (f"--check-split all: {n_fitted} of its {len(load_split(phantom_dir, 'all'))} records are the images the "
            "guard is fitted or calibrated on (splits 'train', 'val')") in message
    assert not (model / OOD_FILE).exists()
    other = _films_and_blanks(phantom_dir, tmp_path / "other", {"Train": 12}, {"Test": 4})  # no 'train' split
    result, output = invoke("ood", "fit", "--model", model, "--data", phantom_dir, "--check-data", other,
                            "--json", tmp_path / "fit.json", "-q")
    assert result.exit_code == 0, output
    check = json.loads((tmp_path / "fit.json").read_text())["check"]
    assert check["split"] == "all" and check["n"] == 16
    assert check["copies_in_fit"] == {"records": 12, "of": 16, "fit": "the images the guard is fitted or calibrated "
                                                                       "on (splits 'train', 'val')"}
    assert "12 of 16 checked images are byte-for-byte copies" in " ".join(output.split())


def test_a_report_draft_and_an_explanation_carry_the_flag(guarded, phantom_dir, shared_data, tmp_path):
    """A draft for a real chest X-ray from a phantom model's index used to carry no OOD flag at all (library, JSON
    and CLI), nor did an explanation: the most consequential answer read as if the image were like the others."""
    from medvl.explain.explanation import explain_image
    from medvl.index import open_index
    from medvl.rag import draft_report
    from serve_helpers import build_case_index

    model_dir, _ = guarded
    index = build_case_index(model_dir, phantom_dir, tmp_path / "cases.idx")
    xray = sorted((shared_data / "figure1-covid-cxr" / "images").iterdir())[0]
    phantom = load_split(phantom_dir, "test")[0].image
    net = load_model(model_dir)
    library = predict(net, [phantom, xray], LABELS.split(","))
    with open_index(index) as opened:
        drafts = [draft_report(opened, net, image, k=5, min_similarity=-1).to_dict() for image in (phantom, xray)]
    for draft, expected in zip(drafts, library, strict=True):
        assert {key: draft[key] for key in ("ood_score", "out_of_distribution", "ood_threshold")} == \
            pytest.approx({key: expected[key] for key in ("ood_score", "out_of_distribution", "ood_threshold")},
                          abs=1e-3)
    assert [draft["out_of_distribution"] for draft in drafts] == [False, True] and "ood" not in drafts[1]
    result, output = invoke("report", "draft", xray, "--model", model_dir, "--index", index, "-k", 5,
                            "--json", tmp_path / "draft.json")
    assert result.exit_code == 0, output
    assert "out of distribution (OOD score" in output and "this draft are unreliable" in output
    assert json.loads((tmp_path / "draft.json").read_text())["out_of_distribution"] is True
    explained = [explain_image(net, image, labels=LABELS.split(","), methods=["patch_text"])
                 for image in (phantom, xray)]
    assert [e["out_of_distribution"] for e in explained] == [False, True]
    result, output = invoke("explain", xray, "--model", model_dir, "--labels", LABELS, "--method", "patch_text")
    assert result.exit_code == 0 and "this explanation is unreliable" in output, output


def test_an_explanations_overlays_carry_the_ood_and_blank_flags(guarded, phantom_dir, shared_data, tmp_path):
    """The overlay PNGs are what a reader opens, forwards or pastes into a report: their title was only the finding,
    method and probability, so a heatmap of an image the guard flags, or of a blank one, looked like a trusted one.
    The flag is stamped above the title (in red) and so in the PNG's Title text; an unflagged image's is as before."""
    from PIL import Image

    from medvl.models.ood import ood_comparison

    model_dir, _ = guarded
    xray = sorted((shared_data / "figure1-covid-cxr" / "images").iterdir())[0]
    blank = tmp_path / "blank.png"
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(blank)
    cases = ((load_split(phantom_dir, "test")[0].image, None), (xray, "OUT OF DISTRIBUTION"),
             (blank, "BLANK AS THE MODEL SEES IT"))
    for image, flag in cases:
        out = tmp_path / f"why-{image.stem}"
        result, output = invoke("explain", image, "--model", model_dir, "--labels", LABELS, "--method", "patch_text",
                                "--out", out)
        assert result.exit_code == 0, output
        explanation = json.loads((out / "explanation.json").read_text())
        [finding] = explanation["findings"]
        with Image.open(out / finding["heatmaps"]["patch_text"]["file"]) as png:
            title = png.text["Title"]
        plain = f"{finding['finding']} (patch_text, p={finding['probability']:.2f})"
        if flag is None:
            assert title == plain and not explanation["out_of_distribution"] and not explanation["input_flags"]
            continue
        assert title.endswith(f"\n{plain}") and flag in title, (image.name, title)
        if explanation["out_of_distribution"]:
            assert f"OUT OF DISTRIBUTION ({ood_comparison(explanation)})" in title, title


def test_the_ood_message_prints_the_score_above_the_threshold(guarded, phantom_dir, shared_data, tmp_path):
    """Both numbers were printed with 3 significant figures: "OOD score 10.8 > 10.8" for 10.7971 and 10.7507."""
    from medvl.models.ood import ood_comparison

    assert ood_comparison({"ood_score": 10.7971, "ood_threshold": 10.7507}) == "OOD score 10.80 > 10.75"
    assert ood_comparison({"ood_score": 12.8237, "ood_threshold": 10.7507}) == "OOD score 12.8 > 10.8"
    assert ood_comparison({"ood_score": 10.75074, "ood_threshold": 10.7507}).endswith("by less than 0.0001")
    model_dir, _ = guarded
    xray = sorted((shared_data / "figure1-covid-cxr" / "images").iterdir())[0]
    near = tmp_path / "model"
    shutil.copytree(model_dir, near)
    net = load_model(near)
    score = predict(near, [xray], LABELS.split(","))[0]["ood_score"]
    net.ood.threshold = score - 0.04  # the same first three figures as the score
    (near / OOD_FILE).unlink()
    net.ood.save(near)
    result, output = invoke("predict", xray, "--model", near, "--labels", LABELS)
    assert result.exit_code == 0, output
    [(shown_score, shown_threshold)] = re.findall(r"OOD score ([\d.]+) > ([\d.]+)\)", " ".join(output.split()))
    assert float(shown_score) > float(shown_threshold), output


def test_a_flagged_share_is_tested_against_the_share_the_guard_flags_by_design():
    """bench run's ood check flagged any share above a fixed 5 %: a guard at quantile 0.8 (19.5 % expected) flagged
    its own distribution, and a guard at 0.999 missed a rise to 4 %. One-sided exact binomial test instead."""
    from scipy.stats import binomtest

    from medvl.eval.ood import flagged_excess
    from medvl.models.ood import OODGuard

    def guard(info):
        return OODGuard(mean=torch.zeros(4), precision=torch.eye(4), threshold=1.0, info=info)

    low = guard({"quantile": 0.8, "expected_flagged_share": 0.1951})  # no calibration size recorded: binomial
    assert flagged_excess(low, 14, 80) == {"expected_flagged_share": 0.1951, "shifted": False, "test": "binomial",
                                           "p_value": pytest.approx(binomtest(14, 80, 0.1951, "greater").pvalue)}
    assert flagged_excess(low, 30, 80)["shifted"] is True
    high = guard({"quantile": 0.999})  # fitted before the expected share was recorded: 1 - quantile
    assert flagged_excess(high, 3, 80)["expected_flagged_share"] == 0.001 and flagged_excess(high, 3, 80)["shifted"]
    assert flagged_excess(high, 0, 80)["p_value"] == 1.0 and not flagged_excess(high, 0, 0)["shifted"]


def test_the_flagged_share_test_allows_for_the_threshold_drawn_from_the_calibration_split():
    """The guard's threshold is the k-th of its calibration scores, so its in-distribution flagged share is itself
    random (Beta(n_cal + 1 - k, k)): a binomial at the expected share flagged about one in-distribution split in seven
    at a stated 1 % (probe of this change). Simulated with the project's own conformal_threshold, no shift: flagged
    at about the stated level."""
    from scipy.stats import betabinom

    from medvl.eval.ood import conformal_threshold, flagged_excess
    from medvl.models.ood import OODGuard

    rng = np.random.default_rng(0)
    alarms, runs = 0, 400
    for _ in range(runs):
        threshold, expected = conformal_threshold(rng.standard_normal(100), 0.99)
        guard = OODGuard(mean=torch.zeros(4), precision=torch.eye(4), threshold=threshold,
                         info={"quantile": 0.99, "calibration_images": 100, "expected_flagged_share": expected})
        alarms += flagged_excess(guard, int((rng.standard_normal(1000) > threshold).sum()), 1000)["shifted"]
    assert alarms / runs <= 0.025  # the binomial's rate here: about 0.15
    excess = flagged_excess(guard, 30, 1000)
    assert excess["test"] == "beta-binomial"
    assert excess["p_value"] == pytest.approx(betabinom.sf(29, 1000, 1, 100))  # k = ceil(101 * 0.99) = 100
