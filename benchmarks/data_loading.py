"""Does reading images starve the model? Embedding throughput with the images read in-process or by
worker processes, beside the model alone, in one run; and what reading once per training run saves.

    python benchmarks/data_loading.py --data ../shared/data/isic-dermoscopy --model derm-small
    python benchmarks/data_loading.py --data ../shared/data/medpix-2.0 --split train --model medpix-small --n 600

Rows (images/s, best of ``--rounds`` interleaved rounds, so a burst of load from other processes hurts
every row alike):

* ``model alone``: ``encode_images`` on pixels already read and resized (normalisation, tower,
  projection): the ceiling a reader can at best let the model reach;
* ``reading alone``: ``preprocessor.load_many`` of the files in this process (decode, convert, resize);
* ``embed_images, workers=W``: the library's embedding of the dataset's files, the images read by W
  worker processes ahead of the model (``medvl.data.loading``; 0 = in this process, one batch after
  the other), with its share of ``model alone``.

Training reads its images once and keeps them for every epoch (``medvl.data.loading.load_all``);
the last table puts that one read beside one epoch's forward and backward passes (the recipe's
batch size, augmentation included), i.e. what reading every epoch would cost.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from medvl import create_model, load_dataset  # noqa: E402
from medvl.data.loading import load_all  # noqa: E402
from medvl.embed import embed_images  # noqa: E402
from medvl.train.recipes import recipe_of  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from encode_throughput import best_rate  # noqa: E402  (best of interleaved rounds)

BATCH = 64


def epoch_seconds(model, pixels: torch.Tensor, batch_size: int) -> float:
    """Seconds of one pass of forward + backward (image side: augmentation, tower, projection, a
    contrastive-style loss on the image embeddings) over ``pixels``, in batches of ``batch_size``."""
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-6)
    start = time.perf_counter()
    for first in range(0, len(pixels), batch_size):
        batch = model.preprocessor.augment(pixels[first:first + batch_size].float(), seed=first)
        embeddings = model.embed_image_features(model.image_features(model.preprocessor.normalize(batch)))
        loss = torch.nn.functional.cross_entropy(embeddings @ embeddings.T, torch.arange(len(batch)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="Any dataset medvl loads (folder, manifest, ...).")
    parser.add_argument("--split", default=None, help="Split to read (default: all records).")
    parser.add_argument("--model", default="derm-small", help="Registered config (random init; its recipe's size).")
    parser.add_argument("--n", type=int, default=None, help="Use the first N records (default: all).")
    parser.add_argument("--workers", default="0,1,2", help="Worker counts to compare, comma-separated.")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    dataset = load_dataset(args.data)
    if args.split:
        dataset = dataset.select(args.split)
    if args.n:
        dataset = dataset.subset(dataset.records[:args.n])
    recipe = recipe_of(args.model)
    torch.manual_seed(0)
    model = create_model(args.model, **recipe.model)
    model.eval()
    images = [record.image for record in dataset]
    pixels = model.preprocessor.load_many(images)
    counts = [int(w) for w in args.workers.split(",")]
    functions: dict[str, Callable[[], object]] = {
        "model alone": lambda: model.encode_images(pixels, batch_size=BATCH),
        "reading alone": lambda: [model.preprocessor.load_many(images[first:first + BATCH])
                                  for first in range(0, len(images), BATCH)],
    }
    for workers in counts:
        functions[f"embed_images, workers={workers}"] = (
            lambda w=workers: embed_images(model, dataset, batch_size=BATCH, show_progress=False, workers=w))
    started = time.perf_counter()
    rates = best_rate(functions, len(images), args.rounds)

    read_start = time.perf_counter()
    load_all(model.preprocessor, images, show_progress=False, workers=0)
    read_once = time.perf_counter() - read_start
    batch_size = int(recipe.train.get("batch_size", 64))
    epoch = min(epoch_seconds(model, pixels.half(), batch_size) for _ in range(2))
    result = {
        "data": str(args.data), "split": args.split, "n_images": len(images), "model": args.model,
        "input": list(pixels.shape[1:]), "rates": rates,
        "share_of_model_alone": {name: rate / rates["model alone"] for name, rate in rates.items()},
        "training": {"read_once_s": read_once, "epoch_compute_s": epoch, "batch_size": batch_size,
                     "reading_share_if_read_every_epoch": read_once / (read_once + epoch)},
        "seconds": time.perf_counter() - started, "machine": _machine(),
    }
    _print(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


def _machine() -> dict:
    return {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "load_average": os.getloadavg()}


def _print(result: dict) -> None:
    print(f"{result['n_images']} images from {result['data']} -> {result['model']} input {result['input']}")
    print(f"{'path':<28} {'images/s':>9} {'share of model alone':>21}")
    for name, rate in result["rates"].items():
        print(f"{name:<28} {rate:>9.1f} {result['share_of_model_alone'][name]:>21.2f}")
    training = result["training"]
    print(f"training: reading the images once {training['read_once_s']:.2f} s; one epoch of forward+backward "
          f"{training['epoch_compute_s']:.2f} s (batch {training['batch_size']}); read every epoch, reading would be "
          f"{100 * training['reading_share_if_read_every_epoch']:.0f} % of each epoch")
    print(f"load average {result['machine']['load_average']}")


if __name__ == "__main__":
    from medvl.errors import run_script

    run_script(main)  # a medvl error (a missing data path or model) is one line, not a traceback
