"""Load on ``/v1/zero-shot``: N concurrent clients against a real ``medvl serve``, with and without
micro-batching, side by side in one run.

For each mode (``--max-batch 16 --max-wait-ms 10``, medvl serve's defaults, or this script's
``--max-batch`` / ``--max-wait-ms``, and ``--no-batching``) a ``medvl serve`` process is started
on a free 127.0.0.1 port (rate limit off), both at once; for each concurrency (1, 4, 16), that
many clients (one asyncio task and one keep-alive connection each) send zero-shot
requests back to back to each mode for ``--duration`` seconds, in two halves ordered batched,
unbatched, unbatched, batched (so a drift in the machine's load hits both alike), each a phantom PNG
from a fixed set. Reported per cell: requests/s, p50 / p95 / p99 latency, errors, the mean batch
size the server ran them in (from its JSON request log, matched by request id); per server, its
resident memory (RSS) sampled every second from warm-up to the end (start, peak, end, and the
change over each cell). Clients and servers share the machine; its core count and load average are
recorded. Before the servers start, the model's own forward pass is timed in this process at batch
1 and at batch 16: the most batching can gain when nothing else costs.

Clients (``--client``): ``raw`` (default) writes each request's pre-encoded HTTP/1.1 bytes (the
same multipart upload httpx sends) and reads the answer (status, Content-Length, the JSON checked
for a prediction), so the load generator takes little of the two cores the servers share with it;
``httpx`` uses ``httpx.AsyncClient`` (about a millisecond of client CPU per request).

The model is ``--model`` (a folder written by ``medvl train``), else one trained here:

    medvl phantom OUT/data --n 96 --size 64 --seed 3
    medvl train --data OUT/data --model phantom-tiny --out OUT/train-phantom-tiny --epochs 2 --batch-size 32

    python benchmarks/service_load.py --out runs/service-load [--train-model cxr-small | --model DIR] [--duration 60] \
        [--torch-threads N] [--max-batch 16] [--max-wait-ms 10] [--concurrency 1,4,16]

``--torch-threads`` is ``medvl serve --torch-threads`` of both servers (and of the forward-pass timing).

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
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from medvl.io import write_json
from medvl.models.backends import resolve_backend
from medvl.models.registry import model_directory

LABELS = "no_finding,cardiomegaly,pleural_effusion,nodule,consolidation,pneumothorax"
def modes(max_batch: int = 16, max_wait_ms: float = 10.0) -> dict[str, list[str]]:
    """The two servers: micro-batching (``--max-batch``, ``--max-wait-ms``) and none."""
    return {"micro-batching": ["--max-batch", str(max_batch), "--max-wait-ms", f"{max_wait_ms:g}"],
            "no batching": ["--no-batching"]}
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

    def __init__(self, model: Path, options: list[str], log_path: Path, common: list[str]):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.log = open(log_path, "w")  # closed in stop()
        env = {**os.environ, "MEDVL_API_TOKENS": TOKEN}
        self.process = subprocess.Popen([sys.executable, "-m", "medvl.cli.main", "serve", "--model", str(model),
                                         "--port", str(self.port), "--rate-limit", "0", *common,
                                         *options],
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


def encoded_requests(url: str, images: list[bytes]) -> list[bytes]:
    """One complete HTTP/1.1 zero-shot request per image (multipart: the ``image`` file, ``labels``)."""
    host = url.split("://", 1)[1]
    boundary = "medvl-service-load-boundary"
    requests = []
    for image in images:
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"labels\"\r\n\r\n{LABELS}\r\n"
                f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"q.png\"\r\n"
                f"Content-Type: image/png\r\n\r\n").encode() + image + f"\r\n--{boundary}--\r\n".encode()
        head = (f"POST /v1/zero-shot HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {TOKEN}\r\n"
                f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n")
        requests.append(head.encode() + body)
    return requests


async def raw_client_loop(url: str, requests: list[bytes], offset: int, until: float, latencies: list[float],
                          request_ids: set[str], errors: list[int]) -> None:
    """Back-to-back zero-shot requests on one keep-alive connection until ``until`` (monotonic seconds)."""
    host, port = url.split("://", 1)[1].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    n = offset
    try:
        while time.monotonic() < until:
            started = time.perf_counter()
            writer.write(requests[n % len(requests)])
            await writer.drain()
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            status = int(head[0].split(" ", 2)[1])
            fields = {name.strip().lower(): value.strip() for name, _, value in
                      (line.partition(":") for line in head[1:] if line)}
            body = await reader.readexactly(int(fields["content-length"]))
            if status == 200 and "prediction" in json.loads(body):
                latencies.append((time.perf_counter() - started) * 1000)
                request_ids.add(fields["x-request-id"])
            else:
                errors.append(status)
            n += 1
    finally:
        writer.close()
        await writer.wait_closed()


async def load(url: str, images: list[bytes], concurrency: int, duration: float, client: str = "raw") -> dict:
    """``concurrency`` clients for ``duration`` seconds: latencies (ms), request ids, errors, seconds."""
    run: dict = {"latencies": [], "request_ids": set(), "errors": []}
    cpu = time.process_time()  # this process: the clients (and the once-a-second memory sampler)
    if client == "raw":
        requests = encoded_requests(url, images)
        started = time.monotonic()
        await asyncio.gather(*(raw_client_loop(url, requests, i, started + duration, run["latencies"],
                                               run["request_ids"], run["errors"]) for i in range(concurrency)))
        run["seconds"] = time.monotonic() - started
        run["client_cpu_s"] = time.process_time() - cpu
        return run
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=60) as http:
        started = time.monotonic()
        await asyncio.gather(*(client_loop(http, images, i, started + duration, run["latencies"],
                                           run["request_ids"], run["errors"]) for i in range(concurrency)))
        run["seconds"] = time.monotonic() - started
    run["client_cpu_s"] = time.process_time() - cpu
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
            "client_cpu_ms_per_request": round(1000 * sum(run["client_cpu_s"] for run in runs)
                                               / max(len(latencies), 1), 3),
            "mean_batch_size": round(float(np.mean(batch_sizes)), 2) if batch_sizes else None}


def forward_bound(model: Path, images: list[bytes], batch: int = 16, repeats: int = 30, backend: str = "torch",
                  threads: int = 0) -> dict:
    """The model's own forward pass (``encode_images`` on preprocessed uploads), timed in this process
    before the servers start: median ms per image at batch 1 and at ``batch``, and their ratio (the
    throughput batching could add if nothing but the forward pass cost anything)."""
    import torch

    from medvl.data.images import read_image_bytes
    from medvl.models.registry import load_model

    if threads:
        torch.set_num_threads(threads)
    net = load_model(model, backend=backend).eval()
    pixels = torch.stack([net.preprocessor.load(read_image_bytes(image, "query")) for image in images])
    pixels = pixels[torch.arange(batch) % len(pixels)]

    def ms_per_image(size: int) -> float:
        started = time.perf_counter()
        net.encode_images(pixels[:size])
        return (time.perf_counter() - started) * 1000 / size

    for _ in range(10):  # first passes of each shape set up the kernels (can take a second)
        ms_per_image(1), ms_per_image(batch)
    times = [(ms_per_image(1), ms_per_image(batch)) for _ in range(repeats)]  # interleaved: drift hits both
    one, many = (float(np.median(column)) for column in zip(*times, strict=True))
    return {"torch_threads": torch.get_num_threads(), "ms_per_image_batch_1": round(one, 3),
            f"ms_per_image_batch_{batch}": round(many, 3), "batch": batch, "ratio": round(one / many, 2)}


class MemorySampler:
    """Each server's RSS once a second, on a thread, from warm-up to the end."""

    def __init__(self, services: dict[str, Service], every: float = 1.0):
        self.services, self.every = services, every
        self.samples: dict[str, list[tuple[float, float]]] = {name: [] for name in services}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while True:
            for name, service in self.services.items():
                self.samples[name].append((time.monotonic(), rss_mib(service.process.pid)))
            if self._stop.wait(self.every):
                return

    def between(self, name: str, start: float, end: float) -> list[float]:
        return [rss for at, rss in self.samples[name] if start <= at <= end]


def run_modes(model: Path, images: list[bytes], concurrencies: list[int], duration: float, out: Path,
              client: str = "raw", common: list[str] | None = None,
              modes_run: dict[str, list[str]] | None = None) -> list[dict]:
    """Both servers run at once. Each cell is measured in four quarters, batched / unbatched /
    unbatched / batched (ABBA), so a drift in the machine's load (it is shared) hits both modes alike."""
    modes_run = modes_run or modes()
    services = {name: Service(model, options, out / f"serve-{name.replace(' ', '-')}.log", common or [])
                for name, options in modes_run.items()}
    try:
        results = {name: {"mode": name, "options": modes_run[name], "ready_s": round(service.wait_ready(), 2),
                          "cells": []} for name, service in services.items()}
        for service in services.values():
            asyncio.run(load(service.url, images, max(concurrencies), 5.0, client))  # warm-up: prompts, batch shapes
        with MemorySampler(services) as memory:
            first, second = list(services)
            for concurrency in concurrencies:
                runs: dict[str, list[dict]] = {first: [], second: []}
                cell_start = time.monotonic()
                for name in (first, second, second, first):
                    runs[name].append(asyncio.run(load(services[name].url, images, concurrency, duration / 2, client)))
                cell_end = time.monotonic()
                for name, service in services.items():
                    ids = set().union(*(run["request_ids"] for run in runs[name]))
                    cell = summary_of(runs[name], concurrency, service.batch_sizes(ids))
                    rss = memory.between(name, cell_start, cell_end)
                    cell.update(rss_cell_start_mib=round(rss[0], 1), rss_cell_end_mib=round(rss[-1], 1),
                                rss_cell_peak_mib=round(max(rss), 1))
                    results[name]["cells"].append(cell)
                    show(name, cell)
        for name in services:
            rss = [value for _, value in memory.samples[name]]
            first_at = memory.samples[name][0][0]
            results[name].update(rss_start_mib=round(rss[0], 1), rss_peak_mib=round(max(rss), 1),
                                 rss_end_mib=round(rss[-1], 1), rss_samples=len(rss),
                                 rss_timeline=[[round(at - first_at, 1), round(value, 1)]
                                               for at, value in memory.samples[name]])
    finally:
        for service in services.values():
            service.stop()
    return list(results.values())


def show(name: str, cell: dict) -> None:
    print(f"{name:>15} c={cell['concurrency']:<3} {cell['requests_per_s']:7.1f} req/s  p50 {cell['p50_ms']:7.1f}  "
          f"p95 {cell['p95_ms']:7.1f}  p99 {cell['p99_ms']:7.1f} ms  batch {cell['mean_batch_size']}  "
          f"errors {cell['errors']}  client CPU {cell['client_cpu_ms_per_request']} ms/request", flush=True)


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
        cells = "; ".join(f"c={cell['concurrency']}: {cell['rss_cell_start_mib']} -> {cell['rss_cell_end_mib']}"
                          for cell in result["cells"])
        lines.append(f"\n{result['mode']}: server RSS {result['rss_start_mib']} MiB after warm-up, peak "
                     f"{result['rss_peak_mib']}, {result['rss_end_mib']} MiB at the end ({result['rss_samples']} "
                     f"samples, 1 s apart; per cell, start -> end: {cells}); ready {result['ready_s']} s after start")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/service-load"))
    parser.add_argument("--model", type=Path, help="Model folder (default: train --train-model under --out).")
    parser.add_argument("--train-model", default="phantom-tiny",
                        help="Registered model trained when --model is not given (phantom-tiny, cxr-small, ...).")
    parser.add_argument("--duration", type=float, default=60.0, help="Seconds per concurrency level.")
    parser.add_argument("--concurrency", default="1,4,16", help="Comma-separated client counts.")
    parser.add_argument("--client", choices=("raw", "httpx"), default="raw",
                        help="Load generator: pre-encoded HTTP/1.1 requests (raw) or httpx.AsyncClient.")
    parser.add_argument("--backend", default="auto",
                        help="medvl serve --backend of both servers (same in both; default auto, as medvl serve).")
    parser.add_argument("--torch-threads", type=int, default=0,
                        help="medvl serve --torch-threads of both servers (0: one per core) and of the forward timing.")
    parser.add_argument("--max-batch", type=int, default=16, help="medvl serve --max-batch of the batched server.")
    parser.add_argument("--max-wait-ms", type=float, default=10.0,
                        help="medvl serve --max-wait-ms of the batched server.")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    model = args.model or prepare_model(args.out, args.train_model)
    images = query_images(model, args.out)
    backend = resolve_backend(model_directory(model), args.backend)  # auto: the backend medvl serve would pick
    concurrencies = [int(n) for n in args.concurrency.split(",")]
    machine = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
               "load_average_at_start": os.getloadavg()}
    bound = forward_bound(model, images, backend=backend, threads=args.torch_threads)
    print(f"forward pass alone: {bound['ms_per_image_batch_1']} ms per image at batch 1, "
          f"{bound['ms_per_image_batch_16']} at batch 16 ({bound['ratio']}x; {bound['torch_threads']} torch threads, "
          f"backend {backend})",
          flush=True)
    common = ["--backend", backend, "--torch-threads", str(args.torch_threads)]
    results = run_modes(model, images, concurrencies, args.duration, args.out, args.client, common,
                        modes(args.max_batch, args.max_wait_ms))
    summary = {"machine": machine, "duration_s": args.duration, "labels": LABELS, "model": model.name,
               "client": args.client, "backend": backend, "torch_threads": args.torch_threads,
               "max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms,
               "forward_pass": bound, "results": results, "load_average_at_end": os.getloadavg()}
    write_json(args.out / "service_load.json", summary)
    print(table(results))
    print(f"machine: {machine['cpus']} CPUs, load average {machine['load_average_at_start']} at start, "
          f"{summary['load_average_at_end']} at end; wrote {args.out / 'service_load.json'}")


if __name__ == "__main__":
    from medvl.errors import run_script

    run_script(main)  # a medvl error (a missing data path or model) is one line, not a traceback
