"""``medvl pacs search|pull|echo``: find and copy studies from a PACS over DICOMweb (QIDO-RS / WADO-RS)
or DIMSE (C-FIND, C-GET / C-MOVE) with ``--url dicom://AET@host:port``.

Registered in ``cli/main.py`` with ``app.add_typer(pacs_app, name="pacs")``. ``search`` shows
patient names, IDs and dates on the user's own terminal (that is what finding a study needs); they
are never logged or written to a file. ``pull`` de-identifies every instance before writing it
unless ``--keep-identifiers`` is given.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from .common import QuietOption, console, err_console, handle_errors

pacs_app = typer.Typer(help="Search and pull studies from a PACS over DICOMweb (QIDO-RS / WADO-RS) or DIMSE "
                            "(C-FIND, C-GET / C-MOVE).", no_args_is_help=True)

UrlOption = Annotated[str, typer.Option(
    help="DICOMweb service root, e.g. http://localhost:8042/dicom-web (Orthanc), or a DIMSE address "
         "dicom://AET@host:port (the PACS's AE title and DICOM port).", envvar="MEDVL_PACS_URL")]
UserOption = Annotated[str | None, typer.Option(
    "--user", help="User for HTTP basic auth.", envvar="MEDVL_PACS_USER")]
PasswordOption = Annotated[str | None, typer.Option(
    help="Password for HTTP basic auth (better: the MEDVL_PACS_PASSWORD variable).", envvar="MEDVL_PACS_PASSWORD")]
TokenOption = Annotated[str | None, typer.Option(
    help="Bearer token (better: the MEDVL_PACS_TOKEN variable).", envvar="MEDVL_PACS_TOKEN")]
TimeoutOption = Annotated[float, typer.Option(
    help="Seconds to wait for the server to connect or send data (> 0, at most 86400).")]
CallingAetOption = Annotated[str | None, typer.Option(
    help="DIMSE: our AE title, as the PACS knows it (default MEDVL).", envvar="MEDVL_PACS_CALLING_AET")]
RetrieveOption = Annotated[str | None, typer.Option(
    help="DIMSE: 'get' (C-GET, default: the PACS sends back on the same connection) or 'move' (C-MOVE: the PACS "
         "connects to --move-port, registered there for the calling AE title).")]
MovePortOption = Annotated[int | None, typer.Option(
    help="DIMSE C-MOVE: port medvl listens on for the instances while pulling.", envvar="MEDVL_PACS_MOVE_PORT")]


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return "\\".join(str(v) for v in value)
    return str(value)


def _print_rows(title: str, rows: list[dict[str, Any]], columns: dict[str, str], under_uid: str | None = None) -> None:
    """A table whose first column, the UID, stays whole (it is copied into ``medvl pacs pull``), with
    ``under_uid`` on a second line of that cell; descriptions fold when the terminal is narrow."""
    from rich import box

    table = Table(title=title, show_header=True, header_style="bold", box=box.SIMPLE_HEAD, pad_edge=False)
    uid_key = next(iter(columns))
    width = max([len(columns[uid_key]), *(len(_cell(row.get(uid_key))) for row in rows)])
    table.add_column(columns[uid_key], overflow="fold", min_width=width, max_width=max(width, 40))
    for key in list(columns)[1:]:
        wrapped = key.endswith("Description")
        table.add_column(columns[key], overflow="fold", no_wrap=not wrapped)
    for row in rows:
        first = Text(_cell(row.get(uid_key)))
        if under_uid and row.get(under_uid):
            first.append("\n" + _cell(row[under_uid]), style="dim")
        table.add_row(first, *(_cell(row.get(key)) for key in list(columns)[1:]))
    _print_whole(table)


def _print_whole(table: Table) -> None:
    """On a terminal, the table as wide as the terminal; piped or redirected, as wide as it needs: rich
    would lay it out for 80 columns and crop every line there, losing whole columns without a mark."""
    if console.is_terminal:
        console.print(table)
        return
    from rich.console import Console
    from rich.measure import Measurement

    needed = Measurement.get(console, console.options.update_width(10_000), table).maximum
    Console(file=console.file, markup=False, width=max(console.width, needed)).print(table)


def _with_patient(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Name, ID and study description as one line: ``NAME (ID): DESCRIPTION``."""
    for row in rows:
        name, patient_id, description = row.get("PatientName"), row.get("PatientID"), row.get("StudyDescription")
        patient = " ".join(filter(None, [_cell(name) if name else None,
                                         f"({_cell(patient_id)})" if patient_id else None]))
        row["patient"] = ": ".join(filter(None, [patient, _cell(description) if description else None])) or None
    return rows


@pacs_app.command("search")
@handle_errors
def search_command(
    url: UrlOption,
    patient_id: Annotated[str | None, typer.Option(help="Patient ID (wildcards * and ? if the server allows).")] = None,
    patient_name: Annotated[str | None, typer.Option(help="Patient name, DICOM style: FAMILY^GIVEN, e.g. DOE^*.")]
    = None,
    modality: Annotated[str | None, typer.Option(help="Modality in the study, e.g. CT, MR, CR, DX.")] = None,
    study_date: Annotated[str | None, typer.Option(help="YYYYMMDD, or a range YYYYMMDD-YYYYMMDD.")] = None,
    accession: Annotated[str | None, typer.Option(help="Accession number.")] = None,
    study: Annotated[str | None, typer.Option(help="List the series of this study UID instead of studies.")] = None,
    filter_: Annotated[list[str] | None, typer.Option(
        "--filter", help="Any other QIDO-RS match, KEYWORD=VALUE (repeatable), e.g. StudyDescription=*CHEST*; a series "
                         "attribute (BodyPartExamined=CHEST) with --study UID.")]
    = None,
    limit: Annotated[int | None, typer.Option(help="At most this many results.")] = None,
    uids: Annotated[bool, typer.Option("--uids", help="Print only the UIDs, one per line (for scripts).")] = False,
    user: UserOption = None,
    password: PasswordOption = None,
    token: TokenOption = None,
    calling_aet: CallingAetOption = None,
    timeout: TimeoutOption = 60.0,
) -> None:
    """Find studies (or the series of one study) with QIDO-RS or C-FIND. Shows identifiers on this terminal only."""
    from ..clinical.clients import open_pacs, study_filters

    filters = study_filters(patient_id, patient_name, modality, study_date, accession, filter_ or [])
    with open_pacs(url, user=user, password=password, token=token, timeout=timeout,
                   calling_aet=calling_aet) as client:
        if study:
            filters.pop("ModalitiesInStudy", None)
            if modality:
                filters["Modality"] = modality
            rows = client.search_series(study, filters, limit=limit)
            key, columns = "SeriesInstanceUID", {
                "SeriesInstanceUID": "series UID", "SeriesNumber": "no.", "Modality": "modality",
                "BodyPartExamined": "body part", "NumberOfSeriesRelatedInstances": "images",
                "SeriesDescription": "description"}
        else:
            rows = _with_patient(client.search_studies(filters, limit=limit))
            key, columns = "StudyInstanceUID", {
                "StudyInstanceUID": "study UID / patient: description", "StudyDate": "date",
                "ModalitiesInStudy": "modalities", "NumberOfStudyRelatedSeries": "series",
                "NumberOfStudyRelatedInstances": "images"}
    if uids:
        for row in rows:
            typer.echo(_cell(row.get(key)))
        return
    what = "series" if study else "studies"
    _print_rows(f"{client.url}: {len(rows)} {what}", rows, columns, under_uid=None if study else "patient")


@pacs_app.command("pull")
@handle_errors
def pull_command(
    url: UrlOption,
    study: Annotated[list[str], typer.Option(help="Study Instance UID to pull (repeatable).")],
    out: Annotated[Path, typer.Option(help="New or empty folder; or an unfinished pull's folder to resume.")],
    keep_identifiers: Annotated[bool, typer.Option(
        help="Write the instances as received, with patient names, IDs and dates (default: de-identify).")] = False,
    seed: Annotated[str | None, typer.Option(
        help="De-identification seed: the same seed gives the same new UIDs and dummies (links separate pulls; "
             "keep it secret, it reveals the date shift). Default: random, discarded when the pull completes.")]
    = None,
    limit: Annotated[int | None, typer.Option(help="Stop after this many new instances (rerun to continue).")] = None,
    user: UserOption = None,
    password: PasswordOption = None,
    token: TokenOption = None,
    calling_aet: CallingAetOption = None,
    retrieve: RetrieveOption = None,
    move_port: MovePortOption = None,
    timeout: TimeoutOption = 60.0,
    quiet: QuietOption = False,
) -> None:
    """Pull whole studies with WADO-RS (or C-GET / C-MOVE) into OUT, de-identified (DICOM PS3.15 basic
    profile), with OUT/pull-report.json. Rerun the same command to resume an interrupted pull. A series the
    PACS will not send is skipped and named, the others pulled, and the exit code is 3."""
    from ..clinical.clients import open_pacs
    from ..clinical.pull import REPORT_NAME, run_pull
    from ..io import check_output_folder
    from .exits import EXIT_PARTIAL

    check_output_folder(out, "--out")

    if keep_identifiers:
        err_console.print("[yellow]warning:[/] --keep-identifiers: the files will hold patient names, IDs and "
                          "dates as the PACS sent them; do not share them or anything built from them")
    with open_pacs(url, user=user, password=password, token=token, timeout=timeout, calling_aet=calling_aet,
                   retrieve=retrieve, move_port=move_port) as client:
        report = run_pull(client, study, out, keep_identifiers=keep_identifiers, seed=seed, limit=limit,
                            show_progress=not quiet)
    counts = report["counts"]
    console.print(f"pulled {counts['pulled']} instance(s) ({counts['already_present']} already there) of "
                  f"{counts['instances']} in {counts['series']} series of {counts['studies']} study(ies) into {out}"
                  + ("" if keep_identifiers else ", de-identified"))
    if not report["complete"]:
        console.print(f"[yellow]incomplete:[/] {escape(report['missing'] or 'instances missing')}; rerun the same "
                      "command to pull the rest", markup=True)
    deid = report.get("deidentification") or {}
    if deid.get("files_with_burned_in_risk"):
        console.print(f"[yellow]warning:[/] {deid['files_with_burned_in_risk']} instance(s) may hold burned-in text "
                      "in their pixels, or identifying text in an encapsulated document (Burned In Annotation YES, or "
                      "ultrasound / secondary capture / document...): check them (the report's burned_in_risk_files "
                      "says which)", markup=True)
    console.print(f"report: {out / REPORT_NAME}")
    if any(series["error"] for series in report["series"]):
        raise typer.Exit(EXIT_PARTIAL)  # a script must not take a pull with refused series for a whole one


@pacs_app.command("echo")
@handle_errors
def echo_command(
    url: UrlOption,
    calling_aet: CallingAetOption = None,
    timeout: TimeoutOption = 10.0,
) -> None:
    """Check a DIMSE connection with C-ECHO (--url dicom://AET@host:port)."""
    import time

    from ..clinical.clients import open_pacs
    from ..clinical.dimse import DimseClient, is_dicom_url
    from ..errors import InputError

    client = open_pacs(url, timeout=timeout, calling_aet=calling_aet) if is_dicom_url(url) else None
    if not isinstance(client, DimseClient):
        raise InputError("echo is a DIMSE check: give --url dicom://AET@host:port")
    with client:
        started = time.perf_counter()
        client.echo()
    console.print(f"{client.url}: C-ECHO ok as {client.calling_aet} ({(time.perf_counter() - started) * 1000:.0f} ms)")
