"""Local transformers CLIP / SigLIP folders load as medvl models and run through every command.

Each folder is a tiny random-init ``CLIPModel`` / ``SiglipModel`` saved with ``save_pretrained``,
with a processor config and a tokenizer built here offline: a real ``CLIPTokenizer`` from a tiny
vocab for CLIP, and for SigLIP (whose own tokenizer needs sentencepiece) a ``PreTrainedTokenizerFast``
trained in the test: any tokenizer ``AutoTokenizer`` loads from the folder works.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cli_helpers import invoke
from medvl.data import load_dataset
from medvl.errors import DataError, ModelError
from medvl.eval.zero_shot import zero_shot_probabilities
from medvl.index.base import model_fingerprint
from medvl.models.adapters import HFDualEncoder
from medvl.models.registry import load_model, resolve_model

SIDE, PATCH = 32, 8
TEXTS = ["no acute cardiopulmonary abnormality.", "mild cardiomegaly.", "small left pleural effusion."]
CORPUS = TEXTS + ["a nodule in the right upper zone.", "the heart is enlarged; no effusion."]


def _clip_tokenizer():
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in sorted(set("".join(CORPUS))) + list("abcdefghijklmnopqrstuvwxyz"):
        for token in (char, char + "</w>"):
            vocab.setdefault(token, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[])


def _siglip_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.train_from_iterator(CORPUS, trainers.WordLevelTrainer(special_tokens=["<pad>", "</s>", "<unk>"]))
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def _towers(vocab_size: int, positions: int) -> tuple[dict, dict]:
    text = {"vocab_size": vocab_size, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 2, "max_position_embeddings": positions}
    vision = {"hidden_size": 48, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": SIDE, "patch_size": PATCH}
    return text, vision


def save_clip(folder: Path) -> Path:
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    tokenizer = _clip_tokenizer()
    text, vision = _towers(len(tokenizer), 64)
    text.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=1)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    _write_processor(folder, {"image_processor_type": "CLIPImageProcessor", "do_resize": True,
                              "size": {"shortest_edge": 40}, "resample": 3, "do_center_crop": True,
                              "crop_size": {"height": SIDE, "width": SIDE}, "do_rescale": True,
                              "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True,
                              "image_mean": [0.48145466, 0.4578275, 0.40821073],
                              "image_std": [0.26862954, 0.26130258, 0.27577711]})
    return folder


def save_siglip(folder: Path) -> Path:
    from transformers import SiglipConfig, SiglipModel

    torch.manual_seed(1)
    tokenizer = _siglip_tokenizer()
    text, vision = _towers(len(tokenizer), 16)
    vision["hidden_size"] = 32  # SigLIP's image and text embeddings are the towers' widths
    text.update(pad_token_id=tokenizer.pad_token_id, bos_token_id=None, eos_token_id=tokenizer.eos_token_id)
    SiglipModel(SiglipConfig(text_config=text, vision_config=vision)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    _write_processor(folder, {"image_processor_type": "SiglipImageProcessor", "do_resize": True,
                              "size": {"height": SIDE, "width": SIDE}, "resample": 2, "do_rescale": True,
                              "rescale_factor": 1 / 255, "do_normalize": True,
                              "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]})
    return folder


def _write_processor(folder: Path, settings: dict) -> None:
    (folder / "preprocessor_config.json").write_text(json.dumps(settings, indent=2))


@pytest.fixture(scope="module", params=["clip", "siglip"])
def hf_dir(request, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp(request.param) / f"tiny-{request.param}"
    return save_clip(folder) if request.param == "clip" else save_siglip(folder)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    from medvl.data.phantom import generate_phantom

    folder = tmp_path_factory.mktemp("adapters") / "data"
    generate_phantom(folder, n=40, seed=0, size=64)
    return folder


def _reference(folder: Path, images: list[Path], texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised embeddings computed with transformers alone: its processor, tokenizer and model."""
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(folder).eval()
    processor = AutoImageProcessor.from_pretrained(folder, backend="pil")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    pixels = processor(images=[Image.open(path).convert("RGB") for path in images], return_tensors="pt")
    if model.config.model_type == "siglip":  # padded to the trained length, no attention mask
        tokens = tokenizer(texts, padding="max_length", max_length=16, return_tensors="pt")
        text_inputs = {"input_ids": tokens["input_ids"]}
    else:
        text_inputs = dict(tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt"))
    with torch.no_grad():
        image_out = model.get_image_features(pixel_values=pixels["pixel_values"])
        text_out = model.get_text_features(**text_inputs)
    return (torch.nn.functional.normalize(image_out.pooler_output, dim=-1),
            torch.nn.functional.normalize(text_out.pooler_output, dim=-1))


def _images(phantom: Path, count: int) -> list[Path]:
    return sorted((phantom / "images").glob("*.png"))[:count]


def test_embeddings_equal_the_transformers_models_own(hf_dir, phantom):
    model = load_model(hf_dir)
    assert isinstance(model, HFDualEncoder)
    images = _images(phantom, 4)
    image_ref, text_ref = _reference(hf_dir, images, TEXTS)
    image_emb, text_emb = model.encode_images(images), model.encode_texts(TEXTS)
    assert image_emb.shape == (4, model.config.embed_dim) and text_emb.shape == (3, model.config.embed_dim)
    assert torch.allclose(image_emb, image_ref, atol=1e-5)
    assert torch.allclose(text_emb, text_ref, atol=1e-5)
    pixels = model.preprocessor.load_many(images)  # the [0, 1] tensor path gives the same vectors
    assert pixels.shape == (4, 3, SIDE, SIDE) and 0 <= float(pixels.min()) and float(pixels.max()) <= 1
    assert torch.allclose(model.encode_images(pixels), image_ref, atol=1e-5)
    gray = np.asarray(Image.open(images[0]).convert("L"))  # grayscale arrays are repeated to RGB
    assert torch.allclose(model.encode_images([gray]), image_ref[:1], atol=1e-5)
    assert "captions" not in model.meta and model.meta["source"]["dir"] == str(hf_dir)


def test_images_of_any_depth_and_channels_become_8_bit_rgb(hf_dir, phantom):
    model = load_model(hf_dir)
    gray = np.asarray(Image.open(_images(phantom, 1)[0]).convert("L")).astype(np.float64)
    stretched = np.round((gray - gray.min()) * 255 / (gray.max() - gray.min())).astype(np.uint8)
    expected = model.encode_images([stretched])
    sixteen_bit = stretched.astype(np.uint16) * 257  # min-max scaled back to the same 8-bit values
    rgba = np.dstack([stretched] * 3 + [np.zeros_like(stretched)])  # alpha dropped
    assert torch.allclose(model.encode_images([sixteen_bit, rgba]), expected.expand(2, -1), atol=1e-6)
    features = model.encode_images([stretched], features=True)  # the model's own embedding, unnormalised
    assert torch.allclose(torch.nn.functional.normalize(features, dim=-1), expected, atol=1e-6)
    with pytest.raises(DataError, match="does not fit a 2D RGB model"):
        model.encode_images([np.zeros((4, 16, 16), np.float32)])


def test_zero_shot_ranks_classes_as_the_models_own_logits(hf_dir, phantom):
    from transformers import AutoModel

    model = load_model(hf_dir)
    images = _images(phantom, 6)
    image_ref, text_ref = _reference(hf_dir, images, TEXTS)
    probabilities = zero_shot_probabilities(model, model.encode_images(images), [[text] for text in TEXTS])
    assert np.allclose(probabilities.sum(1), 1, atol=1e-5)
    hf = AutoModel.from_pretrained(hf_dir)
    logits = hf.logit_scale.exp() * image_ref @ text_ref.t()  # SigLIP's sigmoid adds logit_bias: same ranking
    if model.config.model_type == "siglip":
        logits = torch.sigmoid(logits + hf.logit_bias)
    assert (probabilities.argmax(1) == logits.argmax(1).detach().numpy()).all()


def _films(folder: Path) -> list[Path]:
    """An 8-bit and a 16-bit grayscale film and an RGB photo, saved as PNG: sizes the processors must resize."""
    rng = np.random.default_rng(0)
    film16 = rng.normal(20000, 3000, (96, 80)).clip(0, 65535).astype(np.uint16)
    film16[10:12, 10:12] = 65535  # a small bright marker: area averaging it first changed the film's contrast
    images = {"film8": rng.integers(0, 256, (96, 80), dtype=np.uint8), "film16": film16,
              "photo": rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)}
    for name, pixels in images.items():
        Image.fromarray(pixels).save(folder / f"{name}.png")
    return [folder / f"{name}.png" for name in images]


def test_the_corruption_check_corrupts_what_the_model_reads(hf_dir, tmp_path):
    """``model_sized`` gives pixels the model's processor reads as it reads the file: CLIP's (resize the shortest
    edge to 40, crop 32) was cropped twice, a zoomed picture; corruptions still act at the model's pixel scale."""
    from medvl.eval.robustness import corrupt, model_sized

    model = load_model(hf_dir)
    for path in _films(tmp_path):
        sized = model_sized(model, path)
        assert torch.equal(model.preprocessor.load(sized), model.preprocessor.load(path))
        assert min(sized.shape[:2]) == (40 if "clip" in hf_dir.name else SIDE)
        noisy = model.preprocessor.load(corrupt(sized, "noise", 5))
        assert noisy.shape == (3, SIDE, SIDE) and not torch.equal(noisy, model.preprocessor.load(path))


def test_fingerprint_is_stable_and_names_the_folder(hf_dir):
    model = load_model(hf_dir)
    first, second = model_fingerprint(model, hf_dir), model_fingerprint(load_model(hf_dir), hf_dir)
    assert first == second and first["name"] == hf_dir.name and first["embed_dim"] == model.config.embed_dim


def test_cli_predict_and_eval_run_on_the_folder(hf_dir, phantom, tmp_path):
    images = _images(phantom, 2)
    result, output = invoke("predict", "--model", hf_dir, *images, "--labels", "no_finding,cardiomegaly",
                            "--json", tmp_path / "p.json")
    assert result.exit_code == 0, output
    predictions = json.loads((tmp_path / "p.json").read_text())["predictions"]
    assert len(predictions) == 2 and all(abs(sum(p["probabilities"].values()) - 1) < 1e-4 for p in predictions)
    result, output = invoke("eval", "zero-shot", "--model", hf_dir, "--data", phantom, "--split", "test",
                            "--json", tmp_path / "zs.json", "-q")
    assert result.exit_code == 0, output
    metrics = json.loads((tmp_path / "zs.json").read_text())
    assert 0 <= metrics["accuracy"] <= 1 and len(metrics["classes"]) >= 2
    result, output = invoke("eval", "retrieval", "--model", hf_dir, "--data", phantom, "--split", "test",
                            "--json", tmp_path / "rt.json", "-q")
    assert result.exit_code == 0, output
    assert all(0 <= value <= 1 for key, value in json.loads((tmp_path / "rt.json").read_text()).items()
               if key.startswith(("image_to_text", "text_to_image")) and isinstance(value, float))
    result, output = invoke("eval", "linear-probe", "--model", hf_dir, "--train-data", phantom, "--test-data",
                            phantom, "--few-shot", "2", "--json", tmp_path / "lp.json", "-q")
    assert result.exit_code == 0, output
    assert isinstance(json.loads((tmp_path / "lp.json").read_text())["auc"], float)


def test_cli_index_search_and_report_draft_run_on_the_folder(hf_dir, phantom, tmp_path):
    index = tmp_path / "index"
    result, output = invoke("index", "build", "--model", hf_dir, "--data", phantom, "--out", index,
                            "--split", "train", "--json", tmp_path / "build.json", "-q")
    assert result.exit_code == 0, output
    train = load_dataset(phantom).select("train")
    assert json.loads((tmp_path / "build.json").read_text())["n_cases"] == len(train)
    query = train[0]
    result, output = invoke("search", "--index", index, "--image", query.image, "-k", 3, "--json", tmp_path / "s.json")
    assert result.exit_code == 0, output
    hits = json.loads((tmp_path / "s.json").read_text())["hits"]
    assert len(hits) == 3 and hits[0]["id"] == query.id and hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
    result, output = invoke("search", "--index", index, "--text", "cardiomegaly", "--target", "texts", "-k", 2)
    assert result.exit_code == 0, output
    test_image = load_dataset(phantom).select("test")[0].image
    result, output = invoke("report", "draft", test_image, "--index", index, "-k", 5, "--min-similarity", 0,
                            "--json", tmp_path / "draft.json")
    assert result.exit_code == 0, output
    assert len(json.loads((tmp_path / "draft.json").read_text())["neighbours"]) == 5


def test_training_an_adapted_folder_is_refused(hf_dir, phantom, tmp_path):
    with pytest.raises(ModelError, match="inference-only"):
        resolve_model(hf_dir)
    result, output = invoke("train", "--data", phantom, "--model", hf_dir, "--out", tmp_path / "run", "-q")
    assert result.exit_code == 2 and "inference-only" in output and "Traceback" not in output
    assert not (tmp_path / "run").exists()
    with pytest.raises(ModelError, match="inference-only"):
        load_model(hf_dir).save_pretrained(tmp_path / "copy")


def _broken_copy(hf_dir: Path, tmp_path: Path, remove: tuple[str, ...] = (), processor: dict | None = None) -> Path:
    folder = tmp_path / "broken"
    shutil.copytree(hf_dir, folder)
    for name in remove:
        (folder / name).unlink()
    if processor is not None:
        settings = json.loads((folder / "preprocessor_config.json").read_text())
        _write_processor(folder, {key: value for key, value in {**settings, **processor}.items() if value is not None})
    return folder


@pytest.mark.parametrize(("change", "message"), [
    ({"remove": ("model.safetensors",)}, "no weights"),
    ({"remove": ("preprocessor_config.json",)}, "no processor config"),
    ({"remove": ("tokenizer.json", "tokenizer_config.json") + ("vocab.json", "merges.txt")}, "no tokenizer"),
    ({"processor": {"image_mean": [0.5]}}, "image_mean must be 3 finite numbers"),
    ({"processor": {"image_std": None}}, "image_std must be 3 finite numbers"),
    # json writes and reads bare NaN / Infinity: every pixel, embedding and score was NaN, with exit 0
    ({"processor": {"image_mean": [0.5, 0.5, float("nan")]}}, "image_mean must be 3 finite numbers"),
    ({"processor": {"image_mean": [0.5, 0.5, float("inf")]}}, "image_mean must be 3 finite numbers"),
    ({"processor": {"image_std": [0.27, 0.27, float("nan")]}}, "image_std must be 3 finite numbers"),
    ({"processor": {"image_std": [0.27, "0.27", 0.27]}}, "image_std must be 3 finite numbers"),
    # other numbers the processor applies: a traceback at the first image (ValueError, TypeError, OverflowError)
    ({"processor": {"rescale_factor": "x"}}, "rescale_factor must be a positive finite number"),
    ({"processor": {"rescale_factor": {}}}, "rescale_factor must be a positive finite number"),
    ({"processor": {"size": {"shortest_edge": float("inf")}}}, "size.shortest_edge must be a whole number >= 1"),
    ({"processor": {"size": {"height": 48, "width": 48}, "crop_size": {"height": 48, "width": 48}}},
     "48x48 images but the model's vision_config.image_size is 32"),
])
def test_an_incomplete_folder_is_a_clear_error(hf_dir, phantom, tmp_path, change, message):
    remove = tuple(name for name in change.get("remove", ()) if (hf_dir / name).exists())
    folder = _broken_copy(hf_dir, tmp_path, remove, change.get("processor"))
    with pytest.raises(ModelError, match=message) as error:
        load_model(folder)
    assert str(folder) in str(error.value) and "\n" not in str(error.value)
    result, output = invoke("eval", "retrieval", "--model", folder, "--data", phantom, "-q")
    assert result.exit_code == 2 and message.split(" ")[0] in output and "Traceback" not in output


def test_a_processor_that_does_not_resize_takes_only_images_of_the_models_size(hf_dir, tmp_path):
    folder = _broken_copy(hf_dir, tmp_path, processor={"do_resize": False, "do_center_crop": False})
    model = load_model(folder)
    assert model.encode_images([np.zeros((SIDE, SIDE), np.uint8)]).shape == (1, model.config.embed_dim)
    with pytest.raises(DataError, match="image is 64x64 and the model's processor does not resize it"):
        model.encode_images([np.zeros((64, 64), np.uint8)])


def test_weights_short_of_the_config_are_a_clear_error(hf_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _broken_copy(hf_dir, tmp_path)
    state = load_file(str(folder / "model.safetensors"))
    dropped = sorted(state)[0]
    save_file({name: tensor for name, tensor in state.items() if name != dropped}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    with pytest.raises(ModelError, match=f"the weights lack 1 tensor.*{dropped}"):
        load_model(folder)


def test_weights_the_config_has_no_place_for_are_a_clear_error(hf_dir, tmp_path):
    """A checkpoint of two vision layers under a config of one: transformers drops the second layer and builds
    another network than the one trained; refused. A stale ``position_ids`` buffer of an older checkpoint is not."""
    from safetensors.torch import load_file, save_file

    folder = _broken_copy(hf_dir, tmp_path)
    state = load_file(str(folder / "model.safetensors"))
    layer = "vision_model.encoder.layers.0."
    extra = {name.replace(layer, "vision_model.encoder.layers.1."): tensor.clone()
             for name, tensor in state.items() if name.startswith(layer)}
    buffers = {"text_model.embeddings.position_ids": torch.arange(8)[None]}
    save_file({**state, **buffers}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    assert load_model(folder).config.embed_dim  # an old buffer alone loads
    save_file({**state, **extra}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelError, match=f"the weights hold {len(extra)} tensor.*no place for .*layers.1"):
        load_model(folder)


def test_a_clip_tokenizer_with_another_end_token_is_a_clear_error(tmp_path):
    folder = save_clip(tmp_path / "clip")
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["eos_token_id"] = 5
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="end-of-text id 1 differs from text_config.eos_token_id 5"):
        load_model(folder)


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory) -> Path:
    return save_siglip(tmp_path_factory.mktemp("siglip") / "tiny-siglip")


def _post_processor_names_an_undefined_token(files: dict) -> None:
    files["tokenizer.json"]["post_processor"]["single"][1]["SpecialToken"]["id"] = "x"


@pytest.mark.parametrize(("change", "message"), [
    # the Rust tokenizer panics: pyo3's PanicException is a BaseException that no `except Exception` caught
    (_post_processor_names_an_undefined_token, r"cannot tokenize a text \(PanicException: no entry found"),
    (lambda files: files["tokenizer.json"]["model"]["vocab"].pop("<unk>"),
     r"cannot tokenize a text \(Exception: WordLevel error: Missing \[UNK\]"),
    # added as a new token past vocab_size: SigLIP pads every text with it (IndexError in the embedding)
    (lambda files: files["tokenizer_config.json"].update(pad_token="zzz"),
     r"padding token 'zzz' has id 25, outside the model's vocabulary \(text_config.vocab_size 25\)"),
])
def test_tokenizer_files_that_load_but_cannot_tokenize_are_refused_at_load(siglip_dir, phantom, tmp_path, change,
                                                                           message):
    folder = tmp_path / "tokenizer"
    shutil.copytree(siglip_dir, folder)
    files = {name: json.loads((folder / name).read_text()) for name in ("tokenizer.json", "tokenizer_config.json")}
    change(files)
    for name, content in files.items():
        (folder / name).write_text(json.dumps(content))
    with pytest.raises(ModelError, match=message) as error:
        load_model(folder)
    assert str(error.value).startswith(f"{folder}: the tokenizer") and "\n" not in str(error.value)
    result, output = invoke("predict", "--model", folder, _images(phantom, 1)[0], "--labels", "nodule,normal")
    assert result.exit_code == 2 and "the tokenizer" in output and "Traceback" not in output


def test_a_tokenizer_saved_padding_on_the_left_embeds_as_on_the_right_whatever_the_batch(hf_dir, tmp_path):
    """A folder whose tokenizer_config.json says padding_side "left" gave CLIP a text's vector that depended on the
    longer texts beside it (cosine 0.23 to the same text alone) and SigLIP a vector pooled at the end token rather
    than the padding it was trained with; both now pad (and truncate) on the right."""
    left = tmp_path / "left"
    shutil.copytree(hf_dir, left)
    config = json.loads((left / "tokenizer_config.json").read_text())
    (left / "tokenizer_config.json").write_text(json.dumps({**config, "padding_side": "left",
                                                            "truncation_side": "left"}))
    short, long = TEXTS[1], "small left pleural effusion and a nodule in the right upper zone."
    model, right = load_model(left), load_model(hf_dir)
    alone, beside = model.encode_texts([short])[0], model.encode_texts([short, long])[0]
    assert torch.allclose(alone, beside, atol=1e-5)
    assert torch.allclose(model.encode_texts([short, long]), right.encode_texts([short, long]), atol=1e-5)


def test_an_unsupported_model_type_is_a_clear_error(phantom, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(ModelError, match=r"model_type 'llava' is not supported"):
        load_model(tmp_path)
    result, output = invoke("eval", "retrieval", "--model", tmp_path, "--data", phantom, "-q")
    assert result.exit_code == 2 and "llava" in output


def test_the_service_loads_the_folder(hf_dir):
    pytest.importorskip("fastapi")
    from medvl.serve.service import ModelService
    from medvl.serve.settings import ServeSettings

    service = ModelService(hf_dir, None, ServeSettings())  # backend auto: eager torch for a transformers folder
    described = service.describe()
    assert described["backend"] == "torch"
    assert described["name"] == hf_dir.name and described["image"]["in_channels"] == 3
    pixels = service.net.preprocessor.load(np.zeros((50, 60), np.uint8))  # what the micro-batcher encodes
    assert service.net.encode_images(pixels[None]).shape == (1, described["embed_dim"])
    service.model_thread.shutdown()


@pytest.mark.parametrize("command", ["vqa", "report"])
def test_an_adapted_folder_cannot_start_a_vqa_model_or_a_report_generator(hf_dir, tmp_path, command):
    """``--init`` copies a medvl dual encoder's image tower. An ``HFDualEncoder`` is a ``DualEncoder``, so it passed
    the check and the MONAI tower was given the transformers tower's weights: a traceback (exit 1)."""
    from medvl.data.phantom import generate_phantom
    from medvl.errors import InputError
    from medvl.models.registry import load_init_model

    with pytest.raises(InputError, match="--init takes a medvl dual encoder folder"):
        load_init_model(hf_dir)
    data = tmp_path / "data"
    generate_phantom(data, n=12, seed=0, size=32, vqa=command == "vqa")
    out = tmp_path / "run"
    result, output = invoke("train", command, "--data", data / "vqa" if command == "vqa" else data, "--out", out,
                            "--init", hf_dir, "--max-steps", 1, "-q")
    kind = "clip" if "clip" in hf_dir.name else "siglip"
    assert result.exit_code == 2 and f"(this is a transformers {kind} folder)" in " ".join(output.split()), output
    assert "Traceback" not in output and not out.exists()


def test_concepts_longer_than_a_transformers_text_tower_reads_are_refused_naming_the_line(hf_dir, tmp_path):
    """The concept-length check skipped transformers towers: two phrases differing only past the tower's position
    embeddings (64 tokens for CLIP, 16 for SigLIP here) got one vector and counted as two concepts. The count is the
    one ``embed_texts`` cuts at: the longest phrase that fits reads the same tokens cut or not."""
    from medvl.explain.concepts import concept_embeddings, concept_prompts, load_concepts

    model = load_model(hf_dir)
    long = "nodule " * 80
    path = tmp_path / "bank.txt"
    path.write_text(f"enlarged heart\n{long}left\n{long}right\n")
    with pytest.raises(DataError, match=r"bank\.txt: line 2: the concept phrase is \d+ tokens long"):
        concept_embeddings(model, load_concepts(path))
    words, fitting = 0, []
    while True:
        try:
            prompts = concept_prompts(model, load_concepts(_bank(path, "nodule " * (words + 1))))[1]
        except DataError:
            break
        words, fitting = words + 1, prompts
    assert 0 < words < 80
    templates = [p.replace(("nodule " * words).strip(), "{}") for p in fitting]
    assert all("{}" in t for t in templates)
    refused = [t.format(("nodule " * (words + 1)).strip()) for t in templates]  # the first refused is read cut
    cuts = model.text_tokens(refused)
    assert any(len(cut) < len(model.tokenizer(p)["input_ids"]) for cut, p in zip(cuts, refused, strict=True))
    assert model.text_tokens(fitting) == [tuple(model.tokenizer(p)["input_ids"]) for p in fitting]
    assert len(concept_embeddings(model, load_concepts(_bank(path, "nodule " * words)))) == 2


def _bank(path: Path, phrase: str) -> Path:
    path.write_text(f"enlarged heart\n{phrase}\n")
    return path
