"""The image audit (``medvl audit``, ``medvl.data.audit``): content checks on real and constructed
images, exact and near duplicates across splits, unreadable files, and training without flagged images."""

import csv
import json

import numpy as np
import pytest
from PIL import Image

from cli_helpers import invoke
from medvl.data import load_dataset
from medvl.data.audit import audit_dataset, difference_hash, flagged_ids, image_checks
from medvl.data.images import pixel_sha256, read_image
from medvl.errors import InputError


def smooth_image(seed: int, side: int = 96) -> np.ndarray:
    """A natural-looking 8-bit RGB image: low-frequency noise with a dark blob, no orientation."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(60, 200, size=(8, 8, 3)).astype(np.float32)
    image = np.asarray(Image.fromarray(coarse.astype(np.uint8)).resize((side, side), Image.Resampling.BICUBIC))
    yy, xx = np.mgrid[:side, :side]
    blob = ((yy - side * rng.uniform(0.3, 0.7)) ** 2 + (xx - side * rng.uniform(0.3, 0.7)) ** 2) < (side / 5) ** 2
    image = image.astype(np.float32)
    image[blob] *= 0.4
    return np.clip(image + rng.normal(0, 3, image.shape), 0, 255).astype(np.uint8)


def jpeg_round_trip(array: np.ndarray, path) -> np.ndarray:
    Image.fromarray(array).save(path, quality=90)
    return read_image(path)


def test_content_checks_on_constructed_images(tmp_path):
    natural = smooth_image(0)
    assert image_checks(natural)["flags"] == []
    assert image_checks(np.full((64, 64), 17, np.uint8))["flags"] == ["blank"]
    assert image_checks(np.zeros((16, 16, 16), np.float32))["flags"] == ["blank"]  # a constant volume
    rows = jpeg_round_trip(np.repeat(natural[40:41], 96, axis=0), tmp_path / "rows.jpg")  # one line stretched
    checked = image_checks(rows)
    assert checked["flags"] == ["streaked"] and "rows repeat" in checked["detail"]["streaked"]
    columns = image_checks(np.repeat(natural[:, 50:51], 96, axis=1))
    assert columns["flags"] == ["streaked"] and "columns repeat" in columns["detail"]["streaked"]
    # a real structure with strong horizontal edges (stripes with noise) is not a streak
    stripes = np.repeat((np.arange(96) // 8 % 2 * 120 + 60).astype(np.uint8)[:, None], 96, axis=1)
    stripes = np.clip(stripes + np.random.default_rng(1).normal(0, 20, stripes.shape), 0, 255).astype(np.uint8)
    assert image_checks(stripes)["flags"] == []
    volume = np.random.default_rng(2).normal(size=(8, 32, 32)).astype(np.float32)
    assert image_checks(volume)["flags"] == []  # no axis check for volumes


def test_a_float64_image_beyond_float32s_range_is_checked_on_its_own_values(tmp_path):
    """Cast to float32 first, values above 3.4e38 became inf and those below about 1e-45 became 0: full-contrast
    noise was flagged blank, with numpy RuntimeWarnings."""
    import warnings

    noise = np.random.default_rng(0).random((64, 64))
    plain = image_checks(noise)
    for scale in (1e300, 1e-300):
        np.save(tmp_path / "scaled.npy", noise * scale)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            checked = image_checks(read_image(tmp_path / "scaled.npy"))
        assert checked["flags"] == [] and checked["dhash"] == plain["dhash"], scale
        assert np.abs(checked["thumbnail"].astype(int) - plain["thumbnail"]).max() <= 1


def test_a_16_bit_image_is_judged_blank_on_its_bit_depth_as_at_8_bits(tmp_path):
    """Stretched from its own min-max, a 16-bit frame of noise (a dark frame, 4 counts over 65,535 levels) was full
    contrast and passed, while the same picture saved at 8 bits was blank."""
    rng = np.random.default_rng(0)
    flat8 = (128 + rng.integers(0, 2, (64, 64))).astype(np.uint8)  # one grey level of noise
    pictures = {"flat8": flat8, "flat16": flat8.astype(np.uint16) * 257,  # the same picture at 16 bits
                "dark16": (2000 + rng.integers(0, 4, (64, 64))).astype(np.uint16),  # 4 counts on a 12-bit detector
                "ct": (-1000 + rng.integers(0, 4, (64, 64))).astype(np.int16)}  # air, as signed DICOM values
    natural = smooth_image(0)[..., 0]
    content = {"natural16": natural.astype(np.uint16) * 257, "natural12": natural.astype(np.uint16) * 16,
               "dim": (natural.astype(np.uint16) // 4 + 1000)}  # 41 counts of 2,047 (11 bits): faint, not blank
    for name, array in {**pictures, **content}.items():
        if array.dtype == np.int16:
            np.save(tmp_path / f"{name}.npy", array)
        else:
            Image.fromarray(array).save(tmp_path / f"{name}.png")
        read = read_image(tmp_path / (f"{name}.npy" if array.dtype == np.int16 else f"{name}.png"))
        assert read.dtype == array.dtype
        flags = image_checks(read)["flags"]
        assert flags == (["blank"] if name in pictures else []), (name, flags)
    assert "16-bit scale" in image_checks(pictures["flat16"])["detail"]["blank"]


def test_real_isic_files(shared_data):
    images = shared_data / "isic-dermoscopy" / "images"
    streaked = image_checks(read_image(images / "ISIC_0000001.jpg"))  # every row of this file is the same
    assert streaked["flags"] == ["streaked"]
    assert image_checks(read_image(images / "ISIC_0000506.jpg"))["flags"] == []  # a lesion on skin
    # smeared as the others (every row the same line) with more JPEG noise across the line: their ratio is 0.26-0.34,
    # above STREAK_RATIO, but neighbouring rows differ by under half a grey level
    for number in (111, 114, 116, 121, 122, 131, 137, 143):
        assert image_checks(read_image(images / f"ISIC_{number:07d}.jpg"))["flags"] == ["streaked"], number
    for number in (150, 210, 512):  # the next ratios up, lesions on skin
        assert image_checks(read_image(images / f"ISIC_{number:07d}.jpg"))["flags"] == [], number


def test_difference_hash_survives_resizing_and_reencoding(tmp_path):
    image = smooth_image(3, side=128)
    small = np.asarray(Image.fromarray(image).resize((100, 100), Image.Resampling.LANCZOS))
    again = jpeg_round_trip(small, tmp_path / "again.jpg")
    gray = image.astype(np.float32).mean(-1)
    assert difference_hash(gray) == difference_hash(again.astype(np.float32).mean(-1))
    assert difference_hash(gray) != difference_hash(smooth_image(4, side=128).astype(np.float32).mean(-1))


def test_one_hash_on_different_radiographs_is_no_near_duplicate(tmp_path, shared_data):
    """Chest radiographs of different patients often share a difference hash (dark lungs either side of a bright
    mediastinum): on 150 phantom patients the hash alone made 86 near duplicates and 14 leaks, and on the shared
    PneumoniaMNIST 56 near duplicates and 7 false leaks. The pixel check keeps only copies: a resized re-encoded
    copy of a radiograph is still found."""
    from medvl.data.phantom import generate_phantom

    generate_phantom(tmp_path / "phantom", n=150, seed=0, size=96)
    phantom = audit_dataset(load_dataset(tmp_path / "phantom"), show_progress=False)
    assert phantom["counts"]["near_duplicate"] == 0 and phantom["leaks"] == []
    audit = audit_dataset(load_dataset(shared_data / "pneumoniamnist" / "pneumoniamnist.npz"), show_progress=False)
    assert audit["counts"] == {"unreadable": 0, "blank": 0, "streaked": 0, "duplicate": 48, "near_duplicate": 0}
    assert len(audit["leaks"]) == 8 and {g["kind"] for g in audit["leaks"]} == {"exact"}
    folder = tmp_path / "copy"
    folder.mkdir()
    film = read_image(tmp_path / "phantom" / "images" / "phantom_00001.png")
    Image.fromarray(film).save(folder / "a.png")
    Image.fromarray(film).resize((72, 72)).save(folder / "a_small.jpg", quality=90)
    (folder / "manifest.csv").write_text("image,split\na.png,train\na_small.jpg,test\n")
    copied = audit_dataset(load_dataset(folder / "manifest.csv"), show_progress=False)
    assert [(g["kind"], g["leak"]) for g in copied["leaks"]] == [("near", True)]


def test_a_brightened_or_re_windowed_copy_is_a_near_duplicate_and_a_leak(tmp_path, shared_data):
    """The pixel check compared raw grey levels: a copy 10 % brighter, re-windowed (0.8 v + 30) or exported at
    16 bits kept the difference hash and was rejected as another picture, so a test image re-exported into the
    training set was no leak. Brightness and contrast are evened out before the comparison (look-alikes of one hash
    still stay apart: the test above)."""
    film = np.asarray(Image.open(shared_data / "medpix-2.0" / "images" / "MPX1009_synpic46283.jpg").convert("L"))
    levels = film.astype(np.float64)
    Image.fromarray(film).save(tmp_path / "original.png")
    Image.fromarray(np.clip(levels * 1.1, 0, 255).astype(np.uint8)).save(tmp_path / "brighter.png")
    Image.fromarray(np.clip(levels * 0.8 + 30, 0, 255).astype(np.uint8)).save(tmp_path / "windowed.png")
    Image.fromarray((levels * 200 + 1000).astype(np.uint16)).save(tmp_path / "sixteen.png")
    (tmp_path / "manifest.csv").write_text("image,split\noriginal.png,train\nbrighter.png,test\nwindowed.png,val\n"
                                           "sixteen.png,test\n")
    audit = audit_dataset(load_dataset(tmp_path / "manifest.csv"), show_progress=False, near_distance=1)
    assert audit["counts"]["near_duplicate"] == 4 and {g["kind"] for g in audit["duplicate_groups"]} == {"near"}
    pairs = {frozenset(g["ids"]) for g in audit["duplicate_groups"]}
    assert {frozenset({"original", copy}) for copy in ("brighter", "windowed", "sixteen")} <= pairs
    assert all(g["leak"] for g in audit["duplicate_groups"] if "original" in g["ids"])


@pytest.fixture()
def audited_folder(tmp_path):
    """A manifest: two splits, an exact duplicate across them, a re-encoded copy, a streak, a corrupt file."""
    folder = tmp_path / "data"
    folder.mkdir()
    first, other = smooth_image(10, 128), smooth_image(11, 128)
    Image.fromarray(first).save(folder / "a.png")
    Image.fromarray(first).save(folder / "a_copy.png")  # same pixels
    Image.fromarray(np.asarray(Image.fromarray(first).resize((112, 112)))).save(folder / "a_small.jpg", quality=85)
    Image.fromarray(other).save(folder / "b.png")
    Image.fromarray(np.repeat(other[60:61], 128, axis=0)).save(folder / "streak.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    rows = [("a.png", "train", "nevus"), ("a_copy.png", "test", "nevus"), ("a_small.jpg", "train", "nevus"),
            ("b.png", "train", "melanoma"), ("streak.png", "train", "melanoma"), ("broken.png", "test", "nevus")]
    with (folder / "manifest.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "split", "diagnosis"])
        writer.writerows(rows)
    return folder / "manifest.csv"


def test_audit_finds_duplicates_leaks_streaks_and_unreadable_files(audited_folder):
    audit = audit_dataset(load_dataset(audited_folder), label="diagnosis", show_progress=False)
    flags = {r["id"]: sorted(r["flags"]) for r in audit["records"]}
    assert flags == {"a": ["duplicate", "near_duplicate"], "a_copy": ["duplicate", "near_duplicate"],
                     "a_small": ["near_duplicate"], "streak": ["streaked"], "broken": ["unreadable"]}
    assert audit["n"] == 6 and audit["flagged"] == 5
    assert audit["counts"] == {"unreadable": 1, "blank": 0, "streaked": 1, "duplicate": 2, "near_duplicate": 3}
    exact = [g for g in audit["duplicate_groups"] if g["kind"] == "exact"]
    assert exact == [{"kind": "exact", "ids": ["a", "a_copy"], "splits": ["test", "train"], "leak": True}]
    near = [g for g in audit["duplicate_groups"] if g["kind"] == "near"]
    assert len(near) == 1 and sorted(near[0]["ids"]) == ["a", "a_copy", "a_small"]
    broken = next(r for r in audit["records"] if r["id"] == "broken")
    assert "broken.png" in broken["detail"]["unreadable"]
    assert audit["by_class"] == {"melanoma": {"records": 2, "content_flagged": 1},
                                 "nevus": {"records": 4, "content_flagged": 1}}
    assert flagged_ids(audit) == {"streak", "broken"}
    assert flagged_ids(audit, ["duplicate"]) == {"a", "a_copy"}
    with pytest.raises(InputError, match="unknown audit flags"):
        flagged_ids(audit, ["blurry"])
    with pytest.raises(InputError, match="unknown label column"):
        audit_dataset(load_dataset(audited_folder), label="sex", show_progress=False)


def test_audit_command(audited_folder, tmp_path):
    out = tmp_path / "audit.json"
    result, output = invoke("audit", "--data", audited_folder, "--label-column", "diagnosis", "--json", out, "-q")
    assert result.exit_code == 0, output
    assert "groups across splits (leaks)" in output and "streak (train): streaked" in output
    assert json.loads(out.read_text())["leaks"][0]["ids"] == ["a", "a_copy"]
    result, output = invoke("audit", "--data", audited_folder, "--split", "test", "-q")
    assert result.exit_code == 0 and "leaks" in output  # one split: no group spans splits
    result, _ = invoke("audit", "--data", audited_folder, "--label-column", "sex", "-q")
    assert result.exit_code == 2


def test_against_split_without_against_is_refused(audited_folder):
    """--against-split without --against was ignored without a word, even naming a split that does not exist."""
    result, output = invoke("audit", "--data", audited_folder, "--against-split", "nosuchsplit", "-q")
    assert result.exit_code == 2 and "--against-split 'nosuchsplit' is a split of the dataset to compare with, and " \
        "none is given" in " ".join(output.split()), output
    assert "Image audit" not in output


def test_audit_lists_missing_image_files_as_unreadable_while_training_still_refuses_them(audited_folder, tmp_path):
    """One audit run lists every problem: missing files beside the damaged one, where the loader stopped at the
    first missing file before any image was checked."""
    (audited_folder.parent / "b.png").unlink()
    (audited_folder.parent / "streak.png").unlink()
    out = tmp_path / "audit.json"
    result, output = invoke("audit", "--data", audited_folder, "--json", out, "-q")
    assert result.exit_code == 0, output
    audit = json.loads(out.read_text())
    unreadable = {r["id"]: r["detail"]["unreadable"] for r in audit["records"] if "unreadable" in r["flags"]}
    assert sorted(unreadable) == ["b", "broken", "streak"] and audit["counts"]["unreadable"] == 3
    assert "b.png: file not found" in unreadable["b"] and "streak.png" in unreadable["streak"]
    assert audit["n"] == 6
    result, output = invoke("train", "--data", audited_folder, "--out", tmp_path / "run", "-q")
    assert result.exit_code == 2 and "2 of 6 image files not found" in output, output


def test_audit_refuses_a_negative_show(audited_folder):
    """A negative --show is one line and exit 2 before any image is read (it listed no record, exit 0)."""
    result, output = invoke("audit", "--data", audited_folder, "--show", -1, "-q")
    assert result.exit_code == 2 and "show must be >= 0, got -1" in output
    assert "Image audit" not in output


def test_training_can_skip_flagged_images(audited_folder, tmp_path):
    from medvl.api import train_from_path

    model = train_from_path(audited_folder, tmp_path / "run", "phantom-tiny", split="train",
                            label_columns=["diagnosis"], epochs=1, batch_size=4, skip_flagged=True, show_progress=False)
    assert model.meta["training"]["records"] == 3  # a, a_small, b: the streak is left out (duplicates are kept)
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["train"]["skip_flagged"] is True
    only_flagged = audited_folder.with_name("flagged.csv")
    only_flagged.write_text("image,diagnosis\nstreak.png,melanoma\nbroken.png,nevus\n")
    with pytest.raises(InputError, match="every training image is flagged"):
        train_from_path(only_flagged, tmp_path / "run2", "phantom-tiny", label_columns=["diagnosis"], epochs=1,
                        skip_flagged=True, show_progress=False)


def test_records_sharing_a_file_are_checked_once_and_not_duplicates(shared_data, tmp_path):
    questions = audit_dataset(load_dataset(shared_data / "vqa-rad" / "trainset.json"), show_progress=False)
    assert questions["n"] == 3064 and questions["files"] == 314  # about ten questions per image
    assert questions["counts"]["duplicate"] == 0 and questions["leaks"] == []
    image = tmp_path / "scan.png"
    Image.fromarray(smooth_image(5)).save(image)
    manifest = tmp_path / "shared.csv"
    manifest.write_text("id,image,split\nq1,scan.png,train\nq2,scan.png,test\n")
    audit = audit_dataset(load_dataset(manifest), show_progress=False)
    assert audit["files"] == 1 and audit["flagged"] == 0
    assert audit["leaks"] == [{"kind": "file", "ids": ["q1", "q2"], "splits": ["test", "train"], "leak": True}]


def test_audit_command_names_a_file_used_in_two_splits_and_counts_records_and_images(tmp_path):
    """A file named by a train and a test row is a leak the output counted but never named (no record flag names
    it), and the title called the records images."""
    Image.fromarray(smooth_image(7)).save(tmp_path / "a.png")
    Image.fromarray(smooth_image(8)).save(tmp_path / "b.png")
    (tmp_path / "manifest.csv").write_text("id,image,split\nq1,a.png,train\nq2,a.png,test\nq3,b.png,train\n")
    result, output = invoke("audit", "--data", tmp_path / "manifest.csv", "-q")
    assert result.exit_code == 0, output
    output = " ".join(output.split())
    assert "(all: 3 records, 2 images)" in output and "one file used in test, train: q1, q2" in output


def test_ids_and_splits_that_begin_with_against_are_audited_as_any_other(tmp_path):
    """The --against records were told apart by an 'against:' prefix on their ids and splits, so this dataset's
    own records with such an id were left out of the duplicates and leaks, even without --against."""
    Image.fromarray(smooth_image(7)).save(tmp_path / "b.png")
    Image.fromarray(smooth_image(7)).save(tmp_path / "b_copy.png")
    Image.fromarray(smooth_image(8)).save(tmp_path / "c.png")
    for name, row in (("ids", "b.png,against:1,train"), ("splits", "b.png,1,against:train")):
        (tmp_path / f"{name}.csv").write_text(f"image,id,split\n{row}\nb_copy.png,2,test\nc.png,3,train\n")
        audit = audit_dataset(load_dataset(tmp_path / f"{name}.csv"), show_progress=False)
        assert audit["counts"]["duplicate"] == 2 and audit["files"] == 3, name
        assert [group["ids"] for group in audit["leaks"]] == [[row.split(",")[1], "2"]], name
    with_against = audit_dataset(load_dataset(tmp_path / "ids.csv"), show_progress=False,
                                 against=load_dataset(tmp_path / "splits.csv"))
    assert with_against["counts"]["duplicate"] == 2 and len(with_against["leaks"]) == 1
    assert with_against["against"]["records"] == {"data": 3, "against": 3}


def test_audit_messages_name_its_own_options_and_no_model(tmp_path):
    """--workers said it reads images 'ahead of the model' (audit has none), and an out-of-range --near-distance
    was named without its dashes."""
    Image.fromarray(smooth_image(7)).save(tmp_path / "a.png")
    (tmp_path / "manifest.csv").write_text("image\na.png\n")
    result, output = invoke("audit", "--data", tmp_path, "--near-distance", 17, "-q")
    assert result.exit_code == 2 and "error: --near-distance must be <= 16, got 17" in output
    import typer

    from medvl.cli.main import app

    audit = typer.main.get_command(app).commands["audit"]  # type: ignore[attr-defined]
    workers = next(param.help for param in audit.params if param.name == "workers")
    assert workers.startswith("Processes reading images ahead of the checks") and "model" not in workers


def test_close_pairs_are_the_pairs_within_the_distance():
    from medvl.data.audit import _close_pairs

    rng = np.random.default_rng(0)
    hashes = [int(h) for h in rng.integers(0, 2**63, size=40, dtype=np.int64)]
    hashes += [hashes[0] ^ 1, hashes[1] ^ 0b1011, hashes[2]]  # 1, 3 and 0 bits from earlier ones
    for distance in (0, 1, 3, 30):
        expected = [(i, j) for i in range(len(hashes)) for j in range(i + 1, len(hashes))
                    if bin(hashes[i] ^ hashes[j]).count("1") <= distance]
        assert _close_pairs(hashes, distance) == expected
    assert (0, 40) in _close_pairs(hashes, 1) and (1, 41) not in _close_pairs(hashes, 2)


def test_against_finds_the_copies_of_one_dataset_in_another(audited_folder, tmp_path):
    """Another folder holding an exact copy of a.png, a re-encoded copy of b.png and an unrelated image: its
    records are reported apart, and the audited dataset's own figures do not change."""
    other = tmp_path / "other"
    other.mkdir()
    folder = audited_folder.parent
    (other / "same.png").write_bytes((folder / "a.png").read_bytes())
    jpeg_round_trip(read_image(folder / "b.png"), other / "b_again.jpg")
    Image.fromarray(smooth_image(12, 128)).save(other / "new.png")
    (other / "manifest.csv").write_text("image,diagnosis\nsame.png,nevus\nb_again.jpg,melanoma\nnew.png,nevus\n")
    plain = audit_dataset(load_dataset(audited_folder), label="diagnosis", show_progress=False)
    audit = audit_dataset(load_dataset(audited_folder), label="diagnosis", show_progress=False,
                          against=load_dataset(other / "manifest.csv"))
    assert (audit["n"], audit["files"], audit["by_class"], audit["leaks"]) == \
        (plain["n"], plain["files"], plain["by_class"], plain["leaks"])
    overlap = audit["against"]
    assert overlap["n"] == 3 and overlap["records"] == {"data": 4, "against": 2}  # a, a_copy, a_small, b; 2 copies
    exact = [g for g in overlap["overlap_groups"] if g["kind"] == "exact"]
    assert exact == [{"kind": "exact", "ids": ["a", "a_copy", "against:same"], "splits": ["against:all", "test",
                                                                                            "train"], "leak": True}]
    assert {"b", "against:b_again"} <= {i for g in overlap["overlap_groups"] for i in g["ids"]}
    b = next(r for r in audit["records"] if r["id"] == "b")
    assert b["flags"] == ["near_duplicate"] and "against:b_again" in b["detail"]["near_duplicate"]


def test_against_the_other_split_of_the_same_file_counts_both_sides(tmp_path):
    """``--data X --split val --against X --against-split train`` (one manifest's val against its train): the table
    has a row per side, named by option and split. The rows were named by path, so the second overwrote the first
    and the val count was lost."""
    for name, seed in (("a", 7), ("b", 8), ("c", 9)):
        Image.fromarray(smooth_image(seed)).save(tmp_path / f"{name}.png")
    (tmp_path / "a_copy.png").write_bytes((tmp_path / "a.png").read_bytes())
    (tmp_path / "a_again.png").write_bytes((tmp_path / "a.png").read_bytes())
    (tmp_path / "manifest.csv").write_text("id,image,split\nv1,a.png,val\nv2,c.png,val\n"
                                           "t1,a_copy.png,train\nt2,a_again.png,train\nt3,b.png,train\n")
    out = tmp_path / "audit.json"
    result, output = invoke("audit", "--data", tmp_path / "manifest.csv", "--split", "val", "--against",
                            tmp_path / "manifest.csv", "--against-split", "train", "--json", out, "--show", 0, "-q")
    assert result.exit_code == 0, output
    assert json.loads(out.read_text())["against"]["records"] == {"data": 1, "against": 2}
    output = " ".join(output.split())
    assert "records of --data (val) in them │ 1 │" in output, output
    assert "records of --against (train) in them │ 2 │" in output, output


def test_against_on_the_real_overlap_of_medpix_and_vqa_rad(shared_data, tmp_path):
    """VQA-RAD's training questions ask about 17 images of MedPix 2.0's train split (by MedPix id): difference
    hashes 1 bit apart find 13 of them (the same hash: 5), and 1 other image (an adjacent slice of an image
    VQA-RAD asks about); the look-alike the hash alone matched fails the pixel check."""
    from medvl.data.loaders.vqa import question_image_ids, source_image_id

    asked = question_image_ids(shared_data / "vqa-rad" / "trainset.json")
    out = tmp_path / "audit.json"
    result, output = invoke("audit", "--data", shared_data / "medpix-2.0", "--split", "train", "--against",
                            shared_data / "vqa-rad" / "trainset.json", "--near-distance", 1, "--show", 0,
                            "--json", out, "-q")
    assert result.exit_code == 0, output
    groups = json.loads(out.read_text())["against"]["overlap_groups"]
    found = {source_image_id(i) for g in groups for i in g["ids"] if not i.startswith("against:")}
    assert len(found & asked) == 13 and len(found - asked) == 1
    assert "groups of near copies" in output and "records of" in output
    result, output = invoke("audit", "--data", shared_data / "medpix-2.0", "--near-distance", 17, "-q")
    assert result.exit_code == 2 and "near-distance must be <= 16" in output


def test_multi_frame_colour_dicom_is_checked_as_its_frames(tmp_path):
    """pydicom's 2-frame RGB DICOM (2, 100, 100, 3): the audit checks it as its channel-mean frames (and hashes
    their mean frame), as it does a multi-frame grayscale DICOM; it used to stop the audit with a TypeError."""
    pytest.importorskip("data_store")
    from pydicom.data import get_testdata_file

    source = get_testdata_file("SC_rgb_2frame.dcm")
    frames = read_image(source)
    assert frames.shape == (2, 100, 100, 3)
    checked = image_checks(frames)
    assert checked["flags"] == [] and len(checked["dhash"]) == 16
    assert checked["dhash"] == difference_hash(frames.astype(np.float32).mean(-1).mean(0))
    (tmp_path / "scan.dcm").write_bytes(open(source, "rb").read())
    Image.fromarray(smooth_image(6)).save(tmp_path / "a.png")
    (tmp_path / "manifest.csv").write_text("image,label\nscan.dcm,x\na.png,y\n")
    out = tmp_path / "audit.json"
    result, output = invoke("audit", "--data", tmp_path / "manifest.csv", "--json", out, "-q")
    assert result.exit_code == 0, output
    audit = json.loads(out.read_text())
    assert (audit["n"], audit["files"], audit["flagged"]) == (2, 2, 0)


def test_every_film_of_a_multi_image_question_is_audited(tmp_path):
    """A VQA question on two films: only its first film used to be read, so a corrupt film that is only ever a
    second film left 'unreadable 0'. Each film is read once, and a question gets the flags of all its films."""
    from medvl.data.phantom import generate_phantom

    generate_phantom(tmp_path / "ph", n=40, seed=1, size=32, vqa=True)
    dataset = load_dataset(tmp_path / "ph" / "vqa")
    every = {film.resolve() for record in dataset for film in record.images}
    later = sorted(every - {record.images[0].resolve() for record in dataset})
    assert later, "the phantom has questions whose second film no question names first"
    later[0].write_bytes(b"not a png")
    audit = audit_dataset(dataset, show_progress=False)
    assert audit["files"] == len(every) and audit["counts"]["unreadable"] > 0
    damaged = [r for r in dataset if later[0].resolve() in {film.resolve() for film in r.images}]
    flagged = {r["id"]: r for r in audit["records"] if "unreadable" in r["flags"]}
    assert set(flagged) == {r.id for r in damaged}
    assert all("image 2: " in flagged[r.id]["detail"]["unreadable"] for r in damaged)


def test_a_grey_image_and_its_rgb_and_rgba_copies_are_the_same_pixels_even_when_streaked_or_blank(tmp_path):
    """The exact-duplicate key was the decoded array as it is, so a grey film and its RGB / RGBA export (three equal
    channels, as PACS and viewers write it) were no duplicate; blank and streaked images are left out of the near
    pass, so such a pair in train and test was no leak at all. The key is now the picture as a model reads its
    channels (``pixel_sha256``), as the case index hashes it."""
    rng = np.random.default_rng(0)
    streak = np.tile(rng.integers(0, 255, 128).astype(np.uint8), (128, 1))  # every row the same line
    blank = ((rng.random((64, 64)) > 0.5) + 10).astype(np.uint8)  # one grey level of noise
    Image.fromarray(streak).save(tmp_path / "s_grey.png")
    Image.fromarray(streak).convert("RGB").save(tmp_path / "s_rgb.png")
    Image.fromarray(streak).convert("RGBA").save(tmp_path / "s_rgba.png")
    Image.fromarray(blank).save(tmp_path / "b_grey.png")
    Image.fromarray(blank).convert("RGB").save(tmp_path / "b_rgb.png")
    colour = smooth_image(9)  # a colour picture is never its grey version
    Image.fromarray(colour).save(tmp_path / "c_rgb.png")
    Image.fromarray(colour.mean(-1).astype(np.uint8)).save(tmp_path / "c_grey.png")
    (tmp_path / "manifest.csv").write_text(
        "image,split\ns_grey.png,train\ns_rgb.png,test\ns_rgba.png,val\nb_grey.png,train\nb_rgb.png,test\n"
        "c_rgb.png,train\nc_grey.png,test\n")
    audit = audit_dataset(load_dataset(tmp_path / "manifest.csv"), show_progress=False)
    exact = [(g["ids"], g["splits"], g["leak"]) for g in audit["duplicate_groups"] if g["kind"] == "exact"]
    assert exact == [(["s_grey", "s_rgb", "s_rgba"], ["test", "train", "val"], True),
                     (["b_grey", "b_rgb"], ["test", "train"], True)]
    assert audit["counts"]["duplicate"] == 5 and audit["counts"]["streaked"] == 3 and audit["counts"]["blank"] == 2
    detail = {r["id"]: r["detail"] for r in audit["records"]}
    assert detail["s_grey"]["duplicate"] == "same pixels as s_rgb, s_rgba"
    assert image_checks(read_image(tmp_path / "s_rgb.png"))["sha256"] == pixel_sha256(streak)


def test_a_nifti_file_one_voxel_thick_is_audited_as_the_2d_image_a_model_reads(tmp_path):
    """The audit read a one-slice NIfTI as the (1, H, W) volume stored: no row / column check (a streaked slice
    passed while ``input_flags`` flags the model's input), and hashed un-turned, so a PNG of the slice as a 2D model
    and the reading page see it (``read_image_2d``) in another split was no duplicate and no leak."""
    nib = pytest.importorskip("nibabel")
    from medvl.data.images import read_image_2d

    def save_slice(picture: np.ndarray, path) -> None:  # one axial slice, stored as RAS (x, y, 1)
        nib.save(nib.Nifti1Image(np.ascontiguousarray(picture[::-1, ::-1].T[:, :, None]), np.eye(4)), path)

    picture = smooth_image(10)[..., 0]
    Image.fromarray(picture).save(tmp_path / "slice.png")
    save_slice(picture, tmp_path / "slice.nii.gz")
    streak = np.tile(np.random.default_rng(0).integers(0, 255, 96).astype(np.uint8), (96, 1))
    save_slice(streak, tmp_path / "streak.nii.gz")
    assert np.array_equal(read_image_2d(tmp_path / "slice.nii.gz"), picture)
    (tmp_path / "manifest.csv").write_text("image,split\nslice.png,train\nslice.nii.gz,test\nstreak.nii.gz,train\n")
    audit = audit_dataset(load_dataset(tmp_path / "manifest.csv"), show_progress=False)
    flags = {r["id"]: r["flags"] for r in audit["records"]}
    assert flags == {"slice": ["near_duplicate"], "slice.nii": ["near_duplicate"], "streak.nii": ["streaked"]}
    assert [(g["kind"], g["ids"], g["leak"]) for g in audit["leaks"]] == [("near", ["slice", "slice.nii"], True)]


def test_an_image_so_thin_that_a_model_repeats_its_rows_is_streaked(tmp_path):
    """A single line of pixels (1 x 2000) or two (2 x 2000, 3000 x 2) passed the audit: the axis check needed two
    rows, and two rows differ. A model squashes them to its square input, where ``input_flags`` finds the rows
    repeat; the audit now checks such an image squashed so too, and says so by counting."""
    from medvl.data.audit import input_flags
    from medvl.models.config import ImageConfig
    from medvl.models.preprocess import ImagePreprocessor

    rng = np.random.default_rng(1)
    thin = {"line": (1, 2000), "col": (3000, 2), "thin": (2, 2000)}
    for name, shape in thin.items():
        Image.fromarray(rng.integers(0, 255, shape).astype(np.uint8)).save(tmp_path / f"{name}.png")
    Image.fromarray(smooth_image(11)[:40]).save(tmp_path / "wide.png")  # 40 x 96: a picture, not a streak
    (tmp_path / "manifest.csv").write_text("image\nline.png\ncol.png\nthin.png\nwide.png\n")
    audit = audit_dataset(load_dataset(tmp_path / "manifest.csv"), show_progress=False)
    detail = {r["id"]: r["detail"] for r in audit["records"]}
    assert set(detail) == set(thin) and audit["counts"]["streaked"] == 3
    assert detail["line"]["streaked"] == ("1 row of 2000 pixels: squashed to a square as a model reads it (128 px), "
                                          "each repeats about 128 times: the rows repeat")
    columns = detail["col"]["streaked"]
    assert columns.startswith("2 columns of 3000 pixels:") and columns.endswith("the columns repeat")
    for size in (64, 128):  # the model's input agrees
        preprocessor = ImagePreprocessor(ImageConfig(image_size=size))
        for name in [*thin, "wide"]:
            flags = input_flags(preprocessor.load(tmp_path / f"{name}.png").numpy())
            assert ("streaked" in flags) == (name in thin), (size, name)
