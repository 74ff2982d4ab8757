"""Explanations: grounding metrics by hand, heatmaps of a tiny trained model, concept bottlenecks, medvl explain."""

import csv
import json
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

import medvl
from cli_helpers import invoke
from medvl.data import captions_for
from medvl.errors import DataError, InputError
from medvl.explain import grounding
from medvl.explain.concepts import (
    ConceptBottleneck,
    compare_with_probe,
    concept_embeddings,
    fit_bottleneck,
    l1_logistic_regression,
    load_concepts,
    read_concepts,
)
from medvl.explain.heatmaps import gradcam_map, patch_text_map, resize_map
from medvl.train.loop import TrainConfig

# -- grounding metrics against hand-computed values ------------------------------------------------


def test_pointing_game_by_hand():
    heatmap = np.zeros((5, 5))
    heatmap[1, 3] = 2.0
    assert grounding.peak(heatmap) == (1, 3)
    assert grounding.pointing_hit(heatmap, grounding.box_mask([3, 1, 4, 2], heatmap.shape))  # the one pixel (1, 3)
    left = grounding.box_mask([0, 0, 3, 5], heatmap.shape)  # columns 0-2
    assert not grounding.pointing_hit(heatmap, left)
    assert grounding.pointing_hit(heatmap, left, tolerance=1.0)  # (1, 2) is one pixel away
    assert not grounding.pointing_hit(heatmap, grounding.box_mask([0, 3, 2, 5], heatmap.shape), tolerance=2.0)
    # nearest pixel of that box is (3, 1): sqrt(4 + 4) = 2.83 > 2
    assert grounding.pointing_hit(heatmap, grounding.box_mask([0, 3, 2, 5], heatmap.shape), tolerance=2.9)
    assert grounding.peak(np.ones((3, 3))) is None  # a constant map has no peak


def test_the_peak_is_the_centre_of_a_flat_maximum_whatever_the_rounding():
    """A 2 x 2 token map upsampled to 64 px has a 16 x 16 px plateau at its strongest (border) cell: the peak is its
    centre, not its top-left corner, and noise at float rounding's size inside it (which depends on how many images
    shared the forward pass) does not move it."""
    tokens = np.array([[0.1, 0.2], [0.9, 0.3]], dtype=np.float32)  # the strongest token: bottom left
    heatmap = resize_map(tokens, (64, 64))
    plateau = heatmap >= heatmap.max()
    assert plateau.sum() == 256 and plateau[48:, :16].all()  # rows 48-63, columns 0-15
    assert grounding.peak(heatmap) == (55, 7)  # nearest the plateau's centroid (55.5, 7.5); first of the four
    rng = np.random.default_rng(0)
    for _ in range(5):
        noisy = heatmap.copy()
        noisy[plateau] *= 1 + rng.uniform(-2e-7, 2e-7, size=int(plateau.sum())).astype(np.float32)
        assert grounding.peak(noisy) == (55, 7)
    corner = grounding.box_mask([0, 48, 3, 51], heatmap.shape)  # the plateau's top-left corner only
    centre = grounding.box_mask([4, 52, 12, 60], heatmap.shape)  # its middle
    assert not grounding.pointing_hit(heatmap, corner) and grounding.pointing_hit(heatmap, centre)
    interior = np.zeros((6, 6))
    interior[2:4, 2:4] = 1.0  # an exact 2 x 2 tie: its first pixel in row-major order
    assert grounding.peak(interior) == (2, 2)
    apart = np.zeros((5, 9))
    apart[2, 0] = apart[2, 8] = apart[2, 5] = 1.0  # separate maxima: the one nearest their centroid (2, 4.33)
    assert grounding.peak(apart) == (2, 5)


def test_a_constant_map_points_nowhere():
    flat = np.zeros((64, 64))
    assert not grounding.pointing_hit(flat, grounding.box_mask([0, 0, 5, 5], flat.shape))
    assert not grounding.pointing_hit(flat, grounding.box_mask([10, 10, 20, 20], flat.shape), tolerance=15)
    assert not grounding.pointing_hit(np.full((8, 8), 0.3), np.ones((8, 8), bool), tolerance=2)


def test_energy_iou_dice_by_hand():
    heatmap = np.array([[0.0, 1.0], [2.0, 3.0]])  # normalised: 0, 1/3, 2/3, 1 (sum 2)
    top_row = np.array([[True, True], [False, False]])
    assert grounding.energy_in(heatmap, top_row) == pytest.approx((1 / 3) / 2)
    predicted = np.zeros((4, 4), bool)
    predicted[0, :] = True  # 4 pixels
    truth = np.zeros((4, 4), bool)
    truth[0, 2:] = truth[1, :] = True  # 6 pixels, 2 shared
    assert grounding.iou(predicted, truth) == pytest.approx(2 / 8)
    assert grounding.dice(predicted, truth) == pytest.approx(4 / 10)
    assert grounding.iou(np.zeros((2, 2), bool), np.zeros((2, 2), bool)) == 1.0


def test_region_scores_thresholds_by_hand():
    heatmap = np.array([[0.0, 1.0, 2.0, 3.0]])  # normalised 0, 1/3, 2/3, 1
    mask = np.array([[False, True, True, False]])
    scores = grounding.region_scores(heatmap, mask, [1, 0, 3, 1], thresholds=(0.5, 0.25))
    # >= 0.5: columns 2, 3 -> 1 shared of 3 in the union; >= 0.25: columns 1-3 -> 2 of 3
    assert scores["iou@0.5"] == pytest.approx(1 / 3) and scores["dice@0.5"] == pytest.approx(0.5)
    assert scores["iou@0.25"] == pytest.approx(2 / 3) and scores["dice@0.25"] == pytest.approx(0.8)
    assert scores["pointing_box"] == 0.0 and scores["pointing_mask"] == 0.0  # the peak is column 3
    assert scores["energy_box"] == pytest.approx((1 / 3 + 2 / 3) / 2)


def test_baselines_and_summary():
    prior = grounding.centre_prior((9, 7))
    assert grounding.peak(prior) == (4, 3) and prior[4, 3] == pytest.approx(1.0)
    a = grounding.random_map((4, 4), np.random.default_rng(1))
    b = grounding.random_map((4, 4), np.random.default_rng(1))
    assert np.array_equal(a, b) and 0 <= a.min() and a.max() < 1
    rows = [{"id": "1", "finding": "x", "method": "m", "pointing_box": 1.0},
            {"id": "2", "finding": "x", "method": "m", "pointing_box": 0.0},
            {"id": "3", "finding": "y", "method": "m", "pointing_box": 1.0}]
    summary = grounding.summarise(rows)
    assert summary["x"] == {"n": 2, "m": {"pointing_box": 0.5}}
    assert summary["all"]["m"]["pointing_box"] == pytest.approx(2 / 3) and summary["all"]["n"] == 3
    table = {"x": {"gradcam": {"pointing_box": 0.6}, "random": {"pointing_box": 0.1}, "centre": {"pointing_box": 0.6}}}
    assert grounding.beats_baselines(table, ["gradcam"]) == {"x": False}  # a tie does not beat
    with pytest.raises(InputError, match="box"):
        grounding.box_mask([3, 0, 3, 2], (4, 4))


def test_boxes_outside_the_image_and_empty_masks_are_refused():
    with pytest.raises(InputError, match=r"reaches outside the image of 64 x 32 pixels"):
        grounding.box_mask([60, 0, 70, 5], (32, 64))  # used to be clipped silently to columns 60-63
    with pytest.raises(InputError, match="outside"):
        grounding.box_mask([0, 30, 4, 33], (32, 64))
    assert grounding.box_mask([60, 28, 64, 32], (32, 64)).sum() == 16  # flush with the far edges: inside
    flat, empty = np.zeros((8, 8)), np.zeros((8, 8), bool)
    with pytest.raises(InputError, match="mask is empty"):  # IoU / Dice of an empty prediction would be 1
        grounding.region_scores(flat, empty, [0, 0, 2, 2])


def _phantom_case(phantom_dir, folder, finding="pneumothorax"):
    """One phantom case with ``finding`` copied into ``folder`` (images/ and masks/), as a record."""
    import shutil

    from medvl.data.record import Record

    with open(phantom_dir / "manifest.csv", newline="") as handle:
        row = next(r for r in csv.DictReader(handle) if r["finding"] == finding and r["boxes"])
    image = folder / row["image"]
    mask = folder / "masks" / f"{image.stem}_{finding}.png"
    for source, target in ((phantom_dir / row["image"], image), (phantom_dir / "masks" / mask.name, mask)):
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, target)
    record = Record(id=row["image"], images=[image], labels={"finding": finding, "boxes": row["boxes"]})
    return record, mask, json.loads(row["boxes"])[finding]


def test_phantom_truth_refuses_an_empty_mask_and_a_box_outside_it(phantom_dir, tmp_path):
    from PIL import Image

    record, mask_path, box = _phantom_case(phantom_dir, tmp_path)
    mask, found = grounding.phantom_truth(record, "pneumothorax")
    assert found == box and mask.any() and mask.shape == (64, 64)
    assert grounding.phantom_truth(record, "nodule") is None  # no box for it: not scored
    outside = {**record.labels, "boxes": json.dumps({"pneumothorax": [box[0], box[1], 70, box[3]]})}
    with pytest.raises(DataError, match=r"box \[.*70.*\] of 'pneumothorax' .* inside the mask's 64 x 64 pixels"):
        grounding.phantom_truth(type(record)(id=record.id, images=record.images, labels=outside), "pneumothorax")
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(mask_path)  # a damaged mask: no pixel set
    with pytest.raises(DataError, match="mask of 'pneumothorax' is empty") as refused:
        grounding.phantom_truth(record, "pneumothorax")
    assert str(mask_path) in str(refused.value)


@pytest.fixture(scope="module")
def ct_phantom(tmp_path_factory):
    from medvl.data.phantom import generate_phantom

    folder = tmp_path_factory.mktemp("ct-phantom") / "ct"
    generate_phantom(folder, n=6, seed=0, size=32, kind="ct3d")
    return folder


def test_explain_refuses_a_volume_model_before_it_reads_the_concept_data(ct_phantom, tmp_path):
    """A 3D model was refused only after the concept bottleneck was fitted on --concept-data (the slow step): its
    data was read and checked first, so a dataset without labels gave that error instead of the real one."""
    torch.manual_seed(0)
    medvl.create_model("ct3d-tiny").save_pretrained(tmp_path / "ct-model")
    unlabelled = tmp_path / "unlabelled"
    unlabelled.mkdir()
    (unlabelled / "labels.csv").write_text("image,report\nct_00000.nii.gz,A scan.\n", encoding="utf-8")
    volume = next(ct_phantom.glob("**/ct_00000.nii.gz"))
    (unlabelled / volume.name).write_bytes(volume.read_bytes())
    result, output = invoke("explain", volume, "--model", tmp_path / "ct-model", "--concept-data", unlabelled)
    assert result.exit_code == 2, output
    assert "heatmaps are for 2D images; this model's image encoder is a 3D" in output, output


def test_grounding_is_for_2d_models_and_refuses_3d_masks(ct_phantom, tiny_model):
    """A 3D model is refused for what it is before any mask is looked for (it used to be a wrong "mask not found":
    the mask name was built from 'ct_00000.nii' + '.png'); a 2D model on the CT phantom is told 3D masks are not
    supported."""
    from medvl.errors import ModelError

    data = medvl.load_dataset(ct_phantom)
    torch.manual_seed(0)
    with pytest.raises(ModelError, match="heatmaps are for 2D images; this model's image encoder is a 3D"):
        grounding.evaluate_grounding(medvl.create_model("ct3d-tiny"), data, methods=["patch_text"])
    with pytest.raises(DataError, match=r"ct_00000_pleural_effusion\.nii\.gz: a 3D mask: grounding scores 2D images"):
        grounding.evaluate_grounding(tiny_model, data, methods=["patch_text"])


# -- a tiny model trained a few steps on real phantom files -----------------------------------------


@pytest.fixture(scope="module")
def tiny_model(phantom_dir, tmp_path_factory):
    """phantom-tiny without the stem max-pool (a 4 x 4 token grid at 64 px), trained 2 epochs."""
    dataset = medvl.load_dataset(phantom_dir)
    out = tmp_path_factory.mktemp("explain") / "run"
    torch.manual_seed(0)
    model = medvl.create_model("phantom-tiny", **{"image.no_max_pool": True})
    medvl.train(model, dataset.select("train"), TrainConfig(epochs=2, batch_size=32, seed=0), out,
                captions=captions_for(dataset), show_progress=False)
    return medvl.load_model(out)


@pytest.fixture(scope="module")
def class_texts(tiny_model):
    from medvl.embed import class_embeddings
    from medvl.predict import class_prompts

    classes = ["no_finding", "cardiomegaly", "pleural_effusion", "nodule", "consolidation", "pneumothorax"]
    return classes, class_embeddings(tiny_model, class_prompts(tiny_model, classes, "finding")[1])


def _pixels(model, phantom_dir, count=3):
    files = sorted((phantom_dir / "images").glob("*.png"))[:count]
    return model.preprocessor.load_many(files)


def test_patch_text_peak_lies_in_the_best_token_cell(tiny_model, phantom_dir, class_texts):
    _, texts = class_texts
    pixels = _pixels(tiny_model, phantom_dir)
    maps = patch_text_map(tiny_model, pixels, texts, target=1)
    assert maps.shape == (3, 64, 64) and torch.isfinite(maps).all()
    with torch.no_grad():  # the same similarity by hand, on the 4 x 4 token grid
        tokens = tiny_model.image_encoder.tokens(tiny_model.preprocessor.normalize(pixels))
        projected = torch.nn.functional.normalize(tiny_model.image_projection(tokens), dim=-1)
        cells = (projected @ (texts[1] - texts.mean(0))).view(3, 4, 4)
    for image in range(3):
        row, col = grounding.peak(maps[image].numpy())
        best = int(cells[image].argmax())
        assert (row // 16, col // 16) == divmod(best, 4)
        assert float(maps[image].max()) <= float(cells[image].max()) + 1e-5  # bilinear: no overshoot


def test_gradcam_matches_a_hand_computed_grad_cam(tiny_model, phantom_dir, class_texts):
    _, texts = class_texts
    pixels = _pixels(tiny_model, phantom_dir, count=2)
    maps = gradcam_map(tiny_model, pixels, texts, target=2)
    saved = {}
    layer = tiny_model.image_encoder.backbone.layer4
    handle = layer.register_forward_hook(lambda module, inputs, output: saved.setdefault("a", output))
    try:
        normalised = tiny_model.preprocessor.normalize(pixels)
        embeddings = tiny_model.embed_image_features(tiny_model.image_encoder(normalised))
        logits = tiny_model.logit_scale.detach().clamp(max=4.6052).exp() * embeddings @ texts.t()
        activations = saved["a"]
        gradients = torch.autograd.grad(logits[:, 2].sum(), activations)[0]
    finally:
        handle.remove()
    weights = gradients.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * activations).sum(1, keepdim=True)).detach()
    expected = torch.nn.functional.interpolate(cam, size=(64, 64), mode="bilinear", align_corners=False)[:, 0]
    assert maps.shape == (2, 64, 64)
    assert torch.allclose(maps, expected, atol=1e-5)
    assert resize_map(maps[0].numpy(), (128, 96)).shape == (128, 96)


def test_grounding_on_phantom_boxes_and_masks(tiny_model, phantom_dir):
    test_set = medvl.load_dataset(phantom_dir).select("test")
    result = grounding.evaluate_grounding(tiny_model, test_set, methods=["patch_text", "gradcam"], seed=0)
    with open(phantom_dir / "manifest.csv", newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["split"] == "test" and r["boxes"]]
    boxes = [json.loads(r["boxes"])[r["finding"]] for r in rows]
    assert result["n"] == len(rows) == result["per_finding"]["all"]["n"]
    centre_hits = [x0 <= 31 < x1 and y0 <= 31 < y1 for x0, y0, x1, y1 in boxes]  # the prior peaks at (31, 31)
    assert result["per_finding"]["all"]["centre"]["pointing_box"] == pytest.approx(np.mean(centre_hits))
    for finding, row in result["per_finding"].items():
        assert finding in {"all", "cardiomegaly", "pleural_effusion", "nodule", "consolidation", "pneumothorax"}
        for method in ("patch_text", "gradcam", "random", "centre"):
            assert set(row[method]) >= {"pointing_box", "pointing_mask", "energy_box", "iou@0.5", "dice@0.5"}
            assert all(0.0 <= v <= 1.0 for v in row[method].values())
    with pytest.raises(InputError, match="thresholds"):
        grounding.evaluate_grounding(tiny_model, test_set, thresholds=(0.0,))


def test_grounding_does_not_depend_on_the_batch_size(tiny_model, phantom_dir):
    """The same model, data and seed give the same pointing game whatever the batch: the peak is the centre of the
    flat maxima of upsampled token maps, not the corner float rounding picks (which changes with the batch)."""
    test_set = medvl.load_dataset(phantom_dir).select("test")
    results = [grounding.evaluate_grounding(tiny_model, test_set, methods=["patch_text", "gradcam"],
                                            thresholds=(0.5,), batch_size=size)["per_finding"] for size in (1, 5, 16)]
    for other in results[1:]:
        for finding, row in results[0].items():
            for method in ("patch_text", "gradcam"):
                for score in ("pointing_box", "pointing_mask"):
                    assert other[finding][method][score] == row[method][score], (finding, method, score)
                assert other[finding][method] == pytest.approx(row[method], abs=1e-5)


# -- concept bottleneck -----------------------------------------------------------------------------


def test_concept_files(tmp_path):
    assert len(load_concepts("chest_xray").concepts) >= 10 and len(load_concepts("dermoscopy").concepts) >= 10
    path = tmp_path / "bank.txt"
    path.write_text("# comment\nBlue-White  Veil\n\nirregular border\nCT Hyperdense\n")
    assert read_concepts(path) == ["Blue-White Veil", "irregular border", "CT Hyperdense"]  # as written, for display
    assert load_concepts(path).concepts == ["Blue-White Veil", "irregular border", "CT Hyperdense"]
    path.write_text("a\nb\nA\n")
    with pytest.raises(DataError, match="line 3 repeats the concept of line 1"):
        read_concepts(path)
    path.write_text("# nothing\n\n")
    with pytest.raises(DataError, match="empty concept bank"):
        read_concepts(path)
    with pytest.raises(DataError, match="not found"):
        load_concepts(tmp_path / "missing.txt")


def test_concepts_longer_than_the_text_encoder_reads_are_refused_naming_the_line(tiny_model, phantom_dir, tmp_path):
    """Phrases past the text encoder's max_length were cut silently: two concepts differing only past the cut got
    one vector and were credited as two pieces of evidence. The longest the encoder reads in every template fits."""
    train = medvl.load_dataset(phantom_dir).select("train")
    path = tmp_path / "long.txt"
    long = "opacity " * 100
    path.write_text(f"enlarged heart\n\n{long}in the left lung\n{long}in the right lung\n")
    with pytest.raises(DataError, match=r"long\.txt: line 3: the concept phrase is \d+ tokens long in the model's "
                                        r"caption templates; its text encoder reads 94 tokens at most"):
        fit_bottleneck(tiny_model, train, "finding", load_concepts(path))
    encoder = tiny_model.text_encoder
    templates = captions_for(None, None, tiny_model).templates
    words = 1
    while all(encoder.read_length(t.format("opacity " * (words + 1)))[0] <= 94 for t in templates):
        words += 1
    path.write_text(f"enlarged heart\n{'opacity ' * words}\n")
    assert load_concepts(path).lines == [1, 2]
    assert len(concept_embeddings(tiny_model, load_concepts(path))) == 2


def test_concepts_the_text_encoder_reads_as_the_same_tokens_are_refused_naming_both_lines(tiny_model, tmp_path):
    """The tokenizer drops accents: "enlärged heart" is "enlarged heart" to the text encoder, one vector that the
    bottleneck credited as two concepts. The file's own check compares text (ignoring case only), so the token ids
    are compared; phrases the encoder reads apart (a letter more) stay two concepts."""
    from medvl.explain.concepts import ConceptBank

    path = tmp_path / "accents.txt"
    path.write_text("enlarged heart\nlower zone opacity\n# the same to the tokenizer\nenlärged heart\n")
    assert read_concepts(path) == ["enlarged heart", "lower zone opacity", "enlärged heart"]
    with pytest.raises(DataError, match=r"accents\.txt: line 4 reads as the same tokens as line 1 to the model's text "
                                        r"encoder"):
        concept_embeddings(tiny_model, load_concepts(path))
    in_code = ConceptBank("mine", ["pleural efusión", "enlarged heart", "pleural efusion"], "mine.txt")
    with pytest.raises(DataError, match="concept 3 reads as the same tokens as concept 1"):
        concept_embeddings(tiny_model, in_code)
    apart = ConceptBank("mine", ["pleural efusion", "pleural effusion", "enlarged heart"], "mine.txt")
    assert len(concept_embeddings(tiny_model, apart)) == 3


@pytest.mark.parametrize("classes", [None, ["cardiomegaly", "pneumothorax"]])
def test_bottleneck_probabilities_match_scikit_learn(tiny_model, phantom_dir, classes):
    train = medvl.load_dataset(phantom_dir).select("train")
    if classes:
        train = train.subset([r for r in train if r.labels["finding"] in classes])
    bank = load_concepts("chest_xray")
    fitted = fit_bottleneck(tiny_model, train, "finding", bank)
    embeddings = tiny_model.encode_images(tiny_model.preprocessor.load_many([r.image for r in train]))
    scores = fitted.standardised_scores(embeddings)
    y = [fitted.classes.index(r.labels["finding"]) for r in train]
    reference = l1_logistic_regression(0, C=fitted.c).fit(scores, y)
    assert np.allclose(fitted.probabilities(embeddings), reference.predict_proba(scores), atol=1e-6)
    assert fitted.weights.shape == (len(fitted.classes), len(bank.concepts))
    parts = fitted.contributions(embeddings[0], fitted.classes[0], top=3)
    assert [p["contribution"] for p in parts] == sorted((p["contribution"] for p in parts), reverse=True)
    for part in parts:
        assert part["contribution"] == pytest.approx(part["weight"] * part["score"])


def _embeddings_with_scores(model, bank, scores: np.ndarray) -> torch.Tensor:
    """Image embeddings whose concept scores (cosine with each concept's text embedding) are exactly ``scores``:
    the concept vectors (M, D) have full row rank (M <= D), so E = scores @ pinv(V^T) gives E V^T = scores."""
    vectors = concept_embeddings(model, bank).numpy().astype(np.float64)
    return torch.as_tensor(scores @ np.linalg.pinv(vectors.T))


@pytest.fixture(scope="module")
def informative_bottleneck(tiny_model, phantom_dir):
    """A bottleneck fitted on the phantom's train split with concept scores made so that the first six concepts
    each mark one finding (+3 on its images) and the other 17 are noise; also the bank and the scores."""
    train = medvl.load_dataset(phantom_dir).select("train")
    bank = load_concepts("chest_xray")
    classes = train.classes("finding")
    y = np.array([classes.index(r.labels["finding"]) for r in train])
    scores = np.random.default_rng(0).normal(size=(len(y), len(bank.concepts)))
    scores[:, :len(classes)] += 3.0 * np.eye(len(classes))[y]
    fitted = fit_bottleneck(tiny_model, train, "finding", bank,
                            image_embeddings=_embeddings_with_scores(tiny_model, bank, scores))
    return fitted, bank, scores


def test_bottleneck_is_sparse_on_uninformative_concepts(tiny_model, informative_bottleneck):
    """The bottleneck is an L1 fit on every scikit-learn pyproject allows (before 1.8 ``l1_ratio`` alone left the
    default L2 penalty: every concept weighted): the six concepts that mark a finding get a weight, most of the
    17 noise concepts a weight of exactly 0."""
    fitted, bank, scores = informative_bottleneck
    found = len(fitted.classes)
    assert fitted.classes == sorted(fitted.classes) and found == 6
    assert np.allclose(fitted.standardised_scores(_embeddings_with_scores(tiny_model, bank, scores)) * fitted.scale
                       + fitted.mean, scores)
    informative, noise = fitted.weights[:, :found], fitted.weights[:, found:]
    assert all(informative[k, k] > 0 for k in range(found))  # each finding's own concept pushes towards it
    assert np.mean(noise == 0.0) > 0.5, fitted.weights  # exactly zero: L1, not small L2 weights
    assert fitted.nonzero < len(bank.concepts)


def test_concepts_for_a_finding_push_towards_it_and_those_against_come_apart(tiny_model, informative_bottleneck):
    """The concepts given as reasons for a finding all raise it (positive contribution); those that lower it are
    listed apart, most negative first; together they are every concept with a non-zero contribution."""
    fitted, bank, scores = informative_bottleneck
    embedding = _embeddings_with_scores(tiny_model, bank, scores[:1])[0]  # an image of one finding
    standardised = fitted.standardised_scores(embedding[None])[0]
    everything = len(bank.concepts)
    seen_against = 0
    for row, finding in enumerate(fitted.classes):
        towards = fitted.contributions(embedding, finding, top=everything)
        against = fitted.contributions(embedding, finding, top=everything, direction="against")
        assert all(part["contribution"] > 0 for part in towards), (finding, towards)
        assert all(part["contribution"] < 0 for part in against), (finding, against)
        assert [p["contribution"] for p in towards] == sorted((p["contribution"] for p in towards), reverse=True)
        assert [p["contribution"] for p in against] == sorted(p["contribution"] for p in against)
        parts = fitted.weights[row] * standardised
        assert {p["concept"] for p in towards + against} == {bank.concepts[i] for i in np.flatnonzero(parts)}
        assert fitted.contributions(embedding, finding, top=1) == towards[:1]
        seen_against += len(against)
    assert seen_against > 0  # the image's own finding's concept argues against the other findings
    with pytest.raises(InputError, match="direction"):
        fitted.contributions(embedding, fitted.classes[0], direction="towards")


def test_a_bottleneck_that_keeps_no_concept_is_said_to_be_the_class_prior(tiny_model, tiny_model_dir, phantom_dir,
                                                                         tmp_path, caplog):
    """Concept scores that are pure noise: cross-validation keeps a C at which L1 zeroes every weight. Fitting
    or loading such a bottleneck warns that it is the class prior; medvl explain says so and lists no concept."""
    import logging

    train = medvl.load_dataset(phantom_dir).select("train")
    bank = load_concepts("chest_xray")
    noise = np.random.default_rng(0).normal(size=(len(train), len(bank.concepts)))
    with caplog.at_level(logging.WARNING, logger="medvl"):
        fitted = fit_bottleneck(tiny_model, train, "finding", bank,
                                image_embeddings=_embeddings_with_scores(tiny_model, bank, noise))
    assert fitted.nonzero == 0 and not fitted.weights.any()
    assert "the concept bottleneck uses no concept (every weight is 0 at C=0.1): its predictions are the class " \
           "prior" in caplog.text
    probabilities = fitted.probabilities(_embeddings_with_scores(tiny_model, bank, noise[:3]))
    assert np.allclose(probabilities, probabilities[0])  # the same for every image: the prior
    path = fitted.save(tmp_path / "prior.json")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="medvl"):
        ConceptBottleneck.load(path)
    assert f"{path}: the concept bottleneck uses no concept" in caplog.text
    result, output = invoke("explain", _cardiomegaly_image(phantom_dir), "--model", tiny_model_dir, "--bottleneck",
                            path, "--method", "patch_text")
    assert result.exit_code == 0, output
    assert "uses no concept" in " ".join(result.stderr.split()) and "class prior" in " ".join(result.stderr.split())
    assert "no concept pushes towards or against" in result.stdout and "concept '" not in result.stdout


def test_a_damaged_bottleneck_file_is_refused_naming_it(tiny_model, phantom_dir, tmp_path):
    """Shapes that disagree, values that are not finite and a string of concepts are refused when the file is read,
    with the file and the fault named (they used to load, then fail in numpy or print NaN contributions)."""
    import re

    fitted = fit_bottleneck(tiny_model, medvl.load_dataset(phantom_dir).select("train"), "finding",
                            load_concepts("chest_xray"))
    data = fitted.to_dict()
    classes, concepts = fitted.weights.shape
    damaged = {
        "shape": ({"weights": np.ones((classes, 5)).tolist()},
                  f"weights are {classes}x5, expected {classes}x{concepts}"),
        "mean": ({"mean": [0.0] * (concepts - 1)}, f"mean is {concepts - 1}, expected {concepts} for"),
        "vectors": ({"concept_vectors": []}, f"concept vectors are 0, expected {concepts}xD"),
        "nan": ({"weights": [[float("nan")] * concepts] * classes}, "weights are not all finite numbers"),
        "classes": ({"classes": data["classes"][:-1]},
                    f"weights are {classes}x{concepts}, expected {classes - 1}x{concepts}"),
        "string": ({"concepts": "abc"}, "concepts is not a list of names"),
        "scale": ({"scale": [0.0] * concepts}, "scale holds values that are not above 0"),
        # finite, but weight x standardised score overflows: a contribution of -inf on screen, null in the JSON
        "overflow": ({"weights": [[1e308, -1e308] * (concepts // 2) + [0.0] * (concepts % 2)] * classes,
                      "scale": [1e-3] * concepts}, "its weights times the concept scores an image can have overflow"),
        "huge-vectors": ({"concept_vectors": [[1e308] * fitted.concept_vectors.shape[1]] * concepts},
                         "its weights times the concept scores an image can have overflow"),
    }
    for name, (change, problem) in damaged.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({**data, **change}))
        with pytest.raises(DataError, match=re.escape(f"{path}: not a concept bottleneck file ({problem}")):
            ConceptBottleneck.load(path)
    text = json.dumps(data)  # a key given twice: json would keep the second value without a word
    (twice := tmp_path / "twice.json").write_text(text[:-1] + ', "c": 5.0}')
    with pytest.raises(DataError, match=re.escape(f"{twice}: not a concept bottleneck file (the key 'c' is given "
                                                  "twice)")):
        ConceptBottleneck.load(twice)
    (deep := tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(DataError, match=re.escape(f"{deep}: not a concept bottleneck file (JSON nested too deeply)")):
        ConceptBottleneck.load(deep)
    (deep := tmp_path / "deep600.json").write_text("[" * 600 + "]" * 600)  # json reads it; the walk ran out of stack
    with pytest.raises(DataError, match=re.escape(f"{deep}: nested too deeply (more than 100 levels")):
        ConceptBottleneck.load(deep)
    loaded = ConceptBottleneck.load(fitted.save(tmp_path / "good.json"))
    assert loaded.problem() is None and np.array_equal(loaded.weights, fitted.weights)
    (bom := tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + (tmp_path / "good.json").read_bytes())
    assert np.array_equal(ConceptBottleneck.load(bom).weights, fitted.weights)  # a BOM is read past, as elsewhere


def test_bottleneck_beside_the_probe(tiny_model, phantom_dir):
    data = medvl.load_dataset(phantom_dir)
    result = compare_with_probe(tiny_model, data.select("train"), data.select("test"), "finding",
                                load_concepts("chest_xray"))
    assert result["n_test"] == len(data.select("test"))
    assert result["concepts"] == len(load_concepts("chest_xray").concepts)
    assert 0 < result["nonzero_concepts"] <= result["concepts"]
    for side in ("bottleneck", "probe"):
        assert 0.0 <= result[side]["accuracy"] <= 1.0


# -- medvl explain ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model_dir(tiny_model, tmp_path_factory):
    return tiny_model.save_pretrained(tmp_path_factory.mktemp("explain-model") / "model")


def _cardiomegaly_image(phantom_dir):
    with open(phantom_dir / "manifest.csv", newline="") as handle:
        row = next(r for r in csv.DictReader(handle) if r["finding"] == "cardiomegaly")
    return phantom_dir / row["image"]


def test_explain_command_writes_overlays_concepts_and_neighbours(tiny_model_dir, phantom_dir, tmp_path):
    from PIL import Image

    from medvl.index import build_index

    image = _cardiomegaly_image(phantom_dir)
    build_index(medvl.load_model(tiny_model_dir), medvl.load_dataset(phantom_dir), tmp_path / "idx",
                model_dir=tiny_model_dir, show_progress=False)
    result, output = invoke("explain", image, "--model", tiny_model_dir, "--out", tmp_path / "out", "--top", 2,
                            "--concepts", "chest_xray", "--concept-data", phantom_dir, "--index", tmp_path / "idx",
                            "--k", 3)
    assert result.exit_code == 0, output
    explanation = json.loads((tmp_path / "out" / "explanation.json").read_text())
    assert sum(explanation["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert len(explanation["findings"]) == 2
    assert explanation["map_shape"] == list(Image.open(image).size[::-1])  # peaks are on the image's own grid
    ranked = sorted(explanation["probabilities"], key=explanation["probabilities"].get, reverse=True)
    assert [f["finding"] for f in explanation["findings"]] == ranked[:2]
    for finding in explanation["findings"]:
        for method in ("patch_text", "gradcam"):
            overlay = tmp_path / "out" / finding["heatmaps"][method]["file"]
            with Image.open(overlay) as png:
                assert png.format == "PNG" and png.size[0] > 100
            peak = finding["heatmaps"][method]["peak"]  # None: a constant map (Grad-CAM, no positive evidence)
            assert peak is None or (0 <= peak[0] < 64 and 0 <= peak[1] < 64)
    saved = ConceptBottleneck.load(tmp_path / "out" / "bottleneck.json")
    embedding = medvl.load_model(tiny_model_dir).encode_images([image])[0]
    for finding in explanation["findings"]:  # the concepts printed are the saved bottleneck's, recomputed
        for key, direction, top in (("concepts", "for", 5), ("concepts_against", "against", 2)):
            expected = saved.contributions(embedding, finding["finding"], top=top, direction=direction)
            assert [c["concept"] for c in finding[key]] == [c["concept"] for c in expected]
            assert [c["contribution"] for c in finding[key]] == pytest.approx([c["contribution"] for c in expected],
                                                                              abs=1e-5)
        assert all(c["contribution"] > 0 for c in finding["concepts"])
        assert all(c["contribution"] < 0 for c in finding["concepts_against"])
    assert saved.nonzero > 0
    neighbours = explanation["neighbours"]  # the image itself is indexed: left out (it was its own nearest), named
    assert len(neighbours) == 3 and "images/" + image.stem not in [hit["id"] for hit in neighbours]
    assert explanation["left_out_copies"] == ["images/" + image.stem]
    assert f"the image is indexed as images/{image.stem}: left out of the nearest cases" in " ".join(output.split())
    again, output = invoke("explain", image, "--model", tiny_model_dir, "--top", 2,
                           "--bottleneck", tmp_path / "out" / "bottleneck.json")
    assert again.exit_code == 0, output
    for part in explanation["findings"][0]["concepts"]:
        assert f"concept {part['concept']!r} (for): weight {part['weight']:+.3f}" in output
    for part in explanation["findings"][0]["concepts_against"]:
        assert f"concept {part['concept']!r} (against): weight {part['weight']:+.3f}" in output
    if not explanation["findings"][0]["concepts"]:
        assert "no concept pushes towards" in output
    assert saved.classes == sorted(explanation["probabilities"])
    refused, output = invoke("explain", image, "--model", tiny_model_dir, "--out", tmp_path / "out")
    assert refused.exit_code == 2
    assert "explanation.json: --out file exists (use --overwrite to replace it)" in output


def test_overwrite_replaces_the_earlier_explanation_s_overlays_and_keeps_other_files(tiny_model_dir, phantom_dir,
                                                                                    tmp_path):
    """Three overlays, then one with --overwrite: the two the new explanation does not list go with the old
    explanation.json; a file it never listed stays."""
    image, out = _cardiomegaly_image(phantom_dir), tmp_path / "ex"
    result, output = invoke("explain", image, "--model", tiny_model_dir, "--out", out, "--method", "patch_text",
                            "--top", 3)
    assert result.exit_code == 0, output
    first = json.loads((out / "explanation.json").read_text())
    assert len({f["heatmaps"]["patch_text"]["file"] for f in first["findings"]}) == 3
    (out / "notes.png").write_bytes(b"kept")
    result, output = invoke("explain", image, "--model", tiny_model_dir, "--out", out, "--method", "patch_text",
                            "--top", 1, "--overwrite")
    assert result.exit_code == 0, output
    [finding] = json.loads((out / "explanation.json").read_text())["findings"]
    assert sorted(p.name for p in out.iterdir()) == sorted(["explanation.json", "notes.png",
                                                            finding["heatmaps"]["patch_text"]["file"]])


def test_overwrite_without_concepts_removes_the_earlier_bottleneck_and_keeps_the_one_read(tiny_model_dir,
                                                                                          phantom_dir, tmp_path):
    """A run with --concept-data saves OUT/bottleneck.json; a run --overwrite into that folder without it left that
    file beside an explanation without concepts (a reader, or serve --bottleneck, took it for this run's). It goes
    with the replaced explanation; the bottleneck a run reads from OUT (--bottleneck OUT/bottleneck.json) stays,
    also one from before fingerprints were kept (no "model") or with a key a user added (it was compared as text
    with the loaded bottleneck, which always has "model", and deleted after the run that used it)."""
    image, out = _cardiomegaly_image(phantom_dir), tmp_path / "ex"
    fit = ["--concepts", "chest_xray", "--concept-data", phantom_dir]
    result, output = invoke("explain", image, "--model", tiny_model_dir, "--out", out, "--method", "patch_text", *fit)
    assert result.exit_code == 0 and (out / "bottleneck.json").is_file(), output
    written = json.loads((out / "bottleneck.json").read_text())
    older = {key: value for key, value in written.items() if key != "model"}
    for bottleneck in (written, {**older, "note": "fitted on the June export"}):  # as written, then edited
        (out / "bottleneck.json").write_text(json.dumps(bottleneck))
        saved = (out / "bottleneck.json").read_bytes()
        result, output = invoke("explain", image, "--model", tiny_model_dir, "--out", out, "--method", "patch_text",
                                "--bottleneck", out / "bottleneck.json", "--overwrite")
        assert result.exit_code == 0, output
        assert (out / "bottleneck.json").read_bytes() == saved
        assert "concepts" in json.loads((out / "explanation.json").read_text())["findings"][0]
    result, output = invoke("explain", image, "--model", tiny_model_dir, "--out", out, "--method", "patch_text",
                            "--overwrite")
    assert result.exit_code == 0, output
    [finding] = json.loads((out / "explanation.json").read_text())["findings"]
    assert "concepts" not in finding
    overlay = finding["heatmaps"]["patch_text"]["file"]
    assert sorted(p.name for p in out.iterdir()) == sorted(["explanation.json", overlay])


def test_explain_refuses_an_existing_explanation_before_fitting_concepts(tiny_model_dir, phantom_dir, tmp_path):
    out = tmp_path / "why"
    out.mkdir()
    (out / "explanation.json").write_text("{}")
    refused, output = invoke("explain", _cardiomegaly_image(phantom_dir), "--model", tiny_model_dir, "--out", out,
                             "--concepts", "chest_xray", "--concept-data", phantom_dir)
    assert refused.exit_code == 2
    assert "explanation.json: --out file exists (use --overwrite to replace it)" in output
    assert sorted(p.name for p in out.iterdir()) == ["explanation.json"]  # no bottleneck.json left behind


@pytest.mark.parametrize("case", ["unknown label column", "corrupt image", "missing concept file",
                                  "empty concept bank", "unknown concept label", "concept too long",
                                  "concepts read alike"])
def test_explain_bad_input_is_one_line_and_exit_2(tiny_model_dir, phantom_dir, tmp_path, case):
    image = _cardiomegaly_image(phantom_dir)
    args = ["explain", image, "--model", tiny_model_dir]
    named = {"unknown label column": "'findings'", "corrupt image": str(tmp_path / "broken.png"),
             "missing concept file": str(tmp_path / "nowhere.txt"), "empty concept bank": str(tmp_path / "empty.txt"),
             "unknown concept label": "'diagnosis'",
             "concept too long": f"{tmp_path / 'long.txt'}: line 2: the concept phrase is",
             "concepts read alike": f"{tmp_path / 'alike.txt'}: line 2 reads as the same tokens as line 1"}
    if case == "unknown label column":
        args += ["--labels", "cardiomegaly,fracture", "--label-column", "findings"]
    elif case == "corrupt image":
        (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a picture")
        args[1] = tmp_path / "broken.png"
    elif case == "missing concept file":
        args += ["--concepts", tmp_path / "nowhere.txt", "--concept-data", phantom_dir]
    elif case == "unknown concept label":
        args += ["--concepts", "chest_xray", "--concept-data", phantom_dir, "--concept-label", "diagnosis"]
    elif case == "concept too long":
        (tmp_path / "long.txt").write_text("# a phrase past the text encoder's tokens\n" + "opacity " * 100 + "left\n")
        args += ["--concepts", tmp_path / "long.txt", "--concept-data", phantom_dir]
    elif case == "concepts read alike":
        (tmp_path / "alike.txt").write_text("pleural efusion\npleural efusión\n")
        args += ["--concepts", tmp_path / "alike.txt", "--concept-data", phantom_dir]
    else:
        (tmp_path / "empty.txt").write_text("# only a comment\n")
        args += ["--concepts", tmp_path / "empty.txt", "--concept-data", phantom_dir]
    result, output = invoke(*args)
    assert result.exit_code == 2, output
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]  # (INFO logs go there too)
    assert len(lines) == 1 and named[case] in lines[0], output
    assert "Traceback" not in output


def test_explain_answers_a_class_the_captions_do_not_describe_as_predict_does(tiny_model_dir, phantom_dir,
                                                                               caplog):
    """``predict``'s rule: a class the captions never describe gets the bare class name as its prompts, with a
    warning, and the same probabilities as ``predict``. explain refused it as an unknown label."""
    import logging

    from medvl.explain.explanation import explain_image
    from medvl.predict import predict

    image, labels = _cardiomegaly_image(phantom_dir), ["cardiomegaly", "fracture"]
    model = medvl.load_model(tiny_model_dir)
    with caplog.at_level(logging.WARNING, logger="medvl"):
        explained = explain_image(model, image, labels=labels, methods=["patch_text"], top=2)
    assert caplog.text.count("the prompts are the bare class names") == 1
    [expected] = predict(model, [image], labels)
    assert explained["probabilities"] == pytest.approx(expected["probabilities"], abs=1e-6)
    assert {entry["finding"] for entry in explained["findings"]} == set(labels)
    result, output = invoke("explain", image, "--model", tiny_model_dir, "--labels", "cardiomegaly,fracture",
                            "--method", "patch_text")
    assert result.exit_code == 0 and "patch_text: peak at" in output, output


def test_without_labels_a_bottleneck_explains_the_captions_classes_not_its_label_values(tiny_model, tiny_model_dir,
                                                                                       phantom_dir, tmp_path):
    """--help: "default: every class the model's captions describe". With a concept bottleneck and no --labels the
    bottleneck's classes were explained instead: fitted on the 0/1 column cardiomegaly, the findings "0" and "1" as
    zero-shot classes with bare-name prompts, and concepts of another predictor under them. The default is the
    captions' classes (of the bottleneck's label column when they describe it); a bottleneck that does not predict
    them is refused, naming why; labels given still choose."""
    from medvl.explain.explanation import explain_image

    train = medvl.load_dataset(phantom_dir).select("train")
    cardio = fit_bottleneck(tiny_model, train, "cardiomegaly", load_concepts("chest_xray")).save(tmp_path / "c.json")
    image, out = _cardiomegaly_image(phantom_dir), tmp_path / "why"
    result, output = invoke("explain", image, "--model", tiny_model_dir, "--bottleneck", cardio, "--method",
                            "patch_text", "--out", out)
    message = " ".join(output.split())
    assert result.exit_code == 2 and "the concept bottleneck does not predict no_finding, cardiomegaly" in message
    assert "it knows 0, 1" in message and "fitted on label column 'cardiomegaly'" in message, output
    assert not out.exists() or not any(out.iterdir())
    result, output = invoke("explain", image, "--model", tiny_model_dir, "--bottleneck", cardio, "--labels", "0,1",
                            "--method", "patch_text")
    assert result.exit_code == 0, output
    findings = fit_bottleneck(tiny_model, train, "finding", load_concepts("chest_xray"))
    explained = explain_image(tiny_model, image, methods=["patch_text"], bottleneck=findings)
    described = list(captions_for(None, None, tiny_model).classes["finding"])
    assert explained["label_column"] == "finding" and list(explained["probabilities"]) == described
    assert "concepts" in explained["findings"][0]


def test_explain_refuses_a_damaged_bottleneck_in_one_line(tiny_model_dir, phantom_dir, tmp_path):
    path = tmp_path / "bottleneck.json"
    result, output = invoke("explain", _cardiomegaly_image(phantom_dir), "--model", tiny_model_dir, "--concepts",
                            "chest_xray", "--concept-data", phantom_dir, "--method", "patch_text", "--out", tmp_path)
    assert result.exit_code == 0, output
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "weights": [row[:5] for row in data["weights"]]}))
    result, output = invoke("explain", _cardiomegaly_image(phantom_dir), "--model", tiny_model_dir, "--bottleneck",
                            path, "--method", "patch_text")
    assert result.exit_code == 2 and "Traceback" not in output, output
    assert f"{path}: not a concept bottleneck file (weights are 6x5, expected 6x" in " ".join(output.split())


def test_explain_fits_concepts_on_a_manifest_outside_its_folder_when_allowed(tiny_model_dir, phantom_dir, tmp_path):
    """The refusal of a manifest naming images outside its folder names --allow-outside-root, which explain has
    (it used to answer 'No such option')."""
    from cli_helpers import write_manifest

    with open(phantom_dir / "manifest.csv", newline="") as handle:
        rows = [[str(phantom_dir / r["image"]), r["split"], r["finding"]] for r in csv.DictReader(handle)]
    (tmp_path / "elsewhere").mkdir()
    manifest = write_manifest(tmp_path / "elsewhere" / "manifest.csv", ["image", "split", "finding"], rows)
    args = ["explain", _cardiomegaly_image(phantom_dir), "--model", tiny_model_dir, "--concepts", "chest_xray",
            "--concept-data", manifest, "--concept-label", "finding", "--method", "patch_text"]
    refused, output = invoke(*args)
    assert refused.exit_code == 2 and "--allow-outside-root" in output and "Traceback" not in output, output
    result, output = invoke(*args, "--allow-outside-root", "--out", tmp_path / "why")
    assert result.exit_code == 0, output
    assert ConceptBottleneck.load(tmp_path / "why" / "bottleneck.json").label_column == "finding"


def test_overlay_files_of_two_findings_never_coincide():
    """File-name parts of findings that differ only in what a file name cannot hold stay apart."""
    from medvl.explain.explanation import overlay_paths

    names = ["pleural effusion", "pleural_effusion", "胸腔积液", "心脏肥大", "nodule"]
    paths = overlay_paths(Path("out"), "case.png", names, ["patch_text"])
    assert len(set(paths)) == len(names)
    assert paths[1].name == "case_pleural_effusion_patch_text.png" and paths[4].name == "case_nodule_patch_text.png"


def test_a_bottleneck_of_another_model_or_a_failed_explanation_leaves_nothing(tiny_model_dir, phantom_dir, tmp_path):
    """A bottleneck fitted with other weights (same embedding size) or another config is refused, naming which, not
    read as that model's concept scores; a refusal that comes after the fit (an index of another model, a bad k)
    writes no file."""
    from medvl.index import build_index

    image = _cardiomegaly_image(phantom_dir)
    result, output = invoke("explain", image, "--model", tiny_model_dir, "--out", tmp_path / "first",
                            "--concepts", "chest_xray", "--concept-data", phantom_dir, "--method", "patch_text")
    assert result.exit_code == 0, output
    other = tmp_path / "other"
    torch.manual_seed(5)
    medvl.create_model("phantom-tiny").save_pretrained(other)
    result, output = invoke("explain", image, "--model", other, "--bottleneck", tmp_path / "first" / "bottleneck.json")
    assert result.exit_code == 2 and f"{tmp_path / 'first' / 'bottleneck.json'}: the concept bottleneck was fitted " \
        "with another model" in " ".join(output.split()), output  # the file named: --index may be given too
    from safetensors.torch import load_file, save_file

    turned, reweighted = tmp_path / "turned", tmp_path / "reweighted"  # the message names the part that differs
    for folder in (turned, reweighted):
        shutil.copytree(tiny_model_dir, folder)
    config = json.loads((turned / "config.json").read_text())
    config["image"]["test_time_orientations"] = 2  # the same weights
    (turned / "config.json").write_text(json.dumps(config))
    weights = load_file(reweighted / "model.safetensors")  # the same config
    weights["image_projection.weight"] += 0.01
    save_file(weights, reweighted / "model.safetensors")
    for folder, part in ((turned, "config"), (reweighted, "weights")):
        result, output = invoke("explain", image, "--model", folder, "--bottleneck",
                                tmp_path / "first" / "bottleneck.json", "--method", "patch_text")
        assert result.exit_code == 2 and f"(phantom-tiny, other {part})" in " ".join(output.split()), output
    build_index(medvl.load_model(other), medvl.load_dataset(phantom_dir).select("test"), tmp_path / "idx",
                model_dir=other, show_progress=False)
    for extra in (["--index", tmp_path / "idx"], ["--index", tmp_path / "first" / "missing", "-k", 0]):
        out = tmp_path / "second"
        result, output = invoke("explain", image, "--model", tiny_model_dir, "--out", out, "--concepts", "chest_xray",
                                "--concept-data", phantom_dir, "--method", "patch_text", *extra)
        assert result.exit_code == 2, output
        assert not out.exists() or not any(out.iterdir())  # no overlay, no bottleneck.json: a rerun is not blocked
    result, output = invoke("explain", image, "--model", tiny_model_dir, "--out", tmp_path / "third", "--method",
                            "patch_text", "--method", "xray-vision", "--concepts", "chest_xray", "--concept-data",
                            phantom_dir)
    assert result.exit_code == 2 and "xray-vision" in output and not (tmp_path / "third").exists()


def test_a_damaged_model_fingerprint_is_refused_and_a_missing_one_is_warned_about(tiny_model, tiny_model_dir,
                                                                                   phantom_dir, tmp_path):
    """A bottleneck's ``model`` that is not a fingerprint (a string, a list, a number, a hash that is not a string)
    passed for a file from before fingerprints: the check that it belongs to the model was skipped without a word.
    It is refused naming the file; a file without one (an earlier medvl) is used with a warning that it cannot be
    checked, as a model's OOD guard without one is."""
    fitted = fit_bottleneck(tiny_model, medvl.load_dataset(phantom_dir).select("train"), "finding",
                            load_concepts("chest_xray"))
    data = fitted.to_dict()
    image = _cardiomegaly_image(phantom_dir)
    damaged = {"text": ("x", "model is not an object"), "list": ([], "model is not an object"),
               "number": (3, "model is not an object"),
               "hash": ({**data["model"], "weights_sha256": 5}, "model.weights_sha256 is not a string"),
               "no-hash": ({"name": "phantom-tiny"}, "model.config_sha256 is not a string")}
    for name, (model, problem) in damaged.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({**data, "model": model}))
        result, output = invoke("explain", image, "--model", tiny_model_dir, "--bottleneck", path, "--method",
                                "patch_text")
        message = " ".join(output.split())
        assert result.exit_code == 2 and "Traceback" not in output, (name, output)
        assert f"{path}: not a concept bottleneck file ({problem}" in message, (name, output)
    for name, old in (("missing", {k: v for k, v in data.items() if k != "model"}), ("null", {**data, "model": None})):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(old))
        result, output = invoke("explain", image, "--model", tiny_model_dir, "--bottleneck", path, "--method",
                                "patch_text")
        assert result.exit_code == 0 and "patch_text: peak at" in output, (name, output)
        unwrapped = "".join(output.split())  # the log handler wraps long lines, the path too
        warning = f"{path}: the concept bottleneck records no fingerprint of the model"
        assert "".join(warning.split()) in unwrapped and "cannotbechecked" in unwrapped, (name, output)


def test_an_interrupted_explanation_leaves_no_overlay_and_the_rerun_works(tiny_model_dir, phantom_dir, tmp_path):
    """Ctrl-C (a real SIGINT to ``python -m medvl explain``) while the overlays are being written leaves none of
    them in --out (they are staged and moved in with explanation.json), so the same command then succeeds."""
    import shutil
    import subprocess
    import sys
    import time

    out = tmp_path / "out"
    args = ["explain", _cardiomegaly_image(phantom_dir), "--model", tiny_model_dir, "--out", out, "--top", 3]
    for _attempt in range(5):  # the overlays take a fraction of a second: the signal may land after the last
        process = subprocess.Popen([sys.executable, "-m", "medvl", *map(str, args)], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 300
        while not (out.exists() and any(out.rglob("*.png"))):  # the first overlay, staged or in place
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.01)
        process.send_signal(signal.SIGINT)
        _, errors = process.communicate(timeout=300)
        if process.returncode == 0 and (out / "explanation.json").is_file():
            shutil.rmtree(out)  # finished before the signal landed (a whole explanation): interrupt another run
            continue
        assert process.returncode == 130, errors
        assert list(out.rglob("*")) == []  # no overlay and no staging folder left
        break
    else:
        pytest.fail("every run finished before the interrupt landed")
    result, output = invoke(*args)
    assert result.exit_code == 0, output
    explanation = json.loads((out / "explanation.json").read_text())
    files = {block["file"] for entry in explanation["findings"] for block in entry["heatmaps"].values()}
    assert len(files) == 3 * len(explanation["findings"][0]["heatmaps"]) > 3
    assert sorted(path.name for path in out.iterdir()) == sorted([*files, "explanation.json"])


# -- pixel-resolution methods: occlusion and SmoothGrad -----------------------------------------------


@pytest.fixture(scope="module")
def square_case():
    """A random-init phantom-tiny, a flat grey image with a bright 8 x 8 square at rows 40-47,
    columns 16-23, and two class directions: the flat image's embedding (0) and the square image's (1).
    Class 1's evidence is the square and nothing else: hiding any window away from it with the local
    background leaves the flat image unchanged."""
    torch.manual_seed(0)
    model = medvl.create_model("phantom-tiny", **{"image.no_max_pool": True}).eval()
    flat = torch.full((1, 1, 64, 64), 0.4)
    square = flat.clone()
    square[..., 40:48, 16:24] = 0.9
    with torch.no_grad():
        texts = torch.nn.functional.normalize(model.encode_images(torch.cat([flat, square])), dim=-1)
    return model, square, texts


def test_occlusion_peak_lies_on_the_known_evidence(square_case):
    from medvl.explain.heatmaps import occlusion_map

    model, square, texts = square_case
    for fill, stride in (("ring", 0.0625), ("blur", 0.125), ("mean", 0.125)):  # the default; coarser, faster
        maps = occlusion_map(model, square, texts, target=1, fill=fill, stride=stride)
        assert maps.shape == (1, 64, 64) and torch.isfinite(maps).all()
        row, col = grounding.peak(maps[0].numpy())
        assert 40 <= row < 48 and 16 <= col < 24, (fill, row, col)
        assert float(maps[0].max()) > 0  # hiding the square costs class 1 ground
    raw = occlusion_map(model, square, texts, target=1, stride=0.125, fill="ring", smooth=0.0)  # flat: no change
    assert raw[0, :24, 32:].abs().max() < 1e-5  # far from the square
    again = occlusion_map(model, square, texts, target=1, stride=0.125, fill="ring", smooth=0.0, batch_size=7)
    assert torch.allclose(raw, again, atol=1e-4)  # batching changes nothing but float rounding


def test_occlusion_matches_captum_occlusion(square_case):
    from captum.attr import Occlusion

    from medvl.explain.heatmaps import _log_probability, occlusion_map

    model, square, texts = square_case
    images = torch.cat([square, square.flip(-1)])  # 64 px: window 8, stride 4, windows fit the side exactly
    ours = occlusion_map(model, images, texts, target=1, window=0.125, stride=0.0625, fill="mean", smooth=0.0)
    score = _log_probability(model, texts, 1)
    with torch.no_grad():
        theirs = Occlusion(score).attribute(images, sliding_window_shapes=(1, 8, 8), strides=(1, 4, 4),
                                            baselines=images.mean(dim=(2, 3), keepdim=True).expand_as(images),
                                            perturbations_per_eval=64)
    assert torch.allclose(ours, theirs[:, 0], atol=1e-5)


def test_occlusion_hides_a_window_under_the_global_mean_by_default_as_documented(square_case):
    """The default fill is the image's global mean (the classic grey patch), not its local background, which the
    README and the module docstring claimed: a peak at a dark border read as 'local background' evidence. The
    docs now say what the code does and name the other fills."""
    import importlib

    from medvl.explain.heatmaps import occlusion_map

    model, square, texts = square_case
    options = {"window": 0.25, "stride": 0.125, "smooth": 0.0}
    default = occlusion_map(model, square, texts, target=1, **options)
    assert torch.equal(default, occlusion_map(model, square, texts, target=1, fill="mean", **options))
    assert not torch.allclose(default, occlusion_map(model, square, texts, target=1, fill="ring", **options))
    docstring = importlib.import_module("medvl.explain.heatmaps").__doc__  # the package exports a function heatmaps
    bullet = " ".join(docstring.split("* ``occlusion``")[1].split("* ``smoothgrad``")[0].split())
    assert "by default under the image's global mean intensity" in bullet and '``fill="ring"``' in bullet
    readme = " ".join((Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8").split())
    assert "hides it under a flat patch of the image's global mean intensity" in readme
    assert "hides it under the local background" not in readme and 'fill="blur"' in readme


def test_smoothgrad_matches_a_hand_computed_gradient_and_is_seeded(square_case):
    from medvl.explain.heatmaps import _log_probability, smoothgrad_map

    model, square, texts = square_case
    plain = smoothgrad_map(model, square, texts, target=1, samples=1, noise=0.0, smooth=0.0)
    pixels = square.clone().requires_grad_(True)
    expected = torch.autograd.grad(_log_probability(model, texts, 1)(pixels).sum(), pixels)[0].abs().sum(1)
    assert plain.shape == (1, 64, 64) and torch.allclose(plain, expected, atol=1e-6)
    first = smoothgrad_map(model, square, texts, target=1, samples=4, seed=3, batch_size=3)
    same = smoothgrad_map(model, square, texts, target=1, samples=4, seed=3)  # batched differently
    assert torch.allclose(first, same, rtol=1e-3, atol=1e-7)
    assert not torch.allclose(first, smoothgrad_map(model, square, texts, target=1, samples=4, seed=4),
                              rtol=1e-3, atol=1e-7)
    # an image's noise is its own: the same map alone as after another image in the batch (one draw for the whole
    # batch gave the second image other noise, so explain and a grounding batch drew two maps of one image)
    batch = smoothgrad_map(model, torch.cat([square.flip(-1), square]), texts, target=1, samples=4, seed=3)
    assert torch.allclose(batch[1:], first, rtol=1e-3, atol=1e-7)


def test_bad_heatmap_methods_and_settings_are_input_errors(square_case):
    from medvl.explain.heatmaps import heatmaps as make_heatmaps

    model, square, texts = square_case
    with pytest.raises(InputError, match="heatmap methods must be among"):
        make_heatmaps(model, square, texts, 1, ["lime"])
    with pytest.raises(InputError, match="unknown occlusion setting 'size'"):
        make_heatmaps(model, square, texts, 1, ["occlusion"], {"occlusion": {"size": 3}})
    with pytest.raises(InputError, match="not among the methods"):
        make_heatmaps(model, square, texts, 1, ["gradcam"], {"occlusion": {"window": 0.2}})
    with pytest.raises(InputError, match="window and stride"):
        make_heatmaps(model, square, texts, 1, ["occlusion"], {"occlusion": {"window": 2.0}})
    with pytest.raises(InputError, match="fill"):
        make_heatmaps(model, square, texts, 1, ["occlusion"], {"occlusion": {"fill": "zeros"}})
    with pytest.raises(InputError, match="smoothgrad needs"):
        make_heatmaps(model, square, texts, 1, ["smoothgrad"], {"smoothgrad": {"samples": 0}})


def test_grounding_times_each_method_and_keeps_settings(tiny_model, phantom_dir):
    test_set = medvl.load_dataset(phantom_dir).select("test")
    cases = test_set.subset([r for r in test_set if r.labels["finding"] in ("pneumothorax", "nodule")])
    settings = {"occlusion": {"window": 0.25, "stride": 0.125}, "smoothgrad": {"samples": 2}}
    result = grounding.evaluate_grounding(tiny_model, cases, methods=["occlusion", "smoothgrad"], settings=settings)
    assert result["settings"] == settings and set(result["seconds_per_image"]) == {"occlusion", "smoothgrad"}
    assert result["n"] == len(cases) == result["per_finding"]["all"]["n"]
    for row in result["per_finding"].values():
        assert all(0.0 <= v <= 1.0 for method in ("occlusion", "smoothgrad", "random", "centre")
                   for v in row[method].values())
    with pytest.raises(InputError, match="not among the methods"):
        grounding.evaluate_grounding(tiny_model, cases, methods=["gradcam"], settings=settings)


def test_explain_command_with_occlusion_and_a_bad_method(tiny_model_dir, phantom_dir, tmp_path):
    image = _cardiomegaly_image(phantom_dir)
    result, output = invoke("explain", image, "--model", tiny_model_dir, "--method", "occlusion",
                            "--method", "smoothgrad", "--out", tmp_path / "out")
    assert result.exit_code == 0, output
    explanation = json.loads((tmp_path / "out" / "explanation.json").read_text())
    assert set(explanation["findings"][0]["heatmaps"]) == {"occlusion", "smoothgrad"}
    assert "occlusion: peak at row" in output
    refused, output = invoke("explain", image, "--model", tiny_model_dir, "--method", "lime")
    assert refused.exit_code == 2 and "heatmap methods must be among" in output and "'lime'" in output
    assert "Traceback" not in output


# -- sanity checks: model randomisation and class sensitivity (Adebayo et al. 2018) ----------------------


def test_rank_correlation_matches_scipy_spearman_and_a_constant_map_has_none():
    from scipy.stats import spearmanr

    from medvl.explain.sanity import rank_correlation

    rng = np.random.default_rng(0)
    first = rng.normal(size=(12, 12))
    second = first + rng.normal(size=(12, 12))
    second[:3] = 0.0  # ties
    assert rank_correlation(first, second) == pytest.approx(spearmanr(first.ravel(), second.ravel())[0], abs=1e-12)
    assert rank_correlation(first, first * 3 + 1) == pytest.approx(1.0)
    assert rank_correlation(first, np.zeros((12, 12))) is None


def test_randomised_image_tower_changes_only_the_image_side(tiny_model):
    from medvl.explain.sanity import randomised_image_tower

    state = torch.random.get_rng_state()
    randomised = randomised_image_tower(tiny_model, seed=1)
    assert torch.equal(state, torch.random.get_rng_state())  # the caller's random stream is left alone
    trained, changed = dict(tiny_model.named_parameters()), dict(randomised.named_parameters())
    image_side = [n for n in trained if n.startswith(("image_encoder.", "image_projection."))]
    assert image_side and all(not torch.equal(trained[n], changed[n]) for n in image_side if trained[n].numel() > 1
                              and "bn" not in n and "norm" not in n)
    assert all(torch.equal(trained[n], changed[n]) for n in trained if n not in image_side)  # text tower kept
    again = randomised_image_tower(tiny_model, seed=1)
    assert all(torch.equal(p, again.state_dict()[n]) for n, p in randomised.state_dict().items())  # seeded


def test_sanity_check_fails_a_map_that_ignores_the_model_and_passes_patch_text(tiny_model, phantom_dir):
    """The image's own intensity is the same map whatever the weights and the finding: correlation ~1 with the
    randomised model's and with another finding's, so it fails. patch_text's map is made of the model's own
    projected tokens: a randomised image tower draws another one."""
    from medvl.explain.sanity import RANDOMISED_MAX, sanity_check

    test_set = medvl.load_dataset(phantom_dir).select("test")
    films = test_set.subset([r for r in test_set if r.labels["finding"] != "no_finding"][:4])
    result = sanity_check(tiny_model, films, methods=["patch_text"], classes=test_set.classes("finding"),
                          extra_maps={"intensity": lambda model, pixels, texts, target: pixels.mean(1)})
    intensity, patch_text = result["methods"]["intensity"], result["methods"]["patch_text"]
    assert result["images"] == 4 and intensity["n"] == {"randomised": 4, "other_class": 4}
    assert intensity["randomised"] > 0.99 and intensity["other_class"] > 0.99 and not intensity["passes"]
    assert patch_text["randomised_abs"] < RANDOMISED_MAX and patch_text["passes"], patch_text
    assert patch_text["randomised_abs"] >= abs(patch_text["randomised"])
    assert patch_text["other_class"] < 0.99  # another finding's text direction: another map
    # a map the randomised model ranks in reverse depends on the image as much: the signed mean (-1) passed the rule
    inverted = sanity_check(tiny_model, films, methods=["patch_text"], classes=test_set.classes("finding"),
                            extra_maps={"reversed": lambda model, pixels, texts, target:
                                        pixels.mean(1) * (1 if model is tiny_model else -1)})["methods"]["reversed"]
    assert inverted["randomised"] < -0.99 and inverted["randomised_abs"] > 0.99 and not inverted["passes"]
    assert str(RANDOMISED_MAX) in result["rule"]
    with pytest.raises(InputError, match="may not reuse"):
        sanity_check(tiny_model, films, methods=["patch_text"], extra_maps={"patch_text": lambda *a: a[1].mean(1)})
    with pytest.raises(InputError, match="not among"):
        sanity_check(tiny_model, films, methods=["patch_text"], classes=["nodule", "no_finding"])


# -- explaining a supervised head instead of the zero-shot classes --------------------------------------


class _ZeroShotAsHead(torch.nn.Module):
    """A stand-in head whose logits are the zero-shot logits of ``texts`` (in the head's own class order)."""

    def __init__(self, model, texts):
        super().__init__()
        self.projection, self.scale, self.texts = model.image_projection, model.logit_scale, texts

    def forward(self, features):
        embeddings = torch.nn.functional.normalize(self.projection(features), dim=-1)
        return self.scale.detach().clamp(max=4.6052).exp() * embeddings @ self.texts.t()


@pytest.fixture(scope="module")
def square_head_case(square_case):
    """The square case with a linear head "finding" over ("square", "flat"): the reverse of the text
    order, so a method that indexed the head with the text order would explain the wrong class."""
    import copy

    model, square, texts = square_case
    model = copy.deepcopy(model)
    model.add_head("finding", ["square", "flat"])
    with torch.no_grad():
        model.heads["finding"].weight.copy_(texts[[1, 0]] @ model.image_projection.weight)
        model.heads["finding"].bias.zero_()
    return model, square, texts


def _head_log_probability(model, target):
    def score(batch):
        features = model.image_encoder(model.preprocessor.normalize(batch))
        return torch.log_softmax(model.heads["finding"](features), dim=-1)[:, target]
    return score


def test_occlusion_and_smoothgrad_of_a_supervised_head_match_hand_computations(square_head_case):
    from captum.attr import Occlusion

    from medvl.explain.heatmaps import occlusion_map, smoothgrad_map, target_index

    model, square, texts = square_head_case
    target = target_index(model, ["flat", "square"], "square", head="finding")
    assert target == 0 and target_index(model, ["flat", "square"], "square") == 1
    ours = occlusion_map(model, square, texts, target, window=0.125, stride=0.0625, smooth=0.0, head="finding")
    with torch.no_grad():
        theirs = Occlusion(_head_log_probability(model, 0)).attribute(
            square, sliding_window_shapes=(1, 8, 8), strides=(1, 4, 4),
            baselines=square.mean(dim=(2, 3), keepdim=True).expand_as(square), perturbations_per_eval=64)
    assert torch.allclose(ours, theirs[:, 0], atol=1e-5)
    row, col = grounding.peak(occlusion_map(model, square, texts, target, stride=0.125, head="finding")[0].numpy())
    assert 40 <= row < 48 and 16 <= col < 24  # the head's evidence for "square" is the square
    zero_shot = occlusion_map(model, square, texts, 1, window=0.125, stride=0.0625, smooth=0.0)
    assert not torch.allclose(ours, zero_shot, atol=1e-3)  # the head's map, not the text classes' one
    plain = smoothgrad_map(model, square, texts, target, samples=1, noise=0.0, smooth=0.0, head="finding")
    pixels = square.clone().requires_grad_(True)
    expected = torch.autograd.grad(_head_log_probability(model, 0)(pixels).sum(), pixels)[0].abs().sum(1)
    assert torch.allclose(plain, expected, atol=1e-6)


def test_gradcam_of_a_supervised_head_matches_a_hand_computed_grad_cam(square_head_case):
    model, square, texts = square_head_case
    maps = gradcam_map(model, square, texts, target=0, head="finding")
    saved = {}
    handle = model.image_encoder.backbone.layer4.register_forward_hook(
        lambda module, inputs, output: saved.setdefault("a", output))
    try:
        logits = model.heads["finding"](model.image_encoder(model.preprocessor.normalize(square)))
        gradients = torch.autograd.grad(logits[:, 0].sum(), saved["a"])[0]
    finally:
        handle.remove()
    cam = torch.relu((gradients.mean(dim=(2, 3), keepdim=True) * saved["a"]).sum(1, keepdim=True)).detach()
    expected = torch.nn.functional.interpolate(cam, size=(64, 64), mode="bilinear", align_corners=False)[:, 0]
    assert torch.allclose(maps, expected, atol=1e-5)


def test_a_missing_head_or_class_is_refused(square_head_case, square_case):
    from medvl.errors import ModelError
    from medvl.explain.heatmaps import heatmaps as make_heatmaps
    from medvl.explain.heatmaps import target_index

    model, square, texts = square_head_case
    with pytest.raises(ModelError, match="no supervised head for 'label'"):
        make_heatmaps(model, square, texts, 0, ["occlusion"], {"occlusion": {"head": "label"}})
    with pytest.raises(ModelError, match="no supervised head for 'finding'; heads: none"):
        make_heatmaps(square_case[0], square, texts, 0, ["smoothgrad"], {"smoothgrad": {"head": "finding"}})
    with pytest.raises(InputError, match="not among the 2 classes of the supervised head"):
        make_heatmaps(model, square, texts, 2, ["gradcam"], {"gradcam": {"head": "finding"}})
    with pytest.raises(InputError, match="unknown patch_text setting 'head'"):
        make_heatmaps(model, square, texts, 0, ["patch_text"], {"patch_text": {"head": "finding"}})
    with pytest.raises(InputError, match="'nodule' is not among the supervised head 'finding'"):
        target_index(model, ["flat", "square"], "nodule", head="finding")


def test_grounding_of_a_head_finds_each_class_by_name(tiny_model, phantom_dir):
    """A head whose logits are the zero-shot logits in another class order must ground exactly as the
    zero-shot classes do: the finding is looked up by name among the head's classes."""
    import copy

    from medvl.embed import class_embeddings
    from medvl.predict import class_prompts

    test_set = medvl.load_dataset(phantom_dir).select("test")
    cases = test_set.subset([r for r in test_set if r.labels["finding"] in ("pneumothorax", "pleural_effusion")])
    model = copy.deepcopy(tiny_model)
    order = list(reversed(cases.classes("finding")))  # the zero-shot classes are the data's own
    texts = class_embeddings(model, class_prompts(model, order, "finding")[1])
    model.add_head("finding", order)
    model.heads["finding"] = _ZeroShotAsHead(model, texts)
    options = {"window": 0.25, "stride": 0.125}
    plain = grounding.evaluate_grounding(model, cases, methods=["occlusion"], settings={"occlusion": options})
    by_head = grounding.evaluate_grounding(model, cases, methods=["occlusion"],
                                           settings={"occlusion": {**options, "head": "finding"}})
    assert by_head["settings"]["occlusion"]["head"] == "finding"
    for finding, row in plain["per_finding"].items():
        assert by_head["per_finding"][finding]["occlusion"] == pytest.approx(row["occlusion"], abs=1e-6)


def test_concept_data_fits_on_its_default_label_and_train_split_and_refuses_an_identifier(tiny_model_dir,
                                                                                          phantom_dir, tmp_path):
    """--concept-data fitted on the table's first label column (ISIC's isic_id: one class per image) instead of
    the dataset's default label, and on every record when the splits were Train / Val / Test, test included:
    the default label and split are those of every other command (pick_label, load_split)."""
    data = tmp_path / "data"
    shutil.copytree(phantom_dir, data)
    rows = list(csv.DictReader((data / "manifest.csv").open(newline="")))[:40]  # a quick fit
    with (data / "manifest.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["case_id", *rows[0]])
        writer.writeheader()
        writer.writerows({"case_id": f"case{i}", **row, "split": row["split"].capitalize()}
                         for i, row in enumerate(rows))
    base = ["explain", _cardiomegaly_image(phantom_dir), "--model", tiny_model_dir, "--method", "patch_text",
            "--concepts", "chest_xray", "--concept-data", data]
    result, output = invoke(*base, "--out", tmp_path / "all")
    assert result.exit_code == 2 and "no split 'train' (splits: Train, Val, Test); pass --concept-split NAME" in \
        " ".join(output.split()), output
    result, output = invoke(*base, "--concept-split", "Train", "--concept-label", "case_id")
    assert result.exit_code == 2 and "label column 'case_id' has" in output and "not an identifier" in output, output
    result, output = invoke(*base, "--concept-split", "Train", "--out", tmp_path / "ex")
    assert result.exit_code == 0, output
    fitted = ConceptBottleneck.load(tmp_path / "ex" / "bottleneck.json")
    assert fitted.label_column == "finding" and "case" not in " ".join(fitted.classes)  # dataset.json's default
    (data / "dataset.json").unlink()  # no default label column: named, never the first one taken
    result, output = invoke(*base, "--concept-split", "Train")
    assert result.exit_code == 2 and "the concept bottleneck needs a label column (--concept-label); available: " \
        "case_id, finding" in " ".join(output.split()), output


def _some_labels_empty(phantom_dir: Path, folder: Path) -> Path:
    """A copy of the phantom data (40 rows) whose ``finding`` is empty in 6 rows (4 of them train) and with a
    ``grade`` column empty in every row."""
    shutil.copytree(phantom_dir, folder)
    rows = list(csv.DictReader((folder / "manifest.csv").open(newline="")))[:40]
    with (folder / "manifest.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[*rows[0], "grade"])
        writer.writeheader()
        writer.writerows({**row, "grade": "", "finding": "" if i % 7 == 3 else row["finding"]}
                         for i, row in enumerate(rows))
    return folder


def test_concept_data_with_empty_labels_fits_on_the_labelled_records(tiny_model, tiny_model_dir, phantom_dir,
                                                                     tmp_path):
    """ISIC's table has 2 records with an empty diagnosis: the bottleneck embedded all 400 images but took 398
    classes, and scikit-learn failed (inconsistent numbers of samples, a traceback). Records without a value in the
    label column are left out before embedding, counted once in the log; compare_with_probe likewise. A column
    empty in every record is refused in one line."""
    data = _some_labels_empty(phantom_dir, tmp_path / "data")
    train = medvl.load_dataset(data).select("train")
    labelled = [r for r in train if "finding" in r.labels]
    assert 0 < len(labelled) < len(train)
    base = ["explain", _cardiomegaly_image(phantom_dir), "--model", tiny_model_dir, "--method", "patch_text",
            "--concepts", "chest_xray", "--concept-data", data]
    result, output = invoke(*base, "--concept-label", "finding", "--out", tmp_path / "why")
    assert result.exit_code == 0 and "Traceback" not in output, output
    skipped = f"skipped {len(train) - len(labelled)} records with an empty label in finding"
    assert " ".join(result.stderr.split()).count(skipped) == 1, output  # said once, the records not named
    fitted = ConceptBottleneck.load(tmp_path / "why" / "bottleneck.json")
    assert fitted.classes == sorted({r.labels["finding"] for r in labelled})
    embeddings = tiny_model.encode_images(tiny_model.preprocessor.load_many([r.image for r in labelled]))
    assert np.allclose(fitted.mean, (embeddings.numpy().astype(np.float64) @ fitted.concept_vectors.T).mean(0))
    test = medvl.load_dataset(data).select("test")
    compared = compare_with_probe(tiny_model, train, test, "finding", load_concepts("chest_xray"))
    assert compared["n_train"] == len(labelled) and compared["n_test"] == sum("finding" in r.labels for r in test)
    result, output = invoke(*base, "--concept-label", "grade")
    assert result.exit_code == 2 and "Traceback" not in output, output
    assert "none of its" in output and "has a value in label column 'grade'" in " ".join(output.split()), output
    with pytest.raises(InputError, match="has a value in label column 'grade'"):
        compare_with_probe(tiny_model, train, test, "grade", load_concepts("chest_xray"))


@pytest.mark.parametrize("args, needed", [
    (["--k", 7], "--k (nearest cases to list) needs --index"),
    (["--k", -2], "--k (nearest cases to list) needs --index"),
    (["--concept-label", "finding"], "--concept-label needs --concept-data"),
    # refused before the concept data is read and a bottleneck fitted on it (the slow part), not after
    (["--k", 3, "--concepts", "chest_xray", "--concept-data", "no-such-folder"], "--k (nearest cases to list) needs"),
])
def test_an_option_that_needs_another_is_refused_without_it(tiny_model_dir, phantom_dir, tmp_path, args, needed):
    """--k lists nearest cases of --index and --concept-label names a column of --concept-data: alone they
    would be ignored."""
    out = tmp_path / "ex"
    result, output = invoke("explain", _cardiomegaly_image(phantom_dir), "--model", tiny_model_dir,
                            "--method", "patch_text", "--out", out, *args)
    assert result.exit_code == 2 and needed in output, output
    assert not out.exists()

