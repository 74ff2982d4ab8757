"""Clinical commands: ``medvl deid`` (DICOM de-identification) and ``medvl dicom-info``.

Registered in ``cli/main.py`` as ``app.command("deid")(deid_command)`` and
``app.command("dicom-info")(inspect_command)``. Neither prints a patient identifier: the
de-identification report holds attribute names only, and ``dicom-info`` shows acquisition facts,
with study and series UIDs as short hashes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from .common import OverwriteOption, check_outputs, console, emit_json, handle_errors


@handle_errors
def deid_command(
    source: Annotated[Path, typer.Argument(help="DICOM file or folder to de-identify.")],
    out: Annotated[Path, typer.Argument(help="New file (for a file) or new / empty folder (for a folder).")],
    seed: Annotated[int | None, typer.Option(
        help="Seed: the same seed gives the same dummy values and UIDs (runs can be linked).")] = None,
    report: Annotated[Path | None, typer.Option(
        help="Also write the report (attribute names, no values) to this JSON file.")] = None,
    clean_descriptors: Annotated[bool, typer.Option(
        "--clean-descriptors/--keep-descriptors",
        help="Clean Descriptors option (default), at any depth: descriptions, protocol, body part and model "
             "names are kept only when made of plain technical words, else blanked; the standard's comments "
             "and notes are removed; every other LT / ST / UT / UC text is emptied; other LO / SH attributes "
             "named ...Comment(s), Note(s), Description, Label, Title, Explanation, Text or Reason, and Code "
             "Meanings of non-standard coding schemes, are kept when plain, else blanked. --keep-descriptors "
             "keeps the ones the basic profile keeps as they are (the final identifier scan still runs).")] = True,
    refuse_burned_in: Annotated[bool, typer.Option(
        "--refuse-burned-in",
        help="Refuse files whose pixels may hold burned-in text (Burned In Annotation YES; ultrasound, "
             "secondary capture, screen captures, photos): an error for a file, skipped in a folder.")] = False,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Replace an existing --report file (the de-identified output is always new).")] = False,
) -> None:
    """De-identify DICOM (PS3.15 basic profile via dicognito + Clean Descriptors): names, IDs, UIDs, dates,
    every attribute of the profile's table (Table E.1-1), descriptors, private tags; refuses a file in
    which a patient name, ID or date survives."""
    from ..clinical.deid import REPORT_NAME, deidentify
    from ..io import check_output_folder

    check_output_folder(out, "OUT")
    check_outputs(overwrite, {"SOURCE": source, "OUT": out}, report=report)
    result = deidentify(source, out, seed=seed, clean_descriptors=clean_descriptors,
                        refuse_burned_in=refuse_burned_in)
    _print_deid_summary(result, out, source.is_dir(), REPORT_NAME)
    emit_json(result, report, overwrite, option="--report")


def _print_deid_summary(result: dict[str, Any], out: Path, folder: bool, report_name: str) -> None:
    totals = result["totals"]
    console.print(f"de-identified {result['files_written']} file(s) into {out}"
                  + (f" (report: {out / report_name})" if folder else ""))
    console.print(f"replaced {len(totals['replaced'])} and removed {len(totals['removed'])} kinds of attributes, "
                  f"cleaned {len(totals['descriptors_cleaned'])} kinds of descriptors, "
                  f"{totals['private_tags_removed']} private tags")
    for reason, count in result["skipped"].items():
        console.print(f"skipped {count} file(s): {reason}")
    if totals["files_with_burned_in_risk"]:
        console.print(f"[yellow]warning:[/] {totals['files_with_burned_in_risk']} file(s) may hold burned-in text "
                      "in their pixels, or identifying text in an encapsulated document (Burned In Annotation "
                      "YES, or ultrasound / secondary capture / document...): check them (the report says which), "
                      "or use --refuse-burned-in", markup=True)


def _spacing(values) -> str:
    return "-" if not values else "x".join(f"{float(v):.3g}" for v in values)


def _spacing_cell(row: dict) -> str:
    """The row's pixel spacing; a series whose files state several: each of them, marked mixed (not one volume)."""
    several = row.get("pixel_spacings_mm") or []
    if len(several) > 1:
        return "mixed: " + ", ".join(_spacing(spacing) for spacing in several)
    return _spacing(row["pixel_spacing_mm"])


@handle_errors
def inspect_command(
    path: Annotated[Path, typer.Argument(help="DICOM file, folder of DICOM files, or NIfTI file.")],
    json_out: Annotated[str | None, typer.Option(
        "--json", help="Write the series description to this JSON file.")] = None,
    overwrite: OverwriteOption = False,
) -> None:
    """Studies and series with modality, size, frames and pixel spacing (no patient identifiers)."""
    from ..clinical.summary import series_summaries

    check_outputs(overwrite, {"PATH": path}, json=json_out)
    rows = series_summaries(path)
    table = Table(title=f"{path.name}: {len(rows)} series", show_header=True, header_style="bold")
    columns = ("study", "series", "number", "modality", "files", "frames", "size", "pixel_spacing_mm")
    for column in columns:
        table.add_column({"pixel_spacing_mm": "spacing (mm)", "number": "no."}.get(column, column))
    for row in rows:
        table.add_row(*(_spacing_cell(row) if c == "pixel_spacing_mm" else str(row[c] if row[c] is not None else "-")
                        for c in columns))
    console.print(table)
    if "transfer_syntax" in rows[0]:
        console.print(f"{rows[0]['sop_class']}, {rows[0]['transfer_syntax']}")
    emit_json({"path": path.name, "series": rows}, json_out, overwrite)
