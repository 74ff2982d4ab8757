"""``medvl train``: argument parsing over ``medvl.api.train_from_path``.

``medvl train --data ... --out ...`` trains a dual encoder; the other trainable models are
subcommands of the same group (``medvl train vqa``, ``medvl train report``), registered on
``train_app`` by their own modules.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import InputError
from .common import (
    AllowOutsideOption,
    CaptionsOption,
    LabelOption,
    QuietOption,
    SelfSupervisedOption,
    SkipFlaggedOption,
    TrainSetOption,
    WorkersOption,
    console,
    handle_errors,
)

train_app = typer.Typer(help="Train a dual encoder (medvl train --data ... --out ...) or another model kind "
                             "(medvl train vqa|report ...).", invoke_without_command=True)


@train_app.callback()
@handle_errors
def train_command(
    ctx: typer.Context,
    data: Annotated[Path | None, typer.Option(help="Dataset: manifest, folder, .npz or MedPix folder.")] = None,
    out: Annotated[Path | None, typer.Option(help="Output folder (model/, checkpoint/, metrics.jsonl).")] = None,
    model: Annotated[str, typer.Option(help="Registered model name (trained with its recipe: medvl models "
                                            "--recipe NAME) or a saved model folder.")] = "cxr-small",
    split: Annotated[str | None, typer.Option(help="Split to train on (default: train if present, else all).")] = None,
    epochs: Annotated[int | None, typer.Option(help="Passes over the data (default: the recipe's).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Records per batch (default: the recipe's).")] = None,
    lr: Annotated[float | None, typer.Option(
        help="Peak learning rate (default: the recipe's); a pretrained text tower trains at lr/20 unless --train-set "
             "text_lr=VALUE (OUT/train_config.json: text_lr_used).")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for init, order and augmentation (default 0).")] = None,
    loss: Annotated[str | None, typer.Option(help="clip or siglip (default: the recipe's, else the model's).")] = None,
    text_encoder: Annotated[str | None, typer.Option(
        help="bert (random init), all-minilm-l6-v2 (shipped, trained at lr/20), or a local HF folder (pretrained: "
             "lr/20).")] = None,
    label_column: LabelOption = None,
    captions: CaptionsOption = None,
    text_source: Annotated[str | None, typer.Option(
        help="auto | text | captions | both (default: the recipe's, else auto).")] = None,
    supervised_weight: Annotated[float | None, typer.Option(
        help="Weight of supervised label heads (0 = off; default: the recipe's).")] = None,
    contrastive_weight: Annotated[float | None, typer.Option(
        help="Weight of the image-text loss (default: the recipe's, else 1).")] = None,
    label_smoothing: Annotated[float | None, typer.Option(
        help="Share of each supervised head target spread over the classes, 0-0.9 (default: the recipe's, "
             "else 0).")] = None,
    mixup: Annotated[float | None, typer.Option(
        help="Mixup of the supervised heads' images and targets: the Beta(a, a) parameter a, 0-10 (0 = off; "
             "needs --supervised-weight > 0; default: the recipe's, else 0).")] = None,
    self_supervised_weight: SelfSupervisedOption = None,
    grad_accum: Annotated[int | None, typer.Option(help="Batches per optimizer step (default 1).")] = None,
    checkpoint_every: Annotated[int | None, typer.Option(
        help="Steps between checkpoints (0 = each epoch, the default).")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Stop after this many optimizer steps.")] = None,
    workers: WorkersOption = None,
    leave_out_images_of: Annotated[list[Path] | None, typer.Option(
        help="A VQA question file (repeatable): leave out the training records whose image it asks about "
             "(by MedPix synpic id, else its path as the file writes it less the suffix, and any copy of its image "
             "under another name by its decoded pixels), so pretraining never sees a VQA benchmark's images.")] = None,
    skip_flagged: SkipFlaggedOption = None,
    resume: Annotated[bool, typer.Option(help="Continue from OUT/checkpoint.")] = False,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Config override key=value (JSON value).")] = None,
    train_set: TrainSetOption = None,
    allow_outside_root: AllowOutsideOption = False,
    quiet: QuietOption = False,
) -> None:
    """Train a dual encoder on image-report pairs (or label captions) and save it to OUT/model.

    A registered --model trains with its recipe (the settings measured in docs/benchmarks.md; see
    medvl models --recipe NAME); every option given replaces the recipe's value. A saved model folder
    trains with the plain defaults. The resolved settings are saved in OUT/train_config.json.
    """
    if ctx.invoked_subcommand is not None:
        return
    if data is None or out is None:
        raise InputError("medvl train needs --data and --out (or a subcommand: see medvl train --help)")
    from ..api import parse_overrides, train_from_path, train_options
    from ..io import check_output_folder
    from ..train import distributed

    check_output_folder(out, "--out")

    options = train_options({
        "label_columns": label_column, "epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed,
        "loss": loss, "text_source": text_source, "supervised_weight": supervised_weight,
        "contrastive_weight": contrastive_weight, "label_smoothing": label_smoothing,
        "mixup": mixup, "self_supervised_weight": self_supervised_weight, "grad_accum": grad_accum,
        "checkpoint_every": checkpoint_every, "max_steps": max_steps, "workers": workers,
        "leave_out_images_of": [str(path) for path in leave_out_images_of or []] or None,
        "skip_flagged": skip_flagged}, train_set or [])
    trained = train_from_path(data, out, model, split=split, label_columns=options.pop("label_columns", None),
                              captions=captions, overrides=parse_overrides(set_ or [], text_encoder), resume=resume,
                              allow_outside_root=allow_outside_root, show_progress=not quiet,
                              data_parallel=True, **options)  # only rank 0 reports, below
    summary = trained.meta["training"]
    if distributed.ran_as_main():  # under torchrun only rank 0 saved the model
        console.print(f"trained {summary['steps']} steps on {summary['records']} records; "
                      f"model saved to {out / 'model'}")
