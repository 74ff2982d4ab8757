"""Scaling curve: embed 1k / 10k / 100k phantom chest films generated on the fly; time and peak memory
against size.

    python benchmarks/scaling_curve.py --sizes 1000,10000,100000 [--model cxr-small --image-size 96]
        [--film-size 96] [--workers auto] [--json scaling.json]

Each size runs in a fresh process (its own peak memory). Worker processes (``medvl.data.loading.
map_ahead``, the reader ``medvl embed`` and ``medvl index build`` use) render film ``i`` of phantom
seed 0 (``medvl.data.phantom.render_case``) and resize it to the model's input, batch after batch,
ahead of the model; the model embeds each batch and the embeddings are appended to a file, so nothing
grows with the number of films except that file. Memory is the proportional set size (PSS) of the
process and its workers together, sampled every 0.2 s (psutil); time is wall time from the first film to the last
embedding on disk. What the curve should show: time linear in size (constant ms per film) and a
flat peak memory.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from medvl import create_model  # noqa: E402
from medvl.data.loading import map_ahead, resolve_workers  # noqa: E402
from medvl.data.phantom.cxr2d import render_case  # noqa: E402

BATCH = 64
SEED = 0


def render_batch(context: tuple, indices: range) -> np.ndarray:
    """Films ``indices`` of the phantom, rendered and resized to the model's input (a worker's task)."""
    preprocessor, film_size = context
    return preprocessor.load_many([render_case(SEED, i, film_size).image for i in indices]).numpy()


class TreeMemory:
    """Peak memory of this process plus its workers (proportional set size: pages the forked workers share
    with it are split between them, not counted twice), sampled in a background thread."""

    def __init__(self, interval: float = 0.2):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for process in [me, *me.children(recursive=True)]:
                try:
                    total += process.memory_full_info().pss  # shared pages counted once across the fork
                except psutil.Error:
                    pass  # a worker that just ended
            self.peak = max(self.peak, total)
            self._stop.wait(self.interval)


def run_one(n: int, args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    model = create_model(args.model, **({"image.image_size": args.image_size} if args.image_size else {}))
    model.eval()
    workers = resolve_workers(None if args.workers == "auto" else int(args.workers), n)
    batches = [range(first, min(first + BATCH, n)) for first in range(0, n, BATCH)]
    with tempfile.TemporaryDirectory() as folder, TreeMemory() as memory:
        out = Path(folder) / "embeddings.f32"
        start = time.perf_counter()
        with out.open("wb") as sink:
            for pixels in map_ahead(render_batch, batches, workers, context=(model.preprocessor, args.film_size)):
                sink.write(model.encode_images(torch.from_numpy(pixels), batch_size=BATCH).numpy().tobytes())
        seconds = time.perf_counter() - start
        written = out.stat().st_size // (4 * model.config.embed_dim)
    return {"n": n, "written": written, "seconds": seconds, "ms_per_film": 1000 * seconds / n,
            "films_per_s": n / seconds, "peak_pss_mib": memory.peak / 2**20, "workers": workers}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--model", default="cxr-small")
    parser.add_argument("--image-size", type=int, default=96, help="Model input side (the demo's 96).")
    parser.add_argument("--film-size", type=int, default=96, help="Side of the rendered films.")
    parser.add_argument("--workers", default="auto", help="Reading processes: auto or a number.")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # a child run of one size
    args = parser.parse_args(argv)
    if args.one is not None:
        print(json.dumps(run_one(args.one, args)))
        return []
    sizes = [part.strip() for part in args.sizes.split(",")]
    if not all(size.isdigit() and int(size) > 0 for size in sizes):
        parser.error(f"--sizes takes film counts separated by commas, e.g. 1000,10000; got {args.sizes!r}")
    rows = []
    for n in map(int, sizes):
        child = [sys.executable, __file__, "--one", str(n), "--model", args.model, "--image-size",
                 str(args.image_size), "--film-size", str(args.film_size), "--workers", args.workers]
        done = subprocess.run(child, capture_output=True, text=True)
        if done.returncode:  # the child said why on stderr (one line for bad input)
            sys.stderr.write(done.stderr)
            raise SystemExit(done.returncode)
        rows.append(json.loads(done.stdout))
        _print_row(rows[-1], rows[0])
    result = {"rows": rows, "model": args.model, "image_size": args.image_size, "film_size": args.film_size,
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                          "load_average": os.getloadavg()}}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return rows


def _print_row(row: dict, first: dict) -> None:
    print(f"{row['n']:>7} films: {row['seconds']:8.1f} s, {row['ms_per_film']:.2f} ms/film "
          f"({row['ms_per_film'] / first['ms_per_film']:.2f}x the smallest size's), "
          f"peak memory (PSS) {row['peak_pss_mib']:.0f} MiB ({row['peak_pss_mib'] / first['peak_pss_mib']:.2f}x), "
          f"{row['workers']} workers, load average {os.getloadavg()[0]:.1f}", flush=True)


if __name__ == "__main__":
    from medvl.errors import run_script

    run_script(main)  # a medvl error (a missing data path or model) is one line, not a traceback
