"""``medvl explain``: why a model sees a finding in an image (heatmaps, concepts, similar cases)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from ..checks import split_names
from .common import AllowOutsideOption, CaptionsOption, OverwriteOption, console, handle_errors


@handle_errors
def explain_command(
    image: Annotated[Path, typer.Argument(help="Image file to explain (2D).")],
    model: Annotated[Path, typer.Option(help="Trained model folder.")],
    labels: Annotated[list[str] | None, typer.Option(
        help="Findings to choose among, comma-separated or the option repeated, 2 to 64 distinct (default: every "
             "class the model's captions describe, of the concept bottleneck's label column when they describe "
             "it; a bottleneck that does not predict them is refused).")] = None,
    label_column: Annotated[str | None, typer.Option(
        help="Label column whose class descriptions to use (default: the first with all the labels).")] = None,
    captions: CaptionsOption = None,
    out: Annotated[Path | None, typer.Option(
        help="Folder for the heatmap overlays (PNG) and explanation.json; without it only the summary prints.")] = None,
    method: Annotated[list[str] | None, typer.Option(
        help="Heatmap method (repeatable): patch_text, gradcam, occlusion, smoothgrad (default: patch_text, "
             "gradcam and occlusion, those the model supports: gradcam on a CNN (resnet, densenet) only, refused on "
             "a ViT; smoothgrad only when asked for: it fails the model-randomisation sanity check; occlusion is "
             "the slowest, about 1-3 s per finding on 2 CPU cores at 96 px).")] = None,
    top: Annotated[int, typer.Option(help="Explain the TOP most probable findings.")] = 1,
    concepts: Annotated[str | None, typer.Option(
        help="Concept bank: chest_xray, dermoscopy (shipped) or a text file of phrases, one a line.")] = None,
    concept_data: Annotated[Path | None, typer.Option(
        help="Dataset to fit the concept bottleneck on (its train split, every record when it has no split "
             "column); needs --concepts. The fitted bottleneck is saved as OUT/bottleneck.json.")] = None,
    concept_label: Annotated[str | None, typer.Option(
        help="Label column of --concept-data to fit on (default: the dataset's default label column, as for "
             "train and eval; an identifier column is refused; needs --concept-data).")] = None,
    concept_split: Annotated[str | None, typer.Option(
        help="Split of --concept-data to fit on (default: train; a dataset whose splits include no 'train' is "
             "refused; 'all' for every record; needs --concept-data).")] = None,
    allow_outside_root: AllowOutsideOption = False,
    bottleneck: Annotated[Path | None, typer.Option(
        help="A concept bottleneck fitted before (bottleneck.json) instead of --concept-data.")] = None,
    index: Annotated[str | None, typer.Option(
        help="Case index (folder or Postgres URL): list the nearest cases.")] = None,
    k: Annotated[int | None, typer.Option(
        "--k", "-k", help="Nearest cases to list with --index (default 5; needs --index).")] = None,
    overwrite: OverwriteOption = False,
) -> None:
    """Explain the predicted findings of one image: heatmaps (patch-text similarity, Grad-CAM,
    occlusion, SmoothGrad), top concepts of a concept bottleneck and the nearest indexed cases."""
    from ..explain.explanation import BOTTLENECK_FILE, EXPLANATION_FILE
    from ..explain.heatmaps import check_heatmap_model, check_methods
    from ..index.base import check_neighbour_options
    from ..io import check_output_file, check_output_folder
    from ..models.registry import load_model

    check_output_folder(out, "--out")

    saved = out / BOTTLENECK_FILE if out is not None and concept_data is not None else None
    inputs = {"IMAGE": image, "--model": model, "--captions": captions, "--concept-data": concept_data,
              "--bottleneck": bottleneck, "--index": index}
    if out is not None:  # before any work
        for path in (saved, out / EXPLANATION_FILE):
            if path is not None:
                check_output_file(path, overwrite, "--out", inputs)
    check_neighbour_options(index, k)  # before a bottleneck is fitted (slow)
    if method:
        check_methods(method)  # before a bottleneck is fitted (slow)
    net = load_model(model)
    check_heatmap_model(net)  # a volume model's refusal before a bottleneck is fitted (slow)
    fitted = _bottleneck(net, concepts, concept_data, concept_label, concept_split, bottleneck, captions,
                         allow_outside_root)
    names = split_names(labels) if labels else None  # None: the captions' classes (explanation.finding_classes)
    result = _explain(net, image, names, label_column, captions, method, top, out, overwrite, fitted, index, k,
                      saved is not None)
    _print(result, out)
    if fitted is not None and saved is not None:
        console.print(f"wrote {saved}")


def _bottleneck(net, concepts, concept_data, concept_label, concept_split, bottleneck, captions,
                allow_outside_root=False):
    from ..api import fit_bottleneck_from_path
    from ..errors import InputError
    from ..explain.concepts import ConceptBottleneck, load_concepts

    for option, value, names in (("--concept-label", concept_label, "label column"),
                                 ("--concept-split", concept_split, "split")):
        if value is not None and concept_data is None:
            raise InputError(f"{option} needs --concept-data (the dataset whose {names} it names)")
    if bottleneck is not None:
        if concept_data is not None:
            raise InputError("give --bottleneck or --concept-data, not both")
        return ConceptBottleneck.load(bottleneck)
    if concept_data is None:
        if concepts is not None:
            load_concepts(concepts)  # a bad bank is reported even when nothing is fitted
            raise InputError("--concepts needs --concept-data (labelled images to fit the bottleneck on)")
        return None
    if concepts is None:
        raise InputError("--concept-data needs --concepts (a concept bank: chest_xray, dermoscopy or a file)")
    return fit_bottleneck_from_path(net, concept_data, concepts, concept_label, concept_split, captions,
                                    allow_outside_root)


def _explain(net, image, names, label_column, captions, method, top, out, overwrite, fitted, index, k,
             save_bottleneck):
    from ..explain.explanation import explain_image
    from ..explain.heatmaps import default_methods

    kwargs = {"labels": names, "label_column": label_column, "captions": captions,
              "methods": method or default_methods(net),
              "top": top, "out": out, "overwrite": overwrite, "bottleneck": fitted, "k": k,
              "save_bottleneck": save_bottleneck}
    if index is None:
        return explain_image(net, image, **kwargs)
    from ..index import open_index

    with open_index(index) as opened:
        return explain_image(net, image, index=opened, **kwargs)


def _print(result: dict, out: Path | None) -> None:
    from ..models.ood import ood_comparison

    if result.get("input_flags"):
        console.print(f"[red]{' and '.join(result['input_flags'])} as the model sees it: no content to explain[/]",
                      markup=True)
    if result.get("out_of_distribution"):
        console.print(f"[red]out of distribution ({ood_comparison(result)}): unlike the model's training images, "
                      "this explanation is unreliable[/]", markup=True)
    for entry in result["findings"]:
        console.print(f"[bold]{escape(entry['finding'])}[/] p={entry['probability']:.2f}", markup=True)
        for name, heatmap in entry["heatmaps"].items():
            where = f" -> {out / heatmap['file']}" if "file" in heatmap else ""
            at = (f"peak at row {heatmap['peak'][0]}, column {heatmap['peak'][1]}" if heatmap["peak"]
                  else "constant map (no positive evidence)")
            console.print(f"  {name}: {at}{where}", highlight=False, soft_wrap=True)
        if "concepts" in entry and not entry["concepts"]:
            against = " or against" if not entry.get("concepts_against") else ""
            console.print(f"  no concept pushes towards{against} {entry['finding']!r} in this image", highlight=False,
                          soft_wrap=True)
        for side, parts in (("for", entry.get("concepts", [])), ("against", entry.get("concepts_against", []))):
            for part in parts:
                console.print(f"  concept {part['concept']!r} ({side}): weight {part['weight']:+.3f}, "
                              f"contribution {part['contribution']:+.3f}", highlight=False, soft_wrap=True)
    if result.get("left_out_copies"):
        console.print(f"the image is indexed as {', '.join(result['left_out_copies'])}: left out of the nearest "
                      "cases", highlight=False)
    for rank, hit in enumerate(result.get("neighbours", []), 1):
        console.print(f"  {rank}. {hit['id']} ({hit['split']}) score {hit['score']:.3f}", highlight=False)
    if out is not None:
        console.print(f"wrote {out / 'explanation.json'}")
