"""``medvl export onnx``: a model's towers as ONNX graphs for the onnx / onnx-int8 backends."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import console, handle_errors

export_app = typer.Typer(help="Export a trained model for other runtimes.", no_args_is_help=True)


@export_app.command("onnx")
@handle_errors
def export_onnx_command(
    model: Annotated[Path, typer.Option(help="Trained model folder (or a train output folder).")],
    out: Annotated[Path | None, typer.Option(
        help="New folder for a copy of the model plus its export (default: the export goes into MODEL/onnx).")] = None,
    int8: Annotated[bool, typer.Option(help="Also write dynamically quantised int8 graphs (for onnx-int8).")] = True,
) -> None:
    """Export the image and text towers to ONNX (checked against eager torch); then use --backend onnx."""
    from ..io import check_output_folder
    from ..models.backends import EXPORT_FILE, read_export
    from ..scale.onnx import export_onnx

    check_output_folder(out, "--out")

    folder = export_onnx(model, out, int8=int8)
    description = read_export(folder.parent)
    errors = ", ".join(f"{tower} {description[tower]['max_abs_error']:.2g}" + (
        f" (int8 {description[tower]['int8_max_abs_error']:.2g})" if int8 else "") for tower in ("image", "text"))
    console.print(f"wrote {folder / EXPORT_FILE} (largest difference from torch: {errors}); "
                  f"load it with --backend onnx" + (" or onnx-int8" if int8 else ""), soft_wrap=True)
