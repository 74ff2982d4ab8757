"""``medvl train report``, ``medvl report generate`` and ``medvl eval report``: the report generator
(``medvl.models.decoder``) on the command line, over ``medvl.train.report`` and ``medvl.eval.report``.
As in ``medvl report draft``, ``--json`` outputs name images, data and indexes by their last path
component only."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

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
)
from .eval import eval_app
from .report import BuiltinOption, KnowledgeOption, report_app
from .train import train_app

GeneratorOption = Annotated[Path, typer.Option(
    help="Report generator folder (medvl train report's OUT or OUT/model), or a local transformers VLM folder "
         "(LLaVA, Gemma 3).")]
ContextIndexOption = Annotated[str | None, typer.Option(
    help="Index (folder or postgresql:// URL) whose nearest cases' reports are the generator's context; needed by "
         "generators trained with --context-k.")]
BeamOption = Annotated[int, typer.Option(help="Beam width (1 = greedy decoding).")]
MaxLengthOption = Annotated[int | None, typer.Option(
    min=1, help="Most tokens of report text per report, the start token not counted (a transformers VLM's new "
                "tokens). Default and largest for a medvl generator: its decoder.max_length - 1 (127 unless set); "
                "a transformers VLM: default 128, at most 1024.")]


@train_app.command("report")
@handle_errors
def train_report_command(
    data: Annotated[Path, typer.Option(help="Dataset with images and reports (manifest, folder, MedPix folder).")],
    out: Annotated[Path, typer.Option(help="Output folder (model/, checkpoint/, metrics.jsonl).")],
    split: Annotated[str | None, typer.Option(help="Split to train on (default: train if present, else all).")] = None,
    init: Annotated[Path | None, typer.Option(
        help="Trained dual encoder folder whose image tower (architecture and weights) starts the generator.")] = None,
    image_model: Annotated[str | None, typer.Option(
        help="Registered config whose image architecture is used at random init (default cxr-small; not with "
             "--init).")] = None,
    index: ContextIndexOption = None,
    context_k: Annotated[int, typer.Option(
        help="Reports of this many nearest cases of --index given as context (0 = the image alone; --index needs "
             "it).")] = 0,
    epochs: Annotated[int, typer.Option(help="Passes over the data.")] = 20,
    batch_size: Annotated[int, typer.Option(help="Records per batch.")] = 32,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW, warmup then cosine).")] = 5e-4,
    seed: Annotated[int, typer.Option(help="Seed for init, order and augmentation.")] = 0,
    grad_accum: Annotated[int, typer.Option(help="Batches per optimizer step.")] = 1,
    checkpoint_every: Annotated[int, typer.Option(help="Steps between checkpoints (0 = each epoch).")] = 0,
    max_steps: Annotated[int | None, typer.Option(help="Stop after this many optimizer steps.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from OUT/checkpoint.")] = False,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="Config override key=value, e.g. decoder.hidden_size=128, image.image_size=64.")] = None,
    allow_outside_root: AllowOutsideOption = False,
    quiet: QuietOption = False,
) -> None:
    """Train a report generator (image tokens -> transformer decoder by cross-attention) on image-report pairs."""
    from contextlib import nullcontext

    from ..api import load_split, parse_overrides
    from ..index import open_index
    from ..io import check_output_folder
    from ..train.loop import TrainConfig, check_out_dir
    from ..train.report import check_generator_options, train_report_generator

    check_output_folder(out, "--out")

    config = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, grad_accum=grad_accum,
                         checkpoint_every=checkpoint_every, max_steps=max_steps)
    config.validate_numbers()
    check_out_dir(out, resume)
    check_generator_options(image_model, init, index, context_k)  # before the data is read
    overrides = parse_overrides(set_ or [])
    dataset = load_split(data, split, allow_outside_root=allow_outside_root)
    with open_index(index) if index else nullcontext() as opened:
        model = train_report_generator(dataset, out, config, image_model=image_model, init=init, overrides=overrides,
                                       index=opened, context_k=context_k, resume=resume, show_progress=not quiet)
    summary = model.meta["training"]
    console.print(f"trained {summary['steps']} steps on {summary['records']} reports "
                  f"(vocabulary {summary['vocabulary']} tokens); model saved to {out / 'model'}")


@report_app.command("generate")
@handle_errors
def generate_command(
    images: Annotated[list[Path], typer.Argument(help="Image files to write a report for.")],
    model: GeneratorOption,
    index: ContextIndexOption = None,
    beam_size: BeamOption = 3,
    max_length: MaxLengthOption = None,
    json_out: Annotated[str | None, typer.Option(
        "--json", help="Write the generated reports (per image: the report, the cited case ids, the input flags) to "
                        "this JSON file.")] = None,
    overwrite: OverwriteOption = False,
) -> None:
    """Write a report for each image with a trained report generator (with retrieved context: the cited case ids)."""
    from rich.markup import escape

    from ..eval.report import check_max_length, generate_for_images
    from ..index import describe_target
    from ..models.decoder import load_report_generator

    check_outputs(overwrite, {"IMAGES": images, "--model": model, "--index": index}, json=json_out)
    net = load_report_generator(model)
    check_max_length(net, max_length)
    arrays = _read_images(images, net)
    with _context_index(net, index) as opened:
        content: list[dict[str, str]] = []
        reports, cited = generate_for_images(net, arrays, index=opened, beam_size=beam_size, max_length=max_length,
                                             content=content)
    rows = []
    for number, (image, report, ids) in enumerate(zip(images, reports, cited, strict=True)):
        console.print(f"[bold]{escape(image.name)}[/]: {escape(report) or '(empty report)'}", markup=True)
        if ids is not None:
            console.print(f"  context from cases: {', '.join(ids) or 'none'}")
        flags = content[number]
        if flags:
            console.print(f"  [red]{' and '.join(flags)} as the model sees it: the report describes no content[/]",
                          markup=True)
        rows.append({"image": describe_target(image), "report": report, **({"cited": ids} if ids is not None else {}),
                     "input_flags": flags})
    emit_json({"model": describe_target(model), "beam_size": beam_size, "reports": rows}, json_out, overwrite)


@eval_app.command("report")
@handle_errors
def eval_report_command(
    model: GeneratorOption,
    data: Annotated[Path, typer.Option(help="Dataset with images and reference reports.")],
    split: Annotated[str, typer.Option(help="Split to evaluate ('all' for every record).")] = "test",
    train_split: Annotated[str, typer.Option(
        help="Split of --data the nearest-report baseline retrieves from.")] = "train",
    baseline_model: Annotated[Path | None, typer.Option(
        help="Dual encoder for the nearest-report baseline (default: the one the generator was initialised from, "
             "else the generator's own image features).")] = None,
    index: ContextIndexOption = None,
    beam_size: BeamOption = 3,
    max_length: MaxLengthOption = None,
    knowledge: KnowledgeOption = None,
    builtin_knowledge: BuiltinOption = True,
    json_out: JsonOption = None,
    overwrite: OverwriteOption = False,
    allow_outside_root: AllowOutsideOption = False,
    quiet: QuietOption = False,
) -> None:
    """BLEU-1..4, ROUGE-L, CIDEr and finding precision / recall / F1 of generated reports, beside the report of
    the most similar training image (the nearest-report baseline, computed in the same run). Findings are read
    with the knowledge base (the shipped chest X-ray findings, --knowledge DIR for others); a warning says when
    the references name findings it does not hold."""
    from ..api import load_split
    from ..errors import InputError
    from ..eval.contamination import copies_in_fit
    from ..eval.report import check_max_length, evaluate_report_generator
    from ..index import describe_target
    from ..models.decoder import load_report_generator
    from ..models.registry import load_model
    from ..rag import ReportLabeller, load_knowledge

    check_outputs(overwrite, {"--model": model, "--data": data, "--baseline-model": baseline_model, "--index": index,
                              "--knowledge": knowledge}, json=json_out)
    if split == train_split:
        raise InputError(f"--split {split!r} is the --train-split the baseline retrieves from: evaluate another split")
    labeller = ReportLabeller(load_knowledge(knowledge, builtin=builtin_knowledge))
    net = load_report_generator(model)
    check_max_length(net, max_length)
    baseline = load_model(baseline_model) if baseline_model is not None else None
    test = load_split(data, split, allow_outside_root=allow_outside_root, model=model)
    train = load_split(data, train_split, allow_outside_root=allow_outside_root, model=model)
    shared = train.shared_images(test)
    if shared:  # e.g. --split all: the baseline would retrieve each scored image's own report
        raise InputError(f"--train-split {train_split!r} holds {shared} of the {len(test)} scored images (--split "
                         f"{split!r}): the nearest-report baseline would find their own reports; evaluate another "
                         "split")
    copies = copies_in_fit(train, test, f"the baseline's training split {train_split!r}")
    with _context_index(net, index) as opened:
        result = evaluate_report_generator(net, test, train, baseline_model=baseline, index=opened,
                                           beam_size=beam_size, max_length=max_length, labeller=labeller,
                                           show_progress=not quiet)
    print_report_metrics(result)
    emit_json({**result, "model": describe_target(model), "data": describe_target(data), "split": split,
               "train_split": train_split, **({"copies_in_fit": copies} if copies is not None else {})},
              json_out, overwrite)


def print_report_metrics(result: dict) -> None:
    from rich.table import Table

    ours, nearest = result["generator"], result["nearest_report"]
    title = (f"report generation: {result['n']} test reports, beam {result['beam_size']}; baseline: nearest of "
             f"{result['n_train']} training reports ({result['baseline_encoder']['kind']})")
    table = Table(title=title, header_style="bold")
    for name in ("metric", "generator", "nearest report"):
        table.add_column(name, justify="left" if name == "metric" else "right")
    for key in ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l", "cider", "micro_precision", "micro_recall",
                "micro_f1", "macro_f1"):
        table.add_row(key.replace("micro_", "finding micro ").replace("macro_f1", "finding macro f1"),
                      fmt(ours[key]), fmt(nearest[key]))
    console.print(table)
    knowledge = result.get("knowledge")
    if knowledge:
        console.print(f"findings read with the knowledge base {' + '.join(knowledge['sources'])} "
                      f"({knowledge['findings']} entries)")


def _read_images(images: list[Path], net):
    from ..models.preprocess import read_for

    return [read_for(net, path) for path in images]  # as the generator is fed them


def _context_index(net, index: str | None):
    """The open index for a generator trained with context (InputError without one); nothing otherwise."""
    from contextlib import nullcontext

    from ..errors import InputError
    from ..index import open_index, shown_location
    from ..models.decoder import context_k

    k = context_k(net)
    if k and not index:
        raise InputError(f"the report generator was trained with the reports of {k} retrieved cases as context: "
                         "pass --index")
    if not k and index:
        raise InputError(f"{shown_location(index)}: this report generator was trained without retrieved context; "
                         "drop --index")
    return open_index(index) if index else nullcontext()
