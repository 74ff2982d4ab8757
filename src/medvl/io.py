"""Atomic file writes: write to a temporary sibling, then rename over the target."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sqlite3
import stat
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import DataError, InputError, WriteError


@contextmanager
def write_errors_named(path: str | Path) -> Iterator[None]:
    """Turn a failed write (full disk, quota, read-only file system, permissions) into one
    ``WriteError`` (a ``DataError``) naming ``path``.

    Errors raised while writing often carry no file name (``[Errno 28] No space left on device``
    from a ``write`` call, or safetensors' ``SafetensorError``), so the message would not say
    where; this names the output being written. Also mapped: SQLite's write failures
    (``sqlite3.OperationalError`` "database or disk is full", "disk I/O error", "attempt to write a
    readonly database", with SQLite's reason), FAISS's ``RuntimeError`` from a failed
    ``write_index`` and ``shutil.Error`` from a ``copytree`` that could not copy some files (the
    first file's reason). Other errors (bugs) pass through unchanged.
    """
    try:
        yield
    except DataError:
        raise
    except OSError as err:  # shutil.Error is one too, but carries a list of failures, not one errno
        reason = _copy_failure(err) if isinstance(err, shutil.Error) else err.strerror or str(err)
        raise WriteError(path, f"cannot write: {reason}") from None
    except sqlite3.OperationalError as err:
        if not any(words in str(err) for words in _SQLITE_WRITE_FAILURES):
            raise
        raise WriteError(path, f"cannot write: {err}") from None
    except Exception as err:
        faiss_write = isinstance(err, RuntimeError) and ("write error" in str(err) or "for writing" in str(err))
        if faiss_write or (type(err).__name__ == "SafetensorError" and _is_io_failure(str(err))):
            raise WriteError(path, f"cannot write: {_io_reason(str(err))}") from None
        raise


_SQLITE_WRITE_FAILURES = ("disk is full", "disk I/O error", "readonly database", "unable to open database")


def _copy_failure(error: shutil.Error) -> str:
    """The reason of the first file ``shutil.copytree`` could not copy (its errors: (src, dst, reason))."""
    failures = error.args[0] if error.args and isinstance(error.args[0], list) else []
    reason = str(failures[0][2]) if failures and len(failures[0]) == 3 else str(error)
    return _io_reason(reason) if _is_io_failure(reason) else reason[:200]


def _is_io_failure(message: str) -> bool:
    return any(word in message for word in ("No space left", "os error", "I/O error", "Input/output error",
                                            "Permission denied", "Read-only file system", "Disk quota"))


def _io_reason(message: str) -> str:
    for reason in ("No space left on device", "Permission denied", "Read-only file system", "Disk quota exceeded",
                   "Input/output error"):
        if reason in message:
            return reason
    return "I/O error"


def _umask_without_setting_it() -> int | None:
    """The process's umask as Linux reports it (``/proc/self/status``), or None where it does not."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _umask_at_import() -> int:
    if (found := _umask_without_setting_it()) is not None:
        return found
    old = os.umask(0o077)  # read by setting it: done once, at import, before any thread of ours runs
    os.umask(old)
    return old


_UMASK_AT_IMPORT = _umask_at_import()


def output_mode(folder: bool = False) -> int:
    """The permissions of a new output, as any Unix tool gives them: 0o666 (files) or 0o777 (folders) less
    the user's umask. Temporary files and staging folders are created private (0o600 / 0o700) and keep
    that mode through the rename, so every atomic output is set to this first; ``umask 077`` keeps
    outputs private (docs/security.md)."""
    umask = _umask_without_setting_it()
    return (0o777 if folder else 0o666) & ~(_UMASK_AT_IMPORT if umask is None else umask)


def give_output_mode(path: str | Path) -> Path:
    """Set a file written by a library that creates its files owner-only (safetensors' ``save_file``: 0o600)
    to the mode every output gets (``output_mode``)."""
    os.chmod(path, output_mode())
    return Path(path)


def staging_folder(parent: str | Path, prefix: str, suffix: str = "") -> Path:
    """A new, uniquely named folder in ``parent`` (``tempfile.mkdtemp``) to write an output into before it is
    renamed into place, with the mode any new output folder gets (``output_mode``), not mkdtemp's 0o700."""
    staging = Path(tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=parent))
    os.chmod(staging, output_mode(folder=True))
    return staging


@contextmanager
def staged_for(target: Path, parent: str | Path, prefix: str) -> Iterator[Path]:
    """A staging folder (``staging_folder``) for the whole of ``target``, written inside the ``with`` and
    renamed into place there (``replace_dir``). Any failure removes it; a ``WriteError`` about a file in it is
    raised again naming the same file under ``target``, the path the user knows."""
    staging = staging_folder(parent, prefix)
    try:
        yield staging
    except WriteError as err:
        shutil.rmtree(staging, ignore_errors=True)
        written = Path(err.path) if err.path is not None else None
        named = target / written.relative_to(staging) if written is not None and written.is_relative_to(staging) \
            else err.path
        raise WriteError(named, err.problem) from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to a temporary sibling, then rename it over ``path``; a failed write
    (e.g. a full disk) leaves neither a partial file nor the temporary one, and names ``path``.
    The file gets the umask's permissions (``output_mode``), also when it replaces one."""
    path = Path(path)
    with write_errors_named(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            os.chmod(tmp, output_mode())
            with os.fdopen(handle, "wb") as stream:
                stream.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return path


InputPaths = Mapping[str, str | Path | Iterable[str | Path] | None]
"""A command's inputs by option name (``{"--model": model, "IMAGES": images}``): a path, several, or None."""


def check_output_file(path: str | Path, overwrite: bool = False, option: str = "output",
                      inputs: InputPaths | None = None) -> Path:
    """Refuse an output file path before any work is done, unless it can be safely replaced.

    A path that does not exist is fine (its folder is created when written). An output that is one
    of the command's ``inputs`` or lies inside one of its folders is refused whatever ``overwrite``
    says (``check_not_an_input``). An existing path is refused unless ``overwrite`` is set, and even
    then only a regular file is ever replaced: a symlink, folder, device, FIFO or socket is refused
    whatever ``overwrite`` says, so that ``--json /dev/sda`` or ``--json link-to-config.json`` cannot
    clobber what they point at.

    An empty path given as text is refused as such (``Path('')`` is ``.``). A path given as text that ends with
    a slash (``--json newdir/``) names a folder and is refused (``Path`` would drop the slash and write a file
    ``newdir``). The nearest existing folder on the way must let a file
    be created in it (a file is created there and removed at once): an unwritable place (a read-only mount,
    ``/proc``, ``/sys``, a folder of another user) is a ``WriteError`` now, not after the command's work.
    """
    if isinstance(path, str) and not path:  # Path('') is '.', which the messages below would name instead
        raise InputError(f"{option}: empty path; give a file path")
    if isinstance(path, str) and path.endswith(("/", os.sep)):
        raise InputError(f"{path}: {option} names a folder (it ends with a slash); give a file path")
    path = Path(path)
    try:
        info = path.lstat()
    except FileNotFoundError:
        info = None
    except NotADirectoryError:
        raise InputError(f"{path}: {option} path runs through a file, not a folder") from None
    check_not_an_input(path, option, inputs or {})
    if info is not None:
        if stat.S_ISLNK(info.st_mode):
            raise InputError(f"{path}: {option} is a symbolic link; give a regular file path")
        if not stat.S_ISREG(info.st_mode):
            kind = "a folder" if stat.S_ISDIR(info.st_mode) else "not a regular file"
            raise InputError(f"{path}: {option} is {kind}; give a regular file path")
        if not overwrite:
            raise InputError(f"{path}: {option} file exists (use --overwrite to replace it)")
    _check_creatable(path, option)
    return path


def _check_creatable(path: Path, option: str) -> None:
    """Create and remove a file in the nearest existing folder of ``path`` (where ``atomic_write_bytes`` puts its
    temporary file, or creates the missing folders): a ``WriteError`` naming ``path`` when that fails. Trying is
    the only sure test: ``os.access`` says yes to root on a read-only mount or in ``/proc``."""
    folder = path.parent
    while not os.path.lexists(folder) and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise InputError(f"{path}: {option} path runs through a file, not a folder")
    with write_errors_named(path):
        handle, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
        os.close(handle)
        os.unlink(probe)


def check_output_folder(path: str | Path | None, option: str = "output") -> None:
    """Refuse an output folder whose path runs through a regular file (``afile.txt/out``) before any work, in
    the words ``check_output_file`` uses (creating it would fail later with a bare "File exists")."""
    if path is None:
        return
    try:
        Path(path).lstat()
    except NotADirectoryError:
        raise InputError(f"{path}: {option} path runs through a file, not a folder") from None
    except FileNotFoundError:
        pass


def check_not_an_input(path: str | Path, option: str, inputs: InputPaths) -> None:
    """Refuse an output ``path`` that is one of a command's input files, or lies inside one of its folders (a
    model, an index, a dataset folder, an output folder the command fills), whatever ``--overwrite`` says:
    ``--json model/config.json --overwrite`` would destroy the model, and a new image, DICOM, NIfTI or table in
    a dataset folder may be read back as data (a new results JSON beside the data is fine:
    ``_new_file_beside_data``); a dataset given as a file (``DATASET_OPTIONS``: a manifest, whose images lie in
    its folder) protects its folder the same way. Paths are compared resolved (symbolic links followed; hard links
    count); a folder input that does not exist yet (an output folder) counts as a folder. A training run's folder
    given for its model (``--model run``, which reads ``run/model``) protects the run's own entries
    (``RUN_OWN_ENTRIES``); another file there, new or replaced with ``--overwrite``, is fine."""
    target = os.path.realpath(path)
    for name, given in _input_paths(inputs):
        source = os.path.realpath(given)
        if _is_run_folder(source) and target != source and os.path.commonpath([target, source]) == source:
            first = os.path.relpath(target, source).split(os.sep)[0]
            if first in RUN_OWN_ENTRIES and os.path.lexists(os.path.join(source, first)):
                raise InputError(f"{path}: {option} would replace {os.path.join(given, first)} of {given} ({name}), "
                                 "a training run this command reads; give a path outside it")
        elif os.path.isdir(source) or not os.path.lexists(source):
            inside = target == source or os.path.commonpath([target, source]) == source
            if inside and not _new_file_beside_data(target, name):
                where = "is" if target == source else "lies inside"
                raise InputError(f"{path}: {option} {where} {given} ({name}), which this command reads or writes; "
                                 "give a path outside it")
        elif target == source or (os.path.exists(target) and os.path.samefile(target, source)):
            raise InputError(f"{path}: {option} is {given} ({name}), an input of this command; give another path")
        elif name in DATASET_OPTIONS:  # a manifest (or another dataset file): its folder holds the data it names
            folder = os.path.dirname(source)
            if os.path.commonpath([target, folder]) == folder and not _new_file_beside_data(target, name):
                raise InputError(f"{path}: {option} lies inside {os.path.dirname(given) or '.'}, the folder of {given} "
                                 f"({name}), whose data this command reads; give a path outside it")


# options naming a dataset: given as a file (a manifest, a question file, an .npz), its folder is protected as a
# dataset folder is, since the images a manifest names lie there
DATASET_OPTIONS = ("--data", "--against", "--check-data", "--train-data", "--test-data", "--bridge-data",
                   "--concept-data")
FOLDERS_KEPT_WHOLE = ("--model", "--baseline-model", "--index", "--out", "OUT", "--knowledge")  # nothing new inside
RUN_OWN_ENTRIES = ("model", "checkpoint", "train_config.json", "metrics.jsonl")  # what a training run folder holds
# what a dataset loader may read back from its folder: a new file of these kinds there would become data
DATA_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".dcm", ".dicom", ".nii",
                 ".nii.gz", ".npz", ".npy", ".csv", ".tsv", ".jsonl", ".xml", ".tgz", ".tar.gz", ".zip")


def _new_file_beside_data(target: str, name: str) -> bool:
    """A file in a dataset folder of a kind no loader reads (a results JSON written beside the data, e.g. with
    ``--data .``, and replaced by a rerun with ``--overwrite``): allowed. One of a kind loaders read, a
    ``dataset.json``, or anything inside a model, index or output folder is not (DICOM files are read by
    their DICM marker, not their suffix, so a JSON beside them is never read as one)."""
    lower = os.path.basename(target).lower()
    return name not in FOLDERS_KEPT_WHOLE and lower != "dataset.json" and not lower.endswith(DATA_SUFFIXES)


def _is_run_folder(folder: str) -> bool:
    """A ``medvl train`` output folder (``model/config.json`` inside, no ``config.json`` of its own)."""
    return os.path.isfile(os.path.join(folder, "model", "config.json")) and not os.path.isfile(
        os.path.join(folder, "config.json"))


def _input_paths(inputs: InputPaths) -> Iterator[tuple[str, str | Path]]:
    for name, given in inputs.items():
        if given is None:
            continue
        for one in [given] if isinstance(given, str | Path) else given:
            if one is not None and str(one) and "://" not in str(one):  # not a database URL
                yield name, one


def replace_dir(staging: Path, target: Path) -> None:
    """Swap a fully written staging folder into place; the old target survives until the rename. An existing
    empty target is replaced the same way, except the current folder or a mount point, which cannot be renamed:
    it is kept and filled, its entries moved in one by one (the only case that is not one rename).

    A ``target`` that is a symbolic link (a deployment link, ``models/current -> v3``) is kept: the folder it
    points to is replaced. That folder must be on the staging folder's file system (one rename), else this
    refuses with a ``WriteError`` naming both and nothing changes."""
    target = target.absolute()  # Path(".") has no name to rename it by
    if target.is_symlink():
        target = _link_destination(staging, target)
    if target.is_dir() and not any(target.iterdir()) and (target.samefile(Path.cwd()) or target.is_mount()):
        for entry in sorted(staging.iterdir()):
            entry.rename(target / entry.name)
        staging.rmdir()
    elif target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}-{staging.name[-8:]}")
        target.rename(old)
        staging.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(target)


def _link_destination(staging: Path, link: Path) -> Path:
    """The folder the symbolic link ``link`` points to, when ``staging`` can be renamed onto it."""
    destination = link.resolve()
    parent = destination.parent
    if not parent.is_dir() or parent.stat().st_dev != staging.parent.stat().st_dev:
        raise WriteError(link, f"is a symbolic link to {destination}, which is not on the same file system as "
                               f"{staging.parent} (or its folder is missing); give the folder itself")
    return destination


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read a megabyte at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json(path: str | Path, data: Any) -> Path:
    """Write JSON atomically; NaN/inf become null so the file stays valid JSON."""
    return atomic_write_bytes(path, json.dumps(json_ready(data), indent=2).encode("utf-8") + b"\n")


def loads_json(text: str | bytes) -> Any:
    """``json.loads``, with every way ``text`` is not JSON a ``ValueError``: not UTF-8 (``UnicodeDecodeError``), not
    JSON (``JSONDecodeError``), or nested too deeply for the parser (json raises ``RecursionError``, which a reader
    catching ``ValueError`` let through as a traceback)."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def read_json(path: str | Path) -> Any:
    """The JSON file ``path`` (``loads_json``): an ``OSError`` when it cannot be read, a ``ValueError`` when it is
    not UTF-8 JSON, for the caller to name the file in its own error type."""
    return loads_json(Path(path).read_bytes())


def json_ready(value: Any) -> Any:
    """``value`` as ``write_json`` stores it: NaN and inf as null, keys as strings, tuples as lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(v) for v in value]
    return value
