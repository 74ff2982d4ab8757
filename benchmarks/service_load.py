"""Load on ``/v1/zero-shot``: N concurrent clients against a real ``medvl serve``, with and without
micro-batching, side by side in one run.

For each mode (``--max-batch 16 --max-wait-ms 5`` and ``--no-batching``) a ``medvl serve`` process is
started on a free 127.0.0.1 port (rate limit off), and for each concurrency (1, 4, 16) that many
clients (httpx, one asyncio task each) send zero-shot requests back to back for ``--duration``
seconds, each a phantom PNG from a fixed set. Reported per cell: requests/s, p50 / p95 / p99
latency, errors, the mean batch size the server ran them in (from its JSON request log, matched
by request id), and the server's resident memory (RSS) at the start and end of the mode. Clients
and server share the machine; its core count and load average are recorded.

The model is ``--model`` (a folder written by ``medvl train``), else one trained here:

    medvl phantom OUT/data --n 96 --size 64 --seed 3
    medvl train --data OUT/data --model phantom-tiny --out OUT/train --epochs 2 --batch-size 32

    python benchmarks/service_load.py --out runs/service-load [--model DIR] [--duration 60]

Writes OUT/service_load.json and prints the table of docs/benchmarks.md ("Service load").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

from medvl.io import write_json

LABELS = "no_finding,cardiomegaly,pleural_effusion,nodule,consolidation,pneumothorax"
MODES = {"micro-batching": ["--max-batch", "16", "--max-wait-ms", "5"], "no batching": ["--no-batching"]}
TOKEN = "service-load-benchmark-token"


def prepare_model(out: Path) -> Path:
    """A phantom-tiny model trained by ``medvl train`` on a small phantom (the commands above)."""
    from medvl.cli.main import app

    data, train = out / "data", out / "train"
    if not (train / "model" / "config.json").is_file():
        for argv in (["phantom", str(data), "--n", "96", "--size", "64", "--seed", "3", "--quiet", "--overwrite"],
                     ["train", "--data", str(data), "--model", "phantom-tiny", "--out", str(train), "--epochs", "2",
                      "--batch-size", "32", "--quiet"]):
            app(argv, standalone_mode=False)
    return train / "model"


def query_images(model: Path, out: Path, count: int = 16) -> list[bytes]:
    """PNG bytes of phantom images (generated under OUT if needed)."""
    images = sorted((out / "data" / "images").glob("*.png"))
    if not images:
        from medvl.data.phantom import generate_phantom

        generate_phantom(out / "data", n=count, seed=3, size=64, progress=False)
        images = sorted((out / "data" / "images").glob("*.png"))
    return [path.read_bytes() for path in images[:count]]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def rss_mib(pid: int) -> float:
    """Resident memory of a process in MiB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Service:
    """One ``medvl serve`` process; its stderr (JSON log lines) goes to a file."""

    def __init__(self, model: Path, options: list[str], log_path: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.log = open(log_path, "w")  # closed in stop()
        env = {**os.environ, "MEDVL_API_TOKENS": TOKEN}
        self.process = subprocess.Popen([sys.executable, "-m", "medvl.cli.main", "serve", "--model", str(model),
                                         "--port", str(self.port), "--rate-limit", "0", *options],
                                        env=env, stdout=subprocess.DEVNULL, stderr=self.log)

    def wait_ready(self, timeout: float = 120) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.process.poll() is not None:
                raise SystemExit(f"medvl serve exited: see {self.log_path}")
            try:
                if httpx.get(self.url + "/v1/health", timeout=2).json()["status"] == "ok":
                    return time.monotonic() - started
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise SystemExit(f"medvl serve not ready within {timeout} s")

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=60)
        self.log.close()

    def batch_sizes(self, request_ids: set[str]) -> list[int]:
        sizes = []
        for line in self.log_path.read_text().splitlines():
            if line.startswith("{"):
                entry = json.loads(line)
                if entry.get("request_id") in request_ids and "batch_size" in entry:
                    sizes.append(entry["batch_size"])
        return sizes


async def client_loop(http: httpx.AsyncClient, images: list[bytes], offset: int, until: float,
                      latencies: list[float], request_ids: set[str], errors: list[int]) -> None:
    """Back-to-back zero-shot requests until ``until`` (monotonic seconds)."""
    n = offset
    while time.monotonic() < until:
        started = time.perf_counter()
        answer = await http.post("/v1/zero-shot", files={"image": ("q.png", images[n % len(images)])},
                                 data={"labels": LABELS})
        if answer.status_code == 200:
            latencies.append((time.perf_counter() - started) * 1000)
            request_ids.add(answer.headers["X-Request-ID"])
        else:
            errors.append(answer.status_code)
        n += 1


async def load(url: str, images: list[bytes], concurrency: int, duration: float) -> dict:
    """``concurrency`` clients for ``duration`` seconds; throughput and latency percentiles."""
    latencies: list[float] = []
    request_ids: set[str] = set()
    errors: list[int] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=60) as http:
        started = time.monotonic()
        await asyncio.gather(*(client_loop(http, images, i, started + duration, latencies, request_ids, errors)
                               for i in range(concurrency)))
        elapsed = time.monotonic() - started
    percentiles = np.percentile(latencies, [50, 95, 99]) if latencies else [float("nan")] * 3
    return {"concurrency": concurrency, "requests": len(latencies), "errors": len(errors),
            "seconds": round(elapsed, 2), "requests_per_s": round(len(latencies) / elapsed, 2),
            "p50_ms": round(float(percentiles[0]), 1), "p95_ms": round(float(percentiles[1]), 1),
            "p99_ms": round(float(percentiles[2]), 1), "request_ids": request_ids}


def run_mode(name: str, model: Path, images: list[bytes], concurrencies: list[int], duration: float,
             out: Path) -> dict:
    service = Service(model, MODES[name], out / f"serve-{name.replace(' ', '-')}.log")
    try:
        ready = service.wait_ready()
        asyncio.run(load(service.url, images, 2, 2.0))  # warm-up: class prompts embedded, first passes
        rss_start = rss_mib(service.process.pid)
        cells = []
        for concurrency in concurrencies:
            cell = asyncio.run(load(service.url, images, concurrency, duration))
            sizes = service.batch_sizes(cell.pop("request_ids"))
            cell["mean_batch_size"] = round(float(np.mean(sizes)), 2) if sizes else None
            cells.append(cell)
            print(f"{name:>15} c={concurrency:<3} {cell['requests_per_s']:7.1f} req/s  p50 {cell['p50_ms']:7.1f}  "
                  f"p95 {cell['p95_ms']:7.1f}  p99 {cell['p99_ms']:7.1f} ms  batch {cell['mean_batch_size']}  "
                  f"errors {cell['errors']}", flush=True)
        rss_end = rss_mib(service.process.pid)
    finally:
        service.stop()
    return {"mode": name, "options": MODES[name], "ready_s": round(ready, 2), "rss_start_mib": round(rss_start, 1),
            "rss_end_mib": round(rss_end, 1), "cells": cells}


def table(results: list[dict]) -> str:
    """Markdown: one row per concurrency, the modes side by side."""
    by_mode = {result["mode"]: {cell["concurrency"]: cell for cell in result["cells"]} for result in results}
    batched, plain = by_mode["micro-batching"], by_mode["no batching"]
    lines = ["| clients | req/s batched | req/s unbatched | speed-up | p50 / p95 / p99 ms batched "
             "| p50 / p95 / p99 ms unbatched | mean batch |", "|---|---|---|---|---|---|---|"]
    for concurrency in batched:
        b, p = batched[concurrency], plain[concurrency]
        speedup = b["requests_per_s"] / p["requests_per_s"] if p["requests_per_s"] else float("nan")
        lines.append(f"| {concurrency} | {b['requests_per_s']} | {p['requests_per_s']} | {speedup:.2f}x "
                     f"| {b['p50_ms']} / {b['p95_ms']} / {b['p99_ms']} | {p['p50_ms']} / {p['p95_ms']} / {p['p99_ms']} "
                     f"| {b['mean_batch_size']} |")
    for result in results:
        lines.append(f"\n{result['mode']}: server RSS {result['rss_start_mib']} MiB at start, "
                     f"{result['rss_end_mib']} MiB at end; ready {result['ready_s']} s after start")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/service-load"))
    parser.add_argument("--model", type=Path, help="Model folder (default: train phantom-tiny under --out).")
    parser.add_argument("--duration", type=float, default=60.0, help="Seconds per concurrency level.")
    parser.add_argument("--concurrency", default="1,4,16", help="Comma-separated client counts.")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    model = args.model or prepare_model(args.out)
    images = query_images(model, args.out)
    concurrencies = [int(n) for n in args.concurrency.split(",")]
    machine = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
               "load_average_at_start": os.getloadavg()}
    results = [run_mode(name, model, images, concurrencies, args.duration, args.out) for name in MODES]
    summary = {"machine": machine, "duration_s": args.duration, "labels": LABELS, "model": model.name,
               "results": results, "load_average_at_end": os.getloadavg()}
    write_json(args.out / "service_load.json", summary)
    print(table(results))
    print(f"machine: {machine['cpus']} CPUs, load average {machine['load_average_at_start']} at start, "
          f"{summary['load_average_at_end']} at end; wrote {args.out / 'service_load.json'}")


if __name__ == "__main__":
    main()
