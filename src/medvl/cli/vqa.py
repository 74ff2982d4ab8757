"""``medvl train vqa``, ``medvl eval vqa`` and ``medvl vqa``: the VQA model on the command line, over
``medvl.train.vqa`` and ``medvl.eval.vqa``. Question and answer text is printed for the user who
asked, never logged."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from .common import (
    AllowOutsideOption,
    JsonOption,
    OverwriteOption,
    QuietOption,
    check_outputs,
    console,
    emit_json,
    fmt,
    handle_errors,
    print_metrics,
)
from .eval import eval_app
from .train import train_app

VQA_NEIGHBOURS = 3  # nearest cases listed with --index when --k is not given
DataOption = Annotated[Path, typer.Option(
    help="A VQA question file (VQA-RAD / SLAKE JSON) or a folder of them (one split per file).")]


@train_app.command("vqa")
@handle_errors
def train_vqa_command(
    data: DataOption,
    out: Annotated[Path, typer.Option(help="Output folder (model/, checkpoint/, metrics.jsonl).")],
    split: Annotated[str | None, typer.Option(
        help="Split to train on (default: train if the data has it, else every question; 'all' for all).")] = None,
    holdout: Annotated[float, typer.Option(
        help="Hold out this seeded share of the questions (not images); score them with "
             "medvl eval vqa --split heldout.")] = 0.0,
    init: Annotated[Path | None, typer.Option(
        help="A medvl dual encoder folder whose image tower starts the model.")] = None,
    image_model: Annotated[str | None, typer.Option(
        help="Without --init: the registered config whose image tower is built at random init (default "
             "cxr-small; not with --init).")] = None,
    question_encoder: Annotated[str, typer.Option(
        help="all-minilm-l6-v2 (shipped, frozen), dual (the --init model's text tower) or bert (random init).")]
        = "all-minilm-l6-v2",
    image_size: Annotated[int | None, typer.Option(help="Image side in pixels (default: the image tower's).")] = None,
    hidden_size: Annotated[int, typer.Option(help="Width of the cross-attention fusion.")] = 256,
    fusion_layers: Annotated[int, typer.Option(help="Cross-attention blocks.")] = 2,
    image_layers: Annotated[int, typer.Option(
        help="Self-attention layers over a question's image tokens, all its films together (0: none).")] = 1,
    max_images: Annotated[int, typer.Option(help="Images per question the model takes.")] = 2,
    min_answer_count: Annotated[int, typer.Option(
        help="Answers seen fewer times in training are left out of the vocabulary.")] = 1,
    image_lr_scale: Annotated[float, typer.Option(
        help="Image tower learning rate as a multiple of --lr (lower it for a pretrained tower).")] = 1.0,
    augment: Annotated[bool, typer.Option(help="Random affine / contrast / noise on training images.")] = True,
    route_by_type: Annotated[bool, typer.Option(
        help="Answer among the answers seen with the predicted answer type (CLOSED / OPEN).")] = True,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="VQA config override key=value (JSON value), e.g. image.no_max_pool=true.")] = None,
    epochs: Annotated[int, typer.Option(help="Passes over the questions.")] = 20,
    batch_size: Annotated[int, typer.Option(help="Questions per batch.")] = 64,
    lr: Annotated[float, typer.Option(
        help="Peak learning rate (a pretrained question encoder trains at lr/20; OUT/train_config.json: "
             "text_lr_used).")] = 1e-3,
    seed: Annotated[int, typer.Option(help="Seed for init, order, augmentation and --holdout.")] = 0,
    max_steps: Annotated[int | None, typer.Option(help="Stop after this many optimizer steps.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from OUT/checkpoint.")] = False,
    allow_outside_root: AllowOutsideOption = False,
    quiet: QuietOption = False,
) -> None:
    """Train a VQA model (image tokens, question encoder, cross-attention fusion, answer classifier)."""
    from ..api import parse_overrides
    from ..data.loaders.vqa import load_vqa
    from ..io import check_output_folder
    from ..models.vqa import holdout_meta, holdout_split, training_questions
    from ..train.loop import TrainConfig
    from ..train.vqa import VQAOptions, train_vqa

    check_output_folder(out, "--out")

    config = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, max_steps=max_steps)
    options = VQAOptions(init=init, image_model=image_model, question_encoder=question_encoder,
                         image_size=image_size, hidden_size=hidden_size, fusion_layers=fusion_layers,
                         image_layers=image_layers, max_images=max_images, min_answer_count=min_answer_count,
                         image_lr_scale=image_lr_scale, augment=augment, route_by_type=route_by_type,
                         overrides=parse_overrides(set_ or []))
    config.validate_numbers()
    options.validate()
    items = training_questions(load_vqa(data, allow_outside_root=allow_outside_root), split, str(data))
    kept, held = holdout_split(items, holdout, seed)
    trained = train_vqa(kept, out, config, options, str(data), resume=resume, show_progress=not quiet,
                        holdout=holdout_meta(held, holdout, seed))
    summary = trained.meta["training"]
    extra = f", {len(held)} held out" if held else ""
    console.print(f"trained {summary['steps']} steps on {summary['questions']} questions{extra} "
                  f"({len(trained.answers)} answers); model saved to {out / 'model'}")


@eval_app.command("vqa")
@handle_errors
def eval_vqa_command(
    model: Annotated[Path, typer.Option(help="Trained VQA model folder, or a local transformers VLM folder "
                                             "(LLaVA, Gemma 3; closed questions scored among the file's answers).")],
    data: DataOption,
    split: Annotated[str | None, typer.Option(
        help="Split to score (default: test if the data has it, else every question; 'all'; 'heldout': the "
             "questions the model held out with --holdout).")] = None,
    json_out: JsonOption = None,
    overwrite: OverwriteOption = False,
    allow_outside_root: AllowOutsideOption = False,
    quiet: QuietOption = False,
) -> None:
    """Exact-match accuracy (closed, open, overall), open token F1, per question type, beside the
    blank-image and question-only baselines."""
    from ..api import evaluate_vqa_from_path

    check_outputs(overwrite, {"--model": model, "--data": data}, json=json_out)
    result = evaluate_vqa_from_path(model, data, split, allow_outside_root, show_progress=not quiet)
    print_metrics(f"VQA ({result['n']} questions: {result['n_closed']} closed, {result['n_open']} open)", {
        key: result[key] for key in ("closed_accuracy", "open_accuracy", "overall_accuracy", "open_token_f1",
                                     "blank_image_overall_accuracy", "question_only_overall_accuracy",
                                     "answers_in_vocabulary")})
    _print_types(result["per_question_type"])
    emit_json(result, json_out, overwrite)


def _print_types(per_type: dict[str, dict[str, Any]]) -> None:
    from rich.table import Table

    table = Table(show_header=True, header_style="bold")
    for column in ("question type", "n", "accuracy", "blank image", "question only"):
        table.add_column(column, justify="left" if column == "question type" else "right")
    for name, row in per_type.items():
        table.add_row(name, str(row["n"]), fmt(row["accuracy"]), fmt(row["blank_image_accuracy"]),
                      fmt(row["question_only_accuracy"]))
    console.print(table)


@handle_errors
def vqa_command(
    images: Annotated[list[Path], typer.Argument(help="Image file(s), earlier film first.")],
    model: Annotated[Path, typer.Option(help="Trained VQA model folder, or a local transformers VLM folder "
                                             "(LLaVA, Gemma 3).")],
    question: Annotated[str, typer.Option(help="The question about the image(s).")],
    index: Annotated[str | None, typer.Option(
        help="A case index (medvl index build: a folder, or postgresql://user@host/db#table for pgvector): also "
             "list the nearest cases to the first image.")] = None,
    k: Annotated[int | None, typer.Option(
        "--k", "-k", help=f"Nearest cases to list with --index (default {VQA_NEIGHBOURS}; needs --index).")] = None,
    heatmap: Annotated[str | None, typer.Option(
        help="Write the attention heatmap over the image(s) to this PNG file (named .png).")] = None,
    json_out: Annotated[str | None, typer.Option(
        "--json", help="Write the answer and its evidence to this JSON file.")] = None,
    overwrite: OverwriteOption = False,
) -> None:
    """Answer a question about one or more images, with its evidence: probability, the top alternative,
    an attention heatmap and (with --index) the nearest cases."""
    from ..errors import InputError
    from ..eval.vqa import answer_with_rationale, check_question
    from ..index.base import check_neighbour_options
    from ..models.vqa import VQAModel, load_vqa_model

    check_question(question)
    check_neighbour_options(index, k)  # before the model answers
    # text, not Path, so that the messages quote the value as given (Path turns '' into '.')
    if heatmap is not None and Path(heatmap).suffix.lower() != ".png":  # PNG only, as medvl explain's heatmap files
        raise InputError(f"--heatmap: writes PNG; name the file .png, not {heatmap!r}")
    check_outputs(overwrite, {"IMAGES": images, "--model": model, "--index": index}, json=json_out, heatmap=heatmap)
    net = load_vqa_model(model)
    if heatmap is not None and not isinstance(net, VQAModel):
        raise InputError(f"--heatmap: {model} is a transformers VLM, which gives no attention heatmap")
    result = answer_with_rationale(net, images, question)
    if index is not None:
        result["supporting_cases"], result["left_out_copies"] = _nearest_cases(index, images[0], k)
    _print_answer(result)
    if heatmap is not None:
        _write_heatmap(Path(heatmap), images, result["heatmaps"], net, overwrite)
    emit_json(result, json_out, overwrite)


def _nearest_cases(index: str, image: Path, k: int | None) -> tuple[list[dict[str, Any]], list[str]]:
    from ..eval.vqa import supporting_cases
    from ..index import open_index

    with open_index(index) as opened:
        return supporting_cases(opened, image, VQA_NEIGHBOURS if k is None else k)


def _print_answer(result: dict[str, Any]) -> None:
    for number, flags in enumerate(result.get("input_flags") or [], 1):
        if flags:
            console.print(f"[red]image {number} is {' and '.join(flags)} as the model sees it: no content to answer "
                          "on[/]", markup=True)
    if result.get("unknown_words"):
        count = result["unknown_words"]
        # not "left out": a pretrained question encoder reads such a word as it knows it, and an unknown token is
        # an input too; either may sway the answer, which training never checked on them
        them, they = ("them", "they") if count > 1 else ("it", "it")
        console.print(f"[yellow]{count} word{'s' if count > 1 else ''} of the question (or pieces of words) this VQA "
                      f"model does not know: none of its training questions held {them}, yet {they} may sway the "
                      "answer: read it with care[/]", markup=True, highlight=False)
    if result.get("no_answer"):
        console.print("[red]no answer: the model ended without a word (the probability below is that of ending "
                      "so)[/]", markup=True, highlight=False)
    console.print(f"answer: [bold]{escape(result['answer'])}[/] (p = {result['probability']:.3f}, "
                  f"{result['answer_type'].lower()} question)", highlight=False, markup=True)
    if result["alternative"] is not None:
        console.print(f"top alternative: {result['alternative']} (p = {result['alternative_probability']:.3f})",
                      highlight=False)
    for number, heat in enumerate(result["heatmaps"], 1):
        peak = heat["peak"]
        console.print(f"image {number}: attention peak at row {peak['row']:.2f}, column {peak['column']:.2f} of the "
                      f"image (weight {peak['weight']:.3f})", highlight=False)
    if result.get("left_out_copies"):
        console.print(f"the query image is indexed as {', '.join(result['left_out_copies'])}: left out of the "
                      "supporting cases", highlight=False)
    for case in result.get("supporting_cases", []):
        console.print(f"supporting case: {case['id']} (similarity {case['score']:.3f})", highlight=False)


def _write_heatmap(path: Path, images: list[Path], heatmaps: list[dict[str, Any]], net, overwrite: bool) -> None:
    """The images side by side, each on its own grid, with the attention in red on top (``heatmap_picture``)."""
    import io

    from PIL import Image

    from ..eval.vqa import heatmap_picture
    from ..io import atomic_write_bytes, check_output_file

    buffer = io.BytesIO()
    Image.fromarray(heatmap_picture(images, heatmaps, net)).save(buffer, format="PNG")
    check_output_file(path, overwrite, "--heatmap")
    atomic_write_bytes(path, buffer.getvalue())
    console.print(f"wrote {path}")
