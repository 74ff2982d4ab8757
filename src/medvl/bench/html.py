"""report.html of a suite run: flags first, then per task and dataset a table of every metric with its
interval (the models side by side) and the plots its checks produced. Self-contained: plots are inline
PNGs, each an ``<img class="plot" data-plot="ID">``, listed in results.json under ``plots``."""

from __future__ import annotations

import html
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..report import figure_to_data_uri, write_html

Figure = Any


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_suite_report(path: Path, suite, results: dict[str, Any], cells: Sequence[dict[str, Any]]) -> list[str]:
    """Write the report; returns the ids of the plots in it (every one must be drawn)."""
    models = list(results["models"])
    plots: list[str] = []
    sections = [("Run", _run_table(suite, results)), ("Flags", _flags(results["flags"], results.get("skipped", [])))]
    by_task: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for cell in cells:
        by_task[cell["key"]].append(cell)
    for key, task_cells in by_task.items():
        first = task_cells[0]
        fitted = next((row.get("train_dataset") for row in first["rows"]), None)
        heading = f"{first['task']} on {first['dataset']} ({first['split']}" + (
            f", label {first['label']}" if first.get("label") else "") + (
            f", fitted on {fitted}" if fitted not in (None, first["dataset"]) else "") + ")"
        parts = [_metric_table(task_cells, models)]
        for name, draw in PLOTS.items():
            drawn = [(cell["model"], cell["plots"][name]) for cell in task_cells if name in cell["plots"]]
            if drawn:
                plot_id = f"{key}/{name}"
                figure = draw(drawn)
                if figure is not None:
                    parts.append(f"<h3>{html.escape(TITLES[name])}</h3><img class='plot' "
                                 f"data-plot='{html.escape(plot_id)}' alt='{html.escape(plot_id)}' "
                                 f"src='{figure_to_data_uri(figure)}'>")
                    plots.append(plot_id)
        # checks not run, checks run on part of the data, then task figures
        for title, name in (("Skipped", "skipped"), ("Partly scored", "partly_scored"),
                            ("Not scored", "skipped_metrics")):
            skipped = [f"{cell['model']}: {what}: {reason}"
                       for cell in task_cells for what, reason in cell[name].items()]
            if skipped:
                parts.append(f"<p class='note'>{title}: " + "; ".join(html.escape(s) for s in skipped) + "</p>")
        sections.append((heading, "\n".join(parts)))
    write_html(path, f"medvl bench: {suite.name}", sections)
    return plots


def _run_table(suite, results: dict[str, Any]) -> str:
    rows = {"suite file": suite.source, "seed": suite.seed, "bootstrap resamples": suite.bootstrap,
            **{f"model {name}": folder for name, folder in results["models"].items()},
            **{f"data {name}": f"{block['sha256'][:16]}… ({block['files']} files)"
               for name, block in results["data_hashes"].items()},
            **{f"bootstrap unit {name}": (unit if unit in ("image", "question image") else
                                          f"{unit} (whole cases drawn; subgroup sizes count them)")
               for name, unit in results.get("bootstrap_unit", {}).items()},
            **{f"version {name}": value for name, value in results["versions"].items()}}
    body = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>" for k, v in rows.items())
    return f"<table><tr><th>what</th><th>value</th></tr>{body}</table>"


def _flags(flags: list[str], skipped: list[dict[str, Any]]) -> str:
    """The flags, then the checks that did not run: "no flag" is a pass only of the checks that ran; then the
    checks that ran on part of the data (``partly_scored``): a pass of what they scored only."""
    not_run = [skip for skip in skipped if not skip.get("partly_scored")]
    partly = [skip for skip in skipped if skip.get("partly_scored")]
    left_out = (f"{len(partly)} {'check was' if len(partly) == 1 else 'checks were'} partly scored (below): what "
                f"{'it' if len(partly) == 1 else 'they'} left out was not checked.")
    if flags:
        text = "<ul class='flags'>" + "".join(f"<li>{html.escape(flag)}</li>" for flag in flags) + "</ul>"
    elif not_run:
        text = (f"<p class='note'>No check that ran flagged any model; {len(not_run)} did not run (below), so "
                "they did not pass either" + (f"; {left_out}" if partly else ".") + "</p>")
    elif partly:
        text = f"<p class='note'>No check flagged any model; {left_out}</p>"
    else:
        return "<p class='ok'>No check flagged any model.</p>"
    for title, entries in (("Not run", not_run), ("Partly scored", partly)):
        if entries:
            text += f"<p class='note'>{title}:</p><ul class='skipped'>" + "".join(
                f"<li>{html.escape(skip_line(skip))}</li>" for skip in entries) + "</ul>"
    return text


def skip_line(skip: dict[str, str]) -> str:
    """One ``runner.skipped_checks`` (or ``runner.skipped_metrics``) entry as a line of text (the report and the CLI
    summary)."""
    return f"{skip['model']} / {skip['key']} / {skip.get('check', skip.get('metric'))}: {skip['reason']}"


def _metric_table(cells: list[dict[str, Any]], models: list[str]) -> str:
    present = [m for m in models if any(c["model"] == m for c in cells)]
    values: dict[str, dict[str, str]] = defaultdict(dict)
    for cell in cells:
        for row in cell["rows"]:
            values[row["metric"]][cell["model"]] = _value(row)
    head = "".join(f"<th>{html.escape(m)}</th>" for m in present)
    body = "".join(f"<tr><td>{html.escape(metric)}</td>" + "".join(f"<td>{by_model.get(m, '-')}</td>" for m in present)
                   + "</tr>" for metric, by_model in values.items())
    return f"<table class='metrics'><tr><th>metric</th>{head}</tr>{body}</table>"


def _value(row: dict[str, Any]) -> str:
    if row["value"] is None:
        return "-"
    text, interval = f"{row['value']:.3f}", interval_text(row)
    if interval and row.get("interval_kind"):
        text += f" <span class='ci spread' title='{html.escape(row['interval_kind'])}'>{html.escape(interval)}</span>"
    elif interval:
        text += f" <span class='ci'>{html.escape(interval)}</span>"
    if row.get("rough"):  # a class of too few records (a subgroup's or the scored split's): see rough_note
        text += f" <span class='note' title='{html.escape(rough_note(row))}'>rough</span>"
    return text


def rough_note(row: dict[str, Any]) -> str:
    """Why a row marked ``rough`` (``eval.subgroups.rough_mark``) has a rough interval, in words (the report's
    tooltip and the CLI summary)."""
    from ..eval.subgroups import SMALL_CLASS

    smallest = row.get("smallest_class")
    count = f"{smallest} record{'s' * (smallest != 1)}" if isinstance(smallest, int) else "few records"
    return (f"a class of its scored records has {count} (under {SMALL_CLASS}): its 95 % interval covers the true "
            "value far less often than 95 %, read it as rough")


DRAW_SPREAD = "mean ± 1.96 sd over the draws, within [0, 1]"  # a few-shot row's interval_kind (runner._linear_probe)


def interval_text(row: dict[str, Any]) -> str:
    """A row's interval as text (the report and the CLI summary): ``[low, high]`` for a bootstrap 95 % interval
    (a row without ``interval_kind``); a few-shot row's spread over its draws of the training shots, which leaves
    the scored records' sampling out, written apart so it is never read as one ("" without bounds)."""
    low, high = row.get("low"), row.get("high")
    if low is None or high is None:
        return ""
    kind = row.get("interval_kind")
    if kind is None:
        return f"[{low:.3f}, {high:.3f}]"
    label = f"±1.96 sd, {row['repeats']} draws" if kind == DRAW_SPREAD and row.get("repeats") else kind
    return f"({label}: {low:.3f}–{high:.3f})"


# ------------------------------------------------------------------ plots: (model, plot data) pairs -> figure


def _model_axes(count: int, width: float = 4.0, height: float = 3.4):
    plt = _pyplot()
    figure, axes = plt.subplots(1, count, figsize=(width * count, height), squeeze=False)
    return figure, list(axes[0])


def _reliability(drawn: list[tuple[str, Any]]) -> Figure:
    figure, axes = _model_axes(len(drawn))
    for axis, (model, block) in zip(axes, drawn, strict=True):
        fitted_on = block.get("fitted_on")  # the bins are the scored split's; the temperature is fitted_on's
        labels = {"before": "before temperature scaling",
                  "after": f"after a temperature fitted on {fitted_on}" if fitted_on else "after temperature scaling"}
        for stage, style in (("before", "o--"), ("after", "s-")):
            bins = [b for b in block["reliability"][stage] if b["count"]]
            axis.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], style, label=labels[stage])
        axis.plot([0, 1], [0, 1], "k:", linewidth=0.8)
        title = f"{model}: {block['split']}" if fitted_on and block.get("split") else model
        axis.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy", title=title)
        axis.legend(fontsize=7, loc="upper left")
    return figure


def _risk_coverage(drawn: list[tuple[str, Any]]) -> Figure:
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(5, 3.6))
    for model, block in drawn:
        curve = block["risk_coverage"]
        axis.plot(curve["coverage"], curve["risk"], label=model)
    axis.set(xlabel="coverage (share answered)", ylabel="risk (error rate among answered)", xlim=(0, 1))
    axis.legend(fontsize=8)
    return figure


def _corruption(drawn: list[tuple[str, Any]]) -> Figure:
    kinds = list(drawn[0][1]["curves"])
    aucs = [value for _, block in drawn for value in (block.get("clean", {}).get("auc"),
            *(p["auc"] for points in block["curves"].values() for p in points)) if value is not None]
    bottom = max(0.0, min([0.3, *aucs]) - 0.02)  # every curve drawn, however low (an AUC below 0.5 too)
    plt = _pyplot()
    columns = min(4, len(kinds))
    rows = -(-len(kinds) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3.3 * columns, 2.8 * rows), squeeze=False)
    for i, kind in enumerate(kinds):
        axis = axes[i // columns][i % columns]
        for model, block in drawn:
            points = block["curves"].get(kind, [])
            clean = block.get("clean", {}).get("auc")
            xs = [0] + [p["severity"] for p in points]
            ys = [clean] + [p["auc"] for p in points]
            axis.plot(xs, [np.nan if y is None else y for y in ys], marker="o", label=model)
        axis.set(title=kind, xlabel="severity", ylabel="AUC", ylim=(bottom, 1.02))
        axis.legend(fontsize=7)
    for j in range(len(kinds), rows * columns):
        axes[j // columns][j % columns].axis("off")
    figure.tight_layout()
    return figure


def _subgroups(drawn: list[tuple[str, Any]]) -> Figure | None:
    columns = list(drawn[0][1])
    if not columns:
        return None
    figure, axes = _model_axes(len(columns), width=4.4)
    width = 0.8 / len(drawn)
    for axis, column in zip(axes, columns, strict=True):
        groups = list(dict.fromkeys(group for _, block in drawn for group in block.get(column, {}).get("groups", {})))
        for m, (model, block) in enumerate(drawn):
            scored = block.get(column, {}).get("groups", {})
            values, lows, highs, rough = [], [], [], []
            for group in groups:
                auc = scored.get(group, {}).get("auc")
                rough.append(bool(scored.get(group, {}).get("rough")))
                value = auc["value"] if isinstance(auc, dict) and auc.get("value") is not None else np.nan
                values.append(value)
                lows.append(value - auc["low"] if isinstance(auc, dict) and auc.get("low") is not None else 0)
                highs.append(auc["high"] - value if isinstance(auc, dict) and auc.get("high") is not None else 0)
            positions = np.arange(len(groups)) + m * width
            bars = axis.bar(positions, values, width, yerr=[lows, highs], capsize=2, label=model)
            for bar, is_rough in zip(bars, rough, strict=True):
                if is_rough:  # its interval covers far less than 95 %; out of the worst-group gap
                    bar.set_hatch("//")
        axis.set_xticks(np.arange(len(groups)) + 0.4 - width / 2, groups, rotation=30, fontsize=8)
        axis.set(title=column, ylabel="AUC (95% CI; hatched: rough)", ylim=(0, 1.05))
        axis.legend(fontsize=7)
    figure.tight_layout()
    return figure


def _bars(drawn: list[tuple[str, Any]], series: Callable[[Any], dict[str, float | None]], ylabel: str) -> Figure:
    plt = _pyplot()
    names = list(dict.fromkeys(name for _, block in drawn for name in series(block)))
    figure, axis = plt.subplots(figsize=(max(4.5, 1.3 * len(names) * len(drawn)), 3.4))
    _bar_axis(axis, drawn, series, ylabel)
    figure.tight_layout()
    return figure


def _bar_axis(axis, drawn: list[tuple[str, Any]], series: Callable[[Any], dict[str, float | None]],
              ylabel: str) -> None:
    """One bar per name of ``series`` and per model, on ``axis``."""
    names = list(dict.fromkeys(name for _, block in drawn for name in series(block)))
    width = 0.8 / len(drawn)
    for m, (model, block) in enumerate(drawn):
        values = series(block)
        axis.bar(np.arange(len(names)) + m * width, [np.nan if values.get(n) is None else values[n] for n in names],
                 width, label=model)
    axis.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names, rotation=20, fontsize=8)
    axis.set(ylabel=ylabel, ylim=(0, 1.05))
    axis.legend(fontsize=7)


SANITY_METRIC_NAMES = {"auc": "AUC", "balanced_accuracy": "balanced accuracy", "accuracy": "accuracy"}


def _sanity(drawn: list[tuple[str, Any]]) -> Figure:
    """One panel per metric the check compared (``compared``: AUC and balanced accuracy, each with its flags),
    the metric named on its axis."""
    metrics = list(dict.fromkeys(metric for _, block in drawn for metric in block.get("compared", [])))
    figure, axes = _model_axes(len(metrics or ["balanced_accuracy"]), width=max(4.5, 1.3 * 4 * len(drawn)))
    for axis, metric in zip(axes, metrics or ["balanced_accuracy"], strict=True):
        def series(block: dict[str, Any], metric: str = metric) -> dict[str, float | None]:
            values = {"model": block.get("model", {}).get(metric)}
            values.update({name: baseline.get(metric) for name, baseline in block["baselines"].items()})
            return values

        name = SANITY_METRIC_NAMES.get(metric, metric)
        _bar_axis(axis, drawn, series, f"{name}: model vs sanity baselines")
        axis.set_title(name)
    figure.tight_layout()
    return figure


def _counterfactual(drawn: list[tuple[str, Any]]) -> Figure:
    return _bars(drawn, lambda block: {"single image": block.get("single_accuracy"),
                                       "pair (both right)": block.get("pair_accuracy"),
                                       **{f"pair: {k}": v.get("pair_accuracy") for k, v in
                                          block.get("per_variation", {}).items() if isinstance(v, dict)}},
                 "accuracy")


def _shortcut(drawn: list[tuple[str, Any]]) -> Figure:
    """Balanced accuracy, as the check and its flag use it, with and without the region whose hiding lowered it
    most (the marker box of a shortcut phantom, else a corner)."""
    def series(block: dict[str, Any]) -> dict[str, float | None]:
        region = str(block.get("masked_region"))
        hidden = "marker box" if region == "box" else f"{region.replace('_', ' ')} corner"
        return {"balanced accuracy": block.get("balanced_accuracy"),
                f"{hidden} hidden": block.get("masked_balanced_accuracy")}

    return _bars(drawn, series, "balanced accuracy")


def _few_shot(drawn: list[tuple[str, Any]]) -> Figure:
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(5, 3.6))
    for model, block in drawn:
        shots = sorted(block, key=int)
        means = [block[k]["auc_mean"] for k in shots]
        stds = [block[k]["auc_std"] or 0 for k in shots]
        axis.errorbar([int(k) for k in shots], [np.nan if m is None else m for m in means], yerr=stds, marker="o",
                      capsize=3, label=model)
    axis.set(xscale="log", xlabel="labelled images per class", ylabel="AUC (mean ± sd over draws)")
    axis.legend(fontsize=8)
    return figure


def _question_types(drawn: list[tuple[str, Any]]) -> Figure:
    return _bars(drawn, lambda block: {name: row.get("overall_accuracy") for name, row in block.items()}, "accuracy")


PLOTS: dict[str, Callable[[list[tuple[str, Any]]], Figure | None]] = {
    "calibration": _reliability, "risk_coverage": _risk_coverage, "sanity": _sanity, "corruption": _corruption,
    "subgroups": _subgroups, "counterfactual": _counterfactual, "shortcut": _shortcut, "few_shot": _few_shot,
    "per_question_type": _question_types}
TITLES = {"calibration": "Reliability (top-label confidence vs accuracy)", "risk_coverage": "Risk-coverage",
          "sanity": "Sanity baselines", "corruption": "Corruption robustness (severity 0 = clean)",
          "subgroups": "Subgroups", "counterfactual": "Counterfactual pairs", "shortcut": "Shortcut check",
          "few_shot": "Few-shot linear probe", "per_question_type": "Accuracy per question type"}
