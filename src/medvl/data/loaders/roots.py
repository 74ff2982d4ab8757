"""Keeping the files a dataset names inside the dataset's folder.

A manifest, a VQA question file or a ``dataset.json`` sidecar names files by path, and those paths
are data like any other cell: a row may say ``../../etc/passwd`` or ``/home/someone/scan.png``, and
a file in the folder may be a symbolic link to somewhere else. A loader reads only files that
resolve (symbolic links followed) to the *root* or below it: the resolved folder holding the
manifest or question file (the dataset folder for MedPix and DICOM folders). An absolute path that
resolves inside the root is fine.

Every offending row is counted and the load fails with one ``DataError`` naming the file, the
count and the first offending row number, never the path text (a path may itself hold patient
identifiers). ``allow_outside_root=True`` (the CLI's ``--allow-outside-root``) lets a user who
trusts the file opt in, e.g. a manifest kept apart from its image store.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from ...errors import DataError

OPT_IN = "pass allow_outside_root=True (--allow-outside-root) only if you trust this file"


def is_inside(path: Path, root: Path) -> bool:
    """True when ``path`` resolves (symbolic links followed) to ``root`` or below; ``root`` is resolved."""
    try:
        return path.resolve().is_relative_to(root)
    except (OSError, RuntimeError):  # a symbolic link loop: not a file that can be read anyway
        return False
    except ValueError:  # a NUL byte: no such file can exist, it is reported as missing instead
        return True


def path_exists(path: Path) -> bool:
    """``path.exists()``, False for a name the file system cannot hold (too long: no such file exists)."""
    try:
        return path.exists()
    except OSError:
        return False


def is_file(path: Path) -> bool:
    """``path.is_file()``, False for a name the file system cannot hold."""
    try:
        return path.is_file()
    except OSError:
        return False


def outside_root(root: Path, entries: Iterable[tuple[str, Path]]) -> list[str]:
    """The ``where`` labels of the ``(where, path)`` entries whose path resolves outside ``root``."""
    resolved_root = root.resolve()
    return [where for where, path in entries if not is_inside(path, resolved_root)]


def check_inside_root(source: Path, root: Path, entries: Iterable[tuple[str, Path]], allow: bool,
                      what: str = "rows") -> None:
    """Raise ``DataError(source, ...)`` when any entry resolves outside ``root``, unless ``allow``.

    ``entries`` are ``(where, path)`` pairs, ``where`` a row label such as ``"line 3"`` (shown for
    the first offender; the path itself is never shown).
    """
    if allow:
        return
    entries = list(entries)
    outside = outside_root(root, entries)
    if outside:
        raise DataError(source, f"{len(outside)} of {len(entries)} {what} name a file outside the dataset folder "
                                f"{root} (first: {outside[0]}); {OPT_IN}")
