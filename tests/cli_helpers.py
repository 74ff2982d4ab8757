"""Running the ``medvl`` CLI in-process for tests (imported by the CLI test modules), and the shared
fixtures' building blocks: ISIC rows, manifests, a real PostgreSQL server."""

import contextlib
import csv
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
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


PLANTED_WORDS = ("krumplehorn", "zebraquartz", "99887766", "1947", "mrn")  # in one report of planted_phantom


def planted_phantom(phantom_dir: Path, folder: Path) -> Path:
    """A copy of the phantom data whose fourth training report names a doctor, a patient, an MRN and a birth date."""
    shutil.copytree(phantom_dir, folder)
    with (folder / "manifest.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    row = [r for r in rows if r["split"] == "train"][3]
    row["text"] += " Discussed with Dr Krumplehorn; patient Zebraquartz DOB 12/03/1947, MRN 99887766."
    with (folder / "manifest.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return folder


def write_manifest(path: Path, header: list[str], rows: list[list]) -> Path:
    """A CSV manifest (images read in place)."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@contextlib.contextmanager
def postgres_server(prefix: str) -> Iterator[tuple[Any, Path]]:
    """A real PostgreSQL server (the ``pgserver`` package, pgvector included) in a fresh temporary folder, stopped
    and removed afterwards: yields the server and its folder. Skips the test, with the reason, when pgserver or
    psycopg is not installed or the server cannot start."""
    try:
        import pgserver
        import psycopg  # noqa: F401
    except ImportError as err:
        pytest.skip(f"pgserver / psycopg not installed ({err}); pip install -e '.[scale]'")
    folder = Path(tempfile.mkdtemp(prefix=prefix))  # pgserver opens its parents: keep it apart
    try:
        server = pgserver.get_server(folder, cleanup_mode="stop")
    except Exception as err:  # noqa: BLE001 - any failure to start means: no server to test against
        shutil.rmtree(folder, ignore_errors=True)
        pytest.skip(f"pgserver could not start a PostgreSQL server: {err}")
    try:
        yield server, folder
    finally:
        server.cleanup()
        shutil.rmtree(folder, ignore_errors=True)


def with_copied_films(data: Path, out: Path, from_split: str, to_split: str, n: int) -> tuple[Path, int]:
    """A copy of the phantom folder ``data`` at ``out`` whose first ``n`` rows of ``to_split`` show renamed
    byte-for-byte copies of the first ``n`` films of ``from_split`` (another file each, so no shared path);
    returns the folder and how many records ``from_split`` has."""
    shutil.copytree(data, out)
    with (out / "manifest.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    sources = [r for r in rows if r["split"] == from_split]
    targets = [r for r in rows if r["split"] == to_split][:n]
    for target, source in zip(targets, sources[:n], strict=True):
        renamed = f"images/copy_of_{Path(source['image']).name}"
        shutil.copyfile(out / source["image"], out / renamed)
        target["image"] = renamed
    with (out / "manifest.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return out, len(sources)


def interrupted_build(model, model_dir, data, out, monkeypatch, batch_size: int = 4, **options: Any) -> None:
    """A build of ``data`` in batches of ``batch_size`` (``options``: build_index's others) stopped by an interrupt
    at its third batch: two are checkpointed."""
    from medvl.index import build as build_module
    from medvl.index import build_index

    calls, original = [], build_module.embed_records

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(build_module, "embed_records", failing)
    with pytest.raises(KeyboardInterrupt):
        build_index(model, data, out, model_dir=model_dir, batch_size=batch_size, show_progress=False, **options)
    monkeypatch.setattr(build_module, "embed_records", original)
