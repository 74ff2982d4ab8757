"""``medvl report draft|knowledge`` and ``medvl eval case-retrieval``: retrieval-augmented reports on
the command line, over ``medvl.rag`` and ``medvl.eval.case_retrieval``. As in ``medvl search``,
``--json`` outputs name the image, index and data by their last path component only."""

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
    console,
    emit_json,
    fmt,
    handle_errors,
    print_metrics,
)
from .index import IndexOption, ModelOption

report_app = typer.Typer(help="Draft reports from similar cases; the knowledge base of finding definitions.",
                         no_args_is_help=True)

KnowledgeOption = Annotated[Path | None, typer.Option(
    help="Folder of finding files (*.md) added on top of the shipped knowledge base (same name replaces).")]
BuiltinOption = Annotated[bool, typer.Option(
    "--builtin-knowledge/--no-builtin-knowledge", help="Start from the shipped finding files.")]
SupportOption = Annotated[float, typer.Option(
    help="A finding or sentence is drafted when more than this weighted share of the neighbours states it "
         "(0.5 to below 1: a weighted majority).")]
SimilarityOption = Annotated[float, typer.Option(
    help="Abstain when the nearest case's cosine similarity is below this.")]


def _labeller(knowledge: Path | None, builtin: bool):
    from ..rag import ReportLabeller, load_knowledge

    return ReportLabeller(load_knowledge(knowledge, builtin=builtin))


@report_app.command("draft")
@handle_errors
def draft_command(
    image: Annotated[Path, typer.Argument(help="The image to draft a report for.")],
    index: IndexOption,
    model: ModelOption = None,
    k: Annotated[int, typer.Option("--k", "-k", help="Number of nearest cases to draft from.")] = 10,
    where: Annotated[str | None, typer.Option(help="Filter on case metadata, as in medvl search.")] = None,
    min_support: SupportOption = 0.5,
    min_similarity: SimilarityOption = 0.5,
    knowledge: KnowledgeOption = None,
    builtin_knowledge: BuiltinOption = True,
    related: Annotated[int, typer.Option(
        help="Also list this many knowledge entries closest to the image embedding (a weak signal with "
             "small models).")] = 0,
    json_out: Annotated[str | None, typer.Option("--json", help="Write the draft to this JSON file.")] = None,
    overwrite: OverwriteOption = False,
) -> None:
    """Draft a report from the k nearest cases' reports: consensus findings, sentences ranked by
    support, each citing its case ids; abstains when the cases disagree or are far."""
    from ..index import describe_target, index_model, open_index
    from ..rag import draft_report
    from ..rag.draft import check_settings

    check_outputs(overwrite, {"IMAGE": image, "--index": index, "--model": model, "--knowledge": knowledge},
                  json=json_out)
    check_settings(k, min_support, min_similarity, related)
    labeller = _labeller(knowledge, builtin_knowledge)
    with open_index(index) as opened:
        net = index_model(opened, model, option="--model")
        draft = draft_report(opened, net, image, k=k, where=where, labeller=labeller, min_support=min_support,
                             min_similarity=min_similarity, related=related)
    print_draft(draft)
    emit_json({"image": describe_target(image), "index": describe_target(index), **draft.to_dict()}, json_out,
              overwrite)


def print_draft(draft) -> None:
    from rich.markup import escape
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    from ..models.ood import ood_comparison

    title = (f"draft from {len(draft.neighbours)} nearest cases (nearest similarity "
             f"{max(n.score for n in draft.neighbours):.3f})" if draft.neighbours else "no similar case to draft from")
    copies = draft.settings.get("left_out_copies") or []
    siblings = draft.settings.get("left_out_same_case") or []
    if copies:
        others = f", with its case's other images ({len(siblings)} among the nearest)" if siblings else ""
        console.print(f"the query image is indexed as {', '.join(copies)}: its own report is left out of "
                      f"the draft{others}")
    if draft.ood.get("out_of_distribution"):
        console.print(f"[red]the image is out of distribution ({ood_comparison(draft.ood)}): unlike the model's "
                      "training images, its nearest cases and this draft are unreliable[/]", markup=True)
    if draft.abstained:
        console.print(Panel(Text.from_markup(f"[bold yellow]No draft:[/] {escape(draft.reason or '')}"), title=title))
    else:
        table = Table(title=title, header_style="bold", show_lines=False)
        for name in ("section", "sentence", "support", "cites"):
            table.add_column(name, justify="right" if name == "support" else "left")
        for sentence in draft.sentences:
            table.add_row(sentence.section, sentence.text, f"{sentence.support:.2f}",
                          ", ".join(sentence.cases[:4]) + (f" +{len(sentence.cases) - 4}" if len(sentence.cases) > 4
                                                            else ""))
        console.print(table)
    if draft.findings:  # none without neighbours: no empty table under the reason
        _print_findings(draft)
    for card in draft.definitions:
        console.print(f"[bold]{escape(card['title'])}[/]: {escape(card['definition'])}", markup=True)
    out_of_scope = draft.settings.get("out_of_scope") or []
    if out_of_scope:
        region = draft.settings.get("region")
        cases = f"of the {region}" if region else "of several body regions, none for most of them"
        console.print(f"no definition shown for {', '.join(out_of_scope)}: the knowledge base's entries are written "
                      f"for another body region and these cases are {escape(cases)}")
    if draft.related:
        shown = ", ".join(f"{card['title']} {card['score']:.2f}" for card in draft.related)
        console.print(f"knowledge entries closest to the image: {shown}")


def _print_findings(draft) -> None:
    from rich.table import Table

    table = Table(title="what the neighbours' reports state (weighted shares)", header_style="bold")
    for name in ("finding", "consensus", "positive", "uncertain", "negative"):
        table.add_column(name, justify="left" if name in ("finding", "consensus") else "right")
    for finding in draft.findings:
        shares = [f"{finding.support[s]:.2f}" if s in finding.support else "-"
                  for s in ("positive", "uncertain", "negative")]
        table.add_row(finding.name, finding.consensus or "-", *shares)
    console.print(table)


@report_app.command("knowledge")
@handle_errors
def knowledge_command(
    knowledge: KnowledgeOption = None,
    builtin_knowledge: BuiltinOption = True,
    finding: Annotated[str | None, typer.Option(help="Show one finding's entry in full.")] = None,
    query: Annotated[str | None, typer.Option(help="Rank entries by similarity to this text (needs --model).")] = None,
    model: Annotated[Path | None, typer.Option(help="Model whose text encoder ranks entries for --query.")] = None,
    k: Annotated[int | None, typer.Option("--k", "-k", help="Entries to show for --query (default 3).")] = None,
) -> None:
    """List the knowledge base (checks user files), show one entry, or retrieve entries for a text."""
    from rich.markup import escape
    from rich.table import Table

    from ..errors import InputError
    from ..rag import load_knowledge

    if finding is not None and query is not None:
        raise InputError("--finding and --query cannot be combined: --finding shows one entry, --query ranks them all")
    if query is None:  # options that only rank entries would be ignored without a word
        for option, value in (("--model", model), ("-k", k)):
            if value is not None:
                raise InputError(f"{option} needs --query (it ranks the entries for a text)")
    base = load_knowledge(knowledge, builtin=builtin_knowledge)
    if finding is not None:
        entry = base.findings.get(finding) or base.findings.get(base.resolve(finding) or "")
        if entry is None:
            raise InputError(f"no finding {finding!r} in the knowledge base; known: {', '.join(base.names)}")
        console.print(f"[bold]{escape(entry.title)}[/] ({escape(entry.name)}, {escape(str(entry.path))})", markup=True)
        console.print(f"definition: {entry.definition}\nappearance: {entry.appearance}")
        console.print(f"synonyms: {'; '.join(entry.synonyms)}")
        console.print(f"scope: {', '.join(entry.scope) if entry.scope else 'any body region'}")
        return
    scores: dict[str, float] = {}
    entries = list(base)
    if query is not None:
        if model is None:
            raise InputError("--query needs --model (its text encoder ranks the entries)")
        from ..models.registry import load_model

        ranked = base.retrieve(load_model(model), query, 3 if k is None else k)
        entries, scores = [f for f, _ in ranked], {f.name: s for f, s in ranked}
    table = Table(header_style="bold")
    for name in ("name", "title", "synonyms", "scope", *(["score"] if scores else []), "definition"):
        table.add_column(name)
    for entry in entries:
        score = [f"{scores[entry.name]:.3f}"] if scores else []
        table.add_row(entry.name, entry.title, str(len(entry.synonyms)), ", ".join(entry.scope) or "any", *score,
                      entry.definition)
    console.print(table)


@handle_errors
def case_retrieval_command(
    index: IndexOption,
    data: Annotated[Path, typer.Option(help="Dataset with the query cases (manifest, folder, .npz...).")],
    split: Annotated[str, typer.Option(help="Split of --data to query with; 'all' uses every record.")] = "test",
    model: ModelOption = None,
    k: Annotated[int, typer.Option("--k", "-k", help="Cutoff of precision@k and Jaccard@k.")] = 5,
    label_column: Annotated[list[str] | None, typer.Option(
        "--label-column", "-l", help="Label column compared (repeatable); default: the index's own.")] = None,
    draft_k: Annotated[int, typer.Option(help="Nearest cases each drafted report is made from.")] = 10,
    min_support: SupportOption = 0.5,
    min_similarity: SimilarityOption = 0.5,
    map_depth: Annotated[int, typer.Option(
        help="Ranks scored by mAP (the whole index when smaller; at most 10,000).")] = 1000,
    knowledge: KnowledgeOption = None,
    builtin_knowledge: BuiltinOption = True,
    json_out: JsonOption = None,
    overwrite: OverwriteOption = False,
    allow_outside_root: AllowOutsideOption = False,
    quiet: QuietOption = False,
) -> None:
    """Case retrieval quality: label precision@k and mAP, drafted-report finding F1, with baselines.

    Precision@k and mAP of label agreement between each query and its retrieved cases, beside the
    class-prior baseline; the finding F1 of reports drafted from the neighbours, beside the nearest
    single report."""
    from ..api import load_split
    from ..eval.case_retrieval import case_retrieval, check_case_retrieval_settings
    from ..index import describe_target, index_model, open_index

    check_outputs(overwrite, {"--index": index, "--data": data, "--model": model, "--knowledge": knowledge},
                  json=json_out)
    check_case_retrieval_settings(k, draft_k, min_support, min_similarity, map_depth, label_column)
    labeller = _labeller(knowledge, builtin_knowledge)
    dataset = load_split(data, split, label_column, allow_outside_root)
    with open_index(index) as opened:
        net = index_model(opened, model, option="--model")
        result = case_retrieval(opened, net, dataset, k=k, label_columns=label_column, draft_k=draft_k,
                                knowledge=labeller.knowledge, min_support=min_support, min_similarity=min_similarity,
                                map_depth=map_depth, show_progress=not quiet)
    print_case_retrieval(result)
    emit_json({**result, "index": describe_target(index), "data": describe_target(data), "split": split}, json_out,
              overwrite)


def print_case_retrieval(result: dict) -> None:
    from rich.table import Table

    k, draft, nearest = result["k"], result["draft"], result["nearest_report"]
    title = (f"case retrieval: {result['n_queries']} queries vs {result['n_index']} indexed cases "
             f"({', '.join(result['label_columns'])})")
    table = Table(title=title, header_style="bold")
    for name in ("metric", "medvl", "baseline", "baseline is"):
        table.add_column(name, justify="left" if name in ("metric", "baseline is") else "right")
    capped = f", -k {result['k_requested']} capped" if "k_requested" in result else ""
    rows = [
        (f"precision@{k} (same label set{capped})", result["precision_at_k"], result["precision_at_k_baseline"],
         "class prior"),
        (f"Jaccard@{k} (label sets{capped})", result["jaccard_at_k"], result["jaccard_at_k_baseline"], "class prior"),
        ("mAP", result["map"], result["map_baseline"], "random ranking"),
        (f"draft finding micro F1 (k={draft['k']}"
         + (f", --draft-k {draft['k_requested']} capped)" if "k_requested" in draft else ")"),
         draft["micro_f1"], nearest["micro_f1"], "nearest report"),
        ("draft finding macro F1", draft["macro_f1"], nearest["macro_f1"], "nearest report"),
        ("draft micro F1, answered queries", draft["answered_micro_f1"], nearest["answered_micro_f1"],
         "nearest report"),
        ("abstention rate", draft["abstention_rate"], None, ""),
    ]
    for name, value, baseline, kind in rows:
        table.add_row(name, fmt(value), fmt(baseline), kind)
    console.print(table)
    agreement = result.get("labeller_vs_labels")
    details = {"findings reference": draft["reference"], "self-matches left out": result["excluded_self"],
               "queries' own case left out": result["excluded_same_case"],
               "class prior sum p^2": result["prior_sum_p2"]}
    if agreement:
        details["labeller vs labels (own reports), exact"] = agreement.get("exact_match")
    knowledge = result.get("knowledge_retrieval")
    if knowledge and knowledge["n"]:
        details[f"knowledge entry of the finding, top-1 / top-3 of {knowledge['entries']}"] = \
            f"{knowledge['top1']:.3f} / {knowledge['top3']:.3f}"
    details["seconds"] = result["seconds"]
    print_metrics("details", details)


