"""``medvl ood fit``: the out-of-distribution guard a model carries (``medvl.models.ood``)."""

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
    emit_json,
    handle_errors,
    print_metrics,
)

ood_app = typer.Typer(help="Out-of-distribution guard: flag inputs unlike the model's training images.",
                      no_args_is_help=True)


@ood_app.command("fit")
@handle_errors
def fit_command(
    model: Annotated[Path, typer.Option(help="Trained model folder (the guard is saved into it).")],
    data: Annotated[Path, typer.Option(help="The training data (or data like it).")],
    split: Annotated[str, typer.Option(help="Split the guard's statistics are fitted on.")] = "train",
    calibration_split: Annotated[str, typer.Option(
        help="Another split of in-distribution images: the threshold is a quantile of their scores.")] = "val",
    quantile: Annotated[float, typer.Option(
        help="Split-conformal quantile of the calibration scores: at most 1 - QUANTILE of in-distribution images "
             "flagged (0.99: 1%) given at least QUANTILE / (1 - QUANTILE) calibration images (99), else a warning.")
    ] = 0.99,
    check_data: Annotated[Path | None, typer.Option(
        help="Also report how much of this dataset is flagged (e.g. real images for a phantom model).")] = None,
    check_split: Annotated[str | None, typer.Option(
        help="Split of --check-data (default: every record; needs --check-data); images the guard is fitted or "
             "calibrated on are refused.")] = None,
    json_out: JsonOption = None,
    overwrite: OverwriteOption = False,
    allow_outside_root: AllowOutsideOption = False,
    quiet: QuietOption = False,
) -> None:
    """Fit the OOD guard on a split's image features and save it into the model (--overwrite replaces a
    guard it has); predict, eval zero-shot, search and the service then report an OOD score per image
    and flag those above the threshold."""
    from ..api import fit_ood_from_path

    check_outputs(overwrite, {"--model": model, "--data": data, "--check-data": check_data}, json=json_out)
    result = fit_ood_from_path(model, data, split=split, calibration_split=calibration_split, quantile=quantile,
                               check_data=check_data, check_split=check_split,
                               allow_outside_root=allow_outside_root, show_progress=not quiet, overwrite=overwrite)
    rows = {"threshold": result["threshold"], "fitted images": result["fit_images"],
            "calibration images": result["calibration_images"],
            "calibration flagged": result["calibration_flagged_share"]}
    if "check" in result:
        rows.update({"checked images": result["check"]["n"], "checked flagged": result["check"]["flagged_share"]})
    print_metrics(f"OOD guard saved into {model}", rows)
    emit_json(result, json_out, overwrite)
