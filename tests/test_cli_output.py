"""What the CLI prints and reads: file names, ids and labels holding "[...]" printed as they are (rich markup dropped
them, or crashed on a closing tag); answers that say when the image held no content as the model sees it, or when the
prompts are bare class names; command-line text that is not UTF-8 refused before any work."""

import csv
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from cli_helpers import invoke
from medvl import create_model
from medvl.predict import predict


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("output") / "model"
    create_model("phantom-tiny").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bracketed(phantom_dir, tmp_path_factory):
    """12 phantom films under file names that look like rich markup."""
    folder = tmp_path_factory.mktemp("bracketed") / "data"
    (folder / "images").mkdir(parents=True)
    with (phantom_dir / "manifest.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))[:12]
    for i, row in enumerate(rows):
        name = f"images/[b]{i}[red].png"
        shutil.copyfile(phantom_dir / row["image"], folder / name)
        row.update(image=name, split="train")
    with (folder / "manifest.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return folder


@pytest.fixture(scope="module")
def odd_images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("odd")
    rng = np.random.default_rng(0)
    Image.fromarray(np.full((64, 64), 90, np.uint8)).save(folder / "blank.png")
    Image.fromarray((rng.random((1, 1)) * 255).astype(np.uint8)).save(folder / "one_pixel.png")
    Image.fromarray((rng.random((3, 600)) * 255).astype(np.uint8)).save(folder / "strip.png")  # stretched to a square
    return folder


def test_predict_says_which_images_hold_no_content_as_the_model_sees_them(model_dir, phantom_dir, odd_images, caplog):
    film = sorted((phantom_dir / "images").glob("*.png"))[0]
    images = [film, odd_images / "blank.png", odd_images / "one_pixel.png", odd_images / "strip.png"]
    rows = predict(model_dir, images, ["nodule", "no_finding"], batch_size=3)  # two batches
    assert [sorted(row["input_flags"]) for row in rows] == [[], ["blank"], ["blank"], ["streaked"]]
    assert "the rows repeat" in rows[3]["input_flags"]["streaked"]
    assert "3 of 4 images are blank or streaked as the model sees them" in caplog.text
    assert all(sum(row["probabilities"].values()) == pytest.approx(1.0) for row in rows)
    # the same answers as one batch: reading in batches changes nothing
    whole = predict(model_dir, images, ["nodule", "no_finding"])
    for one, batched in zip(whole, rows, strict=True):
        assert one["probabilities"] == pytest.approx(batched["probabilities"], abs=1e-5)
        assert one["input_flags"] == batched["input_flags"]


def test_predict_prints_names_and_labels_as_they_are(model_dir, bracketed, odd_images, tmp_path):
    image = bracketed / "images" / "[b]0[red].png"
    result, output = invoke("predict", image, odd_images / "blank.png", "--model", model_dir, "--labels",
                            "[b]nodule,[/i]clear", "--json", tmp_path / "p.json")
    assert result.exit_code == 0, output
    assert "[b]0[red].png: " in output and "[b]nodule" in output and "[/i]clear" in output
    assert "blank as the model sees it: no content to answer on" in " ".join(output.split())
    flags = [row["input_flags"] for row in json.loads((tmp_path / "p.json").read_text())["predictions"]]
    assert [list(f) for f in flags] == [[], ["blank"]]


def test_search_prints_ids_and_file_names_as_they_are(model_dir, bracketed, odd_images, tmp_path):
    result, output = invoke("index", "build", "--model", model_dir, "--data", bracketed, "--split", "train", "--out",
                            tmp_path / "idx", "-q")
    assert result.exit_code == 0, output
    result, output = invoke("search", "--index", tmp_path / "idx", "--image", bracketed / "images" / "[b]3[red].png",
                            "-k", 2)
    assert result.exit_code == 0, output
    assert "images/[b]3[red]" in output and "[b]3[red].png" in output
    result, output = invoke("search", "--index", tmp_path / "idx", "--image", odd_images / "blank.png", "-k", 2,
                            "--json", tmp_path / "s.json")
    assert result.exit_code == 0 and "blank as the model sees it: its nearest cases are not similar" in \
        " ".join(output.split())
    assert list(json.loads((tmp_path / "s.json").read_text())["query"]["input_flags"]) == ["blank"]


def test_explain_says_when_the_image_holds_no_content(model_dir, phantom_dir, odd_images, tmp_path):
    result, output = invoke("explain", odd_images / "strip.png", "--model", model_dir, "--labels", "nodule,no_finding",
                            "--out", tmp_path / "ex")
    assert result.exit_code == 0, output
    assert "streaked as the model sees it: no content to explain" in " ".join(output.split())
    assert list(json.loads((tmp_path / "ex" / "explanation.json").read_text())["input_flags"]) == ["streaked"]
    film = sorted((phantom_dir / "images").glob("*.png"))[0]
    result, output = invoke("explain", film, "--model", model_dir, "--labels", "nodule,no_finding", "--out",
                            tmp_path / "film")
    assert result.exit_code == 0 and "no content" not in output
    assert json.loads((tmp_path / "film" / "explanation.json").read_text())["input_flags"] == {}


def _console_script(*args) -> subprocess.CompletedProcess:
    """``medvl ARGS`` as the installed console script runs it (the argument check runs before the app)."""
    arguments = [a if isinstance(a, bytes) else str(a).encode() for a in args]
    return subprocess.run([sys.executable.encode(), b"-c", b"from medvl.cli.main import run; run()", *arguments],
                          capture_output=True, timeout=300)


def test_text_that_is_not_utf8_is_refused_and_a_file_name_that_is_not_is_read(model_dir, phantom_dir, tmp_path):
    film = sorted((phantom_dir / "images").glob("*.png"))[0]
    refused = _console_script("predict", film, "--model", model_dir, "--labels", b"\xe9panchement,nodule")
    assert refused.returncode == 2 and b"Traceback" not in refused.stderr  # the tokenizer raised TypeError before
    assert b"the value of --labels is not UTF-8 text (byte offset 0)" in refused.stderr
    refused = _console_script("search", "--index", tmp_path / "none", "--text", b"heart caf\xe9")
    assert refused.returncode == 2 and b"the value of --text is not UTF-8 text (byte offset 9)" in refused.stderr
    refused = _console_script("search", "--index", tmp_path / "none", b"--text=heart caf\xe9")
    assert refused.returncode == 2 and b"the value of --text is not UTF-8 text" in refused.stderr
    refused = _console_script("explain", film, "--model", model_dir, "--out", bytes(tmp_path) + b"/ex\xfe")
    assert refused.returncode == 2 and not os.listdir(tmp_path)  # a path option: the terminal is not at fault
    assert b"--out: the path is not UTF-8 (byte offset" in refused.stderr and b"terminal" not in refused.stderr
    for option in ("--json", "--heatmap"):  # text options (a URL or name elsewhere) that name a file here
        refused = _console_script("vqa", film, "--model", model_dir, "--question", "is there a nodule?", option,
                                  bytes(tmp_path) + b"/answer\xfe")
        assert refused.returncode == 2 and not os.listdir(tmp_path)
        assert option.encode() + b": the path is not UTF-8" in refused.stderr and b"terminal" not in refused.stderr
    refused = _console_script("search", "--index", bytes(tmp_path) + b"/cases\xfe", "--text", "heart")
    assert refused.returncode == 2 and b"--index: the path is not UTF-8" in refused.stderr
    latin1 = os.fsdecode(bytes(tmp_path) + b"/caf\xe9.png")  # a name the file system holds as it is
    shutil.copyfile(film, latin1)
    answered = _console_script("predict", os.fsencode(latin1), "--model", model_dir, "--labels", "nodule,no_finding")
    assert answered.returncode == 0, answered.stderr.decode(errors="replace")
    assert b"nodule" in answered.stdout


def test_explain_warns_when_no_one_caption_column_describes_the_labels(model_dir, phantom_dir, tmp_path):
    captions = tmp_path / "captions.yaml"
    captions.write_text("classes:\n  finding:\n    nodule: [a small round opacity]\n    no_finding: [clear lungs]\n"
                        "  view:\n    AP: [an anteroposterior film]\n", encoding="utf-8")
    film = sorted((phantom_dir / "images").glob("*.png"))[0]
    result, output = invoke("explain", film, "--model", model_dir, "--captions", captions, "--labels", "nodule,AP",
                            "--method", "patch_text")
    assert result.exit_code == 0, output
    assert "no label column of the captions describes all 2 classes asked for (0 of them none does)" in \
        " ".join(output.split())
    result, output = invoke("explain", film, "--model", model_dir, "--captions", captions, "--labels",
                            "nodule,no_finding", "--method", "patch_text")
    assert result.exit_code == 0 and "describes" not in output


def test_evaluations_count_the_scored_images_that_hold_no_content(model_dir, phantom_dir, odd_images, tmp_path):
    """A copy of the phantom whose test split gains a uniform film and a stretched strip."""
    data = tmp_path / "data"
    shutil.copytree(phantom_dir, data)
    with (data / "manifest.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    test = [row for row in rows if row["split"] == "test"]
    for name in ("blank.png", "strip.png"):
        shutil.copyfile(odd_images / name, data / "images" / name)
        rows.append({**test[0], "image": f"images/{name}"})
    with (data / "manifest.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    expected = {"records": 2, "of": len(test) + 2, "flags": {"blank": 1, "streaked": 1}}
    for command in (["eval", "zero-shot", "--model", model_dir, "--data", data, "--split", "test",
                     "--label-column", "finding"],
                    ["eval", "linear-probe", "--model", model_dir, "--train-data", data, "--test-data", data,
                     "--few-shot", "1", "--label-column", "finding"],
                    ["eval", "retrieval", "--model", model_dir, "--data", data, "--split", "test"]):
        result, output = invoke(*command, "--json", tmp_path / "out.json", "--overwrite", "-q")
        assert result.exit_code == 0, output
        assert json.loads((tmp_path / "out.json").read_text())["input_content"] == expected
        assert f"2 of {len(test) + 2} scored images are blank or streaked as the model sees them" in \
            " ".join(output.split())
    result, output = invoke("eval", "zero-shot", "--model", model_dir, "--data", phantom_dir, "--split", "test",
                            "--label-column", "finding", "--json", tmp_path / "plain.json", "-q")
    assert result.exit_code == 0 and "input_content" not in json.loads((tmp_path / "plain.json").read_text())


def test_zero_shot_counts_no_content_among_the_scored_images_only(model_dir, phantom_dir, odd_images, tmp_path):
    """A blank film without a finding is embedded with its split but not scored: it was counted all the same
    ("108 of 400 scored images" on ISIC, where 398 were scored)."""
    data = tmp_path / "data"
    shutil.copytree(phantom_dir, data)
    with (data / "manifest.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    test = [row for row in rows if row["split"] == "test"]
    shutil.copyfile(odd_images / "blank.png", data / "images" / "blank.png")
    shutil.copyfile(odd_images / "strip.png", data / "images" / "strip.png")
    rows.append({**test[0], "image": "images/blank.png"})
    rows.append({**test[0], "image": "images/strip.png", "finding": ""})  # unlabelled: not scored
    with (data / "manifest.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    result, output = invoke("eval", "zero-shot", "--model", model_dir, "--data", data, "--split", "test",
                            "--label-column", "finding", "--json", tmp_path / "out.json", "-q")
    assert result.exit_code == 0, output
    scores = json.loads((tmp_path / "out.json").read_text())
    assert scores["n"] == len(test) + 1
    assert scores["input_content"] == {"records": 1, "of": len(test) + 1, "flags": {"blank": 1, "streaked": 0}}


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_outputs_follow_the_umask(model_dir, phantom_dir, tmp_path, umask):
    """Atomic outputs were created 0600 / 0700 whatever the umask (a team or a service account could not read
    them), and --overwrite turned a 0644 file into 0600."""
    film = sorted((phantom_dir / "images").glob("*.png"))[0]
    replaced = tmp_path / "p.json"
    replaced.write_text("{}")
    replaced.chmod(0o640)
    old = os.umask(umask)
    try:
        result, output = invoke("predict", film, "--model", model_dir, "--labels", "a,b", "--json", replaced,
                                "--overwrite")
        assert result.exit_code == 0, output
        create_model("phantom-tiny").save_pretrained(tmp_path / "model")
        result, output = invoke("phantom", tmp_path / "ph", "--n", 8, "--size", 32, "-q")
        assert result.exit_code == 0, output
        result, output = invoke("train", "--data", tmp_path / "ph", "--split", "all", "--model", "phantom-tiny",
                                "--out", tmp_path / "run", "--max-steps", 2, "--checkpoint-every", 1,
                                "--batch-size", 4, "--set", "image.image_size=32", "-q")
        assert result.exit_code == 0, output
    finally:
        os.umask(old)
    file_mode, folder_mode = 0o666 & ~umask, 0o777 & ~umask
    for path, mode in ((replaced, file_mode), (tmp_path / "model", folder_mode),
                       (tmp_path / "run" / "checkpoint", folder_mode), (tmp_path / "run" / "model", folder_mode),
                       (tmp_path / "run" / "checkpoint" / "state.pt", file_mode),
                       (tmp_path / "model" / "config.json", file_mode), (tmp_path / "ph", folder_mode),
                       (tmp_path / "model" / "model.safetensors", file_mode),  # safetensors writes 0600
                       (tmp_path / "ph" / "manifest.csv", file_mode)):
        assert oct(path.stat().st_mode & 0o777) == oct(mode), path


def test_sigterm_cleans_up_like_ctrl_c(tmp_path):
    """SIGTERM (timeout, docker stop, Slurm) left the staging folder behind and exited -15 without a word."""
    out = tmp_path / "ph"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in [os.path.dirname(os.path.dirname(
        __import__("medvl").__file__)), os.environ.get("PYTHONPATH", "")] if p)}
    process = subprocess.Popen([sys.executable, "-m", "medvl", "phantom", str(out), "--n", "3000", "--size", "48",
                                "-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        for _ in range(1200):  # the staging folder appears once the imports are done
            if any(p.name.startswith(".ph.tmp-") for p in tmp_path.iterdir()) or process.poll() is not None:
                break
            time.sleep(0.1)
        assert process.poll() is None, process.communicate()
        time.sleep(0.5)
        process.terminate()  # SIGTERM
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 143, stderr
    assert "terminated" in stderr and "Traceback" not in stderr
    assert list(tmp_path.iterdir()) == []  # no staging folder, nothing at OUT


CTRL_C_IN_IMPORT = """
import sys

class CtrlC:  # Ctrl-C raises KeyboardInterrupt wherever the program is: here, once, in the middle of an import
    def find_spec(self, name, path=None, target=None):
        if name == MODULE:
            sys.meta_path.remove(self)
            raise KeyboardInterrupt
        return None

sys.meta_path.insert(0, CtrlC())
from medvl.cli.launch import run
run()
"""


@pytest.mark.parametrize("module", ["typer", "torch", "torch.nn"])  # the command line's imports; a command's (models)
def test_ctrl_c_while_the_command_starts_says_interrupted_without_a_traceback(module):
    """Ctrl-C in the first seconds, while `import medvl` imported torch and the rest, printed a traceback."""
    stopped = subprocess.run([sys.executable, "-c", CTRL_C_IN_IMPORT.replace("MODULE", repr(module)), "models"],
                             capture_output=True, text=True, timeout=300)
    assert stopped.returncode == 130, stopped.stderr
    assert stopped.stderr == "interrupted\n"
    assert stopped.stdout == ""
    started = subprocess.run([sys.executable, "-c", "from medvl.cli.launch import run; run()", "models"],
                             capture_output=True, text=True, timeout=300)  # the same entry, not interrupted
    assert started.returncode == 0, started.stderr
    assert "cxr-small" in started.stdout


def test_import_medvl_is_cheap_and_its_names_resolve_on_use():
    """`import medvl` imported torch and every subpackage; its public names now load on first use."""
    probe = ("import sys, medvl; before = 'torch' in sys.modules; import medvl.train.recipes; "
             "from medvl.train.loop import train; "
             "print(before, medvl.train is train, medvl.load_model.__module__, sorted(medvl.__all__) == medvl.__all__)")
    shown = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.split() == ["False", "True", "medvl.models.registry", "True"], shown.stdout
    # subpackages stay attributes of the package, as when `import medvl` imported them all (the README names
    # functions as medvl.clinical.windowing..., medvl.eval.counterfactual...)
    probe = ("import medvl; print(medvl.eval.__name__, medvl.clinical.__name__, medvl.models.load_model is "
             "medvl.load_model, hasattr(medvl, 'no_such_name'))")
    shown = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert shown.stdout.split() == ["medvl.eval", "medvl.clinical", "True", "False"], shown.stderr


def test_a_metrics_table_title_naming_a_folder_stays_on_one_line(capsys):
    """`medvl ood fit` printed "OOD guard saved into" and the model folder on two lines: the title wrapped at the
    width of the two narrow columns."""
    from medvl.cli.common import print_metrics

    print_metrics("OOD guard saved into medvl-demo/train", {"threshold": 25.439, "fitted images": 1680})
    lines = [line.strip() for line in capsys.readouterr().out.splitlines()]
    assert "OOD guard saved into medvl-demo/train" in lines


def _written_commands(text: str):
    """The words after ``medvl`` of each command a Markdown text writes: its inline code spans that start with
    ``medvl`` and the lines of its code blocks (continuations joined, ``&&`` / ``;`` / ``|`` split, comments and
    leading ``NAME=value`` settings dropped)."""
    import re

    pieces = re.findall(r"```[^\n]*\n(.*?)```", text, re.S)
    pieces += re.findall(r"(?<!`)`(medvl [^`]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    for piece in pieces:
        for line in piece.replace("\\\n", " ").splitlines():
            for segment in re.split(r"&&|;|\|", line.split(" # ")[0]):
                words = segment.split()
                while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
                    words.pop(0)
                if words[:1] == ["medvl"]:
                    yield words[1:]


def test_every_option_the_docs_give_a_command_exists():
    """Each ``--option`` README.md and docs/ write after a ``medvl`` command is one of that command's options (the
    README named a ``medvl explain --json``, which does not exist: explain writes OUT/explanation.json)."""
    import re
    from pathlib import Path

    import typer
    from typer.main import _click

    from medvl.cli.main import app

    root = typer.main.get_command(app)
    documents = [Path(__file__).parents[1] / "README.md", *sorted((Path(__file__).parents[1] / "docs").glob("*.md"))]
    unknown, checked = [], 0
    for document in documents:
        for words in _written_commands(document.read_text(encoding="utf-8")):
            command, names = root, []
            while hasattr(command, "list_commands") and words \
                    and (sub := command.get_command(_click.Context(command), words[0])) is not None:
                command, names = sub, [*names, words.pop(0)]
            if hasattr(command, "list_commands"):
                continue  # a group named alone (`medvl index`)
            options = {o for param in command.params for o in (*param.opts, *param.secondary_opts)} | {"--help"}
            for word in words:
                option = re.match(r"\[?(--[\w-]+)", word)
                checked += option is not None
                if option and option.group(1) not in options:
                    unknown.append(f"{document.name}: medvl {' '.join(names)} {option.group(1)}")
    assert checked > 300 and unknown == []
