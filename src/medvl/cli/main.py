"""The ``medvl`` command line: a thin Typer layer over the Python API.

Each command parses its arguments and makes one library call (``medvl.api`` for the path-level
tasks); the command groups live in their own modules: train, eval, bench, index, report, pacs,
clinical.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer

from ..checks import check_number, split_names
from .bench import bench_app
from .clinical import deid_command, inspect_command
from .common import (
    EXIT_BAD_INPUT,
    EXIT_TERMINATED,
    AllowOutsideOption,
    BackendOption,
    CaptionsOption,
    OverwriteOption,
    QuietOption,
    Terminated,
    check_outputs,
    console,
    emit_json,
    handle_errors,
    print_error,
    print_metrics,
    setup_logging,
)
from .eval import eval_app
from .explain import explain_command
from .export import export_app
from .index import index_app, search_command
from .ood import ood_app
from .pacs import pacs_app
from .report import case_retrieval_command, report_app
from .reportgen import train_report_command as train_report_command  # registers the report generator
from .serve import serve_command
from .train import train_app
from .vqa import vqa_command

app = typer.Typer(help="medvl: medical vision-language models, offline on a CPU.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
app.add_typer(eval_app, name="eval")
app.add_typer(bench_app, name="bench")


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False) -> None:
    """medvl: train, evaluate and explain medical image-text models."""
    setup_logging(verbose)


@app.command("models")
@handle_errors
def models_command(
    recipe: Annotated[str | None, typer.Option(
        help="Print this config's training recipe in full (the defaults of medvl train --model NAME).")] = None,
) -> None:
    """List the registered model configs and the recipe each trains with."""
    from rich.table import Table

    from ..models.registry import model_summaries

    if recipe is not None:
        from ..train.recipes import recipe_report

        console.print_json(data=recipe_report(recipe))
        return
    table = Table(show_header=True, header_style="bold")
    rows = model_summaries()
    for column in ("name", "image", "text", "dim", "recipe", "about"):  # names stay whole: they are typed
        whole = column in ("name", "text")
        table.add_column(column, no_wrap=whole, min_width=max(len(row[column]) for row in rows) if whole else None)
    for row in rows:
        table.add_row(*row.values())
    console.print(table)


@app.command("phantom")
@handle_errors
def phantom_command(
    out: Annotated[Path, typer.Argument(help="Folder to write (must not exist or be empty).")],
    n: Annotated[int, typer.Option(
        help="Number of images (1 to 1,000,000). A case's image and report do not depend on it, its split does: "
             "phantoms of one seed and different --n share patients across train and test; train and score on one "
             "--n (medvl audit --against shows the overlap).")] = 1000,
    seed: Annotated[int, typer.Option(help="Random seed; same seed, same data.")] = 0,
    size: Annotated[int | None, typer.Option(
        help="Image side in pixels (default 128 for cxr2d; voxels a side, default 64, for ct3d).")] = None,
    kind: Annotated[str, typer.Option(
        help="cxr2d: chest X-rays (PNG); ct3d: chest-abdomen CT volumes (NIfTI, HU).")] = "cxr2d",
    extra_finding_prob: Annotated[float, typer.Option(help="Chance of a second finding.")] = 0.0,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing folder.")] = False,
    vqa: Annotated[bool, typer.Option(
        help="Also write OUT/vqa/: questions with exact answers (presence, location, count, size, ratio, "
             "progression, which image), balanced per type, one VQA-RAD style JSON per split (cxr2d only).")] = False,
    vqa_per_case: Annotated[int | None, typer.Option(
        help="With --vqa (refused without it): questions per patient on average, at most (fewer when rare answers "
             "run out; default 4).")] = None,
    shortcut: Annotated[float | None, typer.Option(
        help="Shortcut variant (cxr2d only): a white square in the top-right corner marks each abnormal case "
             "with this probability (e.g. 0.95) and each normal case with 1 minus it, so the marker leaks the "
             "label; manifest column shortcut_marker, marker box in dataset.json.")] = None,
    positioning: Annotated[float, typer.Option(
        help="Patient positioning variation, 0-1 (cxr2d only; 0 = off, the default): the patient is shifted within "
             "the field of view, shrunk by up to a quarter and turned by up to 8 degrees more, times this value; "
             "boxes and masks move with the pixels.")] = 0.0,
    quiet: QuietOption = False,
) -> None:
    """Generate a procedural phantom dataset (chest X-rays or CT volumes, reports, boxes, masks; --vqa: questions)."""
    from ..data.phantom import generate_phantom
    from ..data.phantom.vqa import DEFAULT_PER_CASE
    from ..errors import InputError
    from ..io import check_output_folder

    check_output_folder(out, "OUT")
    if vqa_per_case is not None and not vqa:
        raise InputError("--vqa-per-case applies to the questions --vqa writes; add --vqa")

    manifest = generate_phantom(out, n=n, seed=seed, size=size, extra_finding_prob=extra_finding_prob,
                                overwrite=overwrite, progress=not quiet, kind=kind, vqa=vqa,
                                vqa_per_case=DEFAULT_PER_CASE if vqa_per_case is None else vqa_per_case,
                                shortcut=shortcut, positioning=positioning)
    questions = f" and questions in {manifest.parent / 'vqa'}" if vqa else ""
    marker = f" (shortcut marker on abnormal cases with probability {shortcut:g})" if shortcut is not None else ""
    placed = f" (patient positioning {positioning:g})" if positioning else ""
    console.print(f"wrote {n} phantom cases{marker}{placed}: {manifest}{questions}")


@app.command("predict")
@handle_errors
def predict_command(
    images: Annotated[list[Path], typer.Argument(help="Image files (for a 3D model also a DICOM series' folder).")],
    model: Annotated[Path, typer.Option(help="Trained model folder.")],
    labels: Annotated[list[str], typer.Option(
        help="Class names, comma-separated, or the option repeated (--labels a --labels b); 2 to 64 distinct.")],
    label_column: Annotated[str | None, typer.Option(
        help="Label column whose class descriptions to use (default: first with all these classes).")] = None,
    captions: CaptionsOption = None,
    json_out: Annotated[str | None, typer.Option(
        "--json", help="Write the predictions to this JSON file.")] = None,
    overwrite: OverwriteOption = False,
    backend: BackendOption = "torch",
) -> None:
    """Zero-shot answer per image among the given labels."""
    from rich.markup import escape

    from ..models.ood import ood_comparison
    from ..predict import predict_answers

    check_outputs(overwrite, {"IMAGES": images, "--model": model, "--captions": captions}, json=json_out)
    class_names = split_names(labels)
    answers = predict_answers(model, images, class_names, label_column=label_column, captions=captions,
                              backend=backend)
    for path, item in zip(images, answers["predictions"], strict=True):  # the path as given: the JSON has its name
        ranked = sorted(item["probabilities"].items(), key=lambda kv: -kv[1])
        shown = ", ".join(f"{name} {p:.2f}" for name, p in ranked[:3])
        warning = (f" [red]out of distribution ({ood_comparison(item)}): unreliable[/]"
                   if item.get("out_of_distribution") else "")
        if item["input_flags"]:
            warning += f" [red]{' and '.join(item['input_flags'])} as the model sees it: no content to answer on[/]"
        console.print(f"{escape(str(path))}: [bold]{escape(item['prediction'])}[/] ({escape(shown)}){warning}",
                      markup=True)
    emit_json(answers, json_out, overwrite)


@app.command("audit")
@handle_errors
def audit_command(
    data: Annotated[Path, typer.Option(help="Image dataset (manifest, folder, or a loader's data).")],
    split: Annotated[str, typer.Option(
        help="Split to audit; 'all' (default) also finds duplicates across splits.")] = "all",
    label_column: Annotated[str | None, typer.Option(
        "--label-column", "-l", help="Count flagged images per class of this column.")] = None,
    show: Annotated[int, typer.Option(help="Flagged records listed (0: none); all are in --json.")] = 10,
    against: Annotated[Path | None, typer.Option(
        help="Another dataset (a test set kept apart, data a model was pretrained on): also find its images that "
             "are exact or near copies of --data's (the 'against' block of --json).")] = None,
    against_split: Annotated[str, typer.Option(help="Split of --against to compare ('all': every record).")] = "all",
    near_distance: Annotated[int, typer.Option(
        help="Bits (of 64) the difference hashes of near duplicates may differ by: 0 (default) the same hash; "
             "1-3 also find re-encoded or resized copies (each match is confirmed on the pixels).")] = 0,
    workers: Annotated[int | None, typer.Option(
        help="Processes reading images ahead of the checks (0 = in this process; at most the CPU cores; default: 0 "
             "below 4 cores, else a quarter of the cores, from 512 images on).")] = None,
    json_out: Annotated[str | None, typer.Option(
        "--json", help="Write the audit results (flagged images, duplicates, counts) to this JSON file.")] = None,
    overwrite: OverwriteOption = False,
    allow_outside_root: AllowOutsideOption = False,
    quiet: QuietOption = False,
) -> None:
    """Check every image of a dataset: unreadable, blank, streaked (rows or columns repeat: content
    lost), exact and near duplicates, and duplicates that leak across splits."""
    from collections import Counter

    from ..api import audit_from_path

    check_number("show", show, minimum=0, integer=True)
    check_outputs(overwrite, {"--data": data, "--against": against}, json=json_out)
    result = audit_from_path(data, split, label=label_column, workers=workers,
                             allow_outside_root=allow_outside_root, show_progress=not quiet, against=against,
                             against_split=against_split, near_distance=near_distance)
    print_metrics(f"Image audit of {data} ({split}: {result['n']} records, {result['files']} images)", {
        "flagged images": result["flagged"], **{flag.replace("_", " "): n for flag, n in result["counts"].items()},
        "duplicate groups": len(result["duplicate_groups"]), "groups across splits (leaks)": len(result["leaks"]),
        "seconds": result["seconds"]})
    if result["by_class"]:
        print_metrics(f"Unreadable, blank or streaked images per {label_column}", {
            name: f"{entry['content_flagged']} of {entry['records']}" for name, entry in result["by_class"].items()})
    for record in result["records"][:show]:
        reasons = "; ".join(f"{flag}: {record['detail'][flag]}" for flag in record["flags"])
        console.print(f"{record['id']} ({record['split']}): {reasons}")
    for group in [g for g in result["leaks"] if g["kind"] == "file"][:show]:  # no record flag names these
        console.print(f"one file used in {', '.join(group['splits'])}: {', '.join(group['ids'])}")
    if "against" in result:
        overlap = result["against"]
        kinds = Counter(group["kind"] for group in overlap["overlap_groups"])
        print_metrics(f"Copies shared with {against} ({against_split}: {overlap['n']} records)", {
            "groups of the same pixels": kinds.get("exact", 0), "groups of near copies": kinds.get("near", 0),
            "groups of the same file": kinds.get("file", 0),
            # named by option and split, not path: --data and --against may be one file (its val against its train)
            f"records of --data ({split}) in them": overlap["records"]["data"],
            f"records of --against ({against_split}) in them": overlap["records"]["against"]})
    emit_json(result, json_out, overwrite)


@app.command("demo")
@handle_errors
def demo_command(
    out: Annotated[Path, typer.Option(help="Output folder for data, model and report.")] = Path("medvl-demo"),
    n: Annotated[int, typer.Option(help="Phantom cases to generate.")] = 2400,
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = 12,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
    model: Annotated[str, typer.Option(help="Registered model name.")] = "cxr-small",
    size: Annotated[int, typer.Option(help="Phantom image side in pixels.")] = 128,
    image_size: Annotated[int, typer.Option(help="Model input side (0 = the model's own).")] = 96,
    overwrite: Annotated[bool, typer.Option(
        help="Run a complete demo in --out again (its model folder, results and report are replaced).")] = False,
    quiet: QuietOption = False,
) -> None:
    """Generate phantom data, train, evaluate and write OUT/report.html (under 10 min on 2 cores)."""
    from ..demo import run_demo
    from ..io import check_output_folder

    check_output_folder(out, "--out")

    summary = run_demo(out, n=n, epochs=epochs, seed=seed, size=size, model_name=model,
                       image_size=image_size or None, show_progress=not quiet, overwrite=overwrite)
    print_metrics("medvl demo: held-out phantom test split", summary["headline"])
    console.print(f"report: {summary['report']}")
    if summary.get("reused"):
        console.print(f"(the demo in {out} was complete: its results, not run again; --overwrite runs it again)")


app.add_typer(train_app, name="train")
app.command("deid")(deid_command)
app.command("dicom-info")(inspect_command)
app.add_typer(index_app, name="index")
app.add_typer(export_app, name="export")
app.add_typer(pacs_app, name="pacs")
app.add_typer(ood_app, name="ood")
app.command("search")(search_command)
app.add_typer(report_app, name="report")
app.command("serve")(serve_command)
app.command("explain")(explain_command)
app.command("vqa")(vqa_command)
eval_app.command("case-retrieval")(case_retrieval_command)


def undecodable_argument(arguments: list[str]) -> str | None:
    """Why an argument cannot be read (None when all can): text that is not UTF-8 (a Latin-1 terminal's label or
    question) reaches Python as lone surrogates, which tokenizers, the index's filters and the terminal itself
    fail on with a traceback. An existing file or folder's name is exempt: the file system may hold any bytes."""
    import os

    for position, argument in enumerate(arguments, 1):
        try:
            argument.encode("utf-8")
        except UnicodeEncodeError as error:
            if os.path.exists(argument):
                continue
            offset = len(argument[:error.start].encode("utf-8", "surrogateescape"))
            option = arguments[position - 2] if position > 1 else ""
            if argument.startswith("--") and "=" in argument:  # --labels=VALUE
                option = argument.split("=", 1)[0]
            named = option.startswith("-") and option.isascii()
            if named and _takes_a_path(arguments[:position], option):  # the terminal's encoding is not at fault
                return f"{option}: the path is not UTF-8 (byte offset {offset}); give a UTF-8 file name"
            which = f"the value of {option}" if named else f"argument {position}"
            return (f"{which} is not UTF-8 text (byte offset {offset}): medvl reads labels, questions, names and "
                    "filters as UTF-8; set the terminal's encoding to UTF-8")
    return None


# text options whose value names a file or folder to write or read (typed as text because it may also be a URL or a
# shipped name: an index's postgresql:// URL, a registered model, a shipped concept bank)
PATH_TEXT_OPTIONS = frozenset({"--json", "--heatmap", "--index", "--out", "--model", "--image-model",
                               "--question-encoder", "--text-encoder", "--concepts"})


def _takes_a_path(arguments: list[str], option: str) -> bool:
    """Whether ``option`` of the command ``arguments`` name (``explain``, ``index build``) is a file system path
    (a Typer ``Path`` option such as ``--out``, or one of ``PATH_TEXT_OPTIONS``), not text."""
    import inspect
    import typing
    from pathlib import Path

    if option in PATH_TEXT_OPTIONS:
        return True
    command = typer.main.get_command(app)
    for argument in arguments:
        commands = getattr(command, "commands", None)  # a group (typer's own, not click.Group)
        if isinstance(commands, dict) and argument in commands:
            command = commands[argument]
    if command.callback is None:
        return False
    hints = typing.get_type_hints(inspect.unwrap(command.callback))  # the annotation's type, without Annotated
    named = [param.name for param in command.params if option in getattr(param, "opts", ())]
    return any(hints.get(name) is Path or Path in typing.get_args(hints.get(name)) for name in named if name)


_sigterm_received: list[bool] = []


def terminate_like_ctrl_c() -> None:
    """Make SIGTERM raise ``Terminated`` (a KeyboardInterrupt) in this process, so it cleans up as after Ctrl-C,
    says ``terminated`` and exits 143; forked workers (data loading) keep the default: they just end."""
    main_process = os.getpid()

    def on_sigterm(signum: int, frame: object) -> None:
        if os.getpid() != main_process:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        _sigterm_received.append(True)
        raise Terminated

    signal.signal(signal.SIGTERM, on_sigterm)


def exit_at_once_on_sigterm() -> None:
    """Once the command is over, make SIGTERM end the process at once with exit code 143.

    Raising ``Terminated`` then would land in the exit itself (flushing log handlers, the interpreter's
    teardown) and print a traceback with exit code 1: torchrun stops the other ranks with SIGTERM as soon as
    one rank has exited, often while they are already leaving after their own one-line error.
    """
    def on_sigterm(signum: int, frame: object) -> None:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(EXIT_TERMINATED)

    signal.signal(signal.SIGTERM, on_sigterm)


def run() -> None:
    """The ``medvl`` console script: the Typer app, then, in a process that joined a torchrun group,
    an exit that skips the interpreter's teardown (``distributed.exit_process``)."""
    problem = undecodable_argument(sys.argv[1:])
    if problem is not None:
        print_error(problem)
        sys.exit(EXIT_BAD_INPUT)
    terminate_like_ctrl_c()
    try:
        app()
    except SystemExit as done:
        code = done.code
    except Terminated:
        code = EXIT_TERMINATED
    except BaseException:  # a bug's traceback: printed as Python prints it, a late SIGTERM not raising inside it
        exit_at_once_on_sigterm()
        raise
    else:
        code = 0
    if _sigterm_received:  # also when it came before a command's own handling (click says "Aborted!")
        code = EXIT_TERMINATED
    exit_at_once_on_sigterm()
    # only a process that imported medvl.train.distributed can have joined a torchrun group; importing it here
    # otherwise would import torch after the command, again after a Ctrl-C cut torch's import short
    distributed = sys.modules.get("medvl.train.distributed")
    if distributed is not None and distributed.joined():
        distributed.exit_process(code if isinstance(code, int) else 1)
    sys.exit(code)


if __name__ == "__main__":
    run()
