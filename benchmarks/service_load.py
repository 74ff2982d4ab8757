"""Load on ``/v1/zero-shot``: N concurrent clients against a real ``medvl serve``, with and without
micro-batching, side by side in one run.

For each mode (``--max-batch 16 --max-wait-ms 5`` and ``--no-batching``) a ``medvl serve`` process
is started on a free 127.0.0.1 port (rate limit off), both at once; for each concurrency (1, 4,
16), that many clients (httpx, one asyncio task each) send zero-shot requests back to back to each
mode for ``--duration`` seconds, in two halves ordered batched, unbatched, unbatched, batched (so
a drift in the machine's load hits both alike), each a phantom PNG from a fixed set. Reported
per cell: requests/s, p50 / p95 / p99 latency, errors, the mean batch size the server ran them in
(from its JSON request log, matched by request id); per server, its resident memory (RSS) after
warm-up and at the end. Clients and servers share the machine; its core count and load average
are recorded.

The model is ``--model`` (a folder written by ``medvl train``), else one trained here:

    medvl phantom OUT/data --n 96 --size 64 --seed 3
    medvl train --data OUT/data --model phantom-tiny --out OUT/train-phantom-tiny --epochs 2 --batch-size 32

    python benchmarks/service_load.py --out runs/service-load [--train-model cxr-small | --model DIR] [--duration 60]

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


def prepare_model(out: Path, name: str) -> Path:
    """A model (registered ``name``) trained by ``medvl train`` on a small phantom (the commands above)."""
    from medvl.cli.main import app

    data, train = out / "data", out / f"train-{name}"
    if not (data / "manifest.csv").is_file():
        app(["phantom", str(data), "--n", "96", "--size", "64", "--seed", "3", "--quiet", "--overwrite"],
            standalone_mode=False)
    if not (train / "model" / "config.json").is_file():
        app(["train", "--data", str(data), "--model", name, "--out", str(train), "--epochs", "2", "--batch-size", "32",
             "--quiet"], standalone_mode=False)
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
    """``concurrency`` clients for ``duration`` seconds: latencies (ms), request ids, errors, seconds."""
    run = {"latencies": [], "request_ids": set(), "errors": []}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=60) as http:
        started = time.monotonic()
        await asyncio.gather(*(client_loop(http, images, i, started + duration, run["latencies"],
                                           run["request_ids"], run["errors"]) for i in range(concurrency)))
        run["seconds"] = time.monotonic() - started
    return run


def summary_of(runs: list[dict], concurrency: int, batch_sizes: list[int]) -> dict:
    """Throughput and latency percentiles over the runs of one cell."""
    latencies = [ms for run in runs for ms in run["latencies"]]
    seconds = sum(run["seconds"] for run in runs)
    percentiles = np.percentile(latencies, [50, 95, 99]) if latencies else [float("nan")] * 3
    return {"concurrency": concurrency, "requests": len(latencies), "errors": sum(len(run["errors"]) for run in runs),
            "seconds": round(seconds, 2), "requests_per_s": round(len(latencies) / seconds, 2),
            "p50_ms": round(float(percentiles[0]), 1), "p95_ms": round(float(percentiles[1]), 1),
            "p99_ms": round(float(percentiles[2]), 1),
            "mean_batch_size": round(float(np.mean(batch_sizes)), 2) if batch_sizes else None}


def run_modes(model: Path, images: list[bytes], concurrencies: list[int], duration: float, out: Path) -> list[dict]:
    """Both servers run at once. Each cell is measured in four quarters, batched / unbatched /
    unbatched / batched (ABBA), so a drift in the machine's load (it is shared) hits both modes alike."""
    services = {name: Service(model, options, out / f"serve-{name.replace(' ', '-')}.log")
                for name, options in MODES.items()}
    try:
        results = {name: {"mode": name, "options": MODES[name], "ready_s": round(service.wait_ready(), 2),
                          "cells": []} for name, service in services.items()}
        for name, service in services.items():
            asyncio.run(load(service.url, images, 2, 2.0))  # warm-up: class prompts embedded, first passes
            results[name]["rss_start_mib"] = round(rss_mib(service.process.pid), 1)
        first, second = list(services)
        for concurrency in concurrencies:
            runs: dict[str, list[dict]] = {first: [], second: []}
            for name in (first, second, second, first):
                runs[name].append(asyncio.run(load(services[name].url, images, concurrency, duration / 2)))
            for name, service in services.items():
                ids = set().union(*(run["request_ids"] for run in runs[name]))
                cell = summary_of(runs[name], concurrency, service.batch_sizes(ids))
                results[name]["cells"].append(cell)
                show(name, cell)
        for name, service in services.items():
            results[name]["rss_end_mib"] = round(rss_mib(service.process.pid), 1)
    finally:
        for service in services.values():
            service.stop()
    return list(results.values())


def show(name: str, cell: dict) -> None:
    print(f"{name:>15} c={cell['concurrency']:<3} {cell['requests_per_s']:7.1f} req/s  p50 {cell['p50_ms']:7.1f}  "
          f"p95 {cell['p95_ms']:7.1f}  p99 {cell['p99_ms']:7.1f} ms  batch {cell['mean_batch_size']}  "
          f"errors {cell['errors']}", flush=True)


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
    parser.add_argument("--model", type=Path, help="Model folder (default: train --train-model under --out).")
    parser.add_argument("--train-model", default="phantom-tiny",
                        help="Registered model trained when --model is not given (phantom-tiny, cxr-small, ...).")
    parser.add_argument("--duration", type=float, default=60.0, help="Seconds per concurrency level.")
    parser.add_argument("--concurrency", default="1,4,16", help="Comma-separated client counts.")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    model = args.model or prepare_model(args.out, args.train_model)
    images = query_images(model, args.out)
    concurrencies = [int(n) for n in args.concurrency.split(",")]
    machine = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
               "load_average_at_start": os.getloadavg()}
    results = run_modes(model, images, concurrencies, args.duration, args.out)
    summary = {"machine": machine, "duration_s": args.duration, "labels": LABELS, "model": model.name,
               "results": results, "load_average_at_end": os.getloadavg()}
    write_json(args.out / "service_load.json", summary)
    print(table(results))
    print(f"machine: {machine['cpus']} CPUs, load average {machine['load_average_at_start']} at start, "
          f"{summary['load_average_at_end']} at end; wrote {args.out / 'service_load.json'}")


if __name__ == "__main__":
    main()
