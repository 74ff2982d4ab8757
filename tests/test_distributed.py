"""Data-parallel training under torchrun: 2 processes compute what 1 process computes on the same global batch.

Real ``torchrun`` launches (gloo on CPU). The gradient test compares every parameter's gradient of one
global batch (11 rows: shards of 5 and 6, CLIP and SigLIP losses with global negatives, a supervised head, the
self-supervised two-view loss, mixup on the head with partners across the shards);
the end-to-end test runs ``medvl train`` (contrastive loss and a supervised head) under torchrun and compares
the trained weights and every logged loss term with a single-process run.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

WORKER = Path(__file__).with_name("distributed_worker.py")


def _torchrun(nproc: int, *args: str) -> subprocess.CompletedProcess:
    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.fail("torchrun is not on PATH (it is installed with torch)")
    command = [torchrun, "--standalone", f"--nproc-per-node={nproc}", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_two_processes_give_the_single_process_loss_and_gradients(phantom_dir, tmp_path):
    single, double = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    _torchrun(1, str(WORKER), str(phantom_dir), str(single))
    _torchrun(2, str(WORKER), str(phantom_dir), str(double))
    one, two = load_file(single), load_file(double)
    assert one.keys() == two.keys() and len(one) > 40
    for loss in ("clip", "siglip"):
        assert torch.allclose(one[f"{loss}.contrastive"], two[f"{loss}.contrastive"], rtol=1e-5)
        # a wrong gradient scale (e.g. not averaging, or summing the gathered copies twice) shows here
        image_grads = [name for name in one if name.startswith(f"{loss}.grad.image_encoder.")]
        assert image_grads and all(one[name].abs().sum() > 0 for name in image_grads[:3])
    assert "siglip.self_supervised" in one and any(name.startswith("siglip.grad.view_projection.") for name in one)
    assert not torch.equal(one["mixup.ce_finding"], one["clip.ce_finding"])  # the head saw blended images
    # the self-supervised phase: the text side and the head get no gradient, in one process as in two (a
    # zero-filled gradient would let AdamW decay them under torchrun only)
    prefix = "pretraining.grad."
    assert {name.removeprefix(prefix).split(".")[0] for name in one if name.startswith(prefix)} == {
        "image_encoder", "view_projection"}
    for name in one:
        assert torch.allclose(one[name], two[name], rtol=1e-4, atol=1e-6), name


def _train_args(data: Path, out: Path) -> list[str]:
    return ["train", "--data", str(data), "--out", str(out), "--model", "vit-tiny", "--epochs", "1",
            "--batch-size", "16", "--max-steps", "3", "--text-encoder", "all-minilm-l6-v2",
            "--set", "text.freeze=true", "--supervised-weight", "1", "--label-column", "finding", "--quiet"]


def test_medvl_train_under_torchrun_matches_one_process(phantom_dir, tmp_path):
    from medvl.cli.main import app  # noqa: F401  (the console script below is this package)

    medvl = shutil.which("medvl")
    assert medvl is not None
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, "-m", "medvl.cli.main", *_train_args(phantom_dir, one)], check=True,
                   capture_output=True, timeout=600)
    done = _torchrun(2, "--no-python", medvl, *_train_args(phantom_dir, two))
    # rank 0 alone says it saved the model; no rank shows a deprecation warning of the collectives medvl calls
    said = done.stdout + done.stderr
    assert said.count("model saved to") == 1 and "trained 3 steps on 67 records;" in said, said[-3000:]
    assert "Warning" not in done.stderr, done.stderr[-3000:]
    # rank 0 alone wrote: one metrics line per logged step, one config, one model
    lines_one = [json.loads(line) for line in (one / "metrics.jsonl").read_text().splitlines()]
    lines_two = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines_two] == [line["step"] for line in lines_one]
    assert json.loads((two / "train_config.json").read_text())["processes"] == 2
    assert {"contrastive", "ce_finding", "loss"} <= lines_one[0].keys()
    for a, b in zip(lines_one, lines_two, strict=True):
        # every logged figure: the supervised term (each rank's shard) too, and so the total; not the epoch
        # fraction: 2 processes skip the last batch of the 67 training records (3 rows), so an epoch is 5 batches
        # in one process and 4 in two (docs/scaling.md), while both train on the same first 3
        assert a.keys() == b.keys()
        for key in a.keys() - {"epoch"}:
            assert a[key] == pytest.approx(b[key], rel=1e-4), key
    weights_one = load_file(one / "model" / "model.safetensors")
    weights_two = load_file(two / "model" / "model.safetensors")
    assert weights_one.keys() == weights_two.keys()
    for name in weights_one:
        assert torch.allclose(weights_one[name], weights_two[name], atol=1e-4), name


def test_console_script_keeps_the_exit_code(phantom_dir, tmp_path):
    """The installed ``medvl`` (``cli.main:run``) passes the command's exit code through, in and out of torchrun."""
    medvl = shutil.which("medvl")
    assert medvl is not None
    assert subprocess.run([medvl, "--help"], capture_output=True, timeout=120).returncode == 0
    missing = [medvl, "train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "out"), "-q"]
    done = subprocess.run(missing, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "missing" in done.stderr
    # 2 ranks join the group, then refuse a non-empty output folder: the exit that skips the interpreter's
    # teardown still reports the failure
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("not medvl's")
    torchrun = shutil.which("torchrun")
    assert torchrun is not None
    done = subprocess.run([torchrun, "--standalone", "--nproc-per-node=2", "--no-python", medvl,
                           *_train_args(phantom_dir, taken)], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "not empty" in done.stderr + done.stdout
    assert (taken / "keep.txt").read_text() == "not medvl's"




_PEER_GOES_AWAY = """
import importlib, os, sys, time
import torch
distributed = importlib.import_module("medvl.train.distributed")
from medvl.errors import PeerLostError

assert distributed.init_from_env()
distributed.mean_over_ranks({"a": 1.0})
if distributed.rank() == 1:
    os._exit(0)  # gone without a word, as a rank the kernel killed for memory
time.sleep(1)
try:
    with distributed.peers_watched():
        raise RuntimeError("a bug of its own")
except RuntimeError as error:
    assert not isinstance(error, PeerLostError), error  # only a lost peer is told apart
try:
    with distributed.peers_watched():
        for _ in range(3):
            distributed.average_gradients(torch.nn.Linear(2, 2))
            distributed.mean_over_ranks({"a": 1.0})
except PeerLostError as error:
    print("PEER LOST:", error, flush=True)
    os._exit(0)
os._exit(4)
"""


def test_a_collective_whose_peer_went_away_is_a_peer_lost_error(tmp_path):
    """gloo ends a collective whose peer process is gone with a RuntimeError ("Connection closed by peer"): a
    traceback of some 100 lines that buried the other rank's one-line reason. peers_watched makes it one error."""
    script = tmp_path / "peer.py"
    script.write_text(_PEER_GOES_AWAY, encoding="utf-8")
    done = _torchrun(2, str(script))
    said = [line for line in done.stdout.splitlines() if line.startswith("PEER LOST:")]
    assert said == ["PEER LOST: rank 0: another process of the training group stopped while this one waited for it "
                    "(its own output says why); this process stops too. The last checkpoint, if one was written, is "
                    "kept: run the same command with --resume"], done.stdout + done.stderr[-2000:]


def test_medvl_train_whose_other_rank_is_killed_ends_in_one_line(phantom_dir, tmp_path):
    """A rank killed mid-run (out of memory) left the other with gloo's ~100-line traceback, exit 1, and a second
    traceback when torchrun's SIGTERM came during its teardown: now one line (or `terminated`, when torchrun's
    SIGTERM comes first), the checkpoint kept for --resume."""
    import os
    import signal
    import time

    medvl, torchrun = shutil.which("medvl"), shutil.which("torchrun")
    assert medvl is not None and torchrun is not None
    out = tmp_path / "out"
    launched = subprocess.Popen([torchrun, "--standalone", "--nproc-per-node=2", "--no-python", medvl, "train",
                                 "--data", str(phantom_dir), "--out", str(out), "--model", "phantom-tiny", "--epochs",
                                 "200", "--batch-size", "8", "--checkpoint-every", "2", "-q"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (out / "checkpoint").is_dir() and time.monotonic() < deadline and launched.poll() is None:
            time.sleep(0.5)
        assert (out / "checkpoint").is_dir(), "no checkpoint within 300 s"
        ranks = {}  # the two medvl processes of this run, by the RANK torchrun gave them
        for entry in Path("/proc").iterdir():
            try:
                if not entry.name.isdigit():
                    continue
                command = (entry / "cmdline").read_bytes().split(b"\0")
                environment = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if str(out).encode() in command and os.path.basename(command[0]) != b"torchrun" and \
                    any(item.startswith(b"RANK=") for item in environment):
                rank = next(item for item in environment if item.startswith(b"RANK="))[5:].decode()
                ranks[rank] = int(entry.name)
        assert set(ranks) == {"0", "1"}, ranks
        os.kill(ranks["1"], signal.SIGKILL)
        stdout, stderr = launched.communicate(timeout=300)
    finally:
        if launched.poll() is None:
            launched.kill()
    assert launched.returncode != 0
    codes = dict(re.findall(r"rank\s+:\s*(\d+) \(local_rank.*?\n.*?exitcode\s+:\s*(-?\d+)", stderr, re.S))
    assert codes.get("0") in {"1", "143"}, stderr[-3000:]
    assert "[rank0]" not in stderr and "RuntimeError" not in stderr and "Terminated" not in stderr, stderr[-3000:]
    if codes["0"] == "1":
        assert "another process of the training group stopped" in stderr, stderr[-3000:]
    assert (out / "checkpoint" / "state.pt").is_file()  # kept: --resume goes on from it


_SIGTERM_DURING_THE_EXIT = """
import importlib, logging, os, signal, sys, time
distributed = importlib.import_module("medvl.train.distributed")  # medvl.train is also a function
from medvl.cli.main import run

class SignalledOnClose(logging.Handler):  # torchrun's SIGTERM to the other ranks, landing while this one exits
    def emit(self, record):
        pass

    def close(self):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(2)
        super().close()

logging.getLogger("sigterm-test").addHandler(SignalledOnClose())
distributed._joined_rank = int(sys.argv[1]) if sys.argv[1] != "none" else None
sys.argv = ["medvl", "train", "--data", sys.argv[2], "--out", sys.argv[3], "-q"]
run()
"""


@pytest.mark.parametrize("joined", ["0", "none"])
def test_a_sigterm_while_the_process_exits_ends_it_with_143_and_no_traceback(joined, tmp_path):
    """torchrun stops the other ranks with SIGTERM once one has exited; a rank already leaving after its own
    one-line error (flushing its log handlers) raised ``Terminated`` inside the exit: a traceback and exit 1."""
    done = subprocess.run([sys.executable, "-c", _SIGTERM_DURING_THE_EXIT, joined, str(tmp_path / "missing"),
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 143, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "Terminated" not in done.stderr, done.stderr[-3000:]
    assert "missing" in done.stderr  # the command's own error was said before the exit


def test_vqa_training_refuses_to_run_data_parallel(tmp_path):
    """VQA training runs the whole batch in each process: under torchrun it is refused in one line on each rank,
    before any output is written, rather than training on N copies of the batch."""
    from cli_helpers import invoke

    result, output = invoke("phantom", tmp_path / "pv", "--n", 40, "--size", 32, "--vqa", "-q")
    assert result.exit_code == 0, output
    torchrun = shutil.which("torchrun")
    assert torchrun is not None
    out = tmp_path / "vqa"
    done = subprocess.run([torchrun, "--standalone", "--nproc-per-node=2", "--no-python", sys.executable, "-m",
                           "medvl.cli.main", "train", "vqa", "--data", str(tmp_path / "pv" / "vqa"), "--image-model",
                           "phantom-tiny", "--question-encoder", "bert", "--epochs", "1", "--batch-size", "16",
                           "--hidden-size", "32", "--fusion-layers", "1", "-q", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    said = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("error:")]
    assert done.returncode != 0 and len(said) == 2, done.stderr[-3000:]  # one line per rank
    assert said[0] == ("error: VQA training does not run data-parallel: each of the 2 processes would train on "
                       "the whole batch; start it in one process (without torchrun)")
    assert not out.exists()


ONLY_TRAIN = ("error: only medvl train runs data-parallel: each of the 2 processes would train, score and write on "
              "its own; start this command in one process (without torchrun)")


@pytest.mark.parametrize("command", ["bench medmnist", "bench cv", "demo"])
def test_commands_that_train_and_then_score_are_refused_under_torchrun(command, tiny_npz, phantom_dir, tmp_path,
                                                                       monkeypatch):
    """A command that trains (``fit``) and then scores and writes would do both on every rank under torchrun: N tables
    of figures, and each rank's --out renamed over the last (bench medmnist left an empty one). Every one but
    ``medvl train`` is refused in one line, exit 2, before anything is written (in-process: the environment torchrun
    sets, ``WORLD_SIZE`` 2, is all the refusal reads; ``medvl train`` itself goes on to join the group)."""
    from cli_helpers import invoke

    out, json_out = tmp_path / "out", tmp_path / "result.json"
    args = {"bench medmnist": ["--train-data", tiny_npz, "--test-data", tiny_npz, "--test-split", "val", "--epochs", 1,
                               "--ensemble", 1, "--no-tta", "--json", json_out, "--out", out],
            "bench cv": ["--data", phantom_dir, "--label-column", "finding", "--model", "phantom-tiny", "--folds", 2,
                         "--epochs", 1, "--json", json_out],
            "demo": ["--out", out, "--n", 60, "--epochs", 1, "--model", "phantom-tiny", "--size", 64]}[command]
    monkeypatch.setenv("WORLD_SIZE", "2")
    result, output = invoke(*command.split(), *args, "-q")
    said = {line for line in output.splitlines() if line.startswith("error:")}  # the output holds stderr twice
    assert result.exit_code == 2 and said == {ONLY_TRAIN} and "Traceback" not in output, output
    assert not out.exists() and not json_out.exists()
    assert not list(tmp_path.glob(".out.tmp-*"))  # no staging folder left beside --out
    # medvl train is not refused: it goes on to join the group (which torchrun's other variables would describe)
    result, output = invoke("train", "--data", phantom_dir, "--out", tmp_path / "train", "--model", "phantom-tiny",
                            "-q")
    assert result.exit_code == 2 and "RANK, MASTER_ADDR, MASTER_PORT are not set" in output, output


@pytest.mark.parametrize(("variables", "said"), [
    ({"WORLD_SIZE": ""}, "error: WORLD_SIZE must be a whole number, got ''"),  # an `export WORLD_SIZE=` left behind
    ({"WORLD_SIZE": "abc"}, "error: WORLD_SIZE must be a whole number, got 'abc'"),
    ({"WORLD_SIZE": "1.5"}, "error: WORLD_SIZE must be a whole number, got '1.5'"),
    ({"WORLD_SIZE": "2", "RANK": "x", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"},
     "error: RANK must be a whole number, got 'x'"),
    ({"WORLD_SIZE": "2", "RANK": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"},
     "error: RANK must be 0 to 1 (WORLD_SIZE is 2), got '2'"),
])
def test_torchrun_variables_that_are_not_whole_numbers_are_one_line_errors(variables, said, phantom_dir, tmp_path,
                                                                           monkeypatch):
    """``init_from_env`` read WORLD_SIZE with a bare int(): an empty one was a ValueError traceback from medvl train
    (while requested_world_size, reading the same variable, took it for 1)."""
    from cli_helpers import invoke

    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    result, output = invoke("train", "--data", phantom_dir, "--out", tmp_path / "train", "--model", "phantom-tiny",
                            "--epochs", 1, "-q")
    assert result.exit_code == 2 and said in output and "Traceback" not in output, output
    assert not (tmp_path / "train").exists()


def test_a_batch_too_small_to_shard_is_refused_on_every_rank(tmp_path):
    """A global batch is cut into one shard per process: a --batch-size below 2 per process is refused before
    training, one line per rank (a batch of 2 on 3 processes gave one rank an empty shard: a MONAI traceback)."""
    from cli_helpers import invoke

    result, output = invoke("phantom", tmp_path / "ph", "--n", 20, "--size", 64, "-q")
    assert result.exit_code == 0, output
    medvl = shutil.which("medvl")
    torchrun = shutil.which("torchrun")
    assert medvl is not None and torchrun is not None
    out = tmp_path / "out"
    done = subprocess.run([torchrun, "--standalone", "--nproc-per-node=3", "--no-python", medvl, "train", "--data",
                           str(tmp_path / "ph"), "--out", str(out), "--model", "phantom-tiny", "--epochs", "1",
                           "--batch-size", "2", "-q"], capture_output=True, text=True, timeout=600)
    said = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("error:")]
    # every rank that got there exits 2 with no traceback of its own ([rankN]: lines); torchrun's report follows. Once
    # one rank has exited, torchrun stops the others (SIGTERM: exit code 143), so a slower rank may not get to say it
    codes = [int(code) for code in re.findall(r"exitcode\s+:\s*(-?\d+)", done.stderr)]
    assert done.returncode != 0 and len(codes) == 3 and 2 in codes and set(codes) <= {2, 143}, done.stderr[-3000:]
    assert "[rank0]" not in done.stderr and "RuntimeError" not in done.stderr, done.stderr[-3000:]
    assert said == ["error: batch_size 2 cannot give each of 3 processes at least 2 records of a batch (at least "
                    "2 x 3 = 6 needed)"] * codes.count(2), done.stderr[-3000:]
    assert not out.exists()
