"""A real small file system to fill: a tmpfs mounted for one test (root only; the test is skipped otherwise)."""

from __future__ import annotations

import gc
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def small_disk(folder: Path, size: str = "4m") -> Iterator[Path]:
    """``folder`` with a tmpfs of ``size`` mounted on it, unmounted afterwards."""
    folder.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        pytest.skip("no mount command: a small tmpfs is needed to fill the disk")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                             capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill (needs root): {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        gc.collect()  # files a failed command's traceback still holds open would keep the file system busy
        if subprocess.run(["umount", str(folder)], capture_output=True, check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True, check=False)


def free_bytes(folder: Path) -> int:
    stats = os.statvfs(folder)
    return stats.f_bavail * stats.f_frsize


def leave_free(folder: Path, amount: int) -> Path:
    """Fill ``folder``'s file system with one file so that about ``amount`` bytes stay free; returns the file."""
    filler = folder / "filler"
    filler.write_bytes(b"\0" * max(0, free_bytes(folder) - amount))
    return filler


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())
