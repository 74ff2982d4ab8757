"""Running the ``medvl`` CLI in-process for tests (imported by the CLI test modules)."""

import csv
from pathlib import Path

from typer.testing import CliRunner

from medvl.cli.main import app

runner = CliRunner()


def invoke(*args):
    """Run ``medvl ARGS``; returns the result and its stdout + stderr as one string."""
    result = runner.invoke(app, [str(a) for a in args])
    return result, result.output + (result.stderr if result.stderr_bytes is not None else "")


def isic_rows(shared_data: Path, diagnosis: str) -> list[dict[str, str]]:
    """The shared ISIC metadata rows of one diagnosis, in file order, with ``path``: the image file."""
    folder = shared_data / "isic-dermoscopy"
    with (folder / "metadata.csv").open(newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["diagnosis"] == diagnosis]
    return [{**r, "path": str(folder / "images" / r["image"])} for r in rows]


def write_manifest(path: Path, header: list[str], rows: list[list]) -> Path:
    """A CSV manifest (images read in place)."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path
