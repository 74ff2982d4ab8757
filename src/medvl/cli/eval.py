"""``medvl eval ...``: argument parsing over ``medvl.api.evaluate_*`` (case retrieval: cli/report.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import (
    AllowOutsideOption,
    BackendOption,
    CaptionsOption,
    CovariatesOption,
    JsonOption,
    OneLabelOption,
    OverwriteOption,
    QuietOption,
    check_outputs,
    console,
    emit_json,
    handle_errors,
    print_metrics,
    print_per_class,
)

eval_app = typer.Typer(help="Evaluate a trained model.", no_args_is_help=True)


@eval_app.command("zero-shot")
@handle_errors
def eval_zero_shot(
    model: Annotated[Path, typer.Option(help="Trained model folder.")],
    data: Annotated[Path, typer.Option(help="Dataset path.")],
    split: Annotated[str, typer.Option(help="Split to evaluate ('all' for every record).")] = "test",
    label_column: OneLabelOption = None,
    captions: CaptionsOption = None,
    json_out: JsonOption = None,
    overwrite: OverwriteOption = False,
    allow_outside_root: AllowOutsideOption = False,
    quiet: QuietOption = False,
    calibration_split: Annotated[str | None, typer.Option(
        help="Fit a softmax temperature on this split and report calibration (ECE, Brier summed over the classes, "
             "NLL) of --split.")] = None,
    backend: BackendOption = "torch",
) -> None:
    """Prompt-ensemble zero-shot classification: accuracy, balanced accuracy, macro AUC."""
    from ..api import evaluate_zero_shot

    check_outputs(overwrite, {"--model": model, "--data": data, "--captions": captions}, json=json_out)
    result = evaluate_zero_shot(model, data, split, label_column, captions, allow_outside_root,
                                show_progress=not quiet, calibration_split=calibration_split, backend=backend)
    print_metrics(f"zero-shot {result['label']} ({result['n']} images, {len(result['classes'])} classes)", {
        "accuracy": result["accuracy"], "balanced_accuracy": result["balanced_accuracy"],
        "macro_auc": result["macro_auc"], "chance balanced accuracy": result["chance_balanced_accuracy"]})
    print_per_class(result["per_class"])
    if "calibration" in result:
        _print_calibration(result["calibration"], result["split"])
    emit_json(result, json_out, overwrite)


def _print_calibration(block: dict, scored: str) -> None:
    """The abstention threshold is chosen on the calibration split and its coverage and risk measured on ``scored``."""
    from ..eval.calibration import BRIER_FORM

    abstain, fitted = block["abstention_threshold_at_risk_0.1"], block["split"]
    print_metrics(f"calibration (temperature and abstention threshold fitted on {fitted}, {block['n_fit']} images)", {
        "temperature": block["temperature"], "ECE before": block["ece_before"], "ECE after": block["ece_after"],
        f"Brier ({BRIER_FORM}) before": block["brier_before"], f"Brier ({BRIER_FORM}) after": block["brier_after"],
        "NLL before": block["nll_before"], "NLL after": block["nll_after"],
        "risk-coverage AURC before": block["risk_coverage"]["aurc_before"],
        "risk-coverage AURC after": block["risk_coverage"]["aurc"],
        f"abstain below (risk <= 0.1 on {fitted})": abstain["threshold"],
        f"coverage kept on {scored}": abstain["coverage"], f"risk of those kept on {scored}": abstain["risk"]})
    if abstain["reason"]:
        console.print(f"no abstention threshold: {abstain['reason']}")


@eval_app.command("retrieval")
@handle_errors
def eval_retrieval(
    model: Annotated[list[Path], typer.Option(
        help="Trained model folder; repeat it to score an ensemble (e.g. one recipe trained with several "
             "seeds: each model's scores standardised per query and averaged; JSON key 'ensemble').")],
    data: Annotated[Path, typer.Option(help="Dataset path (records need text).")],
    split: Annotated[str, typer.Option(help="Split to evaluate.")] = "test",
    json_out: JsonOption = None,
    overwrite: OverwriteOption = False,
    allow_outside_root: AllowOutsideOption = False,
    quiet: QuietOption = False,
    backend: BackendOption = "torch",
    bridge_data: Annotated[Path | None, typer.Option(
        help="Re-rank image->text with the captions of the nearest images of this dataset (e.g. the training "
             "data; never the scored split): JSON key 'bridge'.")] = None,
    bridge_split: Annotated[str | None, typer.Option(
        help="Split of --bridge-data used as the bank (default train; needs --bridge-data).")] = None,
    bridge_k: Annotated[int | None, typer.Option(
        help="Nearest bank images whose captions vote (default 10; needs --bridge-data).")] = None,
    bridge_weight: Annotated[float | None, typer.Option(
        help="Weight of their vote beside the model's own score (default 1; needs --bridge-data).")] = None,
) -> None:
    """Image->text and text->image Recall@1/5/10 and median rank, of one model or an ensemble."""
    from ..api import evaluate_retrieval

    check_outputs(overwrite, {"--model": model, "--data": data, "--bridge-data": bridge_data}, json=json_out)
    result = evaluate_retrieval(model, data, split, allow_outside_root, show_progress=not quiet, backend=backend,
                                bridge_data=bridge_data, bridge_split=bridge_split, bridge_k=bridge_k,
                                bridge_weight=bridge_weight)
    rows = {}
    for direction in ("image_to_text", "text_to_image"):
        for key, value in result[direction].items():
            if key != "chance":
                rows[f"{direction} {key}"] = value
    scored = [f"{result['n_images']} images", f"{result['n_texts']} distinct texts"]
    if result["texts_embedded_alike"]:
        scored.append(f"{result['texts_embedded_alike']} of them embedded alike (ties)")
    if "ensemble" in result:
        scored.append(f"{result['ensemble']['members']} models")
    if "bridge" in result:
        scored.append(f"image->text bridged by {result['bridge']['k']} of {result['bridge']['bank']} bank images")
    print_metrics(f"retrieval ({', '.join(scored)})", rows)
    emit_json(result, json_out, overwrite)


@eval_app.command("linear-probe")
@handle_errors
def eval_linear_probe(
    model: Annotated[Path, typer.Option(help="Trained model folder.")],
    train_data: Annotated[Path, typer.Option(help="Dataset to fit the probe on.")],
    test_data: Annotated[Path, typer.Option(help="Dataset to score the probe on.")],
    train_split: Annotated[str, typer.Option(help="Split of --train-data.")] = "train",
    test_split: Annotated[str, typer.Option(help="Split of --test-data.")] = "test",
    label_column: OneLabelOption = None,
    few_shot: Annotated[str, typer.Option(help="Comma-separated k images per class.")] = "1,4,16",
    covariates: CovariatesOption = None,
    json_out: JsonOption = None,
    overwrite: OverwriteOption = False,
    allow_outside_root: AllowOutsideOption = False,
    quiet: QuietOption = False,
) -> None:
    """Logistic regression on frozen image features: AUC and accuracy, full and few-shot; with covariates, fused
    with a logistic regression on patient metadata."""
    from ..api import evaluate_linear_probe
    from ..errors import InputError
    from ..eval.covariates import parse_columns

    check_outputs(overwrite, {"--model": model, "--train-data": train_data, "--test-data": test_data}, json=json_out)
    try:
        ks = [int(k) for k in few_shot.split(",") if k.strip()]
    except ValueError:
        raise InputError(f"--few-shot expects comma-separated integers, got {few_shot!r}") from None
    result = evaluate_linear_probe(model, train_data, test_data, train_split, test_split, label_column,
                                   few_shot=ks, allow_outside_root=allow_outside_root, show_progress=not quiet,
                                   covariates=None if covariates is None else parse_columns(covariates))
    rows = {"auc": result["auc"], "accuracy": result["accuracy"],
            "balanced_accuracy": result["balanced_accuracy"]}
    fused = "covariates" in result  # then every row says what it scored: the few-shot probes the image alone
    if fused:
        columns = ", ".join(result["covariates"]["columns"])
        rows = {f"{key} (image + {columns})": value for key, value in rows.items()}
        rows |= {f"{key} (image only)": value for key, value in result["image_only"].items()}
        rows["auc (covariates only)"] = result["covariates"]["auc"]
    shot = "-shot auc (image only)" if fused else "-shot auc"
    for k, scores in result["few_shot"].items():
        rows[f"{k}{shot}"] = scores["auc_mean"]
    for k in result.get("few_shot_skipped", {}):
        rows[f"{k}{shot}"] = "skipped (too few training images)"
    print_metrics(f"linear probe {result['label']} (train {result['n_train']}, test {result['n_test']})", rows)
    emit_json(result, json_out, overwrite)
