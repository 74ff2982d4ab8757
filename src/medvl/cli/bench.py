"""``medvl bench ...``: recipes end to end, argument parsing over ``medvl.bench``."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from ..errors import InputError
from .common import (
    AllowOutsideOption,
    CaptionsOption,
    CovariatesOption,
    JsonOption,
    OverwriteOption,
    QuietOption,
    SelfSupervisedOption,
    SkipFlaggedOption,
    TrainSetOption,
    check_outputs,
    console,
    emit_json,
    handle_errors,
    print_metrics,
)

bench_app = typer.Typer(help="Run a benchmark suite or recipe end to end.", no_args_is_help=True)


@bench_app.command("run")
@handle_errors
def bench_run(
    suite: Annotated[str, typer.Argument(help="Suite YAML file, or a shipped suite's name (phantom, "
                                              "pneumoniamnist, isic, medpix).")],
    model: Annotated[list[Path], typer.Option(help="Model folder to score (repeat for several, side by side).")],
    out: Annotated[Path, typer.Option(help="Run folder: results.json, report.html, finished cells (a rerun "
                                           "into it resumes).")],
    data: Annotated[list[str] | None, typer.Option(help="NAME=PATH: where the suite's dataset NAME lives.")] = None,
    split: Annotated[list[str] | None, typer.Option(help="NAME=SPLIT: the split of dataset NAME to score.")] = None,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Recompute every cell (and run into a folder that holds something else).")] = False,
    allow_outside_root: AllowOutsideOption = False,
    quiet: QuietOption = False,
) -> None:
    """Score models on a suite of datasets, tasks and trust checks; write results.json and report.html."""
    from ..bench.runner import parse_assignments, run_suite_file
    from ..io import check_not_an_input, check_output_folder

    check_output_folder(out, "--out")
    datasets = parse_assignments(data or [], "--data")
    check_not_an_input(out, "--out", {"--model": model, "--data": datasets.values(),
                                      "SUITE": suite if Path(suite).is_file() else None})
    result = run_suite_file(suite, list(model), out, data=datasets,
                            splits=parse_assignments(split or [], "--split"), show_progress=not quiet,
                            overwrite=overwrite, allow_outside_root=allow_outside_root)
    print_suite_summary(result, out)


def print_suite_summary(result: dict, out: Path) -> None:
    from ..bench.html import rough_note, skip_line

    headline = {f"{row['model']} {row['key']} {row['metric']}": _interval(row)
                for row in _headline_rows(result["rows"])}
    cells = result["cells"]
    # checks that ran on part of the data (rows, but some records or groups left out) did run: counted apart
    not_run = [skip for skip in result["skipped"] if not skip.get("partly_scored")]
    partly = [skip for skip in result["skipped"] if skip.get("partly_scored")]
    counts = {"skipped checks": len(not_run), **({"partly scored checks": len(partly)} if partly else {}),
              # figures a task could not score (a shot count a class cannot fill) are not checks: counted apart
              **({"skipped metrics": len(result["skipped_metrics"])} if result["skipped_metrics"] else {})}
    print_metrics(f"medvl bench {result['suite']}: {cells['total']} cells ({cells['computed']} computed, "
                  f"{cells['reused']} reused)", {**headline, "flags": len(result["flags"]), **counts,
                                                 "seconds": result["seconds"]})
    for flag in result["flags"]:
        console.print(f"[yellow]flag[/yellow] {escape(flag)}", markup=True)
    for row in _headline_rows(result["rows"]):
        if row.get("rough"):  # its interval, printed above, is marked: say why
            console.print(f"rough {escape(row['model'])} {escape(row['key'])} {escape(row['metric'])}: "
                          f"{escape(rough_note(row))}", markup=True)
    for skip in not_run:
        console.print(f"skipped {escape(skip_line(skip))}", markup=True)
    for skip in partly:
        console.print(f"partly scored {escape(skip_line(skip))}", markup=True)
    for skip in result["skipped_metrics"]:
        console.print(f"skipped metric {escape(skip_line(skip))}", markup=True)
    console.print(f"wrote {out / 'results.json'} and {out / 'report.html'}")


HEADLINE_METRICS = ("auc", "i2t_R@5", "t2i_R@5", "overall_accuracy", "micro_f1", "precision_at_k")
_SHOT_AUC = re.compile(r"^(\d+)-shot auc$")


def _headline_rows(rows: list[dict]) -> list[dict]:
    """The rows of the printed summary, in row order: each cell's ``HEADLINE_METRICS``, and a few-shot cell's AUC
    at its largest shot count (whatever shots the task lists)."""
    largest: dict[tuple[str, str], int] = {}
    for row in rows:
        shots = _SHOT_AUC.match(row["metric"])
        if shots:
            cell = (row["model"], row["key"])
            largest[cell] = max(largest.get(cell, 0), int(shots.group(1)))
    return [row for row in rows if row["metric"] in HEADLINE_METRICS
            or row["metric"] == f"{largest.get((row['model'], row['key']))}-shot auc"]


def _interval(row: dict) -> str:
    from ..bench.html import interval_text

    if row["value"] is None:
        return "-"
    interval = interval_text(row)
    if interval and row.get("rough"):  # a class of under SMALL_CLASS scored records (said below the table)
        interval += " rough"
    return f"{row['value']:.3f}" + (f" {interval}" if interval else "")


@bench_app.command("medmnist")
@handle_errors
def bench_medmnist(
    train_data: Annotated[Path, typer.Option(help="MedMNIST .npz with a train split.")],
    test_data: Annotated[Path, typer.Option(help="MedMNIST .npz holding the test split.")],
    test_split: Annotated[str, typer.Option(help="Split of --test-data to score.")] = "test",
    json_out: JsonOption = None,
    overwrite: OverwriteOption = False,
    out: Annotated[Path | None, typer.Option(
        help="Also keep the trained model here (new or empty; --overwrite replaces an earlier run's models), "
             "written once the run succeeds.")] = None,
    model: Annotated[str, typer.Option(help="Registered model name.")] = "medmnist-small",
    epochs: Annotated[int | None, typer.Option(help="Training epochs (default: the model's recipe).")] = None,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
    target_prior: Annotated[float | None, typer.Option(
        help="Binary tasks (refused for more classes): share of positives where the model is used; adds "
             "thresholds for that prior and for balanced accuracy, scored with bootstrap 95% intervals and "
             "re-weighted to the prior.")] = None,
    bootstrap: Annotated[int | None, typer.Option(
        help="Bootstrap resamples for the --target-prior intervals (default 2000; needs --target-prior).")] = None,
    ensemble: Annotated[int | None, typer.Option(
        help="Models trained with seeds seed, seed+1, ... whose probabilities are averaged (default: the "
             "recipe's).")] = None,
    tta: Annotated[bool | None, typer.Option(
        "--tta/--no-tta", help="Average over the recipe's test-time shifts and scales (default: the recipe's; "
                               "never flips).")] = None,
    operating_point: Annotated[str | None, typer.Option(
        help="Binary threshold behind the headline ACC: max_accuracy, max_balanced_accuracy or "
             "max_accuracy_at_prior (needs --target-prior); default: the recipe's. Refused for a task of more "
             "classes (scored by the argmax).")] = None,
    label_smoothing: Annotated[float | None, typer.Option(
        help="Share of each head target spread over the classes, 0-0.9 (default: the recipe's).")] = None,
    shifts: Annotated[str | None, typer.Option(
        help="Also score the split under every corruption (noise, blur, contrast, gamma, jpeg, rotation, crop) "
             "at these severities 1-5, e.g. 1,2,3: JSON key 'shifted'.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Model config override key=value.")] = None,
    train_set: TrainSetOption = None,
    quiet: QuietOption = False,
) -> None:
    """The MedMNIST recipe end to end: train on train, threshold on val, score AUC/ACC on the test split."""
    from ..api import parse_key_values, parse_overrides
    from ..bench.medmnist import run_medmnist
    from ..io import check_output_folder

    check_output_folder(out, "--out")
    check_outputs(overwrite, {"--train-data": train_data, "--test-data": test_data, "--out": out}, json=json_out)
    severities = _severities(shifts) if shifts is not None else None
    result = run_medmnist(train_data, test_data, test_split, model_name=model, epochs=epochs, seed=seed,
                          out=out, show_progress=not quiet, target_prior=target_prior, bootstrap=bootstrap,
                          ensemble=ensemble, test_time_augmentation=tta, operating_point=operating_point,
                          model_overrides=parse_overrides(set_ or []), label_smoothing=label_smoothing,
                          shifts=severities, train_options=parse_key_values(train_set or [], "--train-set"),
                          overwrite=overwrite)
    shown = {"auc": result["auc"], "acc": result["acc"], "threshold": result.get("threshold"),
             "operating point": result.get("operating_point"),
             "ensemble / test-time views": f"{result['ensemble']} / {result['test_time_views']}"}
    for name, point in (result["operating_points"] or {}).items():
        if isinstance(point, dict) and "threshold" in point:
            accuracy, at_prior = point["accuracy"]["value"], point["accuracy_at_prior"]["value"]
            shown[f"{name}: threshold / acc / acc at prior {target_prior}"] = (
                f"{point['threshold']:.3f} / {accuracy:.3f} / {at_prior:.3f}")
    if result["shifted"]:
        worst = result["shifted"]["worst"]
        shown[f"shifted (severities {shifts}): mean auc / worst"] = (
            f"{result['shifted']['mean_auc']:.3f} / {worst['auc']:.3f} ({worst['kind']} {worst['severity']})")
    copies = result.get("copies_in_fit")
    if copies:  # as bench cv's row of held-out copies
        shown["scored images copied from training"] = f"{copies['records']} of {copies['of']}"
    print_metrics(f"MedMNIST {test_data.name}:{test_split}", {**shown, "seconds": result["seconds"]})
    for flag in result["flags"]:
        console.print(f"[yellow]flag[/yellow] {escape(flag)}", markup=True)
    emit_json(result, json_out, overwrite)


@bench_app.command("cv")
@handle_errors
def bench_cv(
    data: Annotated[Path, typer.Option(
        help="Labelled image dataset (manifest, folder or .npz); the folds pool every split unless --split.")],
    label_column: Annotated[str, typer.Option("--label-column", "-l", help="Label column to predict.")],
    model: Annotated[str, typer.Option(help="Registered model name.")] = "derm-small",
    folds: Annotated[int, typer.Option(help="Number of cross-validation folds.")] = 5,
    split: Annotated[list[str] | None, typer.Option(
        help="Split(s) whose records form the folds, repeatable or comma-separated (e.g. train,val; "
             "default: every split pooled, test included).")] = None,
    repeats: Annotated[int, typer.Option(
        help="Repeat the whole CV with fold seeds seed .. seed + repeats - 1; spread over all folds.")] = 1,
    epochs: Annotated[int | None, typer.Option(help="Training epochs per fold (default: the model's recipe).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the folds, init, order and augmentation.")] = 0,
    captions: CaptionsOption = None,
    group_column: Annotated[str | None, typer.Option(
        help="Column of group ids (e.g. patient) kept within one fold.")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate (default: the model's recipe).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Records per batch (default: the model's recipe).")] = None,
    contrastive_weight: Annotated[float | None, typer.Option(
        help="Weight of the image-caption loss (the supervised head has weight 1; default: the recipe's).")] = None,
    skip_flagged: SkipFlaggedOption = None,
    ensemble: Annotated[int | None, typer.Option(
        help="Models per fold (other seeds) whose probabilities are averaged (default: the recipe's).")] = None,
    label_smoothing: Annotated[float | None, typer.Option(
        help="Share of each head target spread over the classes, 0-0.9 (default: the recipe's).")] = None,
    self_supervised_weight: SelfSupervisedOption = None,
    covariates: CovariatesOption = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Model config override key=value.")] = None,
    train_set: TrainSetOption = None,
    json_out: JsonOption = None,
    overwrite: OverwriteOption = False,
    allow_outside_root: AllowOutsideOption = False,
    quiet: QuietOption = False,
) -> None:
    """k-fold cross-validation: a fresh model per fold, head, zero-shot and linear-probe AUC / accuracy on held-out
    folds."""
    from ..api import parse_key_values, parse_overrides
    from ..bench.cv import cross_validate, repeated_cross_validate
    from ..checks import check_number
    from ..eval.covariates import parse_columns

    check_outputs(overwrite, {"--data": data, "--captions": captions}, json=json_out)
    check_number("repeats", repeats, minimum=1, maximum=100, integer=True)  # 0 or less ran one CV without a word
    options: dict[str, Any] = {
        "captions": captions, "group_column": group_column, "show_progress": not quiet, "lr": lr,
        "batch_size": batch_size, "contrastive_weight": contrastive_weight, "skip_flagged": skip_flagged,
        "ensemble": ensemble, "label_smoothing": label_smoothing, "self_supervised_weight": self_supervised_weight,
        "covariates": None if covariates is None else parse_columns(covariates),
        "overrides": parse_overrides(set_ or []), "train_options": parse_key_values(train_set or [], "--train-set"),
        "allow_outside_root": allow_outside_root, "splits": _split_names(split)}
    if repeats > 1:
        result = repeated_cross_validate(data, label_column, model_name=model, folds=folds, repeats=repeats,
                                         epochs=epochs, seed=seed, **options)
        fold_results = [f for r in result["repeats"] for f in r["folds"]]
        pooled = {"pooled out-of-fold auc per repeat": " ".join(_fmt_float(a) for a in result["auc_pooled"])}
        title = f"{repeats} x {folds}-fold CV {label_column} ({result['n']} images, mean ± std over all folds)"
    else:
        result = cross_validate(data, label_column, model_name=model, folds=folds, epochs=epochs, seed=seed,
                                **options)
        fold_results, pooled = result["folds"], {"pooled out-of-fold auc": result["auc_pooled"]}
        title = f"{folds}-fold CV {label_column} ({result['n']} images, mean ± std over folds)"
    print_metrics(title, {
        name: _mean_std(result, key, len(fold_results)) for name, key in (
            ("auc", "auc"), ("acc", "acc"), ("balanced_accuracy", "balanced_accuracy"),
            ("zero-shot auc", "zero_shot_auc"), ("zero-shot balanced_accuracy", "zero_shot_balanced_accuracy"),
            ("linear-probe auc", "probe_auc"), ("linear-probe balanced_accuracy", "probe_balanced_accuracy"))}
        | _fused_rows(result, len(fold_results)) | pooled | _copies_row(fold_results)
        | {"splits pooled": ", ".join(f"{name} {count}" for name, count in result["splits"].items()),
           "majority-class acc": result["majority_acc"],
                    "per-fold auc": " ".join(_fmt_float(f["auc"]) for f in fold_results),
                    "seconds": result["seconds"]})
    emit_json(result, json_out, overwrite)


def _split_names(given: list[str] | None) -> list[str] | None:
    """--split values (repeatable, each may be a comma list) as split names in order, each once; None without."""
    if not given:
        return None
    names = [name.strip() for value in given for name in value.split(",")]
    if not all(names):
        raise InputError(f"--split {','.join(given)!r}: an empty split name")
    return list(dict.fromkeys(names))


def _copies_row(fold_results: list[dict]) -> dict[str, str]:
    """The row of held-out images that copy a training-fold image (``copies_in_fit``; none without)."""
    copies = [fold.get("copies_in_fit", {}).get("records", 0) for fold in fold_results]
    if not any(copies):
        return {}
    scored = sum(fold["n_test"] for fold in fold_results)
    return {"held-out copies of training-fold images": f"{sum(copies)} of {scored} (per fold: "
                                                        f"{' '.join(map(str, copies))})"}


def _fused_rows(result: dict, folds: int) -> dict[str, str]:
    """The rows of a CV scored with covariates (none without), over ``folds`` folds in all."""
    if result.get("fused_auc") is None:
        return {}
    columns = ", ".join(result["train"]["covariates"])
    return {f"{name} + covariates ({columns})": _mean_std(result, key, folds) for name, key in (
        ("auc", "fused_auc"), ("balanced_accuracy", "fused_balanced_accuracy"),
        ("linear-probe auc", "probe_fused_auc"), ("linear-probe balanced_accuracy", "probe_fused_balanced_accuracy"))
    } | {"covariates-only auc": _mean_std(result, "covariates_auc", folds)}


def _severities(text: str) -> list[int]:
    """``--shifts 1,2,3`` as [1, 2, 3]: whole numbers 1-5, at least one, no repeats."""
    try:
        severities = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise InputError(f"--shifts takes severities 1-5 separated by commas, e.g. 1,2,3; got {text!r}") from None
    if not severities or len(set(severities)) != len(severities) or not all(1 <= s <= 5 for s in severities):
        raise InputError(f"--shifts takes distinct severities 1-5 separated by commas, e.g. 1,2,3; got {text!r}")
    return severities


def _mean_std(result: dict, key: str, folds: int) -> str:
    """``mean ± std``, and over how many of the ``folds`` when the metric is undefined on some (one class scored)."""
    over = result.get(f"{key}_folds")
    return f"{_fmt_float(result[key])} ± {_fmt_float(result[f'{key}_std'])}" + (
        f" ({over} of {folds} folds)" if over is not None else "")


def _fmt_float(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
