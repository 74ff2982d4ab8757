"""``medvl index build|add|delete|info`` and ``medvl search``: the case index on the command line.

INDEX is a folder (FAISS + SQLite) or ``postgresql://user@host/db#table`` (pgvector). ``--json``
outputs name the index, data and query files by their last path component only (a folder above them
may name a patient) and Postgres URLs without their password; hits carry image paths relative to
the dataset root (see docs/index-contents.md).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from ..errors import DataError, InputError
from .common import (
    AllowOutsideOption,
    BackendOption,
    OverwriteOption,
    QuietOption,
    WorkersOption,
    check_outputs,
    console,
    emit_json,
    handle_errors,
    print_metrics,
)

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

index_app = typer.Typer(help="Build and edit a case index for similar-case search.", no_args_is_help=True)

IndexOption = Annotated[str, typer.Option(
    "--index", help="Index folder, or postgresql://user@host/db#table for pgvector.")]
ModelOption = Annotated[Path | None, typer.Option(
    help="Trained model folder (default: the one the index was built with).")]
SplitOption = Annotated[str, typer.Option(help="Split to index; 'all' indexes every record.")]
BatchOption = Annotated[int, typer.Option(help="Cases embedded (and checkpointed) per batch.")]
DuplicatesOption = Annotated[bool, typer.Option(
    help="Index a case even if the same image is already indexed (default: skip and report it).")]


def _index_rows(info: dict) -> dict:
    rows = {"cases": info.get("n_cases"), "backend": info.get("backend"),
            "encoder backend": info.get("encoder_backend", "torch"), "embedding size": info.get("embed_dim"),
            "model": info["model"].get("dir") or info["model"].get("name")}
    for target in ("images", "texts"):
        if target in info:
            block = info[target]
            rows[f"{target} index"] = block["kind"]
            if "nlist" in block:  # IVF-PQ
                rows[f"{target} lists probed"] = f"{block['nprobe']} of {block['nlist']}"
                rows[f"{target} codes"] = f"{block['nbits']}-bit, {block['code_bytes']} bytes per vector"
            rows[f"{target} recall@10 vs exact"] = block["recall_at_10"]
            if block.get("recall_stale"):
                rows[f"{target} recall@10 vs exact"] = (
                    f"{block['recall_at_10']:.3f}, measured at build on {block['recall_measured_on']} vectors; the "
                    f"index now holds {block['n']} (not re-measured: rebuild to measure it again)")
    rows["filter columns"] = ", ".join(f"{n} ({t})" for n, t in info.get("columns", {}).items()) or "-"
    return rows


@index_app.command("build")
@handle_errors
def build_command(
    model: Annotated[Path, typer.Option(help="Trained model folder.")],
    data: Annotated[Path, typer.Option(help="Dataset: manifest, folder, .npz or MedPix folder.")],
    out: Annotated[str, typer.Option(help="Index folder to write, or postgresql://...#table.")],
    split: SplitOption = "all",
    batch_size: BatchOption = 32,
    kind: Annotated[str, typer.Option(
        help="ANN index: auto (by size), flat (exact), hnsw, ivfpq (FAISS only).")] = "auto",
    allow_duplicates: DuplicatesOption = False,
    json_out: Annotated[str | None, typer.Option(
        "--json", help="Write the index description (size, model, ANN kind, duplicates skipped, timing) to this "
                        "JSON file.")] = None,
    overwrite: OverwriteOption = False,
    allow_outside_root: AllowOutsideOption = False,
    quiet: QuietOption = False,
    backend: BackendOption = "torch",
    ray: Annotated[bool, typer.Option(
        "--ray", help="Decode and embed on Ray workers (Ray Data; a local Ray unless --address or RAY_ADDRESS)."
    )] = False,
    address: Annotated[str | None, typer.Option(
        help="With --ray: the Ray cluster to join (e.g. auto, ray://head:10001); default RAY_ADDRESS if "
             "set, else a local Ray ('local': a local Ray even when RAY_ADDRESS is set).")] = None,
    ray_workers: Annotated[int | None, typer.Option(
        help="With --ray: embedding workers (one CPU each; default 2, at most the cores on a local Ray).")] = None,
    workers: WorkersOption = None,
) -> None:
    """Embed a dataset into a new index. Interrupted builds resume when rerun; the previous index
    stays usable until the new one is complete. Image paths are stored relative to the dataset's
    folder (none for DICOM). --ray spreads decoding and embedding over Ray workers; the index is
    the same."""
    from ..api import load_split
    from ..data.loading import check_workers
    from ..index import build_index, shown_location
    from ..index.backends import check_kind
    from ..index.build import check_batch_size
    from ..io import check_output_folder
    from ..models.registry import load_model

    check_output_folder(out, "--out")
    check_outputs(overwrite, {"--model": model, "--data": data, "--out": out}, json=json_out)
    check_batch_size(batch_size)
    check_kind(out, kind)
    check_workers(workers)
    embedder = None
    if ray:
        from ..scale.ray_jobs import RayEmbedder

        embedder = RayEmbedder(model, workers=ray_workers, address=address, backend=backend)
    elif address is not None:
        raise InputError("--address is a Ray cluster address: it needs --ray")
    elif ray_workers is not None:
        raise InputError("--ray-workers sets the embedding workers on Ray: it needs --ray (for reading processes "
                         "on this machine use --workers)")
    if ray and workers is not None:
        raise InputError("--workers sets the reading processes of a build on this machine; with --ray use "
                         "--ray-workers")
    dataset = load_split(data, split, allow_outside_root=allow_outside_root)
    net = load_model(model, backend=backend)
    info = build_index(net, dataset, out, model_dir=model, batch_size=batch_size, kind=kind,
                       allow_duplicates=allow_duplicates, show_progress=not quiet, embedder=embedder,
                       workers=workers)
    rows = _index_rows(info)
    rows.update({"duplicates skipped": len(info["duplicates"]), "resumed cases": info["resumed"],
                 "seconds": info["seconds"]})
    print_metrics(f"index {shown_location(out)}", rows)
    emit_json(info, json_out, overwrite)


@index_app.command("add")
@handle_errors
def add_command(
    index: IndexOption,
    data: Annotated[Path, typer.Option(
        help="Dataset with the cases to add (ids already indexed with the same image, report, labels, metadata and "
             "split are left; with another image, report, labels, metadata or split they are refused, unless "
             "--replace).")],
    model: ModelOption = None,
    split: SplitOption = "all",
    batch_size: BatchOption = 32,
    allow_duplicates: DuplicatesOption = False,
    replace: Annotated[bool, typer.Option(
        help="Replace the indexed cases whose id comes again with another image, report, labels, metadata or split "
             "(default: refuse).")
    ] = False,
    json_out: Annotated[str | None, typer.Option(
        "--json", help="Write the counts (added, already present, replaced, duplicates skipped, cases) to this "
                        "JSON file.")] = None,
    overwrite: OverwriteOption = False,
    allow_outside_root: AllowOutsideOption = False,
    quiet: QuietOption = False,
    workers: WorkersOption = None,
    backend: Annotated[str | None, typer.Option(
        help="How the model runs (see index build); default: the backend the index's vectors were embedded on "
             "('encoder backend' in index info). Another one is refused: an index holds vectors of one backend.")
    ] = None,
) -> None:
    """Add new cases to an index (all or nothing: the index changes only once they are embedded)."""
    from ..api import load_split
    from ..data.loading import check_workers
    from ..index import add_records, index_model, open_index
    from ..index.build import check_batch_size

    check_outputs(overwrite, {"--index": index, "--data": data, "--model": model}, json=json_out)
    check_batch_size(batch_size)
    check_workers(workers)
    dataset = load_split(data, split, allow_outside_root=allow_outside_root)
    with open_index(index, writable=True) as opened:
        net = index_model(opened, model, backend=backend or opened.info.get("encoder_backend", "torch"),
                          option="--model")
        result = add_records(opened, net, dataset, batch_size=batch_size,
                             allow_duplicates=allow_duplicates, show_progress=not quiet, workers=workers,
                             replace=replace)
    print_metrics(f"index {opened.location}", {
        "added": result["added"], "already present": result["already_present"], "replaced": result["replaced"],
        "duplicates skipped": len(result["duplicates"]), "cases": result["n_cases"]})
    emit_json(result, json_out, overwrite)


@index_app.command("delete")
@handle_errors
def delete_command(
    ids: Annotated[list[str], typer.Argument(help="Case ids to remove.")],
    index: IndexOption,
) -> None:
    """Remove cases from an index by id."""
    from ..index import open_index

    with open_index(index, writable=True) as opened:
        removed = opened.delete(ids)
        if removed:  # nothing removed: the index is left as it was (no new version for its readers to reload)
            opened.save()
        remaining = len(opened)
    missing = len(set(ids)) - removed
    console.print(f"removed {removed} cases" + (f" ({missing} ids not found)" if missing else "")
                  + f"; {remaining} remain" + ("" if removed else " (index unchanged)"))


@index_app.command("info")
@handle_errors
def info_command(
    index: IndexOption,
    json_out: Annotated[str | None, typer.Option(
        "--json", help="Write the index description to this JSON file.")] = None,
    overwrite: OverwriteOption = False,
) -> None:
    """Describe an index: size, model, ANN kind and recall, filter columns."""
    from ..index import open_index
    from ..index.base import with_recall_status

    check_outputs(overwrite, {"--index": index}, json=json_out)
    with open_index(index) as opened:
        info, location = with_recall_status({**opened.info, "n_cases": len(opened)}), opened.location
    print_metrics(f"index {location}", _index_rows(info))
    emit_json(info, json_out, overwrite)


@handle_errors
def search_command(
    index: IndexOption,
    image: Annotated[Path | None, typer.Option(
        help="Query image file (for a 3D model also a DICOM series' folder).")] = None,
    text: Annotated[str | None, typer.Option(help="Query text, e.g. 'left pleural effusion'.")] = None,
    k: Annotated[int, typer.Option("--k", "-k", help="Number of results.")] = 10,
    where: Annotated[str | None, typer.Option(
        help="Filter on case metadata, e.g. \"sex = 'F' and age > 60\" "
             "(= != < <= > >=, and / or / not, in (...), is null).")] = None,
    target: Annotated[str, typer.Option(
        help="images: similar cases by image; texts: closest reports (image->text, text->text).")] = "images",
    model: ModelOption = None,
    show: Annotated[list[str] | None, typer.Option(
        help="Metadata column to show (repeatable; a filter or label column of the index, any case; default: the "
             "dataset's label columns).")] = None,
    data_root: Annotated[Path | None, typer.Option(
        help="Folder of the dataset the index was built from: also list each hit's image file there "
             "(the index stores paths relative to it).")] = None,
    json_out: Annotated[str | None, typer.Option(
        "--json", help="Write the query and hits to this JSON file.")] = None,
    overwrite: OverwriteOption = False,
    backend: BackendOption = "torch",
) -> None:
    """Find the cases closest to a query image or text in an index."""
    from ..index import describe_target, index_model, open_index, search_index
    from ..index.base import check_k
    from ..index.search import check_one_query, shown_columns
    from ..index.where import given_filter
    from ..models.ood import ood_comparison

    where = given_filter(where)  # blank: no filter (the --json says null, as the service's answer)
    check_outputs(overwrite, {"--index": index, "--image": image, "--model": model, "--data-root": data_root},
                  json=json_out)
    check_k(k)
    check_one_query(image, text)
    if data_root is not None and not data_root.is_dir():
        raise InputError(f"--data-root {data_root}: not a folder")
    with open_index(index) as opened:
        columns = shown_columns(opened, show) if show else opened.info.get("label_columns") or []
        net = index_model(opened, model, backend=backend, option="--model")
        # read and preprocessed once: searched with, and checked
        pixels = net.preprocessor.load(image) if image is not None else None  # an error names the file
        hits = search_index(opened, net, image=pixels, text=text, k=k, where=where, target=target)
        flag = _query_checks(net, pixels)
    files = _image_files(hits, data_root) if data_root is not None else None  # before any output: may refuse
    _print_hits(hits, columns, target, "image" if image is not None else "text")
    if not hits:
        console.print(f"no indexed case matches --where {where!r}" if where else "the index holds no case to return")
    for rank, line in enumerate(files or [], 1):
        console.print(f"{rank}. {line}", soft_wrap=True, highlight=False)
    if flag.get("input_flags"):
        console.print(f"[red]the query image is {' and '.join(flag['input_flags'])} as the model sees it: its "
                      "nearest cases are not similar to anything[/]", markup=True)
    if flag.get("out_of_distribution"):
        console.print(f"[red]the query image is out of distribution ({ood_comparison(flag)}): similar cases may not "
                      "be similar[/]", markup=True)
    query = {"image": describe_target(image), **flag} if image is not None else {"text": text}
    emit_json({"index": describe_target(index), "query": query, "target": target, "k": k, "where": where,
               "hits": [hit.to_dict() for hit in hits]}, json_out, overwrite)


def _query_checks(net, pixels: torch.Tensor | None) -> dict:
    """The query image's ``input_flags`` (blank or streaked as the model sees it: ``pixels``, its preprocessing)
    and, when the model has a guard (``medvl ood fit``), its OOD score and flag; {} for a text query."""
    if pixels is None:
        return {}

    from ..data.audit import input_flags
    from ..models.ood import embed_checked

    checks: dict = {"input_flags": input_flags(pixels.numpy())}
    if getattr(net, "ood", None) is not None:
        checks.update(embed_checked(net, pixels[None])[1][0])
    return checks


def _image_files(hits: list, data_root: Path) -> list[str]:
    """With ``--data-root``: each hit's image file there (whole, to copy), or why there is none. A stored path
    that would leave the root is refused (InputError); a file not under this root (a case added from another
    folder by ``medvl index add``) is said on its line and counted in one warning; a file there that is not the
    indexed image (a case replaced from another folder, a file overwritten since) is never listed: its line and a
    warning naming the case say so."""
    from ..index import ImageChanged, resolve_image

    lines, missing = [], 0
    for hit in hits:
        try:
            path = resolve_image(hit, data_root)
        except ImageChanged:
            lines.append("- (the file under --data-root is not the indexed image)")
            log.warning("case %r: the file at its stored path under --data-root holds another image than the one "
                        "indexed (replaced from another folder, or overwritten since); not shown", hit.id)
            continue
        except DataError:
            missing += 1
            lines.append(f"- (not found under {data_root}: added from another folder?)")
            continue
        lines.append(str(path) if path else "- (the index stores no path for this case)")
    if missing:
        log.warning("%d of %d hits have no image file under --data-root (cases added from another folder have "
                    "paths relative to it)", missing, len(hits))
    return lines


def _print_hits(hits: list, columns: list[str], target: str, query: str) -> None:
    """The hits as a table whose title says what was compared: the query (image or text) with the
    cases' images or their reports (``target``)."""
    from rich.table import Table

    from ..index.search import hit_value

    compared = "reports" if target == "texts" else "images"
    table = Table(title=f"{len(hits)} cases closest to the query {query}, by their {compared}", header_style="bold")
    for name in ("rank", "score", "id", "split", *columns, "report" if target == "texts" else "image"):
        table.add_column(name, justify="right" if name in ("rank", "score") else "left")
    for rank, hit in enumerate(hits, 1):
        last = _short(hit.text) if target == "texts" else Path(hit.image_path).name if hit.image_path else "-"
        values = ["-" if (value := hit_value(hit, c)) is None else str(value) for c in columns]
        table.add_row(str(rank), f"{hit.score:.3f}", hit.id, hit.split, *values, last)
    console.print(table)


def _short(text: str | None, width: int = 80) -> str:
    if not text:
        return "-"
    return text if len(text) <= width else text[:width - 1] + "…"


if __name__ == "__main__":  # python -m medvl.cli.index build ... (also `medvl index ...` once registered)
    from .common import setup_logging

    setup_logging(False)
    index_app()
