"""Shared CLI plumbing: one error boundary, logging setup, option helpers, result printing."""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from ..errors import MedvlError, PeerLostError
from ..io import InputPaths
from .exits import EXIT_BAD_INPUT as EXIT_BAD_INPUT
from .exits import EXIT_FAILED as EXIT_FAILED
from .exits import EXIT_INTERRUPTED as EXIT_INTERRUPTED
from .exits import EXIT_TERMINATED as EXIT_TERMINATED

# stdout prints data (file names, ids, labels, report text) that may hold "[...]": rich markup is off, and the few
# lines that style their own words turn it on (``markup=True``) with every value in them escaped
console = Console(markup=False)
err_console = Console(stderr=True)
log = logging.getLogger("medvl")


class Terminated(KeyboardInterrupt):
    """SIGTERM (``timeout``, ``docker stop``, Slurm preemption, systemd) raised where the program is, as
    Ctrl-C raises KeyboardInterrupt, so that the same cleanups run (staging folders, a fresh run's folder)."""

LabelOption = Annotated[list[str] | None, typer.Option(
    "--label-column", "-l", help="Label column to use (repeatable); default: the dataset's own.")]
OneLabelOption = Annotated[list[str] | None, typer.Option(
    "--label-column", "-l", help="Label column to score (one); default: the dataset's own.")]
SplitOption = Annotated[str, typer.Option(help="Split to use; 'all' uses every record.")]
# text, not Path: a trailing slash (``--json newdir/``, a folder) must reach io.check_output_file, and Path drops it
JsonOption = Annotated[str | None, typer.Option("--json", help="Write the metrics to this JSON file.")]
CaptionsOption = Annotated[Path | None, typer.Option(
    help="Caption templates / class descriptions (YAML or JSON) for prompts and label captions.")]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
AllowOutsideOption = Annotated[bool, typer.Option(
    "--allow-outside-root", help="Let a manifest name image files outside its own folder (refused by default).")]
OverwriteOption = Annotated[bool, typer.Option(
    "--overwrite", help="Replace existing output files (only regular files are ever replaced).")]
SelfSupervisedOption = Annotated[float | None, typer.Option(
    help="Weight of a self-supervised (SimCLR) loss between two views of each training image: a second "
         "augmentation and a random crop (SLIP; 0 = off; default: the recipe's, else 0).")]
CovariatesOption = Annotated[str | None, typer.Option(
    help="Patient metadata columns fused with the image classifier, comma-separated (e.g. age_approx,sex; "
         "none = image only; default: the recipe's / the model's).")]
TrainSetOption = Annotated[list[str] | None, typer.Option(
    "--train-set", help="Any training setting key=value (JSON value; repeatable), e.g. self_supervised_epochs=60: "
                        "the fields medvl models --recipe NAME lists under train, but recipe, which --model sets "
                        "(default: the recipe's).")]
SkipFlaggedOption = Annotated[bool | None, typer.Option(
    "--skip-flagged/--keep-flagged", help="Train without the images the audit (medvl audit) finds unreadable, "
                                          "blank or streaked (default: the recipe's, else keep).")]
WorkersOption = Annotated[int | None, typer.Option(
    help="Processes reading and resizing images ahead of the model (0 = in this process; at most the CPU cores; "
         "default: 0 below 4 cores, else a quarter of the cores, from 512 images on).")]
BackendOption = Annotated[str, typer.Option(
    help="How the model runs: auto (channels-last for a medvl model, torch for a transformers one), torch, "
         "torch-channels-last, torch-bf16, onnx, onnx-int8 (the onnx ones need 'medvl export onnx' first); "
         "see docs/benchmarks.md for which is fastest.")]


def check_outputs(overwrite: bool, inputs: InputPaths | None = None, **paths: str | Path | None) -> None:
    """Refuse a command's output files before it starts its work (see ``io.check_output_file``): existing
    ones without ``overwrite``; whatever ``overwrite`` says, two options naming the same file and an output
    that is one of the command's ``inputs`` (option -> path or paths: the model, index and dataset folders,
    input files, folders it writes) or lies inside one of their folders.

    Keyword names are the options, e.g. ``check_outputs(overwrite, {"--model": model}, json=json_out)`` ->
    ``--json``.
    """
    from ..errors import InputError
    from ..io import check_output_file

    named: dict[str, str] = {}
    for option, path in paths.items():
        if path is not None:
            flag = "--" + option.replace("_", "-")
            check_output_file(path, overwrite, flag, inputs)
            same = named.setdefault(os.path.realpath(path), flag)
            if same != flag:
                raise InputError(f"{path}: {same} and {flag} name the same file; give each its own")


def handle_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn medvl's own errors into one line on stderr and exit code 2 (no traceback)."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except PeerLostError as err:  # not the input's fault: the other rank's own output names the problem
            print_error(str(err))
            raise typer.Exit(EXIT_FAILED) from None
        except MedvlError as err:
            print_error(_named_as_option(command, err))
            raise typer.Exit(EXIT_BAD_INPUT) from None
        except OSError as err:  # unreadable / unwritable user paths: permissions, full disk
            print_error(f"{err.filename}: {err.strerror}" if err.filename else str(err))
            raise typer.Exit(EXIT_BAD_INPUT) from None
        except KeyboardInterrupt as stop:
            terminated = isinstance(stop, Terminated)
            err_console.print("terminated" if terminated else "interrupted")
            raise typer.Exit(EXIT_TERMINATED if terminated else EXIT_INTERRUPTED) from None

    return wrapper


def _named_as_option(command: Callable[..., Any], error: MedvlError) -> str:
    """The error's message, naming the command's own option (``--n``, ``--min-similarity``) where the library
    named the Python argument the command passed it (``n``, ``min_similarity``: ``InputError.parameter``)."""
    message = str(error)
    parameter = getattr(error, "parameter", None)
    if not parameter or not message.startswith(parameter) or message[len(parameter):][:1].isidentifier():
        return message
    option = cli_name(command, parameter)
    return option + message[len(parameter):] if option else message


def cli_name(command: Callable[..., Any], parameter: str) -> str | None:
    """How the command's user writes its argument ``parameter``: ``--name`` (its first long flag), ``NAME`` for a
    positional argument, ``None`` when the command takes no such argument."""
    import inspect
    import typing

    if parameter not in inspect.signature(command).parameters:
        return None
    try:
        hint = typing.get_type_hints(command, include_extras=True).get(parameter)
    except Exception:  # noqa: BLE001 -- an annotation that does not resolve: the default spelling
        hint = None
    for info in getattr(hint, "__metadata__", ()):
        if isinstance(info, typer.models.ArgumentInfo):
            return parameter.upper()
        if isinstance(info, typer.models.OptionInfo):
            flags = [flag for decl in (info.param_decls or ()) for flag in decl.split("/") if flag.startswith("--")]
            if flags:
                return flags[0].strip()
    return "--" + parameter.replace("_", "-")


def print_error(message: str) -> None:
    from rich.markup import escape

    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)


def setup_logging(verbose: bool) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s",
                        handlers=[RichHandler(console=err_console, show_path=False)], force=True)
    # faiss: which CPU build loaded; onnxscript, onnx_ir: the ONNX exporter's graph passes, a line per node
    for noisy in ("transformers", "httpx", "urllib3", "matplotlib", "PIL", "faiss", "onnxscript", "onnx_ir"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def print_metrics(title: str, rows: dict[str, Any]) -> None:
    # a title (it may name a folder) wider than the columns would wrap: the table widens to it, up to the terminal
    table = Table(title=title, show_header=True, header_style="bold", min_width=min(len(title), console.width))
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in rows.items():
        table.add_row(key, fmt(value))
    console.print(table)


def print_per_class(per_class: dict[str, dict[str, Any]]) -> None:
    table = Table(show_header=True, header_style="bold")
    for column in ("class", "support", "precision", "recall", "f1", "auc"):
        table.add_column(column, justify="left" if column == "class" else "right")
    for name, row in per_class.items():
        table.add_row(name, *(fmt(row[c]) for c in ("support", "precision", "recall", "f1", "auc")))
    console.print(table)


def fmt(value: Any) -> str:
    """A table cell: '-' for missing, three decimals for floats."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def stderr_is_tty() -> bool:
    return sys.stderr.isatty()


def emit_json(result: dict, json_path: str | Path | None, overwrite: bool = False, option: str = "--json") -> None:
    """Write a command's result to ``--json`` (atomically) when one was given, and say so.

    The target is checked again at write time (it may have appeared while the command ran).
    """
    if json_path is not None:
        from ..io import check_output_file, write_json

        check_output_file(json_path, overwrite, option)
        write_json(json_path, result)
        console.print(f"wrote {json_path}")
