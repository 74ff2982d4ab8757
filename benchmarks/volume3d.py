"""3D phantom: train a CT vision-language model, score it held out, and measure volume memory.

(a) Generates the CT phantom (``medvl phantom --kind ct3d``: thoraco-abdominal volumes in HU with
a liver lesion, kidney cyst, lung nodule, pleural effusion or no finding, and a report each),
trains a registered 3D model on the train split with the reports (and label captions) as text,
and scores the held-out test split: zero-shot classification of ``finding`` from the dataset's
prompts (balanced accuracy, macro AUC) and image<->report retrieval Recall@K, each beside chance.

(b) Measures the peak resident memory (``ru_maxrss``) of embedding one 512 x 512 x 300 int16 CT
volume, stored as ``.nii.gz``, with each 3D encoder config, every measurement in a fresh
subprocess so the figure is that run's alone. Linux keeps ``ru_maxrss`` across fork and exec, so
the subprocesses are started first, from this script while it is still small (no torch, nothing
trained), and the volume is written by a subprocess too; each also reports ``VmHWM`` (the peak of
its own address space, reset at exec) as a check. "baseline" is the peak after importing medvl,
building the model and embedding a 16^3 warm-up volume the same way (every module loaded, one
forward pass at the model's input size); "added" is what the large volume added on top. The
goal: "added" stays below the size of the volume itself (150 MiB of int16 voxels), i.e. the
volume is never held whole; the reference row reads the whole volume and resizes it in one piece,
as a plain implementation would.

    python benchmarks/volume3d.py --out runs/volume3d
    python benchmarks/volume3d.py --skip-train        # memory table only
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RSS_MODELS = ("ct3d-small", "ct3d-tiny", "ct3d-vit-tiny", "ct3d-slicepool")
REFERENCE = "whole-volume reference"
BIG_SHAPE = (300, 512, 512)  # (D, H, W): 300 axial slices of 512 x 512
# The data: 4,000 phantom volumes of 64^3. Training is ct3d-small's recipe (medvl models --recipe ct3d-small,
# the settings medvl train uses): with 840 train volumes or 12 epochs the small focal findings are not
# learned (zero-shot balanced accuracy 0.40, effusion only; docs/benchmarks.md)
DATA = {"model": "ct3d-small", "n": 4000, "size": 64, "seed": 0}


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _own_peak_mib() -> float:
    """VmHWM: the peak RSS of this process's address space since exec (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def phantom(out: Path, recipe: dict, show_progress: bool) -> Path:
    """The CT phantom of ``recipe`` (n, size, seed), reused if ``out/data`` already holds the same one."""
    """The CT phantom of the recipe, reused if ``out/data`` already holds the same one."""
    from medvl.data.phantom import generate_phantom

    data = out / "data"
    described = data / "dataset.json"
    wanted = {"kind": "ct3d", "seed": recipe["seed"], "n": recipe["n"], "size": recipe["size"]}
    if described.is_file():
        generator = json.loads(described.read_text()).get("generator", {})
        if all(generator.get(key) == value for key, value in wanted.items()):
            return data
    generate_phantom(data, n=recipe["n"], seed=recipe["seed"], size=recipe["size"], kind="ct3d",
                     progress=show_progress, overwrite=True)
    return data


def settings_for(recipe: dict):
    """The training settings: the model's recipe with this script's options (None: the recipe's),
    resolved as ``medvl train`` resolves them."""
    from medvl.train.recipes import resolve_recipe

    return resolve_recipe(recipe["model"], epochs=recipe["epochs"], text_source=recipe["text_source"],
                          supervised_weight=recipe["supervised_weight"], seed=recipe["seed"])


def train_and_score(out: Path, recipe: dict, show_progress: bool) -> dict:
    import medvl
    from medvl.data import captions_for
    from medvl.embed import embed_images
    from medvl.train.recipes import train_recipe

    started = time.perf_counter()
    dataset = medvl.load_dataset(phantom(out, recipe, show_progress))
    generated = time.perf_counter() - started
    train_set, test_set = dataset.select("train"), dataset.select("test")
    settings = settings_for(recipe)
    train_started, cpu_started = time.perf_counter(), time.process_time()
    model = train_recipe(settings, train_set, out / "train", show_progress=show_progress)
    train_seconds, cpu_seconds = time.perf_counter() - train_started, time.process_time() - cpu_started
    captions = captions_for(test_set, settings.captions, model)
    embeddings = embed_images(model, test_set, show_progress=show_progress)
    zero_shot = medvl.zero_shot(model, test_set, "finding", captions=captions, image_embeddings=embeddings)
    retrieval = medvl.retrieval(model, test_set, image_embeddings=embeddings)
    return {"recipe": {**recipe, **settings.to_dict()}, "records": {"train": len(train_set), "test": len(test_set)},
            "zero_shot": zero_shot, "retrieval": retrieval, "generate_seconds": round(generated, 1),
            "train_seconds": round(train_seconds, 1), "train_cpu_seconds": round(cpu_seconds, 1),
            "total_seconds": round(time.perf_counter() - started, 1), "load_average": os.getloadavg()}


def big_volume(path: Path) -> Path:
    """A 512 x 512 x 300 int16 CT (the phantom at 128^3, upsampled, with fresh noise) as .nii.gz."""
    import torch

    from medvl.clinical.nifti import write_nifti
    from medvl.data.phantom.ct3d import FOV_MM, render_case

    case = render_case(0, 0, 128)
    small = torch.from_numpy(case.volume.astype(np.float32))[None, None]
    volume = torch.nn.functional.interpolate(small, size=BIG_SHAPE, mode="trilinear")[0, 0].numpy()
    volume += np.random.default_rng(0).normal(0.0, 12.0, size=BIG_SHAPE).astype(np.float32)
    spacing = (FOV_MM[0] / BIG_SHAPE[0], FOV_MM[1] / BIG_SHAPE[1], FOV_MM[2] / BIG_SHAPE[2])
    write_nifti(path, np.clip(np.rint(volume), -1024, 3071).astype(np.int16), spacing)
    return path


def measure(model_name: str, path: str) -> dict:
    """In a fresh process: peak RSS before and after embedding the volume at ``path``."""
    import torch

    import medvl

    logging.disable(logging.WARNING)
    started = time.perf_counter()
    from medvl.clinical.nifti import write_nifti

    model = medvl.create_model("ct3d-small" if model_name == REFERENCE else model_name)
    image = model.config.image
    warm_up = Path(path).with_name(f"warm-up-{os.getpid()}.nii.gz")  # loads every module the real run uses
    write_nifti(warm_up, np.zeros((16, 16, 16), np.int16), (1.0, 1.0, 1.0))
    model.encode_images([warm_up])
    if model_name == REFERENCE:
        _whole_volume_embedding(model, warm_up)
    baseline = _peak_mib()
    embed_started = time.perf_counter()
    if model_name == REFERENCE:
        embedding = _whole_volume_embedding(model, path)
    else:
        embedding = model.encode_images([path])
    return {"model": model_name, "input": list(image.volume_shape), "baseline_mib": round(baseline, 1),
            "peak_mib": round(_peak_mib(), 1), "vm_hwm_mib": round(_own_peak_mib(), 1),
            "embed_seconds": round(time.perf_counter() - embed_started, 2),
            "total_seconds": round(time.perf_counter() - started, 2), "finite": bool(torch.isfinite(embedding).all())}


def _whole_volume_embedding(model, path: str):
    """The plain way: the whole RAS volume as float32, windowed, one MONAI Resize of the stack."""
    import torch
    from monai.transforms import Resize

    from medvl.clinical.nifti import read_nifti

    volume, _ = read_nifti(path)
    channels = np.stack([np.clip((volume - (c - w / 2)) / w, 0, 1) for c, w in model.config.image.windows])
    pixels = Resize(spatial_size=model.config.image.volume_shape, mode="trilinear")(torch.from_numpy(channels))
    return model.encode_images(pixels.as_tensor()[None].float())


def memory_table(models: list[str], show_progress: bool) -> list[dict]:
    rows = []
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    with tempfile.TemporaryDirectory(prefix="medvl-volume3d-") as folder:
        path = Path(folder) / "ct_512x512x300.nii.gz"
        subprocess.run([sys.executable, __file__, "--write-volume", str(path)], check=True, env=env)
        if show_progress:
            print(f"wrote {path.name}: {path.stat().st_size / 2**20:.0f} MiB on disk", file=sys.stderr)
        for name in models:
            result = subprocess.run([sys.executable, __file__, "--measure", name, str(path)], capture_output=True,
                                    text=True, check=True, env=env)
            rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
            rows[-1]["file_mib"] = round(path.stat().st_size / 2**20, 1)
    return rows


def print_report(scores: dict | None, memory: list[dict]) -> None:
    if scores:
        zs, rt = scores["zero_shot"], scores["retrieval"]
        print(f"\n3D phantom, {scores['recipe']['model']}: train {scores['records']['train']} / "
              f"test {scores['records']['test']} volumes, {scores['train_seconds']:.0f} s training "
              f"({scores['train_cpu_seconds']:.0f} s CPU), {scores['total_seconds']:.0f} s in all")
        print("| metric | medvl | chance |\n|---|---|---|")
        print(f"| zero-shot balanced accuracy ({len(zs['classes'])} classes) | {zs['balanced_accuracy']:.3f} | "
              f"{zs['chance_balanced_accuracy']:.3f} |")
        print(f"| zero-shot accuracy | {zs['accuracy']:.3f} | {zs['chance_accuracy']:.3f} (majority) |")
        print(f"| zero-shot macro AUC | {zs['macro_auc']:.3f} | 0.5 |")
        for direction, short in (("image_to_text", "image->text"), ("text_to_image", "text->image")):
            recalls = " / ".join(f"{rt[direction][f'R@{k}']:.3f}" for k in (1, 5, 10))
            chance = " / ".join(f"{rt[direction]['chance'][f'R@{k}']:.3f}" for k in (1, 5, 10))
            print(f"| {short} R@1 / R@5 / R@10 | {recalls} | {chance} |")
        print("per class zero-shot recall: " + ", ".join(
            f"{name} {row['recall']:.2f}" for name, row in zs["per_class"].items()))
    if memory:
        raw = np.prod(BIG_SHAPE) * 2 / 2**20
        print(f"\nPeak RSS embedding one {BIG_SHAPE[2]}x{BIG_SHAPE[1]}x{BIG_SHAPE[0]} int16 volume "
              f"({raw:.0f} MiB of voxels, {memory[0]['file_mib']:.0f} MiB .nii.gz); goal: added < {raw:.0f} MiB")
        print("| encoder | input | baseline MiB | peak MiB | added MiB | goal met | VmHWM MiB | embed s |")
        print("|---|---|---|---|---|---|---|---|")
        for row in memory:
            added = row["peak_mib"] - row["baseline_mib"]
            shape = "x".join(map(str, row["input"]))
            print(f"| {row['model']} | {shape} | {row['baseline_mib']:.0f} | {row['peak_mib']:.0f} | {added:.0f} | "
                  f"{'yes' if added < raw else 'no'} | {row['vm_hwm_mib']:.0f} | {row['embed_seconds']:.1f} |")


def run_options(args: argparse.Namespace) -> dict:
    """The data settings and the training options given (None: the model's recipe)."""
    return {"model": args.model, "n": args.n, "size": args.size, "epochs": args.epochs,
            "text_source": args.text_source, "supervised_weight": args.supervised_weight, "seed": args.seed}


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/volume3d"))
    parser.add_argument("--model", default=DATA["model"], help="registered name, trained with its recipe")
    parser.add_argument("--n", type=int, default=DATA["n"])
    parser.add_argument("--size", type=int, default=DATA["size"])
    parser.add_argument("--epochs", type=int, default=None, help="default: the recipe's")
    parser.add_argument("--text-source", default=None, help="text | both (reports + label captions); "
                        "default: the recipe's")
    parser.add_argument("--supervised-weight", type=float, default=None,
                        help="weight of a cross-entropy head on finding (0 = contrastive only); default: the recipe's")
    parser.add_argument("--seed", type=int, default=DATA["seed"])
    parser.add_argument("--skip-train", action="store_true", help="only the memory table")
    parser.add_argument("--skip-memory", action="store_true", help="only training and scoring")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--measure", nargs=2, metavar=("MODEL", "FILE"), help=argparse.SUPPRESS)
    parser.add_argument("--write-volume", type=Path, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = make_parser().parse_args(argv)
    if args.measure:
        print(json.dumps(measure(*args.measure)))
        return
    if args.write_volume:
        big_volume(args.write_volume)
        return

    recipe = run_options(args)
    if args.model != DATA["model"] and args.out == Path("runs/volume3d"):
        args.out = Path(f"runs/volume3d-{args.model}")
    memory = [] if args.skip_memory else memory_table([*RSS_MODELS, REFERENCE], not args.quiet)  # while small
    scores = None if args.skip_train else train_and_score(args.out, recipe, not args.quiet)
    import torch

    from medvl.io import write_json

    results = {"scores": scores, "memory": memory, "machine": {"cpus": os.cpu_count(), "torch": torch.__version__}}
    write_json(args.out / ("results.json" if scores else "memory.json"), results)
    print_report(scores, memory)


if __name__ == "__main__":
    from medvl.errors import run_script

    run_script(main)  # a medvl error (a missing data path or model) is one line, not a traceback
