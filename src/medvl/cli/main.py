"""The ``medvl`` command line: a thin Typer layer over the Python API."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from .clinical import deid_command, inspect_command
from .common import (
    AllowOutsideOption,
    CaptionsOption,
    JsonOption,
    LabelOption,
    OverwriteOption,
    QuietOption,
    check_outputs,
    console,
    emit_json,
    handle_errors,
    pick_label,
    print_metrics,
    print_per_class,
    setup_logging,
)
from .index import index_app, search_command
from .pacs import pacs_app
from .report import case_retrieval_command, report_app

app = typer.Typer(help="medvl: medical vision-language models, offline on a CPU.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
eval_app = typer.Typer(help="Evaluate a trained model.", no_args_is_help=True)
bench_app = typer.Typer(help="Run a benchmark recipe end to end.", no_args_is_help=True)
app.add_typer(eval_app, name="eval")
app.add_typer(bench_app, name="bench")


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False) -> None:
    """medvl: train, evaluate and explain medical image-text models."""
    setup_logging(verbose)


def _dataset(path: Path, split: str | None, labels: list[str] | None = None, allow_outside_root: bool = False):
    from ..data import load_dataset

    dataset = load_dataset(path, label_columns=labels, allow_outside_root=allow_outside_root)
    if split is None:
        split = "train" if "train" in dataset.splits else "all"
    return dataset.select(split)


def _captions(dataset, path: Path | None, model=None):
    from ..data import CaptionConfig, captions_for

    if path is None and not dataset.captions and model is not None:
        own = model.meta.get("captions")
        if own:
            return CaptionConfig.from_dict(own)
    return captions_for(dataset, path)


@app.command("models")
@handle_errors
def models_command() -> None:
    """List the registered model configs."""
    from rich.table import Table

    from ..models.registry import describe_model, get_config, list_models

    table = Table(show_header=True, header_style="bold")
    for column in ("name", "image", "text", "dim", "about"):
        table.add_column(column)
    for name in list_models():
        config = get_config(name)
        image = f"{config.image.arch} {'x'.join(map(str, config.image.volume_shape))} x{config.image.in_channels}"
        if config.image.spatial_dims == 2:
            image = f"{config.image.arch} {config.image.image_size}px x{config.image.in_channels}"
        text = config.text.path or f"bert {config.text.hidden_size}x{config.text.num_layers}"
        table.add_row(name, image, text, str(config.embed_dim), describe_model(name))
    console.print(table)


@app.command("phantom")
@handle_errors
def phantom_command(
    out: Annotated[Path, typer.Argument(help="Folder to write (must not exist or be empty).")],
    n: Annotated[int, typer.Option(help="Number of images.")] = 1000,
    seed: Annotated[int, typer.Option(help="Random seed; same seed, same data.")] = 0,
    size: Annotated[int | None, typer.Option(
        help="Image side in pixels (default 128 for cxr2d; voxels a side, default 64, for ct3d).")] = None,
    kind: Annotated[str, typer.Option(
        help="cxr2d: chest X-rays (PNG); ct3d: chest-abdomen CT volumes (NIfTI, HU).")] = "cxr2d",
    extra_finding_prob: Annotated[float, typer.Option(help="Chance of a second finding.")] = 0.0,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing folder.")] = False,
    quiet: QuietOption = False,
) -> None:
    """Generate a procedural phantom dataset (chest X-rays or CT volumes, reports, boxes, masks)."""
    from ..data.phantom import generate_phantom

    manifest = generate_phantom(out, n=n, seed=seed, size=size, extra_finding_prob=extra_finding_prob,
                                overwrite=overwrite, progress=not quiet, kind=kind)
    console.print(f"wrote {n} phantom cases: {manifest}")


@app.command("train")
@handle_errors
def train_command(
    data: Annotated[Path, typer.Option(help="Dataset: manifest, folder, .npz or MedPix folder.")],
    out: Annotated[Path, typer.Option(help="Output folder (model/, checkpoint/, metrics.jsonl).")],
    model: Annotated[str, typer.Option(help="Registered model name or a saved model folder.")] = "cxr-small",
    split: Annotated[str | None, typer.Option(help="Split to train on (default: train if present, else all).")] = None,
    epochs: Annotated[int, typer.Option(help="Passes over the data.")] = 10,
    batch_size: Annotated[int, typer.Option(help="Records per batch.")] = 64,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 1e-3,
    seed: Annotated[int, typer.Option(help="Seed for init, order and augmentation.")] = 0,
    loss: Annotated[str | None, typer.Option(help="clip or siglip (default: the model's).")] = None,
    text_encoder: Annotated[str | None, typer.Option(
        help="bert (random init), all-minilm-l6-v2 (shipped), or a local HF folder.")] = None,
    label_column: LabelOption = None,
    captions: CaptionsOption = None,
    text_source: Annotated[str, typer.Option(help="auto | text | captions | both.")] = "auto",
    supervised_weight: Annotated[float, typer.Option(help="Weight of supervised label heads (0 = off).")] = 0.0,
    grad_accum: Annotated[int, typer.Option(help="Batches per optimizer step.")] = 1,
    checkpoint_every: Annotated[int, typer.Option(help="Steps between checkpoints (0 = each epoch).")] = 0,
    max_steps: Annotated[int | None, typer.Option(help="Stop after this many optimizer steps.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from OUT/checkpoint.")] = False,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Config override key=value (JSON value).")] = None,
    allow_outside_root: AllowOutsideOption = False,
    quiet: QuietOption = False,
) -> None:
    """Train a dual encoder on image-report pairs (or label captions) and save it to OUT/model."""
    from ..models.registry import resolve_model
    from ..train.loop import TrainConfig, check_out_dir, seed_everything, train

    config = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, loss=loss,
                         text_source=text_source, label_columns=list(label_column or []),
                         supervised_weight=supervised_weight, grad_accum=grad_accum,
                         checkpoint_every=checkpoint_every, max_steps=max_steps)
    config.validate_numbers()  # bad numbers fail before any data is read
    check_out_dir(out, resume)
    dataset = _dataset(data, split, label_column, allow_outside_root)
    config.label_columns = list(label_column or dataset.default_labels)
    overrides = _overrides(set_ or [], text_encoder)
    seed_everything(seed)  # the random init of the model is part of the run
    net = resolve_model(model, **overrides)
    caption_config = _captions(dataset, captions, net)
    trained = train(net, dataset, config, out, captions=caption_config, resume=resume,
                    show_progress=not quiet)
    console.print(f"trained {trained.meta['training']['steps']} steps on {len(dataset)} records; "
                  f"model saved to {out / 'model'}")


def _overrides(pairs: list[str], text_encoder: str | None) -> dict:
    from ..errors import InputError

    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise InputError(f"--set expects key=value, got {pair!r}")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    if text_encoder:
        if text_encoder == "bert":
            overrides.update({"text.kind": "bert", "text.path": None})
        else:
            overrides.update({"text.kind": "pretrained", "text.path": text_encoder})
    return overrides


@eval_app.command("zero-shot")
@handle_errors
def eval_zero_shot(
    model: Annotated[Path, typer.Option(help="Trained model folder.")],
    data: Annotated[Path, typer.Option(help="Dataset path.")],
    split: Annotated[str, typer.Option(help="Split to evaluate ('all' for every record).")] = "test",
    label_column: LabelOption = None,
    captions: CaptionsOption = None,
    json_out: JsonOption = None,
    overwrite: OverwriteOption = False,
    allow_outside_root: AllowOutsideOption = False,
    quiet: QuietOption = False,
) -> None:
    """Prompt-ensemble zero-shot classification: accuracy, balanced accuracy, macro AUC."""
    from ..eval import zero_shot
    from ..models.registry import load_model

    check_outputs(overwrite, json=json_out)
    dataset = _dataset(data, split, allow_outside_root=allow_outside_root)
    label = pick_label(dataset, label_column, "zero-shot")
    net = load_model(model)
    result = zero_shot(net, dataset, label, captions=_captions(dataset, captions, net),
                       show_progress=not quiet)
    print_metrics(f"zero-shot {label} ({result['n']} images, {len(result['classes'])} classes)", {
        "accuracy": result["accuracy"], "balanced_accuracy": result["balanced_accuracy"],
        "macro_auc": result["macro_auc"], "chance balanced accuracy": result["chance_balanced_accuracy"]})
    print_per_class(result["per_class"])
    emit_json({**result, "model": str(model), "data": str(data), "split": split}, json_out, overwrite)


@eval_app.command("retrieval")
@handle_errors
def eval_retrieval(
    model: Annotated[Path, typer.Option(help="Trained model folder.")],
    data: Annotated[Path, typer.Option(help="Dataset path (records need text).")],
    split: Annotated[str, typer.Option(help="Split to evaluate.")] = "test",
    json_out: JsonOption = None,
    overwrite: OverwriteOption = False,
    allow_outside_root: AllowOutsideOption = False,
    quiet: QuietOption = False,
) -> None:
    """Image->text and text->image Recall@1/5/10 and median rank."""
    from ..eval import retrieval
    from ..models.registry import load_model

    check_outputs(overwrite, json=json_out)
    dataset = _dataset(data, split, allow_outside_root=allow_outside_root)
    result = retrieval(load_model(model), dataset, show_progress=not quiet)
    rows = {}
    for direction in ("image_to_text", "text_to_image"):
        for key, value in result[direction].items():
            if key != "chance":
                rows[f"{direction} {key}"] = value
    print_metrics(f"retrieval ({result['n_images']} images, {result['n_texts']} distinct texts)", rows)
    emit_json({**result, "model": str(model), "data": str(data), "split": split}, json_out, overwrite)


@eval_app.command("linear-probe")
@handle_errors
def eval_linear_probe(
    model: Annotated[Path, typer.Option(help="Trained model folder.")],
    train_data: Annotated[Path, typer.Option(help="Dataset to fit the probe on.")],
    test_data: Annotated[Path, typer.Option(help="Dataset to score the probe on.")],
    train_split: Annotated[str, typer.Option(help="Split of --train-data.")] = "train",
    test_split: Annotated[str, typer.Option(help="Split of --test-data.")] = "test",
    label_column: LabelOption = None,
    few_shot: Annotated[str, typer.Option(help="Comma-separated k images per class.")] = "1,4,16",
    json_out: JsonOption = None,
    overwrite: OverwriteOption = False,
    allow_outside_root: AllowOutsideOption = False,
    quiet: QuietOption = False,
) -> None:
    """Logistic regression on frozen image features: AUC and accuracy, full and few-shot."""
    from ..checks import check_number
    from ..errors import InputError
    from ..eval import linear_probe
    from ..models.registry import load_model

    check_outputs(overwrite, json=json_out)
    try:
        ks = [int(k) for k in few_shot.split(",") if k.strip()]
    except ValueError:
        raise InputError(f"--few-shot expects comma-separated integers, got {few_shot!r}") from None
    for k in ks:
        check_number("--few-shot k", k, minimum=1, integer=True)
    train_set = _dataset(train_data, train_split, allow_outside_root=allow_outside_root)
    test_set = _dataset(test_data, test_split, allow_outside_root=allow_outside_root)
    label = pick_label(train_set, label_column, "linear-probe")
    result = linear_probe(load_model(model), train_set, test_set, label, few_shot=ks,
                          show_progress=not quiet)
    rows = {"auc": result["auc"], "accuracy": result["accuracy"],
            "balanced_accuracy": result["balanced_accuracy"]}
    for k, scores in result["few_shot"].items():
        rows[f"{k}-shot auc"] = scores["auc_mean"]
    print_metrics(f"linear probe {label} (train {result['n_train']}, test {result['n_test']})", rows)
    emit_json({**result, "model": str(model)}, json_out, overwrite)


@app.command("predict")
@handle_errors
def predict_command(
    images: Annotated[list[Path], typer.Argument(help="Image files.")],
    model: Annotated[Path, typer.Option(help="Trained model folder.")],
    labels: Annotated[str, typer.Option(help="Comma-separated class names.")],
    label_column: Annotated[str | None, typer.Option(
        help="Label column whose class descriptions to use (default: first with all these classes).")] = None,
    captions: CaptionsOption = None,
    json_out: JsonOption = None,
    overwrite: OverwriteOption = False,
) -> None:
    """Zero-shot answer per image among the given labels."""
    from ..predict import predict

    check_outputs(overwrite, json=json_out)
    class_names = [name.strip() for name in labels.split(",") if name.strip()]
    results = predict(model, images, class_names, label_column=label_column, captions=captions)
    for item in results:
        ranked = sorted(item["probabilities"].items(), key=lambda kv: -kv[1])
        shown = ", ".join(f"{name} {p:.2f}" for name, p in ranked[:3])
        console.print(f"{item['image']}: [bold]{item['prediction']}[/] ({shown})")
    emit_json({"predictions": results}, json_out, overwrite)


@bench_app.command("medmnist")
@handle_errors
def bench_medmnist(
    train_data: Annotated[Path, typer.Option(help="MedMNIST .npz with a train split.")],
    test_data: Annotated[Path, typer.Option(help="MedMNIST .npz holding the test split.")],
    test_split: Annotated[str, typer.Option(help="Split of --test-data to score.")] = "test",
    json_out: JsonOption = None,
    overwrite: OverwriteOption = False,
    out: Annotated[Path | None, typer.Option(help="Also keep the trained model here.")] = None,
    model: Annotated[str, typer.Option(help="Registered model name.")] = "medmnist-small",
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = 30,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
    quiet: QuietOption = False,
) -> None:
    """The MedMNIST recipe end to end: train on train, threshold on val, score AUC/ACC on the test split."""
    from ..bench.medmnist import run_medmnist

    check_outputs(overwrite, json=json_out)
    result = run_medmnist(train_data, test_data, test_split, model_name=model, epochs=epochs, seed=seed,
                          out=out, show_progress=not quiet)
    print_metrics(f"MedMNIST {test_data.name}:{test_split}", {
        "auc": result["auc"], "acc": result["acc"], "threshold": result.get("threshold"),
        "seconds": result["seconds"]})
    emit_json(result, json_out, overwrite)


@bench_app.command("cv")
@handle_errors
def bench_cv(
    data: Annotated[Path, typer.Option(help="Labelled image dataset (manifest or folder).")],
    label_column: Annotated[str, typer.Option("--label-column", "-l", help="Label column to predict.")],
    model: Annotated[str, typer.Option(help="Registered model name.")] = "derm-small",
    folds: Annotated[int, typer.Option(help="Number of cross-validation folds.")] = 5,
    epochs: Annotated[int, typer.Option(help="Training epochs per fold.")] = 40,
    seed: Annotated[int, typer.Option(help="Seed of the folds, init, order and augmentation.")] = 0,
    captions: CaptionsOption = None,
    group_column: Annotated[str | None, typer.Option(
        help="Column of group ids (e.g. patient) kept within one fold.")] = None,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 1e-3,
    batch_size: Annotated[int, typer.Option(help="Records per batch.")] = 32,
    contrastive_weight: Annotated[float, typer.Option(
        help="Weight of the image-caption loss (the supervised head has weight 1).")] = 0.5,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Model config override key=value.")] = None,
    json_out: JsonOption = None,
    overwrite: OverwriteOption = False,
    allow_outside_root: AllowOutsideOption = False,
    quiet: QuietOption = False,
) -> None:
    """k-fold cross-validation: a fresh model per fold, head and zero-shot AUC / accuracy on held-out folds."""
    from ..bench.cv import cross_validate

    check_outputs(overwrite, json=json_out)
    result = cross_validate(data, label_column, model_name=model, folds=folds, epochs=epochs, seed=seed,
                            captions=captions, group_column=group_column, show_progress=not quiet, lr=lr,
                            batch_size=batch_size, contrastive_weight=contrastive_weight,
                            overrides=_overrides(set_ or [], None), allow_outside_root=allow_outside_root)
    print_metrics(f"{folds}-fold CV {label_column} ({result['n']} images, mean ± std over folds)", {
        name: _mean_std(result, key) for name, key in (
            ("auc", "auc"), ("acc", "acc"), ("balanced_accuracy", "balanced_accuracy"),
            ("zero-shot auc", "zero_shot_auc"), ("zero-shot balanced_accuracy", "zero_shot_balanced_accuracy"))}
        | {"pooled out-of-fold auc": result["auc_pooled"], "majority-class acc": result["majority_acc"],
           "per-fold auc": " ".join(_fmt_float(f["auc"]) for f in result["folds"]),
           "seconds": result["seconds"]})
    emit_json(result, json_out, overwrite)


def _mean_std(result: dict, key: str) -> str:
    return f"{_fmt_float(result[key])} ± {_fmt_float(result[f'{key}_std'])}"


def _fmt_float(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


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
    quiet: QuietOption = False,
) -> None:
    """Generate phantom data, train, evaluate and write OUT/report.html (under 10 min on 2 cores)."""
    from ..demo import run_demo

    summary = run_demo(out, n=n, epochs=epochs, seed=seed, size=size, model_name=model,
                       image_size=image_size or None, show_progress=not quiet)
    print_metrics("medvl demo: held-out phantom test split", summary["headline"])
    console.print(f"report: {summary['report']}")


app.command("deid")(deid_command)
app.command("dicom-info")(inspect_command)
app.add_typer(index_app, name="index")
app.add_typer(pacs_app, name="pacs")
app.command("search")(search_command)
app.add_typer(report_app, name="report")
eval_app.command("case-retrieval")(case_retrieval_command)

if __name__ == "__main__":
    app()
