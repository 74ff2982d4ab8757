"""The project's error types.

Library code raises these; the CLI and the HTTP service catch them once at the boundary and turn
them into a one-line message (exit code 2) or an HTTP 4xx. Messages name the file or value at
fault and say what was expected, never include pixel data or report text.
"""

from __future__ import annotations

from pathlib import Path


def one_line(error: BaseException, limit: int = 200) -> str:
    """A third-party error in one short line for a message: its type and its text's first ``limit`` characters,
    white space (the lines of a multi-line message) collapsed."""
    return f"{type(error).__name__}: {' '.join(str(error).split())[:limit]}"


class MedvlError(Exception):
    """Base class of every error medvl raises on purpose."""


class DataError(MedvlError):
    """A data file or folder is missing, unreadable, empty or malformed."""

    def __init__(self, path: str | Path | None, problem: str):
        self.path = str(path) if path is not None else None
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)

    def __reduce__(self):  # picklable, so an error raised in a worker process reaches the caller intact
        return type(self), (self.path, self.problem)


class InputError(MedvlError):
    """An argument has a value medvl cannot use (unknown label, bad shape, bad option).

    ``parameter``: the Python name of the argument at fault when the message starts with it (``"n must be >= 1,
    got 0"``), so that the CLI can name its own option instead (``--n``); the service's form fields carry the
    Python names already."""

    def __init__(self, message: str = "", *, parameter: str | None = None):
        super().__init__(message)
        self.parameter = parameter


class ModelError(MedvlError):
    """A model name, directory or checkpoint cannot be used."""


class ConnectionFailure(DataError):
    """A server cannot be reached or stopped answering (connection refused, timeout, TLS, an association the
    PACS refused, a transfer that broke off): nothing else asked of it in this run would fare better, so a
    multi-series pull stops there instead of trying every other series."""


class WriteError(DataError):
    """An output could not be written (full disk, quota, read-only file system, permissions)."""


class TrainingError(MedvlError):
    """Training cannot go on: the loss or the gradients became NaN or infinite."""


class PeerLostError(TrainingError):
    """Another process of a torchrun group stopped (its own error, a kill) while this one waited on it in a
    collective: this process cannot go on either; the other's output says why."""


def run_script(main) -> None:
    """Run a script's ``main()`` (the benchmarks/ scripts) as ``medvl`` runs a command: a ``MedvlError`` is one
    line on stderr and exit code 2, not a traceback."""
    import sys

    try:
        main()
    except MedvlError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
