"""Training throughput: samples/s and peak memory of ``medvl train``, 1 process vs torchrun with N.

    python benchmarks/train_throughput.py [--model cxr-small] [--n 512] [--batch-size 32]
                                          [--steps 20,140] [--procs 1,2] [--json out.json]

Each configuration runs the plain command (``medvl train``, or ``torchrun --standalone
--nproc-per-node N --no-python medvl train``) twice, for the two step counts of ``--steps``;
the difference of the wall times divided by the difference of the samples is the steady-state
throughput (start-up, image loading and the final save cancel out). The samples are those each run
trained on: the run trains on the phantom's train split (358 of the default 512 images), so the last
batch of every epoch is short (6 of 32 records by default) or, under torchrun, skipped when it would
leave a process a single record (``medvl.train.loop.epoch_batch_sizes``); the count is checked
against the step and epoch of the run's last ``metrics.jsonl`` line. Every process is given
``cores / N`` torch threads, so each row uses the whole machine. Peak resident memory is the largest
of any process of the run (``ru_maxrss`` of the children). A 2-process run on one 2-core machine
is not expected to be faster: it measures what data parallelism costs here (the all-gather of the
embeddings, the all-reduce of the gradients, one model copy per process), which is the part that
does not shrink when the processes run on separate machines.

The load average before and after is printed and recorded (``load_average``, ``load_average_after``). A row
more than N times as fast as the first on N times its processes cannot be a measurement on one machine (the
first run was slowed by other work): it is marked ``credible: false`` and a ``WARNING`` line says so. The
temporary folder (phantom data, models) is removed however the script ends.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from medvl.train.loop import epoch_batch_sizes  # noqa: E402

# Runs one command in a fresh Python parent, so the peak RSS it reports is of this run's processes only
# (ru_maxrss of RUSAGE_CHILDREN is the largest child a parent has ever waited for).
_PEAK = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
         "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def run(command: list[str], threads: int) -> tuple[float, float]:
    """Wall seconds and the peak RSS (MiB) of the largest process of this run."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _PEAK, *command], check=True, env=env, capture_output=True,
                          text=True)
    seconds = time.perf_counter() - started
    return seconds, int(done.stdout.split()[-1]) / 1024


def samples_trained(out: Path, steps: int, processes: int) -> tuple[int, int]:
    """(training records, samples trained on) of the run in ``out`` that stopped after ``steps`` optimizer steps."""
    described = json.loads((out / "train_config.json").read_text())
    records, settings = described["records"], described["train"]
    if settings["grad_accum"] != 1:
        sys.exit(f"{out}: grad_accum {settings['grad_accum']}: this benchmark counts one batch per step")
    sizes = epoch_batch_sizes(records, settings["batch_size"], processes)
    epochs, within = divmod(steps, len(sizes))
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    if last["step"] != steps or abs(last["epoch"] - steps / len(sizes)) > 1e-9:
        sys.exit(f"{out}: the run logged step {last['step']}, epoch {last['epoch']}; {steps} steps of "
                 f"{len(sizes)} batches per epoch were expected (medvl.train.loop.epoch_batch_sizes)")
    return records, epochs * sum(sizes) + sum(sizes[:within])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cxr-small")
    parser.add_argument("--n", type=int, default=512, help="phantom images")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", default="20,140", help="two step counts; the throughput is from their difference")
    parser.add_argument("--procs", default="1,2")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    low, high = (int(s) for s in args.steps.split(","))
    medvl, torchrun = shutil.which("medvl"), shutil.which("torchrun")
    if medvl is None or torchrun is None:
        sys.exit("medvl and torchrun must be on PATH (pip install -e .)")
    cores = os.cpu_count() or 1
    load_before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="medvl-train-throughput-"))
    try:  # removed however the script ends: a failed run, a too-short run, Ctrl-C
        rows = measure(args, medvl, torchrun, cores, work, (low, high))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = summarise(rows, cores, load_before, os.getloadavg())
    print(f"medvl train throughput: {args.model} at {args.image_size} px, global batch {args.batch_size}, "
          f"{rows[0]['train_records']} training records (the train split of {args.n} phantom images), {cores} cores")
    print(f"{'processes':>9} {'threads':>7} {'samples':>8} {'samples/s':>10} {'vs 1 proc':>9} {'peak RSS MiB':>12}")
    for row in rows:
        print(f"{row['processes']:>9} {row['threads_per_process']:>7} {row['samples']:>8} "
              f"{row['samples_per_s']:>10.1f} {row['vs_first']:>9.2f} {row['peak_rss_mib']:>12}")
    print("load average (1, 5, 15 min): before " + " ".join(f"{x:.2f}" for x in load_before)
          + ", after " + " ".join(f"{x:.2f}" for x in summary["load_average_after"]))
    for warning in summary["warnings"]:
        print(f"WARNING: {warning}")
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, **summary, "rows": rows}, indent=2))


def measure(args: argparse.Namespace, medvl: str, torchrun: str, cores: int, work: Path,
            step_counts: tuple[int, int]) -> list[dict]:
    """One row per process count of ``--procs``: samples/s from the two runs of ``step_counts`` steps."""
    low, high = step_counts
    data = work / "phantom"
    subprocess.run([medvl, "phantom", str(data), "--n", str(args.n), "--size", "128", "--quiet"], check=True,
                   stdout=subprocess.DEVNULL)
    rows = []
    for procs in (int(p) for p in args.procs.split(",")):
        threads = max(1, cores // procs)
        times, seen = {}, {}
        peak = 0.0
        for steps in (low, high):
            out = work / f"out-{procs}-{steps}"
            train = ["train", "--data", str(data), "--out", str(out), "--model", args.model, "--epochs", "100",
                     "--batch-size", str(args.batch_size), "--max-steps", str(steps), "--quiet",
                     "--set", f"image.image_size={args.image_size}"]
            command = [medvl, *train] if procs == 1 else \
                [torchrun, "--standalone", f"--nproc-per-node={procs}", "--no-python", medvl, *train]
            times[steps], rss = run(command, threads)
            records, seen[steps] = samples_trained(out, steps, procs)
            peak = max(peak, rss)
        samples, elapsed = seen[high] - seen[low], times[high] - times[low]
        if elapsed <= 0:  # start-up noise larger than the extra steps' time: no rate to report
            sys.exit(f"{procs} process(es): {high} steps took no longer than {low} ({times[high]:.2f} s against "
                     f"{times[low]:.2f} s); the runs are too short to time: raise the second --steps count")
        rate = samples / elapsed
        rows.append({"processes": procs, "threads_per_process": threads, "samples_per_s": round(rate, 1),
                     "train_records": records, "samples": samples, "elapsed_s": elapsed,
                     "seconds": {str(k): round(v, 1) for k, v in times.items()}, "peak_rss_mib": round(peak)})
    return rows


def summarise(rows: list[dict], cores: int, load_before: tuple[float, ...], load_after: tuple[float, ...]
              ) -> dict:
    """Each row's rate against the first row's (``vs_first``, added to the rows), the load averages, and a
    warning per row whose speed-up over the first is above its share of processes (N processes against 1: more
    than N times as fast): on one machine no real measurement does that; the first run was slowed by other
    work (an oversubscribed thread pool slows many-fold), so the figures are not a valid measurement."""
    base = rows[0]
    warnings = []
    for row in rows:
        row["vs_first"] = round(row["samples_per_s"] / base["samples_per_s"], 2)
        allowed = row["processes"] / base["processes"]
        row["credible"] = row["vs_first"] <= allowed
        if not row["credible"]:
            warnings.append(f"{row['processes']} processes {row['vs_first']:.1f}x faster than {base['processes']} on "
                            f"the same {cores} cores (at most {allowed:g}x is possible): the machine was busy "
                            f"(load average {load_before[0]:.1f} before, {load_after[0]:.1f} after); "
                            "not a valid measurement")
    return {"cores": cores, "load_average": list(load_before), "load_average_after": list(load_after),
            "warnings": warnings}


if __name__ == "__main__":
    from medvl.errors import run_script

    run_script(main)  # a medvl error (a missing data path or model) is one line, not a traceback
