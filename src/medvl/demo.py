"""The demo: phantom data -> train -> zero-shot, retrieval, linear probe -> report.html."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np

from .checks import check_number
from .data import captions_for, load_dataset
from .data.phantom import generate_phantom
from .data.phantom.generate import check_phantom_params
from .embed import embed_images
from .errors import InputError
from .eval import linear_probe, retrieval, zero_shot
from .eval.zero_shot import label_classes
from .io import write_json
from .models.config import MAX_IMAGE_SIDE
from .models.registry import create_model
from .report import curve_figure, figure_to_data_uri, image_to_data_uri, roc_figure, table_html, write_html
from .train import distributed
from .train.loop import MAX_EPOCHS, METRICS_FILE, TrainConfig, seed_everything, train

log = logging.getLogger(__name__)
MIN_CASES = 60  # the smallest demo; a split of so few cases may lack a finding, which is then scored as missed

MARKER = "demo.json"  # written first ("complete": false) so a rerun recognises an interrupted demo as its own
LABEL = "finding"


def run_demo(out: str | Path, n: int = 2400, epochs: int = 12, seed: int = 0, size: int = 128,
             model_name: str = "cxr-small", image_size: int | None = 96, show_progress: bool = True,
             overwrite: bool = False) -> dict:
    """Run the whole demo into ``out``; returns the headline numbers and the report path.

    ``image_size`` overrides the model's input side (96 px keeps the demo under 10 minutes on two
    cores; None keeps the registered size). ``out/demo.json`` marks the folder as a demo's before anything
    else is written (``"complete": false`` until the report is written), so the same command rerun after an
    interruption continues in it; its phantom data is reused only when the marker says it was complete. A
    complete demo is run again only with ``overwrite``: the run replaces ``out/train`` (with whatever was added to
    it since, e.g. an OOD guard or an ONNX export), ``results.json`` and ``report.html``.
    """
    out = Path(out)
    check_number("n", n, minimum=MIN_CASES, integer=True)
    check_number("epochs", epochs, minimum=1, maximum=MAX_EPOCHS, integer=True)
    check_number("image_size", image_size, minimum=8, maximum=MAX_IMAGE_SIDE, integer=True, optional=True)
    check_phantom_params(n, seed, size)  # --size and --seed: refused before anything in ``out`` is touched
    distributed.check_single_process()  # as training would refuse it (fit), but before the phantom is written
    if out.exists() and any(out.iterdir()) and not (out / MARKER).exists():
        raise InputError(f"{out}: folder exists, is not empty and is not a medvl demo folder")
    started = time.perf_counter()
    seed_everything(seed)  # the model first: a bad --model or --image-size is refused before any data is made
    model = create_model(model_name, **({"image.image_size": image_size} if image_size else {}))
    if model.config.image.spatial_dims != 2:
        raise InputError(f"model {model_name}: takes 3D volumes; the demo trains on 2D phantom chest radiographs "
                         "(choose a 2D model, e.g. cxr-small or phantom-tiny)")
    previous = _read_marker(out)
    settings = {"n": n, "seed": seed, "size": size, "epochs": epochs, "model": model_name,
                "image_size": model.config.image.image_size}
    if previous.get("complete") is True and not overwrite:
        done, why_not = _finished(out, previous, settings)
        if done is not None:  # the same command again: its results, nothing redone or deleted
            return done
        raise InputError(f"{out}: holds a complete demo {why_not}; --overwrite runs it again, replacing its train "
                         "folder (the model and anything added to it), results.json and report.html")
    out.mkdir(parents=True, exist_ok=True)
    # an earlier run's report and results would outlive the model they describe: gone before the marker says the
    # demo is incomplete, so an interruption at any point never leaves them beside an incomplete marker (one
    # between the two steps leaves a complete marker without them, which a rerun names and refuses)
    for stale in ("report.html", "results.json"):
        (out / stale).unlink(missing_ok=True)
    write_json(out / MARKER, {**_data_fields(previous), "complete": False})
    data_dir = _phantom(out, n, seed, size, previous, show_progress)
    dataset = load_dataset(data_dir)
    train_set, test_set = dataset.select("train"), dataset.select("test")
    captions = captions_for(dataset)
    shutil.rmtree(out / "train", ignore_errors=True)
    config = TrainConfig(epochs=epochs, batch_size=64, lr=1e-3, seed=seed, text_source="text",
                         label_columns=[LABEL])
    model = train(model, train_set, config, out / "train", captions=captions, show_progress=show_progress,
                  data_parallel=False)  # it scores and writes on after training: in one process only
    trained_at = time.perf_counter()
    embeddings = embed_images(model, test_set, show_progress=show_progress)
    # among every finding of the phantom, as medvl eval zero-shot scores: a small test split may lack one
    zs = zero_shot(model, test_set, LABEL, captions=captions, image_embeddings=embeddings, keep_scores=True,
                   classes=label_classes(dataset, LABEL))
    rt = retrieval(model, test_set, image_embeddings=embeddings)
    lp = linear_probe(model, train_set, test_set, LABEL, show_progress=show_progress)
    headline = _headline(zs, rt, lp, (time.perf_counter() - started) / 60)
    probabilities, y_true = np.array(zs.pop("probabilities")), np.array(zs.pop("y_true"))
    results = {"zero_shot": zs, "retrieval": rt, "linear_probe": lp,
               "zero_shot_balanced_accuracy": zs["balanced_accuracy"],
               "i2t_R@5": rt["image_to_text"]["R@5"], "t2i_R@5": rt["text_to_image"]["R@5"],
               "linear_probe_auc": lp["auc"], "train_minutes": (trained_at - started) / 60,
               "total_minutes": headline["minutes"], "n": n, "epochs": epochs, "seed": seed,
               "model": model_name, "image_size": model.config.image.image_size}
    write_json(out / "results.json", results)
    report = _report(out, model, test_set, embeddings, zs, rt, lp, headline, probabilities, y_true)
    write_json(out / MARKER, {**settings, "complete": True})
    return {"headline": headline, "report": str(report), "results": results}


def _headline(zs: dict, rt: dict, lp: dict, minutes: float) -> dict:
    return {
        "zero-shot balanced accuracy": zs["balanced_accuracy"],
        "zero-shot balanced accuracy (chance)": zs["chance_balanced_accuracy"],
        "zero-shot macro AUC": zs["macro_auc"],
        "image->text R@5": rt["image_to_text"]["R@5"],
        "image->text R@5 (chance)": rt["image_to_text"]["chance"]["R@5"],
        "text->image R@5": rt["text_to_image"]["R@5"],
        "text->image R@5 (chance)": rt["text_to_image"]["chance"]["R@5"],
        "linear probe macro AUC": lp["auc"],
        "minutes": minutes,
    }


def _finished(out: Path, marker: dict, settings: dict) -> tuple[dict | None, str]:
    """The summary of the complete demo in ``out`` (``"reused": True``) when it was run with ``settings``, else None
    and why not. A marker written before the model and image size were recorded is read with the values its
    ``results.json`` records."""
    report = out / "report.html"
    try:
        results = json.loads((out / "results.json").read_text(encoding="utf-8"))
        headline = _headline(results["zero_shot"], results["retrieval"], results["linear_probe"],
                             results["total_minutes"])
        recorded = {**{key: results[key] for key in ("model", "image_size") if key in results}, **marker}
    except (OSError, ValueError, KeyError, TypeError):
        return None, "whose results.json is missing or unreadable"
    missing = [key for key in settings if key not in recorded]
    changed = [key for key in settings if key in recorded and recorded[key] != settings[key]]
    if changed or missing:
        return None, f"of other settings ({', '.join(changed) or 'not recorded: ' + ', '.join(missing)})"
    if not report.is_file():
        return None, "whose report.html is missing"
    return {"headline": headline, "report": str(report), "results": results, "reused": True}, ""


def _read_marker(out: Path) -> dict:
    """The marker of an earlier run into ``out`` (empty if none, or unreadable: its data is then regenerated)."""
    try:
        marker = json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        return {}
    return marker if isinstance(marker, dict) else {}


def _data_fields(marker: dict) -> dict:
    """The phantom parameters a marker records: those of the data now in ``out/data``."""
    return {key: marker[key] for key in ("n", "seed", "size") if key in marker}


def _phantom(out: Path, n: int, seed: int, size: int, previous: dict, show_progress: bool) -> Path:
    """Reuse the phantom folder of an earlier run with the same parameters, else generate it. The marker names
    no parameters while the data is being replaced, so an interrupted generation is never taken for complete."""
    data_dir = out / "data"
    if data_dir.exists() and (previous.get("n"), previous.get("seed"), previous.get("size")) == (n, seed, size):
        return data_dir
    write_json(out / MARKER, {"complete": False})
    generate_phantom(data_dir, n=n, seed=seed, size=size, overwrite=True, progress=show_progress)
    write_json(out / MARKER, {"n": n, "seed": seed, "size": size, "complete": False})
    return data_dir


def _report(out, model, test_set, embeddings, zs, rt, lp, headline, probabilities, y_true) -> Path:
    roc = roc_figure(y_true, probabilities, zs["classes"], "zero-shot ROC, one-vs-rest")
    sections = [("Headline (held-out test split)", table_html(headline)),
                ("Zero-shot per class", _per_class_html(zs["per_class"])),
                ("ROC", f"<img src='{figure_to_data_uri(roc)}'>")]
    curve = _loss_curve(out / "train" / METRICS_FILE)
    if curve:
        sections.append(("Training loss", f"<img src='{curve}'>"))
    sections.append(("Example cases and their top retrieved reports", _examples(model, test_set, embeddings)))
    probe_rows = {"macro AUC": lp["auc"], "accuracy": lp["accuracy"],
                  **{f"{k}-shot AUC": v["auc_mean"] for k, v in lp["few_shot"].items()}}
    sections.append(("Linear probe", table_html(probe_rows)))
    return write_html(out / "report.html", "medvl demo: phantom chest X-rays", sections)


def _per_class_html(per_class: dict) -> str:
    def auc(value) -> str:  # a class absent from the split has none
        return "-" if value is None else f"{value:.3f}"

    rows = "".join(f"<tr><td>{name}</td><td>{row['support']}</td><td>{row['recall']:.3f}</td>"
                   f"<td>{row['precision']:.3f}</td><td>{auc(row['auc'])}</td></tr>"
                   for name, row in per_class.items())
    return f"<table><tr><th>class</th><th>n</th><th>recall</th><th>precision</th><th>AUC</th></tr>{rows}</table>"


def _loss_curve(metrics_path: Path) -> str | None:
    if not metrics_path.exists():
        return None
    lines = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    # an epoch's short last batch is left out: its contrastive loss, over fewer candidates, is on a lower scale
    points = [(line["step"], line["loss"]) for line in lines if "loss" in line and line.get("full_batch", True)]
    if not points:
        return None
    steps, losses = zip(*points, strict=True)
    return figure_to_data_uri(curve_figure(steps, losses, "loss of the logged step's batch",
                                           "training loss (full batches)"))


def _examples(model, test_set, embeddings, per_class: int = 1, top: int = 3) -> str:
    import html

    texts = list(dict.fromkeys(r.text for r in test_set))
    text_emb = model.encode_texts(texts)
    similarity = (embeddings @ text_emb.t()).numpy()
    chosen, seen = [], set()
    for i, record in enumerate(test_set):
        finding = record.labels.get(LABEL)
        if finding not in seen:
            seen.add(finding)
            chosen.append(i)
    blocks = []
    for i in chosen[: 6 * per_class]:
        record = test_set[i]
        ranked = np.argsort(-similarity[i])[:top]
        items = "".join(
            f"<li class='{'hit' if texts[j] == record.text else ''}'>{html.escape(texts[j])}</li>" for j in ranked)
        pixels = model.preprocessor.load(record.image).numpy()
        blocks.append(f"<div class='case'><img src='{image_to_data_uri(pixels)}'><div><b>{record.id}</b>"
                      f" (ground truth: {html.escape(str(record.labels.get(LABEL)))})<ol>{items}</ol></div></div>")
    return "<p class='note'>Green: the case's own report.</p>" + "".join(blocks)
